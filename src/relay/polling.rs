//! The polling loop: claim unsent rows, deliver them, mark them, commit.
//!
//! ```text
//!  BEGIN; claim ≤ batch_size rows FOR UPDATE SKIP LOCKED
//!        ▼
//!  Kafka: begin · events + checkpoint · commit
//!        ▼
//!  mark rows sent; COMMIT            (then the next claim)
//! ```
//!
//! Invariant: a row is acknowledged only after the Kafka transaction holding
//! it committed, and the next claim starts only after that acknowledgement
//! committed (see `kafka::checkpoint` for why this makes restarts
//! exactly-once). The claimed rows stay locked until then, so no other
//! relay can claim them meanwhile.

use sqlx::Connection;

use super::Session;
use crate::capture::polling;
use crate::capture::wakeup::Wakeup;
use crate::error::{Error, Result};
use crate::failpoint;

/// How long the loop runs.
pub enum Until {
    /// Until shutdown, waiting on the wakeup whenever nothing is unsent.
    Shutdown(Wakeup),
    /// Until no unsent row with seq ≤ this is left: the catch-up before
    /// replication streaming starts. Bounded, so it ends even while
    /// services keep writing (their new rows are in the stream).
    DrainedUpTo(i64),
}

pub async fn run(session: &mut Session<'_>, mut until: Until) -> Result<()> {
    let table = &session.context.table;
    let (claim_sql, up_to) = match &until {
        Until::Shutdown(_) => (table.claim_sql(session.payload_encoding), None),
        Until::DrainedUpTo(seq) => (table.claim_up_to_sql(session.payload_encoding), Some(*seq)),
    };
    let batch_size = session.context.config.capture.batch_size;
    loop {
        if *session.stop.borrow() {
            return Ok(());
        }
        let mut transaction = session
            .connection
            .begin()
            .await
            .map_err(|e| Error::from_postgres("starting the claim transaction", e))?;
        let events = polling::claim_batch(&mut transaction, &claim_sql, batch_size, up_to).await?;
        if events.is_empty() {
            release(transaction).await?;
            match &mut until {
                Until::Shutdown(wakeup) => wakeup.wait(&mut session.stop).await,
                Until::DrainedUpTo(_) => return Ok(()),
            }
            continue;
        }
        let Some(delivered) = session
            .deliverer
            .deliver(&events, None, &mut session.stop)
            .await?
        else {
            release(transaction).await?;
            return Ok(());
        };
        session
            .context
            .acknowledger
            .acknowledge(
                &mut transaction,
                &delivered.published,
                &delivered.dead_lettered,
            )
            .await?;
        failpoint::kill_point("after-mark");
        transaction.commit().await.map_err(|e| {
            Error::from_postgres(
                "committing the acknowledgement (the checkpoint will repair it)",
                e,
            )
        })?;
    }
}

/// Releases the claimed rows; a failure here means the connection is gone,
/// and Postgres releases them itself.
async fn release(transaction: sqlx::Transaction<'_, sqlx::Postgres>) -> Result<()> {
    transaction
        .rollback()
        .await
        .map_err(|e| Error::from_postgres("releasing claimed rows", e))
}
