//! The relay loop: claim → route → publish in a Kafka transaction →
//! acknowledge, over and over, as the leader of its relay name.
//!
//! ```text
//!  connect ─▶ leader lock ─▶ init_transactions ─▶ read checkpoint ─▶ reconcile
//!                                                                      │
//!        ┌─────────────────────────────────────────────────────────────┘
//!        ▼
//!  BEGIN; claim ≤ batch_size rows FOR UPDATE SKIP LOCKED
//!        ▼
//!  Kafka: begin · events + checkpoint · commit
//!        ▼
//!  mark rows sent; COMMIT            (then the next claim)
//! ```
//!
//! Invariant: a row is acknowledged only after the Kafka transaction holding
//! it committed, and the next claim starts only after that acknowledgement
//! committed (see `kafka::checkpoint` for why this makes restarts exactly-once).
//! Transient failures restart the whole session with backoff, so every
//! restart re-fences, re-reads the checkpoint and reconciles.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;

use crate::acknowledge::Acknowledger;
use crate::batch::Batch;
use crate::capture::polling;
use crate::capture::wakeup::Wakeup;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::kafka::checkpoint::{self, Checkpoint};
use crate::kafka::publisher::{PublishError, Publisher};
use crate::kafka::topics;
use crate::leader;
use crate::routing::Router;
use crate::schema;
use crate::table::OutboxTable;

/// How often the relay logs what it has done.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// A session that ran this long without failing resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);
/// How long a session may take to finish its batch after shutdown is
/// requested before it is abandoned. Abandoning is safe: nothing of the
/// batch was acknowledged, so it is published exactly once after restart.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the relay until `shutdown` resolves (then returns `Ok`) or a
/// failure that must stop it (then returns the error). Transient failures
/// are retried here with exponential backoff.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (stop_sender, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_sender.send(true);
    });
    let context = Context::new(config)?;
    let mut backoff = new_backoff();
    loop {
        let started = Instant::now();
        let session = context.session(stop.clone());
        tokio::pin!(session);
        let outcome = tokio::select! {
            outcome = &mut session => outcome,
            _ = grace_after_stop(stop.clone()) => {
                tracing::warn!(
                    grace = ?SHUTDOWN_GRACE,
                    "shutdown grace period passed while waiting on Kafka or Postgres; abandoning the \
                     unacknowledged batch, which is published exactly once after restart"
                );
                return Ok(());
            }
        };
        match outcome {
            Ok(()) => {
                tracing::info!("shutdown requested; relay stopped");
                return Ok(());
            }
            Err(error) if error.kind == ErrorKind::Stop => return Err(error),
            Err(error) => {
                if started.elapsed() > HEALTHY_SESSION {
                    backoff = new_backoff();
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(
                    error = %error,
                    retry_in = ?delay,
                    "relay session failed; nothing unpublished was acknowledged. Reconnecting and resuming from the last checkpoint"
                );
                let mut stop = stop.clone();
                if *stop.borrow() {
                    return Ok(());
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
        }
    }
}

/// Resolves `SHUTDOWN_GRACE` after shutdown was requested.
async fn grace_after_stop(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            // The sender lives as long as the shutdown future; if it is gone, never fire.
            std::future::pending::<()>().await;
        }
    }
    tokio::time::sleep(SHUTDOWN_GRACE).await;
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
}

/// Counters for the periodic progress line.
#[derive(Default)]
struct Progress {
    events: u64,
    dead_lettered: u64,
    transactions: u64,
    aborted: u64,
}

impl Context {
    fn new(config: Config) -> Result<Context> {
        let table = OutboxTable::from_config(&config.postgres)
            .map_err(|e| Error::stop(format!("postgres.{e}")))?;
        let router =
            Router::new(&config.routing, config.kafka.max_message_bytes).map_err(Error::stop)?;
        let connect_options: PgConnectOptions = config
            .postgres
            .url
            .parse()
            .map_err(|e| Error::stop(format!("postgres.url: {e}")))?;
        let connect_options =
            connect_options.application_name(&format!("outboxd-{}", config.relay.name));
        Ok(Context {
            table_name: table.display_name(),
            acknowledger: Acknowledger::new(&table, config.relay.after_publish),
            config,
            table,
            router,
            connect_options,
        })
    }

    /// One leadership term: from connecting to the first failure or shutdown.
    async fn session(&self, mut stop: watch::Receiver<bool>) -> Result<()> {
        let config = &self.config;
        let mut connection = PgConnection::connect_with(&self.connect_options)
            .await
            .map_err(|e| Error::from_postgres("connecting to Postgres", e))?;
        let report =
            schema::inspect(&mut connection, &self.table, config.relay.after_publish).await?;
        if let Some(problem) = report.problems(&self.table).into_iter().next() {
            return Err(Error::stop(problem));
        }
        if !report.has_notify_trigger {
            tracing::warn!(
                table = %self.table_name,
                poll_interval = ?config.capture.poll_interval,
                "no insert trigger calls pg_notify on the outbox table; new rows wait up to the poll interval. \
                 The trigger is in migrations/0001_outbox.sql"
            );
        }
        if !leader::acquire(&mut connection, &config.relay.name, &mut stop).await? {
            return Ok(());
        }

        topics::ensure_checkpoint_topic(config).await?;
        let publisher = Publisher::connect(config).await?;
        if let Some(latest) = checkpoint::read_latest(config).await? {
            let done = self
                .acknowledger
                .reconcile(&mut connection, &latest)
                .await?;
            tracing::info!(
                checkpoint_published = latest.published.len(),
                checkpoint_dead_lettered = latest.dead_lettered.len(),
                newly_acknowledged = done.published + done.dead_lettered,
                "reconciled the outbox with the latest committed checkpoint"
            );
        }

        let mut wakeup = Wakeup::listen(
            &self.connect_options,
            &config.postgres.notify_channel,
            config.capture.poll_interval,
        )
        .await?;
        let claim_sql = self.table.claim_sql(report.payload_encoding);
        let mut rejected_by_broker: HashMap<i64, String> = HashMap::new();
        let mut progress = Progress::default();
        let mut last_progress_log = Instant::now();
        let mut resend_backoff = new_backoff();
        tracing::info!(
            table = %self.table_name,
            mode = "polling",
            batch_size = config.capture.batch_size,
            "relay started"
        );

        loop {
            if *stop.borrow() {
                return Ok(());
            }
            if last_progress_log.elapsed() >= PROGRESS_EVERY {
                log_progress(&progress);
                last_progress_log = Instant::now();
            }
            let mut transaction = connection
                .begin()
                .await
                .map_err(|e| Error::from_postgres("starting the claim transaction", e))?;
            let events =
                polling::claim_batch(&mut transaction, &claim_sql, config.capture.batch_size)
                    .await?;
            if events.is_empty() {
                transaction
                    .rollback()
                    .await
                    .map_err(|e| Error::from_postgres("ending an empty claim", e))?;
                wakeup.wait(&mut stop).await;
                continue;
            }
            let batch = Batch::route(
                &self.router,
                &events,
                &rejected_by_broker,
                config.relay.on_poison,
            )?;
            let batch_checkpoint =
                Checkpoint::new(&self.table_name, &batch.published, &batch.dead_lettered);
            let started = Instant::now();
            match publisher.publish(&batch.records, &batch_checkpoint).await {
                Ok(()) => {
                    self.acknowledger
                        .acknowledge(&mut transaction, &batch.published, &batch.dead_lettered)
                        .await?;
                    transaction.commit().await.map_err(|e| {
                        Error::from_postgres(
                            "committing the acknowledgement (the checkpoint will repair it)",
                            e,
                        )
                    })?;
                    for seq in &batch.dead_lettered {
                        rejected_by_broker.remove(seq);
                    }
                    progress.events += batch.published.len() as u64;
                    progress.dead_lettered += batch.dead_lettered.len() as u64;
                    progress.transactions += 1;
                    resend_backoff = new_backoff();
                    tracing::debug!(
                        events = batch.records.len(),
                        first_seq = batch.record_seqs.first(),
                        last_seq = batch.record_seqs.last(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "batch committed to Kafka and acknowledged"
                    );
                }
                Err(PublishError::RecordRejected { index, reason }) => {
                    let seq = batch.record_seqs[index];
                    tracing::warn!(seq, %reason, "Kafka refused a record; the transaction was aborted and the row will be dead-lettered");
                    rejected_by_broker.insert(seq, reason);
                    progress.aborted += 1;
                    rollback(transaction).await?;
                }
                Err(PublishError::Failed(error)) if error.kind == ErrorKind::AbortAndResend => {
                    progress.aborted += 1;
                    rollback(transaction).await?;
                    let delay = resend_backoff.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(
                        %error,
                        retry_in = ?delay,
                        "Kafka transaction aborted; nothing from it is visible. Re-claiming and re-sending the batch"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => {}
                    }
                }
                Err(PublishError::Failed(error)) => return Err(error),
            }
        }
    }
}

/// Releases the claimed rows; a failure here means the connection is gone,
/// and Postgres releases them itself.
async fn rollback(transaction: sqlx::Transaction<'_, sqlx::Postgres>) -> Result<()> {
    transaction
        .rollback()
        .await
        .map_err(|e| Error::from_postgres("releasing claimed rows", e))
}

fn log_progress(progress: &Progress) {
    tracing::info!(
        published = progress.events,
        dead_lettered = progress.dead_lettered,
        transactions = progress.transactions,
        aborted = progress.aborted,
        "relay progress since this session started"
    );
}
