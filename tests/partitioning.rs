//! Keys land on the partitions Kafka's own Java producer chooses for them
//! (`routing.partitioner: murmur2_random`, the default), so a team moving off
//! Debezium, or mixing outboxd with Java producers on a topic, keeps every
//! aggregate on its partition across the cutover.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::kafka::{create_topic, read_all};
use crate::support::{Mode, TestEnv};

const PARTITIONS: i32 = 12;
const AGGREGATES: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_where_kafkas_java_partitioner_puts_them() {
    let env = TestEnv::new("murmur2", Mode::Polling).await;
    let placed = relay_keys(&env).await;
    let expected = java_partitions(placed.keys());
    let misplaced: Vec<_> = placed
        .iter()
        .filter(|(key, partition)| expected[*key] != **partition)
        .collect();
    assert!(
        misplaced.is_empty(),
        "{} of {} keys are not on the partition Java's producer chooses: {misplaced:?}",
        misplaced.len(),
        placed.len()
    );
}

/// The comparison can fail: librdkafka's own default (CRC32) places most of
/// the same keys elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_partitioner_is_not_taken_for_javas() {
    let env = TestEnv::new("crc32", Mode::Polling).await;
    env.replace_in_config("routing:\n", "routing:\n  partitioner: consistent_random\n");
    assert_eq!(
        env.config().routing.partitioner,
        outboxd::config::Partitioner::ConsistentRandom
    );
    let placed = relay_keys(&env).await;
    let expected = java_partitions(placed.keys());
    let same = placed
        .iter()
        .filter(|(key, partition)| expected[*key] == **partition)
        .count();
    assert!(
        same < placed.len() / 2,
        "{same} of {} keys on Java's partition under CRC32: the check would not tell them apart",
        placed.len()
    );
}

/// Relays one event per aggregate into a topic of `PARTITIONS` partitions
/// and returns where each key landed.
async fn relay_keys(env: &TestEnv) -> BTreeMap<String, i32> {
    let topic = format!("{}.Order", env.topic_prefix());
    create_topic(&env.kafka, &topic, PARTITIONS).await;
    // Keys of several shapes: prefixed ids, UUIDs, non-ASCII.
    sqlx::query(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'Order', CASE g % 3 WHEN 0 THEN 'order-' || g \
                                    WHEN 1 THEN gen_random_uuid()::text \
                                    ELSE 'bestellung-' || g || '-ü' END, \
                'OrderCreated', '{}'::jsonb \
         FROM generate_series(1, $1) AS g",
    )
    .bind(AGGREGATES as i32)
    .execute(&env.pool)
    .await
    .expect("insert events");
    env.relay_until_all_sent(Duration::from_secs(60)).await;

    let consumed = read_all(&env.kafka, &env.topic_prefix()).await;
    assert_eq!(consumed.len(), AGGREGATES, "one record per aggregate");
    consumed
        .into_iter()
        .map(|record| {
            let key = String::from_utf8(record.key.expect("a keyed record")).expect("UTF-8 key");
            (key, record.partition)
        })
        .collect()
}

/// The partition Kafka's Java producer (`BuiltInPartitioner`) chooses for
/// each key, computed by the stack's Kafka jars.
fn java_partitions<'a>(keys: impl Iterator<Item = &'a String>) -> BTreeMap<String, i32> {
    let keys: Vec<String> = keys.cloned().collect();
    let stack = std::env::var("OUTBOXD_STACK_DIR")
        .expect("OUTBOXD_STACK_DIR is not set: run the tests with `make test`");
    let source = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/java/KeyPartitions.java"
    );
    let mut java = Command::new("java")
        .arg("-cp")
        .arg(format!("{stack}/kafka/libs/*"))
        .arg(source)
        .arg(PARTITIONS.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run java (Java 17 is part of the stack's dependencies)");
    let mut input = java.stdin.take().expect("stdin");
    for key in &keys {
        writeln!(input, "{key}").expect("write a key to java");
    }
    drop(input);
    let output = java.wait_with_output().expect("java finishes");
    assert!(
        output.status.success(),
        "KeyPartitions.java failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let partitions: Vec<i32> = String::from_utf8(output.stdout)
        .expect("UTF-8 output")
        .lines()
        .map(|line| line.parse().expect("a partition number"))
        .collect();
    assert_eq!(partitions.len(), keys.len(), "one partition per key");
    keys.into_iter().zip(partitions).collect()
}
