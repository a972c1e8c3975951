//! Start-up: how long outboxd takes to publish again after a cold start,
//! and after its leader is SIGKILLed while a standby waits, with the
//! checkpoint topic empty of other relays' records and holding 1,000,000
//! of them (`crowd`). Start-up reads the one checkpoint record its table's
//! checkpoint group points at, so both should cost the same either way.
//!
//! Each sample commits one row and times until that row is visible to a
//! `read_committed` consumer: for a cold start from the relay's spawn (the
//! table already has a checkpoint, from a run that sent everything and
//! stopped with SIGTERM; the row is committed just before), for a takeover
//! from the leader's SIGKILL (a standby with the same config waits; the
//! row is committed right after the kill). So a sample holds all a user
//! waits for: process start, connections, the leader lock (a standby asks
//! for it every 0.5 s), fencing, reading the checkpoint, reconciling, the
//! first claim or the stream's start, and the Kafka transaction.
//!
//! Invariant: a figure is reported only if the invariant checker found the
//! whole run (priming, every start and every takeover) clean.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::message::{Headers, Message};
use serde::Serialize;
use sqlx::PgPool;

use crate::drain::failure;
use crate::process::Running;
use crate::support::workload::Written;
use crate::systems::{BenchEnv, System};

/// Samples per case.
pub const RUNS: usize = 5;
pub const COLD_START: &str = "cold start";
pub const TAKEOVER: &str = "standby takeover";
/// How long one sample may take before the bench gives up on the run.
const LIMIT: Duration = Duration::from_secs(120);
const GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize)]
pub struct Startup {
    pub system: String,
    /// `COLD_START` or `TAKEOVER`.
    pub case: String,
    /// Other relays' records written to the checkpoint topic before the run.
    pub other_records: usize,
    /// Every sample, in the order measured.
    pub seconds: Vec<f64>,
    pub median_seconds: f64,
    pub max_seconds: f64,
    /// `None` when the checker found the run clean.
    pub failed: Option<String>,
}

/// Both cases for `system`, its checkpoints in `shared_topic` (holding
/// `other_records` of other relays) or, when `None`, in a topic of its own.
pub async fn run(system: System, shared_topic: Option<&str>, other_records: usize) -> [Startup; 2] {
    let name = format!("startup-{}-{other_records}", system.short());
    eprintln!("bench: {name}: priming");
    let bench = BenchEnv::sharing(&name, system, shared_topic).await;
    let arrivals = Arrivals::start(&bench.env.kafka, &bench.routed_topic());
    // The table's first checkpoint, which every later start reads. Not a
    // sample: a table's very first start also reads, once, the checkpoints
    // older outboxd versions kept by relay name, the whole topic.
    let priming = Instant::now();
    let mut written = bench.prime().await;
    eprintln!(
        "bench: {name}: primed (first start and one event) in {:.1} s",
        priming.elapsed().as_secs_f64()
    );

    eprintln!("bench: {name}: {RUNS} cold starts");
    let mut cold = Vec::new();
    for i in 1..=RUNS {
        let id = write_row(bench.pool(), &format!("cold-{i}"), &mut written).await;
        let mut relay = bench.start(&format!("cold-{i}"));
        let spawned = relay.started;
        cold.push(arrivals.wait(&id, spawned, &mut relay).await);
        relay.stop(GRACE);
    }

    eprintln!("bench: {name}: {RUNS} standby takeovers");
    let mut leader = bench.start("leader-0");
    // Killed only once it has published: a leader that is fully up.
    let id = write_row(bench.pool(), "takeover-0", &mut written).await;
    arrivals.wait(&id, Instant::now(), &mut leader).await;
    let mut takeover = Vec::new();
    for i in 1..=RUNS {
        // Each standby leads the next round, a new one waiting behind it.
        let mut standby = bench.start_another(&format!("leader-{i}"));
        wait_standing_by(&mut standby).await;
        let killed = Instant::now();
        leader.kill();
        let id = write_row(bench.pool(), &format!("takeover-{i}"), &mut written).await;
        takeover.push(arrivals.wait(&id, killed, &mut standby).await);
        leader = standby;
    }
    bench.env.wait_all_sent(LIMIT).await;
    leader.stop(GRACE);
    arrivals.finish();

    let failed = failure(&bench.check(&written).await);
    [(COLD_START, cold), (TAKEOVER, takeover)].map(|(case, seconds)| {
        let startup = summary(system, case, other_records, seconds, failed.clone());
        eprintln!(
            "bench: {name}: {case}: median {:.2} s, max {:.2} s ({}){}",
            startup.median_seconds,
            startup.max_seconds,
            startup
                .seconds
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            failed
                .as_deref()
                .map(|f| format!(", FAILED: {f}"))
                .unwrap_or_default()
        );
        startup
    })
}

fn summary(
    system: System,
    case: &str,
    other_records: usize,
    seconds: Vec<f64>,
    failed: Option<String>,
) -> Startup {
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    let median_seconds = if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    };
    Startup {
        system: system.label().to_string(),
        case: case.to_string(),
        other_records,
        max_seconds: sorted.last().copied().unwrap_or(0.0),
        median_seconds,
        seconds,
        failed,
    }
}

/// Commits one row, the first event of its own aggregate.
async fn write_row(pool: &PgPool, aggregate: &str, written: &mut Written) -> String {
    let id: String = sqlx::query_scalar(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('Order', $1, 'OrderCreated', jsonb_build_object('aggregate', $1::text, 'n', 1)) \
         RETURNING id::text",
    )
    .bind(aggregate)
    .fetch_one(pool)
    .await
    .expect("write a start-up row");
    written.committed += 1;
    written.committed_ids.push(id.clone());
    id
}

/// Waits until a second instance says it waits for the leader lock.
async fn wait_standing_by(standby: &mut Running) {
    let deadline = Instant::now() + LIMIT;
    while !standby.log_contains("waiting as a hot standby") {
        standby.assert_alive();
        assert!(
            Instant::now() < deadline,
            "the standby did not wait for the leader lock within {LIMIT:?}; see {}",
            standby.log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `read_committed` consumer on its own thread noting when each event
/// (by its `id` header) became visible.
struct Arrivals {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Arrivals {
    fn start(bootstrap: &str, topic: &str) -> Arrivals {
        let consumer = crate::systems::visibility_consumer(
            bootstrap,
            topic,
            &format!("bench-arrivals-{topic}"),
        );
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(message) = consumer.poll(Duration::from_millis(50)) else {
                        continue;
                    };
                    let at = Instant::now();
                    let message = message.expect("arrivals consumer poll");
                    let id = message.headers().and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == "id")
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    });
                    if let Some(id) = id {
                        seen.lock().expect("seen").entry(id).or_insert(at);
                    }
                }
            })
        };
        Arrivals { seen, stop, thread }
    }

    /// Seconds from `since` until event `id` was visible.
    async fn wait(&self, id: &str, since: Instant, running: &mut Running) -> f64 {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(at) = self.seen.lock().expect("seen").get(id) {
                return at.saturating_duration_since(since).as_secs_f64();
            }
            running.assert_alive();
            assert!(
                Instant::now() < deadline,
                "event {id} was not visible within {LIMIT:?}; see {}",
                running.log.display()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("arrivals consumer thread");
    }
}
