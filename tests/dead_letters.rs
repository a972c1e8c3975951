//! `outboxd dead-letters list` and `replay`: the operator sees what was
//! dead-lettered and why, fixes the cause, and the replayed row is
//! published exactly once through the relay's normal path.

use std::process::{Command, Output};
use std::time::Duration;

use crate::support::kafka::read_topic;
use crate::support::{Mode, TestEnv};

fn outboxd(env: &TestEnv, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .arg("--config")
        .arg(&env.config_path)
        .output()
        .expect("run outboxd")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_and_replayed_once_after_the_fix() {
    let env = TestEnv::new("dead-letters", Mode::Polling).await;
    sqlx::raw_sql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
           ('Order', 'order-1', 'OrderCreated', '{\"n\": 1}'), \
           ('Bad Type', 'bad-1', 'Mistyped', '{\"n\": 2}'), \
           ('Order', 'order-2', 'OrderCreated', '{\"n\": 3}')",
    )
    .execute(&env.pool)
    .await
    .expect("insert events");
    env.relay_until_all_sent(Duration::from_secs(60)).await;

    let listed = outboxd(&env, &["dead-letters", "list", "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    let listing: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    let dead = listing["dead_letters"].as_array().expect("dead_letters");
    assert_eq!(dead.len(), 1, "{listing}");
    assert_eq!(dead[0]["seq"], 2);
    assert_eq!(dead[0]["event_type"], "Mistyped");
    assert_eq!(dead[0]["aggregate_type"], "Bad Type");
    assert_eq!(dead[0]["key"], "bad-1");
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("unroutable"),
        "{listing}"
    );
    let text = stdout(&outboxd(&env, &["dead-letters", "list"]));
    assert!(
        text.contains("seq 2") && text.contains("reason: unroutable"),
        "{text}"
    );

    // The operator routes the type to a legal topic and replays the row.
    let fixed_topic = format!("{}.fixed", env.topic_prefix());
    env.replace_in_config(
        "routing:\n",
        &format!(
            "routing:\n  rules:\n    - aggregate_type: Bad Type\n      topic: {fixed_topic}\n"
        ),
    );
    // A replay of the same rows running at the same time holds the
    // replay lock: this one waits for it rather than insert a second copy.
    let mut other_replay = env.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(outboxd::dead_letters::replay_lock_key(&env.setup().table))
        .execute(&mut *other_replay)
        .await
        .unwrap();
    let config_path = env.config_path.clone();
    let replaying = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(["dead-letters", "replay", "--seq", "2", "--config"])
            .arg(&config_path)
            .output()
            .expect("run outboxd")
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if waiting {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replay never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.rows().await.len(), 3, "nothing inserted while it waits");
    other_replay.rollback().await.unwrap();
    let replayed = replaying.await.unwrap();
    assert!(replayed.status.success(), "{replayed:?}");
    assert!(
        stdout(&replayed).contains("re-inserted as seq 4"),
        "{}",
        stdout(&replayed)
    );
    let again = outboxd(&env, &["dead-letters", "replay", "--all"]);
    assert!(
        stdout(&again).contains("replayed before"),
        "{}",
        stdout(&again)
    );
    let none = outboxd(&env, &["dead-letters", "replay", "--seq", "1"]);
    assert!(
        !none.status.success(),
        "a published row is not a dead letter"
    );

    env.relay_until_all_sent(Duration::from_secs(60)).await;
    let published = read_topic(&env.kafka, &fixed_topic).await;
    assert_eq!(published.len(), 1, "the replayed row once: {published:?}");
    let original_id: String = sqlx::query_scalar("SELECT id::text FROM outbox WHERE seq = 2")
        .fetch_one(&env.pool)
        .await
        .expect("the original row");
    assert_eq!(
        published[0].header("id"),
        Some(original_id.as_str()),
        "same event id"
    );
    assert_eq!(published[0].payload_json()["n"], 2);
}

/// Replays a dead letter, lets the relay publish the copy (and, with
/// `after_publish: delete`, delete it), then replays everything again: the
/// event reaches its topic once, because the replay record, not the copy,
/// says the row was replayed.
async fn replayed_once_whatever_happens_to_the_copy(after_publish: &str) {
    let env = TestEnv::new(&format!("replay-{after_publish}"), Mode::Polling).await;
    env.write_config(&format!("  after_publish: {after_publish}\n"), "");
    sqlx::raw_sql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
           ('Order', 'order-1', 'OrderCreated', '{\"n\": 1}'), \
           ('Bad Type', 'bad-1', 'Mistyped', '{\"n\": 2}')",
    )
    .execute(&env.pool)
    .await
    .expect("insert events");
    env.relay_until_all_sent(Duration::from_secs(60)).await;
    let fixed_topic = format!("{}.fixed", env.topic_prefix());
    env.replace_in_config(
        "routing:\n",
        &format!(
            "routing:\n  rules:\n    - aggregate_type: Bad Type\n      topic: {fixed_topic}\n"
        ),
    );

    let first = outboxd(&env, &["dead-letters", "replay", "--all"]);
    assert!(first.status.success(), "{first:?}");
    assert!(
        stdout(&first).contains("seq 2 (id") && stdout(&first).contains("re-inserted as seq 3"),
        "{}",
        stdout(&first)
    );
    env.relay_until_all_sent(Duration::from_secs(60)).await;
    let copy_left: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE seq = 3)")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        copy_left,
        after_publish == "mark",
        "the published copy is kept when marking, deleted when deleting"
    );

    let again = outboxd(&env, &["dead-letters", "replay", "--all"]);
    assert!(again.status.success(), "{again:?}");
    assert!(
        stdout(&again).contains("seq 2 (id") && stdout(&again).contains("replayed before"),
        "{}",
        stdout(&again)
    );
    // Had the second replay inserted a copy, this relay would publish it.
    env.relay_until_all_sent(Duration::from_secs(60)).await;
    let original_id: String = sqlx::query_scalar("SELECT id::text FROM outbox WHERE seq = 2")
        .fetch_one(&env.pool)
        .await
        .expect("the dead-lettered row stays");
    let published = read_topic(&env.kafka, &fixed_topic).await;
    assert_eq!(published.len(), 1, "the event once: {published:?}");
    assert_eq!(published[0].header("id"), Some(original_id.as_str()));
    let recorded: Vec<(String, i64, Option<i64>)> =
        sqlx::query_as("SELECT event_id, dead_letter_seq, replayed_as_seq FROM outbox_replayed")
            .fetch_all(&env.pool)
            .await
            .expect("read the replay record");
    assert_eq!(recorded, vec![(original_id, 2, Some(3))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_not_repeated_after_its_copy_was_published_and_deleted() {
    replayed_once_whatever_happens_to_the_copy("delete").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_not_repeated_after_its_copy_was_published_and_marked() {
    replayed_once_whatever_happens_to_the_copy("mark").await;
}

/// An install migrated before the replay record existed: replay refuses,
/// names the fix, and inserts nothing; after `outboxd migrate` it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_refuses_without_the_replay_record_and_names_the_fix() {
    let env = TestEnv::new("replay-unrecorded", Mode::Polling).await;
    sqlx::raw_sql(
        "DROP TABLE outbox_replayed; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('Bad Type', 'bad-1', 'Mistyped', '{\"n\": 1}')",
    )
    .execute(&env.pool)
    .await
    .expect("an old install with a dead letter to be");
    env.relay_until_all_sent(Duration::from_secs(60)).await;

    let refused = outboxd(&env, &["dead-letters", "replay", "--all"]);
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        stderr.contains("public.outbox_replayed is missing")
            && stderr.contains("Nothing was replayed")
            && stderr.contains("outboxd migrate")
            && stderr.contains("INSERT on public.outbox"),
        "{stderr}"
    );
    assert_eq!(env.rows().await.len(), 1, "nothing inserted");
    let check = outboxd(&env, &["check"]);
    assert!(
        stdout(&check).contains("[warn] replay record: public.outbox_replayed is missing"),
        "{}",
        stdout(&check)
    );

    let migrated = outboxd(&env, &["migrate"]);
    assert!(migrated.status.success(), "{migrated:?}");
    let replayed = outboxd(&env, &["dead-letters", "replay", "--all"]);
    assert!(
        stdout(&replayed).contains("re-inserted as seq 2"),
        "{replayed:?}"
    );
}
