//! A seq handed out again. A promoted standby that lacked the primary's
//! last commits (or a restore without them) gives their seqs to new rows.
//! The latest checkpoint still names those seqs as published; reconciling
//! by seq alone would mark the new rows sent, and they would never be
//! published. Checkpoints name each row by its event id too, so only the
//! rows they published are marked.

use std::time::Duration;

use crate::support::faults::{log_path, RelayProcess};
use crate::support::kafka::read_all;
use crate::support::workload::{assert_every_row_published_once, write_backlog, write_orders};
use crate::support::{Mode, TestEnv};

const LIMIT: Duration = Duration::from_secs(60);

in_both_modes!(
    a_seq_reused_after_the_published_row_was_lost_is_published,
    worker_threads = 2
);
async fn a_seq_reused_after_the_published_row_was_lost_is_published(mode: Mode) {
    let env = TestEnv::new("reused-seqs", mode).await;
    let written = write_orders(&env.pool, 0, 4, 2).await;
    let mut relay = RelayProcess::start(&env, Some("after-commit"));
    relay.killed_at_point("after-commit", LIMIT).await;
    let unmarked: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM outbox WHERE sent_at IS NULL ORDER BY seq")
            .fetch_all(&env.pool)
            .await
            .expect("unmarked rows");
    assert_eq!(unmarked.len(), written.committed, "published, none marked");

    // What the promoted server has: none of those rows, and new rows (new
    // event ids) under the same seqs.
    sqlx::raw_sql(
        "BEGIN; \
         CREATE TEMP TABLE lost AS SELECT * FROM outbox WHERE sent_at IS NULL; \
         DELETE FROM outbox WHERE sent_at IS NULL; \
         INSERT INTO outbox (seq, id, aggregatetype, aggregateid, type, payload) \
           OVERRIDING SYSTEM VALUE \
           SELECT seq, gen_random_uuid(), aggregatetype, aggregateid, 'Reborn', payload FROM lost; \
         COMMIT",
    )
    .execute(&env.pool)
    .await
    .expect("seqs handed out again");

    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;

    let records = assert_every_row_published_once(&env).await;
    // The lost rows' events stay in Kafka: nothing can take them back.
    assert_eq!(records, 2 * written.committed);
}

in_both_modes!(
    a_reused_seq_committed_while_reconciling_is_published,
    worker_threads = 2
);
/// The same, with the new rows committing between reconciliation's read of
/// the event ids and its mark: the promoted server's writers and the relay
/// reconnect together. A seq whose row was absent at the read must not be
/// marked by seq.
async fn a_reused_seq_committed_while_reconciling_is_published(mode: Mode) {
    use sqlx::Connection;

    let env = TestEnv::new("reused-seqs-race", mode).await;
    let written = write_orders(&env.pool, 0, 4, 2).await;
    let mut relay = RelayProcess::start(&env, Some("after-commit"));
    relay.killed_at_point("after-commit", LIMIT).await;
    sqlx::raw_sql(
        "CREATE TABLE lost AS SELECT * FROM outbox WHERE sent_at IS NULL; \
         DELETE FROM outbox WHERE sent_at IS NULL",
    )
    .execute(&env.pool)
    .await
    .expect("the promoted server lacks the published rows");

    // A writer that holds back every write to the table, the relay's mark
    // included, but not its read of the ids.
    let mut writer = sqlx::PgConnection::connect(&env.database_url)
        .await
        .expect("connect");
    sqlx::raw_sql("BEGIN; LOCK TABLE outbox IN SHARE MODE")
        .execute(&mut writer)
        .await
        .expect("lock");
    let took_over_before = took_over(&log_path(&env));
    let mut relay = RelayProcess::start(&env, None);
    reconciled_or_blocked(&env, &relay, took_over_before).await;
    sqlx::raw_sql(
        "INSERT INTO outbox (seq, id, aggregatetype, aggregateid, type, payload) \
           OVERRIDING SYSTEM VALUE \
           SELECT seq, gen_random_uuid(), aggregatetype, aggregateid, 'Reborn', payload FROM lost; \
         COMMIT",
    )
    .execute(&mut writer)
    .await
    .expect("new rows under the lost rows' seqs");
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;

    assert_eq!(env.rows().await.len(), written.committed);
    assert_every_row_published_once(&env).await;
}

in_both_modes!(
    a_table_truncated_with_restart_identity_is_relayed_from_scratch,
    worker_threads = 2
);
/// `TRUNCATE … RESTART IDENTITY` while the relay is down (a reset by an
/// operator, a re-created table): the last checkpoint names seqs that new
/// rows now carry, and those rows must be published, not marked.
async fn a_table_truncated_with_restart_identity_is_relayed_from_scratch(mode: Mode) {
    let env = TestEnv::new("truncated", mode).await;
    write_orders(&env.pool, 0, 4, 2).await;
    let mut relay = RelayProcess::start(&env, Some("after-commit"));
    relay.killed_at_point("after-commit", LIMIT).await;
    let published_seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM outbox")
        .fetch_all(&env.pool)
        .await
        .expect("rows");
    sqlx::raw_sql("TRUNCATE outbox RESTART IDENTITY")
        .execute(&env.pool)
        .await
        .expect("truncate");
    let written = write_orders(&env.pool, 1, 4, 2).await;

    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;

    let rows = env.rows().await;
    assert_eq!(rows.len(), written.committed);
    assert!(
        rows.iter().any(|(seq, _, _)| published_seqs.contains(seq)),
        "new rows reuse the truncated rows' seqs"
    );
    assert_every_row_published_once(&env).await;
}

in_both_modes!(
    rows_truncated_before_they_were_published_give_their_seqs_away,
    worker_threads = 2
);
/// The relay is killed while it streams, rows commit while it is down, and
/// `TRUNCATE … RESTART IDENTITY` removes them before they are published;
/// more new rows than those then reuse their seqs. Replication streams the
/// truncated rows' inserts again, each sharing its seq with a new unsent
/// row: such an event is not published (the truncated row is gone), and
/// every new row is, once, in more batches than one.
async fn rows_truncated_before_they_were_published_give_their_seqs_away(mode: Mode) {
    let env = TestEnv::new("truncated-unpublished", mode).await;
    write_orders(&env.pool, 0, 2, 2).await;
    env.relay_until_all_sent(LIMIT).await;
    let mut relay = RelayProcess::start(&env, Some("after-commit"));
    if mode == Mode::Replication {
        env.wait_streaming(LIMIT).await;
    }
    write_orders(&env.pool, 1, 4, 2).await;
    relay.killed_at_point("after-commit", LIMIT).await;
    let truncated = write_backlog(&env.pool, 250, 5).await;
    let truncated_up_to: i64 = sqlx::query_scalar("SELECT max(seq) FROM outbox")
        .fetch_one(&env.pool)
        .await
        .expect("max seq");
    sqlx::raw_sql("TRUNCATE outbox RESTART IDENTITY")
        .execute(&env.pool)
        .await
        .expect("truncate");
    let written = write_backlog(&env.pool, 400, 5).await;
    assert!(
        written.committed as i64 >= truncated_up_to,
        "new rows reuse every truncated seq"
    );

    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
    assert_eq!(env.rows().await.len(), written.committed);
    assert_every_row_published_once(&env).await;
    let records = read_all(&env.kafka, &env.topic_prefix()).await;
    let published_truncated = records
        .iter()
        .filter(|r| {
            r.header("id")
                .is_some_and(|id| truncated.committed_ids.iter().any(|t| t == id))
        })
        .count();
    assert_eq!(
        published_truncated, 0,
        "rows truncated before they were published are not published"
    );
}

/// `TRUNCATE … RESTART IDENTITY` while replication runs: a batch is in
/// Kafka, its mark not yet run (marks slowed, a window of one batch), and
/// new rows take its rows' seqs. The mark must not mark the new rows (it
/// matches seq and event id); the relay dies before their own batch
/// commits, and on restart they are published, not taken for sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_in_flight_across_a_truncate_leaves_new_rows_unsent() {
    let env = TestEnv::new("truncate-in-flight", Mode::Replication).await;
    env.replace_in_config("relay:\n", "relay:\n  unacknowledged_batches: 1\n");
    write_backlog(&env.pool, 5, 5).await;
    env.relay_until_all_sent(LIMIT).await;
    sqlx::raw_sql("TRUNCATE outbox RESTART IDENTITY")
        .execute(&env.pool)
        .await
        .expect("truncate");
    let mut relay = RelayProcess::start_with(
        &env,
        Some("after-begin:2"),
        &[(outboxd::failpoint::SLOW_MARKS_ENV, "6000")],
    );
    env.wait_streaming(LIMIT).await;
    let first = write_backlog(&env.pool, 10, 5).await;
    wait_published(&env, &first.committed_ids).await;
    // The first batch's mark waits its 6 s: the new rows come first.
    sqlx::raw_sql("TRUNCATE outbox RESTART IDENTITY")
        .execute(&env.pool)
        .await
        .expect("truncate");
    let second = write_backlog(&env.pool, 10, 5).await;
    // With one batch in the window, the second batch begins only once the
    // first is marked; it dies there.
    relay.killed_at_point("after-begin", LIMIT).await;

    let mut relay = RelayProcess::start(&env, None);
    wait_published(&env, &second.committed_ids).await;
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
    assert_every_row_published_once(&env).await;
    let records = read_all(&env.kafka, &env.topic_prefix()).await;
    for id in &first.committed_ids {
        let times = records
            .iter()
            .filter(|r| r.header("id") == Some(id.as_str()))
            .count();
        assert_eq!(times, 1, "the truncated row {id} was published once");
    }
}

/// Waits until every event in `ids` is in Kafka.
async fn wait_published(env: &TestEnv, ids: &[String]) {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let records = read_all(&env.kafka, &env.topic_prefix()).await;
        let published = ids
            .iter()
            .filter(|id| records.iter().any(|r| r.header("id") == Some(id.as_str())))
            .count();
        if published == ids.len() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{published} of {} events reached Kafka",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the relay has reconciled (it took the table over) or its
/// reconciliation waits to write the outbox: either way, it has read the
/// rows' event ids.
async fn reconciled_or_blocked(env: &TestEnv, relay: &RelayProcess, took_over_before: usize) {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND datname = current_database() AND query ILIKE '%outbox%'",
        )
        .fetch_one(&env.pool)
        .await
        .expect("pg_stat_activity");
        if blocked > 0 || took_over(&relay.log) > took_over_before {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay neither took the table over nor waited to write it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many takeovers the relay log at `log` shows (relays append to it).
fn took_over(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("took the table over from its latest committed checkpoint")
        .count()
}
