//! Reading back what the relay published, the way a consumer would:
//! `isolation.level=read_committed`, every partition from the beginning.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

impl Consumed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    pub fn payload_json(&self) -> serde_json::Value {
        serde_json::from_slice(self.payload.as_deref().expect("payload")).expect("payload is JSON")
    }
}

/// Every committed record in topics whose name starts with `prefix`
/// (except the checkpoint topic), in partition offset order.
pub async fn read_all(bootstrap: &str, prefix: &str) -> Vec<Consumed> {
    let bootstrap = bootstrap.to_string();
    let prefix = prefix.to_string();
    tokio::task::spawn_blocking(move || {
        read_all_blocking(&bootstrap, &prefix, |topic| {
            !topic.ends_with(".checkpoints")
        })
    })
    .await
    .expect("consumer task")
}

/// Every committed record of one topic.
pub async fn read_topic(bootstrap: &str, topic: &str) -> Vec<Consumed> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || read_all_blocking(&bootstrap, &topic, |t| t == topic))
        .await
        .expect("consumer task")
}

fn read_all_blocking(bootstrap: &str, prefix: &str, keep: impl Fn(&str) -> bool) -> Vec<Consumed> {
    let consumer: BaseConsumer<outboxd::kafka::RelayContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("it-reader-{prefix}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(outboxd::kafka::RelayContext)
        .expect("create consumer");
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    let mut assignment = TopicPartitionList::new();
    // Read up to the high watermark of each partition, not to the first
    // end-of-partition event: a read_committed reader's end is the last
    // stable offset, which an open transaction holds back.
    let mut bounds: Vec<(String, i32, i64)> = Vec::new();
    // The high watermark, asked by a read_uncommitted client: librdkafka
    // asks with the client's isolation level, and read_committed would
    // answer the last stable offset.
    let end_reader: BaseConsumer<outboxd::kafka::RelayContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("isolation.level", "read_uncommitted")
        .create_with_context(outboxd::kafka::RelayContext)
        .expect("create consumer");
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| t.name().starts_with(prefix) && keep(t.name()))
    {
        for partition in topic.partitions() {
            let high = watermark_high(&end_reader, topic.name(), partition.id());
            bounds.push((topic.name().to_string(), partition.id(), high));
            assignment
                .add_partition_offset(topic.name(), partition.id(), Offset::Beginning)
                .expect("assign");
        }
    }
    if bounds.is_empty() {
        return Vec::new();
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    let reached = |consumer: &BaseConsumer<outboxd::kafka::RelayContext>| {
        let positions = consumer.position().expect("position");
        bounds.iter().all(|(topic, partition, high)| {
            *high == 0
                || matches!(
                    positions.find_partition(topic, *partition).map(|p| p.offset()),
                    Some(Offset::Offset(position)) if position >= *high
                )
        })
    };
    let mut records = Vec::new();
    while !reached(&consumer) {
        assert!(
            Instant::now() < deadline,
            "consumer did not reach the high watermarks of {prefix}* within 60s \
             (a transaction left open on them?)"
        );
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => panic!("consumer error: {e}"),
            Some(Ok(message)) => {
                let mut headers = HashMap::new();
                if let Some(all) = message.headers() {
                    for header in all.iter() {
                        let value = header
                            .value
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default();
                        headers.insert(header.key.to_string(), value);
                    }
                }
                records.push(Consumed {
                    topic: message.topic().to_string(),
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
        }
    }
    records
}

/// A Kafka transaction held open by "another relay" on a topic: until it
/// ends, `read_committed` readers of the topic's partition cannot read
/// past its first record (the last stable offset stays there).
pub struct OpenTransaction {
    producer: rdkafka::producer::FutureProducer<outboxd::kafka::RelayContext>,
}

impl OpenTransaction {
    /// Begins a transaction as `transactional_id` and writes one record to
    /// partition 0 of `topic`, acknowledged by the broker, without committing.
    pub async fn begin(bootstrap: &str, topic: &str, transactional_id: &str) -> OpenTransaction {
        use rdkafka::producer::FutureRecord;
        let producer = begin_transaction_as(bootstrap, transactional_id).await;
        let record = FutureRecord::to(topic)
            .partition(0)
            .key("another-relay")
            .payload("{}");
        producer
            .send(record, Duration::from_secs(30))
            .await
            .expect("the other relay's record is acknowledged");
        OpenTransaction { producer }
    }

    pub async fn abort(self) {
        use rdkafka::producer::Producer;
        let producer = self.producer;
        tokio::task::spawn_blocking(move || producer.abort_transaction(Duration::from_secs(30)))
            .await
            .expect("abort task")
            .expect("abort the other relay's transaction");
    }
}

/// A transactional producer as `transactional_id`, initialised (fencing any
/// earlier holder of the id) with a transaction begun. Its transactions
/// time out after five minutes: longer than any test waits.
pub async fn begin_transaction_as(
    bootstrap: &str,
    transactional_id: &str,
) -> rdkafka::producer::FutureProducer<outboxd::kafka::RelayContext> {
    use rdkafka::producer::Producer;
    let producer: rdkafka::producer::FutureProducer<outboxd::kafka::RelayContext> =
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("transactional.id", transactional_id)
            .set("transaction.timeout.ms", "300000")
            .create_with_context(outboxd::kafka::RelayContext)
            .expect("create a transactional producer");
    let setup = producer.clone();
    tokio::task::spawn_blocking(move || {
        setup.init_transactions(Duration::from_secs(30))?;
        setup.begin_transaction()
    })
    .await
    .expect("transaction task")
    .expect("begin a transaction");
    producer
}

/// Creates `topic` with `partitions` partitions, one replica.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    admin
        .create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic")
        .remove(0)
        .expect("create topic");
}

/// A partition's high watermark. A topic the broker created a moment ago
/// (auto-created by a produce) may have no leader yet: asked again until it has.
fn watermark_high(
    reader: &BaseConsumer<outboxd::kafka::RelayContext>,
    topic: &str,
    partition: i32,
) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match reader.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok((_, high)) => return high,
            Err(error) if Instant::now() < deadline => {
                eprintln!(
                    "watermarks of {topic}/{partition} not available yet ({error}); asking again"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => panic!("watermarks of {topic}/{partition}: {error}"),
        }
    }
}
