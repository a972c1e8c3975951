//! Large payloads do not multiply the relay's memory by `capture.batch_size`:
//! polling claims, the catch-up drain of a relay that has never streamed,
//! and streamed batches all stop at about `capture.batch_bytes`.

use std::time::Duration;

use crate::support::checker::table_checkpoints;
use crate::support::workload::{assert_exactly_once, Written};
use crate::support::{InProcessRelay, Mode, TestEnv};

/// Each row's padding: 1,000 such rows fill a claim of the default
/// `batch_size` (2,000) with 100 MB.
const PAYLOAD_BYTES: usize = 100_000;
/// `capture.batch_bytes` for the test: room for two of those rows, not three.
const BATCH_BYTES: usize = 2 * PAYLOAD_BYTES + PAYLOAD_BYTES / 2;

in_both_modes!(
    batches_of_large_payloads_stop_at_batch_bytes,
    worker_threads = 2
);
async fn batches_of_large_payloads_stop_at_batch_bytes(mode: Mode) {
    let env = TestEnv::new("large-payloads", mode).await;
    // Written before the first start: polling claims them, replication
    // drains them through the table (its slot is created after them).
    let before = write_large_rows(&env, 0, 30).await;
    let mut config = env.config();
    // One batch per Kafka transaction and per checkpoint.
    config.relay.unacknowledged_batches = 1;
    config.capture.batch_bytes = BATCH_BYTES;
    config.kafka.max_message_bytes = 4 * PAYLOAD_BYTES;
    let relay = InProcessRelay::start(config);
    env.wait_all_sent(Duration::from_secs(120)).await;
    // And rows written while it runs: claimed, or streamed.
    let during = write_large_rows(&env, 30, 30).await;
    env.wait_all_sent(Duration::from_secs(120)).await;
    relay.stop().await.expect("the relay stops cleanly");
    assert_exactly_once(&env, &Written::combined([before, during])).await;

    let checkpoints = table_checkpoints(&env).await;
    assert!(!checkpoints.is_empty(), "no checkpoint was written");
    // A streamed batch is delivered once it reaches batch_bytes, so it may
    // hold one row past it; a claim stops below it.
    let most = match mode {
        Mode::Polling => 2,
        _ => 3,
    };
    for checkpoint in &checkpoints {
        let rows = checkpoint.published.len() + checkpoint.dead_lettered.len();
        assert!(
            rows <= most,
            "a transaction published {rows} rows of {PAYLOAD_BYTES} bytes with batch_bytes \
             {BATCH_BYTES}: {checkpoint:?}"
        );
    }
}

/// `count` rows, one transaction each, on five aggregates, with payloads of
/// `PAYLOAD_BYTES` random hex digits: Postgres cannot compress them, so
/// their stored size is their size.
async fn write_large_rows(env: &TestEnv, first: usize, count: usize) -> Written {
    let mut written = Written::default();
    for n in first..first + count {
        let id: String = sqlx::query_scalar(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
             SELECT gen_random_uuid(), 'Order', 'large-' || ($1 % 5), 'OrderCreated', \
                    jsonb_build_object('aggregate', 'large-' || ($1 % 5), 'n', $1 / 5 + 1, \
                        'pad', (SELECT string_agg(md5(random()::text), '') \
                                FROM generate_series(1, $2 / 32))) \
             RETURNING id::text",
        )
        .bind(n as i64)
        .bind(PAYLOAD_BYTES as i64)
        .fetch_one(&env.pool)
        .await
        .expect("insert a large row");
        written.committed += 1;
        written.committed_ids.push(id);
    }
    written
}
