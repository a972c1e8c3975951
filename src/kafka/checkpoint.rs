//! The checkpoint record: which rows a Kafka transaction published.
//!
//! ```text
//!   Kafka transaction ─┬─ event records (one per row)
//!                      └─ checkpoint record: key = relay name,
//!                         value = {published seqs, dead-lettered seqs,
//!                                  source position (replication only)}
//! ```
//!
//! Why it exists: marking a row sent in Postgres and committing to Kafka can
//! never be one atomic step. The checkpoint travels inside the same Kafka
//! transaction as the events, so "these rows are in Kafka" is true exactly
//! when the checkpoint is visible to a `read_committed` reader.
//!
//! Invariant: rows are marked sent only after their transaction committed,
//! and the next batch is claimed only after that marking committed. So at any
//! moment the only rows that can be in Kafka but not marked are those of the
//! *latest* checkpoint; start-up reads it and marks them, and never produces
//! them again. A relay that takes a table over from a relay with another
//! name (the leader lock is per table) also reconciles that relay's latest
//! checkpoint for the same table in the same database.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::event::SourcePosition;

/// Current checkpoint format; older relays refuse newer ones rather than guess.
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// The outbox table the seqs belong to, so a renamed config cannot
    /// apply one table's checkpoint to another.
    pub table: String,
    /// Where the table lives: `<Postgres system identifier>/<database>`.
    /// Tells this table's checkpoints from those of a same-named table on
    /// another server when relays with different names share the topic.
    /// Absent when the relay could not read it, and in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Rows published to their routed topics.
    pub published: SeqRanges,
    /// Poison rows published to the dead-letter topic.
    pub dead_lettered: SeqRanges,
    /// Replication capture: the stream position of the batch's last event.
    /// A restarted stream skips every event at or before it. Absent from
    /// polling checkpoints (and from those of relays before 0.2, which read
    /// the same format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<SourcePosition>,
}

impl Checkpoint {
    pub fn new(
        table: &str,
        source: Option<&str>,
        published: &[i64],
        dead_lettered: &[i64],
        position: Option<SourcePosition>,
    ) -> Checkpoint {
        Checkpoint {
            version: FORMAT_VERSION,
            table: table.to_string(),
            source: source.map(str::to_string),
            published: SeqRanges::from_seqs(published),
            dead_lettered: SeqRanges::from_seqs(dead_lettered),
            position,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain integers and strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint, String> {
        let checkpoint: Checkpoint = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if checkpoint.version != FORMAT_VERSION {
            return Err(format!(
                "checkpoint format {} is not {FORMAT_VERSION}; a newer outboxd wrote it",
                checkpoint.version
            ));
        }
        Ok(checkpoint)
    }
}

/// Sorted, disjoint, inclusive `[first, last]` ranges of seq: a batch of
/// contiguous rows costs one pair, whatever its size.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeqRanges(Vec<(i64, i64)>);

impl SeqRanges {
    pub fn from_seqs(seqs: &[i64]) -> SeqRanges {
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut ranges: Vec<(i64, i64)> = Vec::new();
        for seq in sorted {
            match ranges.last_mut() {
                Some((_, last)) if *last + 1 == seq => *last = seq,
                _ => ranges.push((seq, seq)),
            }
        }
        SeqRanges(ranges)
    }

    /// Every seq, for `= ANY($1)`. A checkpoint covers one batch, so this is
    /// at most `capture.batch_size` values.
    pub fn to_seqs(&self) -> Vec<i64> {
        self.0
            .iter()
            .flat_map(|&(first, last)| first..=last)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.0
            .iter()
            .map(|&(first, last)| (last - first + 1) as usize)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The latest committed checkpoints that concern this relay's table.
#[derive(Debug, Default)]
pub struct Latest {
    /// This relay's own (its key is `relay.name`).
    pub own: Option<Checkpoint>,
    /// The latest of each relay with another name whose checkpoint names
    /// the same table and source: relays that led this table before.
    pub predecessors: Vec<(String, Checkpoint)>,
}

/// Reads the latest committed checkpoints. `read_committed` skips
/// transactions that aborted or are still open, so what comes back was
/// really published. Call it only after `init_transactions`, which settles
/// any transaction a previous instance left open. Predecessors are looked
/// for only when `origin` gives the table and its source.
pub async fn read_latest(config: &Config, origin: Option<(&str, &str)>) -> Result<Latest> {
    let config = config.clone();
    let origin = origin.map(|(table, source)| (table.to_string(), source.to_string()));
    tokio::task::spawn_blocking(move || read_latest_blocking(&config, origin))
        .await
        .map_err(|e| Error::stop(format!("checkpoint reader task failed: {e}")))?
}

fn read_latest_blocking(config: &Config, origin: Option<(String, String)>) -> Result<Latest> {
    let topic = &config.kafka.checkpoint_topic;
    let relay_key = config.relay.name.as_bytes();
    let consumer: BaseConsumer<super::RelayContext> = super::base_client_config(config)
        .set(
            "group.id",
            format!("outboxd-{}-checkpoint-reader", config.relay.name),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(super::RelayContext)
        .map_err(|e| Error::stop(format!("cannot create the checkpoint reader: {e}")))?;

    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(15))
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
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .map_err(|e| Error::stop(format!("assigning checkpoint partition {partition}: {e}")))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| Error::retry(format!("assigning checkpoint topic `{topic}`: {e}")))?;

    // Another relay's open transaction on this topic holds back what a
    // read_committed reader may see, but never longer than its transaction timeout.
    let deadline = Instant::now() + config.kafka.transaction_timeout + Duration::from_secs(30);
    let mut partitions_at_end = 0;
    let mut latest = None;
    let mut predecessors: std::collections::BTreeMap<String, Checkpoint> = Default::default();
    while partitions_at_end < partitions.len() {
        if Instant::now() > deadline {
            return Err(Error::retry(format!(
                "timed out reading checkpoint topic `{topic}` to its end; is a transaction stuck open on it?"
            )));
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => partitions_at_end += 1,
            Some(Err(e)) => {
                return Err(Error::retry(format!(
                    "reading checkpoint topic `{topic}`: {e}"
                )))
            }
            Some(Ok(message)) => {
                if message.key() != Some(relay_key) {
                    if let (Some((table, source)), Some(key)) = (&origin, message.key()) {
                        let key = String::from_utf8_lossy(key).into_owned();
                        // Another relay's record: only the same table in the
                        // same database counts, and an unreadable one is
                        // that relay's business.
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
                // A null value would be a tombstone: the checkpoint was deleted on purpose.
                latest = match message.payload() {
                    None => None,
                    Some(bytes) => Some(Checkpoint::from_bytes(bytes).map_err(|e| {
                        Error::stop(format!(
                            "the checkpoint at `{topic}` offset {} is unreadable ({e}); \
                             refusing to guess which rows were published",
                            message.offset()
                        ))
                    })?),
                };
            }
        }
    }
    Ok(Latest {
        own: latest,
        predecessors: predecessors.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_seqs_collapse_to_ranges_and_gaps_stay_gaps() {
        let ranges = SeqRanges::from_seqs(&[5, 3, 4, 9, 10, 12, 4]);
        assert_eq!(ranges, SeqRanges(vec![(3, 5), (9, 10), (12, 12)]));
        assert_eq!(ranges.to_seqs(), vec![3, 4, 5, 9, 10, 12]);
        assert_eq!(ranges.len(), 6);
        assert!(SeqRanges::from_seqs(&[]).is_empty());
    }

    #[test]
    fn checkpoint_round_trips_as_json() {
        let checkpoint = Checkpoint::new(
            "public.outbox",
            Some("7710644134332591330/orders"),
            &[1, 2, 3],
            &[4],
            None,
        );
        let bytes = checkpoint.to_bytes();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"version":1,"table":"public.outbox","source":"7710644134332591330/orders","published":[[1,3]],"dead_lettered":[[4,4]]}"#
        );
        assert_eq!(Checkpoint::from_bytes(&bytes).unwrap(), checkpoint);
    }

    #[test]
    fn a_replication_checkpoint_carries_its_source_position() {
        let position = SourcePosition {
            commit_lsn: crate::capture::lsn::Lsn(0x16_B374_D848),
            index: 7,
        };
        let checkpoint = Checkpoint::new("public.outbox", None, &[10, 11], &[], Some(position));
        let bytes = checkpoint.to_bytes();
        assert!(String::from_utf8(bytes.clone())
            .unwrap()
            .ends_with(r#""position":{"commit_lsn":97500059720,"index":7}}"#));
        assert_eq!(
            Checkpoint::from_bytes(&bytes).unwrap().position,
            Some(position)
        );
    }

    #[test]
    fn unknown_versions_and_garbage_are_refused() {
        let newer = br#"{"version":2,"table":"t","published":[],"dead_lettered":[]}"#;
        assert!(Checkpoint::from_bytes(newer)
            .unwrap_err()
            .contains("newer outboxd"));
        assert!(Checkpoint::from_bytes(b"not json").is_err());
    }
}
