//! Polling capture: claim the oldest unsent rows with
//! `SELECT … FOR UPDATE SKIP LOCKED`.
//!
//! Invariant: a claim reads at most `batch_size` rows and stops fetching
//! once its payloads reach `batch_bytes` (at least one row), so memory stays
//! bounded whatever the backlog or the row size, and because it filters on `sent_at IS NULL`
//! rather than a seq cursor, a row whose transaction commits after rows with
//! a higher seq were sent is still claimed on a later round.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use crate::error::{Error, Result};
use crate::event::OutboxEvent;

/// How much one claim may take.
#[derive(Debug, Clone, Copy)]
pub struct ClaimLimits {
    /// Most rows (`capture.batch_size`).
    pub rows: usize,
    /// Most payload bytes, about (`capture.batch_bytes`); a claim always
    /// takes at least one row.
    pub bytes: usize,
}

/// The claim's cursor, open until its transaction ends.
const CURSOR: &str = "outboxd_claim";
/// Rows in the first fetch of a claim, before any payload size is known.
/// One costs a round trip per claim and keeps a claim of large payloads
/// within one payload of `batch_bytes`, like a streamed batch.
const FIRST_FETCH: usize = 1;

/// Claims unsent rows within `limits` inside the caller's transaction; the
/// row locks last until that transaction ends, after the rows are marked.
/// `up_to` binds `$3` of a bounded claim (`OutboxTable::claim_up_to_sql`).
///
/// The claim runs as a cursor, and a `FOR UPDATE` cursor locks a row only
/// when it is fetched: rows are fetched in steps sized by the largest
/// payload seen so far, and fetching stops at `limits.bytes`. The rows never
/// fetched are never locked, so the next claim takes them in seq order.
/// The claim's own `LIMIT` (stored payload sizes, see
/// `OutboxTable::claim_sql`) keeps a step from growing past the byte limit
/// when large payloads follow small ones.
pub async fn claim_batch(
    connection: &mut PgConnection,
    claim_sql: &str,
    limits: ClaimLimits,
    up_to: Option<i64>,
) -> Result<Vec<OutboxEvent>> {
    let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let declare = format!("DECLARE {CURSOR} NO SCROLL CURSOR FOR {claim_sql}");
    let mut query = sqlx::query(&declare)
        .bind(as_i64(limits.rows))
        .bind(as_i64(limits.bytes));
    if let Some(up_to) = up_to {
        query = query.bind(up_to);
    }
    query
        .execute(&mut *connection)
        .await
        .map_err(|e| Error::from_postgres("claiming outbox rows", e))?;

    let mut events = Vec::new();
    let mut bytes = 0usize;
    let mut largest = 0usize;
    let mut step = FIRST_FETCH.min(limits.rows);
    loop {
        let rows = sqlx::query(&format!("FETCH {step} FROM {CURSOR}"))
            .fetch_all(&mut *connection)
            .await
            .map_err(|e| Error::from_postgres("claiming outbox rows", e))?;
        let fetched = rows.len();
        for row in &rows {
            let event = event_from_row(row)?;
            let size = event.payload.as_ref().map_or(0, Vec::len);
            bytes += size;
            largest = largest.max(size);
            events.push(event);
        }
        let rows_left = limits.rows.saturating_sub(events.len());
        if fetched < step || rows_left == 0 || bytes >= limits.bytes {
            // The cursor closes with the transaction; the rows it did not
            // fetch were never locked.
            return Ok(events);
        }
        step = ((limits.bytes - bytes) / largest.max(1)).clamp(1, rows_left);
    }
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
