//! The servers crash under a running relay: the broker SIGKILLed
//! mid-transaction and restarted, Postgres stopped with `-m immediate` and
//! restarted. The relay rides them out: it must still be running after
//! each, and everything arrives exactly once.

use std::time::Duration;

use crate::support::faults::{
    random_between, restart_kafka_after_kill, restart_postgres_after_crash, size, Campaign,
    RelayProcess,
};
use crate::support::workload::Workload;
use crate::support::Mode;

/// Which server crashes.
#[derive(Clone, Copy)]
enum Server {
    Kafka,
    Postgres,
}

/// Crashes and restarts `server` again and again under one running relay.
async fn crash_under_a_running_relay(fault: &'static str, server: Server, mode: Mode) {
    let mut campaign = Campaign::start(fault, mode, &Workload::realistic()).await;
    let mut relay = RelayProcess::start(&campaign.env, None);
    campaign.env.wait_leader(Duration::from_secs(30)).await;
    for _ in 0..size(1, 30) {
        // Writers never stop, so the relay is almost always mid-transaction.
        tokio::time::sleep(random_between(
            Duration::from_millis(500)..=Duration::from_secs(3),
        ))
        .await;
        match server {
            Server::Kafka => restart_kafka_after_kill().await,
            Server::Postgres => restart_postgres_after_crash().await,
        }
        campaign.runs += 1;
        relay.assert_running(match server {
            Server::Kafka => "the relay must retry through a broker restart",
            Server::Postgres => "the relay must reconnect after a Postgres crash",
        });
    }
    campaign.finish(vec![relay]).await;
}

in_both_modes!(broker_killed_and_restarted, worker_threads = 2);
async fn broker_killed_and_restarted(mode: Mode) {
    crash_under_a_running_relay("broker-restarts", Server::Kafka, mode).await;
}

in_both_modes!(postgres_crashed_and_restarted, worker_threads = 2);
async fn postgres_crashed_and_restarted(mode: Mode) {
    crash_under_a_running_relay("postgres-restarts", Server::Postgres, mode).await;
}
