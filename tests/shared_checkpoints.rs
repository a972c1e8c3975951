//! Many relays on one Kafka cluster: every relay writes its checkpoints to
//! one shared topic, and every relay that leads a table is fenced by the
//! next, whatever its name. Each scenario fails with outboxd 0.1's
//! checkpoint protocol.

use std::time::Duration;

use crate::support::faults::{config_with_relay_name, log_path, RelayProcess};
use crate::support::kafka::OpenTransaction;
use crate::support::workload::{
    assert_every_row_published_once, assert_exactly_once, write_orders, Written,
};
use crate::support::{Mode, TestEnv};

const LIMIT: Duration = Duration::from_secs(60);

in_both_modes!(
    another_relays_open_transaction_does_not_hide_the_latest_checkpoint,
    worker_threads = 2
);
/// Another relay's transaction open on the shared checkpoint topic (a relay
/// killed mid-batch stays open until its timeout) holds the topic's last
/// stable offset below this relay's latest checkpoint. A relay killed right
/// after its Kafka commit must still find that checkpoint on restart and
/// mark its rows instead of publishing them again.
async fn another_relays_open_transaction_does_not_hide_the_latest_checkpoint(mode: Mode) {
    let env = TestEnv::new("hidden-checkpoint", mode).await;
    let shared = format!("{}-shared.checkpoints", env.topic_prefix());
    let env = env.with_checkpoint_topic(&shared);
    let before = relayed(&env).await;

    let other = OpenTransaction::begin(&env.kafka, &shared, &format!("{}-other", env.id)).await;
    let during = killed_after_commit(&env).await;

    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
    other.abort().await;
    assert_exactly_once(&env, &Written::combined([before, during])).await;
}

in_both_modes!(
    a_predecessor_with_another_name_is_fenced_in_its_first_transaction,
    worker_threads = 2
);
/// A relay loses its Postgres sessions (and so the table's lock) while it
/// is frozen inside its very first Kafka transaction, before any checkpoint
/// names it. A relay with another name takes the table over and publishes
/// the rows. When the first wakes up, its transaction must not commit.
async fn a_predecessor_with_another_name_is_fenced_in_its_first_transaction(mode: Mode) {
    let env = TestEnv::new("first-txn-zombie", mode).await;
    let written = write_orders(&env.pool, 0, 20, 5).await;
    let zombie_log = log_path(&env).with_extension("zombie.log");
    let _ = std::fs::remove_file(&zombie_log);
    let mut zombie = RelayProcess::spawn_freezing_at(&env.config_path, &zombie_log, "mid-produce");
    zombie.frozen(LIMIT).await;
    terminate_sessions_of(&env, &format!("outboxd-{}", env.relay_name())).await;

    let successor_config = config_with_relay_name(&env, &format!("{}-b", env.relay_name()));
    let mut successor = RelayProcess::spawn(&successor_config, &log_path(&env), None);
    env.wait_all_sent(LIMIT).await;

    zombie.resume();
    zombie.wait_for_log("relay session failed", LIMIT).await;
    zombie.stop().await;
    successor.stop().await;
    let _ = std::fs::remove_file(&successor_config);
    assert_exactly_once(&env, &written).await;
}

/// Writes orders and relays them all (the table's first checkpoints).
async fn relayed(env: &TestEnv) -> Written {
    let written = write_orders(&env.pool, 0, 10, 5).await;
    let mut relay = RelayProcess::start(env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
    written
}

/// Writes orders and runs a relay that dies right after its first Kafka
/// commit: that batch is in Kafka, its rows unmarked.
async fn killed_after_commit(env: &TestEnv) -> Written {
    let written = write_orders(&env.pool, 1, 10, 5).await;
    let mut relay = RelayProcess::start(env, Some("after-commit"));
    relay.killed_at_point("after-commit", LIMIT).await;
    assert!(
        env.unsent().await > 0,
        "the relay died between its Kafka commit and marking the rows"
    );
    written
}

/// Ends every Postgres session of `application_name`, as a network
/// partition between that relay and its database would.
async fn terminate_sessions_of(env: &TestEnv, application_name: &str) {
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1) AS terminated",
    )
    .bind(application_name)
    .fetch_one(&env.pool)
    .await
    .expect("terminate the relay's sessions");
    assert!(ended > 0, "no session of {application_name} to end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_creates_a_short_compacted_checkpoint_topic() {
    let env = TestEnv::new("checkpoint-topic-settings", Mode::Polling).await;
    let written = write_orders(&env.pool, 0, 3, 2).await;
    env.relay_until_all_sent(LIMIT).await;
    let keys = [
        "cleanup.policy",
        "segment.ms",
        "min.cleanable.dirty.ratio",
        "max.compaction.lag.ms",
        "min.insync.replicas",
    ];
    let values =
        outboxd::kafka::topics::topic_configs(&env.config(), &env.checkpoint_topic(), &keys)
            .await
            .expect("describe the checkpoint topic");
    let values: Vec<Option<&str>> = values.iter().map(Option::as_deref).collect();
    // One broker in the test stack: one replica, min.insync.replicas 1.
    assert_eq!(
        values,
        [
            Some("compact"),
            Some("600000"),
            Some("0.1"),
            Some("3600000"),
            Some("1")
        ]
    );
    assert_exactly_once(&env, &written).await;
}

in_both_modes!(
    a_checkpoint_topic_with_several_partitions_keeps_exactly_once,
    worker_threads = 2
);
/// A user-created checkpoint topic with several partitions: checkpoints go
/// to partition 0 and are found there after an after-commit kill.
async fn a_checkpoint_topic_with_several_partitions_keeps_exactly_once(mode: Mode) {
    let env = TestEnv::new("multi-partition-checkpoints", mode).await;
    create_compacted_topic(&env, &env.checkpoint_topic(), 3).await;
    let before = relayed(&env).await;
    let during = killed_after_commit(&env).await;
    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
    assert_exactly_once(&env, &Written::combined([before, during])).await;
}

async fn create_compacted_topic(env: &TestEnv, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let admin = outboxd::kafka::topics::admin_client(&env.config()).expect("admin client");
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact");
    let results = admin
        .create_topics([&new_topic], &AdminOptions::new())
        .await
        .expect("create topic");
    for result in results {
        result.expect("topic created");
    }
}

in_both_modes!(
    an_expired_checkpoint_group_is_found_by_scanning,
    worker_threads = 2
);
/// The broker expires an empty group's offsets after
/// `offsets.retention.minutes` (7 days by default): a relay killed right
/// after its Kafka commit and restarted after that still finds its latest
/// checkpoint, by scanning the shared topic once, and the scan reads past
/// another relay's transaction held open on the topic instead of stopping
/// at the last stable offset below our checkpoint.
async fn an_expired_checkpoint_group_is_found_by_scanning(mode: Mode) {
    use rdkafka::admin::AdminOptions;

    let env = TestEnv::new("expired-group", mode).await;
    let shared = format!("{}-shared.checkpoints", env.topic_prefix());
    let env = env.with_checkpoint_topic(&shared);
    let before = relayed(&env).await;
    let other = OpenTransaction::begin(&env.kafka, &shared, &format!("{}-other", env.id)).await;
    let during = killed_after_commit(&env).await;

    // What the broker's offset expiry does: the group and its offset are gone.
    let group = format!("outboxd-{}", env.checkpoint_key().await);
    let admin = outboxd::kafka::topics::admin_client(&env.config()).expect("admin client");
    let deleted = admin
        .delete_groups(&[group.as_str()], &AdminOptions::new())
        .await
        .expect("delete the checkpoint group");
    for result in deleted {
        result.expect("checkpoint group deleted");
    }

    // The scan waits for the other relay's transaction, as it would for one
    // killed mid-batch until its timeout.
    let mut relay = RelayProcess::start(&env, None);
    relay
        .wait_for_log("scanning the checkpoint topic once", LIMIT)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        env.unsent().await > 0,
        "the scan must not finish while another relay's transaction hides the end of the topic"
    );
    other.abort().await;
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
    assert_exactly_once(&env, &Written::combined([before, during])).await;
}

/// Two databases on one server, both with `public.outbox`, share the
/// checkpoint topic. The other database's relay is killed with its
/// transaction open on the topic (`transaction_timeout: 300s`). This relay
/// restarts after it: the other relay's checkpoints name no row here, so
/// its restart reads nothing committed and never waits for that
/// transaction to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_databases_open_transaction_does_not_hold_a_restart() {
    let shared = format!("it-siblings-{}.checkpoints", std::process::id());
    let ours = TestEnv::new("sibling-ours", Mode::Polling)
        .await
        .with_checkpoint_topic(&shared);
    let theirs = TestEnv::new("sibling-theirs", Mode::Polling)
        .await
        .with_checkpoint_topic(&shared);
    theirs.replace_in_config(
        "  transaction_timeout: 20s\n",
        "  transaction_timeout: 300s\n",
    );
    relayed(&ours).await;
    write_orders(&theirs.pool, 0, 5, 5).await;
    let mut killed = RelayProcess::start(&theirs, Some("after-checkpoint"));
    killed.killed_at_point("after-checkpoint", LIMIT).await;

    write_orders(&ours.pool, 1, 5, 5).await;
    // Well under the other transaction's 300 s.
    let mut relay = RelayProcess::start(&ours, None);
    ours.wait_all_sent(LIMIT).await;
    relay.stop().await;
    // By event id, from the routed topics: a read of the shared checkpoint
    // topic would itself wait for the other transaction.
    assert_every_row_published_once(&ours).await;
}

/// Two servers, each with a database of the same name and `public.outbox`
/// (shards of one service), relays with different names on one checkpoint
/// topic. The first start of the second shard's relay scans the topic and
/// finds the first shard's checkpoints, named like its own table: they
/// name no row here, so the first shard's live relay is not fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_named_database_on_another_server_is_not_fenced() {
    use crate::support::pg_pair::PgPair;
    let shared = format!("it-shards-{}.checkpoints", std::process::id());
    let first = TestEnv::new("shard-first", Mode::Polling)
        .await
        .with_checkpoint_topic(&shared);
    let pair = PgPair::start("shards").await;
    let second = TestEnv::new_on_database(
        &pair.primary_url,
        "shard-second",
        Mode::Polling,
        &first.database_name(),
    )
    .await
    .with_checkpoint_topic(&shared);
    assert_ne!(first.checkpoint_key().await, second.checkpoint_key().await);
    let first_written = write_orders(&first.pool, 0, 10, 5).await;
    let mut first_relay = RelayProcess::start(&first, None);
    first.wait_all_sent(LIMIT).await;

    let second_written = write_orders(&second.pool, 0, 5, 5).await;
    let mut second_relay = RelayProcess::start(&second, None);
    second.wait_all_sent(LIMIT).await;
    second_relay.stop().await;
    first_relay.assert_running("the first shard's relay keeps running");
    first_relay.stop().await;

    let second_log = std::fs::read_to_string(log_path(&second)).expect("relay log");
    assert!(
        !second_log.contains("fenced it, so an instance still running"),
        "the second shard's first start fenced the first shard's relay"
    );
    let first_log = std::fs::read_to_string(log_path(&first)).expect("relay log");
    assert!(
        !first_log.contains("fenced"),
        "the first shard's relay was fenced: {first_log}"
    );
    assert_exactly_once(&first, &first_written).await;
    assert_exactly_once(&second, &second_written).await;
    drop(pair);
}
