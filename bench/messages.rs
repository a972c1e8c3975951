//! The WAL-message outbox beside the table (section `messages`): the same
//! backlogs drained and the same rates held by outboxd relaying the table
//! (replication, with marks and without: `after_publish: none`) and
//! relaying messages, back to back in one run, with the WAL each event
//! costs Postgres.
//!
//! Invariant: both sources meet the same events (fields, payload size,
//! aggregates, one or 10,000 to a transaction) on the same servers, one
//! right after the other, so their figures compare; and every run ends
//! with the invariant checker, whose verdict outranks the figures. The
//! WAL per event is everything Postgres wrote while the backlog was
//! written (the table: row, index, commit; messages: the message record
//! and commit) and while it drained (the table: marks; messages: nothing
//! to mark).

use std::fmt::Write;

use serde::Serialize;

use crate::drain::{self, Drain, Start};
use crate::steady::{self, Steady};
use crate::systems::System;

/// The payload of every event, as in the drains and steady runs.
const PAYLOAD_BYTES: usize = 256;

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub machine: String,
    pub versions: String,
    pub drains: Vec<Drain>,
    pub steady: Vec<Steady>,
}

/// Drains `events` events written one and 10,000 to a transaction, then
/// holds each of `rates` for `seconds`, with each source in turn.
pub async fn run(
    events: usize,
    rates: &[usize],
    seconds: u64,
    machine: &str,
    versions: &str,
) -> Comparison {
    let sources = [
        System::OutboxdReplication,
        System::OutboxdUnmarked,
        System::OutboxdMessages,
    ];
    let mut drains = Vec::new();
    for per_transaction in [1, 10_000] {
        for system in sources {
            drains.push(
                drain::run_shaped(
                    system,
                    Start::Restart,
                    events,
                    PAYLOAD_BYTES,
                    Some(per_transaction),
                )
                .await,
            );
        }
    }
    let mut steady_runs = Vec::new();
    for &rate in rates {
        for system in sources {
            steady_runs.push(steady::run(system, rate as u32, seconds).await);
        }
    }
    Comparison {
        machine: machine.to_string(),
        versions: versions.to_string(),
        drains,
        steady: steady_runs,
    }
}

impl Comparison {
    /// Runs the checker failed.
    pub fn failed(&self) -> usize {
        self.drains.iter().filter(|d| d.failed.is_some()).count()
            + self.steady.iter().filter(|s| s.failed.is_some()).count()
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let w = &mut md;
        let _ = writeln!(
            w,
            "# The table with marks, without marks (`after_publish: none`), and the WAL-message outbox\n"
        );
        let _ = writeln!(
            w,
            "Written by `make bench` (section `messages`); every figure below comes from the same run.\n"
        );
        let _ = writeln!(w, "- machine: {}", self.machine);
        let _ = writeln!(w, "- versions: {}\n", self.versions);
        let _ = writeln!(w, "## Backlog drain and WAL per event\n");
        let _ = writeln!(
            w,
            "| source | events | per transaction | drain s | events/s | relay CPU s / M | \
             WAL B/event writing | WAL B/event draining | WAL B/event total |"
        );
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for d in &self.drains {
            if let Some(failed) = &d.failed {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | FAILED: {failed} |||||||",
                    d.system, d.rows, d.events_per_transaction
                );
                continue;
            }
            let _ = writeln!(
                w,
                "| {} | {} | {} | {:.1} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} |",
                d.system,
                d.rows,
                d.events_per_transaction,
                d.seconds,
                d.events_per_second,
                d.cpu_seconds_per_million,
                d.insert_wal_bytes,
                d.footprint.wal_bytes,
                d.insert_wal_bytes + d.footprint.wal_bytes
            );
        }
        let _ = writeln!(
            w,
            "\n## Steady state, commit to `read_committed` consumer\n"
        );
        let _ = writeln!(
            w,
            "| source | rate | achieved | p50 ms | p99 ms | p99.9 ms | max ms | missing | relay CPU s / M |"
        );
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for s in &self.steady {
            if let Some(failed) = &s.failed {
                let _ = writeln!(
                    w,
                    "| {} | {} | FAILED: {failed} |||||||",
                    s.system, s.target_rate
                );
                continue;
            }
            let _ = writeln!(
                w,
                "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} |",
                s.system,
                s.target_rate,
                s.achieved_rate,
                s.p50_ms,
                s.p99_ms,
                s.p999_ms,
                s.max_ms,
                s.missing,
                s.cpu_seconds_per_million
            );
        }
        md
    }
}
