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
use crate::kafka::checkpoint::{self, Checkpoint, CHECKPOINT_PARTITION};
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
    let mut found = find_checkpoints(context, connection, source, &identity).await?;
    let earlier = fence_earlier_identities(context, connection, &identity, &found).await?;
    found.same_database.extend(earlier);
    for (key, other) in &found.same_database {
        // Judged before anything is marked, by the rows being here at all
        // (marked or not): a refusal that marked them first would find
        // nothing to mark on the next start, and let it drain every row
        // that identity published unmarked.
        if let Some(from) = other.unmarked_from {
            if context
                .acknowledger
                .names_rows_here(connection, other)
                .await?
            {
                return Err(unmarked_under_another_identity(key, from));
            }
        }
        let done = context
            .acknowledger
            .reconcile_if_renamed(connection, other)
            .await?;
        if let (Some(from), true) = (other.unmarked_from, done.published + done.dead_lettered > 0) {
            return Err(unmarked_under_another_identity(key, from));
        }
        if done.published + done.dead_lettered > 0 {
            tracing::warn!(
                previous_table = %other.table,
                table = %context.table_name,
                newly_acknowledged = done.published + done.dead_lettered,
                "a checkpoint written under another identity names rows of this table by their seq \
                 and event id: the table was renamed, moved to another server or pg_upgraded, or \
                 the pg_control_system() grant was taken away, while rows were in Kafka but not \
                 marked sent; marked them instead of publishing them again"
            );
        }
    }
    // How far this table's own checkpoints say rows were published
    // unmarked: an unmarked checkpoint found elsewhere at or before it
    // (the earlier topic of a move this relay adopted) is covered by it.
    let own_unmarked_through = found
        .candidates
        .iter()
        .filter(|c| c.ours && c.checkpoint.unmarked_from.is_some())
        .map(|c| c.checkpoint.position)
        .max();
    let mut latest = None;
    for candidate in found.candidates {
        // Rows published unmarked stay unmarked: the stream skips them by
        // the checkpoint's position (`relay::replication::unmarked`).
        if candidate.ours && candidate.checkpoint.unmarked_from.is_some() {
            latest = Some(candidate.checkpoint);
            continue;
        }
        if let (false, Some(from)) = (candidate.ours, candidate.checkpoint.unmarked_from) {
            if own_unmarked_through.is_some_and(|own| own >= candidate.checkpoint.position) {
                continue;
            }
            // Refused before anything is marked: a refusal after marking
            // its rows found nothing to mark on the next start, which then
            // took the table for never relayed and published every unmarked
            // row again.
            return Err(unmarked_under_another_identity(&candidate.written_by, from));
        }
        // Marking is idempotent: rows of a checkpoint that were marked long
        // ago are simply marked again. Rows are matched by event id where
        // the checkpoint names them so, which keeps a checkpoint of another
        // database (a same-named relay) from marking anything here.
        let done = context
            .acknowledger
            .reconcile(connection, &candidate.checkpoint)
            .await?;
        if let (false, Some(from), true) = (
            candidate.ours,
            candidate.checkpoint.unmarked_from,
            done.published + done.dead_lettered > 0,
        ) {
            return Err(unmarked_under_another_identity(&candidate.written_by, from));
        }
        tracing::info!(
            written_by = %candidate.written_by,
            checkpoint_published = candidate.checkpoint.published.len(),
            checkpoint_dead_lettered = candidate.checkpoint.dead_lettered.len(),
            checkpoint_position = candidate.checkpoint.position.map(|p| p.to_string()),
            newly_acknowledged = done.published + done.dead_lettered,
            "reconciled the outbox with a committed checkpoint"
        );
        // Only the table's own checkpoint says where this relay's stream
        // stands. Another identity's position is never taken over: what
        // that relay published is marked now, and replication publishes a
        // replayed row only while the table shows it unsent.
        if candidate.ours {
            latest = Some(candidate.checkpoint);
        }
    }
    let mut latest =
        latest.unwrap_or_else(|| Checkpoint::new(&context.table_name, source, &[], &[], None));
    latest.table = context.table_name.clone();
    latest.source = source.map(str::to_string);
    // Every row it names is acknowledged before it becomes the table's
    // checkpoint, so a crash in between only repeats this takeover.
    match publisher.hand_over(&latest, &found.legacy_keys).await {
        Ok(()) => {}
        Err(PublishError::Failed(error)) => return Err(error),
        Err(PublishError::RecordRejected { reason, .. }) => {
            return Err(crate::error::Error::stop(format!(
                "the takeover's checkpoint was rejected by Kafka: {reason}"
            )))
        }
    }
    tracing::info!(
        checkpoint_key = %identity.checkpoint_key,
        checkpoint_published = latest.published.len(),
        checkpoint_position = latest.position.map(|p| p.to_string()),
        "took the table over from its latest committed checkpoint"
    );
    Ok(Some(TakenOver { publisher, latest }))
}

/// A checkpoint of another identity that names rows of this table says
/// they were published unmarked: under this identity nothing tells the
/// rows it published after them from unsent ones.
fn unmarked_under_another_identity(
    written_by: &str,
    unmarked_from: crate::postgres::lsn::Lsn,
) -> crate::error::Error {
    crate::error::Error::stop(format!(
        "rows of this table were published without marks (relay.after_publish: none, from \
         {unmarked_from} on) under another Kafka identity, {written_by}: the table was renamed, \
         its database renamed or moved to another cluster since. Under this identity the relay \
         finds no position to resume from, and nothing in the table tells the rows that \
         identity published from unsent ones, so it would publish them again. Put the table \
         back under its old name and database, or, to start over knowingly, mark the rows \
         already in Kafka sent (UPDATE … SET sent_at = now()) and use a new checkpoint topic. If \
         kafka.checkpoint_topic was changed, name the earlier topic in \
         kafka.previous_checkpoint_topic instead"
    ))
}

/// Another identity wrote checkpoints naming this table's name: at a first
/// start under a new identity (the `pg_control_system()` grant taken away,
/// a new system identifier after `pg_upgrade` or a move, a new `relay.name`
/// without the grant), anywhere on the topic; at a later start, after our
/// latest checkpoint (an identity this table had and came back from: a
/// grant given and taken away again, `relay.name` changed and changed
/// back). Fences each one shown to be this table's, so an instance still
/// running under it (its Postgres sessions gone, its producer not) can no
/// longer commit, then reads what each last committed, for the caller to
/// reconcile by seq and event id.
///
/// This table's: its checkpoint names a row here by seq and event id; or,
/// at the first start of a relay that cannot name its database (no
/// `pg_control_system()` grant, so a revoked grant looks like this), it
/// names this table in a database of this name. The second rule matters
/// where the earlier identity's rows are all gone (`after_publish: delete`,
/// retention) or it never wrote row ids (a first transaction): reconciling
/// needs nothing then, but an instance of it still running must be fenced.
/// It may fence a same-named database's relay on another server once, which
/// costs that relay a session restart, never an event. A relay that names
/// its database fences by rows only: a same-named database elsewhere is
/// another table. Other identities are left alone: they are live relays of
/// their own tables, here or in another database.
async fn fence_earlier_identities(
    context: &Context,
    connection: &mut PgConnection,
    identity: &TableIdentity,
    found: &Found,
) -> Result<Vec<(String, Checkpoint)>> {
    let config = &context.config;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *connection)
        .await
        .map_err(|e| crate::error::Error::from_postgres("reading the database's name", e))?;
    let mut earlier_identities: Vec<TableIdentity> = Vec::new();
    for (key, checkpoint) in &found.same_database {
        if *key == identity.checkpoint_key {
            continue;
        }
        let named_here = found.whole_topic
            && !identity.names_the_database
            && checkpoint.table == context.table_name
            && checkpoint
                .source
                .as_deref()
                .and_then(|source| source.split_once('/'))
                .is_some_and(|(_, name)| name == database);
        let ours = named_here
            || context
                .acknowledger
                .names_rows_here(connection, checkpoint)
                .await?;
        let earlier = TableIdentity::from_checkpoint_key(key);
        if ours && !earlier_identities.contains(&earlier) {
            earlier_identities.push(earlier);
        }
    }
    let mut latest = Vec::new();
    for earlier in earlier_identities {
        Publisher::fence_transactional_id(config, &earlier.transactional_id).await?;
        tracing::warn!(
            previous_identity = %earlier.checkpoint_key,
            identity = %identity.checkpoint_key,
            "this table was relayed under another identity before (the pg_control_system() \
             grant was given or taken away, relay.name changed without it, or the system \
             identifier changed): fenced it, so an instance still running under it cannot \
             publish again, and marking what it published"
        );
        // Fenced: its latest committed checkpoint can no longer change.
        if let Some(found) = checkpoint::read_latest(config, &earlier).await? {
            latest.push((earlier.checkpoint_key.clone(), found.checkpoint));
        }
    }
    Ok(latest)
}

/// A committed checkpoint of the table, whoever wrote it.
struct Candidate {
    /// Who wrote it, for the log.
    written_by: String,
    /// Written under the table's own identity: its position is where this
    /// relay's stream stands.
    ours: bool,
    checkpoint: Checkpoint,
}

/// What a takeover reconciles and whom it hands over from.
struct Found {
    candidates: Vec<Candidate>,
    /// Checkpoints of this table's possible earlier identities, with their
    /// keys: reconciled by seq and event id alone.
    same_database: Vec<(String, Checkpoint)>,
    /// Whether the checkpoint topic was scanned from its beginning (a first
    /// start under this identity), not only after our latest checkpoint.
    whole_topic: bool,
    /// Keys (and partitions) to write a hand-over marker under: this relay's
    /// `relay.name` and every legacy relay found.
    legacy_keys: Vec<(String, i32)>,
}

/// Every identity a predecessor of this table can have had, fenced and
/// read, every takeover: the table's (already fenced by the publisher), its
/// `relay.name` stand-in (`TableIdentity::alternates`), and the keys of
/// releases from before table-keyed checkpoints (`kafka::checkpoint_scan`).
async fn find_checkpoints(
    context: &Context,
    connection: &mut PgConnection,
    source: Option<&str>,
    identity: &TableIdentity,
) -> Result<Found> {
    let config = &context.config;
    let mut candidates = Vec::new();
    let mut own = checkpoint::read_latest(config, identity).await?;
    if own.is_none() {
        own = checkpoint_on_another_topic(config, identity).await?;
    }
    // Whatever any predecessor committed after the table's own latest
    // checkpoint lies after it on the topic; without one, anywhere.
    let start = match &own {
        Some(own) => checkpoint_scan::Start::After(own.offset),
        None => {
            tracing::info!(
                topic = %config.kafka.checkpoint_topic,
                checkpoint_group = %identity.checkpoint_group,
                "the table's checkpoint group has no offset (first start, first start after \
                 upgrading, a new identity, or offsets expired by the broker's \
                 offsets.retention.minutes): scanning the checkpoint topic once; this waits for \
                 other relays' open transactions on it"
            );
            checkpoint_scan::Start::Beginning
        }
    };
    let own_offset = own.as_ref().map(|own| own.offset);
    let own_from_previous_topic = own.as_ref().is_some_and(|own| own.offset == -1);
    if let Some(own) = own {
        candidates.push(Candidate {
            written_by: format!("this table's identity `{}`", identity.checkpoint_key),
            ours: true,
            checkpoint: own.checkpoint,
        });
    }
    for (topic, earlier) in checkpoint::read_latest_elsewhere(config, identity).await? {
        if own_from_previous_topic
            && config.kafka.previous_checkpoint_topic.as_deref() == Some(topic.as_str())
        {
            continue; // adopted above
        }
        tracing::warn!(
            earlier_checkpoint_topic = %topic,
            checkpoint_topic = %config.kafka.checkpoint_topic,
            published = earlier.checkpoint.published.len(),
            "this table's checkpoints were on another topic before kafka.checkpoint_topic changed: \
             marking what the last of them names before publishing anything"
        );
        candidates.push(Candidate {
            written_by: format!("this table's identity on the earlier topic `{topic}`"),
            ours: false,
            checkpoint: earlier.checkpoint,
        });
    }
    let mut stand_in_keys = Vec::new();
    for alternate in identity.alternates(&context.table_name, &config.relay.name) {
        stand_in_keys.push(alternate.checkpoint_key.clone());
        if !checkpoint::has_checkpoint(config, &alternate).await? {
            continue;
        }
        Publisher::fence_transactional_id(config, &alternate.transactional_id).await?;
        if let Some(found) = checkpoint::read_latest(config, &alternate).await? {
            if own_offset.is_some_and(|own| found.offset < own) {
                // A takeover under this identity came later, and reconciled
                // it then; marking by its seqs again could only hit rows
                // that reuse them.
                continue;
            }
            tracing::warn!(
                previous_identity = %alternate.checkpoint_key,
                identity = %identity.checkpoint_key,
                "this table was relayed under another identity before (the role could not read \
                 pg_control_system() then): fenced it and adopting what it published"
            );
            candidates.push(Candidate {
                written_by: format!("the earlier identity `{}`", alternate.checkpoint_key),
                ours: false,
                checkpoint: found.checkpoint,
            });
        }
    }
    let origin = checkpoint_scan::Origin {
        table_key: identity.checkpoint_key.clone(),
        table: context.table_name.clone(),
        source: source.map(str::to_string),
        stand_in_keys,
    };
    let scanned = match start {
        checkpoint_scan::Start::After(after) => {
            let peek = checkpoint_scan::peek_tail(config, &origin, after).await?;
            let mut names_this_table = false;
            for (_, checkpoint) in &peek.same_database {
                if context
                    .acknowledger
                    .names_rows_here(connection, checkpoint)
                    .await?
                {
                    names_this_table = true;
                    break;
                }
            }
            if peek.legacy.is_empty() && !names_this_table {
                checkpoint_scan::Found::default()
            } else {
                checkpoint_scan::read(config, &origin, start, Some(peek)).await?
            }
        }
        checkpoint_scan::Start::Beginning => {
            checkpoint_scan::read(config, &origin, start, None).await?
        }
    };
    if let Some((_, checkpoint)) = scanned.table {
        candidates.push(Candidate {
            written_by: format!("this table's identity `{}`", identity.checkpoint_key),
            ours: true,
            checkpoint,
        });
    }
    // This relay's own name always gets a marker: an old pod of this
    // deployment restarting (a rollback, a stale replica) must refuse
    // rather than lead beside this release.
    let mut legacy_keys = vec![(config.relay.name.clone(), CHECKPOINT_PARTITION)];
    for legacy in scanned.legacy {
        if !legacy.stand_in {
            tracing::warn!(
                legacy_relay = %legacy.key,
                "adopting what a relay from before table-keyed checkpoints (outboxd 0.1 up to \
                 0ac26db) published; a hand-over marker under its key makes that release refuse \
                 to lead this table from now on"
            );
            if legacy.key == config.relay.name {
                legacy_keys[0].1 = legacy.partition;
            } else {
                legacy_keys.push((legacy.key.clone(), legacy.partition));
            }
        }
        candidates.push(Candidate {
            written_by: format!("the relay that wrote under `{}`", legacy.key),
            ours: false,
            checkpoint: legacy.checkpoint,
        });
    }
    Ok(Found {
        candidates,
        same_database: scanned.same_database,
        whole_topic: start == checkpoint_scan::Start::Beginning,
        legacy_keys,
    })
}

/// The table's checkpoint group has no offset on `kafka.checkpoint_topic`.
/// If `kafka.previous_checkpoint_topic` is set, the latest checkpoint there
/// is the table's (the hand-over then writes it to the new topic). (Whether
/// the group has offsets on some other topic cannot be told apart from an
/// offset commit left pending by a relay killed inside its first
/// transaction, which also makes the broker know the group: the relay does
/// not guess.)
async fn checkpoint_on_another_topic(
    config: &crate::config::Config,
    identity: &TableIdentity,
) -> Result<Option<checkpoint::Located>> {
    if let Some(previous) = &config.kafka.previous_checkpoint_topic {
        let mut on_previous = config.clone();
        on_previous.kafka.checkpoint_topic = previous.clone();
        let found = checkpoint::read_latest(&on_previous, identity).await?;
        if let Some(found) = &found {
            tracing::warn!(
                previous_checkpoint_topic = %previous,
                checkpoint_topic = %config.kafka.checkpoint_topic,
                published = found.checkpoint.published.len(),
                "adopting the table's latest checkpoint from kafka.previous_checkpoint_topic; \
                 it is written to kafka.checkpoint_topic now, and the setting can be removed"
            );
        }
        // Its offset is on the other topic: the tail of this one is read
        // from its beginning, like a first start.
        return Ok(found.map(|found| checkpoint::Located {
            offset: -1,
            checkpoint: found.checkpoint,
        }));
    }
    Ok(None)
}
