//! Steady state: an open-loop writer commits one-event transactions at a
//! fixed rate while a `read_committed` consumer in the same process notes
//! when each event becomes visible; the difference is the latency a
//! service's consumer sees, from the Postgres commit to Kafka.
//!
//! Invariant: the writer's schedule never waits for the relay (event k is
//! due at k / rate seconds whatever happened before), so a slow relay shows
//! up as latency, not as a politely slower writer; and every run ends with
//! the invariant checker, whose verdict outranks the figures.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rdkafka::message::Message;
use serde::Serialize;

use crate::drain::failure;
use crate::process::Running;
use crate::support::workload::writer_pool;
use crate::systems::{stages_between, BenchEnv, StageTime, System};

/// Writer connections; each owns its aggregates, so per-aggregate order is
/// the order of its own commits.
pub const WRITERS: usize = 16;
const AGGREGATES_PER_WRITER: u64 = 50;
pub const PAYLOAD_BYTES: usize = 256;

#[derive(Debug, Clone, Serialize)]
pub struct Steady {
    pub system: String,
    pub target_rate: u32,
    pub achieved_rate: f64,
    pub events: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Events not visible 10 s after the writer stopped.
    pub missing: usize,
    pub cpu_seconds_per_million: f64,
    pub peak_rss_megabytes: f64,
    /// outboxd: where its Kafka transactions' time went during the run.
    pub stages: Vec<StageTime>,
    /// The writer held the rate and the relay kept up (see `sustained`).
    pub sustained: bool,
    pub failed: Option<String>,
}

/// One run of `seconds` at `rate` events per second.
pub async fn run(system: System, rate: u32, seconds: u64) -> Steady {
    let name = format!("steady-{}-{rate}", system.short());
    eprintln!("bench: {name}: starting");
    let bench = BenchEnv::new(&name, system).await;
    let mut running = bench.start("steady");
    if system == System::Debezium {
        // It only sees what commits after its slot exists.
        bench.wait_streaming_log(&mut running).await;
    }
    let mut written = bench.write_warmup().await;
    let consumer = LatencyConsumer::start(&bench.env.kafka, &bench.routed_topic());
    assert!(
        consumer
            .wait_seen(1, Duration::from_secs(180), &mut running)
            .await,
        "{name}: the warm-up event did not reach Kafka within 180 s; see {}",
        running.log.display()
    );

    let before = running.usage();
    let stages_before = bench.stages().await;
    let total = rate as u64 * seconds;
    let OpenLoop {
        rows,
        commits,
        writing_seconds,
    } = write_open_loop_of(&bench.env.database_url, total, rate, system.is_messages()).await;
    written.committed += rows.len();
    written
        .committed_ids
        .extend(rows.into_iter().map(|(_, id)| id));
    consumer
        .wait_seen(total + 1, Duration::from_secs(10), &mut running)
        .await;
    let after = running.usage();
    let stages = stages_between(&stages_before, &bench.stages().await);
    let seen = consumer.finish();
    running.stop(Duration::from_secs(60));

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let mut missing = 0;
    for (k, committed_at) in &commits {
        match seen.get(*k as usize).copied().flatten() {
            Some(visible_at) => {
                let micros = visible_at
                    .saturating_duration_since(*committed_at)
                    .as_micros() as u64;
                histogram.saturating_record(micros.max(1));
            }
            None => missing += 1,
        }
    }
    let report = bench.check(&written).await;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let achieved_rate = total as f64 / writing_seconds.max(1e-9);
    let p99_ms = ms(0.99);
    let steady = Steady {
        system: system.label().to_string(),
        target_rate: rate,
        achieved_rate,
        events: total as usize,
        p50_ms: ms(0.50),
        p99_ms,
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1000.0,
        missing,
        cpu_seconds_per_million: (after.cpu_seconds - before.cpu_seconds) / total as f64 * 1e6,
        peak_rss_megabytes: after.peak_rss_bytes as f64 / 1e6,
        stages,
        sustained: achieved_rate >= 0.95 * rate as f64 && missing == 0 && p99_ms < 1000.0,
        failed: failure(&report),
    };
    eprintln!(
        "bench: {name}: achieved {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, missing {}{}",
        steady.achieved_rate,
        steady.p50_ms,
        steady.p99_ms,
        steady.p999_ms,
        steady.missing,
        steady
            .failed
            .as_deref()
            .map(|f| format!(", FAILED: {f}"))
            .unwrap_or_default()
    );
    steady
}

/// The label of the floor `kafka_floor` measures.
pub const KAFKA_FLOOR: &str = "Kafka transactions alone (no database)";

/// The latency floor of the protocol at `rate`: records come due on the
/// steady writer's schedule, and outboxd's own publisher commits them
/// without a database, each transaction carrying every record due when it
/// begins (at most `capture.batch_size`) and its checkpoint. Latency runs
/// from a record's due time to a `read_committed` consumer seeing it, so
/// outboxd's commit → visible at the same rate compares to it directly.
pub async fn kafka_floor(rate: u32, seconds: u64) -> Steady {
    use crate::ceilings::{kafka_only_event, kafka_only_publisher, publish_with_checkpoint};
    use outboxd::event::OutboxEvent;
    use outboxd::routing::Router;

    let name = format!("kafka-floor-{rate}");
    eprintln!("bench: {name}: starting");
    let bench = BenchEnv::new(&name, System::OutboxdReplication).await;
    let config = bench.env.config();
    outboxd::kafka::topics::ensure_checkpoint_topic(&config)
        .await
        .expect("checkpoint topic");
    let router = Router::new(&config.routing, config.kafka.max_message_bytes).expect("router");
    let publisher = kafka_only_publisher(&config).await;
    let consumer = LatencyConsumer::start(&bench.env.kafka, &bench.routed_topic());
    let pad = "b".repeat(PAYLOAD_BYTES - 64);
    let event = |k: u64| {
        let aggregate = format!(
            "w{}-{}",
            k % WRITERS as u64,
            (k / WRITERS as u64) % AGGREGATES_PER_WRITER
        );
        let payload = format!(r#"{{"aggregate": "{aggregate}", "k": {k}, "pad": "{pad}"}}"#);
        kafka_only_event(k, aggregate, payload)
    };
    // Record 0 warms the producer and the consumer up, as the steady
    // runs' warm-up event does: a consumer still joining would otherwise
    // charge its start to the first records.
    publish_with_checkpoint(&publisher, &router, &[event(0)]).await;
    let seen_count = |n: u64| consumer.count.load(Ordering::Relaxed) >= n;
    let warm_up_limit = Instant::now() + Duration::from_secs(60);
    while !seen_count(1) {
        assert!(
            Instant::now() < warm_up_limit,
            "{name}: the warm-up record was not visible within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Records 1..=total are measured.
    let total = rate as u64 * seconds;
    let due =
        |start: Instant, k: u64| start + Duration::from_secs_f64((k - 1) as f64 / rate as f64);
    let start = Instant::now();
    let mut next = 1u64;
    while next <= total {
        tokio::time::sleep_until(due(start, next).into()).await;
        let elapsed = start.elapsed().as_secs_f64();
        let due_now = ((elapsed * rate as f64) as u64 + 1).min(total);
        let last = due_now
            .min(next + config.capture.batch_size as u64 - 1)
            .max(next);
        let events: Vec<OutboxEvent> = (next..=last).map(event).collect();
        publish_with_checkpoint(&publisher, &router, &events).await;
        next = last + 1;
    }
    let writing_seconds = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen_count(total + 1) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = consumer.finish();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let mut missing = 0;
    for k in 1..=total {
        match seen.get(k as usize).copied().flatten() {
            Some(visible_at) => {
                let micros = visible_at
                    .saturating_duration_since(due(start, k))
                    .as_micros() as u64;
                histogram.saturating_record(micros.max(1));
            }
            None => missing += 1,
        }
    }
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let achieved_rate = total as f64 / writing_seconds.max(1e-9);
    let floor = Steady {
        system: KAFKA_FLOOR.to_string(),
        target_rate: rate,
        achieved_rate,
        events: total as usize,
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1000.0,
        missing,
        cpu_seconds_per_million: 0.0,
        peak_rss_megabytes: 0.0,
        stages: Vec::new(),
        sustained: achieved_rate >= 0.95 * rate as f64 && missing == 0,
        failed: (missing > 0).then(|| format!("{missing} records never became visible")),
    };
    eprintln!(
        "bench: {name}: achieved {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, missing {missing}",
        floor.achieved_rate, floor.p50_ms, floor.p99_ms, floor.p999_ms
    );
    floor
}

/// The highest rate of `ladder` the machine sustains, with that run's
/// figures; stops at the first rate it cannot hold.
pub async fn highest_sustained(system: System, ladder: &[u32], seconds: u64) -> Option<Steady> {
    let mut best = None;
    for &rate in ladder {
        let run = run(system, rate, seconds).await;
        if !run.sustained || run.failed.is_some() {
            break;
        }
        best = Some(run);
    }
    best
}

/// What the open-loop writer committed.
pub struct OpenLoop {
    /// (seq, event id) of every committed event.
    pub rows: Vec<(i64, String)>,
    /// Per event number k, when its COMMIT returned.
    pub commits: Vec<(u64, Instant)>,
    /// From the first event's due time to the last COMMIT returning.
    pub writing_seconds: f64,
}

/// `total` one-event transactions over `WRITERS` connections, event k due
/// at k / `rate` seconds from the start whatever happened before.
pub async fn write_open_loop(database_url: &str, total: u64, rate: u32) -> OpenLoop {
    write_open_loop_of(database_url, total, rate, false).await
}

/// Like `write_open_loop`; with `messages`, each transaction emits its
/// event with `outboxd_emit` instead of inserting a row (seq 0).
pub async fn write_open_loop_of(
    database_url: &str,
    total: u64,
    rate: u32,
    messages: bool,
) -> OpenLoop {
    let pool = writer_pool(database_url, WRITERS as u32).await;
    let start = Instant::now();
    let writers: Vec<_> = (0..WRITERS as u64)
        .map(|writer| {
            let pool = pool.clone();
            tokio::spawn(write_schedule(pool, writer, total, rate, start, messages))
        })
        .collect();
    let mut rows = Vec::with_capacity(total as usize);
    let mut commits = Vec::with_capacity(total as usize);
    for handle in writers {
        let (own_rows, times) = handle.await.expect("writer task");
        rows.extend(own_rows);
        commits.extend(times);
    }
    let writing_seconds = commits
        .iter()
        .map(|(_, at)| at.duration_since(start).as_secs_f64())
        .fold(0.0, f64::max);
    OpenLoop {
        rows,
        commits,
        writing_seconds,
    }
}

/// Writer `writer`'s share of the schedule: events k ≡ writer (mod
/// WRITERS), event k due at `start + k / rate`. Returns the (seq, id) of
/// each row it committed and, per event, when its COMMIT returned.
async fn write_schedule(
    pool: sqlx::PgPool,
    writer: u64,
    total: u64,
    rate: u32,
    start: Instant,
    messages: bool,
) -> (Vec<(i64, String)>, Vec<(u64, Instant)>) {
    let sql = if messages {
        "SELECT 0::bigint, outboxd_emit('Order', $1, 'OrderCreated', $2::jsonb)::text"
    } else {
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('Order', $1, 'OrderCreated', $2::jsonb) RETURNING seq, id::text"
    };
    let pad = "b".repeat(PAYLOAD_BYTES - 64);
    let mut rows = Vec::new();
    let mut times = Vec::new();
    let mut k = writer;
    let mut own = 0u64;
    while k < total {
        let due = start + Duration::from_secs_f64(k as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let aggregate = format!("w{writer}-{}", own % AGGREGATES_PER_WRITER);
        let n = own / AGGREGATES_PER_WRITER + 1;
        let payload =
            format!(r#"{{"aggregate": "{aggregate}", "n": {n}, "k": {k}, "pad": "{pad}"}}"#);
        // The seq too: a run with retention checks rows the table no longer holds.
        let row: (i64, String) = sqlx::query_as(sql)
            .bind(&aggregate)
            .bind(&payload)
            .fetch_one(&pool)
            .await
            .expect("steady-state insert");
        times.push((k, Instant::now()));
        rows.push(row);
        own += 1;
        k += WRITERS as u64;
    }
    (rows, times)
}

/// A `read_committed` consumer on its own thread noting, per event number
/// `k`, when it became visible.
struct LatencyConsumer {
    seen: Arc<Mutex<Vec<Option<Instant>>>>,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl LatencyConsumer {
    fn start(bootstrap: &str, topic: &str) -> LatencyConsumer {
        let consumer = crate::systems::visibility_consumer(
            bootstrap,
            topic,
            &format!("bench-latency-{topic}"),
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, count, stop) = (seen.clone(), count.clone(), stop.clone());
            std::thread::spawn(move || {
                #[derive(serde::Deserialize)]
                struct Numbered {
                    k: Option<u64>,
                }
                while !stop.load(Ordering::Relaxed) {
                    let Some(message) = consumer.poll(Duration::from_millis(50)) else {
                        continue;
                    };
                    let at = Instant::now();
                    let message = message.expect("latency consumer poll");
                    let k = message
                        .payload()
                        .and_then(|p| serde_json::from_slice::<Numbered>(p).ok())
                        .and_then(|n| n.k);
                    if let Some(k) = k {
                        let mut seen = seen.lock().expect("seen");
                        if seen.len() <= k as usize {
                            seen.resize(k as usize + 1, None);
                        }
                        seen[k as usize].get_or_insert(at);
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        LatencyConsumer {
            seen,
            count,
            stop,
            thread,
        }
    }

    /// Waits until `n` records were read; false if `limit` passed first.
    async fn wait_seen(&self, n: u64, limit: Duration, running: &mut Running) -> bool {
        let deadline = Instant::now() + limit;
        while self.count.load(Ordering::Relaxed) < n {
            if Instant::now() >= deadline {
                return false;
            }
            running.assert_alive();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn finish(self) -> Vec<Option<Instant>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("latency consumer thread");
        Arc::try_unwrap(self.seen)
            .expect("consumer done")
            .into_inner()
            .expect("seen")
    }
}
