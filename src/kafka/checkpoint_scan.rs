//! Finding the checkpoints of the table's predecessors from before
//! table-keyed checkpoints, by reading the checkpoint topic.
//!
//! Releases from before table-keyed checkpoints (0.1 and the builds up to
//! `0ac26db`) keyed each checkpoint by `relay.name`, used
//! `outboxd-<relay.name>` as their transactional id and wrote no group
//! offset. They can lead the table before this release (an upgrade), and
//! after it: a rollback, or an old pod restarting while a new one is down.
//! So every takeover looks for them, not only the first:
//!
//! - **Tail** (the table's checkpoint group has an offset): read from just
//!   after the table's latest checkpoint to the end. Anything a legacy relay
//!   committed since we last led lies there, and so does anything this table
//!   committed under another identity it had meanwhile (a grant given and
//!   taken away again, `relay.name` changed and changed back): nothing that
//!   matters lies before. It is read first uncommitted, which never waits:
//!   in the usual case it finds no such record and the takeover goes on.
//!   Only when it finds one is the tail read again committed (the legacy
//!   relays fenced first; the caller fences the other identities that
//!   prove to be this table's),
//!   which waits while other relays' open transactions hold the last stable
//!   offset back. On partition 0 (the default topic's only one) its cost is
//!   what the topic took since our last checkpoint, never the topic's
//!   history; other partitions, where only legacy relays wrote, are read
//!   whole (compaction keeps them to about one record per key).
//! - **Whole topic** (no group offset: a first start, the first after
//!   upgrading, or an offset the broker expired after
//!   `offsets.retention.minutes`): read everything, committed, once; the
//!   caller then writes the table's checkpoint so it is not repeated.
//!
//! Invariant: the result holds, for each legacy key that led the table,
//! its latest committed checkpoint written after the start, never an older
//! one. Before the committed read, this relay's own legacy id and every
//! legacy id found are fenced, and the read goes to the high watermark
//! taken after fencing, which none of their checkpoints can be above. (0.1
//! read "to the end", which for a `read_committed` reader is the last
//! stable offset, and so could take a stale checkpoint for the latest.)
//!
//! A legacy relay stops leading for good once the caller writes a hand-over
//! marker under its key (`checkpoint::HandedOver`): it reads the latest
//! record under its own key, does not know the format, and refuses to start.
//! A marker or a tombstone under a key ends what that key said before.
//!
//! The key of this release's `relay.name` stand-in identity is read the same
//! way (it may have no group offset left) but never given a marker. A
//! legacy checkpoint of another database never counts, whatever its key:
//! relays of several databases may share a `relay.name`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::checkpoint::{Checkpoint, Record, CHECKPOINT_PARTITION};
use super::publisher::Publisher;
use crate::config::Config;
use crate::error::{Error, Result};

const METADATA_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a scan starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The whole topic.
    Beginning,
    /// Just after this offset of `CHECKPOINT_PARTITION` (the table's latest
    /// checkpoint); other partitions, which only legacy relays wrote to, from
    /// their beginning.
    After(i64),
}

/// What the table is and where it lives, to tell its checkpoints apart.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The table's checkpoint key (this release's records).
    pub table_key: String,
    /// `schema.table`, as checkpoints name it.
    pub table: String,
    /// `<system identifier>/<database>`, when the relay may read it: legacy
    /// relays under other names count only when their checkpoints name it.
    pub source: Option<String>,
    /// Keys of this release's `relay.name` stand-in identity
    /// (`TableIdentity::alternates`): read like our own legacy key, never
    /// given a hand-over marker.
    pub stand_in_keys: Vec<String>,
}

/// A legacy relay's latest checkpoint for the table.
#[derive(Debug, Clone)]
pub struct LegacyCheckpoint {
    /// Its key: the legacy relay's `relay.name`, or a stand-in key.
    pub key: String,
    /// Written under a stand-in key of this release, not by a legacy relay.
    pub stand_in: bool,
    /// Where it was read; offsets of `CHECKPOINT_PARTITION` compare with the
    /// table's own checkpoints.
    pub partition: i32,
    pub offset: i64,
    pub checkpoint: Checkpoint,
}

/// The checkpoints a scan found that concern this relay's table.
#[derive(Debug, Default)]
pub struct Found {
    /// The latest under the table's own key, with its offset (whole-topic
    /// scans only: a tail starts after it).
    pub table: Option<(i64, Checkpoint)>,
    /// The latest of each legacy relay that led the table since the start.
    pub legacy: Vec<LegacyCheckpoint>,
    /// The latest checkpoint, with row ids, under each other key (with the
    /// key) that names this table's name, or, in whole-topic scans, this
    /// database. One of them may be this very table under an earlier
    /// identity: its old name (a rename), its old system identifier
    /// (`pg_upgrade`, a move to another server, a revoked
    /// `pg_control_system()` grant), another `relay.name` stand-in, or an
    /// identity it had and came back from (a grant given and taken away
    /// again), whose checkpoints then lie in the tail. The caller keeps only
    /// the rows whose seq and event id match, and fences only identities
    /// shown to be this table's (`relay::takeover`): most are other
    /// tables' live relays.
    pub same_database: Vec<(String, Checkpoint)>,
}

/// Fences this relay's legacy transactional id, then reads the tail after
/// `after` uncommitted, which never waits: what the caller decides by
/// whether a committed read ([`read`]) is needed at all. It is when the
/// peek found a legacy relay, or another identity's checkpoint naming rows
/// of this very table. Other identities' checkpoints naming this table's
/// name are most often other databases' live relays (many tables are called
/// `public.outbox`), whose open transactions a committed read would wait for.
pub async fn peek_tail(config: &Config, origin: &Origin, after: i64) -> Result<Found> {
    Publisher::fence_transactional_id(config, &legacy_transactional_id(&config.relay.name)).await?;
    scan(config, origin, Start::After(after), Isolation::Uncommitted).await
}

/// Reads from `start` committed, as the module explains, fencing every
/// legacy relay it finds first. `peeked`: what [`peek_tail`] found for a
/// tail (this relay's legacy id is fenced then); `None` for a whole-topic
/// scan, which fences it here.
pub async fn read(
    config: &Config,
    origin: &Origin,
    start: Start,
    peeked: Option<Found>,
) -> Result<Found> {
    let mut fenced = BTreeSet::from([config.relay.name.clone()]);
    match peeked {
        None => {
            Publisher::fence_transactional_id(config, &legacy_transactional_id(&config.relay.name))
                .await?
        }
        Some(peek) if !peek.legacy.is_empty() => {
            tracing::warn!(
                legacy_relays = ?peek.legacy.iter().map(|l| l.key.as_str()).collect::<Vec<_>>(),
                "a relay from before table-keyed checkpoints (outboxd 0.1 up to 0ac26db) may have \
                 written checkpoints for this table after this release last led it (a rollback, or \
                 an old pod that restarted): fencing it and adopting what it committed"
            );
            // Fenced before the committed read, which would otherwise wait
            // for their open transactions.
            fence_new(config, &peek, &mut fenced).await?;
        }
        Some(_) => {}
    }
    // Read, fence every legacy relay found, and read again until a read
    // finds none that was not fenced before it began: then no checkpoint of
    // theirs can commit above what the read saw.
    loop {
        let found = scan(config, origin, start, Isolation::Committed).await?;
        if !fence_new(config, &found, &mut fenced).await? {
            return Ok(found);
        }
    }
}

/// Fences the legacy relays in `found` not fenced yet; whether there were any.
async fn fence_new(config: &Config, found: &Found, fenced: &mut BTreeSet<String>) -> Result<bool> {
    let mut any = false;
    for legacy in &found.legacy {
        if fenced.insert(legacy.key.clone()) {
            Publisher::fence_transactional_id(config, &legacy_transactional_id(&legacy.key))
                .await?;
            any = true;
        }
    }
    Ok(any)
}

/// The transactional id a legacy relay named `relay_name` used.
fn legacy_transactional_id(relay_name: &str) -> String {
    format!("outboxd-{relay_name}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// Everything written, aborted and open transactions included: never
    /// waits, only tells whether a committed read is needed.
    Uncommitted,
    /// Committed records only; waits for the last stable offset.
    Committed,
}

async fn scan(
    config: &Config,
    origin: &Origin,
    start: Start,
    isolation: Isolation,
) -> Result<Found> {
    let config = config.clone();
    let origin = origin.clone();
    tokio::task::spawn_blocking(move || scan_blocking(&config, &origin, start, isolation))
        .await
        .map_err(|e| Error::stop(format!("checkpoint scan task failed: {e}")))?
}

fn scan_blocking(
    config: &Config,
    origin: &Origin,
    start: Start,
    isolation: Isolation,
) -> Result<Found> {
    let topic = &config.kafka.checkpoint_topic;
    let consumer: BaseConsumer<super::RelayContext> = super::base_client_config(config)
        .set(
            "group.id",
            format!("outboxd-{}-checkpoint-reader", config.relay.name),
        )
        .set("enable.auto.commit", "false")
        .set(
            "isolation.level",
            match isolation {
                Isolation::Uncommitted => "read_uncommitted",
                Isolation::Committed => "read_committed",
            },
        )
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
        let from = match start {
            Start::After(offset) if partition == CHECKPOINT_PARTITION => Offset::Offset(offset + 1),
            _ => Offset::Beginning,
        };
        if let (Start::After(offset), true) = (start, partition == CHECKPOINT_PARTITION) {
            if offset + 1 >= high {
                // Nothing after the table's checkpoint: nothing to read here.
                continue;
            }
        }
        bounds.insert(partition, high);
        assignment
            .add_partition_offset(topic, partition, from)
            .map_err(|e| Error::stop(format!("assigning checkpoint partition {partition}: {e}")))?;
    }
    if bounds.is_empty() {
        return Ok(Found::default());
    }
    consumer
        .assign(&assignment)
        .map_err(|e| Error::retry(format!("assigning checkpoint topic `{topic}`: {e}")))?;

    // Another relay's open transaction holds the last stable offset back,
    // but never longer than its transaction timeout (and the broker's abort
    // sweep): wait for it rather than stop early.
    let deadline = Instant::now() + config.kafka.transaction_timeout + Duration::from_secs(30);
    let mut books = Books::new(config, origin);
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
        books.read(&message, start, isolation)?;
    }
    Ok(books.found())
}

/// What the scan has seen so far, key by key.
struct Books<'a> {
    origin: &'a Origin,
    relay_name: &'a str,
    topic: &'a str,
    table: Option<(i64, Checkpoint)>,
    legacy: BTreeMap<String, LegacyCheckpoint>,
    same_database: BTreeMap<String, Checkpoint>,
}

impl<'a> Books<'a> {
    fn new(config: &'a Config, origin: &'a Origin) -> Books<'a> {
        Books {
            origin,
            relay_name: &config.relay.name,
            topic: &config.kafka.checkpoint_topic,
            table: None,
            legacy: BTreeMap::new(),
            same_database: BTreeMap::new(),
        }
    }

    fn read(
        &mut self,
        message: &rdkafka::message::BorrowedMessage<'_>,
        start: Start,
        isolation: Isolation,
    ) -> Result<()> {
        let Some(key) = message.key() else {
            return Ok(());
        };
        let key = String::from_utf8_lossy(key).into_owned();
        let record = message.payload().map(Record::from_bytes);
        if key == self.origin.table_key {
            // A tail starts after the table's latest committed checkpoint:
            // what follows under its key was aborted, or is still open in
            // the transaction of an earlier leader fenced before this read.
            if start == Start::Beginning && isolation == Isolation::Committed {
                self.table = match record {
                    None => None,
                    Some(Ok(Record::Checkpoint(checkpoint))) => {
                        Some((message.offset(), checkpoint))
                    }
                    Some(Ok(Record::HandedOver(_))) => self.table.take(),
                    Some(Err(e)) => return Err(self.unreadable(message.offset(), &e)),
                };
            }
            return Ok(());
        }
        let stand_in = self.origin.stand_in_keys.contains(&key);
        let own = stand_in || key == self.relay_name;
        match record {
            // A tombstone or our hand-over marker: what the key said before
            // was adopted (or deleted on purpose). Not in an uncommitted
            // read: the marker may belong to an aborted hand-over, and the
            // peek must err towards the committed read.
            None | Some(Ok(Record::HandedOver(_))) => {
                if isolation == Isolation::Committed {
                    self.legacy.remove(&key);
                    self.same_database.remove(&key);
                }
            }
            Some(Ok(Record::Checkpoint(checkpoint)))
                if self.concerns_the_table(own, &checkpoint) =>
            {
                self.legacy.insert(
                    key.clone(),
                    LegacyCheckpoint {
                        key,
                        stand_in,
                        partition: message.partition(),
                        offset: message.offset(),
                        checkpoint,
                    },
                );
            }
            // With or without row ids: one without (a first transaction's
            // hand-over) cannot be reconciled, but its identity may still
            // need fencing (`relay::takeover`).
            Some(Ok(Record::Checkpoint(checkpoint)))
                if (checkpoint.table == self.origin.table
                    || (start == Start::Beginning
                        && checkpoint.source.is_some()
                        && checkpoint.source == self.origin.source)) =>
            {
                self.same_database.insert(key, checkpoint);
            }
            Some(Ok(Record::Checkpoint(_))) => {}
            // Under our own key an unreadable record is ours to understand;
            // another relay's is that relay's business.
            Some(Err(e)) if own => return Err(self.unreadable(message.offset(), &e)),
            Some(Err(_)) => {}
        }
        Ok(())
    }

    /// A legacy checkpoint counts when it names the table in the same
    /// database. Under our own key, one that names no database (0.1, or a
    /// role without the grant) counts too: one `relay.name` per table was
    /// that release's rule. A same-named relay of another database never
    /// counts, whatever its key.
    fn concerns_the_table(&self, own: bool, checkpoint: &Checkpoint) -> bool {
        if checkpoint.table != self.origin.table {
            return false;
        }
        match (&checkpoint.source, &self.origin.source) {
            (Some(theirs), Some(ours)) => theirs == ours,
            (Some(_), None) => false,
            (None, _) => own,
        }
    }

    fn unreadable(&self, offset: i64, why: &str) -> Error {
        Error::stop(format!(
            "the checkpoint at `{}` offset {offset} is unreadable ({why}); refusing to guess \
             which rows were published",
            self.topic
        ))
    }

    fn found(self) -> Found {
        Found {
            table: self.table,
            legacy: self.legacy.into_values().collect(),
            same_database: self.same_database.into_iter().collect(),
        }
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
