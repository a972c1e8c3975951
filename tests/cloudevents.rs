//! CloudEvents, Kafka protocol binding, binary content mode: what outboxd
//! produces is read back with the CloudEvents SDK for Python, which refuses
//! records missing a required attribute or with a malformed time.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use sqlx::Row;

use crate::support::kafka::read_all;
use crate::support::{InProcessRelay, Mode, TestEnv};

in_both_modes!(cloudevents_sdk_reads_every_record, worker_threads = 2);
async fn cloudevents_sdk_reads_every_record(mode: Mode) {
    let env = TestEnv::new("cloudevents", mode).await;
    // Postgres prints timestamps in the session's time zone; the relay's
    // `time` must be the same instant in UTC whatever the zone.
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&env.pool)
        .await
        .expect("database name");
    sqlx::raw_sql(&format!(
        "ALTER DATABASE {database} SET timezone = 'Asia/Kolkata'"
    ))
    .execute(&env.pool)
    .await
    .expect("set the database's time zone");
    env.replace_in_config(
        "routing:\n",
        "routing:\n  cloudevents:\n    enabled: true\n    source: \"/shop/${aggregatetype}\"\n",
    );
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(30)).await;

    sqlx::raw_sql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, created_at) VALUES \
           ('Order', 'order-1', 'OrderCreated', '{\"total\": 12.5}', '2024-02-29 23:30:00.5-08'), \
           ('Order', 'order-1', 'OrderPaid', '{\"paid\": true}', '2026-12-31 23:59:59.999999+00'); \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) VALUES \
           ('Payment', 'pay-7', 'PaymentCaptured', '{\"amount\": 3}', '{\"content-type\": \"application/json; charset=utf-8\"}'); \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
           SELECT 'Order', 'order-' || g, 'OrderCreated', jsonb_build_object('n', g) \
           FROM generate_series(2, 40) AS g",
    )
    .execute(&env.pool)
    .await
    .expect("insert events");
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");

    let rows = sqlx::query(
        "SELECT id::text, aggregatetype, aggregateid, type, payload::text, \
                to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
         FROM outbox",
    )
    .fetch_all(&env.pool)
    .await
    .expect("read the outbox");
    let expected: HashMap<String, _> = rows
        .iter()
        .map(|row| {
            let id: String = row.get(0);
            (id, row)
        })
        .collect();

    let consumed = read_all(&env.kafka, &env.topic_prefix()).await;
    assert_eq!(consumed.len(), rows.len(), "one record per row");
    let events = read_with_the_sdk(&consumed);
    assert_eq!(events.len(), rows.len(), "the SDK read every record");
    for event in &events {
        let id = event["id"].as_str().expect("id");
        let row = expected
            .get(id)
            .unwrap_or_else(|| panic!("an event with an unknown id: {event}"));
        let aggregate_type: String = row.get(1);
        let aggregate_id: String = row.get(2);
        let event_type: String = row.get(3);
        let payload: String = row.get(4);
        let created_at: String = row.get(5);
        assert_eq!(event["specversion"], "1.0", "{event}");
        assert_eq!(event["type"], event_type.as_str(), "{event}");
        assert_eq!(
            event["source"],
            format!("/shop/{aggregate_type}").as_str(),
            "{event}"
        );
        assert_eq!(event["subject"], aggregate_id.as_str(), "{event}");
        assert_eq!(event["time"], created_at.as_str(), "{event}");
        let payload: serde_json::Value = serde_json::from_str(&payload).expect("payload JSON");
        assert_eq!(
            event["data"], payload,
            "the payload is the data, unchanged: {event}"
        );
        let content_type = if event_type == "PaymentCaptured" {
            "application/json; charset=utf-8"
        } else {
            "application/json"
        };
        assert_eq!(event["datacontenttype"], content_type, "{event}");
    }
    let paid = events
        .iter()
        .find(|e| e["type"] == "OrderCreated" && e["subject"] == "order-1")
        .expect("the first order's event");
    assert_eq!(paid["time"], "2024-03-01T07:30:00.500000Z");
}

/// Every record parsed by `tests/support/python/read_cloudevents.py`.
fn read_with_the_sdk(records: &[crate::support::kafka::Consumed]) -> Vec<serde_json::Value> {
    let python = std::env::var("OUTBOXD_TEST_PYTHON").expect(
        "OUTBOXD_TEST_PYTHON is not set: run the tests with `make test` (install-deps.sh makes it)",
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/python/read_cloudevents.py"
    );
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {python}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    for record in records {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let line = serde_json::json!({
            "headers": record.headers,
            "key": record.key.as_deref().map(hex),
            "value": hex(record.payload.as_deref().unwrap_or_default()),
        });
        writeln!(input, "{line}").expect("write a record to python");
    }
    drop(input);
    let output = child.wait_with_output().expect("python finishes");
    assert!(
        output.status.success(),
        "the CloudEvents SDK refused a record: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}
