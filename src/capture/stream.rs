//! From replication messages to outbox events with their source positions.
//!
//! ```text
//!  Begin(commit LSN) · Relation · Insert × n · Commit(end LSN) · KeepAlive
//!        │                          │               │              │
//!        ▼                          ▼               ▼              ▼
//!   open transaction      Event at (LSN, i)   TransactionEnd      Idle
//! ```
//!
//! Invariant: events come out in strictly increasing [`SourcePosition`],
//! and events at or before `resume_after` (already in Kafka per the
//! checkpoint) never come out. Rows are read by the Relation's column
//! names, so extra or reordered columns in a user's table do not matter;
//! inserts into any other table in the publication are ignored.
//!
//! With `capture.source: messages` (`Assembler::for_messages`) the events
//! are the transactional logical messages carrying the relay's prefix
//! instead, and rows are ignored:
//!
//! - **Position**: the transaction's commit LSN and the message's index
//!   among the transaction's messages of this prefix (poison ones count
//!   too), exactly as rows, so the checkpoint and the restart skip work
//!   unchanged.
//! - **seq**: the message's own LSN (the end of its WAL record). Nothing
//!   marks a message, so seq only has to name the event uniquely in
//!   checkpoints, dead letters and logs: a WAL position is unique on the
//!   server's timeline, readable with `pg_waldump`, and the same on every
//!   replay. It is not the publishing order (a transaction that wrote its
//!   message first can commit last); the position is.
//! - **Confirming**: only ever up to the commit LSN of a transaction whose
//!   messages are all in Kafka, never a transaction's end or a keepalive's
//!   WAL end. So the slot is never confirmed past the latest checkpoint's
//!   position (the transaction at exactly that LSN is replayed and skipped
//!   by it), and a slot found past it was moved by someone else: the relay
//!   refuses to start (`relay::replication::messages`). The price: while no
//!   message is written, the slot holds the WAL others write.
//! - **Non-transactional messages** of our prefix (`pg_logical_emit_message(
//!   false, …)`) are poison: written whether or not their transaction
//!   commits, publishing them could publish a rolled-back event. They go to
//!   the dead-letter topic with that reason (or stop the relay under
//!   `relay.on_poison: halt`) rather than stop it by default: the slot could
//!   never pass one, so a stop would stall every event behind a single
//!   misbehaving call with no safe way forward, while the dead letter keeps
//!   its content for whoever decides. Their position is one byte before
//!   their own LSN, inside their own WAL record: that LSN is the end of
//!   the record, where the next record may start, and when that is the
//!   commit of a transaction with messages, the transaction's first event
//!   sits at (that LSN, 0). Sharing the position, a checkpoint naming the
//!   dead letter would skip that event on a restart. No commit record can
//!   start inside another record, so one byte before is strictly between
//!   every transaction before the message and every one after it; the
//!   slot is confirmed to that position too, never past it.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use super::pgoutput::{Message, Relation, Tuple, Value};
use super::wire::StreamItem;
use crate::config::{ColumnNames, OtherChangesPolicy};
use crate::error::{Error, Result};
use crate::event::{OutboxEvent, SourcePosition};
use crate::postgres::lsn::Lsn;
use crate::table::OutboxTable;

/// Postgres' type oid for `bytea`: its text form is hex, which we decode.
const BYTEA_OID: u32 = 17;

/// What one stream item means for the relay.
// Not boxed: every event moves straight into the batch, and a box would
// cost an allocation per row for a value that lives a few instructions.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Captured {
    Event(OutboxEvent),
    /// A transaction ended: every event of it has been yielded, and once they
    /// are in Kafka, the slot may be confirmed up to `end_lsn`.
    TransactionEnd {
        /// Where the synchronous standbys must have flushed before the
        /// transaction may be published: the end of its commit record.
        end_lsn: Lsn,
        /// How far the slot may be confirmed once the events are in Kafka:
        /// `end_lsn` for rows; the commit LSN for messages, so a confirmed
        /// position never passes the checkpoint's (see the module comment).
        confirm_lsn: Lsn,
    },
    /// The server has sent everything before `wal_end`: with nothing in
    /// flight, confirming it keeps an idle outbox from pinning WAL.
    Idle {
        wal_end: Lsn,
    },
}

/// Where each configured column sits in the outbox relation's tuples.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowLayout {
    seq: usize,
    id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    payload: usize,
    payload_is_bytea: bool,
    headers: Option<usize>,
    trace_parent: Option<usize>,
    created_at: Option<usize>,
}

impl RowLayout {
    fn from_relation(
        relation: &Relation,
        columns: &ColumnNames,
        created_at_text: bool,
    ) -> Result<RowLayout> {
        let find = |name: &str, key: &str| {
            relation.column_index(name).ok_or_else(|| {
                Error::stop(format!(
                    "the outbox table {}.{} as replicated has no column `{name}` \
                     (postgres.columns.{key}); add it or fix the config",
                    relation.namespace, relation.name
                ))
            })
        };
        let optional = |name: &Option<String>, key: &str| match name {
            Some(name) => find(name, key).map(Some),
            None => Ok(None),
        };
        let payload = find(&columns.payload, "payload")?;
        Ok(RowLayout {
            seq: find(&columns.seq, "seq")?,
            id: find(&columns.id, "id")?,
            aggregate_type: find(&columns.aggregate_type, "aggregate_type")?,
            aggregate_id: find(&columns.aggregate_id, "aggregate_id")?,
            event_type: find(&columns.event_type, "type")?,
            payload,
            payload_is_bytea: relation.columns[payload].type_oid == BYTEA_OID,
            headers: optional(&columns.headers, "headers")?,
            trace_parent: optional(&columns.tracing_span_context, "tracing_span_context")?,
            // Optional here: only CloudEvents' `time` needs it, and only
            // then is it converted, a string parse and format per event.
            created_at: relation
                .column_index(&columns.created_at)
                .filter(|_| created_at_text),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct OpenTransaction {
    commit_lsn: Lsn,
    committed_at: Option<SystemTime>,
    next_index: u32,
}

/// Seconds from the Unix epoch to Postgres' epoch, 2000-01-01.
const POSTGRES_EPOCH_UNIX_SECONDS: u64 = 946_684_800;

/// A pgoutput timestamp (microseconds since 2000-01-01) as a `SystemTime`.
fn postgres_time(micros: i64) -> Option<SystemTime> {
    let since_2000 = Duration::from_micros(u64::try_from(micros).ok()?);
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(POSTGRES_EPOCH_UNIX_SECONDS))?
        .checked_add(since_2000)
}

/// Turns stream items into [`Captured`] items; one per replication session.
pub struct Assembler {
    schema: String,
    table: String,
    columns: ColumnNames,
    /// Events carry `created_at` as RFC 3339 text (for CloudEvents' `time`).
    created_at_text: bool,
    other_changes: OtherChangesPolicy,
    /// Relation oid → layout, `None` for relations that are not the outbox.
    relations: HashMap<u32, Option<RowLayout>>,
    transaction: Option<OpenTransaction>,
    resume_after: Option<SourcePosition>,
    /// Other changes are logged once per session, not once per row.
    warned_other_changes: bool,
    /// Events dropped because the checkpoint already covers them.
    pub skipped: u64,
    /// `Some(prefix)`: events are the logical messages with this prefix.
    message_prefix: Option<String>,
    /// The slot is confirmed only inside the commit of a transaction with
    /// events, never at a transaction's end or a keepalive: messages, and
    /// rows under `relay.after_publish: none` (see `published_only`).
    published_only: bool,
    /// What a non-transactional message leaves to hand out after its event.
    pending: Option<Captured>,
}

impl Assembler {
    pub fn new(
        table: &OutboxTable,
        other_changes: OtherChangesPolicy,
        resume_after: Option<SourcePosition>,
    ) -> Assembler {
        Assembler {
            schema: table.schema.clone(),
            table: table.name.clone(),
            columns: table.columns.clone(),
            created_at_text: false,
            other_changes,
            relations: HashMap::new(),
            transaction: None,
            resume_after,
            warned_other_changes: false,
            skipped: 0,
            message_prefix: None,
            published_only: false,
            pending: None,
        }
    }

    /// An assembler for `capture.source: messages`: events are the logical
    /// messages carrying `prefix`; rows of any table are ignored.
    pub fn for_messages(prefix: &str, resume_after: Option<SourcePosition>) -> Assembler {
        Assembler {
            schema: String::new(),
            table: String::new(),
            columns: ColumnNames::default(),
            created_at_text: false,
            other_changes: OtherChangesPolicy::Ignore,
            relations: HashMap::new(),
            transaction: None,
            resume_after,
            warned_other_changes: true,
            skipped: 0,
            message_prefix: Some(prefix.to_string()),
            published_only: true,
            pending: None,
        }
    }

    /// Rows whose relay never marks them (`relay.after_publish: none`):
    /// like messages, a transaction is confirmed only inside its commit
    /// record and only when it had rows of the outbox, so the slot never
    /// passes the latest checkpoint's position by the relay's own doing
    /// (`relay::replication::unmarked`). Keepalives, and transactions
    /// without outbox rows, come out as `Idle`: they tell how far the
    /// stream is clear, which retention and the idle checkpoints need, but
    /// the streamer confirms such a position only once a checkpoint of its
    /// own names it.
    pub fn published_only(mut self) -> Assembler {
        self.published_only = true;
        self
    }

    /// What the last [`Assembler::accept`] left to hand out after its own
    /// result (the end of a non-transactional message).
    pub fn take_pending(&mut self) -> Option<Captured> {
        self.pending.take()
    }

    /// Events carry `created_at` as RFC 3339 text, which only CloudEvents'
    /// `time` needs; without this it is not converted.
    pub fn with_created_at_text(mut self, wanted: bool) -> Assembler {
        self.created_at_text = wanted;
        self
    }

    /// Between a Begin and its Commit.
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }

    /// The commit LSN of the open transaction.
    pub fn transaction_commit_lsn(&self) -> Option<Lsn> {
        self.transaction.map(|t| t.commit_lsn)
    }

    pub fn accept(&mut self, item: StreamItem) -> Result<Option<Captured>> {
        let message = match item {
            // Messages never confirm past a published commit (module comment).
            StreamItem::KeepAlive { .. } if self.message_prefix.is_some() => return Ok(None),
            StreamItem::KeepAlive { wal_end } => {
                return Ok(Some(Captured::Idle { wal_end }));
            }
            StreamItem::Message(message) => message,
        };
        match message {
            Message::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                if let Some(open) = self.transaction {
                    return Err(protocol_error(format!(
                        "a transaction began at {final_lsn} before the one committing at {} ended",
                        open.commit_lsn
                    )));
                }
                self.transaction = Some(OpenTransaction {
                    commit_lsn: final_lsn,
                    committed_at: postgres_time(commit_time_micros),
                    next_index: 0,
                });
                Ok(None)
            }
            Message::Commit { end_lsn, .. } => {
                let Some(ended) = self.transaction.take() else {
                    return Err(protocol_error(format!(
                        "a commit ending at {end_lsn} arrived outside a transaction"
                    )));
                };
                if !self.published_only {
                    return Ok(Some(Captured::TransactionEnd {
                        end_lsn,
                        confirm_lsn: end_lsn,
                    }));
                }
                // Messages and unmarked rows: only a transaction with
                // events of ours is a position the checkpoint can name.
                // Confirmed one byte inside the commit record: the server
                // skips the transaction on a replay (it skips every commit
                // record that starts before the confirmed position), so a
                // relay that finds no checkpoint of its own (a new Kafka
                // identity) does not publish it again; and no other
                // commit record can start at or before that byte.
                if ended.next_index > 0 {
                    return Ok(Some(Captured::TransactionEnd {
                        end_lsn,
                        confirm_lsn: just_inside(ended.commit_lsn),
                    }));
                }
                // Unmarked rows: a transaction without outbox rows tells
                // how far the stream is clear, like a keepalive (on a busy
                // server, keepalives may not come at all). Messages ignore
                // both: they never confirm an idle position.
                Ok(self
                    .message_prefix
                    .is_none()
                    .then_some(Captured::Idle { wal_end: end_lsn }))
            }
            Message::Relation(relation) => {
                let layout = if self.message_prefix.is_none()
                    && relation.namespace == self.schema
                    && relation.name == self.table
                {
                    Some(RowLayout::from_relation(
                        &relation,
                        &self.columns,
                        self.created_at_text,
                    )?)
                } else {
                    None
                };
                self.relations.insert(relation.id, layout);
                Ok(None)
            }
            Message::Insert { relation_id, new } => self.insert(relation_id, new),
            Message::Update { relation_id } => {
                self.other_change("UPDATE", &[relation_id]);
                Ok(None)
            }
            Message::Delete { relation_id } => {
                self.other_change("DELETE", &[relation_id]);
                Ok(None)
            }
            Message::Truncate { relation_ids, .. } => {
                self.other_change("TRUNCATE", &relation_ids);
                Ok(None)
            }
            Message::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => match &self.message_prefix {
                Some(ours) if *ours == prefix => self.message(transactional, lsn, &content),
                _ => Ok(None),
            },
            Message::Origin { .. } | Message::Type { .. } => Ok(None),
        }
    }

    /// A logical message with our prefix.
    fn message(
        &mut self,
        transactional: bool,
        lsn: Lsn,
        content: &[u8],
    ) -> Result<Option<Captured>> {
        if !transactional {
            if let Some(open) = self.transaction {
                // pgoutput v1 sends one when decoded, never inside the
                // replay of a committed transaction.
                return Err(protocol_error(format!(
                    "a non-transactional message at {lsn} arrived inside the transaction \
                     committing at {}",
                    open.commit_lsn
                )));
            }
            // Inside the message's own record (module comment): two bytes
            // before its end, and confirmed one byte after that, as a
            // transaction is confirmed one byte after its commit LSN.
            let inside = Lsn(lsn.0.saturating_sub(2));
            let position = SourcePosition {
                commit_lsn: inside,
                index: 0,
            };
            if self.resume_after.is_some_and(|resume| position <= resume) {
                self.skipped += 1;
                return Ok(None);
            }
            let mut event = message_event(lsn, content, position);
            let written_as = match &event.poison {
                Some(bad) => format!(" Its content is poison too: {bad}."),
                None => String::new(),
            };
            event.poison = Some(format!(
                "non-transactional message: written with pg_logical_emit_message(false, …) at \
                 {lsn}, it reaches the relay whether or not its transaction commits, so it may \
                 be an event of a rolled-back transaction and is never published. Emit with \
                 transactional = true (or call {}).{written_as}",
                super::message_encoding::EMIT_FUNCTION
            ));
            tracing::error!(
                lsn = %lsn,
                "a non-transactional message with the relay's prefix is refused (dead-lettered, \
                 or a halt under relay.on_poison: halt); fix the writer to emit transactional messages"
            );
            self.pending = Some(Captured::TransactionEnd {
                end_lsn: lsn,
                confirm_lsn: just_inside(inside),
            });
            return Ok(Some(Captured::Event(event)));
        }
        let Some(transaction) = self.transaction.as_mut() else {
            return Err(protocol_error(format!(
                "a transactional message at {lsn} arrived outside a transaction"
            )));
        };
        let position = SourcePosition {
            commit_lsn: transaction.commit_lsn,
            index: transaction.next_index,
        };
        transaction.next_index += 1;
        if self.resume_after.is_some_and(|resume| position <= resume) {
            self.skipped += 1;
            return Ok(None);
        }
        let mut event = message_event(lsn, content, position);
        event.committed_at = transaction.committed_at;
        Ok(Some(Captured::Event(event)))
    }

    fn insert(&mut self, relation_id: u32, new: Tuple) -> Result<Option<Captured>> {
        let layout = match self.relations.get(&relation_id) {
            Some(Some(layout)) => layout,
            Some(None) => return Ok(None),
            None => {
                return Err(protocol_error(format!(
                    "an insert into relation {relation_id} arrived before its Relation message"
                )))
            }
        };
        let Some(transaction) = self.transaction.as_mut() else {
            return Err(protocol_error(
                "an insert arrived outside a transaction".into(),
            ));
        };
        let position = SourcePosition {
            commit_lsn: transaction.commit_lsn,
            index: transaction.next_index,
        };
        transaction.next_index += 1;
        if self.resume_after.is_some_and(|resume| position <= resume) {
            self.skipped += 1;
            return Ok(None);
        }
        let committed_at = transaction.committed_at;
        let mut event = event_from_tuple(layout, new, position)?;
        event.committed_at = committed_at;
        Ok(Some(Captured::Event(event)))
    }

    fn other_change(&mut self, kind: &str, relation_ids: &[u32]) {
        let touches_outbox = relation_ids
            .iter()
            .any(|id| matches!(self.relations.get(id), Some(Some(_))))
            // A truncate may name relations never sent before.
            || relation_ids.iter().any(|id| !self.relations.contains_key(id));
        if touches_outbox
            && self.other_changes == OtherChangesPolicy::Warn
            && !self.warned_other_changes
        {
            self.warned_other_changes = true;
            tracing::warn!(
                change = kind,
                table = %format!("{}.{}", self.schema, self.table),
                "the publication sends a change other than INSERT on the outbox table; outboxd \
                 publishes only inserts and ignored it (and ignores any more, without logging each). \
                 Use a publication WITH (publish = 'insert'), or set capture.other_changes: ignore"
            );
        }
    }
}

/// Where the slot is confirmed once the events at `position` are in
/// Kafka (WAL-message outbox): one byte after it, still inside the record
/// it names, so the server never replays that record again and no other
/// transaction's commit record can start in between.
pub fn just_inside(position: Lsn) -> Lsn {
    Lsn(position.0 + 1)
}

fn protocol_error(message: String) -> Error {
    Error::retry(format!(
        "unexpected replication stream: {message}; reconnecting"
    ))
}

fn event_from_tuple(
    layout: &RowLayout,
    tuple: Tuple,
    position: SourcePosition,
) -> Result<OutboxEvent> {
    let mut values: Vec<Option<Value>> = tuple.0.into_iter().map(Some).collect();
    let mut take = |index: usize, column: &str| -> Result<Option<Vec<u8>>> {
        match values.get_mut(index).and_then(Option::take) {
            Some(Value::Null) => Ok(None),
            Some(Value::Text(bytes)) => Ok(Some(bytes)),
            Some(Value::Binary(_)) | Some(Value::UnchangedToast) => Err(Error::stop(format!(
                "outbox column `{column}` arrived in a form outboxd does not read (binary or unchanged TOAST) at {position}"
            ))),
            None => Err(Error::retry(format!(
                "an outbox insert at {position} has fewer values than its Relation has columns; reconnecting"
            ))),
        }
    };
    let text = |bytes: Option<Vec<u8>>, column: &str| -> Result<Option<String>> {
        bytes
            .map(|bytes| {
                String::from_utf8(bytes).map_err(|_| {
                    Error::stop(format!(
                        "outbox column `{column}` at {position} is not valid UTF-8 (is the database encoding UTF8?)"
                    ))
                })
            })
            .transpose()
    };
    let required = |value: Option<String>, column: &str| {
        value.ok_or_else(|| {
            Error::stop(format!(
                "outbox column `{column}` is NULL at {position}; the table contract makes it NOT NULL"
            ))
        })
    };

    let seq_text = required(text(take(layout.seq, "seq")?, "seq")?, "seq")?;
    let seq: i64 = seq_text.parse().map_err(|_| {
        Error::stop(format!(
            "outbox column seq at {position} is `{seq_text}`, not a bigint"
        ))
    })?;
    let id = required(text(take(layout.id, "id")?, "id")?, "id")?;
    let aggregate_type = required(
        text(
            take(layout.aggregate_type, "aggregatetype")?,
            "aggregatetype",
        )?,
        "aggregatetype",
    )?;
    let aggregate_id = required(
        text(take(layout.aggregate_id, "aggregateid")?, "aggregateid")?,
        "aggregateid",
    )?;
    let event_type = required(text(take(layout.event_type, "type")?, "type")?, "type")?;
    let payload = take(layout.payload, "payload")?;
    let payload = match (payload, layout.payload_is_bytea) {
        (Some(hex), true) => Some(decode_bytea_hex(&hex).ok_or_else(|| {
            Error::stop(format!(
                "outbox payload at {position} (seq {seq}) is not in bytea hex form; \
                 is bytea_output set to escape for the replication role?"
            ))
        })?),
        (payload, _) => payload,
    };
    let headers_json = match layout.headers {
        Some(index) => text(take(index, "headers")?, "headers")?,
        None => None,
    };
    let created_at = match layout.created_at {
        Some(index) => text(take(index, "created_at")?, "created_at")?
            .as_deref()
            .and_then(crate::postgres::timestamp::iso_to_rfc3339_utc),
        None => None,
    };
    let trace_parent = match layout.trace_parent {
        Some(index) => text(take(index, "tracingspancontext")?, "tracingspancontext")?,
        None => None,
    };
    Ok(OutboxEvent {
        seq,
        id,
        aggregate_type,
        aggregate_id,
        event_type,
        payload,
        headers_json,
        trace_parent,
        position: Some(position),
        created_at,
        committed_at: None,
        poison: None,
    })
}

/// The event a logical message carries; a content that does not decode is
/// a poison event holding the raw content, so the dead letter keeps it.
fn message_event(lsn: Lsn, content: &[u8], position: SourcePosition) -> OutboxEvent {
    // An LSN is below 2^63 for any server that will ever run.
    let seq = i64::try_from(lsn.0).unwrap_or(i64::MAX);
    let (decoded, poison) = match super::message_encoding::decode(content) {
        Ok(decoded) => (decoded, None),
        Err(reason) => (
            super::message_encoding::MessageEvent {
                id: format!("wal-message-{lsn}"),
                aggregate_type: String::new(),
                aggregate_id: String::new(),
                event_type: String::new(),
                payload: Some(content.to_vec()),
                headers_json: None,
                trace_parent: None,
            },
            Some(format!("{reason} (message at {lsn})")),
        ),
    };
    OutboxEvent {
        seq,
        id: decoded.id,
        aggregate_type: decoded.aggregate_type,
        aggregate_id: decoded.aggregate_id,
        event_type: decoded.event_type,
        payload: decoded.payload,
        headers_json: decoded.headers_json,
        trace_parent: decoded.trace_parent,
        position: Some(position),
        created_at: None,
        committed_at: None,
        poison,
    }
}

/// `\x0aff…` → bytes.
fn decode_bytea_hex(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    hex.chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests;
