//! TLS and SASL against real servers: the stack's TLS-only Postgres (a CA
//! made at start-up, `hostssl` lines only) and the broker's SASL_SSL
//! listener (SCRAM-SHA-512). Both the SQL and the replication connection
//! read the same `postgres.url`: `sslmode=verify-full`, `sslrootcert`,
//! client certificates and passwords with a `+` must mean the same to both.

use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use crate::support::faults::RelayProcess;
use crate::support::workload::{assert_exactly_once, write_orders, Written};
use crate::support::{servers, InProcessRelay, Mode, TestEnv};

/// A variable the stack exports (deploy/local/stack.sh); the tests fail,
/// never skip, without it.
fn stack_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run `make test`, whose stack (deploy/local/stack.sh up DIR) \
             starts a TLS-only Postgres and a SASL_SSL Kafka listener and exports it"
        )
    })
}

/// The TLS Postgres, as `postgres://postgres@127.0.0.1:PORT/postgres?sslmode=verify-full&sslrootcert=CA`.
fn tls_server() -> String {
    let _ = servers();
    stack_var("OUTBOXD_TEST_PG_TLS_URL")
}

/// A database on the TLS Postgres whose config carries verify-full and the CA.
async fn tls_env(name: &str, mode: Mode) -> TestEnv {
    let env = TestEnv::new_on(&tls_server(), name, mode).await;
    let yaml = std::fs::read_to_string(&env.config_path).expect("read test config");
    assert!(
        yaml.contains("sslmode=verify-full") && yaml.contains(&stack_var("OUTBOXD_TEST_TLS_CA")),
        "the relay's postgres.url must carry sslmode and sslrootcert: {yaml}"
    );
    env
}

/// Sessions of the env's relay (its SQL and replication connections) and
/// how many of them are not encrypted.
async fn relay_sessions(env: &TestEnv) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name = $1",
    )
    .bind(format!("outboxd-{}", env.relay_name()))
    .fetch_one(&env.pool)
    .await
    .expect("read pg_stat_ssl")
}

/// Waits until the relay streams from its slot; fails the test at once
/// with the relay's error if it ends instead.
async fn streaming(env: &TestEnv, relay: InProcessRelay) -> InProcessRelay {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if relay.is_finished() {
            let ended = relay.finished(Duration::from_secs(1)).await;
            panic!("the relay ended before it streamed: {ended:?}");
        }
        let streaming: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_replication \
             WHERE application_name = $1 AND state IN ('catchup', 'streaming'))",
        )
        .bind(format!("outboxd-{}", env.relay_name()))
        .fetch_one(&env.pool)
        .await
        .expect("read pg_stat_replication");
        if streaming {
            return relay;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not stream within 60s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn relays_through_verify_full(mode: Mode) {
    let env = tls_env("tls-pg", mode).await;
    let before = write_orders(&env.pool, 0, 20, 4).await;
    let relay = InProcessRelay::start(env.config());
    let relay = match mode {
        Mode::Polling => relay,
        _ => streaming(&env, relay).await,
    };
    let during = write_orders(&env.pool, 1, 20, 4).await;
    env.wait_all_sent(Duration::from_secs(60)).await;

    // The server takes nothing but TLS; say so anyway, for each session.
    let (sessions, plain) = relay_sessions(&env).await;
    assert!(sessions >= 1, "the relay has no session on the server");
    assert_eq!(
        plain, 0,
        "{plain} of the relay's {sessions} sessions are not TLS"
    );
    if mode == Mode::Replication {
        let walsender_tls: bool = sqlx::query_scalar(
            "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
             WHERE r.application_name = $1",
        )
        .bind(format!("outboxd-{}", env.relay_name()))
        .fetch_one(&env.pool)
        .await
        .expect("the relay's walsender");
        assert!(walsender_tls, "the replication connection is not TLS");
    }
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once(&env, &Written::combined([before, during])).await;
}
in_both_modes!(relays_through_verify_full, worker_threads = 2);

/// A wrong CA fails both connections, each with an error that names the
/// certificate, instead of connecting unverified or retrying in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_both_connections_naming_the_certificate() {
    let env = tls_env("tls-wrong-ca", Mode::Replication).await;
    let ca = stack_var("OUTBOXD_TEST_TLS_CA");
    let wrong_ca = stack_var("OUTBOXD_TEST_TLS_WRONG_CA");
    let right_url = env.database_url.clone();
    let wrong_url = right_url.replace(&ca, &wrong_ca);
    assert_ne!(right_url, wrong_url);

    // The SQL connection: `outboxd check` fails and says why.
    env.replace_in_config(&ca, &wrong_ca);
    let output = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["check", "--config"])
        .arg(&env.config_path)
        .output()
        .expect("run outboxd check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[FAIL] postgres")
            && text.contains("certificate")
            && text.contains("sslrootcert"),
        "check must fail on the server's certificate: {text}"
    );

    // The relay stops on it too: a wrong CA does not heal by retrying.
    let error = InProcessRelay::start(env.config())
        .finished(Duration::from_secs(60))
        .await
        .expect_err("a wrong CA stops the relay");
    assert_eq!(error.cause, outboxd::Cause::PostgresCertificate, "{error}");
    assert!(
        error.message.contains("certificate") && error.message.contains("sslrootcert"),
        "{error}"
    );

    // The replication connection, on a slot that exists: with the right CA
    // it streams, with the wrong one it fails naming the certificate.
    let slot = format!("tls_wrong_ca_{}", std::process::id());
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&slot)
        .execute(&env.pool)
        .await
        .expect("create a slot");
    let target = outboxd::capture::wire::StreamTarget {
        slot: slot.clone(),
        publication: "outbox_publication".into(),
        confirmed_flush: outboxd::postgres::lsn::Lsn(0),
        start_at: None,
        application_name: format!("outboxd-{}", env.relay_name()),
    };
    let stream = outboxd::capture::wire::WireClient::start(&right_url, &target)
        .await
        .expect("the right CA streams");
    drop(stream);
    let error = match outboxd::capture::wire::WireClient::start(&wrong_url, &target).await {
        Ok(_) => panic!("the replication connection accepted a certificate of another CA"),
        Err(error) => error,
    };
    assert_eq!(error.kind, outboxd::ErrorKind::Stop, "{error}");
    assert!(
        error.message.contains("certificate") && error.message.contains("sslrootcert"),
        "{error}"
    );
    env.drop_slot_when_released(&slot).await;
}

/// libpq's `sslmode=allow` connects to a TLS-only server (plain refused,
/// then TLS). The replication client cannot try in that order and honours
/// it as `prefer`: it must reach this server, over TLS. (sqlx makes `allow`
/// no TLS at all, so the SQL connection could not; this is the replication
/// connection alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_allow_streams_over_tls_from_a_tls_only_server() {
    let env = tls_env("tls-allow", Mode::Replication).await;
    let url = env
        .database_url
        .replace("sslmode=verify-full", "sslmode=allow");
    assert!(url.contains("sslmode=allow"), "{url}");
    let slot = format!("tls_allow_{}", std::process::id());
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&slot)
        .execute(&env.pool)
        .await
        .expect("create a slot");
    let application_name = format!("outboxd-{}", env.relay_name());
    let target = outboxd::capture::wire::StreamTarget {
        slot: slot.clone(),
        publication: "outbox_publication".into(),
        confirmed_flush: outboxd::postgres::lsn::Lsn(0),
        start_at: None,
        application_name: application_name.clone(),
    };
    let stream = outboxd::capture::wire::WireClient::start(&url, &target)
        .await
        .expect("sslmode=allow reaches a TLS-only server");
    let tls: bool = sqlx::query_scalar(
        "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
         WHERE r.application_name = $1",
    )
    .bind(&application_name)
    .fetch_one(&env.pool)
    .await
    .expect("the walsender");
    assert!(tls, "the replication connection is not TLS");
    drop(stream);
    env.drop_slot_when_released(&slot).await;
}

/// Creates `role` (or resets it) as a member of `group`, with what a
/// least-privilege relay needs on the env's outbox.
async fn relay_role(env: &TestEnv, role: &str, group: &str, password: Option<&str>) {
    let password = match password {
        Some(password) => format!("PASSWORD '{password}'"),
        None => "PASSWORD NULL".into(),
    };
    for statement in [
        // A concurrent CREATE ROLE of the same name fails as unique_violation.
        format!(
            "DO $$ BEGIN CREATE ROLE {group} NOLOGIN; \
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ),
        format!(
            "DO $$ BEGIN CREATE ROLE {role}; \
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ),
        format!("ALTER ROLE {role} LOGIN REPLICATION {password}"),
        format!("GRANT {group} TO {role}"),
        format!("GRANT SELECT, UPDATE (sent_at) ON outbox TO {role}"),
    ] {
        sqlx::raw_sql(&statement)
            .execute(&env.pool)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// A role that logs in with a client certificate alone (`cert` in the
/// stack's pg_hba.conf): both connections must present it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_logs_in_both_connections() {
    let env = tls_env("tls-client-cert", Mode::Replication).await;
    let role = stack_var("OUTBOXD_TEST_TLS_CLIENT_USER");
    relay_role(&env, &role, "cert_auth", None).await;
    let url = format!(
        "{}&sslcert={}&sslkey={}",
        env.database_url
            .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1),
        stack_var("OUTBOXD_TEST_TLS_CLIENT_CERT"),
        stack_var("OUTBOXD_TEST_TLS_CLIENT_KEY"),
    );
    env.replace_in_config(&env.database_url, &url);
    relays_as(&env, &role).await;

    // Without the certificate the server refuses the role.
    let bare = url.split("&sslcert=").next().expect("url").to_string();
    let error = PgConnection::connect(&bare)
        .await
        .expect_err("no certificate, no login");
    assert!(error.to_string().contains("certificate"), "{error}");
}

/// A password with a `+` (and a space, percent-encoded) is the same
/// password to the replication connection as to the SQL one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plus_in_the_password_means_plus_to_both_connections() {
    let env = tls_env("tls-plus", Mode::Replication).await;
    let role = format!("it_plus_{}", std::process::id());
    relay_role(&env, &role, "scram_auth", Some("tls+pass word")).await;
    let url = env.database_url.replacen(
        "postgres://postgres@",
        &format!("postgres://{role}:tls+pass%20word@"),
        1,
    );
    env.replace_in_config(&env.database_url, &url);
    relays_as(&env, &role).await;
}

/// Runs a relay on the env's config until its replication connection
/// streams as `role` and every row written meanwhile is published exactly
/// once. (Rows written before the stream starts would be published from
/// the table, without the replication connection.)
async fn relays_as(env: &TestEnv, role: &str) {
    let relay = streaming(env, InProcessRelay::start(env.config())).await;
    let walsender_user: String = sqlx::query_scalar(
        "SELECT usename::text FROM pg_stat_replication WHERE application_name = $1",
    )
    .bind(format!("outboxd-{}", env.relay_name()))
    .fetch_one(&env.pool)
    .await
    .expect("the relay's walsender");
    assert_eq!(walsender_user, role, "the replication connection's role");
    let written = write_orders(&env.pool, 0, 30, 4).await;
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once(env, &written).await;
}

/// The relay's kafka.properties for the stack's SASL_SSL listener.
fn sasl_properties(password: &str) -> String {
    format!(
        "  properties:\n    security.protocol: SASL_SSL\n    sasl.mechanism: SCRAM-SHA-512\n    \
         sasl.username: {user}\n    sasl.password: {password}\n    ssl.ca.location: {ca}\n",
        user = stack_var("OUTBOXD_TEST_KAFKA_SASL_USER"),
        ca = stack_var("OUTBOXD_TEST_TLS_CA"),
    )
}

/// Points only the relay's config at the SASL_SSL listener: the checker
/// keeps reading through `env.kafka`, a PLAINTEXT listener of the same broker.
fn relay_through_sasl_ssl(env: &TestEnv, password: &str) {
    env.write_config("", &sasl_properties(password));
    env.replace_in_config(
        &format!("bootstrap_servers: {}\n", env.kafka),
        &format!(
            "bootstrap_servers: {}\n",
            stack_var("OUTBOXD_TEST_KAFKA_SASL_SSL")
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_publishes_through_sasl_ssl_with_scram() {
    let env = TestEnv::new("sasl-ssl", Mode::Replication).await;
    relay_through_sasl_ssl(&env, &stack_var("OUTBOXD_TEST_KAFKA_SASL_PASSWORD"));
    let written = write_orders(&env.pool, 0, 30, 4).await;
    env.relay_until_all_sent(Duration::from_secs(90)).await;
    assert_exactly_once(&env, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sasl_password_fails_clearly() {
    let env = TestEnv::new("sasl-wrong", Mode::Polling).await;
    relay_through_sasl_ssl(&env, "not-the-password");
    let output = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["check", "--config"])
        .arg(&env.config_path)
        .output()
        .expect("run outboxd check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[FAIL] kafka") && text.contains("SASL authentication"),
        "check must fail on the credentials: {text}"
    );
    // The relay retries (a password may be rotated under it) and says why.
    let log = std::env::temp_dir().join(format!("outboxd-sasl-wrong-{}.log", env.id));
    let relay = RelayProcess::spawn(&env.config_path, &log, None);
    relay
        .wait_for_log("SASL authentication", Duration::from_secs(90))
        .await;
}
