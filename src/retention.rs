//! Retention: deleting rows that were published long ago.
//!
//! Invariant: only rows marked sent before the retention period are
//! deleted, never an unsent one, and in small batches, each its own short
//! transaction, so the services writing to the table never wait on a long
//! lock.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::table::OutboxTable;

/// Rows deleted per statement.
const ROWS_PER_DELETE: i64 = 2_000;
/// How often old rows are looked for.
const EVERY: Duration = Duration::from_secs(60);

/// Runs until `stop` turns true, deleting rows sent longer ago than
/// `period`. Failures are logged and retried at the next round: retention
/// is housekeeping and never stops the relay.
pub fn spawn(
    connect_options: PgConnectOptions,
    table: OutboxTable,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let sql = table.delete_sent_before_sql();
    tokio::spawn(async move {
        let mut connection: Option<PgConnection> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
            if connection.is_none() {
                match connect_options.connect().await {
                    Ok(c) => connection = Some(c),
                    Err(error) => {
                        tracing::warn!(%error, "retention: cannot connect to Postgres; trying again in a minute");
                        continue;
                    }
                }
            }
            if let Some(c) = connection.as_mut() {
                match delete_old_rows(c, &sql, period, &stop).await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::info!(
                        deleted,
                        older_than = ?period,
                        "retention: deleted rows published longer ago than relay.retention"
                    ),
                    Err(error) => {
                        tracing::warn!(%error, "retention: deleting old rows failed; trying again in a minute");
                        connection = None;
                    }
                }
            }
        }
    })
}

/// Deletes in batches until a batch comes back short.
pub async fn delete_old_rows(
    connection: &mut PgConnection,
    sql: &str,
    period: Duration,
    stop: &watch::Receiver<bool>,
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
        if deleted < ROWS_PER_DELETE as u64 || *stop.borrow() {
            return Ok(total);
        }
    }
}
