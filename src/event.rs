//! `OutboxEvent`: one committed outbox row, the single type that flows from
//! capture through routing to Kafka and back to acknowledgement.
//!
//! Invariant: an event holds the row exactly as stored (payload bytes are
//! never re-encoded), plus the `seq` that identifies it in checkpoints.
//! An event from a WAL message (`capture.source: messages`) holds the
//! message's decoded fields the same way; its `seq` is the message's LSN
//! (see `capture::stream`).

use serde::{Deserialize, Serialize};

use crate::postgres::lsn::Lsn;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Relay order and primary key; checkpoints and acknowledgements name rows by it.
    pub seq: i64,
    /// Event id, sent as the `id` header so consumers can deduplicate across systems.
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// Kafka value as stored: JSON text for json/jsonb, raw bytes for bytea.
    /// `None` (SQL NULL) becomes a tombstone.
    pub payload: Option<Vec<u8>>,
    /// The row's `headers` column as JSON text, parsed by routing.
    pub headers_json: Option<String>,
    /// W3C `traceparent`, propagated as a header.
    pub trace_parent: Option<String>,
    /// Where replication capture found the row; `None` from polling.
    pub position: Option<SourcePosition>,
    /// The row's `created_at` in RFC 3339, UTC (`postgres::timestamp`): the
    /// CloudEvents `time`. `None` where the table has no such column or
    /// its value has no RFC 3339 form.
    pub created_at: Option<String>,
    /// When the row's transaction committed (replication) or its
    /// `created_at` (polling): where the latency metric starts.
    pub committed_at: Option<std::time::SystemTime>,
    /// Capture already knows this event cannot be published, and why (a
    /// WAL message whose content does not decode, or one written outside
    /// a transaction): routing sends it to the dead-letter topic with this
    /// reason, as a poison row. Always `None` for table rows, whose
    /// problems routing finds itself.
    pub poison: Option<String>,
}

/// An event's place in the replication stream: its transaction's commit
/// LSN, then its index among that transaction's outbox inserts. pgoutput
/// version 1 sends whole transactions in commit order, so positions grow
/// strictly along the stream, also for many rows sharing one LSN (a
/// multi-row INSERT or COPY) and for a transaction split over batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SourcePosition {
    pub commit_lsn: Lsn,
    pub index: u32,
}

impl std::fmt::Display for SourcePosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.commit_lsn, self.index)
    }
}
