//! The outbox migration: the table, its unsent-rows index, the NOTIFY
//! trigger and the publication, rendered for the configured names.
//!
//! Invariant: rendered with the default config, the SQL is byte for byte
//! `migrations/0001_outbox.sql` (a test keeps them equal), so the file a
//! service copies and what `outboxd migrate` applies never drift apart.
//! Every statement is idempotent, so migrating twice changes nothing.

use sqlx::{Connection, PgConnection};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::table::{quote_ident, quote_literal, OutboxTable};

/// The file shipped for services to copy.
pub const MIGRATION_FILE: &str = "migrations/0001_outbox.sql";

/// The migration SQL for `table`.
pub fn render(table: &OutboxTable, notify_channel: &str, publication: &str) -> String {
    let c = &table.columns;
    let column = |name: &str| format!("{:<20}", quote_ident(name));
    let mut columns = vec![
        format!(
            "    {} bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            column(&c.seq)
        ),
        format!(
            "    {} uuid NOT NULL DEFAULT gen_random_uuid()",
            column(&c.id)
        ),
        format!("    {} text NOT NULL", column(&c.aggregate_type)),
        format!("    {} text NOT NULL", column(&c.aggregate_id)),
        format!("    {} text NOT NULL", column(&c.event_type)),
        format!("    {} jsonb", column(&c.payload)),
    ];
    if let Some(headers) = &c.headers {
        columns.push(format!("    {} jsonb", column(headers)));
    }
    if let Some(trace) = &c.tracing_span_context {
        columns.push(format!("    {} text", column(trace)));
    }
    columns.push(format!(
        "    {} timestamptz NOT NULL DEFAULT now()",
        column(&c.created_at)
    ));
    columns.push(format!("    {} timestamptz", column(&c.sent_at)));

    let qualified = table.qualified();
    let index = quote_ident(&format!("{}_unsent_idx", table.name));
    let function = format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&format!("{}_notify", table.name))
    );
    let trigger = quote_ident(&format!("{}_notify", table.name));
    format!(
        "-- outboxd: the outbox table. Column names follow Debezium's Outbox Event Router.\n\
         -- Copy this file into your service's migrations, or run `outboxd migrate`.\n\
         -- Every statement is idempotent.\n\
         \n\
         CREATE TABLE IF NOT EXISTS {qualified} (\n{columns}\n);\n\
         \n\
         -- The relay claims unsent rows in seq order; this index keeps that cheap\n\
         -- however many sent rows the table holds.\n\
         CREATE INDEX IF NOT EXISTS {index} ON {qualified} ({seq}) WHERE {sent_at} IS NULL;\n\
         \n\
         -- Wakes the relay when a transaction that inserted events commits, so\n\
         -- latency is not a poll interval. Statement-level: one notification per\n\
         -- INSERT, however many rows; none for rolled-back transactions.\n\
         CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$\n\
         BEGIN\n    PERFORM pg_notify({channel}, '');\n    RETURN NULL;\nEND\n$$;\n\
         CREATE OR REPLACE TRIGGER {trigger} AFTER INSERT ON {qualified}\n    \
         FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n\
         \n\
         -- For capture.mode replication: inserts on the outbox table only.\n\
         DO $$\nBEGIN\n    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {publication_literal}) THEN\n        \
         CREATE PUBLICATION {publication} FOR TABLE {qualified} WITH (publish = 'insert');\n    END IF;\nEND\n$$;\n\
         \n\
         -- A least-privilege role for the relay (run as an administrator, with a real password):\n\
         -- CREATE ROLE outboxd LOGIN PASSWORD 'change-me';\n\
         -- GRANT USAGE ON SCHEMA {schema} TO outboxd;\n\
         -- GRANT SELECT, UPDATE ({sent_at}) ON {qualified} TO outboxd;\n\
         -- GRANT DELETE ON {qualified} TO outboxd;      -- only for relay.after_publish: delete\n\
         -- ALTER ROLE outboxd REPLICATION;              -- only for capture.mode: replication\n",
        columns = columns.join(",\n"),
        seq = quote_ident(&c.seq),
        sent_at = quote_ident(&c.sent_at),
        channel = quote_literal(notify_channel),
        publication_literal = quote_literal(publication),
        publication = quote_ident(publication),
        schema = quote_ident(&table.schema),
    )
}

/// Applies the migration in one transaction, serialised by an advisory lock
/// so two relays starting together do not race on `IF NOT EXISTS`.
pub async fn apply(config: &Config) -> Result<OutboxTable> {
    let table = OutboxTable::from_config(&config.postgres)
        .map_err(|e| Error::stop(format!("postgres.{e}")))?;
    let sql = render(
        &table,
        &config.postgres.notify_channel,
        &config.postgres.publication,
    );
    let mut connection = PgConnection::connect(&config.postgres.url)
        .await
        .map_err(|e| Error::from_postgres("connecting to Postgres", e))?;
    let mut transaction = connection
        .begin()
        .await
        .map_err(|e| Error::from_postgres("starting the migration", e))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('outboxd:migrate', 0))")
        .execute(&mut *transaction)
        .await
        .map_err(|e| Error::from_postgres("taking the migration lock", e))?;
    sqlx::raw_sql(&sql)
        .execute(&mut *transaction)
        .await
        .map_err(|e| {
            Error::from_postgres(
                &format!("applying the migration to {}", table.display_name()),
                e,
            )
        })?;
    transaction
        .commit()
        .await
        .map_err(|e| Error::from_postgres("committing the migration", e))?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PostgresConfig;

    fn default_table() -> OutboxTable {
        let config: PostgresConfig =
            serde_json::from_value(serde_json::json!({ "url": "postgres://localhost/db" }))
                .unwrap();
        OutboxTable::from_config(&config).unwrap()
    }

    #[test]
    fn default_rendering_is_the_shipped_migration_file() {
        let shipped = include_str!("../migrations/0001_outbox.sql");
        let rendered = render(&default_table(), "outbox_inserted", "outbox_publication");
        assert_eq!(
            rendered, shipped,
            "regenerate the file: cargo run -- migrate --print > {MIGRATION_FILE}"
        );
    }

    #[test]
    fn custom_names_are_quoted_everywhere() {
        let mut table = default_table();
        table.schema = "sales".into();
        table.name = "order events".into();
        table.columns.headers = None;
        let sql = render(&table, "chan'nel", "pub");
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"sales\".\"order events\""));
        assert!(sql.contains("\"order events_unsent_idx\""));
        assert!(sql.contains("pg_notify('chan''nel', '')"));
        assert!(!sql.contains("\"headers\""));
    }
}
