//! The replication session of a WAL-message outbox (`capture.source:
//! messages`): stream the transactional messages of the relay's prefix
//! from the slot, publish them exactly once, confirm the slot.
//!
//! ```text
//!  slot checked against the checkpoint ──refuse if messages may be gone──▶ stop
//!     │ holds every message after the checkpoint
//!     ▼
//!  START_REPLICATION ─▶ messages (commit LSN, index), skip ≤ checkpoint
//!     ─▶ Kafka: events + checkpoint(position) ─▶ confirm slot to the commit LSN
//! ```
//!
//! Invariant: the relay streams only from a slot that still holds every
//! message committed after the latest checkpoint's position, or where an
//! operator accepted the gap by its position. There is no table to fall
//! back on: a message lives only in the WAL a slot keeps, so where the slot
//! cannot show it still keeps them, the relay refuses to start rather than
//! lose events silently. It can show it because this relay confirms a slot
//! only up to the commit LSN of a transaction whose messages a committed
//! checkpoint names (`capture::stream`): a slot confirmed past the
//! checkpoint's position was moved by someone else.
//!
//! - Never streamed (no checkpoint position): everything committed after
//!   the slot was created is in it. An existing slot (`outboxd migrate`
//!   creates it, before services emit) is streamed from its confirmed
//!   position; a missing one is created, and what was emitted before that
//!   moment reached no slot: said at `WARN`.
//! - Lost (dropped after the relay streamed, or invalidated by
//!   `max_slot_wal_keep_size`), or confirmed past the checkpoint: refused,
//!   with what to do, whatever `capture.on_slot_lost` says (`recover`
//!   re-reads a table; here there is none).
//!
//! Acknowledgement has no row to mark (`Acknowledger::without_table`): the
//! checkpoint and the slot's confirmation are the whole record.

use super::*;
use crate::capture::message_slot::{judge, Kept, Verdict};
use crate::postgres::lsn::Lsn;

/// Runs until shutdown or the first failure.
pub(in crate::relay) async fn run(session: &mut Session<'_>, latest: &Checkpoint) -> Result<()> {
    let context = session.context;
    let config = &context.config;
    let publication = &config.postgres.publication;
    ensure_publication(&mut session.connection, publication).await?;
    let slot_name = config.slot_name();
    let last_published = position_on_this_server(session, latest, &slot_name).await?;
    let accepted = config
        .capture
        .accept_message_loss_through
        .as_deref()
        .and_then(|lsn| lsn.parse::<Lsn>().ok());
    let existing = slot::inspect(&mut session.connection, &slot_name).await?;
    let slot = match judge(
        &slot_name,
        existing.as_ref(),
        last_published,
        accepted,
        Kept::Messages,
    )? {
        Verdict::Stream(note) => {
            tracing::info!(slot = %slot_name, "{note}");
            existing.expect("a slot to stream from")
        }
        Verdict::Accepted(note) => {
            tracing::warn!(slot = %slot_name, "{note}");
            existing.expect("a slot to stream from")
        }
        Verdict::Create => {
            let consistent_point = slot::create(&mut session.connection, &slot_name).await?;
            tracing::warn!(
                slot = %slot_name,
                consistent_point = %consistent_point,
                "this relay never streamed and its slot did not exist: created it. Messages \
                 committed from now on are published; any emitted before {consistent_point} reached \
                 no slot and never will be. Create the slot before services emit (outboxd migrate \
                 does) so that none is ever missed"
            );
            slot::inspect(&mut session.connection, &slot_name)
                .await?
                .ok_or_else(|| {
                    Error::retry(format!(
                        "replication slot `{slot_name}` vanished right after it was created"
                    ))
                })?
        }
    };

    let target = StreamTarget {
        slot: slot_name.clone(),
        publication: publication.clone(),
        confirmed_flush: slot.confirmed_flush.unwrap_or_default(),
        start_at: None,
        application_name: format!("outboxd-{}", config.relay.name),
    };
    let gate = crate::relay::failover::prepare(session, &target).await?;
    let mut stream = WireClient::start(&config.postgres.url, &target).await?;
    tracing::info!(
        source = %context.table_name,
        mode = "replication",
        slot = %slot_name,
        publication = %publication,
        confirmed_flush = %target.confirmed_flush,
        resume_after = last_published.map(|p| p.to_string()),
        batch_size = config.capture.batch_size,
        "relay started"
    );
    // The pipeline acknowledges on a connection of its own; for messages
    // that marks nothing, but keeps one path for both sources.
    let mut acknowledgements = context.connect("connecting for acknowledgements").await?;
    let mut streamer = Streamer::new(
        Assembler::for_messages(&config.capture.message_prefix, last_published),
        // No table, so no catch-up filter: the checkpoint's position alone
        // tells what a replay already published.
        None,
        config.capture.batch_size,
        config.capture.batch_bytes,
    )
    .with_gate(gate)
    .with_metrics(&context.metrics);
    let Session {
        connection,
        deliverer,
        stop,
        ..
    } = session;
    let capture_stop = stop.clone();
    let outcome = pipeline::run(
        connection,
        deliverer,
        &context.acknowledger,
        Some(&mut acknowledgements),
        config.relay.unacknowledged_batches,
        stop,
        |ends| streamer.stream(&mut stream, capture_stop, ends),
    )
    .await;
    stream.close().await;
    if streamer.assembler.skipped > 0 {
        tracing::info!(
            skipped = streamer.assembler.skipped,
            "skipped replayed messages the checkpoint showed already in Kafka"
        );
    }
    outcome
}

/// The latest checkpoint's position as it holds on the server streamed
/// from now (`capture::message_timeline`), and this session's checkpoints
/// set to name its timeline. Unmarked rows use it too (`unmarked`).
pub(super) async fn position_on_this_server(
    session: &mut Session<'_>,
    latest: &Checkpoint,
    slot_name: &str,
) -> Result<Option<crate::event::SourcePosition>> {
    let config = &session.context.config;
    let probe = StreamTarget {
        slot: slot_name.to_string(),
        publication: config.postgres.publication.clone(),
        confirmed_flush: Lsn(0),
        start_at: None,
        application_name: format!("outboxd-{}", config.relay.name),
    };
    let wal = crate::capture::wire::wal_history(&config.postgres.url, &probe).await?;
    let on = wal.position_of(latest);
    if let Some(fork) = on.forked_at {
        tracing::error!(
            slot = slot_name,
            checkpoint_timeline = latest.timeline,
            checkpoint_system = latest.system_identifier.as_deref(),
            timeline = wal.timeline,
            system = %wal.system_identifier,
            forked_at = %fork,
            checkpoint_position = latest.position.map(|p| p.to_string()),
            "this server's WAL history parts from the one the last checkpoint was written on \
             before its position (a standby promoted without the last commits, a restore, or \
             another cluster): messages published after {fork} are in Kafka but not on this \
             server, and positions from {fork} on are other transactions here. Judging the slot \
             and skipping replays only up to {fork}, so no message committed on this server is \
             skipped"
        );
    }
    session.deliverer.set_wal_history(wal);
    Ok(on.position)
}

/// pgoutput needs the publication to exist; messages need no table in it.
async fn ensure_publication(connection: &mut PgConnection, publication: &str) -> Result<()> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(publication)
            .fetch_one(&mut *connection)
            .await
            .map_err(|e| Error::from_postgres("looking up the publication", e))?;
    if exists {
        return Ok(());
    }
    sqlx::query(&format!(
        "CREATE PUBLICATION {}",
        crate::table::quote_ident(publication)
    ))
    .execute(&mut *connection)
    .await
    .map_err(|e| {
        Error::from_postgres(
            &format!(
                "creating the empty publication `{publication}` that starting a stream needs \
                 (or run `outboxd migrate`)"
            ),
            e,
        )
    })?;
    tracing::info!(
        publication,
        "created the (empty) publication for the message stream"
    );
    Ok(())
}
