//! A large backlog built while the relay is down, then drained with the
//! relay killed again and again part-way through. In replication mode the
//! slot exists before the backlog, so the backlog is streamed from it; a
//! message outbox's backlog is emitted in transactions of 10,000 messages,
//! each spilled to disk by decoding and split over many Kafka batches.

use std::time::Duration;

use crate::support::faults::{size, Campaign, RelayProcess, Source};
use crate::support::workload::{write_backlog, write_message_backlog, Workload};

in_every_source!(backlog_drained_with_kills, worker_threads = 2);
async fn backlog_drained_with_kills(source: Source) {
    let mut campaign = Campaign::start("backlog-drain", source, &Workload::realistic()).await;
    // Create the slot (replication) and settle, then go down.
    let mut relay = RelayProcess::start(&campaign.env, None);
    campaign.env.wait_streaming(Duration::from_secs(60)).await;
    campaign.env.wait_leader(Duration::from_secs(30)).await;
    relay.stop().await;

    let events = size(5_000, 100_000);
    let backlog = match source {
        Source::Table(_) | Source::Unmarked => write_backlog(&campaign.env.pool, events, 500).await,
        Source::Messages => write_message_backlog(&campaign.env.pool, events, 500, 10_000).await,
    };
    for _ in 0..size(3, 20) {
        campaign
            .kill_relay_after(Duration::from_millis(500)..=Duration::from_secs(4))
            .await;
    }
    campaign.extra_written(backlog);
    campaign.finish(Vec::new()).await;
}
