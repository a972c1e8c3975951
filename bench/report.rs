//! The results of one `make bench` run: `bench/results.json` (read by
//! `bench/chart.py` for the PNG) and `bench/results.md`, also printed.
//!
//! Invariant: a run the invariant checker failed shows as FAILED with its
//! reason, never as a figure, and the targets table compares only figures
//! from this same run.

use std::fmt::Write as _;

use serde::Serialize;

use crate::ceilings::{self, Ceiling};
use crate::drain::Drain;
use crate::startup::{self, Startup};
use crate::steady::Steady;
use crate::systems::{StageTime, System};
use outboxd::metrics::Stage;

#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub machine: String,
    pub versions: String,
    pub drains: Vec<Drain>,
    pub ceilings: Vec<Ceiling>,
    pub steady: Vec<Steady>,
    /// The highest rate outboxd sustained, per capture mode.
    pub highest: Vec<Steady>,
    pub payloads: Vec<Drain>,
    /// Cold start and standby takeover, per capture mode and checkpoint topic.
    pub startup: Vec<Startup>,
    /// The protocol's latency floor at each steady rate (`steady::kafka_floor`).
    pub floors: Vec<Steady>,
}

const REPLICATION: &str = "outboxd (replication)";
const POLLING: &str = "outboxd (polling)";
const DEBEZIUM: &str = "Debezium Server";

impl Results {
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let w = &mut md;
        let _ = writeln!(w, "# outboxd benchmark results\n");
        let _ = writeln!(
            w,
            "Written by `make bench`; every figure below comes from the same run.\n"
        );
        let _ = writeln!(w, "- Machine: {}", self.machine);
        let _ = writeln!(w, "- Versions: {}", self.versions);
        let _ = writeln!(
            w,
            "- Every run ends with the invariant checker (each committed event in Kafka once, in order \
             per aggregate, nothing else); a run it fails shows as FAILED instead of a figure.\n"
        );
        let _ = writeln!(w, "![latency percentiles and drain rates](results.png)\n");

        let _ = writeln!(w, "## Backlog drain\n");
        let _ = writeln!(
            w,
            "Rows of ~256-byte JSON payloads written while the system is down; the system is then \
             started cold and timed until every event is committed in Kafka.\n"
        );
        drain_table(w, &self.drains);

        let _ = writeln!(w, "\n## Ceilings of this machine, same backlog\n");
        let _ = writeln!(
            w,
            "| ceiling | rows | events/s | seconds |\n|---|---:|---:|---:|"
        );
        for c in &self.ceilings {
            let _ = writeln!(
                w,
                "| {} | {} | {:.0} | {:.1} |",
                c.name, c.rows, c.events_per_second, c.seconds
            );
        }
        let _ = writeln!(w, "\n## outboxd as a fraction of each ceiling\n");
        let _ = writeln!(w, "| outboxd | rows | events/s | ceiling | ceiling events/s | fraction |\n|---|---:|---:|---|---:|---:|");
        for drain in self.drains.iter().filter(|d| d.system != DEBEZIUM) {
            // Each mode against the ceilings of the work it does.
            let relevant = |c: &&Ceiling| match drain.system.as_str() {
                REPLICATION => c.name != ceilings::CLAIM_MARK,
                _ => c.name != ceilings::DECODE,
            };
            for ceiling in self
                .ceilings
                .iter()
                .filter(|c| c.rows == drain.rows)
                .filter(relevant)
            {
                let fraction = if drain.failed.is_none() {
                    format!(
                        "{:.0}%",
                        100.0 * drain.events_per_second / ceiling.events_per_second
                    )
                } else {
                    "FAILED".into()
                };
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {:.0} | {} |",
                    drain.system,
                    drain.rows,
                    figure(drain, drain.events_per_second, 0),
                    ceiling.name,
                    ceiling.events_per_second,
                    fraction
                );
            }
        }

        let _ = writeln!(w, "\n## outboxd / Debezium\n");
        let _ = writeln!(w, "| rows | outboxd | drain rate ratio | peak RSS: Debezium / outboxd | CPU per event: Debezium / outboxd |\n|---:|---|---:|---:|---:|");
        for debezium in self.drains.iter().filter(|d| d.system == DEBEZIUM) {
            for ours in self
                .drains
                .iter()
                .filter(|d| d.system != DEBEZIUM && d.rows == debezium.rows)
            {
                if ours.failed.is_some() || debezium.failed.is_some() {
                    let _ = writeln!(
                        w,
                        "| {} | {} | FAILED | FAILED | FAILED |",
                        ours.rows, ours.system
                    );
                    continue;
                }
                let _ = writeln!(
                    w,
                    "| {} | {} | {:.2}× | {:.1}× | {:.1}× |",
                    ours.rows,
                    ours.system,
                    ours.events_per_second / debezium.events_per_second,
                    debezium.peak_rss_megabytes / ours.peak_rss_megabytes,
                    debezium.cpu_seconds_per_million / ours.cpu_seconds_per_million
                );
            }
        }

        let _ = writeln!(
            w,
            "\n## Steady state: commit → visible to a read_committed consumer\n"
        );
        let _ = writeln!(
            w,
            "An open-loop writer commits one-event transactions at the target rate (16 connections); \
             latency runs from the writer's COMMIT returning to the event arriving at a `read_committed` \
             consumer in the same process (HdrHistogram). \"Highest sustained\" is the highest rate of \
             the ladder at which the writer held the rate, every event arrived, and p99 stayed under 1 s. \
             The floor is the protocol without a database: records come due on the same schedule and \
             outboxd's publisher commits them, each Kafka transaction carrying what is due, with its \
             checkpoint; its latency runs from a record's due time.\n"
        );
        let _ = writeln!(w, "| system | target/s | achieved/s | p50 ms | p99 ms | p99.9 ms | max ms | CPU s per M events | peak RSS MB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for s in self
            .steady
            .iter()
            .map(|s| (s, ""))
            .chain(self.highest.iter().map(|s| (s, " (highest sustained)")))
            .chain(self.floors.iter().map(|s| (s, " (floor)")))
        {
            steady_row(w, s.0, s.1);
        }

        stage_table(w, self.drains.iter().chain(&self.payloads), &self.steady);
        footprint_table(w, self.drains.iter().chain(&self.payloads));

        let _ = writeln!(
            w,
            "\n## Footprint against payload size (outboxd, every capture path)\n"
        );
        drain_table(w, &self.payloads);

        let _ = writeln!(
            w,
            "\n## Start-up with other relays' checkpoints in the topic\n"
        );
        let _ = writeln!(
            w,
            "Cold start: the table already has a checkpoint (a run sent everything and stopped with \
             SIGTERM); one row is committed, then the relay is spawned and timed until that row is \
             visible to a `read_committed` consumer. Standby takeover: a leader and a standby with the \
             same config run; the leader is SIGKILLed, a row committed right after, and the time runs \
             from the SIGKILL until the row is visible (so it includes up to 0.5 s until the standby \
             next asks for the leader lock). {} samples each. The checkpoint topic is either \
             the relay's own (no other relays' records) or shared with {} records of {} other tables' \
             relays (~160-byte checkpoints, written in transactions; the older {} roll into closed \
             segments, which the log cleaner compacts to about one record per table, the latest {} \
             stay in the active segment, which it never compacts).\n",
            startup::RUNS,
            crate::crowd::RECORDS,
            crate::crowd::OTHER_TABLES,
            crate::crowd::RECORDS - crate::crowd::RECENT,
            crate::crowd::RECENT,
        );
        let _ = writeln!(w, "| system | case | other relays' records | median s | max s | samples s | check |\n|---|---|---:|---:|---:|---|---|");
        for s in &self.startup {
            startup_row(w, s);
        }

        let _ = writeln!(w, "\n## Targets\n");
        let _ = writeln!(
            w,
            "Each miss names its cause from this run's own figures: the ceilings, the steps' \
             timings and the CPU per event of each process.\n"
        );
        let _ = writeln!(
            w,
            "| target | measured | met | cause of a miss, measured |\n|---|---|---|---|"
        );
        for target in self.targets() {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} |",
                target.target,
                target.measured,
                if target.met { "yes" } else { "no" },
                if target.met {
                    ""
                } else {
                    target.cause.as_str()
                }
            );
        }
        md
    }

    /// The drain of `system` at the largest backlog, if clean.
    fn largest_drain(&self, system: &str) -> Option<&Drain> {
        let largest = self.drains.iter().map(|d| d.rows).max()?;
        self.drains
            .iter()
            .find(|d| d.system == system && d.rows == largest && d.failed.is_none())
    }

    /// The ceiling `name` at `rows`.
    fn ceiling(&self, name: &str, rows: usize) -> Option<&Ceiling> {
        self.ceilings
            .iter()
            .find(|c| c.name == name && c.rows == rows)
    }

    /// What held a drain back, from its figures: whether Kafka alone is
    /// that slow on this machine, the step its transactions spent longest
    /// in, and the process that spent the most CPU per event.
    fn drain_limit(&self, d: &Drain) -> String {
        let mut parts = Vec::new();
        if let Some(kafka) = self.ceiling(ceilings::KAFKA, d.rows) {
            let share = d.events_per_second / kafka.events_per_second;
            parts.push(format!(
                "{} reach {:.0}/s, the drain {:.0}% of that{}",
                ceilings::KAFKA,
                kafka.events_per_second,
                share * 100.0,
                if share >= 0.8 {
                    ": Kafka's transactions bound it"
                } else {
                    ""
                }
            ));
        }
        if let Some(step) = longest_step(&d.stages) {
            parts.push(step);
        }
        if d.footprint.wal_bytes > 0.0 {
            parts.push(largest_cpu(&d.footprint));
        }
        parts.join("; ")
    }

    /// (target, what this run measured, met?, cause) for the targets.
    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for (system, ceiling_name) in [
            (REPLICATION, ceilings::DECODE),
            (POLLING, ceilings::CLAIM_MARK),
        ] {
            let Some(d) = self.largest_drain(system) else {
                continue;
            };
            if let Some(c) = self.ceiling(ceiling_name, d.rows) {
                let fraction = d.events_per_second / c.events_per_second;
                targets.push(Target {
                    target: format!("{system} drain ≥ 80% of {ceiling_name} ({} rows)", d.rows),
                    measured: format!("{:.0}%", fraction * 100.0),
                    met: fraction >= 0.8,
                    cause: self.drain_limit(d),
                });
            }
        }
        for s in self
            .steady
            .iter()
            .filter(|s| s.target_rate == 5_000 && s.system != DEBEZIUM && s.failed.is_none())
        {
            targets.push(Target {
                target: format!("{}: p99 commit → visible < 50 ms at 5k events/s", s.system),
                measured: format!("{:.1} ms", s.p99_ms),
                met: s.p99_ms < 50.0 && s.missing == 0,
                cause: self.latency_limit(s),
            });
        }
        for s in self
            .steady
            .iter()
            .filter(|s| s.target_rate == 1_000 && s.system != DEBEZIUM && s.failed.is_none())
        {
            let Some(floor) = self
                .floors
                .iter()
                .find(|f| f.target_rate == s.target_rate && f.failed.is_none())
            else {
                continue;
            };
            let ratio = s.p99_ms / floor.p99_ms;
            targets.push(Target {
                target: format!(
                    "{}: p99 commit → visible ≤ 1.25× the Kafka floor's p99 at 1k events/s",
                    s.system
                ),
                measured: format!(
                    "{ratio:.2}× ({:.1} ms; floor {:.1} ms)",
                    s.p99_ms, floor.p99_ms
                ),
                met: ratio <= 1.25 && s.missing == 0,
                cause: self.latency_limit(s),
            });
        }
        let drain_peaks = self
            .drains
            .iter()
            .map(|d| (d.system.as_str(), d.peak_rss_megabytes));
        let steady_peaks = self
            .steady
            .iter()
            .chain(&self.highest)
            .map(|s| (s.system.as_str(), s.peak_rss_megabytes));
        let peak = drain_peaks
            .chain(steady_peaks)
            .filter(|(system, _)| *system != DEBEZIUM)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((system, megabytes)) = peak {
            targets.push(Target {
                target: "outboxd RSS < 64 MB at any backlog (256-byte payloads)".into(),
                measured: format!("{megabytes:.0} MB peak"),
                met: megabytes > 0.0 && megabytes < 64.0,
                cause: format!("the peak was {system}'s"),
            });
        }
        let largest_payload_peak = self
            .payloads
            .iter()
            .filter(|d| d.failed.is_none())
            .max_by(|a, b| a.peak_rss_megabytes.total_cmp(&b.peak_rss_megabytes));
        if let Some(worst) = largest_payload_peak {
            targets.push(Target {
                target: "outboxd RSS < 64 MB for payloads of 100 B to 900 KB on every path".into(),
                measured: format!(
                    "{:.0} MB peak ({}, {}-byte payloads)",
                    worst.peak_rss_megabytes, worst.system, worst.payload_bytes
                ),
                met: worst.peak_rss_megabytes < 64.0,
                cause: format!(
                    "{} rows of {} bytes: batch_bytes of payload in each of the batches in flight, \
                     with librdkafka's copies",
                    worst.rows, worst.payload_bytes
                ),
            });
        }
        // The largest replication drain after a restart with its costs.
        if let Some(d) = self
            .drains
            .iter()
            .filter(|d| {
                d.system == System::OutboxdReplication.label()
                    && d.failed.is_none()
                    && d.footprint.wal_bytes > 0.0
            })
            .max_by_key(|d| d.rows)
        {
            let all = d.footprint.total_us();
            targets.push(Target {
                target: "CPU per event, every process together, replication drain ≤ 30 µs".into(),
                measured: format!(
                    "{all:.0} µs ({} rows: relay {:.1}, its sessions {:.1}, walsender {:.1}, \
                     other Postgres {:.1}, broker {:.1})",
                    d.rows,
                    d.footprint.relay_us,
                    d.footprint.relay_backends_us,
                    d.footprint.walsender_us,
                    d.footprint.postgres_other_us,
                    d.footprint.broker_us
                ),
                met: all <= 30.0,
                cause: largest_cpu(&d.footprint),
            });
        }
        // The relay's WAL on top of the inserts' own, without marks (the
        // target), with marks beside it.
        let wal_ratio = |label: &str| {
            self.drains
                .iter()
                .filter(|d| d.system == label && d.failed.is_none() && d.insert_wal_bytes > 0.0)
                .max_by_key(|d| d.rows)
                .map(|d| {
                    let ratio = (d.insert_wal_bytes + d.footprint.wal_bytes) / d.insert_wal_bytes;
                    (ratio, d.insert_wal_bytes, d.footprint.wal_bytes)
                })
        };
        if let Some((ratio, insert, rest)) = wal_ratio(System::OutboxdUnmarked.label()) {
            let with_marks = wal_ratio(System::OutboxdReplication.label())
                .map(|(ratio, _, rest)| format!("; with marks {ratio:.2}× ({rest:.0} B)"))
                .unwrap_or_default();
            targets.push(Target {
                target: "WAL per event / the insert's own WAL, replication drain without marks \
                         (after_publish: none) ≤ 1.1×"
                    .into(),
                measured: format!(
                    "{ratio:.2}× ({insert:.0} B insert, {rest:.0} B the rest){with_marks}"
                ),
                met: ratio <= 1.1,
                cause: format!(
                    "{rest:.0} B of WAL per event was written while the relay drained, beyond \
                     the inserts"
                ),
            });
        }
        let debezium = self.largest_drain(DEBEZIUM);
        for system in [REPLICATION, POLLING] {
            let (Some(debezium), Some(ours)) = (debezium, self.largest_drain(system)) else {
                continue;
            };
            let speed = ours.events_per_second / debezium.events_per_second;
            let memory = ours.peak_rss_megabytes / debezium.peak_rss_megabytes;
            let mut cause = format!(
                "3× Debezium's {:.0}/s is {:.0}/s",
                debezium.events_per_second,
                3.0 * debezium.events_per_second
            );
            if let Some(kafka) = self.ceiling(ceilings::KAFKA, ours.rows) {
                if kafka.events_per_second < 3.0 * debezium.events_per_second {
                    let _ = write!(
                        cause,
                        ", above what {} reach on this machine ({:.0}/s)",
                        ceilings::KAFKA,
                        kafka.events_per_second
                    );
                }
            }
            let _ = write!(cause, "; {}", self.drain_limit(ours));
            targets.push(Target {
                target: format!("{system}: ≥ 3× Debezium's drain rate at ≤ 1/10 of its memory"),
                measured: format!(
                    "{speed:.2}× the rate at {:.0}% of the memory",
                    memory * 100.0
                ),
                met: speed >= 3.0 && memory <= 0.1,
                cause,
            });
        }
        for s in self
            .startup
            .iter()
            .filter(|s| s.other_records > 0 && s.failed.is_none())
        {
            let without = self
                .startup
                .iter()
                .find(|e| e.other_records == 0 && e.system == s.system && e.case == s.case)
                .filter(|e| e.failed.is_none());
            let without_text = without
                .map(|e| format!("; median {:.2} s without them", e.median_seconds))
                .unwrap_or_default();
            let cause = match without {
                Some(e) if e.max_seconds >= 2.0 => format!(
                    "as slow without the other records (max {:.2} s): not the topic's size",
                    e.max_seconds
                ),
                _ => "reading the other relays' checkpoint records".to_string(),
            };
            targets.push(Target {
                target: format!(
                    "{}: {} < 2 s with {} other relays' checkpoint records (every sample)",
                    s.system, s.case, s.other_records
                ),
                measured: format!(
                    "max {:.2} s (median {:.2} s{without_text})",
                    s.max_seconds, s.median_seconds
                ),
                met: s.max_seconds < 2.0,
                cause,
            });
        }
        targets
    }

    /// What a steady run's latency is made of: the floor at its rate and
    /// the steps its transactions spent longest in.
    fn latency_limit(&self, s: &Steady) -> String {
        let mut parts = Vec::new();
        if let Some(floor) = self.floors.iter().find(|f| f.target_rate == s.target_rate) {
            parts.push(format!(
                "Kafka alone: p50 {:.1} ms, p99 {:.1} ms at this rate",
                floor.p50_ms, floor.p99_ms
            ));
        }
        if let Some(step) = longest_step(&s.stages) {
            parts.push(step);
        }
        parts.join("; ")
    }
}

/// One line of the targets table.
struct Target {
    target: String,
    measured: String,
    met: bool,
    /// The figures that explain a miss.
    cause: String,
}

/// The steps a transaction spent longest in, mean ms each (the marks run
/// behind the next transactions, so they are named apart).
fn longest_step(stages: &[StageTime]) -> Option<String> {
    let mut steps: Vec<&StageTime> = stages.iter().filter(|s| s.batches > 0.0).collect();
    steps.sort_by(|a, b| b.mean_ms().total_cmp(&a.mean_ms()));
    let named: Vec<String> = steps
        .iter()
        .take(3)
        .map(|s| format!("{} {:.1} ms", s.stage, s.mean_ms()))
        .collect();
    (!named.is_empty()).then(|| format!("longest steps per transaction: {}", named.join(", ")))
}

/// The process that spent the most CPU per event, and its share.
fn largest_cpu(f: &crate::footprint::Footprint) -> String {
    let all = f.total_us();
    let mut processes = [
        ("the broker", f.broker_us),
        ("outboxd", f.relay_us),
        (
            "outboxd's Postgres sessions (claims, marks)",
            f.relay_backends_us,
        ),
        ("the walsender", f.walsender_us),
        ("other Postgres processes", f.postgres_other_us),
    ];
    processes.sort_by(|a, b| b.1.total_cmp(&a.1));
    let (name, us) = processes[0];
    format!(
        "most CPU per event: {name}, {us:.1} of {all:.1} µs ({:.0}%)",
        if all > 0.0 { us / all * 100.0 } else { 0.0 }
    )
}

fn startup_row(w: &mut String, s: &Startup) {
    let samples = s
        .seconds
        .iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = match &s.failed {
        Some(failed) => writeln!(
            w,
            "| {} | {} | {} | FAILED | FAILED | | FAILED: {failed} |",
            s.system, s.case, s.other_records
        ),
        None => writeln!(
            w,
            "| {} | {} | {} | {:.2} | {:.2} | {samples} | clean |",
            s.system, s.case, s.other_records, s.median_seconds, s.max_seconds
        ),
    };
}

fn drain_table(w: &mut String, drains: &[Drain]) {
    let _ = writeln!(w, "| system | rows | payload B | events/s | MB/s | seconds | CPU s per M events | peak RSS MB | check |\n|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for d in drains {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            d.system,
            d.rows,
            d.payload_bytes,
            figure(d, d.events_per_second, 0),
            figure(d, d.megabytes_per_second, 1),
            figure(d, d.seconds, 1),
            figure(d, d.cpu_seconds_per_million, 1),
            figure(d, d.peak_rss_megabytes, 0),
            d.failed
                .as_deref()
                .map(|f| format!("FAILED: {f}"))
                .unwrap_or_else(|| "clean".into())
        );
    }
}

/// CPU per event of every process that serves a drain, and the WAL.
fn footprint_table<'a>(w: &mut String, drains: impl Iterator<Item = &'a Drain>) {
    let drains: Vec<&Drain> = drains
        .filter(|d| d.failed.is_none() && d.footprint.wal_bytes > 0.0)
        .collect();
    if drains.is_empty() {
        return;
    }
    let _ = writeln!(
        w,
        "\n## What a drained event costs, process by process\n\nCPU µs per event from `/proc`, \
         each process charged separately: the relay, the Postgres backends of its sessions \
         (claims, marks), the walsender streaming to it, the rest of Postgres (checkpointer, WAL \
         writer, autovacuum), and the broker. WAL is bytes per event written while draining; the \
         insert column is what writing the backlog itself cost, and the ratio is the two together \
         over the inserts alone.\n"
    );
    let _ = writeln!(
        w,
        "| run | payload B | relay | its sessions | walsender | other Postgres | broker | all | \
         insert WAL B | drain WAL B | WAL ratio |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for d in drains {
        let f = &d.footprint;
        let ratio = if d.insert_wal_bytes > 0.0 {
            format!(
                "{:.2}×",
                (d.insert_wal_bytes + f.wal_bytes) / d.insert_wal_bytes
            )
        } else {
            "–".into()
        };
        let _ = writeln!(
            w,
            "| {}, {} rows | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {ratio} |",
            d.system,
            d.rows,
            d.payload_bytes,
            f.relay_us,
            f.relay_backends_us,
            f.walsender_us,
            f.postgres_other_us,
            f.broker_us,
            f.total_us(),
            d.insert_wal_bytes,
            f.wal_bytes,
        );
    }
}

/// Mean milliseconds per Kafka transaction in each stage, for every outboxd
/// drain and steady run (`outboxd_stage_seconds`).
fn stage_table<'a>(w: &mut String, drains: impl Iterator<Item = &'a Drain>, steady: &'a [Steady]) {
    let runs = drains
        .filter(|d| !d.stages.is_empty())
        .map(|d| {
            (
                format!(
                    "{} drain, {} rows of {} B",
                    d.system, d.rows, d.payload_bytes
                ),
                &d.stages,
            )
        })
        .chain(
            steady
                .iter()
                .filter(|s| !s.stages.is_empty())
                .map(|s| (format!("{} at {}/s", s.system, s.target_rate), &s.stages)),
        )
        .collect::<Vec<_>>();
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(
        w,
        "\n## Where outboxd's time goes\n\nMean milliseconds per Kafka transaction in each step \
         (`outboxd_stage_seconds`), and transactions per run. `queued` runs from a batch's first \
         row in the relay's hands to its transaction's begin (replication: it includes gathering \
         the batch, `catch_up_filter` and `sync_standbys`); the marks run behind the next \
         transactions, so the steps overlap and do not add up to the latency.\n"
    );
    let _ = writeln!(
        w,
        "| run | transactions | {} |\n|---|---:|{}",
        Stage::ALL.map(Stage::name).join(" | "),
        "---:|".repeat(Stage::ALL.len())
    );
    for (name, stages) in runs {
        let transactions = stages
            .iter()
            .find(|s| s.stage == "commit")
            .map_or(0.0, |s| s.batches);
        let cells: Vec<String> = Stage::ALL
            .iter()
            .map(
                |stage| match stages.iter().find(|s| s.stage == stage.name()) {
                    Some(time) if time.batches > 0.0 => format!("{:.2}", time.mean_ms()),
                    _ => "–".to_string(),
                },
            )
            .collect();
        let _ = writeln!(w, "| {name} | {transactions:.0} | {} |", cells.join(" | "));
    }
}

fn steady_row(w: &mut String, s: &Steady, note: &str) {
    if let Some(failed) = &s.failed {
        let _ = writeln!(
            w,
            "| {}{note} | {} | FAILED: {failed} | | | | | | |",
            s.system, s.target_rate
        );
        return;
    }
    let _ = writeln!(
        w,
        "| {}{note} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |{}",
        s.system,
        s.target_rate,
        s.achieved_rate,
        s.p50_ms,
        s.p99_ms,
        s.p999_ms,
        s.max_ms,
        s.cpu_seconds_per_million,
        s.peak_rss_megabytes,
        if s.missing > 0 {
            format!(" {} events never arrived", s.missing)
        } else {
            String::new()
        }
    );
}

fn figure(drain: &Drain, value: f64, decimals: usize) -> String {
    if drain.failed.is_some() {
        "FAILED".into()
    } else {
        format!("{value:.decimals$}")
    }
}
