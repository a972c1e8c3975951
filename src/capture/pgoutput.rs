//! Decoding pgoutput logical-replication messages, protocol version 1.
//!
//! Invariant: `decode` either returns a message that accounts for every byte
//! of the body, or an error naming the message kind and byte offset; it never
//! panics, and what it allocates stays proportional to the body's length
//! whatever counts the bytes claim.
//!
//! The input is the body of one `XLogData` copy message, i.e. what
//! PostgreSQL's "Logical Replication Message Formats" page describes. Only
//! protocol version 1 is understood: no streamed or two-phase transactions,
//! so no message carries a leading transaction id.
//!
//! Begin ('B') and Commit ('C') are not decoded here: `pgwire-replication`
//! reads every body with those tags itself and hands over its own Begin and
//! Commit events instead, which `wire` turns into [`Message::Begin`] and
//! [`Message::Commit`]. So `decode` never sees them; if one reached it
//! anyway, it is an unknown tag, and `wire` stops the relay on that error
//! rather than lose a transaction boundary.

use std::fmt;

use crate::postgres::lsn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Start of a transaction ('B'), built by `wire` from the client's event.
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 00:00:00 UTC.
        commit_time_micros: i64,
        xid: u32,
    },
    /// End of a transaction ('C'), built by `wire` from the client's event.
    Commit {
        /// Always 0: the client does not pass the flags on, and PostgreSQL
        /// sets none so far.
        flags: u8,
        commit_lsn: Lsn,
        /// LSN just past the commit record: the position to confirm as flushed.
        end_lsn: Lsn,
        /// Microseconds since 2000-01-01 00:00:00 UTC.
        commit_time_micros: i64,
    },
    /// The replication origin the transaction came from ('O').
    Origin { commit_lsn: Lsn, name: String },
    /// A table's shape, sent before its first row change in a session ('R').
    Relation(Relation),
    /// A non-built-in data type used by a relation's columns ('Y').
    Type {
        oid: u32,
        /// As sent; empty means `pg_catalog`.
        namespace: String,
        name: String,
    },
    /// A new row ('I').
    Insert { relation_id: u32, new: Tuple },
    /// A changed row ('U'). The tuples are checked but not kept: the relay
    /// only needs to know that a row of this table changed.
    Update { relation_id: u32 },
    /// A removed row ('D'). As with `Update`, the key tuple is checked but
    /// not kept.
    Delete { relation_id: u32 },
    /// `TRUNCATE` of one or more tables ('T').
    Truncate {
        relation_ids: Vec<u32>,
        /// Bit flags: 1 = `CASCADE`, 2 = `RESTART IDENTITY`.
        options: u8,
    },
    /// A `pg_logical_emit_message` message ('M').
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
}

/// The shape of a table, as sent in a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's oid; row messages refer to it as `relation_id`.
    pub id: u32,
    /// As sent; empty means `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `REPLICA IDENTITY` setting: b'd' default, b'n' nothing, b'f' full,
    /// b'i' index.
    pub replica_identity: u8,
    /// In table attribute order, which is also the order of values in this
    /// relation's tuples. That order is whatever the table's DDL history made
    /// it, so find columns with [`Relation::column_index`], not by position.
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    /// Position of the column called `name`, i.e. the index of its value in
    /// this relation's tuples.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|column| column.name == name)
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// 1 if the column is part of the replica identity key, else 0.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`, e.g. -1 when the type has no modifier.
    pub type_modifier: i32,
}

/// One column value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value the change did not touch, so Postgres did not send it.
    UnchangedToast,
    /// The type's text output form.
    Text(Vec<u8>),
    /// The type's binary send form (only when replication was started with
    /// the `binary` option).
    Binary(Vec<u8>),
}

/// A row's values, in the column order of its [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Value>);

/// Why a message body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Message kind ("Insert", ...), or empty before the tag is known.
    kind: &'static str,
    /// Byte offset in the body (the tag is byte 0) where the problem starts.
    offset: usize,
    problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Problem {
    Empty,
    UnknownTag(u8),
    Truncated {
        reading: &'static str,
        needed: usize,
        left: usize,
    },
    Unterminated {
        reading: &'static str,
        left: usize,
    },
    Negative {
        what: &'static str,
        value: i32,
    },
    InvalidUtf8 {
        what: &'static str,
    },
    UnexpectedMarker {
        found: u8,
        expected: &'static str,
    },
    UnknownValueKind(u8),
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DecodeError {
            kind,
            offset,
            problem,
        } = self;
        match problem {
            Problem::Empty => write!(f, "empty pgoutput message"),
            Problem::UnknownTag(tag) => write!(f, "unknown pgoutput message tag 0x{tag:02X}"),
            Problem::Truncated {
                reading,
                needed,
                left,
            } => write!(
                f,
                "pgoutput {kind} message truncated at byte {offset} \
                 (reading {reading}: needs {needed} bytes, {left} left)"
            ),
            Problem::Unterminated { reading, left } => write!(
                f,
                "pgoutput {kind} message truncated at byte {offset} \
                 (reading {reading}: no terminating NUL in the {left} bytes left)"
            ),
            Problem::Negative { what, value } => write!(
                f,
                "pgoutput {kind} message has negative value {value} for {what} \
                 at byte {offset}"
            ),
            Problem::InvalidUtf8 { what } => write!(
                f,
                "pgoutput {kind} message has invalid UTF-8 in {what} at byte {offset}"
            ),
            Problem::UnexpectedMarker { found, expected } => write!(
                f,
                "pgoutput {kind} message has byte 0x{found:02X} at byte {offset} \
                 where {expected} was expected"
            ),
            Problem::UnknownValueKind(found) => write!(
                f,
                "pgoutput {kind} message has unknown tuple value kind 0x{found:02X} \
                 at byte {offset}"
            ),
            Problem::TrailingBytes(count) => write!(
                f,
                "pgoutput {kind} message has {count} trailing bytes after byte {offset}"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one pgoutput message body (the bytes inside `XLogData`).
pub fn decode(body: &[u8]) -> Result<Message, DecodeError> {
    let Some((&tag, after_tag)) = body.split_first() else {
        return Err(DecodeError {
            kind: "",
            offset: 0,
            problem: Problem::Empty,
        });
    };
    // One table from tag to name and body decoder, so the two cannot drift.
    // No 'B' or 'C': the wire client consumes them (see the module comment).
    let (kind, decode_rest): (&'static str, DecodeRest) = match tag {
        b'O' => ("Origin", |cursor| cursor.origin()),
        b'R' => ("Relation", |cursor| cursor.relation()),
        b'Y' => ("Type", |cursor| cursor.type_message()),
        b'I' => ("Insert", |cursor| cursor.insert()),
        b'U' => ("Update", |cursor| cursor.update()),
        b'D' => ("Delete", |cursor| cursor.delete()),
        b'T' => ("Truncate", |cursor| cursor.truncate()),
        b'M' => ("Message", |cursor| cursor.logical_message()),
        _ => {
            return Err(DecodeError {
                kind: "",
                offset: 0,
                problem: Problem::UnknownTag(tag),
            })
        }
    };
    let mut cursor = Cursor {
        rest: after_tag,
        body_len: body.len(),
        kind,
    };
    let message = decode_rest(&mut cursor)?;
    cursor.expect_end()?;
    Ok(message)
}

/// Decodes what follows a message's tag.
type DecodeRest = fn(&mut Cursor<'_>) -> Result<Message, DecodeError>;

/// Smallest encoding of one Relation column: flags, an empty name's NUL, type
/// oid, type modifier. Used to bound allocation by what the body could hold.
const MIN_RELATION_COLUMN_BYTES: usize = 1 + 1 + 4 + 4;
/// Smallest encoding of one tuple value: its kind byte ('n' or 'u').
const MIN_TUPLE_VALUE_BYTES: usize = 1;
const RELATION_ID_BYTES: usize = 4;

/// A tuple value still borrowing from the body, so tuples that are only
/// validated (Update, Delete) cost no allocation.
enum RawValue<'a> {
    Null,
    UnchangedToast,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

impl RawValue<'_> {
    fn to_owned_value(&self) -> Value {
        match self {
            RawValue::Null => Value::Null,
            RawValue::UnchangedToast => Value::UnchangedToast,
            RawValue::Text(bytes) => Value::Text(bytes.to_vec()),
            RawValue::Binary(bytes) => Value::Binary(bytes.to_vec()),
        }
    }
}

/// Reads big-endian fields off the front of the unread part of a body. Every
/// read checks length first, so running out of bytes is an error, not a panic.
struct Cursor<'a> {
    rest: &'a [u8],
    body_len: usize,
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> usize {
        self.body_len - self.rest.len()
    }

    fn error_at(&self, offset: usize, problem: Problem) -> DecodeError {
        DecodeError {
            kind: self.kind,
            offset,
            problem,
        }
    }

    fn truncated(&self, reading: &'static str, needed: usize) -> DecodeError {
        self.error_at(
            self.offset(),
            Problem::Truncated {
                reading,
                needed,
                left: self.rest.len(),
            },
        )
    }

    #[inline]
    fn array<const N: usize>(&mut self, reading: &'static str) -> Result<[u8; N], DecodeError> {
        let Some((bytes, rest)) = self.rest.split_first_chunk::<N>() else {
            return Err(self.truncated(reading, N));
        };
        self.rest = rest;
        Ok(*bytes)
    }

    #[inline]
    fn u8(&mut self, reading: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array(reading)?))
    }

    #[inline]
    fn i16(&mut self, reading: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(reading)?))
    }

    #[inline]
    fn i32(&mut self, reading: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(reading)?))
    }

    #[inline]
    fn u32(&mut self, reading: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(reading)?))
    }

    #[inline]
    fn lsn(&mut self, reading: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array(reading)?)))
    }

    #[inline]
    fn bytes(&mut self, len: usize, reading: &'static str) -> Result<&'a [u8], DecodeError> {
        let Some((bytes, rest)) = self.rest.split_at_checked(len) else {
            return Err(self.truncated(reading, len));
        };
        self.rest = rest;
        Ok(bytes)
    }

    /// A NUL-terminated UTF-8 string; the NUL is consumed, not returned.
    fn cstr(&mut self, reading: &'static str) -> Result<String, DecodeError> {
        let start = self.offset();
        let Some(nul) = self.rest.iter().position(|&byte| byte == 0) else {
            return Err(self.error_at(
                start,
                Problem::Unterminated {
                    reading,
                    left: self.rest.len(),
                },
            ));
        };
        let text = self.bytes(nul, reading)?;
        self.bytes(1, reading)?;
        match std::str::from_utf8(text) {
            Ok(text) => Ok(text.to_owned()),
            Err(error) => Err(self.error_at(
                start + error.valid_up_to(),
                Problem::InvalidUtf8 { what: reading },
            )),
        }
    }

    /// An Int16 count that must not be negative.
    fn count_i16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let start = self.offset();
        let value = self.i16(what)?;
        usize::try_from(value).map_err(|_| {
            self.error_at(
                start,
                Problem::Negative {
                    what,
                    value: i32::from(value),
                },
            )
        })
    }

    /// An Int32 count or length that must not be negative.
    fn count_i32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let start = self.offset();
        let value = self.i32(what)?;
        usize::try_from(value).map_err(|_| self.error_at(start, Problem::Negative { what, value }))
    }

    /// Capacity for `count` items of at least `min_item_bytes` each: never
    /// more than the unread bytes could hold, so a forged count cannot make
    /// us allocate beyond the body's size.
    fn capacity_for(&self, count: usize, min_item_bytes: usize) -> usize {
        count.min(self.rest.len() / min_item_bytes)
    }

    fn expect_end(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.error_at(self.offset(), Problem::TrailingBytes(self.rest.len())))
        }
    }

    /// The 'N' that precedes a new row's tuple.
    fn expect_new_tuple_marker(&mut self) -> Result<(), DecodeError> {
        let start = self.offset();
        match self.u8("the tuple marker")? {
            b'N' => Ok(()),
            other => Err(self.unexpected_marker(start, other, "'N'")),
        }
    }

    fn unexpected_marker(&self, start: usize, found: u8, expected: &'static str) -> DecodeError {
        self.error_at(start, Problem::UnexpectedMarker { found, expected })
    }

    fn origin(&mut self) -> Result<Message, DecodeError> {
        let commit_lsn = self.lsn("the commit LSN")?;
        let name = self.cstr("the origin name")?;
        Ok(Message::Origin { commit_lsn, name })
    }

    fn relation(&mut self) -> Result<Message, DecodeError> {
        let id = self.u32("the relation oid")?;
        let namespace = self.cstr("the namespace")?;
        let name = self.cstr("the relation name")?;
        let replica_identity = self.u8("the replica identity")?;
        let column_count = self.count_i16("the column count")?;
        let mut columns =
            Vec::with_capacity(self.capacity_for(column_count, MIN_RELATION_COLUMN_BYTES));
        for _ in 0..column_count {
            let flags = self.u8("a column's flags")?;
            let name = self.cstr("a column name")?;
            let type_oid = self.u32("a column type oid")?;
            let type_modifier = self.i32("a column type modifier")?;
            columns.push(RelationColumn {
                flags,
                name,
                type_oid,
                type_modifier,
            });
        }
        Ok(Message::Relation(Relation {
            id,
            namespace,
            name,
            replica_identity,
            columns,
        }))
    }

    fn type_message(&mut self) -> Result<Message, DecodeError> {
        let oid = self.u32("the type oid")?;
        let namespace = self.cstr("the namespace")?;
        let name = self.cstr("the type name")?;
        Ok(Message::Type {
            oid,
            namespace,
            name,
        })
    }

    fn insert(&mut self) -> Result<Message, DecodeError> {
        let relation_id = self.u32("the relation oid")?;
        self.expect_new_tuple_marker()?;
        let new = self.tuple()?;
        Ok(Message::Insert { relation_id, new })
    }

    fn update(&mut self) -> Result<Message, DecodeError> {
        let relation_id = self.u32("the relation oid")?;
        let start = self.offset();
        match self.u8("the tuple marker")? {
            // The old key or old row comes first, but only when the key
            // changed or the table has REPLICA IDENTITY FULL.
            b'K' | b'O' => {
                self.skip_tuple()?;
                self.expect_new_tuple_marker()?;
            }
            b'N' => {}
            other => return Err(self.unexpected_marker(start, other, "'K', 'O' or 'N'")),
        }
        self.skip_tuple()?;
        Ok(Message::Update { relation_id })
    }

    fn delete(&mut self) -> Result<Message, DecodeError> {
        let relation_id = self.u32("the relation oid")?;
        let start = self.offset();
        match self.u8("the tuple marker")? {
            b'K' | b'O' => {}
            other => return Err(self.unexpected_marker(start, other, "'K' or 'O'")),
        }
        self.skip_tuple()?;
        Ok(Message::Delete { relation_id })
    }

    fn truncate(&mut self) -> Result<Message, DecodeError> {
        let relation_count = self.count_i32("the relation count")?;
        let options = self.u8("the options")?;
        let mut relation_ids =
            Vec::with_capacity(self.capacity_for(relation_count, RELATION_ID_BYTES));
        for _ in 0..relation_count {
            relation_ids.push(self.u32("a relation oid")?);
        }
        Ok(Message::Truncate {
            relation_ids,
            options,
        })
    }

    fn logical_message(&mut self) -> Result<Message, DecodeError> {
        let flags = self.u8("the flags")?;
        let lsn = self.lsn("the message LSN")?;
        let prefix = self.cstr("the prefix")?;
        let content_len = self.count_i32("the content length")?;
        let content = self.bytes(content_len, "the content")?.to_vec();
        Ok(Message::Message {
            transactional: flags & 1 != 0,
            lsn,
            prefix,
            content,
        })
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let column_count = self.count_i16("the tuple column count")?;
        let mut values = Vec::with_capacity(self.capacity_for(column_count, MIN_TUPLE_VALUE_BYTES));
        for _ in 0..column_count {
            values.push(self.value()?.to_owned_value());
        }
        Ok(Tuple(values))
    }

    /// Checks a tuple's encoding without copying its values.
    fn skip_tuple(&mut self) -> Result<(), DecodeError> {
        let column_count = self.count_i16("the tuple column count")?;
        for _ in 0..column_count {
            self.value()?;
        }
        Ok(())
    }

    fn value(&mut self) -> Result<RawValue<'a>, DecodeError> {
        let start = self.offset();
        match self.u8("a tuple value kind")? {
            b'n' => Ok(RawValue::Null),
            b'u' => Ok(RawValue::UnchangedToast),
            b't' => {
                let len = self.count_i32("a text value length")?;
                Ok(RawValue::Text(self.bytes(len, "a text value")?))
            }
            b'b' => {
                let len = self.count_i32("a binary value length")?;
                Ok(RawValue::Binary(self.bytes(len, "a binary value")?))
            }
            other => Err(self.error_at(start, Problem::UnknownValueKind(other))),
        }
    }
}

#[cfg(test)]
mod tests;
