//! Several outboxes in one relay process (`outboxes:`): two tables in one
//! database and a third in another, in either capture mode, each relayed
//! exactly once and reported on its own; an outbox that stops does not
//! stall the others; the commands (`migrate`, `check`, `status`,
//! `dead-letters`) work over each.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::support::http::get;
use crate::support::kafka::read_all;
use crate::support::{several, Mode, TestEnv};

/// The second table of env `a`'s database: schema `billing`, its own
/// publication and notify channel, its events in `<a's prefix>.billing.*`.
fn billing_entry(a: &TestEnv) -> String {
    format!(
        "  - name: {name}\n\
         \x20   relay:\n      after_publish: mark\n\
         \x20   postgres:\n      url: \"{url}\"\n      table: billing.outbox\n      \
         publication: billing_publication\n      notify_channel: billing_inserted\n\
         \x20   kafka:\n      checkpoint_topic: {checkpoint_topic}\n\
         \x20   capture:\n      mode: {mode}\n\
         \x20   routing:\n      topic: \"{prefix}.billing.${{aggregatetype}}\"\n      dead_letter_topic: {prefix}.dlq\n",
        name = billing_name(a),
        url = a.database_url,
        checkpoint_topic = a.checkpoint_topic(),
        mode = a.mode.config_value(),
        prefix = a.topic_prefix(),
    )
}

fn billing_name(a: &TestEnv) -> String {
    format!("{}-b", a.relay_name())
}

/// The file: env `a`'s outbox (with `a_relay_lines` under its `relay:`),
/// the billing table beside it, env `c`'s.
fn write_config(a: &TestEnv, c: &TestEnv, a_relay_lines: &str) -> PathBuf {
    let entries = [
        several::outbox_entry(a, a_relay_lines),
        billing_entry(a),
        several::outbox_entry(c, ""),
    ];
    several::write_config_of(a, &entries, "")
}

/// The billing service's schema, which it owns (`migrate` creates the
/// outbox inside it, not the schema).
async fn create_billing_schema(a: &TestEnv) {
    sqlx::query("CREATE SCHEMA billing")
        .execute(&a.pool)
        .await
        .expect("create schema billing");
}

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

async fn insert(pool: &PgPool, table: &str, aggregate_type: &str, rows: i64) {
    sqlx::query(&format!(
        "INSERT INTO {table} (aggregatetype, aggregateid, type, payload) \
         SELECT $1, 'agg-' || (g % 5), 'Happened', jsonb_build_object('n', g) \
         FROM generate_series(1, $2) AS g"
    ))
    .bind(aggregate_type)
    .bind(rows)
    .execute(pool)
    .await
    .expect("insert events");
}

async fn ids(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(&format!("SELECT id::text FROM {table} ORDER BY seq"))
        .fetch_all(pool)
        .await
        .expect("read ids")
}

async fn wait_sent(pool: &PgPool, table: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let unsent: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE sent_at IS NULL"
        ))
        .fetch_one(pool)
        .await
        .expect("count unsent");
        if unsent == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{unsent} rows of {table} still unsent after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The event ids published to the topics starting with `prefix`, by topic.
async fn published(kafka: &str, prefix: &str) -> HashMap<String, Vec<String>> {
    let mut by_topic: HashMap<String, Vec<String>> = HashMap::new();
    for record in read_all(kafka, prefix).await {
        let id = record.header("id").unwrap_or_default().to_string();
        by_topic.entry(record.topic.clone()).or_default().push(id);
    }
    by_topic
}

fn assert_exactly(published: Option<&Vec<String>>, expected: &[String], what: &str) {
    let mut published = published.cloned().unwrap_or_default();
    let mut expected = expected.to_vec();
    published.sort();
    expected.sort();
    assert_eq!(published, expected, "{what}: not every row exactly once");
}

/// The relays of every outbox of `config`, in this process, with the HTTP
/// endpoint on a free port.
struct Relays {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Vec<(String, outboxd::Error)>>,
    base_url: String,
}

impl Relays {
    async fn start(config: &Path) -> Relays {
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
        Relays {
            stop: Some(stop),
            handle,
            base_url,
        }
    }

    /// Requests shutdown; returns the outboxes that had stopped on an error.
    async fn stop(mut self) -> Vec<String> {
        let _ = self.stop.take().map(|stop| stop.send(()));
        let stopped = tokio::time::timeout(Duration::from_secs(60), &mut self.handle)
            .await
            .expect("relays stop within 60s")
            .expect("relays task");
        stopped.into_iter().map(|(name, _)| name).collect()
    }
}

fn other_mode(mode: Mode) -> Mode {
    match mode {
        Mode::Polling => Mode::Replication,
        _ => Mode::Polling,
    }
}

in_both_modes!(
    each_outbox_is_relayed_exactly_once_and_reported_on_its_own,
    worker_threads = 2
);
async fn each_outbox_is_relayed_exactly_once_and_reported_on_its_own(mode: Mode) {
    let a = TestEnv::new("several-it-a", mode).await;
    let c = TestEnv::new("several-it-c", other_mode(mode)).await;
    let config = write_config(&a, &c, "");
    create_billing_schema(&a).await;

    // `migrate --print` is SQL to pipe into psql: headings are comments.
    let printed = outboxd(&["migrate", "--print"], &config);
    assert!(printed.status.success(), "{}", text(&printed));
    let sql = String::from_utf8_lossy(&printed.stdout).to_string();
    assert_eq!(sql.matches("-- == outbox ").count(), 3, "{sql}");
    assert!(
        sql.lines().all(|line| !line.starts_with("==")),
        "a heading that is not SQL: {sql}"
    );
    // `migrate` makes every outbox (the billing table is new), idempotently.
    let migrated = outboxd(&["migrate"], &config);
    assert!(migrated.status.success(), "{}", text(&migrated));
    assert!(
        text(&migrated).contains("billing.outbox"),
        "{}",
        text(&migrated)
    );
    let checked = outboxd(&["check"], &config);
    assert!(checked.status.success(), "{}", text(&checked));
    for name in [a.relay_name(), billing_name(&a), c.relay_name()] {
        assert!(
            text(&checked).contains(&format!("== outbox {name} ==")),
            "check does not report outbox {name}:\n{}",
            text(&checked)
        );
    }

    insert(&a.pool, "public.outbox", "Order", 40).await;
    insert(&a.pool, "billing.outbox", "Invoice", 30).await;
    insert(&c.pool, "public.outbox", "Order", 20).await;
    let relays = Relays::start(&config).await;
    wait_sent(&a.pool, "public.outbox", Duration::from_secs(120)).await;
    wait_sent(&a.pool, "billing.outbox", Duration::from_secs(120)).await;
    wait_sent(&c.pool, "public.outbox", Duration::from_secs(120)).await;
    // More while running: each table's own wake-up and stream.
    insert(&a.pool, "billing.outbox", "Invoice", 10).await;
    insert(&a.pool, "public.outbox", "Order", 10).await;
    wait_sent(&a.pool, "billing.outbox", Duration::from_secs(120)).await;
    wait_sent(&a.pool, "public.outbox", Duration::from_secs(120)).await;

    let (status, metrics) = get(&relays.base_url, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        metrics
            .matches("# TYPE outboxd_events_published counter")
            .count(),
        1,
        "{metrics}"
    );
    for (relay, topic, count) in [
        (a.relay_name(), format!("{}.Order", a.topic_prefix()), 50),
        (
            billing_name(&a),
            format!("{}.billing.Invoice", a.topic_prefix()),
            40,
        ),
        (c.relay_name(), format!("{}.Order", c.topic_prefix()), 20),
    ] {
        let line = format!(
            "outboxd_events_published_total{{relay=\"{relay}\",topic=\"{topic}\"}} {count}"
        );
        assert!(metrics.contains(&line), "missing `{line}` in:\n{metrics}");
    }
    let (status, ready) = get(&relays.base_url, "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready.matches(": ready: leading").count(), 3, "{ready}");

    let status = outboxd(&["status", "--json"], &config);
    assert!(status.status.success(), "{}", text(&status));
    let statuses: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("status --json is JSON");
    let relays_in_status: Vec<&str> = statuses
        .as_array()
        .expect("a list, one per outbox")
        .iter()
        .map(|s| s["relay"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        relays_in_status,
        [a.relay_name(), billing_name(&a), c.relay_name()]
    );
    let dead_letters = outboxd(&["dead-letters", "list"], &config);
    assert_eq!(
        dead_letters.status.code(),
        Some(2),
        "{}",
        text(&dead_letters)
    );
    assert!(
        text(&dead_letters).contains("--outbox"),
        "{}",
        text(&dead_letters)
    );
    let billing = billing_name(&a);
    let dead_letters = outboxd(&["dead-letters", "list", "--outbox", &billing], &config);
    assert!(dead_letters.status.success(), "{}", text(&dead_letters));

    assert!(
        relays.stop().await.is_empty(),
        "no outbox stopped on an error"
    );
    let a_topics = published(&a.kafka, &format!("{}.", a.topic_prefix())).await;
    assert_exactly(
        a_topics.get(&format!("{}.Order", a.topic_prefix())),
        &ids(&a.pool, "public.outbox").await,
        "outbox a",
    );
    assert_exactly(
        a_topics.get(&format!("{}.billing.Invoice", a.topic_prefix())),
        &ids(&a.pool, "billing.outbox").await,
        "the billing outbox",
    );
    let c_topics = published(&c.kafka, &format!("{}.", c.topic_prefix())).await;
    assert_exactly(
        c_topics.get(&format!("{}.Order", c.topic_prefix())),
        &ids(&c.pool, "public.outbox").await,
        "outbox c",
    );
    let _ = std::fs::remove_file(&config);
}

/// An outbox stopped by a poison row (`on_poison: halt`) stays stopped,
/// says so in `/readyz` and `outboxd_stopped`, and the others relay on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_that_stops_does_not_stall_the_others() {
    let a = TestEnv::new("several-stop-a", Mode::Replication).await;
    let c = TestEnv::new("several-stop-c", Mode::Polling).await;
    let config = write_config(&a, &c, "      on_poison: halt\n");
    create_billing_schema(&a).await;
    let migrated = outboxd(&["migrate"], &config);
    assert!(migrated.status.success(), "{}", text(&migrated));

    // A row no topic can be named after: a poison row, and `a` halts on it.
    insert(&a.pool, "public.outbox", "not a topic!", 1).await;
    let relays = Relays::start(&config).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = loop {
        let (status, body) = get(&relays.base_url, "/readyz").await;
        if body.contains(&format!(
            "{}: not ready: stopped on an error",
            a.relay_name()
        )) {
            assert_eq!(status, 503, "{body}");
            break body;
        }
        assert!(Instant::now() < deadline, "outbox a never stopped: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(ready.contains("poison"), "the reason is not shown: {ready}");

    // While `a` is stopped, the others take new rows.
    insert(&a.pool, "billing.outbox", "Invoice", 15).await;
    insert(&c.pool, "public.outbox", "Order", 15).await;
    wait_sent(&a.pool, "billing.outbox", Duration::from_secs(120)).await;
    wait_sent(&c.pool, "public.outbox", Duration::from_secs(120)).await;
    let (_, metrics) = get(&relays.base_url, "/metrics").await;
    for line in [
        format!("outboxd_stopped{{relay=\"{}\"}} 1", a.relay_name()),
        format!("outboxd_stopped{{relay=\"{}\"}} 0", billing_name(&a)),
        format!("outboxd_stopped{{relay=\"{}\"}} 0", c.relay_name()),
    ] {
        assert!(metrics.contains(&line), "missing `{line}` in:\n{metrics}");
    }
    assert_eq!(relays.stop().await, [a.relay_name()]);
    // The poison row was not published or acknowledged: it waits.
    let unsent: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public.outbox WHERE sent_at IS NULL")
            .fetch_one(&a.pool)
            .await
            .expect("count");
    assert_eq!(unsent, 1);
    let _ = std::fs::remove_file(&config);
}
