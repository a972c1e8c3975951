//! What only replication capture has: transactions larger than
//! `logical_decoding_work_mem` and than a Kafka batch, many rows on one
//! LSN, a slot that must not pin WAL when the outbox is idle, a lost slot,
//! and `auto` choosing a mode by what the server allows.

use sqlx::{Connection, PgConnection};
use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::faults::RelayProcess;
use crate::support::kafka::read_all;
use crate::support::metrics::sum;
use crate::support::workload::{
    assert_every_row_published_once, assert_exactly_once, write_backlog, write_orders, LiveWriter,
    Written,
};
use crate::support::{servers, signal, InProcessRelay, Mode, TestEnv};

/// Rows per aggregate and aggregates in the big transaction.
const AGGREGATES: i64 = 20;

/// Writes `rows` outbox rows in one transaction: half by one multi-row
/// INSERT, half by COPY, so thousands of rows share few LSNs. Each row is
/// about 300 bytes, far past the stack's 64kB `logical_decoding_work_mem`.
/// Rows go round-robin over `AGGREGATES` aggregates with `n` = 1, 2, 3, …
async fn write_big_transaction(env: &TestEnv, rows: i64) -> Written {
    let half = rows / 2;
    let mut tx = env.pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'Order', 'big-' || (i % $1), 'OrderCreated', \
                jsonb_build_object('aggregate', 'big-' || (i % $1), 'n', i / $1 + 1, 'pad', repeat('x', 250)) \
         FROM generate_series(0, $2 - 1) AS i ORDER BY i",
    )
    .bind(AGGREGATES)
    .bind(half)
    .execute(&mut *tx)
    .await
    .expect("multi-row insert");
    let mut copy = tx
        .copy_in_raw("COPY outbox (aggregatetype, aggregateid, type, payload) FROM STDIN")
        .await
        .expect("start COPY");
    let mut data = String::new();
    for i in half..rows {
        let aggregate = format!("big-{}", i % AGGREGATES);
        data.push_str(&format!(
            "Order\t{aggregate}\tPaymentCaptured\t{{\"aggregate\": \"{aggregate}\", \"n\": {}, \"pad\": \"{}\"}}\n",
            i / AGGREGATES + 1,
            "y".repeat(250)
        ));
    }
    copy.send(data.as_bytes()).await.expect("COPY data");
    copy.finish().await.expect("finish COPY");
    tx.commit().await.expect("commit");
    Written {
        committed: rows as usize,
        ..Written::default()
    }
}

async fn sent_count(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL")
        .fetch_one(&env.pool)
        .await
        .expect("count sent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_transaction_killed_midway_comes_out_exactly_once() {
    let env = TestEnv::new("big-txn", Mode::Replication).await;
    // A column of the service's own: rows are read by column name.
    sqlx::raw_sql("ALTER TABLE outbox ADD COLUMN tenant text DEFAULT 'acme'")
        .execute(&env.pool)
        .await
        .unwrap();
    let rows = 3000;

    let mut relay = env.spawn_relay_process();
    env.wait_streaming(Duration::from_secs(60)).await;
    let written = write_big_transaction(&env, rows).await;

    // Kill it twice while the transaction is part-way through Kafka: the
    // slot cannot be confirmed inside a transaction, so each restart
    // replays it from its first row and must skip what the checkpoint
    // already covers.
    for kill in 1..=2 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let floor = sent_count(&env).await;
        loop {
            let sent = sent_count(&env).await;
            if sent > floor || sent == rows {
                break;
            }
            assert!(Instant::now() < deadline, "relay published nothing in 60s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        signal(&relay, "KILL");
        let _ = relay.wait();
        eprintln!(
            "big transaction: kill {kill} with {} of {rows} rows marked sent",
            sent_count(&env).await
        );
        relay = env.spawn_relay_process();
    }
    env.wait_all_sent(Duration::from_secs(120)).await;
    signal(&relay, "TERM");
    assert!(relay.wait().expect("relay exits").success());

    assert_exactly_once(&env, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_outbox_does_not_pin_wal() {
    let env = TestEnv::new("idle-slot", Mode::Replication).await;
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let before = write_orders(&env.pool, 0, 5, 3).await;
    env.wait_all_sent(Duration::from_secs(30)).await;

    // Lots of WAL from another table and nothing for the outbox. The noise
    // is megabytes of WAL whatever the relay does meanwhile; how far behind
    // the slot is at any one moment is a race with the relay's keepalive
    // confirmations (it may already have passed the noise when we look), so
    // the test waits for what it is about: the slot passing the noise.
    let (_, wal_before_noise) = env.slot_positions().await;
    sqlx::raw_sql(
        "CREATE TABLE noise (id bigserial PRIMARY KEY, body text); \
         INSERT INTO noise (body) SELECT repeat('n', 500) FROM generate_series(1, 20000);",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let (_, wal_after_noise) = env.slot_positions().await;
    assert!(
        wal_after_noise - wal_before_noise > 5_000_000,
        "the noise should be megabytes of WAL, was {} bytes",
        wal_after_noise - wal_before_noise
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (confirmed, _) = env.slot_positions().await;
        if confirmed.expect("slot exists") >= wal_after_noise {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "confirmed_flush_lsn stayed {} bytes behind the WAL written by other tables",
            wal_after_noise - confirmed.unwrap_or(0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // And it still streams afterwards.
    let after = write_orders(&env.pool, 1, 5, 3).await;
    env.wait_all_sent(Duration::from_secs(30)).await;
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once(&env, &Written::combined([before, after])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_slot_is_recovered_from_the_table_without_duplicates() {
    let env = TestEnv::new("lost-slot", Mode::Replication).await;
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let streamed = write_orders(&env.pool, 0, 60, 8).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");

    // The server ends the stopped relay's walsender once it sees the
    // connection close, which may be a moment after the relay returned.
    env.wait_slot_inactive(Duration::from_secs(30)).await;
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(env.slot_name())
        .execute(&env.pool)
        .await
        .expect("drop the slot");
    let while_down = write_orders(&env.pool, 1, 60, 8).await;

    // `halt` stops and says why, publishing nothing.
    env.replace_in_config(
        "  batch_size: 100\n",
        "  batch_size: 100\n  on_slot_lost: halt\n",
    );
    let halted = InProcessRelay::start(env.config())
        .finished(Duration::from_secs(60))
        .await
        .expect_err("on_slot_lost: halt stops the relay");
    assert_eq!(halted.cause, outboxd::Cause::SlotLost, "{halted}");
    assert!(
        halted.message.contains("is gone") && halted.message.contains("on_slot_lost"),
        "{halted}"
    );
    assert!(env.unsent().await > 0);

    // `recover` publishes the unsent rows, then streams from a new slot,
    // while writers keep committing through the switch.
    env.replace_in_config("  on_slot_lost: halt\n", "");
    let live_writer = LiveWriter::start(&env.pool, 2, 10, 8);
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    // The writers go on until rows they commit from now on, which only the
    // new slot's stream can carry, are published.
    let streaming_from: i64 = sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let streamed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE seq > $1 AND sent_at IS NOT NULL",
        )
        .bind(streaming_from)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if streamed > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing written after streaming began was published within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let live = live_writer.finish().await;
    let after = write_orders(&env.pool, 3, 10, 8).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");

    assert_exactly_once(
        &env,
        &Written::combined([streamed, while_down, live, after]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_polling_where_wal_level_is_replica() {
    let server = std::env::var("OUTBOXD_TEST_PG_NOLOGICAL_URL").expect(
        "OUTBOXD_TEST_PG_NOLOGICAL_URL is not set: run `make test`, whose stack starts a \
         second Postgres with wal_level=replica",
    );
    let _ = servers();
    let env = TestEnv::new_on(&server, "auto-fallback", Mode::Auto).await;
    let written = write_orders(&env.pool, 0, 40, 5).await;
    env.relay_until_all_sent(Duration::from_secs(60)).await;
    assert_exactly_once(&env, &written).await;
    let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(slots, 0, "polling creates no slot");

    // Asking for replication there is a clear error, not a silent fallback.
    env.replace_in_config("  mode: auto\n", "  mode: replication\n");
    let error = InProcessRelay::start(env.config())
        .finished(Duration::from_secs(60))
        .await
        .expect_err("replication is impossible with wal_level=replica");
    assert!(error.message.contains("wal_level is `replica`"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_streams_where_the_server_allows_it() {
    let env = TestEnv::new("auto-streams", Mode::Auto).await;
    let relay = InProcessRelay::start(env.config());
    // On this server auto must stream: its walsender shows up.
    env.wait_streaming(Duration::from_secs(60)).await;
    let written = write_orders(&env.pool, 0, 20, 4).await;
    env.wait_all_sent(Duration::from_secs(30)).await;
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once(&env, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_role_streams_with_a_scram_password() {
    let env = TestEnv::new("scram", Mode::Replication).await;
    let role = format!("it_scram_{}", std::process::id());
    // The stack's pg_hba.conf makes members of scram_auth use SCRAM-SHA-256.
    for statement in [
        "DO $$ BEGIN CREATE ROLE scram_auth NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            .to_string(),
        format!("DROP ROLE IF EXISTS {role}"),
        format!("CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'scr@m secret' IN ROLE scram_auth"),
        format!("GRANT SELECT, UPDATE (sent_at) ON outbox TO {role}"),
    ] {
        sqlx::raw_sql(&statement).execute(&env.pool).await.unwrap();
    }
    let url = env.database_url.replacen(
        "postgres://postgres@",
        &format!("postgres://{role}:scr%40m%20secret@"),
        1,
    );
    env.replace_in_config(&env.database_url, &url);

    let written = write_orders(&env.pool, 0, 30, 4).await;
    env.relay_until_all_sent(Duration::from_secs(60)).await;
    assert_exactly_once(&env, &written).await;
    let slot_user_streamed: bool =
        sqlx::query_scalar("SELECT count(*) = 1 FROM pg_replication_slots WHERE slot_name = $1")
            .bind(env.slot_name())
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(slot_user_streamed, "the role created its slot");

    // A wrong password is an error that says what to check.
    env.replace_in_config("scr%40m%20secret", "wrong");
    let error = InProcessRelay::start(env.config())
        .finished(Duration::from_secs(60))
        .await
        .expect_err("a wrong password stops the relay");
    assert!(error.message.contains("password"), "{error}");
}

/// The catch-up filter's WAL position must wait for transactions that were
/// running when it was read: Postgres streams a commit as soon as its WAL is
/// flushed, a moment before other sessions can see the row, and the filter
/// would otherwise take a row it cannot see yet for one already sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_position_waits_for_running_transactions() {
    let env = TestEnv::new("settled", Mode::Replication).await;
    let mut open = env.pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO aggregates (id) VALUES ('held-open')")
        .execute(&mut *open)
        .await
        .expect("a transaction with an id");

    let mut connection = PgConnection::connect(&env.database_url).await.unwrap();
    let pid = backend_pid(&mut connection).await;
    let settled =
        tokio::spawn(async move { outboxd::postgres::settled_wal_position(&mut connection).await });
    waits_for_commit(
        &env,
        open,
        pid,
        settled,
        "the position was settled while a transaction that held an id was still running",
    )
    .await
    .expect("position");
}

/// Found by `make chaos` (random kills, replication): a row the stream had
/// delivered and Kafka held stayed unsent for good, because the mark ran in
/// the moment between its commit being streamed and becoming visible. The
/// stream's word is "committed"; a mark that misses such a row must wait
/// until it is visible and mark it then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_row_not_yet_visible_is_marked_once_visible() {
    let env = TestEnv::new("ack-visible", Mode::Replication).await;
    // The row as the stream would deliver it, its transaction not yet
    // visible to other sessions: here, simply not yet committed.
    let mut open = env.pool.begin().await.expect("begin");
    let (seq, id): (i64, String) = sqlx::query_as(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('Order', 'order-1', 'OrderCreated', '{}') RETURNING seq, id::text",
    )
    .fetch_one(&mut *open)
    .await
    .expect("insert");

    let config = env.config();
    let table = outboxd::table::OutboxTable::from_config(&config.postgres).expect("table");
    let acknowledger =
        outboxd::acknowledge::Acknowledger::new(&table, outboxd::config::AfterPublish::Mark);
    let mut connection = PgConnection::connect(&env.database_url).await.unwrap();
    let pid = backend_pid(&mut connection).await;
    let marking = tokio::spawn(async move {
        acknowledger
            .acknowledge_streamed(&mut connection, &[(seq, id.as_str())], &[])
            .await
    });
    let acknowledged = waits_for_commit(
        &env,
        open,
        pid,
        marking,
        "the mark gave up on a row whose transaction was not visible yet",
    )
    .await
    .expect("acknowledge");
    assert_eq!(acknowledged.published, 1);
    assert_eq!(env.unsent().await, 0, "the row is marked sent");
}

async fn backend_pid(connection: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(connection)
        .await
        .expect("backend pid")
}

/// Asserts that `task`, running on backend `pid`, waits for `open` while it
/// is uncommitted, and that it finishes once `open` commits; returns what
/// it returned.
///
/// Waiting is `slot::settled_wal_position` finding a transaction that held
/// an id still running, and checking again 20 ms later: there is no lock to
/// see in `pg_locks`, but `pg_stat_activity` shows its check
/// (`pg_snapshot_xmin(…)`) starting a second time, which it does only after
/// the first found `open` running.
async fn waits_for_commit<T: std::fmt::Debug>(
    env: &TestEnv,
    open: sqlx::Transaction<'static, sqlx::Postgres>,
    pid: i32,
    task: tokio::task::JoinHandle<T>,
    finished_too_early: &str,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first_check_started: Option<String> = None;
    loop {
        if task.is_finished() {
            panic!("{finished_too_early}: {:?}", task.await);
        }
        let check_started: Option<String> = sqlx::query_scalar(
            "SELECT query_start::text FROM pg_stat_activity \
             WHERE pid = $1 AND query LIKE '%pg_snapshot_xmin(%'",
        )
        .bind(pid)
        .fetch_optional(&env.pool)
        .await
        .expect("read pg_stat_activity");
        match (&first_check_started, check_started) {
            (None, Some(started)) => first_check_started = Some(started),
            (Some(first), Some(started)) if *first != started => break,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} did not check twice for running transactions within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    open.commit().await.expect("commit");
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("finishes once the transaction committed")
        .expect("task")
}

/// Issue 26, item 2: a new slot streams only what commits after it exists,
/// so the rows already in the table are published by its catch-up drain,
/// whose claims skip locked rows. Rows another session holds locked while
/// the drain runs (`FOR UPDATE`, `FOR SHARE`, a foreign-key check's `FOR KEY
/// SHARE`) must be published once the lock is released, never left behind
/// when streaming begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_locked_during_a_new_slots_catch_up_are_published_once_released() {
    let env = TestEnv::new("locked-drain", Mode::Replication).await;
    sqlx::raw_sql("CREATE TABLE receipts (outbox_seq bigint NOT NULL REFERENCES outbox (seq))")
        .execute(&env.pool)
        .await
        .expect("a table referencing the outbox");
    // Written before the relay ever ran: only the new slot's drain can
    // publish them.
    let backlog = write_backlog(&env.pool, 2000, 10).await;
    // Marks slowed to 200 ms a batch: the drain of 20 batches takes
    // seconds, time to lock rows at its far end while it runs.
    let mut relay =
        RelayProcess::start_with(&env, None, &[(outboxd::failpoint::SLOW_MARKS_ENV, "200")]);
    wait_until_sent_at_least(&env, 1, Duration::from_secs(60)).await;

    // The drain has begun (its slot exists, its bound is read). Lock its
    // last six rows three ways, as other sessions of a service would.
    let last: Vec<i64> = sqlx::query_scalar("SELECT seq FROM outbox ORDER BY seq DESC LIMIT 6")
        .fetch_all(&env.pool)
        .await
        .expect("the last rows");
    let for_update = hold_locked(
        &env,
        "SELECT 1 FROM outbox WHERE seq = ANY($1) FOR UPDATE",
        &last[0..2],
    )
    .await;
    let for_share = hold_locked(
        &env,
        "SELECT 1 FROM outbox WHERE seq = ANY($1) FOR SHARE",
        &last[2..4],
    )
    .await;
    let key_share = hold_locked(
        &env,
        "INSERT INTO receipts (outbox_seq) SELECT unnest($1::bigint[])",
        &last[4..6],
    )
    .await;

    // Everything else is published; the drain waits for the locked rows
    // and says so, naming them.
    wait_until_unsent_at_most(&env, 6, Duration::from_secs(60)).await;
    relay
        .wait_for_log(
            &format!("the catch-up drain cannot claim unsent rows [{}, ", last[5]),
            Duration::from_secs(60),
        )
        .await;
    for transaction in [for_update, for_share, key_share] {
        transaction.commit().await.expect("release the lock");
    }
    env.wait_all_sent(Duration::from_secs(60)).await;

    // And it streams afterwards.
    env.wait_streaming(Duration::from_secs(60)).await;
    let after = write_orders(&env.pool, 1, 10, 4).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await;
    assert_exactly_once(&env, &Written::combined([backlog, after])).await;
}

/// Issue 26, item 5: with the relay stopped, an operator advances its slot
/// past rows written meanwhile. The slot is neither missing nor lost and the
/// checkpoint has a position, yet its stream can never carry those rows:
/// they must be published from the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_behind_a_slot_advanced_while_the_relay_was_down_are_published() {
    restart_after_the_slot_moved(
        "slot-advanced",
        &["SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())"],
        SlotMoved::PastTheBacklog,
    )
    .await;
}

/// Issue 26, item 5: as above, the slot dropped and re-created by tooling
/// (same name, same plugin) while the relay was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_behind_a_slot_recreated_while_the_relay_was_down_are_published() {
    restart_after_the_slot_moved(
        "slot-recreated",
        &[
            "SELECT pg_drop_replication_slot($1)",
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        ],
        SlotMoved::PastTheBacklog,
    )
    .await;
}

/// Issue 22: a restart whose slot is past its checkpoint but before the
/// rows written while it was down (as the relay's own idle confirms leave
/// it) publishes them from the table. Its stream then starts where the
/// drain read its bound: the drained rows are not decoded and sent again
/// only for the catch-up filter to drop them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_catch_up_drain_is_not_replayed_through_the_stream() {
    restart_after_the_slot_moved(
        "drain-not-replayed",
        &["SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())"],
        SlotMoved::BeforeTheBacklog,
    )
    .await;
}

/// Rows an operator marked sent by hand, or truncated away, while the
/// relay was stopped cleanly are not published (docs/operations.md),
/// though its slot's stream carries their inserts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_marked_or_truncated_while_the_relay_was_stopped_cleanly_are_not_published() {
    let env = TestEnv::new("stopped-cleanly-operator", Mode::Replication).await;
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    write_orders(&env.pool, 0, 4, 2).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;

    let marked = write_orders(&env.pool, 1, 10, 2).await;
    let hand_marked: Vec<String> = sqlx::query_scalar(
        "UPDATE outbox SET sent_at = now() WHERE sent_at IS NULL RETURNING id::text",
    )
    .fetch_all(&env.pool)
    .await
    .expect("mark rows sent by hand");
    assert_eq!(hand_marked.len(), marked.committed);
    let truncated = write_orders(&env.pool, 2, 50, 5).await;
    sqlx::raw_sql("TRUNCATE outbox RESTART IDENTITY")
        .execute(&env.pool)
        .await
        .expect("truncate");
    // Reuses the truncated rows' seqs; later in the stream than all of them.
    let after = write_orders(&env.pool, 3, 60, 5).await;

    let relay = InProcessRelay::start(env.config());
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    let records = read_all(&env.kafka, &env.topic_prefix()).await;
    let not_to_publish: HashSet<&str> = hand_marked
        .iter()
        .chain(&truncated.committed_ids)
        .map(String::as_str)
        .collect();
    let published: Vec<&str> = records
        .iter()
        .filter_map(|record| record.header("id"))
        .filter(|id| not_to_publish.contains(id))
        .collect();
    assert!(
        published.is_empty(),
        "{} row(s) marked sent by hand or truncated while the relay was stopped were published",
        published.len()
    );
    assert_every_row_published_once(&env).await;
    assert_eq!(env.rows().await.len(), after.committed);
}

/// Rows committed while the outbox table was out of the publication never
/// reach the stream (decoding applies the publication as it was), and the
/// relay confirms the slot past them. The next start finds the
/// publication's entry changed since the last session began, whether or
/// not the slot is past its checkpoint, and publishes them from the table
/// once each; after the later rows of their aggregates, which the stream
/// published meanwhile (order cannot be kept for them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_committed_while_the_table_was_out_of_the_publication_are_published_at_the_next_start()
{
    let env = TestEnv::new("publication-gap", Mode::Replication).await;
    let publication = env.config().postgres.publication.clone();
    let alter = |change: &str| {
        let statement = format!("ALTER PUBLICATION {publication} {change} TABLE outbox");
        let pool = env.pool.clone();
        async move {
            sqlx::raw_sql(&statement)
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
    };
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let before = write_orders(&env.pool, 0, 10, 5).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    alter("DROP").await;
    let gap = write_orders(&env.pool, 1, 10, 5).await;
    alter("ADD").await;
    let after_gap = write_orders(&env.pool, 2, 10, 5).await;
    // The stream publishes what came after the gap; the gap's rows wait.
    wait_until_unsent_at_most(&env, gap.committed as i64, Duration::from_secs(60)).await;
    assert_eq!(env.unsent().await, gap.committed as i64);
    relay.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;

    let relay = InProcessRelay::start(env.config());
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    let written = Written::combined([before, gap, after_gap]);
    assert_eq!(
        assert_every_row_published_once(&env).await,
        written.committed
    );
}

/// An operator who advances the slot the moment the stopping relay lets
/// go of it (a loop retrying while it is in use), with writers running:
/// the next start finds the slot past its checkpoint and publishes the
/// rows the slot skipped from the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_behind_a_slot_advanced_as_the_relay_stops_are_published() {
    let env = TestEnv::new("advanced-at-stop", Mode::Replication).await;
    sqlx::raw_sql(
        "CREATE FUNCTION advance_when_released(slot text) RETURNS void LANGUAGE plpgsql AS $$ \
         BEGIN LOOP BEGIN \
           PERFORM pg_replication_slot_advance(slot, pg_current_wal_flush_lsn()); \
           RETURN; \
         EXCEPTION WHEN object_in_use THEN PERFORM pg_sleep(0.001); END; END LOOP; END $$",
    )
    .execute(&env.pool)
    .await
    .expect("create the advancing function");
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let before = write_orders(&env.pool, 0, 10, 5).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    let writer = LiveWriter::start(&env.pool, 1, 5, 5);
    let pool = env.pool.clone();
    let slot = env.slot_name();
    let advancer = tokio::spawn(async move {
        sqlx::query("SELECT advance_when_released($1)")
            .bind(slot)
            .execute(&pool)
            .await
            .expect("advance the slot once released")
    });
    relay.stop().await.expect("relay stops cleanly");
    advancer.await.expect("the advancing task");
    let during = writer.finish().await;

    let relay = InProcessRelay::start(env.config());
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once(&env, &Written::combined([before, during])).await;
}

/// Renamed (a new slot, which drains the backlog from the table),
/// restarted, and renamed back to its old slot, the relay publishes every
/// row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_renamed_and_back_publishes_each_row_once() {
    let env = TestEnv::new("renamed-and-back", Mode::Replication).await;
    let name = env.relay_name();
    let other = format!("{name}b");
    let rename = |from: &str, to: &str| {
        env.replace_in_config(&format!("name: {from}\n"), &format!("name: {to}\n"))
    };
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let first = write_orders(&env.pool, 0, 10, 5).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;

    let backlog = write_orders(&env.pool, 1, 30, 5).await;
    rename(&name, &other);
    for _ in 0..2 {
        let relay = InProcessRelay::start(env.config());
        env.wait_all_sent(Duration::from_secs(60)).await;
        env.wait_streaming_as(&other, Duration::from_secs(60)).await;
        relay.stop().await.expect("relay stops cleanly");
    }
    rename(&other, &name);
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let after = write_orders(&env.pool, 2, 5, 5).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once(&env, &Written::combined([first, backlog, after])).await;
}

/// Where the slot was moved, past the last checkpoint, while the relay was down.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotMoved {
    /// After the backlog was written: its stream can never carry those rows.
    PastTheBacklog,
    /// Before: its stream holds the backlog, which the start drains anyway.
    BeforeTheBacklog,
}

/// A relay streams and stops; a backlog is written, and `move_slot`
/// (statements taking the slot name as `$1`) moves the slot where `moved`
/// says. A restarted relay must publish the backlog from the table, without
/// replaying it through the catch-up filter, then stream what comes next,
/// exactly once.
async fn restart_after_the_slot_moved(name: &str, move_slot: &[&str], moved: SlotMoved) {
    let env = TestEnv::new(name, Mode::Replication).await;
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let streamed = write_orders(&env.pool, 0, 30, 5).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;

    let move_the_slot = || async {
        for statement in move_slot {
            sqlx::query(statement)
                .bind(env.slot_name())
                .execute(&env.pool)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
    };
    let while_down = match moved {
        SlotMoved::PastTheBacklog => {
            let while_down = write_orders(&env.pool, 1, 30, 5).await;
            // Read right after the backlog: other tests' WAL moves the
            // server's position on meanwhile, so "near the current WAL"
            // would not say whether the slot passed these rows. A slot is
            // advanced no further than the flushed WAL, and the test
            // stack commits asynchronously: wait until the backlog is flushed.
            let after_backlog: i64 = sqlx::query_scalar(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint",
            )
            .fetch_one(&env.pool)
            .await
            .expect("the WAL position");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let flushed: i64 = sqlx::query_scalar(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), '0/0')::bigint",
                )
                .fetch_one(&env.pool)
                .await
                .expect("the flushed WAL position");
                if flushed >= after_backlog {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the backlog's WAL was not flushed within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            move_the_slot().await;
            let (confirmed, _) = env.slot_positions().await;
            assert!(
                confirmed.expect("the slot exists") >= after_backlog,
                "the slot should now be past the rows written while the relay was down"
            );
            while_down
        }
        SlotMoved::BeforeTheBacklog => {
            move_the_slot().await;
            write_orders(&env.pool, 1, 300, 5).await
        }
    };

    let relay = InProcessRelay::start(env.config());
    env.wait_all_sent(Duration::from_secs(60)).await;
    env.wait_streaming(Duration::from_secs(60)).await;
    let after = write_orders(&env.pool, 2, 10, 5).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    let filtered = sum(
        &relay.metrics.encode(),
        "outboxd_stage_seconds",
        Some(("stage", "catch_up_filter")),
    );
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once(&env, &Written::combined([streamed, while_down, after])).await;
    assert_eq!(
        filtered, 0.0,
        "the stream replayed {filtered} batch(es) of drained rows through the catch-up filter"
    );
}

/// The stream starts past its slot's position only on the server that
/// position was read on. With the timeline it was read on, a transaction
/// committed before it is not sent; with another one (a failover between
/// the read and the start), the stream starts at the slot's position and
/// carries it, for the catch-up filter to judge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_starts_past_its_slot_only_on_the_timeline_it_was_read_on() {
    use outboxd::capture::pgoutput::Message;
    use outboxd::capture::wire::{
        ReplicationStream, StartAt, StreamItem, StreamTarget, WireClient,
    };
    use outboxd::postgres::lsn::Lsn;

    let env = TestEnv::new("start-at-timeline", Mode::Replication).await;
    let slot = format!("start_at_{}", std::process::id());
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&slot)
        .execute(&env.pool)
        .await
        .expect("create a slot");
    // One committed row on each side of `past` (the simple workload rolls
    // one transaction in ten back, which would leave a side empty).
    let insert = "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                  VALUES ('Order', 'timeline', 'OrderCreated', '{}')";
    sqlx::raw_sql(insert)
        .execute(&env.pool)
        .await
        .expect("the row before");
    let past: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&env.pool)
        .await
        .expect("WAL position");
    let past: Lsn = past.parse().expect("an LSN");
    sqlx::raw_sql(insert)
        .execute(&env.pool)
        .await
        .expect("the row after");
    let mut connection = env.pool.acquire().await.expect("a connection");
    let timeline = outboxd::postgres::current_timeline(&mut connection)
        .await
        .expect("the timeline");
    drop(connection);

    for (read_on, expect_skipped) in [(timeline + 1, false), (timeline, true)] {
        let target = StreamTarget {
            slot: slot.clone(),
            publication: env.config().postgres.publication.clone(),
            confirmed_flush: Lsn(0),
            start_at: Some(StartAt {
                lsn: past,
                timeline: read_on,
            }),
            application_name: format!("outboxd-{}", env.relay_name()),
        };
        let mut stream = WireClient::start(&env.database_url, &target)
            .await
            .expect("start streaming");
        // The first transaction sent: the one before `past`, or the one after.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let first_commit = loop {
            let item = tokio::time::timeout_at(deadline, stream.next())
                .await
                .expect("a transaction within 30 s")
                .expect("the stream")
                .expect("the stream goes on");
            if let StreamItem::Message(Message::Begin { final_lsn, .. }) = item {
                break final_lsn;
            }
        };
        assert_eq!(
            first_commit >= past,
            expect_skipped,
            "read on timeline {read_on}, server on {timeline}: the first transaction sent \
             commits at {first_commit}, the start was {past}"
        );
        stream.close().await;
        // The next start would find the slot still held by this stream's
        // walsender, which exits a moment after its client.
        env.wait_slot_released(&slot, Duration::from_secs(30)).await;
    }
    env.drop_slot_when_released(&slot).await;
}

/// Opens a transaction that runs `sql` with `seqs` as `$1` (taking row
/// locks on them) and keeps it open. Gives up after 5 s rather than queue
/// behind the relay's own claim.
async fn hold_locked(
    env: &TestEnv,
    sql: &str,
    seqs: &[i64],
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut transaction = env.pool.begin().await.expect("begin");
    sqlx::raw_sql("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *transaction)
        .await
        .expect("lock_timeout");
    sqlx::query(sql)
        .bind(seqs)
        .execute(&mut *transaction)
        .await
        .unwrap_or_else(|e| {
            panic!("locking rows {seqs:?} ({e}): did the drain claim them before the test could?")
        });
    transaction
}

async fn wait_until_sent_at_least(env: &TestEnv, rows: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while sent_count(env).await < rows {
        assert!(
            Instant::now() < deadline,
            "fewer than {rows} rows sent after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_until_unsent_at_most(env: &TestEnv, rows: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let unsent = env.unsent().await;
        if unsent <= rows {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{unsent} rows still unsent after {limit:?}, expected at most {rows}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
