//! What a phase of a run cost each process that serves it, and the WAL
//! Postgres wrote meanwhile: the relay, the Postgres backends of its own
//! sessions, the walsender streaming to it, the rest of Postgres
//! (checkpointer, WAL writer, autovacuum, the bench's own writers), and the
//! Kafka broker.
//!
//! Invariant: each process is charged only the CPU it used between the two
//! snapshots (a process started in between from zero), and a Postgres
//! process is sorted by what `pg_stat_activity` says it is at the end, so
//! the relay's sessions are never counted as the server's own work.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::PgPool;

use crate::process::usage_of;

/// CPU seconds of every process of interest, and the WAL position.
pub struct Snapshot {
    cpu: HashMap<u32, f64>,
    wal_lsn: u64,
}

/// What one phase cost, per event.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Footprint {
    pub relay_us: f64,
    /// The relay's own sessions: claims, marks, the leader lock, lag sampling.
    pub relay_backends_us: f64,
    pub walsender_us: f64,
    /// Every other Postgres process, the bench's writers included.
    pub postgres_other_us: f64,
    pub broker_us: f64,
    pub wal_bytes: f64,
}

impl Footprint {
    pub fn total_us(&self) -> f64 {
        self.relay_us
            + self.relay_backends_us
            + self.walsender_us
            + self.postgres_other_us
            + self.broker_us
    }
}

fn stack_pid(name: &str) -> Option<u32> {
    let stack = std::env::var("OUTBOXD_STACK_DIR").ok()?;
    std::fs::read_to_string(format!("{stack}/{name}.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The postmaster's children: every Postgres process of the stack.
fn postgres_pids() -> Vec<u32> {
    let Some(postmaster) = stack_pid("pg") else {
        return Vec::new();
    };
    let children =
        std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children"))
            .unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

pub async fn snapshot(pool: &PgPool, relay_pid: Option<u32>) -> Snapshot {
    let mut cpu = HashMap::new();
    let pids = postgres_pids()
        .into_iter()
        .chain(stack_pid("kafka"))
        .chain(relay_pid);
    for pid in pids {
        cpu.insert(pid, usage_of(pid).cpu_seconds);
    }
    let wal_lsn: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
        .fetch_one(pool)
        .await
        .unwrap_or(0);
    Snapshot {
        cpu,
        wal_lsn: wal_lsn as u64,
    }
}

/// What happened between `before` and `after`, per event, sorting the
/// Postgres processes by what they were at `after` (`relay_application`:
/// the relay's `application_name`).
pub async fn between(
    pool: &PgPool,
    before: &Snapshot,
    after: &Snapshot,
    relay_pid: Option<u32>,
    relay_application: &str,
    events: usize,
) -> Footprint {
    let sessions: Vec<(i32, String, Option<String>)> =
        sqlx::query_as("SELECT pid, backend_type, application_name FROM pg_stat_activity")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let broker = stack_pid("kafka");
    let per_event = 1e6 / events.max(1) as f64;
    let mut footprint = Footprint {
        wal_bytes: after.wal_lsn.saturating_sub(before.wal_lsn) as f64 / events.max(1) as f64,
        ..Footprint::default()
    };
    for (&pid, &seconds) in &after.cpu {
        let used = (seconds - before.cpu.get(&pid).copied().unwrap_or(0.0)).max(0.0) * per_event;
        let session = sessions.iter().find(|(p, _, _)| *p as u32 == pid);
        let slot = if Some(pid) == relay_pid {
            &mut footprint.relay_us
        } else if Some(pid) == broker {
            &mut footprint.broker_us
        } else {
            match session {
                Some((_, backend_type, _)) if backend_type == "walsender" => {
                    &mut footprint.walsender_us
                }
                Some((_, _, Some(application))) if application == relay_application => {
                    &mut footprint.relay_backends_us
                }
                _ => &mut footprint.postgres_other_us,
            }
        };
        *slot += used;
    }
    footprint
}
