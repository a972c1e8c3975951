//! The shipped alert rules and dashboard against a real Prometheus
//! (Debian's `prometheus` package, installed by `install-deps.sh`).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::missing_topics::{env_on_strict_broker, insert_orders};
use crate::support::http::{get, try_get};
use crate::support::kafka::create_topic;
use crate::support::{InProcessRelay, Mode};

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yaml");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/outboxd-dashboard.json"
);

#[test]
fn promtool_accepts_the_alert_rules() {
    let output = Command::new("promtool")
        .args(["check", "rules", RULES])
        .output()
        .expect("run promtool (install-deps.sh installs Debian's prometheus package)");
    assert!(
        output.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A relay whose rows wait for a missing topic is scraped by Prometheus
/// with the shipped rules (their `for:` cut to a second and the lag
/// threshold to 2 s, so the test takes seconds, not minutes; the
/// expressions, metric names and labels are the shipped ones): the lag and
/// missing-topic alerts fire, and resolve once the topic exists and the
/// rows drain. Every metric the dashboard and the rules name is in the
/// relay's exposition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_alert_fires_while_rows_wait_and_resolves_when_they_drain() {
    let (env, strict) = env_on_strict_broker("prometheus", Mode::Replication, "").await;
    let topic = format!("{}.Order", env.topic_prefix());
    let relay = InProcessRelay::start(env.config());
    let relay_url = relay.serve_http().await;
    env.wait_streaming(Duration::from_secs(30)).await;

    let dir = std::env::temp_dir().join(format!("outboxd-it-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("prometheus dir");
    let rules = std::fs::read_to_string(RULES)
        .expect("read the rules")
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 1s", &line[..line.len() - line.trim_start().len()]),
            None => line.replace(
                "(outboxd_oldest_unsent_age_seconds) > 60",
                "(outboxd_oldest_unsent_age_seconds) > 2",
            ),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("alerts.yaml"), rules).expect("write rules");
    let prometheus = Prometheus::start(&dir, relay_url.trim_start_matches("http://"));

    insert_orders(&env).await;
    prometheus
        .wait_for_alerts(&["OutboxdLagHigh", "OutboxdWaitingForMissingTopic"], true)
        .await;

    let (_, stalled) = get(&relay_url, "/metrics").await;

    create_topic(&strict, &topic, 1).await;
    env.wait_all_sent(Duration::from_secs(90)).await;
    prometheus
        .wait_for_alerts(&["OutboxdLagHigh", "OutboxdWaitingForMissingTopic"], false)
        .await;
    let (_, drained) = get(&relay_url, "/metrics").await;
    relay.stop().await.expect("relay stops cleanly");

    // Series with a topic label exist once a row names the topic.
    let exposition = format!("{stalled}{drained}");
    for name in metric_names(&std::fs::read_to_string(DASHBOARD).expect("dashboard"))
        .into_iter()
        .chain(metric_names(
            &std::fs::read_to_string(RULES).expect("rules"),
        ))
    {
        let families = [
            name.clone(),
            name.trim_end_matches("_total").to_string(),
            name.trim_end_matches("_bucket").to_string(),
            name.trim_end_matches("_info").to_string(),
        ];
        assert!(
            families
                .iter()
                .any(|family| exposition.contains(&format!("# TYPE {family} "))),
            "`{name}` is queried but never exposed:\n{exposition}"
        );
    }
}

/// Every `outboxd_…` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("outboxd_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A Prometheus server we started; killed (by its PID) when dropped.
struct Prometheus {
    child: Child,
    url: String,
}

impl Prometheus {
    fn start(dir: &std::path::Path, relay_address: &str) -> Prometheus {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: outboxd\n    static_configs:\n      - targets: ['{relay_address}']\n",
            rules = dir.join("alerts.yaml").display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run prometheus (install-deps.sh installs it)");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Waits until each of `alerts` is firing (`firing`) or none is.
    async fn wait_for_alerts(&self, alerts: &[&str], firing: bool) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let firing_now = match try_get(&self.url, "/api/v1/alerts").await {
                Some((200, body)) => firing_alerts(&body),
                _ => Vec::new(),
            };
            let done = alerts
                .iter()
                .all(|alert| firing_now.iter().any(|f| f == alert) == firing);
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "within 90 s, {alerts:?} did not {} (firing: {firing_now:?})",
                if firing { "fire" } else { "resolve" }
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Names of the alerts Prometheus reports firing.
fn firing_alerts(body: &str) -> Vec<String> {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(body) else {
        return Vec::new();
    };
    json["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|alert| alert["state"] == "firing")
        .filter_map(|alert| alert["labels"]["alertname"].as_str().map(String::from))
        .collect()
}
