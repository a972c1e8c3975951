//! Shared helpers: the servers under test, one isolated environment per
//! test, writers, relays (in-process and as a child process) and a
//! `read_committed` consumer that checks what reached Kafka.

#![allow(dead_code)]

pub mod checker;
pub mod cluster;
pub mod faults;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod pg_pair;
pub mod proxy;
pub mod registry;
pub mod several;
pub mod workload;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outboxd::Config;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// Where the servers are. `make test` exports these after starting them;
/// without them the tests fail, never skip.
pub struct Servers {
    pub postgres_url: String,
    pub kafka: String,
    /// A broker with `auto.create.topics.enable=false`.
    pub kafka_no_auto_create: String,
}

pub fn servers() -> Servers {
    let read = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: integration tests need the real PostgreSQL and Kafka. \
                 Run `make test`, which starts them (deploy/local/stack.sh up DIR) and exports it."
            )
        })
    };
    Servers {
        postgres_url: read("OUTBOXD_TEST_PG_URL"),
        kafka: read("OUTBOXD_TEST_KAFKA"),
        kafka_no_auto_create: read("OUTBOXD_TEST_KAFKA_NO_AUTO_CREATE"),
    }
}

/// Which capture mode a test's relay uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Polling,
    Replication,
    /// The relay decides (the default in a user's config).
    Auto,
}

impl Mode {
    pub fn config_value(self) -> &'static str {
        match self {
            Mode::Polling => "polling",
            Mode::Replication => "replication",
            Mode::Auto => "auto",
        }
    }
}

/// Runs a scenario `async fn NAME(mode: Mode)` as two tests, `NAME::polling`
/// and `NAME::replication`: everything must hold in both capture modes.
#[macro_export]
macro_rules! in_both_modes {
    ($scenario:ident, worker_threads = $threads:expr) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn polling() {
                super::$scenario($crate::support::Mode::Polling).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn replication() {
                super::$scenario($crate::support::Mode::Replication).await
            }
        }
    };
    // The same, run only when asked for by name with `--ignored` (a target
    // of their own, such as `make test-versions`), never by `make test`.
    ($scenario:ident, worker_threads = $threads:expr, ignore = $why:literal) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            #[ignore = $why]
            async fn polling() {
                super::$scenario($crate::support::Mode::Polling).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            #[ignore = $why]
            async fn replication() {
                super::$scenario($crate::support::Mode::Replication).await
            }
        }
    };
}

/// Runs a fault campaign `async fn NAME(source: Source)` as three tests:
/// `NAME::polling` and `NAME::replication` on the outbox table, and
/// `NAME::messages` on the WAL-message outbox (`capture.source: messages`).
#[macro_export]
macro_rules! in_every_source {
    ($scenario:ident, worker_threads = $threads:expr) => {
        mod $scenario {
            use $crate::support::faults::Source;
            use $crate::support::Mode;
            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn polling() {
                super::$scenario(Source::Table(Mode::Polling)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn replication() {
                super::$scenario(Source::Table(Mode::Replication)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn messages() {
                super::$scenario(Source::Messages).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn unmarked() {
                super::$scenario(Source::Unmarked).await
            }
        }
    };
}

/// One test's world: its own database, relay name, replication slot,
/// topics and config file.
pub struct TestEnv {
    pub id: String,
    pub mode: Mode,
    relay_name: String,
    pub database_url: String,
    pub kafka: String,
    pub pool: PgPool,
    pub config_path: PathBuf,
    /// The test's own `{prefix}.checkpoints`, or a topic shared with other
    /// envs' relays (`with_checkpoint_topic`), as in production.
    checkpoint_topic: String,
    /// Extra YAML lines under `postgres:`, such as the partitioning section.
    postgres_extra: String,
    /// Extra YAML lines under `capture:`: a message outbox's source and
    /// prefix (`use_messages`).
    capture_extra: String,
    /// Extra YAML lines under `relay:` kept by every `write_config`
    /// (`use_unmarked`).
    relay_extra: String,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TestEnv {
    /// A fresh database with the outbox migrated and an `aggregates` table
    /// the workload locks to serialise writers per aggregate.
    pub async fn new(name: &str, mode: Mode) -> TestEnv {
        TestEnv::new_on(&servers().postgres_url, name, mode).await
    }

    /// Like `new`, on the Postgres server at `server_url`.
    pub async fn new_on(server_url: &str, name: &str, mode: Mode) -> TestEnv {
        TestEnv::new_with(server_url, name, mode, "").await
    }

    /// Like `new`, with the outbox partitioned as the YAML lines
    /// `partitioning` (under `postgres:`) say, migrated so.
    pub async fn new_partitioned(name: &str, mode: Mode, partitioning: &str) -> TestEnv {
        TestEnv::new_with(&servers().postgres_url, name, mode, partitioning).await
    }

    /// Like `new_on`, with the database called `database` (the same name
    /// as another env's, on another server: shards of one service).
    pub async fn new_on_database(
        server_url: &str,
        name: &str,
        mode: Mode,
        database: &str,
    ) -> TestEnv {
        TestEnv::new_with_database(server_url, name, mode, "", Some(database)).await
    }

    /// The name of the env's database.
    pub fn database_name(&self) -> String {
        self.database_url_name()
    }

    async fn new_with(server_url: &str, name: &str, mode: Mode, postgres_extra: &str) -> TestEnv {
        TestEnv::new_with_database(server_url, name, mode, postgres_extra, None).await
    }

    async fn new_with_database(
        server_url: &str,
        name: &str,
        mode: Mode,
        postgres_extra: &str,
        database: Option<&str>,
    ) -> TestEnv {
        let servers = servers();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let id = format!(
            "{}-{}-{pid}-{n}",
            name.replace('_', "-"),
            mode.config_value()
        );
        // Short and unique: it also names the replication slot, which is
        // per server, not per database.
        let relay_name = format!("it-{}-{pid}-{n}", &mode.config_value()[..1]);
        let database = database
            .map(str::to_string)
            .unwrap_or_else(|| format!("t_{}", id.replace('-', "_")));
        let mut admin = PgConnection::connect(server_url)
            .await
            .expect("connect to the test Postgres (is the stack up?)");
        for statement in [
            format!("DROP DATABASE IF EXISTS {database}"),
            format!("CREATE DATABASE {database}"),
        ] {
            sqlx::raw_sql(&statement)
                .execute(&mut admin)
                .await
                .expect("create test database");
        }
        let database_url = replace_database(server_url, &database);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&database_url)
            .await
            .expect("connect test db");
        sqlx::raw_sql(
            "CREATE TABLE aggregates (id text PRIMARY KEY, version int NOT NULL DEFAULT 0)",
        )
        .execute(&pool)
        .await
        .expect("create aggregates table");
        let config_path = std::env::temp_dir().join(format!("outboxd-it-{id}.yaml"));
        let checkpoint_topic = format!("it-{id}.checkpoints");
        let env = TestEnv {
            checkpoint_topic,
            id,
            mode,
            relay_name,
            database_url,
            kafka: servers.kafka,
            pool,
            config_path,
            postgres_extra: postgres_extra.to_string(),
            capture_extra: String::new(),
            relay_extra: String::new(),
        };
        env.write_config("", "");
        outboxd::migrate::apply(&env.setup())
            .await
            .expect("migrate");
        env
    }

    /// Points the env at the same database on another server (a promoted
    /// standby): its pool, and the config of relays started from now on.
    pub async fn move_to(&mut self, server_url: &str) {
        self.database_url = replace_database(server_url, &self.database_url_name());
        self.pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&self.database_url)
            .await
            .expect("connect to the test database on the new server");
        self.write_config("", "");
    }

    /// The database's name, from its URL.
    fn database_url_name(&self) -> String {
        let base = self.database_url.split('?').next().unwrap_or_default();
        base.rsplit('/').next().unwrap_or_default().to_string()
    }

    pub fn topic_prefix(&self) -> String {
        format!("it-{}", self.id)
    }
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dlq", self.topic_prefix())
    }
    pub fn relay_name(&self) -> String {
        self.relay_name.clone()
    }
    pub fn checkpoint_topic(&self) -> String {
        self.checkpoint_topic.clone()
    }

    /// Makes the env's relays write their checkpoints to `topic`, which
    /// other envs' relays share.
    pub fn with_checkpoint_topic(mut self, topic: &str) -> TestEnv {
        self.checkpoint_topic = topic.to_string();
        self.write_config("", "");
        self
    }

    /// Moves the env's relay to checkpoint topic `topic`:
    /// `kafka.checkpoint_topic` names it and, if `name_previous`,
    /// `kafka.previous_checkpoint_topic` the topic it moves from. Returns
    /// that topic.
    pub fn move_checkpoint_topic(&mut self, topic: &str, name_previous: bool) -> String {
        let previous = std::mem::replace(&mut self.checkpoint_topic, topic.to_string());
        let yaml = std::fs::read_to_string(&self.config_path).expect("read test config");
        let yaml: String = yaml
            .lines()
            .filter(|line| !line.trim_start().starts_with("previous_checkpoint_topic:"))
            .map(|line| {
                if line.trim_start().starts_with("checkpoint_topic:") && name_previous {
                    format!(
                        "  checkpoint_topic: {topic}\n  previous_checkpoint_topic: {previous}\n"
                    )
                } else if line.trim_start().starts_with("checkpoint_topic:") {
                    format!("  checkpoint_topic: {topic}\n")
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        std::fs::write(&self.config_path, yaml).expect("write test config");
        previous
    }

    /// Turns the env into a WAL-message outbox (`capture.source: messages`,
    /// prefix `outboxd`, publication `outboxd_messages`; replication mode
    /// only) and migrates it: the emit function, the publication and the
    /// slot, created before any writer emits so that none is missed. Also
    /// makes the `emitted` table, one row per event a writer emitted, in
    /// the same transaction: messages leave no row, so that table is how a
    /// test knows which events committed.
    pub async fn use_messages(&mut self) {
        assert_eq!(
            self.mode,
            Mode::Replication,
            "a message outbox streams from a replication slot"
        );
        self.postgres_extra
            .push_str("  publication: outboxd_messages\n");
        self.capture_extra = "  source: messages\n  message_prefix: outboxd\n".to_string();
        self.write_config("", "");
        outboxd::migrate::apply_messages(&self.setup())
            .await
            .expect("migrate the message outbox");
        sqlx::raw_sql("CREATE TABLE emitted (seq bigserial PRIMARY KEY, id text NOT NULL UNIQUE)")
            .execute(&self.pool)
            .await
            .expect("create the emitted table");
    }

    /// Makes the env's relay publish rows without marking them
    /// (`relay.after_publish: none`; replication mode only).
    pub fn use_unmarked(&mut self) {
        assert_eq!(
            self.mode,
            Mode::Replication,
            "unmarked rows stream from a replication slot"
        );
        self.relay_extra = "  after_publish: none\n".to_string();
        self.write_config("", "");
    }

    /// Whether the env's relay leaves rows unmarked (`use_unmarked`).
    pub fn is_unmarked(&self) -> bool {
        !self.relay_extra.is_empty()
    }

    /// Whether the env relays WAL messages (`use_messages`).
    pub fn is_messages(&self) -> bool {
        !self.capture_extra.is_empty()
    }

    /// What the relay calls its outbox: the table, or `messages:<prefix>`.
    /// It keys the leader lock and the checkpoint records.
    pub fn outbox_name(&self) -> &'static str {
        if self.is_messages() {
            "messages:outboxd"
        } else {
            "public.outbox"
        }
    }

    /// The key of this env's checkpoint records: the table's identity in
    /// its database, whatever the relay is called.
    pub async fn checkpoint_key(&self) -> String {
        let mut connection = self.pool.acquire().await.expect("connection");
        let source = outboxd::schema::database_source(&mut connection)
            .await
            .expect("source");
        outboxd::kafka::identity::TableIdentity::new(
            source.as_deref(),
            self.outbox_name(),
            &self.relay_name,
        )
        .checkpoint_key
    }
    pub fn slot_name(&self) -> String {
        format!("outboxd_{}", self.relay_name.replace('-', "_"))
    }

    /// Drops `slot` once its walsender has let go of it.
    pub async fn drop_slot_when_released(&self, slot: &str) {
        for _ in 0..100 {
            let dropped = sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(slot)
                .execute(&self.pool)
                .await;
            if dropped.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("slot {slot} stayed active");
    }

    /// (Re)writes the config file; the overrides are extra YAML lines under
    /// `relay:` (such as `  on_poison: halt\n`) and `kafka:`.
    pub fn write_config(&self, relay_overrides: &str, kafka_overrides: &str) {
        let yaml = format!(
            "relay:\n  name: {name}\n{relay_extra}{relay_overrides}\
             postgres:\n  url: {url}\n{postgres_extra}\
             kafka:\n  bootstrap_servers: {kafka}\n  checkpoint_topic: {checkpoint_topic}\n  transaction_timeout: 20s\n{kafka_overrides}\
             capture:\n  mode: {mode}\n  batch_size: 100\n  poll_interval: 200ms\n{capture_extra}\
             routing:\n  topic: \"{prefix}.${{aggregatetype}}\"\n  dead_letter_topic: {prefix}.dlq\n\
             log:\n  level: info,librdkafka=warn,rdkafka=warn\n\
             http:\n  listen: 127.0.0.1:0\n",
            name = self.relay_name(),
            url = self.database_url,
            kafka = self.kafka,
            prefix = self.topic_prefix(),
            checkpoint_topic = self.checkpoint_topic,
            mode = self.mode.config_value(),
            postgres_extra = self.postgres_extra,
            capture_extra = self.capture_extra,
            relay_extra = self.relay_extra,
        );
        std::fs::write(&self.config_path, yaml).expect("write test config");
    }

    /// Edits the config file in place, e.g. to point it at another broker.
    pub fn replace_in_config(&self, from: &str, to: &str) {
        let yaml = std::fs::read_to_string(&self.config_path).expect("read test config");
        std::fs::write(&self.config_path, yaml.replace(from, to)).expect("write test config");
    }

    /// Runs a relay in-process until every row is marked sent, then stops it.
    pub async fn relay_until_all_sent(&self, limit: Duration) {
        let relay = InProcessRelay::start(self.config());
        self.wait_all_sent(limit).await;
        relay.stop().await.expect("relay stops cleanly");
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).expect("test config is valid")
    }

    /// The config as every command takes it, checked as a whole.
    pub fn setup(&self) -> outboxd::setup::Setup {
        outboxd::setup::Setup::load(&self.config_path).expect("test config is valid")
    }

    /// In replication mode, waits until the relay streams from its slot:
    /// its walsender shows in `pg_stat_replication`. (Creating a slot waits
    /// for every transaction open meanwhile to end, and the slot looks
    /// active while it is being created, so a test that holds a transaction
    /// open must start it after this.) No-op when polling; with `auto` the
    /// caller expects a server where auto streams.
    pub async fn wait_streaming(&self, limit: Duration) {
        if self.mode == Mode::Polling {
            return;
        }
        self.wait_streaming_as(&self.relay_name, limit).await;
    }

    /// As [`TestEnv::wait_streaming`], for a relay configured with another
    /// `relay.name`.
    pub async fn wait_streaming_as(&self, relay_name: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let streaming: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_replication \
                 WHERE application_name = $1 AND state IN ('catchup', 'streaming'))",
            )
            .bind(format!("outboxd-{relay_name}"))
            .fetch_one(&self.pool)
            .await
            .expect("read pg_stat_replication");
            if streaming {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay {relay_name} did not stream from its slot within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until some instance holds the outbox table's leader lock.
    pub async fn wait_leader(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let mut connection = self.pool.acquire().await.expect("connection");
            let holder = outboxd::leader::holder_pid(&mut connection, self.outbox_name())
                .await
                .expect("look up the leader");
            if holder.is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no relay took the lock within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until no walsender holds this env's slot.
    pub async fn wait_slot_inactive(&self, limit: Duration) {
        self.wait_slot_released(&self.slot_name(), limit).await;
    }

    /// Waits until no walsender streams from `slot` (a closed stream's
    /// walsender exits a moment after its client).
    pub async fn wait_slot_released(&self, slot: &str, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let active: Option<bool> =
                sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                    .bind(slot)
                    .fetch_optional(&self.pool)
                    .await
                    .expect("read pg_replication_slots");
            if active != Some(true) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "slot {slot} still active {limit:?} after its stream ended"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The slot's `confirmed_flush_lsn` and the server's current WAL
    /// position, as numbers.
    pub async fn slot_positions(&self) -> (Option<i64>, i64) {
        sqlx::query_as(
            "SELECT (SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint \
                     FROM pg_replication_slots WHERE slot_name = $1), \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
        )
        .bind(self.slot_name())
        .fetch_one(&self.pool)
        .await
        .expect("read slot positions")
    }

    /// Rows not yet marked sent.
    pub async fn unsent(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .expect("count unsent")
    }

    /// Waits until every row is marked sent, failing the test after `limit`.
    pub async fn wait_all_sent(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let unsent = self.unsent().await;
            if unsent == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{unsent} rows still unsent after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every row's event id, seq and sent flag, from Postgres.
    pub async fn rows(&self) -> Vec<(i64, String, bool)> {
        sqlx::query_as("SELECT seq, id::text, sent_at IS NOT NULL FROM outbox ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .expect("read outbox rows")
    }

    /// Points the env's relay at a new least-privilege role holding the
    /// grants `outboxd migrate --print` lists for this mode (and those of
    /// `dead-letters replay`), but not EXECUTE on `pg_control_system()`,
    /// which is revoked from PUBLIC: its identity is the `relay.name`
    /// stand-in until the grant is given. Returns the role.
    pub async fn relay_without_pg_control_system(&self) -> String {
        let role = format!("relay_{}", self.id.replace('-', "_"));
        let replication = if self.mode == Mode::Polling {
            ""
        } else {
            " REPLICATION"
        };
        for statement in [
            format!("CREATE ROLE {role} LOGIN{replication}"),
            format!("GRANT USAGE ON SCHEMA public TO {role}"),
            format!("GRANT SELECT, INSERT, UPDATE (sent_at) ON public.outbox TO {role}"),
            format!("GRANT SELECT, INSERT ON public.outbox_replayed TO {role}"),
            "REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC".to_string(),
        ] {
            sqlx::raw_sql(&statement)
                .execute(&self.pool)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
        self.replace_in_config(
            &format!("url: {}", self.database_url),
            &format!(
                "url: {}",
                self.database_url.replacen(
                    "postgres://postgres@",
                    &format!("postgres://{role}@"),
                    1
                )
            ),
        );
        role
    }

    /// Lets `role` read the system identifier: the relay's identity names
    /// the database.
    pub async fn grant_pg_control_system(&self, role: &str) {
        sqlx::raw_sql(&format!(
            "GRANT EXECUTE ON FUNCTION pg_control_system() TO {role}"
        ))
        .execute(&self.pool)
        .await
        .expect("grant");
    }

    /// Takes that away again: the relay's identity falls back to its name.
    pub async fn revoke_pg_control_system(&self, role: &str) {
        sqlx::raw_sql(&format!(
            "REVOKE EXECUTE ON FUNCTION pg_control_system() FROM {role}"
        ))
        .execute(&self.pool)
        .await
        .expect("revoke");
    }

    /// Starts the real binary on this env's config.
    pub fn spawn_relay_process(&self) -> Child {
        self.spawn_relay_process_with(&[])
    }

    /// Like `spawn_relay_process`, with extra environment variables (the
    /// binary's fault-injection knobs).
    pub fn spawn_relay_process_with(&self, envs: &[(&str, &str)]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(["run", "--config"])
            .arg(&self.config_path)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start outboxd")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_path);
    }
}

fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut replaced = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        replaced.push('?');
        replaced.push_str(query);
    }
    replaced
}

/// A relay running inside the test process via `relay::run`.
pub struct InProcessRelay {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), outboxd::Error>>,
    pub metrics: std::sync::Arc<outboxd::metrics::Metrics>,
}

impl InProcessRelay {
    pub fn start(config: Config) -> InProcessRelay {
        outboxd::logging::init(&config.log);
        let metrics = outboxd::metrics::Metrics::new(&config.relay.name);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let setup = outboxd::setup::Setup::new(config).expect("test config is valid");
        let handle = tokio::spawn(outboxd::relay::run(
            setup,
            std::sync::Arc::clone(&metrics),
            async move {
                let _ = stopped.await;
            },
        ));
        InProcessRelay {
            stop: Some(stop),
            handle,
            metrics,
        }
    }

    /// Serves this relay's `/metrics`, `/healthz` and `/readyz` on a free
    /// loopback port; returns the base URL.
    pub async fn serve_http(&self) -> String {
        let listener = outboxd::http::bind("127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind a free port");
        let address = listener.local_addr().expect("bound address");
        tokio::spawn(outboxd::http::serve(
            listener,
            vec![std::sync::Arc::clone(&self.metrics)],
            std::future::pending(),
        ));
        format!("http://{address}")
    }

    /// Requests shutdown and returns how the relay ended.
    pub async fn stop(mut self) -> Result<(), outboxd::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(60), &mut self.handle)
            .await
            .expect("relay stops within 60s")
            .expect("relay task did not panic")
    }

    /// Waits for the relay to end by itself (a `Stop` error).
    pub async fn finished(mut self, limit: Duration) -> Result<(), outboxd::Error> {
        tokio::time::timeout(limit, &mut self.handle)
            .await
            .expect("relay stopped by itself in time")
            .expect("relay task did not panic")
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Sends a signal to a child we started.
pub fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {}", child.id());
}
