//! `relay.retention` deletes rows published longer ago than the period,
//! and nothing else.

use std::time::Duration;

use crate::support::{Mode, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_rows_sent_before_the_period() {
    let env = TestEnv::new("retention", Mode::Polling).await;
    // 5000 rows sent three hours ago (more than one delete batch), 10 sent
    // a minute ago, 10 never sent.
    sqlx::raw_sql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, sent_at) \
         SELECT 'Order', 'o-' || i, 'OrderCreated', '{}', now() - interval '3 hours' \
         FROM generate_series(1, 5000) AS i; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload, sent_at) \
         SELECT 'Order', 'r-' || i, 'OrderCreated', '{}', now() - interval '1 minute' \
         FROM generate_series(1, 10) AS i; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'Order', 'u-' || i, 'OrderCreated', '{}' FROM generate_series(1, 10) AS i;",
    )
    .execute(&env.pool)
    .await
    .unwrap();

    let config = env.config();
    let table = outboxd::table::OutboxTable::from_config(&config.postgres).unwrap();
    let mut connection = env.pool.acquire().await.unwrap();
    let (_keep_running, running) = outboxd::shutdown::channel();
    let deleted = outboxd::retention::delete_old_rows(
        &mut connection,
        &table.delete_sent_before_sql(),
        Duration::from_secs(3600),
        &running,
    )
    .await
    .expect("retention runs");
    assert_eq!(deleted, 5000);

    let left: Vec<(String, bool)> = sqlx::query_as(
        "SELECT left(aggregateid, 1), sent_at IS NULL FROM outbox GROUP BY 1, 2 ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        left,
        vec![("r".to_string(), false), ("u".to_string(), true)],
        "recently sent and unsent rows stay"
    );
}

#[test]
fn retention_and_delete_after_publish_exclude_each_other() {
    let yaml = "relay:\n  name: r\n  after_publish: delete\n  retention: 7d\n\
                postgres:\n  url: postgres://u@localhost/db\n\
                kafka:\n  bootstrap_servers: localhost:9092\n";
    let path = std::env::temp_dir().join(format!("outboxd-retention-{}.yaml", std::process::id()));
    std::fs::write(&path, yaml).unwrap();
    let error = outboxd::Config::load(&path).unwrap_err().to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(error.contains("relay.retention"), "{error}");
}
