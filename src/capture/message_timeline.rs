//! Which part of a WAL-message outbox's checkpoint position still holds on
//! the server the relay streams from now: the same timeline, or a later one
//! that forked from it (a promoted standby, a point-in-time restore).
//!
//! Invariant: a position is compared with this server's WAL only up to
//! where the checkpoint's timeline and this one share history. WAL
//! positions after a fork are reused by other transactions on the new
//! timeline; taking the old checkpoint's position at face value there
//! would skip new messages as "already in Kafka" (lost), so the position
//! the relay skips through and judges its slot by is cut back to the fork.
//! What the old timeline published past the fork stays in Kafka: events
//! the new primary never had, which no relay can take back.

use crate::event::SourcePosition;
use crate::kafka::checkpoint::Checkpoint;
use crate::postgres::lsn::Lsn;

/// What the server streamed from says about its WAL's history
/// (`IDENTIFY_SYSTEM`, `TIMELINE_HISTORY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalHistory {
    /// The cluster's system identifier: another cluster (a dump restored
    /// elsewhere, a new server) shares no WAL history with this one, even
    /// on the same timeline number.
    pub system_identifier: String,
    pub timeline: u32,
    /// The timeline's history file; `None` for timeline 1.
    pub history: Option<String>,
}

impl WalHistory {
    /// `checkpoint`'s position as it holds on this server: cut back to
    /// nothing on another cluster, to the fork on a forked timeline.
    /// Checkpoints that recorded neither are taken as written here.
    pub fn position_of(&self, checkpoint: &Checkpoint) -> OnThisTimeline {
        let other_cluster = checkpoint
            .system_identifier
            .as_deref()
            .is_some_and(|written_on| written_on != self.system_identifier);
        if other_cluster && checkpoint.position.is_some() {
            return OnThisTimeline {
                position: Some(SourcePosition {
                    commit_lsn: Lsn(0),
                    index: 0,
                }),
                forked_at: Some(Lsn(0)),
            };
        }
        position_on_this_timeline(
            checkpoint.position,
            checkpoint.timeline,
            self.timeline,
            self.history.as_deref(),
        )
    }
}

/// The position of a checkpoint as it holds on the current timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnThisTimeline {
    /// What the relay skips replays through and judges its slot by
    /// (`None` only where the checkpoint had none).
    pub position: Option<SourcePosition>,
    /// Set when the checkpoint was written on another timeline and its
    /// position lies past the fork: where the histories part.
    pub forked_at: Option<Lsn>,
}

/// `position`, written on `checkpoint_timeline` (`None`: before timelines
/// were recorded, taken as this one), as it holds on `current_timeline`,
/// whose history file is `history` (`None` for timeline 1, which has none).
pub fn position_on_this_timeline(
    position: Option<SourcePosition>,
    checkpoint_timeline: Option<u32>,
    current_timeline: u32,
    history: Option<&str>,
) -> OnThisTimeline {
    let unchanged = OnThisTimeline {
        position,
        forked_at: None,
    };
    let (Some(published), Some(written_on)) = (position, checkpoint_timeline) else {
        return unchanged;
    };
    if written_on == current_timeline {
        return unchanged;
    }
    // A timeline not among this one's ancestors forked from nothing we can
    // name: no position of it holds here.
    let fork = history
        .and_then(|history| fork_from(history, written_on))
        .unwrap_or(Lsn(0));
    if published.commit_lsn < fork {
        return unchanged;
    }
    OnThisTimeline {
        // Every message whose commit record starts before the fork is
        // shared history, and in Kafka up to the checkpoint; nothing at or
        // after it is.
        // With no shared history at all, a position before any message:
        // nothing is skipped, and any slot is judged past it.
        position: Some(match fork.0 {
            0 => SourcePosition {
                commit_lsn: Lsn(0),
                index: 0,
            },
            _ => SourcePosition {
                commit_lsn: Lsn(fork.0 - 1),
                index: u32::MAX,
            },
        }),
        forked_at: Some(fork),
    }
}

/// Where this server's history parts from `timeline`'s, read from this
/// server's timeline history file: the lines are `<parent timeline>
/// <switchpoint LSN> <reason>`, one per ancestor, oldest first. Not just
/// `timeline`'s own switchpoint: a later ancestor may have forked from
/// the one after it below that point (a standby that had followed the
/// newer timeline, promoted before it replayed up to where `timeline`
/// ended), and from there on this server has other WAL. So the lowest
/// switchpoint from `timeline`'s line on.
fn fork_from(history: &str, timeline: u32) -> Option<Lsn> {
    let mut fork: Option<Lsn> = None;
    for line in history.lines() {
        let mut fields = line.split_whitespace();
        let (Some(Ok(parent)), Some(Ok(switchpoint))) = (
            fields.next().map(str::parse::<u32>),
            fields.next().map(str::parse::<Lsn>),
        ) else {
            continue;
        };
        if fork.is_some() || parent == timeline {
            fork = Some(fork.map_or(switchpoint, |fork| fork.min(switchpoint)));
        }
    }
    fork
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lsn: u64, index: u32) -> Option<SourcePosition> {
        Some(SourcePosition {
            commit_lsn: Lsn(lsn),
            index,
        })
    }

    const HISTORY_OF_3: &str = "1\t0/3000000\tno recovery target specified\n\n\
                                2\t0/5000000\tno recovery target specified\n";

    #[test]
    fn the_same_timeline_or_an_unrecorded_one_keeps_the_position() {
        let same = position_on_this_timeline(at(0x4000000, 2), Some(3), 3, Some(HISTORY_OF_3));
        assert_eq!(same.position, at(0x4000000, 2));
        assert_eq!(same.forked_at, None);
        let unrecorded = position_on_this_timeline(at(0x4000000, 2), None, 3, Some(HISTORY_OF_3));
        assert_eq!(unrecorded.position, at(0x4000000, 2));
    }

    #[test]
    fn a_position_before_the_fork_holds_on_the_new_timeline() {
        let on = position_on_this_timeline(at(0x4FFFFF0, 1), Some(2), 3, Some(HISTORY_OF_3));
        assert_eq!(on.position, at(0x4FFFFF0, 1));
        assert_eq!(on.forked_at, None);
    }

    #[test]
    fn a_position_past_the_fork_is_cut_back_to_just_before_it() {
        // Written on timeline 2 at 0/6000000; timeline 3 forked from 2 at
        // 0/5000000: positions from 0/5000000 on are other transactions.
        let on = position_on_this_timeline(at(0x6000000, 4), Some(2), 3, Some(HISTORY_OF_3));
        assert_eq!(on.forked_at, Some(Lsn(0x5000000)));
        let cut = on.position.expect("shared history before the fork");
        assert!(
            cut < SourcePosition {
                commit_lsn: Lsn(0x5000000),
                index: 0
            }
        );
        assert!(
            cut > SourcePosition {
                commit_lsn: Lsn(0x4FFFFFF),
                index: 1000
            }
        );
        // From timeline 1, which ended at 0/3000000.
        let on = position_on_this_timeline(at(0x3000000, 0), Some(1), 3, Some(HISTORY_OF_3));
        assert_eq!(on.forked_at, Some(Lsn(0x3000000)));
    }

    #[test]
    fn a_later_fork_below_the_checkpoints_timeline_end_cuts_back_to_it() {
        // Timeline 2 forked from 1 at 0/5000000; timeline 3 from 2 at
        // 0/3000000, below it (a standby that followed 2 while behind,
        // promoted before catching up): 3 shares 1's history only up to
        // 0/3000000.
        let history = "1\t0/5000000\tno recovery target specified\n\n\
                       2\t0/3000000\tno recovery target specified\n";
        let on = position_on_this_timeline(at(0x4000000, 1), Some(1), 3, Some(history));
        assert_eq!(on.forked_at, Some(Lsn(0x3000000)));
        assert_eq!(on.position, at(0x2FFFFFF, u32::MAX));
        let before = position_on_this_timeline(at(0x2000000, 1), Some(1), 3, Some(history));
        assert_eq!(before.position, at(0x2000000, 1));
        assert_eq!(before.forked_at, None);
    }

    #[test]
    fn a_timeline_that_is_no_ancestor_keeps_no_position() {
        let on = position_on_this_timeline(at(0x1000, 0), Some(7), 3, Some(HISTORY_OF_3));
        assert_eq!(on.position, at(0, 0));
        assert_eq!(on.forked_at, Some(Lsn(0)));
        let on = position_on_this_timeline(at(0x1000, 0), Some(2), 1, None);
        assert_eq!(on.position, at(0, 0));
    }

    #[test]
    fn a_checkpoint_of_another_cluster_keeps_no_position() {
        let here = WalHistory {
            system_identifier: "7000".into(),
            timeline: 1,
            history: None,
        };
        let mut checkpoint = Checkpoint::new("messages:outboxd", None, &[], &[], at(0x9000, 1));
        checkpoint.timeline = Some(1);
        // Recorded on this cluster, or not recorded: as written.
        assert_eq!(here.position_of(&checkpoint).position, at(0x9000, 1));
        checkpoint.system_identifier = Some("7000".into());
        assert_eq!(here.position_of(&checkpoint).position, at(0x9000, 1));
        // Another cluster, same timeline number: nothing of it holds here.
        checkpoint.system_identifier = Some("8000".into());
        let on = here.position_of(&checkpoint);
        assert_eq!(on.position, at(0, 0));
        assert_eq!(on.forked_at, Some(Lsn(0)));
    }
}
