//! The relay's own Postgres sessions commit durably.
//!
//! Invariant: every connection the relay acknowledges on waits for its
//! commits' WAL to be flushed, whatever `synchronous_commit` the role or
//! server sets, so a Postgres crash never forgets a row marked sent; and no
//! role or server `idle_in_transaction_session_timeout` or
//! `transaction_timeout` ends a claim while its batch is in the pipeline.

use sqlx::PgConnection;

use crate::error::{Error, Result};

/// Makes the session's commits wait for their WAL to be flushed.
///
/// With `synchronous_commit = off`, a Postgres crash forgets the last
/// commits even though they returned: for the relay, rows it marked sent
/// would be unsent again after recovery and published a second time (only
/// the latest checkpoint's rows are reconciled). Services may keep `off` for
/// their own transactions; this only changes the relay's session, and only
/// when it is `off` (a stronger setting such as `remote_apply` is kept).
pub(super) async fn durable_acknowledgements(connection: &mut PgConnection) -> Result<()> {
    let changed = make_commits_durable(connection)
        .await
        .map_err(|e| Error::from_postgres("setting synchronous_commit for the relay session", e))?;
    if changed {
        tracing::debug!(
            "synchronous_commit is off for this role or server; the relay's own session uses on, \
             so a Postgres crash cannot forget which rows were marked sent"
        );
    }
    Ok(())
}

/// Sets `synchronous_commit = on` for this connection if it is `off`
/// (see `durable_acknowledgements`); says whether it changed it. At the
/// level of sqlx errors, so a pool's `after_connect` can run it too.
pub(super) async fn make_commits_durable(connection: &mut PgConnection) -> sqlx::Result<bool> {
    let setting: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut *connection)
        .await?;
    if setting != "off" {
        return Ok(false);
    }
    sqlx::query("SET synchronous_commit = on")
        .execute(&mut *connection)
        .await?;
    Ok(true)
}

/// Turns `idle_in_transaction_session_timeout` and, on PostgreSQL 17 and
/// later, `transaction_timeout` off for this session. A claim holds its
/// rows locked in a transaction from the claim until its marks commit,
/// while the batch is published: a Kafka stall or slow marks leave it idle
/// and make it long. A timeout set for the role or server would end it,
/// release rows still in the pipeline to the next claim (published twice,
/// an aggregate's events out of order), and stop the relay.
pub(super) async fn keep_claims_open(connection: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query(
        "SELECT set_config('idle_in_transaction_session_timeout', '0', false), \
                CASE WHEN current_setting('server_version_num')::int >= 170000 \
                     THEN set_config('transaction_timeout', '0', false) END",
    )
    .execute(&mut *connection)
    .await?;
    Ok(())
}
