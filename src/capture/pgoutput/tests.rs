use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const TAGS: &[u8] = b"ORYIUDTM";

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

/// Encodes any message `decode` returns; Update and Delete get an empty
/// new/key tuple, since the decoded form does not keep tuples (see
/// `encode_update`).
fn encode(message: &Message) -> Vec<u8> {
    match message {
        Message::Begin { .. } | Message::Commit { .. } => {
            panic!("the wire client builds transaction boundaries; decode never returns them")
        }
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
    bodies.extend([hex(ORIGIN_HEX), hex(RELATION_HEX), hex(INSERT_HEX)]);
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

const ORIGIN_HEX: &str = "
    4F                                      -- 'O'
    00000016 B374D848                       -- commit LSN 16/B374D848
    6E6F64655F61 00                         -- 'node_a'";

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
fn decodes_hand_written_origin() {
    assert_eq!(
        decode_ok(&hex(ORIGIN_HEX)),
        Message::Origin {
            commit_lsn: "16/B374D848".parse().expect("lsn"),
            name: "node_a".to_owned(),
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
    let origin = Encoder::new(b'O')
        .lsn(Lsn(0x16_B374_D848))
        .cstr("node_a")
        .finish();
    assert_eq!(origin, hex(ORIGIN_HEX));
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
    // Begin and Commit reach the relay through the wire client, not here
    // (see the module comment); streaming and two-phase tags belong to
    // later protocol versions.
    for tag in [
        b'B', b'C', b'S', b'E', b'c', b'A', b'b', b'P', b'K', b'r', b'p',
    ] {
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
    let mut body = hex(ORIGIN_HEX);
    body.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        decode_err(&body),
        "pgoutput Origin message has 3 trailing bytes after byte 16"
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
