//! Topic administration: the compacted checkpoint topic, and which topics exist.
//!
//! Invariant: the checkpoint topic is compacted, so it keeps each table's
//! latest checkpoint forever (start-up reads that one record at the offset
//! its checkpoint group names), and it is created replicated like any
//! topic a production cluster must not lose: replication factor 3 where
//! the cluster has three brokers, `min.insync.replicas` 2.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;

use super::off_runtime::DropOffRuntime;
use super::RelayContext;
use crate::config::{Config, CreateTopics};
use crate::error::{Error, Result};

const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

/// An admin client, shared with the blocking tasks that fetch metadata and
/// destroyed off the async workers (`off_runtime`).
pub type Admin = Arc<DropOffRuntime<AdminClient<RelayContext>>>;

pub fn admin_client(config: &Config) -> Result<Admin> {
    super::base_client_config(config)
        .create_with_context(RelayContext)
        .map(|client| Arc::new(DropOffRuntime::new(client)))
        .map_err(|e| {
            Error::stop(format!(
                "cannot create a Kafka admin client from the config: {e}"
            ))
        })
}

/// Settings of a created checkpoint topic. Every relay of the cluster writes
/// one record per Kafka transaction to it, so without them its uncompacted
/// active segment grows to a gigabyte of everyone's checkpoints: short
/// segments and an eager cleaner keep it to about one record per table.
const CHECKPOINT_TOPIC_CONFIGS: [(&str, &str); 5] = [
    ("cleanup.policy", "compact"),
    // Roll the active segment (which is never compacted) every 10 minutes
    // or 16 MiB, whichever comes first.
    ("segment.ms", "600000"),
    ("segment.bytes", "16777216"),
    // Compact once a tenth of the log is superseded records.
    ("min.cleanable.dirty.ratio", "0.1"),
    // ... and at the latest an hour after a record was superseded.
    ("max.compaction.lag.ms", "3600000"),
];

/// Creates the checkpoint topic when missing: one partition (every
/// checkpoint is written to partition 0), compacted, replicated three times
/// with `min.insync.replicas` 2 where the cluster has three brokers or more
/// (a smaller cluster gets one replica per broker and `min.insync.replicas` 1).
pub async fn ensure_checkpoint_topic(config: &Config) -> Result<()> {
    let admin = admin_client(config)?;
    let topic = &config.kafka.checkpoint_topic;
    // One metadata request says both whether the topic is there (then
    // nothing is asked of the controller) and how many brokers can hold it.
    let (brokers, exists) = match cluster_shape(Arc::clone(&admin), topic).await {
        Ok(shape) => shape,
        Err(error) => return Err(with_librdkafka_causes(config, error).await),
    };
    if exists {
        return Ok(());
    }
    let replication_factor = brokers.clamp(1, 3) as i32;
    let min_insync = if replication_factor >= 3 { "2" } else { "1" };
    let mut new_topic = NewTopic::new(topic, 1, TopicReplication::Fixed(replication_factor))
        .set("min.insync.replicas", min_insync);
    for (key, value) in CHECKPOINT_TOPIC_CONFIGS {
        new_topic = new_topic.set(key, value);
    }
    let options = AdminOptions::new()
        .operation_timeout(Some(ADMIN_TIMEOUT))
        .request_timeout(Some(ADMIN_TIMEOUT));
    let results = match admin.create_topics([&new_topic], &options).await {
        Ok(results) => results,
        Err(e) => {
            let error = Error::retry(format!("creating checkpoint topic `{topic}`: {e}"));
            return Err(with_librdkafka_causes(config, error).await);
        }
    };
    for result in results {
        match result {
            Ok(_) => tracing::info!(
                topic = %topic,
                replication_factor,
                min_insync_replicas = min_insync,
                "created the compacted checkpoint topic"
            ),
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

/// `error` with librdkafka's own words on why the cluster cannot be reached
/// (a SASL authentication error, a TLS failure), where it has any.
async fn with_librdkafka_causes(config: &Config, error: Error) -> Error {
    let causes = super::probe::connection_errors(config).await;
    if causes.is_empty() {
        return error;
    }
    Error {
        message: format!(
            "{}; librdkafka says: {}. Check kafka.bootstrap_servers and, for TLS and SASL, \
             kafka.properties",
            error.message,
            causes.join("; ")
        ),
        ..error
    }
}

/// How many brokers the cluster has.
pub async fn broker_count(config: &Config) -> Result<usize> {
    let (brokers, _) = cluster_shape(admin_client(config)?, "").await?;
    Ok(brokers)
}

/// How many brokers the cluster has, and whether `topic` exists.
async fn cluster_shape(admin: Admin, topic: &str) -> Result<(usize, bool)> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(None, ADMIN_TIMEOUT))
        .await
        .map_err(|e| Error::stop(format!("metadata task failed: {e}")))?
        .map(|metadata| {
            let exists = metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none());
            (metadata.brokers().len(), exists)
        })
        .map_err(|e| Error::retry(format!("cannot reach Kafka at the bootstrap servers: {e}")))
}

/// Which of `topics` do not exist. Asks for each topic by name, so a
/// broker with `auto.create.topics.enable` creates it on the spot, as it
/// would on the first produce; one being created (no leader yet) counts as
/// existing, since the produce waits for its leader.
pub async fn missing_among(admin: Admin, topics: Vec<String>) -> Result<Vec<String>> {
    tokio::task::spawn_blocking(move || {
        let mut missing = Vec::new();
        for topic in topics {
            let metadata = admin
                .inner()
                .fetch_metadata(Some(&topic), ADMIN_TIMEOUT)
                .map_err(|e| {
                    Error::retry(format!("asking Kafka whether topic `{topic}` exists: {e}"))
                })?;
            let unknown = metadata.topics().iter().any(|t| {
                t.name() == topic
                    && t.error().is_some_and(|code| {
                        RDKafkaErrorCode::from(code) == RDKafkaErrorCode::UnknownTopicOrPartition
                    })
            });
            if unknown {
                missing.push(topic);
            }
        }
        Ok(missing)
    })
    .await
    .map_err(|e| Error::stop(format!("metadata task failed: {e}")))?
}

/// Creates the event topic `topic` as `routing.create_topics` says. Another
/// relay or an operator creating it first is success.
pub async fn create_event_topic(
    admin: &AdminClient<RelayContext>,
    settings: &CreateTopics,
    topic: &str,
) -> std::result::Result<(), String> {
    // -1: the broker's default (KIP-464).
    let replication = TopicReplication::Fixed(settings.replication_factor.unwrap_or(-1));
    let mut new_topic = NewTopic::new(topic, settings.partitions.unwrap_or(-1), replication);
    for (key, value) in &settings.configs {
        new_topic = new_topic.set(key, value);
    }
    let options = AdminOptions::new()
        .operation_timeout(Some(ADMIN_TIMEOUT))
        .request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .create_topics([&new_topic], &options)
        .await
        .map_err(|e| e.to_string())?;
    match results.into_iter().next() {
        Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(()),
        Some(Err((_, code @ RDKafkaErrorCode::TopicAuthorizationFailed)))
        | Some(Err((_, code @ RDKafkaErrorCode::ClusterAuthorizationFailed))) => Err(format!(
            "{code}: grant the relay's principal CREATE on the topic or the cluster, or create it yourself"
        )),
        Some(Err((_, code))) => Err(code.to_string()),
        None => Err("the broker gave no result".into()),
    }
}

/// What the broker says about a topic, for `outboxd check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicState {
    Exists {
        partitions: usize,
        /// Replicas of its first partition.
        replication_factor: usize,
    },
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
                        replication_factor: t
                            .partitions()
                            .first()
                            .map_or(0, |p| p.replicas().len()),
                    });
                (name, state)
            })
            .collect())
    })
    .await
    .map_err(|e| Error::stop(format!("metadata task failed: {e}")))?
}

/// The topic's value of each of `keys` (`None` where the broker would not say).
pub async fn topic_configs(
    config: &Config,
    topic: &str,
    keys: &[&str],
) -> Result<Vec<Option<String>>> {
    let admin = admin_client(config)?;
    let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &options)
        .await
        .map_err(|e| Error::retry(format!("describing topic `{topic}`: {e}")))?;
    let resource = results.into_iter().flatten().next();
    Ok(keys
        .iter()
        .map(|key| {
            resource
                .as_ref()
                .and_then(|resource| resource.get(key))
                .and_then(|entry| entry.value.clone())
        })
        .collect())
}

/// Whether the broker creates topics on first use (`auto.create.topics.enable`).
pub async fn broker_auto_creates_topics(config: &Config) -> Result<Option<bool>> {
    let admin = admin_client(config)?;
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
