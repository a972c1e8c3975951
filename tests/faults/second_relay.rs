//! A second relay started mid-stream: with the same name it waits as a
//! standby and takes over when the leader is killed; with another name on
//! the same table it must not publish alongside (the leader lock is per
//! table), and takes over without repeating what the other published.

use std::time::Duration;

use crate::support::faults::{
    config_with_relay_name, log_path, random_between, size, Campaign, RelayProcess,
};
use crate::support::workload::Workload;
use crate::support::Mode;

fn a_moment() -> Duration {
    random_between(Duration::from_millis(300)..=Duration::from_millis(1500))
}

in_both_modes!(second_relay_with_the_same_name, worker_threads = 2);
async fn second_relay_with_the_same_name(mode: Mode) {
    let mut campaign =
        Campaign::start("second-relay-same-name", mode, &Workload::realistic()).await;
    let mut leader = RelayProcess::start(&campaign.env, None);
    campaign.env.wait_leader(Duration::from_secs(30)).await;
    for _ in 0..size(2, 20) {
        tokio::time::sleep(a_moment()).await;
        let standby = RelayProcess::start(&campaign.env, None);
        tokio::time::sleep(a_moment()).await;
        leader.kill();
        campaign.runs += 1;
        leader = standby;
    }
    campaign.finish(vec![leader]).await;
}

in_both_modes!(second_relay_with_another_name, worker_threads = 2);
async fn second_relay_with_another_name(mode: Mode) {
    let mut campaign =
        Campaign::start("second-relay-other-name", mode, &Workload::realistic()).await;
    let names = [
        campaign.env.relay_name(),
        format!("{}-b", campaign.env.relay_name()),
    ];
    let configs = [
        campaign.env.config_path.clone(),
        config_with_relay_name(&campaign.env, &names[1]),
    ];
    let log = log_path(&campaign.env);
    let mut leader = RelayProcess::spawn(&configs[0], &log, None);
    campaign.env.wait_leader(Duration::from_secs(30)).await;
    for round in 0..size(2, 20) {
        tokio::time::sleep(a_moment()).await;
        // The other name joins mid-stream, waits, and leads after the kill.
        let other = RelayProcess::spawn(&configs[(round + 1) % 2], &log, None);
        tokio::time::sleep(a_moment()).await;
        leader.kill();
        campaign.runs += 1;
        leader = other;
    }
    campaign.finish(vec![leader]).await;
    let _ = std::fs::remove_file(&configs[1]);
}
