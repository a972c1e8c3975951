//! The order workload: writers lock an aggregate, bump its version and
//! insert outbox rows carrying that version (`n`) in real transactions.
//!
//! Invariant: per aggregate, the committed events' `n` run 1, 2, 3, … with
//! no gap, whatever rolls back or crashes: the version bump and the rows
//! commit or vanish together, and the row lock orders writers of one
//! aggregate. So the checker can demand exactly that order in Kafka.
//!
//! What makes it hard for a relay, all tunable in `Workload`:
//! - writers pause before COMMIT, so commits land out of `seq` order;
//! - some transactions roll back;
//! - multi-row INSERT (two events) and COPY (several) share a transaction;
//! - now and then one transaction is larger than `logical_decoding_work_mem`
//!   (64kB on the test stack), so decoding spills it to disk;
//! - optionally poison rows (unroutable, oversized) mixed into the stream.
//!
//! `Workload::in_messages` writes the same events as WAL messages
//! (`outboxd_emit`, a transactional `pg_logical_emit_message`) instead of
//! rows, with the same version bump and row lock, and records each event's
//! id in the `emitted` table in the same transaction: a message leaves no
//! row, so that table is what committed. Now and then a transaction also
//! writes a message with another prefix, which must never be published.
//!
//! Writers survive faults: an error (Postgres restarting, say) is counted,
//! the transaction's fate is "in doubt" when it failed at COMMIT, and the
//! writer goes on after a pause. The table is the truth the checker uses.

use std::time::Duration;

use rand::Rng;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// What the writers did.
#[derive(Debug, Default)]
pub struct Written {
    /// Events whose transaction committed (COMMIT returned).
    pub committed: usize,
    pub committed_ids: Vec<String>,
    /// Events whose transaction rolled back on purpose.
    pub rolled_back_ids: Vec<String>,
    /// Events whose COMMIT failed (connection lost): in the table or not.
    pub in_doubt_ids: Vec<String>,
    /// Poison rows among the committed ones, bound for the dead-letter topic.
    pub poison_ids: Vec<String>,
    /// Events written as messages with another prefix, committed or not:
    /// the relay must ignore every one.
    pub foreign_ids: Vec<String>,
    /// Transactions that failed before COMMIT (and so did not happen).
    pub failed_transactions: usize,
}

impl Written {
    /// Everything several writers did, as one account.
    pub fn combined(parts: impl IntoIterator<Item = Written>) -> Written {
        let mut all = Written::default();
        for part in parts {
            all.committed += part.committed;
            all.committed_ids.extend(part.committed_ids);
            all.rolled_back_ids.extend(part.rolled_back_ids);
            all.in_doubt_ids.extend(part.in_doubt_ids);
            all.poison_ids.extend(part.poison_ids);
            all.foreign_ids.extend(part.foreign_ids);
            all.failed_transactions += part.failed_transactions;
        }
        all
    }
}

/// The aggregate type of poison rows that no topic can be named after.
pub const UNROUTABLE_TYPE: &str = "not a topic!";
/// Payload size of oversized poison rows: the fault tests configure
/// `kafka.max_message_bytes: 100000`.
pub const OVERSIZED_BYTES: usize = 200_000;
/// The prefix of the messages that are not the relay's.
pub const FOREIGN_PREFIX: &str = "someone-else";

/// Where the writers put their events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Rows of the `outbox` table.
    Rows,
    /// WAL messages with the prefix `outboxd` (`TestEnv::use_messages`).
    Messages,
}

/// The shape of the load.
#[derive(Debug, Clone)]
pub struct Workload {
    pub aggregates: usize,
    /// Upper bound of the random pause before COMMIT.
    pub max_commit_pause: Duration,
    /// One transaction in this many rolls back.
    pub rollback_one_in: u32,
    /// One in this many writes several events with COPY (else INSERT).
    pub copy_one_in: u32,
    /// One in this many writes `large_events` events (above the decoding
    /// memory limit); 0 turns large transactions off.
    pub large_one_in: u32,
    pub large_events: usize,
    /// One in this many also writes a poison row; 0 turns poison off.
    pub poison_one_in: u32,
    /// Padding in each payload, to reach a realistic size.
    pub padding: usize,
    pub target: Target,
}

impl Workload {
    /// Single and paired events on `aggregates` aggregates, some rolled
    /// back; no pauses, COPY, large transactions or poison.
    pub fn simple(aggregates: usize) -> Workload {
        Workload {
            aggregates,
            max_commit_pause: Duration::ZERO,
            rollback_one_in: 10,
            copy_one_in: 0,
            large_one_in: 0,
            large_events: 0,
            poison_one_in: 0,
            padding: 0,
            target: Target::Rows,
        }
    }

    /// Everything the issue asks for, except poison.
    pub fn realistic() -> Workload {
        Workload {
            aggregates: 200,
            max_commit_pause: Duration::from_millis(15),
            rollback_one_in: 10,
            copy_one_in: 5,
            large_one_in: 150,
            large_events: 250,
            poison_one_in: 0,
            padding: 200,
            target: Target::Rows,
        }
    }

    /// The same load written as WAL messages instead of rows.
    pub fn in_messages(mut self) -> Workload {
        self.target = Target::Messages;
        self
    }

    pub fn with_poison(mut self, one_in: u32) -> Workload {
        self.poison_one_in = one_in;
        self
    }

    /// One writer: `transactions` business transactions, one after another.
    pub async fn write(&self, pool: &PgPool, writer: usize, transactions: usize) -> Written {
        let mut written = Written::default();
        for _ in 0..transactions {
            self.one_transaction(pool, writer, &mut written).await;
        }
        written
    }

    async fn one_transaction(&self, pool: &PgPool, writer: usize, written: &mut Written) {
        let plan = self.plan();
        let mut tx = match pool.begin().await {
            Ok(tx) => tx,
            Err(_) => return self.failed(written).await,
        };
        let outcome = match self.target {
            Target::Rows => self.insert_all(&mut tx, writer, &plan).await,
            Target::Messages => self.emit_all(&mut tx, writer, &plan).await,
        };
        let (ids, foreign) = match outcome {
            Ok((events, poison, foreign)) => ((events, poison), foreign),
            Err(_) => {
                let _ = tx.rollback().await;
                return self.failed(written).await;
            }
        };
        // Whatever becomes of the transaction, these must never appear.
        written.foreign_ids.extend(foreign);
        if !self.max_commit_pause.is_zero() {
            let pause = rand::rng().random_range(Duration::ZERO..=self.max_commit_pause);
            tokio::time::sleep(pause).await;
        }
        if plan.loose {
            emit_loose(pool, written).await;
        }
        let (events, poison) = ids;
        if plan.roll_back {
            let _ = tx.rollback().await;
            written.rolled_back_ids.extend(events);
            written.rolled_back_ids.extend(poison);
            return;
        }
        match tx.commit().await {
            Ok(()) => {
                written.committed += events.len() + poison.len();
                written.committed_ids.extend(events);
                written.committed_ids.extend(poison.iter().cloned());
                written.poison_ids.extend(poison);
            }
            Err(_) => {
                written.in_doubt_ids.extend(events);
                written.in_doubt_ids.extend(poison);
                written.failed_transactions += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    async fn failed(&self, written: &mut Written) {
        written.failed_transactions += 1;
        // Postgres is restarting or unreachable: do not spin.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    fn plan(&self) -> Plan {
        let mut rng = rand::rng();
        let one_in = |rng: &mut rand::rngs::ThreadRng, n: u32| n > 0 && rng.random_ratio(1, n);
        let (events, how) = if one_in(&mut rng, self.large_one_in) {
            (self.large_events, How::Insert)
        } else if one_in(&mut rng, self.copy_one_in) {
            (rng.random_range(2..=5), How::Copy)
        } else {
            (rng.random_range(1..=2), How::Insert)
        };
        Plan {
            aggregate: format!("order-{}", rng.random_range(0..self.aggregates)),
            events,
            how,
            roll_back: one_in(&mut rng, self.rollback_one_in),
            foreign: self.target == Target::Messages && one_in(&mut rng, 4),
            loose: self.target == Target::Messages && one_in(&mut rng, self.poison_one_in),
            poison: if one_in(&mut rng, self.poison_one_in) {
                Some(if rng.random_bool(0.5) {
                    Poison::Unroutable
                } else {
                    Poison::Oversized
                })
            } else {
                None
            },
        }
    }

    /// Locks the plan's aggregate and bumps its version by the plan's
    /// events; returns the `n` of the first of them.
    async fn bump_version(
        &self,
        tx: &mut sqlx::PgConnection,
        plan: &Plan,
    ) -> Result<usize, sqlx::Error> {
        sqlx::query("INSERT INTO aggregates (id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(&plan.aggregate)
            .execute(&mut *tx)
            .await?;
        // The row lock serialises this aggregate's writers; `version` counts
        // its committed events, so their `n` runs 1, 2, 3, … with no gap.
        let version: i32 = sqlx::query_scalar(
            "UPDATE aggregates SET version = version + $2 WHERE id = $1 RETURNING version",
        )
        .bind(&plan.aggregate)
        .bind(plan.events as i32)
        .fetch_one(&mut *tx)
        .await?;
        Ok(version as usize - plan.events + 1)
    }

    /// Returns the ids of the events, of the poison row, and of foreign
    /// messages (none: rows have no prefix).
    async fn insert_all(
        &self,
        tx: &mut sqlx::PgConnection,
        writer: usize,
        plan: &Plan,
    ) -> Result<(Vec<String>, Vec<String>, Vec<String>), sqlx::Error> {
        let first_n = self.bump_version(tx, plan).await?;
        let ids: Vec<String> = (0..plan.events).map(|_| new_uuid()).collect();
        match plan.how {
            How::Insert => {
                // One statement for all the transaction's events, in `n` order.
                sqlx::query(
                    "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
                     SELECT ($5::text[])[i]::uuid, 'Order', $1, \
                            CASE WHEN i = 1 THEN 'OrderCreated' ELSE 'PaymentCaptured' END, \
                            jsonb_build_object('aggregate', $1::text, 'n', $2::int + i - 1, \
                                               'writer', $3::int, 'pad', repeat('p', $4::int)) \
                     FROM generate_series(1, array_length($5::text[], 1)) AS i ORDER BY i",
                )
                .bind(&plan.aggregate)
                .bind(first_n as i32)
                .bind(writer as i32)
                .bind(self.padding as i32)
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            }
            How::Copy => {
                let mut data = String::new();
                for (i, id) in ids.iter().enumerate() {
                    // Text format: tab-separated; the JSON holds no tab,
                    // newline or backslash.
                    data.push_str(&format!(
                        "{id}\tOrder\t{aggregate}\tPaymentCaptured\t\
                         {{\"aggregate\": \"{aggregate}\", \"n\": {n}, \"writer\": {writer}, \"pad\": \"{pad}\"}}\n",
                        aggregate = plan.aggregate,
                        n = first_n + i,
                        pad = "c".repeat(self.padding),
                    ));
                }
                let mut copy = tx
                    .copy_in_raw(
                        "COPY outbox (id, aggregatetype, aggregateid, type, payload) FROM STDIN",
                    )
                    .await?;
                copy.send(data.into_bytes()).await?;
                copy.finish().await?;
            }
        }
        let mut poison_ids = Vec::new();
        if let Some(poison) = plan.poison {
            let id = new_uuid();
            // Its own aggregate: a poison row is not part of any order's sequence.
            let (aggregate_type, payload_sql) = match poison {
                Poison::Unroutable => (UNROUTABLE_TYPE, "jsonb_build_object('poison', true)".to_string()),
                Poison::Oversized => (
                    "Order",
                    format!("jsonb_build_object('poison', true, 'blob', repeat('x', {OVERSIZED_BYTES}))"),
                ),
            };
            sqlx::query(&format!(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
                 VALUES ($1::uuid, $2, 'poison-' || $1, 'Poison', {payload_sql})"
            ))
            .bind(&id)
            .bind(aggregate_type)
            .execute(&mut *tx)
            .await?;
            poison_ids.push(id);
        }
        Ok((ids, poison_ids, Vec::new()))
    }

    /// The same events as `insert_all`, as WAL messages, each id recorded
    /// in `emitted`. Returns the ids of the events, of the poison message
    /// and of the foreign one.
    async fn emit_all(
        &self,
        tx: &mut sqlx::PgConnection,
        writer: usize,
        plan: &Plan,
    ) -> Result<(Vec<String>, Vec<String>, Vec<String>), sqlx::Error> {
        let first_n = self.bump_version(tx, plan).await?;
        let ids: Vec<String> = (0..plan.events).map(|_| new_uuid()).collect();
        let emit_sql = "SELECT outboxd_emit('Order', $1, \
                CASE WHEN i = 1 THEN 'OrderCreated' ELSE 'PaymentCaptured' END, \
                jsonb_build_object('aggregate', $1::text, 'n', $2::int + i - 1, \
                                   'writer', $3::int, 'pad', repeat('p', $4::int)), \
                NULL, ($5::text[])[i]::uuid) \
             FROM generate_series($6::int, $7::int) AS i";
        let emit = |from: usize, to: usize| {
            sqlx::query(emit_sql)
                .bind(&plan.aggregate)
                .bind(first_n as i32)
                .bind(writer as i32)
                .bind(self.padding as i32)
                .bind(&ids)
                .bind(from as i32)
                .bind(to as i32)
        };
        match plan.how {
            // One statement for all the transaction's events, in `n` order.
            How::Insert => {
                emit(1, plan.events).execute(&mut *tx).await?;
            }
            // One statement per event, as a service emitting as it goes.
            How::Copy => {
                for i in 1..=plan.events {
                    emit(i, i).execute(&mut *tx).await?;
                }
            }
        }
        let mut foreign_ids = Vec::new();
        if plan.foreign {
            // A valid event under another prefix: published, it would be
            // found by its id.
            let id = new_uuid();
            sqlx::query(
                "SELECT pg_logical_emit_message(true, $2, jsonb_build_object('v', 1, 'id', $1::text, \
                 'aggregatetype', 'Order', 'aggregateid', 'foreign-' || $1, 'type', 'Foreign', \
                 'payload', jsonb_build_object('n', 1))::text)",
            )
            .bind(&id)
            .bind(FOREIGN_PREFIX)
            .execute(&mut *tx)
            .await?;
            foreign_ids.push(id);
        }
        let mut poison_ids = Vec::new();
        if let Some(poison) = plan.poison {
            let id = new_uuid();
            // Its own aggregate: a poison event is not part of any order's sequence.
            let (aggregate_type, payload_sql) = match poison {
                Poison::Unroutable => (UNROUTABLE_TYPE, "jsonb_build_object('poison', true)".to_string()),
                Poison::Oversized => (
                    "Order",
                    format!("jsonb_build_object('poison', true, 'blob', repeat('x', {OVERSIZED_BYTES}))"),
                ),
            };
            sqlx::query(&format!(
                "SELECT outboxd_emit($2, 'poison-' || $1, 'Poison', {payload_sql}, NULL, $1::uuid)"
            ))
            .bind(&id)
            .bind(aggregate_type)
            .execute(&mut *tx)
            .await?;
            poison_ids.push(id);
        }
        sqlx::query("INSERT INTO emitted (id) SELECT unnest($1::text[])")
            .bind(ids.iter().chain(&poison_ids).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        Ok((ids, poison_ids, foreign_ids))
    }
}

struct Plan {
    aggregate: String,
    events: usize,
    how: How,
    roll_back: bool,
    /// Messages only: also a message with another prefix.
    foreign: bool,
    /// Messages only, with poison: a non-transactional message of the
    /// relay's prefix from another session right before COMMIT.
    loose: bool,
    poison: Option<Poison>,
}

enum How {
    Insert,
    Copy,
}

#[derive(Clone, Copy)]
enum Poison {
    Unroutable,
    Oversized,
}

fn new_uuid() -> String {
    let mut rng = rand::rng();
    let (a, b, c, d, e): (u32, u16, u16, u16, u64) = (
        rng.random(),
        rng.random(),
        rng.random(),
        rng.random(),
        rng.random(),
    );
    format!(
        "{a:08x}-{b:04x}-4{:03x}-{:04x}-{:012x}",
        c & 0x0fff,
        (d & 0x3fff) | 0x8000,
        e & 0xffff_ffff_ffff
    )
}

/// A pool for writers: its own connections, with durable commits even
/// though the test server runs `synchronous_commit = off` (a crash must not
/// forget a transaction whose COMMIT returned, or the checker would blame
/// the relay for Postgres' promise).
pub async fn writer_pool(database_url: &str, connections: u32) -> PgPool {
    let options: PgConnectOptions = database_url.parse().expect("database url");
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.options([("synchronous_commit", "on")]))
}

/// `rows` events in bulk over `aggregates` aggregates of their own
/// (`backlog-0` …), in transactions of 10,000 rows: a backlog to drain.
pub async fn write_backlog(pool: &PgPool, rows: usize, aggregates: usize) -> Written {
    const CHUNK: usize = 10_000;
    let mut written = Written::default();
    let mut done = 0;
    while done < rows {
        let chunk = CHUNK.min(rows - done);
        // Row i of the backlog goes to aggregate i % aggregates as its
        // (i / aggregates + 1)th event: n stays 1, 2, 3, … across chunks.
        let ids: Vec<String> = sqlx::query_scalar(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'Order', 'backlog-' || (i % $1), 'OrderCreated', \
                    jsonb_build_object('aggregate', 'backlog-' || (i % $1), 'n', i / $1 + 1, \
                                       'pad', repeat('b', 200)) \
             FROM generate_series($2::bigint, $3::bigint) AS i ORDER BY i \
             RETURNING id::text",
        )
        .bind(aggregates as i64)
        .bind(done as i64)
        .bind((done + chunk - 1) as i64)
        .fetch_all(pool)
        .await
        .expect("write backlog");
        written.committed += ids.len();
        written.committed_ids.extend(ids);
        done += chunk;
    }
    written
}

/// A non-transactional message with the relay's prefix, a valid event
/// otherwise, and its id in `emitted` by the same statement. It is poison
/// (it would be written even if a transaction holding it rolled back), so
/// its place is the dead-letter topic. Written just before another
/// transaction's COMMIT, its record is often directly followed by that
/// commit record, whose first event then starts where the message ends.
async fn emit_loose(pool: &PgPool, written: &mut Written) {
    let id = new_uuid();
    let recorded = sqlx::query(
        "WITH loose AS (SELECT pg_logical_emit_message(false, 'outboxd', jsonb_build_object( \
             'v', 1, 'id', $1::text, 'aggregatetype', 'Order', 'aggregateid', 'loose-' || $1, \
             'type', 'Loose', 'payload', jsonb_build_object('n', 1))::text)) \
         INSERT INTO emitted (id) SELECT $1 FROM loose",
    )
    .bind(&id)
    .execute(pool)
    .await;
    match recorded {
        Ok(_) => {
            written.committed += 1;
            written.committed_ids.push(id.clone());
            written.poison_ids.push(id);
        }
        // The message may be in the WAL while its row is not.
        Err(_) => written.in_doubt_ids.push(id),
    }
}

/// Like `write_backlog`, as WAL messages (`TestEnv::use_messages`):
/// `events` events over `aggregates` aggregates of their own, emitted in
/// transactions of `per_transaction` events, each id recorded in `emitted`.
pub async fn write_message_backlog(
    pool: &PgPool,
    events: usize,
    aggregates: usize,
    per_transaction: usize,
) -> Written {
    let mut written = Written::default();
    let mut done = 0;
    while done < events {
        let chunk = per_transaction.min(events - done);
        // Event i goes to aggregate i % aggregates as its (i / aggregates +
        // 1)th, emitted in i order: n stays 1, 2, 3, … across transactions.
        let ids: Vec<String> = sqlx::query_scalar(
            "INSERT INTO emitted (id) \
             SELECT outboxd_emit('Order', 'backlog-' || (i % $1), 'OrderCreated', \
                    jsonb_build_object('aggregate', 'backlog-' || (i % $1), 'n', i / $1 + 1, \
                                       'pad', repeat('b', 200)))::text \
             FROM generate_series($2::bigint, $3::bigint) AS i \
             RETURNING id",
        )
        .bind(aggregates as i64)
        .bind(done as i64)
        .bind((done + chunk - 1) as i64)
        .fetch_all(pool)
        .await
        .expect("write message backlog");
        written.committed += ids.len();
        written.committed_ids.extend(ids);
        done += chunk;
    }
    written
}

/// One writer of the simple workload (kept for the scenario tests).
pub async fn write_orders(
    pool: &PgPool,
    writer: usize,
    transactions: usize,
    aggregates: usize,
) -> Written {
    Workload::simple(aggregates)
        .write(pool, writer, transactions)
        .await
}

/// `writers` writers of the simple workload at once, each on its own
/// aggregates, until each has committed `transactions`.
pub async fn write_orders_concurrently(
    pool: &PgPool,
    writers: usize,
    transactions: usize,
    aggregates: usize,
) -> Written {
    let handles: Vec<_> = (0..writers)
        .map(|writer| {
            let pool = pool.clone();
            tokio::spawn(async move { write_orders(&pool, writer, transactions, aggregates).await })
        })
        .collect();
    let mut parts = Vec::new();
    for handle in handles {
        parts.push(handle.await.expect("writer"));
    }
    Written::combined(parts)
}

/// Writers that keep committing in the background until `finish`, so
/// faults land while rows keep arriving.
pub struct LiveWriter {
    writing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<Written>>,
}

impl LiveWriter {
    /// One writer of the simple workload, in rounds of `transactions`.
    pub fn start(
        pool: &PgPool,
        writer: usize,
        transactions: usize,
        aggregates: usize,
    ) -> LiveWriter {
        LiveWriter::start_many(
            pool,
            &Workload::simple(aggregates),
            writer..writer + 1,
            transactions,
        )
    }

    /// One task per writer number in `writers`, each committing rounds of
    /// `transactions` transactions of `workload`.
    pub fn start_many(
        pool: &PgPool,
        workload: &Workload,
        writers: std::ops::Range<usize>,
        transactions: usize,
    ) -> LiveWriter {
        use std::sync::atomic::{AtomicBool, Ordering};
        let writing = std::sync::Arc::new(AtomicBool::new(true));
        let handles = writers
            .map(|writer| {
                let pool = pool.clone();
                let workload = workload.clone();
                let writing = std::sync::Arc::clone(&writing);
                tokio::spawn(async move {
                    let mut rounds = Vec::new();
                    while writing.load(Ordering::SeqCst) {
                        rounds.push(workload.write(&pool, writer, transactions).await);
                    }
                    Written::combined(rounds)
                })
            })
            .collect();
        LiveWriter { writing, handles }
    }

    /// Stops after the rounds in progress; returns everything written.
    pub async fn finish(self) -> Written {
        self.writing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let mut parts = Vec::new();
        for handle in self.handles {
            parts.push(handle.await.expect("live writer"));
        }
        Written::combined(parts)
    }
}

/// Checks everything the relay published for `env` against the table and
/// fails the test with every violation listed.
pub async fn assert_exactly_once(env: &super::TestEnv, written: &Written) {
    let report = super::checker::check(env, written).await;
    report.assert_clean();
}

/// Every row the table holds is in Kafka exactly once, by event id, and
/// nothing else is checked: for tests whose checkpoints the checker cannot
/// read (another topic) or whose Kafka also holds events of rows the table
/// no longer has. Returns how many records the routed topics hold.
pub async fn assert_every_row_published_once(env: &super::TestEnv) -> usize {
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT seq, id::text FROM outbox ORDER BY seq")
        .fetch_all(&env.pool)
        .await
        .expect("rows");
    let records = super::kafka::read_all(&env.kafka, &env.topic_prefix()).await;
    let mut published: std::collections::HashMap<String, usize> = Default::default();
    for record in &records {
        let id = record.header("id").expect("every record has an id header");
        *published.entry(id.to_string()).or_default() += 1;
    }
    for (seq, id) in &rows {
        assert_eq!(
            published.get(id).copied().unwrap_or(0),
            1,
            "the row with seq {seq} (id {id}) must be published exactly once"
        );
    }
    records.len()
}
