//! The transactional publisher: one batch of events plus its checkpoint in
//! one Kafka transaction.
//!
//! Invariant: `publish` returns `Ok` only after `commit_transaction`
//! succeeded, so every event of the batch, its checkpoint and the checkpoint
//! group's offset pointing at that checkpoint are committed together, or
//! none of them ever is. Any other outcome leaves no committed trace of the
//! batch in Kafka.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::checkpoint::{Checkpoint, HandedOver, CHECKPOINT_PARTITION};
use super::deliveries::DeliveryContext;
use super::errors::{classify, classify_after_fatal, is_record_rejected};
use super::identity::TableIdentity;
use super::off_runtime::DropOffRuntime;
use super::RelayContext;
use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::failpoint;
use crate::routing::RoutedRecord;

/// How often a retriable commit error is retried before the session restarts.
const COMMIT_ATTEMPTS: u32 = 5;
/// Room above `kafka.max_message_bytes` for librdkafka's own limit, so the
/// router's size check, which names the row, always speaks first.
const LOCAL_SIZE_HEADROOM: usize = 64 * 1024;

/// How long each step of one Kafka transaction took (`Stage`s of the
/// same names in the metrics).
#[derive(Debug, Default, Clone, Copy)]
pub struct TransactionTimings {
    pub begin: Duration,
    /// Every record and the checkpoint handed over and acknowledged.
    pub produce: Duration,
    pub offsets: Duration,
    pub commit: Duration,
}

/// Why a batch was not published.
#[derive(Debug)]
pub enum PublishError {
    /// The broker refused record `index` for good (too large, invalid): that
    /// row is poison. The transaction was aborted; nothing was published.
    RecordRejected { index: usize, reason: String },
    /// Anything else, sorted by what to do next. For `AbortAndResend` the
    /// transaction was already aborted.
    Failed(Error),
}

impl From<Error> for PublishError {
    fn from(error: Error) -> Self {
        PublishError::Failed(error)
    }
}

/// What a transaction is for. The fault suite's kill points sit in the
/// transactions of batches; a takeover's hand-over transaction, which every
/// leadership term starts with, is not where they are meant to fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Batch,
    HandOver,
}

impl Purpose {
    fn kill_point(self, point: &str) {
        if self == Purpose::Batch {
            failpoint::kill_point(point);
        }
    }
}

/// The publisher's producer: its own thread serves librdkafka's events and
/// reports every delivery into the context's tally.
type TransactionalProducer = ThreadedProducer<DeliveryContext>;

pub struct Publisher {
    producer: DropOffRuntime<TransactionalProducer>,
    /// Names the table's checkpoint group in `send_offsets_to_transaction`.
    checkpoint_group: Arc<ConsumerGroupMetadata>,
    /// Key of every checkpoint record: the table's identity.
    checkpoint_key: Vec<u8>,
    checkpoint_topic: String,
    transaction_timeout: Duration,
}

impl Publisher {
    /// Creates the producer and calls `init_transactions` with the table's
    /// `transactional.id`, which aborts any transaction an earlier leader of
    /// the table left open, whatever its `relay.name`, and fences it: its
    /// next Kafka call fails and its session ends.
    pub async fn connect(config: &Config, identity: &TableIdentity) -> Result<Publisher, Error> {
        let mut client = transactional_client(config, &identity.transactional_id);
        if !config.kafka.properties.contains_key("linger.ms") {
            // A batch is produced in one go and committed right after, so
            // waiting for more records (librdkafka's default is 5 ms) only
            // adds to every transaction: it was most of a small one's time.
            // Records still share requests while earlier ones are in flight.
            client.set("linger.ms", "0");
        }
        if let Some(debug) = failpoint::librdkafka_debug() {
            // The `inside-commit` kill point waits for a debug line.
            let debug = match client.get("debug") {
                Some(configured) => format!("{configured},{debug}"),
                None => debug.to_string(),
            };
            client.set("debug", debug);
            client.set_log_level(RDKafkaLogLevel::Debug);
        }
        let producer: TransactionalProducer = client
            .set(
                "transaction.timeout.ms",
                config.kafka.transaction_timeout.as_millis().to_string(),
            )
            .set("partitioner", config.routing.partitioner.librdkafka_name())
            // Batches no larger than one allowed record, so a topic whose
            // max.message.bytes is kafka.max_message_bytes accepts every batch.
            .set("batch.size", config.kafka.max_message_bytes.to_string())
            .set(
                "message.max.bytes",
                (config.kafka.max_message_bytes + LOCAL_SIZE_HEADROOM).to_string(),
            )
            .create_with_context(DeliveryContext::default())
            .map_err(|e| {
                Error::stop(format!(
                    "cannot create the Kafka producer from the config: {e}"
                ))
            })?;
        let publisher = Publisher {
            producer: DropOffRuntime::new(producer),
            checkpoint_group: Arc::new(group_metadata(config, identity)?),
            checkpoint_key: identity.checkpoint_key.as_bytes().to_vec(),
            checkpoint_topic: config.kafka.checkpoint_topic.clone(),
            transaction_timeout: config.kafka.transaction_timeout,
        };
        let timeout = init_timeout(config);
        publisher
            .transaction_call(timeout, move |producer| producer.init_transactions(timeout))
            .await
            .map_err(|e| {
                e.classified(
                    &publisher,
                    "initialising Kafka transactions (is the broker reachable?)",
                )
            })?;
        Ok(publisher)
    }

    /// Fences `transactional_id`: its open transaction, if any, is aborted
    /// now instead of when its timeout expires, and its holder can never
    /// commit again. Used for the ids of outboxd 0.1 (`kafka::checkpoint_scan`).
    pub async fn fence_transactional_id(
        config: &Config,
        transactional_id: &str,
    ) -> Result<(), Error> {
        let producer: TransactionalProducer = transactional_client(config, transactional_id)
            .create_with_context(DeliveryContext::default())
            .map_err(|e| {
                Error::stop(format!(
                    "cannot create a Kafka producer to fence `{transactional_id}`: {e}"
                ))
            })?;
        let timeout = init_timeout(config);
        tokio::task::spawn_blocking(move || producer.init_transactions(timeout))
            .await
            .map_err(|e| Error::retry(format!("fencing task failed: {e}")))?
            .map_err(|e| {
                classify(
                    &format!("fencing the transactional id `{transactional_id}`"),
                    &e,
                )
            })
    }

    /// Makes `checkpoint` the table's latest, in a transaction of its own,
    /// and writes a hand-over marker under each legacy key (a `relay.name`
    /// from before table-keyed checkpoints) to its partition, so a relay of
    /// such a release refuses to lead the table from now on (see
    /// `kafka::checkpoint_scan`).
    pub async fn hand_over(
        &self,
        checkpoint: &Checkpoint,
        legacy_keys: &[(String, i32)],
    ) -> Result<(), PublishError> {
        let marker = HandedOver::new(
            &String::from_utf8_lossy(&self.checkpoint_key),
            &checkpoint.table,
        )
        .to_bytes();
        let markers: Vec<(RoutedRecord<'_>, i32)> = legacy_keys
            .iter()
            .map(|(key, partition)| {
                let record = RoutedRecord {
                    topic: Cow::Borrowed(self.checkpoint_topic.as_str()),
                    key: Some(Cow::Owned(key.as_bytes().to_vec())),
                    headers: Vec::new(),
                    payload: Some(Cow::Borrowed(marker.as_slice())),
                };
                (record, *partition)
            })
            .collect();
        self.transact(&markers, &[], checkpoint, Purpose::HandOver)
            .await
            .map(|_| ())
    }

    /// Publishes `records` and `checkpoint` in one Kafka transaction;
    /// says how long its steps took.
    pub async fn publish(
        &self,
        records: &[RoutedRecord<'_>],
        checkpoint: &Checkpoint,
    ) -> Result<TransactionTimings, PublishError> {
        self.transact(&[], records, checkpoint, Purpose::Batch)
            .await
    }

    /// One Kafka transaction: `markers` (records to the checkpoint topic,
    /// each to its partition), `records`, then `checkpoint`.
    async fn transact(
        &self,
        markers: &[(RoutedRecord<'_>, i32)],
        records: &[RoutedRecord<'_>],
        checkpoint: &Checkpoint,
        purpose: Purpose,
    ) -> Result<TransactionTimings, PublishError> {
        let mut timings = TransactionTimings::default();
        let started = Instant::now();
        self.transaction_call(self.transaction_timeout, |producer| {
            producer.begin_transaction()
        })
        .await
        .map_err(|e| e.classified(self, "beginning a Kafka transaction"))?;
        timings.begin = started.elapsed();
        purpose.kill_point("after-begin");
        let outcome = self
            .produce_and_commit(markers, records, checkpoint, purpose, &mut timings)
            .await;
        let needs_abort = match &outcome {
            Ok(()) => false,
            Err(PublishError::RecordRejected { .. }) => true,
            Err(PublishError::Failed(error)) => error.kind == ErrorKind::AbortAndResend,
        };
        if needs_abort {
            self.abort().await?;
        }
        outcome.map(|()| timings)
    }

    async fn produce_and_commit(
        &self,
        markers: &[(RoutedRecord<'_>, i32)],
        records: &[RoutedRecord<'_>],
        checkpoint: &Checkpoint,
        purpose: Purpose,
        timings: &mut TransactionTimings,
    ) -> Result<(), PublishError> {
        let producing = Instant::now();
        let tally = &self.producer.context().tally;
        if !markers.is_empty() {
            let first = tally.begin_round(markers.len(), None);
            for (index, (marker, partition)) in markers.iter().enumerate() {
                self.send_to(marker, Some(*partition), first + index)
                    .await
                    .map_err(|e| self.classify("writing a hand-over marker", &e))?;
            }
            // Every marker is reported before the first record is sent, and
            // a failed one ends the transaction there.
            if let Some((_, error)) = tally.round_complete().await.failures.into_iter().next() {
                return Err(self.classify("writing a hand-over marker", &error).into());
            }
        }
        let checkpoint_index = records.len();
        let first = tally.begin_round(records.len() + 1, Some(checkpoint_index));
        for (index, record) in records.iter().enumerate() {
            if index == records.len() / 2 {
                purpose.kill_point("mid-produce");
            }
            self.send_to(record, None, first + index)
                .await
                .map_err(|e| self.delivery_failure(index, records.len(), e))?;
        }
        let checkpoint_record = RoutedRecord {
            topic: Cow::Borrowed(&self.checkpoint_topic),
            key: Some(Cow::Borrowed(&self.checkpoint_key)),
            headers: Vec::new(),
            payload: Some(Cow::Owned(checkpoint.to_bytes())),
        };
        self.send_to(
            &checkpoint_record,
            Some(CHECKPOINT_PARTITION),
            first + checkpoint_index,
        )
        .await
        .map_err(|e| self.delivery_failure(checkpoint_index, records.len(), e))?;

        // Await every delivery before judging: the broker refuses a whole
        // produce request when one record in it is too large, so the
        // innocent records of that request fail alongside the guilty one.
        let outcome = tally.round_complete().await;
        let mut rejected: Vec<(usize, String)> = Vec::new();
        let mut other_failure = None;
        // Lowest index first, whatever order the reports came in: the
        // first other failure by index is the one reported.
        for (index, error) in outcome.failures {
            match self.delivery_failure(index, records.len(), error) {
                PublishError::RecordRejected { index, reason } => rejected.push((index, reason)),
                PublishError::Failed(error) => {
                    other_failure.get_or_insert(error);
                }
            }
        }
        if let Some(error) = other_failure {
            return Err(PublishError::Failed(error));
        }
        // Blame the largest refused record; if it was not the only culprit,
        // the next attempt names the next one.
        if let Some((index, reason)) = rejected
            .into_iter()
            .max_by_key(|(index, _)| records[*index].approximate_size())
        {
            return Err(PublishError::RecordRejected { index, reason });
        }
        let Some(checkpoint_offset) = outcome.offset else {
            return Err(PublishError::Failed(Error::abort_and_resend(
                "the checkpoint record's delivery report carried no offset",
            )));
        };
        timings.produce = producing.elapsed();
        let adding_offsets = Instant::now();
        self.point_group_at_checkpoint(checkpoint_offset).await?;
        timings.offsets = adding_offsets.elapsed();
        purpose.kill_point("after-checkpoint");
        let committing = Instant::now();
        self.commit(purpose).await?;
        timings.commit = committing.elapsed();
        purpose.kill_point("after-commit");
        Ok(())
    }

    /// Adds the table's checkpoint group offset, pointing at this
    /// transaction's checkpoint record, to the transaction: start-up finds
    /// the latest checkpoint through it (see `kafka::checkpoint`).
    async fn point_group_at_checkpoint(&self, offset: i64) -> Result<(), PublishError> {
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(
                &self.checkpoint_topic,
                CHECKPOINT_PARTITION,
                Offset::Offset(offset),
            )
            .map_err(|e| Error::stop(format!("naming the checkpoint offset: {e}")))?;
        let group = Arc::clone(&self.checkpoint_group);
        let timeout = self.transaction_timeout;
        self.transaction_call(timeout, move |producer| {
            producer.send_offsets_to_transaction(&offsets, &group, timeout)
        })
        .await
        .map_err(|e| {
            PublishError::Failed(e.classified(
                self,
                "adding the checkpoint group's offset to the Kafka transaction",
            ))
        })
    }

    /// Queues one record to `partition` (the partitioner's choice when
    /// `None`), waiting while librdkafka's local queue is full. Its delivery
    /// is reported to the tally under `sequence`.
    async fn send_to(
        &self,
        record: &RoutedRecord<'_>,
        partition: Option<i32>,
        sequence: usize,
    ) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_ref()),
            });
        }
        let mut base_record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&record.topic, sequence).headers(headers);
        if let Some(key) = &record.key {
            base_record = base_record.key(key.as_ref());
        }
        if let Some(partition) = partition {
            base_record = base_record.partition(partition);
        }
        if let Some(payload) = &record.payload {
            base_record = base_record.payload(payload.as_ref());
        }
        loop {
            match self.producer.send(base_record) {
                Ok(()) => return Ok(()),
                // librdkafka hands the record back untouched: send it again
                // once its queue has room.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    base_record = returned;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    async fn commit(&self, purpose: Purpose) -> Result<(), PublishError> {
        let timeout = self.transaction_timeout;
        let mut attempt = 1;
        if purpose == Purpose::Batch {
            failpoint::kill_when_commit_request_sent();
        }
        loop {
            match self
                .transaction_call(timeout, move |producer| {
                    settle_delivery_reports(producer);
                    producer.commit_transaction(timeout)
                })
                .await
            {
                Ok(()) => return Ok(()),
                // Another commit call would only conflict with the stuck one.
                Err(CallError::Stuck(error)) => return Err(PublishError::Failed(error)),
                Err(CallError::Returned(error)) => {
                    let error = self.classify("committing the Kafka transaction", &error);
                    if error.kind == ErrorKind::Retry && attempt < COMMIT_ATTEMPTS {
                        tracing::warn!(attempt, error = %error, "Kafka commit failed with a retriable error; retrying the commit");
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                        continue;
                    }
                    return Err(PublishError::Failed(error));
                }
            }
        }
    }

    async fn abort(&self) -> Result<(), Error> {
        let timeout = self.transaction_timeout;
        self.transaction_call(timeout, move |producer| producer.abort_transaction(timeout))
            .await
            .map_err(|e| {
                let error = e.classified(self, "aborting the Kafka transaction");
                match error.kind {
                    ErrorKind::Stop => error,
                    // A producer that cannot abort is re-initialised with the session.
                    _ => Error::retry(error.message),
                }
            })
    }

    /// Runs one of librdkafka's blocking transaction calls off the async
    /// workers, and stops waiting for it `CALL_MARGIN` after its own
    /// `timeout`. librdkafka is meant to return by then; when it does not
    /// (`send_offsets_to_transaction` was seen waiting for minutes after a
    /// broker of a three-node cluster was killed), the session ends instead
    /// of stalling: its successor's `init_transactions` fences this producer,
    /// which ends the stuck call, and reconciles whatever its transaction did.
    async fn transaction_call<T: Send + 'static>(
        &self,
        timeout: Duration,
        call: impl FnOnce(&TransactionalProducer) -> Result<T, KafkaError> + Send + 'static,
    ) -> Result<T, CallError> {
        let producer = TransactionalProducer::clone(&self.producer);
        let limit = timeout + CALL_MARGIN;
        match tokio::time::timeout(limit, tokio::task::spawn_blocking(move || call(&producer)))
            .await
        {
            Ok(Ok(result)) => result.map_err(CallError::Returned),
            Ok(Err(join_error)) => Err(CallError::Stuck(Error::retry(format!(
                "a Kafka transaction call panicked: {join_error}"
            )))),
            Err(_elapsed) => Err(CallError::Stuck(Error::retry(format!(
                "librdkafka did not return from a transaction call within {limit:?}; ending the \
                 session: the next one's producer fences this one, and what its transaction did \
                 is settled from the checkpoint"
            )))),
        }
    }
}

/// Waits, briefly, until librdkafka has released every message this
/// transaction produced.
///
/// Why: the caller has awaited every delivery, but librdkafka counts a
/// message as outstanding until the report event holding it is freed, a
/// moment after the tally counted its last report. rust-rdkafka's
/// `commit_transaction` flushes first, and its flush, finding any message
/// outstanding, polls for a fixed 100 ms before it looks again: that was
/// the p99 of small transactions. librdkafka's own flush, with our producer
/// serving its events on another thread, waits on a condition variable for
/// the count to reach zero and returns the moment it does; after it the
/// crate's flush finds nothing outstanding and returns at once. Bounded, so
/// a stuck count only costs what it cost before.
fn settle_delivery_reports(producer: &TransactionalProducer) {
    let limit_ms = SETTLE_DELIVERY_REPORTS.as_millis() as i32;
    // SAFETY: the pointer is the live handle of `producer`, borrowed for the
    // call; rd_kafka_flush is thread-safe and only waits on the producer's
    // message count (event mode: it never serves the event queue itself).
    unsafe {
        rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), limit_ms);
    }
}

/// Longest wait for librdkafka to release delivered messages before committing.
const SETTLE_DELIVERY_REPORTS: Duration = Duration::from_millis(200);

/// How long past a transaction call's own timeout we wait for librdkafka.
const CALL_MARGIN: Duration = Duration::from_secs(15);

/// Why a transaction call gave no result.
enum CallError {
    /// librdkafka returned this error.
    Returned(KafkaError),
    /// It did not return in time (or panicked): the producer is not to be
    /// used again.
    Stuck(Error),
}

impl CallError {
    fn classified(self, publisher: &Publisher, doing: &str) -> Error {
        match self {
            CallError::Returned(error) => publisher.classify(doing, &error),
            CallError::Stuck(error) => Error::retry(format!("{doing}: {error}")),
        }
    }
}

/// A producer's settings for `transactional_id`.
fn transactional_client(config: &Config, transactional_id: &str) -> rdkafka::ClientConfig {
    let mut client = super::base_client_config(config);
    client
        .set("transactional.id", transactional_id)
        .set("enable.idempotence", "true");
    client
}

/// The checkpoint group as `send_offsets_to_transaction` names it. The group
/// never has members (nothing subscribes), so its offsets are committed as
/// a simple group's: generation -1, no member id.
fn group_metadata(
    config: &Config,
    identity: &TableIdentity,
) -> Result<ConsumerGroupMetadata, Error> {
    let consumer: BaseConsumer<RelayContext> = super::base_client_config(config)
        .set("group.id", &identity.checkpoint_group)
        .set("enable.auto.commit", "false")
        .create_with_context(RelayContext)
        .map_err(|e| Error::stop(format!("cannot create the checkpoint group's client: {e}")))?;
    consumer.group_metadata().ok_or_else(|| {
        Error::stop(format!(
            "librdkafka gave no group metadata for checkpoint group `{}`",
            identity.checkpoint_group
        ))
    })
}

/// How long `init_transactions` may take: it first settles the previous
/// holder's transaction, which can take as long as that transaction's timeout.
fn init_timeout(config: &Config) -> Duration {
    config
        .kafka
        .transaction_timeout
        .max(Duration::from_secs(30))
}

impl Publisher {
    /// Sorts a librdkafka error by what to do, judging it by the producer's
    /// fatal error when it has one: after that error every call fails with
    /// a generic code, and which of them the relay observes first is a race.
    fn classify(&self, doing: &str, error: &KafkaError) -> Error {
        match self.producer.client().fatal_error() {
            Some((cause, reason)) => classify_after_fatal(doing, error, cause, &reason),
            None => classify(doing, error),
        }
    }

    /// Sorts the failure of delivery `index`. Indexes below `record_count`
    /// are event records; the one after them is the checkpoint record, whose
    /// rejection is not a poison row but a broken setup. A producer with a
    /// fatal error rejects nothing for good: the session ends.
    fn delivery_failure(
        &self,
        index: usize,
        record_count: usize,
        error: KafkaError,
    ) -> PublishError {
        if self.producer.client().fatal_error().is_some() {
            return PublishError::Failed(self.classify("delivering a record", &error));
        }
        delivery_failure(index, record_count, error)
    }
}

/// Sorts the failure of delivery `index` on a producer without a fatal error.
fn delivery_failure(index: usize, record_count: usize, error: KafkaError) -> PublishError {
    match error.rdkafka_error_code() {
        Some(code) if is_record_rejected(code) && index < record_count => PublishError::RecordRejected {
            index,
            reason: format!("rejected by Kafka: {code}"),
        },
        Some(code) if is_record_rejected(code) => PublishError::Failed(Error::stop(format!(
            "the checkpoint record was rejected by Kafka: {code}; check the checkpoint topic's max.message.bytes"
        ))),
        _ => PublishError::Failed(classify("delivering a record", &error)),
    }
}
