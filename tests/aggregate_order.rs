//! Per-aggregate order and its condition. Events of one aggregate keep
//! their order when the service writes that aggregate one transaction at a
//! time (the workload locks the aggregate's row, and every exactly-once
//! test checks the order). Without that, two transactions of one aggregate
//! have no order of their own, and the capture modes differ: replication
//! publishes in commit order, polling in `seq` order. Both sides are
//! tested here, as the README and docs/adding-the-outbox.md state them.

use std::time::Duration;

use sqlx::Connection;

use crate::support::kafka::read_all;
use crate::support::workload::{assert_exactly_once, write_orders};
use crate::support::{InProcessRelay, Mode, TestEnv};

const LIMIT: Duration = Duration::from_secs(60);

in_both_modes!(
    serialised_writes_keep_each_aggregates_order,
    worker_threads = 2
);
/// The condition held: writers lock the aggregate, so its events reach
/// Kafka in the order they were written, in either mode.
async fn serialised_writes_keep_each_aggregates_order(mode: Mode) {
    let env = TestEnv::new("order-serialised", mode).await;
    let written = write_orders(&env.pool, 0, 40, 2).await;
    env.relay_until_all_sent(LIMIT).await;
    // The checker fails on any aggregate whose events are out of order.
    assert_exactly_once(&env, &written).await;
}

in_both_modes!(
    unserialised_writes_follow_each_modes_own_order,
    worker_threads = 2
);
/// The condition broken: two transactions insert an event of one
/// aggregate without locking it, and the later `seq` commits first.
/// Replication, streaming as they commit, publishes the commit order;
/// polling, which finds both rows pending, the `seq` order.
async fn unserialised_writes_follow_each_modes_own_order(mode: Mode) {
    let env = TestEnv::new("order-unserialised", mode).await;
    // Replication streams while the rows commit (a restart would drain
    // pending rows from the table, in seq order); polling is started after
    // both committed, so it finds them pending together.
    let streaming = (mode == Mode::Replication).then(|| InProcessRelay::start(env.config()));
    env.wait_streaming(LIMIT).await;
    let insert = "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                  VALUES ('order', 'o-1', $1, '{}') RETURNING seq";
    let mut first = sqlx::PgConnection::connect(&env.database_url)
        .await
        .expect("connect");
    let mut second = sqlx::PgConnection::connect(&env.database_url)
        .await
        .expect("connect");
    let mut first_tx = first.begin().await.expect("BEGIN");
    let lower: i64 = sqlx::query_scalar(insert)
        .bind("LowerSeq")
        .fetch_one(&mut *first_tx)
        .await
        .expect("insert");
    let mut second_tx = second.begin().await.expect("BEGIN");
    let higher: i64 = sqlx::query_scalar(insert)
        .bind("HigherSeq")
        .fetch_one(&mut *second_tx)
        .await
        .expect("insert");
    assert!(higher > lower);
    second_tx
        .commit()
        .await
        .expect("the higher seq commits first");
    first_tx.commit().await.expect("then the lower");

    match streaming {
        Some(relay) => {
            env.wait_all_sent(LIMIT).await;
            relay.stop().await.expect("relay stops cleanly");
        }
        None => env.relay_until_all_sent(LIMIT).await,
    }
    let records = read_all(&env.kafka, &env.topic_prefix()).await;
    let order: Vec<&str> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some(b"o-1".as_slice()))
        .map(|r| r.header("type").unwrap_or("<no type header>"))
        .collect();
    let expected = match mode {
        Mode::Replication => ["HigherSeq", "LowerSeq"],
        _ => ["LowerSeq", "HigherSeq"],
    };
    assert_eq!(order, expected, "{mode:?} publishes in its own order");
}
