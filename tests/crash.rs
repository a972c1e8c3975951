//! The relay killed with SIGKILL in the middle of publishing, several times,
//! and restarted, still yields every row exactly once.

use std::time::Duration;

use rand::Rng;

use crate::support::kafka::read_all;
use crate::support::workload::{violations, write_orders};
use crate::support::{signal, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_publish_and_restart_is_still_exactly_once() {
    let env = TestEnv::new("sigkill").await;
    // Small batches so a kill lands between, inside and right after Kafka transactions.
    let backlog = write_orders(&env.pool, 0, 1500, 25).await;

    let pool = env.pool.clone();
    let live_writer = tokio::spawn(async move { write_orders(&pool, 1, 300, 25).await });

    let mut kills = 0;
    let mut last_unsent = i64::MAX;
    while kills < 5 {
        let mut relay = env.spawn_relay_process();
        let run_for = rand::rng().random_range(900..2500);
        tokio::time::sleep(Duration::from_millis(run_for)).await;
        signal(&relay, "KILL");
        let _ = relay.wait();
        kills += 1;
        last_unsent = env.unsent().await;
    }
    let live = live_writer.await.expect("live writer");

    let mut relay = env.spawn_relay_process();
    env.wait_all_sent(Duration::from_secs(120)).await;
    signal(&relay, "TERM");
    let status = relay.wait().expect("relay exits");
    assert!(status.success(), "relay exits 0 on SIGTERM, got {status}");

    let rows = env.rows().await;
    assert_eq!(rows.len(), backlog.committed + live.committed);
    let mut rolled_back = backlog.rolled_back_ids;
    rolled_back.extend(live.rolled_back_ids);
    let consumed = read_all(&env.kafka, &env.topic_prefix()).await;
    let problems = violations(&rows, &consumed, &rolled_back);
    assert!(
        problems.is_empty(),
        "after {kills} kills (last saw {last_unsent} unsent), {} violations:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
