//! `outboxd status`: the lag view for a person at a terminal (or `--json`
//! for a script): pending rows, the oldest unsent row's age, the slot, the
//! last checkpoint, and who holds the leader lock.
//!
//! Invariant: `status` only reads. It works whether or not a relay runs,
//! and a part it cannot read (Kafka down, say) is reported as such while
//! the rest is still shown.

use std::time::Duration;

use serde::Serialize;
use sqlx::{ConnectOptions, PgConnection, Row};

use crate::capture::slot;
use crate::error::{Error, Result};
use crate::kafka::checkpoint;
use crate::kafka::identity::TableIdentity;
use crate::lag;
use crate::leader;
use crate::schema;
use crate::setup::Setup;

/// How long `status` waits for Kafka before reporting it unreachable.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Serialize)]
pub struct Status {
    pub relay: String,
    pub table: String,
    pub capture_mode: String,
    pub pending_rows: i64,
    pub oldest_unsent_age_seconds: f64,
    /// `false` where the table cannot show what is pending (WAL messages,
    /// unmarked rows): the two figures above are then 0, and the slot's
    /// retained WAL is the backlog.
    pub pending_counted: bool,
    pub leader: Option<Leader>,
    pub slot: Option<SlotStatus>,
    /// The latest committed checkpoint.
    pub last_checkpoint: Option<CheckpointStatus>,
    /// Why the checkpoint could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_checkpoint_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Leader {
    pub pid: i32,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub backend_start: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub active_pid: Option<i32>,
    pub wal_status: Option<String>,
    pub retained_wal_bytes: Option<i64>,
    pub confirmed_flush_lsn: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CheckpointStatus {
    pub published_rows: usize,
    pub dead_lettered_rows: usize,
    pub position: Option<String>,
}

pub async fn read(setup: &Setup) -> Result<Status> {
    let config = &setup.config;
    let table = &setup.table;
    let mut connection = setup
        .connect_options
        .connect()
        .await
        .map_err(|e| Error::from_postgres("connecting to Postgres", e))?;
    // A WAL-message outbox has no rows to count, and unmarked rows all
    // look pending (the backlog is the WAL the slot keeps, below); a
    // message outbox names itself `messages:<prefix>`.
    let source_name = config.source_name(&table.display_name());
    let lag_sql = if !config.rows_show_pending() {
        "SELECT 0::bigint, 0::float8".to_string()
    } else {
        table.lag_sql()
    };
    let lag = lag::sample(&mut connection, &lag_sql)
        .await
        .map_err(|e| Error::from_postgres("reading the outbox lag", e))?;
    let leader = match leader::holder_pid(&mut connection, &source_name).await? {
        None => None,
        Some(pid) => Some(describe_backend(&mut connection, pid).await?),
    };
    let slot = slot::inspect(&mut connection, &config.slot_name())
        .await?
        .map(|info| SlotStatus {
            name: info.name,
            active_pid: info.active_pid,
            wal_status: info.wal_status,
            retained_wal_bytes: info.retained_bytes,
            confirmed_flush_lsn: info.confirmed_flush.map(|lsn| lsn.to_string()),
        });
    let source = schema::database_source(&mut connection).await?;
    let identity = TableIdentity::new(source.as_deref(), &source_name, &config.relay.name);
    let last_checkpoint = match tokio::time::timeout(
        CHECKPOINT_TIMEOUT,
        checkpoint::read_latest(config, &identity),
    )
    .await
    {
        Err(_) => Err(format!(
            "Kafka did not answer within {CHECKPOINT_TIMEOUT:?}"
        )),
        Ok(Err(error)) => Err(error.message),
        Ok(Ok(latest)) => Ok(latest.map(|l| l.checkpoint).map(|c| CheckpointStatus {
            published_rows: c.published.len(),
            dead_lettered_rows: c.dead_lettered.len(),
            position: c.position.map(|p| p.to_string()),
        })),
    };
    let (last_checkpoint, last_checkpoint_error) = match last_checkpoint {
        Ok(checkpoint) => (checkpoint, None),
        Err(why) => (None, Some(why)),
    };
    Ok(Status {
        relay: config.relay.name.clone(),
        table: source_name,
        capture_mode: format!("{:?}", config.capture.mode).to_lowercase(),
        pending_rows: lag.pending_rows,
        oldest_unsent_age_seconds: lag.oldest_unsent_age_seconds,
        pending_counted: config.rows_show_pending(),
        leader,
        slot,
        last_checkpoint,
        last_checkpoint_error,
    })
}

async fn describe_backend(connection: &mut PgConnection, pid: i32) -> Result<Leader> {
    let row = sqlx::query(
        "SELECT application_name, client_addr::text, backend_start::text \
         FROM pg_stat_activity WHERE pid = $1",
    )
    .bind(pid)
    .fetch_optional(connection)
    .await
    .map_err(|e| Error::from_postgres("describing the leader's connection", e))?;
    Ok(Leader {
        pid,
        application_name: row.as_ref().and_then(|r| r.get(0)),
        client_addr: row.as_ref().and_then(|r| r.get(1)),
        backend_start: row.as_ref().and_then(|r| r.get(2)),
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "relay       {} (table {}, capture.mode {})",
            self.relay, self.table, self.capture_mode
        )?;
        match &self.leader {
            Some(leader) => writeln!(
                f,
                "leader      Postgres backend pid {} ({}{}){}",
                leader.pid,
                leader.application_name.as_deref().unwrap_or("?"),
                leader
                    .client_addr
                    .as_deref()
                    .map(|addr| format!(" from {addr}"))
                    .unwrap_or_default(),
                leader
                    .backend_start
                    .as_deref()
                    .map(|since| format!(", connected since {since}"))
                    .unwrap_or_default(),
            )?,
            None => writeln!(
                f,
                "leader      none: no relay holds the lock, nothing is being published"
            )?,
        }
        if self.pending_counted {
            writeln!(
                f,
                "pending     {} rows, oldest unsent {:.1} s old",
                self.pending_rows, self.oldest_unsent_age_seconds
            )?;
        } else {
            writeln!(
                f,
                "pending     not counted (nothing in the table marks what is sent): the WAL the \
                 slot retains is the backlog"
            )?;
        }
        match &self.slot {
            Some(slot) => writeln!(
                f,
                "slot        {}: {}, wal_status {}, retains {} bytes of WAL, confirmed up to {}",
                slot.name,
                slot.active_pid
                    .map(|pid| format!("streamed by pid {pid}"))
                    .unwrap_or_else(|| "not streamed".into()),
                slot.wal_status.as_deref().unwrap_or("unknown"),
                slot.retained_wal_bytes.unwrap_or(0),
                slot.confirmed_flush_lsn.as_deref().unwrap_or("-"),
            )?,
            None => writeln!(f, "slot        none (polling, or not created yet)")?,
        }
        if let Some(why) = &self.last_checkpoint_error {
            return writeln!(f, "checkpoint  unreadable: {why}");
        }
        match &self.last_checkpoint {
            Some(checkpoint) => writeln!(
                f,
                "checkpoint  {} rows published, {} dead-lettered{}",
                checkpoint.published_rows,
                checkpoint.dead_lettered_rows,
                checkpoint
                    .position
                    .as_deref()
                    .map(|p| format!(", stream position {p}"))
                    .unwrap_or_default()
            ),
            None => writeln!(f, "checkpoint  none yet"),
        }
    }
}
