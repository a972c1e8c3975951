//! Leadership handed between releases and identities of one table: an
//! upgrade from a release that keyed checkpoints by `relay.name`, a
//! rollback to it and a roll forward again, and a relay whose identity
//! changes because its role was granted `pg_control_system()`. Every
//! hand-off reconciles what the predecessor committed to Kafka, so nothing
//! is published twice. The legacy relay's transactions are written here the
//! way those releases wrote them (its transactional id, its key, no group
//! offset); `make chaos` hands off between real binaries.

use std::time::Duration;

use outboxd::kafka::checkpoint::{Checkpoint, Record};
use rdkafka::producer::{FutureRecord, Producer};
use sqlx::Connection;

use crate::support::faults::{config_with_relay_name, log_path, RelayProcess};
use crate::support::kafka::{begin_transaction_as, read_topic};
use crate::support::workload::{
    assert_every_row_published_once, assert_exactly_once, write_orders, Written,
};
use crate::support::{Mode, TestEnv};

const LIMIT: Duration = Duration::from_secs(60);

in_both_modes!(
    a_checkpoint_left_by_outboxd_0_1_is_adopted,
    worker_threads = 2
);
/// Upgrading: a batch the legacy release committed to Kafka but did not
/// mark is marked by this release, never re-sent.
async fn a_checkpoint_left_by_outboxd_0_1_is_adopted(mode: Mode) {
    let env = TestEnv::new("legacy-checkpoint", mode).await;
    // 0.1 set no partitioner, so librdkafka's default placed its keys; the
    // upgraded relay keeps that placement as docs/operations.md's upgrade note says.
    env.replace_in_config("routing:\n", "routing:\n  partitioner: consistent_random\n");
    let written = write_orders(&env.pool, 0, 10, 5).await;
    outboxd::kafka::topics::ensure_checkpoint_topic(&env.config())
        .await
        .expect("checkpoint topic");
    let left = commit_as_legacy_relay(&env, 5).await;
    assert_eq!(left, 5);
    assert_eq!(
        env.unsent().await as usize,
        written.committed,
        "0.1 marked nothing"
    );

    env.relay_until_all_sent(LIMIT).await;
    // The next start reads the adopted checkpoint directly.
    env.relay_until_all_sent(LIMIT).await;
    assert_exactly_once(&env, &written).await;
}

in_both_modes!(
    a_rollback_between_two_leaderships_repeats_nothing,
    worker_threads = 2
);
/// Old → new → old → new. A legacy relay leads, this release takes over
/// (and writes a hand-over marker under the legacy key), a legacy relay
/// leads again (whatever let it: a new name, or compaction having removed
/// the marker) and dies after its Kafka commit, before marking. This release
/// must find that batch on its next start although its own group already
/// has an offset, and hand over again.
async fn a_rollback_between_two_leaderships_repeats_nothing(mode: Mode) {
    let env = TestEnv::new("rollback", mode).await;
    env.replace_in_config("routing:\n", "routing:\n  partitioner: consistent_random\n");
    outboxd::kafka::topics::ensure_checkpoint_topic(&env.config())
        .await
        .expect("checkpoint topic");
    let first = write_orders(&env.pool, 0, 10, 5).await;
    assert_eq!(commit_as_legacy_relay(&env, 3).await, 3);
    env.relay_until_all_sent(LIMIT).await;
    assert_handed_over(&env).await;

    let second = write_orders(&env.pool, 1, 10, 5).await;
    let left = commit_as_legacy_relay(&env, 7).await;
    assert_eq!(left, 7, "the legacy relay published part of the new rows");
    assert_eq!(env.unsent().await as usize, second.committed);

    env.relay_until_all_sent(LIMIT).await;
    assert_exactly_once(&env, &Written::combined([first, second])).await;
    assert_handed_over(&env).await;
}

/// The latest record under the legacy key is a hand-over marker, which a
/// version-1 reader (every release before table-keyed checkpoints) refuses.
async fn assert_handed_over(env: &TestEnv) {
    let records = read_topic(&env.kafka, &env.checkpoint_topic()).await;
    let latest_under_legacy_key = records
        .iter()
        .rfind(|r| r.key.as_deref() == Some(env.relay_name().as_bytes()))
        .and_then(|r| r.payload.clone())
        .expect("a record under the legacy key");
    assert!(matches!(
        Record::from_bytes(&latest_under_legacy_key),
        Ok(Record::HandedOver(_))
    ));
    assert!(
        Checkpoint::from_bytes(&latest_under_legacy_key).is_err(),
        "a version-1 reader must refuse the hand-over marker"
    );
}

/// Granting the relay's role EXECUTE on `pg_control_system()`, as its own
/// warning asks, changes its identity from the `relay.name` stand-in to the
/// database's system identifier. A batch committed to Kafka under the old
/// identity but not marked must be adopted, not published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granting_pg_control_system_keeps_what_the_old_identity_published() {
    let env = TestEnv::new("grant-identity", Mode::Polling).await;
    let role = env.relay_without_pg_control_system().await;
    let first = write_orders(&env.pool, 0, 10, 5).await;
    let mut relay = RelayProcess::start(&env, Some("after-commit"));
    relay.killed_at_point("after-commit", LIMIT).await;
    assert!(
        env.unsent().await > 0,
        "the relay died between its Kafka commit and marking the rows"
    );

    env.grant_pg_control_system(&role).await;
    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
    assert_exactly_once(&env, &first).await;
    let log = std::fs::read_to_string(log_path(&env)).expect("relay log");
    assert!(log.contains("this table was relayed under another identity before"));
}

in_both_modes!(
    a_renamed_table_keeps_what_its_old_name_published,
    worker_threads = 2
);
/// The outbox table renamed (and `postgres.table` with it) while a batch
/// is in Kafka but not marked: the relay, now under a new identity, finds
/// the old name's checkpoint, matches its rows by event id, and marks them
/// instead of publishing them again.
async fn a_renamed_table_keeps_what_its_old_name_published(mode: Mode) {
    let env = TestEnv::new("renamed-table", mode).await;
    let written = write_orders(&env.pool, 0, 10, 5).await;
    let mut relay = RelayProcess::start(&env, Some("after-commit"));
    relay.killed_at_point("after-commit", LIMIT).await;
    assert!(env.unsent().await > 0, "a batch is in Kafka, unmarked");

    // The helpers read `outbox`: a view keeps them working.
    sqlx::raw_sql(
        "ALTER TABLE outbox RENAME TO events; CREATE VIEW outbox AS SELECT * FROM events",
    )
    .execute(&env.pool)
    .await
    .expect("rename the table");
    env.replace_in_config("postgres:\n", "postgres:\n  table: events\n");
    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
    assert_eq!(env.rows().await.len(), written.committed);
    assert_eq!(
        assert_every_row_published_once(&env).await,
        written.committed
    );
}

/// `kafka.checkpoint_topic` changed while a batch is in Kafka but not
/// marked (the relay was killed after its commit): with
/// `kafka.previous_checkpoint_topic` naming the old topic, the relay adopts
/// its checkpoint, and nothing is published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_checkpoint_topic_adopts_the_previous_one() {
    let env = TestEnv::new("topic-change", Mode::Polling).await;
    let old_topic = env.checkpoint_topic();
    let first = write_orders(&env.pool, 0, 10, 5).await;
    let mut relay = RelayProcess::start(&env, Some("after-commit"));
    relay.killed_at_point("after-commit", LIMIT).await;
    assert!(env.unsent().await > 0, "a batch is in Kafka, unmarked");

    let new_topic = format!("{}-moved.checkpoints", env.topic_prefix());
    env.replace_in_config(
        &format!("checkpoint_topic: {old_topic}\n"),
        &format!("checkpoint_topic: {new_topic}\n"),
    );
    env.replace_in_config(
        &format!("checkpoint_topic: {new_topic}\n"),
        &format!("checkpoint_topic: {new_topic}\n  previous_checkpoint_topic: {old_topic}\n"),
    );
    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
    // The checkpoints are on two topics, which the checker does not read
    // together: every row once, by event id.
    assert_eq!(env.rows().await.len(), first.committed);
    assert_eq!(assert_every_row_published_once(&env).await, first.committed);
}

in_both_modes!(
    a_checkpoint_topic_changed_without_the_setting_and_back_repeats_nothing,
    worker_threads = 2
);
/// `kafka.checkpoint_topic` changed with no `previous_checkpoint_topic`,
/// while a batch is in Kafka but not marked, then changed back the same
/// way after another such kill: each time the table's checkpoint group
/// still has its offset on the topic left, the relay marks what the last
/// checkpoint there names, and nothing is published twice.
async fn a_checkpoint_topic_changed_without_the_setting_and_back_repeats_nothing(mode: Mode) {
    let env = TestEnv::new("topic-moved-back", mode).await;
    let first_topic = env.checkpoint_topic();
    let second_topic = format!("{}-moved.checkpoints", env.topic_prefix());
    let mut committed = 0;
    let moves = [(&first_topic, &second_topic), (&second_topic, &first_topic)];
    for (writer, (from, to)) in moves.into_iter().enumerate() {
        committed += write_orders(&env.pool, writer, 10, 5).await.committed;
        let mut relay = RelayProcess::start(&env, Some("after-commit"));
        relay.killed_at_point("after-commit", LIMIT).await;
        assert!(env.unsent().await > 0, "a batch is in Kafka, unmarked");
        env.replace_in_config(
            &format!("checkpoint_topic: {from}\n"),
            &format!("checkpoint_topic: {to}\n"),
        );
        let mut relay = RelayProcess::start(&env, None);
        env.wait_all_sent(LIMIT).await;
        relay.stop().await;
        assert_eq!(env.rows().await.len(), committed);
        assert_eq!(assert_every_row_published_once(&env).await, committed);
    }
}

in_both_modes!(
    an_identity_the_table_comes_back_to_repeats_nothing,
    worker_threads = 2
);
/// The table returns to an identity it had before, after a kill under the
/// one between: the grant given and taken away again, and (without the
/// grant) `relay.name` changed and changed back. The first identity's own
/// checkpoint is an old one, so it is found without a scan of the whole
/// topic; the batch the identity between committed but did not mark lies
/// after it, and must be marked, not published again.
async fn an_identity_the_table_comes_back_to_repeats_nothing(mode: Mode) {
    let env = TestEnv::new("identity-back", mode).await;
    let role = env.relay_without_pg_control_system().await;
    let first_name = env.relay_name();
    let second_name = format!("{first_name}-b");
    let mut committed = write_orders(&env.pool, 0, 10, 5).await.committed;
    run_until_all_sent(&env).await;

    for (writer, step) in ["grant", "rename"].into_iter().enumerate() {
        // Away to the other identity, killed there with a batch unmarked.
        match step {
            "grant" => env.grant_pg_control_system(&role).await,
            _ => env.replace_in_config(
                &format!("name: {first_name}\n"),
                &format!("name: {second_name}\n"),
            ),
        }
        committed += write_orders(&env.pool, writer + 1, 10, 5).await.committed;
        let mut relay = RelayProcess::start(&env, Some("after-commit"));
        relay.killed_at_point("after-commit", LIMIT).await;
        assert!(env.unsent().await > 0, "a batch is in Kafka, unmarked");
        // And back.
        match step {
            "grant" => env.revoke_pg_control_system(&role).await,
            _ => {
                if mode == Mode::Replication {
                    // The slot of the name left behind, as the docs ask.
                    sqlx::query("SELECT pg_drop_replication_slot($1)")
                        .bind(format!("outboxd_{}", second_name.replace('-', "_")))
                        .execute(&env.pool)
                        .await
                        .expect("drop the slot left behind");
                }
                env.replace_in_config(
                    &format!("name: {second_name}\n"),
                    &format!("name: {first_name}\n"),
                )
            }
        }
        run_until_all_sent(&env).await;
        assert_eq!(env.rows().await.len(), committed, "after {step}");
        assert_eq!(
            assert_every_row_published_once(&env).await,
            committed,
            "after {step}"
        );
    }
}

/// Starts a relay, waits until it leads and every row is marked, and stops it.
async fn run_until_all_sent(env: &TestEnv) {
    let mut relay = RelayProcess::start(env, None);
    env.wait_leader(LIMIT).await;
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
}

/// The reverse: the grant taken away from a relay that had it. Its identity
/// falls back to the `relay.name` stand-in, which cannot name the system
/// identifier; its first start scans the topic, and the checkpoint of the
/// earlier identity has its rows matched by seq and event id, and marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_pg_control_system_keeps_what_the_old_identity_published() {
    let env = TestEnv::new("revoke-identity", Mode::Polling).await;
    let role = env.relay_without_pg_control_system().await;
    env.grant_pg_control_system(&role).await;
    let first = write_orders(&env.pool, 0, 10, 5).await;
    let mut relay = RelayProcess::start(&env, Some("after-commit"));
    relay.killed_at_point("after-commit", LIMIT).await;
    assert!(env.unsent().await > 0, "a batch is in Kafka, unmarked");

    env.revoke_pg_control_system(&role).await;
    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
    assert_exactly_once(&env, &first).await;
}

/// The grant is taken away while an instance under the system-identifier
/// identity is still alive on the Kafka side (its Postgres sessions gone,
/// its producer inside a transaction). The first start under the stand-in
/// identity cannot name that identity, but finds its checkpoint, and must
/// fence it: the old producer's commit then fails instead of publishing
/// beside the new leader. With `after_publish: delete` the old identity's
/// rows are all gone, so its checkpoint names no row here: it is fenced by
/// the table and database it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_pg_control_system_fences_the_old_identity() {
    revoking_fences_the_old_identity("mark").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_pg_control_system_fences_the_old_identity_whose_rows_are_deleted() {
    revoking_fences_the_old_identity("delete").await;
}

async fn revoking_fences_the_old_identity(after_publish: &str) {
    let env = TestEnv::new(&format!("revoke-fence-{after_publish}"), Mode::Polling).await;
    env.write_config(&format!("  after_publish: {after_publish}\n"), "");
    let role = env.relay_without_pg_control_system().await;
    sqlx::raw_sql(&format!("GRANT DELETE ON public.outbox TO {role}"))
        .execute(&env.pool)
        .await
        .expect("grant DELETE");
    env.grant_pg_control_system(&role).await;
    let first = write_orders(&env.pool, 0, 10, 5).await;
    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;

    // A producer of the old identity, alive, inside a transaction.
    let source: String = sqlx::query_scalar(
        "SELECT system_identifier::text || '/' || current_database() FROM pg_control_system()",
    )
    .fetch_one(&env.pool)
    .await
    .expect("system identifier");
    let old = outboxd::kafka::identity::TableIdentity::new(
        Some(&source),
        "public.outbox",
        &env.relay_name(),
    );
    let zombie = begin_transaction_as(&env.kafka, &old.transactional_id).await;
    // An empty transaction commits without asking the broker: give it a record.
    let zombie_topic = format!("{}.zombie", env.topic_prefix());
    crate::support::kafka::create_topic(&env.kafka, &zombie_topic, 1).await;
    zombie
        .send(
            FutureRecord::<str, str>::to(&zombie_topic).payload("late"),
            Duration::from_secs(30),
        )
        .await
        .expect("the old identity's producer writes inside its transaction");

    env.revoke_pg_control_system(&role).await;
    let second = write_orders(&env.pool, 1, 10, 5).await;
    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;

    let committed =
        tokio::task::spawn_blocking(move || zombie.commit_transaction(Duration::from_secs(30)))
            .await
            .expect("commit task");
    assert!(
        committed.is_err(),
        "the old identity's producer committed after the new identity took the table over"
    );
    relay.stop().await;
    if after_publish == "mark" {
        assert_exactly_once(&env, &Written::combined([first, second])).await;
    } else {
        assert!(
            env.rows().await.is_empty(),
            "every row published and deleted"
        );
    }
}

/// Two databases, relays of the same `relay.name`, one checkpoint topic. In
/// one, the role may not read `pg_control_system()`, so its relay writes
/// under the `relay:<name>` stand-in identity; the other's relay looks
/// there for its own earlier identity. It must not take the other
/// database's checkpoint for its own: none of its rows is marked by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_named_relay_of_another_database_is_not_adopted() {
    let ours = TestEnv::new("same-name-ours", Mode::Polling).await;
    let shared = format!("{}-shared.checkpoints", ours.topic_prefix());
    let ours = ours.with_checkpoint_topic(&shared);
    let theirs = TestEnv::new("same-name-theirs", Mode::Polling)
        .await
        .with_checkpoint_topic(&shared);
    theirs.relay_without_pg_control_system().await;
    // Our relay takes their name (the checker of each env knows its own).
    let our_config = config_with_relay_name(&ours, &theirs.relay_name());

    let their_rows = write_orders(&theirs.pool, 0, 10, 5).await;
    let mut their_relay = RelayProcess::start(&theirs, Some("after-commit"));
    their_relay.killed_at_point("after-commit", LIMIT).await;
    assert!(
        theirs.unsent().await > 0,
        "their batch is in Kafka, unmarked"
    );

    let our_rows = write_orders(&ours.pool, 0, 10, 5).await;
    let mut our_relay = RelayProcess::spawn(&our_config, &log_path(&ours), None);
    ours.wait_all_sent(LIMIT).await;
    our_relay.stop().await;
    let _ = std::fs::remove_file(&our_config);
    assert_exactly_once(&ours, &our_rows).await;

    let mut their_relay = RelayProcess::start(&theirs, None);
    theirs.wait_all_sent(LIMIT).await;
    their_relay.stop().await;
    assert_exactly_once(&theirs, &their_rows).await;
}

/// Does what a relay from before table-keyed checkpoints did: claims the
/// first `count` unsent rows, publishes them and a checkpoint keyed by
/// `relay.name` in a transaction of `outboxd-<relay.name>`, commits, and
/// dies before marking them. Returns how many rows it published.
async fn commit_as_legacy_relay(env: &TestEnv, count: usize) -> usize {
    use outboxd::table::{OutboxTable, PayloadEncoding};

    let config = env.config();
    let table = OutboxTable::from_config(&config.postgres).expect("table");
    let mut connection = sqlx::PgConnection::connect(&env.database_url)
        .await
        .expect("connect");
    let mut transaction = connection.begin().await.expect("BEGIN");
    let events = outboxd::capture::polling::claim_batch(
        &mut transaction,
        &table.claim_sql(PayloadEncoding::Text, false),
        outboxd::capture::polling::ClaimLimits {
            rows: count,
            bytes: usize::MAX / 2,
            sized_rows: count,
        },
        0,
        None,
    )
    .await
    .expect("read the first rows");
    // The claim locked the rows: release them now, not when the connection goes.
    transaction.rollback().await.expect("ROLLBACK");
    drop(connection);
    let router = outboxd::routing::Router::new(&config.routing, config.kafka.max_message_bytes)
        .expect("router");
    let producer = begin_transaction_as(&env.kafka, &format!("outboxd-{}", env.relay_name())).await;
    for event in &events {
        let record = router.route(event).expect("routable");
        let mut headers = rdkafka::message::OwnedHeaders::new();
        for (name, value) in &record.headers {
            headers = headers.insert(rdkafka::message::Header {
                key: name.as_ref(),
                value: Some(value.as_ref()),
            });
        }
        let future_record = FutureRecord::to(&record.topic)
            .payload(record.payload.as_deref().unwrap_or_default())
            .key(record.key.as_deref().unwrap_or_default())
            .headers(headers);
        producer
            .send(future_record, Duration::from_secs(30))
            .await
            .expect("event delivered");
    }
    let mut source_connection = env.pool.acquire().await.expect("connection");
    let source = outboxd::schema::database_source(&mut source_connection)
        .await
        .expect("source");
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    let checkpoint = Checkpoint::new("public.outbox", source.as_deref(), &seqs, &[], None);
    let checkpoint_bytes = checkpoint.to_bytes();
    let relay_name = env.relay_name();
    producer
        .send(
            FutureRecord::to(&env.checkpoint_topic())
                .key(relay_name.as_str())
                .payload(&checkpoint_bytes),
            Duration::from_secs(30),
        )
        .await
        .expect("checkpoint delivered");
    tokio::task::spawn_blocking(move || producer.commit_transaction(Duration::from_secs(30)))
        .await
        .expect("task")
        .expect("commit");
    events.len()
}
