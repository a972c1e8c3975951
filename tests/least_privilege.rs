//! The relay as a managed Postgres runs it: no superuser anywhere. An owner
//! role (not a superuser) owns the database and runs `outboxd migrate`; the
//! relay runs as a second role holding exactly the grants the migration's
//! closing comments list (read from `outboxd migrate --print`, so the list
//! and these tests cannot drift apart), and `outboxd check` names every
//! grant that is missing with the statement that adds it.

use std::process::{Command, Output};
use std::time::Duration;

use crate::support::faults::RelayProcess;
use crate::support::kafka::read_all;
use crate::support::workload::{assert_exactly_once, write_orders, Written};
use crate::support::{InProcessRelay, Mode, TestEnv};

const LIMIT: Duration = Duration::from_secs(60);

pub(crate) fn outboxd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .output()
        .expect("run outboxd")
}

pub(crate) fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `outboxd check` on the env's config: whether it passed, and its output.
pub(crate) fn check(env: &TestEnv) -> (bool, String) {
    let output = outboxd(&["check", "--config", env.config_path.to_str().unwrap()]);
    (output.status.success(), text(&output))
}

/// The roles of a managed database: `owner` owns the database and the
/// outbox (it ran `outboxd migrate`), `relay` is the relay's.
pub(crate) struct Roles {
    pub(crate) owner: String,
    pub(crate) relay: String,
}

/// What the relay does with rows, and so which documented grants apply.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grants {
    /// Only the relay's role: no grant at all.
    None,
    /// Every documented grant the env's config needs.
    Documented,
}

/// A fresh env whose outbox an ordinary owner role migrated (the superuser
/// only creates the roles and hands the database over), with `relay:`
/// lines `relay_overrides`, and whose config now names the relay's role.
pub(crate) async fn managed_env(
    name: &str,
    mode: Mode,
    relay_overrides: &str,
    grants: Grants,
) -> (TestEnv, Roles) {
    managed(TestEnv::new(name, mode).await, relay_overrides, grants).await
}

/// `managed_env` for an env made already (a partitioned one, say).
pub(crate) async fn managed(
    env: TestEnv,
    relay_overrides: &str,
    grants: Grants,
) -> (TestEnv, Roles) {
    env.write_config(relay_overrides, "");
    let suffix = env.id.replace('-', "_");
    let roles = Roles {
        owner: format!("own_{suffix}"),
        relay: format!("rel_{suffix}"),
    };
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    // TestEnv migrated as the superuser: start again, as the owner.
    admin(
        &env,
        &format!(
            "DROP PUBLICATION outbox_publication; \
             DROP TABLE outbox, outbox_replayed; \
             DROP FUNCTION outbox_notify(), outbox_insert_only(); \
             CREATE ROLE {owner} LOGIN NOSUPERUSER; \
             ALTER DATABASE {database} OWNER TO {owner}; \
             REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC",
            owner = roles.owner
        ),
    )
    .await;
    let owner_config = env.config_path.with_extension("owner.yaml");
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(
        &owner_config,
        yaml.replace(
            "postgres://postgres@",
            &format!("postgres://{}@", roles.owner),
        ),
    )
    .unwrap();
    let migrated = outboxd(&["migrate", "--config", owner_config.to_str().unwrap()]);
    assert!(
        migrated.status.success(),
        "migrate as the owner: {}",
        text(&migrated)
    );
    let owns: bool = sqlx::query_scalar(
        "SELECT pg_get_userbyid(relowner) = $1 FROM pg_class WHERE oid = 'outbox'::regclass",
    )
    .bind(&roles.owner)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(owns, "the owner role owns the outbox");
    let _ = std::fs::remove_file(&owner_config);

    admin(
        &env,
        &format!("CREATE ROLE {} LOGIN NOSUPERUSER", roles.relay),
    )
    .await;
    if grants == Grants::Documented {
        for (statement, owner_runs) in documented_grants(&env, &roles.relay) {
            if owner_runs {
                as_role(&env, &roles.owner, &statement).await;
            } else {
                admin(&env, &statement).await;
            }
        }
    }
    env.replace_in_config(
        "postgres://postgres@",
        &format!("postgres://{}@", roles.relay),
    );
    (env, roles)
}

/// The grants at the end of `outboxd migrate --print` that this env's
/// config needs, for `role`, each with whether the table's owner runs it
/// (a grant on the outbox) or an administrator (a role attribute, a
/// built-in role or function). A condition this test does not know fails
/// it, so a new line in the list needs a decision here.
fn documented_grants(env: &TestEnv, role: &str) -> Vec<(String, bool)> {
    let printed = outboxd(&[
        "migrate",
        "--print",
        "--config",
        env.config_path.to_str().unwrap(),
    ]);
    assert!(printed.status.success(), "{}", text(&printed));
    let sql = String::from_utf8(printed.stdout).unwrap();
    let config = env.config();
    let deletes = config.relay.after_publish == outboxd::config::AfterPublish::Delete
        || config.relay.retention.is_some();
    let replicates = env.mode != Mode::Polling;
    let block = sql
        .split("-- A least-privilege role for the relay")
        .nth(1)
        .expect("the migration ends with the relay's grants");
    let mut statements = Vec::new();
    for line in block.lines().skip(1) {
        let Some(line) = line.strip_prefix("-- ") else {
            continue;
        };
        if line.starts_with("Only for running `outboxd dead-letters replay`") {
            break; // the relay itself needs none of these
        }
        let (statement, condition) = match line.split_once("-- ") {
            Some((statement, condition)) => (statement.trim(), condition.trim()),
            None => (line.trim(), ""),
        };
        if statement.starts_with("CREATE ROLE") {
            continue; // created above
        }
        if !(statement.starts_with("GRANT ") || statement.starts_with("ALTER ROLE ")) {
            continue; // prose
        }
        let needed = match condition {
            "" => true,
            c if c.starts_with("only for relay.after_publish: delete or relay.retention") => {
                deletes
            }
            c if c.starts_with("only for capture.mode: replication or auto") => replicates,
            c if c.starts_with("only with synchronous standbys") => false,
            c if c.starts_with("only where it was revoked from PUBLIC") => true,
            other => panic!("a documented grant with a condition this test does not know: {other}"),
        };
        if needed {
            let owner_runs = statement.contains(" ON \"");
            statements.push((
                statement.replace(" outboxd", &format!(" {role}")),
                owner_runs,
            ));
        }
    }
    assert!(statements.len() >= 2, "no grants found in: {block}");
    statements
}

pub(crate) async fn admin(env: &TestEnv, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Runs `sql` as `role` (trust authentication in the test stack).
pub(crate) async fn as_role(env: &TestEnv, role: &str, sql: &str) {
    use sqlx::Connection;
    let url = env
        .database_url
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let mut connection = sqlx::PgConnection::connect(&url)
        .await
        .expect("connect as the role");
    sqlx::raw_sql(sql)
        .execute(&mut connection)
        .await
        .unwrap_or_else(|e| panic!("{sql} as {role}: {e}"));
}

/// `check` asks for no grant and warns about nothing on the Postgres side
/// (the test broker's auto-created dead-letter topic is a Kafka warning).
pub(crate) fn assert_no_postgres_warning(all: &str) {
    assert!(
        !all.contains("GRANT") && !all.contains("ALTER ROLE"),
        "check asks for more than the documented grants: {all}"
    );
    let warnings: Vec<&str> = all
        .lines()
        .filter(|line| line.starts_with("[warn]") && !line.starts_with("[warn] topic:"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:?} in: {all}");
}

in_both_modes!(
    a_least_privilege_role_relays_exactly_once,
    worker_threads = 2
);
/// The whole relay as the least-privilege role: `check` passes and asks for
/// no grant, a relay killed between its Kafka commit and marking the rows
/// is restarted, `status` shows it leading, and the checker finds every row
/// in Kafka exactly once.
async fn a_least_privilege_role_relays_exactly_once(mode: Mode) {
    let (env, roles) = managed_env("least-priv", mode, "", Grants::Documented).await;
    let (passed, all) = check(&env);
    assert!(passed, "{all}");
    assert_no_postgres_warning(&all);
    if mode == Mode::Replication {
        assert!(all.contains("[ok  ] capture: replication"), "{all}");
    }

    let first = write_orders(&env.pool, 0, 10, 5).await;
    let mut relay = RelayProcess::start(&env, Some("after-commit"));
    relay.killed_at_point("after-commit", LIMIT).await;
    assert!(
        env.unsent().await > 0,
        "the relay died between its Kafka commit and marking the rows"
    );
    let second = write_orders(&env.pool, 1, 10, 5).await;

    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    env.wait_streaming(LIMIT).await;
    if mode == Mode::Replication {
        let user: String = sqlx::query_scalar(
            "SELECT usename::text FROM pg_stat_replication WHERE application_name = $1",
        )
        .bind(format!("outboxd-{}", env.relay_name()))
        .fetch_one(&env.pool)
        .await
        .expect("the relay's walsender");
        assert_eq!(user, roles.relay, "the relay streams as its own role");
    }

    let status = outboxd(&[
        "status",
        "--json",
        "--config",
        env.config_path.to_str().unwrap(),
    ]);
    assert!(status.status.success(), "{}", text(&status));
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("status --json prints JSON");
    assert_eq!(status["pending_rows"], 0, "{status}");
    assert_eq!(
        status["leader"]["application_name"],
        format!("outboxd-{}", env.relay_name()),
        "{status}"
    );
    assert!(status["leader"]["backend_start"].is_string(), "{status}");
    assert!(
        status["last_checkpoint"]["published_rows"].as_u64() > Some(0),
        "{status}"
    );
    assert!(status.get("last_checkpoint_error").is_none(), "{status}");
    if mode == Mode::Replication {
        assert!(status["slot"]["active_pid"].is_number(), "{status}");
    }
    relay.stop().await;
    assert_exactly_once(&env, &Written::combined([first, second])).await;
}

/// `after_publish: delete` as the least-privilege role: the documented
/// `DELETE` grant is enough, and every committed row reaches Kafka once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_role_deletes_what_it_published() {
    let (env, _roles) = managed_env(
        "least-priv-delete",
        Mode::Replication,
        "  after_publish: delete\n",
        Grants::Documented,
    )
    .await;
    let (passed, all) = check(&env);
    assert!(passed, "{all}");
    let written = write_orders(&env.pool, 0, 10, 5).await;
    let relay = InProcessRelay::start(env.config());
    let deadline = std::time::Instant::now() + LIMIT;
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap()
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "rows were not deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await.expect("relay stops cleanly");
    let mut published: Vec<String> = read_all(&env.kafka, &env.topic_prefix())
        .await
        .iter()
        .filter(|record| record.topic != env.dead_letter_topic())
        .map(|record| record.header("id").expect("id header").to_string())
        .collect();
    let mut committed = written.committed_ids.clone();
    published.sort();
    committed.sort();
    assert_eq!(published, committed, "each committed row exactly once");
}

/// Every grant the relay lacks is a finding of `check` that names the
/// statement to run; running exactly that statement (as the owner for the
/// table, as an administrator for the rest) clears the finding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_missing_grant_with_the_statement_to_run() {
    let (env, roles) = managed_env(
        "grants",
        Mode::Replication,
        "  after_publish: delete\n",
        Grants::None,
    )
    .await;
    let (passed, all) = check(&env);
    assert!(!passed, "{all}");
    let relay = &roles.relay;
    let expected = [
        (
            "[FAIL] outbox table:",
            format!("GRANT SELECT ON \"public\".\"outbox\" TO {relay};"),
        ),
        (
            "[FAIL] outbox table:",
            format!("GRANT UPDATE (\"sent_at\") ON \"public\".\"outbox\" TO {relay};"),
        ),
        (
            "[FAIL] outbox table:",
            format!("GRANT DELETE ON \"public\".\"outbox\" TO {relay};"),
        ),
        (
            "[FAIL] capture:",
            format!("ALTER ROLE {relay} WITH REPLICATION;"),
        ),
        (
            "[warn] kafka identity:",
            format!("GRANT EXECUTE ON FUNCTION pg_control_system() TO {relay};"),
        ),
    ];
    for (finding, statement) in &expected {
        assert!(
            all.lines()
                .any(|line| line.starts_with(finding) && line.contains(statement.as_str())),
            "no `{finding}` naming `{statement}`: {all}"
        );
    }
    // The relay refuses to start the same way.
    let error = InProcessRelay::start(env.config())
        .finished(LIMIT)
        .await
        .expect_err("the relay refuses a role without its grants");
    assert!(error.message.contains(&expected[0].1), "{}", error.message);

    // Each statement, run as printed, clears its finding and no other.
    for (i, (_, statement)) in expected.iter().enumerate() {
        if statement.contains(" ON \"public\"") {
            as_role(&env, &roles.owner, statement).await;
        } else {
            admin(&env, statement).await;
        }
        let (passed, all) = check(&env);
        assert!(
            !all.contains(statement.as_str()),
            "{statement} did not clear it: {all}"
        );
        for (later_finding, later) in &expected[i + 1..] {
            assert!(
                all.contains(later.as_str()),
                "{later_finding} {later} vanished: {all}"
            );
        }
        assert_eq!(passed, i + 2 >= expected.len(), "{all}");
    }
    let (passed, all) = check(&env);
    assert!(passed, "{all}");
    assert_no_postgres_warning(&all);

    // A publication the relay's role cannot create: the owner must.
    as_role(&env, &roles.owner, "DROP PUBLICATION outbox_publication").await;
    let (passed, all) = check(&env);
    assert!(!passed, "{all}");
    let create = "CREATE PUBLICATION \"outbox_publication\" FOR TABLE \"public\".\"outbox\" \
                  WITH (publish = 'insert');";
    assert!(
        all.lines()
            .any(|line| line.starts_with("[FAIL] publication:")
                && line.contains(create)
                && line.contains(&roles.owner)),
        "{all}"
    );
    let error = InProcessRelay::start(env.config())
        .finished(LIMIT)
        .await
        .expect_err("the relay cannot create the owner's publication");
    assert!(
        error.message.contains(create) && error.message.contains(&roles.owner),
        "{}",
        error.message
    );
    as_role(&env, &roles.owner, create).await;
    let (passed, all) = check(&env);
    assert!(passed, "{all}");
}

/// `relay.retention` deletes rows too, so its role needs `DELETE` even
/// with `after_publish: mark`, and `check` says so before the first
/// housekeeping round fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_needs_the_delete_grant() {
    let (env, roles) = managed_env(
        "retention-grant",
        Mode::Polling,
        "  retention: 7d\n",
        Grants::Documented,
    )
    .await;
    let (passed, all) = check(&env);
    assert!(passed, "{all}");
    as_role(
        &env,
        &roles.owner,
        &format!("REVOKE DELETE ON outbox FROM {}", roles.relay),
    )
    .await;
    let (passed, all) = check(&env);
    assert!(!passed, "{all}");
    let grant = format!("GRANT DELETE ON \"public\".\"outbox\" TO {};", roles.relay);
    assert!(
        all.lines()
            .any(|line| line.starts_with("[FAIL] outbox table:") && line.contains(&grant)),
        "{all}"
    );
}

/// Amazon RDS and Aurora let a role replicate through membership in their
/// `rds_replication` role, not the `REPLICATION` attribute. Emulated here by
/// a role of that name (this server does not honour it, so only `check`
/// and the capture choice are exercised): membership counts as may
/// replicate, where `auto` would otherwise poll and `replication` refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_in_rds_replication_counts_as_may_replicate() {
    let (env, roles) = managed_env("rds-replication", Mode::Polling, "", Grants::Documented).await;
    env.replace_in_config("mode: polling", "mode: replication");
    let (passed, all) = check(&env);
    assert!(!passed, "{all}");
    assert!(
        all.contains(&format!("GRANT rds_replication TO {};", roles.relay)),
        "{all}"
    );
    admin(
        &env,
        &format!(
            "DO $$ BEGIN CREATE ROLE rds_replication NOLOGIN; \
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$; \
             GRANT rds_replication TO {}",
            roles.relay
        ),
    )
    .await;
    let (_, all) = check(&env);
    assert!(
        all.contains("[ok  ] capture: replication (wal_level = logical, role may replicate: yes"),
        "{all}"
    );
}

/// A login role that switches to the relay's group role at session start
/// (`ALTER ROLE … SET role`, common where logins are per person or per
/// secret rotation) sees no other session's details in `pg_stat_activity`,
/// not even its own leader's: the relay must lead and publish all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_role_that_sets_the_relay_role_leads_and_publishes() {
    let (env, roles) = managed_env("set-role", Mode::Polling, "", Grants::Documented).await;
    let login = format!("{}_login", roles.relay);
    admin(
        &env,
        &format!(
            "CREATE ROLE {login} LOGIN NOSUPERUSER IN ROLE {relay}; \
             ALTER ROLE {login} SET role = '{relay}'",
            relay = roles.relay
        ),
    )
    .await;
    env.replace_in_config(
        &format!("postgres://{}@", roles.relay),
        &format!("postgres://{login}@"),
    );
    let written = write_orders(&env.pool, 0, 20, 4).await;
    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await;
    assert_exactly_once(&env, &written).await;
}
