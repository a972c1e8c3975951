//! Finding checkpoints by reading the whole checkpoint topic, for when the
//! table's checkpoint group has no offset: the first start after upgrading
//! from outboxd 0.1 (which keyed checkpoints by `relay.name` and used
//! `outboxd-<relay.name>` as its transactional id), the very first start of
//! a relay, or a group whose offset the broker expired after
//! `offsets.retention.minutes` without a transaction.
//!
//! Invariant: the result holds the latest committed checkpoint under the
//! table's own key and, from 0.1, of this relay and of every other relay
//! name that led the same table, never an older one. The reader first
//! fences those 0.1 transactional ids (the table's own id is fenced
//! already), then reads up to the high watermark taken after fencing, which
//! none of their checkpoints can be above, waiting while other relays' open
//! transactions hold the last stable offset below it. (0.1 read "to the
//! end", which for a `read_committed` reader is the last stable offset, and
//! so could take a stale checkpoint for the latest.) The caller then writes
//! the latest as the table's checkpoint, so the scan, whose cost grows with
//! the shared topic, is not repeated.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::checkpoint::Checkpoint;
use super::publisher::Publisher;
use crate::config::Config;
use crate::error::{Error, Result};

const METADATA_TIMEOUT: Duration = Duration::from_secs(15);

/// The latest checkpoints that concern this relay's table.
#[derive(Debug, Default)]
pub struct Latest {
    /// The table's, under its identity key: written by this version, its
    /// group offset gone.
    pub table: Option<Checkpoint>,
    /// This relay's from 0.1 (its key is `relay.name`).
    pub own: Option<Checkpoint>,
    /// The latest of each relay with another name whose checkpoint names
    /// the same table and source: relays that led this table before.
    pub predecessors: Vec<(String, Checkpoint)>,
}

/// Fences this relay's legacy transactional id, reads, fences every legacy
/// predecessor found, and reads again to see how their open transactions
/// ended. Predecessors are looked for only when `origin` gives the table
/// and its source.
pub async fn read(
    config: &Config,
    table_key: &str,
    origin: Option<(&str, &str)>,
) -> Result<Latest> {
    Publisher::fence_transactional_id(config, &legacy_transactional_id(&config.relay.name)).await?;
    let mut latest = scan(config, table_key, origin).await?;
    if !latest.predecessors.is_empty() {
        for (previous_relay, _) in &latest.predecessors {
            Publisher::fence_transactional_id(config, &legacy_transactional_id(previous_relay))
                .await?;
        }
        latest = scan(config, table_key, origin).await?;
    }
    Ok(latest)
}

/// The transactional id outboxd 0.1 gave the relay named `relay_name`.
fn legacy_transactional_id(relay_name: &str) -> String {
    format!("outboxd-{relay_name}")
}

async fn scan(config: &Config, table_key: &str, origin: Option<(&str, &str)>) -> Result<Latest> {
    let config = config.clone();
    let table_key = table_key.to_string();
    let origin = origin.map(|(table, source)| (table.to_string(), source.to_string()));
    tokio::task::spawn_blocking(move || scan_blocking(&config, &table_key, origin))
        .await
        .map_err(|e| Error::stop(format!("checkpoint scan task failed: {e}")))?
}

fn scan_blocking(
    config: &Config,
    table_key: &str,
    origin: Option<(String, String)>,
) -> Result<Latest> {
    let topic = &config.kafka.checkpoint_topic;
    let relay_key = config.relay.name.as_bytes();
    let consumer: BaseConsumer<super::RelayContext> = super::base_client_config(config)
        .set(
            "group.id",
            format!("outboxd-{}-checkpoint-reader", config.relay.name),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create_with_context(super::RelayContext)
        .map_err(|e| Error::stop(format!("cannot create the checkpoint reader: {e}")))?;

    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(|e| {
            Error::retry(format!(
                "reading metadata of checkpoint topic `{topic}`: {e}"
            ))
        })?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic.as_str())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Error::retry(format!(
            "checkpoint topic `{topic}` has no partitions yet"
        )));
    }
    // Taken after fencing: every checkpoint of the fenced relays is below it.
    // Asked by a read_uncommitted client: librdkafka asks for the end with
    // the client's isolation level, and a read_committed client's end is
    // the last stable offset, the very bound that can hide our checkpoint.
    let end_reader: BaseConsumer<super::RelayContext> = super::base_client_config(config)
        .set("isolation.level", "read_uncommitted")
        .create_with_context(super::RelayContext)
        .map_err(|e| Error::stop(format!("cannot create the checkpoint reader: {e}")))?;
    let mut bounds: BTreeMap<i32, i64> = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        let (_, high) = end_reader
            .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
            .map_err(|e| {
                Error::retry(format!(
                    "reading the end of checkpoint partition {partition}: {e}"
                ))
            })?;
        bounds.insert(partition, high);
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .map_err(|e| Error::stop(format!("assigning checkpoint partition {partition}: {e}")))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| Error::retry(format!("assigning checkpoint topic `{topic}`: {e}")))?;

    // Another relay's open transaction holds the last stable offset back,
    // but never longer than its transaction timeout (and the broker's abort
    // sweep): wait for it rather than stop early.
    let deadline = Instant::now() + config.kafka.transaction_timeout + Duration::from_secs(30);
    let mut table_latest = None;
    let mut latest = None;
    let mut predecessors: BTreeMap<String, Checkpoint> = BTreeMap::new();
    while !reached(&consumer, topic, &bounds)? {
        if Instant::now() > deadline {
            return Err(Error::retry(format!(
                "timed out reading checkpoint topic `{topic}` up to its high watermark: another \
                 relay's transaction stayed open longer than kafka.transaction_timeout"
            )));
        }
        let message = match consumer.poll(Duration::from_millis(100)) {
            None | Some(Err(KafkaError::PartitionEOF(_))) => continue,
            Some(Err(e)) => {
                return Err(Error::retry(format!(
                    "reading checkpoint topic `{topic}`: {e}"
                )))
            }
            Some(Ok(message)) => message,
        };
        if message.key() == Some(table_key.as_bytes()) {
            table_latest = readable(topic, &message)?;
            continue;
        }
        if message.key() != Some(relay_key) {
            if let (Some((table, source)), Some(key)) = (&origin, message.key()) {
                let key = String::from_utf8_lossy(key).into_owned();
                // Another relay's record: only the same table in the same
                // database counts, and an unreadable one is that relay's
                // business.
                match message.payload().map(Checkpoint::from_bytes) {
                    Some(Ok(checkpoint))
                        if &checkpoint.table == table
                            && checkpoint.source.as_ref() == Some(source) =>
                    {
                        predecessors.insert(key, checkpoint);
                    }
                    None => {
                        predecessors.remove(&key);
                    }
                    Some(_) => {}
                }
            }
            continue;
        }
        latest = readable(topic, &message)?;
    }
    Ok(Latest {
        table: table_latest,
        own: latest,
        predecessors: predecessors.into_iter().collect(),
    })
}

/// One of our checkpoints. A null value would be a tombstone: the
/// checkpoint was deleted on purpose.
fn readable(
    topic: &str,
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<Option<Checkpoint>> {
    match message.payload() {
        None => Ok(None),
        Some(bytes) => Checkpoint::from_bytes(bytes).map(Some).map_err(|e| {
            Error::stop(format!(
                "the checkpoint at `{topic}` offset {} is unreadable ({e}); \
                 refusing to guess which rows were published",
                message.offset()
            ))
        }),
    }
}

/// Whether the reader's position has reached the bound on every partition.
/// The position moves past transaction markers too, so a partition whose
/// last entry is a commit marker is reached once the marker is.
fn reached(
    consumer: &BaseConsumer<super::RelayContext>,
    topic: &str,
    bounds: &BTreeMap<i32, i64>,
) -> Result<bool> {
    let positions = consumer
        .position()
        .map_err(|e| Error::retry(format!("reading the checkpoint reader's position: {e}")))?;
    Ok(bounds.iter().all(|(&partition, &bound)| {
        bound == 0
            || matches!(
                positions.find_partition(topic, partition).map(|p| p.offset()),
                Some(Offset::Offset(position)) if position >= bound
            )
    }))
}
