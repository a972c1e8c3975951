//! The invariant checker must see every kind of violation it reports; a
//! checker that cannot fail would make every fault test pass.

use std::collections::HashMap;

use outboxd::kafka::checkpoint::{Checkpoint, RowDigest};

use crate::support::checker::{compare, Books, Report, Row};
use crate::support::kafka::Consumed;
use crate::support::workload::Written;

fn row(seq: i64, id: &str) -> Row {
    Row::kept(seq, id.to_string(), true)
}

fn truncated(seq: i64, id: &str, sent: bool) -> Row {
    Row::truncated(seq, id.to_string(), sent)
}

fn record(id: &str, aggregate: &str, n: i64, offset: i64) -> Consumed {
    Consumed {
        topic: "t.Order".to_string(),
        partition: 0,
        offset,
        key: Some(aggregate.as_bytes().to_vec()),
        payload: Some(format!(r#"{{"n": {n}}}"#).into_bytes()),
        headers: HashMap::from([("id".to_string(), id.to_string())]),
    }
}

fn checkpoint(published: &[i64], dead_lettered: &[i64]) -> Checkpoint {
    Checkpoint::new("public.outbox", None, published, dead_lettered, None)
}

/// Rows a (n 1) and b (n 2) of one aggregate, both committed.
fn two_rows() -> Vec<Row> {
    vec![row(1, "a"), row(2, "b")]
}

fn written(ids: &[&str]) -> Written {
    Written {
        committed: ids.len(),
        committed_ids: ids.iter().map(|id| id.to_string()).collect(),
        ..Written::default()
    }
}

fn check(
    rows: &[Row],
    routed: &[Consumed],
    dead: &[Consumed],
    checkpoints: &[Checkpoint],
    written: &Written,
) -> Report {
    compare(rows, routed, dead, Books::Outboxd { checkpoints }, written)
}

#[test]
fn a_clean_run_has_no_violation() {
    let routed = [record("a", "order-1", 1, 0), record("b", "order-1", 2, 1)];
    let report = check(
        &two_rows(),
        &routed,
        &[],
        &[checkpoint(&[1, 2], &[])],
        &written(&["a", "b"]),
    );
    assert!(report.is_clean(), "{:?}", report.violations());
    assert_eq!(report.events, 2);
}

#[test]
fn a_missing_event_is_lost() {
    let routed = [record("a", "order-1", 1, 0)];
    let report = check(
        &two_rows(),
        &routed,
        &[],
        &[checkpoint(&[1], &[])],
        &written(&["a", "b"]),
    );
    assert_eq!(report.lost.len(), 1);
    assert!(report.lost[0].contains("id b"), "{:?}", report.lost);
}

#[test]
fn an_event_twice_is_duplicated() {
    let routed = [
        record("a", "order-1", 1, 0),
        record("a", "order-1", 1, 1),
        record("b", "order-1", 2, 2),
    ];
    let report = check(
        &two_rows(),
        &routed,
        &[],
        &[checkpoint(&[1, 2], &[])],
        &written(&["a", "b"]),
    );
    assert_eq!(report.duplicated.len(), 1);
    assert!(report.duplicated[0].contains("id a"));
}

#[test]
fn events_swapped_in_offset_order_are_out_of_order() {
    let routed = [record("b", "order-1", 2, 0), record("a", "order-1", 1, 1)];
    let report = check(
        &two_rows(),
        &routed,
        &[],
        &[checkpoint(&[1, 2], &[])],
        &written(&["a", "b"]),
    );
    assert_eq!(report.out_of_order.len(), 1);
    assert!(report.out_of_order[0].contains("event id b"));
}

#[test]
fn an_aggregate_over_two_partitions_is_out_of_order() {
    let mut second = record("b", "order-1", 2, 0);
    second.partition = 1;
    let routed = [record("a", "order-1", 1, 0), second];
    let report = check(
        &two_rows(),
        &routed,
        &[],
        &[checkpoint(&[1, 2], &[])],
        &written(&["a", "b"]),
    );
    assert_eq!(report.out_of_order.len(), 1);
}

#[test]
fn rolled_back_and_unknown_events_are_reported() {
    let routed = [
        record("a", "order-1", 1, 0),
        record("b", "order-1", 2, 1),
        record("r", "order-2", 1, 2),
        record("x", "order-3", 1, 3),
    ];
    let mut written = written(&["a", "b"]);
    written.rolled_back_ids.push("r".to_string());
    let report = check(
        &two_rows(),
        &routed,
        &[],
        &[checkpoint(&[1, 2], &[])],
        &written,
    );
    let violations = report.violations().join("\n");
    assert!(
        violations.contains("rolled back: event id r"),
        "{violations}"
    );
    assert!(violations.contains("stranger: event id x"), "{violations}");
}

#[test]
fn unmarked_rows_and_checkpoint_gaps_are_reported() {
    let mut rows = two_rows();
    rows[1].sent = false;
    let routed = [record("a", "order-1", 1, 0), record("b", "order-1", 2, 1)];
    let report = check(
        &rows,
        &routed,
        &[],
        &[checkpoint(&[1, 7], &[])],
        &written(&["a", "b"]),
    );
    let violations = report.violations().join("\n");
    assert!(
        violations.contains("unacknowledged: row seq 2"),
        "{violations}"
    );
    assert!(violations.contains("uncovered: row seq 2"), "{violations}");
    assert!(
        violations.contains("phantom checkpoint: a checkpoint names row seq 7"),
        "{violations}"
    );
}

#[test]
fn poison_rows_belong_in_the_dead_letter_topic() {
    let rows = vec![row(1, "a"), row(2, "p")];
    let mut written = written(&["a", "p"]);
    written.poison_ids.push("p".to_string());
    let routed = [record("a", "order-1", 1, 0)];
    let dead = [record("p", "poison-p", 0, 0)];
    let clean = check(&rows, &routed, &dead, &[checkpoint(&[1], &[2])], &written);
    assert!(clean.is_clean(), "{:?}", clean.violations());

    let misrouted = [record("a", "order-1", 1, 0), record("p", "poison-p", 1, 1)];
    let report = check(
        &rows,
        &misrouted,
        &[],
        &[checkpoint(&[1, 2], &[])],
        &written,
    );
    assert!(report
        .violations()
        .join("\n")
        .contains("misrouted: event id p (row seq 2)"));
}

#[test]
fn a_committed_row_missing_from_the_table_is_reported() {
    let report = check(
        &[row(1, "a")],
        &[record("a", "order-1", 1, 0)],
        &[],
        &[checkpoint(&[1], &[])],
        &written(&["a", "b"]),
    );
    assert!(report
        .violations()
        .join("\n")
        .contains("forgotten: event id b"));
}

#[test]
fn a_replayed_dead_letter_is_expected_once_per_row() {
    // Row 2 was dead-lettered; replay inserted it again as row 3 (same
    // event id), which was dead-lettered again.
    let rows = vec![row(1, "a"), row(2, "p"), row(3, "p")];
    let mut written = written(&["a", "p"]);
    written.poison_ids.push("p".to_string());
    let routed = [record("a", "order-1", 1, 0)];
    let checkpoints = [checkpoint(&[1], &[2, 3])];
    let twice = [record("p", "poison-p", 0, 0), record("p", "poison-p", 0, 1)];
    let clean = check(&rows, &routed, &twice, &checkpoints, &written);
    assert!(clean.is_clean(), "{:?}", clean.violations());

    let once = check(&rows, &routed, &twice[..1], &checkpoints, &written);
    assert_eq!(once.lost.len(), 1, "{:?}", once.violations());
    let mut thrice = twice.to_vec();
    thrice.push(record("p", "poison-p", 0, 2));
    let report = check(&rows, &routed, &thrice, &checkpoints, &written);
    assert_eq!(report.duplicated.len(), 1, "{:?}", report.violations());
}

#[test]
fn truncated_rows_count_as_they_were() {
    // a was marked sent before the TRUNCATE, b was not (and may or may not
    // have reached Kafka); c came after it.
    let rows = vec![
        truncated(1, "a", true),
        truncated(2, "b", false),
        row(1, "c"),
    ];
    let written = written(&["a", "b", "c"]);
    let digests =
        |ids: &'static [&'static str]| move |seq: i64| Some(RowDigest::of(ids[seq as usize - 1]));
    let before = checkpoint(&[1], &[]).with_row_ids(digests(&["a"]));
    let after = checkpoint(&[1], &[]).with_row_ids(digests(&["c"]));
    // b never published: c's n 3 follows a's n 1.
    let routed = [record("a", "order-1", 1, 0), record("c", "order-1", 3, 1)];
    let clean = check(
        &rows,
        &routed,
        &[],
        &[before.clone(), after.clone()],
        &written,
    );
    assert!(clean.is_clean(), "{:?}", clean.violations());

    // The truncated, marked row must have reached Kafka.
    let report = check(
        &rows,
        &routed[1..],
        &[],
        std::slice::from_ref(&after),
        &written,
    );
    assert!(
        report.lost.iter().any(|v| v.contains("event id a")),
        "{:?}",
        report.violations()
    );
    // c reuses seq 1: a checkpoint that named only a does not cover c.
    let report = check(&rows, &routed, &[], &[before], &written);
    assert!(
        report
            .violations()
            .join("\n")
            .contains("uncovered: row seq 1 id c"),
        "{:?}",
        report.violations()
    );
    // Order still holds: n falls.
    let swapped = [record("c", "order-1", 3, 0), record("a", "order-1", 1, 1)];
    let report = check(&rows, &swapped, &[], &[after], &written);
    assert_eq!(report.out_of_order.len(), 1, "{:?}", report.violations());
}

#[test]
fn a_truncated_replay_copy_need_not_be_named() {
    // p was dead-lettered as row 2, replayed as row 3, and both were
    // truncated away before the relay published the copy; the dead-letter
    // topic holds p once, which a checkpoint names as row 2.
    let rows = vec![truncated(2, "p", true), truncated(3, "p", false)];
    let mut written = written(&["p"]);
    written.poison_ids.push("p".to_string());
    let dead = [record("p", "poison-p", 0, 0)];
    let named = checkpoint(&[], &[2]).with_row_ids(|_| Some(RowDigest::of("p")));
    let report = check(&rows, &[], &dead, &[named], &written);
    assert!(report.is_clean(), "{:?}", report.violations());
}

/// A message outbox's checkpoint: events by WAL position (`seq`) and the
/// digest of their id, as the relay writes it.
fn message_checkpoint(named: &[(i64, &'static str)]) -> Checkpoint {
    let seqs: Vec<i64> = named.iter().map(|(seq, _)| *seq).collect();
    let named = named.to_vec();
    Checkpoint::new("messages:outboxd", None, &seqs, &[], None).with_row_ids(move |seq| {
        named
            .iter()
            .find(|(s, _)| *s == seq)
            .map(|(_, id)| RowDigest::of(id))
    })
}

fn check_messages(routed: &[Consumed], checkpoints: &[Checkpoint], written: &Written) -> Report {
    // `emitted` rows: their seqs are the test's own, not WAL positions.
    compare(
        &two_rows(),
        routed,
        &[],
        Books::Messages { checkpoints },
        written,
    )
}

#[test]
fn message_checkpoints_are_matched_by_event_id() {
    let routed = [record("a", "order-1", 1, 0), record("b", "order-1", 2, 1)];
    let written = written(&["a", "b"]);
    let clean = check_messages(
        &routed,
        &[message_checkpoint(&[(7001, "a"), (7002, "b")])],
        &written,
    );
    assert!(clean.is_clean(), "{:?}", clean.violations());

    let report = check_messages(
        &routed,
        &[message_checkpoint(&[(7001, "a"), (7003, "x")])],
        &written,
    );
    let violations = report.violations().join("\n");
    assert!(violations.contains("uncovered: event id b"), "{violations}");
    assert!(
        violations.contains("phantom checkpoint: a checkpoint names the message at seq 7003"),
        "{violations}"
    );
}

#[test]
fn a_message_with_another_prefix_is_reported() {
    let routed = [
        record("a", "order-1", 1, 0),
        record("b", "order-1", 2, 1),
        record("f", "foreign-f", 1, 2),
    ];
    let mut written = written(&["a", "b"]);
    written.foreign_ids.push("f".to_string());
    let report = check_messages(
        &routed,
        &[message_checkpoint(&[(7001, "a"), (7002, "b"), (7004, "f")])],
        &written,
    );
    assert!(
        report
            .violations()
            .join("\n")
            .contains("other prefix: event id f"),
        "{:?}",
        report.violations()
    );
}
