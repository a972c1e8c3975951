//! A PostgreSQL primary with one synchronous physical standby, for the
//! tests of what a failover does to the relay (`deploy/local/pg-pair.sh`,
//! started and stopped by the test itself, in the stack's folder).
//!
//! A pair can fail over again and again: `promote` makes the standby the
//! primary, `new_standby` base-backs up a new synchronous standby of it.
//!
//! Invariant: the pair lives exactly as long as its `PgPair` value;
//! dropping it stops every server it started by their PIDs, so a failed
//! test leaves none behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct PgPair {
    /// The primary's `postgres` database; its commits wait for the standby.
    pub primary_url: String,
    /// The standby's `postgres` database (read-only until promoted); `None`
    /// between a promotion and `new_standby`.
    pub standby_url: Option<String>,
    dir: PathBuf,
}

/// How `pg-pair.sh up` sets the pair up (see the script).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairOption {
    /// A promoted standby waits for the next standby before any commit
    /// returns (Patroni's `synchronous_mode_strict`).
    Strict,
    /// PostgreSQL 17+: the standby synchronises failover slots and the
    /// primary's `synchronized_standby_slots` names its physical slot.
    FailoverSlots,
}

impl PairOption {
    fn flag(self) -> &'static str {
        match self {
            PairOption::Strict => "--strict",
            PairOption::FailoverSlots => "--failover-slots",
        }
    }
}

static PAIRS: AtomicUsize = AtomicUsize::new(0);

impl PgPair {
    /// Starts a pair under the stack's folder (`pg-pair.sh up`); returns
    /// once the primary counts the standby as synchronous.
    pub async fn start(name: &str) -> PgPair {
        PgPair::start_with(name, &[]).await
    }

    /// Like `start`, set up with `options`.
    pub async fn start_with(name: &str, options: &[PairOption]) -> PgPair {
        let stack = std::env::var("OUTBOXD_STACK_DIR")
            .expect("OUTBOXD_STACK_DIR is not set: run the tests with `make test`");
        let dir = Path::new(&stack).join(format!(
            "pair-{name}-{}-{}",
            std::process::id(),
            PAIRS.fetch_add(1, Ordering::SeqCst)
        ));
        let flags: Vec<&'static str> = options.iter().map(|o| o.flag()).collect();
        run_script_with("up", &dir, &flags).await;
        let mut pair = PgPair {
            primary_url: String::new(),
            standby_url: None,
            dir,
        };
        pair.read_env();
        assert!(
            pair.standby_url.is_some(),
            "the pair came up without a standby"
        );
        pair
    }

    /// The servers' URLs as `pg-pair.sh` last wrote them.
    fn read_env(&mut self) {
        let env = std::fs::read_to_string(self.dir.join("env")).expect("pair env");
        let read = |variable: &str| {
            env.lines()
                .find_map(|line| line.strip_prefix(&format!("export {variable}=")))
                .map(str::to_string)
        };
        self.primary_url =
            read("OUTBOXD_PAIR_PRIMARY_URL").expect("OUTBOXD_PAIR_PRIMARY_URL in the pair's env");
        self.standby_url = read("OUTBOXD_PAIR_STANDBY_URL");
    }

    /// The standby's URL; panics between a promotion and `new_standby`.
    pub fn standby(&self) -> &str {
        self.standby_url
            .as_deref()
            .expect("the pair has a standby (call new_standby after a promotion)")
    }

    /// Stops the standby: from now on the primary's commits wait for it.
    pub async fn stop_standby(&self) {
        run_script("stop-standby", &self.dir).await;
    }

    pub async fn start_standby(&self) {
        run_script("start-standby", &self.dir).await;
    }

    /// Stops the primary with `-m immediate`: a crash.
    pub async fn crash_primary(&self) {
        run_script("crash-primary", &self.dir).await;
    }

    /// After `crash_primary`: the old primary starts in recovery with
    /// nothing to stream from and is promoted alone (a new timeline holding
    /// everything it had), then stops; the standby gets that timeline's
    /// history file, as from a shared WAL archive, and follows it when it
    /// starts.
    pub async fn fork_crashed_primary(&self) {
        run_script("fork-crashed-primary", &self.dir).await;
    }

    /// Promotes the standby; returns once it takes writes. It is the
    /// primary from now on (`primary_url`), and the pair has no standby.
    pub async fn promote(&mut self) {
        run_script("promote", &self.dir).await;
        self.read_env();
    }

    /// After a promotion: a new standby, base-backed-up from the primary;
    /// returns once the primary counts it as synchronous.
    pub async fn new_standby(&mut self) {
        run_script("new-standby", &self.dir).await;
        self.read_env();
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("down")
            .arg(&self.dir)
            .output();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/pg-pair.sh")
}

async fn run_script(command: &'static str, dir: &Path) {
    run_script_with(command, dir, &[]).await
}

async fn run_script_with(command: &'static str, dir: &Path, flags: &[&'static str]) {
    let dir = dir.to_path_buf();
    let flags = flags.to_vec();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(script())
            .arg(command)
            .arg(&dir)
            .args(&flags)
            .output()
            .expect("run pg-pair.sh")
    })
    .await
    .expect("pg-pair.sh task");
    assert!(
        output.status.success(),
        "pg-pair.sh {command} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
