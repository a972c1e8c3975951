//! Leader election: a session-level Postgres advisory lock per relay name.
//!
//! Invariant: only the session holding the lock claims rows, and it claims
//! them on the same connection that holds the lock. If that connection dies,
//! Postgres releases the lock and rolls back the claim together, so a
//! standby can never take over while the old leader still holds rows.
//! (A leader cut off from Postgres but not from Kafka is stopped by Kafka's
//! fencing when the new leader calls `init_transactions`.)

use std::time::Duration;

use sqlx::PgConnection;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// How often a standby asks for the lock.
const STANDBY_RETRY: Duration = Duration::from_millis(500);

/// The SQL expression for the lock key: a stable 64-bit hash of the name.
const LOCK_KEY: &str = "hashtextextended('outboxd:' || $1, 0)";

/// Waits until this session holds the relay's lock. Returns `false` if
/// shutdown was requested first.
pub async fn acquire(
    connection: &mut PgConnection,
    relay_name: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool> {
    let mut announced_standby = false;
    loop {
        let acquired: bool =
            sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({LOCK_KEY})"))
                .bind(relay_name)
                .fetch_one(&mut *connection)
                .await
                .map_err(|e| Error::from_postgres("taking the leader lock", e))?;
        if acquired {
            tracing::info!(
                relay = relay_name,
                "leader lock acquired; this instance publishes"
            );
            return Ok(true);
        }
        if !announced_standby {
            let holder = holder_pid(connection, relay_name).await.ok().flatten();
            tracing::info!(
                relay = relay_name,
                leader_backend_pid = holder,
                "another instance holds the leader lock; waiting as a hot standby"
            );
            announced_standby = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(STANDBY_RETRY) => {}
            _ = shutdown.changed() => return Ok(false),
        }
    }
}

/// The Postgres backend pid of the session holding the lock, if any.
pub async fn holder_pid(connection: &mut PgConnection, relay_name: &str) -> Result<Option<i32>> {
    // An advisory lock on a bigint key shows up as classid = high 32 bits, objid = low 32 bits.
    sqlx::query_scalar(&format!(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
         AND ((classid::bigint << 32) | objid::bigint) = {LOCK_KEY} LIMIT 1"
    ))
    .bind(relay_name)
    .fetch_optional(&mut *connection)
    .await
    .map_err(|e| Error::from_postgres("looking up the leader", e))
}
