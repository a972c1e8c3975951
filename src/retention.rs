//! Retention: removing rows that were published long ago, and for a
//! partitioned table, keeping partitions ready ahead of the clock.
//!
//! Invariant: only rows marked sent before the retention period are
//! removed, never an unsent one. A plain table loses them in small
//! batches, each its own short transaction, so the services writing to the
//! table never wait on a long lock; a partitioned table loses whole
//! partitions (`partitions` keeps that safe) and only the default
//! partition is deleted from row by row.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use tokio::task::JoinHandle;

use crate::config::{AfterPublish, Partitioning};
use crate::partitions;
use crate::postgres::lsn::Lsn;
use crate::shutdown::Shutdown;
use crate::table::OutboxTable;

/// How far one streaming session is clear: every outbox row committed
/// before this WAL position is in Kafka. Raised by the stream as batches
/// are acknowledged and keepalives pass with nothing in flight; read by
/// the retention of unmarked rows, which drops a partition only once the
/// stream is clear past every row in it. Zero until the session streams,
/// and new with every session: after a failover, positions of the old
/// timeline say nothing about the new one.
#[derive(Debug, Default)]
pub struct PublishedThrough(std::sync::atomic::AtomicU64);

impl PublishedThrough {
    pub fn raise(&self, lsn: Lsn) {
        self.0
            .fetch_max(lsn.0, std::sync::atomic::Ordering::Release);
    }

    pub fn get(&self) -> Lsn {
        Lsn(self.0.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// Rows deleted per statement.
const ROWS_PER_DELETE: i64 = 2_000;
/// How often old rows are looked for.
const EVERY: Duration = Duration::from_secs(60);

/// What the housekeeping task looks after.
#[derive(Debug, Clone)]
pub struct Plan {
    pub table: OutboxTable,
    /// `relay.retention`: rows sent longer ago than this go.
    pub retention: Option<Duration>,
    /// Set when the live table is partitioned and `postgres.partitioning` says how.
    pub partitioning: Option<Partitioning>,
    pub after_publish: AfterPublish,
    /// How far the stream is clear (unmarked rows' partitions wait for it).
    pub published_through: std::sync::Arc<PublishedThrough>,
}

impl Plan {
    /// Whether there is anything to do at all.
    pub fn is_needed(&self) -> bool {
        self.retention.is_some() || self.partitioning.is_some()
    }

    /// How old a partition's upper bound must be before it is dropped:
    /// the retention period, or with `after_publish: delete` (its rows
    /// leave as they are published) one interval. `None`: kept forever.
    fn partitions_expire_after(&self, partitioning: &Partitioning) -> Option<Duration> {
        match self.after_publish {
            AfterPublish::Delete => Some(partitioning.interval),
            AfterPublish::Mark | AfterPublish::None => self.retention,
        }
    }
}

/// Runs until `stop` turns true. A partitioned table gets its partitions
/// at once, then every round; old rows are looked for each round.
/// Failures are logged and retried at the next round: housekeeping never
/// stops the relay (an insert that finds no partition lands in the
/// default one).
pub fn spawn(connect_options: PgConnectOptions, plan: Plan, mut stop: Shutdown) -> JoinHandle<()> {
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let mut connection: Option<PgConnection> = None;
        let mut first_round = true;
        let mut closing = std::collections::HashMap::new();
        loop {
            let pause = match first_round && plan.partitioning.is_some() {
                true => Duration::ZERO,
                false => EVERY,
            };
            first_round = false;
            if stop.requested_within(pause).await {
                return;
            }
            if connection.is_none() {
                match connect_options.connect().await {
                    Ok(c) => connection = Some(c),
                    Err(error) => {
                        tracing::warn!(%error, "housekeeping: cannot connect to Postgres; trying again in a minute");
                        continue;
                    }
                }
            }
            if let Some(c) = connection.as_mut() {
                if let Err(error) = round(c, &plan, &mut closing, &stop).await {
                    tracing::warn!(
                        %error,
                        table = %plan.table.display_name(),
                        "housekeeping failed (creating partitions ahead or removing old rows); \
                         trying again in a minute"
                    );
                    connection = None;
                }
            }
        }
    }))
}

/// One round: partitions ahead, expired partitions, old rows.
async fn round(
    connection: &mut PgConnection,
    plan: &Plan,
    closing: &mut std::collections::HashMap<String, partitions::Closing>,
    stop: &Shutdown,
) -> Result<(), sqlx::Error> {
    let Some(partitioning) = &plan.partitioning else {
        if let Some(period) = plan.retention {
            let sql = plan.table.delete_sent_before_sql();
            report_deleted(
                delete_old_rows(connection, &sql, period, stop).await?,
                period,
            );
        }
        return Ok(());
    };
    match partitions::create_ahead(connection, &plan.table, partitioning).await {
        Ok(created) if !created.is_empty() => {
            tracing::info!(?created, "created outbox partitions ahead of time")
        }
        Ok(_) => {}
        Err(error) => tracing::error!(
            %error,
            table = %plan.table.display_name(),
            "cannot create the outbox's next partitions; inserts beyond the last partition land in \
             the default partition, which then grows row by row. The relay's role must own the \
             table, or run `outboxd migrate` (it creates them too) as the owner more often than \
             postgres.partitioning.ahead intervals"
        ),
    }
    if let Some(older_than) = plan.partitions_expire_after(partitioning) {
        let mut upkeep = partitions::Upkeep::default();
        let result = match plan.after_publish {
            AfterPublish::None => {
                partitions::drop_expired_unmarked(
                    connection,
                    &plan.table,
                    older_than,
                    plan.published_through.get(),
                    closing,
                    &mut upkeep,
                )
                .await
            }
            _ => partitions::drop_expired(connection, &plan.table, older_than, &mut upkeep).await,
        };
        if !upkeep.dropped.is_empty() {
            tracing::info!(dropped = ?upkeep.dropped, ?older_than, "dropped old outbox partitions, all rows sent");
        }
        if !upkeep.closing.is_empty() {
            tracing::debug!(
                closing = ?upkeep.closing,
                published_through = %plan.published_through.get(),
                "old outbox partitions of unmarked rows wait for their writers to end and the \
                 stream to pass them"
            );
        }
        if !upkeep.kept_unsent.is_empty() {
            tracing::warn!(
                kept = ?upkeep.kept_unsent,
                "old outbox partitions still hold unsent rows, so they are kept; they go once the \
                 relay has published them (see `outboxd status`)"
            );
        }
        result?;
    }
    if let (Some(period), AfterPublish::Mark) = (plan.retention, plan.after_publish) {
        let sql = partitions::default_partition(&plan.table).delete_sent_before_sql();
        report_deleted(
            delete_old_rows(connection, &sql, period, stop).await?,
            period,
        );
    }
    Ok(())
}

fn report_deleted(deleted: u64, period: Duration) {
    if deleted > 0 {
        tracing::info!(
            deleted,
            older_than = ?period,
            "retention: deleted rows published longer ago than relay.retention"
        );
    }
}

/// Deletes in batches until a batch comes back short.
pub async fn delete_old_rows(
    connection: &mut PgConnection,
    sql: &str,
    period: Duration,
    stop: &Shutdown,
) -> Result<u64, sqlx::Error> {
    let seconds = period.as_secs_f64();
    let mut total = 0;
    loop {
        let deleted = sqlx::query(sql)
            .bind(seconds)
            .bind(ROWS_PER_DELETE)
            .execute(&mut *connection)
            .await?
            .rows_affected();
        total += deleted;
        if deleted < ROWS_PER_DELETE as u64 || stop.is_requested() {
            return Ok(total);
        }
    }
}
