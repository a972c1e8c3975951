//! Why the cluster cannot be reached, in librdkafka's own words: a wrong
//! SASL password or TLS certificate otherwise shows only as a timed-out
//! request or "broker transport failure".
//!
//! Invariant: the probe never produces or consumes; it only connects with
//! the relay's own client settings and reports what librdkafka said.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};

use crate::config::Config;

/// How long the probe below waits for the cluster to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why librdkafka cannot reach the cluster, in its own words (`SASL
/// authentication error: …`, `SSL handshake failed: …`), where a metadata
/// request only says "broker transport failure". Empty once the cluster
/// answers. A client with the relay's settings that never produces.
pub async fn connection_errors(config: &Config) -> Vec<String> {
    let client: BaseProducer<ErrorRecorder> =
        match super::base_client_config(config).create_with_context(ErrorRecorder::default()) {
            Ok(client) => client,
            // describe_topics reports the config error.
            Err(_) => return Vec::new(),
        };
    tokio::task::spawn_blocking(move || {
        if client.client().fetch_metadata(None, PROBE_TIMEOUT).is_ok() {
            return Vec::new();
        }
        // Errors arrive as events on the client's queue; each poll serves one.
        for _ in 0..100 {
            client.poll(Duration::ZERO);
        }
        client.context().errors()
    })
    .await
    .unwrap_or_default()
}

/// Keeps the distinct errors librdkafka reports, in order.
#[derive(Default)]
struct ErrorRecorder {
    errors: Mutex<Vec<String>>,
}

impl ErrorRecorder {
    fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl ClientContext for ErrorRecorder {
    fn error(&self, error: KafkaError, reason: &str) {
        let text = if reason.is_empty() {
            error.to_string()
        } else {
            // Without librdkafka's timings, so repeats read the same.
            reason
                .split(" (after ")
                .next()
                .unwrap_or(reason)
                .to_string()
        };
        if let Ok(mut errors) = self.errors.lock() {
            if !errors.contains(&text) {
                errors.push(text);
            }
        }
    }
}

impl ProducerContext for ErrorRecorder {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}
