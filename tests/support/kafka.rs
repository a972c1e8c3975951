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
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| t.name().starts_with(prefix) && keep(t.name()))
    {
        for partition in topic.partitions() {
            assignment
                .add_partition_offset(topic.name(), partition.id(), Offset::Beginning)
                .expect("assign");
        }
    }
    let partitions = assignment.count();
    if partitions == 0 {
        return Vec::new();
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut at_end = 0;
    let mut records = Vec::new();
    while at_end < partitions {
        assert!(
            Instant::now() < deadline,
            "consumer did not reach the end of {prefix}* within 60s"
        );
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => at_end += 1,
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
