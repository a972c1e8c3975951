//! Outbox rows are insert-only: a transaction that changes an outbox row
//! after inserting it fails, in both capture modes, instead of replication
//! publishing the row as inserted (a stale payload, or an event for a row
//! that no longer exists) while polling publishes the committed one.

use std::process::Command;
use std::time::Duration;

use crate::support::kafka::read_topic;
use crate::support::{InProcessRelay, Mode, TestEnv};

/// Runs `statement` (`$1`: the aggregate id) in one transaction after an insert of `aggregate_id`;
/// returns the error that ended it (the transaction is rolled back).
async fn insert_then(env: &TestEnv, aggregate_id: &str, statement: &str) -> String {
    let mut transaction = env.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('Order', $1, 'OrderCreated', '{\"version\": 1}')",
    )
    .bind(aggregate_id)
    .execute(&mut *transaction)
    .await
    .expect("insert an event");
    let refused = sqlx::query(statement)
        .bind(aggregate_id)
        .execute(&mut *transaction)
        .await
        .expect_err("an outbox row changed before COMMIT must be refused");
    transaction.rollback().await.unwrap();
    refused.to_string()
}

async fn a_row_changed_before_commit_is_refused(mode: Mode) {
    let env = TestEnv::new("insert-only", mode).await;
    // The relay's own deletes (of rows still unsent) must pass the guard.
    env.write_config("  after_publish: delete\n", "");
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;

    let patched = insert_then(
        &env,
        "order-patched",
        "UPDATE outbox SET payload = '{\"version\": 2}' WHERE aggregateid = $1",
    )
    .await;
    assert!(
        patched.contains("outbox rows are insert-only: UPDATE of unsent row"),
        "{patched}"
    );
    let withdrawn = insert_then(
        &env,
        "order-withdrawn",
        "DELETE FROM outbox WHERE aggregateid = $1",
    )
    .await;
    assert!(
        withdrawn.contains("outbox rows are insert-only: DELETE of unsent row"),
        "{withdrawn}"
    );
    sqlx::query(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('Order', 'order-final', 'OrderCreated', '{\"version\": 3}')",
    )
    .execute(&env.pool)
    .await
    .expect("a final row");
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");

    assert!(
        env.rows().await.is_empty(),
        "the relay deleted what it published"
    );
    let published = read_topic(&env.kafka, &format!("{}.Order", env.topic_prefix())).await;
    let keys: Vec<_> = published.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys, vec![Some(b"order-final".to_vec())], "{published:?}");
    assert_eq!(published[0].payload_json()["version"], 3);
}

in_both_modes!(a_row_changed_before_commit_is_refused, worker_threads = 2);

/// `outboxd check` says whether the guard is there, and what its absence
/// means.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_when_the_insert_only_guard_is_missing() {
    let env = TestEnv::new("insert-only-check", Mode::Replication).await;
    let check = || {
        let output = Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(["check", "--config"])
            .arg(&env.config_path)
            .output()
            .expect("run outboxd check");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let guarded = check();
    assert!(guarded.contains("[ok  ] insert-only: guarded"), "{guarded}");

    sqlx::raw_sql("DROP TRIGGER outbox_insert_only_update ON outbox")
        .execute(&env.pool)
        .await
        .unwrap();
    let unguarded = check();
    assert!(
        unguarded.contains("[warn] insert-only: public.outbox has no insert-only guard")
            && unguarded.contains("published as INSERTed in replication mode")
            && unguarded.contains("outboxd migrate"),
        "{unguarded}"
    );
}
