//! Poison rows (unroutable, too large) go to the dead-letter topic in the
//! same transaction, or halt the relay when configured; never vanish.

use std::time::Duration;

use outboxd::error::ErrorKind;

use crate::support::kafka::{read_all, read_topic};
use crate::support::{InProcessRelay, Mode, TestEnv};

async fn insert(env: &TestEnv, aggregate_type: &str, payload_sql: &str) {
    sqlx::query(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ($1, 'agg-1', 'Happened', {payload_sql})"
    ))
    .bind(aggregate_type)
    .execute(&env.pool)
    .await
    .unwrap();
}

in_both_modes!(
    unroutable_and_oversized_rows_land_in_the_dead_letter_topic,
    worker_threads = 2
);
async fn unroutable_and_oversized_rows_land_in_the_dead_letter_topic(mode: Mode) {
    let env = TestEnv::new("poison", mode).await;
    env.write_config("", "  max_message_bytes: 100000\n");
    insert(&env, "Order", "'{\"n\":1}'").await;
    insert(&env, "not a topic!", "'{\"n\":2}'").await;
    insert(
        &env,
        "Order",
        "jsonb_build_object('blob', repeat('x', 200000))",
    )
    .await;
    insert(&env, "Order", "'{\"n\":3}'").await;

    env.relay_until_all_sent(Duration::from_secs(60)).await;

    let dead = read_topic(&env.kafka, &env.dead_letter_topic()).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let unroutable = dead
        .iter()
        .find(|r| r.header("aggregatetype") == Some("not a topic!"))
        .expect("unroutable row");
    assert!(unroutable
        .header("outboxd.dead_letter.reason")
        .unwrap()
        .starts_with("unroutable"));
    assert_eq!(unroutable.payload_json(), serde_json::json!({"n": 2}));
    let oversized = dead
        .iter()
        .find(|r| r.header("outboxd.payload_omitted") == Some("true"))
        .expect("oversized row");
    assert!(oversized
        .header("outboxd.dead_letter.reason")
        .unwrap()
        .starts_with("too large"));
    assert_eq!(oversized.header("outboxd.source.seq"), Some("3"));

    let published: Vec<_> = read_all(&env.kafka, &env.topic_prefix())
        .await
        .into_iter()
        .filter(|r| r.topic != env.dead_letter_topic())
        .collect();
    let ns: Vec<_> = published
        .iter()
        .map(|r| r.payload_json()["n"].clone())
        .collect();
    assert_eq!(ns, vec![serde_json::json!(1), serde_json::json!(3)]);
}

in_both_modes!(
    halt_policy_stops_the_relay_and_publishes_nothing_of_the_batch,
    worker_threads = 2
);
async fn halt_policy_stops_the_relay_and_publishes_nothing_of_the_batch(mode: Mode) {
    let env = TestEnv::new("poison-halt", mode).await;
    env.write_config("  on_poison: halt\n", "");
    insert(&env, "Order", "'{\"n\":1}'").await;
    insert(&env, "bad type", "'{\"n\":2}'").await;

    let relay = InProcessRelay::start(env.config());
    let error = relay.finished(Duration::from_secs(60)).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Stop);
    assert_eq!(error.cause, outboxd::Cause::Poison);
    assert!(
        error.message.contains("seq 2") && error.message.contains("halt"),
        "{error}"
    );
    assert_eq!(env.unsent().await, 2, "nothing is acknowledged");
    assert!(read_all(&env.kafka, &env.topic_prefix()).await.is_empty());
}

in_both_modes!(
    a_row_the_broker_refuses_is_dead_lettered_and_its_batch_mates_are_published,
    worker_threads = 2
);
async fn a_row_the_broker_refuses_is_dead_lettered_and_its_batch_mates_are_published(mode: Mode) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;

    let env = TestEnv::new("poison-broker", mode).await;
    // The topic accepts less than the relay's own limit, so only the broker can refuse.
    let topic = format!("{}.Big", env.topic_prefix());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &env.kafka)
        .create()
        .unwrap();
    let new_topic =
        NewTopic::new(&topic, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "4000");
    admin
        .create_topics([&new_topic], &AdminOptions::new())
        .await
        .unwrap()
        .remove(0)
        .unwrap();

    insert(&env, "Big", "'{\"n\":1}'").await;
    insert(
        &env,
        "Big",
        "jsonb_build_object('n', 2, 'blob', repeat('x', 10000))",
    )
    .await;
    insert(&env, "Big", "'{\"n\":3}'").await;

    env.relay_until_all_sent(Duration::from_secs(60)).await;

    let dead = read_topic(&env.kafka, &env.dead_letter_topic()).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].header("outboxd.source.seq"), Some("2"));
    assert!(dead[0]
        .header("outboxd.dead_letter.reason")
        .unwrap()
        .contains("rejected by Kafka"));
    let published = read_topic(&env.kafka, &topic).await;
    let ns: Vec<_> = published
        .iter()
        .map(|r| r.payload_json()["n"].clone())
        .collect();
    assert_eq!(ns, vec![serde_json::json!(1), serde_json::json!(3)]);
}
