//! Values encoded against a real schema registry (the stack's Apicurio,
//! through its Confluent-compatible API) and decoded by a consumer no one
//! here wrote: confluent-kafka's AvroDeserializer and JSONDeserializer.
//! A payload its schema refuses is dead-lettered; a registry that cannot be
//! reached holds the rows back, dead-letters none, and they go out once it
//! answers.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::http::get;
use crate::support::kafka::{read_all, Consumed};
use crate::support::proxy::Proxy;
use crate::support::{registry, InProcessRelay, Mode, TestEnv};

fn payment_schema() -> serde_json::Value {
    json!({
        "type": "record", "name": "Payment", "namespace": "shop",
        "fields": [
            {"name": "id", "type": "long"},
            {"name": "amount", "type": "double"},
            {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}},
            {"name": "memo", "type": ["null", "string"], "default": null},
        ],
    })
}

fn shipment_schema() -> serde_json::Value {
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Shipment", "type": "object",
        "properties": {"id": {"type": "integer"}, "dest": {"type": "string"}},
        "required": ["id", "dest"],
    })
}

/// `routing:` with Payment rows in Avro (the default), Shipment rows in
/// JSON Schema and Note rows raw, against the registry at `url`.
fn routing(env: &TestEnv, url: &str) -> String {
    let prefix = env.topic_prefix();
    format!(
        "routing:\n  value_format: avro\n  schema_registry:\n    url: {url}\n    timeout: 2s\n  \
         rules:\n    - aggregate_type: Shipment\n      topic: \"{prefix}.Shipment\"\n      \
         value_format: json_schema\n    - aggregate_type: Note\n      topic: \"{prefix}.Note\"\n      \
         value_format: raw\n"
    )
}

fn on_topic<'a>(records: &'a [Consumed], topic: &str) -> Vec<&'a Consumed> {
    records.iter().filter(|r| r.topic == topic).collect()
}

in_both_modes!(
    avro_and_json_schema_values_decode_with_confluent_deserializers,
    worker_threads = 2
);
async fn avro_and_json_schema_values_decode_with_confluent_deserializers(mode: Mode) {
    let env = TestEnv::new("schema-registry", mode).await;
    let prefix = env.topic_prefix();
    let payment_id = registry::register(
        &format!("{prefix}.Payment-value"),
        "AVRO",
        &payment_schema(),
    )
    .await;
    let shipment_id = registry::register(
        &format!("{prefix}.Shipment-value"),
        "JSON",
        &shipment_schema(),
    )
    .await;
    env.replace_in_config("routing:\n", &routing(&env, &registry::url()));
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(30)).await;

    sqlx::raw_sql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
           SELECT 'Payment', 'pay-' || g, 'PaymentMade', jsonb_build_object('id', g, \
             'amount', g * 1.5, 'status', CASE WHEN g % 2 = 0 THEN 'PAID' ELSE 'NEW' END, \
             'memo', CASE WHEN g % 3 = 0 THEN NULL ELSE 'memo ' || g END) \
           FROM generate_series(1, 20) AS g; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
           SELECT 'Shipment', 'ship-' || g, 'Shipped', jsonb_build_object('id', g, 'dest', 'Oslo ' || g) \
           FROM generate_series(1, 10) AS g; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
           ('Note', 'n-1', 'Noted', '{\"free\": [\"form\"]}'), \
           ('Payment', 'pay-bad', 'PaymentMade', '{\"id\": 99, \"amount\": \"lots\", \"status\": \"NEW\"}'), \
           ('Shipment', 'ship-bad', 'Shipped', '{\"id\": 99}')",
    )
    .execute(&env.pool)
    .await
    .expect("insert events");
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");

    let records = read_all(&env.kafka, &prefix).await;
    let expected = |aggregate_type: &'static str| {
        let pool = env.pool.clone();
        async move {
            let rows: Vec<(String, serde_json::Value)> = sqlx::query_as(
                "SELECT aggregateid, payload FROM outbox \
                 WHERE aggregatetype = $1 AND aggregateid NOT LIKE '%-bad' ORDER BY seq",
            )
            .bind(aggregate_type)
            .fetch_all(&pool)
            .await
            .expect("read the outbox");
            rows
        }
    };

    // Avro: confluent-kafka decodes every value to the row's payload.
    let payments = on_topic(&records, &format!("{prefix}.Payment"));
    let rows = expected("Payment").await;
    assert_eq!(
        payments.len(),
        rows.len(),
        "one record per good Payment row"
    );
    for (record, (decoded_id, decoded)) in payments.iter().zip(registry::decode(&payments, "avro"))
    {
        assert_eq!(
            decoded_id, payment_id,
            "the frame names the registered schema"
        );
        let key = String::from_utf8(record.key.clone().expect("key")).expect("UTF-8 key");
        let (_, payload) = rows.iter().find(|(id, _)| *id == key).expect("its row");
        assert_eq!(&decoded, payload, "the Avro value decodes to the payload");
    }

    // JSON Schema: decoded (and validated) by JSONDeserializer.
    let shipments = on_topic(&records, &format!("{prefix}.Shipment"));
    let rows = expected("Shipment").await;
    assert_eq!(
        shipments.len(),
        rows.len(),
        "one record per good Shipment row"
    );
    for (record, (decoded_id, decoded)) in shipments
        .iter()
        .zip(registry::decode(&shipments, "json_schema"))
    {
        assert_eq!(decoded_id, shipment_id);
        let key = String::from_utf8(record.key.clone().expect("key")).expect("UTF-8 key");
        let (_, payload) = rows.iter().find(|(id, _)| *id == key).expect("its row");
        assert_eq!(&decoded, payload);
    }

    // Raw stays raw.
    let notes = on_topic(&records, &format!("{prefix}.Note"));
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].payload_json(), json!({"free": ["form"]}));

    // Each payload its schema refuses is a poison row, with why.
    let dead = on_topic(&records, &env.dead_letter_topic());
    assert_eq!(dead.len(), 2, "the two mismatched rows: {dead:?}");
    for record in dead {
        let reason = record
            .header("outboxd.dead_letter.reason")
            .expect("a reason");
        assert!(
            reason.contains("does not match the schema of subject"),
            "{reason}"
        );
        let subject = if record.payload_json()["amount"] == "lots" {
            format!("{prefix}.Payment-value")
        } else {
            assert!(
                reason.contains("dest"),
                "names the missing property: {reason}"
            );
            format!("{prefix}.Shipment-value")
        };
        assert!(reason.contains(&subject), "{reason}");
    }
}

in_both_modes!(
    an_unreachable_registry_holds_rows_back_until_it_answers,
    worker_threads = 2
);
async fn an_unreachable_registry_holds_rows_back_until_it_answers(mode: Mode) {
    let env = TestEnv::new("registry-down", mode).await;
    let prefix = env.topic_prefix();
    let payment_id = registry::register(
        &format!("{prefix}.Payment-value"),
        "AVRO",
        &payment_schema(),
    )
    .await;
    // A port nothing listens on, until the proxy below takes it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port();
    let path = url::Url::parse(&registry::url())
        .expect("registry URL")
        .path()
        .to_string();
    let wrong = format!("http://127.0.0.1:{port}{path}");
    env.replace_in_config("routing:\n", &routing(&env, &wrong));
    let relay = InProcessRelay::start(env.config());
    let base = relay.serve_http().await;
    env.wait_streaming(Duration::from_secs(30)).await;
    sqlx::raw_sql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
           SELECT 'Payment', 'pay-' || g, 'PaymentMade', \
             jsonb_build_object('id', g, 'amount', g, 'status', 'NEW') \
           FROM generate_series(1, 5) AS g",
    )
    .execute(&env.pool)
    .await
    .expect("insert events");

    // The relay says why it waits: /readyz and the metric.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&base, "/readyz").await;
        if status == 503 && body.contains("cannot reach the schema registry") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never named the registry: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, metrics) = get(&base, "/metrics").await;
    assert!(
        metrics.contains("outboxd_schema_registry_unavailable 1"),
        "{metrics}"
    );
    // A few retries later: nothing published, nothing dead-lettered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.unsent().await, 5, "the rows wait");
    assert!(
        read_all(&env.kafka, &prefix).await.is_empty(),
        "nothing published or dead-lettered while the registry is away"
    );

    // The registry answers on that port now: the rows go out, encoded.
    let _proxy = Proxy::start(&format!("127.0.0.1:{port}"), &registry::address()).await;
    env.wait_all_sent(Duration::from_secs(90)).await;
    let (status, body) = get(&base, "/readyz").await;
    assert_eq!(status, 200, "ready again: {body}");
    relay.stop().await.expect("relay stops cleanly");
    let records = read_all(&env.kafka, &prefix).await;
    assert!(
        on_topic(&records, &env.dead_letter_topic()).is_empty(),
        "no row was dead-lettered"
    );
    let payments = on_topic(&records, &format!("{prefix}.Payment"));
    assert_eq!(payments.len(), 5);
    for (_, (id, decoded)) in payments.iter().zip(registry::decode(&payments, "avro")) {
        assert_eq!(id, payment_id);
        assert_eq!(decoded["status"], "NEW");
    }
}

#[tokio::test]
async fn check_resolves_every_configured_subject() {
    let env = TestEnv::new("registry-check", Mode::Polling).await;
    let prefix = env.topic_prefix();
    let shipment_id = registry::register(
        &format!("{prefix}.Shipment-value"),
        "JSON",
        &shipment_schema(),
    )
    .await;
    let url = registry::url();
    env.replace_in_config(
        "routing:\n",
        &format!(
            "routing:\n  value_format: avro\n  schema_registry:\n    url: {url}\n    \
             username: outboxd\n    password: registry-s3cret\n  rules:\n    \
             - aggregate_type: Shipment\n      topic: \"{prefix}.Shipment\"\n      \
             value_format: json_schema\n    - aggregate_type: Refund\n      \
             topic: \"{prefix}.Refund\"\n      schema_version: 4\n"
        ),
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["check", "--config", env.config_path.to_str().unwrap()])
        .output()
        .expect("run outboxd check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = |needle: &str| {
        stdout
            .lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line with `{needle}`:\n{stdout}"))
            .to_string()
    };
    assert!(line("schema registry:").starts_with("[ok  ]"), "{stdout}");
    let shipment = line("schema subject: routing.rules[0]:");
    assert!(shipment.starts_with("[ok  ]"), "{shipment}");
    assert!(
        shipment.contains(&format!("schema id {shipment_id}, version 1")),
        "{shipment}"
    );
    let default = line("schema subject: routing: ");
    assert!(default.contains("depends on the row"), "{default}");
    let refund = line("schema subject: routing.rules[1]:");
    assert!(refund.starts_with("[FAIL]"), "{refund}");
    assert!(
        refund.contains(&format!("`{prefix}.Refund-value`")),
        "{refund}"
    );
    assert!(!output.status.success(), "a missing subject fails check");
    assert!(!stdout.contains("registry-s3cret"), "{stdout}");
}

// Structured payloads: a `bytea` (or `text`) payload holding JSON is
// published as the JSON it holds, as Debezium's `table.expand.json.payload`
// does: raw, its bytes are that JSON's text; with a registry format, it is
// parsed and encoded like a `jsonb` one.
in_both_modes!(
    a_bytea_payload_is_published_as_the_json_it_holds,
    worker_threads = 2
);
async fn a_bytea_payload_is_published_as_the_json_it_holds(mode: Mode) {
    let env = TestEnv::new("registry-bytea", mode).await;
    let prefix = env.topic_prefix();
    // The migration's triggers name the column: set aside while it changes.
    sqlx::raw_sql(
        "DO $$ DECLARE defs text[]; def text; t record; BEGIN \
           SELECT array_agg(pg_get_triggerdef(oid)) INTO defs FROM pg_trigger \
             WHERE tgrelid = 'outbox'::regclass AND NOT tgisinternal; \
           FOR t IN SELECT tgname FROM pg_trigger \
             WHERE tgrelid = 'outbox'::regclass AND NOT tgisinternal LOOP \
             EXECUTE format('DROP TRIGGER %I ON outbox', t.tgname); \
           END LOOP; \
           ALTER TABLE outbox ALTER COLUMN payload TYPE bytea \
             USING convert_to(payload::text, 'UTF8'); \
           FOREACH def IN ARRAY coalesce(defs, '{}') LOOP EXECUTE def; END LOOP; \
         END $$",
    )
    .execute(&env.pool)
    .await
    .expect("make the payload bytea");
    let payment_id = registry::register(
        &format!("{prefix}.Payment-value"),
        "AVRO",
        &payment_schema(),
    )
    .await;
    env.replace_in_config("routing:\n", &routing(&env, &registry::url()));
    let relay = InProcessRelay::start(env.config());
    env.wait_streaming(Duration::from_secs(30)).await;
    sqlx::raw_sql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
           ('Payment', 'pay-1', 'PaymentMade', \
             convert_to('{\"id\": 1, \"amount\": 2.5, \"status\": \"PAID\", \"memo\": \"é\"}', 'UTF8')), \
           ('Note', 'n-1', 'Noted', convert_to('{\"free\": \"form\"}', 'UTF8')), \
           ('Payment', 'pay-bad', 'PaymentMade', '\\xdeadbeef'::bytea)",
    )
    .execute(&env.pool)
    .await
    .expect("insert events");
    env.wait_all_sent(Duration::from_secs(60)).await;
    relay.stop().await.expect("relay stops cleanly");

    let records = read_all(&env.kafka, &prefix).await;
    let payments = on_topic(&records, &format!("{prefix}.Payment"));
    assert_eq!(payments.len(), 1);
    let decoded = registry::decode(&payments, "avro");
    assert_eq!(
        decoded,
        vec![(
            payment_id,
            json!({"id": 1, "amount": 2.5, "status": "PAID", "memo": "é"})
        )]
    );
    let notes = on_topic(&records, &format!("{prefix}.Note"));
    assert_eq!(notes[0].payload_json(), json!({"free": "form"}));
    let dead = on_topic(&records, &env.dead_letter_topic());
    assert_eq!(dead.len(), 1, "bytes that are not JSON are poison");
    let reason = dead[0]
        .header("outboxd.dead_letter.reason")
        .expect("reason");
    assert!(reason.contains("the payload is not JSON"), "{reason}");
    assert_eq!(
        dead[0].payload.as_deref(),
        Some(&[0xde, 0xad, 0xbe, 0xef][..])
    );
}
