//! Lag sampling: pending rows, the oldest unsent row's age, the slot's
//! retained WAL, and whether Postgres and Kafka answer.
//!
//! Invariant: one task per process samples every `EVERY`, on its own
//! connection, and only writes into [`Metrics`]; scrapes never query. The
//! oldest row is found through the partial index on unsent rows.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection, Row};

use crate::capture::slot;
use crate::config::Config;
use crate::kafka::{base_client_config, RelayContext};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::table::OutboxTable;

const EVERY: Duration = Duration::from_secs(5);
const KAFKA_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one sample found.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    pub pending_rows: i64,
    pub oldest_unsent_age_seconds: f64,
}

/// Pending rows and the oldest unsent row's age, in one statement.
pub async fn sample(connection: &mut PgConnection, lag_sql: &str) -> Result<Lag, sqlx::Error> {
    let row = sqlx::query(lag_sql).fetch_one(connection).await?;
    Ok(Lag {
        pending_rows: row.try_get(0)?,
        oldest_unsent_age_seconds: row.try_get(1)?,
    })
}

/// Samples until `stop` turns true.
pub fn spawn(
    config: &Config,
    connect_options: PgConnectOptions,
    table: &OutboxTable,
    metrics: Arc<Metrics>,
    mut stop: Shutdown,
) -> tokio::task::JoinHandle<()> {
    // A WAL-message outbox has no rows to count, and unmarked rows all
    // look pending: the backlog is the WAL the slot holds
    // (`outboxd_replication_slot_retained_wal_bytes`), sampled below.
    let lag_sql = if !config.rows_show_pending() {
        "SELECT 0::bigint, 0::float8".to_string()
    } else {
        table.lag_sql()
    };
    let slot_name = config.slot_name();
    let probe = base_client_config(config)
        .create_with_context::<_, BaseConsumer<RelayContext>>(RelayContext)
        .ok()
        .map(|probe| Arc::new(crate::kafka::off_runtime::DropOffRuntime::new(probe)));
    let probe_topic = config.kafka.checkpoint_topic.clone();
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let mut connection: Option<PgConnection> = None;
        loop {
            if connection.is_none() {
                connection = connect_options.connect().await.ok();
            }
            let postgres_ok = match connection.as_mut() {
                Some(c) => match sample(c, &lag_sql).await {
                    Ok(lag) => {
                        metrics.set_lag(lag.pending_rows, lag.oldest_unsent_age_seconds);
                        if let Ok(Some(info)) = slot::inspect(c, &slot_name).await {
                            metrics.set_slot(
                                &slot_name,
                                info.retained_bytes.unwrap_or(0),
                                info.confirmed_flush.map_or(0, |lsn| lsn.0),
                            );
                        }
                        true
                    }
                    Err(_) => {
                        connection = None;
                        false
                    }
                },
                None => false,
            };
            let kafka_ok = match &probe {
                Some(probe) => {
                    let probe = Arc::clone(probe);
                    let topic = probe_topic.clone();
                    tokio::task::spawn_blocking(move || {
                        probe
                            .fetch_metadata(Some(&topic), KAFKA_PROBE_TIMEOUT)
                            .is_ok()
                    })
                    .await
                    .unwrap_or(false)
                }
                None => false,
            };
            metrics.set_reachable(postgres_ok, kafka_ok);
            if stop.requested_within(EVERY).await {
                return;
            }
        }
    }))
}
