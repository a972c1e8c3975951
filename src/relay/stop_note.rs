//! The note a clean stop of a replication relay with marks leaves in its
//! checkpoint, so that its next start streams from the slot instead of
//! draining the table.
//!
//! Invariant: the slot is trusted (streamed from, no catch-up drain) only
//! when the latest checkpoint is a clean stop's note (`slot_left`) naming
//! this slot, the slot was not created at this start, is on the noted
//! timeline and exactly at the noted position, and no one else's
//! checkpoints were found at this takeover, and the publication's entry
//! for the table is as the latest checkpoint's session found it. The relay
//! confirms a position only once every outbox row the stream carried
//! before it is marked sent, so the slot it left holds every row still
//! unsent. A slot someone advanced, or
//! dropped and created again, is past the note; a failover changes the
//! timeline; a server that crashed may bring the slot back behind it:
//! none of those is trusted, and the start judges the slot as every start
//! did before (`catch_up`).
//!
//! A clean stop leaves no note when the slot is past every position the
//! relay confirmed (someone moved it while the relay let go of it). Rows
//! committed while the table was out of the publication never reached the
//! stream, though the relay confirmed past them: every checkpoint names
//! the publication's entries as its session found them, and a start that
//! finds them changed drains the table, noted slot or not
//! (`replication::start_where_marks_tell`).
//!
//! What the stream replays is still checked against the table up to where
//! the start reads its position (`replication::CatchUpFilter`), trusted
//! slot or not: rows an operator truncated, deleted or marked sent while
//! the relay was down are not published, as in polling.
//!
//! Why a note at a clean stop, and not every confirm: the relay confirms
//! the slot past its last checkpoint all the time (the end of its last
//! transaction's commit record, WAL of other tables, keepalives), and
//! recording each would cost a Kafka transaction. A relay killed without a
//! clean stop leaves no note, and its next start drains the table as
//! before; a clean stop (a deploy, a scale-down) is what restarts are.

use std::time::Duration;

use super::session::Session;
use crate::capture::slot::{self, SlotInfo};
use crate::kafka::checkpoint::{Checkpoint, SlotLeft};
use crate::postgres::lsn::Lsn;

/// Whether the slot is where the latest checkpoint's note says a clean
/// stop left it, so its stream holds every unsent row.
pub(super) fn slot_is_where_left(
    latest: Option<&Checkpoint>,
    others_published: bool,
    slot: &SlotInfo,
    slot_created: bool,
    timeline: u32,
) -> bool {
    let Some(left) = latest.and_then(|latest| latest.slot_left.as_ref()) else {
        return false;
    };
    !slot_created
        && !others_published
        && left.slot == slot.name
        && left.timeline == timeline
        && slot.confirmed_flush == Some(left.confirmed_flush)
}

/// How long a clean stop waits for the server to release the slot before
/// it reads where it left it.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// What a clean stop knows about the slot it leaves.
pub(super) struct Left<'a> {
    pub slot: &'a str,
    /// The slot's position when the session started, or the highest one it
    /// confirmed since: the server's may be lower (a confirm not yet
    /// applied), never higher unless someone else moved the slot.
    pub confirmed_at_most: Lsn,
}

/// Why a clean stop left no note.
enum NoNote {
    NotReleased,
    MovedBySomeoneElse { confirmed_flush: Lsn },
}

/// After a clean stop of the stream: commits the latest checkpoint again
/// with the slot's name and position and the timeline, read once the
/// server let go of the slot (its last confirm applied). Best effort:
/// without the note the next start only drains the table first, so a
/// failure is logged, never raised.
pub(super) async fn leave(session: &mut Session<'_>, left: Left<'_>) {
    let slot_name = left.slot;
    match note(session, &left).await {
        Ok(Ok(left_at)) => tracing::info!(
            slot = slot_name,
            slot_left_at = %left_at,
            "noted in the checkpoint where this clean stop left the slot: the next start streams \
             from it instead of publishing a backlog from the table"
        ),
        Ok(Err(NoNote::NotReleased)) => tracing::info!(
            slot = slot_name,
            "the server did not release the slot within {RELEASE_WAIT:?} of the stop; left no \
             note, so the next start publishes any backlog from the table first"
        ),
        Ok(Err(NoNote::MovedBySomeoneElse { confirmed_flush })) => tracing::warn!(
            slot = slot_name,
            %confirmed_flush,
            confirmed_by_this_relay = %left.confirmed_at_most,
            "replication slot `{slot_name}` was moved past every position this relay confirmed \
             while it stopped: someone advanced it (pg_replication_slot_advance) or dropped and \
             re-created it. Left no note, so the next start publishes the unsent rows from the \
             table before it streams; find what moved the slot, only outboxd should"
        ),
        Err(error) => tracing::warn!(
            slot = slot_name,
            %error,
            "could not note where this clean stop left the slot; the next start publishes any \
             backlog from the table first, which loses nothing"
        ),
    }
}

async fn note(
    session: &mut Session<'_>,
    left: &Left<'_>,
) -> crate::error::Result<std::result::Result<Lsn, NoNote>> {
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    let info = loop {
        match slot::inspect(&mut session.connection, left.slot).await? {
            Some(info) if info.active_pid.is_none() => break info,
            Some(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => return Ok(Err(NoNote::NotReleased)),
        }
    };
    let Some(confirmed_flush) = info.confirmed_flush else {
        return Ok(Err(NoNote::NotReleased));
    };
    // Past what this relay confirmed, the slot's position is someone
    // else's: the rows it skipped were never streamed.
    if confirmed_flush > left.confirmed_at_most {
        return Ok(Err(NoNote::MovedBySomeoneElse { confirmed_flush }));
    }
    let timeline = crate::postgres::current_timeline(&mut session.connection).await?;
    let note = SlotLeft {
        slot: left.slot.to_string(),
        confirmed_flush,
        timeline,
    };
    session.deliverer.leave_slot_note(note).await?;
    Ok(Ok(confirmed_flush))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SourcePosition;

    fn noted(left_at: u64, timeline: u32) -> Checkpoint {
        Checkpoint {
            slot_left: Some(SlotLeft {
                slot: "outboxd_orders".into(),
                confirmed_flush: Lsn(left_at),
                timeline,
            }),
            ..plain()
        }
    }

    fn plain() -> Checkpoint {
        let position = SourcePosition {
            commit_lsn: Lsn(100),
            index: 0,
        };
        Checkpoint::new("public.outbox", None, &[], &[], Some(position))
    }

    fn slot(name: &str, confirmed: Option<u64>) -> SlotInfo {
        SlotInfo {
            name: name.into(),
            plugin: Some("pgoutput".into()),
            slot_type: "logical".into(),
            database: Some("orders".into()),
            current_database: "orders".into(),
            active_pid: None,
            wal_status: Some("reserved".into()),
            confirmed_flush: confirmed.map(Lsn),
            retained_bytes: Some(0),
        }
    }

    #[test]
    fn the_slot_a_clean_stop_left_is_trusted_where_it_left_it() {
        let orders = slot("outboxd_orders", Some(200));
        assert!(slot_is_where_left(
            Some(&noted(200, 1)),
            false,
            &orders,
            false,
            1
        ));
    }

    #[test]
    fn any_other_slot_is_not_trusted() {
        let latest = Some(noted(200, 1));
        let latest = latest.as_ref();
        let at = |confirmed| slot("outboxd_orders", confirmed);
        // Advanced, or dropped and created again, by someone else.
        assert!(!slot_is_where_left(latest, false, &at(Some(201)), false, 1));
        // Brought back by a crash or a restore from a copy.
        assert!(!slot_is_where_left(latest, false, &at(Some(150)), false, 1));
        // Another timeline: a failover or a restore.
        assert!(!slot_is_where_left(latest, false, &at(Some(200)), false, 2));
        // Created at this start.
        assert!(!slot_is_where_left(latest, false, &at(Some(200)), true, 1));
        // Someone else published since.
        assert!(!slot_is_where_left(latest, true, &at(Some(200)), false, 1));
        // Another slot (another relay.name or capture.slot) under one identity.
        let other = slot("outboxd_billing", Some(200));
        assert!(!slot_is_where_left(latest, false, &other, false, 1));
        // No position known.
        assert!(!slot_is_where_left(latest, false, &at(None), false, 1));
        // No note: a kill, an earlier release, polling.
        assert!(!slot_is_where_left(
            Some(&plain()),
            false,
            &at(Some(100)),
            false,
            1
        ));
        assert!(!slot_is_where_left(None, false, &at(Some(100)), false, 1));
    }
}
