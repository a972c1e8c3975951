//! A seq handed out again. A promoted standby that lacked the primary's
//! last commits (or a restore without them) gives their seqs to new rows.
//! The latest checkpoint still names those seqs as published; reconciling
//! by seq alone would mark the new rows sent, and they would never be
//! published. Checkpoints name each row by its event id too, so only the
//! rows they published are marked.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::faults::RelayProcess;
use crate::support::kafka::read_all;
use crate::support::workload::write_orders;
use crate::support::{Mode, TestEnv};

const LIMIT: Duration = Duration::from_secs(60);

in_both_modes!(
    a_seq_reused_after_the_published_row_was_lost_is_published,
    worker_threads = 2
);
async fn a_seq_reused_after_the_published_row_was_lost_is_published(mode: Mode) {
    let env = TestEnv::new("reused-seqs", mode).await;
    let written = write_orders(&env.pool, 0, 4, 2).await;
    let mut relay = RelayProcess::start(&env, Some("after-commit"));
    relay.killed_at_point("after-commit", LIMIT).await;
    let unmarked: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM outbox WHERE sent_at IS NULL ORDER BY seq")
            .fetch_all(&env.pool)
            .await
            .expect("unmarked rows");
    assert_eq!(unmarked.len(), written.committed, "published, none marked");

    // What the promoted server has: none of those rows, and new rows (new
    // event ids) under the same seqs.
    sqlx::raw_sql(
        "BEGIN; \
         CREATE TEMP TABLE lost AS SELECT * FROM outbox WHERE sent_at IS NULL; \
         DELETE FROM outbox WHERE sent_at IS NULL; \
         INSERT INTO outbox (seq, id, aggregatetype, aggregateid, type, payload) \
           OVERRIDING SYSTEM VALUE \
           SELECT seq, gen_random_uuid(), aggregatetype, aggregateid, 'Reborn', payload FROM lost; \
         COMMIT",
    )
    .execute(&env.pool)
    .await
    .expect("seqs handed out again");

    let mut relay = RelayProcess::start(&env, None);
    env.wait_all_sent(LIMIT).await;
    relay.stop().await;

    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT seq, id::text FROM outbox ORDER BY seq")
        .fetch_all(&env.pool)
        .await
        .expect("rows");
    let records = read_all(&env.kafka, &env.topic_prefix()).await;
    let mut published: HashMap<String, usize> = HashMap::new();
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
    // The lost rows' events stay in Kafka: nothing can take them back.
    assert_eq!(records.len(), 2 * written.committed);
}
