//! `make bench`: outboxd against the machine's ceilings and Debezium
//! Server on the same PostgreSQL and Kafka, in one run.
//!
//! Runs, in order: the ceilings, backlog drains, payload sizes, steady
//! state at fixed rates, the outbox's table and index size over a long
//! steady run with and without partitions, the highest rate outboxd
//! sustains, and start-up (cold start and standby takeover) with other
//! relays' checkpoints in the checkpoint topic, and the WAL-message outbox
//! beside the table (drains, steady latency, WAL per event). Results
//! go to `bench/results.json` after every section (so a failure keeps what
//! was measured) and to `bench/results.md` at the end, which is printed;
//! a run that leaves out all of those sections leaves both files alone.
//! The table sizes go to files of their own, `bench/table-size.json` and
//! `bench/table-size.md`, and the message outbox's to `bench/messages.json`
//! and `bench/messages.md`, so running either section alone replaces no
//! other section's figures.
//!
//! Knobs, all optional (environment):
//! - `BENCH_SIZES`: backlog sizes, default `100000,1000000` (add 10000000
//!   for the optional 10M drain);
//! - `BENCH_RATES`: steady-state rates, default `1000,5000`;
//! - `BENCH_LADDER`: rates tried for the highest sustained one;
//! - `BENCH_STEADY_SECONDS`: length of each steady run, default 20;
//! - `BENCH_TABLE_SECONDS`: length of each table-size run, default 360;
//! - `BENCH_TABLE_RATE`: the table-size runs' rate, default 2000 events/s;
//! - `BENCH_MESSAGES_EVENTS`: the message section's backlog, default 100000;
//! - `BENCH_SKIP`: sections to leave out, of `ceilings,drain,payloads,
//!   steady,table,highest,startup,messages,debezium`.
//!
//! Benchmarks measure; they assert nothing about time. A run the invariant
//! checker fails is reported as FAILED, and the bench exits non-zero.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports, unused_macros)]
mod support;

mod backlog;
mod ceilings;
mod crowd;
mod drain;
mod footprint;
mod messages;
mod process;
mod report;
mod startup;
mod steady;
mod systems;
mod table_size;

use std::path::PathBuf;

use report::Results;
use systems::System;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let clean = runtime.block_on(run());
    std::process::exit(if clean { 0 } else { 1 });
}

async fn run() -> bool {
    let sizes = list("BENCH_SIZES", &[100_000, 1_000_000]);
    let rates = list("BENCH_RATES", &[1_000, 5_000]);
    let ladder = list(
        "BENCH_LADDER",
        &[
            10_000, 15_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000,
        ],
    );
    let seconds = list("BENCH_STEADY_SECONDS", &[20])[0] as u64;
    let table_seconds = list("BENCH_TABLE_SECONDS", &[360])[0] as u64;
    let table_rate = list("BENCH_TABLE_RATE", &[2_000])[0] as u32;
    let message_events = list("BENCH_MESSAGES_EVENTS", &[100_000])[0];
    let skip = std::env::var("BENCH_SKIP").unwrap_or_default();
    let wanted = |section: &str| !skip.split(',').any(|s| s.trim() == section);
    // The sections whose figures go to results.json and results.md; a run
    // of none of them keeps the files an earlier full run wrote.
    let writes_results = [
        "ceilings", "drain", "payloads", "steady", "highest", "startup",
    ]
    .iter()
    .any(|section| wanted(section));
    let mut systems = vec![System::OutboxdReplication, System::OutboxdPolling];
    if wanted("debezium") {
        systems.push(System::Debezium);
    }

    let mut results = Results {
        machine: machine(),
        versions: versions().await,
        ..Results::default()
    };
    // Which server the figures are for (OUTBOXD_PG_VERSION picks it); the
    // same line heads results.md.
    eprintln!("bench: {}", results.versions);
    if wanted("ceilings") {
        for &rows in &sizes {
            results.ceilings.push(ceilings::decode(rows, 256).await);
            results.ceilings.push(ceilings::claim_mark(rows, 256).await);
            results.ceilings.push(ceilings::kafka(rows, 256).await);
            results.ceilings.push(ceilings::broker(rows, 256).await);
            save(&results);
        }
    }
    if wanted("drain") {
        // Replication without marks too: the WAL the relay adds, and what
        // not marking saves, from the same run.
        let drain_systems = systems.iter().copied().chain([System::OutboxdUnmarked]);
        let drain_systems: Vec<System> = drain_systems.collect();
        for &rows in &sizes {
            for &system in &drain_systems {
                results.drains.push(drain::run(system, rows, 256).await);
                save(&results);
            }
        }
    }
    if wanted("payloads") {
        // Every path a batch of large payloads can take: the stream after
        // a restart, the drain through the table on a first start, claims.
        let paths = [
            (System::OutboxdReplication, drain::Start::Restart),
            (System::OutboxdReplication, drain::Start::First),
            (System::OutboxdPolling, drain::Start::Restart),
        ];
        for (bytes, rows) in [
            (100, 100_000),
            (1_000, 100_000),
            (10_000, 20_000),
            (100_000, 2_000),
            (900_000, 300),
        ] {
            for (system, start) in paths {
                results
                    .payloads
                    .push(drain::run_from(system, start, rows, bytes).await);
                save(&results);
            }
        }
    }
    if wanted("steady") {
        for &rate in &rates {
            results
                .floors
                .push(steady::kafka_floor(rate as u32, seconds).await);
            save(&results);
        }
        for &rate in &rates {
            for &system in &systems {
                results
                    .steady
                    .push(steady::run(system, rate as u32, seconds).await);
                save(&results);
            }
        }
    }
    let mut table_failed = 0;
    if wanted("table") {
        let table = table_size::run(
            table_rate,
            table_seconds,
            &results.machine,
            &results.versions,
        )
        .await;
        let json = serde_json::to_string_pretty(&table).expect("table sizes as JSON");
        std::fs::write(out_dir().join("table-size.json"), json)
            .expect("write bench/table-size.json");
        let markdown = table.markdown();
        std::fs::write(out_dir().join("table-size.md"), &markdown)
            .expect("write bench/table-size.md");
        println!("{markdown}");
        table_failed = table.failed();
    }
    let mut messages_failed = 0;
    if wanted("messages") {
        let comparison = messages::run(
            message_events,
            &rates,
            seconds,
            &results.machine,
            &results.versions,
        )
        .await;
        let json = serde_json::to_string_pretty(&comparison).expect("message figures as JSON");
        std::fs::write(out_dir().join("messages.json"), json).expect("write bench/messages.json");
        let markdown = comparison.markdown();
        std::fs::write(out_dir().join("messages.md"), &markdown).expect("write bench/messages.md");
        println!("{markdown}");
        messages_failed = comparison.failed();
    }
    if wanted("highest") {
        for system in [System::OutboxdReplication, System::OutboxdPolling] {
            let ladder: Vec<u32> = ladder.iter().map(|&r| r as u32).collect();
            if let Some(best) = steady::highest_sustained(system, &ladder, seconds.min(15)).await {
                results.highest.push(best);
                save(&results);
            }
        }
    }
    if wanted("startup") {
        // Filled first, so the log cleaner has had its chance at the
        // closed segments by the time a relay reads the topic.
        let shared = format!("bench-startup-{}.checkpoints", std::process::id());
        eprintln!(
            "bench: startup: writing {} other relays' checkpoint records to {shared}",
            crowd::RECORDS
        );
        let filling = std::time::Instant::now();
        crowd::create_and_fill(&support::servers().kafka, &shared).await;
        eprintln!(
            "bench: startup: filled {shared} in {:.1} s",
            filling.elapsed().as_secs_f64()
        );
        // Each mode's two states back to back, so they share the machine's
        // weather and compare.
        for system in [System::OutboxdReplication, System::OutboxdPolling] {
            for (topic, others) in [(None, 0), (Some(shared.as_str()), crowd::RECORDS)] {
                results
                    .startup
                    .extend(startup::run(system, topic, others).await);
                save(&results);
            }
        }
    }
    if writes_results {
        save(&results);
        let markdown = results.markdown();
        std::fs::write(out_dir().join("results.md"), &markdown).expect("write bench/results.md");
        println!("{markdown}");
    }
    let failed = results
        .drains
        .iter()
        .chain(&results.payloads)
        .filter_map(|d| d.failed.as_ref())
        .chain(
            results
                .steady
                .iter()
                .chain(&results.highest)
                .filter_map(|s| s.failed.as_ref()),
        )
        .chain(results.startup.iter().filter_map(|s| s.failed.as_ref()))
        .count()
        + table_failed
        + messages_failed;
    if failed > 0 {
        eprintln!("bench: {failed} run(s) failed the invariant check; see FAILED above");
    }
    failed == 0
}

fn list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .split(',')
            .map(|v| {
                v.trim()
                    .replace('_', "")
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: `{v}` is not a whole number"))
            })
            .collect(),
        _ => default.to_vec(),
    }
}

fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench")
}

fn save(results: &Results) {
    let json = serde_json::to_string_pretty(results).expect("results as JSON");
    std::fs::write(out_dir().join("results.json"), json).expect("write bench/results.json");
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!("{cores} cores ({cpu}), {memory_gib:.0} GiB; Postgres, Kafka, the system under test and the load generator share them")
}

async fn versions() -> String {
    let servers = support::servers();
    let postgres: String = match sqlx::PgPool::connect(&servers.postgres_url).await {
        Ok(pool) => sqlx::query_scalar("SHOW server_version")
            .fetch_one(&pool)
            .await
            .unwrap_or_default(),
        Err(e) => panic!("connect to the bench Postgres: {e}"),
    };
    format!(
        "outboxd {} (release build), PostgreSQL {postgres}, {}",
        env!("CARGO_PKG_VERSION"),
        std::env::var("BENCH_VERSIONS").unwrap_or_default()
    )
}
