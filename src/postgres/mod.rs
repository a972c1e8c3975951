//! Postgres facts every stage shares: WAL positions (`lsn`), the settled
//! WAL position (`settled_wal_position`), and a row's `created_at` text
//! (`timestamp`).
//!
//! Invariant: this module sits below every stage and imports none of them
//! (only `error`), so `capture`, `event`, `kafka`, `acknowledge`, `table`
//! and `partitions` all take these facts from here and no downstream stage
//! has to reach back into `capture` for them.

pub mod lsn;
pub mod timestamp;

use sqlx::PgConnection;

use crate::error::{Error, Result};
use lsn::Lsn;

/// The timeline this server writes WAL on, read from the name of its
/// current WAL file: that needs no privilege (`pg_control_checkpoint()`
/// does) and changes the moment a standby is promoted. Only on a primary.
pub async fn current_timeline(connection: &mut PgConnection) -> Result<u32> {
    let file: String = sqlx::query_scalar("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        .fetch_one(&mut *connection)
        .await
        .map_err(|e| Error::from_postgres("reading the server's timeline", e))?;
    timeline_of_wal_file(&file)
}

/// The timeline a WAL file's name starts with (8 hex digits).
fn timeline_of_wal_file(name: &str) -> Result<u32> {
    name.get(..8)
        .and_then(|digits| u32::from_str_radix(digits, 16).ok())
        .ok_or_else(|| Error::stop(format!("`{name}` is not a WAL file name")))
}

/// A WAL position before which every committed transaction is visible to
/// new snapshots. A commit record is in the WAL (and streamed once flushed)
/// a moment before the transaction leaves the running set, so the insert
/// position alone is not enough: this also waits until every transaction
/// that held an id when the position was read has ended. (Creating a slot
/// waits the same way.)
pub async fn settled_wal_position(connection: &mut PgConnection) -> Result<Lsn> {
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&mut *connection)
        .await
        .map_err(|e| Error::from_postgres("reading the current WAL position", e))?;
    // A fresh transaction id, taken after the position: every transaction
    // whose commit lies before the position has a lower one. (A snapshot's
    // xmax is not that: it is one past the latest *completed* id, and ids
    // running above it are not listed in the snapshot at all.)
    let next_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *connection)
        .await
        .map_err(|e| Error::from_postgres("taking a transaction id", e))?;
    let started = std::time::Instant::now();
    let mut announced = false;
    loop {
        let (settled, oldest_pid): (bool, Option<i32>) = sqlx::query_as(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8, \
                    (SELECT pid FROM pg_stat_activity WHERE backend_xid IS NOT NULL \
                     ORDER BY age(backend_xid) DESC LIMIT 1)",
        )
        .bind(&next_xid)
        .fetch_one(&mut *connection)
        .await
        .map_err(|e| Error::from_postgres("waiting for running transactions", e))?;
        if settled {
            return parse_lsn(&lsn);
        }
        if !announced && started.elapsed() > std::time::Duration::from_secs(5) {
            tracing::warn!(
                oldest_transaction_pid = oldest_pid,
                "waiting for transactions that were running when streaming began to end, so the \
                 relay can tell published rows from rows not yet visible; a long-running or idle \
                 transaction holds this up (see pg_stat_activity)"
            );
            announced = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// An LSN that Postgres printed; one it cannot have printed stops the relay.
pub(crate) fn parse_lsn(text: &str) -> Result<Lsn> {
    text.parse()
        .map_err(|e| Error::stop(format!("Postgres returned an unreadable LSN: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wal_file_name_starts_with_its_timeline() {
        assert_eq!(timeline_of_wal_file("000000010000000000000003").unwrap(), 1);
        assert_eq!(
            timeline_of_wal_file("0000001A00000002000000FF").unwrap(),
            26
        );
        assert!(timeline_of_wal_file("0000").is_err());
        assert!(timeline_of_wal_file("zzzzzzzz0000000000000000").is_err());
    }
}
