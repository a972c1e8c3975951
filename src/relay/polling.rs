//! The polling capture stage: claim unsent rows, each claim in a
//! transaction of its own, and hand them to the pipeline.
//!
//! ```text
//!  claim connection 1: BEGIN; claim ≤ batch_size FOR UPDATE SKIP LOCKED ─▶ pipeline ─▶ mark; COMMIT
//!  claim connection 2:        BEGIN; claim the next rows (skips 1's) ───▶ pipeline ─▶ mark; COMMIT
//!  …
//! ```
//!
//! Invariant: a claimed row stays locked by its claim's transaction until
//! the marks of its committed Kafka transaction commit in that same
//! transaction, so the next claim, which runs while earlier batches are
//! still being published, never takes a row already claimed (`SKIP
//! LOCKED`), and a row is acknowledged only after its Kafka transaction
//! committed (`pipeline`). A row that commits late (a lower seq) is claimed
//! by a later round: claims filter on `sent_at IS NULL`, not on a cursor.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::pipeline::{self, AcknowledgeWith, CaptureEnds, CapturedBatch};
use super::session::Session;
use crate::capture::polling;
use crate::capture::wakeup::Wakeup;
use crate::error::{Error, Result};
use crate::leader;
use crate::metrics::{Metrics, Stage};
use crate::shutdown::Shutdown;

/// How long the polling loop runs.
pub enum Until {
    /// Until shutdown, waiting on the wakeup whenever nothing is unsent.
    Shutdown(Wakeup),
    /// Until no unsent row with seq ≤ this is left: the catch-up before
    /// replication streaming starts. Bounded, so it ends even while
    /// services keep writing (their new rows are in the stream).
    DrainedUpTo(i64),
}

pub async fn run(session: &mut Session<'_>, until: Until) -> Result<()> {
    let context = session.context;
    let config = &context.config;
    let table = &context.table;
    // Only CloudEvents' `time` needs created_at as text: not formatted per row otherwise.
    let created_at_text = config.routing.cloudevents.enabled;
    let (claim_sql, up_to) = match &until {
        Until::Shutdown(_) => (
            table.claim_sql(session.payload_encoding, created_at_text),
            None,
        ),
        Until::DrainedUpTo(seq) => (
            table.claim_up_to_sql(session.payload_encoding, created_at_text),
            Some(*seq),
        ),
    };
    let first_unsent_after_sql = table.first_unsent_after_sql(up_to.is_some());
    let unacknowledged_batches = config.relay.unacknowledged_batches;
    // One claim waits for the publisher, one is published, the rest are in
    // the window waiting for their marks, and one is being claimed.
    let claims = claim_pool(
        &context.connect_options,
        &session.leadership,
        unacknowledged_batches + 2,
    );
    let claim = Claim {
        metrics: &context.metrics,
        claims: claims.clone(),
        claim_sql,
        first_unsent_after_sql,
        limits: polling::ClaimLimits {
            rows: config.capture.batch_size,
            bytes: config.capture.batch_bytes,
            sized_rows: config.capture.batch_size,
        },
        up_to,
    };
    let stop = session.stop.clone();
    let outcome = pipeline::run(
        &mut session.connection,
        &mut session.deliverer,
        &context.acknowledger,
        None,
        unacknowledged_batches,
        &session.stop,
        |ends| claim.run(until, stop, ends),
    )
    .await;
    claims.close().await;
    outcome
}

/// Longest wait for a free claim connection; the stages ahead of the claim
/// have limits of their own well below it.
const CLAIM_WAIT: Duration = Duration::from_secs(3600);

/// Connections that each hold one claim's transaction open until its
/// marks commit. Opened on first use; waiting for a free one is the
/// pipeline's back-pressure, not an error, so the wait has no short limit.
fn claim_pool(
    connect_options: &PgConnectOptions,
    leadership: &leader::Leadership,
    size: usize,
) -> PgPool {
    let leadership = leadership.clone();
    PgPoolOptions::new()
        .max_connections(u32::try_from(size).unwrap_or(u32::MAX))
        .min_connections(0)
        .acquire_timeout(CLAIM_WAIT)
        // Waiting here is back-pressure (earlier batches still publishing or
        // marking), not a slow pool worth sqlx's warning on every claim.
        .acquire_slow_threshold(CLAIM_WAIT)
        .test_before_acquire(false)
        .after_connect(move |connection, _| {
            let leadership = leadership.clone();
            Box::pin(async move {
                // One of this leader's claim connections, until it closes:
                // a successor waits for it before claiming, and it claims
                // nothing if this leader has lost its lock (see `leader`).
                leader::join_claims(connection, &leadership).await?;
                // See `durable_acknowledgements`: the marks commit on these
                // connections, and must survive a Postgres crash.
                super::durable::make_commits_durable(connection).await?;
                super::durable::keep_claims_open(connection).await?;
                Ok(())
            })
        })
        .connect_lazy_with(connect_options.clone())
}

struct Claim<'a> {
    metrics: &'a Metrics,
    claims: PgPool,
    claim_sql: String,
    first_unsent_after_sql: String,
    limits: polling::ClaimLimits,
    up_to: Option<i64>,
}

impl Claim<'_> {
    async fn run(self, mut until: Until, mut stop: Shutdown, mut ends: CaptureEnds) -> Result<()> {
        // Whether the last claim was full: rows are waiting, so the next
        // claim runs ahead, while the publisher is still busy.
        let mut backlog = false;
        // Claims size only the rows above the highest seq claimed this
        // session: the open claims hold the rows at or below it.
        let mut floor = polling::SizingFloor::default();
        // The smallest payload of the last claim: how many rows to size.
        let mut smallest_payload: Option<usize> = None;
        loop {
            if stop.is_requested() {
                return Ok(());
            }
            // Without a backlog, claim when the publisher is free: a claim
            // made while it is busy would miss what arrives meanwhile, and
            // those rows would wait a whole transaction longer.
            if !backlog {
                tokio::select! {
                    _ = ends.demand() => {}
                    _ = stop.wait() => return Ok(()),
                }
            }
            // Claim only once the publisher can take the batch: rows claimed
            // early would wait, locked, while later ones pile up unclaimed.
            let room = tokio::select! {
                room = ends.batches.reserve() => match room {
                    Ok(room) => room,
                    // The publisher ended (shutdown or failure).
                    Err(_closed) => return Ok(()),
                },
                _ = stop.wait() => return Ok(()),
            };
            let mut transaction = tokio::select! {
                begun = self.claims.begin() => begun
                    .map_err(|e| Error::from_postgres("starting a claim transaction", e))?,
                _ = stop.wait() => return Ok(()),
            };
            let claiming = std::time::Instant::now();
            let limits = polling::ClaimLimits {
                sized_rows: self.limits.sized_rows_after(smallest_payload),
                ..self.limits
            };
            let events = polling::claim_batch(
                &mut transaction,
                &self.claim_sql,
                limits,
                floor.sized_after(),
                self.up_to,
            )
            .await?;
            if !events.is_empty() {
                smallest_payload = events
                    .iter()
                    .map(|event| event.payload.as_ref().map_or(0, Vec::len))
                    .min();
            }
            if let Some(highest) = events.iter().map(|event| event.seq).max() {
                floor.claimed(highest);
            }
            self.metrics.stage(Stage::Claim, claiming.elapsed());
            // A claim cut short by its bytes leaves rows waiting too.
            let bytes: usize = events
                .iter()
                .map(|event| event.payload.as_ref().map_or(0, Vec::len))
                .sum();
            backlog = events.len() >= self.limits.rows || bytes >= self.limits.bytes / 2;
            if events.is_empty() {
                // Every row the claim sized may be held locked by another
                // session (a service's FOR SHARE), or one may have just
                // committed: claim again, and size past it if it stays.
                let unsent = polling::first_unsent_after(
                    &mut transaction,
                    &self.first_unsent_after_sql,
                    floor.sized_after(),
                    self.up_to,
                )
                .await?;
                release(transaction).await?;
                if let Some(seq) = unsent {
                    floor.empty_claim_left(seq);
                    continue;
                }
                match &mut until {
                    Until::Shutdown(wakeup) => wakeup.wait(&mut stop).await,
                    Until::DrainedUpTo(_) => return Ok(()),
                }
                continue;
            }
            let batch = CapturedBatch {
                events,
                captured_at: std::time::Instant::now(),
                position: None,
                acknowledge_with: AcknowledgeWith::Claim(transaction),
                checkpoint_alone: false,
            };
            room.send(batch);
            ends.handed_over();
        }
    }
}

/// Releases the claimed rows; a failure here means the connection is gone,
/// and Postgres releases them itself.
async fn release(transaction: sqlx::Transaction<'static, sqlx::Postgres>) -> Result<()> {
    transaction
        .rollback()
        .await
        .map_err(|e| Error::from_postgres("releasing claimed rows", e))
}
