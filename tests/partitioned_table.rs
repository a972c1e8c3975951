//! A partitioned outbox (`postgres.partitioning`): every row is published
//! exactly once whichever partition holds it, the relay keeps partitions
//! ready ahead of the clock, and an old partition is dropped only once
//! every row in it is sent.

use std::time::{Duration, Instant};

use outboxd::partitions::{self, Upkeep};
use outboxd::table::OutboxTable;

use crate::support::workload::{assert_exactly_once, write_orders_concurrently};
use crate::support::{InProcessRelay, Mode, TestEnv};

const HOURLY: &str = "  partitioning:\n    interval: 1h\n    ahead: 2\n";

/// The table's partitions, by name.
async fn partition_names(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'outbox'::regclass ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .expect("list partitions")
}

fn table(env: &TestEnv) -> OutboxTable {
    env.setup().table
}

in_both_modes!(
    a_partitioned_outbox_publishes_every_row_once_and_keeps_partitions_ahead,
    worker_threads = 4
);
async fn a_partitioned_outbox_publishes_every_row_once_and_keeps_partitions_ahead(mode: Mode) {
    let env = TestEnv::new_partitioned("part-table", mode, HOURLY).await;
    let outbox = table(&env);
    let partitioning = outbox
        .partitioning
        .clone()
        .expect("partitioning configured");

    // Migrate made the current hour's partition, the two after it and the default.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expected: Vec<String> = partitions::ranges_from(now, &partitioning)
        .into_iter()
        .map(|range| partitions::partition_name(&outbox, range, partitioning.interval))
        .collect();
    let names = partition_names(&env).await;
    assert!(names.contains(&"outbox_default".to_string()), "{names:?}");
    for name in &expected[..2] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    if mode == Mode::Replication {
        let via_root: bool = sqlx::query_scalar(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = 'outbox_publication'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert!(
            via_root,
            "the migration's publication must publish via the root"
        );
    }

    let findings = outboxd::check::run(&env.setup()).await;
    let partitioning_finding = findings
        .iter()
        .find(|f| f.subject == "partitioning")
        .unwrap_or_else(|| panic!("check reports the partitioning: {findings:?}"));
    // Ok, or a warning if the hour turned since migrate ran.
    assert_ne!(
        partitioning_finding.status,
        outboxd::check::Status::Failed,
        "{partitioning_finding}"
    );
    assert!(
        partitioning_finding.detail.contains("3 partition(s)"),
        "{partitioning_finding}"
    );

    // The relay must make the newest ahead partition again.
    let newest = expected.last().unwrap().clone();
    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {newest}"))
        .execute(&env.pool)
        .await
        .unwrap();
    // Rows beyond every range land in the default partition; rows of an
    // hour ago in a partition the table already had.
    let mut outliers: Vec<String> = sqlx::query_scalar(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, created_at) \
         SELECT 'Order', 'far-' || i, 'OrderCreated', '{\"n\": 1}', now() + interval '30 days' \
         FROM generate_series(1, 20) AS i RETURNING id::text",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_default")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(in_default, 20);

    let relay = InProcessRelay::start(env.config());
    let mut written = write_orders_concurrently(&env.pool, 3, 120, 10).await;
    written.committed += outliers.len();
    written.committed_ids.append(&mut outliers);

    env.wait_all_sent(Duration::from_secs(90)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !partition_names(&env).await.contains(&newest) {
        assert!(
            Instant::now() < deadline,
            "the relay did not create partition {newest} ahead of time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.stop().await.expect("relay stops cleanly");
    assert_exactly_once(&env, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_partition_is_dropped_only_once_every_row_in_it_is_sent() {
    let env = TestEnv::new_partitioned("part-drop", Mode::Polling, HOURLY).await;
    let outbox = table(&env);
    // Two hourly partitions three days old: one all sent, one with an unsent row.
    sqlx::raw_sql(
        "DO $$ DECLARE a timestamptz := date_trunc('hour', now() - interval '3 days'); BEGIN \
           EXECUTE format('CREATE TABLE old_sent PARTITION OF outbox FOR VALUES FROM (%L) TO (%L)', \
                          a, a + interval '1 hour'); \
           EXECUTE format('CREATE TABLE old_unsent PARTITION OF outbox FOR VALUES FROM (%L) TO (%L)', \
                          a + interval '1 hour', a + interval '2 hours'); \
         END $$; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload, created_at, sent_at) \
         SELECT 'Order', 'o-' || i, 'OrderCreated', '{}', \
                date_trunc('hour', now() - interval '3 days') + interval '10 minutes', now() - interval '2 days' \
         FROM generate_series(1, 100) AS i; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload, created_at) \
         VALUES ('Order', 'late', 'OrderCreated', '{}', \
                 date_trunc('hour', now() - interval '3 days') + interval '70 minutes');",
    )
    .execute(&env.pool)
    .await
    .expect("old partitions");

    let mut connection = env.pool.acquire().await.unwrap();
    let day = Duration::from_secs(86_400);
    let mut upkeep = Upkeep::default();
    partitions::drop_expired(&mut connection, &outbox, day, &mut upkeep)
        .await
        .expect("drop expired partitions");
    assert_eq!(upkeep.dropped, vec!["old_sent".to_string()]);
    assert_eq!(upkeep.kept_unsent, vec!["old_unsent".to_string()]);
    let current = partition_names(&env).await;
    assert!(current.contains(&"old_unsent".to_string()), "{current:?}");
    assert!(!current.contains(&"old_sent".to_string()), "{current:?}");

    // Every row in it sent, but a transaction is still inserting into it:
    // the drop must wait for that transaction rather than lose its row.
    sqlx::query("UPDATE outbox SET sent_at = now() WHERE aggregateid = 'late'")
        .execute(&env.pool)
        .await
        .unwrap();
    let mut inserting = env.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, created_at) \
         VALUES ('Order', 'in-flight', 'OrderCreated', '{}', \
                 date_trunc('hour', now() - interval '3 days') + interval '80 minutes')",
    )
    .execute(&mut *inserting)
    .await
    .unwrap();
    let mut upkeep = Upkeep::default();
    partitions::drop_expired(&mut connection, &outbox, day, &mut upkeep)
        .await
        .expect("a busy partition is skipped, not an error");
    assert_eq!(
        upkeep,
        Upkeep::default(),
        "busy: neither dropped nor judged"
    );
    inserting.commit().await.unwrap();

    let mut upkeep = Upkeep::default();
    partitions::drop_expired(&mut connection, &outbox, day, &mut upkeep)
        .await
        .unwrap();
    assert_eq!(upkeep.kept_unsent, vec!["old_unsent".to_string()]);
    let in_flight: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE aggregateid = 'in-flight'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        in_flight, 1,
        "the row committed during the drop attempt is kept"
    );

    sqlx::query("UPDATE outbox SET sent_at = now() WHERE sent_at IS NULL")
        .execute(&env.pool)
        .await
        .unwrap();
    let mut upkeep = Upkeep::default();
    partitions::drop_expired(&mut connection, &outbox, day, &mut upkeep)
        .await
        .unwrap();
    assert_eq!(upkeep.dropped, vec!["old_unsent".to_string()]);
    // Recent partitions and the default one stay.
    let left = partition_names(&env).await;
    assert!(left.contains(&"outbox_default".to_string()), "{left:?}");
    assert_eq!(left.len(), 4, "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_naming_partitions_stops_replication_with_the_fix() {
    let env = TestEnv::new_partitioned("part-pub", Mode::Replication, HOURLY).await;
    sqlx::raw_sql(
        "DROP PUBLICATION outbox_publication; \
         CREATE PUBLICATION outbox_publication FOR TABLE outbox WITH (publish = 'insert')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let relay = InProcessRelay::start(env.config());
    let error = relay
        .finished(Duration::from_secs(60))
        .await
        .expect_err("the relay must stop: no change would carry the outbox's name");
    assert_eq!(error.cause, outboxd::Cause::OutboxTable, "{error}");
    assert!(
        error
            .to_string()
            .contains("publish_via_partition_root = true"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_does_not_pretend_to_partition_an_existing_plain_table() {
    let env = TestEnv::new("part-plain", Mode::Polling).await;
    let mut config = env.config();
    config.postgres.partitioning = Some(outboxd::config::Partitioning {
        interval: Duration::from_secs(86_400),
        ahead: 3,
    });
    let setup = outboxd::setup::Setup::new(config).expect("valid");
    let findings = outboxd::check::run(&setup).await;
    assert!(
        findings.iter().any(|f| f.subject == "partitioning"
            && f.status == outboxd::check::Status::Warning
            && f.detail.contains("not partitioned")),
        "check warns that the table is plain: {findings:?}"
    );
    let error = outboxd::migrate::apply(&setup)
        .await
        .expect_err("a plain table cannot become partitioned in place");
    assert!(
        error
            .to_string()
            .contains("already exists as a plain table"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_already_in_the_default_partition_do_not_stop_later_partitions() {
    let env = TestEnv::new_partitioned("part-late", Mode::Polling, HOURLY).await;
    let outbox = table(&env);
    let partitioning = outbox
        .partitioning
        .clone()
        .expect("partitioning configured");
    // No relay ran for a while: the range partitions are gone and a row of
    // the current hour went to the default partition.
    for name in partition_names(&env).await {
        if name != "outbox_default" {
            sqlx::raw_sql(&format!("DROP TABLE {name}"))
                .execute(&env.pool)
                .await
                .unwrap();
        }
    }
    sqlx::raw_sql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('Order', 'late', 'OrderCreated', '{}')",
    )
    .execute(&env.pool)
    .await
    .unwrap();

    let mut connection = env.pool.acquire().await.unwrap();
    let created = partitions::create_ahead(&mut connection, &outbox, &partitioning)
        .await
        .expect("a range blocked by the default partition is skipped, not an error");
    // The hour may turn between the insert and the call: then the row's
    // range is the past one and every range is created.
    assert!(
        created.len() == 2 || created.len() == 3,
        "the later ranges are created: {created:?}"
    );
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_default")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(in_default, 1, "the row stays where it is");
}
