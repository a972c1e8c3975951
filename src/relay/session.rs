//! One leadership term: connect, inspect the table, win the leader lock,
//! choose the capture mode, take over (fence, read the checkpoint,
//! reconcile), then run the capture stage until shutdown or failure.
//!
//! Invariant: nothing is captured before the takeover settled the last
//! checkpoint, and everything the term started (housekeeping, the
//! producer) ends with it, so a new term starts from a clean slate.

use std::sync::Arc;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use super::deliver::Deliverer;
use super::durable::durable_acknowledgements;
use super::{polling, replication, takeover, topic_gate, AbortOnDrop};
use crate::acknowledge::Acknowledger;
use crate::capture::slot;
use crate::capture::wakeup::Wakeup;
use crate::config::{CaptureMode, Config};
use crate::error::{Error, Result};
use crate::kafka::topics;
use crate::leader;
use crate::metrics::{Metrics, RelayState};
use crate::retention::{self, PublishedThrough};
use crate::routing::Router;
use crate::schema;
use crate::setup::Setup;
use crate::shutdown::Shutdown;
use crate::table::{OutboxTable, PayloadEncoding};

/// What a session needs, built once from the config.
pub(super) struct Context {
    pub(super) config: Config,
    pub(super) table: OutboxTable,
    /// `schema.table`, written into every checkpoint.
    pub(super) table_name: String,
    pub(super) router: Router,
    pub(super) acknowledger: Acknowledger,
    pub(super) connect_options: PgConnectOptions,
    pub(super) metrics: Arc<Metrics>,
}

impl Context {
    pub(super) fn new(setup: Setup, metrics: Arc<Metrics>) -> Context {
        let Setup {
            config,
            table,
            router,
            connect_options,
        } = setup;
        let table_name = config.source_name(&table.display_name());
        Context {
            acknowledger: if config.messages() {
                Acknowledger::without_table(&table_name)
            } else {
                Acknowledger::new(&table, config.relay.after_publish)
            },
            table_name,
            config,
            table,
            router,
            connect_options,
            metrics,
        }
    }

    /// A new connection whose commits are durable (`durable_acknowledgements`);
    /// `doing` names it in the error.
    pub(super) async fn connect(&self, doing: &str) -> Result<PgConnection> {
        let mut connection = PgConnection::connect_with(&self.connect_options)
            .await
            .map_err(|e| Error::from_postgres(doing, e))?;
        durable_acknowledgements(&mut connection).await?;
        super::durable::keep_claims_open(&mut connection)
            .await
            .map_err(|e| {
                Error::from_postgres("turning off idle_in_transaction_session_timeout", e)
            })?;
        Ok(connection)
    }

    /// One leadership term: from connecting to the first failure or shutdown.
    pub(super) async fn session(&self, mut stop: Shutdown) -> Result<()> {
        let config = &self.config;
        let mut connection = self.connect("connecting to Postgres").await?;
        if config.messages() {
            return self.message_session(connection, stop).await;
        }
        let report =
            schema::inspect(&mut connection, &self.table, config.relay.deletes_rows()).await?;
        let problems = report.problems(&self.table);
        if !problems.is_empty() {
            return Err(Error::stop(problems.join("; ")).because(crate::error::Cause::OutboxTable));
        }
        if let Some(mismatch) = report.partitioning_mismatch(&self.table) {
            tracing::warn!("{mismatch}");
        }
        self.metrics.set_state(RelayState::Standby);
        let Some(leadership) = leader::acquire(
            &mut connection,
            &self.table_name,
            &config.relay.name,
            &mut stop,
        )
        .await?
        else {
            return Ok(());
        };
        let mode = choose_mode(config.capture.mode, &mut connection).await?;
        self.metrics.set_capture_mode(match mode {
            CaptureMode::Replication => "replication",
            _ => "polling",
        });
        // Replication publishes rows as inserted; without the guard, a
        // writer that changes them before COMMIT is never told. Only a
        // warning: a failed look-up does not stop the relay.
        if mode == CaptureMode::Replication
            && matches!(
                crate::insert_only::is_guarded(&mut connection, &self.table).await,
                Ok(false)
            )
        {
            tracing::warn!(
                table = %self.table_name,
                "{}",
                crate::insert_only::unguarded_warning(&self.table)
            );
        }
        if mode == CaptureMode::Polling && !report.has_notify_trigger {
            tracing::warn!(
                table = %self.table_name,
                poll_interval = ?config.capture.poll_interval,
                "no insert trigger calls pg_notify on the outbox table; new rows wait up to the poll interval. \
                 The trigger is in migrations/0001_outbox.sql"
            );
        }

        topics::ensure_checkpoint_topic(config).await?;
        let mut source = schema::database_source(&mut connection).await?;
        if source.is_none() && config.unmarked() {
            source = Some(schema::source_by_replication(config, &mut connection).await?);
        }
        let Some(takeover::TakenOver { publisher, latest }) =
            takeover::take_over(self, &mut connection, source.as_deref(), &stop).await?
        else {
            return Ok(());
        };
        if let (false, Some(marked_before)) = (config.unmarked(), latest.unmarked_from) {
            return Err(replication::marking_refused(&latest, marked_before));
        }
        let published_through = Arc::new(PublishedThrough::default());
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
            published_through: Arc::clone(&published_through),
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
            leadership,
            stop,
            published_through,
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

impl Context {
    /// A leadership term of a WAL-message outbox: no table to inspect,
    /// guard, keep or poll; the same leader lock, takeover and pipeline
    /// under the `messages:<prefix>` identity, and replication only (the
    /// config refuses anything else).
    async fn message_session(
        &self,
        mut connection: PgConnection,
        mut stop: Shutdown,
    ) -> Result<()> {
        let config = &self.config;
        self.metrics.set_state(RelayState::Standby);
        let Some(leadership) = leader::acquire(
            &mut connection,
            &self.table_name,
            &config.relay.name,
            &mut stop,
        )
        .await?
        else {
            return Ok(());
        };
        let support = slot::server_support(&mut connection).await?;
        if let Some(reason) = support.replication_unavailable() {
            return Err(Error::stop(format!(
                "capture.source is `messages`, which needs logical replication, but {reason}"
            )));
        }
        self.metrics.set_capture_mode("replication");
        topics::ensure_checkpoint_topic(config).await?;
        let source = schema::database_source(&mut connection).await?;
        let Some(takeover::TakenOver { publisher, latest }) =
            takeover::take_over(self, &mut connection, source.as_deref(), &stop).await?
        else {
            return Ok(());
        };
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
            // Payloads are the JSON text the message carries.
            payload_encoding: PayloadEncoding::Text,
            leadership,
            stop,
            published_through: Arc::default(),
        };
        replication::messages::run(&mut session, &latest).await
    }
}

/// What one leadership term works with.
pub(super) struct Session<'a> {
    pub(super) context: &'a Context,
    /// Holds the leader lock; claims and acknowledgements run on it.
    pub(super) connection: PgConnection,
    pub(super) deliverer: Deliverer<'a>,
    pub(super) payload_encoding: PayloadEncoding,
    /// Who holds the leader lock: every claim connection confirms it still does.
    pub(super) leadership: leader::Leadership,
    pub(super) stop: Shutdown,
    /// How far the stream is clear, for the retention of unmarked rows.
    pub(super) published_through: Arc<PublishedThrough>,
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
