//! The catch-up drain: the unsent rows a replication slot's stream cannot
//! carry, published from the table before streaming starts.
//!
//! A slot streams only transactions that commit after its
//! `confirmed_flush_lsn`; rows committed before it are in the table alone.
//! Two starts leave such rows behind ([`needed`]):
//!
//! - a new slot (first start, a lost slot replaced): every unsent row;
//! - an existing slot past the last published position: rows committed in
//!   WAL the slot passed that this relay never published, because someone
//!   advanced the slot (`pg_replication_slot_advance`) or dropped and
//!   re-created it while the relay was down.
//!
//! Invariant: streaming starts only once no unsent row with a seq up to the
//! drain's bound is left in the table, as a plain read (no lock) sees it.
//! The drain's claims skip rows another session holds locked (`FOR UPDATE
//! SKIP LOCKED`: a service's `SELECT … FOR UPDATE` or `FOR SHARE`, a
//! foreign-key check's `FOR KEY SHARE`); an empty claim is therefore not
//! the end. While locked rows are left the drain waits, says which rows and
//! who may hold them, and claims again. A row the drain and the stream both
//! carry is produced once: the stream's catch-up filter
//! (`replication::CatchUpFilter`) drops streamed rows the table shows sent.

use std::time::Duration;

use tokio::time::Instant;

use super::polling::{self, Until};
use super::session::Session;
use crate::error::{Error, Result};
use crate::postgres::lsn::Lsn;
use crate::postgres::settled_wal_position;

/// Why a start drains the table before it streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    /// The slot was just created, or this relay never streamed from it:
    /// nothing committed before it is in its stream.
    NewSlot,
    /// The slot is past the last transaction this relay published.
    SlotPastCheckpoint {
        confirmed_flush: Option<Lsn>,
        last_published: Lsn,
    },
    /// The publication's entry for the table changed since the session of
    /// the latest checkpoint began (`capture::slot::publication_fingerprint`):
    /// rows committed while the table was out of it were never streamed.
    PublicationChanged,
}

/// Whether this start must drain the table before streaming.
///
/// The rule for an existing slot: drain when its `confirmed_flush_lsn` is
/// past the commit of the last published transaction (the checkpoint's
/// position), or unknown.
///
/// Why it is safe. The relay confirms a position only once every outbox
/// row committed before it is marked sent (acknowledge, then confirm), and
/// the takeover has just marked every row the latest checkpoint names. So
/// an unsent row that committed before the slot's position was skipped by
/// someone else, and only the table still has it. At or before the last
/// published commit nothing can be skipped: every event up to it is in
/// Kafka. Past it, what the relay can read does not tell its own confirms
/// from an operator's: it confirms the WAL of its own marks and, while the
/// outbox is idle, keepalive WAL ends, and records those confirms nowhere
/// but in the slot. So a stopped relay's slot is often past the checkpoint
/// (always after an idle spell), and the rule then sends the start to the
/// drain.
///
/// Why that is cheap. The drain first reads whether any unsent row is left
/// (one query on the unsent-rows index, once the transactions running at
/// that moment have ended, as the start of streaming waits anyway): on a
/// restart with nothing written meanwhile there is none, and streaming
/// starts at once. Rows written while the relay was down are published by
/// the drain's claims (bench/results.md), and the stream starts where the
/// drain read its bound ([`run`]), so it does not carry them again: only
/// what committed while the drain ran passes the catch-up filter. Only when
/// rows are provably behind the slot does the relay warn (`behind_slot`);
/// otherwise it says what it does at info.
///
/// Wherever the slot is, an existing slot is drained too when the
/// publication's entry for the table changed since the latest checkpoint's
/// session began (`publication_changed`): decoding applies the publication
/// as it was when each row was written, so rows committed while the table
/// was out of it were never streamed, though the relay confirmed past them.
pub(super) fn needed(
    slot_is_new: bool,
    publication_changed: bool,
    last_published: Option<Lsn>,
    confirmed_flush: Option<Lsn>,
) -> Option<Reason> {
    if slot_is_new {
        return Some(Reason::NewSlot);
    }
    if publication_changed {
        return Some(Reason::PublicationChanged);
    }
    let Some(last_published) = last_published else {
        return Some(Reason::NewSlot);
    };
    match confirmed_flush {
        Some(confirmed) if confirmed <= last_published => None,
        _ => Some(Reason::SlotPastCheckpoint {
            confirmed_flush,
            last_published,
        }),
    }
}

/// Publishes the rows the slot's stream cannot carry, then returns the WAL
/// position the drain's bound was read at: every outbox row whose commit
/// record lies before it is now in Kafka, or was marked sent or deleted
/// before (the bound's argument), so the stream may start there. `None`
/// when shutdown was requested first.
pub(super) async fn run(
    session: &mut Session<'_>,
    slot_name: &str,
    reason: Reason,
) -> Result<Option<Lsn>> {
    let (settled, up_to) = bound(session).await?;
    let Some(up_to) = up_to else {
        if let Reason::SlotPastCheckpoint { .. } = reason {
            tracing::debug!(
                slot = slot_name,
                "the slot is past the last published position and no row is unsent: nothing \
                 can be behind it"
            );
        }
        return Ok(Some(settled));
    };
    announce(session, slot_name, reason, up_to).await?;
    drain(session, up_to).await?;
    Ok((!session.stop.is_requested()).then_some(settled))
}

/// The drain's bound: the highest seq among unsent rows once every
/// transaction committed before now is visible, `None` when none is unsent.
///
/// Why it covers every row the stream cannot carry: such a row's commit
/// record lies before the slot's start (its creation, or the position it
/// was moved to), which lies before the WAL position settled here. Once
/// settled (`settled_wal_position`), every transaction whose commit record
/// lies before that position is visible, so the row is sent already or
/// unsent with a seq at most this. A row this read does not see (seqs are
/// handed out before commit, so its seq may well be lower) has its commit
/// record after the settled position, so after the slot's start: the
/// stream carries it, the drain need not wait for it, and the drain's plain
/// read does not see it either. Without settling, a row committed just
/// before the slot's start but not yet visible would be in neither.
///
/// Returned with the settled position: once the drain has claimed every
/// unsent row up to the bound, no row committed before it is unsent.
async fn bound(session: &mut Session<'_>) -> Result<(Lsn, Option<i64>)> {
    let settled = settled_wal_position(&mut session.connection).await?;
    let up_to = sqlx::query_scalar(&session.context.table.max_unsent_seq_sql())
        .fetch_one(&mut session.connection)
        .await
        .map_err(|e| Error::from_postgres("finding the unsent rows to catch up on", e))?;
    Ok((settled, up_to))
}

/// Says why the table is drained first; loudly when rows are provably
/// behind a slot someone moved.
async fn announce(
    session: &mut Session<'_>,
    slot_name: &str,
    reason: Reason,
    up_to: i64,
) -> Result<()> {
    if reason == Reason::PublicationChanged {
        tracing::warn!(
            slot = slot_name,
            up_to_seq = up_to,
            "the publication's entry for the outbox table changed since the last session began \
             (the table dropped from it and added back, its options changed, or it was \
             re-created): rows committed while the table was out of it never reached the stream. \
             Publishing the rows still unsent in the table before streaming; nothing is lost or \
             produced twice. Leave the publication to outboxd"
        );
        return Ok(());
    }
    let Reason::SlotPastCheckpoint {
        confirmed_flush,
        last_published,
    } = reason
    else {
        tracing::info!(
            slot = slot_name,
            up_to_seq = up_to,
            "publishing the rows still unsent in the table before streaming: the slot's stream \
             starts at its creation and cannot hold them"
        );
        return Ok(());
    };
    let confirmed_flush = confirmed_flush.map(|lsn| lsn.to_string());
    let behind = behind_slot(session, slot_name, up_to).await?;
    if behind.is_empty() {
        tracing::info!(
            slot = slot_name,
            confirmed_flush,
            %last_published,
            up_to_seq = up_to,
            "publishing the rows still unsent in the table before streaming: the slot is past the \
             last published position, as a relay that confirmed idle WAL leaves it, but also as a \
             slot advanced or re-created while the relay was down would be, and its stream would \
             not hold rows committed behind it. Rows the stream holds too are not produced twice"
        );
        return Ok(());
    }
    tracing::warn!(
        slot = slot_name,
        confirmed_flush,
        %last_published,
        behind_slot = ?behind,
        up_to_seq = up_to,
        "replication slot `{slot_name}` was moved past rows this relay never published: unsent \
         rows committed before its position (seqs {}), which only outboxd should confirm. \
         Someone advanced it (pg_replication_slot_advance) or dropped and re-created it while the \
         relay was down; its stream can never carry those rows. The relay publishes every unsent \
         row up to seq {up_to} from the table first, then streams: nothing is lost or produced \
         twice. Find what moved the slot so it does not happen again",
        seq_list(&behind),
    );
    Ok(())
}

/// Up to `SEQS_SHOWN` unsent rows (seq ≤ `up_to`) provably committed
/// before the slot's position: their inserting transaction is older than
/// the slot's `catalog_xmin`. That is the oldest transaction still running
/// at a WAL position the slot has confirmed, so an older one had ended
/// there, before the slot's position. Without a long-running transaction
/// the slot's `catalog_xmin` follows its position closely; with one, it
/// lags, and this finds fewer rows (never a row the stream still carries).
async fn behind_slot(session: &mut Session<'_>, slot_name: &str, up_to: i64) -> Result<Vec<i64>> {
    sqlx::query_scalar(&session.context.table.unsent_behind_slot_sql())
        .bind(up_to)
        .bind(slot_name)
        .bind(SEQS_SHOWN)
        .fetch_all(&mut session.connection)
        .await
        .map_err(|e| Error::from_postgres("looking for unsent rows behind the slot", e))
}

/// Seqs named in a log line: enough to find the rows, few enough to read.
const SEQS_SHOWN: i64 = 10;

/// First wait before claiming again while rows are left.
const FIRST_WAIT: Duration = Duration::from_millis(50);
/// Longest wait between claims: a released lock is noticed within it.
const LONGEST_WAIT: Duration = Duration::from_secs(1);
/// First pause between warnings about rows held by locks; it doubles.
const FIRST_WARNING_PAUSE: Duration = Duration::from_secs(10);
const LONGEST_WARNING_PAUSE: Duration = Duration::from_secs(600);

/// Claims rounds of unsent rows up to `up_to` until a plain read finds none
/// left, or shutdown.
async fn drain(session: &mut Session<'_>, up_to: i64) -> Result<()> {
    let mut patience = Patience::new();
    loop {
        polling::run(session, Until::DrainedUpTo(up_to)).await?;
        if session.stop.is_requested() {
            return Ok(());
        }
        // The round's claims ended with an empty one, and its batches are
        // all acknowledged: what is left, no claim of this relay holds.
        let left = unsent_left(session, up_to).await?;
        if left.is_empty() {
            return Ok(());
        }
        if patience.should_warn() {
            warn_rows_held(session, &left, up_to, patience.waited()).await;
        } else {
            tracing::debug!(unsent_seqs = ?left, "unsent rows left after the drain's claims; claiming again");
        }
        let mut stop = session.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(patience.next_wait()) => {}
            _ = stop.wait() => return Ok(()),
        }
    }
}

/// Says which rows the drain waits for, who may hold them, and what to do.
async fn warn_rows_held(session: &mut Session<'_>, left: &[i64], up_to: i64, waited: Duration) {
    let holders = row_lock_holders(session).await;
    tracing::warn!(
        unsent_seqs = ?left,
        lock_holder_pids = ?holders,
        waited_s = waited.as_secs(),
        "the catch-up drain cannot claim unsent rows [{}]: another session holds a lock on them \
         (SELECT … FOR UPDATE or FOR SHARE, or a foreign-key check's FOR KEY SHARE; backends \
         {holders:?} hold row locks on the table). Rows up to seq {up_to} may have committed \
         before the replication slot's position, where its stream cannot carry them, so the relay \
         claims them again as soon as the lock is released and streams only after that (new \
         rows wait meanwhile). If this lasts, end that transaction (pg_stat_activity shows it, \
         or pg_prepared_xacts for a prepared one)",
        seq_list(left),
    );
}

/// A few unsent rows with seq ≤ `up_to`, read without locking them (a
/// locked row is seen, never waited for).
async fn unsent_left(session: &mut Session<'_>, up_to: i64) -> Result<Vec<i64>> {
    sqlx::query_scalar(&session.context.table.unsent_up_to_sql())
        .bind(up_to)
        .bind(SEQS_SHOWN)
        .fetch_all(&mut session.connection)
        .await
        .map_err(|e| Error::from_postgres("checking for unsent rows the drain left", e))
}

/// Other backends holding row locks (`RowShareLock`: `FOR UPDATE`, `FOR
/// SHARE`, `FOR KEY SHARE`) on the outbox table, for the warning. Best
/// effort: an error leaves the list empty.
async fn row_lock_holders(session: &mut Session<'_>) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT DISTINCT pid FROM pg_locks \
         WHERE relation = to_regclass($1) AND mode = 'RowShareLock' AND granted \
           AND pid <> pg_backend_pid() \
         ORDER BY pid",
    )
    .bind(session.context.table.qualified())
    .fetch_all(&mut session.connection)
    .await
    .unwrap_or_default()
}

/// The drain's waits between rounds and its warnings, both backing off.
struct Patience {
    /// When rows were first found left.
    since: Option<Instant>,
    wait: Duration,
    rounds: u32,
    next_warning: Instant,
    warning_pause: Duration,
}

impl Patience {
    fn new() -> Patience {
        Patience {
            since: None,
            wait: FIRST_WAIT,
            rounds: 0,
            next_warning: Instant::now(),
            warning_pause: FIRST_WARNING_PAUSE,
        }
    }

    /// Whether to warn now. Not on the first round with rows left: a row
    /// that committed just after the claim is left once, then claimed.
    fn should_warn(&mut self) -> bool {
        self.rounds += 1;
        let now = Instant::now();
        self.since.get_or_insert(now);
        if self.rounds < 2 || now < self.next_warning {
            return false;
        }
        self.next_warning = now + self.warning_pause;
        self.warning_pause = (self.warning_pause * 2).min(LONGEST_WARNING_PAUSE);
        true
    }

    fn next_wait(&mut self) -> Duration {
        let wait = self.wait;
        self.wait = (self.wait * 2).min(LONGEST_WAIT);
        wait
    }

    /// How long rows have been found left.
    fn waited(&self) -> Duration {
        self.since.map(|since| since.elapsed()).unwrap_or_default()
    }
}

/// `1, 2, 3` for a log line; `1, 2, 3, …` when the read was cut at
/// `SEQS_SHOWN` and more may be left.
fn seq_list(seqs: &[i64]) -> String {
    let mut list: Vec<String> = seqs.iter().map(i64::to_string).collect();
    if i64::try_from(seqs.len()).is_ok_and(|n| n >= SEQS_SHOWN) {
        list.push("…".into());
    }
    list.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_list_of_seqs_says_more_may_be_left() {
        assert_eq!(seq_list(&[49, 50]), "49, 50");
        let full: Vec<i64> = (1..=SEQS_SHOWN).collect();
        assert!(seq_list(&full).ends_with("10, …"));
    }

    const PUBLISHED: Lsn = Lsn(0x1_0000);

    #[test]
    fn a_new_slot_or_one_never_streamed_from_is_drained() {
        assert_eq!(
            needed(true, false, Some(PUBLISHED), Some(PUBLISHED)),
            Some(Reason::NewSlot)
        );
        assert_eq!(
            needed(false, false, None, Some(PUBLISHED)),
            Some(Reason::NewSlot)
        );
    }

    #[test]
    fn a_slot_at_or_behind_the_last_published_commit_streams_at_once() {
        assert_eq!(needed(false, false, Some(PUBLISHED), Some(PUBLISHED)), None);
        assert_eq!(
            needed(false, false, Some(PUBLISHED), Some(Lsn(0x8000))),
            None
        );
    }

    #[test]
    fn a_slot_past_the_last_published_commit_is_drained_first() {
        let past = Some(Lsn(0x1_0001));
        assert_eq!(
            needed(false, false, Some(PUBLISHED), past),
            Some(Reason::SlotPastCheckpoint {
                confirmed_flush: past,
                last_published: PUBLISHED
            })
        );
        assert!(needed(false, false, Some(PUBLISHED), None).is_some());
    }

    #[test]
    fn a_changed_publication_drains_an_existing_slot_wherever_it_is() {
        for (last_published, confirmed) in [
            (Some(PUBLISHED), Some(PUBLISHED)),
            (Some(PUBLISHED), Some(Lsn(0x8000))),
            (Some(PUBLISHED), Some(Lsn(0x1_0001))),
            (None, Some(PUBLISHED)),
        ] {
            assert_eq!(
                needed(false, true, last_published, confirmed),
                Some(Reason::PublicationChanged)
            );
        }
        // A new slot drains anyway, as new.
        assert_eq!(
            needed(true, true, Some(PUBLISHED), Some(PUBLISHED)),
            Some(Reason::NewSlot)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waits_and_warnings_back_off() {
        let mut patience = Patience::new();
        assert!(!patience.should_warn(), "not on the first round");
        assert!(patience.should_warn());
        assert!(!patience.should_warn(), "not again before the pause");
        tokio::time::advance(FIRST_WARNING_PAUSE).await;
        assert!(patience.should_warn());
        tokio::time::advance(FIRST_WARNING_PAUSE).await;
        assert!(!patience.should_warn(), "the pause doubled");
        assert_eq!(patience.waited(), FIRST_WARNING_PAUSE * 2);
        let waits: Vec<Duration> = (0..7).map(|_| patience.next_wait()).collect();
        assert_eq!(waits[0], FIRST_WAIT);
        assert_eq!(waits[1], FIRST_WAIT * 2);
        assert_eq!(waits[6], LONGEST_WAIT);
    }
}
