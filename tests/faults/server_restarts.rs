//! The servers crash under a running relay: the broker SIGKILLed
//! mid-transaction and restarted, Postgres stopped with `-m immediate` and
//! restarted. The relay rides them out: it must still be running after
//! each, and everything arrives exactly once.

use std::time::Duration;

use crate::support::faults::{
    random_between, restart_kafka_after_kill, restart_postgres_after_crash, size, Campaign,
    RelayProcess, Source,
};
use crate::support::workload::Workload;

/// Which server crashes.
#[derive(Clone, Copy)]
enum Server {
    Kafka,
    Postgres,
}

/// Crashes and restarts `server` again and again under one running relay.
async fn crash_under_a_running_relay(fault: &'static str, server: Server, source: Source) {
    let mut campaign = Campaign::start(fault, source, &Workload::realistic()).await;
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

in_every_source!(broker_killed_and_restarted, worker_threads = 2);
async fn broker_killed_and_restarted(source: Source) {
    crash_under_a_running_relay("broker-restarts", Server::Kafka, source).await;
}

in_every_source!(postgres_crashed_and_restarted, worker_threads = 2);
async fn postgres_crashed_and_restarted(source: Source) {
    crash_under_a_running_relay("postgres-restarts", Server::Postgres, source).await;
}
