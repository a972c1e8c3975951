//! Delivering one batch: route the events, publish them with their
//! checkpoint in one Kafka transaction, and retry what can be retried.
//!
//! Invariant: `deliver` returns `Delivered` only after the Kafka transaction
//! holding every event of the batch (or its dead-letter record) committed.
//! On any other outcome nothing of the batch is visible to `read_committed`
//! consumers, so the caller acknowledges nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::acknowledge::RowRef;
use crate::batch::Batch;
use crate::config::PoisonPolicy;
use crate::error::{ErrorKind, Result};
use crate::event::{OutboxEvent, SourcePosition};
use crate::kafka::checkpoint::{Checkpoint, RowDigest};
use crate::kafka::publisher::{PublishError, Publisher};
use crate::metrics::{Metrics, RelayState, Stage};
use crate::routing::Router;
use crate::shutdown::Shutdown;

use super::topic_gate::{TopicGate, Verdict};
use super::window::Window;

/// How often the relay logs what it has done.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// The rows of a committed batch, to acknowledge.
#[derive(Debug, Default)]
pub struct Delivered {
    pub published: Vec<i64>,
    pub dead_lettered: Vec<i64>,
    /// Which row each of those seqs is, for the checkpoints that name them
    /// until they are marked.
    pub row_ids: HashMap<i64, RowDigest>,
    /// The event id of each of those seqs, which their marks match too.
    pub event_ids: HashMap<i64, String>,
}

impl Delivered {
    /// The published and the dead-lettered rows, each as (seq, event id).
    pub fn rows(&self) -> (Vec<RowRef<'_>>, Vec<RowRef<'_>>) {
        let named = |seqs: &[i64]| -> Vec<RowRef<'_>> {
            seqs.iter()
                .filter_map(|seq| self.event_ids.get(seq).map(|id| (*seq, id.as_str())))
                .collect()
        };
        (named(&self.published), named(&self.dead_lettered))
    }
}

/// Counters for the periodic progress line.
#[derive(Debug, Default)]
struct Progress {
    events: u64,
    dead_lettered: u64,
    transactions: u64,
    aborted: u64,
}

pub struct Deliverer<'a> {
    router: &'a Router,
    publisher: Publisher,
    /// `schema.table` and where it lives, written into every checkpoint.
    table_name: &'a str,
    source: Option<String>,
    on_poison: PoisonPolicy,
    /// Rows found poison on an earlier attempt (the broker refused them, or
    /// their topic is missing and `routing.missing_topics` is `poison`), by
    /// seq, with why.
    poisoned: HashMap<i64, String>,
    topics: TopicGate<'a>,
    progress: Progress,
    last_progress_log: Instant,
    metrics: &'a Metrics,
    /// The cluster and timeline of the positions this session publishes,
    /// for a WAL-message outbox's checkpoints (`capture::message_timeline`).
    wal: Option<crate::capture::message_timeline::WalHistory>,
    /// Set while rows are published without marks: every checkpoint then
    /// says from where (`relay::replication::unmarked`).
    unmarked_from: Option<crate::postgres::lsn::Lsn>,
    /// Replication with marks: the publication's entries for the table
    /// when the session began, written into every checkpoint.
    publication: Option<String>,
}

impl<'a> Deliverer<'a> {
    pub fn new(
        router: &'a Router,
        publisher: Publisher,
        table_name: &'a str,
        source: Option<String>,
        on_poison: PoisonPolicy,
        topics: TopicGate<'a>,
        metrics: &'a Metrics,
    ) -> Deliverer<'a> {
        // The publisher is connected and fenced: from here this instance relays.
        metrics.set_state(RelayState::Leading);
        Deliverer {
            router,
            publisher,
            table_name,
            source,
            on_poison,
            poisoned: HashMap::new(),
            topics,
            progress: Progress::default(),
            last_progress_log: Instant::now(),
            metrics,
            wal: None,
            unmarked_from: None,
            publication: None,
        }
    }

    /// Every checkpoint from now on names the publication's entries for
    /// the table as this session found them at its start.
    pub(super) fn set_publication(&mut self, fingerprint: String) {
        self.publication = Some(fingerprint);
    }

    /// Every checkpoint from now on names `wal`'s cluster and timeline as
    /// its position's.
    pub(super) fn set_wal_history(&mut self, wal: crate::capture::message_timeline::WalHistory) {
        self.wal = Some(wal);
    }

    /// Every checkpoint from now on says rows from `from` on may be unmarked.
    pub(super) fn set_unmarked_from(&mut self, from: Option<crate::postgres::lsn::Lsn>) {
        self.unmarked_from = from;
    }

    /// Publishes `events` and a checkpoint naming them and every batch in
    /// `window` (and `position`, the stream position of the last event the
    /// batch accounts for) in one Kafka transaction. A record the broker
    /// refuses makes its row poison and the batch is sent again without
    /// it; an abortable error re-sends
    /// the batch after a backoff. Returns `None` if shutdown was requested
    /// before the batch committed.
    pub(super) async fn deliver(
        &mut self,
        events: &[OutboxEvent],
        position: Option<SourcePosition>,
        window: &Window,
        stop: &mut Shutdown,
    ) -> Result<Option<Delivered>> {
        let row_ids: HashMap<i64, RowDigest> = events
            .iter()
            .map(|event| (event.seq, RowDigest::of(&event.id)))
            .collect();
        // Every schema the batch's values need, before routing: a registry
        // that cannot give them holds the batch back; it poisons no row.
        let Some(schemas) =
            super::schemas::wait_for_schemas(self.router, events, self.metrics, stop).await
        else {
            return Ok(None);
        };
        let mut resend_backoff = super::new_backoff();
        let mut missing_topic_backoff = super::new_backoff();
        loop {
            let batch = Batch::route(
                self.router,
                &schemas,
                events,
                &self.poisoned,
                self.on_poison,
            )?;
            let batch_topics: Vec<&str> = batch.records.iter().map(|r| r.topic.as_ref()).collect();
            let missing = match self.topics.check(&batch_topics).await? {
                Verdict::Open => {
                    self.topics.clear_waiting();
                    None
                }
                Verdict::Poison(missing) => {
                    if self.poison_rows_for(&batch, &missing) {
                        continue; // route again, with those rows poison
                    }
                    // Only the dead-letter topic is missing: its rows have
                    // nowhere else to go.
                    Some(missing)
                }
                Verdict::Wait(missing) => Some(missing),
            };
            if let Some(missing) = missing {
                let waiting: Vec<(String, usize)> = missing
                    .into_iter()
                    .map(|topic| {
                        let rows = batch_topics.iter().filter(|t| **t == topic).count();
                        (topic, rows)
                    })
                    .collect();
                let delay = missing_topic_backoff
                    .next()
                    .unwrap_or(Duration::from_secs(30));
                self.topics.report_waiting(&waiting, delay);
                if stop.requested_within(delay).await {
                    return Ok(None);
                }
                continue;
            }
            // The batch's rows and those of every committed batch not yet
            // marked: a crash before their marks leaves them all repairable.
            let (published, dead_lettered) =
                window.checkpoint_rows(&batch.published, &batch.dead_lettered);
            let checkpoint = Checkpoint::new(
                self.table_name,
                self.source.as_deref(),
                &published,
                &dead_lettered,
                position,
            )
            .read_on(self.wal.as_ref())
            .unmarked_from(self.unmarked_from)
            .with_publication(self.publication.as_deref())
            .with_row_ids(|seq| row_ids.get(&seq).copied().or_else(|| window.row_id(seq)));
            let started = Instant::now();
            match self.publisher.publish(&batch.records, &checkpoint).await {
                Ok(timings) => {
                    self.metrics.stage(Stage::Begin, timings.begin);
                    self.metrics.stage(Stage::Produce, timings.produce);
                    self.metrics.stage(Stage::Offsets, timings.offsets);
                    self.metrics.stage(Stage::Commit, timings.commit);
                    let published_topics: Vec<&str> = batch
                        .records
                        .iter()
                        .zip(&batch.record_seqs)
                        .filter(|(_, seq)| !batch.dead_lettered.contains(seq))
                        .map(|(record, _)| record.topic.as_ref())
                        .collect();
                    let committed_at: Vec<_> = events.iter().map(|e| e.committed_at).collect();
                    self.metrics.committed(
                        &published_topics,
                        batch.dead_lettered.len(),
                        &committed_at,
                    );
                    for seq in &batch.dead_lettered {
                        self.poisoned.remove(seq);
                    }
                    self.progress.events += batch.published.len() as u64;
                    self.progress.dead_lettered += batch.dead_lettered.len() as u64;
                    self.progress.transactions += 1;
                    tracing::debug!(
                        events = batch.records.len(),
                        first_seq = batch.record_seqs.first(),
                        last_seq = batch.record_seqs.last(),
                        position = position.map(|p| p.to_string()),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "batch committed to Kafka"
                    );
                    self.log_progress_now_and_then();
                    return Ok(Some(Delivered {
                        published: batch.published,
                        dead_lettered: batch.dead_lettered,
                        row_ids,
                        event_ids: events.iter().map(|e| (e.seq, e.id.clone())).collect(),
                    }));
                }
                Err(PublishError::RecordRejected { index, reason }) => {
                    let seq = batch.record_seqs[index];
                    tracing::warn!(
                        seq,
                        %reason,
                        "Kafka refused a record; the transaction was aborted and the row will be dead-lettered"
                    );
                    self.poisoned.insert(seq, reason);
                    self.progress.aborted += 1;
                    self.metrics.aborted();
                }
                Err(PublishError::Failed(error)) if error.kind == ErrorKind::AbortAndResend => {
                    // A topic deleted since it was looked up fails this way.
                    self.topics.forget_known();
                    self.progress.aborted += 1;
                    self.metrics.aborted();
                    self.metrics.error(error.kind);
                    let delay = resend_backoff.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(
                        %error,
                        retry_in = ?delay,
                        "Kafka transaction aborted; nothing from it is visible. Re-sending the batch"
                    );
                    if stop.requested_within(delay).await {
                        return Ok(None);
                    }
                }
                Err(PublishError::Failed(error)) => return Err(error),
            }
        }
    }

    /// Makes the batch's rows routed to `missing` topics poison; whether
    /// there were any (rows already bound for the dead-letter topic are not).
    fn poison_rows_for(&mut self, batch: &Batch<'_>, missing: &[String]) -> bool {
        let mut any = false;
        for (record, seq) in batch.records.iter().zip(&batch.record_seqs) {
            let topic = record.topic.as_ref();
            if batch.dead_lettered.contains(seq) || !missing.iter().any(|m| m == topic) {
                continue;
            }
            self.poisoned.insert(
                *seq,
                format!(
                    "topic `{topic}` does not exist and the broker did not create it on first \
                     use (routing.missing_topics: poison)"
                ),
            );
            any = true;
        }
        any
    }

    /// The relay's metrics, for the stages around delivery.
    pub(super) fn metrics(&self) -> &'a Metrics {
        self.metrics
    }

    fn log_progress_now_and_then(&mut self) {
        if self.last_progress_log.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last_progress_log = Instant::now();
        tracing::info!(
            published = self.progress.events,
            dead_lettered = self.progress.dead_lettered,
            transactions = self.progress.transactions,
            aborted = self.progress.aborted,
            "relay progress since this session started"
        );
    }
}
