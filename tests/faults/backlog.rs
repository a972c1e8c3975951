//! A large backlog built while the relay is down, then drained with the
//! relay killed again and again part-way through. In replication mode the
//! slot exists before the backlog, so the backlog is streamed from it.

use std::time::Duration;

use crate::support::faults::{size, Campaign, RelayProcess};
use crate::support::workload::{write_backlog, Workload};
use crate::support::Mode;

in_both_modes!(backlog_drained_with_kills, worker_threads = 2);
async fn backlog_drained_with_kills(mode: Mode) {
    let mut campaign = Campaign::start("backlog-drain", mode, &Workload::realistic()).await;
    // Create the slot (replication) and settle, then go down.
    let mut relay = RelayProcess::start(&campaign.env, None);
    campaign.env.wait_streaming(Duration::from_secs(60)).await;
    campaign.env.wait_leader(Duration::from_secs(30)).await;
    relay.stop().await;

    let rows = size(5_000, 100_000);
    let backlog = write_backlog(&campaign.env.pool, rows, 500).await;
    for _ in 0..size(3, 20) {
        campaign
            .kill_relay_after(Duration::from_millis(500)..=Duration::from_secs(4))
            .await;
    }
    campaign.extra_written(backlog);
    campaign.finish(Vec::new()).await;
}
