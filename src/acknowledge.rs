//! Acknowledgement: recording in Postgres that rows are in Kafka.
//!
//! Invariant: these functions run only for rows whose Kafka transaction has
//! committed (the batch just published, or the latest checkpoint read back
//! with `read_committed`). Acknowledging is idempotent, so doing it twice
//! after a crash is harmless. Poison rows are always marked, never deleted,
//! so their payload stays in the table for whoever repairs them.

use sqlx::PgConnection;

use crate::config::AfterPublish;
use crate::error::{Error, Result};
use crate::kafka::checkpoint::Checkpoint;
use crate::table::OutboxTable;

/// Rows acknowledged by one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acknowledged {
    pub published: u64,
    pub dead_lettered: u64,
}

/// Marks (or deletes) the rows of a committed batch.
pub async fn acknowledge(
    connection: &mut PgConnection,
    table: &OutboxTable,
    after_publish: AfterPublish,
    published: &[i64],
    dead_lettered: &[i64],
) -> Result<Acknowledged> {
    let published_sql = match after_publish {
        AfterPublish::Mark => table.mark_sent_sql(),
        AfterPublish::Delete => table.delete_sql(),
    };
    let mut acknowledged = Acknowledged::default();
    if !published.is_empty() {
        acknowledged.published = sqlx::query(&published_sql)
            .bind(published)
            .execute(&mut *connection)
            .await
            .map_err(|e| Error::from_postgres("acknowledging published rows", e))?
            .rows_affected();
    }
    if !dead_lettered.is_empty() {
        acknowledged.dead_lettered = sqlx::query(&table.mark_sent_sql())
            .bind(dead_lettered)
            .execute(&mut *connection)
            .await
            .map_err(|e| Error::from_postgres("acknowledging dead-lettered rows", e))?
            .rows_affected();
    }
    Ok(acknowledged)
}

/// Start-up reconciliation: the latest checkpoint's rows are in Kafka, so
/// acknowledge any of them a crash left unmarked. They will not be claimed,
/// hence never produced, again.
pub async fn reconcile(
    connection: &mut PgConnection,
    table: &OutboxTable,
    after_publish: AfterPublish,
    checkpoint: &Checkpoint,
) -> Result<Acknowledged> {
    if checkpoint.table != table.display_name() {
        return Err(Error::stop(format!(
            "the latest checkpoint of this relay.name belongs to table {}, not {}; \
             give each outbox table its own relay.name",
            checkpoint.table,
            table.display_name()
        )));
    }
    acknowledge(
        connection,
        table,
        after_publish,
        &checkpoint.published.to_seqs(),
        &checkpoint.dead_lettered.to_seqs(),
    )
    .await
}
