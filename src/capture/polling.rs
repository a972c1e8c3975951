//! Polling capture: claim the oldest unsent rows with
//! `SELECT … FOR UPDATE SKIP LOCKED`.
//!
//! Invariant: a claim reads at most `batch_size` rows, so memory stays
//! bounded whatever the backlog, and because it filters on `sent_at IS NULL`
//! rather than a seq cursor, a row whose transaction commits after rows with
//! a higher seq were sent is still claimed on a later round.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use crate::error::{Error, Result};
use crate::event::OutboxEvent;

/// Claims up to `batch_size` unsent rows inside the caller's transaction; the
/// row locks last until that transaction ends, after the rows are marked.
/// `up_to` binds `$2` of a bounded claim (`OutboxTable::claim_up_to_sql`).
pub async fn claim_batch(
    connection: &mut PgConnection,
    claim_sql: &str,
    batch_size: usize,
    up_to: Option<i64>,
) -> Result<Vec<OutboxEvent>> {
    let limit = i64::try_from(batch_size).unwrap_or(i64::MAX);
    let mut query = sqlx::query(claim_sql).bind(limit);
    if let Some(up_to) = up_to {
        query = query.bind(up_to);
    }
    let rows = query
        .fetch_all(connection)
        .await
        .map_err(|e| Error::from_postgres("claiming outbox rows", e))?;
    rows.iter().map(event_from_row).collect()
}

fn event_from_row(row: &PgRow) -> Result<OutboxEvent> {
    let decode = |e: sqlx::Error| Error::stop(format!("reading an outbox row: {e}"));
    Ok(OutboxEvent {
        seq: row.try_get(0).map_err(decode)?,
        id: row.try_get(1).map_err(decode)?,
        aggregate_type: row.try_get(2).map_err(decode)?,
        aggregate_id: row.try_get(3).map_err(decode)?,
        event_type: row.try_get(4).map_err(decode)?,
        payload: row.try_get(5).map_err(decode)?,
        headers_json: row.try_get(6).map_err(decode)?,
        trace_parent: row.try_get(7).map_err(decode)?,
        position: None,
        created_at: row.try_get(9).map_err(decode)?,
        committed_at: row
            .try_get::<Option<f64>, _>(8)
            .map_err(decode)?
            .and_then(|epoch| {
                std::time::SystemTime::UNIX_EPOCH
                    .checked_add(std::time::Duration::try_from_secs_f64(epoch).ok()?)
            }),
    })
}
