//! Taking a table over: fence every earlier leader, read the table's latest
//! checkpoint, and mark its rows before anything new is published.
//!
//! Invariant: when `take_over` returns, no earlier leader of the table (any
//! `relay.name`, any version) can still commit a Kafka transaction or holds
//! a claim, and every row that any of them committed to Kafka is
//! acknowledged in Postgres. So what the session then captures and
//! publishes was never published before (replication also skips replayed
//! events up to the returned checkpoint's position).

use sqlx::PgConnection;

use super::session::Context;
use crate::error::Result;
use crate::kafka::checkpoint::{self, Checkpoint};
use crate::kafka::checkpoint_scan;
use crate::kafka::identity::TableIdentity;
use crate::kafka::publisher::{PublishError, Publisher};
use crate::leader;
use crate::shutdown::Shutdown;

/// What the session publishes with, after the takeover.
pub(super) struct TakenOver {
    /// Connected with the table's `transactional.id`: every earlier leader is fenced.
    pub publisher: Publisher,
    /// The table's latest committed checkpoint, its rows acknowledged.
    pub latest: Checkpoint,
}

/// Returns `None` if shutdown was requested while it waited.
pub(super) async fn take_over(
    context: &Context,
    connection: &mut PgConnection,
    source: Option<&str>,
    stop: &Shutdown,
) -> Result<Option<TakenOver>> {
    let config = &context.config;
    let identity = TableIdentity::new(source, &context.table_name, &config.relay.name);
    if !identity.names_the_database {
        tracing::warn!(
            transactional_id = %identity.transactional_id,
            "the relay's Kafka identity uses relay.name instead of the database's system \
             identifier; keep relay.name unchanged for this table, or a relay under a new name \
             could not fence the old one"
        );
    }
    let publisher = Publisher::connect(config, &identity).await?;
    // Fenced: an earlier leader's open claims end with its session; claim
    // nothing around them (see `leader`).
    let mut stop = stop.clone();
    if !leader::wait_for_earlier_claims(connection, &context.table_name, &mut stop).await? {
        return Ok(None);
    }
    let latest = match checkpoint::read_latest(config, &identity).await? {
        Some(latest) => latest,
        None => find_by_scanning(context, connection, source, &identity, &publisher).await?,
    };
    let done = context.acknowledger.reconcile(connection, &latest).await?;
    tracing::info!(
        checkpoint_key = %identity.checkpoint_key,
        checkpoint_published = latest.published.len(),
        checkpoint_dead_lettered = latest.dead_lettered.len(),
        checkpoint_position = latest.position.map(|p| p.to_string()),
        newly_acknowledged = done.published + done.dead_lettered,
        "reconciled the outbox with the table's latest committed checkpoint"
    );
    Ok(Some(TakenOver { publisher, latest }))
}

/// The table's checkpoint group has no offset: this version has not written
/// a checkpoint for the table yet (a first start, or the first after
/// upgrading from 0.1), or the broker expired the group's offset after
/// `offsets.retention.minutes` without a transaction. Scans the topic (once:
/// see `kafka::checkpoint_scan`), acknowledges what the checkpoints found
/// name, and writes the latest as the table's checkpoint, so the next start
/// reads it directly.
async fn find_by_scanning(
    context: &Context,
    connection: &mut PgConnection,
    source: Option<&str>,
    identity: &TableIdentity,
    publisher: &Publisher,
) -> Result<Checkpoint> {
    tracing::info!(
        topic = %context.config.kafka.checkpoint_topic,
        checkpoint_group = %identity.checkpoint_group,
        "the table's checkpoint group has no offset (first start, first start after upgrading \
         from 0.1, or offsets expired by the broker's offsets.retention.minutes): scanning the \
         checkpoint topic once; this waits for other relays' open transactions on it"
    );
    let origin = source.map(|source| (context.table_name.as_str(), source));
    let found = checkpoint_scan::read(&context.config, &identity.checkpoint_key, origin).await?;
    for (previous_relay, checkpoint) in &found.predecessors {
        // Marking is idempotent: rows of a checkpoint that were marked long
        // ago are simply marked again.
        let done = context
            .acknowledger
            .reconcile(connection, checkpoint)
            .await?;
        if done.published + done.dead_lettered > 0 {
            tracing::warn!(
                previous_relay = %previous_relay,
                newly_acknowledged = done.published + done.dead_lettered,
                "acknowledged rows another relay published to Kafka but did not mark: this \
                 table was relayed under another relay.name before"
            );
        }
    }
    if let Some(own) = &found.own {
        // 0.1's own: when the table's checkpoint exists too, this one is
        // older, but its rows were never marked if the upgrade followed a crash.
        context.acknowledger.reconcile(connection, own).await?;
    }
    let first = found
        .table
        .or(found.own)
        .unwrap_or_else(|| Checkpoint::new(&context.table_name, source, &[], &[], None));
    // Its rows are acknowledged before it becomes the table's checkpoint, so
    // a crash in between only repeats this scan.
    context.acknowledger.reconcile(connection, &first).await?;
    match publisher.publish(&[], &first).await {
        Ok(()) => Ok(first),
        Err(PublishError::Failed(error)) => Err(error),
        Err(PublishError::RecordRejected { reason, .. }) => Err(crate::error::Error::stop(
            format!("the first checkpoint of this table was rejected by Kafka: {reason}"),
        )),
    }
}
