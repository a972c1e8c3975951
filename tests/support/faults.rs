//! The fault-injection harness: the real relay binary as a child process
//! (optionally armed with a kill point), the shared servers' crash and
//! restart commands, campaign sizes and the campaign report.
//!
//! Invariant: fault tests run one at a time (`exclusive`), because a broker
//! or Postgres restart hits every client of the shared stack; and a relay
//! process started here is always killed when its handle is dropped, so a
//! failed test leaves no relay behind.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

use super::checker::{self, Report};
use super::workload::{writer_pool, LiveWriter, Workload, Written};
use super::{Mode, TestEnv};

/// What a campaign's relay relays: the outbox table in a capture mode, or
/// WAL messages (`capture.source: messages`, replication only). The
/// campaign report names it as the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Table(Mode),
    Messages,
    /// A table relayed with `relay.after_publish: none`.
    Unmarked,
}

impl Source {
    /// The capture mode the relay runs in.
    pub fn mode(self) -> Mode {
        match self {
            Source::Table(mode) => mode,
            Source::Messages | Source::Unmarked => Mode::Replication,
        }
    }

    /// The campaign report's `mode`.
    pub fn label(self) -> &'static str {
        match self {
            Source::Table(mode) => mode.config_value(),
            Source::Messages => "messages",
            Source::Unmarked => "unmarked",
        }
    }
}

impl From<Mode> for Source {
    fn from(mode: Mode) -> Source {
        Source::Table(mode)
    }
}

/// Holds the shared servers for one fault test at a time.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static SERVERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERVERS.lock().await
}

/// How big a campaign is: short in `make test`, long in `make chaos`
/// (`OUTBOXD_CHAOS=long`).
pub fn size(short: usize, long: usize) -> usize {
    match std::env::var("OUTBOXD_CHAOS").as_deref() {
        Ok("long") => long,
        _ => short,
    }
}

/// A random pause in `range`.
pub fn random_between(range: std::ops::RangeInclusive<Duration>) -> Duration {
    rand::rng().random_range(range)
}

/// Appends one line to the campaign report (`OUTBOXD_CHAOS_REPORT`, JSON
/// lines) when set; `make chaos` turns the lines into its table.
pub fn record(fault: &str, source: Source, runs: usize, report: &Report) {
    let Ok(path) = std::env::var("OUTBOXD_CHAOS_REPORT") else {
        return;
    };
    let line = serde_json::json!({
        "fault": fault,
        "mode": source.label(),
        "runs": runs,
        "events": report.events,
        "lost": report.lost.len(),
        "duplicated": report.duplicated.len(),
        "out_of_order": report.out_of_order.len(),
        "other": report.other.len(),
    });
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open chaos report {path}: {e}"));
    writeln!(file, "{line}").expect("write chaos report");
}

fn stack_dir() -> String {
    std::env::var("OUTBOXD_STACK_DIR").expect(
        "OUTBOXD_STACK_DIR is not set: fault tests restart the stack's servers. Run `make test`",
    )
}

/// Runs `deploy/local/stack.sh COMMAND STACK_DIR` and fails the test if it fails.
async fn stack(command: &'static str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/stack.sh");
    let dir = stack_dir();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(script)
            .arg(command)
            .arg(dir)
            .output()
            .expect("run stack.sh")
    })
    .await
    .expect("stack.sh task");
    assert!(
        output.status.success(),
        "stack.sh {command} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// SIGKILLs the broker and starts it again on the same ports and data.
pub async fn restart_kafka_after_kill() {
    stack("kafka-kill").await;
    stack("kafka-restart").await;
}

/// Stops Postgres with `-m immediate` (a crash) and starts it again.
pub async fn restart_postgres_after_crash() {
    stack("pg-restart").await;
}

/// Environment variables naming the proxied Kafka path (see stack.sh).
pub fn kafka_proxy_addresses() -> (String, String) {
    let read = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    (
        read("OUTBOXD_TEST_KAFKA_PROXY"),
        read("OUTBOXD_TEST_KAFKA_PROXIED"),
    )
}

/// The real `outboxd run` as a child process, its logs appended to a file.
pub struct RelayProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl RelayProcess {
    /// Starts `outboxd run --config CONFIG`; with `kill_at` (`POINT` or
    /// `POINT:N`) it kills itself there.
    pub fn spawn(config: &Path, log: &Path, kill_at: Option<&str>) -> RelayProcess {
        RelayProcess::spawn_with(config, log, kill_at, &[])
    }

    /// Like `spawn`, running `binary` instead of this build's `outboxd`:
    /// another release (`tests/faults/versions.rs`), which must take the
    /// same `run --config` command line and `OUTBOXD_KILL_AT`.
    pub fn spawn_binary(
        binary: &Path,
        config: &Path,
        log: &Path,
        kill_at: Option<&str>,
    ) -> RelayProcess {
        RelayProcess::spawn_command(binary, config, log, kill_at, &[])
    }

    /// Like `start`, with extra environment variables for the relay.
    pub fn start_with(
        env: &TestEnv,
        kill_at: Option<&str>,
        environment: &[(&str, &str)],
    ) -> RelayProcess {
        RelayProcess::spawn_with(&env.config_path, &log_path(env), kill_at, environment)
    }

    fn spawn_with(
        config: &Path,
        log: &Path,
        kill_at: Option<&str>,
        environment: &[(&str, &str)],
    ) -> RelayProcess {
        let binary = Path::new(env!("CARGO_BIN_EXE_outboxd"));
        RelayProcess::spawn_command(binary, config, log, kill_at, environment)
    }

    fn spawn_command(
        binary: &Path,
        config: &Path,
        log: &Path,
        kill_at: Option<&str>,
        environment: &[(&str, &str)],
    ) -> RelayProcess {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open relay log");
        let mut command = Command::new(binary);
        command
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log_file);
        if let Some(point) = kill_at {
            command.env(outboxd::failpoint::ENV, point);
        }
        command.envs(environment.iter().copied());
        RelayProcess {
            child: Some(
                command
                    .spawn()
                    .unwrap_or_else(|e| panic!("start {}: {e}", binary.display())),
            ),
            log: log.to_path_buf(),
        }
    }

    /// Starts `outboxd run --config CONFIG` armed to *freeze* (SIGSTOP
    /// itself) at `point` (`POINT` or `POINT:N`), as a stalled process that
    /// later wakes up (`resume`).
    pub fn spawn_freezing_at(config: &Path, log: &Path, point: &str) -> RelayProcess {
        RelayProcess::spawn_with(
            config,
            log,
            Some(point),
            &[(outboxd::failpoint::SIGNAL_ENV, "STOP")],
        )
    }

    /// Waits until the process is stopped by a signal (state `T` in /proc).
    pub async fn frozen(&mut self, limit: Duration) {
        let pid = self.child.as_ref().expect("relay was started").id();
        let deadline = Instant::now() + limit;
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(") ")
                .next()
                .and_then(|rest| rest.chars().next());
            if state == Some('T') {
                return;
            }
            assert!(
                self.is_running(),
                "the relay exited instead of freezing; log: {}",
                self.log.display()
            );
            assert!(
                Instant::now() < deadline,
                "the relay did not freeze within {limit:?}; log: {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the relay's log holds `needle`.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{needle}` did not appear in {} within {limit:?}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGSTOP now, without waiting for a kill point: the relay freezes
    /// wherever it is (for binaries without `OUTBOXD_KILL_SIGNAL`).
    pub fn freeze_now(&self) {
        let pid = self.child.as_ref().expect("relay was started").id();
        // SAFETY: a plain kill(2) of our own child.
        let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
        assert_eq!(sent, 0, "SIGSTOP {pid}");
    }

    /// SIGCONT: a frozen relay goes on where it stopped.
    pub fn resume(&self) {
        super::signal(self.child.as_ref().expect("relay was started"), "CONT");
    }

    /// The env's relay, logging to the env's fault log.
    pub fn start(env: &TestEnv, kill_at: Option<&str>) -> RelayProcess {
        RelayProcess::spawn(&env.config_path, &log_path(env), kill_at)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Fails the test, pointing at the log, if the relay has exited;
    /// `expected` says what it should have ridden out.
    pub fn assert_running(&mut self, expected: &str) {
        assert!(
            self.is_running(),
            "{expected}, but the relay exited; log: {}",
            self.log.display()
        );
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to end by itself.
    pub async fn exited(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().expect("relay was started");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the relay did not exit within {limit:?}; its log: {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the armed kill point to fire: the relay must die of SIGKILL.
    pub async fn killed_at_point(&mut self, point: &str, limit: Duration) {
        let status = self.exited(limit).await;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the relay armed to die at {point} ended with {status} instead; log: {}",
            self.log.display()
        );
    }

    /// SIGTERM, and the relay must exit 0 within the grace period.
    pub async fn stop(&mut self) {
        super::signal(self.child.as_ref().expect("relay was started"), "TERM");
        let status = self.exited(Duration::from_secs(60)).await;
        assert!(
            status.success(),
            "the relay exited with {status} after SIGTERM; log: {}",
            self.log.display()
        );
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the env's relays log during fault tests.
pub fn log_path(env: &TestEnv) -> PathBuf {
    std::env::temp_dir().join(format!("outboxd-fault-{}.log", env.id))
}

/// A copy of the env's config under another relay name (and so another
/// slot, transactional id and checkpoint key), for a second relay on the
/// same table.
pub fn config_with_relay_name(env: &TestEnv, name: &str) -> PathBuf {
    let yaml = std::fs::read_to_string(&env.config_path).expect("read config");
    let renamed = yaml.replace(
        &format!("name: {}\n", env.relay_name()),
        &format!("name: {name}\n"),
    );
    assert_ne!(yaml, renamed, "the relay name is in the config");
    let path = env.config_path.with_extension(format!("{name}.yaml"));
    std::fs::write(&path, renamed).expect("write second config");
    path
}

/// One fault campaign: a fresh env, writers committing the realistic
/// workload throughout, and at the end a clean relay that drains
/// everything, then the checker over the whole run.
pub struct Campaign {
    pub env: TestEnv,
    pub fault: &'static str,
    pub source: Source,
    /// Faults injected so far.
    pub runs: usize,
    writers: LiveWriter,
    /// Written outside the live writers (a backlog).
    extra: Vec<Written>,
    /// A cluster the campaign's relay uses instead of the stack's broker.
    /// Declared before `_servers`: it stops before the next fault test
    /// may start one in the same folder.
    pub cluster: Option<super::cluster::KafkaCluster>,
    /// Keys under which releases from before table-keyed checkpoints wrote
    /// this table's checkpoints (their `relay.name`s), which the checker
    /// counts too.
    pub legacy_checkpoint_keys: Vec<String>,
    /// Checkpoint records read before the test had the topic compacted,
    /// which the checker counts too.
    pub earlier_checkpoint_records: Vec<super::kafka::Consumed>,
    /// Checkpoint topics the relay was moved away from
    /// (`kafka.previous_checkpoint_topic`): the checker reads them too.
    pub earlier_checkpoint_topics: Vec<String>,
    /// Rows an operator's TRUNCATE removed, as they were just before it.
    pub truncated: Vec<checker::Row>,
    _servers: tokio::sync::MutexGuard<'static, ()>,
}

impl Campaign {
    /// Takes the servers for this test, makes its env (with
    /// `kafka.max_message_bytes: 100000`, so the workload's oversized poison
    /// rows are too large) and starts three writers of `workload`.
    /// With `Source::Messages` the env is a message outbox and the
    /// writers emit `workload` as messages.
    pub async fn start(
        fault: &'static str,
        source: impl Into<Source>,
        workload: &Workload,
    ) -> Campaign {
        Campaign::start_on(exclusive().await, fault, source, workload, 3, None).await
    }

    /// Like `start`, holding the servers already (`exclusive`), with
    /// `writers` writers and the relay (and the checker) on `cluster`
    /// instead of the stack's broker; the campaign stops the cluster when
    /// it ends.
    pub async fn start_on(
        servers: tokio::sync::MutexGuard<'static, ()>,
        fault: &'static str,
        source: impl Into<Source>,
        workload: &Workload,
        writers: usize,
        cluster: Option<super::cluster::KafkaCluster>,
    ) -> Campaign {
        let server_url = super::servers().postgres_url;
        Campaign::start_on_server(
            servers,
            fault,
            source,
            workload,
            writers,
            cluster,
            &server_url,
        )
        .await
    }

    /// Like `start_on`, with the env's database (and so the writers and
    /// the relay) on the Postgres server at `server_url` instead of the
    /// stack's: a failover pair behind a proxy (`tests/faults/failover.rs`).
    pub async fn start_on_server(
        servers: tokio::sync::MutexGuard<'static, ()>,
        fault: &'static str,
        source: impl Into<Source>,
        workload: &Workload,
        writers: usize,
        cluster: Option<super::cluster::KafkaCluster>,
        server_url: &str,
    ) -> Campaign {
        let source = source.into();
        // The env's id names its database, topics and log.
        let name = match source {
            Source::Table(_) => fault.to_string(),
            Source::Messages => format!("{fault}-messages"),
            Source::Unmarked => format!("{fault}-unmarked"),
        };
        let mut env = TestEnv::new_on(server_url, &name, source.mode()).await;
        if let Some(cluster) = &cluster {
            env.kafka = cluster.bootstrap.clone();
        }
        let workload = match source {
            Source::Table(_) => workload.clone(),
            Source::Unmarked => {
                env.use_unmarked();
                workload.clone()
            }
            Source::Messages => {
                // Before any writer emits: a message reaches only the slots
                // that exist when it is written.
                env.use_messages().await;
                workload.clone().in_messages()
            }
        };
        env.write_config("", "  max_message_bytes: 100000\n");
        create_checkpoint_topic_keeping_history(&env, if cluster.is_some() { 3 } else { 1 }).await;
        let pool = writer_pool(&env.database_url, 4).await;
        let writers = LiveWriter::start_many(&pool, &workload, 0..writers, 10);
        Campaign {
            env,
            fault,
            source,
            runs: 0,
            writers,
            extra: Vec::new(),
            cluster,
            legacy_checkpoint_keys: Vec::new(),
            earlier_checkpoint_records: Vec::new(),
            earlier_checkpoint_topics: Vec::new(),
            truncated: Vec::new(),
            _servers: servers,
        }
    }

    /// Starts the env's relay, lets it run for a random moment in `alive`,
    /// and SIGKILLs it: one fault.
    pub async fn kill_relay_after(&mut self, alive: std::ops::RangeInclusive<Duration>) {
        let mut relay = RelayProcess::start(&self.env, None);
        tokio::time::sleep(random_between(alive)).await;
        relay.assert_running("the relay should have been running until killed");
        relay.kill();
        self.runs += 1;
    }

    /// Counts rows written outside the live writers.
    pub fn extra_written(&mut self, written: Written) {
        self.extra.push(written);
    }

    /// Stops the writers, lets the relays still running (or a new one if
    /// none is) drain every row, stops them with SIGTERM (each must exit
    /// 0), then checks everything and records the campaign.
    pub async fn finish(self, running: Vec<RelayProcess>) -> Written {
        let mut written =
            Written::combined(std::iter::once(self.writers.finish().await).chain(self.extra));
        let mut running: Vec<RelayProcess> = running
            .into_iter()
            .filter_map(|mut r| r.is_running().then_some(r))
            .collect();
        if running.is_empty() {
            running.push(RelayProcess::start(&self.env, None));
        }
        match self.source {
            Source::Messages => {
                let last = wait_messages_published(&self.env, Duration::from_secs(300)).await;
                written = Written::combined([written, last]);
            }
            Source::Unmarked => {
                let last = wait_unmarked_published(&self.env, Duration::from_secs(300)).await;
                written = Written::combined([written, last]);
            }
            Source::Table(_) => self.env.wait_all_sent(Duration::from_secs(300)).await,
        }
        for relay in &mut running {
            relay.stop().await;
        }
        let mut earlier = self.earlier_checkpoint_records;
        let mut earlier_topics = self.earlier_checkpoint_topics;
        earlier_topics.sort();
        earlier_topics.dedup();
        for topic in &earlier_topics {
            earlier.extend(super::kafka::read_topic(&self.env.kafka, topic).await);
        }
        let report = match self.source {
            Source::Table(_) => {
                checker::check_including(
                    &self.env,
                    &written,
                    &self.legacy_checkpoint_keys,
                    &earlier,
                    &self.truncated,
                )
                .await
            }
            Source::Messages => checker::check_messages(&self.env, &written).await,
            Source::Unmarked => {
                checker::check_unmarked(&self.env, &written, &earlier, &self.truncated).await
            }
        };
        record(self.fault, self.source, self.runs, &report);
        eprintln!(
            "{} ({}): {} faults, {} events, {} violations; relay log {}",
            self.fault,
            self.source.label(),
            self.runs,
            report.events,
            report.violations().len(),
            log_path(&self.env).display()
        );
        report.assert_clean();
        written
    }
}

/// Waits until a message outbox's relay has published every message
/// committed so far. Messages leave no row to be marked sent, so this
/// emits one last event (returned, to be checked like the others) and
/// waits until the slot is confirmed to where its commit record can start
/// or past it: the relay confirms a slot only to the commit of a
/// transaction whose messages a committed checkpoint names, in commit
/// order, and with the writers stopped no other transaction of messages
/// commits after that point.
pub async fn wait_messages_published(env: &TestEnv, limit: Duration) -> Written {
    let mut transaction = env.pool.begin().await.expect("begin the last event");
    let id: String = sqlx::query_scalar(
        "SELECT outboxd_emit('Order', 'last-event', 'Last', '{\"n\": 1}')::text",
    )
    .fetch_one(&mut *transaction)
    .await
    .expect("emit the last event");
    sqlx::query("INSERT INTO emitted (id) VALUES ($1)")
        .bind(&id)
        .execute(&mut *transaction)
        .await
        .expect("record the last event");
    let commit_at_least: i64 =
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint")
            .fetch_one(&mut *transaction)
            .await
            .expect("read the WAL insert position");
    transaction.commit().await.expect("commit the last event");
    let deadline = Instant::now() + limit;
    loop {
        let (confirmed, _) = env.slot_positions().await;
        if confirmed.is_some_and(|confirmed| confirmed >= commit_at_least) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot {} confirmed to {confirmed:?}, not yet past the last event's commit \
             (at or after {commit_at_least}), after {limit:?}",
            env.slot_name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Written {
        committed: 1,
        committed_ids: vec![id],
        ..Written::default()
    }
}

/// Like `wait_messages_published`, for rows relayed unmarked
/// (`relay.after_publish: none`), where no row is ever marked sent: one
/// last event, with the highest seq and committed last, is published
/// after every other row whichever way it goes (the catch-up drain claims
/// in seq order, the stream goes in commit order, and the drain ends
/// before the stream begins), so this waits until a `read_committed`
/// consumer sees it. (Not the slot: one the relay creates after the last
/// event already stands past it, with the rows still to drain.)
pub async fn wait_unmarked_published(env: &TestEnv, limit: Duration) -> Written {
    let id: String = sqlx::query_scalar(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('Order', 'last-event', 'Last', '{\"n\": 1}') RETURNING id::text",
    )
    .fetch_one(&env.pool)
    .await
    .expect("insert the last event");
    let topic = format!("{}.Order", env.topic_prefix());
    let deadline = Instant::now() + limit;
    loop {
        let records = super::kafka::read_topic(&env.kafka, &topic).await;
        if records.iter().any(|r| r.header("id") == Some(id.as_str())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the last event {id} is not in {topic} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Written {
        committed: 1,
        committed_ids: vec![id],
        ..Written::default()
    }
}

/// Creates the env's checkpoint topic before any relay does, as the relay
/// would (compacted, its segments and cleaner settings), except that the
/// cleaner keeps every record for a day. Why: the checker reads the whole
/// checkpoint history to see that the checkpoints name exactly the rows in
/// Kafka, and a campaign outliving the topic's 10-minute segments lost its
/// early checkpoints to compaction (reported as "uncovered" rows, with no
/// event lost or repeated).
pub async fn create_checkpoint_topic_keeping_history(env: &TestEnv, replication_factor: i32) {
    create_topic_keeping_history(env, &env.checkpoint_topic(), replication_factor).await
}

/// Like `create_checkpoint_topic_keeping_history`, for `topic`: one the
/// env's relay is about to be moved to.
pub async fn create_topic_keeping_history(env: &TestEnv, topic: &str, replication_factor: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::error::RDKafkaErrorCode;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &env.kafka)
        .create()
        .expect("admin client");
    let min_insync = if replication_factor >= 3 { "2" } else { "1" };
    let new_topic = NewTopic::new(topic, 1, TopicReplication::Fixed(replication_factor))
        .set("cleanup.policy", "compact")
        .set("segment.ms", "600000")
        .set("segment.bytes", "16777216")
        .set("min.cleanable.dirty.ratio", "0.1")
        .set("min.compaction.lag.ms", "86400000")
        .set("min.insync.replicas", min_insync);
    let results = admin
        .create_topics([&new_topic], &AdminOptions::new())
        .await
        .expect("create the checkpoint topic");
    match results.into_iter().next() {
        Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {}
        other => panic!("creating checkpoint topic {topic}: {other:?}"),
    }
}
