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
//! checkpoint names; `deliver` publishes one batch.

mod deliver;
mod pipeline;
mod polling;
mod replication;
mod takeover;
mod topic_gate;
mod window;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use crate::acknowledge::Acknowledger;
use crate::capture::slot;
use crate::capture::wakeup::Wakeup;
use crate::config::{CaptureMode, Config};
use crate::error::{Error, ErrorKind, Result};
use crate::kafka::topics;
use crate::lag;
use crate::leader;
use crate::metrics::{Metrics, RelayState};
use crate::retention;
use crate::routing::Router;
use crate::schema;
use crate::setup::Setup;
use crate::shutdown::Shutdown;
use crate::table::{OutboxTable, PayloadEncoding};
use deliver::Deliverer;

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

/// What a session needs, built once from the config.
struct Context {
    config: Config,
    table: OutboxTable,
    /// `schema.table`, written into every checkpoint.
    table_name: String,
    router: Router,
    acknowledger: Acknowledger,
    connect_options: PgConnectOptions,
    metrics: Arc<Metrics>,
}

impl Context {
    fn new(setup: Setup, metrics: Arc<Metrics>) -> Context {
        let Setup {
            config,
            table,
            router,
            connect_options,
        } = setup;
        Context {
            table_name: table.display_name(),
            acknowledger: Acknowledger::new(&table, config.relay.after_publish),
            config,
            table,
            router,
            connect_options,
            metrics,
        }
    }

    /// A new connection whose commits are durable (`durable_acknowledgements`);
    /// `doing` names it in the error.
    async fn connect(&self, doing: &str) -> Result<PgConnection> {
        let mut connection = PgConnection::connect_with(&self.connect_options)
            .await
            .map_err(|e| Error::from_postgres(doing, e))?;
        durable_acknowledgements(&mut connection).await?;
        Ok(connection)
    }

    /// One leadership term: from connecting to the first failure or shutdown.
    async fn session(&self, mut stop: Shutdown) -> Result<()> {
        let config = &self.config;
        let mut connection = self.connect("connecting to Postgres").await?;
        let report =
            schema::inspect(&mut connection, &self.table, config.relay.after_publish).await?;
        if let Some(problem) = report.problems(&self.table).into_iter().next() {
            return Err(Error::stop(problem).because(crate::error::Cause::OutboxTable));
        }
        if let Some(mismatch) = report.partitioning_mismatch(&self.table) {
            tracing::warn!("{mismatch}");
        }
        self.metrics.set_state(RelayState::Standby);
        if !leader::acquire(
            &mut connection,
            &self.table_name,
            &config.relay.name,
            &mut stop,
        )
        .await?
        {
            return Ok(());
        }
        let mode = choose_mode(config.capture.mode, &mut connection).await?;
        self.metrics.set_capture_mode(match mode {
            CaptureMode::Replication => "replication",
            _ => "polling",
        });
        if mode == CaptureMode::Polling && !report.has_notify_trigger {
            tracing::warn!(
                table = %self.table_name,
                poll_interval = ?config.capture.poll_interval,
                "no insert trigger calls pg_notify on the outbox table; new rows wait up to the poll interval. \
                 The trigger is in migrations/0001_outbox.sql"
            );
        }

        topics::ensure_checkpoint_topic(config).await?;
        let source = schema::database_source(&mut connection).await;
        let Some(takeover::TakenOver { publisher, latest }) =
            takeover::take_over(self, &mut connection, source.as_deref(), &stop).await?
        else {
            return Ok(());
        };
        // Ends with the session: only the leader deletes old rows and
        // manages partitions.
        let housekeeping = retention::Plan {
            table: self.table.clone(),
            retention: config.relay.retention,
            partitioning: self
                .table
                .partitioning
                .clone()
                .filter(|_| report.partitioned),
            after_publish: config.relay.after_publish,
        };
        let _housekeeping = housekeeping.is_needed().then(|| {
            AbortOnDrop(retention::spawn(
                self.connect_options.clone(),
                housekeeping,
                stop.clone(),
            ))
        });

        let mut session = Session {
            context: self,
            connection,
            deliverer: Deliverer::new(
                &self.router,
                publisher,
                &self.table_name,
                source,
                config.relay.on_poison,
                topic_gate::TopicGate::new(config, &self.metrics)?,
                &self.metrics,
            ),
            payload_encoding: report.payload_encoding,
            stop,
        };
        match mode {
            CaptureMode::Replication => replication::run(&mut session, Some(&latest)).await,
            _ => {
                warn_if_a_slot_is_left(&mut session.connection, &config.slot_name()).await;
                let wakeup = Wakeup::listen(
                    &self.connect_options,
                    &config.postgres.notify_channel,
                    config.capture.poll_interval,
                )
                .await?;
                tracing::info!(
                    table = %self.table_name,
                    mode = "polling",
                    batch_size = config.capture.batch_size,
                    "relay started"
                );
                polling::run(&mut session, polling::Until::Shutdown(wakeup)).await
            }
        }
    }
}

/// What one leadership term works with.
struct Session<'a> {
    context: &'a Context,
    /// Holds the leader lock; claims and acknowledgements run on it.
    connection: PgConnection,
    deliverer: Deliverer<'a>,
    payload_encoding: PayloadEncoding,
    stop: Shutdown,
}

/// Makes the session's commits wait for their WAL to be flushed.
///
/// With `synchronous_commit = off`, a Postgres crash forgets the last
/// commits even though they returned: for the relay, rows it marked sent
/// would be unsent again after recovery and published a second time (only
/// the latest checkpoint's rows are reconciled). Services may keep `off` for
/// their own transactions; this only changes the relay's session, and only
/// when it is `off` (a stronger setting such as `remote_apply` is kept).
async fn durable_acknowledgements(connection: &mut PgConnection) -> Result<()> {
    let changed = make_commits_durable(connection)
        .await
        .map_err(|e| Error::from_postgres("setting synchronous_commit for the relay session", e))?;
    if changed {
        tracing::debug!(
            "synchronous_commit is off for this role or server; the relay's own session uses on, \
             so a Postgres crash cannot forget which rows were marked sent"
        );
    }
    Ok(())
}

/// Sets `synchronous_commit = on` for this connection if it is `off`
/// (see `durable_acknowledgements`); says whether it changed it. At the
/// level of sqlx errors, so a pool's `after_connect` can run it too.
pub(super) async fn make_commits_durable(connection: &mut PgConnection) -> sqlx::Result<bool> {
    let setting: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut *connection)
        .await?;
    if setting != "off" {
        return Ok(false);
    }
    sqlx::query("SET synchronous_commit = on")
        .execute(&mut *connection)
        .await?;
    Ok(true)
}

/// Polling never reads this relay's replication slot; if one is left from
/// running in replication mode, it keeps WAL on the server for nothing.
async fn warn_if_a_slot_is_left(connection: &mut PgConnection, slot_name: &str) {
    if let Ok(Some(info)) = slot::inspect(connection, slot_name).await {
        tracing::warn!(
            slot = slot_name,
            retained_bytes = info.retained_bytes,
            "capture is polling, but this relay's replication slot still exists and makes Postgres \
             keep WAL for it. Drop it (SELECT pg_drop_replication_slot('{slot_name}')) if you stay \
             with polling; replication mode would reuse it safely"
        );
    }
}

/// Resolves `auto` (replication where the server and role allow it, else
/// polling) and refuses `replication` where it cannot work. Says which and why.
async fn choose_mode(
    configured: CaptureMode,
    connection: &mut PgConnection,
) -> Result<CaptureMode> {
    if configured == CaptureMode::Polling {
        return Ok(CaptureMode::Polling);
    }
    let support = slot::server_support(connection).await?;
    match (configured, support.replication_unavailable()) {
        (CaptureMode::Replication, Some(reason)) => Err(Error::stop(format!(
            "capture.mode is `replication` but {reason}; fix that, or use capture.mode: auto or polling"
        ))),
        (CaptureMode::Auto, Some(reason)) => {
            tracing::warn!(
                %reason,
                "capture mode auto chose polling: logical replication is unavailable. Polling works, \
                 with one claim query per batch; fix the reason to stream instead"
            );
            Ok(CaptureMode::Polling)
        }
        (CaptureMode::Auto, None) => {
            tracing::info!("capture mode auto chose replication: wal_level is logical and the role may replicate");
            Ok(CaptureMode::Replication)
        }
        (mode, None) => Ok(mode),
        (CaptureMode::Polling, Some(_)) => Ok(CaptureMode::Polling),
    }
}
