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
        end_lsn: Lsn,
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
        }
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
                if self.transaction.take().is_none() {
                    return Err(protocol_error(format!(
                        "a commit ending at {end_lsn} arrived outside a transaction"
                    )));
                }
                Ok(Some(Captured::TransactionEnd { end_lsn }))
            }
            Message::Relation(relation) => {
                let layout = if relation.namespace == self.schema && relation.name == self.table {
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
            Message::Origin { .. } | Message::Type { .. } | Message::Message { .. } => Ok(None),
        }
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
    })
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
