//! The machine's ceilings for the same backlog, measured in the same run:
//! what Postgres can decode (`pg_recvlogical` to /dev/null), what the claim
//! and mark SQL can do without Kafka, and what librdkafka can commit in
//! transactions of the same records without a database.
//!
//! Invariant: each ceiling does exactly one half of the relay's work, with
//! the relay's own SQL, batch size and producer, so "outboxd as a fraction
//! of the ceiling" measures the relay's overhead and nothing else.

use std::process::Command;
use std::time::Instant;

use outboxd::acknowledge::Acknowledger;
use outboxd::capture::polling::{claim_batch, ClaimLimits};
use outboxd::config::AfterPublish;
use outboxd::event::OutboxEvent;
use outboxd::kafka::checkpoint::Checkpoint;
use outboxd::kafka::identity::TableIdentity;
use outboxd::kafka::publisher::Publisher;
use outboxd::routing::Router;
use outboxd::table::{OutboxTable, PayloadEncoding};
use serde::Serialize;
use sqlx::{Connection, PgConnection};

use crate::backlog;
use crate::process::Running;
use crate::systems::{log_dir, BenchEnv, System};

#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub name: String,
    pub rows: usize,
    pub seconds: f64,
    pub events_per_second: f64,
}

impl Ceiling {
    fn new(name: &str, rows: usize, seconds: f64) -> Ceiling {
        eprintln!(
            "bench: ceiling {name}: {:.0} events/s ({rows} rows in {seconds:.1} s)",
            rows as f64 / seconds
        );
        Ceiling {
            name: name.to_string(),
            rows,
            seconds,
            events_per_second: rows as f64 / seconds,
        }
    }
}

pub const DECODE: &str = "pg_recvlogical (decode)";
pub const CLAIM_MARK: &str = "claim/mark SQL (no Kafka)";
pub const KAFKA: &str = "librdkafka transactions (no database)";
pub const BROKER: &str = "Kafka ProducerPerformance, transactional (Java client)";

/// How long each of `ProducerPerformance`'s transactions stays open: about
/// as long as one of outboxd's transactions of `batch_size` records.
const BROKER_TRANSACTION_MS: u32 = 50;

/// The broker's own ceiling, measured by Apache Kafka's `ProducerPerformance`
/// (the Java client, not ours): as many records of the same size, in
/// transactions of `BROKER_TRANSACTION_MS`, to a topic shaped like the
/// relay's (same partitions), `acks=all`, idempotent, `linger.ms` 0 as the
/// relay sets it. It limits nothing of ours, so it shows what our producer
/// path leaves on the table.
pub async fn broker(rows: usize, payload_bytes: usize) -> Ceiling {
    let bench = BenchEnv::new(&format!("ceiling-broker-{rows}"), System::OutboxdPolling).await;
    let stack =
        std::env::var("OUTBOXD_STACK_DIR").expect("OUTBOXD_STACK_DIR: run inside with-stack.sh");
    let topic = bench.routed_topic();
    let transactional_id = format!("bench-producer-perf-{rows}-{}", std::process::id());
    let log = log_dir().join(format!("producer-perf-{rows}.log"));
    let out = std::fs::File::create(&log).expect("producer-perf log");
    let started = Instant::now();
    let status = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/local/stack.sh"
        ))
        .args(["kafka-cli", &stack, "producer-perf"])
        .args(["--topic", &topic])
        .args(["--num-records", &rows.to_string()])
        .args(["--record-size", &payload_bytes.to_string()])
        .args(["--throughput", "-1"])
        .args(["--transactional-id", &transactional_id])
        .args([
            "--transaction-duration-ms",
            &BROKER_TRANSACTION_MS.to_string(),
        ])
        .arg("--producer-props")
        .arg(format!("bootstrap.servers={}", bench.env.kafka))
        .args(["acks=all", "enable.idempotence=true", "linger.ms=0"])
        .stdout(out.try_clone().expect("log handle"))
        .stderr(out)
        .status()
        .expect("run ProducerPerformance");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        status.success(),
        "ProducerPerformance failed; see {}",
        log.display()
    );
    // Its own figure excludes the JVM's start; ours includes it, so prefer
    // its summary line ("N records sent, X records/sec …") when present.
    let summary = std::fs::read_to_string(&log).unwrap_or_default();
    let own_rate = summary
        .lines()
        .rev()
        .find(|line| line.contains("records sent,"))
        .and_then(|line| line.split(',').nth(1))
        .and_then(|part| part.split_whitespace().next())
        .and_then(|rate| rate.parse::<f64>().ok());
    match own_rate {
        Some(rate) if rate > 0.0 => Ceiling::new(BROKER, rows, rows as f64 / rate),
        _ => Ceiling::new(BROKER, rows, seconds),
    }
}

/// `pg_recvlogical` streaming the backlog from a pgoutput slot created
/// before it was written, to /dev/null, until the WAL position after it.
pub async fn decode(rows: usize, payload_bytes: usize) -> Ceiling {
    let bench = BenchEnv::new(
        &format!("ceiling-decode-{rows}"),
        System::OutboxdReplication,
    )
    .await;
    let slot = bench.env.slot_name();
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&slot)
        .execute(bench.pool())
        .await
        .expect("create the pg_recvlogical slot");
    backlog::write(bench.pool(), rows, payload_bytes).await;
    let end: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(bench.pool())
        .await
        .expect("read the WAL end");
    let mut command = Command::new(pg_recvlogical());
    command
        .args(["--dbname", &bench.env.database_url])
        .args(["--slot", &slot, "--start", "--no-loop"])
        .args(["--endpos", &end, "--file", "/dev/null"])
        .args(["--option", "proto_version=1"])
        .args(["--option", "publication_names=outbox_publication"]);
    let log = log_dir().join(format!("{}-pg_recvlogical.log", bench.env.id));
    let started = Instant::now();
    let mut running = Running::spawn("pg_recvlogical", command, &log);
    let status = tokio::task::block_in_place(|| running.wait());
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        status.success(),
        "pg_recvlogical failed ({status}); its log: {}",
        crate::process::log_tail(&log, 20)
    );
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(bench.pool())
        .await
        .expect("drop the pg_recvlogical slot");
    Ceiling::new(DECODE, rows, seconds)
}

/// The relay's claim and mark statements, batch after batch, in one
/// transaction each, with nothing published.
pub async fn claim_mark(rows: usize, payload_bytes: usize) -> Ceiling {
    let bench = BenchEnv::new(&format!("ceiling-claim-{rows}"), System::OutboxdPolling).await;
    backlog::write(bench.pool(), rows, payload_bytes).await;
    crate::drain::analyze(&bench).await;
    let config = bench.env.config();
    let table = OutboxTable::from_config(&config.postgres).expect("outbox table");
    let claim_sql = table.claim_sql(PayloadEncoding::Text, false);
    let acknowledger = Acknowledger::new(&table, AfterPublish::Mark);
    let batch_size = config.capture.batch_size;
    let mut connection = PgConnection::connect(&bench.env.database_url)
        .await
        .expect("connect");
    // As the relay's own session does on a server with asynchronous commit.
    sqlx::query("SET synchronous_commit = on")
        .execute(&mut connection)
        .await
        .expect("SET synchronous_commit");
    let started = Instant::now();
    let mut claimed = 0;
    loop {
        let mut transaction = connection.begin().await.expect("BEGIN");
        let limits = ClaimLimits {
            rows: batch_size,
            bytes: config.capture.batch_bytes,
            sized_rows: batch_size,
        };
        let events = claim_batch(&mut transaction, &claim_sql, limits, 0, None)
            .await
            .expect("claim");
        if events.is_empty() {
            break;
        }
        claimed += events.len();
        let rows_claimed: Vec<(i64, &str)> =
            events.iter().map(|e| (e.seq, e.id.as_str())).collect();
        acknowledger
            .acknowledge(&mut transaction, &rows_claimed, &[])
            .await
            .expect("mark");
        transaction.commit().await.expect("COMMIT");
    }
    assert_eq!(claimed, rows, "the claim/mark loop saw every row once");
    Ceiling::new(CLAIM_MARK, rows, started.elapsed().as_secs_f64())
}

/// The relay's own publisher committing the backlog's records, batch by
/// batch with a checkpoint each, read from memory instead of Postgres.
pub async fn kafka(rows: usize, payload_bytes: usize) -> Ceiling {
    let bench = BenchEnv::new(&format!("ceiling-kafka-{rows}"), System::OutboxdPolling).await;
    let config = bench.env.config();
    outboxd::kafka::topics::ensure_checkpoint_topic(&config)
        .await
        .expect("checkpoint topic");
    let router = Router::new(&config.routing, config.kafka.max_message_bytes).expect("router");
    let pad = "b".repeat(payload_bytes.saturating_sub(48));
    let events: Vec<OutboxEvent> = (0..rows as u64)
        .map(|n| {
            let aggregate = format!("backlog-{}", n % backlog::AGGREGATES as u64);
            let payload = format!(
                r#"{{"n": {}, "pad": "{pad}", "aggregate": "{aggregate}"}}"#,
                n / backlog::AGGREGATES as u64 + 1
            );
            kafka_only_event(n, aggregate, payload)
        })
        .collect();
    let publisher = kafka_only_publisher(&config).await;
    let started = Instant::now();
    for batch in events.chunks(config.capture.batch_size) {
        publish_with_checkpoint(&publisher, &router, batch).await;
    }
    Ceiling::new(KAFKA, rows, started.elapsed().as_secs_f64())
}

/// The table the Kafka-only runs name in their checkpoints.
const KAFKA_ONLY_TABLE: &str = "public.outbox";

/// The publisher of a Kafka-only run, with the relay's identity for
/// `KAFKA_ONLY_TABLE`.
pub async fn kafka_only_publisher(config: &outboxd::Config) -> Publisher {
    let identity = TableIdentity::new(None, KAFKA_ONLY_TABLE, &config.relay.name);
    Publisher::connect(config, &identity)
        .await
        .expect("producer")
}

/// Event number `n` (seq `n + 1`) of a Kafka-only run: an `OrderCreated`
/// of `aggregate` with `payload`, as the bench's tables hold them.
pub fn kafka_only_event(n: u64, aggregate: String, payload: String) -> OutboxEvent {
    OutboxEvent {
        seq: n as i64 + 1,
        id: format!("00000000-0000-4000-8000-{n:012x}"),
        aggregate_type: "Order".into(),
        aggregate_id: aggregate,
        event_type: "OrderCreated".into(),
        payload: Some(payload.into_bytes()),
        headers_json: None,
        trace_parent: None,
        position: None,
        committed_at: None,
        poison: None,
        created_at: None,
    }
}

/// Publishes `events` as the relay does: one Kafka transaction with a
/// checkpoint naming them.
pub async fn publish_with_checkpoint(
    publisher: &Publisher,
    router: &Router,
    events: &[OutboxEvent],
) {
    let records: Vec<_> = events
        .iter()
        .map(|e| router.route(e).expect("routable"))
        .collect();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    let checkpoint = Checkpoint::new(KAFKA_ONLY_TABLE, None, &seqs, &[], None);
    publisher
        .publish(&records, &checkpoint)
        .await
        .unwrap_or_else(|e| panic!("publishing a Kafka-only batch: {e:?}"));
}

fn pg_recvlogical() -> String {
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin/pg_recvlogical"))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "pg_recvlogical".to_string())
}
