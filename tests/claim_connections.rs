//! The relay's claim connections hold their rows locked from the claim
//! until the marks commit, while the batch is published: a Kafka stall or
//! slow marks keep them idle in a transaction. A server or role setting
//! `idle_in_transaction_session_timeout` (or, on PostgreSQL 17 and later,
//! `transaction_timeout`) would end such a connection,
//! release its rows while they are still in the pipeline, and let the next
//! claim take and publish them a second time. The relay's own sessions
//! turn that timeout off.

use std::time::Duration;

use crate::support::faults::RelayProcess;
use crate::support::workload::{assert_exactly_once, write_orders};
use crate::support::{Mode, TestEnv};

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_outlive_a_short_idle_in_transaction_timeout() {
    let env = TestEnv::new("idle-timeout", Mode::Polling).await;
    let database = env
        .database_url
        .rsplit('/')
        .next()
        .and_then(|d| d.split('?').next())
        .expect("database name")
        .to_string();
    sqlx::raw_sql(&format!(
        "ALTER DATABASE {database} SET idle_in_transaction_session_timeout = '300ms'"
    ))
    .execute(&env.pool)
    .await
    .expect("set the timeout");
    // PostgreSQL 17 and later also end any transaction older than this.
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&env.pool)
        .await
        .expect("server version");
    if version >= 170_000 {
        sqlx::raw_sql(&format!(
            "ALTER DATABASE {database} SET transaction_timeout = '300ms'"
        ))
        .execute(&env.pool)
        .await
        .expect("set the transaction timeout");
    }
    let written = write_orders(&env.pool, 0, 60, 10).await;
    // Every mark waits 1 s: each claim sits idle in its transaction longer
    // than the timeout, with later claims running beside it.
    let mut relay = RelayProcess::start_with(&env, None, &[("OUTBOXD_SLOW_MARKS_MS", "1000")]);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;
    assert_exactly_once(&env, &written).await;
}
