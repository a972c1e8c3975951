//! The streaming loop driven by a scripted stream, with the test playing
//! the rest of the pipeline: it says when the publisher is free, takes the
//! batches handed over, and acknowledges them as the acknowledge stage does
//! once a batch's Kafka transaction committed and its rows are marked. Each
//! test asserts which batches are cut and which slot position is confirmed
//! at each step.
//!
//! The clock is paused, so `run_until_waiting` returns only once the loop
//! waits for the stream, the publisher or an acknowledgement: every step
//! sees everything the loop did with what it was given.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::*;
use crate::capture::pgoutput::{Message, Relation, RelationColumn, Tuple, Value};
use crate::capture::wire::StreamItem;
use crate::config::OtherChangesPolicy;
use crate::relay::pipeline::Demand;
use crate::table::OutboxTable;

/// Every row's payload: 11 bytes, for the `batch_bytes` test.
const PAYLOAD: &str = r#"{"order":1}"#;
const OUTBOX_RELATION: u32 = 16384;

/// A replication stream that yields what the test sends it and records the
/// highest position confirmed (the server ignores a lower one).
struct ScriptedStream {
    items: mpsc::UnboundedReceiver<StreamItem>,
    confirmed: Arc<Mutex<Option<Lsn>>>,
}

impl ReplicationStream for ScriptedStream {
    async fn next(&mut self) -> Result<Option<StreamItem>> {
        Ok(self.items.recv().await)
    }

    fn acknowledge(&mut self, lsn: Lsn) {
        let mut confirmed = self.confirmed.lock().unwrap();
        *confirmed = (*confirmed).max(Some(lsn));
    }
}

/// A batch as the pipeline received it.
#[derive(Debug, PartialEq, Eq)]
struct Batch {
    seqs: Vec<i64>,
    confirm: Option<Lsn>,
}

/// The streaming loop running in a task of its own, and the test's ends of
/// its stream and pipeline.
struct Relay {
    items: mpsc::UnboundedSender<StreamItem>,
    confirmed: Arc<Mutex<Option<Lsn>>>,
    batches: mpsc::Receiver<CapturedBatch>,
    acknowledged: mpsc::UnboundedSender<Acknowledged>,
    demand: Arc<Demand>,
    /// The publisher's asks and the batches it took, so far.
    asks: u64,
    taken: u64,
    // Held so the loop does not see a shutdown.
    _stop: crate::shutdown::Trigger,
    running: tokio::task::JoinHandle<Result<()>>,
}

impl Relay {
    fn start(batch_size: usize, batch_bytes: usize) -> Relay {
        let assembler = Assembler::new(&outbox(), OtherChangesPolicy::Warn, None);
        Relay::start_with(assembler, batch_size, batch_bytes)
    }

    fn start_with(assembler: Assembler, batch_size: usize, batch_bytes: usize) -> Relay {
        Relay::start_streamer(Streamer::new(assembler, None, batch_size, batch_bytes))
    }

    /// Rows relayed unmarked (`relay.after_publish: none`), reporting how
    /// far the stream is clear into `through`.
    fn start_unmarked(through: &'static PublishedThrough) -> Relay {
        let assembler = Assembler::new(&outbox(), OtherChangesPolicy::Warn, None).published_only();
        let streamer = Streamer::new(assembler, None, 100, 1 << 20)
            .without_idle_confirms()
            .reporting_to(through);
        Relay::start_streamer(streamer)
    }

    fn start_streamer(mut streamer: Streamer<'static>) -> Relay {
        let (items, items_receiver) = mpsc::unbounded_channel();
        let confirmed = Arc::new(Mutex::new(None));
        let mut stream = ScriptedStream {
            items: items_receiver,
            confirmed: Arc::clone(&confirmed),
        };
        // The pipeline's channels, as `pipeline::run` makes them.
        let (batches_sender, batches) = mpsc::channel(1);
        let (acknowledged, acknowledged_receiver) = mpsc::unbounded_channel();
        let demand = Arc::new(Demand::default());
        let ends = CaptureEnds::new(batches_sender, acknowledged_receiver, Arc::clone(&demand));
        let (stop, stop_receiver) = crate::shutdown::channel();
        // No catch-up filter: it asks Postgres, and these rules do not
        // depend on it.
        let running =
            tokio::spawn(async move { streamer.stream(&mut stream, stop_receiver, ends).await });
        items
            .send(StreamItem::Message(Message::Relation(outbox_relation())))
            .unwrap();
        Relay {
            items,
            confirmed,
            batches,
            acknowledged,
            demand,
            asks: 0,
            taken: 0,
            _stop: stop,
            running,
        }
    }

    /// Returns once the loop waits for something: with the clock paused, the
    /// sleep ends only when no task can run.
    async fn run_until_waiting(&self) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !self.running.is_finished(),
            "the streaming loop ended; it runs until shutdown"
        );
    }

    /// The server sends `items`.
    async fn stream(&self, items: Vec<StreamItem>) {
        for item in items {
            self.items.send(item).unwrap();
        }
        self.run_until_waiting().await;
    }

    /// The publisher asks for the next batch, as it does each time it is
    /// free.
    async fn publisher_free(&mut self) {
        self.demand.ask();
        self.asks += 1;
        self.run_until_waiting().await;
    }

    /// The batch handed over to the publisher, if any. The publisher asks
    /// before each batch it takes: a batch handed over ahead answers the
    /// ask made as it is taken.
    fn handed_over(&mut self) -> Option<Batch> {
        let batch = self.batches.try_recv().ok()?;
        self.taken += 1;
        if self.asks < self.taken {
            self.demand.ask();
            self.asks += 1;
        }
        let AcknowledgeWith::Stream { confirm } = batch.acknowledge_with else {
            panic!("a streamed batch must be acknowledged as streamed");
        };
        Some(Batch {
            seqs: batch.events.iter().map(|event| event.seq).collect(),
            confirm,
        })
    }

    fn expect_batch(&mut self) -> Batch {
        self.handed_over()
            .expect("a batch should have been handed over")
    }

    /// The acknowledge stage's word: the batch's Kafka transaction committed
    /// and its rows are marked sent.
    async fn acknowledge(&self, batch: &Batch) {
        self.acknowledged
            .send(Acknowledged {
                confirm: batch.confirm,
            })
            .unwrap();
        self.run_until_waiting().await;
    }

    /// The highest position confirmed to the slot so far.
    fn confirmed(&self) -> Option<Lsn> {
        *self.confirmed.lock().unwrap()
    }
}

fn outbox() -> OutboxTable {
    OutboxTable::named("public.outbox").expect("table")
}

fn outbox_relation() -> Relation {
    let column = |name: &str, type_oid: u32| RelationColumn {
        flags: 0,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    };
    Relation {
        id: OUTBOX_RELATION,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: b'd',
        columns: vec![
            column("seq", 20),
            column("id", 2950),
            column("aggregatetype", 25),
            column("aggregateid", 25),
            column("type", 25),
            column("payload", 3802),
            column("headers", 3802),
            column("tracingspancontext", 25),
        ],
    }
}

fn begin(commit_lsn: u64) -> StreamItem {
    StreamItem::Message(Message::Begin {
        final_lsn: Lsn(commit_lsn),
        commit_time_micros: 0,
        xid: 7,
    })
}

fn insert(seq: i64) -> StreamItem {
    let text = |value: &str| Value::Text(value.as_bytes().to_vec());
    StreamItem::Message(Message::Insert {
        relation_id: OUTBOX_RELATION,
        new: Tuple(vec![
            text(&seq.to_string()),
            text("0b6c3d5e-0000-4000-8000-000000000001"),
            text("Order"),
            text("order-1"),
            text("OrderCreated"),
            text(PAYLOAD),
            Value::Null,
            Value::Null,
        ]),
    })
}

fn commit(commit_lsn: u64, end_lsn: u64) -> StreamItem {
    StreamItem::Message(Message::Commit {
        flags: 0,
        commit_lsn: Lsn(commit_lsn),
        end_lsn: Lsn(end_lsn),
        commit_time_micros: 0,
    })
}

/// A whole source transaction committing at `commit_lsn`, its commit
/// record ending at `end_lsn`, with an outbox row for each of `seqs`.
fn transaction(commit_lsn: u64, end_lsn: u64, seqs: &[i64]) -> Vec<StreamItem> {
    let mut items = vec![begin(commit_lsn)];
    items.extend(seqs.iter().map(|&seq| insert(seq)));
    items.push(commit(commit_lsn, end_lsn));
    items
}

fn keepalive(wal_end: u64) -> StreamItem {
    StreamItem::KeepAlive {
        wal_end: Lsn(wal_end),
    }
}

fn batch(seqs: &[i64], confirm: Option<u64>) -> Batch {
    Batch {
        seqs: seqs.to_vec(),
        confirm: confirm.map(Lsn),
    }
}

#[tokio::test(start_paused = true)]
async fn rows_wait_in_the_batch_until_the_publisher_is_free() {
    let mut relay = Relay::start(100, 1 << 20);
    relay.stream(transaction(100, 110, &[1])).await;
    relay.stream(transaction(200, 210, &[2])).await;
    assert_eq!(relay.handed_over(), None, "the publisher did not ask yet");

    relay.publisher_free().await;
    assert_eq!(
        relay.handed_over(),
        Some(batch(&[1, 2], Some(210))),
        "one batch of both transactions, confirming the end of the last"
    );
}

#[tokio::test(start_paused = true)]
async fn a_free_publisher_gets_every_row_already_waiting_in_one_batch() {
    let mut relay = Relay::start(100, 1 << 20);
    relay.publisher_free().await;
    let mut both = transaction(100, 110, &[1]);
    both.extend(transaction(200, 210, &[2]));
    relay.stream(both).await;
    assert_eq!(relay.handed_over(), Some(batch(&[1, 2], Some(210))));
    assert_eq!(relay.handed_over(), None);
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_cut_at_batch_size_without_waiting_for_the_publisher() {
    let mut relay = Relay::start(2, 1 << 20);
    relay.stream(transaction(100, 110, &[1, 2, 3])).await;
    assert_eq!(
        relay.handed_over(),
        Some(batch(&[1, 2], None)),
        "a full batch goes at once, confirming nothing: its transaction goes on"
    );
    assert_eq!(
        relay.handed_over(),
        None,
        "the rest waits for the publisher"
    );

    relay.publisher_free().await;
    assert_eq!(relay.handed_over(), Some(batch(&[3], Some(110))));
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_cut_at_batch_bytes_without_waiting_for_the_publisher() {
    // Two payloads of 11 bytes reach 20.
    let mut relay = Relay::start(100, 20);
    relay.stream(transaction(100, 110, &[1, 2, 3])).await;
    assert_eq!(relay.handed_over(), Some(batch(&[1, 2], None)));
    assert_eq!(relay.handed_over(), None);
}

#[tokio::test(start_paused = true)]
async fn a_free_publisher_waits_for_the_rest_of_an_open_transaction() {
    let mut relay = Relay::start(100, 1 << 20);
    relay.publisher_free().await;
    relay.stream(vec![begin(100), insert(1)]).await;
    assert_eq!(
        relay.handed_over(),
        None,
        "pgoutput sends a transaction whole: the rest is on its way"
    );

    relay.stream(vec![insert(2), commit(100, 110)]).await;
    assert_eq!(relay.handed_over(), Some(batch(&[1, 2], Some(110))));
}

#[tokio::test(start_paused = true)]
async fn the_slot_is_confirmed_only_once_the_batch_is_acknowledged() {
    let mut relay = Relay::start(100, 1 << 20);
    relay.publisher_free().await;
    relay.stream(transaction(100, 110, &[1])).await;
    let published = relay.expect_batch();
    assert_eq!(
        relay.confirmed(),
        None,
        "handed over is not yet in Kafka nor marked"
    );

    relay.acknowledge(&published).await;
    assert_eq!(relay.confirmed(), Some(Lsn(110)));
}

#[tokio::test(start_paused = true)]
async fn a_transaction_split_over_batches_is_confirmed_only_at_its_end() {
    let mut relay = Relay::start(3, 1 << 20);
    let mut items = transaction(100, 110, &[1]);
    items.extend(transaction(200, 210, &[2, 3, 4]));
    relay.stream(items).await;
    let first = relay.expect_batch();
    assert_eq!(
        first,
        batch(&[1, 2, 3], Some(110)),
        "the first batch completes only the first transaction"
    );
    relay.acknowledge(&first).await;
    assert_eq!(relay.confirmed(), Some(Lsn(110)));

    relay.publisher_free().await;
    let second = relay.expect_batch();
    assert_eq!(second, batch(&[4], Some(210)));
    relay.acknowledge(&second).await;
    assert_eq!(relay.confirmed(), Some(Lsn(210)));
}

#[tokio::test(start_paused = true)]
async fn with_nothing_in_flight_a_keepalive_is_confirmed_at_once() {
    let relay = Relay::start(100, 1 << 20);
    relay.stream(vec![keepalive(500)]).await;
    assert_eq!(relay.confirmed(), Some(Lsn(500)));
}

#[tokio::test(start_paused = true)]
async fn with_nothing_in_flight_a_transaction_without_outbox_rows_is_confirmed_at_once() {
    let relay = Relay::start(100, 1 << 20);
    relay.stream(transaction(100, 110, &[])).await;
    assert_eq!(relay.confirmed(), Some(Lsn(110)));
}

#[tokio::test(start_paused = true)]
async fn a_keepalive_is_confirmed_only_after_the_batch_in_flight() {
    confirmed_only_after_the_batch_in_flight(vec![keepalive(500)], Lsn(500)).await;
}

#[tokio::test(start_paused = true)]
async fn a_transaction_without_outbox_rows_is_confirmed_only_after_the_batch_in_flight() {
    confirmed_only_after_the_batch_in_flight(transaction(200, 210, &[]), Lsn(210)).await;
}

/// `idle` (nothing to batch) reaches `position` while a batch is in flight.
async fn confirmed_only_after_the_batch_in_flight(idle: Vec<StreamItem>, position: Lsn) {
    let mut relay = Relay::start(100, 1 << 20);
    relay.publisher_free().await;
    relay.stream(transaction(100, 110, &[1])).await;
    let in_flight = relay.expect_batch();
    relay.stream(idle).await;
    assert_eq!(
        relay.confirmed(),
        None,
        "confirming {position} would pass the unacknowledged transaction"
    );

    relay.acknowledge(&in_flight).await;
    assert_eq!(relay.confirmed(), Some(position));
}

#[tokio::test(start_paused = true)]
async fn an_idle_position_waits_for_every_batch_in_flight() {
    let mut relay = Relay::start(100, 1 << 20);
    relay.publisher_free().await;
    relay.stream(transaction(100, 110, &[1])).await;
    let first = relay.expect_batch();
    relay.publisher_free().await;
    relay.stream(transaction(200, 210, &[2])).await;
    let second = relay.expect_batch();
    relay.stream(vec![keepalive(500)]).await;

    relay.acknowledge(&first).await;
    assert_eq!(
        relay.confirmed(),
        Some(Lsn(110)),
        "the second batch is not acknowledged yet"
    );
    relay.acknowledge(&second).await;
    assert_eq!(relay.confirmed(), Some(Lsn(500)));
}

#[tokio::test(start_paused = true)]
async fn a_keepalive_is_not_confirmed_past_rows_still_batched() {
    let mut relay = Relay::start(100, 1 << 20);
    relay.stream(transaction(100, 110, &[1])).await;
    relay.stream(vec![keepalive(500)]).await;
    assert_eq!(relay.confirmed(), None, "row 1 is not in Kafka");

    relay.publisher_free().await;
    let published = relay.expect_batch();
    relay.acknowledge(&published).await;
    assert_eq!(
        relay.confirmed(),
        Some(Lsn(110)),
        "the keepalive came while rows were batched: the next one is confirmed instead"
    );
}

#[tokio::test(start_paused = true)]
async fn a_keepalive_inside_a_transaction_is_not_confirmed() {
    let mut relay = Relay::start(100, 1 << 20);
    relay.publisher_free().await;
    // The walsender may send a keepalive between the messages of a large
    // transaction, before any of its outbox rows.
    relay.stream(vec![begin(200), keepalive(205)]).await;
    assert_eq!(relay.confirmed(), None);

    relay.stream(vec![insert(1), commit(200, 210)]).await;
    let published = relay.expect_batch();
    assert_eq!(published, batch(&[1], Some(210)));
    assert_eq!(relay.confirmed(), None);
}

/// `capture.source: messages`: a logical message with the relay's prefix.
fn emitted(transactional: bool, lsn: u64, id: &str) -> StreamItem {
    StreamItem::Message(Message::Message {
        transactional,
        lsn: Lsn(lsn),
        prefix: "outboxd".into(),
        content: format!(
            r#"{{"v":1,"id":"{id}","aggregatetype":"Order","aggregateid":"o","type":"T","payload":{PAYLOAD}}}"#
        )
        .into_bytes(),
    })
}

#[tokio::test(start_paused = true)]
async fn messages_confirm_only_to_the_commit_of_what_was_published() {
    let mut relay = Relay::start_with(Assembler::for_messages("outboxd", None), 100, 1 << 20);
    relay
        .stream(vec![
            begin(200),
            emitted(true, 150, "a"),
            emitted(true, 160, "b"),
            commit(200, 230),
        ])
        .await;
    relay.publisher_free().await;
    let first = relay.expect_batch();
    // seq is each message's LSN; confirming stops one byte inside the
    // commit record (`capture::stream::just_inside`), not at its end, so
    // the slot never passes the checkpoint's position.
    assert_eq!(first, batch(&[150, 160], Some(201)));
    relay.acknowledge(&first).await;
    assert_eq!(relay.confirmed(), Some(Lsn(201)));

    // Transactions without our messages and keepalives confirm nothing.
    relay.stream(transaction(300, 310, &[])).await;
    relay.stream(vec![keepalive(400)]).await;
    assert_eq!(relay.confirmed(), Some(Lsn(201)));

    // A non-transactional message is a (poison) event confirmed inside
    // its own record, one byte before its LSN, where a commit record that
    // follows it may start.
    relay.stream(vec![emitted(false, 450, "loose")]).await;
    relay.publisher_free().await;
    let loose = relay.expect_batch();
    assert_eq!(loose, batch(&[450], Some(449)));
    relay.acknowledge(&loose).await;
    assert_eq!(relay.confirmed(), Some(Lsn(449)));
}

#[tokio::test(start_paused = true)]
async fn unmarked_rows_confirm_only_inside_published_commits_and_keepalives_only_clear() {
    let through: &'static PublishedThrough = Box::leak(Box::default());
    let mut relay = Relay::start_unmarked(through);
    relay.publisher_free().await;
    relay.stream(transaction(200, 230, &[1, 2])).await;
    let first = relay.expect_batch();
    // One byte inside the commit record, as for messages: the slot never
    // passes the checkpoint's position by the relay's own doing.
    assert_eq!(first, batch(&[1, 2], Some(201)));
    relay.stream(vec![keepalive(300)]).await;
    assert_eq!(
        through.get(),
        Lsn(0),
        "nothing is clear while a batch is in flight"
    );
    relay.acknowledge(&first).await;
    assert_eq!(relay.confirmed(), Some(Lsn(201)));
    assert_eq!(
        through.get(),
        Lsn(300),
        "the keepalive is clear once the batch is"
    );

    // Transactions without outbox rows and keepalives confirm nothing,
    // but tell retention how far the stream is clear.
    relay.stream(transaction(400, 410, &[])).await;
    relay.stream(vec![keepalive(500)]).await;
    assert_eq!(relay.confirmed(), Some(Lsn(201)));
    assert_eq!(through.get(), Lsn(500));
}

#[tokio::test(start_paused = true)]
async fn an_idle_unmarked_stream_commits_a_checkpoint_of_its_own_and_confirms_to_it() {
    let through: &'static PublishedThrough = Box::leak(Box::default());
    let mut relay = Relay::start_unmarked(through);
    relay.publisher_free().await;
    relay.stream(transaction(200, 230, &[1])).await;
    let first = relay.expect_batch();
    relay.acknowledge(&first).await;
    assert_eq!(relay.confirmed(), Some(Lsn(201)));

    // Within the interval, keepalives are only reported clear.
    relay.stream(vec![keepalive(300)]).await;
    assert_eq!(relay.handed_over(), None);
    assert_eq!(relay.confirmed(), Some(Lsn(201)));

    // Past it, the idle position goes to Kafka in a checkpoint of its own,
    // one byte before the keepalive at the highest index, and the slot is
    // confirmed to the keepalive once that checkpoint is committed.
    tokio::time::sleep(IDLE_CHECKPOINT_EVERY).await;
    relay.stream(vec![keepalive(400)]).await;
    let idle = relay.expect_batch();
    assert_eq!(idle, batch(&[], Some(400)));
    assert_eq!(
        relay.confirmed(),
        Some(Lsn(201)),
        "not before it is committed"
    );
    relay.acknowledge(&idle).await;
    assert_eq!(relay.confirmed(), Some(Lsn(400)));

    // Nothing moved since: no more checkpoints.
    tokio::time::sleep(IDLE_CHECKPOINT_EVERY).await;
    relay.stream(vec![keepalive(400)]).await;
    assert_eq!(relay.handed_over(), None);
}
