//! The pipeline both capture modes feed: capturing the next batch, the
//! Kafka transaction of the current one and the acknowledgement of earlier
//! ones run at the same time, joined by bounded channels.
//!
//! ```text
//!  capture ──▶ [1 batch waiting] ──▶ publish ──▶ [window] ──▶ acknowledge
//!   (claim or stream)           (one Kafka transaction    (mark rows sent;
//!      ▲                         after another)            then the slot
//!      │                               ▲                   may be confirmed)
//!      └──── slot positions safe to confirm ◀──────────────┤
//!                                      └── acknowledged ◀──┘
//! ```
//!
//! Invariants:
//! - Batches are published in the order they were captured, and
//!   acknowledged in the order they were published: per aggregate, Kafka
//!   order is capture order, and the slot is confirmed monotonically.
//! - A batch is acknowledged only after its Kafka transaction committed; a
//!   stage that fails ends the session, and what was committed but not yet
//!   acknowledged is named by the latest checkpoint (`window`), which the
//!   next session reconciles before it publishes anything.
//! - Memory is bounded: one batch waits for the publisher, at most
//!   `relay.unacknowledged_batches` wait for their marks, and each batch is
//!   bounded by `capture.batch_size` (and `capture.batch_bytes`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::{mpsc, Notify};

use super::deliver::{Delivered, Deliverer};
use super::window::Window;
use crate::acknowledge::Acknowledger;
use crate::error::{Error, Result};
use crate::event::{OutboxEvent, SourcePosition};
use crate::failpoint;
use crate::leader;
use crate::metrics::{Metrics, Stage};
use crate::postgres::lsn::Lsn;
use crate::shutdown::Shutdown;

/// One batch from capture, with what acknowledging it takes.
pub(super) struct CapturedBatch {
    pub events: Vec<OutboxEvent>,
    /// When the batch's first row was in the relay's hands.
    pub captured_at: Instant,
    /// Replication: the stream position of the batch's last event.
    pub position: Option<SourcePosition>,
    pub acknowledge_with: AcknowledgeWith,
    /// Commit a checkpoint naming `position` even with no event: an idle
    /// stream's position moves on (`relay::replication`, idle checkpoints).
    pub checkpoint_alone: bool,
}

/// How a batch's rows are acknowledged once its Kafka transaction committed.
pub(super) enum AcknowledgeWith {
    /// Polling: the transaction that claimed the rows and holds their
    /// locks; the marks commit in it, so no other claim can take them.
    Claim(Transaction<'static, Postgres>),
    /// Replication: marks on the acknowledgement connection, then the slot
    /// may be confirmed up to `confirm` (the end of the last source
    /// transaction the batch completes), if any.
    Stream { confirm: Option<Lsn> },
}

/// Replication: a batch was acknowledged; the slot may be confirmed up to
/// the position it carried.
pub(super) struct Acknowledged {
    pub confirm: Option<Lsn>,
}

/// What the capture stage sends batches into and hears acknowledgements
/// from. The capture stage ends by returning; the pipeline then publishes
/// and acknowledges what it already handed over, and returns. `batches`
/// has room for one batch, and only while the publisher can take it: a
/// capture stage reserves room before it claims, or keeps gathering while
/// there is none; with rows waiting but no backlog it waits for demand.
pub(super) struct CaptureEnds {
    pub batches: mpsc::Sender<CapturedBatch>,
    pub acknowledged: mpsc::UnboundedReceiver<Acknowledged>,
    /// Asked each time the publisher is free for the next batch. A capture
    /// stage with rows waiting hands over (polling: claims) on it, not
    /// before: what arrives while the current transaction runs then joins
    /// the next batch instead of waiting one transaction longer. Under a
    /// backlog (a full batch) it claims or hands over ahead.
    pub demand: Arc<Demand>,
    /// Batches handed over so far: each answers one ask, made or to come.
    answered: u64,
}

impl CaptureEnds {
    pub fn new(
        batches: mpsc::Sender<CapturedBatch>,
        acknowledged: mpsc::UnboundedReceiver<Acknowledged>,
        demand: Arc<Demand>,
    ) -> CaptureEnds {
        CaptureEnds {
            batches,
            acknowledged,
            demand,
            answered: 0,
        }
    }

    /// Resolves once the publisher asks for a batch it has not been handed
    /// (by the hand-overs so far). Borrows nothing, so it can wait beside
    /// the other ends.
    pub fn demand(&self) -> impl Future<Output = ()> + 'static {
        let demand = Arc::clone(&self.demand);
        let answered = self.answered;
        async move {
            while demand.asked.load(Ordering::Acquire) <= answered {
                demand.notify.notified().await;
            }
        }
    }

    /// A batch went to the publisher.
    pub fn handed_over(&mut self) {
        self.answered += 1;
    }
}

/// The publisher's asks for the next batch, counted. Counted, not a
/// flag: the publisher can be handed a batch, publish it and ask again
/// before the capture stage has noted the hand-over (at once, for a batch
/// the catch-up filter emptied), and an ask taken for the answered one
/// would leave the capture stage waiting on rows it holds for good.
#[derive(Debug, Default)]
pub(super) struct Demand {
    asked: AtomicU64,
    notify: Notify,
}

impl Demand {
    /// The publisher is free: the next batch, please.
    pub fn ask(&self) {
        self.asked.fetch_add(1, Ordering::AcqRel);
        // A stored permit wakes a capture stage that checked just before.
        self.notify.notify_one();
    }
}

/// A committed batch on its way to acknowledgement.
struct Committed {
    id: u64,
    committed_at: Instant,
    delivered: Delivered,
    acknowledge_with: AcknowledgeWith,
}

/// Runs `capture` and the publish and acknowledge stages together until
/// capture ends and everything it handed over is acknowledged (or, on
/// shutdown, until what was committed is acknowledged), or until the first
/// stage fails or the `leader` connection (holding the leader lock) does.
/// `stream_acks` is the replication stage's own connection for marks
/// (polling marks inside each claim's transaction).
pub(super) async fn run<F>(
    leader: &mut PgConnection,
    deliverer: &mut Deliverer<'_>,
    acknowledger: &Acknowledger,
    stream_acks: Option<&mut PgConnection>,
    unacknowledged_batches: usize,
    stop: &Shutdown,
    capture: impl FnOnce(CaptureEnds) -> F,
) -> Result<()>
where
    F: Future<Output = Result<()>>,
{
    let (batches, captured) = mpsc::channel(1);
    let (committed_sender, committed) = mpsc::channel(unacknowledged_batches.max(1));
    let (acknowledged_sender, acknowledged) = mpsc::unbounded_channel();
    let (done_sender, done) = mpsc::unbounded_channel();
    let demand = Arc::new(Demand::default());
    let capture = capture(CaptureEnds::new(batches, acknowledged, Arc::clone(&demand)));
    let metrics = deliverer.metrics();
    let publish = publish(
        deliverer,
        captured,
        demand,
        committed_sender,
        done,
        Window::new(unacknowledged_batches),
        stop.clone(),
    );
    let acknowledge = acknowledge(
        metrics,
        acknowledger,
        stream_acks,
        committed,
        done_sender,
        acknowledged_sender,
    );
    tokio::select! {
        outcome = async { tokio::try_join!(capture, publish, acknowledge) } => outcome.map(|_| ()),
        lost = watch_leader(leader) => Err(lost),
    }
}

/// How often the connection holding the leader lock is checked.
const LEADER_CHECK: Duration = Duration::from_secs(2);

/// Resolves when the connection holding the leader lock fails: the lock is
/// gone, so the session must end and its claim connections with it (see
/// `leader`). Nothing else runs on that connection while the pipeline does.
async fn watch_leader(leader: &mut PgConnection) -> Error {
    loop {
        tokio::time::sleep(LEADER_CHECK).await;
        match tokio::time::timeout(LEADER_CHECK * 5, leader::still_leading(leader)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return error,
            Err(_elapsed) => {
                return Error::retry(
                    "the connection holding the leader lock did not answer within 10 s; ending \
                     the session (its claims end with it) and competing for the lock again",
                )
            }
        }
    }
}

/// Publishes captured batches one Kafka transaction after another, each
/// checkpoint naming the window of batches not yet acknowledged.
async fn publish(
    deliverer: &mut Deliverer<'_>,
    mut captured: mpsc::Receiver<CapturedBatch>,
    demand: Arc<Demand>,
    committed: mpsc::Sender<Committed>,
    mut done: mpsc::UnboundedReceiver<u64>,
    mut window: Window,
    mut stop: Shutdown,
) -> Result<()> {
    let mut next_id: u64 = 0;
    loop {
        // Room in the window first, then take the next batch: capture hands
        // a batch over (and polling claims the next) only when it can be
        // published at once, so while marks lag, capture keeps gathering
        // rows into one larger batch instead of queueing small stale ones.
        while let Ok(acknowledged) = done.try_recv() {
            window.acknowledged(acknowledged);
        }
        while !window.has_room() {
            match done.recv().await {
                Some(acknowledged) => window.acknowledged(acknowledged),
                // The acknowledge stage ended: it failed, and says why.
                None => return Ok(()),
            }
        }
        demand.ask();
        let Some(batch) = captured.recv().await else {
            return Ok(());
        };
        if stop.is_requested() {
            // Not published: its claim is rolled back (polling) or it is
            // streamed again (replication; nothing of it was confirmed).
            return Ok(());
        }
        next_id += 1;
        let id = next_id;
        let delivered = if batch.events.is_empty() && !batch.checkpoint_alone {
            // Every event was found published already (replication's
            // catch-up filter); the batch still carries a slot position.
            Delivered::default()
        } else {
            deliverer
                .metrics()
                .stage(Stage::Queued, batch.captured_at.elapsed());
            let Some(mut delivered) = deliverer
                .deliver(&batch.events, batch.position, &window, &mut stop)
                .await?
            else {
                return Ok(());
            };
            window.committed(
                id,
                &delivered.published,
                &delivered.dead_lettered,
                std::mem::take(&mut delivered.row_ids),
            );
            delivered
        };
        let committed_batch = Committed {
            id,
            committed_at: Instant::now(),
            delivered,
            acknowledge_with: batch.acknowledge_with,
        };
        if committed.send(committed_batch).await.is_err() {
            return Ok(());
        }
    }
}

/// Acknowledges committed batches in the order they were published.
async fn acknowledge(
    metrics: &Metrics,
    acknowledger: &Acknowledger,
    mut stream_acks: Option<&mut PgConnection>,
    mut committed: mpsc::Receiver<Committed>,
    done: mpsc::UnboundedSender<u64>,
    acknowledged: mpsc::UnboundedSender<Acknowledged>,
) -> Result<()> {
    while let Some(batch) = committed.recv().await {
        // Timed only for batches with rows: one observation per Kafka
        // transaction (a batch the catch-up filter emptied has none).
        let has_rows =
            !batch.delivered.published.is_empty() || !batch.delivered.dead_lettered.is_empty();
        if has_rows {
            metrics.stage(Stage::WaitForMarks, batch.committed_at.elapsed());
        }
        let marking = Instant::now();
        if let Some(delay) = failpoint::mark_delay() {
            tokio::time::sleep(delay).await;
        }
        let (published, dead_lettered) = batch.delivered.rows();
        let (published, dead_lettered) = (&published[..], &dead_lettered[..]);
        match batch.acknowledge_with {
            AcknowledgeWith::Claim(mut transaction) => {
                acknowledger
                    .acknowledge(&mut transaction, published, dead_lettered)
                    .await?;
                failpoint::kill_point("after-mark");
                transaction.commit().await.map_err(|e| {
                    Error::from_postgres(
                        "committing the acknowledgement (the checkpoint will repair it)",
                        e,
                    )
                })?;
            }
            AcknowledgeWith::Stream { confirm } => {
                if !published.is_empty() || !dead_lettered.is_empty() {
                    let connection = stream_acks.as_deref_mut().ok_or_else(|| {
                        Error::stop("internal: a streamed batch reached a pipeline without an acknowledgement connection")
                    })?;
                    acknowledger
                        .acknowledge_streamed(connection, published, dead_lettered)
                        .await?;
                    failpoint::kill_point("after-mark");
                }
                // The capture stage confirms the slot; if it ended, the
                // position is confirmed by the next session instead.
                let _ = acknowledged.send(Acknowledged { confirm });
            }
        }
        if has_rows {
            metrics.stage(Stage::Mark, marking.elapsed());
        }
        let _ = done.send(batch.id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends() -> (Arc<Demand>, CaptureEnds) {
        let demand = Arc::new(Demand::default());
        let (batches, _) = mpsc::channel(1);
        let (_, acknowledged) = mpsc::unbounded_channel();
        (
            Arc::clone(&demand),
            CaptureEnds::new(batches, acknowledged, demand),
        )
    }

    async fn resolves(ends: &CaptureEnds) -> bool {
        tokio::time::timeout(Duration::from_millis(50), ends.demand())
            .await
            .is_ok()
    }

    /// The race that stalled a stream after a catch-up drain: the
    /// publisher took a batch the filter had emptied, "published" it at
    /// once and asked again, all before the capture stage noted the
    /// hand-over, which then swallowed the new ask and waited for good.
    #[tokio::test]
    async fn an_ask_made_before_the_hand_over_is_noted_is_kept() {
        let (demand, mut ends) = ends();
        assert!(!resolves(&ends).await, "nobody asked yet");
        demand.ask();
        // Handed over; the publisher asks again before it is noted.
        demand.ask();
        ends.handed_over();
        assert!(resolves(&ends).await, "the second ask is still open");
        ends.handed_over();
        assert!(!resolves(&ends).await, "both asks are answered");
    }

    /// A full batch handed over ahead of the ask answers the ask to come.
    #[tokio::test]
    async fn a_batch_handed_over_ahead_answers_the_next_ask() {
        let (demand, mut ends) = ends();
        ends.handed_over();
        demand.ask();
        assert!(!resolves(&ends).await);
        demand.ask();
        assert!(resolves(&ends).await);
    }
}
