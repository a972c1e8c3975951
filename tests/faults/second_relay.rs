//! A second relay started mid-stream: with the same name it waits as a
//! standby and takes over when the leader is killed; with another name on
//! the same table it must not publish alongside (the leader lock is per
//! table), and takes over without repeating what the other published.
//! The same-name takeover and the lost leader lock run on the WAL-message
//! outbox too; another name has another slot, which a message outbox
//! refuses to start from once anything was published (its messages may
//! be gone), so that campaign is the table's alone.

use std::time::Duration;

use crate::support::faults::{
    config_with_relay_name, log_path, random_between, size, Campaign, RelayProcess, Source,
};
use crate::support::workload::Workload;
use crate::support::Mode;

fn a_moment() -> Duration {
    random_between(Duration::from_millis(300)..=Duration::from_millis(1500))
}

in_every_source!(second_relay_with_the_same_name, worker_threads = 2);
async fn second_relay_with_the_same_name(source: Source) {
    let mut campaign =
        Campaign::start("second-relay-same-name", source, &Workload::realistic()).await;
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

in_every_source!(leader_lock_lost_while_claims_are_open, worker_threads = 2);
async fn leader_lock_lost_while_claims_are_open(source: Source) {
    // Two relays of one name; only the leader's lock connection is
    // terminated, again and again, while its marks are slowed so its claims
    // (and their row locks) are still open. The standby then holds the lock
    // at once, and must not claim around the old leader's claimed rows, or
    // an aggregate's later event would be published before its earlier one.
    let mut campaign = Campaign::start("leader-lock-lost", source, &Workload::realistic()).await;
    let slow_marks = [(outboxd::failpoint::SLOW_MARKS_ENV, "1000")];
    let mut relays = vec![
        RelayProcess::start_with(&campaign.env, None, &slow_marks),
        RelayProcess::start_with(&campaign.env, None, &slow_marks),
    ];
    campaign.env.wait_leader(Duration::from_secs(30)).await;
    for _ in 0..size(3, 20) {
        tokio::time::sleep(random_between(
            Duration::from_millis(1500)..=Duration::from_millis(3000),
        ))
        .await;
        let mut connection = campaign.env.pool.acquire().await.expect("connection");
        let Some(pid) = outboxd::leader::holder_pid(&mut connection, campaign.env.outbox_name())
            .await
            .expect("look up the leader")
        else {
            continue;
        };
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&mut *connection)
            .await
            .expect("terminate the leader lock's backend");
        campaign.runs += 1;
    }
    // Slowed marks drain one batch a second, too slow for the backlog of a
    // campaign-size run: the slowed relays stop (cleanly: SIGTERM exits 0)
    // and a relay at normal speed drains what they left.
    for relay in &mut relays {
        relay.stop().await;
    }
    campaign.finish(Vec::new()).await;
}
