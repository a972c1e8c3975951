//! Everything that talks to Kafka: the transactional publisher, the
//! checkpoint record, and how librdkafka errors map to what we do next.
//!
//! Invariant: every client is configured here, from one place, so the
//! settings exactly-once depends on (`transactional.id`, idempotence,
//! `read_committed`) cannot be overridden by a pass-through property.

pub mod checkpoint;
pub mod checkpoint_scan;
pub(crate) mod deliveries;
pub mod errors;
pub mod identity;
pub mod off_runtime;
pub mod probe;
pub mod publisher;
pub mod topics;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::Config;

/// Properties outboxd owns; a user setting one is a config error.
const MANAGED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "transactional.id",
    "enable.idempotence",
    "transaction.timeout.ms",
    "isolation.level",
    "enable.auto.commit",
    "group.id",
    "enable.partition.eof",
];

pub fn is_managed_property(key: &str) -> bool {
    MANAGED_PROPERTIES.contains(&key)
}

/// Settings every client shares: servers, TLS/SASL pass-through, log routing.
pub fn base_client_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.bootstrap_servers);
    client.set("client.id", format!("outboxd-{}", config.relay.name));
    for (key, value) in &config.kafka.properties {
        client.set(key, value);
    }
    client
}

/// The context of every client we create: librdkafka's global errors reach
/// our logs as warnings that say what librdkafka does about them, and the
/// end of a partition, which the checkpoint reader asks for, is not an error.
#[derive(Clone, Copy, Default)]
pub struct RelayContext;

impl ClientContext for RelayContext {
    /// What rdkafka does by default (each line to `tracing`, target
    /// `librdkafka`), after the `inside-commit` kill point has seen it.
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        crate::failpoint::librdkafka_logged(message);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {facility} {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", "librdkafka: {facility} {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {facility} {message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            return;
        }
        tracing::warn!(%error, reason, "Kafka client error; librdkafka reconnects and retries by itself");
    }
}

impl ConsumerContext for RelayContext {}
