//! Two relays with the same name never both publish: one leads, the other
//! waits as a standby and takes over; a zombie producer is fenced by Kafka
//! and its session ends (the next one must win the leader lock first).

use std::time::Duration;

use outboxd::error::ErrorKind;
use outboxd::kafka::checkpoint::Checkpoint;
use outboxd::kafka::identity::TableIdentity;
use outboxd::kafka::publisher::{PublishError, Publisher};
use outboxd::kafka::topics;
use outboxd::routing::RoutedRecord;
use sqlx::{Connection, PgConnection};

use crate::support::kafka::read_all;
use crate::support::workload::{assert_exactly_once, write_orders, Written};
use crate::support::{InProcessRelay, Mode, TestEnv};

async fn leader_count(env: &TestEnv) -> usize {
    let mut connection = PgConnection::connect(&env.database_url).await.unwrap();
    let holder = outboxd::leader::holder_pid(&mut connection, "public.outbox")
        .await
        .unwrap();
    usize::from(holder.is_some())
}

/// Sessions named after this relay that hold the table's leader lock (its
/// claim connections hold the claims lock, a different key).
async fn lock_holders(env: &TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1 \
         AND ((l.classid::bigint << 32) | l.objid::bigint) \
             = hashtextextended('outboxd:table:public.outbox', 0)",
    )
    .bind(format!("outboxd-{}", env.relay_name()))
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

in_both_modes!(
    same_name_relays_one_leads_the_other_takes_over,
    worker_threads = 4
);
async fn same_name_relays_one_leads_the_other_takes_over(mode: Mode) {
    let env = TestEnv::new("leader", mode).await;
    let first = InProcessRelay::start(env.config());
    let first_batch = write_orders(&env.pool, 0, 100, 5).await;
    env.wait_all_sent(Duration::from_secs(60)).await;

    let second = InProcessRelay::start(env.config());
    // Wait for the second instance to find the lock taken, not for a time.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while second.metrics.state() != outboxd::metrics::RelayState::Standby {
        assert!(
            std::time::Instant::now() < deadline,
            "the second instance never became a standby: {:?}",
            second.metrics.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        lock_holders(&env).await,
        1,
        "exactly one instance holds the leader lock"
    );
    assert_eq!(leader_count(&env).await, 1);

    let during = write_orders(&env.pool, 1, 100, 5).await;
    env.wait_all_sent(Duration::from_secs(60)).await;

    // The leader goes away; the standby must take over.
    first.stop().await.expect("first relay stops cleanly");
    let after = write_orders(&env.pool, 2, 100, 5).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    assert_eq!(lock_holders(&env).await, 1);
    second.stop().await.expect("second relay stops cleanly");

    let written = Written::combined([first_batch, during, after]);
    assert_exactly_once(&env, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_producer_is_fenced_and_ends_its_session() {
    let env = TestEnv::new("zombie", Mode::Polling).await;
    let config = env.config();
    topics::ensure_checkpoint_topic(&config).await.unwrap();
    let identity = TableIdentity::new(Some("test/zombie"), "public.outbox", &env.relay_name());
    let zombie = Publisher::connect(&config, &identity)
        .await
        .expect("first producer");
    let _successor = Publisher::connect(&config, &identity)
        .await
        .expect("second producer fences the first");

    let record = RoutedRecord {
        topic: format!("{}.Order", env.topic_prefix()).into(),
        key: Some(b"order-1"[..].into()),
        headers: vec![("id".into(), b"zombie-event"[..].into())],
        payload: Some(b"{}"[..].into()),
    };
    let outcome = zombie
        .publish(
            &[record],
            &Checkpoint::new("public.outbox", None, &[1], &[], None),
        )
        .await;
    match outcome {
        Err(PublishError::Failed(error)) => {
            assert_eq!(
                error.kind,
                ErrorKind::Retry,
                "a fenced producer ends the session; the next must win the lock first: {error}"
            );
            assert_eq!(error.cause, outboxd::Cause::Fenced, "{error}");
        }
        other => panic!("the zombie published or failed softly: {other:?}"),
    }
    let consumed = read_all(&env.kafka, &env.topic_prefix()).await;
    assert!(
        consumed.is_empty(),
        "nothing from the zombie is visible: {consumed:?}"
    );
}

/// A new leader waits once for the claim connections of earlier leaders.
/// A claim connection an old leader opens after that wait (its leader
/// session gone, its process not yet aware of it) must claim nothing:
/// its claims would run beside the new leader's, and `SKIP LOCKED` would
/// let the new leader publish an aggregate's later event first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_connection_of_a_leader_that_lost_its_lock_is_refused() {
    let env = TestEnv::new("stale-claims", Mode::Polling).await;
    let table = "public.outbox";
    let (_trigger, mut stop) = outboxd::shutdown::channel();
    let mut old_session = PgConnection::connect(&env.database_url).await.unwrap();
    let old = outboxd::leader::acquire(&mut old_session, table, "stale", &mut stop)
        .await
        .unwrap()
        .expect("the first session leads");

    // While the old leader's session lives, its claim connections join.
    let mut early_claims = PgConnection::connect(&env.database_url).await.unwrap();
    outboxd::leader::join_claims(&mut early_claims, &old)
        .await
        .expect("a claim connection of the current leader joins");
    drop(early_claims);

    // The old leader's session ends (a network cut, a terminated backend);
    // another session takes the lock and checks for earlier claims.
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(old.backend_pid)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(terminated, "the old leader's backend is terminated");
    let mut new_session = PgConnection::connect(&env.database_url).await.unwrap();
    let new = outboxd::leader::acquire(&mut new_session, table, "stale", &mut stop)
        .await
        .unwrap()
        .expect("the second session leads once the first is gone");
    assert!(
        outboxd::leader::wait_for_earlier_claims(&mut new_session, table, &mut stop)
            .await
            .unwrap(),
        "no earlier claim connection is open"
    );

    // The old leader now opens a claim connection: refused, the new one's joins.
    let mut late_claims = PgConnection::connect(&env.database_url).await.unwrap();
    let refused = outboxd::leader::join_claims(&mut late_claims, &old).await;
    let message = refused
        .expect_err("a claim connection of a leader that lost its lock must be refused")
        .to_string();
    assert!(message.contains("no longer leads"), "{message}");
    let mut new_claims = PgConnection::connect(&env.database_url).await.unwrap();
    outboxd::leader::join_claims(&mut new_claims, &new)
        .await
        .expect("a claim connection of the new leader joins");
}
