//! The window: Kafka transactions committed whose rows are not yet marked
//! sent in Postgres.
//!
//! Invariant: every checkpoint names the rows of its own batch and of every
//! batch in the window when it is built. A batch leaves the window only
//! after its acknowledgement committed in Postgres, and batches commit to
//! Kafka one after the other, so at any instant every row that is in Kafka
//! but not marked belongs to a batch named by the latest committed
//! checkpoint; start-up marks all of them (see `kafka::checkpoint`). A batch
//! is published only while fewer than `limit` batches are in the window, so
//! a checkpoint names at most `limit` batches and its size stays bounded.

use std::collections::{HashMap, VecDeque};

use crate::kafka::checkpoint::RowDigest;

/// One committed, unacknowledged batch.
#[derive(Debug)]
struct Unacknowledged {
    id: u64,
    published: Vec<i64>,
    dead_lettered: Vec<i64>,
    /// Which row each of those seqs is.
    ids: HashMap<i64, RowDigest>,
}

#[derive(Debug)]
pub(super) struct Window {
    /// Most batches one checkpoint names: `relay.unacknowledged_batches`.
    limit: usize,
    batches: VecDeque<Unacknowledged>,
}

impl Window {
    pub(super) fn new(limit: usize) -> Window {
        Window {
            limit: limit.max(1),
            batches: VecDeque::new(),
        }
    }

    /// Whether another batch may be published now: its checkpoint would
    /// name it and every batch in the window.
    pub(super) fn has_room(&self) -> bool {
        self.batches.len() < self.limit
    }

    /// The rows a checkpoint for a batch with these rows must name: its own
    /// and those of every batch in the window.
    pub(super) fn checkpoint_rows(
        &self,
        published: &[i64],
        dead_lettered: &[i64],
    ) -> (Vec<i64>, Vec<i64>) {
        let mut all_published = published.to_vec();
        let mut all_dead_lettered = dead_lettered.to_vec();
        for batch in &self.batches {
            all_published.extend_from_slice(&batch.published);
            all_dead_lettered.extend_from_slice(&batch.dead_lettered);
        }
        (all_published, all_dead_lettered)
    }

    /// Which row `seq` is, if a batch of the window has it.
    pub(super) fn row_id(&self, seq: i64) -> Option<RowDigest> {
        self.batches
            .iter()
            .find_map(|batch| batch.ids.get(&seq).copied())
    }

    /// Batch `id` committed in Kafka; its rows are not marked yet.
    pub(super) fn committed(
        &mut self,
        id: u64,
        published: &[i64],
        dead_lettered: &[i64],
        ids: HashMap<i64, RowDigest>,
    ) {
        self.batches.push_back(Unacknowledged {
            id,
            published: published.to_vec(),
            dead_lettered: dead_lettered.to_vec(),
            ids,
        });
    }

    /// Batch `id`'s acknowledgement committed in Postgres.
    pub(super) fn acknowledged(&mut self, id: u64) {
        self.batches.retain(|batch| batch.id != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_names_every_unacknowledged_batch_and_its_own() {
        let mut window = Window::new(3);
        window.committed(1, &[1, 2], &[], HashMap::new());
        window.committed(2, &[3], &[4], HashMap::new());
        let (published, dead_lettered) = window.checkpoint_rows(&[5, 6], &[]);
        assert_eq!(published, vec![5, 6, 1, 2, 3]);
        assert_eq!(dead_lettered, vec![4]);
        window.acknowledged(1);
        let (published, _) = window.checkpoint_rows(&[7], &[]);
        assert_eq!(published, vec![7, 3]);
    }

    #[test]
    fn the_window_bounds_how_many_batches_a_checkpoint_names() {
        let mut window = Window::new(2);
        assert!(window.has_room());
        window.committed(1, &[1], &[], HashMap::new());
        assert!(window.has_room(), "one in the window plus the next: 2");
        window.committed(2, &[2], &[], HashMap::new());
        assert!(!window.has_room());
        window.acknowledged(1);
        assert!(window.has_room());

        let mut serial = Window::new(1);
        assert!(serial.has_room());
        serial.committed(1, &[1], &[], HashMap::new());
        assert!(
            !serial.has_room(),
            "with 1, a batch waits for the previous marks"
        );
        serial.acknowledged(1);
        assert!(serial.has_room());
    }
}
