//! What ships runs as written: the role scripts of `migrations/roles/`
//! (which the compose stack and the Kubernetes example run) against the
//! real Postgres, then the relay, `dead-letters replay` and retention under
//! that role; and the example configs, loaded as shipped and run against
//! the broker that does not create topics on first use.
//!
//! Only the addresses and names of this test's servers replace the
//! examples' own; every other key stays as shipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outboxd::config::{CaptureMode, Config};

use crate::least_privilege::{
    admin, as_role, assert_no_postgres_warning, check, managed, managed_env, outboxd, text, Grants,
    Roles,
};
use crate::support::kafka::read_topic;
use crate::support::{servers, InProcessRelay, Mode, TestEnv};

const LIMIT: Duration = Duration::from_secs(60);

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A shipped SQL script as an administrator runs it for `roles`: the role
/// `outboxd` is the relay's, `app_owner` the table owner's. Comments stay.
fn script_for(path: &str, roles: &Roles) -> String {
    role_script(path, &roles.relay, &roles.owner)
}

/// The shipped SQL script at `path` with the role `outboxd` renamed to
/// `relay` and `app_owner` to `owner`, outside comments.
pub(crate) fn role_script(path: &str, relay: &str, owner: &str) -> String {
    read(path)
        .lines()
        .map(|line| match line.trim_start().starts_with("--") {
            true => line.to_string(),
            false => line.replace("outboxd", relay).replace("app_owner", owner),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The role scripts compose's `grant` service runs (its `-f /roles/…`
/// arguments), as repository paths.
fn compose_grant_scripts() -> Vec<String> {
    let compose = read("deploy/compose.yaml");
    let scripts: Vec<String> = compose
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- \"/roles/"))
        .map(|rest| format!("migrations/roles/{}", rest.trim_end_matches('"')))
        .collect();
    assert!(
        !scripts.is_empty(),
        "compose's grant service runs no role script"
    );
    scripts
}

/// Every role script a shipped file names exists, so a reader who follows
/// the Kubernetes example or the compose file finds it.
#[test]
fn the_role_scripts_the_examples_name_exist() {
    for path in compose_grant_scripts() {
        assert!(repo_file(&path).is_file(), "compose.yaml runs {path}");
    }
    let manifest = read("deploy/kubernetes/order-service-with-outboxd.yaml");
    let named: Vec<&str> = manifest
        .split_whitespace()
        .filter(|word| word.starts_with("migrations/roles/"))
        .collect();
    assert!(named.len() >= 3, "{named:?}");
    for path in named {
        let path = path.trim_end_matches(|c: char| !c.is_alphanumeric());
        assert!(
            repo_file(path).is_file(),
            "the Kubernetes example names {path}"
        );
    }
}

in_both_modes!(
    the_role_scripts_let_the_relay_replay_and_retention_run,
    worker_threads = 2
);
/// The relay's role made only by the shipped scripts: in replication mode
/// exactly as the compose stack does (its initdb script, then its grant
/// service's files), in polling mode with `polling.sql` and the same
/// feature scripts. `check` passes and asks for nothing, the relay
/// publishes and dead-letters, `dead-letters replay` as that role puts the
/// row back once, and retention's delete runs as that role.
async fn the_role_scripts_let_the_relay_replay_and_retention_run(mode: Mode) {
    let (env, roles) = managed_env("role-scripts", mode, "  retention: 7d\n", Grants::None).await;
    let scripts = match mode {
        Mode::Polling => vec![
            "migrations/roles/polling.sql".to_string(),
            "migrations/roles/delete.sql".to_string(),
            "migrations/roles/replay.sql".to_string(),
        ],
        _ => {
            // compose's initdb creates the role itself.
            admin(&env, &format!("DROP ROLE {}", roles.relay)).await;
            let mut all = vec!["deploy/compose/initdb/10-outboxd-role.sql".to_string()];
            all.extend(compose_grant_scripts());
            all
        }
    };
    for script in &scripts {
        admin(&env, &script_for(script, &roles)).await;
    }
    let (passed, all) = check(&env);
    assert!(passed, "{scripts:?}: {all}");
    assert_no_postgres_warning(&all);
    assert!(all.contains("this role may replay dead letters"), "{all}");

    sqlx::raw_sql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
           ('Order', 'order-1', 'OrderCreated', '{\"n\": 1}'), \
           ('Bad Type', 'bad-1', 'Mistyped', '{\"n\": 2}'), \
           ('Order', 'order-2', 'OrderCreated', '{\"n\": 3}')",
    )
    .execute(&env.pool)
    .await
    .expect("insert events");
    env.relay_until_all_sent(LIMIT).await;

    // The operator fixes the routing and replays, as the relay's role.
    let fixed_topic = format!("{}.fixed", env.topic_prefix());
    env.replace_in_config(
        "routing:\n",
        &format!(
            "routing:\n  rules:\n    - aggregate_type: Bad Type\n      topic: {fixed_topic}\n"
        ),
    );
    let replayed = outboxd(&[
        "dead-letters",
        "replay",
        "--all",
        "--config",
        env.config_path.to_str().unwrap(),
    ]);
    assert!(replayed.status.success(), "{}", text(&replayed));
    assert!(
        text(&replayed).contains("re-inserted as seq 4"),
        "{}",
        text(&replayed)
    );
    env.relay_until_all_sent(LIMIT).await;
    let fixed = read_topic(&env.kafka, &fixed_topic).await;
    assert_eq!(fixed.len(), 1, "the replayed event once");
    let orders = read_topic(&env.kafka, &format!("{}.Order", env.topic_prefix())).await;
    assert_eq!(orders.len(), 2, "each order event once");

    // Retention's delete, on a session of the relay's role.
    use sqlx::Connection;
    let url = env.database_url.replacen(
        "postgres://postgres@",
        &format!("postgres://{}@", roles.relay),
        1,
    );
    let mut connection = sqlx::PgConnection::connect(&url)
        .await
        .expect("connect as the relay's role");
    let table = outboxd::table::OutboxTable::from_config(&env.config().postgres).unwrap();
    let (_keep_running, running) = outboxd::shutdown::channel();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let deleted = outboxd::retention::delete_old_rows(
        &mut connection,
        &table.delete_sent_before_sql(),
        Duration::ZERO,
        &running,
    )
    .await
    .expect("retention deletes as the relay's role");
    assert_eq!(
        deleted, 4,
        "every published row is older than a zero period"
    );
}

/// `partitions.sql`: without it `check` warns that the relay's role cannot
/// manage partitions and names the grant; with it `check` is clean and the
/// relay, as that role, makes a missing partition ahead again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partitions_script_lets_the_relay_keep_partitions_ahead() {
    let env = TestEnv::new_partitioned(
        "role-partitions",
        Mode::Polling,
        "  partitioning:\n    interval: 1h\n    ahead: 2\n",
    )
    .await;
    let (env, roles) = managed(env, "", Grants::None).await;
    admin(&env, &script_for("migrations/roles/polling.sql", &roles)).await;
    let (passed, all) = check(&env);
    assert!(passed, "{all}");
    let grant = format!("GRANT {} TO {};", roles.owner, roles.relay);
    assert!(
        all.lines()
            .any(|line| line.starts_with("[warn] partition owner:") && line.contains(&grant)),
        "{all}"
    );
    admin(&env, &script_for("migrations/roles/partitions.sql", &roles)).await;
    let (passed, all) = check(&env);
    assert!(passed, "{all}");
    assert!(all.contains("[ok  ] partition owner:"), "{all}");
    assert_no_postgres_warning(&all);

    let newest: String = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'outbox'::regclass AND c.relname <> 'outbox_default' \
         ORDER BY 1 DESC LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .expect("the newest partition");
    as_role(&env, &roles.owner, &format!("DROP TABLE {newest}")).await;
    let relay = InProcessRelay::start(env.config());
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&newest)
            .fetch_one(&env.pool)
            .await
            .unwrap();
        if exists {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay's role did not create {newest} again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.stop().await.expect("relay stops cleanly");
}

/// A shipped config file as a relay would load it (validated as a whole).
fn load_shipped(path: &Path) -> Config {
    outboxd::setup::Setup::load(path)
        .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.message))
        .config
}

/// The Kubernetes example's ConfigMap, written out as the file it mounts.
fn kubernetes_config() -> PathBuf {
    let manifest = read("deploy/kubernetes/order-service-with-outboxd.yaml");
    let block = manifest
        .split("outboxd.yaml: |\n")
        .nth(1)
        .expect("the ConfigMap holds outboxd.yaml");
    let mut yaml = String::new();
    for line in block.lines() {
        if line.starts_with("---") || (!line.is_empty() && !line.starts_with("    ")) {
            break;
        }
        yaml.push_str(line.strip_prefix("    ").unwrap_or(line));
        yaml.push('\n');
    }
    let path =
        std::env::temp_dir().join(format!("outboxd-it-kubernetes-{}.yaml", std::process::id()));
    std::fs::write(&path, yaml).expect("write the ConfigMap's file");
    path
}

/// Every shipped config loads as written.
#[test]
fn the_shipped_configs_load() {
    for path in [
        repo_file("examples/outboxd.yaml"),
        repo_file("deploy/compose/outboxd.yaml"),
        kubernetes_config(),
    ] {
        load_shipped(&path);
    }
}

async fn run_on_the_strict_broker(mode: Mode, which: &str, path: PathBuf) {
    let env = TestEnv::new(&format!("shipped-{which}"), mode).await;
    let strict = servers().kafka_no_auto_create;
    let mut config = load_shipped(&path);
    // This test's servers and names; the rest as shipped.
    config.relay.name = env.relay_name();
    config.postgres.url = env.database_url.clone();
    config.kafka.bootstrap_servers = strict.clone();
    config.kafka.checkpoint_topic = env.checkpoint_topic();
    config.kafka.properties.clear(); // the example's SASL: this broker is plaintext
    config.capture.mode = match mode {
        Mode::Polling => CaptureMode::Polling,
        _ => CaptureMode::Replication,
    };
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    // Topics of this test's own, so that they are missing when it starts,
    // as on a new cluster (the shipped names would be shared with the other
    // tests here); the template and the rules stay as shipped.
    let prefix = env.topic_prefix();
    config.routing.topic = format!("{prefix}.{}", config.routing.topic);
    for rule in &mut config.routing.rules {
        rule.topic = format!("{prefix}.{}", rule.topic);
    }
    // A single broker holds one replica of each partition.
    if config.routing.create_topics.replication_factor.is_some() {
        config.routing.create_topics.replication_factor = Some(1);
        config
            .routing
            .create_topics
            .configs
            .remove("min.insync.replicas");
    }

    let ids: Vec<(String, String)> = sqlx::query_as(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
           ('Order', 'order-1', 'OrderCreated', '{\"n\": 1}'), \
           ('Payment', 'order-1', 'PaymentCaptured', '{\"n\": 2}') \
         RETURNING id::text, type",
    )
    .fetch_all(&env.pool)
    .await
    .expect("insert events");
    let relay = InProcessRelay::start(config.clone());
    env.wait_all_sent(LIMIT).await;
    relay.stop().await.expect("relay stops cleanly");

    let topic_of = |event_type: &str| {
        config
            .routing
            .rules
            .iter()
            .find(|rule| rule.event_type.as_deref() == Some(event_type))
            .map(|rule| rule.topic.clone())
    };
    assert_eq!(
        topic_of("PaymentCaptured"),
        Some(format!("{prefix}.payments.captured")),
        "{which} routes PaymentCaptured to payments.captured"
    );
    for (id, event_type) in ids {
        let topic = topic_of(&event_type).unwrap_or_else(|| {
            config
                .routing
                .topic
                .replace("${aggregatetype}", "Order")
                .replace("${type}", &event_type)
        });
        let found = read_topic(&strict, &topic)
            .await
            .into_iter()
            .filter(|record| record.header("id") == Some(id.as_str()))
            .count();
        assert_eq!(found, 1, "{which}: event {id} on {topic} once");
    }
}

in_both_modes!(
    the_example_config_publishes_on_a_broker_that_creates_no_topics,
    worker_threads = 2
);
async fn the_example_config_publishes_on_a_broker_that_creates_no_topics(mode: Mode) {
    run_on_the_strict_broker(mode, "example", repo_file("examples/outboxd.yaml")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_config_publishes_on_a_broker_that_creates_no_topics() {
    run_on_the_strict_broker(
        Mode::Replication,
        "compose",
        repo_file("deploy/compose/outboxd.yaml"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_config_publishes_on_a_broker_that_creates_no_topics() {
    run_on_the_strict_broker(Mode::Polling, "kubernetes", kubernetes_config()).await;
}
