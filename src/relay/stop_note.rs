//! What a replication relay with marks records so that its next start can
//! trust its slot, and check replays only when someone else may have
//! published them.
//!
//! Invariants:
//! - The slot is trusted (streamed from, no catch-up drain) only when the
//!   latest checkpoint is a clean stop's note (`slot_left_at`), the slot
//!   is the one it noted (not created at this start, on the same
//!   timeline) and no further than the noted position, and no other
//!   identity's checkpoints were adopted at this takeover. A slot only
//!   moves forward while it exists, and the relay confirms a position only
//!   once every outbox row committed before it is marked sent; so such a
//!   slot's stream holds every row still unsent. A slot someone advanced,
//!   or dropped and created again, is past the note; after a failover the
//!   timeline differs: both drain the table first, as every start did
//!   before (`catch_up`).
//! - A replay is checked against the table (the catch-up filter) for
//!   every transaction committed before the position some publisher other
//!   than this relay's stream may have covered: a catch-up drain (its own
//!   or a predecessor's), a relay under another identity, or a release that
//!   did not record it. Every checkpoint carries that position
//!   (`replay_checked_before`) until the stream is past it; what the
//!   stream itself published is skipped by the checkpoint's position.
//!
//! Why a note at a clean stop, and not every confirm: the relay confirms
//! the slot past its last checkpoint all the time (the end of its last
//! transaction's commit record, WAL of other tables, keepalives), and
//! recording each would cost a Kafka transaction. A relay killed without
//! a clean stop leaves no note, and its next start drains the table as
//! before; a clean stop (a deploy, a scale-down) is what restarts are.

use std::time::Duration;

use super::session::Session;
use crate::capture::slot;
use crate::event::SourcePosition;
use crate::kafka::checkpoint::Checkpoint;
use crate::postgres::lsn::Lsn;

/// Whether the slot is where the latest checkpoint's note says a clean
/// stop left it, so its stream holds every unsent row.
pub(super) fn slot_is_where_left(
    latest: Option<&Checkpoint>,
    slot_created: bool,
    adopted_others: bool,
    confirmed_flush: Option<Lsn>,
    timeline: u32,
) -> bool {
    let Some(latest) = latest else {
        return false;
    };
    let (Some(left_at), Some(left_on)) = (latest.slot_left_at, latest.slot_left_on_timeline) else {
        return false;
    };
    !slot_created
        && !adopted_others
        && left_on == timeline
        && confirmed_flush.is_some_and(|confirmed| confirmed <= left_at)
}

/// What a start that did not drain the table must check its replay
/// against: transactions committed before the returned position. `None`:
/// nothing. `settled` is the WAL position settled at this start, checked
/// up to whenever the checkpoint cannot say (another identity's rows were
/// adopted, or it is from a release or a stage that did not record it).
pub(super) fn replay_check(
    latest: Option<&Checkpoint>,
    adopted_others: bool,
    confirmed_flush: Option<Lsn>,
    settled: Lsn,
) -> Option<Lsn> {
    let recorded = latest.and_then(|latest| latest.replay_checked_before);
    let Some(before) = recorded.filter(|_| !adopted_others) else {
        return Some(settled);
    };
    let position: Option<SourcePosition> = latest.and_then(|latest| latest.position);
    // What the stream published is skipped by the position; the server
    // sends no transaction whose commit record starts before the slot's
    // position. Only what lies past both and before `before` may be in
    // Kafka unseen.
    let stream_passed = position.is_some_and(|p| p.commit_lsn >= before);
    let slot_passed = confirmed_flush.is_some_and(|confirmed| confirmed >= before);
    (!stream_passed && !slot_passed).then_some(before)
}

/// How long a clean stop waits for the server to release the slot before
/// it reads where it left it.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// After a clean stop of the stream: commits the latest checkpoint again
/// with the slot's position and the timeline, read once the server let go
/// of the slot (its last confirm applied). Best effort: without the note
/// the next start only drains the table first, so a failure is logged,
/// never raised.
pub(super) async fn leave(session: &mut Session<'_>, slot_name: &str) {
    match note(session, slot_name).await {
        Ok(Some(left_at)) => tracing::info!(
            slot = slot_name,
            slot_left_at = %left_at,
            "noted in the checkpoint where this clean stop left the slot: the next start streams \
             from it instead of publishing a backlog from the table"
        ),
        Ok(None) => tracing::info!(
            slot = slot_name,
            "the server did not release the slot within {RELEASE_WAIT:?} of the stop; left no \
             note, so the next start publishes any backlog from the table first"
        ),
        Err(error) => tracing::warn!(
            slot = slot_name,
            %error,
            "could not note where this clean stop left the slot; the next start publishes any \
             backlog from the table first, which loses nothing"
        ),
    }
}

async fn note(session: &mut Session<'_>, slot_name: &str) -> crate::error::Result<Option<Lsn>> {
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    let left_at = loop {
        let info = slot::inspect(&mut session.connection, slot_name).await?;
        match info {
            Some(info) if info.active_pid.is_none() => break info.confirmed_flush,
            Some(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => return Ok(None),
        }
    };
    let Some(left_at) = left_at else {
        return Ok(None);
    };
    let timeline = crate::postgres::current_timeline(&mut session.connection).await?;
    session.deliverer.leave_slot_note(left_at, timeline).await?;
    Ok(Some(left_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(position: Option<u64>) -> Checkpoint {
        Checkpoint::new(
            "public.outbox",
            None,
            &[],
            &[],
            position.map(|lsn| SourcePosition {
                commit_lsn: Lsn(lsn),
                index: 0,
            }),
        )
    }

    fn noted(left_at: u64, timeline: u32) -> Checkpoint {
        Checkpoint {
            slot_left_at: Some(Lsn(left_at)),
            slot_left_on_timeline: Some(timeline),
            replay_checked_before: Some(Lsn::ZERO),
            ..checkpoint(Some(100))
        }
    }

    #[test]
    fn a_slot_at_or_before_the_note_on_its_timeline_is_trusted() {
        let latest = noted(200, 1);
        assert!(slot_is_where_left(
            Some(&latest),
            false,
            false,
            Some(Lsn(200)),
            1
        ));
        // A server that crashed may bring a slot back a little behind.
        assert!(slot_is_where_left(
            Some(&latest),
            false,
            false,
            Some(Lsn(150)),
            1
        ));
    }

    #[test]
    fn anything_else_is_not_trusted() {
        let latest = noted(200, 1);
        // Advanced, or dropped and created again, by someone else.
        assert!(!slot_is_where_left(
            Some(&latest),
            false,
            false,
            Some(Lsn(201)),
            1
        ));
        // Another timeline: a failover or a restore.
        assert!(!slot_is_where_left(
            Some(&latest),
            false,
            false,
            Some(Lsn(150)),
            2
        ));
        // Created at this start.
        assert!(!slot_is_where_left(
            Some(&latest),
            true,
            false,
            Some(Lsn(150)),
            1
        ));
        // Another identity published since.
        assert!(!slot_is_where_left(
            Some(&latest),
            false,
            true,
            Some(Lsn(150)),
            1
        ));
        // No position known.
        assert!(!slot_is_where_left(Some(&latest), false, false, None, 1));
        // No note: a kill, an earlier release, polling.
        assert!(!slot_is_where_left(
            Some(&checkpoint(Some(100))),
            false,
            false,
            Some(Lsn(50)),
            1
        ));
        assert!(!slot_is_where_left(None, false, false, Some(Lsn(50)), 1));
    }

    #[test]
    fn a_replay_is_checked_up_to_now_when_the_checkpoint_cannot_say() {
        let settled = Lsn(900);
        // An earlier release, polling, a drain's batch, a first start.
        assert_eq!(
            replay_check(Some(&checkpoint(Some(100))), false, Some(Lsn(50)), settled),
            Some(settled)
        );
        assert_eq!(replay_check(None, false, None, settled), Some(settled));
        // Another identity's rows were adopted: they may be anywhere after it.
        let latest = noted(200, 1);
        assert_eq!(
            replay_check(Some(&latest), true, Some(Lsn(150)), settled),
            Some(settled)
        );
    }

    #[test]
    fn a_replay_is_checked_only_before_a_recorded_position_neither_passed() {
        let settled = Lsn(900);
        let with_check = |before: u64, position: Option<u64>| Checkpoint {
            replay_checked_before: Some(Lsn(before)),
            ..checkpoint(position)
        };
        // Nothing to check.
        assert_eq!(
            replay_check(
                Some(&with_check(0, Some(100))),
                false,
                Some(Lsn(50)),
                settled
            ),
            None
        );
        // A drain covered up to 300; the stream published up to 100 and the
        // slot is at 50: 100..300 may hold drained rows.
        assert_eq!(
            replay_check(
                Some(&with_check(300, Some(100))),
                false,
                Some(Lsn(50)),
                settled
            ),
            Some(Lsn(300))
        );
        // A drain and no streamed event yet.
        assert_eq!(
            replay_check(Some(&with_check(300, None)), false, Some(Lsn(50)), settled),
            Some(Lsn(300))
        );
        // The stream published past it.
        assert_eq!(
            replay_check(
                Some(&with_check(300, Some(300))),
                false,
                Some(Lsn(50)),
                settled
            ),
            None
        );
        // The slot is past it: nothing before it is sent again.
        assert_eq!(
            replay_check(
                Some(&with_check(300, Some(100))),
                false,
                Some(Lsn(300)),
                settled
            ),
            None
        );
    }
}
