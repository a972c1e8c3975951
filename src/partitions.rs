//! The partitioned outbox: one range partition of `created_at` per
//! interval, created ahead of time, dropped whole once it is old.
//!
//! Invariant: a partition is dropped only after it was detached under a
//! lock that waits out every transaction still inserting into it, and only
//! if it then holds no unsent row; otherwise it is put back untouched. So
//! dropping partitions can never lose an event, whatever the clocks say.
//! Every lock is taken with a short `lock_timeout`, so the services writing
//! to the table wait at most that long behind housekeeping.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use crate::config::Partitioning;
use crate::postgres::lsn::Lsn;
use crate::table::{quote_ident, OutboxTable};

/// Longest wait for a lock on the outbox table: the services' inserts queue
/// behind a waiting DDL statement, so it gives up early and tries later.
const LOCK_TIMEOUT: &str = "500ms";

const DAY: u64 = 86_400;

/// A partition's upper bound (`c` is its `pg_class` row), read back from its
/// own bound expression; the cast honours the offset written in it, whatever
/// the session's time zone. DEFAULT and MAXVALUE bounds give NULL.
const UPPER_BOUND_SQL: &str = "(regexp_match(pg_get_expr(c.relpartbound, c.oid), \
     'TO \\(''([^'']+)''\\)'))[1]::timestamptz";

/// One partition's range, in whole seconds since the epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: i64,
    pub end: i64,
}

/// Why an interval cannot partition the table; `None` when it can.
pub fn interval_problem(interval: Duration) -> Option<&'static str> {
    let seconds = interval.as_secs();
    if interval.subsec_nanos() != 0 || seconds < 60 || seconds % 60 != 0 {
        return Some("must be whole minutes, at least 1m");
    }
    if DAY % seconds != 0 && seconds % DAY != 0 {
        return Some("must divide a day (1h, 15m, …) or be whole days (1d, 7d)");
    }
    None
}

/// Why `partitioning` cannot partition `table`, as `postgres.partitioning…: why`.
pub fn validate(partitioning: &Partitioning, table: &OutboxTable) -> Result<(), String> {
    if let Some(problem) = interval_problem(partitioning.interval) {
        return Err(format!("postgres.partitioning.interval: {problem}"));
    }
    if partitioning.ahead == 0 {
        return Err(
            "postgres.partitioning.ahead: must be at least 1, so the next partition \
                    exists before it is needed"
                .into(),
        );
    }
    let longest = 63 - NAME_SUFFIX_LEN;
    if table.name.len() > longest {
        return Err(format!(
            "postgres.partitioning: the table name `{name}` is longer than {longest} bytes, so \
             its partitions' names (`{name}_p20261202_1530`) would exceed Postgres' 63",
            name = table.name
        ));
    }
    Ok(())
}

/// The partition holding `at` and the `ahead` after it. Ranges are aligned
/// to the epoch, so a whole-day interval starts at UTC midnight.
pub fn ranges_from(at: i64, partitioning: &Partitioning) -> Vec<Range> {
    let width = partitioning.interval.as_secs() as i64;
    let first = at.div_euclid(width) * width;
    (0..=i64::from(partitioning.ahead))
        .map(|k| Range {
            start: first + k * width,
            end: first + (k + 1) * width,
        })
        .collect()
}

/// `outbox_p20261202` for whole-day intervals, `outbox_p20261202_1530` for
/// shorter ones: sorted by name is sorted by time.
pub fn partition_name(table: &OutboxTable, range: Range, interval: Duration) -> String {
    let (date, hour, minute) = utc_parts(range.start);
    if interval.as_secs() % DAY == 0 {
        format!("{}_p{date}", table.name)
    } else {
        format!("{}_p{date}_{hour:02}{minute:02}", table.name)
    }
}

/// Characters a partition name adds to the table's name (`_p20261202_1530`).
pub const NAME_SUFFIX_LEN: usize = 15;

/// The partition that catches rows no range covers, so an insert never
/// fails for a missing partition.
pub fn default_partition(table: &OutboxTable) -> OutboxTable {
    OutboxTable {
        name: format!("{}_default", table.name),
        ..table.clone()
    }
}

/// A bound as a timestamptz literal: `'2026-12-02 00:00:00+00'`.
fn bound_literal(epoch: i64) -> String {
    let (date, hour, minute) = utc_parts(epoch);
    let second = epoch.rem_euclid(60);
    format!(
        "'{}-{}-{} {hour:02}:{minute:02}:{second:02}+00'",
        &date[0..4],
        &date[4..6],
        &date[6..8]
    )
}

/// (`YYYYMMDD`, hour, minute) of an epoch second, UTC.
fn utc_parts(epoch: i64) -> (String, i64, i64) {
    let (year, month, day) =
        crate::postgres::timestamp::civil_from_days(epoch.div_euclid(DAY as i64));
    let second_of_day = epoch.rem_euclid(DAY as i64);
    (
        format!("{year:04}{month:02}{day:02}"),
        second_of_day / 3600,
        second_of_day % 3600 / 60,
    )
}

/// What one round of partition upkeep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Upkeep {
    pub created: Vec<String>,
    pub dropped: Vec<String>,
    /// Old partitions kept because they still hold unsent rows (or, for
    /// unmarked rows, rows of a transaction that wrote after they expired).
    pub kept_unsent: Vec<String>,
    /// Old partitions of unmarked rows on their way out, waiting for
    /// transactions to end or for the stream to pass them.
    pub closing: Vec<String>,
}

/// A transaction whose lock waits give up after `LOCK_TIMEOUT`.
async fn begin_with_lock_timeout(
    connection: &mut PgConnection,
) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
    let mut transaction = connection.begin().await?;
    sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .execute(&mut *transaction)
        .await?;
    Ok(transaction)
}

/// Whether the table is partitioned (`relkind = 'p'`); `None` if it does not exist.
pub async fn is_partitioned(
    connection: &mut PgConnection,
    table: &OutboxTable,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)")
        .bind(table.qualified())
        .fetch_optional(connection)
        .await
}

/// The partitions that exist: how many (the default one not counted), and
/// how many whole intervals from now the newest one reaches.
pub async fn readiness(
    connection: &mut PgConnection,
    table: &OutboxTable,
    interval: Duration,
) -> Result<(i64, Option<i64>), sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT count(b.upper), floor(extract(epoch FROM max(b.upper) - now()) / $2)::bigint \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid, \
         LATERAL (SELECT {UPPER_BOUND_SQL} AS upper) b \
         WHERE i.inhparent = to_regclass($1)"
    ))
    .bind(table.qualified())
    .bind(interval.as_secs_f64())
    .fetch_one(connection)
    .await
}

/// Creates the current partition and the `ahead` after it where missing,
/// by the database's clock. A range some other partition already covers
/// (made by hand, or with another interval) is left to it. A range that
/// cannot be made now (rows for it already sit in the default partition,
/// or the table is busy) is skipped with a warning and the later ones are
/// still made, so one late round never keeps the table behind for good.
/// Fails on anything else (the role does not own the table).
pub async fn create_ahead(
    connection: &mut PgConnection,
    table: &OutboxTable,
    partitioning: &Partitioning,
) -> Result<Vec<String>, sqlx::Error> {
    let now: f64 = sqlx::query_scalar("SELECT extract(epoch FROM now())::float8")
        .fetch_one(&mut *connection)
        .await?;
    let mut created = Vec::new();
    for range in ranges_from(now.floor() as i64, partitioning) {
        let name = partition_name(table, range, partitioning.interval);
        let partition = OutboxTable {
            name: name.clone(),
            ..table.clone()
        };
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(partition.qualified())
            .fetch_one(&mut *connection)
            .await?;
        if exists.is_some() {
            continue;
        }
        let mut transaction = begin_with_lock_timeout(connection).await?;
        let create = sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})",
            partition.qualified(),
            table.qualified(),
            bound_literal(range.start),
            bound_literal(range.end),
        ))
        .execute(&mut *transaction)
        .await;
        match create {
            Ok(_) => {
                transaction.commit().await?;
                created.push(name);
            }
            // 42P17: the range overlaps an existing partition.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P17") => {
                tracing::debug!(partition = %name, "an existing partition already covers this range");
            }
            // 23514: the default partition holds rows of this range.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23514") => {
                tracing::warn!(
                    partition = %name,
                    "rows for this partition's range were written before it existed and sit in the \
                     default partition, so it cannot be created; its rows keep going there and leave \
                     row by row with relay.retention. The later partitions are created. Keep a relay \
                     (or `outboxd migrate`) running more often than postgres.partitioning.ahead intervals"
                );
            }
            // 55P03: lock_not_available. Busy now; the next round tries again.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                tracing::debug!(partition = %name, "outbox table busy; creating the partition next round");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

/// The partitions whose upper bound is more than `older_than` ago. A NULL
/// upper bound (DEFAULT, MAXVALUE) never expires.
async fn expired_partitions(
    connection: &mut PgConnection,
    table: &OutboxTable,
    older_than: Duration,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT c.oid::regclass::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = to_regclass($1) \
         AND {UPPER_BOUND_SQL} < now() - make_interval(secs => $2) \
         ORDER BY 1"
    ))
    .bind(table.qualified())
    .bind(older_than.as_secs_f64())
    .fetch_all(&mut *connection)
    .await
}

/// Drops every partition whose upper bound is more than `older_than` ago
/// and that holds no unsent row. A partition whose lock is not free within
/// the lock timeout is left for the next round.
pub async fn drop_expired(
    connection: &mut PgConnection,
    table: &OutboxTable,
    older_than: Duration,
    upkeep: &mut Upkeep,
) -> Result<(), sqlx::Error> {
    let expired = expired_partitions(connection, table, older_than).await?;
    for partition in expired {
        let mut transaction = begin_with_lock_timeout(connection).await?;
        // Detaching locks the parent against every insert, and waits for
        // those in flight, so the check below sees every row the partition
        // will ever hold.
        let detached = sqlx::query(&format!(
            "ALTER TABLE {} DETACH PARTITION {partition}",
            table.qualified()
        ))
        .execute(&mut *transaction)
        .await;
        match detached {
            Ok(_) => {}
            // 55P03: lock_not_available. Busy now; the next round tries again.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                tracing::debug!(%partition, "partition busy; dropping it next round");
                continue;
            }
            Err(e) => return Err(e),
        }
        let holds_unsent: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {partition} WHERE {} IS NULL)",
            quote_ident(&table.columns.sent_at)
        ))
        .fetch_one(&mut *transaction)
        .await?;
        if holds_unsent {
            transaction.rollback().await?;
            upkeep.kept_unsent.push(partition);
            continue;
        }
        sqlx::query(&format!("DROP TABLE {partition}"))
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        upkeep.dropped.push(partition);
    }
    Ok(())
}

/// How far an expired partition of unmarked rows is on its way out
/// ([`drop_expired_unmarked`]), kept by the housekeeping task from one
/// round to the next. Lost with the process; the next one starts over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closing {
    /// The transactions running when it expired: every row they or any
    /// earlier transaction inserted has an xid below `xmax` (a full
    /// 64-bit xid, as `xid8` text), subtransactions included.
    Snapshot { xmax: String, running: Vec<String> },
    /// Every transaction below `xmax` had ended when the WAL reached
    /// `wal`: so each row with an xid below `xmax` committed before `wal`.
    Position { xmax: String, wal: Lsn },
}

/// The retention of a table whose rows are never marked
/// (`relay.after_publish: none`): drops each partition whose upper bound is
/// more than `older_than` ago once the stream is clear past every row in
/// it (`published_through`: every outbox row committed before it is in
/// Kafka). No mark is read; a partition goes in three rounds at least:
///
/// 1. read a snapshot: `xmax` and the transactions running (`Snapshot`);
/// 2. once every one of those has ended, read the WAL insert position:
///    every transaction with an xid below `xmax` committed before it
///    (`Position`);
/// 3. once the stream is clear past that position, detach the partition
///    (which waits out every transaction inserting into it, and keeps any
///    later one out), and drop it unless it holds a row of a transaction
///    with an xid at or above `xmax` (a late writer with an old
///    `created_at`): that row may not be in Kafka yet, so the partition is
///    put back and closed again from step 1.
///
/// Invariant: a partition is dropped only when every row it will ever hold
/// committed before a position the stream is clear past. Xids are compared
/// with `age()`, which stays right across wraparound for every xid a
/// running server can still hold unfrozen; a frozen row is old, never late.
pub async fn drop_expired_unmarked(
    connection: &mut PgConnection,
    table: &OutboxTable,
    older_than: Duration,
    published_through: Lsn,
    closing: &mut std::collections::HashMap<String, Closing>,
    upkeep: &mut Upkeep,
) -> Result<(), sqlx::Error> {
    let expired = expired_partitions(connection, table, older_than).await?;
    closing.retain(|partition, _| expired.contains(partition));
    for partition in expired {
        match closing.get(&partition).cloned() {
            None => {
                let (xmax, running): (String, Vec<String>) = sqlx::query_as(
                    "SELECT pg_snapshot_xmax(s)::text, \
                            ARRAY(SELECT x::text FROM pg_snapshot_xip(s) AS x) \
                     FROM pg_current_snapshot() AS s",
                )
                .fetch_one(&mut *connection)
                .await?;
                closing.insert(partition.clone(), Closing::Snapshot { xmax, running });
                upkeep.closing.push(partition);
            }
            Some(Closing::Snapshot { xmax, running }) => {
                // Read the position only once the running ones have ended:
                // one of them may commit rows into the partition later.
                let (all_ended, wal): (bool, String) = sqlx::query_as(
                    "SELECT coalesce(bool_and(pg_xact_status(x::xid8) IS DISTINCT FROM \
                                              'in progress'), true), \
                            pg_current_wal_insert_lsn()::text \
                     FROM unnest($1::text[]) AS x",
                )
                .bind(&running)
                .fetch_one(&mut *connection)
                .await?;
                if all_ended {
                    let wal = wal
                        .parse::<Lsn>()
                        .map_err(|e| sqlx::Error::Decode(e.into()))?;
                    closing.insert(partition.clone(), Closing::Position { xmax, wal });
                }
                upkeep.closing.push(partition);
            }
            Some(Closing::Position { wal, .. }) if published_through < wal => {
                upkeep.closing.push(partition);
            }
            Some(Closing::Position { xmax, .. }) => {
                let mut transaction = begin_with_lock_timeout(connection).await?;
                let detached = sqlx::query(&format!(
                    "ALTER TABLE {} DETACH PARTITION {partition}",
                    table.qualified()
                ))
                .execute(&mut *transaction)
                .await;
                match detached {
                    Ok(_) => {}
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                        tracing::debug!(%partition, "partition busy; dropping it next round");
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                // `xmax` as a 32-bit xid: its low 32 bits, as `xmin` is.
                let holds_late_rows: bool = sqlx::query_scalar(&format!(
                    "SELECT EXISTS (SELECT 1 FROM {partition} \
                     WHERE age(xmin) <= age(($1::text::numeric % 4294967296)::text::xid))"
                ))
                .bind(&xmax)
                .fetch_one(&mut *transaction)
                .await?;
                if holds_late_rows {
                    transaction.rollback().await?;
                    closing.remove(&partition);
                    upkeep.kept_unsent.push(partition);
                    continue;
                }
                sqlx::query(&format!("DROP TABLE {partition}"))
                    .execute(&mut *transaction)
                    .await?;
                transaction.commit().await?;
                closing.remove(&partition);
                upkeep.dropped.push(partition);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> OutboxTable {
        let config: crate::config::PostgresConfig =
            serde_json::from_value(serde_json::json!({ "url": "postgres://localhost/db" }))
                .unwrap();
        OutboxTable::from_config(&config).unwrap()
    }

    fn every(seconds: u64, ahead: u32) -> Partitioning {
        Partitioning {
            interval: Duration::from_secs(seconds),
            ahead,
        }
    }

    #[test]
    fn intervals_must_tile_the_day() {
        assert_eq!(interval_problem(Duration::from_secs(DAY)), None);
        assert_eq!(interval_problem(Duration::from_secs(7 * DAY)), None);
        assert_eq!(interval_problem(Duration::from_secs(3600)), None);
        assert_eq!(interval_problem(Duration::from_secs(900)), None);
        assert!(interval_problem(Duration::from_secs(30)).is_some());
        assert!(interval_problem(Duration::from_secs(7 * 60)).is_some());
        assert!(interval_problem(Duration::from_secs(DAY + 3600)).is_some());
        assert!(interval_problem(Duration::from_millis(60_500)).is_some());
    }

    #[test]
    fn daily_partitions_start_at_utc_midnight_and_run_ahead() {
        // 2026-12-02 19:58:23 UTC
        let at = 1_796_241_503;
        let ranges = ranges_from(at, &every(DAY, 2));
        assert_eq!(ranges.len(), 3);
        assert_eq!(bound_literal(ranges[0].start), "'2026-12-02 00:00:00+00'");
        assert_eq!(bound_literal(ranges[0].end), "'2026-12-03 00:00:00+00'");
        assert_eq!(ranges[1].start, ranges[0].end);
        assert_eq!(bound_literal(ranges[2].end), "'2026-12-05 00:00:00+00'");
        assert_eq!(
            partition_name(&table(), ranges[0], Duration::from_secs(DAY)),
            "outbox_p20261202"
        );
    }

    #[test]
    fn shorter_intervals_name_the_hour_and_minute() {
        let at = 1_796_241_503;
        let ranges = ranges_from(at, &every(900, 1));
        assert_eq!(bound_literal(ranges[0].start), "'2026-12-02 19:45:00+00'");
        assert_eq!(bound_literal(ranges[1].end), "'2026-12-02 20:15:00+00'");
        let name = partition_name(&table(), ranges[1], Duration::from_secs(900));
        assert_eq!(name, "outbox_p20261202_2000");
        assert!(name.len() <= "outbox".len() + NAME_SUFFIX_LEN);
    }

    #[test]
    fn ranges_across_a_year_end_are_contiguous() {
        // 2026-12-31 23:30:00 UTC
        let at = 1_798_759_800;
        let ranges = ranges_from(at, &every(3600, 2));
        assert_eq!(bound_literal(ranges[0].start), "'2026-12-31 23:00:00+00'");
        assert_eq!(bound_literal(ranges[1].start), "'2027-01-01 00:00:00+00'");
        assert_eq!(
            partition_name(&table(), ranges[2], Duration::from_secs(3600)),
            "outbox_p20270101_0100"
        );
    }
}
