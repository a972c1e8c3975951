//! The replay record: `<outbox>_replayed`, one row per dead-lettered row
//! that `outboxd dead-letters replay` put back into the outbox.
//!
//! Invariant: a dead-lettered row (its event id and seq) is re-inserted at
//! most once, whatever `relay.after_publish` does to the copy. The copy
//! itself cannot be that record: with `after_publish: delete` (or
//! `relay.retention`) it is gone once published, while the dead-lettered
//! original stays (poison rows are marked, never deleted), so a later
//! replay would find nothing and insert it again: a second publication of
//! the event. The record row and the copy are written in one transaction,
//! so neither exists without the other; the record's primary key refuses a
//! second one even if two replays race past the advisory lock.
//!
//! Keyed by event id *and* the dead-lettered row's seq, not the id alone: a
//! copy that is poison again is dead-lettered again under its own seq, and
//! replaying that one (after the next fix) must still be possible.

use sqlx::PgConnection;

use crate::error::{Error, Result};
use crate::table::{quote_ident, OutboxTable};

/// The record table's name for `table`: `<name>_replayed`, same schema.
pub fn name(table: &OutboxTable) -> String {
    format!("{}_replayed", table.name)
}

/// `"schema"."<name>_replayed"`.
pub fn qualified(table: &OutboxTable) -> String {
    format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&name(table))
    )
}

/// `schema.<name>_replayed` for people.
pub fn display_name(table: &OutboxTable) -> String {
    format!("{}.{}", table.schema, name(table))
}

/// The migration's statement creating the record table (idempotent).
pub fn create_sql(table: &OutboxTable) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {qualified} (\n    \
         \"event_id\"        text NOT NULL,\n    \
         \"dead_letter_seq\" bigint NOT NULL,\n    \
         \"replayed_as_seq\" bigint,\n    \
         \"replayed_at\"     timestamptz NOT NULL DEFAULT now(),\n    \
         PRIMARY KEY (\"event_id\", \"dead_letter_seq\")\n);\n",
        qualified = qualified(table)
    )
}

/// Records that the dead-lettered row (`$1` event id as text, `$2` seq)
/// was replayed as `$3` (NULL: an older release's copy was found instead).
/// Returns a row only when the record is new.
pub fn insert_sql(table: &OutboxTable) -> String {
    format!(
        "INSERT INTO {} (\"event_id\", \"dead_letter_seq\", \"replayed_as_seq\") \
         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true",
        qualified(table)
    )
}

/// Whether the dead-lettered row (`$1` event id as text, `$2` seq) was
/// replayed before.
pub fn exists_sql(table: &OutboxTable) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE \"event_id\" = $1 AND \"dead_letter_seq\" = $2)",
        qualified(table)
    )
}

/// What the role connected as may do with the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// The table is missing (an install migrated before it existed).
    Missing,
    /// Present; `missing_privileges` lists what this role lacks to replay
    /// (`INSERT on …`), empty when it may.
    Present { missing_privileges: Vec<String> },
}

/// Looks the record table up, and what replaying needs that this role lacks.
pub async fn inspect(connection: &mut PgConnection, table: &OutboxTable) -> Result<State> {
    let record = qualified(table);
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&record)
        .fetch_one(&mut *connection)
        .await
        .map_err(|e| Error::from_postgres("looking up the replay record table", e))?;
    if !exists {
        return Ok(State::Missing);
    }
    // A missing outbox table is reported on its own (check, the relay);
    // asking for privileges on it would only fail here too.
    let outbox_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table.qualified())
        .fetch_one(&mut *connection)
        .await
        .map_err(|e| Error::from_postgres("looking up the outbox table", e))?;
    let mut missing_privileges = Vec::new();
    let wanted = [
        (table.qualified(), "INSERT", table.display_name()),
        (record.clone(), "SELECT", display_name(table)),
        (record.clone(), "INSERT", display_name(table)),
    ];
    for (relation, privilege, shown) in wanted.into_iter().skip(usize::from(!outbox_exists)) {
        let granted: bool = sqlx::query_scalar("SELECT has_table_privilege($1, $2)")
            .bind(&relation)
            .bind(privilege)
            .fetch_one(&mut *connection)
            .await
            .map_err(|e| Error::from_postgres("checking the replay privileges", e))?;
        if !granted {
            missing_privileges.push(format!("{privilege} on {shown}"));
        }
    }
    Ok(State::Present { missing_privileges })
}

/// Why `replay` refuses to run, or `None` when it may: the operator's next
/// step is in the message.
pub fn refusal(state: &State, table: &OutboxTable) -> Option<String> {
    match state {
        State::Missing => Some(format!(
            "{record} is missing: it records which dead letters were replayed, so that none is \
             inserted (and published) twice once its copy has been published and deleted. \
             Nothing was replayed. Run `outboxd migrate` (or apply the {record} statement of \
             migrations/0001_outbox.sql) as the owner of {outbox}; the role running `replay` \
             needs INSERT on {outbox} and SELECT, INSERT on {record}",
            record = display_name(table),
            outbox = table.display_name(),
        )),
        State::Present { missing_privileges } if !missing_privileges.is_empty() => Some(format!(
            "the role lacks {} to replay dead letters. Nothing was replayed. Grant it (see the \
             grants at the end of migrations/0001_outbox.sql), or run `replay` with a config whose \
             postgres.url names a role that has them",
            missing_privileges.join(", ")
        )),
        State::Present { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_after_the_outbox_table_in_its_schema() {
        let table = OutboxTable::named("sales.order events").unwrap();
        assert_eq!(qualified(&table), "\"sales\".\"order events_replayed\"");
        assert!(create_sql(&table)
            .starts_with("CREATE TABLE IF NOT EXISTS \"sales\".\"order events_replayed\" ("));
    }

    #[test]
    fn a_missing_record_refuses_with_the_fix() {
        let table = OutboxTable::named("outbox").unwrap();
        let refusal = refusal(&State::Missing, &table).unwrap();
        assert!(
            refusal.contains("public.outbox_replayed is missing"),
            "{refusal}"
        );
        assert!(refusal.contains("outboxd migrate"), "{refusal}");
        assert!(refusal.contains("INSERT on public.outbox"), "{refusal}");
        let granted = State::Present {
            missing_privileges: Vec::new(),
        };
        assert_eq!(super::refusal(&granted, &table), None);
    }
}
