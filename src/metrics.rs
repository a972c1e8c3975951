//! The relay's metrics and health, shared by the relay (which updates them
//! where things happen) and the HTTP endpoint (which reads them).
//!
//! Invariant: reading never touches Postgres or Kafka. A scrape encodes
//! values already in memory, so scraping is cheap and can never slow the
//! relay; figures that need a query (pending rows, the slot) are sampled by
//! one background task on its own connection (`lag`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::error::ErrorKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabel {
    pub slot: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: &'static str,
}

/// A step of a batch's way from the outbox to its marks, timed in
/// `outboxd_stage_seconds` so that where time goes is measured, not guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Polling: the claim query and fetching its rows.
    Claim,
    /// Replication after a catch-up drain or a polling session: looking up
    /// which of a batch's rows are still unsent.
    CatchUpFilter,
    /// Replication: a batch held until the synchronous standbys flushed its commits.
    SyncStandbys,
    /// From a batch's first row in the relay's hands until its Kafka
    /// transaction begins (replication: includes `catch_up_filter` and
    /// `sync_standbys`, and the gathering of the batch).
    Queued,
    /// `begin_transaction`.
    Begin,
    /// From the first record handed to librdkafka until the broker
    /// acknowledged every record and the checkpoint.
    Produce,
    /// Adding the checkpoint group's offset to the transaction.
    Offsets,
    /// `commit_transaction`.
    Commit,
    /// A committed batch waiting for the batches before it to be marked.
    WaitForMarks,
    /// Marking the batch's rows sent, and committing that.
    Mark,
}

impl Stage {
    pub const ALL: [Stage; 10] = [
        Stage::Claim,
        Stage::CatchUpFilter,
        Stage::SyncStandbys,
        Stage::Queued,
        Stage::Begin,
        Stage::Produce,
        Stage::Offsets,
        Stage::Commit,
        Stage::WaitForMarks,
        Stage::Mark,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Claim => "claim",
            Stage::CatchUpFilter => "catch_up_filter",
            Stage::SyncStandbys => "sync_standbys",
            Stage::Queued => "queued",
            Stage::Begin => "begin",
            Stage::Produce => "produce",
            Stage::Offsets => "offsets",
            Stage::Commit => "commit",
            Stage::WaitForMarks => "wait_for_marks",
            Stage::Mark => "mark",
        }
    }
}

/// What the relay is doing, for `/readyz` and `outboxd status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayState {
    Starting = 0,
    /// Waiting for the leader lock: a healthy standby.
    Standby = 1,
    /// Holding the lock and relaying.
    Leading = 2,
    /// A session failed; reconnecting after a backoff.
    Retrying = 3,
    Stopping = 4,
    /// Stopped on an error it must not continue past. Only an outbox
    /// among several stays in this state: the process goes on relaying
    /// the others (a process of one outbox exits instead).
    Stopped = 5,
}

impl RelayState {
    fn from_u8(value: u8) -> RelayState {
        match value {
            1 => RelayState::Standby,
            2 => RelayState::Leading,
            3 => RelayState::Retrying,
            4 => RelayState::Stopping,
            5 => RelayState::Stopped,
            _ => RelayState::Starting,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RelayState::Starting => "starting",
            RelayState::Standby => "standby",
            RelayState::Leading => "leading",
            RelayState::Retrying => "retrying",
            RelayState::Stopping => "stopping",
            RelayState::Stopped => "stopped",
        }
    }
}

/// Buckets of the latency histogram, in seconds: 5 ms to 5 minutes.
const LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Buckets of the stage histograms, in seconds: 100 µs to a minute.
const STAGE_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 60.0,
];

fn stage_histogram() -> Histogram {
    Histogram::new(STAGE_BUCKETS)
}

pub struct Metrics {
    /// The relay's name (`relay.name`), the `relay` label of every series.
    name: String,
    registry: Registry,
    stage_seconds: Family<StageLabel, Histogram, fn() -> Histogram>,
    events_published: Family<TopicLabel, Counter>,
    events_dead_lettered: Counter,
    kafka_transactions: Family<OutcomeLabel, Counter>,
    errors: Family<KindLabel, Counter>,
    pending_rows: Gauge,
    oldest_unsent_age: Gauge<f64, AtomicU64>,
    event_latency: Histogram,
    slot_retained_wal: Family<SlotLabel, Gauge>,
    slot_confirmed_flush: Family<SlotLabel, Gauge>,
    leader: Gauge,
    capture_mode: Family<ModeLabel, Gauge>,
    rows_waiting_for_topic: Family<TopicLabel, Gauge>,
    sync_standbys_required: Gauge,
    sync_standby_holding: Gauge,
    sync_standby_lag: Gauge,
    /// Why a leader is stalled on missing topics, for `/readyz`.
    waiting_for_topics: Mutex<Option<String>>,
    schema_registry_unavailable: Gauge,
    /// Why a leader is stalled on the schema registry, for `/readyz`.
    waiting_for_registry: Mutex<Option<String>>,
    state: AtomicU8,
    stopped: Gauge,
    /// Why the relay stopped, for `/readyz`.
    stop_reason: Mutex<Option<String>>,
    postgres_reachable: AtomicBool,
    kafka_reachable: AtomicBool,
}

impl Metrics {
    pub fn new(relay_name: &str) -> Arc<Metrics> {
        let registry = Registry::with_prefix_and_labels(
            "outboxd",
            [(
                std::borrow::Cow::Borrowed("relay"),
                std::borrow::Cow::Owned(relay_name.to_string()),
            )]
            .into_iter(),
        );
        let mut metrics = Metrics {
            stage_seconds: Family::new_with_constructor(stage_histogram),
            events_published: Family::default(),
            events_dead_lettered: Counter::default(),
            kafka_transactions: Family::default(),
            errors: Family::default(),
            pending_rows: Gauge::default(),
            oldest_unsent_age: Gauge::default(),
            event_latency: Histogram::new(LATENCY_BUCKETS),
            slot_retained_wal: Family::default(),
            slot_confirmed_flush: Family::default(),
            leader: Gauge::default(),
            capture_mode: Family::default(),
            rows_waiting_for_topic: Family::default(),
            sync_standbys_required: Gauge::default(),
            sync_standby_holding: Gauge::default(),
            sync_standby_lag: Gauge::default(),
            waiting_for_topics: Mutex::new(None),
            schema_registry_unavailable: Gauge::default(),
            waiting_for_registry: Mutex::new(None),
            state: AtomicU8::new(RelayState::Starting as u8),
            stopped: Gauge::default(),
            stop_reason: Mutex::new(None),
            name: relay_name.to_string(),
            postgres_reachable: AtomicBool::new(false),
            kafka_reachable: AtomicBool::new(false),
            registry,
        };
        // Counters a rule takes rate() of exist from the start at 0, so
        // the first increment is a rise, not a new series.
        for outcome in ["committed", "aborted"] {
            let _ = metrics
                .kafka_transactions
                .get_or_create(&OutcomeLabel { outcome });
        }
        for kind in ["retry", "abort_and_resend", "stop"] {
            let _ = metrics.errors.get_or_create(&KindLabel { kind });
        }
        for stage in Stage::ALL {
            let _ = metrics.stage_seconds.get_or_create(&StageLabel {
                stage: stage.name(),
            });
        }
        let registry = &mut metrics.registry;
        registry.register(
            "build",
            "The running outboxd version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "events_published",
            "Events committed to their routed topics",
            metrics.events_published.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Poison rows committed to the dead-letter topic",
            metrics.events_dead_lettered.clone(),
        );
        registry.register(
            "kafka_transactions",
            "Kafka transactions, by outcome (committed or aborted)",
            metrics.kafka_transactions.clone(),
        );
        registry.register(
            "errors",
            "Failures by what the relay did about them: retry (reconnect), abort_and_resend, stop",
            metrics.errors.clone(),
        );
        registry.register(
            "pending_rows",
            "Outbox rows not yet marked sent (sampled)",
            metrics.pending_rows.clone(),
        );
        registry.register_with_unit(
            "oldest_unsent_age",
            "Age of the oldest unsent outbox row, by created_at; 0 when none (sampled)",
            Unit::Seconds,
            metrics.oldest_unsent_age.clone(),
        );
        // Named with its unit but registered without a UNIT line: some
        // OpenMetrics parsers refuse units on histograms.
        registry.register(
            "event_latency_seconds",
            "From the row's commit (replication) or created_at (polling) to its Kafka commit",
            metrics.event_latency.clone(),
        );
        registry.register(
            "stage_seconds",
            "Time per batch in each step from the outbox to the marks: claim, catch_up_filter, \
             sync_standbys, queued, begin, produce, offsets, commit, wait_for_marks, mark",
            metrics.stage_seconds.clone(),
        );
        registry.register_with_unit(
            "replication_slot_retained_wal",
            "WAL the server keeps for the relay's slot (sampled)",
            Unit::Bytes,
            metrics.slot_retained_wal.clone(),
        );
        registry.register(
            "replication_slot_confirmed_flush_lsn",
            "The slot's confirmed_flush_lsn as a number (sampled)",
            metrics.slot_confirmed_flush.clone(),
        );
        registry.register(
            "rows_waiting_for_topic",
            "Rows held back because their topic does not exist (routing.missing_topics: wait)",
            metrics.rows_waiting_for_topic.clone(),
        );
        registry.register(
            "schema_registry_unavailable",
            "1 while a batch waits because the schema registry could not give its schemas \
             (unreachable, refusing, or without the subject); the rows are retried, not \
             dead-lettered",
            metrics.schema_registry_unavailable.clone(),
        );
        registry.register(
            "sync_standbys_required",
            "Synchronous standbys that must flush a commit before the relay publishes it \
             (capture.wait_for_sync_standbys); 0 when none are configured or the server holds \
             decoding back itself",
            metrics.sync_standbys_required.clone(),
        );
        registry.register(
            "sync_standby_holding",
            "1 while a batch waits for the synchronous standbys to flush its commit, else 0",
            metrics.sync_standby_holding.clone(),
        );
        registry.register_with_unit(
            "sync_standby_lag",
            "While a batch is held: WAL between its last commit and what the synchronous \
             standbys flushed; else 0",
            Unit::Bytes,
            metrics.sync_standby_lag.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the leader lock and relays, else 0",
            metrics.leader.clone(),
        );
        registry.register(
            "stopped",
            "1 once the relay stopped on an error it must not continue past (the reason is in \
             the log and /readyz); in a process of several outboxes the others go on",
            metrics.stopped.clone(),
        );
        registry.register(
            "capture_mode",
            "1 for the capture mode in use",
            metrics.capture_mode.clone(),
        );
        Arc::new(metrics)
    }

    /// The OpenMetrics text exposition.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The relay stopped on `reason`: shown by `/readyz` and
    /// `outboxd_stopped` until the process exits.
    pub fn set_stopped(&self, reason: &str) {
        *self.stop_reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
        self.stopped.set(1);
        self.set_state(RelayState::Stopped);
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// A Kafka transaction committed with these events.
    pub fn committed(
        &self,
        topics: &[&str],
        dead_lettered: usize,
        committed_at: &[Option<SystemTime>],
    ) {
        // One label lookup per topic, not per event: a batch spans few topics.
        let mut per_topic: Vec<(&str, u64)> = Vec::new();
        for topic in topics {
            match per_topic.iter_mut().find(|(seen, _)| seen == topic) {
                Some((_, count)) => *count += 1,
                None => per_topic.push((topic, 1)),
            }
        }
        for (topic, count) in per_topic {
            self.events_published
                .get_or_create(&TopicLabel {
                    topic: topic.to_string(),
                })
                .inc_by(count);
        }
        self.events_dead_lettered.inc_by(dead_lettered as u64);
        self.kafka_transactions
            .get_or_create(&OutcomeLabel {
                outcome: "committed",
            })
            .inc();
        let now = SystemTime::now();
        for source_time in committed_at.iter().flatten() {
            let latency = now.duration_since(*source_time).unwrap_or(Duration::ZERO);
            self.event_latency.observe(latency.as_secs_f64());
        }
    }

    /// One batch spent `took` in `stage`.
    pub fn stage(&self, stage: Stage, took: Duration) {
        self.stage_seconds
            .get_or_create(&StageLabel {
                stage: stage.name(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn aborted(&self) {
        self.kafka_transactions
            .get_or_create(&OutcomeLabel { outcome: "aborted" })
            .inc();
    }

    pub fn error(&self, kind: ErrorKind) {
        let kind = match kind {
            ErrorKind::Retry => "retry",
            ErrorKind::AbortAndResend => "abort_and_resend",
            ErrorKind::Stop => "stop",
        };
        self.errors.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn set_state(&self, state: RelayState) {
        self.state.store(state as u8, Ordering::SeqCst);
        self.leader.set(i64::from(state == RelayState::Leading));
    }

    pub fn state(&self) -> RelayState {
        RelayState::from_u8(self.state.load(Ordering::SeqCst))
    }

    pub fn set_capture_mode(&self, mode: &'static str) {
        self.capture_mode.clear();
        self.capture_mode.get_or_create(&ModeLabel { mode }).set(1);
    }

    pub fn set_lag(&self, pending_rows: i64, oldest_unsent_age_seconds: f64) {
        self.pending_rows.set(pending_rows);
        self.oldest_unsent_age.set(oldest_unsent_age_seconds);
    }

    pub fn set_slot(&self, slot: &str, retained_bytes: i64, confirmed_flush: u64) {
        let label = SlotLabel {
            slot: slot.to_string(),
        };
        self.slot_retained_wal
            .get_or_create(&label)
            .set(retained_bytes);
        self.slot_confirmed_flush
            .get_or_create(&label)
            .set(i64::try_from(confirmed_flush).unwrap_or(i64::MAX));
    }

    /// How many synchronous standbys the relay waits for (0: it does not).
    pub fn set_sync_standbys_required(&self, standbys: usize) {
        self.sync_standbys_required
            .set(i64::try_from(standbys).unwrap_or(i64::MAX));
    }

    /// A batch is held for the synchronous standbys, `lag_bytes` behind
    /// its last commit (`Some`), or nothing is held (`None`).
    pub fn set_sync_standby_hold(&self, lag_bytes: Option<u64>) {
        self.sync_standby_holding
            .set(i64::from(lag_bytes.is_some()));
        self.sync_standby_lag
            .set(lag_bytes.map_or(0, |lag| i64::try_from(lag).unwrap_or(i64::MAX)));
    }

    pub fn set_reachable(&self, postgres: bool, kafka: bool) {
        self.postgres_reachable.store(postgres, Ordering::SeqCst);
        self.kafka_reachable.store(kafka, Ordering::SeqCst);
    }

    /// Rows held back per missing topic; empty when nothing waits.
    pub fn set_waiting_for_topics(&self, waiting: &[(String, usize)]) {
        self.rows_waiting_for_topic.clear();
        for (topic, rows) in waiting {
            self.rows_waiting_for_topic
                .get_or_create(&TopicLabel {
                    topic: topic.clone(),
                })
                .set(*rows as i64);
        }
        let reason = (!waiting.is_empty()).then(|| {
            let topics: Vec<String> = waiting
                .iter()
                .map(|(topic, rows)| format!("{topic} ({rows} rows)"))
                .collect();
            format!(
                "leading, but stalled: rows wait for topics that do not exist: {}; create them, \
                 or set routing.missing_topics",
                topics.join(", ")
            )
        });
        *self
            .waiting_for_topics
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// While a batch waits for the schema registry: why; `None` once it
    /// has its schemas.
    pub fn set_registry_unavailable(&self, error: Option<&str>) {
        self.schema_registry_unavailable
            .set(i64::from(error.is_some()));
        *self
            .waiting_for_registry
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = error
            .map(|error| format!("leading, but stalled: rows wait for their schemas: {error}"));
    }

    /// Ready: leading and not stalled on a missing topic or the schema
    /// registry, or a standby whose
    /// last probe reached Postgres and Kafka, so it can take over.
    pub fn ready(&self) -> Result<(), String> {
        match self.state() {
            RelayState::Leading => {
                let topics = self
                    .waiting_for_topics
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let registry = self
                    .waiting_for_registry
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                match topics.or(registry) {
                    Some(reason) => Err(reason),
                    None => Ok(()),
                }
            }
            RelayState::Standby => {
                if !self.postgres_reachable.load(Ordering::SeqCst) {
                    Err("standby, but Postgres was not reachable at the last probe".into())
                } else if !self.kafka_reachable.load(Ordering::SeqCst) {
                    Err("standby, but Kafka was not reachable at the last probe".into())
                } else {
                    Ok(())
                }
            }
            RelayState::Stopped => Err(format!(
                "stopped on an error: {}",
                self.stop_reason
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_deref()
                    .unwrap_or("see the log")
            )),
            other => Err(format!("relay is {}", other.name())),
        }
    }
}

/// Several relays' metrics as one OpenMetrics exposition: each family's
/// `HELP`/`TYPE`/`UNIT` once, then every relay's series of it (told apart
/// by their `relay` label), and one `# EOF`. Concatenating the relays'
/// texts would repeat families, which Prometheus refuses.
pub fn encode_all(relays: &[Arc<Metrics>]) -> String {
    if let [only] = relays {
        return only.encode();
    }
    let texts: Vec<String> = relays.iter().map(|m| m.encode()).collect();
    merge_expositions(&texts)
}

fn merge_expositions(texts: &[String]) -> String {
    struct Family<'a> {
        name: &'a str,
        /// The text whose header lines this family prints (the first with it).
        described_by: usize,
        headers: Vec<&'a str>,
        samples: Vec<&'a str>,
    }
    let mut families: Vec<Family> = Vec::new();
    for (text_index, text) in texts.iter().enumerate() {
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if line == "# EOF" {
                break;
            }
            let header = ["# HELP ", "# TYPE ", "# UNIT "]
                .iter()
                .find_map(|tag| line.strip_prefix(tag));
            if let Some(rest) = header {
                let name = rest.split(' ').next().unwrap_or(rest);
                let index = match families.iter().position(|f| f.name == name) {
                    Some(index) => index,
                    None => {
                        families.push(Family {
                            name,
                            described_by: text_index,
                            headers: Vec::new(),
                            samples: Vec::new(),
                        });
                        families.len() - 1
                    }
                };
                if families[index].described_by == text_index {
                    families[index].headers.push(line);
                }
                current = Some(index);
            } else if let Some(index) = current {
                families[index].samples.push(line);
            }
        }
    }
    let mut merged = String::new();
    for family in &families {
        for line in family.headers.iter().chain(&family.samples) {
            merged.push_str(line);
            merged.push('\n');
        }
    }
    merged.push_str("# EOF\n");
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new("orders");
        metrics.committed(
            &["outbox.Order", "outbox.Order"],
            1,
            &[Some(SystemTime::now())],
        );
        metrics.aborted();
        metrics.error(ErrorKind::Retry);
        metrics.set_state(RelayState::Leading);
        metrics.set_capture_mode("replication");
        metrics.set_lag(3, 1.5);
        metrics.set_slot("outboxd_orders", 4096, 0x1_0000_0000);
        metrics.set_sync_standbys_required(1);
        metrics.set_sync_standby_hold(Some(512));
        let text = metrics.encode();
        for line in [
            "outboxd_build_info{relay=\"orders\",version=\"",
            "outboxd_events_published_total{relay=\"orders\",topic=\"outbox.Order\"} 2",
            "outboxd_events_dead_lettered_total{relay=\"orders\"} 1",
            "outboxd_kafka_transactions_total{relay=\"orders\",outcome=\"committed\"} 1",
            "outboxd_kafka_transactions_total{relay=\"orders\",outcome=\"aborted\"} 1",
            "outboxd_errors_total{relay=\"orders\",kind=\"retry\"} 1",
            "outboxd_pending_rows{relay=\"orders\"} 3",
            "outboxd_oldest_unsent_age_seconds{relay=\"orders\"} 1.5",
            "outboxd_event_latency_seconds_count{relay=\"orders\"} 1",
            "outboxd_replication_slot_retained_wal_bytes{relay=\"orders\",slot=\"outboxd_orders\"} 4096",
            "outboxd_replication_slot_confirmed_flush_lsn{relay=\"orders\",slot=\"outboxd_orders\"} 4294967296",
            "outboxd_leader{relay=\"orders\"} 1",
            "outboxd_sync_standbys_required{relay=\"orders\"} 1",
            "outboxd_sync_standby_holding{relay=\"orders\"} 1",
            "outboxd_sync_standby_lag_bytes{relay=\"orders\"} 512",
            "outboxd_capture_mode{relay=\"orders\",mode=\"replication\"} 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_standby_is_ready_only_when_it_could_take_over() {
        let metrics = Metrics::new("orders");
        assert!(metrics.ready().is_err(), "starting is not ready");
        metrics.set_state(RelayState::Standby);
        assert!(metrics.ready().unwrap_err().contains("Postgres"));
        metrics.set_reachable(true, false);
        assert!(metrics.ready().unwrap_err().contains("Kafka"));
        metrics.set_reachable(true, true);
        assert!(metrics.ready().is_ok());
        metrics.set_state(RelayState::Retrying);
        assert!(metrics.ready().unwrap_err().contains("retrying"));
        metrics.set_state(RelayState::Leading);
        assert!(metrics.ready().is_ok());
    }

    #[test]
    fn a_leader_stalled_on_a_missing_topic_is_not_ready_and_says_which() {
        let metrics = Metrics::new("orders");
        metrics.set_state(RelayState::Leading);
        metrics.set_waiting_for_topics(&[("outbox.Order".into(), 12)]);
        let reason = metrics.ready().unwrap_err();
        assert!(reason.contains("outbox.Order (12 rows)"), "{reason}");
        assert!(metrics.encode().contains(
            "outboxd_rows_waiting_for_topic{relay=\"orders\",topic=\"outbox.Order\"} 12"
        ));
        metrics.set_waiting_for_topics(&[]);
        assert!(metrics.ready().is_ok());
        assert!(!metrics.encode().contains("outbox.Order"));
    }

    #[test]
    fn several_relays_share_one_exposition_with_each_family_once() {
        let orders = Metrics::new("orders");
        let billing = Metrics::new("billing");
        orders.committed(&["orders.Order"], 0, &[]);
        billing.committed(&["billing.Invoice", "billing.Invoice"], 0, &[]);
        billing.set_stopped("a poison row and on_poison: halt");
        let text = encode_all(&[orders, billing]);
        for family in [
            "outboxd_events_published",
            "outboxd_leader",
            "outboxd_stopped",
        ] {
            let types = text
                .lines()
                .filter(|l| l.starts_with(&format!("# TYPE {family} ")))
                .count();
            assert_eq!(types, 1, "{family} described {types} times in:\n{text}");
        }
        for line in [
            "outboxd_events_published_total{relay=\"orders\",topic=\"orders.Order\"} 1",
            "outboxd_events_published_total{relay=\"billing\",topic=\"billing.Invoice\"} 2",
            "outboxd_stopped{relay=\"orders\"} 0",
            "outboxd_stopped{relay=\"billing\"} 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        // Every sample sits under its own family's TYPE line.
        let published_type = text.find("# TYPE outboxd_events_published ").unwrap();
        let billing_sample = text
            .find("relay=\"billing\",topic=\"billing.Invoice\"")
            .unwrap();
        let next_type = text[published_type + 1..].find("# TYPE ").unwrap() + published_type + 1;
        assert!(
            published_type < billing_sample && billing_sample < next_type,
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
