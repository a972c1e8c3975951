//! A backlog: `rows` outbox rows (or WAL messages, `emit_in`) written while
//! no relay runs, spread over 1,000 aggregates, each payload about
//! `payload_bytes` of JSON; in bulk transactions, or one event per
//! transaction from several connections (`write_one_per_transaction`).
//!
//! Invariant: row i is event `n = i / 1000 + 1` of aggregate `i % 1000`, in
//! seq order, so the checker can demand n = 1, 2, 3, … per aggregate; one
//! event per transaction, each connection writes aggregates of its own, in
//! order.

use sqlx::PgPool;

use crate::support::workload::Written;

pub const AGGREGATES: i64 = 1_000;

/// The JSON around the padding: `{"n": …, "pad": "", "aggregate": "backlog-…"}`.
const JSON_OVERHEAD: usize = 48;

/// Writes the backlog in transactions of up to 10,000 rows (fewer for big
/// payloads, so one transaction stays near 20 MB), the way a bulk job would.
pub async fn write(pool: &PgPool, rows: usize, payload_bytes: usize) -> Written {
    let chunk = (20_000_000 / payload_bytes.max(1)).clamp(100, 10_000);
    write_in(pool, rows, payload_bytes, chunk, false).await
}

/// Writes the backlog in transactions of `chunk` events, as rows or, with
/// `messages`, emitted with `outboxd_emit` (the same fields and payload).
pub async fn write_in(
    pool: &PgPool,
    rows: usize,
    payload_bytes: usize,
    chunk: usize,
    messages: bool,
) -> Written {
    let pad = payload_bytes.saturating_sub(JSON_OVERHEAD);
    let sql = if messages {
        "SELECT outboxd_emit('Order', 'backlog-' || (i % $1), 'OrderCreated', \
                jsonb_build_object('aggregate', 'backlog-' || (i % $1), 'n', i / $1 + 1, \
                                   'pad', repeat('b', $4)))::text \
         FROM generate_series($2::bigint, $3::bigint) AS i"
    } else {
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'Order', 'backlog-' || (i % $1), 'OrderCreated', \
                jsonb_build_object('aggregate', 'backlog-' || (i % $1), 'n', i / $1 + 1, \
                                   'pad', repeat('b', $4)) \
         FROM generate_series($2::bigint, $3::bigint) AS i ORDER BY i \
         RETURNING id::text"
    };
    let mut written = Written::default();
    let mut done = 0;
    while done < rows {
        let size = chunk.min(rows - done);
        let ids: Vec<String> = sqlx::query_scalar(sql)
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

/// Connections writing one event per transaction.
const WRITERS: usize = 16;
/// Aggregates of each such connection.
const AGGREGATES_PER_WRITER: usize = 50;

/// `rows` events in transactions of one (a statement in autocommit, as a
/// service writes one event per business transaction) from `WRITERS`
/// connections at once, as rows or, with `messages`, emitted.
pub async fn write_one_per_transaction(
    database_url: &str,
    rows: usize,
    payload_bytes: usize,
    messages: bool,
) -> Written {
    let pool = crate::support::workload::writer_pool(database_url, WRITERS as u32).await;
    let pad = "b".repeat(payload_bytes.saturating_sub(JSON_OVERHEAD));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let pool = pool.clone();
            let pad = pad.clone();
            tokio::spawn(async move {
                let sql = if messages {
                    "SELECT outboxd_emit('Order', $1, 'OrderCreated', $2::jsonb)::text"
                } else {
                    "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                     VALUES ('Order', $1, 'OrderCreated', $2::jsonb) RETURNING id::text"
                };
                let mut ids = Vec::new();
                for own in 0..(rows + WRITERS - 1 - writer) / WRITERS {
                    let aggregate = format!("backlog-{writer}-{}", own % AGGREGATES_PER_WRITER);
                    let n = own / AGGREGATES_PER_WRITER + 1;
                    let payload =
                        format!(r#"{{"aggregate": "{aggregate}", "n": {n}, "pad": "{pad}"}}"#);
                    let id: String = sqlx::query_scalar(sql)
                        .bind(&aggregate)
                        .bind(&payload)
                        .fetch_one(&pool)
                        .await
                        .expect("write one event");
                    ids.push(id);
                }
                ids
            })
        })
        .collect();
    let mut written = Written::default();
    for handle in writers {
        let ids = handle.await.expect("backlog writer");
        written.committed += ids.len();
        written.committed_ids.extend(ids);
    }
    written
}

/// Like `write_warmup`, emitted as a WAL message.
pub async fn emit_warmup(pool: &PgPool) -> Written {
    let id: String = sqlx::query_scalar(
        "SELECT outboxd_emit('Order', 'warmup', 'OrderCreated', \
                '{\"aggregate\": \"warmup\", \"n\": 1}')::text",
    )
    .fetch_one(pool)
    .await
    .expect("emit warm-up event");
    Written {
        committed: 1,
        committed_ids: vec![id],
        ..Written::default()
    }
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
