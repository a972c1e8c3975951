//! Several relays, each on its own database, sharing one checkpoint topic
//! as sidecars of a production cluster do: killed together at random
//! moments and right after their Kafka commit (`after-commit`), so each
//! restarts while the others' transactions are open on the shared topic.
//! The checker then judges every database on its own.

use std::time::Duration;

use rand::Rng;

use crate::support::checker;
use crate::support::faults::{
    create_checkpoint_topic_keeping_history, exclusive, random_between, record, size, RelayProcess,
};
use crate::support::workload::{writer_pool, LiveWriter, Workload, Written};
use crate::support::{Mode, TestEnv};

/// Sidecars sharing the topic.
const RELAYS: usize = 3;

in_both_modes!(relays_sharing_one_checkpoint_topic, worker_threads = 3);
async fn relays_sharing_one_checkpoint_topic(mode: Mode) {
    let _servers = exclusive().await;
    let mut envs = Vec::new();
    let mut writers = Vec::new();
    let mut shared = None;
    for _ in 0..RELAYS {
        let env = TestEnv::new("shared-topic", mode).await;
        let topic = shared
            .get_or_insert_with(|| format!("{}-shared.checkpoints", env.topic_prefix()))
            .clone();
        let env = env.with_checkpoint_topic(&topic);
        env.write_config("", "  max_message_bytes: 100000\n");
        create_checkpoint_topic_keeping_history(&env, 1).await;
        let pool = writer_pool(&env.database_url, 2).await;
        writers.push(LiveWriter::start_many(
            &pool,
            &Workload::realistic(),
            0..1,
            10,
        ));
        envs.push(env);
    }

    let mut faults = 0;
    for _ in 0..size(4, 30) {
        // All relays run at once, so their transactions interleave on the
        // shared topic; about one in three dies right after a commit.
        let mut relays: Vec<(RelayProcess, bool)> = envs
            .iter()
            .map(|env| {
                let after_commit = rand::rng().random_ratio(1, 3);
                let kill_at = after_commit
                    .then(|| format!("after-commit:{}", rand::rng().random_range(1..=5)));
                (RelayProcess::start(env, kill_at.as_deref()), after_commit)
            })
            .collect();
        tokio::time::sleep(random_between(
            Duration::from_millis(300)..=Duration::from_millis(2500),
        ))
        .await;
        for (relay, after_commit) in &mut relays {
            if !*after_commit {
                relay.assert_running("the relay should have been running until killed");
            }
            relay.kill();
            faults += 1;
        }
    }

    for (env, writer) in envs.iter().zip(writers) {
        let written: Written = writer.finish().await;
        let mut relay = RelayProcess::start(env, None);
        env.wait_all_sent(Duration::from_secs(300)).await;
        relay.stop().await;
        let report = checker::check(env, &written).await;
        record(
            "shared-checkpoint-topic",
            mode.into(),
            faults / RELAYS,
            &report,
        );
        eprintln!(
            "shared-checkpoint-topic ({}): {} faults on this relay, {} events, {} violations",
            mode.config_value(),
            faults / RELAYS,
            report.events,
            report.violations().len(),
        );
        report.assert_clean();
    }
}
