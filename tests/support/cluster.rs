//! A three-node Kafka cluster for the fault tests whose broker kills must
//! move partition leaders and the transaction coordinator
//! (`deploy/local/cluster.sh`, started and stopped by the test itself).
//!
//! Invariant: the cluster lives exactly as long as its `KafkaCluster`
//! value; dropping it stops every node, so a failed test leaves none behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

pub struct KafkaCluster {
    pub bootstrap: String,
    dir: PathBuf,
}

/// What a broker kill is aimed at.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// The coordinator of the relay's transactions.
    TransactionCoordinator,
    /// The coordinator of the table's checkpoint group.
    GroupCoordinator,
    /// The leader of the checkpoint topic's partition 0.
    CheckpointLeader,
    /// The leader of an event topic's partition.
    EventLeader,
}

impl KafkaCluster {
    /// Starts three nodes under the stack's folder (`cluster.sh up`).
    pub async fn start() -> KafkaCluster {
        let stack = std::env::var("OUTBOXD_STACK_DIR")
            .expect("OUTBOXD_STACK_DIR is not set: run the fault tests with `make test`");
        let dir = Path::new(&stack).join("cluster");
        run_script("up", &dir, None).await;
        let env = std::fs::read_to_string(dir.join("env")).expect("cluster env");
        let bootstrap = env
            .lines()
            .find_map(|line| line.strip_prefix("export OUTBOXD_TEST_CLUSTER="))
            .expect("cluster bootstrap in its env")
            .to_string();
        KafkaCluster { bootstrap, dir }
    }

    pub async fn kill(&self, node: i32) {
        run_script("kill", &self.dir, Some(node)).await;
    }

    pub async fn start_node(&self, node: i32) {
        run_script("start", &self.dir, Some(node)).await;
    }

    /// The node a kill at `target` should hit, from the cluster's metadata.
    pub async fn node_of(
        &self,
        target: Target,
        transactional_id: &str,
        checkpoint_group: &str,
        checkpoint_topic: &str,
        event_topic_prefix: &str,
    ) -> Option<i32> {
        let bootstrap = self.bootstrap.clone();
        let (transactional_id, checkpoint_group, checkpoint_topic, prefix) = (
            transactional_id.to_string(),
            checkpoint_group.to_string(),
            checkpoint_topic.to_string(),
            event_topic_prefix.to_string(),
        );
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create()
                .ok()?;
            let leader = |topic: &str, partition: i32| -> Option<i32> {
                let metadata = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(10))
                    .ok()?;
                let topic = metadata.topics().first()?;
                let partition = topic.partitions().iter().find(|p| p.id() == partition)?;
                (partition.leader() >= 0).then_some(partition.leader())
            };
            match target {
                // Kafka places a transactional id's state, and a group's
                // offsets, on partition abs(hashCode) % partitions of its
                // internal topic; that partition's leader coordinates.
                Target::TransactionCoordinator => leader(
                    "__transaction_state",
                    coordinator_partition(&transactional_id, 3),
                ),
                Target::GroupCoordinator => leader(
                    "__consumer_offsets",
                    coordinator_partition(&checkpoint_group, 3),
                ),
                Target::CheckpointLeader => leader(&checkpoint_topic, 0),
                Target::EventLeader => {
                    let metadata = consumer
                        .fetch_metadata(None, Duration::from_secs(10))
                        .ok()?;
                    let topic = metadata
                        .topics()
                        .iter()
                        .find(|t| {
                            t.name().starts_with(&prefix) && !t.name().ends_with(".checkpoints")
                        })?
                        .name()
                        .to_string();
                    leader(&topic, rand::random_range(0..3))
                }
            }
        })
        .await
        .expect("metadata task")
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("down")
            .arg(&self.dir)
            .output();
    }
}

/// Java's `String.hashCode` made non-negative as Kafka's `Utils.abs` does,
/// modulo the internal topic's partition count.
fn coordinator_partition(id: &str, partitions: i32) -> i32 {
    let hash = id.encode_utf16().fold(0i32, |hash, unit| {
        hash.wrapping_mul(31).wrapping_add(i32::from(unit))
    });
    let non_negative = if hash == i32::MIN { 0 } else { hash.abs() };
    non_negative % partitions
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/cluster.sh")
}

async fn run_script(command: &'static str, dir: &Path, node: Option<i32>) {
    let dir = dir.to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        let mut run = Command::new("bash");
        run.arg(script()).arg(command).arg(&dir);
        if let Some(node) = node {
            run.arg(node.to_string());
        }
        run.output().expect("run cluster.sh")
    })
    .await
    .expect("cluster.sh task");
    assert!(
        output.status.success(),
        "cluster.sh {command} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn coordinator_partitions_follow_javas_string_hash() {
    // "hello".hashCode() == 99162322; "polygenelubricants".hashCode() == i32::MIN.
    assert_eq!(coordinator_partition("hello", 50), 99162322 % 50);
    assert_eq!(coordinator_partition("polygenelubricants", 3), 0);
    // A negative hashCode: Kafka takes its absolute value (-1827878118 here).
    let id = "outboxd-7714532686069763689/orders/public.outbox";
    assert_eq!(coordinator_partition(id, 3), 1827878118 % 3);
}
