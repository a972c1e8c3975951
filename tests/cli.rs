//! The command line: bad configs fail naming the key and the file, `check`
//! reports what is missing without printing secrets, `migrate` is idempotent.

use std::process::{Command, Output};
use std::time::Duration;

use crate::support::{InProcessRelay, Mode, TestEnv};

fn outboxd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .output()
        .expect("run outboxd")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn config_file(name: &str, yaml: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("outboxd-cli-{name}-{}.yaml", std::process::id()));
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn bad_configs_fail_naming_the_key_and_the_file() {
    let cases = [
        ("typo", "relay:\n  name: a\n  nmae: b\npostgres:\n  url: postgres://h/d\nkafka:\n  bootstrap_servers: k:1\n", "nmae"),
        ("duration", "relay:\n  name: a\npostgres:\n  url: postgres://h/d\nkafka:\n  bootstrap_servers: k:1\ncapture:\n  poll_interval: 10\n", "poll_interval"),
        ("missing", "relay:\n  name: a\nkafka:\n  bootstrap_servers: k:1\n", "postgres"),
        ("topic", "relay:\n  name: a\npostgres:\n  url: postgres://h/d\nkafka:\n  bootstrap_servers: k:1\nrouting:\n  dead_letter_topic: \"no spaces\"\n", "routing.dead_letter_topic"),
        ("yaml", "relay: [\n", "line 2"),
    ];
    for (name, yaml, key) in cases {
        let path = config_file(name, yaml);
        let output = outboxd(&["check", "--config", path.to_str().unwrap()]);
        let all = text(&output);
        assert_eq!(output.status.code(), Some(2), "{name}: {all}");
        assert!(
            all.contains(key),
            "{name}: message does not name `{key}`: {all}"
        );
        assert!(
            all.contains(path.to_str().unwrap()),
            "{name}: message does not name the file: {all}"
        );
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn environment_overrides_are_validated_too() {
    let path = config_file(
        "env",
        "relay:\n  name: a\npostgres:\n  url: postgres://h/d\nkafka:\n  bootstrap_servers: k:1\n",
    );
    let output = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["check", "--config", path.to_str().unwrap()])
        .env("OUTBOXD__CAPTURE__BATCH_SIZE", "lots")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output).contains("capture.batch_size"),
        "{}",
        text(&output)
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn version_and_help_with_examples() {
    let version = outboxd(&["--version"]);
    assert!(text(&version).contains(env!("CARGO_PKG_VERSION")));
    let help = outboxd(&["--help"]);
    assert!(
        text(&help).contains("Examples:") && text(&help).contains("OUTBOXD__"),
        "{}",
        text(&help)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_ready_setup_and_never_prints_the_password() {
    let env = TestEnv::new("check-ok", Mode::Polling).await;
    let with_password = env.database_url.replacen(
        "postgres://postgres@",
        "postgres://postgres:sup3rsecret@",
        1,
    );
    env.replace_in_config(&env.database_url, &with_password);

    let output = outboxd(&["check", "--config", env.config_path.to_str().unwrap()]);
    let all = text(&output);
    assert!(output.status.success(), "{all}");
    assert!(all.contains("all checks passed"), "{all}");
    assert!(!all.contains("sup3rsecret"), "password leaked: {all}");
    assert!(all.contains("postgres:***@"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_a_missing_table_and_migrate_fixes_it_idempotently() {
    let env = TestEnv::new("check-missing", Mode::Polling).await;
    sqlx::raw_sql("DROP TABLE outbox")
        .execute(&env.pool)
        .await
        .unwrap();
    let config = env.config_path.to_str().unwrap();

    let output = outboxd(&["check", "--config", config]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("does not exist") && text(&output).contains("outboxd migrate"),
        "{}",
        text(&output)
    );

    for _ in 0..2 {
        let output = outboxd(&["migrate", "--config", config]);
        assert!(output.status.success(), "{}", text(&output));
    }
    let output = outboxd(&["check", "--config", config]);
    assert!(output.status.success(), "{}", text(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_kafka_is_unreachable() {
    let env = TestEnv::new("check-kafka", Mode::Polling).await;
    env.replace_in_config(&env.kafka, "127.0.0.1:1");
    let output = outboxd(&["check", "--config", env.config_path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("[FAIL] kafka"), "{}", text(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_retried_until_shutdown() {
    let env = TestEnv::new("no-broker", Mode::Polling).await;
    env.replace_in_config(&env.kafka, "127.0.0.1:1");
    sqlx::query("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'o-1', 'OrderCreated', '{}')")
        .execute(&env.pool)
        .await
        .unwrap();

    let relay = crate::support::InProcessRelay::start(env.config());
    // The relay counts each failed session it retries; wait for a second
    // one, so a retry after the backoff really happened.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let exposition = relay.metrics.encode();
        let retries: u64 = exposition
            .lines()
            .find(|line| {
                line.starts_with("outboxd_errors_total{") && line.contains("kind=\"retry\"")
            })
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0);
        if retries >= 2 {
            break;
        }
        assert!(!relay.is_finished(), "the relay exited instead of retrying");
        assert!(
            std::time::Instant::now() < deadline,
            "no second retry within 60 s:\n{exposition}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay
        .stop()
        .await
        .expect("a graceful stop while retrying is not an error");
    assert_eq!(
        env.unsent().await,
        1,
        "nothing was acknowledged without Kafka"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_capture_mode_and_the_slot() {
    let env = TestEnv::new("check-slot", Mode::Replication).await;
    let config = env.config_path.to_str().unwrap().to_string();
    let before = text(&outboxd(&["check", "--config", &config]));
    assert!(
        before.contains("[ok  ] capture: replication (wal_level = logical"),
        "{before}"
    );
    assert!(before.contains("does not exist yet"), "{before}");

    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(60)).await;
    let streaming = outboxd(&["check", "--config", &config]);
    let all = text(&streaming);
    assert!(streaming.status.success(), "{all}");
    assert!(all.contains("wal_status reserved, retains"), "{all}");
    assert!(all.contains("streamed by backend pid"), "{all}");
    relay.stop().await.expect("relay stops cleanly");

    let nological = std::env::var("OUTBOXD_TEST_PG_NOLOGICAL_URL")
        .expect("OUTBOXD_TEST_PG_NOLOGICAL_URL is set by `make test`");
    let env = TestEnv::new_on(&nological, "check-nological", Mode::Replication).await;
    let refused = outboxd(&["check", "--config", env.config_path.to_str().unwrap()]);
    let all = text(&refused);
    assert!(!refused.status.success(), "{all}");
    assert!(
        all.contains("[FAIL] capture: mode replication is impossible: wal_level is `replica`"),
        "{all}"
    );
}

/// The configs we ship (the example, the compose stack's, the Kubernetes
/// ConfigMap's) load and validate with this binary, with the secrets the
/// deployment would inject from the environment.
#[test]
fn shipped_configs_are_valid() {
    let manifest = std::fs::read_to_string("deploy/kubernetes/order-service-with-outboxd.yaml")
        .expect("read the Kubernetes example");
    // The ConfigMap's `outboxd.yaml: |` block, dedented.
    let embedded: String = manifest
        .lines()
        .skip_while(|line| line.trim() != "outboxd.yaml: |")
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| format!("{}\n", line.get(4..).unwrap_or("")))
        .collect();
    assert!(
        embedded.contains("relay:"),
        "no config found in the ConfigMap"
    );
    let embedded_path =
        std::env::temp_dir().join(format!("outboxd-k8s-{}.yaml", std::process::id()));
    std::fs::write(&embedded_path, embedded).unwrap();

    for config in [
        "examples/outboxd.yaml".into(),
        "deploy/compose/outboxd.yaml".into(),
        embedded_path.clone(),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(["migrate", "--print", "--config"])
            .arg(&config)
            .env(
                "OUTBOXD__POSTGRES__URL",
                "postgres://outboxd:secret@db:5432/orders",
            )
            .env("OUTBOXD__KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
            .env("OUTBOXD__KAFKA__PROPERTIES__SASL_PASSWORD", "secret")
            .output()
            .expect("run outboxd");
        assert!(
            output.status.success(),
            "{} does not load: {}",
            config.display(),
            text(&output)
        );
    }
    std::fs::remove_file(&embedded_path).unwrap();
}
