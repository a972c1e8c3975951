//! Rows relayed without a mark (`relay.after_publish: none`) against the
//! real servers: every row reaches Kafka exactly once across restarts
//! while the table is never written to after the first drain; a slot
//! someone else moved or dropped is refused, as is a relay that would
//! mark rows again; the identity survives the `pg_control_system()`
//! grant; and an old partition goes only once the stream is past it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use outboxd::partitions::{self, Closing, Upkeep};
use outboxd::postgres::lsn::Lsn;

use crate::support::kafka::read_all;
use crate::support::workload::assert_every_row_published_once;
use crate::support::{InProcessRelay, Mode, TestEnv};

async fn unmarked_env(name: &str) -> TestEnv {
    let mut env = TestEnv::new(name, Mode::Replication).await;
    env.use_unmarked();
    env
}

/// Inserts `count` rows in transactions of five.
async fn write(env: &TestEnv, count: usize) {
    for chunk in 0..count.div_ceil(5) {
        let rows = 5.min(count - chunk * 5) as i32;
        sqlx::query(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'Order', 'o-' || (random() * 20)::int, 'OrderChanged', '{}' \
             FROM generate_series(1, $1)",
        )
        .bind(rows)
        .execute(&env.pool)
        .await
        .expect("insert rows");
    }
}

/// Waits until the routed topics hold `expected` records.
async fn wait_published(env: &TestEnv, expected: usize, limit: Duration) {
    let started = Instant::now();
    loop {
        let records = read_all(&env.kafka, &env.topic_prefix()).await;
        if records.len() >= expected {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "only {} of {expected} rows published after {limit:?}",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn marked(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL")
        .fetch_one(&env.pool)
        .await
        .expect("count marked rows")
}

/// Runs a relay until `expected` rows are in Kafka, then stops it.
async fn relay_until_published(env: &TestEnv, expected: usize) {
    let relay = InProcessRelay::start(env.config());
    wait_published(env, expected, Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;
}

/// Streams `count` new rows: a relay started, streaming before they are
/// written (so none is drained through the table), stopped once they are
/// in Kafka.
async fn stream_rows(env: &TestEnv, count: usize) {
    let before = read_all(&env.kafka, &env.topic_prefix()).await.len();
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    write(env, count).await;
    wait_published(env, before + count, Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;
}

fn slot_finding(findings: &[outboxd::check::Finding]) -> (outboxd::check::Status, String) {
    findings
        .iter()
        .find(|f| f.subject == "slot")
        .map(|f| (f.status, f.detail.clone()))
        .expect("a slot finding")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_are_published_exactly_once_and_never_marked_after_the_first_drain() {
    let env = unmarked_env("unmarked-once").await;
    // Written before the relay ever ran: only the table has them, and the
    // first start drains (and marks) them.
    write(&env, 50).await;
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    wait_published(&env, 50, Duration::from_secs(60)).await;
    write(&env, 100).await;
    wait_published(&env, 150, Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;

    // Written while it is down: streamed from the slot, no drain.
    write(&env, 80).await;
    relay_until_published(&env, 230).await;
    // A restart with nothing new, then more rows.
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    write(&env, 20).await;
    wait_published(&env, 250, Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");

    assert_eq!(assert_every_row_published_once(&env).await, 250);
    assert_eq!(
        marked(&env).await,
        50,
        "only the rows drained through the table are marked"
    );
    let (status, text) = slot_finding(&outboxd::check::run(&env.setup()).await);
    assert_eq!(status, outboxd::check::Status::Ok, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_moved_or_dropped_behind_the_relay_is_refused_by_the_relay_and_check() {
    let env = unmarked_env("unmarked-moved").await;
    stream_rows(&env, 20).await;

    // Rows written, then the slot advanced past them by an operator:
    // nothing in the table tells them from published ones.
    write(&env, 10).await;
    sqlx::query("SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())")
        .bind(env.slot_name())
        .execute(&env.pool)
        .await
        .expect("advance the slot");
    let refused = InProcessRelay::start(env.config())
        .finished(Duration::from_secs(60))
        .await
        .expect_err("a slot moved past the checkpoint stops the relay");
    assert_eq!(refused.cause, outboxd::Cause::SlotLost, "{refused}");
    assert!(
        refused.message.contains("past the last published position")
            && refused.message.contains("accept_message_loss_through"),
        "{refused}"
    );
    let (status, text) = slot_finding(&outboxd::check::run(&env.setup()).await);
    assert_eq!(status, outboxd::check::Status::Failed, "{text}");
    assert_eq!(
        marked(&env).await,
        0,
        "nothing was drained over the stranded rows"
    );

    // Dropped: refused too, never replaced by a new slot.
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(env.slot_name())
        .execute(&env.pool)
        .await
        .expect("drop the slot");
    let refused = InProcessRelay::start(env.config())
        .finished(Duration::from_secs(60))
        .await
        .expect_err("a dropped slot stops the relay");
    assert!(
        refused.message.contains("is gone") && refused.message.contains("no mark there"),
        "{refused}"
    );
    let slot: Option<String> =
        sqlx::query_scalar("SELECT slot_name::text FROM pg_replication_slots WHERE slot_name = $1")
            .bind(env.slot_name())
            .fetch_optional(&env.pool)
            .await
            .expect("look for the slot");
    assert_eq!(slot, None, "the relay must not create a slot over the gap");
    assert_eq!(read_all(&env.kafka, &env.topic_prefix()).await.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_that_marks_or_polls_refuses_a_table_published_unmarked() {
    let env = unmarked_env("unmarked-switch").await;
    stream_rows(&env, 10).await;
    write(&env, 5).await;

    for (from, to) in [
        ("  after_publish: none\n", "  after_publish: mark\n"),
        ("  mode: replication\n", "  mode: polling\n"),
    ] {
        env.replace_in_config(from, to);
        if to.contains("polling") {
            env.replace_in_config("  after_publish: mark\n", "");
        }
        let refused = InProcessRelay::start(env.config())
            .finished(Duration::from_secs(60))
            .await
            .expect_err("a marking relay stops");
        assert!(
            refused.message.contains("relay.after_publish: none")
                && refused.message.contains("publish them again"),
            "{refused}"
        );
    }
    assert_eq!(
        read_all(&env.kafka, &env.topic_prefix()).await.len(),
        10,
        "nothing published twice, nothing drained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_identity_holds_when_the_pg_control_system_grant_is_given() {
    let env = unmarked_env("unmarked-grant").await;
    let role = env.relay_without_pg_control_system().await;
    stream_rows(&env, 20).await;

    // The grant the relay's warning asks for: the identity read through
    // pg_control_system() is the one IDENTIFY_SYSTEM gave.
    env.grant_pg_control_system(&role).await;
    write(&env, 10).await;
    relay_until_published(&env, 30).await;
    assert_eq!(assert_every_row_published_once(&env).await, 30);
    assert_eq!(marked(&env).await, 0);
}

/// While no outbox row comes, the slot still moves: a checkpoint of no
/// event names the idle position, and a restart from it is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_outbox_does_not_hold_the_wal_others_write() {
    let env = unmarked_env("unmarked-idle").await;
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    write(&env, 10).await;
    wait_published(&env, 10, Duration::from_secs(60)).await;

    // Other tables' writes, and no outbox row, for longer than the idle
    // checkpoint interval (30 s).
    let started = Instant::now();
    let mut passed = None;
    while started.elapsed() < Duration::from_secs(120) {
        sqlx::query("INSERT INTO aggregates (id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(format!("a-{}", started.elapsed().as_millis()))
            .execute(&env.pool)
            .await
            .expect("write another table");
        let (confirmed, current): (Option<i64>, i64) = env.slot_positions().await;
        if passed.is_none() && started.elapsed() > Duration::from_secs(2) {
            passed = Some(current);
        }
        if let (Some(confirmed), Some(mark)) = (confirmed, passed) {
            if confirmed >= mark {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (confirmed, _) = env.slot_positions().await;
    let mark = passed.expect("a position to pass");
    assert!(
        confirmed.is_some_and(|confirmed| confirmed >= mark),
        "the slot stayed at {confirmed:?}, behind {mark}, with the outbox idle"
    );
    relay.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;

    // The slot confirmed past the last row is one a checkpoint names: a
    // restart streams on, and the next rows go once.
    write(&env, 5).await;
    relay_until_published(&env, 15).await;
    assert_eq!(assert_every_row_published_once(&env).await, 15);
    assert_eq!(marked(&env).await, 0);
}

const HOURLY: &str = "  partitioning:\n    interval: 1h\n    ahead: 2\n";

/// Rounds of unmarked retention until `partition` is closed as far as its
/// WAL position (every transaction that could write it has ended).
async fn close(
    env: &TestEnv,
    closing: &mut HashMap<String, Closing>,
    published_through: Lsn,
) -> Upkeep {
    let table = env.setup().table;
    let mut connection = env.pool.acquire().await.expect("connection");
    let started = Instant::now();
    loop {
        let mut upkeep = Upkeep::default();
        partitions::drop_expired_unmarked(
            &mut connection,
            &table,
            Duration::from_secs(86_400),
            published_through,
            closing,
            &mut upkeep,
        )
        .await
        .expect("a retention round");
        if !upkeep.dropped.is_empty()
            || !upkeep.kept_unsent.is_empty()
            || closing
                .values()
                .any(|c| matches!(c, Closing::Position { .. }))
        {
            return upkeep;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the partition never closed: {closing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn current_wal(env: &TestEnv) -> Lsn {
    let text: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&env.pool)
        .await
        .expect("WAL position");
    text.parse().expect("an LSN")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_partition_of_unmarked_rows_goes_only_once_the_stream_is_past_every_row() {
    let mut env = TestEnv::new_partitioned("unmarked-part", Mode::Replication, HOURLY).await;
    env.use_unmarked();
    sqlx::raw_sql(
        "DO $$ DECLARE a timestamptz := date_trunc('hour', now() - interval '3 days'); BEGIN \
           EXECUTE format('CREATE TABLE old_rows PARTITION OF outbox FOR VALUES FROM (%L) TO (%L)', \
                          a, a + interval '1 hour'); \
         END $$; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload, created_at) \
         SELECT 'Order', 'o-' || i, 'OrderCreated', '{}', \
                date_trunc('hour', now() - interval '3 days') + interval '10 minutes' \
         FROM generate_series(1, 100) AS i;",
    )
    .execute(&env.pool)
    .await
    .expect("an old partition");
    let exists = |env: &TestEnv| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT to_regclass('old_rows') IS NOT NULL")
                .fetch_one(&pool)
                .await
                .expect("look for the partition")
        }
    };

    // The stream is clear nowhere: closed as far as its position, kept.
    let mut closing = HashMap::new();
    close(&env, &mut closing, Lsn(0)).await;
    let Some(Closing::Position { wal, .. }) = closing.get("old_rows").cloned() else {
        panic!("closed to a position: {closing:?}");
    };
    let upkeep = close(&env, &mut closing, Lsn(wal.0 - 1)).await;
    assert!(
        upkeep.dropped.is_empty() && exists(&env).await,
        "{upkeep:?}"
    );

    // A late writer puts a row into it after its position was read: even
    // with the stream past that position, the partition is put back.
    sqlx::query(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, created_at) \
         VALUES ('Order', 'late', 'OrderCreated', '{}', \
                 date_trunc('hour', now() - interval '3 days') + interval '20 minutes')",
    )
    .execute(&env.pool)
    .await
    .expect("a late row");
    let upkeep = close(&env, &mut closing, wal).await;
    assert_eq!(upkeep.kept_unsent, vec!["old_rows".to_string()]);
    assert!(exists(&env).await, "the partition is back");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&env.pool)
        .await
        .expect("count rows");
    assert_eq!(rows, 101, "putting it back loses nothing");

    // Closed again from the start, and past by the stream: dropped.
    close(&env, &mut closing, Lsn(0)).await;
    let upkeep = close(&env, &mut closing, current_wal(&env).await).await;
    assert_eq!(upkeep.dropped, vec!["old_rows".to_string()]);
    assert!(!exists(&env).await);
}

/// Runs a relay for at most `limit`: its error if it stopped by itself,
/// `Ok` if it was still running (then stopped cleanly).
async fn run_for(env: &TestEnv, limit: Duration) -> Result<(), outboxd::Error> {
    let relay = InProcessRelay::start(env.config());
    let started = Instant::now();
    while started.elapsed() < limit {
        if relay.is_finished() {
            return relay.finished(Duration::from_secs(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.stop().await?;
    env.wait_slot_inactive(Duration::from_secs(30)).await;
    Ok(())
}

/// Publishes `count` more rows in two sessions, so the latest checkpoint
/// names only the last batches, not every row in Kafka.
async fn publish_in_sessions(env: &TestEnv, count: usize) {
    stream_rows(env, count / 2).await;
    let before = read_all(&env.kafka, &env.topic_prefix()).await.len();
    write(env, count - count / 2).await;
    relay_until_published(env, before + count - count / 2).await;
}

/// Adversarial: the refusal of a table whose rows were published unmarked
/// under a checkpoint this relay cannot resume from (here: the table's own
/// identity on an earlier checkpoint topic, `kafka.checkpoint_topic`
/// changed without `kafka.previous_checkpoint_topic`) must hold on every
/// start. The first start refused only after it had marked the rows that
/// checkpoint names; so the next start (a supervisor's restart) found
/// nothing newly marked, took the table for never relayed, drained every
/// unmarked row and published it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_over_rows_published_unmarked_elsewhere_holds_on_the_next_start() {
    let mut env = unmarked_env("unmarked-refusal-sticks").await;
    publish_in_sessions(&env, 60).await;

    let moved = format!("{}.moved.checkpoints", env.topic_prefix());
    env.move_checkpoint_topic(&moved, false);
    for attempt in 1..=2 {
        let outcome = run_for(&env, Duration::from_secs(20)).await;
        let published = read_all(&env.kafka, &env.topic_prefix()).await.len();
        assert!(
            outcome.is_err() && published == 60,
            "start {attempt} after the topic change: {outcome:?}, {published} records in Kafka \
             for 60 rows"
        );
    }
}

/// Adversarial: the documented way to move the checkpoint topic
/// (`kafka.previous_checkpoint_topic` named) adopts the table's checkpoint;
/// an ordinary restart after that must not be refused (the earlier topic's
/// checkpoint is still found there, now under "another topic").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_after_a_documented_checkpoint_topic_move_is_not_refused() {
    let mut env = unmarked_env("unmarked-topic-move").await;
    publish_in_sessions(&env, 20).await;

    let moved = format!("{}.moved.checkpoints", env.topic_prefix());
    env.move_checkpoint_topic(&moved, true);
    publish_in_sessions(&env, 20).await;
    // Restarts after the move: neither refused nor publishing anything twice.
    for _ in 0..2 {
        run_for(&env, Duration::from_secs(15))
            .await
            .expect("an ordinary restart after the move is not refused");
    }
    publish_in_sessions(&env, 20).await;
    assert_eq!(assert_every_row_published_once(&env).await, 60);
}
