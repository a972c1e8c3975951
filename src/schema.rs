//! What the live database says about the outbox table: does it exist, has it
//! the configured columns, what type is the payload, may the relay use it.
//!
//! Invariant: the relay never claims from a table it has not inspected, so a
//! wrong name or a missing privilege is a clear message at start-up rather
//! than an error deep inside a batch.

use sqlx::{PgConnection, Row};

use crate::error::{Error, Result};
use crate::table::{quote_ident, OutboxTable, PayloadEncoding};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub payload_encoding: PayloadEncoding,
    /// Configured columns the table lacks.
    pub missing_columns: Vec<String>,
    /// Privileges the relay's role lacks, as `SELECT`, `UPDATE (sent_at)`, …
    pub missing_privileges: Vec<String>,
    /// The relay's role (`current_user`), as an SQL identifier: what the
    /// `GRANT`s in the messages name.
    pub role: String,
    /// Whether an insert trigger on the table calls `pg_notify`.
    pub has_notify_trigger: bool,
    /// Whether the table is partitioned (whatever `postgres.partitioning` says).
    pub partitioned: bool,
}

impl TableReport {
    /// The problems that stop the relay, one sentence each.
    pub fn problems(&self, table: &OutboxTable) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.missing_columns.is_empty() {
            problems.push(format!(
                "table {} lacks column(s) {}; fix postgres.columns in the config or add them",
                table.display_name(),
                self.missing_columns.join(", ")
            ));
        }
        for privilege in &self.missing_privileges {
            problems.push(format!(
                "the relay's role {role} lacks {privilege} on {table}, which it needs to {why}; \
                 as the table's owner (or an administrator) run: {grant}",
                role = self.role,
                table = table.display_name(),
                why = privilege_purpose(privilege),
                grant = self.grant(privilege, table),
            ));
        }
        problems
    }

    /// The statement that gives the relay's role `privilege` (one of
    /// `missing_privileges`) on the table.
    pub fn grant(&self, privilege: &str, table: &OutboxTable) -> String {
        let privilege = if privilege.starts_with("UPDATE") {
            format!("UPDATE ({})", quote_ident(&table.columns.sent_at))
        } else {
            privilege.to_string()
        };
        format!(
            "GRANT {privilege} ON {} TO {};",
            table.qualified(),
            self.role
        )
    }

    /// When the table's shape and `postgres.partitioning` disagree: what
    /// the relay does instead, and how to make them agree. `None` when they do.
    pub fn partitioning_mismatch(&self, table: &OutboxTable) -> Option<String> {
        match (self.partitioned, table.partitioning.is_some()) {
            (true, false) => Some(format!(
                "table {} is partitioned but postgres.partitioning is not set, so outboxd creates no \
                 partitions and relay.retention deletes rows one by one; set postgres.partitioning",
                table.display_name()
            )),
            (false, true) => Some(format!(
                "postgres.partitioning is set but table {} is not partitioned, so outboxd treats it as \
                 a plain table; `outboxd migrate` partitions only a new table (docs/operations.md: Partitioning)",
                table.display_name()
            )),
            _ => None,
        }
    }
}

/// What the relay does with a privilege, for the message that asks for it.
fn privilege_purpose(privilege: &str) -> &'static str {
    if privilege == "SELECT" {
        "read the rows it publishes"
    } else if privilege.starts_with("UPDATE") {
        "mark published rows sent (and claim rows FOR UPDATE when polling)"
    } else {
        "delete published rows (relay.after_publish: delete, relay.retention)"
    }
}

/// Inspects the table. A missing table is an error telling how to create it.
/// `deletes_rows`: the relay deletes rows (`relay.after_publish: delete` or
/// `relay.retention`), so its role needs `DELETE`.
pub async fn inspect(
    connection: &mut PgConnection,
    table: &OutboxTable,
    deletes_rows: bool,
) -> Result<TableReport> {
    let qualified = table.qualified();
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&qualified)
        .fetch_one(&mut *connection)
        .await
        .map_err(|e| Error::from_postgres("looking up the outbox table", e))?;
    if exists.is_none() {
        return Err(Error::stop(format!(
            "the outbox table {} does not exist; create it with `outboxd migrate --config FILE` \
             or add migrations/0001_outbox.sql to your service's migrations",
            table.display_name()
        ))
        .because(crate::error::Cause::OutboxTable));
    }

    let columns = sqlx::query(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
    )
    .bind(&qualified)
    .fetch_all(&mut *connection)
    .await
    .map_err(|e| Error::from_postgres("reading the outbox table's columns", e))?;
    let column_type = |name: &str| {
        columns
            .iter()
            .find(|row| row.try_get::<String, _>(0).is_ok_and(|n| n == name))
            .and_then(|row| row.try_get::<String, _>(1).ok())
    };
    let missing_columns = table
        .columns
        .all()
        .into_iter()
        .filter(|name| column_type(name).is_none())
        .map(str::to_string)
        .collect();
    let payload_encoding = column_type(&table.columns.payload).map_or(PayloadEncoding::Text, |t| {
        PayloadEncoding::from_type_name(&t)
    });

    let mut missing_privileges = Vec::new();
    let has = |sql: &'static str, column: Option<&str>| {
        let mut query = sqlx::query_scalar::<_, bool>(sql).bind(qualified.clone());
        if let Some(column) = column {
            query = query.bind(column.to_string());
        }
        query
    };
    let checks: Vec<(String, _)> = vec![
        (
            "SELECT".to_string(),
            has("SELECT has_table_privilege($1, 'SELECT')", None),
        ),
        (
            format!("UPDATE ({})", table.columns.sent_at),
            has(
                "SELECT has_column_privilege($1, $2, 'UPDATE')",
                Some(&table.columns.sent_at),
            ),
        ),
    ];
    for (name, query) in checks {
        let granted = query
            .fetch_one(&mut *connection)
            .await
            .map_err(|e| Error::from_postgres("checking privileges", e))?;
        if !granted {
            missing_privileges.push(name);
        }
    }
    if deletes_rows {
        let granted: bool = sqlx::query_scalar("SELECT has_table_privilege($1, 'DELETE')")
            .bind(&qualified)
            .fetch_one(&mut *connection)
            .await
            .map_err(|e| Error::from_postgres("checking privileges", e))?;
        if !granted {
            missing_privileges.push("DELETE".to_string());
        }
    }

    let has_notify_trigger: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
         WHERE t.tgrelid = to_regclass($1) AND NOT t.tgisinternal AND p.prosrc LIKE '%pg_notify%')",
    )
    .bind(&qualified)
    .fetch_one(&mut *connection)
    .await
    .map_err(|e| Error::from_postgres("looking for the notify trigger", e))?;

    let role: String = sqlx::query_scalar("SELECT quote_ident(current_user)")
        .fetch_one(&mut *connection)
        .await
        .map_err(|e| Error::from_postgres("reading the relay's role", e))?;

    let partitioned = crate::partitions::is_partitioned(connection, table)
        .await
        .map_err(|e| Error::from_postgres("reading the outbox table's kind", e))?
        .unwrap_or(false);

    Ok(TableReport {
        payload_encoding,
        missing_columns,
        missing_privileges,
        role,
        has_notify_trigger,
        partitioned,
    })
}

/// `<system identifier>/<database>`: which Postgres database the table
/// lives in, for the relay's Kafka identity (`kafka::identity`). A physical
/// replica promoted in a failover keeps the system identifier. `None` if
/// the role may not read it; the identity then falls back to `relay.name`.
pub async fn database_source(
    connection: &mut PgConnection,
) -> crate::error::Result<Option<String>> {
    let source: std::result::Result<String, sqlx::Error> = sqlx::query_scalar(
        "SELECT system_identifier::text || '/' || current_database() FROM pg_control_system()",
    )
    .fetch_one(&mut *connection)
    .await;
    match source {
        Ok(source) => Ok(Some(source)),
        // Only a missing grant means the relay.name stand-in; anything else
        // (a dropped connection, a failover in progress) would change the
        // relay's identity by accident, so the session is retried instead.
        // 42501: no EXECUTE grant; 42883 / 0A000: a platform that lacks or
        // disables the function.
        Err(sqlx::Error::Database(error))
            if matches!(error.code().as_deref(), Some("42501" | "42883" | "0A000")) =>
        {
            tracing::warn!(
                %error,
                "cannot read pg_control_system(), so the relay's Kafka identity (transactional.id, \
                 checkpoint key) names relay.name instead of the database; grant EXECUTE on \
                 pg_control_system() to the relay's role so a renamed relay still fences the old \
                 one. Granting it later, or taking it away again, is safe: the relay finds what \
                 its earlier identity published, fences it and marks those rows"
            );
            Ok(None)
        }
        Err(error) => Err(crate::error::Error::retry(format!(
            "reading the database's system identifier (pg_control_system()): {error}; the \
             relay's Kafka identity depends on it, so the session is retried rather than run \
             under another identity"
        ))
        .because(crate::error::Cause::Postgres)),
    }
}

/// `<system identifier>/<database>` read over a replication connection
/// (`IDENTIFY_SYSTEM`, which needs no grant), the same text
/// [`database_source`] reads with `pg_control_system()`. Unmarked rows
/// (`relay.after_publish: none`) need an identity that does not change
/// when that grant is given or taken: a new identity finds no checkpoint,
/// and without one the relay would take rows published unmarked for unsent.
pub async fn source_by_replication(
    config: &crate::config::Config,
    connection: &mut PgConnection,
) -> crate::error::Result<String> {
    let probe = crate::capture::wire::StreamTarget {
        slot: config.slot_name(),
        publication: config.postgres.publication.clone(),
        confirmed_flush: crate::postgres::lsn::Lsn(0),
        start_at: None,
        application_name: format!("outboxd-{}", config.relay.name),
    };
    let wal = crate::capture::wire::wal_history(&config.postgres.url, &probe).await?;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *connection)
        .await
        .map_err(|e| crate::error::Error::from_postgres("reading the database's name", e))?;
    Ok(format!("{}/{database}", wal.system_identifier))
}
