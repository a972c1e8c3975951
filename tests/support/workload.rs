//! A small order workload: writers lock an aggregate, bump its version and
//! insert outbox rows carrying that version in real transactions, some of
//! which roll back. The invariant checker compares Kafka with Postgres.

use std::collections::{HashMap, HashSet};

use rand::Rng;
use sqlx::PgPool;

use super::kafka::Consumed;

/// What the writers did: ids of events whose transaction rolled back.
#[derive(Debug, Default)]
pub struct Written {
    pub committed: usize,
    pub rolled_back_ids: Vec<String>,
}

impl Written {
    /// Everything several writers did, as one account.
    pub fn combined(parts: impl IntoIterator<Item = Written>) -> Written {
        let mut all = Written::default();
        for part in parts {
            all.committed += part.committed;
            all.rolled_back_ids.extend(part.rolled_back_ids);
        }
        all
    }
}

/// One writer: `transactions` business transactions over `aggregates`
/// aggregates; about one in ten rolls back, about one in four writes two
/// events (OrderCreated then PaymentCaptured) in one multi-row INSERT.
pub async fn write_orders(
    pool: &PgPool,
    writer: usize,
    transactions: usize,
    aggregates: usize,
) -> Written {
    let mut written = Written::default();
    for _ in 0..transactions {
        let (aggregate, roll_back, two_events) = {
            let mut rng = rand::rng();
            (
                format!("order-{}", rng.random_range(0..aggregates)),
                rng.random_ratio(1, 10),
                rng.random_ratio(1, 4),
            )
        };
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("INSERT INTO aggregates (id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(&aggregate)
            .execute(&mut *tx)
            .await
            .expect("ensure aggregate");
        let events = if two_events { 2 } else { 1 };
        // The row lock serialises this aggregate's writers; `version` counts
        // its committed events, so their `n` runs 1, 2, 3, … with no gap.
        let version: i32 = sqlx::query_scalar(
            "UPDATE aggregates SET version = version + $2 WHERE id = $1 RETURNING version",
        )
        .bind(&aggregate)
        .bind(events)
        .fetch_one(&mut *tx)
        .await
        .expect("lock aggregate");
        // One INSERT for all the transaction's events: a multi-row insert
        // whose rows share the transaction, in `n` order.
        let ids: Vec<String> = sqlx::query_scalar(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'Order', $1, (ARRAY['OrderCreated', 'PaymentCaptured'])[i], \
                    jsonb_build_object('aggregate', $1::text, 'n', $2::int + i - 1, 'writer', $3::int) \
             FROM generate_series(1, $4::int) AS i ORDER BY i \
             RETURNING id::text",
        )
        .bind(&aggregate)
        .bind(version - events + 1)
        .bind(writer as i32)
        .bind(events)
        .fetch_all(&mut *tx)
        .await
        .expect("insert events");
        if roll_back {
            tx.rollback().await.expect("rollback");
            written.rolled_back_ids.extend(ids);
        } else {
            tx.commit().await.expect("commit");
            written.committed += ids.len();
        }
    }
    written
}

/// A writer that keeps committing rounds of `write_orders` in the
/// background until `finish`, so faults land while rows keep arriving.
pub struct LiveWriter {
    writing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: tokio::task::JoinHandle<Written>,
}

impl LiveWriter {
    /// Each round is `write_orders(pool, writer, transactions, aggregates)`.
    pub fn start(
        pool: &PgPool,
        writer: usize,
        transactions: usize,
        aggregates: usize,
    ) -> LiveWriter {
        use std::sync::atomic::{AtomicBool, Ordering};
        let writing = std::sync::Arc::new(AtomicBool::new(true));
        let handle = {
            let pool = pool.clone();
            let writing = std::sync::Arc::clone(&writing);
            tokio::spawn(async move {
                let mut rounds = Vec::new();
                while writing.load(Ordering::SeqCst) {
                    rounds.push(write_orders(&pool, writer, transactions, aggregates).await);
                }
                Written::combined(rounds)
            })
        };
        LiveWriter { writing, handle }
    }

    /// Stops after the round in progress; returns everything written.
    pub async fn finish(self) -> Written {
        self.writing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.handle.await.expect("live writer")
    }
}

/// Checks Kafka against Postgres and returns the violations, one line each.
///
/// - every row in the table arrived exactly once (by event id);
/// - nothing else arrived (no rolled-back event, no stranger);
/// - each aggregate stays on one partition, and in offset order its `n`
///   runs 1, 2, 3, … (no gap, no reordering).
pub fn violations(
    rows: &[(i64, String, bool)],
    consumed: &[Consumed],
    rolled_back: &[String],
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for record in consumed {
        let id = record.header("id").unwrap_or("<no id header>");
        *seen.entry(id).or_default() += 1;
    }
    let expected: HashSet<&str> = rows.iter().map(|(_, id, _)| id.as_str()).collect();
    for (seq, id, sent) in rows {
        match seen.get(id.as_str()) {
            None => problems.push(format!("lost: row seq {seq} id {id} never reached Kafka")),
            Some(1) => {}
            Some(n) => problems.push(format!(
                "duplicated: row seq {seq} id {id} arrived {n} times"
            )),
        }
        if !sent {
            problems.push(format!(
                "unacknowledged: row seq {seq} id {id} is not marked sent"
            ));
        }
    }
    for id in seen.keys() {
        if !expected.contains(id) {
            problems.push(format!(
                "stranger: event id {id} is in Kafka but not in the table"
            ));
        }
    }
    for id in rolled_back {
        if seen.contains_key(id.as_str()) {
            problems.push(format!(
                "rolled back: event id {id} from a rolled-back transaction reached Kafka"
            ));
        }
    }
    let mut by_aggregate: HashMap<(String, i32), Vec<(i64, i64)>> = HashMap::new();
    for record in consumed {
        let key = String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned();
        let n = record.payload_json()["n"].as_i64().unwrap_or(-1);
        by_aggregate
            .entry((key, record.partition))
            .or_default()
            .push((record.offset, n));
    }
    let mut partitions_per_key: HashMap<&str, HashSet<i32>> = HashMap::new();
    for (key, partition) in by_aggregate.keys() {
        partitions_per_key
            .entry(key.as_str())
            .or_default()
            .insert(*partition);
    }
    for (key, partitions) in &partitions_per_key {
        if partitions.len() > 1 {
            problems.push(format!(
                "split: aggregate {key} landed on partitions {partitions:?}"
            ));
        }
    }
    for ((key, _), mut events) in by_aggregate {
        events.sort();
        for (expected_n, (offset, n)) in (1..).zip(events) {
            if n != expected_n {
                problems.push(format!("out of order: aggregate {key}: offset {offset} holds n {n}, expected {expected_n}"));
                break;
            }
        }
    }
    problems
}

/// Reads everything the relay published for `env` and fails the test with
/// every violation listed, after checking the table holds `committed` rows.
pub async fn assert_exactly_once(env: &super::TestEnv, written: &Written) {
    let (committed, rolled_back) = (written.committed, &written.rolled_back_ids);
    let rows = env.rows().await;
    assert_eq!(rows.len(), committed, "the table holds every committed row");
    let consumed = super::kafka::read_all(&env.kafka, &env.topic_prefix()).await;
    let problems = violations(&rows, &consumed, rolled_back);
    assert!(
        problems.is_empty(),
        "{} violations:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
