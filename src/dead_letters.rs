//! `outboxd dead-letters`: the rows of this table the relay dead-lettered,
//! and putting them back once the cause is fixed.
//!
//! Invariant: replay never writes to Kafka. It inserts the original row
//! again (the table keeps a dead-lettered row, marked sent) as a new unsent
//! row with the same event id, so the relay publishes it exactly once
//! through its normal path; a row that was replayed before is not replayed
//! again, in every `relay.after_publish` mode (the [`replay_record`] says
//! so, not the copy, which delete mode removes), and only rows this table
//! dead-lettered can be replayed.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::{ConnectOptions, Connection};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kafka::RelayContext;
use crate::replay_record;
use crate::routing::header;
use crate::setup::Setup;
use crate::table::OutboxTable;

/// How long reading the dead-letter topic may take.
const READ_LIMIT: Duration = Duration::from_secs(30);

/// One dead-lettered row of this table.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub seq: i64,
    pub id: String,
    pub event_type: String,
    pub aggregate_type: String,
    /// The record's key, which is the aggregate id with the default `routing.key`.
    pub key: Option<String>,
    pub reason: String,
    /// Seconds since the dead-letter record was written.
    pub age_seconds: u64,
}

/// What `list` found.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub topic: String,
    pub dead_letters: Vec<DeadLetter>,
    /// Records of other tables sharing the topic, or of rows no longer in
    /// this table (retention, `after_publish: delete`).
    pub left_out: usize,
}

/// Which dead letters to replay.
#[derive(Debug, Clone, Copy)]
pub enum Selection {
    One(i64),
    Range { from: i64, to: i64 },
    All,
}

impl Selection {
    fn contains(self, seq: i64) -> bool {
        match self {
            Selection::One(one) => seq == one,
            Selection::Range { from, to } => (from..=to).contains(&seq),
            Selection::All => true,
        }
    }
}

/// What `replay` did with each selected dead letter.
#[derive(Debug, Serialize)]
pub struct Replayed {
    pub seq: i64,
    pub id: String,
    /// The seq of the new row, or `None` when the row was replayed before.
    pub new_seq: Option<i64>,
}

/// The dead letters of this table, oldest first.
pub async fn list(setup: &Setup) -> Result<Listing> {
    let config = &setup.config;
    let table = &setup.table;
    let topic = config.routing.dead_letter_topic.clone();
    let records = {
        let config = config.clone();
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || read_topic(&config, &topic))
            .await
            .map_err(|e| Error::stop(format!("dead-letter reader failed: {e}")))??
    };
    let mut connection = setup
        .connect_options
        .connect()
        .await
        .map_err(|e| Error::from_postgres("connecting to Postgres", e))?;
    let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
    let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
    let ours: HashSet<i64> = sqlx::query_scalar(&table.rows_with_ids_sql())
        .bind(&seqs)
        .bind(&ids)
        .fetch_all(&mut connection)
        .await
        .map_err(|e| Error::from_postgres("finding the dead-lettered rows in the table", e))?
        .into_iter()
        .collect();
    let total = records.len();
    let mut seen = HashSet::new();
    let dead_letters: Vec<DeadLetter> = records
        .into_iter()
        .filter(|record| ours.contains(&record.seq) && seen.insert(record.seq))
        .collect();
    Ok(Listing {
        topic,
        left_out: total - dead_letters.len(),
        dead_letters,
    })
}

/// Inserts the selected dead-lettered rows again, as new unsent rows.
pub async fn replay(setup: &Setup, selection: Selection) -> Result<Vec<Replayed>> {
    let table = &setup.table;
    let mut connection = setup
        .connect_options
        .connect()
        .await
        .map_err(|e| Error::from_postgres("connecting to Postgres", e))?;
    // Without the record, a row whose copy was published and deleted
    // would be inserted again: refuse before touching anything.
    let record = replay_record::inspect(&mut connection, table).await?;
    if let Some(refusal) = replay_record::refusal(&record, table) {
        return Err(Error::stop(refusal));
    }
    let listing = list(setup).await?;
    let copy_sql = table.replay_sql();
    let recorded_sql = replay_record::exists_sql(table);
    let record_sql = replay_record::insert_sql(table);
    let mut replayed = Vec::new();
    for dead_letter in listing
        .dead_letters
        .into_iter()
        .filter(|d| selection.contains(d.seq))
    {
        let doing = format!("re-inserting row seq {}", dead_letter.seq);
        let mut transaction = connection
            .begin()
            .await
            .map_err(|e| Error::from_postgres(&doing, e))?;
        // Two replays of one row at once would both find no earlier copy
        // and both insert it: the lock makes the second wait, then see the
        // first's row and insert nothing.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(replay_lock_key(table))
            .execute(&mut *transaction)
            .await
            .map_err(|e| Error::from_postgres(&doing, e))?;
        let recorded: bool = sqlx::query_scalar(&recorded_sql)
            .bind(&dead_letter.id)
            .bind(dead_letter.seq)
            .fetch_one(&mut *transaction)
            .await
            .map_err(|e| Error::from_postgres(&doing, e))?;
        // The copy's own check (a later row with the same id) still finds
        // the copies that releases before the record made, while they last.
        let new_seq: Option<i64> = if recorded {
            None
        } else {
            sqlx::query_scalar(&copy_sql)
                .bind(dead_letter.seq)
                .fetch_optional(&mut *transaction)
                .await
                .map_err(|e| Error::from_postgres(&doing, e))?
        };
        // Recorded in the copy's transaction: neither commits without the
        // other. A copy found from an older release is recorded too, so it
        // stays replayed once that copy is deleted.
        let newly_recorded = !recorded
            && sqlx::query_scalar::<_, bool>(&record_sql)
                .bind(&dead_letter.id)
                .bind(dead_letter.seq)
                .bind(new_seq)
                .fetch_optional(&mut *transaction)
                .await
                .map_err(|e| Error::from_postgres(&doing, e))?
                .is_some();
        if newly_recorded {
            transaction
                .commit()
                .await
                .map_err(|e| Error::from_postgres(&doing, e))?;
        } else {
            // Recorded meanwhile by a replay that skipped the lock: its
            // copy is the one, so this one must not commit.
            transaction
                .rollback()
                .await
                .map_err(|e| Error::from_postgres(&doing, e))?;
        }
        let new_seq = new_seq.filter(|_| newly_recorded);
        replayed.push(Replayed {
            seq: dead_letter.seq,
            id: dead_letter.id,
            new_seq,
        });
    }
    Ok(replayed)
}

/// The advisory lock replays of `table`'s rows take, one at a time.
pub fn replay_lock_key(table: &OutboxTable) -> String {
    format!("outboxd:replay:{}", table.display_name())
}

/// Every committed record of `topic` that carries a source seq, read from
/// the beginning to the end each partition had when the read began.
fn read_topic(config: &Config, topic: &str) -> Result<Vec<DeadLetter>> {
    let consumer: BaseConsumer<RelayContext> = crate::kafka::base_client_config(config)
        .set("group.id", "outboxd-dead-letters-cli")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(RelayContext)
        .map_err(|e| Error::stop(format!("cannot create a Kafka consumer: {e}")))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), READ_LIMIT)
        .map_err(|e| Error::retry(format!("cannot reach Kafka: {e}")))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut ends = Vec::new();
    let mut assignment = TopicPartitionList::new();
    for partition in &partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, *partition, READ_LIMIT)
            .map_err(|e| Error::retry(format!("reading the end of {topic}/{partition}: {e}")))?;
        if high > 0 {
            ends.push((*partition, high));
            assignment
                .add_partition_offset(topic, *partition, Offset::Beginning)
                .map_err(|e| Error::stop(e.to_string()))?;
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer
        .assign(&assignment)
        .map_err(|e| Error::stop(format!("assigning {topic}: {e}")))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    let deadline = Instant::now() + READ_LIMIT;
    let mut records = Vec::new();
    loop {
        let positions = consumer
            .position()
            .map_err(|e| Error::stop(e.to_string()))?;
        let done = ends.iter().all(|(partition, high)| {
            matches!(
                positions.find_partition(topic, *partition).map(|p| p.offset()),
                Some(Offset::Offset(at)) if at >= *high
            )
        });
        if done {
            break;
        }
        if Instant::now() >= deadline {
            return Err(Error::retry(format!(
                "could not read {topic} to its end within {READ_LIMIT:?}: a Kafka transaction \
                 open on it (a relay publishing) holds committed readers back; try again"
            )));
        }
        let message = match consumer.poll(Duration::from_millis(100)) {
            None | Some(Err(KafkaError::PartitionEOF(_))) => continue,
            Some(Err(e)) => return Err(Error::retry(format!("reading {topic}: {e}"))),
            Some(Ok(message)) => message,
        };
        let text = |name: &str| {
            message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        let Some(seq) = text(header::SOURCE_SEQ).and_then(|s| s.parse().ok()) else {
            continue;
        };
        let written = message.timestamp().to_millis().unwrap_or(now);
        records.push(DeadLetter {
            seq,
            id: text(header::ID).unwrap_or_default(),
            event_type: text(header::TYPE).unwrap_or_default(),
            aggregate_type: text(header::AGGREGATE_TYPE).unwrap_or_default(),
            key: message
                .key()
                .map(|key| String::from_utf8_lossy(key).into_owned()),
            reason: text(header::DEAD_LETTER_REASON).unwrap_or_default(),
            age_seconds: u64::try_from((now - written).max(0) / 1000).unwrap_or(0),
        });
    }
    records.sort_by_key(|r| r.seq);
    Ok(records)
}
