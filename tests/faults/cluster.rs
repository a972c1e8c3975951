//! Brokers of a three-node cluster (replication factor 3,
//! `min.insync.replicas` 2) SIGKILLed and restarted while writers commit and
//! one relay keeps running: the broker that coordinates the relay's
//! transactions, the one coordinating its checkpoint group, the leader of
//! the checkpoint partition and leaders of event partitions, in turn. The
//! relay must ride every kill out (retry or abort and re-send) without
//! losing, repeating or reordering an event.

use std::time::Duration;

use outboxd::kafka::identity::TableIdentity;

use crate::support::cluster::{KafkaCluster, Target};
use crate::support::faults::{exclusive, random_between, size, Campaign, RelayProcess};
use crate::support::workload::Workload;
use crate::support::Mode;

const TARGETS: [Target; 4] = [
    Target::TransactionCoordinator,
    Target::CheckpointLeader,
    Target::EventLeader,
    Target::GroupCoordinator,
];

in_both_modes!(brokers_killed_in_a_three_node_cluster, worker_threads = 2);
async fn brokers_killed_in_a_three_node_cluster(mode: Mode) {
    // The cluster is started only once this test holds the servers: fault
    // tests run one at a time, and two clusters would share one folder.
    let servers = exclusive().await;
    let cluster = KafkaCluster::start().await;
    let mut campaign = Campaign::start_on(
        servers,
        "three-broker-kills",
        mode,
        &Workload::realistic(),
        // One writer: three replicas on two cores relay slower than three
        // writers write, and the campaign must drain what they wrote.
        1,
        Some(cluster),
    )
    .await;
    let env = &campaign.env;
    let mut connection = env.pool.acquire().await.expect("connection");
    let source = outboxd::schema::database_source(&mut connection)
        .await
        .expect("source");
    drop(connection);
    let identity = TableIdentity::new(source.as_deref(), "public.outbox", &env.relay_name());
    let mut relay = RelayProcess::start(env, None);
    env.wait_leader(Duration::from_secs(120)).await;

    for round in 0..size(2, 30) {
        let target = TARGETS[round % TARGETS.len()];
        let env = &campaign.env;
        let cluster = campaign.cluster.as_ref().expect("the campaign's cluster");
        let node = cluster
            .node_of(
                target,
                &identity.transactional_id,
                &identity.checkpoint_group,
                &env.checkpoint_topic(),
                &env.topic_prefix(),
            )
            .await
            .unwrap_or(1 + (round % 3) as i32);
        eprintln!("three-broker-kills: round {round}: killing node {node} ({target:?})");
        cluster.kill(node).await;
        tokio::time::sleep(random_between(
            Duration::from_millis(500)..=Duration::from_millis(3000),
        ))
        .await;
        cluster.start_node(node).await;
        campaign.runs += 1;
        relay.assert_running("the relay should ride out a broker kill");
        tokio::time::sleep(random_between(
            Duration::from_millis(500)..=Duration::from_millis(2000),
        ))
        .await;
    }
    campaign.finish(vec![relay]).await;
}
