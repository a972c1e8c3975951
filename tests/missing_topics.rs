//! Rows routed to a topic that does not exist, on a broker that does not
//! create topics on first use (the stack's second broker): they wait, loudly,
//! until it exists; or the relay creates it; or they are poison.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::support::http::get;
use crate::support::kafka::{create_topic, read_topic};
use crate::support::{servers, InProcessRelay, Mode, TestEnv};

const ROWS: i64 = 30;

/// An env whose relay talks to the broker that does not auto-create topics,
/// with `routing_lines` added under `routing:`.
pub async fn env_on_strict_broker(
    name: &str,
    mode: Mode,
    routing_lines: &str,
) -> (TestEnv, String) {
    let env = TestEnv::new(name, mode).await;
    let strict = servers().kafka_no_auto_create;
    env.replace_in_config(
        &format!("bootstrap_servers: {}", env.kafka),
        &format!("bootstrap_servers: {strict}"),
    );
    env.replace_in_config("routing:\n", &format!("routing:\n{routing_lines}"));
    (env, strict)
}

pub async fn insert_orders(env: &TestEnv) {
    sqlx::query(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'Order', 'order-' || g, 'OrderCreated', jsonb_build_object('n', g) \
         FROM generate_series(1, $1) AS g",
    )
    .bind(ROWS)
    .execute(&env.pool)
    .await
    .expect("insert events");
}

fn partitions_of(bootstrap: &str, topic: &str) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("client");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata.topics()[0].partitions().len()
}

in_both_modes!(rows_for_a_missing_topic_wait_and_say_so, worker_threads = 2);
async fn rows_for_a_missing_topic_wait_and_say_so(mode: Mode) {
    let (env, strict) = env_on_strict_broker("missing-wait", mode, "").await;
    let topic = format!("{}.Order", env.topic_prefix());
    let relay = InProcessRelay::start(env.config());
    let base = relay.serve_http().await;
    env.wait_streaming(Duration::from_secs(30)).await;
    insert_orders(&env).await;

    // The stall shows in /readyz and in the metric, naming the topic.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&base, "/readyz").await;
        if status == 503 && body.contains(&topic) {
            assert!(body.contains("routing.missing_topics"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never named the missing topic: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, metrics) = get(&base, "/metrics").await;
    let waiting = metrics
        .lines()
        .find(|line| line.starts_with("outboxd_rows_waiting_for_topic") && line.contains(&topic))
        .unwrap_or_else(|| panic!("no rows_waiting_for_topic for {topic}:\n{metrics}"));
    let rows: i64 = waiting
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a value");
    assert!(rows > 0, "{waiting}");
    assert_eq!(
        env.unsent().await,
        ROWS,
        "nothing was acknowledged meanwhile"
    );

    // Once someone creates it, the rows go out exactly once and the relay is ready.
    create_topic(&strict, &topic, 2).await;
    env.wait_all_sent(Duration::from_secs(90)).await;
    let (status, body) = get(&base, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    relay.stop().await.expect("relay stops cleanly");
    let consumed = read_topic(&strict, &topic).await;
    let mut ns: Vec<i64> = consumed
        .iter()
        .map(|record| record.payload_json()["n"].as_i64().expect("n"))
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (1..=ROWS).collect::<Vec<_>>(), "every row once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_creates_missing_topics_when_told_to() {
    let (env, strict) = env_on_strict_broker(
        "missing-create",
        Mode::Polling,
        "  missing_topics: create\n  create_topics:\n    partitions: 4\n    replication_factor: 1\n    \
         configs:\n      retention.ms: \"86400000\"\n",
    )
    .await;
    let topic = format!("{}.Order", env.topic_prefix());
    insert_orders(&env).await;
    env.relay_until_all_sent(Duration::from_secs(90)).await;

    assert_eq!(partitions_of(&strict, &topic), 4);
    let configs = outboxd::kafka::topics::topic_configs(&env.config(), &topic, &["retention.ms"])
        .await
        .expect("describe the created topic");
    assert_eq!(configs, vec![Some("86400000".to_string())]);
    assert_eq!(read_topic(&strict, &topic).await.len(), ROWS as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_for_a_missing_topic_are_poison_when_told_so() {
    let (env, strict) = env_on_strict_broker(
        "missing-poison",
        Mode::Polling,
        "  missing_topics: poison\n",
    )
    .await;
    create_topic(&strict, &env.dead_letter_topic(), 1).await;
    insert_orders(&env).await;
    env.relay_until_all_sent(Duration::from_secs(90)).await;

    let dead = read_topic(&strict, &env.dead_letter_topic()).await;
    assert_eq!(dead.len(), ROWS as usize, "every row dead-lettered once");
    let reason = dead[0]
        .header("outboxd.dead_letter.reason")
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("does not exist")
            && reason.contains(&format!("{}.Order", env.topic_prefix())),
        "the dead letter says why: {:?}",
        dead[0].headers
    );
}
