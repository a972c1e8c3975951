use super::*;
use crate::capture::pgoutput::RelationColumn;

fn outbox() -> OutboxTable {
    OutboxTable::named("public.outbox").expect("table")
}

fn column(name: &str, type_oid: u32) -> RelationColumn {
    RelationColumn {
        flags: 0,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    }
}

/// The outbox with its columns shuffled and a column of the user's own.
fn shuffled_relation(id: u32, payload_oid: u32) -> Relation {
    Relation {
        id,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: b'd',
        columns: vec![
            column("type", 25),
            column("tenant", 25),
            column("payload", payload_oid),
            column("seq", 20),
            column("aggregateid", 25),
            column("id", 2950),
            column("aggregatetype", 25),
            column("headers", 3802),
            column("tracingspancontext", 25),
            column("created_at", 1184),
            column("sent_at", 1184),
        ],
    }
}

fn text(value: &str) -> Value {
    Value::Text(value.as_bytes().to_vec())
}

fn row(seq: i64, payload: Value) -> Tuple {
    Tuple(vec![
        text("OrderCreated"),
        text("acme"),
        payload,
        text(&seq.to_string()),
        text("order-1"),
        text("0b6c3d5e-0000-4000-8000-000000000001"),
        text("Order"),
        Value::Null,
        text("00-trace"),
        text("2026-11-21 10:00:00+00"),
        Value::Null,
    ])
}

fn message(message: Message) -> StreamItem {
    StreamItem::Message(message)
}

fn begin(lsn: u64) -> StreamItem {
    message(Message::Begin {
        final_lsn: Lsn(lsn),
        commit_time_micros: 0,
        xid: 7,
    })
}

fn commit(lsn: u64, end: u64) -> StreamItem {
    message(Message::Commit {
        flags: 0,
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(end),
        commit_time_micros: 0,
    })
}

fn insert(relation_id: u32, tuple: Tuple) -> StreamItem {
    message(Message::Insert {
        relation_id,
        new: tuple,
    })
}

fn run(assembler: &mut Assembler, items: Vec<StreamItem>) -> Vec<Captured> {
    items
        .into_iter()
        .filter_map(|item| assembler.accept(item).expect("accepted"))
        .collect()
}

fn event_positions(captured: &[Captured]) -> Vec<(i64, u64, u32)> {
    captured
        .iter()
        .filter_map(|c| match c {
            Captured::Event(e) => {
                let p = e.position.expect("replication events have positions");
                Some((e.seq, p.commit_lsn.0, p.index))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn reads_columns_by_name_whatever_their_order() {
    let mut assembler = Assembler::new(&outbox(), OtherChangesPolicy::Warn, None);
    let captured = run(
        &mut assembler,
        vec![
            message(Message::Relation(shuffled_relation(16384, 3802))),
            begin(100),
            insert(16384, row(42, text("{\"orderId\": 1}"))),
            commit(100, 120),
        ],
    );
    let Captured::Event(event) = &captured[0] else {
        panic!("expected an event, got {captured:?}")
    };
    assert_eq!(event.seq, 42);
    assert_eq!(event.event_type, "OrderCreated");
    assert_eq!(event.aggregate_type, "Order");
    assert_eq!(event.aggregate_id, "order-1");
    assert_eq!(event.id, "0b6c3d5e-0000-4000-8000-000000000001");
    assert_eq!(event.payload.as_deref(), Some(&b"{\"orderId\": 1}"[..]));
    assert_eq!(event.headers_json, None);
    assert_eq!(event.trace_parent.as_deref(), Some("00-trace"));
    assert_eq!(
        captured[1],
        Captured::TransactionEnd {
            end_lsn: Lsn(120),
            confirm_lsn: Lsn(120)
        }
    );
}

#[test]
fn rows_sharing_one_commit_lsn_get_increasing_indexes() {
    let mut assembler = Assembler::new(&outbox(), OtherChangesPolicy::Warn, None);
    let mut items = vec![
        message(Message::Relation(shuffled_relation(1, 3802))),
        begin(500),
    ];
    items.extend((1..=3).map(|seq| insert(1, row(seq, Value::Null))));
    items.push(commit(500, 510));
    items.push(begin(600));
    items.push(insert(1, row(4, Value::Null)));
    items.push(commit(600, 610));
    let captured = run(&mut assembler, items);
    assert_eq!(
        event_positions(&captured),
        vec![(1, 500, 0), (2, 500, 1), (3, 500, 2), (4, 600, 0)]
    );
}

#[test]
fn events_at_or_before_the_checkpoint_are_skipped() {
    let resume = SourcePosition {
        commit_lsn: Lsn(500),
        index: 1,
    };
    let mut assembler = Assembler::new(&outbox(), OtherChangesPolicy::Warn, Some(resume));
    let mut items = vec![
        message(Message::Relation(shuffled_relation(1, 3802))),
        begin(400),
        insert(1, row(1, Value::Null)),
        commit(400, 410),
        begin(500),
    ];
    items.extend((2..=4).map(|seq| insert(1, row(seq, Value::Null))));
    items.push(commit(500, 510));
    let captured = run(&mut assembler, items);
    assert_eq!(event_positions(&captured), vec![(4, 500, 2)]);
    assert_eq!(assembler.skipped, 3);
    // Both transactions still end, so the slot can be confirmed past them.
    let ends = captured
        .iter()
        .filter(|c| matches!(c, Captured::TransactionEnd { .. }))
        .count();
    assert_eq!(ends, 2);
}

#[test]
fn inserts_into_other_tables_are_ignored() {
    let mut other = shuffled_relation(2, 3802);
    other.name = "orders".into();
    let mut assembler = Assembler::new(&outbox(), OtherChangesPolicy::Warn, None);
    let captured = run(
        &mut assembler,
        vec![
            message(Message::Relation(other)),
            message(Message::Relation(shuffled_relation(1, 3802))),
            begin(10),
            insert(2, row(1, Value::Null)),
            insert(1, row(2, Value::Null)),
            message(Message::Update { relation_id: 1 }),
            commit(10, 20),
        ],
    );
    assert_eq!(event_positions(&captured), vec![(2, 10, 0)]);
}

#[test]
fn bytea_payloads_are_decoded_from_hex() {
    let mut assembler = Assembler::new(&outbox(), OtherChangesPolicy::Warn, None);
    let captured = run(
        &mut assembler,
        vec![
            message(Message::Relation(shuffled_relation(1, BYTEA_OID))),
            begin(10),
            insert(1, row(1, text("\\x00ff10"))),
            commit(10, 20),
        ],
    );
    let Captured::Event(event) = &captured[0] else {
        panic!("expected an event")
    };
    assert_eq!(event.payload.as_deref(), Some(&[0x00, 0xff, 0x10][..]));
    assert_eq!(decode_bytea_hex(b"\\x0"), None);
    assert_eq!(decode_bytea_hex(b"\\xzz"), None);
    assert_eq!(decode_bytea_hex(b"abc"), None);
}

#[test]
fn a_missing_configured_column_names_the_column_and_key() {
    let mut relation = shuffled_relation(1, 3802);
    relation.columns.retain(|c| c.name != "aggregateid");
    let mut assembler = Assembler::new(&outbox(), OtherChangesPolicy::Warn, None);
    let error = assembler
        .accept(message(Message::Relation(relation)))
        .unwrap_err();
    assert!(error.message.contains("`aggregateid`"), "{error}");
    assert!(
        error.message.contains("postgres.columns.aggregate_id"),
        "{error}"
    );
}

#[test]
fn out_of_order_protocol_messages_are_errors_not_events() {
    let mut assembler = Assembler::new(&outbox(), OtherChangesPolicy::Warn, None);
    assert!(assembler.accept(commit(1, 2)).is_err());
    assert!(assembler.accept(insert(9, row(1, Value::Null))).is_err());
    assembler
        .accept(message(Message::Relation(shuffled_relation(1, 3802))))
        .unwrap();
    assert!(assembler.accept(insert(1, row(1, Value::Null))).is_err());
    assembler.accept(begin(5)).unwrap();
    assert!(assembler.in_transaction());
    assert!(assembler.accept(begin(6)).is_err());
}

#[test]
fn keepalives_become_idle_marks() {
    let mut assembler = Assembler::new(&outbox(), OtherChangesPolicy::Ignore, None);
    assert_eq!(
        assembler
            .accept(StreamItem::KeepAlive { wal_end: Lsn(77) })
            .unwrap(),
        Some(Captured::Idle { wal_end: Lsn(77) })
    );
}

#[test]
fn created_at_is_converted_only_when_cloudevents_need_it() {
    let items = || {
        vec![
            message(Message::Relation(shuffled_relation(16384, 3802))),
            begin(100),
            insert(16384, row(42, text("{}"))),
            commit(100, 120),
        ]
    };
    let created_at = |assembler: &mut Assembler| match &run(assembler, items())[0] {
        Captured::Event(event) => event.created_at.clone(),
        other => panic!("expected an event, got {other:?}"),
    };
    let mut plain = Assembler::new(&outbox(), OtherChangesPolicy::Warn, None);
    assert_eq!(created_at(&mut plain), None);
    let mut for_cloudevents =
        Assembler::new(&outbox(), OtherChangesPolicy::Warn, None).with_created_at_text(true);
    assert_eq!(
        created_at(&mut for_cloudevents).as_deref(),
        Some("2026-11-21T10:00:00.000000Z")
    );
}

mod messages {
    //! `capture.source: messages`: the assembler's events are the logical
    //! messages of the relay's prefix.
    use super::*;

    fn emit(transactional: bool, lsn: u64, prefix: &str, content: &str) -> StreamItem {
        message(Message::Message {
            transactional,
            lsn: Lsn(lsn),
            prefix: prefix.into(),
            content: content.as_bytes().to_vec(),
        })
    }

    fn content(id: &str) -> String {
        format!(
            r#"{{"v": 1, "id": "{id}", "type": "OrderCreated", "headers": null, "payload": {{"n": 1}}, "aggregateid": "o-1", "aggregatetype": "Order"}}"#
        )
    }

    /// Every item, pending ends included, as the streamer takes them.
    fn run_all(assembler: &mut Assembler, items: Vec<StreamItem>) -> Vec<Captured> {
        let mut out = Vec::new();
        for item in items {
            out.extend(assembler.accept(item).expect("accepted"));
            out.extend(assembler.take_pending());
        }
        out
    }

    #[test]
    fn messages_of_our_prefix_become_events_in_commit_order() {
        let mut assembler = Assembler::for_messages("outboxd", None);
        let captured = run_all(
            &mut assembler,
            vec![
                // A table's rows and other prefixes are ignored.
                message(Message::Relation(shuffled_relation(16384, 3802))),
                begin(300),
                emit(true, 210, "outboxd", &content("a")),
                insert(16384, row(1, text("{}"))),
                emit(true, 220, "other", &content("x")),
                emit(true, 230, "outboxd", &content("b")),
                commit(300, 340),
                begin(400),
                emit(true, 150, "outboxd", &content("c")),
                commit(400, 420),
                StreamItem::KeepAlive { wal_end: Lsn(500) },
            ],
        );
        assert_eq!(
            event_positions(&captured),
            vec![(210, 300, 0), (230, 300, 1), (150, 400, 0)]
        );
        let ids: Vec<_> = captured
            .iter()
            .filter_map(|c| match c {
                Captured::Event(e) => Some(e.id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        // Confirmed only one byte into the commit record, and no keepalive
        // confirms.
        let ends: Vec<_> = captured
            .iter()
            .filter(|c| !matches!(c, Captured::Event(_)))
            .cloned()
            .collect();
        assert_eq!(
            ends,
            vec![
                Captured::TransactionEnd {
                    end_lsn: Lsn(340),
                    confirm_lsn: Lsn(301)
                },
                Captured::TransactionEnd {
                    end_lsn: Lsn(420),
                    confirm_lsn: Lsn(401)
                },
            ]
        );
        let Captured::Event(first) = &captured[0] else {
            panic!("{captured:?}")
        };
        assert_eq!(first.payload.as_deref(), Some(&br#"{"n": 1}"#[..]));
        assert_eq!(first.poison, None);
    }

    #[test]
    fn a_transaction_without_our_messages_confirms_nothing() {
        let mut assembler = Assembler::for_messages("outboxd", None);
        let captured = run_all(
            &mut assembler,
            vec![
                begin(100),
                emit(true, 90, "other", &content("x")),
                commit(100, 120),
            ],
        );
        assert_eq!(captured, vec![]);
    }

    #[test]
    fn replayed_messages_up_to_the_checkpoint_are_skipped() {
        let resume = SourcePosition {
            commit_lsn: Lsn(300),
            index: 0,
        };
        let mut assembler = Assembler::for_messages("outboxd", Some(resume));
        let captured = run_all(
            &mut assembler,
            vec![
                begin(300),
                emit(true, 210, "outboxd", &content("a")),
                emit(true, 230, "outboxd", &content("b")),
                commit(300, 340),
            ],
        );
        assert_eq!(event_positions(&captured), vec![(230, 300, 1)]);
        assert_eq!(assembler.skipped, 1);
    }

    #[test]
    fn bad_content_is_a_poison_event_keeping_its_place() {
        let mut assembler = Assembler::for_messages("outboxd", None);
        let captured = run_all(
            &mut assembler,
            vec![
                begin(300),
                emit(true, 210, "outboxd", "not json"),
                emit(true, 230, "outboxd", &content("b")),
                commit(300, 340),
            ],
        );
        assert_eq!(
            event_positions(&captured),
            vec![(210, 300, 0), (230, 300, 1)]
        );
        let Captured::Event(poison) = &captured[0] else {
            panic!("{captured:?}")
        };
        let reason = poison.poison.as_deref().expect("poison");
        assert!(reason.contains("bad message encoding"), "{reason}");
        assert_eq!(poison.payload.as_deref(), Some(&b"not json"[..]));
    }

    #[test]
    fn a_non_transactional_message_is_poison_and_ends_at_itself() {
        let mut assembler = Assembler::for_messages("outboxd", None);
        let captured = run_all(
            &mut assembler,
            vec![
                emit(false, 250, "outboxd", &content("n")),
                emit(false, 260, "other", &content("x")),
            ],
        );
        // Its position lies inside its own record, before any commit
        // record that can follow it.
        assert_eq!(event_positions(&captured), vec![(250, 248, 0)]);
        let Captured::Event(event) = &captured[0] else {
            panic!("{captured:?}")
        };
        assert!(event
            .poison
            .as_deref()
            .is_some_and(|r| r.starts_with("non-transactional message")));
        assert_eq!(event.id, "n");
        assert_eq!(
            captured[1],
            Captured::TransactionEnd {
                end_lsn: Lsn(250),
                confirm_lsn: Lsn(249)
            }
        );
        // Replayed after a checkpoint naming it: skipped, and a transaction
        // whose commit record starts where the message ends is not.
        let mut again = Assembler::for_messages(
            "outboxd",
            Some(SourcePosition {
                commit_lsn: Lsn(248),
                index: 0,
            }),
        );
        let replayed = run_all(
            &mut again,
            vec![
                emit(false, 250, "outboxd", &content("n")),
                begin(250),
                emit(true, 240, "outboxd", &content("a")),
                commit(250, 280),
            ],
        );
        assert_eq!(event_positions(&replayed), vec![(240, 250, 0)]);
        assert_eq!(again.skipped, 1);
    }

    #[test]
    fn a_table_assembler_ignores_messages() {
        let mut assembler = Assembler::new(&outbox(), OtherChangesPolicy::Warn, None);
        let captured = run_all(
            &mut assembler,
            vec![
                begin(100),
                emit(true, 90, "outboxd", &content("a")),
                commit(100, 120),
            ],
        );
        assert_eq!(
            captured,
            vec![Captured::TransactionEnd {
                end_lsn: Lsn(120),
                confirm_lsn: Lsn(120)
            }]
        );
    }
}
