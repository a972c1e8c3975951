//! The relay killed with SIGKILL in the middle of publishing, several times,
//! and restarted, still yields every row exactly once.

use std::time::Duration;

use rand::Rng;

use crate::support::workload::{assert_exactly_once, write_orders, LiveWriter, Written};
use crate::support::{signal, Mode, TestEnv};

in_both_modes!(
    sigkill_mid_publish_and_restart_is_still_exactly_once,
    worker_threads = 4
);
async fn sigkill_mid_publish_and_restart_is_still_exactly_once(mode: Mode) {
    let env = TestEnv::new("sigkill", mode).await;
    let backlog = write_orders(&env.pool, 0, 1500, 25).await;

    // Writers keep committing while the relay is killed, so kills land
    // while it claims, produces, commits and acknowledges.
    let live_writer = LiveWriter::start(&env.pool, 1, 20, 25);

    let kills = 6;
    for kill in 1..=kills {
        let mut relay = env.spawn_relay_process();
        let run_for = rand::rng().random_range(600..2000);
        tokio::time::sleep(Duration::from_millis(run_for)).await;
        signal(&relay, "KILL");
        let _ = relay.wait();
        eprintln!(
            "sigkill test: kill {kill} after {run_for} ms, {} rows unsent",
            env.unsent().await
        );
    }
    let live = live_writer.finish().await;

    let mut relay = env.spawn_relay_process();
    // Rows written after the restart prove the last relay is up and publishing.
    let after = write_orders(&env.pool, 2, 20, 25).await;
    env.wait_all_sent(Duration::from_secs(120)).await;
    signal(&relay, "TERM");
    let status = relay.wait().expect("relay exits");
    assert!(status.success(), "relay exits 0 on SIGTERM, got {status}");

    let written = Written::combined([backlog, live, after]);
    assert_exactly_once(&env, &written).await;
}
