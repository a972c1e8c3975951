//! Waiting for a batch's schemas: the registry asked, and asked again with
//! backoff, until it gives every subject the batch needs.
//!
//! Invariant: a batch is routed only with all its schemas in hand, so a
//! registry that is down, refusing, or missing a subject holds the batch
//! (and every row behind it) back; it never makes a row poison. While it
//! waits, the log, `outboxd_schema_registry_unavailable` and `/readyz` say
//! why.

use std::time::{Duration, Instant};

use crate::event::OutboxEvent;
use crate::metrics::Metrics;
use crate::registry::Schemas;
use crate::routing::Router;
use crate::shutdown::Shutdown;

/// How often the same registry error is logged again while it lasts.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// The schemas of `events`, once the registry gives them; `None` if
/// shutdown was requested first.
pub(super) async fn wait_for_schemas(
    router: &Router,
    events: &[OutboxEvent],
    metrics: &Metrics,
    stop: &mut Shutdown,
) -> Option<Schemas> {
    if router.registry().is_none() {
        return Some(Schemas::new());
    }
    let mut backoff = super::new_backoff();
    let mut last_report: Option<(Instant, String)> = None;
    loop {
        match router.resolve_schemas(events).await {
            Ok(schemas) => {
                if last_report.is_some() {
                    tracing::info!(
                        "the schema registry answers again; relaying the rows that waited"
                    );
                    metrics.set_registry_unavailable(None);
                }
                return Some(schemas);
            }
            Err(error) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                metrics.set_registry_unavailable(Some(&error.0));
                let repeat = last_report
                    .as_ref()
                    .is_some_and(|(at, said)| *said == error.0 && at.elapsed() < REPORT_EVERY);
                if !repeat {
                    tracing::warn!(
                        %error,
                        rows = events.len(),
                        retry_in = ?delay,
                        "cannot get the schemas of a batch from the schema registry: holding it \
                         (its rows are not poison) and retrying"
                    );
                    last_report = Some((Instant::now(), error.0));
                }
                if stop.requested_within(delay).await {
                    // Nothing waits any more: this leader is stopping.
                    metrics.set_registry_unavailable(None);
                    return None;
                }
            }
        }
    }
}
