//! Named kill points for the fault-injection suite.
//!
//! Invariant: unless `OUTBOXD_KILL_AT` is set, `kill_point` does nothing but
//! read a value cached at first use, and `librdkafka_logged` nothing but
//! read a flag. When it is set to `NAME` or `NAME:N`, the process SIGKILLs
//! itself the Nth time (default the first) it reaches the point `NAME`: no
//! destructor, no flush, no log after it — exactly what a crash or an OOM
//! kill leaves behind. With `OUTBOXD_KILL_SIGNAL=STOP` it
//! freezes there instead (SIGSTOP: a stalled VM, a long pause) and goes on
//! where it stopped once the harness sends SIGCONT: a zombie that wakes up
//! after others took over.
//!
//! The points sit in the windows where a crash is hardest to survive:
//!
//! ```text
//!  after-begin       Kafka transaction begun, nothing produced
//!  mid-produce       half the batch handed to librdkafka
//!  after-checkpoint  every record and the checkpoint acknowledged by the broker, not committed
//!  inside-commit     the commit request (EndTxn) sent to the transaction
//!                    coordinator, its answer not yet read
//!  after-commit      Kafka committed, rows not yet marked sent
//!  after-mark        rows marked (polling: not yet committed; replication:
//!                    slot not yet confirmed)
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable the test harness sets.
pub const ENV: &str = "OUTBOXD_KILL_AT";
/// `KILL` (the default) or `STOP`: what the armed point does.
pub const SIGNAL_ENV: &str = "OUTBOXD_KILL_SIGNAL";

/// `OUTBOXD_SLOW_MARKS_MS=N`: every acknowledgement waits N ms before it
/// marks its rows, so committed but unmarked batches pile up in the window
/// (`relay::window`) for a kill to find.
pub const SLOW_MARKS_ENV: &str = "OUTBOXD_SLOW_MARKS_MS";

/// How long each acknowledgement waits first, when `OUTBOXD_SLOW_MARKS_MS`
/// is set.
pub fn mark_delay() -> Option<Duration> {
    static DELAY: OnceLock<Option<Duration>> = OnceLock::new();
    *DELAY.get_or_init(|| {
        let millis: u64 = std::env::var(SLOW_MARKS_ENV).ok()?.parse().ok()?;
        Some(Duration::from_millis(millis))
    })
}

/// Every point's name, for validation and documentation.
pub const POINTS: [&str; 6] = [
    "after-begin",
    "mid-produce",
    "after-checkpoint",
    "inside-commit",
    "after-commit",
    "after-mark",
];

struct Armed {
    point: String,
    nth: u64,
    hits: AtomicU64,
    /// Freeze (SIGSTOP) instead of dying.
    freeze: bool,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var(ENV).ok()?;
            let (point, nth) = match value.split_once(':') {
                Some((point, nth)) => (point.to_string(), nth.parse().unwrap_or(1)),
                None => (value.clone(), 1),
            };
            Some(Armed {
                point,
                nth: nth.max(1),
                hits: AtomicU64::new(0),
                freeze: std::env::var(SIGNAL_ENV).is_ok_and(|signal| signal == "STOP"),
            })
        })
        .as_ref()
}

/// Logs loudly at start-up when a kill point is armed, and refuses names
/// that match no point (a typo would silently test nothing).
pub fn announce() -> Result<(), String> {
    if let Some(delay) = mark_delay() {
        tracing::warn!(
            ?delay,
            "{SLOW_MARKS_ENV} is set: every acknowledgement waits this long before marking its rows \
             (fault-injection testing only)"
        );
    }
    let Some(armed) = armed() else {
        return Ok(());
    };
    if !POINTS.contains(&armed.point.as_str()) {
        return Err(format!(
            "{ENV}={} names no kill point; known points: {}",
            armed.point,
            POINTS.join(", ")
        ));
    }
    tracing::warn!(
        point = %armed.point,
        nth = armed.nth,
        freeze = armed.freeze,
        "{ENV} is set: this relay will kill (or freeze) itself at that point (fault-injection testing only)"
    );
    Ok(())
}

/// Kills the process here if this is the armed point's Nth hit.
pub fn kill_point(point: &str) {
    if should_fire(point) {
        kill_now();
    }
}

/// What librdkafka logs (with its `protocol` debug context on) once it has
/// written the request that ends a transaction to the coordinator's
/// connection. Once the coordinator reads it, it commits whatever the relay
/// does next.
const COMMIT_REQUEST_SENT: &str = "Sent EndTxnRequest";

/// Set on the armed commit: the kill waits for `COMMIT_REQUEST_SENT`.
static KILL_WHEN_COMMIT_REQUEST_SENT: AtomicBool = AtomicBool::new(false);

/// The librdkafka `debug` contexts the producer needs for the armed point:
/// `inside-commit` waits for a line only `protocol` logs.
pub fn librdkafka_debug() -> Option<&'static str> {
    armed()
        .filter(|armed| armed.point == "inside-commit")
        .map(|_| "protocol")
}

/// A commit begins. On the `inside-commit` point's Nth hit, the process is
/// killed once librdkafka reports the commit request sent
/// (`librdkafka_logged`): the coordinator may then commit, and the relay
/// never learns whether it did. A timer cannot aim at that moment: the
/// request leaves only after librdkafka has flushed the batch, however long
/// that takes, and its answer comes a round trip later.
pub fn kill_when_commit_request_sent() {
    if should_fire("inside-commit") {
        KILL_WHEN_COMMIT_REQUEST_SENT.store(true, Ordering::SeqCst);
    }
}

/// Sees every librdkafka log line (`kafka::RelayContext`).
pub fn librdkafka_logged(message: &str) {
    if KILL_WHEN_COMMIT_REQUEST_SENT.load(Ordering::Relaxed)
        && message.contains(COMMIT_REQUEST_SENT)
        // Once: a frozen relay that wakes up goes on.
        && KILL_WHEN_COMMIT_REQUEST_SENT.swap(false, Ordering::SeqCst)
    {
        kill_now();
    }
}

fn should_fire(point: &str) -> bool {
    match armed() {
        Some(armed) if armed.point == point => {
            armed.hits.fetch_add(1, Ordering::SeqCst) + 1 == armed.nth
        }
        _ => false,
    }
}

fn kill_now() {
    if armed().is_some_and(|armed| armed.freeze) {
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGSTOP);
        }
        return;
    }
    // SIGKILL to ourselves: the same as the harness killing us from outside.
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // Unreachable in practice; abort is the next best crash.
    std::process::abort();
}
