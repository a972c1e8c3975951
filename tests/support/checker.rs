//! The invariant checker: what a `read_committed` consumer sees in every
//! routed topic, the dead-letter topic and the checkpoint topic, compared
//! with the rows that actually committed in Postgres.
//!
//! Invariant it enforces (each violation names the event ids):
//! - every committed row is in Kafka exactly once: a good row in its routed
//!   topic, a poison row in the dead-letter topic (an event id that several
//!   rows carry, a dead letter and its replayed copies, as often as rows);
//! - nothing else is: no event of a rolled-back transaction, no stranger;
//! - per aggregate, one partition, and `n` runs 1, 2, 3, … in offset order
//!   (only rising, where an operator's TRUNCATE removed unsent rows);
//! - every row marked sent was published, and at the end every row is sent;
//! - the checkpoints name exactly the rows that are in Kafka, by seq and
//!   event id (a TRUNCATE … RESTART IDENTITY hands seqs out again);
//! - every transaction whose COMMIT returned is in the table.
//!
//! A WAL-message outbox (`Books::Messages`) has no table: the events that
//! committed are the `emitted` rows the writers recorded in the same
//! transactions, nothing is marked sent, and a checkpoint names a message
//! by its WAL position, which the writers never see, so checkpoints are
//! matched to events by the digest of the event id alone. A message with
//! another prefix in Kafka is a violation of its own.
//!
//! Rows an operator truncated away count too, as they were just before:
//! one marked sent is in Kafka exactly once, an unsent one at most once
//! (the relay may have committed it to Kafka and died before marking it).

use std::collections::{BTreeMap, HashMap, HashSet};

use outboxd::kafka::checkpoint::{Checkpoint, Record, RowDigest};

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
    /// Removed by an operator's TRUNCATE; `sent` as it was just before.
    pub truncated: bool,
}

impl Row {
    /// A row in the table now.
    pub fn kept(seq: i64, id: String, sent: bool) -> Row {
        Row {
            seq,
            id,
            sent,
            truncated: false,
        }
    }

    /// A row an operator's TRUNCATE removed, `sent` as it was just before.
    pub fn truncated(seq: i64, id: String, sent: bool) -> Row {
        Row {
            truncated: true,
            ..Row::kept(seq, id, sent)
        }
    }
}

/// What the relay under check records besides the events themselves.
pub enum Books<'a> {
    /// outboxd: rows marked sent, and checkpoints naming what is in Kafka.
    Outboxd { checkpoints: &'a [Checkpoint] },
    /// outboxd relaying WAL messages: nothing to mark, and checkpoints
    /// that name each event by its WAL position and its id's digest.
    Messages { checkpoints: &'a [Checkpoint] },
    /// A relay that keeps no books of its own (Debezium reads its slot and
    /// marks nothing): only the events are checked.
    None,
}

/// Reads Postgres and Kafka for `env` and checks every invariant. The
/// checkpoints that count are those of the env's table, whichever relay
/// name wrote them, in the env's (possibly shared) checkpoint topic.
pub async fn check(env: &TestEnv, written: &Written) -> Report {
    check_including(env, written, &[], &[], &[]).await
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
/// compacted (a compacted topic keeps one record per key), or moved it to
/// another topic; they count too. `truncated` are the rows an operator's
/// TRUNCATE removed, as they were just before it.
pub async fn check_including(
    env: &TestEnv,
    written: &Written,
    legacy_keys: &[String],
    earlier: &[Consumed],
    truncated: &[Row],
) -> Report {
    let mut rows = table_rows(env).await;
    rows.extend(truncated.iter().cloned());
    check_rows(env, &rows, written, legacy_keys, earlier).await
}

/// `rows` against what Kafka holds, with outboxd's checkpoints.
async fn check_rows(
    env: &TestEnv,
    rows: &[Row],
    written: &Written,
    legacy_keys: &[String],
    earlier: &[Consumed],
) -> Report {
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
    compare(rows, &routed, &dead_lettered, books, written)
}

/// Like `check_including`, for rows relayed unmarked (`relay.after_publish:
/// none`): at the end every row must be in Kafka exactly once although
/// none is marked sent (the catch-up drain marks the few it publishes).
pub async fn check_unmarked(
    env: &TestEnv,
    written: &Written,
    earlier: &[Consumed],
    truncated: &[Row],
) -> Report {
    let mut rows: Vec<Row> = table_rows(env)
        .await
        .into_iter()
        .map(|row| Row::kept(row.seq, row.id, true))
        .collect();
    rows.extend(truncated.iter().cloned());
    check_rows(env, &rows, written, &[], earlier).await
}

/// Like `check`, for a WAL-message outbox (`TestEnv::use_messages`): the
/// committed events are the rows of `emitted`, each with its own seq.
pub async fn check_messages(env: &TestEnv, written: &Written) -> Report {
    let rows: Vec<Row> = sqlx::query_as("SELECT seq, id FROM emitted ORDER BY seq")
        .fetch_all(&env.pool)
        .await
        .expect("read the emitted events")
        .into_iter()
        .map(|(seq, id): (i64, String)| Row::kept(seq, id, true))
        .collect();
    check_messages_of(env, &rows, written).await
}

/// Like `check_messages`, with the committed events given (`rows`), for a
/// writer that knows them without the `emitted` table (the benchmarks, whose
/// WAL and latency figures must not carry that table's writes).
pub async fn check_messages_of(env: &TestEnv, rows: &[Row], written: &Written) -> Report {
    let routed = read_all(&env.kafka, &env.topic_prefix())
        .await
        .into_iter()
        .filter(|record| record.topic != env.dead_letter_topic())
        .collect::<Vec<_>>();
    let dead_lettered = read_topic(&env.kafka, &env.dead_letter_topic()).await;
    let checkpoints = table_checkpoints(env).await;
    let books = Books::Messages {
        checkpoints: &checkpoints,
    };
    compare(rows, &routed, &dead_lettered, books, written)
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
    // Keyed by topic too: `earlier` may come from a checkpoint topic the
    // relay moved away from.
    let mut records: BTreeMap<(String, i32, i64), Consumed> = earlier
        .iter()
        .map(|r| ((r.topic.clone(), r.partition, r.offset), r.clone()))
        .collect();
    for record in read_topic(&env.kafka, &env.checkpoint_topic()).await {
        records.insert(
            (record.topic.clone(), record.partition, record.offset),
            record,
        );
    }
    let key = env.checkpoint_key().await;
    // Always also the env's relay name, as releases from before table-keyed
    // checkpoints keyed theirs, and its `relay.name` stand-in identity (a
    // role without `pg_control_system()`).
    let relay_name = env.relay_name();
    let stand_in =
        outboxd::kafka::identity::TableIdentity::new(None, env.outbox_name(), &relay_name)
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
        .map(|(seq, id, sent)| Row::kept(seq, id, sent))
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
    let truncated_unsent = rows.iter().any(|r| r.truncated && !r.sent);

    // Each row exactly once, in the right place. Rows sharing an event id
    // (a dead letter and its replayed copies) share its count.
    let mut rows_by_id: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for row in rows {
        rows_by_id.entry(row.id.as_str()).or_default().push(row);
    }
    let mut published: HashSet<(i64, &str)> = HashSet::new();
    let mut maybe_published: HashSet<(i64, &str)> = HashSet::new();
    for (id, same_id) in &rows_by_id {
        let (here, elsewhere, place) = if poison.contains(id) {
            (&in_dead, &in_routed, "the dead-letter topic")
        } else {
            (&in_routed, &in_dead, "its routed topic")
        };
        let n = here.get(*id).copied().unwrap_or(0);
        let misplaced = elsewhere.get(*id).copied().unwrap_or(0);
        // Truncated unsent rows may or may not have reached Kafka: a
        // checkpoint may name them, none has to.
        let (definite, maybe): (Vec<&Row>, Vec<&Row>) =
            same_id.iter().partition(|r| !r.truncated || r.sent);
        if n + misplaced > 0 {
            published.extend(definite.iter().map(|r| (r.seq, r.id.as_str())));
            maybe_published.extend(maybe.iter().map(|r| (r.seq, r.id.as_str())));
        }
        let at_least = definite.len();
        let at_most = same_id.len();
        let seqs = same_id
            .iter()
            .map(|r| r.seq.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if misplaced > 0 {
            report.other.push(format!(
                "misrouted: event id {id} (row seq {seqs}) is in {place} {n} time(s) and {misplaced} time(s) elsewhere"
            ));
        } else if n < at_least {
            let marked = same_id.iter().any(|r| r.sent);
            report.lost.push(format!(
                "lost: event id {id} (row seq {seqs}) reached Kafka {n} time(s) for {at_least} row(s){}",
                if marked { ", though marked sent" } else { "" }
            ));
        } else if n > at_most {
            report.duplicated.push(format!(
                "duplicated: event id {id} (row seq {seqs}) arrived {n} times for {at_most} row(s)"
            ));
        }
        for row in same_id {
            if keeps_books && !row.sent && !row.truncated {
                report.other.push(format!(
                    "unacknowledged: row seq {} id {} is not marked sent",
                    row.seq, row.id
                ));
            }
        }
    }

    // Nothing else.
    let rolled_back: HashSet<&str> = written.rolled_back_ids.iter().map(String::as_str).collect();
    let foreign: HashSet<&str> = written.foreign_ids.iter().map(String::as_str).collect();
    for id in in_routed.keys().chain(in_dead.keys()) {
        if table_ids.contains(id.as_str()) {
            continue;
        }
        if foreign.contains(id.as_str()) {
            report.other.push(format!(
                "other prefix: event id {id}, a message with another prefix, reached Kafka"
            ));
        } else if rolled_back.contains(id.as_str()) {
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

    // Per aggregate: one partition, n = 1, 2, 3, … in offset order; where
    // a TRUNCATE removed unsent rows, whose events may never have been
    // published, n only rises.
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
            let mut previous = 0;
            for (offset, n, id) in events {
                let in_order = if truncated_unsent {
                    n > previous
                } else {
                    n == previous + 1
                };
                if !in_order {
                    report.out_of_order.push(format!(
                        "out of order: aggregate {key}: offset {offset} (event id {id}) holds n {n} after n {previous}"
                    ));
                    break;
                }
                previous = n;
            }
        }
    }

    // The checkpoints name exactly the rows in Kafka: by seq, and by event
    // id where the checkpoint records it.
    let checkpoints = match books {
        Books::Outboxd { checkpoints } => checkpoints,
        Books::Messages { checkpoints } => {
            let published_ids: HashSet<&str> = published.iter().map(|(_, id)| *id).collect();
            report
                .other
                .extend(named_by_digest(checkpoints, &published_ids));
            return report;
        }
        Books::None => return report,
    };
    let mut rows_by_seq: HashMap<i64, Vec<&str>> = HashMap::new();
    for row in rows {
        rows_by_seq
            .entry(row.seq)
            .or_default()
            .push(row.id.as_str());
    }
    let mut named: HashSet<(i64, &str)> = HashSet::new();
    let mut phantoms = Vec::new();
    for checkpoint in checkpoints {
        let digests = checkpoint.row_ids();
        for seq in checkpoint
            .published
            .to_seqs()
            .into_iter()
            .chain(checkpoint.dead_lettered.to_seqs())
        {
            let candidates = rows_by_seq.get(&seq).cloned().unwrap_or_default();
            let matching: Vec<&str> = match digests.as_ref().and_then(|d| d.get(&seq)) {
                Some(digest) => candidates
                    .into_iter()
                    .filter(|id| RowDigest::of(id) == *digest)
                    .collect(),
                None => candidates,
            };
            // By seq alone, a seq handed out twice names whichever of its
            // rows is in Kafka.
            let published_match: Vec<&str> = matching
                .iter()
                .copied()
                .filter(|id| {
                    published.contains(&(seq, *id)) || maybe_published.contains(&(seq, *id))
                })
                .collect();
            match (published_match.first(), matching.first()) {
                (Some(_), _) => named.extend(published_match.iter().map(|id| (seq, *id))),
                (None, id) => phantoms.push(format!(
                    "phantom checkpoint: a checkpoint names row seq {seq} (id {}) but it is not in Kafka",
                    id.unwrap_or(&"<not in table>")
                )),
            }
        }
    }
    phantoms.sort();
    phantoms.dedup();
    report.other.extend(phantoms);
    let mut uncovered: Vec<_> = published.difference(&named).collect();
    uncovered.sort();
    for (seq, id) in uncovered {
        // What the checkpoints say of that seq, to tell a checkpoint never
        // written from one naming another row.
        let naming: Vec<String> = checkpoints
            .iter()
            .filter(|c| {
                c.published.to_seqs().contains(seq) || c.dead_lettered.to_seqs().contains(seq)
            })
            .map(|c| match c.row_ids().and_then(|d| d.get(seq).copied()) {
                Some(digest) => format!("{digest:?}"),
                None => "by seq alone".to_string(),
            })
            .collect();
        report.other.push(format!(
            "uncovered: row seq {seq} id {id} ({:?}) is in Kafka but no checkpoint names it; \
             checkpoints naming seq {seq}: {naming:?}",
            RowDigest::of(id)
        ));
    }
    report
}

/// A message outbox's checkpoints against the events in Kafka: every
/// checkpoint names its events by digest, each names an event in Kafka
/// (else a phantom), and every event in Kafka is named (else uncovered).
fn named_by_digest(checkpoints: &[Checkpoint], published: &HashSet<&str>) -> Vec<String> {
    let mut violations = Vec::new();
    let by_digest: HashMap<RowDigest, &str> = published
        .iter()
        .map(|id| (RowDigest::of(id), *id))
        .collect();
    let mut named: HashSet<&str> = HashSet::new();
    let mut phantoms = Vec::new();
    for checkpoint in checkpoints {
        if checkpoint.published.is_empty() && checkpoint.dead_lettered.is_empty() {
            // Names no event (a takeover's checkpoint before any batch).
            continue;
        }
        let Some(digests) = checkpoint.row_ids() else {
            violations.push(format!(
                "checkpoint without event ids: {checkpoint:?} names positions the checker cannot \
                 match to events"
            ));
            continue;
        };
        for (seq, digest) in digests {
            match by_digest.get(&digest) {
                Some(id) => {
                    named.insert(id);
                }
                None => phantoms.push(format!(
                    "phantom checkpoint: a checkpoint names the message at seq {seq} ({digest:?}) \
                     but no event in Kafka has that id"
                )),
            }
        }
    }
    phantoms.sort();
    phantoms.dedup();
    violations.extend(phantoms);
    let mut uncovered: Vec<&&str> = published
        .iter()
        .filter(|id| !named.contains(**id))
        .collect();
    uncovered.sort();
    for id in uncovered {
        violations.push(format!(
            "uncovered: event id {id} ({:?}) is in Kafka but no checkpoint names it",
            RowDigest::of(id)
        ));
    }
    violations
}
