//! Backlog drains: a backlog written while the system is down, then the
//! system started cold and timed until every event is committed in Kafka.
//!
//! Invariant: a figure is reported only if the invariant checker found the
//! run clean; otherwise the run is reported as failed, with what it broke.

use std::time::Duration;

use serde::Serialize;

use crate::backlog;
use crate::footprint::{self, Footprint};
use crate::support::checker::Report;
use crate::systems::{BenchEnv, StageTime, System};

#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    pub system: String,
    pub rows: usize,
    pub payload_bytes: usize,
    /// Events per transaction of the backlog; 0 for the default bulk
    /// transactions (10,000 rows, fewer for big payloads).
    pub events_per_transaction: usize,
    /// From the cold start to the last event committed in Kafka.
    pub seconds: f64,
    pub events_per_second: f64,
    pub megabytes_per_second: f64,
    pub cpu_seconds: f64,
    pub cpu_seconds_per_million: f64,
    pub peak_rss_megabytes: f64,
    /// outboxd: where its Kafka transactions' time went during the drain.
    pub stages: Vec<StageTime>,
    /// WAL per row of writing the backlog: the outbox inserts' own cost.
    pub insert_wal_bytes: f64,
    /// What draining cost per event, process by process, and its WAL.
    pub footprint: Footprint,
    /// `None` when the checker found the run clean.
    pub failed: Option<String>,
}

/// How the system meets its backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// It ran before the backlog was written (a restart): replication
    /// finds the backlog in its slot's stream.
    Restart,
    /// It never ran on this table: replication creates its slot after the
    /// backlog and drains the backlog through the table.
    First,
}

/// Drains `rows` rows of `payload_bytes` with `system`, restarted.
pub async fn run(system: System, rows: usize, payload_bytes: usize) -> Drain {
    run_from(system, Start::Restart, rows, payload_bytes).await
}

/// Drains `rows` rows of `payload_bytes` with `system`, started as `start` says.
pub async fn run_from(system: System, start: Start, rows: usize, payload_bytes: usize) -> Drain {
    run_shaped(system, start, rows, payload_bytes, None).await
}

/// Like `run_from`, with the backlog written `per_transaction` events to a
/// transaction (one: from several connections at once) instead of the
/// default bulk transactions; rows, or messages for `OutboxdMessages`.
pub async fn run_shaped(
    system: System,
    start: Start,
    rows: usize,
    payload_bytes: usize,
    per_transaction: Option<usize>,
) -> Drain {
    let first = if start == Start::First { "-first" } else { "" };
    let shape = per_transaction.map_or(String::new(), |n| format!("-tx{n}"));
    let name = format!(
        "drain-{}{first}-{rows}-{payload_bytes}{shape}",
        system.short()
    );
    eprintln!("bench: {name}: priming, then writing the backlog");
    let bench = BenchEnv::new(&name, system).await;
    let primed = system != System::OutboxdPolling && start == Start::Restart;
    let mut written = if primed {
        // The slot must exist before the backlog, or it is not in the stream.
        bench.prime().await
    } else {
        bench.write_warmup().await
    };
    let warmup_published = written.committed;
    let before_backlog = footprint::snapshot(bench.pool(), None).await;
    let messages = system.is_messages();
    let backlog = match per_transaction {
        None if !messages => backlog::write(bench.pool(), rows, payload_bytes).await,
        None => backlog::write_in(bench.pool(), rows, payload_bytes, 10_000, true).await,
        Some(1) => {
            backlog::write_one_per_transaction(
                &bench.env.database_url,
                rows,
                payload_bytes,
                messages,
            )
            .await
        }
        Some(n) => backlog::write_in(bench.pool(), rows, payload_bytes, n, messages).await,
    };
    let after_backlog = footprint::snapshot(bench.pool(), None).await;
    written.committed += backlog.committed;
    written.committed_ids.extend(backlog.committed_ids);
    analyze(&bench).await;

    eprintln!("bench: {name}: draining");
    let mut running = bench.start("drain");
    let relay_pid = (system != System::Debezium).then(|| running.pid());
    let before_drain = footprint::snapshot(bench.pool(), relay_pid).await;
    // outboxd counts what this process published: the primed relay
    // published the warm-up event already. Debezium is counted in Kafka.
    let already_counted = if primed { warmup_published } else { 0 };
    let expected = (written.committed - already_counted) as u64;
    let limit = Duration::from_secs(120 + (rows as u64) / 1_000);
    let seconds = bench.wait_published(&mut running, expected, limit).await;
    let usage = running.usage();
    let stages = bench.stages().await;
    let after_drain = footprint::snapshot(bench.pool(), relay_pid).await;
    let footprint = footprint::between(
        bench.pool(),
        &before_drain,
        &after_drain,
        relay_pid,
        &format!("outboxd-{}", bench.env.relay_name()),
        rows,
    )
    .await;
    let insert_wal_bytes = footprint::between(
        bench.pool(),
        &before_backlog,
        &after_backlog,
        None,
        "",
        rows,
    )
    .await
    .wal_bytes;
    running.stop(Duration::from_secs(60));

    let report = bench.check(&written).await;
    let drain = Drain {
        system: match start {
            Start::Restart => system.label().to_string(),
            Start::First => format!("{}, first start", system.label()),
        },
        rows,
        payload_bytes,
        events_per_transaction: per_transaction.unwrap_or(0),
        seconds,
        events_per_second: rows as f64 / seconds,
        megabytes_per_second: (rows * payload_bytes) as f64 / seconds / 1e6,
        cpu_seconds: usage.cpu_seconds,
        cpu_seconds_per_million: usage.cpu_seconds / rows as f64 * 1e6,
        peak_rss_megabytes: usage.peak_rss_bytes as f64 / 1e6,
        stages,
        insert_wal_bytes,
        footprint,
        failed: failure(&report),
    };
    eprintln!(
        "bench: {name}: {:.0} events/s, {:.1} s, CPU {:.1} s, peak RSS {:.0} MB{}",
        drain.events_per_second,
        drain.seconds,
        drain.cpu_seconds,
        drain.peak_rss_megabytes,
        drain
            .failed
            .as_deref()
            .map(|f| format!(", FAILED: {f}"))
            .unwrap_or_default()
    );
    drain
}

/// Fresh statistics, as autovacuum would have after a bulk write, so the
/// first claims plan like a user's steady table would.
pub async fn analyze(bench: &BenchEnv) {
    sqlx::query("ANALYZE outbox")
        .execute(bench.pool())
        .await
        .expect("ANALYZE outbox");
}

/// `None` for a clean run; otherwise the counts and the first violations.
pub fn failure(report: &Report) -> Option<String> {
    if report.is_clean() {
        return None;
    }
    let first: Vec<String> = report.violations().into_iter().take(3).collect();
    Some(format!(
        "{} lost, {} duplicated, {} out of order, {} other (first: {})",
        report.lost.len(),
        report.duplicated.len(),
        report.out_of_order.len(),
        report.other.len(),
        first.join("; ")
    ))
}
