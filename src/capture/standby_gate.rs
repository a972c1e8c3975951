//! Holding streamed transactions back until the synchronous standbys have
//! their commits.
//!
//! ```text
//!  primary: COMMIT ─▶ WAL flushed ─▶ walsender decodes it ─▶ relay
//!                         │                                    │ held here
//!                         └─▶ sync standby flushes ─▶ COMMIT returns
//!                                        │                     │
//!                     pg_stat_replication.flush_lsn ──────▶ released ─▶ Kafka
//! ```
//!
//! Logical decoding streams a commit as soon as the primary has flushed it,
//! while the writer's COMMIT still waits for the synchronous standbys
//! (SyncRep). A primary that dies right then leaves a standby without the
//! row, and a relay that had published it leaves an event in Kafka for a
//! row the surviving server never had (issue 21).
//!
//! Invariant: nothing is handed to Kafka that a failover to a synchronous
//! standby can take back. A batch goes to the publisher only once the
//! standbys that `synchronous_standby_names` requires (the `FIRST n` marked
//! `sync`, or `n` of the `ANY n` quorum) have flushed WAL past the end of
//! its last transaction. Polling needs no gate: a transaction becomes
//! visible to other sessions only after its SyncRep wait ended (unless the
//! writer cancels that wait, which Postgres warns it about; a claim then
//! sees the row early, and only this gate, in replication mode, holds it).
//!
//! Cost: one query covers every transaction up to a WAL position, and the
//! flushed position seen last lets later batches behind it pass without a
//! query; while the standbys are behind, the query repeats with a growing
//! pause. Where no standby is synchronous, the setting is re-read every
//! few seconds only. PostgreSQL 17+ can do the same on the server
//! (`synchronized_standby_slots` for a failover slot); then the relay does
//! not wait itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{PgConnection, Row};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::postgres::lsn::Lsn;
use crate::postgres::parse_lsn;
use crate::shutdown::Shutdown;

/// How often `synchronous_standby_names` is read again while it is empty.
const RECHECK_UNCONFIGURED: Duration = Duration::from_secs(5);
/// First pause while the standbys are behind: they usually catch up within
/// a network round trip.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
/// Longest pause between two readings while a batch is held.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);
/// A batch held this long is logged, and then again every `WARN_EVERY`.
const WARN_AFTER: Duration = Duration::from_secs(10);
const WARN_EVERY: Duration = Duration::from_secs(60);

/// How many synchronous standbys must have a commit, as
/// `synchronous_standby_names` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// `FIRST n (…)`, `n (…)` or a plain list (`FIRST 1`): the `n`
    /// standbys Postgres marks `sync`.
    First(usize),
    /// `ANY n (…)`: any `n` of the standbys Postgres marks `quorum`.
    Any(usize),
}

impl Requirement {
    /// Reads `synchronous_standby_names`; `None` when it is empty (no
    /// synchronous standbys). Names are not needed: `pg_stat_replication`'s
    /// `sync_state` says which standbys count.
    pub fn parse(names: &str) -> Option<Requirement> {
        let names = names.trim();
        if names.is_empty() {
            return None;
        }
        let lower = names.to_ascii_lowercase();
        // `KEYWORD n (` or `n (`; anything else is a plain list: FIRST 1.
        let count_before_list = |rest: &str| -> Option<usize> {
            let rest = rest.trim_start();
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let after = rest[digits.len()..].trim_start();
            if digits.is_empty() || !after.starts_with('(') {
                return None;
            }
            digits.parse().ok().filter(|n| *n > 0)
        };
        let keyword = |word: &str| {
            lower
                .strip_prefix(word)
                .filter(|rest| rest.starts_with(char::is_whitespace))
        };
        if let Some(n) = keyword("any").and_then(count_before_list) {
            return Some(Requirement::Any(n));
        }
        if let Some(n) = keyword("first").and_then(count_before_list) {
            return Some(Requirement::First(n));
        }
        Some(Requirement::First(count_before_list(&lower).unwrap_or(1)))
    }

    /// How many standbys must have flushed a commit.
    pub fn count(self) -> usize {
        match self {
            Requirement::First(n) | Requirement::Any(n) => n,
        }
    }

    /// The `sync_state` of the standbys that count.
    fn sync_state(self) -> &'static str {
        match self {
            Requirement::First(_) => "sync",
            Requirement::Any(_) => "quorum",
        }
    }

    /// The WAL position every commit before which the required standbys
    /// have flushed: the n-th highest `flush_lsn` among the standbys that
    /// count (for `FIRST n` Postgres marks exactly those `n` as `sync`, so
    /// that is their lowest). `None` while fewer than `n` are connected:
    /// then no commit is released, on the server either.
    pub fn released(self, standbys: &[Standby]) -> Option<Lsn> {
        let mut flushed: Vec<Lsn> = standbys
            .iter()
            .filter(|s| s.sync_state == self.sync_state())
            .map(|s| s.flush.unwrap_or(Lsn::ZERO))
            .collect();
        flushed.sort_unstable_by(|a, b| b.cmp(a));
        flushed.get(self.count().checked_sub(1)?).copied()
    }
}

/// A standby as `pg_stat_replication` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Standby {
    pub name: String,
    pub sync_state: String,
    pub flush: Option<Lsn>,
    /// `flush_lag` in seconds.
    pub flush_lag: Option<f64>,
}

/// Up to which WAL position a batch must be on the standbys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Through {
    /// The end LSN of the batch's last transaction.
    Commit(Lsn),
    /// The batch ends inside a transaction whose end has not arrived yet.
    /// Its commit is in the primary's flushed WAL already (decoding reads
    /// nothing else), so the primary's flush position bounds it.
    Unfinished,
}

/// What one reading of the server says.
struct Reading {
    names: String,
    in_recovery: bool,
    may_read_stats: bool,
    primary_flush: Option<Lsn>,
    standbys: Vec<Standby>,
}

/// The gate of one replication session, on a connection of its own.
pub struct StandbyGate {
    connection: PgConnection,
    metrics: Arc<Metrics>,
    stop: Shutdown,
    /// What the required standbys were last seen to have flushed: batches
    /// ending before it pass without a query.
    released: Lsn,
    /// No synchronous standby was configured at the last reading; the
    /// setting is read again after this instant.
    unconfigured_until: Option<Instant>,
}

impl StandbyGate {
    /// The gate for streaming from `slot`, or `None` where the server
    /// itself keeps decoding behind the standbys (`protected`: PostgreSQL
    /// 17+ with a failover slot and `synchronized_standby_slots`). Fails
    /// when the server has synchronous standbys but the role cannot see
    /// their positions.
    pub async fn open(
        mut connection: PgConnection,
        server_holds_back: bool,
        metrics: Arc<Metrics>,
        stop: Shutdown,
    ) -> Result<Option<StandbyGate>> {
        if server_holds_back {
            tracing::info!(
                "the slot is a failover slot and synchronized_standby_slots is set: the server \
                 streams only what those standbys have flushed, so the relay does not wait for \
                 synchronous standbys itself"
            );
            metrics.set_sync_standbys_required(0);
            return Ok(None);
        }
        let reading = read(&mut connection).await?;
        let requirement = applies(&reading)?;
        metrics.set_sync_standbys_required(requirement.map_or(0, Requirement::count));
        if let Some(requirement) = requirement {
            tracing::info!(
                synchronous_standby_names = %reading.names,
                standbys = requirement.count(),
                "the server has synchronous standbys: each transaction is published once they \
                 have flushed its commit (capture.wait_for_sync_standbys), so a failover cannot \
                 take back a published event"
            );
        }
        Ok(Some(StandbyGate {
            connection,
            metrics,
            stop,
            released: Lsn::ZERO,
            unconfigured_until: None,
        }))
    }

    /// Returns once the required synchronous standbys have flushed WAL
    /// `through` the batch (`true`), or when shutdown is requested first
    /// (`false`: the batch must not be published). `events` only goes into
    /// the log.
    pub async fn wait(&mut self, through: Through, events: usize) -> Result<bool> {
        if matches!(through, Through::Commit(lsn) if lsn <= self.released) {
            return Ok(true);
        }
        if self
            .unconfigured_until
            .is_some_and(|until| Instant::now() < until)
        {
            return Ok(true);
        }
        let started = Instant::now();
        let mut target = match through {
            Through::Commit(lsn) => Some(lsn),
            Through::Unfinished => None,
        };
        let mut pause = FIRST_PAUSE;
        let mut warn_at = started + WARN_AFTER;
        let mut warned = false;
        loop {
            let reading = read(&mut self.connection).await?;
            let Some(requirement) = applies(&reading)? else {
                // No synchronous standby (any more): commits do not wait
                // for one, so there is nothing a failover could take back
                // that the writer was not already told is committed.
                self.metrics.set_sync_standbys_required(0);
                self.metrics.set_sync_standby_hold(None);
                self.unconfigured_until = Some(Instant::now() + RECHECK_UNCONFIGURED);
                return Ok(true);
            };
            self.unconfigured_until = None;
            self.metrics.set_sync_standbys_required(requirement.count());
            let target = match (target, reading.primary_flush) {
                (Some(target), _) => target,
                (None, Some(flushed)) => *target.insert(flushed),
                // `applies` found a primary, which always reports one.
                (None, None) => {
                    return Err(Error::retry(
                        "the server reported no WAL flush position while it has synchronous \
                         standbys; reconnecting",
                    ))
                }
            };
            let released = requirement.released(&reading.standbys);
            if let Some(released) = released {
                self.released = self.released.max(released);
            }
            if released.is_some_and(|released| released >= target) {
                self.metrics.set_sync_standby_hold(None);
                if warned {
                    tracing::info!(
                        held_for = ?started.elapsed(),
                        events,
                        "the synchronous standbys caught up; publishing the held batch"
                    );
                }
                return Ok(true);
            }
            let behind = target.0.saturating_sub(released.unwrap_or(Lsn::ZERO).0);
            self.metrics.set_sync_standby_hold(Some(behind));
            if Instant::now() >= warn_at {
                warn_held(&reading, requirement, target, started.elapsed(), events);
                warned = true;
                warn_at = Instant::now() + WARN_EVERY;
            }
            if self.stop.requested_within(pause).await {
                self.metrics.set_sync_standby_hold(None);
                return Ok(false);
            }
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }
}

/// The requirement to wait for, `None` when the server has no synchronous
/// standbys (or is itself a standby, whose setting does nothing); fails
/// when the role cannot see the standbys' positions.
fn applies(reading: &Reading) -> Result<Option<Requirement>> {
    if reading.in_recovery {
        return Ok(None);
    }
    let Some(requirement) = Requirement::parse(&reading.names) else {
        return Ok(None);
    };
    if !reading.may_read_stats {
        return Err(Error::stop(format!(
            "the server has synchronous standbys (synchronous_standby_names = '{}'), but the \
             relay's role cannot see their positions in pg_stat_replication, so it cannot tell \
             when a commit is safe from a failover. Nothing was published. GRANT pg_read_all_stats \
             (or pg_monitor) to the role, or set capture.wait_for_sync_standbys: false to publish \
             on the primary's commit alone (a failover may then leave events in Kafka whose rows \
             the new primary lacks)",
            reading.names
        )));
    }
    Ok(Some(requirement))
}

/// Logs a batch held for long: which standbys, how far behind, what to do.
fn warn_held(
    reading: &Reading,
    requirement: Requirement,
    target: Lsn,
    held_for: Duration,
    events: usize,
) {
    let counted: Vec<String> = reading
        .standbys
        .iter()
        .filter(|s| s.sync_state == requirement.sync_state())
        .map(|s| {
            let flushed = s.flush.unwrap_or(Lsn::ZERO);
            format!(
                "`{}` flushed {flushed} ({} bytes behind{})",
                s.name,
                target.0.saturating_sub(flushed.0),
                s.flush_lag
                    .map(|lag| format!(", flush_lag {lag:.1}s"))
                    .unwrap_or_default()
            )
        })
        .collect();
    let standbys = if counted.is_empty() {
        "no synchronous standby is streaming".to_string()
    } else {
        counted.join("; ")
    };
    tracing::warn!(
        held_for = ?held_for,
        events,
        wait_for_lsn = %target,
        synchronous_standby_names = %reading.names,
        needed = requirement.count(),
        "holding a batch back: the synchronous standbys have not flushed its commit yet ({standbys}). \
         A failover now could lose these rows, so they are not published; the writers' COMMITs \
         wait for the same standbys. Bring the standby back or fix its link, or change \
         synchronous_standby_names; capture.wait_for_sync_standbys: false publishes without waiting"
    );
}

/// One round trip: the setting, whether the role may read the standbys'
/// positions, the primary's flush position, and the standbys that count.
async fn read(connection: &mut PgConnection) -> Result<Reading> {
    let rows = sqlx::query(
        "SELECT s.names, s.in_recovery, s.may_read, s.flushed, \
                r.application_name::text, r.sync_state, r.flush_lsn::text, \
                extract(epoch FROM r.flush_lag)::float8 \
         FROM (SELECT current_setting('synchronous_standby_names') AS names, \
                      pg_is_in_recovery() AS in_recovery, \
                      pg_has_role('pg_read_all_stats', 'USAGE') AS may_read, \
                      CASE WHEN pg_is_in_recovery() THEN NULL \
                           ELSE pg_current_wal_flush_lsn()::text END AS flushed) s \
         LEFT JOIN pg_stat_replication r ON r.sync_state IN ('sync', 'quorum')",
    )
    .fetch_all(&mut *connection)
    .await
    .map_err(|e| Error::from_postgres("reading the synchronous standbys' positions", e))?;
    let first = rows.first().ok_or_else(|| {
        Error::retry("reading the synchronous standbys' positions returned no row; retrying")
    })?;
    let get_error = |e: sqlx::Error| {
        Error::stop(format!(
            "pg_stat_replication answered in a form outboxd does not read: {e}"
        ))
    };
    let flushed: Option<String> = first.try_get(3).map_err(get_error)?;
    let mut reading = Reading {
        names: first.try_get(0).map_err(get_error)?,
        in_recovery: first.try_get(1).map_err(get_error)?,
        may_read_stats: first.try_get(2).map_err(get_error)?,
        primary_flush: flushed.as_deref().map(parse_lsn).transpose()?,
        standbys: Vec::new(),
    };
    for row in &rows {
        let Some(sync_state) = row.try_get::<Option<String>, _>(5).map_err(get_error)? else {
            continue;
        };
        let flush: Option<String> = row.try_get(6).map_err(get_error)?;
        reading.standbys.push(Standby {
            name: row
                .try_get::<Option<String>, _>(4)
                .map_err(get_error)?
                .unwrap_or_default(),
            sync_state,
            flush: flush.as_deref().map(parse_lsn).transpose()?,
            flush_lag: row.try_get(7).map_err(get_error)?,
        });
    }
    Ok(reading)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(name: &str, sync_state: &str, flush: u64) -> Standby {
        Standby {
            name: name.into(),
            sync_state: sync_state.into(),
            flush: Some(Lsn(flush)),
            flush_lag: None,
        }
    }

    #[test]
    fn synchronous_standby_names_in_every_form_postgres_takes() {
        assert_eq!(Requirement::parse(""), None);
        assert_eq!(Requirement::parse("  "), None);
        assert_eq!(Requirement::parse("s1"), Some(Requirement::First(1)));
        assert_eq!(Requirement::parse("s1, s2"), Some(Requirement::First(1)));
        assert_eq!(Requirement::parse("*"), Some(Requirement::First(1)));
        assert_eq!(
            Requirement::parse("2 (s1, s2, s3)"),
            Some(Requirement::First(2))
        );
        assert_eq!(
            Requirement::parse("FIRST 2 (s1, s2, s3)"),
            Some(Requirement::First(2))
        );
        assert_eq!(
            Requirement::parse("first 3(s1,s2,s3)"),
            Some(Requirement::First(3))
        );
        assert_eq!(
            Requirement::parse("ANY 2 (s1, s2, s3)"),
            Some(Requirement::Any(2))
        );
        assert_eq!(
            Requirement::parse("any 1 (\"Standby A\", s2)"),
            Some(Requirement::Any(1))
        );
        // A standby named like a keyword, in a plain list.
        assert_eq!(
            Requirement::parse("anywhere, firstly"),
            Some(Requirement::First(1))
        );
    }

    #[test]
    fn first_n_releases_what_every_sync_standby_flushed() {
        let standbys = [
            standby("a", "sync", 300),
            standby("b", "sync", 200),
            standby("c", "potential", 100),
            standby("d", "async", 50),
        ];
        assert_eq!(Requirement::First(2).released(&standbys), Some(Lsn(200)));
        assert_eq!(Requirement::First(1).released(&standbys), Some(Lsn(300)));
        // Fewer sync standbys connected than required: nothing is released
        // (the server releases no commit either).
        assert_eq!(Requirement::First(3).released(&standbys), None);
        assert_eq!(Requirement::First(1).released(&[]), None);
    }

    #[test]
    fn any_n_releases_the_nth_highest_of_the_quorum() {
        let standbys = [
            standby("a", "quorum", 100),
            standby("b", "quorum", 300),
            standby("c", "quorum", 200),
        ];
        assert_eq!(Requirement::Any(1).released(&standbys), Some(Lsn(300)));
        assert_eq!(Requirement::Any(2).released(&standbys), Some(Lsn(200)));
        assert_eq!(Requirement::Any(3).released(&standbys), Some(Lsn(100)));
        assert_eq!(Requirement::Any(4).released(&standbys), None);
        // `sync` rows (a FIRST setting not yet applied) do not count for ANY.
        assert_eq!(
            Requirement::Any(1).released(&[standby("a", "sync", 100)]),
            None
        );
    }

    #[test]
    fn a_standby_that_reported_no_position_yet_has_flushed_nothing() {
        let mut fresh = standby("a", "sync", 0);
        fresh.flush = None;
        assert_eq!(Requirement::First(1).released(&[fresh]), Some(Lsn::ZERO));
    }
}
