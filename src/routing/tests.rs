use super::*;
use crate::config::{RouteRule, SchemaVersion, ValueFormat};

fn event(aggregate_type: &str, event_type: &str) -> OutboxEvent {
    OutboxEvent {
        seq: 7,
        id: "5f0c6a4e-0000-4000-8000-000000000007".into(),
        aggregate_type: aggregate_type.into(),
        aggregate_id: "order-42".into(),
        event_type: event_type.into(),
        payload: Some(br#"{"total":12.5}"#.to_vec()),
        headers_json: None,
        trace_parent: None,
        position: None,
        committed_at: None,
        poison: None,
        created_at: None,
    }
}

fn router(rules: Vec<RouteRule>) -> Router {
    let config = RoutingConfig {
        rules,
        ..RoutingConfig::default()
    };
    Router::new(&config, 1_000_000).unwrap()
}

fn header<'a>(record: &'a RoutedRecord<'_>, name: &str) -> Option<&'a [u8]> {
    record
        .headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_ref())
}

#[test]
fn default_template_uses_the_aggregate_type() {
    let router = router(vec![]);
    let event = event("Order", "OrderCreated");
    let record = router.route(&event).unwrap();
    assert_eq!(record.topic, "outbox.Order");
    assert_eq!(record.key.as_deref(), Some(&b"order-42"[..]));
    assert_eq!(record.payload.as_deref(), Some(&br#"{"total":12.5}"#[..]));
    assert_eq!(
        header(&record, "id"),
        Some(&b"5f0c6a4e-0000-4000-8000-000000000007"[..])
    );
    assert_eq!(header(&record, "type"), Some(&b"OrderCreated"[..]));
    assert_eq!(header(&record, "aggregatetype"), Some(&b"Order"[..]));
    assert_eq!(header(&record, "traceparent"), None);
}

#[test]
fn first_matching_rule_wins() {
    let rules = vec![
        RouteRule {
            aggregate_type: None,
            event_type: Some("PaymentCaptured".into()),
            topic: "payments.captured".into(),
            value_format: None,
            record_name: None,
            schema_version: None,
        },
        RouteRule {
            aggregate_type: Some("Order".into()),
            event_type: None,
            topic: "orders.${type}".into(),
            value_format: None,
            record_name: None,
            schema_version: None,
        },
    ];
    let router = router(rules);
    assert_eq!(
        router
            .route(&event("Order", "PaymentCaptured"))
            .unwrap()
            .topic,
        "payments.captured"
    );
    assert_eq!(
        router.route(&event("Order", "OrderCreated")).unwrap().topic,
        "orders.OrderCreated"
    );
    assert_eq!(
        router.route(&event("Customer", "Renamed")).unwrap().topic,
        "outbox.Customer"
    );
}

#[test]
fn row_headers_and_trace_context_become_kafka_headers() {
    let mut event = event("Order", "OrderCreated");
    event.headers_json = Some(r#"{"tenant":"acme","attempt":3,"flag":null}"#.into());
    event.trace_parent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    let router = router(vec![]);
    let record = router.route(&event).unwrap();
    assert_eq!(header(&record, "tenant"), Some(&b"acme"[..]));
    assert_eq!(header(&record, "attempt"), Some(&b"3"[..]));
    assert_eq!(header(&record, "flag"), Some(&b""[..]));
    assert_eq!(
        header(&record, "traceparent"),
        Some(&b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..])
    );
}

#[test]
fn illegal_topic_or_headers_make_a_poison_row() {
    let err = router(vec![])
        .route(&event("Order Lines", "X"))
        .unwrap_err();
    assert!(err.starts_with("unroutable:"), "{err}");
    assert!(err.contains("contains ` `"), "{err}");

    let mut bad_headers = event("Order", "X");
    bad_headers.headers_json = Some("[1,2]".into());
    assert!(router(vec![])
        .route(&bad_headers)
        .unwrap_err()
        .contains("JSON object"));
}

#[test]
fn oversized_rows_are_poison_and_dead_letter_without_their_payload() {
    let config = RoutingConfig::default();
    let router = Router::new(&config, 2048).unwrap();
    let mut big = event("Order", "OrderCreated");
    big.payload = Some(vec![b'x'; 4096]);
    let reason = router.route(&big).unwrap_err();
    assert!(reason.starts_with("too large:"), "{reason}");

    let dead = router.dead_letter(&big, &reason);
    assert_eq!(dead.topic, "outboxd.dead-letter");
    assert_eq!(dead.payload, None);
    assert_eq!(header(&dead, header::PAYLOAD_OMITTED), Some(&b"true"[..]));
    assert_eq!(header(&dead, header::SOURCE_SEQ), Some(&b"7"[..]));
    assert_eq!(
        header(&dead, header::DEAD_LETTER_REASON),
        Some(reason.as_bytes())
    );
}

#[test]
fn small_poison_rows_keep_their_payload_in_the_dead_letter_topic() {
    let router = router(vec![]);
    let poison = event("bad/type", "X");
    let reason = router.route(&poison).unwrap_err();
    let dead = router.dead_letter(&poison, &reason);
    assert_eq!(dead.payload.as_deref(), poison.payload.as_deref());
    assert_eq!(dead.key.as_deref(), Some(&b"order-42"[..]));
}

#[test]
fn key_column_is_configurable() {
    let config = RoutingConfig {
        key: KeyColumn::None,
        ..RoutingConfig::default()
    };
    let router = Router::new(&config, 1_000_000).unwrap();
    assert_eq!(router.route(&event("Order", "X")).unwrap().key, None);
}

#[test]
fn templates_reject_unknown_placeholders_and_illegal_literals() {
    assert!(Template::topic("outbox.${aggregateid}")
        .unwrap_err()
        .contains("unknown placeholder"));
    assert!(Template::topic("outbox.${type")
        .unwrap_err()
        .contains("unclosed"));
    assert!(Template::topic("has space")
        .unwrap_err()
        .contains("contains ` `"));
    assert!(Template::topic("plain.topic").is_ok());
    assert!(validate_topic_name(&"a".repeat(250)).is_err());
    assert!(validate_topic_name("..").is_err());
}

fn cloudevents_router(source: &str) -> Router {
    let config = RoutingConfig {
        cloudevents: crate::config::CloudEventsConfig {
            enabled: true,
            source: source.into(),
            ..Default::default()
        },
        ..RoutingConfig::default()
    };
    Router::new(&config, 1_000_000).unwrap()
}

#[test]
fn cloudevents_attributes_become_ce_headers_and_the_payload_stays() {
    let router = cloudevents_router("/orders-service/${aggregatetype}");
    let mut event = event("Order", "OrderCreated");
    event.created_at = Some("2026-12-02T17:10:15.123456Z".into());
    let record = router.route(&event).unwrap();
    assert_eq!(header(&record, "ce_specversion"), Some(&b"1.0"[..]));
    assert_eq!(
        header(&record, "ce_id"),
        Some(&b"5f0c6a4e-0000-4000-8000-000000000007"[..])
    );
    assert_eq!(
        header(&record, "ce_source"),
        Some(&b"/orders-service/Order"[..])
    );
    assert_eq!(header(&record, "ce_type"), Some(&b"OrderCreated"[..]));
    assert_eq!(
        header(&record, "ce_time"),
        Some(&b"2026-12-02T17:10:15.123456Z"[..])
    );
    assert_eq!(header(&record, "ce_subject"), Some(&b"order-42"[..]));
    assert_eq!(
        header(&record, "content-type"),
        Some(&b"application/json"[..])
    );
    assert_eq!(record.payload.as_deref(), Some(&br#"{"total":12.5}"#[..]));
    // The outbox headers Debezium's consumers read stay.
    assert_eq!(header(&record, "type"), Some(&b"OrderCreated"[..]));
}

#[test]
fn a_row_without_created_at_has_no_time_and_its_own_content_type_wins() {
    let router = cloudevents_router("/orders");
    let mut event = event("Order", "OrderCreated");
    event.headers_json = Some(r#"{"content-type":"application/avro"}"#.into());
    let record = router.route(&event).unwrap();
    assert_eq!(header(&record, "ce_time"), None);
    let content_types: Vec<_> = record
        .headers
        .iter()
        .filter(|(name, _)| name == "content-type")
        .collect();
    assert_eq!(content_types.len(), 1, "{:?}", record.headers);
    assert_eq!(
        header(&record, "content-type"),
        Some(&b"application/avro"[..])
    );
}

#[test]
fn without_cloudevents_no_ce_headers_are_added() {
    let router = router(vec![]);
    let event = event("Order", "OrderCreated");
    let record = router.route(&event).unwrap();
    assert!(
        record
            .headers
            .iter()
            .all(|(name, _)| !name.starts_with("ce_")),
        "{:?}",
        record.headers
    );
}

fn registry_router(strategy: &str) -> Router {
    let rule = |aggregate_type: &str, topic: &str, format, version| RouteRule {
        aggregate_type: Some(aggregate_type.into()),
        event_type: None,
        topic: topic.into(),
        value_format: Some(format),
        record_name: None,
        schema_version: version,
    };
    let config = RoutingConfig {
        value_format: ValueFormat::Avro,
        schema_registry: Some(
            serde_json::from_value(serde_json::json!({
                "url": "http://127.0.0.1:9/apis/ccompat/v7",
                "subject_strategy": strategy,
                "record_name": "acme.${type}",
            }))
            .unwrap(),
        ),
        rules: vec![
            rule(
                "Shipment",
                "shipments",
                ValueFormat::JsonSchema,
                Some(SchemaVersion::Pinned(2)),
            ),
            rule("Audit", "audit", ValueFormat::Raw, None),
        ],
        ..RoutingConfig::default()
    };
    Router::new(&config, 1_000_000).unwrap()
}

#[test]
fn subjects_follow_the_strategy_rule_and_version() {
    let events = [
        event("Order", "OrderCreated"),
        event("Order", "OrderCreated"),
        event("Shipment", "Shipped"),
        event("Audit", "Logged"),
        event("bad topic!", "X"),
    ];
    let subjects = registry_router("topic_name").subjects(&events);
    let names: Vec<(String, String, ValueFormat)> = subjects
        .iter()
        .map(|s| (s.subject.clone(), s.version.to_string(), s.format))
        .collect();
    assert_eq!(
        names,
        vec![
            (
                "outbox.Order-value".into(),
                "latest".into(),
                ValueFormat::Avro
            ),
            (
                "shipments-value".into(),
                "2".into(),
                ValueFormat::JsonSchema
            ),
        ],
        "one per subject, none for raw values or unroutable rows"
    );
    let subjects = registry_router("record_name").subjects(&events);
    let names: Vec<&str> = subjects.iter().map(|s| s.subject.as_str()).collect();
    assert_eq!(names, vec!["acme.OrderCreated", "acme.Shipped"]);
}

#[test]
fn a_schema_missing_from_the_batch_is_never_sent_raw() {
    let router = registry_router("topic_name");
    let order = event("Order", "OrderCreated");
    let error = router.route(&order).unwrap_err();
    assert!(error.contains("was not resolved"), "{error}");
    // Raw rules need no schema.
    assert!(router.route(&event("Audit", "Logged")).is_ok());
}
