//! The WAL-message outbox (`capture.source: messages`) against the real
//! servers: services write events with `outboxd_emit` (a transactional
//! `pg_logical_emit_message`), no outbox row at all, and the relay
//! publishes each committed one exactly once, in commit order.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::support::kafka::{read_all, read_topic, Consumed};
use crate::support::{InProcessRelay, Mode, TestEnv};

/// A replication env turned into a message outbox: its own publication,
/// the prefix `outboxd`, migrated (function, publication, slot).
async fn message_env(name: &str) -> TestEnv {
    let env = TestEnv::new(name, Mode::Replication).await;
    env.replace_in_config("kafka:\n", "  publication: outboxd_messages\nkafka:\n");
    env.replace_in_config(
        "  batch_size: 100\n",
        "  batch_size: 100\n  source: messages\n  message_prefix: outboxd\n",
    );
    outboxd::migrate::apply_messages(&env.setup())
        .await
        .expect("migrate the message outbox");
    env
}

/// Emits one event per `n` in one transaction; commits unless `rollback`.
async fn emit(pool: &PgPool, aggregate: &str, ns: &[i64], rollback: bool) -> Vec<String> {
    let mut transaction = pool.begin().await.expect("begin");
    // Serialises one aggregate's writers, as an update of its row would.
    sqlx::query(
        "INSERT INTO aggregates (id, version) VALUES ($1, 0) \
         ON CONFLICT (id) DO UPDATE SET version = aggregates.version + 1",
    )
    .bind(aggregate)
    .execute(&mut *transaction)
    .await
    .expect("lock the aggregate");
    let mut ids = Vec::new();
    for n in ns {
        let id: String = sqlx::query_scalar(
            "SELECT outboxd_emit('Order', $1, 'OrderChanged', jsonb_build_object('n', $2::bigint))::text",
        )
        .bind(aggregate)
        .bind(n)
        .fetch_one(&mut *transaction)
        .await
        .expect("emit");
        ids.push(id);
        // Other prefixes ride along and are ignored.
        sqlx::query("SELECT pg_logical_emit_message(true, 'someone-else', 'x')")
            .execute(&mut *transaction)
            .await
            .expect("emit another prefix");
    }
    if rollback {
        transaction.rollback().await.expect("rollback");
        Vec::new()
    } else {
        transaction.commit().await.expect("commit");
        ids
    }
}

/// Writes `transactions` transactions over 4 aggregates from 4 writers,
/// every third rolled back, some with two events; returns each
/// aggregate's committed `n`s in commit order and every committed id.
async fn write(
    pool: &PgPool,
    round: i64,
    transactions: i64,
) -> (HashMap<String, Vec<i64>>, Vec<String>) {
    let mut tasks = Vec::new();
    for writer in 0..4 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let aggregate = format!("o-{writer}");
            let mut ns = Vec::new();
            let mut ids = Vec::new();
            for t in 0..transactions {
                let base = round * 1_000_000 + t * 10;
                let batch: Vec<i64> = if t % 5 == 0 {
                    vec![base, base + 1]
                } else {
                    vec![base]
                };
                let rollback = t % 3 == 2;
                let written = emit(&pool, &aggregate, &batch, rollback).await;
                if !rollback {
                    ns.extend(&batch);
                    ids.extend(written);
                }
            }
            (aggregate, ns, ids)
        }));
    }
    let mut by_aggregate = HashMap::new();
    let mut all_ids = Vec::new();
    for task in tasks {
        let (aggregate, ns, ids) = task.await.expect("writer");
        by_aggregate.insert(aggregate, ns);
        all_ids.extend(ids);
    }
    (by_aggregate, all_ids)
}

/// The events published so far (not dead letters), once `expected` are
/// there and a second read a moment later finds no more.
async fn published(env: &TestEnv, expected: usize, limit: Duration) -> Vec<Consumed> {
    let started = Instant::now();
    loop {
        let records: Vec<Consumed> = read_all(&env.kafka, &env.topic_prefix())
            .await
            .into_iter()
            .filter(|r| r.topic != env.dead_letter_topic())
            .collect();
        if records.len() >= expected {
            tokio::time::sleep(Duration::from_secs(2)).await;
            return read_all(&env.kafka, &env.topic_prefix())
                .await
                .into_iter()
                .filter(|r| r.topic != env.dead_letter_topic())
                .collect();
        }
        assert!(
            started.elapsed() < limit,
            "only {} of {expected} events published after {limit:?}",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every committed event once, none from a rolled-back transaction, and
/// each aggregate's events in commit order on its partition.
fn assert_exactly_once_in_order(
    records: &[Consumed],
    ids: &[String],
    order: &HashMap<String, Vec<i64>>,
) {
    let mut seen = HashSet::new();
    for record in records {
        let id = record.header("id").expect("id header").to_string();
        assert!(seen.insert(id.clone()), "event {id} published twice");
    }
    let expected: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        seen, expected,
        "published events differ from the committed ones"
    );
    let mut by_aggregate: HashMap<String, Vec<(i32, i64, i64)>> = HashMap::new();
    for record in records {
        let key = String::from_utf8(record.key.clone().expect("key")).expect("utf-8 key");
        let n = record.payload_json()["n"].as_i64().expect("n");
        by_aggregate
            .entry(key)
            .or_default()
            .push((record.partition, record.offset, n));
    }
    for (aggregate, mut events) in by_aggregate {
        let partitions: HashSet<i32> = events.iter().map(|e| e.0).collect();
        assert_eq!(partitions.len(), 1, "{aggregate} spans partitions");
        events.sort();
        let ns: Vec<i64> = events.iter().map(|e| e.2).collect();
        assert_eq!(&ns, &order[&aggregate], "{aggregate} out of commit order");
    }
}

async fn drop_slot(env: &TestEnv) {
    let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(env.slot_name())
        .execute(&env.pool)
        .await;
}

fn merge(
    mut into: (HashMap<String, Vec<i64>>, Vec<String>),
    more: (HashMap<String, Vec<i64>>, Vec<String>),
) -> (HashMap<String, Vec<i64>>, Vec<String>) {
    for (aggregate, ns) in more.0 {
        into.0.entry(aggregate).or_default().extend(ns);
    }
    into.1.extend(more.1);
    into
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_are_published_exactly_once_in_commit_order() {
    let env = message_env("wal-msg-order").await;
    // Written before the relay ever ran: the slot migrate created holds them.
    let before = write(&env.pool, 0, 9).await;
    let relay = InProcessRelay::start(env.config());
    let during = write(&env.pool, 1, 30).await;
    let (order, ids) = merge(before, during);
    let records = published(&env, ids.len(), Duration::from_secs(90)).await;
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once_in_order(&records, &ids, &order);
    let first = &records[0];
    assert_eq!(first.header("type"), Some("OrderChanged"));
    // `status` names the message outbox and the checkpoint's position.
    let status = outboxd::status::read(&env.setup()).await.expect("status");
    assert_eq!(status.table, "messages:outboxd");
    let checkpoint = status.last_checkpoint.expect("a checkpoint");
    assert!(
        checkpoint.position.is_some(),
        "the checkpoint names a stream position"
    );

    // A restart publishes nothing again, and the next events once.
    let relay = InProcessRelay::start(env.config());
    let after = write(&env.pool, 2, 3).await;
    let (order, ids) = merge((order, ids), after);
    let records = published(&env, ids.len(), Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once_in_order(&records, &ids, &order);
    drop_slot(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_after_the_kafka_commit_and_restarted_publishes_nothing_twice() {
    let env = message_env("wal-msg-kill").await;
    let mut written = write(&env.pool, 0, 12).await;
    for kill in 1..=3 {
        if kill > 1 {
            // Something new to publish, so this run reaches a commit too.
            written = merge(written, write(&env.pool, kill, 6).await);
        }
        // Dies right after its first Kafka commit: the slot is not
        // confirmed, so the restart replays that batch and the checkpoint
        // must skip it.
        let mut relay = env.spawn_relay_process_with(&[("OUTBOXD_KILL_AT", "after-commit")]);
        let status = tokio::task::spawn_blocking(move || relay.wait())
            .await
            .expect("wait task")
            .expect("relay exits");
        assert!(
            !status.success(),
            "kill {kill}: the relay was killed at after-commit"
        );
    }
    let mut relay = env.spawn_relay_process();
    let (order, ids) = merge(written, write(&env.pool, 9, 12).await);
    let records = published(&env, ids.len(), Duration::from_secs(90)).await;
    crate::support::signal(&relay, "TERM");
    let status = relay.wait().expect("relay exits");
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    assert_exactly_once_in_order(&records, &ids, &order);
    drop_slot(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_and_non_transactional_messages_are_dead_lettered() {
    let env = message_env("wal-msg-poison").await;
    let relay = InProcessRelay::start(env.config());
    let mut transaction = env.pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_logical_emit_message(true, 'outboxd', 'not json at all')")
        .execute(&mut *transaction)
        .await
        .expect("emit bad content");
    sqlx::query(
        "SELECT pg_logical_emit_message(true, 'outboxd', \
         '{\"v\":1,\"id\":\"bad-topic\",\"aggregatetype\":\"not a topic!\",\"aggregateid\":\"a\",\"type\":\"T\"}')",
    )
    .execute(&mut *transaction)
    .await
    .expect("emit unroutable");
    transaction.commit().await.expect("commit");
    // Outside any transaction: it would be written even on rollback.
    sqlx::query(
        "SELECT pg_logical_emit_message(false, 'outboxd', \
         '{\"v\":1,\"id\":\"loose\",\"aggregatetype\":\"Order\",\"aggregateid\":\"a\",\"type\":\"T\",\"payload\":{}}')",
    )
    .execute(&env.pool)
    .await
    .expect("emit non-transactional");
    let (order, ids) = write(&env.pool, 0, 3).await;
    let records = published(&env, ids.len(), Duration::from_secs(60)).await;
    assert_exactly_once_in_order(&records, &ids, &order);

    let started = Instant::now();
    let dead = loop {
        let dead = read_topic(&env.kafka, &env.dead_letter_topic()).await;
        if dead.len() >= 3 || started.elapsed() > Duration::from_secs(30) {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    relay.stop().await.expect("relay stops cleanly");
    let reason = |find: &dyn Fn(&Consumed) -> bool| {
        dead.iter()
            .find(|r| find(r))
            .and_then(|r| r.header("outboxd.dead_letter.reason"))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("dead letter missing in {dead:?}"))
    };
    let bad = reason(&|r| r.payload.as_deref() == Some(b"not json at all"));
    assert!(bad.contains("bad message encoding"), "{bad}");
    let unroutable = reason(&|r| r.header("id") == Some("bad-topic"));
    assert!(unroutable.contains("unroutable"), "{unroutable}");
    let loose = reason(&|r| r.header("id") == Some("loose"));
    assert!(loose.contains("non-transactional message"), "{loose}");
    assert_eq!(dead.len(), 3, "each poison message once: {dead:?}");
    drop_slot(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_slot_is_refused_by_the_relay_and_check() {
    let env = message_env("wal-msg-lost").await;
    let relay = InProcessRelay::start(env.config());
    let (_, ids) = write(&env.pool, 0, 3).await;
    published(&env, ids.len(), Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;

    // Dropped while the relay is down, and messages written meanwhile.
    drop_slot(&env).await;
    write(&env.pool, 1, 3).await;
    let refused = InProcessRelay::start(env.config())
        .finished(Duration::from_secs(60))
        .await
        .expect_err("a lost slot stops the relay");
    assert_eq!(refused.cause, outboxd::Cause::SlotLost, "{refused}");
    assert!(
        refused.message.contains("is gone") && refused.message.contains("may be lost"),
        "{refused}"
    );
    let slot_finding = |findings: &[outboxd::check::Finding]| {
        findings
            .iter()
            .find(|f| f.subject == "slot")
            .map(|f| (f.status, f.detail.clone()))
            .expect("a slot finding")
    };
    let findings = outboxd::check::run(&env.setup()).await;
    let (status, text) = slot_finding(&findings);
    assert_eq!(status, outboxd::check::Status::Failed, "{text}");

    // Created again: confirmed past the checkpoint, still refused, naming
    // the position to accept.
    outboxd::migrate::apply_messages(&env.setup())
        .await
        .expect("migrate creates the slot again");
    let refused = InProcessRelay::start(env.config())
        .finished(Duration::from_secs(60))
        .await
        .expect_err("a slot past the checkpoint stops the relay");
    assert_eq!(refused.cause, outboxd::Cause::SlotLost, "{refused}");
    let accept = refused
        .message
        .split("accept_message_loss_through: '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("no position to accept in: {refused}"))
        .to_string();
    let (_, text) = slot_finding(&outboxd::check::run(&env.setup()).await);
    assert!(text.contains("past the last published position"), "{text}");

    // Accepted: the relay streams again and publishes what comes next.
    env.replace_in_config(
        "  source: messages\n",
        &format!("  source: messages\n  accept_message_loss_through: '{accept}'\n"),
    );
    let relay = InProcessRelay::start(env.config());
    let (_, later) = write(&env.pool, 2, 3).await;
    let records = published(&env, ids.len() + later.len(), Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    let published_ids: HashSet<&str> = records.iter().filter_map(|r| r.header("id")).collect();
    for id in later.iter().chain(&ids) {
        assert!(published_ids.contains(id.as_str()), "{id} not published");
    }
    drop_slot(&env).await;
}

/// Whether the transaction that ends the env's slot's stream so far
/// commits at exactly `lsn`: pgoutput's Begin carries the commit record's
/// start (`final_lsn`), peeked without consuming while no relay streams.
async fn next_commit_starts_at(env: &TestEnv, lsn: &str) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', 'outboxd_messages', 'messages', 'true') \
         WHERE get_byte(data, 0) = 66 \
           AND ('x' || encode(substring(data from 2 for 8), 'hex'))::bit(64)::bigint \
               = pg_wal_lsn_diff($2::pg_lsn, '0/0')::bigint)",
    )
    .bind(env.slot_name())
    .bind(lsn)
    .fetch_one(&env.pool)
    .await
    .expect("peek the slot")
}

/// A non-transactional message ends where the next WAL record starts, so
/// a transaction whose commit record follows it directly commits at the
/// message's own LSN. Its first event must not take the message's place
/// in the stream: a checkpoint naming the message would skip it on a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_right_after_a_non_transactional_message_is_not_skipped() {
    let env = message_env("wal-msg-adjacent").await;
    // One event per Kafka transaction: the non-transactional message gets
    // a checkpoint of its own.
    env.replace_in_config("  batch_size: 100\n", "  batch_size: 1\n");
    let mut expected = Vec::new();
    let mut loose = Vec::new();
    // Other sessions' WAL may fall between the two records; try again
    // until the commit follows the message directly.
    let mut adjacent = None;
    for attempt in 0..200 {
        let mut service = env.pool.begin().await.expect("begin");
        let id: String = sqlx::query_scalar(
            "SELECT outboxd_emit('Order', 'adjacent', 'OrderChanged', jsonb_build_object('n', $1::int))::text",
        )
        .bind(attempt + 1)
        .fetch_one(&mut *service)
        .await
        .expect("emit");
        let loose_id = format!("loose-{attempt}");
        let message_lsn: String = sqlx::query_scalar(
            "SELECT pg_logical_emit_message(false, 'outboxd', jsonb_build_object('v', 1, \
             'id', $1::text, 'aggregatetype', 'Order', 'aggregateid', 'loose', 'type', 'T', \
             'payload', '{}'::jsonb)::text)::text",
        )
        .bind(&loose_id)
        .fetch_one(&env.pool)
        .await
        .expect("emit non-transactional");
        service.commit().await.expect("commit");
        expected.push(id);
        loose.push(loose_id);
        if next_commit_starts_at(&env, &message_lsn).await {
            adjacent = Some(attempt);
            break;
        }
    }
    let attempt = adjacent.expect("a commit record right after the non-transactional message");
    // Stream order: each attempt's message, then its transaction. Dies
    // right after the Kafka commit of the adjacent attempt's message.
    let kill_at = format!("after-commit:{}", 2 * attempt + 1);
    let mut relay = env.spawn_relay_process_with(&[("OUTBOXD_KILL_AT", &kill_at)]);
    let status = tokio::task::spawn_blocking(move || relay.wait())
        .await
        .expect("wait task")
        .expect("relay exits");
    assert!(!status.success(), "the relay was killed at {kill_at}");

    // Restarted, with one more event behind: once that is in Kafka, so is
    // everything committed before it.
    let mut relay = env.spawn_relay_process();
    let (_, later) = write(&env.pool, 1, 1).await;
    let mut records = published(&env, 1, Duration::from_secs(60)).await;
    let started = Instant::now();
    while !records
        .iter()
        .any(|r| r.header("id") == Some(later[0].as_str()))
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the last event was not published"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        records = published(&env, 1, Duration::from_secs(60)).await;
    }
    crate::support::signal(&relay, "TERM");
    assert!(relay.wait().expect("relay exits").success());
    let published_ids: Vec<&str> = records.iter().filter_map(|r| r.header("id")).collect();
    for id in expected.iter().chain(&later) {
        assert_eq!(
            published_ids.iter().filter(|p| **p == id.as_str()).count(),
            1,
            "event {id} must be published exactly once: {published_ids:?}"
        );
    }
    let dead = read_topic(&env.kafka, &env.dead_letter_topic()).await;
    let dead_ids: Vec<&str> = dead.iter().filter_map(|r| r.header("id")).collect();
    for id in &loose {
        assert_eq!(
            dead_ids.iter().filter(|d| **d == id.as_str()).count(),
            1,
            "the non-transactional message {id} is dead-lettered once: {dead_ids:?}"
        );
    }
    drop_slot(&env).await;
}

/// The ids of the events in Kafka (not dead letters).
async fn ids_published(env: &TestEnv) -> HashSet<String> {
    read_all(&env.kafka, &env.topic_prefix())
        .await
        .into_iter()
        .filter(|r| r.topic != env.dead_letter_topic())
        .filter_map(|r| r.header("id").map(str::to_string))
        .collect()
}

/// An asynchronous standby (here: the wait for it turned off) is promoted
/// without the last transaction the relay published; its WAL goes on from
/// where the standby stopped, behind the checkpoint's position. The slot
/// is gone, so the relay refuses; the operator follows
/// docs/wal-messages.md (create the slot again, start, accept the position
/// it names). Every message the promoted server commits from then on must
/// be published: none may be taken for one the checkpoint names because
/// its commit LSN is at or below the position published on the old
/// timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_failover_to_a_lagging_standby_new_messages_are_not_skipped() {
    use crate::support::pg_pair::PgPair;
    let mut pair = PgPair::start("msg-lagging").await;
    let mut env = TestEnv::new_on(&pair.primary_url, "wal-msg-lagging", Mode::Replication).await;
    env.use_messages().await;
    let no_wait = |env: &TestEnv| {
        env.replace_in_config(
            "  source: messages\n",
            "  source: messages\n  wait_for_sync_standbys: false\n",
        )
    };
    no_wait(&env);
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let (_, before) = write(&env.pool, 0, 3).await;
    published(&env, before.len(), Duration::from_secs(60)).await;

    // The standby stops receiving; a big transaction with one event
    // commits on the primary (its COMMIT waits for the standby, but the
    // relay does not) and is published.
    pair.stop_standby().await;
    let writer = {
        let pool = env.pool.clone();
        tokio::spawn(async move {
            let mut transaction = pool.begin().await?;
            sqlx::query(
                "SELECT pg_logical_emit_message(true, 'filler', repeat('x', 8 * 1024 * 1024))",
            )
            .execute(&mut *transaction)
            .await?;
            let id: String = sqlx::query_scalar(
                "SELECT outboxd_emit('Order', 'held', 'OrderChanged', '{\"n\": -1}')::text",
            )
            .fetch_one(&mut *transaction)
            .await?;
            transaction.commit().await?;
            Ok::<String, sqlx::Error>(id)
        })
    };
    let started = Instant::now();
    while ids_published(&env).await.len() < before.len() + 1 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the held transaction was not published with the wait turned off"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    relay.stop().await.expect("relay stops cleanly");
    pair.crash_primary().await;
    let _ = tokio::time::timeout(Duration::from_secs(30), writer).await;
    pair.start_standby().await;
    pair.promote().await;
    env.move_to(&pair.primary_url).await;
    no_wait(&env);

    // The promoted server has no slot: refused, as documented.
    let refused = InProcessRelay::start(env.config())
        .finished(Duration::from_secs(60))
        .await
        .expect_err("the lost slot stops the relay");
    assert_eq!(refused.cause, outboxd::Cause::SlotLost, "{refused}");
    // The operator creates the slot again and starts the relay. The slot
    // lies past where this server's timeline forked from the checkpoint's,
    // and messages may have committed in between: refused once more,
    // naming the slot's position (not streamed over the old checkpoint's
    // position, which here names other transactions).
    outboxd::migrate::apply_messages(&env.setup())
        .await
        .expect("migrate creates the slot again");
    let refused = InProcessRelay::start(env.config())
        .finished(Duration::from_secs(60))
        .await
        .expect_err("a slot past the fork is refused");
    assert_eq!(refused.cause, outboxd::Cause::SlotLost, "{refused}");
    let accept = refused
        .message
        .split("accept_message_loss_through: '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("no position to accept in: {refused}"))
        .to_string();
    env.replace_in_config(
        "  source: messages\n",
        &format!("  source: messages\n  accept_message_loss_through: '{accept}'\n"),
    );
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    // The promoted server's commits from now on: each must reach Kafka.
    let (_, after) = write(&env.pool, 1, 3).await;
    let started = Instant::now();
    let missing = loop {
        let in_kafka = ids_published(&env).await;
        let missing: Vec<&String> = after.iter().filter(|id| !in_kafka.contains(*id)).collect();
        if missing.is_empty() || started.elapsed() > Duration::from_secs(30) {
            break missing.len();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    relay.stop().await.expect("relay stops cleanly");
    assert_eq!(
        missing,
        0,
        "{missing} of {} events the promoted server committed after the relay started were \
         never published",
        after.len()
    );
}

/// docs/wal-messages.md: a change of the relay's Kafka identity (here the
/// `pg_control_system()` grant taken away) publishes again only "the
/// batches the old identity had published but not yet confirmed". With
/// every batch confirmed and the relay stopped cleanly, nothing may be
/// published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_change_after_a_clean_stop_publishes_nothing_twice() {
    let env = message_env("wal-msg-identity").await;
    let role = env.relay_without_pg_control_system().await;
    env.grant_pg_control_system(&role).await;
    let relay = InProcessRelay::start(env.config());
    let written = write(&env.pool, 0, 3).await;
    published(&env, written.1.len(), Duration::from_secs(60)).await;
    // Every batch acknowledged: the slot confirmed inside the commit of the
    // last checkpoint's position, as far as it ever is.
    wait_slot_confirmed_through_last_checkpoint(&env, Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;

    env.revoke_pg_control_system(&role).await;
    let relay = InProcessRelay::start(env.config());
    let (order, ids) = merge(written, write(&env.pool, 1, 1).await);
    let records = published(&env, ids.len(), Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once_in_order(&records, &ids, &order);
    drop_slot(&env).await;
}

/// Waits until the slot is confirmed inside the commit record of the
/// latest checkpoint's position: everything published is acknowledged.
async fn wait_slot_confirmed_through_last_checkpoint(env: &TestEnv, limit: Duration) {
    let started = Instant::now();
    loop {
        // Every identity's checkpoints of this outbox in the env's topic.
        let last = crate::support::kafka::read_topic(&env.kafka, &env.checkpoint_topic())
            .await
            .iter()
            .filter_map(|record| record.payload.as_deref())
            .filter_map(|bytes| outboxd::kafka::checkpoint::Record::from_bytes(bytes).ok())
            .filter_map(|record| match record {
                outboxd::kafka::checkpoint::Record::Checkpoint(checkpoint)
                    if checkpoint.table == "messages:outboxd" =>
                {
                    checkpoint.position
                }
                _ => None,
            })
            .max();
        let (confirmed, _) = env.slot_positions().await;
        if let (Some(last), Some(confirmed)) = (last, confirmed) {
            if confirmed as u64 > last.commit_lsn.0 {
                return;
            }
        }
        assert!(
            started.elapsed() < limit,
            "slot confirmed to {confirmed:?}, not inside the last checkpoint's commit {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Two failovers in a row, the relay down during both. The old primary,
/// with everything the relay published, is promoted (timeline 2, forking
/// from 1 past the checkpoint); the lagging standby learns of timeline 2
/// (its history file, as from a shared WAL archive) while still behind
/// the checkpoint and is promoted before catching up (timeline 3, forking
/// from 2 below the checkpoint). Timeline 3 shares timeline 1's history
/// only up to the later fork, though timeline 1's own switchpoint lies
/// past the checkpoint: every message the new primary commits from then
/// on must be published, none taken for one the checkpoint names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_two_failovers_the_second_from_behind_the_checkpoint_new_messages_are_not_skipped() {
    use crate::support::pg_pair::PgPair;
    let mut pair = PgPair::start("msg-two-forks").await;
    let mut env = TestEnv::new_on(&pair.primary_url, "wal-msg-two-forks", Mode::Replication).await;
    env.use_messages().await;
    let no_wait = |env: &TestEnv| {
        env.replace_in_config(
            "  source: messages\n",
            "  source: messages\n  wait_for_sync_standbys: false\n",
        )
    };
    no_wait(&env);
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let (_, before) = write(&env.pool, 0, 3).await;
    published(&env, before.len(), Duration::from_secs(60)).await;

    // The standby stops (at Q); a big transaction with one event commits
    // on the primary and is published: the checkpoint lies 8 MB past Q.
    pair.stop_standby().await;
    let writer = {
        let pool = env.pool.clone();
        tokio::spawn(async move {
            let mut transaction = pool.begin().await?;
            sqlx::query(
                "SELECT pg_logical_emit_message(true, 'filler', repeat('x', 8 * 1024 * 1024))",
            )
            .execute(&mut *transaction)
            .await?;
            let id: String = sqlx::query_scalar(
                "SELECT outboxd_emit('Order', 'held', 'OrderChanged', '{\"n\": -1}')::text",
            )
            .fetch_one(&mut *transaction)
            .await?;
            transaction.commit().await?;
            Ok::<String, sqlx::Error>(id)
        })
    };
    let started = Instant::now();
    while ids_published(&env).await.len() < before.len() + 1 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the held transaction was not published with the wait turned off"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    relay.stop().await.expect("relay stops cleanly");
    pair.crash_primary().await;
    let _ = tokio::time::timeout(Duration::from_secs(30), writer).await;
    // Failover one: the old primary itself comes back as timeline 2, with
    // everything (its fork lies past the checkpoint), and fails again.
    pair.fork_crashed_primary().await;
    // Failover two: the standby, still at Q, follows timeline 2 and is
    // promoted before it fetched anything more: timeline 3 forks at Q.
    pair.start_standby().await;
    pair.promote().await;
    env.move_to(&pair.primary_url).await;
    no_wait(&env);

    // No slot on the new primary: refused; the operator creates it again
    // and starts the relay, accepting the position it names if refused.
    let refused = InProcessRelay::start(env.config())
        .finished(Duration::from_secs(60))
        .await
        .expect_err("the lost slot stops the relay");
    assert_eq!(refused.cause, outboxd::Cause::SlotLost, "{refused}");
    outboxd::migrate::apply_messages(&env.setup())
        .await
        .expect("migrate creates the slot again");
    let relay = InProcessRelay::start(env.config());
    let started = Instant::now();
    let relay = loop {
        if relay.is_finished() {
            let refused = relay
                .finished(Duration::from_secs(5))
                .await
                .expect_err("a relay that ended by itself was refused");
            assert_eq!(refused.cause, outboxd::Cause::SlotLost, "{refused}");
            let accept = refused
                .message
                .split("accept_message_loss_through: '")
                .nth(1)
                .and_then(|rest| rest.split('\'').next())
                .unwrap_or_else(|| panic!("no position to accept in: {refused}"))
                .to_string();
            env.replace_in_config(
                "  source: messages\n",
                &format!("  source: messages\n  accept_message_loss_through: '{accept}'\n"),
            );
            let relay = InProcessRelay::start(env.config());
            env.wait_streaming(Duration::from_secs(60)).await;
            break relay;
        }
        let streaming: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_replication \
             WHERE application_name = $1 AND state IN ('catchup', 'streaming'))",
        )
        .bind(format!("outboxd-{}", env.relay_name()))
        .fetch_one(&env.pool)
        .await
        .expect("read pg_stat_replication");
        if streaming {
            break relay;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the relay neither streamed nor stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The new primary's commits from now on (below the old checkpoint's
    // commit LSN, which timeline 3 never had): each must reach Kafka.
    let (_, after) = write(&env.pool, 1, 3).await;
    let started = Instant::now();
    let missing = loop {
        let in_kafka = ids_published(&env).await;
        let missing: Vec<&String> = after.iter().filter(|id| !in_kafka.contains(*id)).collect();
        if missing.is_empty() || started.elapsed() > Duration::from_secs(30) {
            break missing.len();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    relay.stop().await.expect("relay stops cleanly");
    assert_eq!(
        missing,
        0,
        "{missing} of {} events the new primary committed after the relay started were never \
         published",
        after.len()
    );
}

/// PostgreSQL 17+ (failover slots; `make test-pg PG=17` runs it). A
/// failover to a standby that had everything: a new timeline that forks
/// past the checkpoint, with the relay's slot synchronised. The relay must
/// stream on from that slot without a refusal, publishing nothing twice
/// and every message the new primary commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL 17+ (failover slots): make test-pg PG=17 or PG=18 runs it"]
async fn after_a_failover_to_a_standby_with_everything_the_synced_slot_streams_on_exactly_once() {
    use crate::support::pg_pair::{PairOption, PgPair};
    let mut pair = PgPair::start_with("msg-ahead", &[PairOption::FailoverSlots]).await;
    let mut env = TestEnv::new_on(&pair.primary_url, "wal-msg-ahead", Mode::Replication).await;
    env.use_messages().await;
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let mut before = write(&env.pool, 0, 5).await;
    // A slot's first synchronisation waits until the primary's copy moves
    // past what the standby holds, and a message slot moves only with
    // published messages: keep them coming until the standby's copy is
    // no longer temporary.
    let standby = sqlx::PgPool::connect(pair.standby())
        .await
        .expect("standby");
    let started = Instant::now();
    let mut round = 10;
    loop {
        let persisted: Option<bool> = sqlx::query_scalar(
            "SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(env.slot_name())
        .fetch_optional(&standby)
        .await
        .expect("read the standby's slots");
        if persisted == Some(true) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the standby never persisted the synchronised slot ({persisted:?})"
        );
        before = merge(before, write(&env.pool, round, 1).await);
        round += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    published(&env, before.1.len(), Duration::from_secs(60)).await;
    wait_slot_confirmed_through_last_checkpoint(&env, Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    env.wait_slot_inactive(Duration::from_secs(30)).await;
    let (confirmed, _) = env.slot_positions().await;
    let confirmed = confirmed.expect("the slot is confirmed");
    let started = Instant::now();
    loop {
        let synced: Option<bool> = sqlx::query_scalar(
            "SELECT synced AND NOT temporary AND confirmed_flush_lsn >= $2::text::pg_lsn \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(env.slot_name())
        .bind(format!(
            "{:X}/{:X}",
            (confirmed as u64) >> 32,
            (confirmed as u64) & 0xFFFF_FFFF
        ))
        .fetch_optional(&standby)
        .await
        .expect("read the standby's slots");
        if synced == Some(true) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the standby did not synchronise the slot ({synced:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    standby.close().await;
    pair.crash_primary().await;
    pair.promote().await;
    env.move_to(&pair.primary_url).await;

    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let (order, ids) = merge(before, write(&env.pool, 1000, 3).await);
    let records = published(&env, ids.len(), Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once_in_order(&records, &ids, &order);
}
