//! Mixed releases on one table, with real binaries: the release from
//! before table-keyed checkpoints (`0ac26db`: checkpoints keyed by
//! `relay.name`, transactional id `outboxd-<relay.name>`, the whole
//! checkpoint topic read at every start) and this one hand leadership of
//! one table back and forth, killed at their kill points, while writers
//! commit; then the checker over everything (nothing lost, repeated or
//! reordered). What docs/operations.md's "Upgrade and rollback" promises:
//!
//! - old → new: the new relay adopts a batch the old one committed to
//!   Kafka but did not mark;
//! - new → old: an old relay with the same name refuses to lead ("a newer
//!   outboxd wrote it"), also when it was waiting as a standby, and
//!   publishes and marks nothing;
//! - new → old → new after the documented escape hatch (a tombstone under
//!   `relay.name`): nothing repeated;
//! - an old relay under a name the new one never saw fences it and marks
//!   its rows; the new one adopts what the old one published; also when
//!   that old relay stalls (SIGSTOP) in its first Kafka transaction and
//!   wakes after the new one took over.
//!
//! Where a release keeps exactly-once but not the word of docs/operations.md (what the
//! old release says when it refuses, whether a tombstone lets it lead), the
//! campaign still runs to the checker and the test fails afterwards,
//! listing what differed.
//!
//! The old binary comes from `OUTBOXD_OLD_BINARY` (`make test-versions`
//! builds and caches it with `scripts/old-release.sh`). These tests are
//! `#[ignore]`d so that `make test` (and CI) need no old build; run by name
//! with `--ignored`, they fail, never skip, when the binary is missing.
//!
//! Both releases place keys with librdkafka's `consistent_random`: the old
//! one had no `routing.partitioner` and used librdkafka's default, and the
//! new one is configured to keep that placement (the upgrade
//! note), so an aggregate stays on one partition across the hand-overs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;

use crate::support::faults::{
    config_with_relay_name, log_path, random_between, size, Campaign, RelayProcess,
};
use crate::support::kafka::{read_all, read_topic};
use crate::support::workload::Workload;
use crate::support::{Mode, TestEnv};

/// The release the tests run beside this one.
const OLD_COMMIT: &str = "0ac26db";

/// Kill points and start-up must pass within this.
const LIMIT: Duration = Duration::from_secs(90);

/// What the new relay logs when it adopts an old relay's checkpoint.
const ADOPTING: &str = "adopting what a relay from before table-keyed checkpoints";

fn old_binary() -> PathBuf {
    let how = "build it and run these tests with `make test-versions`, or by hand:\n  \
               OUTBOXD_OLD_BINARY=$(bash scripts/old-release.sh) \
               cargo test --locked --test faults versions:: -- --ignored --test-threads=1";
    let Some(path) = std::env::var_os("OUTBOXD_OLD_BINARY") else {
        panic!(
            "OUTBOXD_OLD_BINARY is not set: these tests run the release from before \
             table-keyed checkpoints ({OLD_COMMIT}) beside this one; {how}"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "OUTBOXD_OLD_BINARY={} is not a file; {how}",
        path.display()
    );
    path
}

/// A campaign with both releases: the env's config is the new relay's; the
/// old one's is the same file without the keys it does not know.
struct Mixed {
    campaign: Campaign,
    old_binary: PathBuf,
    old_config: PathBuf,
    /// Old relays started so far: each logs to a file of its own.
    old_runs: usize,
    /// Configs of old relays under other names, removed at the end.
    other_configs: Vec<PathBuf>,
    /// Where the releases did not do what docs/operations.md says, though nothing
    /// was lost or repeated: reported after the checker, failing the test.
    broken_promises: Vec<String>,
}

impl Mixed {
    async fn start(fault: &'static str, mode: Mode) -> Mixed {
        // Before taking the servers: a missing binary fails at once.
        let old_binary = old_binary();
        let mut campaign = Campaign::start(fault, mode, &Workload::realistic()).await;
        let env = &campaign.env;
        let old_config = env.config_path.with_extension("old.yaml");
        std::fs::copy(&env.config_path, &old_config).expect("write the old relay's config");
        env.replace_in_config("routing:\n", "routing:\n  partitioner: consistent_random\n");
        campaign.legacy_checkpoint_keys.push(env.relay_name());
        Mixed {
            campaign,
            old_binary,
            old_config,
            old_runs: 0,
            other_configs: Vec::new(),
            broken_promises: Vec::new(),
        }
    }

    fn env(&self) -> &TestEnv {
        &self.campaign.env
    }

    fn new_relay(&self, kill_at: Option<&str>) -> RelayProcess {
        RelayProcess::start(self.env(), kill_at)
    }

    fn old_relay(&mut self, kill_at: Option<&str>) -> RelayProcess {
        let config = self.old_config.clone();
        self.old_relay_with(&config, kill_at)
    }

    fn old_relay_with(&mut self, config: &Path, kill_at: Option<&str>) -> RelayProcess {
        self.old_runs += 1;
        let log = log_path(self.env()).with_extension(format!("old-{}.log", self.old_runs));
        eprintln!("old relay {}: log {}", self.old_runs, log.display());
        RelayProcess::spawn_binary(&self.old_binary, config, &log, kill_at)
    }

    /// How often the new relays have adopted an old relay's checkpoint.
    fn adoptions(&self) -> usize {
        std::fs::read_to_string(log_path(self.env()))
            .unwrap_or_default()
            .matches(ADOPTING)
            .count()
    }

    /// Waits until the new relays adopted once more than `before`.
    async fn adopted_since(&self, before: usize) {
        let deadline = std::time::Instant::now() + LIMIT;
        while self.adoptions() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "the new relay did not adopt the old one's checkpoint within {LIMIT:?}; log: {}",
                log_path(self.env()).display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The old relay's config under `name` (its own checkpoint key,
    /// transactional id and slot); the checker counts its checkpoints.
    fn old_config_named(&mut self, name: &str) -> PathBuf {
        let yaml = std::fs::read_to_string(&self.old_config).expect("read the old config");
        let renamed = yaml.replace(
            &format!("name: {}\n", self.env().relay_name()),
            &format!("name: {name}\n"),
        );
        assert_ne!(yaml, renamed, "the relay name is in the config");
        let path = self.old_config.with_extension(format!("{name}.yaml"));
        std::fs::write(&path, renamed).expect("write the renamed old config");
        self.campaign.legacy_checkpoint_keys.push(name.to_string());
        self.other_configs.push(path.clone());
        path
    }

    /// Runs `relay` armed at `after-commit:N` until it dies there: a batch
    /// is in Kafka and its rows are not marked.
    async fn killed_after_commit(&mut self, mut relay: RelayProcess) {
        relay.killed_at_point("after-commit", LIMIT).await;
        self.campaign.runs += 1;
    }

    /// Starts the old relay with the env's name, which must refuse to lead
    /// (a hand-over marker is the latest record under its key), exit
    /// non-zero, and publish and mark nothing.
    async fn old_refuses(&mut self, relay: Option<RelayProcess>) {
        let before = books(self.env()).await;
        let mut old = relay.unwrap_or_else(|| self.old_relay(None));
        let status = old.exited(LIMIT).await;
        let log = std::fs::read_to_string(&old.log).unwrap_or_default();
        assert!(
            !status.success() && log.contains("refusing to guess which rows were published"),
            "the old release did not refuse to lead a table this release had led ({status}); \
             log: {}",
            old.log.display()
        );
        if !log.contains("checkpoint format 2 is not 1; a newer outboxd wrote it") {
            self.broken_promises.push(format!(
                "docs/operations.md \"Upgrade and rollback\": an old relay refusing to lead should say \"checkpoint \
                 format 2 is not 1; a newer outboxd wrote it\"; it said: {} (log {})",
                refusal(&log),
                old.log.display()
            ));
        }
        let after = books(self.env()).await;
        assert_eq!(
            before,
            after,
            "the refusing old release published or marked something (records in Kafka, rows \
             marked, latest record under its key); log: {}",
            old.log.display()
        );
        assert!(
            after.2.contains("\"version\":2"),
            "the latest record under the old relay's key is not a hand-over marker: {}",
            after.2
        );
        self.campaign.runs += 1;
    }

    async fn finish(self, running: Vec<RelayProcess>) {
        let slots: Vec<String> = self
            .campaign
            .legacy_checkpoint_keys
            .iter()
            .skip(1)
            .map(|name| format!("outboxd_{}", name.replace('-', "_")))
            .collect();
        let pool = self.env().pool.clone();
        let mode = self.env().mode;
        self.campaign.finish(running).await;
        // Slots of old relays under other names would pin WAL on the shared
        // server until the stack stops.
        if mode == Mode::Replication && !slots.is_empty() {
            sqlx::query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = ANY($1) AND NOT active",
            )
            .bind(&slots)
            .execute(&pool)
            .await
            .expect("drop the old relays' slots");
        }
        let _ = std::fs::remove_file(&self.old_config);
        for config in &self.other_configs {
            let _ = std::fs::remove_file(config);
        }
        assert!(
            self.broken_promises.is_empty(),
            "nothing was lost or repeated, but:\n{}",
            self.broken_promises.join("\n")
        );
    }
}

/// What a relay leaves behind: committed records in the routed and
/// dead-letter topics, rows marked sent, and the latest record under the
/// env's `relay.name` on the checkpoint topic.
async fn books(env: &TestEnv) -> (usize, i64, String) {
    let published = read_all(&env.kafka, &env.topic_prefix()).await.len();
    let marked: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL")
        .fetch_one(&env.pool)
        .await
        .expect("count marked rows");
    let name = env.relay_name();
    let latest = read_topic(&env.kafka, &env.checkpoint_topic())
        .await
        .into_iter()
        .rfind(|r| r.key.as_deref() == Some(name.as_bytes()))
        .map(|r| match r.payload {
            Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            None => "<tombstone>".to_string(),
        })
        .unwrap_or_else(|| "<none>".to_string());
    (published, marked, latest)
}

/// The line where an old relay says why it stopped.
fn refusal(log: &str) -> String {
    log.lines()
        .find(|line| line.starts_with("error: "))
        .unwrap_or("<no `error:` line>")
        .to_string()
}

/// `after-commit`, not always the first batch.
fn after_commit() -> String {
    format!("after-commit:{}", rand::rng().random_range(1..=3))
}

fn a_moment() -> Duration {
    random_between(Duration::from_millis(500)..=Duration::from_millis(2000))
}

in_both_modes!(
    old_to_new,
    worker_threads = 2,
    ignore = "needs the old release: make test-versions"
);
/// Upgrade: the old relay leads and dies after a Kafka commit, before
/// marking; the new one takes over and must adopt that batch.
async fn old_to_new(mode: Mode) {
    let mut mixed = Mixed::start("versions-old-to-new", mode).await;
    let old = mixed.old_relay(Some(&after_commit()));
    mixed.killed_after_commit(old).await;
    let new = mixed.new_relay(None);
    mixed.adopted_since(0).await;
    tokio::time::sleep(a_moment()).await;
    mixed.finish(vec![new]).await;
}

in_both_modes!(
    new_to_old_is_refused,
    worker_threads = 2,
    ignore = "needs the old release: make test-versions"
);
/// Rollback without the escape hatch: the new relay leads and dies after a
/// Kafka commit; the old one with the same name refuses and publishes
/// nothing; the new one takes over again.
async fn new_to_old_is_refused(mode: Mode) {
    let mut mixed = Mixed::start("versions-new-to-old", mode).await;
    let new = mixed.new_relay(Some(&after_commit()));
    mixed.killed_after_commit(new).await;
    mixed.old_refuses(None).await;
    mixed.finish(Vec::new()).await;
}

in_both_modes!(
    an_old_standby_refuses_after_the_new_leader,
    worker_threads = 2,
    ignore = "needs the old release: make test-versions"
);
/// An old pod restarting while a new one leads (same name): it waits on the
/// leader lock; the new leader dies after a Kafka commit, the old one gets
/// the lock and must refuse; a new one takes over.
async fn an_old_standby_refuses_after_the_new_leader(mode: Mode) {
    let mut mixed = Mixed::start("versions-old-standby", mode).await;
    for _ in 0..size(1, 4) {
        // Not the first batch: the old relay is waiting by then.
        let nth = rand::rng().random_range(3..=6);
        let new = mixed.new_relay(Some(&format!("after-commit:{nth}")));
        mixed.env().wait_leader(LIMIT).await;
        let mut old = mixed.old_relay(None);
        old.wait_for_log("another instance holds the leader lock", LIMIT)
            .await;
        old.assert_running("the old relay should wait on the leader lock");
        mixed.killed_after_commit(new).await;
        mixed.old_refuses(Some(old)).await;
    }
    mixed.finish(Vec::new()).await;
}

in_both_modes!(
    an_old_relay_under_another_name_after_the_new_one,
    worker_threads = 2,
    ignore = "needs the old release: make test-versions"
);
/// An old relay under a name the new one never saw meets no marker: it
/// fences the new relay (its predecessor), marks its rows and leads; the
/// new one adopts what it published on its next start.
async fn an_old_relay_under_another_name_after_the_new_one(mode: Mode) {
    let mut mixed = Mixed::start("versions-old-other-name", mode).await;
    for round in 0..size(1, 4) {
        let adopted = mixed.adoptions();
        let new = mixed.new_relay(Some(&after_commit()));
        mixed.killed_after_commit(new).await;
        if round > 0 {
            assert!(mixed.adoptions() > adopted, "the new relay adopted nothing");
        }
        let name = format!("{}-o{round}", mixed.env().relay_name());
        let config = mixed.old_config_named(&name);
        let old = mixed.old_relay_with(&config, Some(&after_commit()));
        mixed.killed_after_commit(old).await;
    }
    let adopted = mixed.adoptions();
    let new = mixed.new_relay(None);
    mixed.adopted_since(adopted).await;
    tokio::time::sleep(a_moment()).await;
    mixed.finish(vec![new]).await;
}

in_both_modes!(
    an_old_zombie_wakes_after_the_new_one_took_over,
    worker_threads = 2,
    ignore = "needs the old release: make test-versions"
);
/// An upgrade with a frozen old leader: the old relay leads and freezes
/// (SIGSTOP) inside a claim, with rows claimed and its Kafka transaction
/// open, while its Postgres sessions end (a pause, a partition). The new
/// relay under the same `relay.name` takes the lock; then the old one wakes
/// up and tries to commit. The new relay fenced the old release's
/// transactional id when it took over, so that commit fails: nothing is
/// published twice. (Under a name this release never saw, the old relay
/// cannot be fenced before its first checkpoint; docs/operations.md says so.)
async fn an_old_zombie_wakes_after_the_new_one_took_over(mode: Mode) {
    let mut mixed = Mixed::start("versions-old-zombie", mode).await;
    for round in 0..size(2, 10) {
        // A name per round: a name this release led under gets a hand-over
        // marker, and an old relay under it would refuse to start.
        let name = format!("{}-z{round}", mixed.env().relay_name());
        let old_config = mixed.old_config_named(&name);
        let new_config = config_with_relay_name(mixed.env(), &name);
        let mut zombie = mixed.old_relay_with(&old_config, None);
        // A claim: a transaction holding rows while it publishes.
        let backend = claim_in_progress(mixed.env(), &mut zombie).await;
        zombie.freeze_now();
        zombie_loses_postgres(mixed.env(), backend).await;
        let mut new = RelayProcess::spawn(&new_config, &log_path(mixed.env()), None);
        mixed.env().wait_leader(LIMIT).await;
        // Long enough to publish the rows the zombie had claimed, well
        // inside the zombie's transaction timeout (20 s).
        tokio::time::sleep(Duration::from_secs(6)).await;
        new.assert_running("the new relay should lead");
        zombie.resume();
        tokio::time::sleep(Duration::from_secs(3)).await;
        zombie.kill();
        new.stop().await;
        let _ = std::fs::remove_file(&new_config);
        mixed.campaign.runs += 1;
        eprintln!(
            "zombie round {round}: {} checkpoint(s) committed under `{name}` (log {})",
            committed_under(mixed.env(), &name).await,
            zombie.log.display()
        );
    }
    mixed.finish(Vec::new()).await;
}

/// Waits until `relay` (an old release) holds the leader lock and is inside
/// a claim transaction (rows locked, publishing); returns that backend.
async fn claim_in_progress(env: &TestEnv, relay: &mut RelayProcess) -> i32 {
    let mut connection = env.pool.acquire().await.expect("connection");
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        relay.assert_running("the old relay should lead");
        assert!(
            std::time::Instant::now() < deadline,
            "the old relay claimed nothing within {LIMIT:?}; log: {}",
            relay.log.display()
        );
        let holder = outboxd::leader::holder_pid(&mut connection, "public.outbox")
            .await
            .expect("look up the leader");
        if let Some(pid) = holder {
            let claiming: Option<bool> = sqlx::query_scalar(
                "SELECT state = 'idle in transaction' AND query LIKE '%SKIP LOCKED%' \
                 FROM pg_stat_activity WHERE pid = $1",
            )
            .bind(pid)
            .fetch_optional(&mut *connection)
            .await
            .expect("read pg_stat_activity");
            if claiming == Some(true) {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Ends the frozen relay's Postgres session that holds the lock and its
/// claim: the claim rolls back and the lock is free.
async fn zombie_loses_postgres(env: &TestEnv, backend: i32) {
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(backend)
        .execute(&env.pool)
        .await
        .expect("terminate the zombie's session");
}

/// Committed checkpoints under `key`.
async fn committed_under(env: &TestEnv, key: &str) -> usize {
    read_topic(&env.kafka, &env.checkpoint_topic())
        .await
        .iter()
        .filter(|r| r.key.as_deref() == Some(key.as_bytes()) && r.payload.is_some())
        .count()
}
