//! Leader election: a session-level Postgres advisory lock per outbox table.
//!
//! Invariant: only the session holding the table's lock claims rows, and it
//! claims them on the same connection that holds the lock. If that
//! connection dies, Postgres releases the lock and rolls back the claim
//! together, so a standby can never take over while the old leader still
//! holds rows. (A leader cut off from Postgres but not from Kafka is stopped
//! by Kafka's fencing when the new leader calls `init_transactions`.)
//!
//! The lock is per table, not per relay name: two relays with different
//! names on one table would otherwise both publish, each row twice in
//! replication mode and out of per-aggregate order in polling mode. One
//! leads; the other waits and says which relay it waits for.

use std::time::Duration;

use sqlx::PgConnection;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// How often a standby asks for the lock.
const STANDBY_RETRY: Duration = Duration::from_millis(500);

/// The SQL expression for the lock key: a stable 64-bit hash of the
/// table's `schema.table` (advisory locks are per database already).
const LOCK_KEY: &str = "hashtextextended('outboxd:table:' || $1, 0)";

/// Waits until this session holds the lock of `table` (`schema.table`).
/// Returns `false` if shutdown was requested first.
pub async fn acquire(
    connection: &mut PgConnection,
    table: &str,
    relay_name: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool> {
    let mut announced_standby = false;
    loop {
        let acquired: bool =
            sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({LOCK_KEY})"))
                .bind(table)
                .fetch_one(&mut *connection)
                .await
                .map_err(|e| Error::from_postgres("taking the leader lock", e))?;
        if acquired {
            tracing::info!(
                relay = relay_name,
                table,
                "leader lock acquired; this instance publishes"
            );
            return Ok(true);
        }
        if !announced_standby {
            announce_standby(connection, table, relay_name).await;
            announced_standby = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(STANDBY_RETRY) => {}
            _ = shutdown.changed() => return Ok(false),
        }
    }
}

/// Says who leads: a standby of the same relay is normal, a relay with
/// another name is a configuration mistake worth a warning.
async fn announce_standby(connection: &mut PgConnection, table: &str, relay_name: &str) {
    let Ok(Some(pid)) = holder_pid(connection, table).await else {
        return;
    };
    let holder_application: Option<String> =
        sqlx::query_scalar("SELECT application_name FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_optional(&mut *connection)
            .await
            .ok()
            .flatten();
    let ours = format!("outboxd-{relay_name}");
    match holder_application {
        Some(application) if application != ours => tracing::warn!(
            relay = relay_name,
            table,
            leader_backend_pid = pid,
            leader_application = %application,
            "another relay leads this table under a different name; waiting as a standby. \
             Only one relay may publish a table: give every instance the same relay.name, \
             or stop the other relay"
        ),
        _ => tracing::info!(
            relay = relay_name,
            table,
            leader_backend_pid = pid,
            "another instance holds the leader lock; waiting as a hot standby"
        ),
    }
}

/// The Postgres backend pid of the session holding the lock of `table`
/// (`schema.table`), if any.
pub async fn holder_pid(connection: &mut PgConnection, table: &str) -> Result<Option<i32>> {
    // An advisory lock on a bigint key shows up as classid = high 32 bits, objid = low 32 bits.
    sqlx::query_scalar(&format!(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND ((classid::bigint << 32) | objid::bigint) = {LOCK_KEY} LIMIT 1"
    ))
    .bind(table)
    .fetch_optional(&mut *connection)
    .await
    .map_err(|e| Error::from_postgres("looking up the leader", e))
}
