//! A checkpoint topic shared with other relays, as on a cluster that many
//! services' relays use: 1,000,000 checkpoint records of 1,000 other
//! tables, written once per bench run before the start-up section reads
//! from the topic.
//!
//! Shape: the records look like real checkpoints (~160 bytes of the same
//! JSON, one key per table) and are written the way relays write them, in
//! Kafka transactions, but 50,000 to a transaction so filling takes
//! seconds. The topic is compacted like the relay's own. The older 700,000
//! records roll into closed 16 MiB segments, which the log cleaner compacts
//! to about one record per table, as on a long-lived topic; the latest
//! 300,000 sit in the active segment, which is never compacted, so whatever
//! the cleaner did, a start-up that scanned the topic would read those.

use std::time::Duration;

use outboxd::kafka::checkpoint::{Checkpoint, CHECKPOINT_PARTITION};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

pub const RECORDS: usize = 1_000_000;
pub const OTHER_TABLES: usize = 1_000;
/// Written last, into the active segment.
pub const RECENT: usize = 300_000;
const PER_TRANSACTION: usize = 50_000;
const BULK_SEGMENT_BYTES: &str = "16777216";
/// Kafka's default `segment.bytes`: the active segment holds the rest.
const ACTIVE_SEGMENT_BYTES: &str = "1073741824";

/// Creates `topic` (one partition, compacted) and fills it.
pub async fn create_and_fill(bootstrap: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let new_topic = NewTopic::new(topic, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact")
        .set("segment.bytes", BULK_SEGMENT_BYTES);
    for result in admin
        .create_topics([&new_topic], &AdminOptions::new())
        .await
        .expect("create the shared checkpoint topic")
    {
        result.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
    let producer = transactional_producer(bootstrap, topic).await;
    let producer = write(producer, topic, 0, RECORDS - RECENT).await;
    // The whole config, since AlterConfigs replaces it.
    let config = AlterConfig::new(ResourceSpecifier::Topic(topic))
        .set("cleanup.policy", "compact")
        .set("segment.bytes", ACTIVE_SEGMENT_BYTES);
    for result in admin
        .alter_configs([&config], &AdminOptions::new())
        .await
        .expect("alter the shared checkpoint topic")
    {
        result.unwrap_or_else(|(t, e)| panic!("alter topic {t:?}: {e}"));
    }
    // The broker applies the change from its metadata log, shortly after.
    tokio::time::sleep(Duration::from_secs(2)).await;
    write(producer, topic, RECORDS - RECENT, RECORDS).await;
}

async fn transactional_producer(bootstrap: &str, topic: &str) -> BaseProducer {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", format!("bench-others-{topic}"))
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "200000")
        .create()
        .expect("the other relays' producer");
    tokio::task::spawn_blocking(move || {
        producer
            .init_transactions(Duration::from_secs(30))
            .expect("init_transactions");
        producer
    })
    .await
    .expect("producer task")
}

/// Records `from..to`, in transactions of `PER_TRANSACTION`.
async fn write(producer: BaseProducer, topic: &str, from: usize, to: usize) -> BaseProducer {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        for start in (from..to).step_by(PER_TRANSACTION) {
            producer.begin_transaction().expect("begin");
            for i in start..(start + PER_TRANSACTION).min(to) {
                let (key, value) = record(i);
                let mut next = BaseRecord::to(&topic)
                    .partition(CHECKPOINT_PARTITION)
                    .key(&key)
                    .payload(&value);
                loop {
                    match producer.send(next) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            producer.poll(Duration::from_millis(10));
                            next = back;
                        }
                        Err((e, _)) => panic!("produce another relay's checkpoint: {e}"),
                    }
                }
            }
            producer
                .commit_transaction(Duration::from_secs(60))
                .expect("commit the other relays' transaction");
        }
        producer
    })
    .await
    .expect("producer task")
}

/// Record `i`: the `i / OTHER_TABLES`-th checkpoint of table `i % OTHER_TABLES`,
/// a replication batch of 2,000 rows, keyed and shaped like the relay's own.
fn record(i: usize) -> (String, String) {
    let table = i % OTHER_TABLES;
    let batch = (i / OTHER_TABLES) as u64;
    let source = format!("73{:017}/service_{table:04}", table);
    let first = batch * 2_000 + 1;
    let value = format!(
        r#"{{"version":1,"table":"public.outbox","source":"{source}","published":[[{first},{last}]],"dead_lettered":[],"position":{{"commit_lsn":{lsn},"index":1999}}}}"#,
        last = first + 1_999,
        lsn = 0x16_0000_0000u64 + batch * 4_000_000,
    );
    if i == 0 {
        Checkpoint::from_bytes(value.as_bytes()).expect("the filler is a readable checkpoint");
    }
    (format!("{source}/public.outbox"), value)
}
