//! The publisher's delivery reports: what librdkafka said about each record
//! of a transaction, tallied without a future or an allocation per record.
//!
//! Invariant: a round's outcome holds the reports of that round's records
//! and of no other. Each record carries a sequence number as its delivery
//! opaque (a plain integer, not a box); a round owns the numbers from its
//! `first` on, and a report outside them, such as the purge report of a
//! record of an aborted transaction arriving after the next transaction
//! began, is dropped. One wake-up per round, when its last record is
//! reported.
//!
//! Rounds run one at a time, as a producer's Kafka transactions do.

use std::sync::{Mutex, MutexGuard, PoisonError};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use tokio::sync::Notify;

use super::RelayContext;

/// The publisher's producer context: `RelayContext` for logs and errors,
/// and the tally its polling thread reports deliveries into.
#[derive(Default)]
pub(crate) struct DeliveryContext {
    /// Here because librdkafka's polling thread reaches nothing of ours but
    /// the context; the publisher reads it through `producer.context()`.
    pub(crate) tally: DeliveryTally,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        RelayContext.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        RelayContext.error(error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    /// The record's sequence number (see `DeliveryTally::begin_round`).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sequence: usize) {
        let outcome = match result {
            Ok(message) => Ok(message.offset()),
            Err((error, _)) => Err(error.clone()),
        };
        self.tally.report(sequence, outcome);
    }
}

/// The reports of the current round, and the wake-up when it is complete.
#[derive(Default)]
pub(crate) struct DeliveryTally {
    state: Mutex<Tally>,
    complete: Notify,
}

#[derive(Default)]
struct Tally {
    /// The sequence number the next round starts at.
    next: usize,
    /// The current round's first sequence number.
    first: usize,
    /// How many records the current round has.
    count: usize,
    /// How many of them were reported, delivered or failed.
    reported: usize,
    /// Which record's offset the caller wants (the checkpoint record's).
    offset_of: Option<usize>,
    offset: Option<i64>,
    /// Failed records by index in the round, in the order reported.
    failures: Vec<(usize, KafkaError)>,
}

/// What the reports of a round said.
#[derive(Debug)]
pub(crate) struct RoundOutcome {
    /// The offset of the record the round asked for, if it was delivered.
    pub offset: Option<i64>,
    /// Failed records by index in the round, lowest index first.
    pub failures: Vec<(usize, KafkaError)>,
}

impl DeliveryTally {
    /// Starts a round of `count` records, forgetting the last one, and
    /// returns its first sequence number: record `index` of the round is
    /// sent with `first + index`. The offset of record `offset_of` is kept.
    pub(crate) fn begin_round(&self, count: usize, offset_of: Option<usize>) -> usize {
        let mut tally = self.lock();
        let first = tally.next;
        // Never reused while the process lives: 2^64 records is centuries
        // at any rate a broker takes.
        tally.next = first.wrapping_add(count);
        tally.first = first;
        tally.count = count;
        tally.reported = 0;
        tally.offset_of = offset_of;
        tally.offset = None;
        tally.failures.clear();
        first
    }

    /// Notes the report of record `sequence`: its offset, or why it failed.
    /// Called on the producer's polling thread.
    fn report(&self, sequence: usize, outcome: Result<i64, KafkaError>) {
        let mut tally = self.lock();
        let index = sequence.wrapping_sub(tally.first);
        if index >= tally.count {
            // A record of an earlier round (an aborted transaction's, or
            // one whose round ended at a failed send): not this round's.
            return;
        }
        match outcome {
            Ok(offset) if tally.offset_of == Some(index) => tally.offset = Some(offset),
            Ok(_) => {}
            Err(error) => tally.failures.push((index, error)),
        }
        tally.reported += 1;
        if tally.reported == tally.count {
            drop(tally);
            self.complete.notify_one();
        }
    }

    /// Waits until every record of the current round is reported, then
    /// says what the reports said. Call it only after every record of the
    /// round was handed to librdkafka: a record that never was is never
    /// reported.
    pub(crate) async fn round_complete(&self) -> RoundOutcome {
        loop {
            {
                let mut tally = self.lock();
                if tally.reported == tally.count {
                    let mut failures = std::mem::take(&mut tally.failures);
                    failures.sort_by_key(|(index, _)| *index);
                    return RoundOutcome {
                        offset: tally.offset,
                        failures,
                    };
                }
            }
            // A permit left by an earlier round's wake-up only makes the
            // loop look again.
            self.complete.notified().await;
        }
    }

    /// The tally stays consistent under every panic (none is expected), so
    /// a poisoned lock is taken as it is.
    fn lock(&self) -> MutexGuard<'_, Tally> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rdkafka::error::RDKafkaErrorCode;

    use super::*;

    fn failed(code: RDKafkaErrorCode) -> Result<i64, KafkaError> {
        Err(KafkaError::MessageProduction(code))
    }

    /// Whether the round is still incomplete a moment from now.
    async fn still_waiting(tally: &DeliveryTally) -> bool {
        tokio::time::timeout(Duration::from_millis(50), tally.round_complete())
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_round_completes_when_its_last_record_is_reported() {
        let tally = DeliveryTally::default();
        let first = tally.begin_round(3, Some(2));
        tally.report(first + 2, Ok(41));
        tally.report(first, Ok(7));
        assert!(
            still_waiting(&tally).await,
            "complete with a record unreported"
        );
        tally.report(first + 1, Ok(8));
        let outcome = tally.round_complete().await;
        assert_eq!(outcome.offset, Some(41));
        assert!(outcome.failures.is_empty());
    }

    #[tokio::test]
    async fn failures_are_kept_by_index_lowest_first() {
        let tally = DeliveryTally::default();
        let first = tally.begin_round(3, Some(2));
        tally.report(first + 2, failed(RDKafkaErrorCode::MessageSizeTooLarge));
        tally.report(first + 1, Ok(5));
        tally.report(first, failed(RDKafkaErrorCode::InvalidRecord));
        let outcome = tally.round_complete().await;
        assert_eq!(outcome.offset, None, "the wanted record failed");
        let indexes: Vec<usize> = outcome.failures.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [0, 2]);
    }

    #[tokio::test]
    async fn reports_of_an_earlier_round_do_not_count() {
        let tally = DeliveryTally::default();
        let aborted = tally.begin_round(2, Some(1));
        tally.report(aborted, failed(RDKafkaErrorCode::PurgeQueue));
        let first = tally.begin_round(2, Some(1));
        // The aborted round's last purge report arrives late.
        tally.report(aborted + 1, failed(RDKafkaErrorCode::PurgeInflight));
        tally.report(first, Ok(10));
        assert!(
            still_waiting(&tally).await,
            "an earlier round's report counted"
        );
        tally.report(first + 1, Ok(11));
        let outcome = tally.round_complete().await;
        assert_eq!(outcome.offset, Some(11));
        assert!(outcome.failures.is_empty());
    }

    #[tokio::test]
    async fn a_waiter_is_woken_from_another_thread() {
        let tally = std::sync::Arc::new(DeliveryTally::default());
        let first = tally.begin_round(1, None);
        let reporter = std::sync::Arc::clone(&tally);
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            reporter.report(first, Ok(1));
        });
        let outcome = tokio::time::timeout(Duration::from_secs(5), tally.round_complete())
            .await
            .expect("woken");
        assert!(outcome.failures.is_empty());
        thread.join().unwrap();
    }
}
