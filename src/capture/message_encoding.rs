//! The WAL-message outbox's content encoding, version 1, and the SQL helper
//! that writes it (`capture.source: messages`).
//!
//! Invariant: a message's content is either decoded into exactly the fields
//! an outbox row has, its `payload` kept byte for byte as written (never
//! re-encoded), or refused with a reason that becomes the dead-letter
//! reason. The encoding is fixed per version: a new field or meaning is a
//! new `v`, and a relay refuses a version it does not know rather than
//! guess (docs/wal-messages.md).
//!
//! Version 1 is one JSON object, UTF-8:
//!
//! ```json
//! {"v": 1, "id": "<uuid or any text>", "aggregatetype": "Order",
//!  "aggregateid": "o-42", "type": "OrderCreated",
//!  "payload": {...} | null, "headers": {"k": "v"} | null,
//!  "tracingspancontext": "<traceparent>" | null}
//! ```
//!
//! `v`, `id`, `aggregatetype`, `aggregateid` and `type` are required
//! (non-empty strings); the rest may be missing or null (a null or missing
//! payload is a tombstone, as a NULL payload column). Other keys are
//! ignored, so a writer may annotate its messages without a new version.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::table::{quote_ident, quote_literal};

/// The only version this relay reads.
pub const VERSION: u64 = 1;

/// The helper function `outboxd migrate` creates (in `postgres.schema`).
pub const EMIT_FUNCTION: &str = "outboxd_emit";

/// One decoded message: the fields of an outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageEvent {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// The payload's JSON text as written; `None` for null or missing.
    pub payload: Option<Vec<u8>>,
    /// The headers object's JSON text; `None` for null or missing.
    pub headers_json: Option<String>,
    pub trace_parent: Option<String>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    v: Option<u64>,
    id: Option<String>,
    aggregatetype: Option<String>,
    aggregateid: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    headers: Option<&'a RawValue>,
    tracingspancontext: Option<String>,
}

/// Decodes a message's content, or says why it is poison.
pub fn decode(content: &[u8]) -> Result<MessageEvent, String> {
    let text = std::str::from_utf8(content)
        .map_err(|_| "bad message encoding: the content is not UTF-8".to_string())?;
    let envelope: Envelope = serde_json::from_str(text).map_err(|e| {
        format!("bad message encoding: the content is not a version {VERSION} JSON object ({e})")
    })?;
    match envelope.v {
        Some(VERSION) => {}
        Some(other) => {
            return Err(format!(
                "bad message encoding: version {other}, this relay reads version {VERSION}; \
                 upgrade the relay or write version {VERSION}"
            ))
        }
        None => return Err("bad message encoding: no \"v\" (version) key".into()),
    }
    let required = |value: Option<String>, key: &str| match value {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(format!(
            "bad message encoding: \"{key}\" is missing, null or empty"
        )),
    };
    let headers_json = match not_null(envelope.headers) {
        Some(raw) if raw.get().starts_with('{') => Some(raw.get().to_string()),
        Some(_) => {
            return Err("bad message encoding: \"headers\" must be a JSON object or null".into())
        }
        None => None,
    };
    Ok(MessageEvent {
        id: required(envelope.id, "id")?,
        aggregate_type: required(envelope.aggregatetype, "aggregatetype")?,
        aggregate_id: required(envelope.aggregateid, "aggregateid")?,
        event_type: required(envelope.event_type, "type")?,
        payload: not_null(envelope.payload).map(|raw| raw.get().as_bytes().to_vec()),
        headers_json,
        trace_parent: envelope.tracingspancontext.filter(|t| !t.is_empty()),
    })
}

/// A JSON null counts as missing.
fn not_null(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|raw| raw.get() != "null")
}

/// Encodes version 1, as the SQL helper does: for tests and for services
/// that emit from their own code instead of calling the function.
pub fn encode(event: &MessageEvent) -> String {
    let raw = |bytes: &Option<Vec<u8>>| {
        bytes
            .as_deref()
            .map_or("null", |b| std::str::from_utf8(b).unwrap_or("null"))
            .to_string()
    };
    format!(
        "{{\"v\":{VERSION},\"id\":{},\"aggregatetype\":{},\"aggregateid\":{},\"type\":{},\"payload\":{},\"headers\":{}{}}}",
        serde_json::Value::from(event.id.as_str()),
        serde_json::Value::from(event.aggregate_type.as_str()),
        serde_json::Value::from(event.aggregate_id.as_str()),
        serde_json::Value::from(event.event_type.as_str()),
        raw(&event.payload),
        event.headers_json.as_deref().unwrap_or("null"),
        event
            .trace_parent
            .as_deref()
            .map(|t| format!(",\"tracingspancontext\":{}", serde_json::Value::from(t)))
            .unwrap_or_default(),
    )
}

/// The migration for `capture.source: messages`: the helper function and
/// an empty publication (pgoutput needs one to start; no table is in it,
/// and logical messages are sent whatever a publication holds). The slot
/// is created separately, after this commits (`migrate::apply`): a slot
/// cannot be created in a transaction that wrote.
/// Whether an emit function's source (`pg_proc.prosrc`) emits `prefix`:
/// one schema holds one `outboxd_emit`, and the migration of a message
/// outbox with another prefix in the same schema would replace it, so its
/// service's events would reach the other relay.
pub fn function_emits_prefix(source: &str, prefix: &str) -> bool {
    source.contains(&format!(
        "pg_logical_emit_message(true, {},",
        quote_literal(prefix)
    ))
}

pub fn migration_sql(schema: &str, prefix: &str, publication: &str) -> String {
    let function = format!("{}.{}", quote_ident(schema), quote_ident(EMIT_FUNCTION));
    format!(
        "-- outboxd: the WAL-message outbox (capture.source: messages). No table: each\n\
         -- event is a transactional logical decoding message, committed or rolled back\n\
         -- with the service's transaction. Every statement is idempotent.\n\
         \n\
         -- Call it inside the business transaction; returns the event id.\n\
         --   SELECT {function}('Order', 'o-42', 'OrderCreated', '{{\"orderId\": \"o-42\"}}');\n\
         -- Content: encoding version {VERSION} (docs/wal-messages.md), prefix {prefix_literal}.\n\
         CREATE OR REPLACE FUNCTION {function}(\n    \
             aggregatetype text,\n    \
             aggregateid text,\n    \
             type text,\n    \
             payload jsonb,\n    \
             headers jsonb DEFAULT NULL,\n    \
             id uuid DEFAULT gen_random_uuid()\n\
         ) RETURNS uuid LANGUAGE sql VOLATILE AS $$\n\
         SELECT pg_logical_emit_message(true, {prefix_literal}, jsonb_build_object(\n    \
             'v', {VERSION}, 'id', $6, 'aggregatetype', $1, 'aggregateid', $2,\n    \
             'type', $3, 'payload', $4, 'headers', $5)::text);\n\
         SELECT $6;\n\
         $$;\n\
         \n\
         -- pgoutput needs a publication to start streaming; messages need no table in it.\n\
         DO $$\nBEGIN\n    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {publication_literal}) THEN\n        \
         CREATE PUBLICATION {publication_ident};\n    END IF;\nEND\n$$;\n\
         \n\
         -- The slot must exist before services emit: a message is kept only for slots\n\
         -- that existed when it was written. `outboxd migrate` creates it after this\n\
         -- file (a role with REPLICATION); by hand:\n\
         --   SELECT pg_create_logical_replication_slot('<capture.slot>', 'pgoutput');\n",
        prefix_literal = quote_literal(prefix),
        publication_literal = quote_literal(publication),
        publication_ident = quote_ident(publication),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MessageEvent {
        MessageEvent {
            id: "6f1c1c8e-1f7a-4a6e-9d43-2f7f1d5c9b10".into(),
            aggregate_type: "Order".into(),
            aggregate_id: "o-42".into(),
            event_type: "OrderCreated".into(),
            payload: Some(br#"{"orderId": "o-42", "totalCents": 1299}"#.to_vec()),
            headers_json: Some(r#"{"tenant":"t1"}"#.into()),
            trace_parent: None,
        }
    }

    #[test]
    fn encode_then_decode_is_the_same_event() {
        let event = sample();
        assert_eq!(decode(encode(&event).as_bytes()), Ok(event.clone()));
        let tombstone = MessageEvent {
            payload: None,
            headers_json: None,
            trace_parent: Some("00-abc-def-01".into()),
            ..event
        };
        assert_eq!(decode(encode(&tombstone).as_bytes()), Ok(tombstone));
    }

    #[test]
    fn the_payload_is_kept_byte_for_byte() {
        // jsonb's own output (what the SQL helper writes): key order and
        // spacing as Postgres made them, never re-encoded.
        let content = br#"{"v": 1, "id": "e1", "type": "T", "headers": null, "payload": {"b": 1, "a": [1.50, "x"]}, "aggregateid": "a", "aggregatetype": "A"}"#;
        let event = decode(content).unwrap();
        assert_eq!(
            event.payload.as_deref(),
            Some(&br#"{"b": 1, "a": [1.50, "x"]}"#[..])
        );
        assert_eq!(event.headers_json, None);
        assert_eq!(event.aggregate_type, "A");
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let content =
            br#"{"v":1,"id":"e","aggregatetype":"A","aggregateid":"a","type":"T","note":"x"}"#;
        assert_eq!(decode(content).unwrap().payload, None);
    }

    #[test]
    fn bad_content_is_refused_with_the_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"\xff\xfe", "not UTF-8"),
            (b"not json", "not a version 1 JSON object"),
            (b"[1,2]", "not a version 1 JSON object"),
            (br#"{"id":"e","aggregatetype":"A","aggregateid":"a","type":"T"}"#, "no \"v\""),
            (br#"{"v":2,"id":"e","aggregatetype":"A","aggregateid":"a","type":"T"}"#, "version 2"),
            (br#"{"v":1,"aggregatetype":"A","aggregateid":"a","type":"T"}"#, "\"id\" is missing"),
            (br#"{"v":1,"id":"e","aggregatetype":"","aggregateid":"a","type":"T"}"#, "\"aggregatetype\""),
            (br#"{"v":1,"id":"e","aggregatetype":"A","aggregateid":null,"type":"T"}"#, "\"aggregateid\""),
            (br#"{"v":1,"id":"e","aggregatetype":"A","aggregateid":"a"}"#, "\"type\""),
            (br#"{"v":1,"id":"e","aggregatetype":"A","aggregateid":"a","type":"T","headers":[1]}"#, "\"headers\" must be"),
            (br#"{"v":1,"id":7,"aggregatetype":"A","aggregateid":"a","type":"T"}"#, "not a version 1"),
        ];
        for (content, expected) in cases {
            let reason = decode(content).unwrap_err();
            assert!(reason.contains(expected), "{reason} lacks {expected}");
            assert!(reason.starts_with("bad message encoding"), "{reason}");
        }
    }

    #[test]
    fn the_migration_quotes_the_prefix_and_names() {
        let sql = migration_sql("sales", "app'x", "pub");
        assert!(sql.contains("CREATE OR REPLACE FUNCTION \"sales\".\"outboxd_emit\"("));
        assert!(sql.contains("pg_logical_emit_message(true, 'app''x', jsonb_build_object("));
        assert!(sql.contains("CREATE PUBLICATION \"pub\";"));
    }

    #[test]
    fn the_migrated_function_is_known_by_its_prefix() {
        let sql = migration_sql("public", "orders", "outboxd_messages");
        let source = &sql[sql.find("SELECT pg_logical_emit_message").unwrap()..];
        assert!(function_emits_prefix(source, "orders"));
        assert!(!function_emits_prefix(source, "order"));
        assert!(!function_emits_prefix(source, "billing"));
    }
}
