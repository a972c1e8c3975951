//! Whether a slot still holds every event after the latest checkpoint,
//! where the slot's stream is the only record of what is published: a
//! WAL-message outbox, and a table whose rows are not marked
//! (`relay.after_publish: none`). The rule the relay starts by and
//! `outboxd check` reports.
//!
//! Invariant: the verdict is `Stream` or `Create` only where no event
//! committed after the checkpoint's position can be missing from the slot
//! (or the operator accepted the gap by its position, `Accepted`); every
//! other case is an error saying why events may be lost and what to do.
//! It relies on the relay confirming a slot only up to positions a
//! committed checkpoint names (`capture::stream`, `published_only`): a
//! slot confirmed past the checkpoint was moved by someone else. (For
//! unmarked rows even the transactions the catch-up filter dropped are
//! confirmed only once a checkpoint names them, `relay::replication`.)

use super::slot::SlotInfo;
use crate::error::{Error, Result};
use crate::event::SourcePosition;
use crate::postgres::lsn::Lsn;

/// What to do with the slot found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Stream from it; the note says from where and why that is whole.
    Stream(String),
    /// Stream from it over a gap the operator accepted.
    Accepted(String),
    /// Never streamed and no slot: create one.
    Create,
}

/// Whose record the slot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// `capture.source: messages`: events live only in the WAL.
    Messages,
    /// `relay.after_publish: none`: published rows may be unmarked.
    UnmarkedRows,
}

impl Kept {
    fn events(self) -> &'static str {
        match self {
            Kept::Messages => "Messages",
            Kept::UnmarkedRows => "Outbox rows",
        }
    }

    fn why_lost(self) -> &'static str {
        match self {
            Kept::Messages => {
                "lived only in the WAL that slot kept, so some may be lost for good: there is no \
                 table to recover them from"
            }
            Kept::UnmarkedRows => {
                "are still in the table, but with relay.after_publish: none no mark there tells \
                 them from rows already in Kafka, so the relay cannot find them to publish"
            }
        }
    }

    /// Up to where the relay itself may have confirmed the slot: one byte
    /// into the commit record of the checkpoint's position.
    fn confirmed_at_most(published: Option<SourcePosition>) -> Option<Lsn> {
        published.map(|p| super::stream::just_inside(p.commit_lsn))
    }
}

/// Whether the slot holds every event after `last_published`, the
/// latest checkpoint's position. `accepted` is
/// `capture.accept_message_loss_through`. Shared with `outboxd check`.
pub fn judge(
    slot_name: &str,
    slot: Option<&SlotInfo>,
    last_published: Option<SourcePosition>,
    accepted: Option<Lsn>,
    kept: Kept,
) -> Result<Verdict> {
    let events = kept.events();
    let lost = |why: String| {
        Error::stop(format!(
            "replication slot `{slot_name}` {why}. {events} committed after the last published \
             position ({}) {}, and the relay will not start over a gap silently. Find out why the \
             slot went; to go on accepting the loss: {}",
            last_published.map_or("none yet".to_string(), |p| p.to_string()),
            kept.why_lost(),
            how_to_accept(slot_name),
        ))
        .because(crate::error::Cause::SlotLost)
    };
    let Some(slot) = slot else {
        return match (last_published, kept) {
            (None, Kept::Messages) => Ok(Verdict::Create),
            _ => Err(lost(
                "is gone: it was dropped while the relay was not streaming from it (by an \
                 operator, a failover, or a restore)"
                    .into(),
            )),
        };
    };
    if slot.is_lost() {
        return Err(lost(
            "was invalidated (wal_status = lost): Postgres removed WAL it still needed, usually \
             because max_slot_wal_keep_size was exceeded while the relay was down or slow"
                .into(),
        ));
    }
    if let Some(reason) = slot.unusable_because() {
        return Err(Error::stop(reason));
    }
    if let Some(pid) = slot.active_pid {
        return Err(Error::retry(format!(
            "replication slot `{slot_name}` is in use by backend pid {pid}: another process \
             streams from it (a relay that just died is released within seconds). If it is not \
             outboxd, give this relay its own capture.slot"
        )));
    }
    let confirmed = slot.confirmed_flush.unwrap_or_default();
    let (None, Kept::Messages) = (last_published, kept) else {
        return judge_published(slot_name, confirmed, last_published, accepted, kept);
    };
    Ok(Verdict::Stream(format!(
        "this relay never published from its slot (no checkpoint position): streaming from \
         the slot's confirmed position {confirmed}, where it was created unless another \
         client confirmed it since. Every message committed after that is published"
    )))
}

/// The slot against a relay that has published from it.
fn judge_published(
    slot_name: &str,
    confirmed: Lsn,
    published: Option<SourcePosition>,
    accepted: Option<Lsn>,
    kept: Kept,
) -> Result<Verdict> {
    let events = kept.events().to_lowercase();
    let published_text = published.map_or("none yet".to_string(), |p| p.to_string());
    // The relay confirms one byte past the checkpoint's commit LSN, inside
    // that commit record (`capture::stream::just_inside`).
    if Kept::confirmed_at_most(published).is_some_and(|most| confirmed <= most) {
        return Ok(Verdict::Stream(format!(
            "streaming from {confirmed}; {events} up to the checkpoint's position {published_text} \
             are in Kafka and skipped when replayed"
        )));
    }
    if accepted.is_some_and(|accepted| confirmed <= accepted) {
        return Ok(Verdict::Accepted(format!(
            "the slot is confirmed to {confirmed}, past the last published position \
             {published_text}: {events} committed between them may be lost. \
             capture.accept_message_loss_through accepts that gap; streaming from {confirmed}. \
             Remove the setting once this relay has published again"
        )));
    }
    Err(Error::stop(format!(
        "replication slot `{slot_name}` is confirmed to {confirmed}, past the last published \
         position {published_text}: this relay never confirms past what it published, so someone \
         else moved it (pg_replication_slot_advance, another client, or it was dropped and \
         created again) and {events} committed between the two may be lost for good. If you \
         accept that: set capture.accept_message_loss_through: '{confirmed}' and start the relay"
    ))
    .because(crate::error::Cause::SlotLost))
}

fn how_to_accept(slot_name: &str) -> String {
    format!(
        "drop the slot if it remains (SELECT pg_drop_replication_slot('{slot_name}')), create it \
         again (outboxd migrate, or SELECT pg_create_logical_replication_slot('{slot_name}', \
         'pgoutput')), then start the relay: it names the new slot's position to set as \
         capture.accept_message_loss_through"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(confirmed: u64, wal_status: &str) -> SlotInfo {
        SlotInfo {
            name: "s".into(),
            plugin: Some("pgoutput".into()),
            slot_type: "logical".into(),
            database: Some("db".into()),
            current_database: "db".into(),
            active_pid: None,
            wal_status: Some(wal_status.into()),
            confirmed_flush: Some(Lsn(confirmed)),
            retained_bytes: Some(0),
        }
    }

    fn at(lsn: u64) -> Option<SourcePosition> {
        Some(SourcePosition {
            commit_lsn: Lsn(lsn),
            index: 3,
        })
    }

    fn refusal(verdict: Result<Verdict>) -> String {
        let error = verdict.expect_err("refused");
        assert_eq!(error.kind, crate::error::ErrorKind::Stop);
        error.to_string()
    }

    #[test]
    fn a_relay_that_never_streamed_streams_from_the_slot_or_creates_it() {
        assert_eq!(
            judge("s", None, None, None, Kept::Messages).unwrap(),
            Verdict::Create
        );
        let Verdict::Stream(note) = judge(
            "s",
            Some(&slot(500, "reserved")),
            None,
            None,
            Kept::Messages,
        )
        .unwrap() else {
            panic!()
        };
        assert!(note.contains("never published"), "{note}");
    }

    #[test]
    fn a_slot_at_or_just_inside_the_checkpoint_streams() {
        // 501: confirmed one byte into the checkpoint's commit record.
        for confirmed in [100, 500, 501] {
            assert!(matches!(
                judge(
                    "s",
                    Some(&slot(confirmed, "reserved")),
                    at(500),
                    None,
                    Kept::Messages
                ),
                Ok(Verdict::Stream(_))
            ));
        }
    }

    #[test]
    fn a_lost_slot_is_refused_with_what_to_do() {
        let gone = refusal(judge("s", None, at(500), None, Kept::Messages));
        assert!(
            gone.contains("is gone") && gone.contains("may be lost"),
            "{gone}"
        );
        assert!(gone.contains("accept_message_loss_through"), "{gone}");
        let invalidated = refusal(judge(
            "s",
            Some(&slot(400, "lost")),
            at(500),
            None,
            Kept::Messages,
        ));
        assert!(invalidated.contains("wal_status = lost"), "{invalidated}");
        // Lost before ever publishing: still refused, never recreated.
        refusal(judge(
            "s",
            Some(&slot(400, "lost")),
            None,
            None,
            Kept::Messages,
        ));
    }

    #[test]
    fn a_slot_past_the_checkpoint_is_refused_unless_the_gap_is_accepted() {
        refusal(judge(
            "s",
            Some(&slot(502, "reserved")),
            at(500),
            None,
            Kept::Messages,
        ));
        let moved = refusal(judge(
            "s",
            Some(&slot(900, "reserved")),
            at(500),
            None,
            Kept::Messages,
        ));
        assert!(
            moved.contains("accept_message_loss_through: '0/384'"),
            "{moved}"
        );
        // An acceptance below the slot's position does not cover it.
        refusal(judge(
            "s",
            Some(&slot(900, "reserved")),
            at(500),
            Some(Lsn(800)),
            Kept::Messages,
        ));
        assert!(matches!(
            judge(
                "s",
                Some(&slot(900, "reserved")),
                at(500),
                Some(Lsn(900)),
                Kept::Messages
            ),
            Ok(Verdict::Accepted(_))
        ));
        // Once published past it, the setting is inert.
        assert!(matches!(
            judge(
                "s",
                Some(&slot(950, "reserved")),
                at(1000),
                Some(Lsn(900)),
                Kept::Messages
            ),
            Ok(Verdict::Stream(_))
        ));
    }

    #[test]
    fn unmarked_rows_allow_a_slot_only_up_to_the_checkpoint() {
        let rows = Kept::UnmarkedRows;
        for confirmed in [100, 500, 501] {
            assert!(matches!(
                judge("s", Some(&slot(confirmed, "reserved")), at(500), None, rows),
                Ok(Verdict::Stream(_))
            ));
        }
        // Even below where the first session's stream began: the relay
        // confirms filtered transactions only once a checkpoint names them.
        let moved = refusal(judge(
            "s",
            Some(&slot(700, "reserved")),
            at(500),
            None,
            rows,
        ));
        assert!(moved.contains("outbox rows committed between"), "{moved}");
    }

    #[test]
    fn unmarked_rows_never_get_a_new_slot() {
        let rows = Kept::UnmarkedRows;
        let gone = refusal(judge("s", None, at(500), None, rows));
        assert!(gone.contains("no mark there tells them"), "{gone}");
        // Even with the position cut away by a fork: a slot is never
        // created over rows published without marks.
        refusal(judge("s", None, None, None, rows));
    }
}
