//! What an operator watches: `/metrics` moving during a real run and
//! parsing as OpenMetrics, `/healthz` and `/readyz`, `outboxd status` on a
//! known backlog, and SIGTERM in the middle of a batch.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::http::get;
use crate::support::metrics::sum;
use crate::support::workload::{assert_exactly_once, write_orders, Written};
use crate::support::{signal, InProcessRelay, Mode, TestEnv};

async fn scrape(base: &str) -> String {
    let (status, body) = get(base, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

in_both_modes!(metrics_move_with_a_real_run_and_parse, worker_threads = 4);
async fn metrics_move_with_a_real_run_and_parse(mode: Mode) {
    let env = TestEnv::new("metrics", mode).await;
    let backlog = write_orders(&env.pool, 0, 300, 20).await;
    let relay = InProcessRelay::start(env.config());
    let base = relay.serve_http().await;
    assert_eq!(get(&base, "/healthz").await.0, 200);

    // Drained: everything counted as published, and the sampled lag back
    // to nothing (the sampler runs every 5 s).
    let live = write_orders(&env.pool, 1, 50, 20).await;
    let written = Written::combined([backlog, live]);
    env.wait_all_sent(Duration::from_secs(90)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = scrape(&base).await;
        let published = sum(&text, "outboxd_events_published", None);
        let pending = sum(&text, "outboxd_pending_rows", None);
        let age = sum(&text, "outboxd_oldest_unsent_age_seconds", None);
        if published as usize == written.committed && pending == 0.0 && age == 0.0 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics did not settle: published {published} of {}, pending {pending}, age {age}\n{text}",
            written.committed
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(sum(&text, "outboxd_leader", None), 1.0);
    assert_eq!(
        sum(
            &text,
            "outboxd_capture_mode",
            Some(("mode", mode_name(mode)))
        ),
        1.0
    );
    assert!(
        sum(
            &text,
            "outboxd_kafka_transactions",
            Some(("outcome", "committed"))
        ) >= 1.0
    );
    assert_eq!(
        sum(&text, "outboxd_event_latency_seconds", None) as usize,
        written.committed,
        "one latency observation per event"
    );
    // Every Kafka transaction is timed step by step, and every batch marked.
    let transactions = sum(
        &text,
        "outboxd_kafka_transactions",
        Some(("outcome", "committed")),
    );
    for stage in [
        "queued",
        "begin",
        "produce",
        "offsets",
        "commit",
        "wait_for_marks",
        "mark",
    ] {
        assert_eq!(
            sum(&text, "outboxd_stage_seconds", Some(("stage", stage))),
            transactions,
            "one {stage} observation per committed transaction\n{text}"
        );
    }
    if mode == Mode::Polling {
        assert!(
            sum(&text, "outboxd_stage_seconds", Some(("stage", "claim"))) >= transactions,
            "every published batch was claimed\n{text}"
        );
    }
    // An OpenMetrics info family is named without its `_info` suffix.
    assert_eq!(sum(&text, "outboxd_build", None), 1.0, "{text}");
    if mode == Mode::Replication {
        assert!(
            sum(&text, "outboxd_replication_slot_confirmed_flush_lsn", None) > 0.0,
            "{text}"
        );
    }
    let (status, body) = get(&base, "/readyz").await;
    assert_eq!((status, body.trim()), (200, "ready: leading"));

    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once(&env, &written).await;
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Replication => "replication",
        _ => "polling",
    }
}

fn status(env: &TestEnv, json: bool) -> String {
    let mut args = vec!["status", "--config", env.config_path.to_str().unwrap()];
    if json {
        args.push("--json");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(&args)
        .output()
        .expect("run outboxd status");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "status failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_known_backlog_then_the_drained_state() {
    let env = TestEnv::new("status", Mode::Replication).await;
    for i in 0..37 {
        sqlx::query("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', $1, 'OrderCreated', '{}')")
            .bind(format!("o-{i}"))
            .execute(&env.pool)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let json: serde_json::Value =
        serde_json::from_str(&status(&env, true)).expect("status --json is JSON");
    assert_eq!(json["pending_rows"], 37);
    assert!(
        json["oldest_unsent_age_seconds"].as_f64().unwrap() >= 1.0,
        "{json}"
    );
    assert_eq!(json["leader"], serde_json::Value::Null);
    assert_eq!(json["slot"], serde_json::Value::Null);
    assert_eq!(json["last_checkpoint"], serde_json::Value::Null);
    let text = status(&env, false);
    assert!(text.contains("pending     37 rows"), "{text}");
    assert!(text.contains("leader      none"), "{text}");

    let relay = InProcessRelay::start(env.config());
    env.wait_all_sent(Duration::from_secs(60)).await;
    env.wait_streaming(Duration::from_secs(30)).await;
    let json: serde_json::Value = serde_json::from_str(&status(&env, true)).unwrap();
    assert_eq!(json["pending_rows"], 0);
    assert!(json["leader"]["pid"].as_i64().is_some(), "{json}");
    assert_eq!(
        json["leader"]["application_name"],
        format!("outboxd-{}", env.relay_name())
    );
    assert_eq!(json["slot"]["name"], env.slot_name());
    assert!(
        json["last_checkpoint"]["published_rows"].as_u64().unwrap() > 0,
        "{json}"
    );
    relay.stop().await.expect("relay stops cleanly");
}

in_both_modes!(
    sigterm_mid_batch_loses_and_duplicates_nothing,
    worker_threads = 4
);
async fn sigterm_mid_batch_loses_and_duplicates_nothing(mode: Mode) {
    let env = TestEnv::new("sigterm", mode).await;
    // A first run makes the slot (replication), so the backlog below is
    // streamed, not drained from the table before streaming.
    let first = InProcessRelay::start(env.config());
    env.wait_leader(Duration::from_secs(60)).await;
    env.wait_streaming(Duration::from_secs(60)).await;
    first.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;

    // The whole backlog is committed before the relay starts, and its marks
    // are slowed to 100 ms each: at 100 rows a batch the rows need at least
    // 15 marks, 1.5 s, so a signal sent right after the first mark lands
    // mid-backlog whatever the writers' speed (written while the relay ran,
    // it could keep up with them).
    let backlog = write_orders(&env.pool, 0, 1500, 30).await;
    let total = env.rows().await.len() as i64;
    let mut relay = env.spawn_relay_process_with(&[("OUTBOXD_SLOW_MARKS_MS", "100")]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while total - env.unsent().await == 0 {
        assert!(Instant::now() < deadline, "nothing was published");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    signal(&relay, "TERM");
    let unsent_at_signal = env.unsent().await;
    assert!(
        unsent_at_signal > 0,
        "SIGTERM must arrive mid-backlog; all {total} rows were already sent"
    );
    let status = relay.wait().expect("relay exits");
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    let holders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(holders, 0, "the leader lock is released");
    eprintln!(
        "sigterm: {unsent_at_signal} of {total} rows unsent at the signal, {} after the stop",
        env.unsent().await
    );

    relay = env.spawn_relay_process();
    // Signal handlers exist once it runs; a SIGTERM before that would be the
    // default, abrupt exit.
    env.wait_leader(Duration::from_secs(60)).await;
    env.wait_all_sent(Duration::from_secs(120)).await;
    signal(&relay, "TERM");
    assert!(relay.wait().expect("relay exits").success());
    assert_exactly_once(&env, &backlog).await;
}
