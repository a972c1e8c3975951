//! The invariant checker must see every kind of violation it reports; a
//! checker that cannot fail would make every fault test pass.

use std::collections::HashMap;

use outboxd::kafka::checkpoint::Checkpoint;

use crate::support::checker::{compare, Books, Report, Row};
use crate::support::kafka::Consumed;
use crate::support::workload::Written;

fn row(seq: i64, id: &str) -> Row {
    Row {
        seq,
        id: id.to_string(),
        sent: true,
    }
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
        .contains("misrouted: row seq 2"));
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
