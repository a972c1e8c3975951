//! Table size: how big the outbox and its indexes grow over a long steady
//! run when `relay.retention` deletes sent rows one statement at a time (a
//! plain table), and when the relay drops whole expired partitions instead
//! (`postgres.partitioning`).
//!
//! Invariant: both runs get the same writer (steady's open loop), target
//! rate, number of events and retention, each on a fresh database, so what
//! differs is the table's layout (and the achieved rate, which the shared
//! machine decides and the output reports); sizes are Postgres' own, summed
//! over every relation of the partition tree; and each run ends with the
//! invariant checker, the rows housekeeping removed counted back in, whose
//! verdict outranks the figures.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::PgPool;

use crate::drain::failure;
use crate::steady::{self, OpenLoop};
use crate::systems::{BenchEnv, System};

/// How often the table is measured while the writer runs.
const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// `relay.retention` in both runs, and the partitions' width: the shortest
/// each allows, so a run of a few minutes sees many rounds of housekeeping.
const RETENTION: &str = "1m";
const PARTITION_INTERVAL: &str = "1m";
const PARTITIONS_AHEAD: u32 = 3;

/// Both runs' figures and the settings they ran with.
#[derive(Debug, Serialize)]
pub struct TableSize {
    pub machine: String,
    pub versions: String,
    pub workload: String,
    pub target_rate: u32,
    pub seconds: u64,
    pub retention: String,
    pub partition_interval: String,
    pub partitions_ahead: u32,
    pub sample_every_seconds: u64,
    pub runs: Vec<TableRun>,
}

/// One layout's run.
#[derive(Debug, Serialize)]
pub struct TableRun {
    /// `plain` or `partitioned`.
    pub table: String,
    pub achieved_rate: f64,
    pub events_written: usize,
    /// outboxd's `events_published` counter once it caught up.
    pub events_published: u64,
    /// Measured once the relay had published every event.
    pub at_end: Sample,
    pub peak_total_bytes: i64,
    pub peak_index_bytes: i64,
    pub peak_dead_tuples: i64,
    pub samples: Vec<Sample>,
    pub failed: Option<String>,
}

/// The outbox at one moment, summed over the table and all its partitions.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the writer started.
    pub at_seconds: f64,
    /// Heap, TOAST and indexes.
    pub total_bytes: i64,
    pub index_bytes: i64,
    /// Heap and TOAST.
    pub table_bytes: i64,
    pub live_rows: i64,
    pub dead_tuples: i64,
    /// Vacuums so far (autovacuum and manual), for reading the dead tuples.
    pub vacuums: i64,
    /// Partitions, the default one included; 0 for a plain table.
    pub partitions: i64,
}

/// Both runs, plain table first.
pub async fn run(rate: u32, seconds: u64, machine: &str, versions: &str) -> TableSize {
    let retention = format!("  retention: {RETENTION}\n");
    let partitioning = format!(
        "  partitioning:\n    interval: {PARTITION_INTERVAL}\n    ahead: {PARTITIONS_AHEAD}\n"
    );
    let runs = vec![
        run_one("plain", "", &retention, rate, seconds).await,
        run_one("partitioned", &partitioning, &retention, rate, seconds).await,
    ];
    TableSize {
        machine: machine.to_string(),
        versions: versions.to_string(),
        workload: format!(
            "steady section's open-loop writer (one-event transactions, {}-byte payloads, {} \
             connections)",
            steady::PAYLOAD_BYTES,
            steady::WRITERS
        ),
        target_rate: rate,
        seconds,
        retention: RETENTION.into(),
        partition_interval: PARTITION_INTERVAL.into(),
        partitions_ahead: PARTITIONS_AHEAD,
        sample_every_seconds: SAMPLE_EVERY.as_secs(),
        runs,
    }
}

async fn run_one(
    table: &str,
    postgres_lines: &str,
    relay_lines: &str,
    rate: u32,
    seconds: u64,
) -> TableRun {
    let name = format!("table-{table}");
    eprintln!("bench: {name}: starting ({rate} events/s for {seconds} s)");
    let system = System::OutboxdReplication;
    let bench = BenchEnv::configured(&name, system, postgres_lines, relay_lines).await;
    let mut running = bench.start("table");
    bench.env.wait_streaming(Duration::from_secs(180)).await;
    let mut written = crate::backlog::write_warmup(bench.pool()).await;
    // Its seq as well: housekeeping deletes it long before the check.
    let warmup_seq: i64 = sqlx::query_scalar("SELECT seq FROM outbox WHERE id = $1::uuid")
        .bind(&written.committed_ids[0])
        .fetch_one(bench.pool())
        .await
        .expect("the warm-up row's seq");
    bench
        .wait_published(&mut running, 1, Duration::from_secs(180))
        .await;

    let total = rate as u64 * seconds;
    let started = Instant::now();
    let writing = steady::write_open_loop(&bench.env.database_url, total, rate);
    tokio::pin!(writing);
    let mut samples = Vec::new();
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    let OpenLoop {
        mut rows,
        writing_seconds,
        ..
    } = loop {
        tokio::select! {
            done = &mut writing => break done,
            _ = ticks.tick() => {
                running.assert_alive();
                let sample = measure(bench.pool(), started).await;
                eprintln!("bench: {name}: {}", sample.line());
                samples.push(sample);
            }
        }
    };
    // Generous: on 2 shared cores the relay may trail the writer.
    bench
        .wait_published(&mut running, total + 1, Duration::from_secs(600))
        .await;
    let at_end = measure(bench.pool(), started).await;
    eprintln!("bench: {name}: at the end: {}", at_end.line());
    samples.push(at_end.clone());
    let events_published = bench.published().await;
    running.stop(Duration::from_secs(60));

    written.committed += rows.len();
    written
        .committed_ids
        .extend(rows.iter().map(|(_, id)| id.clone()));
    rows.push((warmup_seq, written.committed_ids[0].clone()));
    let report = bench.check_with_removed_rows(&written, &rows).await;
    let peak = |figure: fn(&Sample) -> i64| samples.iter().map(figure).max().unwrap_or(0);
    let run = TableRun {
        table: table.to_string(),
        achieved_rate: total as f64 / writing_seconds.max(1e-9),
        events_written: total as usize,
        events_published,
        peak_total_bytes: peak(|s| s.total_bytes),
        peak_index_bytes: peak(|s| s.index_bytes),
        peak_dead_tuples: peak(|s| s.dead_tuples),
        at_end,
        samples,
        failed: failure(&report),
    };
    eprintln!(
        "bench: {name}: achieved {:.0}/s; total {} MB at the end, {} MB peak; indexes {} MB at the \
         end, {} MB peak; peak dead tuples {}; {} rows left; {} published{}",
        run.achieved_rate,
        megabytes(run.at_end.total_bytes),
        megabytes(run.peak_total_bytes),
        megabytes(run.at_end.index_bytes),
        megabytes(run.peak_index_bytes),
        run.peak_dead_tuples,
        run.at_end.live_rows,
        run.events_published,
        run.failed
            .as_deref()
            .map(|f| format!(", FAILED: {f}"))
            .unwrap_or_default()
    );
    run
}

/// One sample, the same sums for both layouts: `pg_partition_tree` lists a
/// partitioned table with every partition, but a plain table not at all
/// (no rows), hence the union with the table itself. A partition dropped
/// meanwhile sizes as NULL, which the sums skip.
async fn measure(pool: &PgPool, started: Instant) -> Sample {
    let (total_bytes, index_bytes, table_bytes, live_rows, dead_tuples, vacuums, partitions) =
        sqlx::query_as::<_, (i64, i64, i64, i64, i64, i64, i64)>(
        "WITH tree AS (SELECT relid, level FROM pg_partition_tree('outbox') \
                       UNION SELECT 'outbox'::regclass, 0) \
         SELECT \
           (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint FROM tree) AS total_bytes, \
           (SELECT coalesce(sum(pg_indexes_size(relid)), 0)::bigint FROM tree) AS index_bytes, \
           (SELECT coalesce(sum(pg_table_size(relid)), 0)::bigint FROM tree) AS table_bytes, \
           (SELECT count(*) FROM outbox) AS live_rows, \
           (SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM pg_stat_user_tables \
             WHERE relid IN (SELECT relid FROM tree)) AS dead_tuples, \
           (SELECT coalesce(sum(autovacuum_count + vacuum_count), 0)::bigint FROM pg_stat_user_tables \
             WHERE relid IN (SELECT relid FROM tree)) AS vacuums, \
           (SELECT count(*) FROM tree WHERE level > 0) AS partitions",
        )
        .fetch_one(pool)
        .await
        .expect("measure the outbox table");
    Sample {
        at_seconds: started.elapsed().as_secs_f64(),
        total_bytes,
        index_bytes,
        table_bytes,
        live_rows,
        dead_tuples,
        vacuums,
        partitions,
    }
}

impl Sample {
    fn line(&self) -> String {
        format!(
            "t={:.0} s: total {} MB (indexes {} MB), {} rows, {} dead tuples, {} vacuums, {} partitions",
            self.at_seconds,
            megabytes(self.total_bytes),
            megabytes(self.index_bytes),
            self.live_rows,
            self.dead_tuples,
            self.vacuums,
            self.partitions
        )
    }
}

fn megabytes(bytes: i64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

impl TableSize {
    pub fn failed(&self) -> usize {
        self.runs.iter().filter(|r| r.failed.is_some()).count()
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let w = &mut md;
        let _ = writeln!(w, "# Outbox table size, with and without partitions\n");
        let _ = writeln!(w, "Written by `make bench` (section `table`).\n");
        let _ = writeln!(w, "- Machine: {}", self.machine);
        let _ = writeln!(w, "- Versions: {}\n", self.versions);
        let _ = writeln!(
            w,
            "Each run is outboxd in replication mode, on a fresh database of the bench profile's \
             durable Postgres (fsync, synchronous_commit and full_page_writes on), fed by the {} at \
             {} events/s for {} s, with `relay.retention: {}`; the partitioned run adds \
             `postgres.partitioning` with interval {} and ahead {}. The relay's housekeeping runs \
             once a minute (plain: deleting rows sent longer ago than the retention, 2,000 per \
             statement; partitioned: creating partitions ahead and dropping those whose upper bound \
             is older than the retention and that hold no unsent row), and the table is measured \
             every {} s and once the relay has published every event (\"end\"): heap, TOAST and \
             indexes summed over every partition, live rows by `count(*)`, dead tuples from \
             `pg_stat_user_tables`.\n",
            self.workload,
            self.target_rate,
            self.seconds,
            self.retention,
            self.partition_interval,
            self.partitions_ahead,
            self.sample_every_seconds,
        );
        let _ = writeln!(
            w,
            "Reading it: a plain table's row stays until a round finds it sent longer ago than the \
             retention (up to about retention + 1 min after it was sent), a partition's rows until \
             a round finds the partition's upper bound older than the retention (up to interval + \
             retention + 1 min after the partition's start), so at the same rate the partitioned \
             table holds more rows, while its dead tuples come only from marking rows sent (an \
             UPDATE each), none from deletes.\n"
        );
        if self
            .runs
            .iter()
            .any(|run| run.achieved_rate < 0.95 * self.target_rate as f64)
        {
            let _ = writeln!(
                w,
                "The writer fell short of the target rate on this machine (its one-event commits \
                 are durable, and the cores are shared), so a run below it wrote the same events over \
                 a longer time.\n"
            );
        }
        let _ = writeln!(
            w,
            "| table | achieved events/s | total MB end / peak | indexes MB end / peak | peak dead tuples | rows left | partitions at end | events published | check |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for run in &self.runs {
            let _ = match &run.failed {
                Some(failed) => writeln!(
                    w,
                    "| {} | FAILED | FAILED | FAILED | FAILED | FAILED | | | FAILED: {failed} |",
                    run.table
                ),
                None => writeln!(
                    w,
                    "| {} | {:.0} | {} / {} | {} / {} | {} | {} | {} | {} | clean |",
                    run.table,
                    run.achieved_rate,
                    megabytes(run.at_end.total_bytes),
                    megabytes(run.peak_total_bytes),
                    megabytes(run.at_end.index_bytes),
                    megabytes(run.peak_index_bytes),
                    run.peak_dead_tuples,
                    run.at_end.live_rows,
                    run.at_end.partitions,
                    run.events_published,
                ),
            };
        }
        md
    }
}
