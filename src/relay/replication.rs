//! The replication loop: stream the outbox's inserts from a logical slot,
//! deliver them in batches, mark the rows sent, then confirm the slot.
//!
//! ```text
//!  slot new, or past the last published commit? ──yes──▶ drain unsent rows from
//!     │ no                                            the table (catch_up) until
//!     ▼ ◀─────────────────────────────────────────────── none is left
//!  START_REPLICATION ─▶ events (commit LSN, index) ─▶ batch ≤ batch_size, batch_bytes
//!                                                       ▼
//!        Kafka: begin · events + checkpoint(position) · commit
//!                                                       ▼
//!        mark rows sent ─▶ confirm slot up to the last whole transaction
//! ```
//!
//! Invariants:
//! - The slot is confirmed past a transaction only after the Kafka
//!   transaction holding its last event committed; a transaction split over
//!   batches is confirmed only at its end. A restart therefore replays at
//!   most the transactions in flight, and the checkpoint's position skips
//!   what of them is already in Kafka.
//! - When nothing is in flight (no open transaction, empty batch), a
//!   keepalive's WAL end is confirmed, so WAL written by other tables or
//!   databases never piles up behind an idle outbox.
//! - A slot only streams what commits after its position, so every new
//!   slot (first start, or after a lost one), and every slot found past the
//!   last published commit (moved while the relay was down, or only
//!   confirmed idle WAL), starts with a drain of the rows still unsent in
//!   the table, which ends only once none is left up to its bound, locked
//!   rows included (`catch_up`). After a drain the stream starts where
//!   the drain read its bound, not at the slot's position: every outbox row
//!   committed before that is in Kafka by then, so replaying it would only
//!   feed the filter below.
//! - Until the stream passes the WAL position read when streaming starts,
//!   streamed rows are published only if the table still shows them unsent:
//!   what a session replays may have been published by a drain (its own, or
//!   that of a predecessor killed inside its window) or by a relay with
//!   another name. Marking follows the Kafka commit, so "sent" means
//!   "published"; rows committed after that position only this leader sees.
//! - Positions are read only once every transaction committed before them
//!   is visible (`postgres::settled_wal_position`): a commit is streamed as
//!   soon as its WAL is flushed, a moment before other sessions can see it, and
//!   "not visible yet" must never pass for "sent" or be missed by a drain,
//!   and a mark that found a streamed row not yet visible is repeated once
//!   it is (`Acknowledger::acknowledge_streamed`).

use std::time::{Duration, Instant};

use futures_util::FutureExt;
use sqlx::PgConnection;
use tokio::sync::mpsc;

use super::catch_up;
use super::pipeline::{self, AcknowledgeWith, Acknowledged, CaptureEnds, CapturedBatch};
use super::session::Session;
use crate::acknowledge::Acknowledger;
use crate::capture::slot::{self, SlotInfo};
use crate::capture::standby_gate::{StandbyGate, Through};
use crate::capture::stream::{Assembler, Captured};
use crate::capture::wire::{ReplicationStream, StartAt, StreamTarget, WireClient};
use crate::config::SlotLostPolicy;
use crate::error::{Error, Result};
use crate::event::{OutboxEvent, SourcePosition};
use crate::kafka::checkpoint::Checkpoint;
use crate::metrics::{Metrics, Stage};
use crate::postgres::lsn::Lsn;
use crate::postgres::settled_wal_position;
use crate::retention::PublishedThrough;
use crate::shutdown::Shutdown;

/// Runs until shutdown or the first failure.
pub async fn run(session: &mut Session<'_>, latest: Option<&Checkpoint>) -> Result<()> {
    let context = session.context;
    let config = &context.config;
    let table = &context.table;
    slot::ensure_publication(&mut session.connection, &config.postgres.publication, table).await?;
    let slot_name = config.slot_name();
    let start = match latest.and_then(|c| c.unmarked_from.map(|from| (c, from))) {
        // Rows were published without marks: only the slot and the
        // checkpoint tell them from unsent ones.
        Some((latest, marked_before)) => {
            unmarked::resume(session, latest, marked_before, &slot_name).await?
        }
        None => {
            let publication = slot::publication_fingerprint(
                &mut session.connection,
                &config.postgres.publication,
                table,
            )
            .await?;
            let start = start_where_marks_tell(session, latest, &publication, &slot_name).await?;
            if !config.unmarked() {
                session.deliverer.set_publication(publication);
            }
            if session.stop.is_requested() {
                return Ok(());
            }
            if config.unmarked() {
                // From here rows are published unmarked: every checkpoint
                // says so, and where the marks still tell.
                unmarked::begin(session, latest, &slot_name, start.filter_before).await?;
            }
            start
        }
    };

    let target = StreamTarget {
        slot: slot_name.clone(),
        publication: config.postgres.publication.clone(),
        confirmed_flush: start.slot.confirmed_flush.unwrap_or_default(),
        start_at: start.stream_from,
        application_name: format!("outboxd-{}", config.relay.name),
    };
    let gate = super::failover::prepare(session, &target).await?;
    let mut stream = WireClient::start(&config.postgres.url, &target).await?;
    tracing::info!(
        table = %session.context.table_name,
        mode = "replication",
        slot = %slot_name,
        publication = %config.postgres.publication,
        confirmed_flush = %target.confirmed_flush,
        stream_from = start.stream_from.map(|start| start.lsn.to_string()),
        resume_after = start.resume_after.map(|p| p.to_string()),
        after_publish = if config.unmarked() { "none" } else { "mark" },
        batch_size = config.capture.batch_size,
        "relay started"
    );
    // Marks run on a connection of their own, behind the Kafka transactions.
    let mut acknowledgements = context.connect("connecting for acknowledgements").await?;
    // The catch-up filter's queries run beside the marks and the leader's
    // watchdog, on a connection of their own.
    let mut filter_connection = match start.filter_before {
        Some(_) => Some(
            context
                .connect("connecting for the catch-up filter")
                .await?,
        ),
        None => None,
    };
    let catch_up_filter = match (start.filter_before, filter_connection.as_mut()) {
        (Some(before), Some(connection)) => Some(CatchUpFilter {
            before,
            connection,
            unsent_among_sql: table.unsent_among_sql(),
        }),
        _ => None,
    };
    let mut assembler = Assembler::new(table, config.capture.other_changes, start.resume_after)
        .with_created_at_text(config.routing.cloudevents.enabled);
    let unmarked_acknowledger;
    let mut acknowledger = &context.acknowledger;
    if config.unmarked() {
        assembler = assembler.published_only();
        unmarked_acknowledger = Acknowledger::without_table(&context.table_name);
        acknowledger = &unmarked_acknowledger;
    }
    let mut streamer = Streamer::new(
        assembler,
        catch_up_filter,
        config.capture.batch_size,
        config.capture.batch_bytes,
    )
    .with_gate(gate)
    .with_metrics(&context.metrics)
    .reporting_to(&session.published_through);
    if config.unmarked() {
        streamer = streamer.without_idle_confirms();
    }
    let Session {
        connection,
        deliverer,
        stop,
        ..
    } = session;
    let capture_stop = stop.clone();
    let outcome = pipeline::run(
        connection,
        deliverer,
        acknowledger,
        Some(&mut acknowledgements),
        config.relay.unacknowledged_batches,
        stop,
        |ends| streamer.stream(&mut stream, capture_stop, ends),
    )
    .await;
    stream.close().await;
    if streamer.assembler.skipped > 0 {
        tracing::info!(
            skipped = streamer.assembler.skipped,
            "skipped replayed events the checkpoint showed already in Kafka"
        );
    }
    outcome
}

/// Where a session starts streaming from, and what it filters.
struct Start {
    slot: SlotInfo,
    /// Events at or before it are in Kafka per the checkpoint.
    resume_after: Option<SourcePosition>,
    /// Rows of transactions committed before it are checked in the table
    /// (`CatchUpFilter`); `None`: nothing to check.
    filter_before: Option<Lsn>,
    /// Where the stream starts, past the slot's position: a catch-up drain
    /// just put every row committed before it in Kafka, so a replay of that
    /// WAL would only feed the filter. `None`: at the slot's position.
    stream_from: Option<StartAt>,
}

/// The start of a relay every published row of which is marked: the slot
/// is judged by the checkpoint, and whatever the stream cannot carry is
/// drained from the table first (`catch_up`).
async fn start_where_marks_tell(
    session: &mut Session<'_>,
    latest: Option<&Checkpoint>,
    publication: &str,
    slot_name: &str,
) -> Result<Start> {
    // A checkpoint with a position means this relay streamed from its slot
    // before; without one (first start, or polling until now) the slot's
    // stream cannot be trusted to hold every unsent row.
    let last_published = latest.and_then(|c| c.position);
    let (slot, created) = usable_slot(session, slot_name, last_published.is_some()).await?;
    let mut resume_after = last_published;
    let mut stream_from = None;
    let publication_changed = latest
        .and_then(|c| c.publication.as_deref())
        .is_some_and(|before| before != publication);
    let catch_up_reason = catch_up::needed(
        created,
        publication_changed,
        last_published.map(|p| p.commit_lsn),
        slot.confirmed_flush,
    );
    if let Some(reason) = catch_up_reason {
        let in_kafka_before = catch_up::run(session, slot_name, reason).await?;
        // The catch-up filter, not the checkpoint, tells what the stream
        // replays that is already in Kafka: what committed while the drain
        // ran, from where it read its bound.
        resume_after = None;
        if let Some(lsn) = in_kafka_before.filter(|&lsn| slot.confirmed_flush < Some(lsn)) {
            // Read on the session's connection, which has been on this
            // server since before the drain's position was.
            let timeline = crate::postgres::current_timeline(&mut session.connection).await?;
            stream_from = Some(StartAt { lsn, timeline });
        }
    }
    let filter_before = settled_wal_position(&mut session.connection).await?;
    Ok(Start {
        slot,
        resume_after,
        filter_before: Some(filter_before),
        stream_from,
    })
}

/// The slot to stream from, creating it when missing and replacing it when
/// lost (unless `capture.on_slot_lost: halt`). Returns whether it is new.
async fn usable_slot(
    session: &mut Session<'_>,
    slot_name: &str,
    streamed_before: bool,
) -> Result<(SlotInfo, bool)> {
    let policy = session.context.config.capture.on_slot_lost;
    let connection = &mut session.connection;
    let existing = slot::inspect(connection, slot_name).await?;
    let lost_because = match &existing {
        Some(info) if info.is_lost() => Some(
            "was invalidated (wal_status = lost): Postgres removed WAL it still needed, \
             usually because max_slot_wal_keep_size was exceeded while the relay was down or slow",
        ),
        None if streamed_before => Some(
            "is gone: it was dropped while the relay was not streaming from it \
             (by an operator, a failover, or a restore)",
        ),
        _ => None,
    };
    if let Some(why) = lost_because {
        if policy == SlotLostPolicy::Halt {
            return Err(Error::stop(format!(
                "replication slot `{slot_name}` {why}. Changes it held are not in the stream, but their \
                 rows are still unsent in the table. capture.on_slot_lost is `halt`: set it to `recover` \
                 (publishes the unsent rows, then streams from a new slot) or switch to capture.mode: polling"
            ))
            .because(crate::error::Cause::SlotLost));
        }
        tracing::error!(
            slot = slot_name,
            "replication slot {why}. Recovering: publishing the rows still unsent in the table, \
             then streaming from a new slot. No event is lost or produced twice; check why the slot \
             was lost so it does not happen again"
        );
        if existing.is_some() {
            slot::drop_slot(connection, slot_name).await?;
        }
    }
    if let Some(info) = existing.filter(|info| !info.is_lost()) {
        if let Some(reason) = info.unusable_because() {
            return Err(Error::stop(reason));
        }
        if let Some(pid) = info.active_pid {
            return Err(Error::retry(format!(
                "replication slot `{slot_name}` is in use by backend pid {pid}: another process \
                 streams from it (a relay that just died is released within seconds). \
                 If it is not outboxd, give this relay its own capture.slot"
            )));
        }
        return Ok((info, false));
    }
    let consistent_point = slot::create(connection, slot_name).await?;
    tracing::info!(
        slot = slot_name,
        consistent_point = %consistent_point,
        "created the replication slot"
    );
    let info = slot::inspect(connection, slot_name).await?.ok_or_else(|| {
        Error::retry(format!(
            "replication slot `{slot_name}` vanished right after it was created"
        ))
    })?;
    Ok((info, true))
}

/// The state of one streaming session: the capture stage of the pipeline.
struct Streamer<'c> {
    assembler: Assembler,
    batch: Vec<OutboxEvent>,
    /// Payload bytes in `batch`.
    batch_bytes: usize,
    /// Position of the last event taken into the batch.
    batch_position: Option<SourcePosition>,
    /// End of the last transaction whose events are all in the batch (or
    /// were in earlier ones): what to confirm once the batch is acknowledged.
    confirm_after_batch: Option<Lsn>,
    /// The end of that transaction's commit record, which the synchronous
    /// standbys must have before the batch is published. The same as
    /// `confirm_after_batch` for rows; past it for messages, which confirm
    /// only to the commit LSN (`capture::stream`).
    gate_through: Option<Lsn>,
    /// Batches handed to the pipeline whose acknowledgement has not come
    /// back yet. While there are any, nothing past them may be confirmed.
    in_flight: usize,
    /// A position reached with nothing batched while batches were in
    /// flight (the end of a transaction without outbox rows, a keepalive):
    /// confirmed once every batch before it is acknowledged.
    confirm_when_idle: Option<Lsn>,
    /// Likewise for a keepalive that is not confirmed (`confirms_idle`
    /// off): only reported as cleared once the batches before it are.
    clear_when_idle: Option<Lsn>,
    /// Whether keepalives confirm the slot. Off for unmarked rows
    /// (`relay::replication::unmarked`), whose slot is confirmed only to
    /// positions a checkpoint names.
    confirms_idle: bool,
    /// Raised to every position before which each outbox row the stream
    /// carried is in Kafka (`Context::published_through`).
    published_through: Option<&'c PublishedThrough>,
    /// Where keepalives are not confirmed: when an idle stream's position
    /// is next named by a checkpoint of its own.
    idle_checkpoints: Option<IdleCheckpoints>,
    /// The catch-up filter, until the stream passes the WAL position read
    /// when streaming started; `None` after.
    catch_up: Option<CatchUpFilter<'c>>,
    batch_size: usize,
    max_batch_bytes: usize,
    /// Holds each batch until the synchronous standbys have its commits;
    /// `None` where nothing needs holding (see `relay::failover`).
    gate: Option<StandbyGate>,
    /// When the batch's first event arrived.
    batch_started: Option<Instant>,
    /// Where the catch-up filter's and the standby wait's time is counted.
    metrics: Option<&'c Metrics>,
}

/// Transactions committed before `before` may have been published already
/// (by a catch-up drain, a predecessor killed inside its window, or a relay
/// with another name), so their streamed rows are checked in the table.
struct CatchUpFilter<'c> {
    before: Lsn,
    connection: &'c mut PgConnection,
    unsent_among_sql: String,
}

impl<'c> Streamer<'c> {
    fn new(
        assembler: Assembler,
        catch_up: Option<CatchUpFilter<'c>>,
        batch_size: usize,
        max_batch_bytes: usize,
    ) -> Streamer<'c> {
        Streamer {
            assembler,
            batch: Vec::new(),
            batch_bytes: 0,
            batch_position: None,
            confirm_after_batch: None,
            gate_through: None,
            in_flight: 0,
            confirm_when_idle: None,
            clear_when_idle: None,
            confirms_idle: true,
            published_through: None,
            idle_checkpoints: None,
            catch_up,
            batch_size,
            max_batch_bytes,
            gate: None,
            batch_started: None,
            metrics: None,
        }
    }

    fn with_gate(mut self, gate: Option<StandbyGate>) -> Streamer<'c> {
        self.gate = gate;
        self
    }

    fn with_metrics(mut self, metrics: &'c Metrics) -> Streamer<'c> {
        self.metrics = Some(metrics);
        self
    }

    /// Keepalives are not confirmed, only reported through `through`;
    /// while the stream is idle a checkpoint naming its position is
    /// committed every `IDLE_CHECKPOINT_EVERY`, and the slot confirmed to it.
    fn without_idle_confirms(mut self) -> Streamer<'c> {
        self.confirms_idle = false;
        self.idle_checkpoints = Some(IdleCheckpoints::new(IDLE_CHECKPOINT_EVERY));
        self
    }

    fn reporting_to(mut self, through: &'c PublishedThrough) -> Streamer<'c> {
        self.published_through = Some(through);
        self
    }

    /// Confirms `lsn` to the server: every outbox row before it is in Kafka.
    fn confirm(&self, lsn: Lsn, stream: &mut impl ReplicationStream) {
        stream.acknowledge(lsn);
        self.cleared(lsn);
    }

    fn cleared(&self, lsn: Lsn) {
        if let Some(through) = self.published_through {
            through.raise(lsn);
        }
    }

    fn time_stage(&self, stage: Stage, since: Instant) {
        if let Some(metrics) = self.metrics {
            metrics.stage(stage, since.elapsed());
        }
    }

    /// Up to where the synchronous standbys must have the WAL before the
    /// batch may be published: the end of its last transaction, or, when
    /// it ends inside a transaction whose end has not arrived, unknown.
    fn batch_through(&self, confirm: Option<Lsn>) -> Through {
        let open = self.assembler.transaction_commit_lsn();
        let ends_inside_open = open.is_some() && self.batch_position.map(|p| p.commit_lsn) == open;
        match confirm {
            Some(end) if !ends_inside_open => Through::Commit(end),
            _ => Through::Unfinished,
        }
    }

    async fn stream(
        &mut self,
        stream: &mut impl ReplicationStream,
        mut stop: Shutdown,
        mut ends: CaptureEnds,
    ) -> Result<()> {
        loop {
            if stop.is_requested() {
                // Whatever is batched is not in Kafka and nothing of it was
                // confirmed: it is streamed again after restart.
                return Ok(());
            }
            while let Ok(acknowledged) = ends.acknowledged.try_recv() {
                self.acknowledged(acknowledged, stream);
            }
            // Batch whatever is already here; hand the batch over once the
            // stream has nothing more to give right now and the publisher
            // can take it, gathering more events while it cannot. In the
            // middle of a source transaction the rest of it is on its way
            // (pgoutput sends committed transactions whole), so wait for it
            // rather than cut a small batch that cannot be confirmed yet.
            let next = if self.batch.is_empty() || self.assembler.in_transaction() {
                tokio::select! {
                    next = stream.next() => next?,
                    Some(acknowledged) = ends.acknowledged.recv() => {
                        self.acknowledged(acknowledged, stream);
                        continue;
                    }
                    _ = stop.wait() => return Ok(()),
                }
            } else {
                match next_if_ready(stream).await {
                    Some(next) => next?,
                    // Hand over when the publisher is free (what arrives
                    // until then joins this batch); keep reading meanwhile.
                    None => tokio::select! {
                        _ = ends.demand() => {
                            let Ok(room) = ends.batches.reserve().await else {
                                // The publisher ended (shutdown or failure).
                                return Ok(());
                            };
                            if self.hand_over(room).await? {
                                ends.handed_over();
                            }
                            continue;
                        }
                        next = stream.next() => next?,
                        Some(acknowledged) = ends.acknowledged.recv() => {
                            self.acknowledged(acknowledged, stream);
                            continue;
                        }
                        _ = stop.wait() => return Ok(()),
                    },
                }
            };
            let Some(item) = next else {
                return Err(Error::retry(
                    "Postgres ended the replication stream; reconnecting",
                ));
            };
            let captured = self.assembler.accept(item)?;
            let pending = self.assembler.take_pending();
            for captured in captured.into_iter().chain(pending) {
                if !self.take(captured, &mut ends, stream).await? {
                    return Ok(());
                }
            }
        }
    }

    /// Takes one captured item into the batch (handing it over when full)
    /// or the positions to confirm. `false` once the publisher has ended.
    async fn take(
        &mut self,
        captured: Captured,
        ends: &mut CaptureEnds,
        stream: &mut impl ReplicationStream,
    ) -> Result<bool> {
        {
            match captured {
                Captured::Event(event) => {
                    self.batch_position = event.position;
                    self.batch_bytes += event.payload.as_ref().map_or(0, Vec::len);
                    if self.batch.is_empty() {
                        self.batch_started = Some(Instant::now());
                    }
                    self.batch.push(event);
                    if self.batch.len() >= self.batch_size
                        || self.batch_bytes >= self.max_batch_bytes
                    {
                        let Ok(room) = ends.batches.reserve().await else {
                            return Ok(false);
                        };
                        if self.hand_over(room).await? {
                            ends.handed_over();
                        }
                    }
                }
                Captured::TransactionEnd {
                    end_lsn,
                    confirm_lsn,
                } => {
                    if self.batch.is_empty() {
                        self.confirm_when_settled(confirm_lsn, stream, true);
                    } else {
                        self.confirm_after_batch = Some(confirm_lsn);
                        self.gate_through = Some(end_lsn);
                    }
                }
                // Nothing batched or half-read: everything the server sent
                // is settled once what is in flight is.
                Captured::Idle { wal_end }
                    if self.batch.is_empty() && !self.assembler.in_transaction() =>
                {
                    let due = self.in_flight == 0
                        && self
                            .idle_checkpoints
                            .as_ref()
                            .is_some_and(|idle| idle.due(wal_end));
                    if due {
                        let Ok(room) = ends.batches.reserve().await else {
                            return Ok(false);
                        };
                        self.checkpoint_idle(room, wal_end);
                        ends.handed_over();
                    } else {
                        self.confirm_when_settled(wal_end, stream, self.confirms_idle);
                    }
                }
                Captured::Idle { .. } => {}
            }
        }
        Ok(true)
    }

    /// Hands over a batch of no event whose checkpoint names `wal_end` as
    /// published through (nothing is in flight, nothing batched, no
    /// transaction open: every outbox row committed before it is in
    /// Kafka). Its position is one byte before, at the highest index, so
    /// a transaction committing at `wal_end` itself is still ahead of it;
    /// and its confirmation, one byte past that, is `wal_end`: the slot is
    /// confirmed to a position a checkpoint names, as always without marks.
    fn checkpoint_idle(&mut self, room: mpsc::Permit<'_, CapturedBatch>, wal_end: Lsn) {
        let position = SourcePosition {
            commit_lsn: Lsn(wal_end.0.saturating_sub(1)),
            index: u32::MAX,
        };
        if let Some(idle) = self.idle_checkpoints.as_mut() {
            idle.named(Some(wal_end));
        }
        self.in_flight += 1;
        room.send(CapturedBatch {
            events: Vec::new(),
            captured_at: Instant::now(),
            position: Some(position),
            acknowledge_with: AcknowledgeWith::Stream {
                confirm: Some(wal_end),
            },
            checkpoint_alone: true,
        });
    }

    /// Confirms `lsn` (or with `confirm` off, reports it cleared) now if
    /// no batch is in flight, else once they all are acknowledged.
    fn confirm_when_settled(
        &mut self,
        lsn: Lsn,
        stream: &mut impl ReplicationStream,
        confirm: bool,
    ) {
        match (self.in_flight == 0, confirm) {
            (true, true) => self.confirm(lsn, stream),
            (true, false) => self.cleared(lsn),
            (false, true) => self.confirm_when_idle = self.confirm_when_idle.max(Some(lsn)),
            (false, false) => self.clear_when_idle = self.clear_when_idle.max(Some(lsn)),
        }
    }

    /// A batch's rows are marked: the slot may pass it.
    fn acknowledged(&mut self, acknowledged: Acknowledged, stream: &mut impl ReplicationStream) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(lsn) = acknowledged.confirm {
            self.confirm(lsn, stream);
        }
        if self.in_flight == 0 {
            if let Some(lsn) = self.confirm_when_idle.take() {
                self.confirm(lsn, stream);
            }
            if let Some(lsn) = self.clear_when_idle.take() {
                self.cleared(lsn);
            }
        }
    }

    /// Hands the batch to the pipeline, which publishes it, marks its rows
    /// and then sends back the position the slot may be confirmed to.
    /// Whether it sent one (nothing left to publish or confirm sends none;
    /// neither does a shutdown while the standbys are waited for).
    async fn hand_over(&mut self, room: mpsc::Permit<'_, CapturedBatch>) -> Result<bool> {
        let mut events = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let captured_at = self.batch_started.take().unwrap_or_else(Instant::now);
        if let Some(filter) = self.catch_up.as_mut() {
            let before = filter.before;
            // The stream has passed everything committed before it began:
            // this batch is the last one to check.
            let passed = self.batch_position.is_some_and(|p| p.commit_lsn >= before);
            let filtering = Instant::now();
            let looked_up = keep_unsent_before(
                filter.connection,
                &filter.unsent_among_sql,
                &mut events,
                before,
            )
            .await?;
            if looked_up {
                self.time_stage(Stage::CatchUpFilter, filtering);
            }
            if passed {
                self.catch_up = None;
            }
        }
        let confirm = self.confirm_after_batch.take();
        let gate_through = self.gate_through.take();
        if events.is_empty() && confirm.is_none() {
            return Ok(false);
        }
        if !events.is_empty() {
            let through = self.batch_through(gate_through);
            if let Some(gate) = self.gate.as_mut() {
                // Nothing a failover can take back goes to Kafka. On
                // shutdown the batch is dropped unpublished and unconfirmed:
                // it is streamed again after restart.
                let waiting = Instant::now();
                if !gate.wait(through, events.len()).await? {
                    return Ok(false);
                }
                self.time_stage(Stage::SyncStandbys, waiting);
            }
        }
        // Where only checkpointed positions may be confirmed (unmarked
        // rows), a batch the catch-up filter emptied still commits one:
        // its rows are in Kafka (the drain published them), and the slot
        // confirmed past them must be a position a checkpoint names, or a
        // slot moved by someone else could not be told from it.
        let checkpoint_alone = events.is_empty() && !self.confirms_idle;
        let batch = CapturedBatch {
            events,
            captured_at,
            position: self.batch_position,
            acknowledge_with: AcknowledgeWith::Stream { confirm },
            checkpoint_alone,
        };
        if let Some(idle) = self.idle_checkpoints.as_mut() {
            idle.named(confirm);
        }
        self.in_flight += 1;
        room.send(batch);
        Ok(true)
    }
}

/// How often an idle stream's position is committed in a checkpoint of its
/// own where keepalives are not confirmed (unmarked rows): the slot then
/// holds at most about this much of the WAL others write while no outbox
/// row comes, for one Kafka transaction per interval.
const IDLE_CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

/// When an idle stream's position is due for a checkpoint of its own.
struct IdleCheckpoints {
    every: Duration,
    /// When a checkpoint last named a position, and which.
    last: tokio::time::Instant,
    last_named: Lsn,
}

impl IdleCheckpoints {
    fn new(every: Duration) -> IdleCheckpoints {
        IdleCheckpoints {
            every,
            last: tokio::time::Instant::now(),
            last_named: Lsn::ZERO,
        }
    }

    /// A checkpoint names the stream as far as `confirm`.
    fn named(&mut self, confirm: Option<Lsn>) {
        self.last = tokio::time::Instant::now();
        self.last_named = self.last_named.max(confirm.unwrap_or_default());
    }

    /// Whether an idle stream at `wal_end` should commit a checkpoint:
    /// the interval passed and the position moved since the last one.
    fn due(&self, wal_end: Lsn) -> bool {
        self.last.elapsed() >= self.every && wal_end > self.last_named
    }
}

/// The next item if the stream has one ready, letting the wire client's
/// task run once first: under a backlog the next transaction is usually
/// one task switch away, and delivering without it would cut batches short.
async fn next_if_ready(
    stream: &mut impl ReplicationStream,
) -> Option<Result<Option<crate::capture::wire::StreamItem>>> {
    if let Some(next) = stream.next().now_or_never() {
        return Some(next);
    }
    tokio::task::yield_now().await;
    stream.next().now_or_never()
}

/// Drops events of transactions committed before `before` whose rows the
/// table no longer shows unsent: the catch-up drain published them, or an
/// operator truncated them away. A row is its seq *and* event id: after
/// `TRUNCATE … RESTART IDENTITY` a streamed event of a truncated row shares
/// its seq with a new unsent row, and by seq alone it would be published
/// and its acknowledgement would mark the new row, never published.
/// Returns whether the table was asked: only a batch with rows committed
/// before `before` needs it.
async fn keep_unsent_before(
    connection: &mut PgConnection,
    unsent_among_sql: &str,
    events: &mut Vec<OutboxEvent>,
    before: Lsn,
) -> Result<bool> {
    let is_early = |event: &OutboxEvent| event.position.is_some_and(|p| p.commit_lsn < before);
    let early: Vec<i64> = events
        .iter()
        .filter(|e| is_early(e))
        .map(|e| e.seq)
        .collect();
    if early.is_empty() {
        return Ok(false);
    }
    let unsent: std::collections::HashSet<(i64, String)> = sqlx::query_as(unsent_among_sql)
        .bind(&early)
        .fetch_all(connection)
        .await
        .map_err(|e| Error::from_postgres("checking which streamed rows are still unsent", e))?
        .into_iter()
        .collect();
    let before_len = events.len();
    events.retain(|event| !is_early(event) || unsent.contains(&(event.seq, event.id.clone())));
    if events.len() < before_len {
        tracing::debug!(
            already_published = before_len - events.len(),
            "streamed rows the catch-up drain had already published (or that were truncated) \
             were not produced again"
        );
    }
    Ok(true)
}

pub(super) mod messages;
mod unmarked;
pub(super) use unmarked::marking_refused;

#[cfg(test)]
mod tests;
