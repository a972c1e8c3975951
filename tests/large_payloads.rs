//! Large payloads do not multiply the relay's memory by `capture.batch_size`:
//! polling claims, the catch-up drain of a relay that has never streamed,
//! and streamed batches all stop at about `capture.batch_bytes`.

use std::time::Duration;

use outboxd::capture::polling::{claim_batch, first_unsent_after, ClaimLimits, SizingFloor};
use outboxd::event::OutboxEvent;
use outboxd::table::PayloadEncoding;

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
    // Postgres compresses these payloads to a few KB: only their fetched
    // size tells how large they are.
    let before = write_large_rows(&env, 0, 30, Padding::Compressible).await;
    let mut config = env.config();
    // One batch per Kafka transaction and per checkpoint.
    config.relay.unacknowledged_batches = 1;
    config.capture.batch_bytes = BATCH_BYTES;
    config.kafka.max_message_bytes = 4 * PAYLOAD_BYTES;
    let relay = InProcessRelay::start(config);
    env.wait_all_sent(Duration::from_secs(120)).await;
    // And rows written while it runs: claimed, or streamed.
    // These it cannot compress.
    let during = write_large_rows(&env, 30, 30, Padding::Random).await;
    env.wait_all_sent(Duration::from_secs(120)).await;
    relay.stop().await.expect("the relay stops cleanly");
    assert_exactly_once(&env, &Written::combined([before, during])).await;

    let checkpoints = table_checkpoints(&env).await;
    assert!(!checkpoints.is_empty(), "no checkpoint was written");
    // A batch ends once it reaches batch_bytes, so it may hold one row
    // past it: three rows of 100 KB for 250 KB.
    let most = 3;
    for checkpoint in &checkpoints {
        let rows = checkpoint.published.len() + checkpoint.dead_lettered.len();
        assert!(
            rows <= most,
            "a transaction published {rows} rows of {PAYLOAD_BYTES} bytes with batch_bytes \
             {BATCH_BYTES}: {checkpoint:?}"
        );
    }
}

enum Padding {
    /// One letter repeated: stored compressed, at about 1% of its size.
    Compressible,
    /// Random hex digits: Postgres cannot compress them.
    Random,
}

/// `count` rows, one transaction each, on five aggregates, with payloads of
/// `PAYLOAD_BYTES`.
async fn write_large_rows(env: &TestEnv, first: usize, count: usize, padding: Padding) -> Written {
    let pad = match padding {
        Padding::Compressible => "repeat('c', $2::int)",
        Padding::Random => {
            "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, $2 / 32))"
        }
    };
    let mut written = Written::default();
    for n in first..first + count {
        let id: String = sqlx::query_scalar(&format!(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
             SELECT gen_random_uuid(), 'Order', 'large-' || ($1 % 5), 'OrderCreated', \
                    jsonb_build_object('aggregate', 'large-' || ($1 % 5), 'n', $1 / 5 + 1, 'pad', {pad}) \
             RETURNING id::text"
        ))
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

/// One claim, made as the relay makes them, on its own connection and
/// transaction (left open, as while its batch is published).
async fn claim(
    env: &TestEnv,
    bytes: usize,
    sized_after: i64,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, Vec<OutboxEvent>) {
    let mut transaction = env.pool.begin().await.expect("BEGIN");
    let sql = env.setup().table.claim_sql(PayloadEncoding::Text, false);
    let limits = ClaimLimits {
        rows: 2_000,
        bytes,
        sized_rows: 2_000,
    };
    let events = claim_batch(&mut transaction, &sql, limits, sized_after, None)
        .await
        .expect("claim");
    (transaction, events)
}

fn payload_bytes(events: &[OutboxEvent]) -> usize {
    events
        .iter()
        .map(|e| e.payload.as_ref().map_or(0, Vec::len))
        .sum()
}

async fn insert(env: &TestEnv, count: i64, bytes: i64, padding: Padding) {
    let pad = match padding {
        Padding::Compressible => "repeat('c', $2::int)",
        Padding::Random => {
            "(SELECT string_agg(md5(random()::text || g), '') FROM generate_series(1, $2 / 32) g)"
        }
    };
    sqlx::query(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'Order', 'claim-' || i, 'OrderCreated', jsonb_build_object('pad', {pad}) \
         FROM generate_series(1, $1) AS i"
    ))
    .bind(count)
    .bind(bytes)
    .execute(&env.pool)
    .await
    .expect("insert rows");
}

/// Compressible payloads are stored at about 1% of their size: a claim
/// sizes them as sent, not as stored, also after a small row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_sizes_compressed_payloads_as_sent() {
    let env = TestEnv::new("claim-compressed", Mode::Polling).await;
    insert(&env, 1, 10, Padding::Compressible).await;
    insert(&env, 300, PAYLOAD_BYTES as i64, Padding::Compressible).await;
    let (_open, events) = claim(&env, BATCH_BYTES, 0).await;
    let bytes = payload_bytes(&events);
    assert!(
        bytes <= BATCH_BYTES + PAYLOAD_BYTES + 1_000,
        "one claim held {bytes} bytes in {} rows with batch_bytes {BATCH_BYTES}",
        events.len()
    );
}

/// While an earlier claim is open, the oldest unsent rows are its rows:
/// the next claim sizes the rows above it, its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_sizes_its_own_rows_while_an_earlier_claim_is_open() {
    let env = TestEnv::new("claim-open", Mode::Polling).await;
    insert(&env, 20, 10, Padding::Random).await;
    insert(&env, 40, PAYLOAD_BYTES as i64, Padding::Random).await;
    let (_first_open, first) = claim(&env, BATCH_BYTES, 0).await;
    assert!(payload_bytes(&first) <= BATCH_BYTES + PAYLOAD_BYTES + 1_000);
    let highest = first.iter().map(|e| e.seq).max().unwrap();
    let (_second_open, second) = claim(&env, BATCH_BYTES, highest).await;
    let bytes = payload_bytes(&second);
    assert!(
        !second.is_empty() && bytes <= BATCH_BYTES + PAYLOAD_BYTES + 1_000,
        "the second claim held {bytes} bytes in {} rows with batch_bytes {BATCH_BYTES}",
        second.len()
    );
    assert_eq!(
        second[0].seq,
        highest + 1,
        "claims follow each other in seq order"
    );
}

/// One row larger than batch_bytes among small ones is a batch of its own;
/// the small rows around it still go in large claims, also while another
/// session holds the large row locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_row_does_not_make_the_rows_around_it_single_row_claims() {
    let env = TestEnv::new("claim-one-large", Mode::Polling).await;
    insert(&env, 49, 10, Padding::Random).await;
    insert(&env, 1, 300_000, Padding::Random).await;
    insert(&env, 50, 10, Padding::Random).await;
    let mut holder = env.pool.begin().await.expect("BEGIN");
    sqlx::query("SELECT 1 FROM outbox WHERE seq = 50 FOR SHARE")
        .execute(&mut *holder)
        .await
        .expect("hold the large row");
    let mut claims = Vec::new();
    let mut floor = SizingFloor::default();
    let past_locked_sql = env.setup().table.first_unsent_after_sql(false);
    loop {
        let (mut open, events) = claim(&env, BATCH_BYTES, floor.sized_after()).await;
        if events.is_empty() {
            // As the relay does: every row it sized is held; size past them.
            match first_unsent_after(&mut open, &past_locked_sql, floor.sized_after(), None)
                .await
                .expect("look past locked rows")
            {
                Some(seq) => {
                    floor.empty_claim_left(seq);
                    continue;
                }
                None => break,
            }
        }
        floor.claimed(events.iter().map(|e| e.seq).max().unwrap());
        claims.push((events.len(), open));
        assert!(claims.len() <= 10, "more than 10 claims for 99 small rows");
    }
    let sizes: Vec<usize> = claims.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        sizes.iter().sum::<usize>(),
        99,
        "every small row, once: {sizes:?}"
    );
    assert!(sizes.len() <= 3, "claims of the small rows: {sizes:?}");
    holder.rollback().await.expect("release the large row");
}
