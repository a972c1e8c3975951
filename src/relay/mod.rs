//! The relay: one leadership term after another, each a session that
//! connects, becomes leader, settles the last checkpoint, then captures and
//! publishes until shutdown or failure.
//!
//! ```text
//!  connect ─▶ leader lock ─▶ choose capture mode ─▶ takeover (fence every
//!        earlier leader, read the table's checkpoint, reconcile)
//!        ─▶ polling::run | replication::run
//! ```
//!
//! Invariant: transient failures restart the whole session with backoff, so
//! every restart re-fences, re-reads the checkpoint and reconciles before
//! anything new is published. `polling` and `replication` are the capture
//! stages; both feed one `pipeline` (capture, publish and acknowledge at
//! once), whose `window` of committed but unmarked batches every
//! checkpoint names; `deliver` publishes one batch; `catch_up` publishes
//! from the table the rows a replication slot's stream cannot carry. This
//! file is the retry loop; `session` is one term's set-up, `takeover` its
//! fence and reconcile, `durable` the Postgres settings its connections need,
//! `failover` what a replication session sets up against a failover.

mod catch_up;
mod deliver;
mod durable;
mod failover;
mod pipeline;
mod polling;
mod replication;
mod schemas;
mod session;
mod takeover;
mod topic_gate;
mod window;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::error::{ErrorKind, Result};
use crate::lag;
use crate::metrics::{Metrics, RelayState};
use crate::setup::Setup;
use crate::shutdown::Shutdown;
use session::Context;

/// A session that ran this long without failing resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// Runs the relay until `shutdown` resolves (then returns `Ok`) or a
/// failure that must stop it (then returns the error). Transient failures
/// are retried here with exponential backoff. Everything it does shows in
/// `metrics`.
pub async fn run(
    setup: Setup,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (trigger, stop) = crate::shutdown::channel();
    tokio::spawn(async move {
        shutdown.await;
        trigger.request();
    });
    let context = Context::new(setup, Arc::clone(&metrics));
    let _sampler = AbortOnDrop(lag::spawn(
        &context.config,
        context.connect_options.clone(),
        &context.table,
        Arc::clone(&metrics),
        stop.clone(),
    ));
    let grace = context.config.relay.shutdown_grace;
    let mut backoff = new_backoff();
    loop {
        let started = Instant::now();
        let session = context.session(stop.clone());
        tokio::pin!(session);
        let outcome = tokio::select! {
            outcome = &mut session => outcome,
            _ = grace_after_stop(stop.clone(), grace) => {
                metrics.set_state(RelayState::Stopping);
                tracing::warn!(
                    ?grace,
                    "relay.shutdown_grace passed while waiting on Kafka or Postgres; abandoning the \
                     unacknowledged batch, which is published exactly once after restart"
                );
                return Ok(());
            }
        };
        let was_leading = metrics.state() == RelayState::Leading;
        metrics.set_state(RelayState::Stopping);
        match outcome {
            Ok(()) => {
                tracing::info!("shutdown requested; relay stopped and released the leader lock");
                return Ok(());
            }
            Err(error) if error.kind == ErrorKind::Stop => {
                metrics.error(error.kind);
                return Err(error);
            }
            Err(error) => {
                metrics.error(error.kind);
                metrics.set_state(RelayState::Retrying);
                if was_leading {
                    tracing::warn!(
                        "leadership ended with the failed session; the lock is released"
                    );
                }
                if started.elapsed() > HEALTHY_SESSION {
                    backoff = new_backoff();
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(
                    error = %error,
                    retry_in = ?delay,
                    "relay session failed; nothing unpublished was acknowledged. Reconnecting and resuming from the last checkpoint"
                );
                if stop.clone().requested_within(delay).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Resolves `grace` after shutdown was requested.
async fn grace_after_stop(mut stop: Shutdown, grace: Duration) {
    stop.wait().await;
    tokio::time::sleep(grace).await;
}

/// Ends a background task with whatever owns this: the relay (lag sampler)
/// or a session (retention).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn new_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}
