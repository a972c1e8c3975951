//! Topic administration: the compacted checkpoint topic, and which topics exist.
//!
//! Invariant: the checkpoint topic is compacted, so it keeps each relay's
//! latest checkpoint forever and start-up reads stay short.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;

use super::RelayContext;
use crate::config::Config;
use crate::error::{Error, Result};

const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

pub fn admin_client(config: &Config) -> Result<AdminClient<RelayContext>> {
    super::base_client_config(config)
        .create_with_context(RelayContext)
        .map_err(|e| {
            Error::stop(format!(
                "cannot create a Kafka admin client from the config: {e}"
            ))
        })
}

/// Creates the checkpoint topic when missing: one partition (each relay's
/// key lands in it anyway), compacted, the broker's default replication.
pub async fn ensure_checkpoint_topic(config: &Config) -> Result<()> {
    let admin = admin_client(config)?;
    let topic = &config.kafka.checkpoint_topic;
    let new_topic =
        NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
    let options = AdminOptions::new()
        .operation_timeout(Some(ADMIN_TIMEOUT))
        .request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .create_topics([&new_topic], &options)
        .await
        .map_err(|e| Error::retry(format!("creating checkpoint topic `{topic}`: {e}")))?;
    for result in results {
        match result {
            Ok(_) => tracing::info!(topic = %topic, "created compacted checkpoint topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code @ RDKafkaErrorCode::TopicAuthorizationFailed))
            | Err((_, code @ RDKafkaErrorCode::ClusterAuthorizationFailed)) => {
                return Err(Error::stop(format!(
                    "cannot create checkpoint topic `{topic}` ({code}); create it yourself with \
                     cleanup.policy=compact, or grant the relay CREATE on it"
                )))
            }
            Err((_, code)) => {
                return Err(Error::retry(format!(
                    "creating checkpoint topic `{topic}`: {code}"
                )))
            }
        }
    }
    Ok(())
}

/// What the broker says about a topic, for `outboxd check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicState {
    Exists { partitions: usize },
    Missing,
}

/// Looks each topic up in one metadata request.
pub async fn describe_topics(
    config: &Config,
    topics: &[String],
) -> Result<Vec<(String, TopicState)>> {
    let admin = admin_client(config)?;
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        let metadata = admin
            .inner()
            .fetch_metadata(None, ADMIN_TIMEOUT)
            .map_err(|e| {
                Error::retry(format!("cannot reach Kafka at the bootstrap servers: {e}"))
            })?;
        Ok(topics
            .into_iter()
            .map(|name| {
                let state = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == name && t.error().is_none())
                    .map_or(TopicState::Missing, |t| TopicState::Exists {
                        partitions: t.partitions().len(),
                    });
                (name, state)
            })
            .collect())
    })
    .await
    .map_err(|e| Error::stop(format!("metadata task failed: {e}")))?
}

/// The topic's `cleanup.policy`, or `None` when the broker would not say.
pub async fn cleanup_policy(config: &Config, topic: &str) -> Result<Option<String>> {
    let admin = admin_client(config)?;
    let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &options)
        .await
        .map_err(|e| Error::retry(format!("describing topic `{topic}`: {e}")))?;
    Ok(results.into_iter().flatten().find_map(|resource| {
        resource
            .get("cleanup.policy")
            .and_then(|entry| entry.value.clone())
    }))
}

/// Whether the broker creates topics on first use (`auto.create.topics.enable`).
pub async fn broker_auto_creates_topics(config: &Config) -> Result<Option<bool>> {
    let admin = Arc::new(admin_client(config)?);
    let metadata_admin = Arc::clone(&admin);
    let broker_id = tokio::task::spawn_blocking(move || {
        metadata_admin
            .inner()
            .fetch_metadata(None, ADMIN_TIMEOUT)
            .map(|metadata| metadata.brokers().first().map(|broker| broker.id()))
    })
    .await
    .map_err(|e| Error::stop(format!("metadata task failed: {e}")))?
    .map_err(|e| Error::retry(format!("cannot reach Kafka at the bootstrap servers: {e}")))?;
    let Some(broker_id) = broker_id else {
        return Ok(None);
    };
    let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .describe_configs([&ResourceSpecifier::Broker(broker_id)], &options)
        .await
        .map_err(|e| Error::retry(format!("describing broker {broker_id}: {e}")))?;
    Ok(results
        .into_iter()
        .flatten()
        .find_map(|resource| {
            resource
                .get("auto.create.topics.enable")
                .and_then(|entry| entry.value.clone())
        })
        .map(|value| value == "true"))
}
