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

use std::fmt;

use crate::postgres::lsn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Start of a transaction ('B').
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 00:00:00 UTC.
        commit_time_micros: i64,
        xid: u32,
    },
    /// End of a transaction ('C').
    Commit {
        /// Unused by PostgreSQL so far; kept so nothing is silently dropped.
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
    let (kind, decode_rest): (&'static str, DecodeRest) = match tag {
        b'B' => ("Begin", |cursor| cursor.begin()),
        b'C' => ("Commit", |cursor| cursor.commit()),
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
    fn i64(&mut self, reading: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(reading)?))
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

    fn begin(&mut self) -> Result<Message, DecodeError> {
        let final_lsn = self.lsn("the final LSN")?;
        let commit_time_micros = self.i64("the commit timestamp")?;
        let xid = self.u32("the transaction id")?;
        Ok(Message::Begin {
            final_lsn,
            commit_time_micros,
            xid,
        })
    }

    fn commit(&mut self) -> Result<Message, DecodeError> {
        let flags = self.u8("the flags")?;
        let commit_lsn = self.lsn("the commit LSN")?;
        let end_lsn = self.lsn("the end LSN")?;
        let commit_time_micros = self.i64("the commit timestamp")?;
        Ok(Message::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time_micros,
        })
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
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const TAGS: &[u8] = b"BCORYIUDTM";

    /// Builds message bodies field by field, the way the test fixtures read.
    struct Encoder(Vec<u8>);

    impl Encoder {
        fn new(tag: u8) -> Encoder {
            Encoder(vec![tag])
        }
        fn u8(mut self, value: u8) -> Encoder {
            self.0.push(value);
            self
        }
        fn i16(mut self, value: i16) -> Encoder {
            self.0.extend_from_slice(&value.to_be_bytes());
            self
        }
        fn i32(mut self, value: i32) -> Encoder {
            self.0.extend_from_slice(&value.to_be_bytes());
            self
        }
        fn u32(mut self, value: u32) -> Encoder {
            self.0.extend_from_slice(&value.to_be_bytes());
            self
        }
        fn i64(mut self, value: i64) -> Encoder {
            self.0.extend_from_slice(&value.to_be_bytes());
            self
        }
        fn lsn(mut self, value: Lsn) -> Encoder {
            self.0.extend_from_slice(&value.0.to_be_bytes());
            self
        }
        fn cstr(mut self, value: &str) -> Encoder {
            self.0.extend_from_slice(value.as_bytes());
            self.0.push(0);
            self
        }
        fn raw(mut self, bytes: &[u8]) -> Encoder {
            self.0.extend_from_slice(bytes);
            self
        }
        fn counted(self, bytes: &[u8]) -> Encoder {
            let len = i32::try_from(bytes.len()).expect("test value fits Int32");
            self.i32(len).raw(bytes)
        }
        fn tuple(self, tuple: &Tuple) -> Encoder {
            let count = i16::try_from(tuple.0.len()).expect("test tuple fits Int16");
            tuple
                .0
                .iter()
                .fold(self.i16(count), |encoder, value| match value {
                    Value::Null => encoder.u8(b'n'),
                    Value::UnchangedToast => encoder.u8(b'u'),
                    Value::Text(bytes) => encoder.u8(b't').counted(bytes),
                    Value::Binary(bytes) => encoder.u8(b'b').counted(bytes),
                })
        }
        fn finish(self) -> Vec<u8> {
            self.0
        }
    }

    /// Encodes any message; Update and Delete get an empty new/key tuple,
    /// since the decoded form does not keep tuples (see `encode_update`).
    fn encode(message: &Message) -> Vec<u8> {
        match message {
            Message::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            } => Encoder::new(b'B')
                .lsn(*final_lsn)
                .i64(*commit_time_micros)
                .u32(*xid),
            Message::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time_micros,
            } => Encoder::new(b'C')
                .u8(*flags)
                .lsn(*commit_lsn)
                .lsn(*end_lsn)
                .i64(*commit_time_micros),
            Message::Origin { commit_lsn, name } => Encoder::new(b'O').lsn(*commit_lsn).cstr(name),
            Message::Relation(relation) => {
                let count = i16::try_from(relation.columns.len()).expect("fits Int16");
                relation.columns.iter().fold(
                    Encoder::new(b'R')
                        .u32(relation.id)
                        .cstr(&relation.namespace)
                        .cstr(&relation.name)
                        .u8(relation.replica_identity)
                        .i16(count),
                    |encoder, column| {
                        encoder
                            .u8(column.flags)
                            .cstr(&column.name)
                            .u32(column.type_oid)
                            .i32(column.type_modifier)
                    },
                )
            }
            Message::Type {
                oid,
                namespace,
                name,
            } => Encoder::new(b'Y').u32(*oid).cstr(namespace).cstr(name),
            Message::Insert { relation_id, new } => {
                Encoder::new(b'I').u32(*relation_id).u8(b'N').tuple(new)
            }
            Message::Update { relation_id } => {
                return encode_update(*relation_id, None, &Tuple::default())
            }
            Message::Delete { relation_id } => {
                return encode_delete(*relation_id, b'K', &Tuple::default())
            }
            Message::Truncate {
                relation_ids,
                options,
            } => {
                let count = i32::try_from(relation_ids.len()).expect("fits Int32");
                relation_ids
                    .iter()
                    .fold(Encoder::new(b'T').i32(count).u8(*options), |encoder, id| {
                        encoder.u32(*id)
                    })
            }
            Message::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => Encoder::new(b'M')
                .u8(u8::from(*transactional))
                .lsn(*lsn)
                .cstr(prefix)
                .counted(content),
        }
        .finish()
    }

    fn encode_update(relation_id: u32, old: Option<(u8, &Tuple)>, new: &Tuple) -> Vec<u8> {
        let encoder = Encoder::new(b'U').u32(relation_id);
        let encoder = match old {
            Some((marker, tuple)) => encoder.u8(marker).tuple(tuple),
            None => encoder,
        };
        encoder.u8(b'N').tuple(new).finish()
    }

    fn encode_delete(relation_id: u32, marker: u8, old: &Tuple) -> Vec<u8> {
        Encoder::new(b'D')
            .u32(relation_id)
            .u8(marker)
            .tuple(old)
            .finish()
    }

    /// Parses hand-written hex: whitespace is ignored, `--` starts a comment.
    fn hex(annotated: &str) -> Vec<u8> {
        let digits: Vec<u8> = annotated
            .lines()
            .flat_map(|line| line.split("--").next().unwrap_or("").bytes())
            .filter(|byte| !byte.is_ascii_whitespace())
            .collect();
        assert!(digits.len() % 2 == 0, "odd number of hex digits");
        digits
            .chunks(2)
            .map(|pair| {
                let pair = std::str::from_utf8(pair).expect("ascii");
                u8::from_str_radix(pair, 16).expect("hex digit pair")
            })
            .collect()
    }

    fn text(value: &str) -> Value {
        Value::Text(value.as_bytes().to_vec())
    }

    fn column(flags: u8, name: &str, type_oid: u32, type_modifier: i32) -> RelationColumn {
        RelationColumn {
            flags,
            name: name.to_owned(),
            type_oid,
            type_modifier,
        }
    }

    /// An outbox table whose columns are not in the order the relay expects,
    /// plus one column it does not know about.
    fn unusual_relation() -> Relation {
        Relation {
            id: 16_385,
            namespace: "app".to_owned(),
            name: "outbox".to_owned(),
            replica_identity: b'd',
            columns: vec![
                column(0, "payload", 3802, -1),
                column(0, "tenant", 1043, 68),
                column(1, "id", 20, -1),
                column(0, "topic", 25, -1),
            ],
        }
    }

    fn every_value_kind() -> Tuple {
        Tuple(vec![
            Value::Null,
            Value::UnchangedToast,
            text("hello"),
            Value::Binary(vec![0, 1, 0xFF]),
            Value::Text(Vec::new()),
        ])
    }

    fn sample_messages() -> Vec<Message> {
        vec![
            Message::Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_time_micros: 757_382_400_000_000,
                xid: 753,
            },
            Message::Commit {
                flags: 0,
                commit_lsn: Lsn(0x16_B374_D848),
                end_lsn: Lsn(0x16_B374_D878),
                commit_time_micros: -1,
            },
            Message::Origin {
                commit_lsn: Lsn(42),
                name: "upstream-é".to_owned(),
            },
            Message::Relation(unusual_relation()),
            Message::Type {
                oid: 90_001,
                namespace: "app".to_owned(),
                name: "mood".to_owned(),
            },
            Message::Insert {
                relation_id: 16_385,
                new: every_value_kind(),
            },
            Message::Insert {
                relation_id: 7,
                new: Tuple::default(),
            },
            Message::Update {
                relation_id: 16_385,
            },
            Message::Delete {
                relation_id: 16_385,
            },
            Message::Truncate {
                relation_ids: vec![16_385, 16_390],
                options: 3,
            },
            Message::Truncate {
                relation_ids: Vec::new(),
                options: 0,
            },
            Message::Message {
                transactional: true,
                lsn: Lsn(0x1_0000_0000),
                prefix: "outboxd".to_owned(),
                content: b"wake".to_vec(),
            },
            Message::Message {
                transactional: false,
                lsn: Lsn(5),
                prefix: String::new(),
                content: Vec::new(),
            },
        ]
    }

    /// Valid bodies for the truncation and fuzz tests: every sample plus
    /// the Update/Delete shapes that `encode` does not produce.
    fn valid_bodies() -> Vec<Vec<u8>> {
        let tuple = every_value_kind();
        let key = Tuple(vec![text("1")]);
        let mut bodies: Vec<Vec<u8>> = sample_messages().iter().map(encode).collect();
        bodies.push(encode_update(1, None, &tuple));
        bodies.push(encode_update(1, Some((b'K', &key)), &tuple));
        bodies.push(encode_update(1, Some((b'O', &tuple)), &tuple));
        bodies.push(encode_delete(1, b'K', &key));
        bodies.push(encode_delete(1, b'O', &tuple));
        bodies.extend([
            hex(BEGIN_HEX),
            hex(COMMIT_HEX),
            hex(RELATION_HEX),
            hex(INSERT_HEX),
        ]);
        bodies
    }

    fn decode_ok(body: &[u8]) -> Message {
        match decode(body) {
            Ok(message) => message,
            Err(error) => panic!("{error}"),
        }
    }

    fn decode_err(body: &[u8]) -> String {
        match decode(body) {
            Ok(message) => panic!("expected an error, decoded {message:?}"),
            Err(error) => error.to_string(),
        }
    }

    // Hand-written fixtures, byte by byte from the protocol documentation,
    // so the test encoder and the decoder cannot share one mistake.

    const BEGIN_HEX: &str = "
        42                                      -- 'B'
        00000016 B374D848                       -- final LSN 16/B374D848
        0002B0A4 6E1F5C00                       -- commit time
        000002F1                                -- xid 753";

    const COMMIT_HEX: &str = "
        43                                      -- 'C'
        00                                      -- flags
        00000016 B374D848                       -- commit LSN
        00000016 B374D878                       -- end LSN
        0002B0A4 6E1F5C00                       -- commit time";

    const RELATION_HEX: &str = "
        52                                      -- 'R'
        00004001                                -- oid 16385
        7075626C6963 00                         -- 'public'
        6F7574626F78 00                         -- 'outbox'
        64                                      -- replica identity 'd'
        0003                                    -- 3 columns
        01 6964 00 00000014 FFFFFFFF            -- key 'id' int8, typmod -1
        00 746F706963 00 00000019 FFFFFFFF      -- 'topic' text
        00 7061796C6F6164 00 00000EDA FFFFFFFF  -- 'payload' jsonb";

    const INSERT_HEX: &str = "
        49                                      -- 'I'
        00004001                                -- relation 16385
        4E                                      -- 'N'
        0003                                    -- 3 values
        74 00000002 3432                        -- text '42'
        6E                                      -- null
        62 00000003 010203                      -- binary 01 02 03";

    #[test]
    fn decodes_hand_written_begin() {
        assert_eq!(
            decode_ok(&hex(BEGIN_HEX)),
            Message::Begin {
                final_lsn: "16/B374D848".parse().expect("lsn"),
                commit_time_micros: 0x0002_B0A4_6E1F_5C00,
                xid: 753,
            }
        );
    }

    #[test]
    fn decodes_hand_written_commit() {
        assert_eq!(
            decode_ok(&hex(COMMIT_HEX)),
            Message::Commit {
                flags: 0,
                commit_lsn: Lsn(0x16_B374_D848),
                end_lsn: Lsn(0x16_B374_D878),
                commit_time_micros: 0x0002_B0A4_6E1F_5C00,
            }
        );
    }

    #[test]
    fn decodes_hand_written_relation() {
        let Message::Relation(relation) = decode_ok(&hex(RELATION_HEX)) else {
            panic!("not a Relation");
        };
        assert_eq!(
            relation,
            Relation {
                id: 16_385,
                namespace: "public".to_owned(),
                name: "outbox".to_owned(),
                replica_identity: b'd',
                columns: vec![
                    column(1, "id", 20, -1),
                    column(0, "topic", 25, -1),
                    column(0, "payload", 3802, -1),
                ],
            }
        );
    }

    #[test]
    fn decodes_hand_written_insert() {
        assert_eq!(
            decode_ok(&hex(INSERT_HEX)),
            Message::Insert {
                relation_id: 16_385,
                new: Tuple(vec![text("42"), Value::Null, Value::Binary(vec![1, 2, 3])]),
            }
        );
    }

    #[test]
    fn encoder_agrees_with_hand_written_fixtures() {
        let begin = Encoder::new(b'B')
            .lsn(Lsn(0x16_B374_D848))
            .i64(0x0002_B0A4_6E1F_5C00)
            .u32(753)
            .finish();
        assert_eq!(begin, hex(BEGIN_HEX));
        let insert = Encoder::new(b'I')
            .u32(16_385)
            .u8(b'N')
            .tuple(&Tuple(vec![
                text("42"),
                Value::Null,
                Value::Binary(vec![1, 2, 3]),
            ]))
            .finish();
        assert_eq!(insert, hex(INSERT_HEX));
    }

    #[test]
    fn every_sample_round_trips() {
        for message in sample_messages() {
            assert_eq!(decode_ok(&encode(&message)), message);
        }
    }

    #[test]
    fn relation_columns_are_found_by_name_whatever_their_order() {
        let relation = unusual_relation();
        let decoded = decode_ok(&encode(&Message::Relation(relation.clone())));
        assert_eq!(decoded, Message::Relation(relation.clone()));
        assert_eq!(relation.column_index("payload"), Some(0));
        assert_eq!(relation.column_index("tenant"), Some(1));
        assert_eq!(relation.column_index("id"), Some(2));
        assert_eq!(relation.column_index("topic"), Some(3));
        assert_eq!(relation.column_index("headers"), None);
        assert_eq!(relation.column_index("ID"), None);
    }

    #[test]
    fn insert_keeps_every_value_kind() {
        let body = encode(&Message::Insert {
            relation_id: 16_385,
            new: every_value_kind(),
        });
        let Message::Insert { relation_id, new } = decode_ok(&body) else {
            panic!("not an Insert");
        };
        assert_eq!(relation_id, 16_385);
        assert_eq!(new, every_value_kind());
    }

    #[test]
    fn update_with_and_without_old_tuple() {
        let new = every_value_kind();
        let key = Tuple(vec![text("1")]);
        let expected = Message::Update { relation_id: 9 };
        assert_eq!(decode_ok(&encode_update(9, None, &new)), expected);
        assert_eq!(
            decode_ok(&encode_update(9, Some((b'K', &key)), &new)),
            expected
        );
        assert_eq!(
            decode_ok(&encode_update(9, Some((b'O', &new)), &new)),
            expected
        );
    }

    #[test]
    fn update_tuples_are_validated_though_not_kept() {
        let mut body = encode_update(9, Some((b'K', &Tuple(vec![text("1")]))), &Tuple::default());
        // The old key's value kind 't' (after tag, oid, 'K', count) becomes 'x'.
        body[8] = b'x';
        assert_eq!(
            decode_err(&body),
            "pgoutput Update message has unknown tuple value kind 0x78 at byte 8"
        );
        let missing_new = Encoder::new(b'U')
            .u32(9)
            .u8(b'K')
            .tuple(&Tuple::default())
            .finish();
        assert!(decode_err(&missing_new).contains("truncated at byte 8"));
        let key_twice = Encoder::new(b'U')
            .u32(9)
            .u8(b'K')
            .tuple(&Tuple::default())
            .u8(b'K')
            .tuple(&Tuple::default())
            .finish();
        assert_eq!(
            decode_err(&key_twice),
            "pgoutput Update message has byte 0x4B at byte 8 where 'N' was expected"
        );
    }

    #[test]
    fn delete_with_key_or_old_row() {
        let expected = Message::Delete { relation_id: 12 };
        let key = Tuple(vec![text("1"), Value::Null]);
        assert_eq!(decode_ok(&encode_delete(12, b'K', &key)), expected);
        assert_eq!(
            decode_ok(&encode_delete(12, b'O', &every_value_kind())),
            expected
        );
        assert_eq!(
            decode_err(&encode_delete(12, b'N', &key)),
            "pgoutput Delete message has byte 0x4E at byte 5 where 'K' or 'O' was expected"
        );
    }

    #[test]
    fn truncate_lists_relations_and_options() {
        let body = Encoder::new(b'T')
            .i32(3)
            .u8(1)
            .u32(10)
            .u32(20)
            .u32(u32::MAX)
            .finish();
        assert_eq!(
            decode_ok(&body),
            Message::Truncate {
                relation_ids: vec![10, 20, u32::MAX],
                options: 1,
            }
        );
    }

    #[test]
    fn logical_message_transactional_and_not() {
        for transactional in [true, false] {
            let message = Message::Message {
                transactional,
                lsn: Lsn(77),
                prefix: "outboxd/wake".to_owned(),
                content: vec![0, 1, 2, 0],
            };
            assert_eq!(decode_ok(&encode(&message)), message);
        }
        // Only the lowest bit means transactional; others are ignored.
        let flagged = Encoder::new(b'M')
            .u8(0b11)
            .lsn(Lsn(1))
            .cstr("p")
            .counted(b"")
            .finish();
        assert!(matches!(
            decode_ok(&flagged),
            Message::Message {
                transactional: true,
                ..
            }
        ));
    }

    #[test]
    fn origin_and_type() {
        let origin = Encoder::new(b'O').lsn(Lsn(0xAB)).cstr("node_a").finish();
        assert_eq!(
            decode_ok(&origin),
            Message::Origin {
                commit_lsn: Lsn(0xAB),
                name: "node_a".to_owned(),
            }
        );
        let type_message = Encoder::new(b'Y')
            .u32(16_400)
            .cstr("")
            .cstr("mood")
            .finish();
        assert_eq!(
            decode_ok(&type_message),
            Message::Type {
                oid: 16_400,
                namespace: String::new(),
                name: "mood".to_owned(),
            }
        );
    }

    #[test]
    fn empty_body_is_an_error() {
        assert_eq!(decode_err(&[]), "empty pgoutput message");
    }

    #[test]
    fn unknown_tag_is_named() {
        assert_eq!(
            decode_err(b"Z\x00\x00"),
            "unknown pgoutput message tag 0x5A"
        );
        // Streaming and two-phase tags belong to later protocol versions.
        for tag in [b'S', b'E', b'c', b'A', b'b', b'P', b'K', b'r', b'p'] {
            assert!(decode_err(&[tag]).starts_with("unknown pgoutput message tag"));
        }
    }

    #[test]
    fn every_strict_prefix_of_insert_and_relation_is_truncated() {
        let insert = encode(&Message::Insert {
            relation_id: 1,
            new: every_value_kind(),
        });
        let relation = encode(&Message::Relation(unusual_relation()));
        for body in [insert, relation, hex(INSERT_HEX), hex(RELATION_HEX)] {
            assert!(decode(&body).is_ok());
            assert_eq!(decode_err(&body[..0]), "empty pgoutput message");
            for len in 1..body.len() {
                let error = decode_err(&body[..len]);
                assert!(error.contains("truncated at byte"), "{len}: {error}");
            }
        }
    }

    #[test]
    fn every_strict_prefix_of_every_fixture_fails() {
        for body in valid_bodies() {
            assert!(decode(&body).is_ok());
            for len in 0..body.len() {
                assert!(decode(&body[..len]).is_err(), "{body:?} at {len}");
            }
        }
    }

    #[test]
    fn truncation_names_kind_offset_and_field() {
        let body = hex(INSERT_HEX);
        assert_eq!(
            decode_err(&body[..11]),
            "pgoutput Insert message truncated at byte 9 \
             (reading a text value length: needs 4 bytes, 2 left)"
        );
        assert_eq!(
            decode_err(&hex(RELATION_HEX)[..9]),
            "pgoutput Relation message truncated at byte 5 \
             (reading the namespace: no terminating NUL in the 4 bytes left)"
        );
    }

    #[test]
    fn trailing_bytes_are_counted() {
        let mut body = hex(BEGIN_HEX);
        body.extend_from_slice(&[0, 0, 0]);
        assert_eq!(
            decode_err(&body),
            "pgoutput Begin message has 3 trailing bytes after byte 21"
        );
        for mut body in valid_bodies() {
            body.push(0);
            assert!(decode_err(&body).contains("1 trailing bytes"));
        }
    }

    #[test]
    fn negative_lengths_and_counts_are_errors() {
        let text_length = Encoder::new(b'I')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(-1)
            .finish();
        assert_eq!(
            decode_err(&text_length),
            "pgoutput Insert message has negative value -1 for a text value length at byte 9"
        );
        let binary_length = Encoder::new(b'I')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .u8(b'b')
            .i32(i32::MIN)
            .finish();
        assert!(decode_err(&binary_length).contains("negative"));
        let tuple_count = Encoder::new(b'I').u32(1).u8(b'N').i16(-3).finish();
        assert!(decode_err(&tuple_count).contains("negative value -3 for the tuple column count"));
        let column_count = Encoder::new(b'R')
            .u32(1)
            .cstr("")
            .cstr("t")
            .u8(b'd')
            .i16(-1)
            .finish();
        assert!(decode_err(&column_count).contains("negative value -1 for the column count"));
        let relation_count = Encoder::new(b'T').i32(-1).u8(0).finish();
        assert!(decode_err(&relation_count).contains("negative value -1 for the relation count"));
        let content_length = Encoder::new(b'M')
            .u8(0)
            .lsn(Lsn(1))
            .cstr("p")
            .i32(-5)
            .finish();
        assert!(decode_err(&content_length).contains("negative value -5 for the content length"));
    }

    #[test]
    fn forged_huge_counts_fail_without_huge_allocations() {
        let relations = Encoder::new(b'T').i32(i32::MAX).u8(0).u32(1).finish();
        assert!(decode_err(&relations).contains("truncated"));
        let columns = Encoder::new(b'R')
            .u32(1)
            .cstr("")
            .cstr("t")
            .u8(b'd')
            .i16(i16::MAX)
            .finish();
        assert!(decode_err(&columns).contains("truncated"));
        let values = Encoder::new(b'I').u32(1).u8(b'N').i16(i16::MAX).finish();
        assert!(decode_err(&values).contains("truncated"));
        let content = Encoder::new(b'M')
            .u8(0)
            .lsn(Lsn(1))
            .cstr("p")
            .i32(i32::MAX)
            .finish();
        assert!(decode_err(&content).contains("needs 2147483647 bytes, 0 left"));
    }

    #[test]
    fn invalid_utf8_in_names_is_an_error() {
        let relation_name = Encoder::new(b'R')
            .u32(1)
            .cstr("public")
            .raw(b"out\xFFbox\0")
            .u8(b'd')
            .i16(0)
            .finish();
        assert_eq!(
            decode_err(&relation_name),
            "pgoutput Relation message has invalid UTF-8 in the relation name at byte 15"
        );
        let column_name = Encoder::new(b'R')
            .u32(1)
            .cstr("public")
            .cstr("outbox")
            .u8(b'd')
            .i16(1)
            .u8(0)
            .raw(b"\xC3\0")
            .u32(25)
            .i32(-1)
            .finish();
        assert!(decode_err(&column_name).contains("invalid UTF-8 in a column name"));
        let prefix = Encoder::new(b'M')
            .u8(0)
            .lsn(Lsn(1))
            .raw(b"\x80\0")
            .counted(b"")
            .finish();
        assert!(decode_err(&prefix).contains("invalid UTF-8 in the prefix"));
        // Content and text values are bytes, not checked as UTF-8.
        let content = Encoder::new(b'M')
            .u8(0)
            .lsn(Lsn(1))
            .cstr("")
            .counted(b"\xFF")
            .finish();
        assert!(decode(&content).is_ok());
    }

    #[test]
    fn bad_tuple_value_kind_is_named() {
        let body = Encoder::new(b'I')
            .u32(1)
            .u8(b'N')
            .i16(2)
            .u8(b'n')
            .u8(b'x')
            .finish();
        assert_eq!(
            decode_err(&body),
            "pgoutput Insert message has unknown tuple value kind 0x78 at byte 9"
        );
        let wrong_marker = Encoder::new(b'I').u32(1).u8(b'K').i16(0).finish();
        assert_eq!(
            decode_err(&wrong_marker),
            "pgoutput Insert message has byte 0x4B at byte 5 where 'N' was expected"
        );
    }

    #[test]
    fn decode_error_is_a_std_error() {
        let error: Box<dyn std::error::Error> = match decode(b"") {
            Ok(message) => panic!("decoded {message:?}"),
            Err(error) => Box::new(error),
        };
        assert_eq!(error.to_string(), "empty pgoutput message");
    }

    #[test]
    fn fuzz_random_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x0DEC_0DE5);
        let mut body = Vec::with_capacity(200);
        let mut decoded = 0;
        for _ in 0..20_000 {
            body.clear();
            let len = rng.random_range(0..200);
            for _ in 0..len {
                body.push(rng.random::<u8>());
            }
            if let Some(first) = body.first_mut() {
                if rng.random_bool(0.8) {
                    *first = TAGS[rng.random_range(0..TAGS.len())];
                }
            }
            if decode(&body).is_ok() {
                decoded += 1;
            }
        }
        // Random bytes are almost never a whole message; this mainly checks
        // the loop ran, the real assertion is that nothing panicked.
        assert!(decoded < 20_000);
    }

    #[test]
    fn fuzz_single_byte_mutations_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x5EED);
        for original in valid_bodies() {
            let mut body = original.clone();
            for _ in 0..2_000 {
                let position = rng.random_range(0..body.len());
                let value = rng.random::<u8>();
                body.copy_from_slice(&original);
                body[position] = value;
                let _ = decode(&body);
                // Also with the mutation and a random cut, to mix both faults.
                let cut = rng.random_range(0..=body.len());
                let _ = decode(&body[..cut]);
            }
        }
    }
}
