//! A backlog: `rows` outbox rows written while no relay runs, spread over
//! 1,000 aggregates, each payload about `payload_bytes` of JSON.
//!
//! Invariant: row i is event `n = i / 1000 + 1` of aggregate `i % 1000`, in
//! seq order, so the checker can demand n = 1, 2, 3, … per aggregate.

use sqlx::PgPool;

use crate::support::workload::Written;

pub const AGGREGATES: i64 = 1_000;

/// The JSON around the padding: `{"n": …, "pad": "", "aggregate": "backlog-…"}`.
const JSON_OVERHEAD: usize = 48;

/// Writes the backlog in transactions of up to 10,000 rows (fewer for big
/// payloads, so one transaction stays near 20 MB), the way a bulk job would.
pub async fn write(pool: &PgPool, rows: usize, payload_bytes: usize) -> Written {
    let pad = payload_bytes.saturating_sub(JSON_OVERHEAD);
    let chunk = (20_000_000 / payload_bytes.max(1)).clamp(100, 10_000);
    let mut written = Written::default();
    let mut done = 0;
    while done < rows {
        let size = chunk.min(rows - done);
        let ids: Vec<String> = sqlx::query_scalar(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'Order', 'backlog-' || (i % $1), 'OrderCreated', \
                    jsonb_build_object('aggregate', 'backlog-' || (i % $1), 'n', i / $1 + 1, \
                                       'pad', repeat('b', $4)) \
             FROM generate_series($2::bigint, $3::bigint) AS i ORDER BY i \
             RETURNING id::text",
        )
        .bind(AGGREGATES)
        .bind(done as i64)
        .bind((done + size - 1) as i64)
        .bind(pad as i32)
        .fetch_all(pool)
        .await
        .expect("write backlog");
        written.committed += ids.len();
        written.committed_ids.extend(ids);
        done += size;
    }
    written
}

/// One event to publish before a backlog, so a relay has something to
/// checkpoint when it is primed. It is the aggregate `warmup`'s first.
pub async fn write_warmup(pool: &PgPool) -> Written {
    let id: String = sqlx::query_scalar(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('Order', 'warmup', 'OrderCreated', '{\"aggregate\": \"warmup\", \"n\": 1}') \
         RETURNING id::text",
    )
    .fetch_one(pool)
    .await
    .expect("write warm-up event");
    Written {
        committed: 1,
        committed_ids: vec![id],
        ..Written::default()
    }
}
