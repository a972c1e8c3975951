//! The outbox migration: the table, its unsent-rows index, the NOTIFY
//! trigger, the insert-only guard, the replay record and the publication,
//! rendered for the configured names.
//!
//! Invariant: rendered with the default config, the SQL is byte for byte
//! `migrations/0001_outbox.sql` (with `postgres.partitioning`,
//! `migrations/partitioned/0001_outbox.sql`; tests keep them equal), so the
//! file a service copies and what `outboxd migrate` applies never drift
//! apart. Every statement is idempotent, so migrating twice changes nothing.

use sqlx::{ConnectOptions, Connection};

use crate::error::{Error, Result};
use crate::setup::Setup;
use crate::table::{quote_ident, quote_literal, OutboxTable};

/// The file shipped for services to copy.
pub const MIGRATION_FILE: &str = "migrations/0001_outbox.sql";
/// The same for a table partitioned by `created_at`.
pub const PARTITIONED_MIGRATION_FILE: &str = "migrations/partitioned/0001_outbox.sql";

/// The migration SQL for `table`.
pub fn render(table: &OutboxTable, notify_channel: &str, publication: &str) -> String {
    let c = &table.columns;
    let partitioned = table.partitioning.is_some();
    let column = |name: &str| format!("{:<20}", quote_ident(name));
    let mut columns = vec![
        format!(
            "    {} bigint GENERATED ALWAYS AS IDENTITY{}",
            column(&c.seq),
            // A partitioned table's unique keys must hold the partition key.
            if partitioned { "" } else { " PRIMARY KEY" }
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
    let mut partitions = String::new();
    let mut publication_options = "publish = 'insert'";
    if partitioned {
        columns.push(format!(
            "    PRIMARY KEY ({}, {})",
            quote_ident(&c.seq),
            quote_ident(&c.created_at)
        ));
        partitions = format!(
            " PARTITION BY RANGE ({created_at});\n\
             \n\
             -- Catches rows no range partition covers, so an insert never fails. The\n\
             -- relay (or `outboxd migrate`, run by the table's owner) creates the range\n\
             -- partitions ahead of time: {name}_pYYYYMMDD, one per postgres.partitioning.interval.\n\
             CREATE TABLE IF NOT EXISTS {default} PARTITION OF {qualified} DEFAULT",
            created_at = quote_ident(&c.created_at),
            name = table.name,
            default = crate::partitions::default_partition(table).qualified(),
            qualified = table.qualified(),
        );
        // Changes then carry the outbox table's name, not a partition's.
        publication_options = "publish = 'insert', publish_via_partition_root = true";
    }

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
         CREATE TABLE IF NOT EXISTS {qualified} (\n{columns}\n){partitions};\n\
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
         -- Outbox rows are insert-only: the row as inserted is the event. Replication\n\
         -- publishes what the INSERT wrote, so a change before COMMIT would never reach\n\
         -- Kafka (polling would publish the committed row). This guard refuses changing\n\
         -- an unsent row's event columns, and deleting a row in the transaction that\n\
         -- inserted it. The relay's marks (sent_at only) and deletes never trip it.\n\
         {insert_only}\
         \n\
         -- `outboxd dead-letters replay` records each dead-lettered row it put back, so\n\
         -- none is inserted (and published) twice, also once the copy was published\n\
         -- and deleted (relay.after_publish: delete, relay.retention).\n\
         {replay_record}\
         \n\
         -- For capture.mode replication: inserts on the outbox table only.\n\
         DO $$\nBEGIN\n    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {publication_literal}) THEN\n        \
         CREATE PUBLICATION {publication} FOR TABLE {qualified} WITH ({publication_options});\n    END IF;\nEND\n$$;\n\
         \n\
         -- A least-privilege role for the relay (run as an administrator, with a real\n\
         -- password; the GRANTs ON the table may also be run by its owner). Whoever runs\n\
         -- this file owns the table and the publication; the relay needs to own neither.\n\
         -- `outboxd check`, run as the relay's role, names each of these it lacks.\n\
         -- CREATE ROLE outboxd LOGIN PASSWORD 'change-me';\n\
         -- GRANT USAGE ON SCHEMA {schema} TO outboxd;\n\
         -- GRANT SELECT, UPDATE ({sent_at}) ON {qualified} TO outboxd;\n\
         -- GRANT DELETE ON {qualified} TO outboxd;  -- only for relay.after_publish: delete or relay.retention\n\
         -- ALTER ROLE outboxd WITH REPLICATION;  -- only for capture.mode: replication or auto (Amazon RDS/Aurora: GRANT rds_replication TO outboxd)\n\
         -- GRANT pg_read_all_stats TO outboxd;  -- only with synchronous standbys (capture.wait_for_sync_standbys)\n\
         -- GRANT EXECUTE ON FUNCTION pg_control_system() TO outboxd;  -- only where it was revoked from PUBLIC (PUBLIC may execute it by default)\n\
         -- Only for running `outboxd dead-letters replay` as this role:\n\
         -- GRANT INSERT ON {qualified} TO outboxd;\n\
         -- GRANT SELECT, INSERT ON {replay_record_table} TO outboxd;\n",
        insert_only = crate::insert_only::create_sql(table),
        replay_record = crate::replay_record::create_sql(table),
        replay_record_table = crate::replay_record::qualified(table),
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
/// so two relays starting together do not race on `IF NOT EXISTS`. A
/// partitioned table then gets its current and next partitions; running
/// it again (from a scheduled job, as the owner) keeps them ahead.
pub async fn apply(setup: &Setup) -> Result<OutboxTable> {
    let config = &setup.config;
    let table = &setup.table;
    let sql = render(
        table,
        &config.postgres.notify_channel,
        &config.postgres.publication,
    );
    let mut connection = setup
        .connect_options
        .connect()
        .await
        .map_err(|e| Error::from_postgres("connecting to Postgres", e))?;
    let partitioned = crate::partitions::is_partitioned(&mut connection, table)
        .await
        .map_err(|e| Error::from_postgres("looking up the outbox table", e))?;
    if partitioned == Some(false) && table.partitioning.is_some() {
        return Err(Error::stop(format!(
            "postgres.partitioning is set but {} already exists as a plain table; migrate does \
             not convert a table (docs/adding-the-outbox.md: Moving an existing table to a partitioned one). Remove \
             postgres.partitioning to keep it plain",
            table.display_name()
        )));
    }
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
    if let Some(partitioning) = &table.partitioning {
        let created = crate::partitions::create_ahead(&mut connection, table, partitioning)
            .await
            .map_err(|e| {
                Error::from_postgres(
                    &format!("creating the partitions of {}", table.display_name()),
                    e,
                )
            })?;
        if !created.is_empty() {
            tracing::info!(?created, "created outbox partitions");
        }
    }
    Ok(table.clone())
}

/// The migration of a WAL-message outbox (`capture.source: messages`):
/// the helper function (in `postgres.table`'s schema, `public` by
/// default) and the empty publication.
pub fn render_messages(config: &crate::config::Config, schema: &str) -> String {
    crate::capture::message_encoding::migration_sql(
        schema,
        &config.capture.message_prefix,
        &config.postgres.publication,
    )
}

/// The schema's `outboxd_emit`, if one exists, emits this outbox's prefix:
/// replacing another message outbox's function would send that outbox's
/// events here. Either way of naming the database reaches this check,
/// which the config's own (by URL text) cannot promise.
async fn refuse_another_prefixs_function(
    connection: &mut sqlx::PgConnection,
    setup: &Setup,
) -> Result<()> {
    use crate::capture::message_encoding::{function_emits_prefix, EMIT_FUNCTION};
    let prefix = &setup.config.capture.message_prefix;
    let source: Option<String> = sqlx::query_scalar(
        "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = $1 AND p.proname = $2 LIMIT 1",
    )
    .bind(&setup.table.schema)
    .bind(EMIT_FUNCTION)
    .fetch_optional(&mut *connection)
    .await
    .map_err(|e| Error::from_postgres("reading the existing emit function", e))?;
    match source {
        Some(source) if !function_emits_prefix(&source, prefix) => Err(Error::stop(format!(
            "{schema}.{EMIT_FUNCTION}() exists and emits another prefix than `{prefix}` \
             (another message outbox's?). Replacing it would send that outbox's events to \
             this one. Give each message outbox its own schema (postgres.table: \
             <schema>.outbox names the schema of its function), or drop the old function if \
             nothing uses it",
            schema = setup.table.schema
        ))),
        _ => Ok(()),
    }
}

/// Applies [`render_messages`] in one transaction, then creates the slot
/// if it is missing: a message reaches only the slots that existed when it
/// was written, so the slot must exist before services emit, and this is
/// the step that runs before them. A slot cannot be created in a
/// transaction that wrote, hence after the commit. Returns what was done.
pub async fn apply_messages(setup: &Setup) -> Result<String> {
    let config = &setup.config;
    let mut connection = setup
        .connect_options
        .connect()
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
    refuse_another_prefixs_function(&mut transaction, setup).await?;
    sqlx::raw_sql(&render_messages(config, &setup.table.schema))
        .execute(&mut *transaction)
        .await
        .map_err(|e| Error::from_postgres("creating the message outbox's function", e))?;
    transaction
        .commit()
        .await
        .map_err(|e| Error::from_postgres("committing the migration", e))?;
    let slot_name = config.slot_name();
    let function = format!(
        "{}.{}",
        quote_ident(&setup.table.schema),
        crate::capture::message_encoding::EMIT_FUNCTION
    );
    let slot = match crate::capture::slot::inspect(&mut connection, &slot_name).await? {
        Some(info) if info.is_lost() => {
            return Err(Error::stop(format!(
                "replication slot `{slot_name}` is lost (wal_status = lost); messages may be \
                 lost with it. Start the relay to see what to do; migrate does not replace it"
            )))
        }
        Some(_) => format!("slot `{slot_name}` exists"),
        None => {
            let at = crate::capture::slot::create(&mut connection, &slot_name)
                .await
                .map_err(|e| {
                    Error::stop(format!(
                        "{e}. The slot must exist before services emit messages; run migrate as a \
                         role with REPLICATION, or create it: SELECT \
                         pg_create_logical_replication_slot('{slot_name}', 'pgoutput')"
                    ))
                })?;
            format!("created slot `{slot_name}` at {at}: every message committed after it is kept for the relay")
        }
    };
    Ok(format!(
        "message outbox with prefix `{}` is ready: {function}(), publication `{}`, {slot}",
        config.capture.message_prefix, config.postgres.publication
    ))
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
    fn partitioned_rendering_is_the_shipped_partitioned_file() {
        let shipped = include_str!("../migrations/partitioned/0001_outbox.sql");
        let mut table = default_table();
        table.partitioning = Some(crate::config::Partitioning {
            interval: std::time::Duration::from_secs(86_400),
            ahead: 3,
        });
        let rendered = render(&table, "outbox_inserted", "outbox_publication");
        assert_eq!(
            rendered, shipped,
            "regenerate the file: cargo run -- migrate --print (with postgres.partitioning) > {PARTITIONED_MIGRATION_FILE}"
        );
        assert!(rendered.contains(
            "PRIMARY KEY (\"seq\", \"created_at\")\n) PARTITION BY RANGE (\"created_at\");"
        ));
        assert!(rendered.contains("publish_via_partition_root = true"));
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
