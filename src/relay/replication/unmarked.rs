//! Streaming rows the relay never marks (`relay.after_publish: none`):
//! the slot and the checkpoint are the whole record of what is published.
//!
//! ```text
//!  first session:  marks tell (catch-up drain, marked) ─▶ B = where streaming began
//!                  stream ─▶ Kafka: rows + checkpoint(position, unmarked_from = B)
//!                         ─▶ confirm the slot inside the commit, nothing written
//!  later sessions: slot judged against the checkpoint (capture::message_slot)
//!                  ─▶ stream from it, skip ≤ position, filter rows before B by marks
//! ```
//!
//! Invariant: a row the relay published without marking it is never
//! taken for unsent. Until the first such row, every published row is
//! marked, and the relay starts as any marking relay does. From then on
//! every checkpoint carries `unmarked_from` = B, the WAL position where
//! that session's stream began, in format 3, which releases that mark rows
//! refuse to read:
//!
//! - rows committed before B that were published are marked (the catch-up
//!   drain marked them) or at or before the checkpoint's position (the
//!   stream published them), so the catch-up filter and the position tell
//!   every one of them from an unsent row;
//! - rows committed after B reach Kafka only from the stream, in commit
//!   order, so the checkpoint's position alone tells them; and the slot is
//!   confirmed only inside the commit of a transaction a checkpoint names
//!   (the transactions the catch-up filter dropped included: their batch
//!   commits a checkpoint of no event), or to the idle position a
//!   checkpoint of no event names (one byte past its position); so it
//!   holds every row after the position unless someone else moved it.
//!   Then the
//!   relay refuses to start, saying what may be lost (`judge`); it never
//!   drains the table again, where unmarked rows look unsent.
//!
//! A relay configured to mark rows refuses a table whose latest checkpoint
//! says rows were left unmarked (`relay::session`).

use super::messages::position_on_this_server;
use super::*;
use crate::capture::message_slot::{judge, Kept, Verdict};

/// The first session that publishes unmarked rows, after the start every
/// marking relay makes: from `marked_before` on (where its stream begins)
/// rows go to Kafka without marks, and every checkpoint says so.
pub(super) async fn begin(
    session: &mut Session<'_>,
    latest: Option<&Checkpoint>,
    slot_name: &str,
    marked_before: Option<Lsn>,
) -> Result<()> {
    let empty;
    let latest = match latest {
        Some(latest) => latest,
        None => {
            empty = Checkpoint::new(&session.context.table_name, None, &[], &[], None);
            &empty
        }
    };
    // Checkpoints name the timeline and cluster of their positions, so a
    // failover past them is cut back to the fork on the next start.
    position_on_this_server(session, latest, slot_name).await?;
    session.deliverer.set_unmarked_from(marked_before);
    tracing::info!(
        slot = slot_name,
        marked_before = marked_before.map(|lsn| lsn.to_string()),
        "relay.after_publish is none: rows streamed from here on are published without a mark; \
         the slot and the checkpoint are their record from now on. Rows published before are \
         marked"
    );
    Ok(())
}

/// A later session: the slot must still hold every row after the
/// checkpoint's position, or the relay stops rather than lose any.
pub(super) async fn resume(
    session: &mut Session<'_>,
    latest: &Checkpoint,
    marked_before: Lsn,
    slot_name: &str,
) -> Result<Start> {
    let config = &session.context.config;
    if !config.unmarked() {
        return Err(marking_refused(latest, marked_before));
    }
    let last_published = position_on_this_server(session, latest, slot_name).await?;
    let accepted = config
        .capture
        .accept_message_loss_through
        .as_deref()
        .and_then(|lsn| lsn.parse::<Lsn>().ok());
    let existing = slot::inspect(&mut session.connection, slot_name).await?;
    let kept = Kept::UnmarkedRows;
    let slot = match judge(slot_name, existing.as_ref(), last_published, accepted, kept)? {
        Verdict::Stream(note) => {
            tracing::info!(slot = slot_name, "{note}");
            existing
        }
        Verdict::Accepted(note) => {
            tracing::warn!(slot = slot_name, "{note}");
            existing
        }
        // Never for unmarked rows: a new slot would skip what the old one held.
        Verdict::Create => None,
    }
    .ok_or_else(|| Error::stop(format!("replication slot `{slot_name}` is missing")))?;
    session.deliverer.set_unmarked_from(Some(marked_before));
    let confirmed = slot.confirmed_flush.unwrap_or_default();
    Ok(Start {
        slot,
        resume_after: last_published,
        // Rows the catch-up drain published (and marked) are replayed
        // until the stream passes where it began.
        filter_before: (confirmed < marked_before).then_some(marked_before),
        stream_from: None,
    })
}

/// A relay configured to mark rows on a table whose rows were published
/// unmarked would take them for unsent.
pub(in crate::relay) fn marking_refused(latest: &Checkpoint, marked_before: Lsn) -> Error {
    Error::stop(format!(
        "this table was relayed with relay.after_publish: none (the latest checkpoint, at {}, \
         says rows committed from {marked_before} on were published without a mark), but this \
         relay is configured to mark rows or to poll, and would take those rows for unsent and \
         publish them again. Keep relay.after_publish: none and capture.mode: replication for \
         this table",
        latest
            .position
            .map_or("no position".to_string(), |p| p.to_string()),
    ))
}
