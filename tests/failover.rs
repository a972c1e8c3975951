//! The Postgres primary fails over under the relay (issue 21): a primary
//! with a synchronous standby of its own (`support::pg_pair`), the relay
//! streaming from the primary with `capture.wait_for_sync_standbys` on.
//!
//! What must hold: an event whose row the standby lacks is never published
//! (the commit is in the primary's WAL, so logical decoding streams it,
//! while the writer's COMMIT still waits for the standby), so after the
//! standby is promoted Kafka holds nothing the new primary lacks, and every
//! row it has is published exactly once.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use crate::shipped_examples::role_script;
use crate::support::checker;
use crate::support::kafka::read_all;
use crate::support::pg_pair::{PairOption, PgPair};
use crate::support::workload::{write_orders, write_orders_concurrently, Written};
use crate::support::{InProcessRelay, Mode, TestEnv};

/// A gauge of the relay's metrics, by name, if it has a value.
fn gauge(relay: &InProcessRelay, name: &str) -> Option<f64> {
    relay
        .metrics
        .encode()
        .lines()
        .find(|line| line.starts_with(&format!("{name}{{")))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Waits until `gauge` reads `value`, failing after `limit`.
async fn wait_gauge(relay: &InProcessRelay, name: &str, value: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while gauge(relay, name) != Some(value) {
        assert!(
            Instant::now() < deadline,
            "{name} did not reach {value} within {limit:?} (it reads {:?})",
            gauge(relay, name)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Event ids in the env's routed topics.
async fn ids_in_kafka(env: &TestEnv) -> Vec<String> {
    read_all(&env.kafka, &env.topic_prefix())
        .await
        .iter()
        .filter_map(|record| record.header("id").map(str::to_string))
        .collect()
}

/// `server_version_num` of the env's server.
async fn server_version(env: &TestEnv) -> i32 {
    let text: String = sqlx::query_scalar("SELECT current_setting('server_version_num')")
        .fetch_one(&env.pool)
        .await
        .expect("read the server version");
    text.parse().expect("a version number")
}

/// The slot's `failover` and `synced` flags (PostgreSQL 17+), if it exists.
async fn slot_flags(pool: &sqlx::PgPool, slot: &str) -> Option<(bool, bool)> {
    sqlx::query_as("SELECT failover, synced FROM pg_replication_slots WHERE slot_name = $1")
        .bind(slot)
        .fetch_optional(pool)
        .await
        .expect("read pg_replication_slots")
}

/// Inserts one row on a connection of its own and commits; resolves when
/// the COMMIT returns or fails.
fn spawn_writer(url: &str, id: &str) -> tokio::task::JoinHandle<Result<(), sqlx::Error>> {
    let url = url.to_string();
    let id = id.to_string();
    tokio::spawn(async move {
        let mut connection = PgConnection::connect(&url).await.expect("writer connects");
        sqlx::query(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
             VALUES ($1::uuid, 'Order', 'held-1', 'OrderCreated', \
                     '{\"aggregate\": \"held-1\", \"n\": 1}')",
        )
        .bind(id)
        .execute(&mut connection)
        .await
        .map(|_| ())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_flow_while_the_synchronous_standby_keeps_up() {
    let pair = PgPair::start("healthy").await;
    let env = TestEnv::new_on(&pair.primary_url, "sync-standby-healthy", Mode::Replication).await;
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;

    if server_version(&env).await >= 170_000 {
        // `slot::create` on 17+: a failover slot from the start.
        assert_eq!(
            slot_flags(&env.pool, &env.slot_name()).await,
            Some((true, false)),
            "the relay created its slot as a failover slot"
        );
    }

    let written = write_orders_concurrently(&env.pool, 3, 40, 4).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    // The gate was on and waited for the one synchronous standby, and
    // nothing is held now.
    assert_eq!(gauge(&relay, "outboxd_sync_standbys_required"), Some(1.0));
    assert_eq!(gauge(&relay, "outboxd_sync_standby_holding"), Some(0.0));
    relay.stop().await.expect("relay stops cleanly");
    checker::check(&env, &written).await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_the_standby_lacks_is_not_published_and_the_promoted_server_is_relayed_exactly_once(
) {
    let mut pair = PgPair::start("failover").await;
    let mut env = TestEnv::new_on(
        &pair.primary_url,
        "sync-standby-failover",
        Mode::Replication,
    )
    .await;
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let before = write_orders(&env.pool, 0, 20, 4).await;
    env.wait_all_sent(Duration::from_secs(60)).await;

    // The standby stalls. A row committed now is in the primary's WAL, so
    // logical decoding streams it, but its COMMIT waits for the standby
    // and never returns to the writer.
    pair.stop_standby().await;
    let held_id: String = sqlx::query_scalar("SELECT gen_random_uuid()::text")
        .fetch_one(&env.pool)
        .await
        .expect("an event id");
    let writer = {
        let url = env.database_url.clone();
        let id = held_id.clone();
        tokio::spawn(async move {
            let mut connection = PgConnection::connect(&url).await.expect("writer connects");
            sqlx::query(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
                 VALUES ($1::uuid, 'Order', 'held-1', 'OrderCreated', \
                         '{\"aggregate\": \"held-1\", \"n\": 1}')",
            )
            .bind(id)
            .execute(&mut connection)
            .await
            .map(|_| ())
        })
    };
    // The commit is in the WAL: the writer waits for the standby (SyncRep).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event = 'SyncRep' AND query LIKE 'INSERT INTO outbox%'",
        )
        .fetch_one(&env.pool)
        .await
        .expect("read pg_stat_activity");
        if waiting == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writer's COMMIT did not wait for the stopped standby"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The relay has the row from the stream and says it holds it back.
    wait_gauge(
        &relay,
        "outboxd_sync_standby_holding",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        gauge(&relay, "outboxd_sync_standby_lag_bytes").is_some_and(|lag| lag > 0.0),
        "a held batch shows how far the standby is behind"
    );
    assert!(
        !ids_in_kafka(&env).await.contains(&held_id),
        "the row whose commit the standby lacks reached Kafka"
    );

    // The primary dies before the standby has the row; the standby is
    // promoted without it.
    pair.crash_primary().await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer hears of the crash")
        .expect("writer task");
    assert!(
        outcome.is_err(),
        "the COMMIT returned although the standby never had it"
    );
    relay.stop().await.expect("relay stops cleanly");
    pair.start_standby().await;
    pair.promote().await;

    // The relay follows to the promoted server; writers go on there.
    env.move_to(&pair.primary_url).await;
    let lacks: bool =
        sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE id = $1::uuid)")
            .bind(&held_id)
            .fetch_one(&env.pool)
            .await
            .expect("look the held row up");
    assert!(lacks, "the promoted standby has the row it never received");
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let after = write_orders(&env.pool, 0, 20, 4).await;
    env.wait_all_sent(Duration::from_secs(90)).await;
    relay.stop().await.expect("relay stops cleanly");

    assert!(
        !ids_in_kafka(&env).await.contains(&held_id),
        "phantom: Kafka holds the event whose row the promoted server never had"
    );
    let mut written = Written::combined([before, after]);
    written.in_doubt_ids.push(held_id);
    // Nothing the promoted server lacks is in Kafka (a stranger), and every
    // row it has is there exactly once, in order per aggregate.
    checker::check(&env, &written).await.assert_clean();
}

/// `outboxd check` on `env`'s config: its exit status and what it printed.
fn check(env: &TestEnv) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["check", "--config"])
        .arg(&env.config_path)
        .output()
        .expect("run outboxd check");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_cannot_see_the_standbys_is_refused_by_check_and_by_the_relay() {
    let pair = PgPair::start("privileges").await;
    let env = TestEnv::new_on(
        &pair.primary_url,
        "sync-standby-privileges",
        Mode::Replication,
    )
    .await;
    let (passed, all) = check(&env);
    assert!(passed, "{all}");
    assert!(
        all.contains("[ok  ] standbys: synchronous_standby_names = 'standby1' (1 synchronous of 1 streaming)"),
        "{all}"
    );
    // Before 17 there are no failover slots, and check says what that
    // means; on 17+ this pair has no synchronized_standby_slots.
    if server_version(&env).await < 170_000 {
        assert!(
            all.contains("[warn] failover slot: PostgreSQL before 17 has no failover slots"),
            "{all}"
        );
    } else {
        assert!(
            all.contains("[warn] failover slot:")
                && all.contains("but synchronized_standby_slots is empty"),
            "{all}"
        );
    }

    // A least-privilege role made by the shipped replication.sql, with
    // replication but without pg_read_all_stats.
    sqlx::raw_sql(&format!(
        "CREATE ROLE relay_nostats LOGIN; {}",
        role_script("migrations/roles/replication.sql", "relay_nostats", "")
    ))
    .execute(&env.pool)
    .await
    .expect("create the relay's role");
    env.replace_in_config("postgres://postgres@", "postgres://relay_nostats@");
    let (passed, all) = check(&env);
    assert!(!passed, "{all}");
    assert!(
        all.contains("[FAIL] standbys:") && all.contains("GRANT pg_read_all_stats"),
        "{all}"
    );
    let relay = InProcessRelay::start(env.config());
    let error = relay
        .finished(Duration::from_secs(60))
        .await
        .expect_err("the relay stops rather than publish what a failover can take back");
    assert!(
        error.message.contains("pg_read_all_stats"),
        "{}",
        error.message
    );

    // The shipped sync-standbys.sql is what it lacks.
    sqlx::raw_sql(&role_script(
        "migrations/roles/sync-standbys.sql",
        "relay_nostats",
        "",
    ))
    .execute(&env.pool)
    .await
    .expect("grant pg_read_all_stats");
    let (passed, all) = check(&env);
    assert!(passed, "{all}");
}

/// PostgreSQL 17 and later only (failover slots): `make test-pg PG=17` (and
/// PG=18) runs it; `make test`, on Debian's 15, lists it as ignored, and
/// run on a server before 17 it fails (`pg-pair.sh up --failover-slots`
/// refuses). The pair as docs/design/exactly-once.md's "When the primary fails over" sets it
/// up: the standby synchronises failover slots through its physical slot,
/// and the primary's `synchronized_standby_slots` names that slot.
///
/// What must hold: the relay makes an existing slot a failover slot
/// (ALTER_REPLICATION_SLOT) and leaves the waiting to the server (no gate
/// of its own); the server does not decode a commit the standby lacks; the
/// promoted standby has the relay's slot, and a new relay streams on from
/// it (not from a new slot) with every row the promoted server has in
/// Kafka exactly once and nothing it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL 17+ (failover slots): make test-pg PG=17 or PG=18 runs it"]
async fn failover_slots_the_promoted_standby_keeps_the_slot_and_the_relay_streams_on_exactly_once()
{
    let mut pair = PgPair::start_with("failover-slots", &[PairOption::FailoverSlots]).await;
    let mut env = TestEnv::new_on(&pair.primary_url, "failover-slots", Mode::Replication).await;
    assert!(
        server_version(&env).await >= 170_000,
        "this test needs PostgreSQL 17 or later (OUTBOXD_PG_VERSION=17)"
    );
    // A slot from before this release (or made by hand): not a failover
    // slot. The relay makes it one before it streams.
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(env.slot_name())
        .execute(&env.pool)
        .await
        .expect("create a plain logical slot");
    assert_eq!(
        slot_flags(&env.pool, &env.slot_name()).await,
        Some((false, false))
    );
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    assert_eq!(
        slot_flags(&env.pool, &env.slot_name()).await,
        Some((true, false)),
        "the relay made its slot a failover slot (ALTER_REPLICATION_SLOT)"
    );
    // The server holds decoding back for the slot, so the relay does not.
    assert_eq!(gauge(&relay, "outboxd_sync_standbys_required"), Some(0.0));

    let before = write_orders(&env.pool, 0, 20, 4).await;
    env.wait_all_sent(Duration::from_secs(60)).await;

    // The standby has the slot, persisted (no longer temporary), as far as
    // the primary's copy had confirmed when we looked.
    let confirmed: String = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(env.slot_name())
    .fetch_one(&env.pool)
    .await
    .expect("the primary's slot position");
    let standby = sqlx::PgPool::connect(pair.standby())
        .await
        .expect("standby");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let synced: Option<bool> = sqlx::query_scalar(
            "SELECT synced AND NOT temporary AND confirmed_flush_lsn >= $2::pg_lsn \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(env.slot_name())
        .bind(&confirmed)
        .fetch_optional(&standby)
        .await
        .expect("read the standby's slots");
        if synced == Some(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby did not synchronise slot {} up to {confirmed} (it shows {synced:?})",
            env.slot_name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    standby.close().await;

    // The standby stops. A row committed now is in the primary's WAL, but
    // the walsender does not decode it for a failover slot until the
    // standby's slot has it (synchronized_standby_slots).
    pair.stop_standby().await;
    let held_id: String = sqlx::query_scalar("SELECT gen_random_uuid()::text")
        .fetch_one(&env.pool)
        .await
        .expect("an event id");
    let writer = spawn_writer(&env.database_url, &held_id);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (writer_waits, walsender_waits): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE wait_event = 'SyncRep' AND query LIKE 'INSERT INTO outbox%'), \
                    count(*) FILTER (WHERE backend_type = 'walsender' AND application_name = $1 \
                                     AND wait_event = 'WaitForStandbyConfirmation') \
             FROM pg_stat_activity",
        )
        .bind(format!("outboxd-{}", env.relay_name()))
        .fetch_one(&env.pool)
        .await
        .expect("read pg_stat_activity");
        if writer_waits == 1 && walsender_waits == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writer should wait for the stopped standby ({writer_waits}) and the relay's \
             walsender for its slot ({walsender_waits})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !ids_in_kafka(&env).await.contains(&held_id),
        "the row whose commit the standby lacks reached Kafka"
    );
    // Nothing held on the relay's side: the server did the holding.
    assert_eq!(gauge(&relay, "outboxd_sync_standby_holding"), Some(0.0));

    pair.crash_primary().await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer hears of the crash")
        .expect("writer task");
    assert!(
        outcome.is_err(),
        "the COMMIT returned although the standby never had it"
    );
    relay.stop().await.expect("relay stops cleanly");
    pair.start_standby().await;
    pair.promote().await;

    env.move_to(&pair.primary_url).await;
    let lacks: bool =
        sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE id = $1::uuid)")
            .bind(&held_id)
            .fetch_one(&env.pool)
            .await
            .expect("look the held row up");
    assert!(lacks, "the promoted standby has the row it never received");
    assert_eq!(
        slot_flags(&env.pool, &env.slot_name()).await,
        Some((true, true)),
        "the promoted standby has the relay's failover slot, synchronised from the primary"
    );

    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let after = write_orders(&env.pool, 0, 20, 4).await;
    env.wait_all_sent(Duration::from_secs(90)).await;
    relay.stop().await.expect("relay stops cleanly");
    // Still the synced slot: the relay streamed on from it rather than
    // dropping it and starting a new one (which would show synced = false).
    assert_eq!(
        slot_flags(&env.pool, &env.slot_name()).await,
        Some((true, true)),
        "the relay streamed from the synced slot"
    );

    assert!(
        !ids_in_kafka(&env).await.contains(&held_id),
        "phantom: Kafka holds the event whose row the promoted server never had"
    );
    let mut written = Written::combined([before, after]);
    written.in_doubt_ids.push(held_id);
    checker::check(&env, &written).await.assert_clean();
}
