//! Acknowledgement: recording in Postgres that rows are in Kafka.
//!
//! Invariant: these functions run only for rows whose Kafka transaction has
//! committed (the batch just published, or the latest checkpoint read back
//! with `read_committed`). Acknowledging is idempotent, so doing it twice
//! after a crash is harmless. Poison rows are always marked, never deleted,
//! so their payload stays in the table for whoever repairs them.
//!
//! A WAL-message outbox (`capture.source: messages`) has no row to mark:
//! its acknowledger ([`Acknowledger::without_table`]) does nothing and
//! reports every event acknowledged, so what stays is the slot's
//! confirmation and the checkpoint, which together are its whole record.

use sqlx::PgConnection;

use crate::config::AfterPublish;
use crate::error::{Error, Result};
use std::collections::HashMap;

use crate::kafka::checkpoint::{Checkpoint, RowDigest};
use crate::table::OutboxTable;

/// A row as an acknowledgement names it: its seq and event id.
pub type RowRef<'a> = (i64, &'a str);

/// Rows acknowledged by one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acknowledged {
    pub published: u64,
    pub dead_lettered: u64,
}

/// The acknowledgement statements for one table, built once: they run
/// after every batch.
pub struct Acknowledger {
    /// `schema.table`, to match checkpoints against.
    table_name: String,
    /// `UPDATE … SET sent_at` or `DELETE`, per `relay.after_publish`.
    published_sql: String,
    /// Always `UPDATE … SET sent_at`: poison rows are never deleted.
    dead_lettered_sql: String,
    /// Reads the event id of rows by seq, to tell a checkpoint's rows from
    /// rows that reuse their seqs.
    row_ids_sql: String,
    /// `false` for a WAL-message outbox: nothing to mark.
    marks_rows: bool,
}

impl Acknowledger {
    pub fn new(table: &OutboxTable, after_publish: AfterPublish) -> Acknowledger {
        Acknowledger {
            table_name: table.display_name(),
            published_sql: match after_publish {
                // `none` writes nothing for streamed rows (their stream
                // acknowledges `without_table`); the catch-up drain and the
                // takeover still mark the rows they publish.
                AfterPublish::Mark | AfterPublish::None => table.mark_sent_sql(),
                AfterPublish::Delete => table.delete_sql(),
            },
            dead_lettered_sql: table.mark_sent_sql(),
            row_ids_sql: table.row_ids_sql(),
            marks_rows: true,
        }
    }

    /// For `capture.source: messages`: `name` is what its checkpoints name
    /// instead of a table.
    pub fn without_table(name: &str) -> Acknowledger {
        Acknowledger {
            table_name: name.to_string(),
            published_sql: String::new(),
            dead_lettered_sql: String::new(),
            row_ids_sql: String::new(),
            marks_rows: false,
        }
    }

    /// Marks (or deletes) the rows of a committed batch, each named by its
    /// seq and event id.
    pub async fn acknowledge(
        &self,
        connection: &mut PgConnection,
        published: &[(i64, &str)],
        dead_lettered: &[(i64, &str)],
    ) -> Result<Acknowledged> {
        if !self.marks_rows {
            return Ok(Acknowledged {
                published: published.len() as u64,
                dead_lettered: dead_lettered.len() as u64,
            });
        }
        let acknowledged = Acknowledged {
            published: execute_for_rows(
                connection,
                &self.published_sql,
                published,
                "acknowledging published rows",
            )
            .await?,
            dead_lettered: execute_for_rows(
                connection,
                &self.dead_lettered_sql,
                dead_lettered,
                "acknowledging dead-lettered rows",
            )
            .await?,
        };
        Ok(acknowledged)
    }

    /// Acknowledges rows the replication stream delivered. Postgres streams
    /// a commit as soon as its WAL is flushed, a moment before other
    /// sessions can see its rows; a mark in that moment misses them, and
    /// they would stay unsent for good although they are in Kafka. So when
    /// fewer rows were acknowledged than named, this waits until every
    /// transaction committed so far is visible and acknowledges again
    /// (harmless for rows already done). A row still missing after that was
    /// deleted by someone else.
    pub async fn acknowledge_streamed(
        &self,
        connection: &mut PgConnection,
        published: &[(i64, &str)],
        dead_lettered: &[(i64, &str)],
    ) -> Result<Acknowledged> {
        let first = self
            .acknowledge(connection, published, dead_lettered)
            .await?;
        if first.published + first.dead_lettered >= (published.len() + dead_lettered.len()) as u64 {
            return Ok(first);
        }
        crate::postgres::settled_wal_position(connection).await?;
        let again = self
            .acknowledge(connection, published, dead_lettered)
            .await?;
        tracing::debug!(
            acknowledged_late = again.published + again.dead_lettered,
            "streamed rows were not yet visible when first acknowledged; acknowledged them once visible"
        );
        Ok(Acknowledged {
            published: first.published + again.published,
            dead_lettered: first.dead_lettered + again.dead_lettered,
        })
    }

    /// Start-up reconciliation: the latest checkpoint's rows are in Kafka, so
    /// acknowledge any of them a crash left unmarked. They will not be
    /// claimed, hence never produced, again.
    pub async fn reconcile(
        &self,
        connection: &mut PgConnection,
        checkpoint: &Checkpoint,
    ) -> Result<Acknowledged> {
        if checkpoint.table != self.table_name {
            return Err(Error::stop(format!(
                "the latest checkpoint of this relay.name belongs to table {}, not {}; \
                 give each outbox table its own relay.name",
                checkpoint.table, self.table_name
            )));
        }
        if !self.marks_rows {
            return Ok(Acknowledged::default());
        }
        let published = checkpoint.published.to_seqs();
        let dead_lettered = checkpoint.dead_lettered.to_seqs();
        if let Some(row_ids) = checkpoint.row_ids() {
            // Only rows present now with the checkpoint's event id are
            // acknowledged. A seq whose row is absent needs nothing (it was
            // marked and deleted, or lost in a failover), and must not be
            // acknowledged by seq: a new row may take it before the mark
            // runs. A row that matched keeps its seq and content (seq is the
            // key, and rows are insert-only).
            let (ours, others) = self
                .sort_by_identity(connection, &row_ids, &published, &dead_lettered)
                .await?;
            if !others.is_empty() {
                tracing::warn!(
                    seqs = ?others,
                    "rows with these seqs are not the rows the checkpoint published under them \
                     (their event ids differ): the table was truncated with RESTART IDENTITY, or the \
                     database was restored or failed over to a server that lacked the published \
                     rows, and handed their seqs to new rows. \
                     Those new rows are not marked and will be published; the events the \
                     checkpoint names stay in Kafka for rows this database no longer has"
                );
            }
            return self
                .acknowledge_ours(connection, &ours, &published, &dead_lettered)
                .await;
        }
        // A checkpoint of a release before row ids names rows by seq
        // alone: mark whichever row holds each seq now.
        let all: Vec<i64> = published.iter().chain(&dead_lettered).copied().collect();
        let present = self.row_ids_by_seq(connection, &all).await?;
        self.acknowledge_ours(connection, &present, &published, &dead_lettered)
            .await
    }

    /// A checkpoint written under another identity that may have been this
    /// table's (renamed, moved, pg_upgraded): acknowledges only the rows
    /// here whose seq and event id it names, nothing when it carries no ids.
    pub async fn reconcile_if_renamed(
        &self,
        connection: &mut PgConnection,
        checkpoint: &Checkpoint,
    ) -> Result<Acknowledged> {
        let Some(row_ids) = checkpoint.row_ids().filter(|_| self.marks_rows) else {
            return Ok(Acknowledged::default());
        };
        let published = checkpoint.published.to_seqs();
        let dead_lettered = checkpoint.dead_lettered.to_seqs();
        let (ours, _) = self
            .sort_by_identity(connection, &row_ids, &published, &dead_lettered)
            .await?;
        self.acknowledge_ours(connection, &ours, &published, &dead_lettered)
            .await
    }

    /// Acknowledges the rows among `published` and `dead_lettered` that
    /// `ours` holds (seq → event id).
    async fn acknowledge_ours(
        &self,
        connection: &mut PgConnection,
        ours: &HashMap<i64, String>,
        published: &[i64],
        dead_lettered: &[i64],
    ) -> Result<Acknowledged> {
        let named = |seqs: &[i64]| -> Vec<(i64, &str)> {
            seqs.iter()
                .filter_map(|seq| ours.get(seq).map(|id| (*seq, id.as_str())))
                .collect()
        };
        self.acknowledge(connection, &named(published), &named(dead_lettered))
            .await
    }

    /// The event id of each row present under `seqs`.
    async fn row_ids_by_seq(
        &self,
        connection: &mut PgConnection,
        seqs: &[i64],
    ) -> Result<HashMap<i64, String>> {
        let rows: Vec<(i64, String)> = sqlx::query_as(&self.row_ids_sql)
            .bind(seqs)
            .fetch_all(&mut *connection)
            .await
            .map_err(|e| Error::from_postgres("reading the event ids of checkpointed rows", e))?;
        Ok(rows.into_iter().collect())
    }

    /// Whether a row here has a seq and event id that `checkpoint` names:
    /// then the identity that wrote it relayed this very table.
    pub async fn names_rows_here(
        &self,
        connection: &mut PgConnection,
        checkpoint: &Checkpoint,
    ) -> Result<bool> {
        let Some(row_ids) = checkpoint.row_ids().filter(|_| self.marks_rows) else {
            return Ok(false);
        };
        let (ours, _) = self
            .sort_by_identity(
                connection,
                &row_ids,
                &checkpoint.published.to_seqs(),
                &checkpoint.dead_lettered.to_seqs(),
            )
            .await?;
        Ok(!ours.is_empty())
    }

    /// Splits the rows present under `published` and `dead_lettered` into
    /// those whose event id is the one `row_ids` names and those whose is not.
    async fn sort_by_identity(
        &self,
        connection: &mut PgConnection,
        row_ids: &HashMap<i64, RowDigest>,
        published: &[i64],
        dead_lettered: &[i64],
    ) -> Result<(HashMap<i64, String>, Vec<i64>)> {
        let all: Vec<i64> = published.iter().chain(dead_lettered).copied().collect();
        let mut ours = HashMap::new();
        let mut others = Vec::new();
        for (seq, id) in self.row_ids_by_seq(connection, &all).await? {
            // Releases before 118ed62 digested `id::text`, which drops a
            // padded `character(n)` id's trailing blanks; the id is read as
            // its output function writes it now. Either names the row.
            let named = row_ids.get(&seq);
            if named == Some(&RowDigest::of(&id))
                || named == Some(&RowDigest::of(id.trim_end_matches(' ')))
            {
                ours.insert(seq, id);
            } else {
                others.push(seq);
            }
        }
        Ok((ours, others))
    }
}
/// Runs `sql` with the rows' seqs as `$1` and their event ids as `$2`;
/// with no rows there is nothing to send.
async fn execute_for_rows(
    connection: &mut PgConnection,
    sql: &str,
    rows: &[(i64, &str)],
    context: &str,
) -> Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let (seqs, ids): (Vec<i64>, Vec<&str>) = rows.iter().copied().unzip();
    Ok(sqlx::query(sql)
        .bind(seqs)
        .bind(ids)
        .execute(&mut *connection)
        .await
        .map_err(|e| Error::from_postgres(context, e))?
        .rows_affected())
}
