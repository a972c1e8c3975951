//! `outboxd check`: a preflight that says, line by line, whether the relay
//! can run with this config, and what to fix when it cannot.
//!
//! Invariant: `check` only reads; it never creates topics or changes the
//! database, and never prints a password.

use std::fmt;

use sqlx::{ConnectOptions, PgConnection};

use crate::capture::slot;
use crate::config::{
    secret, CaptureMode, Config, MissingTopics, Partitioner, PoisonPolicy, SlotLostPolicy,
};
use crate::kafka::topics::{self, TopicState};
use crate::schema;
use crate::setup::Setup;
use crate::table::OutboxTable;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warning,
    Failed,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub status: Status,
    pub subject: String,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.status {
            Status::Ok => "ok  ",
            Status::Warning => "warn",
            Status::Failed => "FAIL",
        };
        write!(f, "[{mark}] {}: {}", self.subject, self.detail)
    }
}

#[derive(Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn push(&mut self, status: Status, subject: &str, detail: impl Into<String>) {
        self.0.push(Finding {
            status,
            subject: subject.to_string(),
            detail: detail.into(),
        });
    }
}

/// Runs every check; the caller prints them and exits non-zero on any `Failed`.
pub async fn run(setup: &Setup) -> Vec<Finding> {
    let config = &setup.config;
    let mut findings = Findings::default();
    findings.push(
        Status::Ok,
        "config",
        format!("valid (relay.name = {})", config.relay.name),
    );
    check_postgres(setup, &mut findings).await;
    check_kafka(config, &mut findings).await;
    check_schema_registry(setup, &mut findings).await;
    findings.0
}

/// With `avro` or `json_schema` values: the registry answers, and every
/// subject the config names for all rows alike has a schema of the
/// rule's format (templated subjects are learnt as rows arrive).
async fn check_schema_registry(setup: &Setup, findings: &mut Findings) {
    let Some(registry) = setup.router.registry() else {
        return;
    };
    match registry.subjects().await {
        Ok(subjects) => findings.push(
            Status::Ok,
            "schema registry",
            format!("{} answers ({} subjects)", registry.url(), subjects.len()),
        ),
        Err(error) => {
            findings.push(Status::Failed, "schema registry", error.0);
            return;
        }
    }
    for (key, subject) in setup.router.configured_subjects() {
        match subject {
            Err(template) => findings.push(
                Status::Ok,
                "schema subject",
                format!(
                    "{key}: subjects follow `{template}`, which depends on the row; each is \
                     looked up when its first row arrives"
                ),
            ),
            Ok(subject) => match registry.fetch(&subject).await {
                Ok(resolved) => findings.push(
                    Status::Ok,
                    "schema subject",
                    format!(
                        "{key}: {subject}: schema id {}, version {}",
                        resolved.id, resolved.version
                    ),
                ),
                // Rows would wait (not be dead-lettered) until it exists.
                Err(error) => findings.push(
                    Status::Failed,
                    "schema subject",
                    format!("{key}: {error}; its rows would wait until it is fixed"),
                ),
            },
        }
    }
}

async fn check_postgres(setup: &Setup, findings: &mut Findings) {
    let config = &setup.config;
    let target = secret::redact_url(&config.postgres.url);
    let mut connection = match setup.connect_options.connect().await {
        Ok(connection) => connection,
        Err(e) => {
            // With the relay's advice where it has some (a certificate that
            // does not verify, a missing privilege).
            let error =
                crate::error::Error::from_postgres(&format!("cannot connect to {target}"), e);
            findings.push(Status::Failed, "postgres", error.message);
            return;
        }
    };
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut connection)
        .await
        .unwrap_or_default();
    findings.push(
        Status::Ok,
        "postgres",
        format!("connected to {target} (server {version})"),
    );

    if config.messages() {
        check_messages(setup, &mut connection, findings).await;
        check_identity(&mut connection, findings).await;
        return;
    }
    let table = &setup.table;
    match schema::inspect(&mut connection, table, config.relay.deletes_rows()).await {
        Err(e) => findings.push(Status::Failed, "outbox table", e.message),
        Ok(report) => {
            let problems = report.problems(table);
            if problems.is_empty() {
                findings.push(
                    Status::Ok,
                    "outbox table",
                    format!(
                        "{} has every configured column and the relay may use it",
                        table.display_name()
                    ),
                );
            }
            for problem in problems {
                findings.push(Status::Failed, "outbox table", problem);
            }
            check_partitioning(&mut connection, table, &report, findings).await;
            if report.has_notify_trigger {
                findings.push(
                    Status::Ok,
                    "notify trigger",
                    "present: new rows wake the relay at once",
                );
            } else {
                findings.push(
                    Status::Warning,
                    "notify trigger",
                    format!(
                        "missing: new rows wait up to capture.poll_interval ({:?}); it is in migrations/0001_outbox.sql",
                        config.capture.poll_interval
                    ),
                );
            }
        }
    }
    check_capture(config, &mut connection, table, findings).await;
    if config.unmarked() {
        check_slot_against_checkpoint(setup, &mut connection, findings).await;
    }
    check_identity(&mut connection, findings).await;
    check_insert_only(&mut connection, table, findings).await;
    check_replay_record(&mut connection, table, findings).await;
}

/// `capture.source: messages`: replication works, the helper function
/// exists, and the slot holds every message after the latest checkpoint
/// (the relay's own start rule, `capture::message_slot`), so `check`
/// fails exactly where the relay would refuse to start.
async fn check_messages(setup: &Setup, connection: &mut PgConnection, findings: &mut Findings) {
    use crate::capture::message_encoding::{function_emits_prefix, EMIT_FUNCTION};
    let config = &setup.config;
    findings.push(
        Status::Ok,
        "capture",
        format!(
            "source messages: transactional logical messages with prefix `{}`, streamed through \
             slot `{}`",
            config.capture.message_prefix,
            config.slot_name()
        ),
    );
    match slot::server_support(connection).await {
        Err(e) => findings.push(Status::Failed, "replication", e.message),
        Ok(support) => match support.replication_unavailable() {
            Some(reason) => findings.push(
                Status::Failed,
                "replication",
                format!("capture.source messages needs logical replication, but {reason}"),
            ),
            None => findings.push(Status::Ok, "replication", "available to this role"),
        },
    }
    let function = format!("{}.{EMIT_FUNCTION}", setup.table.schema);
    let source: Result<Option<String>, sqlx::Error> = sqlx::query_scalar(
        "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = $1 AND p.proname = $2 LIMIT 1",
    )
    .bind(&setup.table.schema)
    .bind(EMIT_FUNCTION)
    .fetch_optional(&mut *connection)
    .await;
    let prefix = &config.capture.message_prefix;
    match source {
        Ok(Some(source)) if function_emits_prefix(&source, prefix) => findings.push(
            Status::Ok,
            "emit function",
            format!("{function}() exists and emits prefix `{prefix}`"),
        ),
        Ok(Some(_)) => findings.push(
            Status::Failed,
            "emit function",
            format!(
                "{function}() emits another prefix than `{prefix}`: services calling it write \
                 events this relay ignores (another message outbox's function?). Give each \
                 message outbox its own schema (postgres.table names it)"
            ),
        ),
        Ok(None) => findings.push(
            Status::Warning,
            "emit function",
            format!(
                "{function}() is missing; services can still call pg_logical_emit_message \
                 themselves. outboxd migrate creates it"
            ),
        ),
        Err(e) => findings.push(Status::Failed, "emit function", e.to_string()),
    }
    check_slot_against_checkpoint(setup, connection, findings).await;
}

/// Where the slot is the only record of what is published (messages, and
/// unmarked rows once any was published): judges it against the latest
/// checkpoint by the relay's own start rule (`capture::message_slot`), so
/// `check` fails exactly where the relay would refuse to start.
async fn check_slot_against_checkpoint(
    setup: &Setup,
    connection: &mut PgConnection,
    findings: &mut Findings,
) {
    use crate::capture::message_slot::{judge, Kept, Verdict};
    let config = &setup.config;
    let slot_name = config.slot_name();
    let existing = match slot::inspect(connection, &slot_name).await {
        Ok(existing) => existing,
        Err(e) => return findings.push(Status::Failed, "slot", e.message),
    };
    let source = match crate::schema::database_source(connection).await {
        Ok(None) if config.unmarked() => {
            match schema::source_by_replication(config, connection).await {
                Ok(source) => Some(source),
                Err(e) => return findings.push(Status::Failed, "slot", e.message),
            }
        }
        Ok(source) => source,
        Err(e) => return findings.push(Status::Failed, "slot", e.message),
    };
    let identity = crate::kafka::identity::TableIdentity::new(
        source.as_deref(),
        &config.source_name(&setup.table.display_name()),
        &config.relay.name,
    );
    let latest = match tokio::time::timeout(
        std::time::Duration::from_secs(20),
        crate::kafka::checkpoint::read_latest(config, &identity),
    )
    .await
    {
        Ok(Ok(latest)) => latest.map(|l| l.checkpoint),
        Ok(Err(e)) => {
            return findings.push(
                Status::Failed,
                "slot",
                format!(
                    "cannot read the latest checkpoint to judge the slot by: {}",
                    e.message
                ),
            )
        }
        Err(_) => {
            return findings.push(
                Status::Failed,
                "slot",
                "Kafka did not answer within 20s; cannot judge the slot without the checkpoint",
            )
        }
    };
    let accepted = config
        .capture
        .accept_message_loss_through
        .as_deref()
        .and_then(|lsn| lsn.parse().ok());
    // As the relay does: the checkpoint's position only as far as it holds
    // on this server's timeline (`capture::message_timeline`).
    let position = match &latest {
        Some(latest) if latest.timeline.is_some() || latest.system_identifier.is_some() => {
            let probe = crate::capture::wire::StreamTarget {
                slot: slot_name.clone(),
                publication: config.postgres.publication.clone(),
                confirmed_flush: crate::postgres::lsn::Lsn(0),
                start_at: None,
                application_name: format!("outboxd-{}", config.relay.name),
            };
            match crate::capture::wire::wal_history(&config.postgres.url, &probe).await {
                Ok(wal) => {
                    let on = wal.position_of(latest);
                    if let Some(fork) = on.forked_at {
                        findings.push(
                            Status::Warning,
                            "timeline",
                            format!(
                                "this server (system {}, timeline {}) parts from the WAL history \
                                 the checkpoint was written on (system {}, timeline {}) at \
                                 {fork}, before the checkpoint's position: messages published \
                                 after {fork} are in Kafka but not on this server; the slot is \
                                 judged from {fork}",
                                wal.system_identifier,
                                wal.timeline,
                                latest.system_identifier.as_deref().unwrap_or("?"),
                                latest.timeline.unwrap_or_default()
                            ),
                        );
                    }
                    on.position
                }
                Err(e) => {
                    return findings.push(
                        Status::Failed,
                        "slot",
                        format!("cannot read the server's timeline to judge the slot by: {e}"),
                    )
                }
            }
        }
        Some(latest) => latest.position,
        None => None,
    };
    let kept = match (
        config.messages(),
        latest.as_ref().and_then(|l| l.unmarked_from),
    ) {
        (true, _) => Kept::Messages,
        (false, Some(_)) => Kept::UnmarkedRows,
        // Every published row is marked: the relay starts as a marking
        // relay does (check_capture reports that slot).
        (false, None) => return,
    };
    match judge(&slot_name, existing.as_ref(), position, accepted, kept) {
        Ok(Verdict::Stream(note)) => findings.push(Status::Ok, "slot", note),
        Ok(Verdict::Accepted(note)) => findings.push(Status::Warning, "slot", note),
        Ok(Verdict::Create) => findings.push(
            Status::Failed,
            "slot",
            format!(
                "replication slot `{slot_name}` does not exist: messages emitted now reach no slot \
                 and are never published. Create it before services emit: outboxd migrate, or \
                 SELECT pg_create_logical_replication_slot('{slot_name}', 'pgoutput')"
            ),
        ),
        // In use by a running relay is fine for check.
        Err(e) if e.kind == crate::error::ErrorKind::Retry => {
            findings.push(Status::Ok, "slot", e.message)
        }
        Err(e) => findings.push(Status::Failed, "slot", e.message),
    }
}

/// Whether the relay's Kafka identity can name this database: it reads the
/// system identifier with `pg_control_system()`, which PUBLIC may execute
/// by default but some servers revoke. Without it the relay still runs,
/// under a `relay.name` stand-in identity (`schema::database_source`).
async fn check_identity(connection: &mut PgConnection, findings: &mut Findings) {
    let row: Result<(bool, String), sqlx::Error> = sqlx::query_as(
        "SELECT has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE'), \
                quote_ident(current_user)",
    )
    .fetch_one(&mut *connection)
    .await;
    match row {
        Err(e) => {
            let error = crate::error::Error::from_postgres("checking EXECUTE on pg_control_system()", e);
            findings.push(Status::Failed, "kafka identity", error.message)
        }
        Ok((true, _)) => findings.push(
            Status::Ok,
            "kafka identity",
            "names this database (its system identifier, from pg_control_system()), so a renamed \
             relay still fences the old one",
        ),
        Ok((false, role)) => findings.push(
            Status::Warning,
            "kafka identity",
            format!(
                "the role {role} may not execute pg_control_system(), so the relay's Kafka identity \
                 names relay.name instead of this database and a renamed relay no longer fences the \
                 old one; as an administrator run: GRANT EXECUTE ON FUNCTION pg_control_system() TO \
                 {role}; (granting it later, or taking it away, is safe)"
            ),
        ),
    }
}

/// Whether the insert-only guard is in place: without it, a transaction
/// that changes an outbox row after inserting it is published differently
/// by the two capture modes, and nothing else would say so.
async fn check_insert_only(
    connection: &mut PgConnection,
    table: &OutboxTable,
    findings: &mut Findings,
) {
    match crate::insert_only::is_guarded(connection, table).await {
        Err(e) => findings.push(Status::Failed, "insert-only", e.message),
        Ok(true) => findings.push(
            Status::Ok,
            "insert-only",
            "guarded: an UPDATE of an unsent row's event columns, or a DELETE by the inserting \
             transaction, fails in the writer's transaction",
        ),
        Ok(false) => findings.push(
            Status::Warning,
            "insert-only",
            crate::insert_only::unguarded_warning(table),
        ),
    }
}

/// Whether `outboxd dead-letters replay` can keep its once-only promise
/// (the record table exists) and may run as this role.
async fn check_replay_record(
    connection: &mut PgConnection,
    table: &OutboxTable,
    findings: &mut Findings,
) {
    use crate::replay_record::{self, State};
    let record = replay_record::display_name(table);
    match replay_record::inspect(connection, table).await {
        Err(e) => findings.push(Status::Failed, "replay record", e.message),
        Ok(State::Missing) => findings.push(
            Status::Warning,
            "replay record",
            format!(
                "{record} is missing, so `outboxd dead-letters replay` refuses to run (the relay \
                 is not affected); run `outboxd migrate`"
            ),
        ),
        Ok(State::Present { missing_privileges }) if missing_privileges.is_empty() => findings
            .push(
                Status::Ok,
                "replay record",
                format!("{record} present; this role may replay dead letters"),
            ),
        Ok(State::Present { missing_privileges }) => findings.push(
            Status::Ok,
            "replay record",
            format!(
                "{record} present; this role lacks {} for `outboxd dead-letters replay` (the \
                 relay needs none of it): replay as a role that has them",
                missing_privileges.join(", ")
            ),
        ),
    }
}

/// Whether the table's partitioning matches the config, and whether the
/// partitions inserts will need soon exist.
async fn check_partitioning(
    connection: &mut PgConnection,
    table: &OutboxTable,
    report: &schema::TableReport,
    findings: &mut Findings,
) {
    if let Some(mismatch) = report.partitioning_mismatch(table) {
        return findings.push(Status::Warning, "partitioning", mismatch);
    }
    let Some(partitioning) = &table.partitioning else {
        return;
    };
    check_partition_owner(connection, table, findings).await;
    match crate::partitions::readiness(connection, table, partitioning.interval).await {
        Err(e) => findings.push(
            Status::Failed,
            "partitioning",
            format!("cannot list the table's partitions: {e}"),
        ),
        Ok((count, ahead)) => {
            let ahead = ahead.unwrap_or(-1);
            let facts = format!(
                "{count} partition(s) of {:?} each; the newest reaches {ahead} interval(s) past now",
                partitioning.interval
            );
            if ahead >= i64::from(partitioning.ahead) {
                findings.push(Status::Ok, "partitioning", facts)
            } else {
                findings.push(
                    Status::Warning,
                    "partitioning",
                    format!(
                        "{facts}, fewer than postgres.partitioning.ahead ({}); the relay creates them when its \
                         role owns the table, else run `outboxd migrate` as the owner",
                        partitioning.ahead
                    ),
                )
            }
        }
    }
}

/// Whether the relay's role may create and drop partitions: only the
/// table's owner (or a member of the owner role) may. Without it the relay
/// still publishes, but its housekeeping fails every minute.
async fn check_partition_owner(
    connection: &mut PgConnection,
    table: &OutboxTable,
    findings: &mut Findings,
) {
    let row: Result<(bool, String, String), sqlx::Error> = sqlx::query_as(
        "SELECT pg_has_role(c.relowner, 'USAGE'), quote_ident(pg_get_userbyid(c.relowner)), \
                quote_ident(current_user) \
         FROM pg_class c WHERE c.oid = to_regclass($1)",
    )
    .bind(table.qualified())
    .fetch_one(&mut *connection)
    .await;
    match row {
        Err(e) => findings.push(
            Status::Failed,
            "partition owner",
            format!("cannot look up the owner of {}: {e}", table.display_name()),
        ),
        Ok((true, _, role)) => findings.push(
            Status::Ok,
            "partition owner",
            format!("the relay's role {role} may create and drop partitions (it owns the table)"),
        ),
        Ok((false, owner, role)) => findings.push(
            Status::Warning,
            "partition owner",
            format!(
                "the relay's role {role} does not own {table} ({owner} does), so it cannot create \
                 partitions ahead or drop expired ones; as an administrator run: GRANT {owner} TO \
                 {role}; (or run `outboxd migrate` as {owner} from a scheduled job, more often \
                 than postgres.partitioning.ahead intervals, and drop expired partitions as {owner})",
                table = table.display_name(),
            ),
        ),
    }
}

/// Which capture mode the relay will use and, for replication, the state
/// of the publication and the slot.
async fn check_capture(
    config: &Config,
    connection: &mut PgConnection,
    table: &OutboxTable,
    findings: &mut Findings,
) {
    if config.capture.mode == CaptureMode::Polling {
        findings.push(Status::Ok, "capture", "mode polling (as configured)");
        return;
    }
    let support = match slot::server_support(connection).await {
        Ok(support) => support,
        Err(e) => return findings.push(Status::Failed, "capture", e.message),
    };
    let facts = format!(
        "wal_level = {}, role may replicate: {}, max_replication_slots = {}",
        support.wal_level,
        if support.can_replicate { "yes" } else { "no" },
        support.max_replication_slots
    );
    match (config.capture.mode, support.replication_unavailable()) {
        (CaptureMode::Replication, Some(reason)) => {
            return findings.push(
                Status::Failed,
                "capture",
                format!("mode replication is impossible: {reason} ({facts})"),
            )
        }
        (_, Some(reason)) => {
            return findings.push(
                Status::Warning,
                "capture",
                format!("mode auto will poll, because {reason} ({facts})"),
            )
        }
        (_, None) => findings.push(Status::Ok, "capture", format!("replication ({facts})")),
    }

    let publication = &config.postgres.publication;
    match slot::inspect_publication(connection, publication, table).await {
        Err(e) => findings.push(Status::Failed, "publication", e.message),
        Ok(None) => match slot::publication_creation(connection, publication, table).await {
            Err(e) => findings.push(Status::Failed, "publication", e.message),
            Ok(creation) => match creation.refused_because() {
                Some(refused) => findings.push(Status::Failed, "publication", refused),
                None => findings.push(
                    Status::Warning,
                    "publication",
                    format!("`{publication}` is missing; the relay creates it at start (its role owns the table), or run `outboxd migrate`"),
                ),
            },
        },
        Ok(Some(info)) => match info.unusable_because(publication, table) {
            Some(reason) => findings.push(Status::Failed, "publication", reason),
            None => findings.push(
                if info.other_tables > 0 || info.publishes_other_changes { Status::Warning } else { Status::Ok },
                "publication",
                format!(
                    "`{publication}` publishes inserts into {}{}{}",
                    table.display_name(),
                    if info.other_tables > 0 { format!(", and {} other tables (decoded, then ignored)", info.other_tables) } else { String::new() },
                    if info.publishes_other_changes { "; also updates/deletes/truncates (see capture.other_changes)" } else { "" },
                ),
            ),
        },
    }

    let slot_name = config.slot_name();
    match slot::inspect(connection, &slot_name).await {
        Err(e) => findings.push(Status::Failed, "replication slot", e.message),
        Ok(None) => findings.push(
            Status::Ok,
            "replication slot",
            format!("`{slot_name}` does not exist yet; the relay creates it and first publishes the unsent rows from the table"),
        ),
        Ok(Some(info)) if info.is_lost() => findings.push(
            if config.capture.on_slot_lost == SlotLostPolicy::Halt { Status::Failed } else { Status::Warning },
            "replication slot",
            format!(
                "`{slot_name}` is lost (wal_status = lost); the relay {}",
                if config.capture.on_slot_lost == SlotLostPolicy::Halt {
                    "halts (capture.on_slot_lost: halt)"
                } else {
                    "replaces it and publishes the unsent rows from the table"
                }
            ),
        ),
        Ok(Some(info)) => match info.unusable_because() {
            Some(reason) => findings.push(Status::Failed, "replication slot", reason),
            None => findings.push(
                Status::Ok,
                "replication slot",
                format!(
                    "`{slot_name}`: wal_status {}, retains {} of WAL, confirmed up to {}, {}",
                    info.wal_status.as_deref().unwrap_or("unknown"),
                    human_bytes(info.retained_bytes.unwrap_or(0)),
                    info.confirmed_flush.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                    match info.active_pid {
                        Some(pid) => format!("streamed by backend pid {pid}"),
                        None => "not streamed right now".into(),
                    }
                ),
            ),
        },
    }
    check_failover(config, connection, findings).await;
}

/// What the server's standbys mean for a failover: whether the relay
/// waits for the synchronous ones (and may see their positions), and
/// whether the slot survives a promotion.
async fn check_failover(config: &Config, connection: &mut PgConnection, findings: &mut Findings) {
    let row: Result<(String, bool, bool, i64, i64, String), sqlx::Error> = sqlx::query_as(
        "SELECT current_setting('synchronous_standby_names'), pg_is_in_recovery(), \
                pg_has_role('pg_read_all_stats', 'USAGE'), \
                (SELECT count(*) FROM pg_stat_replication r WHERE NOT EXISTS \
                    (SELECT 1 FROM pg_replication_slots s \
                     WHERE s.active_pid = r.pid AND s.slot_type = 'logical')), \
                (SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')), \
                quote_ident(current_user)",
    )
    .fetch_one(&mut *connection)
    .await;
    let (names, in_recovery, may_read, standbys, synchronous, role) = match row {
        Ok(row) => row,
        Err(e) => {
            let error = crate::error::Error::from_postgres("reading the server's standbys", e);
            return findings.push(Status::Failed, "standbys", error.message);
        }
    };
    let names = names.trim();
    if in_recovery {
        return findings.push(
            Status::Warning,
            "standbys",
            "the server is itself a standby (in recovery); point postgres.url at the primary",
        );
    }
    if names.is_empty() && standbys == 0 {
        return findings.push(
            Status::Ok,
            "standbys",
            "none stream from this server and synchronous_standby_names is empty: nothing a failover could take back",
        );
    }
    if names.is_empty() {
        findings.push(
            Status::Ok,
            "standbys",
            format!(
                "{standbys} asynchronous standby(s); with no synchronous standby a failover can lose \
                 commits the writers were told about, and their events with them"
            ),
        );
    } else if !config.capture.wait_for_sync_standbys {
        findings.push(
            Status::Warning,
            "standbys",
            format!(
                "synchronous_standby_names = '{names}' but capture.wait_for_sync_standbys is false: \
                 a transaction is published as soon as the primary has it, so a failover while a \
                 standby is behind leaves events in Kafka whose rows the new primary lacks"
            ),
        );
    } else if !may_read {
        findings.push(
            Status::Failed,
            "standbys",
            format!(
                "synchronous_standby_names = '{names}', but the role cannot see the standbys' positions \
                 in pg_stat_replication, so the relay would stop rather than publish what a failover \
                 can take back. As an administrator run: GRANT pg_read_all_stats TO {role}; (or grant \
                 pg_monitor), or set capture.wait_for_sync_standbys: false"
            ),
        );
    } else {
        findings.push(
            Status::Ok,
            "standbys",
            format!(
                "synchronous_standby_names = '{names}' ({synchronous} synchronous of {standbys} \
                 streaming): a transaction is published once the synchronous standbys flushed its commit"
            ),
        );
    }

    let slot_name = config.slot_name();
    let version = match slot::server_version_num(connection).await {
        Ok(version) => version,
        Err(e) => return findings.push(Status::Failed, "failover slot", e.message),
    };
    let standby_settings = "on each standby that may be promoted: sync_replication_slots = on, \
        hot_standby_feedback = on, primary_slot_name set and dbname in primary_conninfo; on the \
        primary: synchronized_standby_slots naming those standbys' physical slots";
    if version < slot::FAILOVER_SLOTS_SINCE {
        return findings.push(
            Status::Warning,
            "failover slot",
            format!(
                "PostgreSQL before 17 has no failover slots: a promoted standby has no `{slot_name}`, \
                 and the relay then publishes the unsent rows from the table and streams from a new \
                 slot (capture.on_slot_lost: recover). On 17 or later the relay creates it as a \
                 failover slot; {standby_settings}"
            ),
        );
    }
    match slot::failover_protection(connection, &slot_name).await {
        Err(e) => findings.push(Status::Failed, "failover slot", e.message),
        Ok(None) => {}
        Ok(Some(protection)) if protection.server_holds_back() => findings.push(
            Status::Ok,
            "failover slot",
            format!(
                "`{slot_name}` is a failover slot and synchronized_standby_slots = '{}': the server \
                 decodes only what those standbys have, and they keep the slot across a promotion",
                protection.synchronized_standby_slots.trim()
            ),
        ),
        Ok(Some(protection)) if protection.slot_failover == Some(false) => findings.push(
            Status::Warning,
            "failover slot",
            format!(
                "`{slot_name}` is not a failover slot, so a promoted standby will not have it; the \
                 relay makes it one at its next start (or run ALTER_REPLICATION_SLOT {slot_name} \
                 ( FAILOVER true ) on a replication connection while the relay is stopped). Then \
                 {standby_settings}"
            ),
        ),
        Ok(Some(_)) => findings.push(
            Status::Warning,
            "failover slot",
            format!(
                "`{slot_name}` is (or will be created as) a failover slot, but synchronized_standby_slots \
                 is empty: standbys may lag behind what the slot streamed, and the slot synced to them \
                 may not be usable after a promotion. Set {standby_settings}"
            ),
        ),
    }
}

fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

async fn check_kafka(config: &Config, findings: &mut Findings) {
    let mut wanted = vec![
        config.kafka.checkpoint_topic.clone(),
        config.routing.dead_letter_topic.clone(),
    ];
    wanted.extend(
        config
            .routing
            .rules
            .iter()
            .filter(|rule| !rule.topic.contains("${"))
            .map(|rule| rule.topic.clone()),
    );
    // Side by side, so a cluster that cannot be reached costs one timeout.
    let (described, causes) = tokio::join!(
        topics::describe_topics(config, &wanted),
        crate::kafka::probe::connection_errors(config)
    );
    let states = match described {
        Ok(states) => states,
        Err(e) => {
            let causes = if causes.is_empty() {
                String::new()
            } else {
                format!(
                    "; librdkafka says: {}. Check kafka.bootstrap_servers and, for TLS and SASL, \
                     kafka.properties (security.protocol, sasl.mechanism, sasl.username, \
                     sasl.password, ssl.ca.location)",
                    causes.join("; ")
                )
            };
            findings.push(
                Status::Failed,
                "kafka",
                format!(
                    "{} (bootstrap servers: {}){causes}",
                    e.message, config.kafka.bootstrap_servers
                ),
            );
            return;
        }
    };
    findings.push(
        Status::Ok,
        "kafka",
        format!("reached {}", config.kafka.bootstrap_servers),
    );
    let auto_create = topics::broker_auto_creates_topics(config)
        .await
        .ok()
        .flatten();

    for (topic, state) in states {
        let is_checkpoint = topic == config.kafka.checkpoint_topic;
        match state {
            TopicState::Exists {
                partitions,
                replication_factor,
            } if is_checkpoint => {
                check_checkpoint_topic(config, &topic, partitions, replication_factor, findings)
                    .await
            }
            TopicState::Missing if is_checkpoint => findings.push(
                Status::Ok,
                "checkpoint topic",
                format!("{topic} is missing; the relay creates it (compacted) at start"),
            ),
            TopicState::Exists { partitions, .. } => findings.push(
                Status::Ok,
                "topic",
                format!("{topic} exists ({partitions} partition(s))"),
            ),
            TopicState::Missing if auto_create == Some(true) => findings.push(
                Status::Warning,
                "topic",
                format!("{topic} is missing; the broker will auto-create it with its defaults"),
            ),
            TopicState::Missing if config.routing.missing_topics == MissingTopics::Create => {
                findings.push(
                    Status::Ok,
                    "topic",
                    format!("{topic} is missing; the relay creates it before its first record (routing.missing_topics: create)"),
                )
            }
            TopicState::Missing => findings.push(
                Status::Failed,
                "topic",
                format!("{topic} is missing and the broker does not auto-create topics; create it, or set routing.missing_topics: create"),
            ),
        }
    }
    if config.routing.topic.contains("${") {
        findings.push(
            Status::Ok,
            "routing",
            format!("topics from the template `{}` depend on the rows; create them ahead of time, let the broker auto-create them, or set routing.missing_topics", config.routing.topic),
        );
    }
    findings.push(
        Status::Ok,
        "partitioner",
        partitioner_note(config.routing.partitioner),
    );
    findings.push(
        Status::Ok,
        "missing topics",
        missing_topics_note(config, auto_create),
    );
    let cloudevents = &config.routing.cloudevents;
    findings.push(
        Status::Ok,
        "cloudevents",
        if cloudevents.enabled {
            format!(
                "on: binary content mode, ce_source `{}`, content-type `{}`",
                cloudevents.source, cloudevents.content_type
            )
        } else {
            "off (routing.cloudevents.enabled)".to_string()
        },
    );
}

/// What happens to a row routed to a topic that does not exist.
fn missing_topics_note(config: &Config, broker_auto_creates: Option<bool>) -> String {
    if broker_auto_creates == Some(true) {
        return "the broker creates topics on first use (auto.create.topics.enable), with its defaults".into();
    }
    let broker = match broker_auto_creates {
        Some(_) => "the broker does not create topics on first use",
        None => "whether the broker creates topics on first use is unknown (no DescribeConfigs)",
    };
    match config.routing.missing_topics {
        MissingTopics::Wait => format!(
            "{broker}; rows for a missing topic wait, and the rows behind them, until it exists \
             (routing.missing_topics: wait; /readyz and outboxd_rows_waiting_for_topic show it)"
        ),
        MissingTopics::Create => {
            let settings = &config.routing.create_topics;
            let shown = |value: Option<i32>| value.map_or("broker default".to_string(), |n| n.to_string());
            format!(
                "{broker}; the relay creates missing topics (partitions {}, replication factor {}, \
                 {} topic config(s)); its principal needs CREATE",
                shown(settings.partitions),
                shown(settings.replication_factor),
                settings.configs.len()
            )
        }
        MissingTopics::Poison => match config.relay.on_poison {
            PoisonPolicy::DeadLetter => format!(
                "{broker}; rows for a missing topic go to {} (routing.missing_topics: poison, relay.on_poison: dead_letter)",
                config.routing.dead_letter_topic
            ),
            PoisonPolicy::Halt => format!(
                "{broker}; a row for a missing topic stops the relay (routing.missing_topics: poison, relay.on_poison: halt)"
            ),
        },
    }
}

/// What `routing.partitioner` means for a team that also runs Java
/// producers or moves off Debezium.
fn partitioner_note(partitioner: Partitioner) -> String {
    let name = partitioner.librdkafka_name();
    match partitioner {
        Partitioner::Murmur2Random | Partitioner::Murmur2 => {
            format!("{name}: a key goes to the partition Java producers and Debezium choose for it")
        }
        Partitioner::Random => {
            format!("{name}: records of one key spread over partitions, with no order between them")
        }
        _ => format!(
            "{name}: keys land on other partitions than a Java producer's; changing the \
             partitioner of a topic in use moves aggregates to other partitions"
        ),
    }
}

/// The checkpoint topic must be compacted (or old checkpoints expire and the
/// relay stops, refusing to guess); it should be replicated like any topic
/// the cluster must not lose. Only partition 0 is used.
async fn check_checkpoint_topic(
    config: &Config,
    topic: &str,
    partitions: usize,
    replication_factor: usize,
    findings: &mut Findings,
) {
    let settings = topics::topic_configs(config, topic, &["cleanup.policy", "min.insync.replicas"])
        .await
        .unwrap_or_default();
    let policy = settings.first().cloned().flatten();
    let min_insync = settings.get(1).cloned().flatten();
    let shape = format!(
        "{partitions} partition(s), replication factor {replication_factor}, min.insync.replicas {}",
        min_insync.as_deref().unwrap_or("?")
    );
    match policy.as_deref() {
        Some(p) if p.contains("compact") && !p.contains("delete") => findings.push(
            Status::Ok,
            "checkpoint topic",
            format!("{topic} exists, compacted; {shape}"),
        ),
        Some(p) => findings.push(
            Status::Failed,
            "checkpoint topic",
            format!("{topic} has cleanup.policy={p}; it must be `compact` alone, or old checkpoints expire and the relay stops"),
        ),
        None => findings.push(
            Status::Warning,
            "checkpoint topic",
            format!("{topic} exists ({shape}); could not read its cleanup.policy"),
        ),
    }
    let brokers = topics::broker_count(config).await.unwrap_or(0);
    if replication_factor < 3 && brokers >= 3 {
        findings.push(
            Status::Warning,
            "checkpoint topic",
            format!(
                "{topic} has replication factor {replication_factor} on a cluster of {brokers} brokers: \
                 losing one broker can lose every relay's checkpoints; raise it to 3 with min.insync.replicas 2"
            ),
        );
    }
    if partitions > 1 {
        findings.push(
            Status::Ok,
            "checkpoint topic",
            format!("{topic} has {partitions} partitions; checkpoints are written to and read from partition 0 only"),
        );
    }
}
