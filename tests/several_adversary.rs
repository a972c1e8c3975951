//! Adversarial cases of several outboxes in one process (`outboxes:`):
//! clashes the load does not catch, and what the process serves.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::http::get;
use crate::support::kafka::read_all;
use crate::support::{several, Mode, TestEnv};

fn outboxd(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .arg("--config")
        .arg(config)
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

/// Every outbox of `config` relayed in this process, the HTTP endpoint on a
/// free port; returns the base URL and a stopper.
async fn start(
    config: &Path,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<(String, outboxd::Error)>>,
) {
    let setups = outboxd::setup::Setup::load_all(config).expect("valid config");
    outboxd::logging::init(&setups[0].config.log);
    let metrics = outboxd::relays::metrics_for(&setups);
    let listener = outboxd::http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .expect("bind");
    let base_url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(outboxd::http::serve(
        listener,
        metrics.clone(),
        std::future::pending(),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(outboxd::relays::run(setups, metrics, async move {
        let _ = stopped.await;
    }));
    (base_url, stop, handle)
}

/// A message outbox of env `a`'s database with `prefix`, its own slot
/// (by name) and publication, its events in `<a's prefix>.<prefix>.*`.
fn message_entry(a: &TestEnv, prefix: &str, url: &str) -> String {
    let name = format!("{}-{prefix}", a.relay_name());
    format!(
        "  - name: {name}\n\
         \x20   postgres:\n      url: \"{url}\"\n      publication: {prefix}_messages\n\
         \x20   kafka:\n      checkpoint_topic: {checkpoint_topic}\n\
         \x20   capture:\n      mode: replication\n      source: messages\n      message_prefix: {prefix}\n\
         \x20   routing:\n      topic: \"{topics}.{prefix}.${{aggregatetype}}\"\n      dead_letter_topic: {topics}.dlq\n",
        checkpoint_topic = a.checkpoint_topic(),
        topics = a.topic_prefix(),
    )
}

/// Two message outboxes with different prefixes in one database would
/// share the `outboxd_emit` of the schema of the inherited `postgres.table`
/// (`public`): `migrate` writes it with one prefix, so the second would
/// replace the first and carry its service's events to the other outbox.
/// The load refuses the pair, naming the key whose schema holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_message_outboxes_in_one_database_cannot_share_one_emit_function() {
    let a = TestEnv::new("adv-two-msg", Mode::Replication).await;
    let entries = [
        message_entry(&a, "pa", &a.database_url),
        message_entry(&a, "pb", &a.database_url),
    ];
    let config = several::write_config_of(&a, &entries, "");
    let error = match outboxd::setup::Setup::load_all(&config) {
        Ok(_) => panic!("two message outboxes on one public.outboxd_emit were accepted"),
        Err(error) => error.to_string(),
    };
    let _ = std::fs::remove_file(&config);
    assert!(
        error.contains("outboxd_emit") && error.contains("postgres.table"),
        "refused, but not for the shared emit function: {error}"
    );
}

/// The same pair with the database named two ways (`127.0.0.1` and
/// `localhost`), which the load cannot tell apart: `migrate` refuses to
/// replace the first outbox's function, `check` fails for the second, and
/// the first outbox's service still reaches the first outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_named_two_ways_still_keeps_each_outboxs_emit_function() {
    let a = TestEnv::new("adv-two-msg-alias", Mode::Replication).await;
    assert!(a.database_url.contains("127.0.0.1"), "{}", a.database_url);
    let other_spelling = a.database_url.replace("127.0.0.1", "localhost");
    let entries = [
        message_entry(&a, "pa", &a.database_url),
        message_entry(&a, "pb", &other_spelling),
    ];
    let config = several::write_config_of(&a, &entries, "");
    outboxd::setup::Setup::load_all(&config).expect("the load cannot see one database here");
    let migrated = outboxd(&["migrate"], &config);
    assert!(!migrated.status.success(), "{}", text(&migrated));
    assert!(
        text(&migrated).contains("emits another prefix than `pb`"),
        "{}",
        text(&migrated)
    );
    let checked = outboxd(&["check"], &config);
    assert!(!checked.status.success(), "{}", text(&checked));
    assert!(
        text(&checked)
            .contains("[FAIL] emit function: public.outboxd_emit() emits another prefix than `pb`"),
        "{}",
        text(&checked)
    );
    // pb's slot, which its migrate did not get to, so its relay can start.
    let pb_slot = format!(
        "outboxd_{}",
        format!("{}-pb", a.relay_name()).replace('-', "_")
    );
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&pb_slot)
        .execute(&a.pool)
        .await
        .expect("create pb's slot");
    sqlx::query("CREATE PUBLICATION pb_messages")
        .execute(&a.pool)
        .await
        .expect("create pb's publication");
    let (base_url, stop, handle) = start(&config).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&base_url, "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id: String = sqlx::query_scalar(
        "SELECT public.outboxd_emit('Order', 'o-1', 'OrderCreated', '{\"n\": 1}')::text",
    )
    .fetch_one(&a.pool)
    .await
    .expect("emit through outbox pa's function");
    let deadline = Instant::now() + Duration::from_secs(60);
    let topic = loop {
        let records = read_all(&a.kafka, &format!("{}.p", a.topic_prefix())).await;
        if let Some(record) = records.iter().find(|r| r.header("id") == Some(id.as_str())) {
            break record.topic.clone();
        }
        assert!(Instant::now() < deadline, "event {id} never published");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(60), handle).await;
    let _ = std::fs::remove_file(&config);
    assert_eq!(topic, format!("{}.pa.Order", a.topic_prefix()));
}

/// Two outboxes of one database on one slot (`capture.slot` at the top,
/// inherited), the server named `127.0.0.1` in one URL and `localhost` in
/// the other: only one walsender may use a slot, so the other outbox would
/// retry forever behind it. URLs cannot tell one server's names apart, so
/// no two outboxes of a file may share a slot at all.
#[test]
fn one_slot_cannot_be_shared_by_naming_the_server_two_ways() {
    let path = std::env::temp_dir().join(format!("outboxd-adv-slot-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        "kafka:\n  bootstrap_servers: localhost:9092\n\
         capture:\n  slot: shared_slot\n\
         outboxes:\n\
         \x20 - name: orders\n    postgres: {url: 'postgres://o@127.0.0.1:5432/shop', table: orders.outbox, publication: op}\n\
         \x20 - name: billing\n    postgres: {url: 'postgres://o@localhost:5432/shop', table: billing.outbox, publication: bp}\n",
    )
    .unwrap();
    let error = match outboxd::setup::Setup::load_all(&path) {
        Ok(_) => panic!("two outboxes on one slot were accepted"),
        Err(error) => error.to_string(),
    };
    let _ = std::fs::remove_file(&path);
    assert!(
        error.contains(
            "outboxes[1] (billing).capture.slot: the slot `shared_slot` is also outbox `orders`'s"
        ),
        "{error}"
    );
}

/// `/metrics` of a process relaying several outboxes, one of them stopped
/// and one waiting for a topic, is a valid exposition for Prometheus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merged_metrics_pass_promtool() {
    let a = TestEnv::new("adv-prom-a", Mode::Polling).await;
    let c = TestEnv::new("adv-prom-c", Mode::Replication).await;
    let config = several::write_config(&[&a, &c], "");
    sqlx::query(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'Order', 'o-' || g, 'OrderCreated', '{}' FROM generate_series(1, 20) g",
    )
    .execute(&a.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'Order', 'o-' || g, 'OrderCreated', '{}' FROM generate_series(1, 20) g",
    )
    .execute(&c.pool)
    .await
    .unwrap();
    let (base_url, stop, handle) = start(&config).await;
    a.wait_all_sent(Duration::from_secs(120)).await;
    c.wait_all_sent(Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, metrics) = get(&base_url, "/metrics").await;
    assert_eq!(status, 200);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(60), handle).await;
    let _ = std::fs::remove_file(&config);
    let path = std::env::temp_dir().join(format!("outboxd-adv-metrics-{}.txt", a.id));
    std::fs::write(&path, &metrics).unwrap();
    // promtool 2.42 reads the Prometheus text format only: the OpenMetrics
    // `info` type, `# UNIT` and `# EOF` are told apart from what matters
    // here (a family described twice, a series out of its family), and
    // its lint findings (counter names) hold for one outbox too.
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "sed -e 's/^# TYPE \\(.*\\) info$/# TYPE \\1 gauge/' -e '/^# EOF/d' -e '/^# UNIT/d' {} \
             | promtool check metrics",
            path.display()
        ))
        .output()
        .expect("run promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !said.contains("parsing error") && !said.contains("second TYPE"),
        "promtool check metrics ({}): {said}",
        path.display()
    );
}

/// A mistake in a top-level key, which every outbox inherits, is reported
/// as that key, not as the first outbox's.
#[test]
fn a_top_level_mistake_is_named_as_the_top_level_key() {
    let path = std::env::temp_dir().join(format!("outboxd-adv-typo-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        "kafka:\n  bootstrap_servers: localhost:9092\n\
         postgres:\n  url: postgres://outboxd@localhost:5432/shop\n  tabel: x\n\
         outboxes:\n\
         \x20 - name: orders\n    postgres: {table: orders.outbox, publication: op}\n\
         \x20 - name: billing\n    postgres: {table: billing.outbox, publication: bp}\n",
    )
    .unwrap();
    let error = match outboxd::setup::Setup::load_all(&path) {
        Ok(_) => panic!("a config with `postgres.tabel` was accepted"),
        Err(error) => error.to_string(),
    };
    let _ = std::fs::remove_file(&path);
    assert!(error.contains("tabel"), "{error}");
    assert!(
        !error.contains("outboxes[0]"),
        "the typo is in the top-level `postgres`, which no entry sets, but the error sends the \
         operator to the first outbox: {error}"
    );
}
