//! Every committed row arrives exactly once, in per-aggregate order; rows
//! from rolled-back transactions never arrive.

use std::time::Duration;

use crate::support::kafka::read_all;
use crate::support::workload::{assert_exactly_once, write_orders_concurrently, Written};
use crate::support::{InProcessRelay, Mode, TestEnv};

in_both_modes!(
    concurrent_writers_every_committed_row_once_and_in_order,
    worker_threads = 4
);
async fn concurrent_writers_every_committed_row_once_and_in_order(mode: Mode) {
    let env = TestEnv::new("concurrent", mode).await;
    let relay = InProcessRelay::start(env.config());

    let written = write_orders_concurrently(&env.pool, 4, 150, 12).await;
    assert!(
        written.committed > 500,
        "workload too small: {}",
        written.committed
    );
    assert!(
        !written.rolled_back_ids.is_empty(),
        "the workload should roll some transactions back"
    );

    env.wait_all_sent(Duration::from_secs(90)).await;
    relay.stop().await.expect("relay stops cleanly");

    assert_exactly_once(&env, &written).await;
    let consumed = read_all(&env.kafka, &env.topic_prefix()).await;

    let first = consumed
        .iter()
        .find(|r| r.header("type") == Some("OrderCreated"))
        .expect("an OrderCreated event");
    assert_eq!(first.topic, format!("{}.Order", env.topic_prefix()));
    assert_eq!(first.header("aggregatetype"), Some("Order"));
}

in_both_modes!(
    a_row_committed_late_with_a_lower_seq_is_not_skipped,
    worker_threads = 2
);
async fn a_row_committed_late_with_a_lower_seq_is_not_skipped(mode: Mode) {
    let env = TestEnv::new("late-commit", mode).await;
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(30)).await;

    // Transaction A takes the lower seq but commits last.
    let mut slow = env.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'slow', 'OrderCreated', '{\"n\":1}')")
        .execute(&mut *slow)
        .await
        .unwrap();
    sqlx::query("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'fast', 'OrderCreated', '{\"n\":1}')")
        .execute(&env.pool)
        .await
        .unwrap();
    let fast_sent = async {
        loop {
            let sent: bool = sqlx::query_scalar(
                "SELECT sent_at IS NOT NULL FROM outbox WHERE aggregateid = 'fast'",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap();
            if sent {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), fast_sent)
        .await
        .expect("the fast row is sent");
    slow.commit().await.unwrap();
    env.wait_all_sent(Duration::from_secs(30)).await;
    relay.stop().await.unwrap();

    let rows = env.rows().await;
    assert!(rows[0].0 < rows[1].0);
    assert_exactly_once(&env, &Written::default()).await;
    assert_eq!(read_all(&env.kafka, &env.topic_prefix()).await.len(), 2);
}

in_both_modes!(
    delete_after_publish_removes_rows_and_keeps_headers_and_payload,
    worker_threads = 2
);
async fn delete_after_publish_removes_rows_and_keeps_headers_and_payload(mode: Mode) {
    let env = TestEnv::new("delete", mode).await;
    env.write_config("  after_publish: delete\n", "");
    sqlx::query(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers, tracingspancontext) VALUES \
         ('Customer', 'c-1', 'CustomerRegistered', '{\"name\": \"Ada\"}', '{\"tenant\": \"acme\"}', \
          '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let id: String = sqlx::query_scalar("SELECT id::text FROM outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let relay = InProcessRelay::start(env.config());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap()
        > 0
    {
        assert!(std::time::Instant::now() < deadline, "row was not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await.unwrap();

    let consumed = read_all(&env.kafka, &env.topic_prefix()).await;
    assert_eq!(consumed.len(), 1);
    let record = &consumed[0];
    assert_eq!(record.topic, format!("{}.Customer", env.topic_prefix()));
    assert_eq!(record.key.as_deref(), Some(&b"c-1"[..]));
    assert_eq!(record.payload_json(), serde_json::json!({"name": "Ada"}));
    assert_eq!(record.header("id"), Some(id.as_str()));
    assert_eq!(record.header("tenant"), Some("acme"));
    assert_eq!(
        record.header("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
}

in_both_modes!(
    an_event_id_whose_text_form_differs_is_relayed_once,
    worker_threads = 2
);
/// An id column of type `character(40)` holding uuids: Postgres pads each
/// value with blanks, which the column's output function (and so the
/// replication stream) keeps and a cast to `text` drops. Marks, the
/// catch-up filter and reconciliation match rows by seq and event id, so
/// both forms must agree: every row is published once and marked, across a
/// kill after a Kafka commit.
async fn an_event_id_whose_text_form_differs_is_relayed_once(mode: Mode) {
    let env = TestEnv::new("padded-ids", mode).await;
    pad_the_ids(&env).await;
    let written = crate::support::workload::write_orders(&env.pool, 0, 10, 5).await;
    let mut relay = crate::support::faults::RelayProcess::start(&env, Some("after-commit"));
    relay
        .killed_at_point("after-commit", Duration::from_secs(60))
        .await;
    written_more_then_relayed(&env).await;

    let ids: Vec<String> = sqlx::query_scalar("SELECT format('%s', id) FROM outbox")
        .fetch_all(&env.pool)
        .await
        .expect("ids");
    assert!(
        ids.len() > written.committed,
        "rows were written after the kill"
    );
    assert!(ids.iter().all(|id| id.ends_with(' ')), "the ids are padded");
    let records = crate::support::kafka::read_all(&env.kafka, &env.topic_prefix()).await;
    for id in &ids {
        let times = records
            .iter()
            .filter(|r| r.header("id") == Some(id.as_str()))
            .count();
        assert_eq!(times, 1, "event {id:?} published once");
    }
    assert_eq!(records.len(), ids.len(), "nothing else was published");
}

/// Writes more orders, then relays until every row is marked sent.
async fn written_more_then_relayed(env: &TestEnv) {
    crate::support::workload::write_orders(&env.pool, 1, 10, 5).await;
    let mut relay = crate::support::faults::RelayProcess::start(env, None);
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await;
}

/// Makes the env's id column `character(40)`: uuids padded with blanks.
async fn pad_the_ids(env: &TestEnv) {
    sqlx::raw_sql(
        "DROP TRIGGER outbox_insert_only_update ON outbox; \
         ALTER TABLE outbox ALTER COLUMN id DROP DEFAULT, \
         ALTER COLUMN id TYPE character(40) USING id::text, \
         ALTER COLUMN id SET DEFAULT gen_random_uuid()::text",
    )
    .execute(&env.pool)
    .await
    .expect("make the id column character(40)");
    // The insert-only guard back, as the migration creates it.
    outboxd::migrate::apply(&env.setup())
        .await
        .expect("migrate again");
}

/// Releases before the event id was read as its output function writes it
/// digested `id::text`, which drops a padded id's blanks. A checkpoint of
/// theirs, read after an upgrade, must still name its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_trimmed_padded_ids_still_names_its_rows() {
    use outboxd::kafka::checkpoint::{Checkpoint, RowDigest};
    use sqlx::Connection;

    let env = TestEnv::new("padded-upgrade", Mode::Polling).await;
    pad_the_ids(&env).await;
    crate::support::workload::write_orders(&env.pool, 0, 5, 5).await;
    let rows: std::collections::HashMap<i64, String> =
        sqlx::query_as::<_, (i64, String)>("SELECT seq, id::text FROM outbox")
            .fetch_all(&env.pool)
            .await
            .expect("rows")
            .into_iter()
            .collect();
    let seqs: Vec<i64> = rows.keys().copied().collect();
    let checkpoint = Checkpoint::new("public.outbox", None, &seqs, &[], None)
        .with_row_ids(|seq| rows.get(&seq).map(|id| RowDigest::of(id)));

    let config = env.config();
    let table = outboxd::table::OutboxTable::from_config(&config.postgres).expect("table");
    let acknowledger =
        outboxd::acknowledge::Acknowledger::new(&table, outboxd::config::AfterPublish::Mark);
    let mut connection = sqlx::PgConnection::connect(&env.database_url)
        .await
        .expect("connect");
    let done = acknowledger
        .reconcile(&mut connection, &checkpoint)
        .await
        .expect("reconcile");
    assert_eq!(done.published as usize, rows.len());
    assert_eq!(env.unsent().await, 0);
}
