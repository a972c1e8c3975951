//! The insert-only contract of the outbox table, and the guard that makes
//! a breach an error in the writer's transaction instead of a silent
//! difference between the capture modes.
//!
//! Invariant: what the relay publishes for a row is the row as its INSERT
//! wrote it, in both capture modes. Replication reads that from the WAL:
//! the publication carries inserts only, so an UPDATE or DELETE later in
//! the same transaction never reaches the relay, and the inserted version
//! (a stale payload, or an event for a row that no longer exists) is what
//! gets published; polling reads the committed row, so it would publish
//! the updated one, or nothing. The guard (two row triggers shipped in the
//! migration) refuses the statements that would make the two differ:
//!
//! - an UPDATE of an unsent row's event columns (any column but `sent_at`),
//!   in any transaction: replication has already taken the inserted
//!   version. Rows marked sent (a dead letter being repaired before a
//!   replay) may still be changed.
//! - a DELETE of a row by the transaction that inserted it. A DELETE of an
//!   unsent row by a later transaction is not refused: the relay's own
//!   `after_publish: delete` is exactly that, and the trigger cannot tell
//!   the two apart. It does not withdraw the event (README).
//!
//! Why not publish UPDATE and DELETE and apply them to the pending insert
//! instead: every mark the relay writes is an UPDATE of the outbox, so the
//! walsender would send each row a second time, whole, for the relay to
//! throw away; and the events of a transaction larger than a batch are in
//! Kafka before its later changes arrive, so applying them would mean
//! holding whole transactions in memory. Nor re-read each streamed row by
//! seq: a query per batch for every user, to support writers that break the
//! contract.
//!
//! The guard costs the relay no WAL: its marks set only `sent_at` (an
//! `UPDATE OF` trigger on other columns never fires) and its deletes are of
//! rows other transactions inserted (the `WHEN` is false). The triggers are
//! AFTER triggers on purpose: Postgres locks each row a BEFORE row trigger
//! might fire for, even when it then does not, which pg_waldump showed as
//! one extra `Heap/LOCK` record per marked or deleted row (about 54 bytes
//! each); AFTER triggers fetch the old row without locking it, and their
//! records for 10,000 marks and deletes are the same as without the guard.

use sqlx::PgConnection;

use crate::error::{Error, Result};
use crate::table::{quote_ident, OutboxTable};

/// The guard's triggers on `table`: (update, delete).
pub fn trigger_names(table: &OutboxTable) -> (String, String) {
    (
        format!("{}_insert_only_update", table.name),
        format!("{}_insert_only_delete", table.name),
    )
}

/// The migration's statements for the guard (idempotent).
pub fn create_sql(table: &OutboxTable) -> String {
    let c = &table.columns;
    let qualified = table.qualified();
    let function = format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&format!("{}_insert_only", table.name))
    );
    // Every configured column but sent_at: what the relay publishes.
    let event_columns: Vec<String> = c
        .all()
        .into_iter()
        .filter(|name| *name != c.sent_at)
        .map(quote_ident)
        .collect();
    let (update_trigger, delete_trigger) = trigger_names(table);
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$\n\
         BEGIN\n    \
         RAISE EXCEPTION 'outbox rows are insert-only: % of unsent row % (event id %) of %.% refused',\n        \
         TG_OP, OLD.{seq}, OLD.{id}, TG_TABLE_SCHEMA, TG_TABLE_NAME\n        \
         USING HINT = 'Write the event''s final content in its INSERT: the relay publishes the row as \
         inserted, and an UPDATE or DELETE before COMMIT would never reach Kafka (see the outboxd docs, \
         docs/adding-the-outbox.md: Outbox rows are insert-only).';\n\
         END\n\
         $$;\n\
         CREATE OR REPLACE TRIGGER {update_trigger} AFTER UPDATE OF {event_columns} ON {qualified}\n    \
         FOR EACH ROW WHEN (OLD.{sent_at} IS NULL) EXECUTE FUNCTION {function}();\n\
         CREATE OR REPLACE TRIGGER {delete_trigger} AFTER DELETE ON {qualified}\n    \
         FOR EACH ROW WHEN (OLD.{sent_at} IS NULL AND OLD.xmin = pg_current_xact_id_if_assigned()::xid)\n    \
         EXECUTE FUNCTION {function}();\n",
        seq = quote_ident(&c.seq),
        id = quote_ident(&c.id),
        sent_at = quote_ident(&c.sent_at),
        event_columns = event_columns.join(", "),
        update_trigger = quote_ident(&update_trigger),
        delete_trigger = quote_ident(&delete_trigger),
    )
}

/// Whether both guard triggers exist on the table and are enabled.
pub async fn is_guarded(connection: &mut PgConnection, table: &OutboxTable) -> Result<bool> {
    let (update_trigger, delete_trigger) = trigger_names(table);
    let enabled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) \
         AND tgname IN ($2, $3) AND tgenabled <> 'D'",
    )
    .bind(table.qualified())
    .bind(update_trigger)
    .bind(delete_trigger)
    .fetch_one(&mut *connection)
    .await
    .map_err(|e| Error::from_postgres("looking for the insert-only guard", e))?;
    Ok(enabled == 2)
}

/// What a missing guard means, for `check` and the relay's start-up log.
pub fn unguarded_warning(table: &OutboxTable) -> String {
    let (update_trigger, delete_trigger) = trigger_names(table);
    format!(
        "{outbox} has no insert-only guard (triggers {update_trigger} and {delete_trigger}): a \
         transaction that UPDATEs or DELETEs an outbox row after inserting it (an ORM's insert, \
         then patch) gets the row published as INSERTed in replication mode (a stale payload, or \
         an event for a row that was deleted) but as committed in polling mode, and nothing \
         warns. Outbox rows are insert-only; run `outboxd migrate` (or apply the guard from \
         migrations/0001_outbox.sql) so such a transaction fails instead",
        outbox = table.display_name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relays_own_column_is_not_guarded() {
        let sql = create_sql(&OutboxTable::named("outbox").unwrap());
        assert!(
            sql.contains(
                "AFTER UPDATE OF \"seq\", \"id\", \"aggregatetype\", \"aggregateid\", \"type\", \
                 \"payload\", \"headers\", \"tracingspancontext\", \"created_at\" ON"
            ),
            "{sql}"
        );
        assert!(!sql.contains("UPDATE OF \"sent_at\""), "{sql}");
    }
}
