//! `outboxd run` over every outbox of the config: one relay per outbox in
//! one process.
//!
//! What each outbox has of its own: its Postgres connections, replication
//! slot and publication, leader lock, Kafka producer (a transactional id is
//! one table's identity, so a shared producer would serialize every table's
//! transactions behind one another and fence them together) and checkpoint
//! identity. What they share: the process, the async runtime, the HTTP
//! endpoint and the log, where each line carries its outbox's name.
//!
//! Invariant: no outbox's failure stops or stalls another. A session that
//! fails retries on its own backoff; a relay that stops on an error stays
//! stopped (`/readyz`, `outboxd_stopped` and the log say which and why)
//! while the others relay on. The process ends when every relay has: on
//! SIGTERM, or when the last of them stopped.

use std::future::Future;
use std::sync::Arc;

use tracing::Instrument;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::setup::Setup;

/// One metrics set per outbox, in the config's order, for [`run`] and
/// the HTTP endpoint.
pub fn metrics_for(setups: &[Setup]) -> Vec<Arc<Metrics>> {
    setups.iter().map(|s| Metrics::new(s.name())).collect()
}

/// Runs every outbox's relay until `shutdown` resolves or each has stopped.
/// Returns the outboxes that stopped on an error, by name.
pub async fn run(
    setups: Vec<Setup>,
    metrics: Vec<Arc<Metrics>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Vec<(String, Error)> {
    let (trigger, stop) = crate::shutdown::channel();
    tokio::spawn(async move {
        shutdown.await;
        trigger.request();
    });
    let several = setups.len() > 1;
    let mut relays = tokio::task::JoinSet::new();
    let mut names = std::collections::HashMap::new();
    for (setup, metrics) in setups.into_iter().zip(metrics) {
        let name = setup.name().to_string();
        let mut stop = stop.clone();
        let relay = crate::relay::run(setup, Arc::clone(&metrics), async move {
            stop.wait().await;
        });
        // One outbox alone logs as it always did; among several, every
        // line (and every task the relay spawns) names its outbox.
        let span = match several {
            true => tracing::info_span!("outbox", outbox = %name),
            false => tracing::Span::none(),
        };
        let for_panic = (name.clone(), Arc::clone(&metrics));
        let task = relays.spawn(
            async move {
                let outcome = relay.await;
                if let Err(error) = &outcome {
                    metrics.set_stopped(&error.to_string());
                    if several {
                        tracing::error!(
                            kind = ?error.kind,
                            "relay of outbox `{name}` stopped: {error}. The other outboxes go \
                             on; fix the cause and restart the process to relay this one again"
                        );
                    }
                }
                (name, outcome)
            }
            .instrument(span),
        );
        names.insert(task.id(), for_panic);
    }
    let mut stopped = Vec::new();
    while let Some(joined) = relays.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(error))) => stopped.push((name, error)),
            Err(panic) => {
                let reason = format!("the relay panicked (a bug; please report it): {panic}");
                let name = match names.get(&panic.id()) {
                    Some((name, metrics)) => {
                        metrics.set_stopped(&reason);
                        name.clone()
                    }
                    None => String::new(),
                };
                tracing::error!("outbox `{name}`: {reason}");
                stopped.push((name, Error::stop(reason)));
            }
        }
    }
    stopped
}
