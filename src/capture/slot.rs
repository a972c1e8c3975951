//! The replication slot and publication: what the server allows, what
//! exists, and creating what is missing.
//!
//! Invariant: a slot is streamed from only if it is a logical `pgoutput`
//! slot of this database that still has its WAL; anything else is reported
//! with what to do, never silently reused. The publication is created only
//! when missing; an existing one that does not cover the outbox table is an
//! error, because changing it could break another consumer.

use sqlx::{PgConnection, Row};

use crate::error::{Error, Result};
use crate::postgres::lsn::Lsn;
use crate::postgres::parse_lsn;
use crate::table::{quote_ident, OutboxTable};

/// What the server and the relay's role allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSupport {
    pub wal_level: String,
    /// `REPLICATION` attribute or superuser, or (Amazon RDS and Aurora,
    /// where the attribute is not granted) membership in `rds_replication`.
    pub can_replicate: bool,
    pub max_replication_slots: i64,
    /// The role (`current_user`) as an SQL identifier, for the statement
    /// that lets it replicate.
    pub role: String,
}

impl ServerSupport {
    /// Why replication capture is impossible here, or `None` if it is possible.
    pub fn replication_unavailable(&self) -> Option<String> {
        if self.wal_level != "logical" {
            return Some(format!(
                "wal_level is `{}`, not `logical` (set wal_level = logical and restart Postgres)",
                self.wal_level
            ));
        }
        if !self.can_replicate {
            return Some(format!(
                "the role {role} may not replicate (it has no REPLICATION attribute); as an \
                 administrator run: ALTER ROLE {role} WITH REPLICATION; (on Amazon RDS or Aurora, \
                 as the master user: GRANT rds_replication TO {role};)",
                role = self.role
            ));
        }
        if self.max_replication_slots == 0 {
            return Some("max_replication_slots is 0".into());
        }
        None
    }
}

pub async fn server_support(connection: &mut PgConnection) -> Result<ServerSupport> {
    let row = sqlx::query(
        "SELECT current_setting('wal_level'), \
                (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user) \
                OR EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_replication' \
                           AND pg_has_role(current_user, oid, 'MEMBER')), \
                current_setting('max_replication_slots')::bigint, \
                quote_ident(current_user)",
    )
    .fetch_one(connection)
    .await
    .map_err(|e| Error::from_postgres("reading wal_level and the role's privileges", e))?;
    Ok(ServerSupport {
        wal_level: column(&row, 0, "wal_level")?,
        can_replicate: column::<Option<bool>>(&row, 1, "rolreplication")?.unwrap_or(false),
        max_replication_slots: column(&row, 2, "max_replication_slots")?,
        role: column(&row, 3, "current_user")?,
    })
}

/// A slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    pub plugin: Option<String>,
    pub slot_type: String,
    pub database: Option<String>,
    /// The database this connection is in, which the slot must belong to.
    pub current_database: String,
    /// The backend streaming from it, if any.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    pub confirmed_flush: Option<Lsn>,
    /// WAL the server keeps for this slot: current WAL position minus `restart_lsn`.
    pub retained_bytes: Option<i64>,
}

impl SlotInfo {
    /// Invalidated (its WAL was removed, `max_slot_wal_keep_size`): it can
    /// never stream again.
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }

    /// Why this slot cannot be streamed by this relay, or `None`.
    pub fn unusable_because(&self) -> Option<String> {
        let database = self.current_database.as_str();
        if self.slot_type != "logical" {
            return Some(format!(
                "replication slot `{}` is a {} slot, not a logical one; choose another capture.slot",
                self.name, self.slot_type
            ));
        }
        if self.plugin.as_deref() != Some("pgoutput") {
            return Some(format!(
                "replication slot `{}` uses the `{}` plugin, not pgoutput; drop it \
                 (SELECT pg_drop_replication_slot('{}')) or choose another capture.slot",
                self.name,
                self.plugin.as_deref().unwrap_or("?"),
                self.name
            ));
        }
        if self.database.as_deref() != Some(database) {
            return Some(format!(
                "replication slot `{}` belongs to database `{}`, not `{database}`; choose another capture.slot",
                self.name,
                self.database.as_deref().unwrap_or("?")
            ));
        }
        None
    }
}

pub async fn inspect(connection: &mut PgConnection, slot: &str) -> Result<Option<SlotInfo>> {
    let row = sqlx::query(
        "SELECT slot_name::text, plugin::text, slot_type, database::text, active_pid, wal_status, \
                confirmed_flush_lsn::text, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                current_database()::text \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(connection)
    .await
    .map_err(|e| Error::from_postgres("reading the replication slot", e))?;
    let Some(row) = row else { return Ok(None) };
    let confirmed_flush: Option<String> = column(&row, 6, "confirmed_flush_lsn")?;
    let confirmed_flush = match confirmed_flush {
        None => None,
        Some(text) => Some(text.parse().map_err(|_| {
            Error::stop(format!(
                "pg_replication_slots shows confirmed_flush_lsn `{text}` for slot `{slot}`, \
                 which is not an LSN; the relay will not guess where the slot stands"
            ))
        })?),
    };
    Ok(Some(SlotInfo {
        name: column(&row, 0, "slot_name")?,
        plugin: column(&row, 1, "plugin")?,
        slot_type: column(&row, 2, "slot_type")?,
        database: column(&row, 3, "database")?,
        active_pid: column(&row, 4, "active_pid")?,
        wal_status: column(&row, 5, "wal_status")?,
        confirmed_flush,
        retained_bytes: column(&row, 7, "retained bytes")?,
        current_database: column(&row, 8, "current_database")?,
    }))
}

/// `server_version_num` of the first release with failover slots
/// (PostgreSQL 17): a standby with `sync_replication_slots = on` keeps a
/// copy of such a slot, so the slot survives the standby's promotion.
pub const FAILOVER_SLOTS_SINCE: i32 = 170_000;

/// The server's `server_version_num` (e.g. 150004).
pub async fn server_version_num(connection: &mut PgConnection) -> Result<i32> {
    let text: String = sqlx::query_scalar("SELECT current_setting('server_version_num')")
        .fetch_one(connection)
        .await
        .map_err(|e| Error::from_postgres("reading the server version", e))?;
    text.trim().parse().map_err(|_| {
        Error::stop(format!(
            "the server reports server_version_num `{text}`, which is not a number; \
             outboxd cannot tell which replication features it has"
        ))
    })
}

/// Creates the slot; returns its consistent point. Changes committed after
/// that point are streamed from it; earlier ones are only in the table.
/// On PostgreSQL 17 and later it is a failover slot, so a standby that
/// synchronises slots keeps it across a promotion.
pub async fn create(connection: &mut PgConnection, slot: &str) -> Result<Lsn> {
    let failover = server_version_num(connection).await? >= FAILOVER_SLOTS_SINCE;
    // Arguments after the plugin: temporary, two-phase, failover (17+).
    let sql = if failover {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    let lsn: String = sqlx::query_scalar(sql)
        .bind(slot)
        .fetch_one(connection)
        .await
        .map_err(|e| Error::from_postgres(&format!("creating replication slot `{slot}`"), e))?;
    parse_lsn(&lsn)
}

/// How far the server itself keeps a failover from taking back what the
/// slot streamed (PostgreSQL 17+).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverProtection {
    /// The slot's `failover` flag; `None` when the slot does not exist.
    pub slot_failover: Option<bool>,
    /// `synchronized_standby_slots`: the physical slots whose standbys must
    /// have flushed WAL before a failover slot's walsender decodes it.
    pub synchronized_standby_slots: String,
}

impl FailoverProtection {
    /// The server decodes for this slot only WAL the standbys named in
    /// `synchronized_standby_slots` have flushed, so nothing it streams can
    /// be taken back by promoting one of them.
    pub fn server_holds_back(&self) -> bool {
        self.slot_failover == Some(true) && !self.synchronized_standby_slots.trim().is_empty()
    }
}

/// The slot's failover flag and `synchronized_standby_slots`; `None` on
/// servers before PostgreSQL 17, which have neither.
pub async fn failover_protection(
    connection: &mut PgConnection,
    slot: &str,
) -> Result<Option<FailoverProtection>> {
    if server_version_num(connection).await? < FAILOVER_SLOTS_SINCE {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT (SELECT failover FROM pg_replication_slots WHERE slot_name = $1), \
                current_setting('synchronized_standby_slots', true)",
    )
    .bind(slot)
    .fetch_one(connection)
    .await
    .map_err(|e| Error::from_postgres("reading the slot's failover setting", e))?;
    Ok(Some(FailoverProtection {
        slot_failover: column(&row, 0, "failover")?,
        synchronized_standby_slots: column::<Option<String>>(
            &row,
            1,
            "synchronized_standby_slots",
        )?
        .unwrap_or_default(),
    }))
}

/// Drops a slot that can never stream again.
pub async fn drop_slot(connection: &mut PgConnection, slot: &str) -> Result<()> {
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(slot)
        .execute(connection)
        .await
        .map_err(|e| Error::from_postgres(&format!("dropping replication slot `{slot}`"), e))?;
    Ok(())
}

/// What the publication covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationInfo {
    pub includes_table: bool,
    pub publishes_inserts: bool,
    /// Updates, deletes or truncates are published too.
    pub publishes_other_changes: bool,
    pub other_tables: i64,
    /// The table is partitioned and the publication names each partition's
    /// changes by the partition (`publish_via_partition_root` off), so no
    /// change would carry the outbox table's name.
    pub partitions_not_via_root: bool,
}

impl PublicationInfo {
    /// Why the relay cannot stream the outbox through this publication, with
    /// what to run; `None` when it can.
    pub fn unusable_because(&self, publication: &str, table: &OutboxTable) -> Option<String> {
        let quoted = quote_ident(publication);
        if self.partitions_not_via_root {
            return Some(format!(
                "publication `{publication}` publishes {table}'s partitions under their own names; \
                 run ALTER PUBLICATION {quoted} SET (publish_via_partition_root = true)",
                table = table.qualified(),
            ));
        }
        if !self.includes_table || !self.publishes_inserts {
            return Some(format!(
                "publication `{publication}` does not publish inserts into {table}; as its \
                 owner run ALTER PUBLICATION {quoted} ADD TABLE {table} (and publish = 'insert'), \
                 or set postgres.publication to another name and outboxd creates it",
                table = table.qualified(),
            ));
        }
        None
    }
}

pub async fn inspect_publication(
    connection: &mut PgConnection,
    publication: &str,
    table: &OutboxTable,
) -> Result<Option<PublicationInfo>> {
    let row = sqlx::query(
        "SELECT EXISTS (SELECT 1 FROM pg_publication_tables t \
                        WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3), \
                p.pubinsert, p.pubupdate OR p.pubdelete OR p.pubtruncate, \
                (SELECT count(*) FROM pg_publication_tables t \
                 WHERE t.pubname = p.pubname AND NOT (t.schemaname = $2 AND t.tablename = $3)), \
                NOT p.pubviaroot AND EXISTS (SELECT 1 FROM pg_class c \
                                             WHERE c.oid = to_regclass($4) AND c.relkind = 'p') \
         FROM pg_publication p WHERE p.pubname = $1",
    )
    .bind(publication)
    .bind(&table.schema)
    .bind(&table.name)
    .bind(table.qualified())
    .fetch_optional(connection)
    .await
    .map_err(|e| Error::from_postgres("reading the publication", e))?;
    row.map(|row| {
        Ok(PublicationInfo {
            includes_table: column(&row, 0, "includes the table")?,
            publishes_inserts: column(&row, 1, "pubinsert")?,
            publishes_other_changes: column(&row, 2, "pubupdate/pubdelete/pubtruncate")?,
            other_tables: column(&row, 3, "other tables")?,
            partitions_not_via_root: column(&row, 4, "pubviaroot")?,
        })
    })
    .transpose()
}

/// Whether this role may create the missing publication (only the table's
/// owner may, with `CREATE` on the database), and if not, what to tell the
/// operator: who must run which statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationCreation {
    pub may_create: bool,
    /// The table's owner, as an SQL identifier.
    pub owner: String,
    /// `CREATE PUBLICATION …;` as the owner would run it.
    pub statement: String,
    role: String,
    publication: String,
    table: String,
}

impl PublicationCreation {
    /// Why the relay cannot create the publication, with the statement for
    /// the table's owner; `None` when it can.
    pub fn refused_because(&self) -> Option<String> {
        (!self.may_create).then(|| {
            format!(
                "publication `{publication}` is missing, and the relay's role {role} cannot \
                 create it: only the owner of {table} ({owner}) may. As {owner} run: \
                 {statement} (or run `outboxd migrate` as {owner})",
                publication = self.publication,
                role = self.role,
                table = self.table,
                owner = self.owner,
                statement = self.statement,
            )
        })
    }
}

/// Who may create `publication` for the outbox table, and how.
pub async fn publication_creation(
    connection: &mut PgConnection,
    publication: &str,
    table: &OutboxTable,
) -> Result<PublicationCreation> {
    let row = sqlx::query(
        "SELECT pg_has_role(c.relowner, 'USAGE') \
                AND has_database_privilege(current_database(), 'CREATE'), \
                quote_ident(pg_get_userbyid(c.relowner)), c.relkind = 'p', \
                quote_ident(current_user) \
         FROM pg_class c WHERE c.oid = to_regclass($1)",
    )
    .bind(table.qualified())
    .fetch_one(&mut *connection)
    .await
    .map_err(|e| Error::from_postgres("reading the outbox table's owner", e))?;
    let partitioned: bool = column(&row, 2, "relkind")?;
    Ok(PublicationCreation {
        may_create: column(&row, 0, "may create")?,
        owner: column(&row, 1, "owner")?,
        statement: format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert'{});",
            quote_ident(publication),
            table.qualified(),
            if partitioned {
                ", publish_via_partition_root = true"
            } else {
                ""
            },
        ),
        role: column(&row, 3, "current_user")?,
        publication: publication.to_string(),
        table: table.display_name(),
    })
}

/// What the publication says about the outbox table, as a text that
/// changes whenever its membership or options may have: the publication's
/// and the table's identities, and the catalog row versions (`xmin`) of the
/// publication, of the table (`SET UNLOGGED`, `SET SCHEMA`, a rename) and
/// of the publication's entries for the table or its schema. Dropping the
/// table from the publication and adding it back, changing `publish` and
/// back, or re-creating the publication all give another text; so do some
/// harmless changes (`TRUNCATE`, `ALTER TABLE`), which only cost a drain.
/// Rows committed while the table was out of the publication never reached
/// the stream (`relay::replication::start_where_marks_tell`).
pub async fn publication_fingerprint(
    connection: &mut PgConnection,
    publication: &str,
    table: &OutboxTable,
) -> Result<String> {
    // Schema publications (FOR TABLES IN SCHEMA) exist from PostgreSQL 15.
    let schema_entries = if server_version_num(connection).await? >= 150_000 {
        "(SELECT string_agg(n.oid::text || ':' || n.xmin::text, ',' ORDER BY n.oid) \
           FROM pg_publication_namespace n \
          WHERE n.pnpubid = p.oid AND n.pnnspid = t.relnamespace)"
    } else {
        "''"
    };
    let sql = format!(
        "SELECT concat_ws('/', p.oid, p.xmin, t.oid, t.xmin, \
                (SELECT string_agg(r.oid::text || ':' || r.xmin::text, ',' ORDER BY r.oid) \
                   FROM pg_publication_rel r WHERE r.prpubid = p.oid AND r.prrelid = t.oid), \
                {schema_entries}) \
           FROM pg_publication p, pg_class t \
          WHERE p.pubname = $1 \
            AND t.oid = (quote_ident($2) || '.' || quote_ident($3))::regclass"
    );
    let fingerprint: Option<String> = sqlx::query_scalar(&sql)
        .bind(publication)
        .bind(&table.schema)
        .bind(&table.name)
        .fetch_optional(connection)
        .await
        .map_err(|e| Error::from_postgres("reading the publication's catalog entries", e))?;
    Ok(fingerprint.unwrap_or_default())
}

/// Creates the publication (inserts on the outbox table only) when missing;
/// checks an existing one covers the table's inserts.
pub async fn ensure_publication(
    connection: &mut PgConnection,
    publication: &str,
    table: &OutboxTable,
) -> Result<()> {
    let info = match inspect_publication(connection, publication, table).await? {
        Some(info) => info,
        None => {
            let creation = publication_creation(connection, publication, table).await?;
            if let Some(refused) = creation.refused_because() {
                return Err(Error::stop(refused).because(crate::error::Cause::PostgresPrivilege));
            }
            sqlx::query(&creation.statement)
                .execute(connection)
                .await
                .map_err(|e| {
                    Error::from_postgres(
                        &format!("creating publication `{publication}` (or run `outboxd migrate`)"),
                        e,
                    )
                })?;
            tracing::info!(
                publication,
                table = %table.display_name(),
                "created the publication for the outbox table"
            );
            return Ok(());
        }
    };
    if let Some(reason) = info.unusable_because(publication, table) {
        return Err(Error::stop(reason).because(crate::error::Cause::OutboxTable));
    }
    if info.other_tables > 0 {
        tracing::warn!(
            publication,
            other_tables = info.other_tables,
            "the publication covers other tables too; their changes are decoded and ignored, \
             which costs throughput. Give outboxd a publication of its own"
        );
    }
    Ok(())
}

/// Column `index` of a catalog row, or an error naming `name`: a server
/// that answers with another type (a fork, a future version) must not panic
/// the relay.
fn column<'r, T>(row: &'r sqlx::postgres::PgRow, index: usize, name: &str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(index).map_err(|e| {
        Error::stop(format!(
            "the server's catalog answered `{name}` in a form outboxd does not read: {e}"
        ))
    })
}
