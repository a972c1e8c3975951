//! The invariant checker: what a `read_committed` consumer sees in every
//! routed topic, the dead-letter topic and the checkpoint topic, compared
//! with the rows that actually committed in Postgres.
//!
//! Invariant it enforces (each violation names the event ids):
//! - every committed row is in Kafka exactly once: a good row in its routed
//!   topic, a poison row in the dead-letter topic;
//! - nothing else is: no event of a rolled-back transaction, no stranger;
//! - per aggregate, one partition, and `n` runs 1, 2, 3, … in offset order;
//! - every row marked sent was published, and at the end every row is sent;
//! - the checkpoints name exactly the rows that are in Kafka;
//! - every transaction whose COMMIT returned is in the table.

use std::collections::{BTreeMap, HashMap, HashSet};

use outboxd::kafka::checkpoint::{Checkpoint, Record};

use super::kafka::{read_all, read_topic, Consumed};
use super::workload::Written;
use super::TestEnv;

/// What the check found, counted the way the chaos table reports it.
#[derive(Debug, Default)]
pub struct Report {
    /// Rows checked (committed rows in the table).
    pub events: usize,
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
    pub out_of_order: Vec<String>,
    /// Everything else: strangers, rolled-back events, unmarked rows,
    /// checkpoint mismatches, rows Postgres forgot.
    pub other: Vec<String>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.out_of_order.is_empty()
            && self.other.is_empty()
    }

    pub fn violations(&self) -> Vec<String> {
        self.lost
            .iter()
            .chain(&self.duplicated)
            .chain(&self.out_of_order)
            .chain(&self.other)
            .cloned()
            .collect()
    }

    pub fn assert_clean(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "{} violations among {} events:\n{}",
            violations.len(),
            self.events,
            violations
                .iter()
                .take(200)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// One row of the outbox as the checker needs it.
#[derive(Debug, Clone)]
pub struct Row {
    pub seq: i64,
    pub id: String,
    pub sent: bool,
}

/// What the relay under check records besides the events themselves.
pub enum Books<'a> {
    /// outboxd: rows marked sent, and checkpoints naming what is in Kafka.
    Outboxd { checkpoints: &'a [Checkpoint] },
    /// A relay that keeps no books of its own (Debezium reads its slot and
    /// marks nothing): only the events are checked.
    None,
}

/// Reads Postgres and Kafka for `env` and checks every invariant. The
/// checkpoints that count are those of the env's table, whichever relay
/// name wrote them, in the env's (possibly shared) checkpoint topic.
pub async fn check(env: &TestEnv, written: &Written) -> Report {
    check_including(env, written, &[], &[]).await
}

/// The committed checkpoints of the env's table, oldest first.
pub async fn table_checkpoints(env: &TestEnv) -> Vec<Checkpoint> {
    table_checkpoints_including(env, &[], &[]).await
}

/// Like `check`, also counting the checkpoints that releases from before
/// table-keyed checkpoints wrote for the env's table under `legacy_keys`
/// (their `relay.name`s), as the mixed-version tests need.
///
/// `earlier` holds checkpoint records read before a test had the topic
/// compacted (a compacted topic keeps one record per key); they count too.
pub async fn check_including(
    env: &TestEnv,
    written: &Written,
    legacy_keys: &[String],
    earlier: &[Consumed],
) -> Report {
    let rows = table_rows(env).await;
    let routed = read_all(&env.kafka, &env.topic_prefix())
        .await
        .into_iter()
        .filter(|record| record.topic != env.dead_letter_topic())
        .collect::<Vec<_>>();
    let dead_lettered = read_topic(&env.kafka, &env.dead_letter_topic()).await;
    let checkpoints = table_checkpoints_including(env, legacy_keys, earlier).await;
    let books = Books::Outboxd {
        checkpoints: &checkpoints,
    };
    compare(&rows, &routed, &dead_lettered, books, written)
}

/// The committed checkpoints of the env's table, oldest first: under the
/// table's key, and the version-1 checkpoints of the env's table under
/// `legacy_keys` (where hand-over markers and tombstones are skipped), and
/// those among `earlier` records that compaction removed since.
pub async fn table_checkpoints_including(
    env: &TestEnv,
    legacy_keys: &[String],
    earlier: &[Consumed],
) -> Vec<Checkpoint> {
    let mut records: BTreeMap<(i32, i64), Consumed> = earlier
        .iter()
        .map(|r| ((r.partition, r.offset), r.clone()))
        .collect();
    for record in read_topic(&env.kafka, &env.checkpoint_topic()).await {
        records.insert((record.partition, record.offset), record);
    }
    let key = env.checkpoint_key().await;
    // Always also the env's relay name, as releases from before table-keyed
    // checkpoints keyed theirs, and its `relay.name` stand-in identity (a
    // role without `pg_control_system()`).
    let relay_name = env.relay_name();
    let stand_in = outboxd::kafka::identity::TableIdentity::new(None, "public.outbox", &relay_name)
        .checkpoint_key;
    let legacy_keys: Vec<&str> = legacy_keys
        .iter()
        .map(String::as_str)
        .chain([relay_name.as_str(), stand_in.as_str()])
        .collect();
    let mut checkpoints = Vec::new();
    for record in records.values() {
        let (Some(record_key), Some(bytes)) = (record.key.as_deref(), record.payload.as_deref())
        else {
            continue;
        };
        if record_key == key.as_bytes() {
            checkpoints.push(Checkpoint::from_bytes(bytes).expect("checkpoint record is readable"));
        } else if legacy_keys.iter().any(|k| k.as_bytes() == record_key) {
            match Record::from_bytes(bytes).expect("legacy-key record is readable") {
                Record::Checkpoint(checkpoint) if checkpoint.table == "public.outbox" => {
                    checkpoints.push(checkpoint)
                }
                _ => {}
            }
        }
    }
    checkpoints
}

/// For a relay other than outboxd (the benchmarks' Debezium): every
/// committed row in Kafka exactly once, in order, and nothing else.
pub async fn check_events_only(env: &TestEnv, written: &Written) -> Report {
    let rows = table_rows(env).await;
    let routed = read_all(&env.kafka, &env.topic_prefix()).await;
    compare(&rows, &routed, &[], Books::None, written)
}

async fn table_rows(env: &TestEnv) -> Vec<Row> {
    env.rows()
        .await
        .into_iter()
        .map(|(seq, id, sent)| Row { seq, id, sent })
        .collect()
}

/// The pure comparison, separate from the reading so it reads as a spec.
pub fn compare(
    rows: &[Row],
    routed: &[Consumed],
    dead_lettered: &[Consumed],
    books: Books,
    written: &Written,
) -> Report {
    let keeps_books = matches!(books, Books::Outboxd { .. });
    let mut report = Report {
        events: rows.len(),
        ..Report::default()
    };
    let poison: HashSet<&str> = written.poison_ids.iter().map(String::as_str).collect();
    let count = |records: &[Consumed]| {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for record in records {
            let id = record.header("id").unwrap_or("<no id header>").to_string();
            *seen.entry(id).or_default() += 1;
        }
        seen
    };
    let in_routed = count(routed);
    let in_dead = count(dead_lettered);
    let table_ids: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();

    // Each row exactly once, in the right place.
    let mut published_seqs = HashSet::new();
    for row in rows {
        let (here, elsewhere, place) = if poison.contains(row.id.as_str()) {
            (&in_dead, &in_routed, "the dead-letter topic")
        } else {
            (&in_routed, &in_dead, "its routed topic")
        };
        let n = here.get(&row.id).copied().unwrap_or(0);
        let misplaced = elsewhere.get(&row.id).copied().unwrap_or(0);
        if n + misplaced > 0 {
            published_seqs.insert(row.seq);
        }
        match (n, misplaced) {
            (1, 0) => {}
            (0, 0) if row.sent => report.lost.push(format!(
                "lost: row seq {} id {} is marked sent but never reached Kafka",
                row.seq, row.id
            )),
            (0, 0) => report.lost.push(format!(
                "lost: row seq {} id {} never reached Kafka (and is not marked sent)",
                row.seq, row.id
            )),
            (0, m) => report.other.push(format!(
                "misrouted: row seq {} id {} is not in {place} but {m} time(s) elsewhere",
                row.seq, row.id
            )),
            (n, m) => report.duplicated.push(format!(
                "duplicated: row seq {} id {} arrived {} times",
                row.seq,
                row.id,
                n + m
            )),
        }
        if keeps_books && !row.sent {
            report.other.push(format!(
                "unacknowledged: row seq {} id {} is not marked sent",
                row.seq, row.id
            ));
        }
    }

    // Nothing else.
    let rolled_back: HashSet<&str> = written.rolled_back_ids.iter().map(String::as_str).collect();
    for id in in_routed.keys().chain(in_dead.keys()) {
        if table_ids.contains(id.as_str()) {
            continue;
        }
        if rolled_back.contains(id.as_str()) {
            report.other.push(format!(
                "rolled back: event id {id} from a rolled-back transaction reached Kafka"
            ));
        } else {
            report.other.push(format!(
                "stranger: event id {id} is in Kafka but not in the table"
            ));
        }
    }

    // What the writers were told versus what Postgres kept.
    if !written.committed_ids.is_empty() {
        let known: HashSet<&str> = written
            .committed_ids
            .iter()
            .chain(&written.in_doubt_ids)
            .map(String::as_str)
            .collect();
        for id in &written.committed_ids {
            if !table_ids.contains(id.as_str()) {
                report.other.push(format!(
                    "forgotten: event id {id} was committed but is not in the table"
                ));
            }
        }
        for row in rows {
            if !known.contains(row.id.as_str()) {
                report.other.push(format!(
                    "unknown: row seq {} id {} was written by no writer",
                    row.seq, row.id
                ));
            }
        }
    } else if written.committed > 0 && written.committed != rows.len() {
        report.other.push(format!(
            "the table holds {} rows but the writers committed {}",
            rows.len(),
            written.committed
        ));
    }

    // Per aggregate: one partition, n = 1, 2, 3, … in offset order.
    // aggregate → (topic, partition) → (offset, n, event id)
    type Placed = BTreeMap<(String, i32), Vec<(i64, i64, String)>>;
    let mut by_aggregate: BTreeMap<String, Placed> = BTreeMap::new();
    for record in routed {
        let key = String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned();
        let n = record.payload_json()["n"].as_i64().unwrap_or(-1);
        let id = record.header("id").unwrap_or("<no id>").to_string();
        by_aggregate
            .entry(key)
            .or_default()
            .entry((record.topic.clone(), record.partition))
            .or_default()
            .push((record.offset, n, id));
    }
    for (key, partitions) in by_aggregate {
        if partitions.len() > 1 {
            report.out_of_order.push(format!(
                "split: aggregate {key} landed on {:?}",
                partitions.keys().collect::<Vec<_>>()
            ));
            continue;
        }
        for mut events in partitions.into_values() {
            events.sort();
            for (expected, (offset, n, id)) in (1..).zip(events) {
                if n != expected {
                    report.out_of_order.push(format!(
                        "out of order: aggregate {key}: offset {offset} (event id {id}) holds n {n}, expected {expected}"
                    ));
                    break;
                }
            }
        }
    }

    // The checkpoints name exactly the rows in Kafka.
    let Books::Outboxd { checkpoints } = books else {
        return report;
    };
    let mut named: HashSet<i64> = HashSet::new();
    for checkpoint in checkpoints {
        named.extend(checkpoint.published.to_seqs());
        named.extend(checkpoint.dead_lettered.to_seqs());
    }
    let id_of: HashMap<i64, &str> = rows.iter().map(|r| (r.seq, r.id.as_str())).collect();
    for seq in &published_seqs {
        if !named.contains(seq) {
            report.other.push(format!(
                "uncovered: row seq {seq} id {} is in Kafka but no checkpoint names it",
                id_of[seq]
            ));
        }
    }
    for seq in named.difference(&published_seqs) {
        report.other.push(format!(
            "phantom checkpoint: a checkpoint names row seq {seq} (id {}) but it is not in Kafka",
            id_of.get(seq).unwrap_or(&"<not in table>")
        ));
    }
    report
}
