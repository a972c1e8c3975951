//! A PostgreSQL primary with one synchronous physical standby, for the
//! tests of what a failover does to the relay (`deploy/local/pg-pair.sh`,
//! started and stopped by the test itself, in the stack's folder).
//!
//! Invariant: the pair lives exactly as long as its `PgPair` value;
//! dropping it stops both servers by their PIDs, so a failed test leaves
//! none behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct PgPair {
    /// The primary's `postgres` database; its commits wait for the standby.
    pub primary_url: String,
    /// The standby's `postgres` database (read-only until promoted).
    pub standby_url: String,
    dir: PathBuf,
}

static PAIRS: AtomicUsize = AtomicUsize::new(0);

impl PgPair {
    /// Starts a pair under the stack's folder (`pg-pair.sh up`); returns
    /// once the primary counts the standby as synchronous.
    pub async fn start(name: &str) -> PgPair {
        let stack = std::env::var("OUTBOXD_STACK_DIR")
            .expect("OUTBOXD_STACK_DIR is not set: run the tests with `make test`");
        let dir = Path::new(&stack).join(format!(
            "pair-{name}-{}-{}",
            std::process::id(),
            PAIRS.fetch_add(1, Ordering::SeqCst)
        ));
        run_script("up", &dir).await;
        let env = std::fs::read_to_string(dir.join("env")).expect("pair env");
        let read = |variable: &str| {
            env.lines()
                .find_map(|line| line.strip_prefix(&format!("export {variable}=")))
                .unwrap_or_else(|| panic!("{variable} in the pair's env"))
                .to_string()
        };
        PgPair {
            primary_url: read("OUTBOXD_PAIR_PRIMARY_URL"),
            standby_url: read("OUTBOXD_PAIR_STANDBY_URL"),
            dir,
        }
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

    /// Promotes the standby; returns once it takes writes.
    pub async fn promote(&self) {
        run_script("promote", &self.dir).await;
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
    let dir = dir.to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(script())
            .arg(command)
            .arg(&dir)
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
