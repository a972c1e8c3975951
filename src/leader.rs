//! Leader election: a session-level Postgres advisory lock per outbox table.
//!
//! Invariant: only the session holding the table's lock claims rows, and a
//! new leader claims nothing while any claim connection of an earlier
//! leader is still open. Claims run on connections of their own (several
//! batches are in flight at once), so the leader's lock and its claims'
//! row locks can end separately: the leader's connection may die while a
//! claim still holds rows, and a successor that claimed around those rows
//! (`SKIP LOCKED`) would publish an aggregate's later event before its
//! earlier one. So every claim connection holds a second advisory lock of
//! the table, the claims lock, in shared mode; a new leader, after it has
//! fenced every earlier leader in Kafka (`init_transactions`: their
//! transactions can no longer commit and their sessions end), takes the
//! claims lock exclusively for a moment, which waits until every earlier
//! claim connection is closed. A leader also watches its own lock's
//! connection and ends its session when it fails (`still_leading`), so its
//! claim connections do not outlive its leadership by more than that.
//!
//! The lock is per table, not per relay name: two relays with different
//! names on one table would otherwise both publish, each row twice in
//! replication mode and out of per-aggregate order in polling mode. One
//! leads; the other waits and says which relay it waits for.

use std::time::Duration;

use sqlx::PgConnection;

use crate::error::{Error, Result};
use crate::shutdown::Shutdown;

/// How often a standby asks for the lock.
const STANDBY_RETRY: Duration = Duration::from_millis(500);

/// The SQL expression for the lock key: a stable 64-bit hash of the
/// table's `schema.table` (advisory locks are per database already).
const LOCK_KEY: &str = "hashtextextended('outboxd:table:' || $1, 0)";

/// The session that holds a table's leader lock, named so that a claim
/// connection can tell whether its leader still leads: besides the leader
/// lock it holds a lock of its own term, keyed by a random nonce, so a pid
/// the OS gave again to another session (a successor's) is not mistaken
/// for it. Both show in `pg_locks`, which every role may read
/// (`pg_stat_activity` hides other sessions' details from a role that is
/// not their login role, as after `ALTER ROLE … SET role`).
#[derive(Debug, Clone)]
pub struct Leadership {
    /// `schema.table`.
    pub table: String,
    pub backend_pid: i32,
    term: String,
}

/// The term lock's key: one per leadership term (`$2`, a random nonce).
const TERM_KEY: &str = "hashtextextended('outboxd:term:' || $1 || ':' || $2, 0)";

/// Waits until this session holds the lock of `table` (`schema.table`).
/// Returns `None` if shutdown was requested first.
pub async fn acquire(
    connection: &mut PgConnection,
    table: &str,
    relay_name: &str,
    shutdown: &mut Shutdown,
) -> Result<Option<Leadership>> {
    let mut announced_standby = false;
    loop {
        let acquired: bool =
            sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({LOCK_KEY})"))
                .bind(table)
                .fetch_one(&mut *connection)
                .await
                .map_err(|e| Error::from_postgres("taking the leader lock", e))?;
        if acquired {
            let (backend_pid, term): (i32, String) = sqlx::query_as(&format!(
                "SELECT pg_backend_pid(), nonce \
                 FROM (SELECT md5(random()::text || clock_timestamp()::text) AS nonce) AS term \
                 WHERE pg_try_advisory_lock({})",
                TERM_KEY.replace("$2", "nonce")
            ))
            .bind(table)
            .fetch_one(&mut *connection)
            .await
            .map_err(|e| {
                Error::from_postgres("naming the session that holds the leader lock", e)
            })?;
            tracing::info!(
                relay = relay_name,
                table,
                leader_backend_pid = backend_pid,
                "leader lock acquired; this instance publishes"
            );
            return Ok(Some(Leadership {
                table: table.to_string(),
                backend_pid,
                term,
            }));
        }
        if !announced_standby {
            announce_standby(connection, table, relay_name).await;
            announced_standby = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(STANDBY_RETRY) => {}
            _ = shutdown.wait() => return Ok(None),
        }
    }
}

/// The claims lock's key: one per table, next to the leader lock's.
const CLAIMS_KEY: &str = "hashtextextended('outboxd:claims:' || $1, 0)";

/// How often a new leader looks again for claim connections of an earlier one.
const CLAIMS_RETRY: Duration = Duration::from_millis(200);
/// How long a new leader waits for earlier claims before it says so.
const CLAIMS_WARN_AFTER: Duration = Duration::from_secs(5);

/// Run on every claim connection when it opens: holds the claims lock of
/// the table in shared mode for the connection's life, then confirms that
/// `leadership` still holds the leader lock. Fails if it does not: a
/// successor may already have checked for earlier claims, and this
/// connection's claims would run beside its own.
pub async fn join_claims(
    connection: &mut PgConnection,
    leadership: &Leadership,
) -> sqlx::Result<()> {
    sqlx::query(&format!("SELECT pg_advisory_lock_shared({CLAIMS_KEY})"))
        .bind(&leadership.table)
        .execute(&mut *connection)
        .await?;
    if still_holds(connection, leadership).await? {
        return Ok(());
    }
    Err(sqlx::Error::Protocol(format!(
        "this relay no longer leads {}: the session that held its leader lock (backend pid {}) \
         is gone, and another instance may lead now. No row was claimed; the relay ends this \
         term and competes for the lock again",
        leadership.table, leadership.backend_pid
    )))
}

/// Whether the session named by `leadership` still holds its table's
/// leader lock: one session holds both the leader lock and its term's lock.
pub async fn still_holds(
    connection: &mut PgConnection,
    leadership: &Leadership,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(&format!(
        "SELECT EXISTS ({} AND pid IN ({}))",
        holders_sql(LOCK_KEY),
        holders_sql(TERM_KEY)
    ))
    .bind(&leadership.table)
    .bind(&leadership.term)
    .fetch_one(&mut *connection)
    .await
}

/// Waits until no claim connection of an earlier leader of `table` is
/// open: takes the claims lock exclusively and releases it at once. Call it
/// after fencing and before claiming. Returns `false` if shutdown was
/// requested first.
pub async fn wait_for_earlier_claims(
    connection: &mut PgConnection,
    table: &str,
    shutdown: &mut Shutdown,
) -> Result<bool> {
    let started = std::time::Instant::now();
    let mut warned = false;
    loop {
        let free: bool = sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({CLAIMS_KEY})"))
            .bind(table)
            .fetch_one(&mut *connection)
            .await
            .map_err(|e| Error::from_postgres("checking for an earlier leader's claims", e))?;
        if free {
            sqlx::query(&format!("SELECT pg_advisory_unlock({CLAIMS_KEY})"))
                .bind(table)
                .execute(&mut *connection)
                .await
                .map_err(|e| Error::from_postgres("releasing the claims lock", e))?;
            return Ok(true);
        }
        if !warned && started.elapsed() > CLAIMS_WARN_AFTER {
            warned = true;
            let pids: Vec<i32> = sqlx::query_scalar(&holders_sql(CLAIMS_KEY))
                .bind(table)
                .fetch_all(&mut *connection)
                .await
                .unwrap_or_default();
            tracing::warn!(
                table,
                claim_backend_pids = ?pids,
                "an earlier leader of this table still has claim connections open although it \
                 lost the leader lock; waiting for them to close before claiming, so no \
                 aggregate's events are published out of order. If that relay is frozen, \
                 terminate those backends (pg_terminate_backend)"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(CLAIMS_RETRY) => {}
            _ = shutdown.wait() => return Ok(false),
        }
    }
}

/// Whether the connection holding the leader lock still answers. An error
/// means the lock is gone with it (Postgres releases it with the session).
pub async fn still_leading(connection: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT 1")
        .execute(&mut *connection)
        .await
        .map(|_| ())
        .map_err(|e| {
            Error::from_postgres(
                "checking the connection that holds the leader lock (the lock is lost with it; \
                 ending the session so its claims end too, then competing for the lock again)",
                e,
            )
        })
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
    sqlx::query_scalar(&format!("{} LIMIT 1", holders_sql(LOCK_KEY)))
        .bind(table)
        .fetch_optional(&mut *connection)
        .await
        .map_err(|e| Error::from_postgres("looking up the leader", e))
}

/// The backend pids holding the advisory lock `key` (an SQL expression of
/// `$1`, the table) in this database.
fn holders_sql(key: &str) -> String {
    // An advisory lock on a bigint key shows up as classid = high 32 bits, objid = low 32 bits.
    format!(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND ((classid::bigint << 32) | objid::bigint) = {key}"
    )
}
