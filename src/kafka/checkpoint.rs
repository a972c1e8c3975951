//! The checkpoint record: which rows a Kafka transaction published, and how
//! start-up finds the latest one.
//!
//! ```text
//!   Kafka transaction ─┬─ event records (one per row)
//!                      ├─ checkpoint record ─▶ checkpoint topic, partition 0
//!                      │    key   = the table's identity (kafka::identity)
//!                      │    value = {published seqs, dead-lettered seqs,
//!                      │             source position (replication only)}
//!                      └─ committed offset of the table's checkpoint group
//!                           = the checkpoint record's own offset
//! ```
//!
//! Why it exists: marking a row sent in Postgres and committing to Kafka can
//! never be one atomic step. The checkpoint travels inside the same Kafka
//! transaction as the events, so "these rows are in Kafka" is true exactly
//! when the checkpoint is committed.
//!
//! Invariant (the window). Rows are marked sent only after their Kafka
//! transaction committed, but marking runs behind publishing: while batch
//! k's marks run, batch k+1 is already in its Kafka transaction. So more
//! than one batch can be in Kafka and not marked. Each checkpoint therefore
//! names the rows of its own batch *and* of every earlier batch whose marks
//! have not committed yet (`relay::window`, at most
//! `relay.unacknowledged_batches` batches in all; a batch waits while the
//! window is full). Which rows can be in Kafka but unmarked at an instant?
//! Only rows of batches committed since the last batch whose marks
//! committed, and transactions commit one after another, so all of them
//! were committed when the latest committed checkpoint was built, and each
//! was either marked by then (so it left the window) or is named by it. A
//! crash at any point therefore leaves them repairable: start-up reads the
//! latest checkpoint and marks every row it names (marking is idempotent,
//! so rows marked twice cost nothing), and such rows are never produced
//! again: polling claims only unmarked rows, and replication skips every
//! event up to the checkpoint's position, the last event of the latest
//! batch, which is at or after every event of the window.
//!
//! Finding the latest, exactly. Every relay of every order database writes
//! its checkpoints into one shared topic, so reading that topic to its end
//! would be wrong twice: a `read_committed` reader's end is the last stable
//! offset, which any other relay's open transaction (one killed mid-batch
//! stays open until its timeout) holds back below our own latest
//! checkpoint; and its cost would grow with everyone's traffic. So each
//! transaction also commits, through `send_offsets_to_transaction`, the
//! offset of its own checkpoint record for the table's consumer group. The
//! group offset and the record commit or abort together, so the group's
//! committed offset always points at the latest committed checkpoint.
//! Start-up, after `init_transactions` has fenced every earlier leader of
//! the table (they share its `transactional.id`):
//!
//! 1. fetches the group's committed offset with `require_stable`, which
//!    waits only for a pending commit of this group, that is, of this table;
//! 2. reads the one record at that offset. It reads uncommitted, because
//!    the record is known committed (its offset commit is) and another
//!    relay's open transaction must not hide it; the record must be exactly
//!    at that offset with the table's key, or start-up stops rather than guess.
//!
//! Both steps cost the same whatever other relays write. A table whose group
//! has no offset (a first start, the first after upgrading from outboxd 0.1,
//! or an offset the broker expired after `offsets.retention.minutes` without
//! a transaction) is found by `kafka::checkpoint_scan`, once.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::identity::TableIdentity;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::event::SourcePosition;

/// The partition every checkpoint is written to and read from, whatever
/// the topic's partition count: the read never depends on how a key hashes.
pub const CHECKPOINT_PARTITION: i32 = 0;

/// How long one read of the latest checkpoint may take before the session
/// is retried.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The checkpoint format (the compatibility contract, also in the README).
///
/// Every record on the checkpoint topic is a JSON object whose `version`
/// says what it is, and every outboxd refuses a record under a key it
/// reads whose `version` it does not know, rather than guess:
///
/// - `1`: a checkpoint (`Checkpoint`). Fields are only ever added to it as
///   optional ones, which older readers ignore, so every version of outboxd
///   reads every version-1 checkpoint the same way.
/// - `2`: a hand-over marker (`HandedOver`), written under the key of a
///   relay from before table-keyed checkpoints (its `relay.name`). Those
///   releases read only version 1, so they stop there instead of leading a
///   table a newer outboxd has led (see `kafka::checkpoint_scan`).
/// - `3`: a checkpoint of a relay that does not mark rows
///   (`relay.after_publish: none`): version 1's fields and `unmarked_from`.
///   A release that marks would take its unmarked rows for unsent and
///   publish them again; releases that know only 1 and 2 refuse it instead.
///
/// A change a version-1 reader would misread takes the next number.
const FORMAT_VERSION: u32 = 1;
/// The format number of a checkpoint whose rows are not marked.
const UNMARKED_VERSION: u32 = 3;
/// The hand-over marker's format number.
const HANDED_OVER_VERSION: u32 = 2;

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
    /// Rows published to their routed topics: by this transaction and by
    /// every earlier one whose rows were not yet marked sent.
    pub published: SeqRanges,
    /// Poison rows published to the dead-letter topic, likewise.
    pub dead_lettered: SeqRanges,
    /// Replication capture: the stream position of the batch's last event.
    /// A restarted stream skips every event at or before it. Absent from
    /// polling checkpoints (and from those of relays before 0.2, which read
    /// the same format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<SourcePosition>,
    /// Which rows the seqs named, for reconciliation after a failover: a
    /// promoted standby that lacked the last commits hands their seqs out
    /// again, to other rows. One `RowDigest` (12 hex digits) per seq, in the
    /// order of `published` then `dead_lettered`. Absent in checkpoints of
    /// earlier releases, whose rows are then matched by seq alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<String>,
    /// The server timeline `position` was read on (WAL-message outboxes):
    /// after a promotion or a restore, positions past the fork belong to
    /// other transactions (`capture::message_timeline`). Absent from table
    /// checkpoints and earlier releases' (taken as the current timeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// The system identifier of the cluster `position` was read on
    /// (WAL-message outboxes; `IDENTIFY_SYSTEM`, which needs no grant):
    /// positions of another cluster name other transactions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<String>,
    /// Set once the table's relay published rows without marking them
    /// (`relay.after_publish: none`), and kept in every later checkpoint:
    /// every row it published that commits at or after this WAL position
    /// may be unmarked, every one before it is marked. Only the stream and
    /// the checkpoint's `position` tell those rows apart from unsent ones
    /// (`relay::replication::unmarked`). Written with format 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmarked_from: Option<crate::postgres::lsn::Lsn>,
    /// Replication with marks: the publication's catalog entries for the
    /// table when the session that wrote it began
    /// (`capture::slot::publication_fingerprint`). A start that finds them
    /// changed drains the table first: rows committed while the table was
    /// out of the publication never reached the stream, and the relay
    /// confirmed the slot past them. Absent from polling checkpoints and
    /// earlier releases'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publication: Option<String>,
}

/// A row's identity in a checkpoint: 48 bits of FNV-1a over its event id.
/// Not a secret, only a tell: a row inserted with a reused seq has a new
/// random id, and matches an old digest once in 2^48.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowDigest(u64);

impl RowDigest {
    const HEX_DIGITS: usize = 12;

    pub fn of(event_id: &str) -> RowDigest {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in event_id.as_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        RowDigest(hash >> 16)
    }

    fn parse_all(text: &str) -> Option<Vec<RowDigest>> {
        if text.len() % Self::HEX_DIGITS != 0 || !text.is_ascii() {
            return None;
        }
        (0..text.len() / Self::HEX_DIGITS)
            .map(|i| {
                let digits = &text[i * Self::HEX_DIGITS..(i + 1) * Self::HEX_DIGITS];
                u64::from_str_radix(digits, 16).ok().map(RowDigest)
            })
            .collect()
    }
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
            ids: None,
            timeline: None,
            system_identifier: None,
            unmarked_from: None,
            publication: None,
        }
    }

    /// Records that rows published from `from` on are not marked (format 3).
    pub fn unmarked_from(mut self, from: Option<crate::postgres::lsn::Lsn>) -> Checkpoint {
        self.unmarked_from = from;
        if from.is_some() {
            self.version = UNMARKED_VERSION;
        }
        self
    }

    /// Records the publication's catalog entries for the table as the
    /// writing session found them (replication with marks).
    pub fn with_publication(mut self, publication: Option<&str>) -> Checkpoint {
        self.publication = publication.map(str::to_string);
        self
    }

    /// Records the cluster and timeline the position was read on.
    pub fn read_on(
        mut self,
        wal: Option<&crate::capture::message_timeline::WalHistory>,
    ) -> Checkpoint {
        self.timeline = wal.map(|wal| wal.timeline);
        self.system_identifier = wal.map(|wal| wal.system_identifier.clone());
        self
    }

    /// Records which row each named seq was, from `row_id`. If any named
    /// seq has none, the checkpoint names rows by seq alone.
    pub fn with_row_ids(mut self, row_id: impl Fn(i64) -> Option<RowDigest>) -> Checkpoint {
        use std::fmt::Write;
        let mut text = String::with_capacity(RowDigest::HEX_DIGITS * self.published.len());
        for seq in self
            .published
            .to_seqs()
            .into_iter()
            .chain(self.dead_lettered.to_seqs())
        {
            match row_id(seq) {
                Some(RowDigest(digest)) => {
                    let _ = write!(text, "{digest:012x}");
                }
                None => return self,
            }
        }
        self.ids = Some(text);
        self
    }

    /// Seq → the digest of the row it named, when the checkpoint says.
    pub fn row_ids(&self) -> Option<std::collections::HashMap<i64, RowDigest>> {
        let digests = RowDigest::parse_all(self.ids.as_deref()?)?;
        let seqs: Vec<i64> = self
            .published
            .to_seqs()
            .into_iter()
            .chain(self.dead_lettered.to_seqs())
            .collect();
        (digests.len() == seqs.len()).then(|| seqs.into_iter().zip(digests).collect())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain integers and strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint, String> {
        match Record::from_bytes(bytes)? {
            Record::Checkpoint(checkpoint) => Ok(checkpoint),
            Record::HandedOver(marker) => Err(format!(
                "found a hand-over marker (format {HANDED_OVER_VERSION}) written by {} where a \
                 checkpoint was expected",
                marker.written_by
            )),
        }
    }
}

/// Written by every takeover under this relay's `relay.name` and under the
/// key of every pre-table-key relay whose checkpoints it adopted: the table
/// is led by this outboxd now. Releases from before
/// table-keyed checkpoints read the latest record under their own key, find
/// this format they do not know, and refuse to start ("a newer outboxd wrote
/// it") instead of leading beside or after us.
///
/// It also carries a version-1 checkpoint's required fields, empty: those
/// releases parse the whole record before they look at `version`, and only
/// with them present do they reach the check that says "a newer outboxd
/// wrote it" (without, they stop all the same, on a missing field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedOver {
    pub version: u32,
    /// The checkpoint key the table's checkpoints are now written under.
    pub handed_over_to: String,
    /// `outboxd <version>`, for the operator who reads the topic.
    pub written_by: String,
    /// The table, as in a checkpoint.
    pub table: String,
    /// Always empty: the marker publishes nothing.
    pub published: SeqRanges,
    /// Always empty.
    pub dead_lettered: SeqRanges,
}

impl HandedOver {
    pub fn new(handed_over_to: &str, table: &str) -> HandedOver {
        HandedOver {
            version: HANDED_OVER_VERSION,
            handed_over_to: handed_over_to.to_string(),
            written_by: format!("outboxd {}", env!("CARGO_PKG_VERSION")),
            table: table.to_string(),
            published: SeqRanges::default(),
            dead_lettered: SeqRanges::default(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One record of the checkpoint topic, by its format number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Checkpoint(Checkpoint),
    HandedOver(HandedOver),
}

impl Record {
    pub fn from_bytes(bytes: &[u8]) -> Result<Record, String> {
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let versioned: Versioned = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        match versioned.version {
            FORMAT_VERSION | UNMARKED_VERSION => serde_json::from_slice(bytes)
                .map(Record::Checkpoint)
                .map_err(|e| e.to_string()),
            HANDED_OVER_VERSION => serde_json::from_slice(bytes)
                .map(Record::HandedOver)
                .map_err(|e| e.to_string()),
            other => Err(format!(
                "checkpoint format {other} is not one this outboxd ({}) knows \
                 ({FORMAT_VERSION}, {HANDED_OVER_VERSION} and {UNMARKED_VERSION}); a newer outboxd \
                 wrote it. Run that \
                 version or a newer one",
                env!("CARGO_PKG_VERSION")
            )),
        }
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

    /// Every seq, for `= ANY($1)`. A checkpoint covers the batches of the
    /// window, so this is at most `relay.unacknowledged_batches` ×
    /// `capture.batch_size` values.
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

/// A checkpoint and where it was read: its offset in `CHECKPOINT_PARTITION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub offset: i64,
    pub checkpoint: Checkpoint,
}

/// Reads the table's latest committed checkpoint: `Ok(None)` when the
/// table's checkpoint group has no committed offset (no checkpoint written
/// by this version yet). Call it after `init_transactions` with the table's
/// `transactional.id`, so no transaction of an earlier leader is pending.
pub async fn read_latest(config: &Config, identity: &TableIdentity) -> Result<Option<Located>> {
    let config = config.clone();
    let identity = identity.clone();
    tokio::task::spawn_blocking(move || read_latest_blocking(&config, &identity))
        .await
        .map_err(|e| Error::stop(format!("checkpoint reader task failed: {e}")))?
}

/// Whether `identity`'s checkpoint group has a committed offset, asked
/// without waiting for an open transaction of that identity: to learn
/// whether it is worth fencing at all.
pub async fn has_checkpoint(config: &Config, identity: &TableIdentity) -> Result<bool> {
    let config = config.clone();
    let identity = identity.clone();
    tokio::task::spawn_blocking(move || {
        committed_checkpoint_offset(&config, &identity, "read_uncommitted").map(|o| o.is_some())
    })
    .await
    .map_err(|e| Error::stop(format!("checkpoint reader task failed: {e}")))?
}

fn read_latest_blocking(config: &Config, identity: &TableIdentity) -> Result<Option<Located>> {
    let topic = &config.kafka.checkpoint_topic;
    let Some(offset) = committed_checkpoint_offset(config, identity, "read_committed")? else {
        return Ok(None);
    };
    let reader: BaseConsumer<super::RelayContext> = super::base_client_config(config)
        .set("group.id", &identity.checkpoint_group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        // A checkpoint deleted by retention must stop the relay, not be
        // skipped silently.
        .set("auto.offset.reset", "error")
        .create_with_context(super::RelayContext)
        .map_err(|e| Error::stop(format!("cannot create the checkpoint reader: {e}")))?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, CHECKPOINT_PARTITION, Offset::Offset(offset))
        .map_err(|e| Error::stop(format!("assigning the checkpoint partition: {e}")))?;
    reader
        .assign(&assignment)
        .map_err(|e| Error::retry(format!("assigning checkpoint topic `{topic}`: {e}")))?;
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        if Instant::now() > deadline {
            return Err(Error::retry(format!(
                "timed out reading the checkpoint at `{topic}` partition {CHECKPOINT_PARTITION} \
                 offset {offset}; is the partition's leader reachable?"
            )));
        }
        let message = match reader.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => continue,
            Some(Err(e)) => {
                return Err(Error::retry(format!(
                    "reading the checkpoint at `{topic}` offset {offset}: {e}; if the offset is \
                     out of range, the topic lost it: the checkpoint topic must be compacted \
                     (cleanup.policy=compact), never deleted by time or size"
                )))
            }
            Some(Ok(message)) => message,
        };
        if message.offset() != offset || message.key() != Some(identity.checkpoint_key.as_bytes()) {
            return Err(Error::stop(format!(
                "the checkpoint group `{}` points at `{topic}` offset {offset}, but the record \
                 there is not this table's checkpoint (found offset {} with another key); \
                 refusing to guess which rows were published. Was the checkpoint topic \
                 deleted and re-created? Then delete the consumer group `{}` too",
                identity.checkpoint_group,
                message.offset(),
                identity.checkpoint_group,
            )));
        }
        let bytes = message.payload().unwrap_or_default();
        return Checkpoint::from_bytes(bytes)
            .map(|checkpoint| Some(Located { offset, checkpoint }))
            .map_err(|e| {
                Error::stop(format!(
                    "the checkpoint at `{topic}` offset {offset} is unreadable ({e}); \
                 refusing to guess which rows were published"
                ))
            });
    }
}

/// The offset of the table's latest committed checkpoint record, from its
/// checkpoint group. `read_committed` makes librdkafka ask with
/// `require_stable`, so an offset commit still pending in an unfinished
/// transaction of this table is waited for, never read around;
/// `read_uncommitted` answers at once.
fn committed_checkpoint_offset(
    config: &Config,
    identity: &TableIdentity,
    isolation: &str,
) -> Result<Option<i64>> {
    let topic = config.kafka.checkpoint_topic.clone();
    let committed = committed_offsets_on(config, identity, &[topic], isolation)?;
    Ok(committed.into_iter().next().map(|(_, offset)| offset))
}

/// The offsets `identity`'s checkpoint group committed on the checkpoint
/// partition of each of `topics` that has one.
fn committed_offsets_on(
    config: &Config,
    identity: &TableIdentity,
    topics: &[String],
    isolation: &str,
) -> Result<Vec<(String, i64)>> {
    let consumer: BaseConsumer<super::RelayContext> = super::base_client_config(config)
        .set("group.id", &identity.checkpoint_group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create_with_context(super::RelayContext)
        .map_err(|e| Error::stop(format!("cannot create the checkpoint reader: {e}")))?;
    let mut partitions = TopicPartitionList::new();
    for topic in topics {
        partitions.add_partition(topic, CHECKPOINT_PARTITION);
    }
    let group = &identity.checkpoint_group;
    let deadline = Instant::now() + READ_TIMEOUT;
    let committed = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match consumer.committed_offsets(partitions.clone(), remaining) {
            Ok(committed) => break committed,
            // The group's coordinator is moving or still loading (a broker
            // restarted, or a new broker is creating `__consumer_offsets`):
            // the answer is a moment away, not a reason to end the session.
            Err(e) if coordinator_in_flux(&e) && Instant::now() < deadline => {
                tracing::debug!(error = %e, group, "checkpoint group's coordinator not ready; asking again");
                std::thread::sleep(COORDINATOR_RETRY);
            }
            Err(e) => {
                return Err(match e.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::GroupAuthorizationFailed) => Error::stop(format!(
                        "fetching the committed offset of checkpoint group `{group}`: {e}. Grant the \
                         relay's Kafka principal READ and DESCRIBE on consumer groups prefixed `outboxd-`"
                    )),
                    _ => Error::retry(format!(
                        "fetching the committed offset of checkpoint group `{group}`: {e}"
                    )),
                })
            }
        }
    };
    Ok(topics
        .iter()
        .filter_map(|topic| {
            match committed
                .find_partition(topic, CHECKPOINT_PARTITION)
                .map(|partition| partition.offset())
            {
                Some(Offset::Offset(offset)) => Some((topic.clone(), offset)),
                _ => None,
            }
        })
        .collect())
}

/// The table's latest checkpoint on every topic other than
/// `kafka.checkpoint_topic` where its checkpoint group committed an offset:
/// the topics `kafka.checkpoint_topic` named before it was changed. A
/// change of the setting (with or without `kafka.previous_checkpoint_topic`,
/// and changed back again) leaves the group's offset on each earlier
/// topic, pointing at the last checkpoint written there.
///
/// Why every session asks: the rows such a checkpoint names were published,
/// and may not be marked (the relay was killed before marking, then its
/// topic was changed). Marking them again is idempotent, so the takeover
/// reconciles each; without this, a changed topic looked like a first start
/// and they were published again.
pub async fn read_latest_elsewhere(
    config: &Config,
    identity: &TableIdentity,
) -> Result<Vec<(String, Located)>> {
    let config = config.clone();
    let identity = identity.clone();
    tokio::task::spawn_blocking(move || read_latest_elsewhere_blocking(&config, &identity))
        .await
        .map_err(|e| Error::stop(format!("checkpoint reader task failed: {e}")))?
}

fn read_latest_elsewhere_blocking(
    config: &Config,
    identity: &TableIdentity,
) -> Result<Vec<(String, Located)>> {
    let lister: BaseConsumer<super::RelayContext> = super::base_client_config(config)
        .create_with_context(super::RelayContext)
        .map_err(|e| Error::stop(format!("cannot create the checkpoint reader: {e}")))?;
    // Only the topics the relay's principal may describe are listed; it
    // wrote its earlier checkpoint topics, so it may describe them.
    let metadata = lister.fetch_metadata(None, READ_TIMEOUT).map_err(|e| {
        Error::retry(format!(
            "listing topics to find earlier checkpoint topics: {e}"
        ))
    })?;
    let others: Vec<String> = metadata
        .topics()
        .iter()
        .map(|topic| topic.name().to_string())
        .filter(|name| *name != config.kafka.checkpoint_topic && !name.starts_with("__"))
        .collect();
    if others.is_empty() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for (topic, offset) in committed_offsets_on(config, identity, &others, "read_committed")? {
        let mut on_topic = config.clone();
        on_topic.kafka.checkpoint_topic = topic.clone();
        match read_latest_blocking(&on_topic, identity) {
            Ok(Some(located)) => found.push((topic, located)),
            Ok(None) => {}
            // A topic re-created since holds no checkpoint of this table
            // at that offset: nothing there was published by it.
            Err(error) if error.kind == crate::error::ErrorKind::Stop => {
                tracing::warn!(
                    topic,
                    offset,
                    error = %error.message,
                    "this table's checkpoint group has an offset on a topic that no longer holds \
                     its checkpoint there (deleted and re-created?); ignoring that topic"
                );
            }
            Err(error) => return Err(error),
        }
    }
    Ok(found)
}

/// Pause before asking a coordinator that was not ready again.
const COORDINATOR_RETRY: Duration = Duration::from_millis(100);

/// Errors that mean the group coordinator is not ready yet, not that the
/// request can never succeed.
fn coordinator_in_flux(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::CoordinatorLoadInProgress
        )
    )
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
            commit_lsn: crate::postgres::lsn::Lsn(0x16_B374_D848),
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
        let newer = br#"{"version":4,"table":"t","published":[],"dead_lettered":[]}"#;
        assert!(Checkpoint::from_bytes(newer)
            .unwrap_err()
            .contains("newer outboxd"));
        assert!(Checkpoint::from_bytes(b"not json").is_err());
    }

    #[test]
    fn an_unmarked_checkpoint_takes_format_3_and_reads_back() {
        let marked = Checkpoint::new("public.outbox", None, &[1, 2], &[], None);
        assert_eq!(marked.clone().unmarked_from(None).version, 1);
        let unmarked = marked.unmarked_from(Some(crate::postgres::lsn::Lsn(0x016B_3748)));
        assert_eq!(unmarked.version, 3);
        let read = Checkpoint::from_bytes(&unmarked.to_bytes()).unwrap();
        assert_eq!(read, unmarked);
        // A release that reads only version 1 refuses it rather than
        // mark-and-republish what it names.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let versioned: Versioned = serde_json::from_slice(&unmarked.to_bytes()).unwrap();
        assert_ne!(versioned.version, 1);
    }

    /// What a release from before table-keyed checkpoints does with the
    /// marker: it reads `version` and refuses anything but 1 (the same check
    /// as its `Checkpoint::from_bytes`), so it stops instead of leading.
    #[test]
    fn a_hand_over_marker_is_refused_by_a_version_1_only_reader() {
        let marker = HandedOver::new("77/orders/public.outbox", "public.outbox");
        let bytes = marker.to_bytes();
        // What releases up to 0ac26db do: parse a version-1 checkpoint
        // whole (these fields are required), then refuse another version.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct VersionOne {
            version: u32,
            table: String,
            published: SeqRanges,
            dead_lettered: SeqRanges,
        }
        let as_read: VersionOne = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            as_read.version, 2,
            "refused as a newer format, not as garbage"
        );
        assert_eq!(
            Record::from_bytes(&bytes).unwrap(),
            Record::HandedOver(marker)
        );
        assert!(Checkpoint::from_bytes(&bytes)
            .unwrap_err()
            .contains("hand-over marker"));
    }

    #[test]
    fn a_checkpoint_names_each_row_by_its_id_as_well() {
        let ids: std::collections::HashMap<i64, RowDigest> = [
            (1, RowDigest::of("0b7e6f0a-3c1d-4f57-9a51-6d2f1e0c9b11")),
            (2, RowDigest::of("5f0c1a2b-8d3e-4c6f-a7b8-9c0d1e2f3a4b")),
            (9, RowDigest::of("dead-lettered")),
        ]
        .into();
        let checkpoint =
            Checkpoint::new("t", None, &[2, 1], &[9], None).with_row_ids(|s| ids.get(&s).copied());
        assert_eq!(checkpoint.ids.as_ref().map(String::len), Some(36));
        let read = Checkpoint::from_bytes(&checkpoint.to_bytes()).unwrap();
        assert_eq!(read.row_ids(), Some(ids.clone()));
        assert_ne!(
            RowDigest::of("0b7e6f0a-3c1d-4f57-9a51-6d2f1e0c9b11"),
            RowDigest::of("0b7e6f0a-3c1d-4f57-9a51-6d2f1e0c9b12")
        );
        // A seq without a known id: the checkpoint names rows by seq alone.
        let partial =
            Checkpoint::new("t", None, &[1, 3], &[], None).with_row_ids(|s| ids.get(&s).copied());
        assert_eq!(partial.ids, None);
        assert_eq!(partial.row_ids(), None);
        // An earlier release's checkpoint (no ids) still reads.
        let old = br#"{"version":1,"table":"t","published":[[1,2]],"dead_lettered":[]}"#;
        assert_eq!(Checkpoint::from_bytes(old).unwrap().row_ids(), None);
    }
}
