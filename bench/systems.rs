//! The systems under test, each started cold on a database of its own:
//! outboxd in either capture mode (and replicating without marks),
//! outboxd relaying WAL messages
//! (`capture.source: messages`), and Debezium Server with the Outbox Event
//! Router (the relay a user would pick instead).
//!
//! Invariant: every system reads the same outbox table contract (or, for
//! messages, the same fields through `outboxd_emit`) and writes
//! the same records (key = aggregate id, value = the payload, `id` header)
//! to the same topic, `<prefix>.Order`, pre-created with the same
//! partitions; so one checker judges them all and the figures compare.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::PgPool;

use crate::process::Running;
use crate::support::checker::{self, Report};
use crate::support::kafka::{read_all, read_topic};
use crate::support::workload::Written;
use crate::support::{Mode, TestEnv};

/// Partitions of the routed topic, for every system.
pub const PARTITIONS: i32 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    OutboxdReplication,
    OutboxdPolling,
    /// The WAL-message outbox: events written with `outboxd_emit`.
    OutboxdMessages,
    /// Replication writing nothing back per row (`after_publish: none`).
    OutboxdUnmarked,
    Debezium,
}

impl System {
    pub fn label(self) -> &'static str {
        match self {
            System::OutboxdReplication => "outboxd (replication)",
            System::OutboxdPolling => "outboxd (polling)",
            System::OutboxdMessages => "outboxd (messages)",
            System::OutboxdUnmarked => "outboxd (replication, no marks)",
            System::Debezium => "Debezium Server",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            System::OutboxdReplication => "outboxd-replication",
            System::OutboxdPolling => "outboxd-polling",
            System::OutboxdMessages => "outboxd-messages",
            System::OutboxdUnmarked => "outboxd-unmarked",
            System::Debezium => "debezium",
        }
    }

    fn mode(self) -> Mode {
        match self {
            System::OutboxdPolling => Mode::Polling,
            _ => Mode::Replication,
        }
    }

    /// Events are WAL messages, not rows.
    pub fn is_messages(self) -> bool {
        self == System::OutboxdMessages
    }
}

/// One run's world: database, topics, and the system's config.
pub struct BenchEnv {
    pub env: TestEnv,
    pub system: System,
    http_port: u16,
    /// Reads the routed topic's watermarks (Debezium's progress).
    watermarks: BaseConsumer,
    /// Extra YAML lines of outboxd's config under `postgres:` and `relay:`.
    postgres_lines: String,
    relay_lines: String,
}

impl BenchEnv {
    pub async fn new(name: &str, system: System) -> BenchEnv {
        BenchEnv::sharing(name, system, None).await
    }

    /// Like `new`, but with outboxd's checkpoints in `checkpoint_topic`,
    /// shared with other relays, when given (else a topic of its own).
    pub async fn sharing(name: &str, system: System, checkpoint_topic: Option<&str>) -> BenchEnv {
        BenchEnv::build(name, system, checkpoint_topic, "", "").await
    }

    /// Like `new`, with extra YAML lines in outboxd's config under
    /// `postgres:` (such as the partitioning section, which the table is
    /// then migrated with) and under `relay:` (such as `  retention: 1m\n`).
    pub async fn configured(
        name: &str,
        system: System,
        postgres_lines: &str,
        relay_lines: &str,
    ) -> BenchEnv {
        BenchEnv::build(name, system, None, postgres_lines, relay_lines).await
    }

    async fn build(
        name: &str,
        system: System,
        checkpoint_topic: Option<&str>,
        postgres_lines: &str,
        relay_lines: &str,
    ) -> BenchEnv {
        let name = format!("bench-{name}");
        let mut env = if postgres_lines.is_empty() {
            TestEnv::new(&name, system.mode()).await
        } else {
            // The one constructor that migrates with lines under `postgres:`.
            TestEnv::new_partitioned(&name, system.mode(), postgres_lines).await
        };
        match checkpoint_topic {
            Some(topic) => env = env.with_checkpoint_topic(topic),
            // As the relay would create it, except that the cleaner keeps
            // every record for a day: the checker reads the checkpoints'
            // whole history, and a large drain's checkpoints (12 bytes of
            // row digest per row) outgrow a segment, whose older records
            // compaction then removed before the check.
            None if system != System::Debezium => {
                crate::support::faults::create_checkpoint_topic_keeping_history(&env, 1).await
            }
            None => {}
        }
        if system.is_messages() {
            // The function, the publication and the slot, before anything
            // is emitted.
            env.use_messages().await;
        }
        let http_port = free_port();
        let watermarks: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &env.kafka)
            .set("group.id", "bench-watermarks")
            .create()
            .expect("watermark consumer");
        let bench = BenchEnv {
            env,
            system,
            http_port,
            watermarks,
            postgres_lines: postgres_lines.to_string(),
            relay_lines: relay_lines.to_string(),
        };
        bench.write_outboxd_config();
        create_topic(&bench.env.kafka, &bench.routed_topic()).await;
        bench
    }

    pub fn pool(&self) -> &PgPool {
        &self.env.pool
    }

    pub fn routed_topic(&self) -> String {
        format!("{}.Order", self.env.topic_prefix())
    }

    /// The config a user would write: everything not named is a default
    /// (batch size, linger, transaction timeout).
    fn write_outboxd_config(&self) {
        let (messages_postgres, messages_capture) = if self.system.is_messages() {
            (
                "  publication: outboxd_messages\n",
                "  source: messages\n  message_prefix: outboxd\n",
            )
        } else {
            ("", "")
        };
        let unmarked = if self.system == System::OutboxdUnmarked {
            "  after_publish: none\n"
        } else {
            ""
        };
        let yaml = format!(
            "relay:\n  name: {name}\n{unmarked}{relay_lines}\
             postgres:\n  url: {url}\n{postgres_lines}{messages_postgres}\
             kafka:\n  bootstrap_servers: {kafka}\n  checkpoint_topic: {checkpoints}\n\
             capture:\n  mode: {mode}\n{messages_capture}\
             routing:\n  topic: \"{prefix}.${{aggregatetype}}\"\n  dead_letter_topic: {prefix}.dlq\n\
             log:\n  level: info,librdkafka=warn,rdkafka=warn\n\
             http:\n  listen: 127.0.0.1:{port}\n",
            name = self.env.relay_name(),
            url = self.env.database_url,
            kafka = self.env.kafka,
            checkpoints = self.env.checkpoint_topic(),
            prefix = self.env.topic_prefix(),
            mode = self.system.mode().config_value(),
            port = self.http_port,
            relay_lines = self.relay_lines,
            postgres_lines = self.postgres_lines,
        );
        std::fs::write(&self.env.config_path, yaml).expect("write bench config");
    }

    /// Starts the system cold.
    pub fn start(&self, phase: &str) -> Running {
        let log = log_dir().join(format!("{}-{phase}.log", self.env.id));
        match self.system {
            System::Debezium => {
                let mut command = Command::new("bash");
                command.arg(debezium_script("run.sh"));
                for (key, value) in self.debezium_env() {
                    command.env(key, value);
                }
                Running::spawn("Debezium Server", command, &log)
            }
            _ => {
                let mut command = Command::new(env!("CARGO_BIN_EXE_outboxd"));
                command.args(["run", "--config"]).arg(&self.env.config_path);
                Running::spawn("outboxd", command, &log)
            }
        }
    }

    /// Starts a second outboxd of the same relay (a standby): the same
    /// config but a port of its own for HTTP, which it does not share.
    pub fn start_another(&self, phase: &str) -> Running {
        let yaml = std::fs::read_to_string(&self.env.config_path).expect("read bench config");
        let own_port = format!("127.0.0.1:{}", self.http_port);
        assert!(yaml.contains(&own_port), "the config names the HTTP port");
        let config = log_dir().join(format!("{}-another.yaml", self.env.id));
        std::fs::write(&config, yaml.replace(&own_port, "127.0.0.1:0")).expect("write config");
        let log = log_dir().join(format!("{}-{phase}.log", self.env.id));
        let mut command = Command::new(env!("CARGO_BIN_EXE_outboxd"));
        command.args(["run", "--config"]).arg(&config);
        Running::spawn("outboxd", command, &log)
    }

    /// Starts the system once, waits until it streams from its (new)
    /// slot, has it publish one warm-up event through the stream, then
    /// stops it. A backlog written after this is in the slot, and outboxd's
    /// checkpoint holds a stream position, so a cold start drains the
    /// backlog by streaming, as it would after any restart.
    pub async fn prime(&self) -> Written {
        let mut running = self.start("prime");
        match self.system {
            System::Debezium => self.wait_streaming_log(&mut running).await,
            _ => self.env.wait_streaming(Duration::from_secs(180)).await,
        }
        let warmup = self.write_warmup().await;
        self.wait_published(&mut running, 1, Duration::from_secs(180))
            .await;
        running.stop(Duration::from_secs(60));
        warmup
    }

    /// One event to publish before a backlog (`backlog::write_warmup`), as
    /// a row or, for messages, emitted.
    pub async fn write_warmup(&self) -> Written {
        if self.system.is_messages() {
            crate::backlog::emit_warmup(self.pool()).await
        } else {
            crate::backlog::write_warmup(self.pool()).await
        }
    }

    /// Waits until Debezium logs that it streams from its slot.
    pub async fn wait_streaming_log(&self, running: &mut Running) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !running.log_contains(DEBEZIUM_STREAMING) {
            running.assert_alive();
            assert!(
                Instant::now() < deadline,
                "Debezium did not start streaming within 180 s; see {}",
                running.log.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Events the system has committed to Kafka so far: outboxd's
    /// `events_published` counter; for Debezium, which is not
    /// transactional, the records in the routed topic.
    pub async fn published(&self) -> u64 {
        match self.system {
            System::Debezium => self.records_in_routed_topic(),
            _ => scrape_published(self.http_port).await.unwrap_or(0),
        }
    }

    /// High minus low watermark, summed over the routed topic's partitions.
    fn records_in_routed_topic(&self) -> u64 {
        let topic = self.routed_topic();
        tokio::task::block_in_place(|| {
            (0..PARTITIONS)
                .map(|p| {
                    self.watermarks
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .map(|(low, high)| (high - low).max(0) as u64)
                        .unwrap_or(0)
                })
                .sum()
        })
    }

    /// Waits until `expected` events are published; returns the seconds
    /// from the system's start.
    pub async fn wait_published(
        &self,
        running: &mut Running,
        expected: u64,
        limit: Duration,
    ) -> f64 {
        let deadline = Instant::now() + limit;
        loop {
            let published = self.published().await;
            if published >= expected {
                return running.started.elapsed().as_secs_f64();
            }
            running.assert_alive();
            assert!(
                Instant::now() < deadline,
                "{} published {published} of {expected} events within {limit:?}; see {}",
                self.system.label(),
                running.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The invariant checker's verdict on this run: outboxd's books
    /// (marks, checkpoints) too, Debezium's events only (it keeps none).
    pub async fn check(&self, written: &Written) -> Report {
        match self.system {
            System::Debezium => checker::check_events_only(&self.env, written).await,
            // The bench emits without the `emitted` table: the writers'
            // own account is the committed events.
            System::OutboxdMessages => {
                let rows: Vec<checker::Row> = written
                    .committed_ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| checker::Row::kept(i as i64, id.clone(), true))
                    .collect();
                checker::check_messages_of(&self.env, &rows, written).await
            }
            // Nothing is marked; every row must be in Kafka all the same.
            System::OutboxdUnmarked => checker::check_unmarked(&self.env, written, &[], &[]).await,
            _ => checker::check(&self.env, written).await,
        }
    }

    /// The checker's verdict when housekeeping deleted rows during the run:
    /// the table's rows plus those of `every_row` (seq, id) it no longer
    /// holds. Those count as marked sent, since housekeeping removes only
    /// sent rows; Kafka and the checkpoints are checked against all of
    /// them in full, so a row removed before it was published shows as lost.
    pub async fn check_with_removed_rows(
        &self,
        written: &Written,
        every_row: &[(i64, String)],
    ) -> Report {
        let mut rows: Vec<checker::Row> = self
            .env
            .rows()
            .await
            .into_iter()
            .map(|(seq, id, sent)| checker::Row::kept(seq, id, sent))
            .collect();
        let left: HashSet<i64> = rows.iter().map(|row| row.seq).collect();
        rows.extend(
            every_row
                .iter()
                .filter(|(seq, _)| !left.contains(seq))
                .map(|(seq, id)| checker::Row::kept(*seq, id.clone(), true)),
        );
        let routed: Vec<_> = read_all(&self.env.kafka, &self.env.topic_prefix())
            .await
            .into_iter()
            .filter(|record| record.topic != self.env.dead_letter_topic())
            .collect();
        let dead_lettered = read_topic(&self.env.kafka, &self.env.dead_letter_topic()).await;
        let checkpoints = checker::table_checkpoints(&self.env).await;
        checker::compare(
            &rows,
            &routed,
            &dead_lettered,
            checker::Books::Outboxd {
                checkpoints: &checkpoints,
            },
            written,
        )
    }

    fn debezium_env(&self) -> Vec<(&'static str, String)> {
        let url: url::Url = self.env.database_url.parse().expect("database url");
        let work = log_dir().join(format!("debezium-{}", self.env.id));
        std::fs::create_dir_all(&work).expect("Debezium work dir");
        vec![
            ("DBZ_WORK_DIR", work.display().to_string()),
            ("PG_HOST", url.host_str().unwrap_or("127.0.0.1").to_string()),
            ("PG_PORT", url.port().unwrap_or(5432).to_string()),
            ("PG_USER", url.username().to_string()),
            ("PG_PASSWORD", url.password().unwrap_or("").to_string()),
            (
                "PG_DATABASE",
                url.path().trim_start_matches('/').to_string(),
            ),
            ("OUTBOX_TABLE", "public.outbox".to_string()),
            ("DBZ_SLOT", self.env.slot_name()),
            ("DBZ_PUBLICATION", "outbox_publication".to_string()),
            ("KAFKA_BOOTSTRAP", self.env.kafka.clone()),
            ("TOPIC_PREFIX", self.env.topic_prefix()),
            ("DBZ_SNAPSHOT_MODE", "no_data".to_string()),
            // The payload column's text as is, the bytes outboxd sends
            // (`expand` re-encodes the JSON and drops or breaks some values).
            ("DBZ_PAYLOAD", "string".to_string()),
        ]
    }
}

/// What Debezium logs once it streams from its slot.
const DEBEZIUM_STREAMING: &str = "Processing messages";

pub fn debezium_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("bench/debezium")
        .join(name)
}

pub fn log_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-logs");
    std::fs::create_dir_all(&dir).expect("create target/bench-logs");
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn create_topic(bootstrap: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let new_topic = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&new_topic], &AdminOptions::new())
        .await
        .expect("create topic");
    for result in results {
        result.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// The sum of outboxd's `outboxd_events_published_total` series.
/// One step of outboxd's Kafka transactions, from `outboxd_stage_seconds`:
/// how many batches passed it and the seconds they spent in it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StageTime {
    pub stage: String,
    pub batches: f64,
    pub seconds: f64,
}

impl StageTime {
    /// Mean milliseconds per batch.
    pub fn mean_ms(&self) -> f64 {
        if self.batches > 0.0 {
            self.seconds / self.batches * 1000.0
        } else {
            0.0
        }
    }
}

impl BenchEnv {
    /// outboxd's stage timings so far (empty for Debezium, or when the
    /// relay does not answer).
    pub async fn stages(&self) -> Vec<StageTime> {
        if self.system == System::Debezium {
            return Vec::new();
        }
        scrape_stages(self.http_port).await.unwrap_or_default()
    }
}

/// `after` minus `before`, stage by stage: what one phase of a run spent.
pub fn stages_between(before: &[StageTime], after: &[StageTime]) -> Vec<StageTime> {
    after
        .iter()
        .map(|stage| {
            let earlier = before.iter().find(|b| b.stage == stage.stage);
            StageTime {
                stage: stage.stage.clone(),
                batches: stage.batches - earlier.map_or(0.0, |b| b.batches),
                seconds: stage.seconds - earlier.map_or(0.0, |b| b.seconds),
            }
        })
        .collect()
}

/// outboxd's `/metrics` text, if it answers within 5 s.
async fn scrape_metrics(port: u16) -> Option<String> {
    let base = format!("http://127.0.0.1:{port}");
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(5),
        crate::support::http::try_get(&base, "/metrics"),
    )
    .await
    .ok()??;
    if status != 200 {
        return None;
    }
    Some(body)
}

async fn scrape_stages(port: u16) -> Option<Vec<StageTime>> {
    let body = scrape_metrics(port).await?;
    let mut stages: Vec<StageTime> = Vec::new();
    for line in body.lines() {
        let (field, rest) = if let Some(rest) = line.strip_prefix("outboxd_stage_seconds_count{") {
            ("count", rest)
        } else if let Some(rest) = line.strip_prefix("outboxd_stage_seconds_sum{") {
            ("sum", rest)
        } else {
            continue;
        };
        let Some(stage) = rest
            .split("stage=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
        else {
            continue;
        };
        let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let index = match stages.iter().position(|s| s.stage == stage) {
            Some(index) => index,
            None => {
                stages.push(StageTime {
                    stage: stage.to_string(),
                    ..StageTime::default()
                });
                stages.len() - 1
            }
        };
        match field {
            "count" => stages[index].batches = value,
            _ => stages[index].seconds = value,
        }
    }
    Some(stages)
}

async fn scrape_published(port: u16) -> Option<u64> {
    let body = scrape_metrics(port).await?;
    let total = body
        .lines()
        .filter(|line| line.starts_with("outboxd_events_published_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    Some(total as u64)
}

/// A `read_committed` consumer of every partition of `topic` from the
/// beginning that answers as soon as anything is readable (the fetch wait
/// only bounds an idle fetch): what the bench's visibility watchers read with.
pub fn visibility_consumer(bootstrap: &str, topic: &str, group: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("visibility consumer");
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        partitions
            .add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&partitions).expect("assign");
    consumer
}
