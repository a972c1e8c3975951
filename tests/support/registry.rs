//! The stack's schema registry (Apicurio's Confluent-compatible API):
//! registering schemas over its REST API, and decoding what the relay
//! produced with confluent-kafka's Python deserializers.
//!
//! Invariant: a test that needs the registry fails, naming the fix, when
//! the stack did not export it or it does not answer; it never skips.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::kafka::Consumed;

/// The registry's API root (`OUTBOXD_TEST_SCHEMA_REGISTRY`).
pub fn url() -> String {
    std::env::var("OUTBOXD_TEST_SCHEMA_REGISTRY").unwrap_or_else(|_| {
        panic!(
            "OUTBOXD_TEST_SCHEMA_REGISTRY is not set: the schema registry tests need the \
             stack's registry. Run `make test`, or `deploy/local/stack.sh up DIR` and \
             `source DIR/env` (the stack builds and starts it)."
        )
    })
}

/// `host:port` of the registry, for a proxy in front of it.
pub fn address() -> String {
    let url = url::Url::parse(&url()).expect("OUTBOXD_TEST_SCHEMA_REGISTRY is a URL");
    format!(
        "{}:{}",
        url.host_str().expect("a host"),
        url.port_or_known_default().expect("a port")
    )
}

/// Registers `schema` (`AVRO` or `JSON`) under `subject`; its global id.
pub async fn register(subject: &str, schema_type: &str, schema: &serde_json::Value) -> u32 {
    let base = url();
    let body = serde_json::json!({"schema": schema.to_string(), "schemaType": schema_type});
    let mut attempt = 0;
    loop {
        attempt += 1;
        let response = reqwest::Client::new()
            .post(format!("{base}/subjects/{subject}/versions"))
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("the schema registry at {base} does not answer: {e}"));
        let status = response.status();
        let text = response.text().await.expect("registry answer");
        // Under concurrent registrations the registry's in-memory database
        // clashes on its id sequence: a 5xx, or a 409 "already exists" for
        // an artifact it created half (no version) before the clash. Every
        // test's subjects are its own, so asking again completes it.
        let half_created =
            status == reqwest::StatusCode::CONFLICT && text.contains("already exists");
        if (status.is_server_error() || half_created) && attempt < 10 {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            continue;
        }
        assert!(
            status.is_success(),
            "registering {subject}: {status} {text}"
        );
        let answer: serde_json::Value = serde_json::from_str(&text).expect("JSON answer");
        return answer["id"].as_u64().expect("an id") as u32;
    }
}

/// Each record's value decoded by confluent-kafka's AvroDeserializer or
/// JSONDeserializer (`format` is `avro` or `json_schema`), as
/// `(schema id from the frame, decoded value)`, in order.
pub fn decode(records: &[&Consumed], format: &str) -> Vec<(u32, serde_json::Value)> {
    let python = std::env::var("OUTBOXD_TEST_PYTHON").expect(
        "OUTBOXD_TEST_PYTHON is not set: run the tests with `make test` (install-deps.sh makes it)",
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/python/read_schema_registry.py"
    );
    let mut child = Command::new(&python)
        .arg(script)
        .arg(url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {python}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    for record in records {
        let value = record.payload.as_deref().expect("a value");
        let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
        let line = serde_json::json!({"topic": record.topic, "format": format, "value": hex});
        writeln!(input, "{line}").expect("write a record to python");
    }
    drop(input);
    let output = child.wait_with_output().expect("python finishes");
    assert!(
        output.status.success(),
        "confluent-kafka's deserializer refused a record: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .map(|line| {
            let decoded: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            (
                decoded["schema_id"].as_u64().expect("schema id") as u32,
                decoded["value"].clone(),
            )
        })
        .collect()
}
