use super::*;

fn resolved(
    format: ValueFormat,
    schema_type: Option<&str>,
    schema: &str,
) -> Result<Resolved, RegistryError> {
    let subject = SubjectRef {
        subject: "payments-value".into(),
        version: SchemaVersion::Latest,
        format,
    };
    compile(
        &subject,
        VersionResponse {
            id: 258,
            version: 3,
            schema: schema.into(),
            schema_type: schema_type.map(str::to_string),
            references: Vec::new(),
        },
    )
}

const PAYMENT_AVRO: &str = r#"{"type": "record", "name": "Payment", "namespace": "acme",
    "fields": [{"name": "id", "type": "int"}, {"name": "amount", "type": "double"},
               {"name": "memo", "type": ["null", "string"], "default": null}]}"#;

const SHIPMENT_JSON: &str = r#"{"type": "object", "required": ["id"],
    "properties": {"id": {"type": "integer"}, "dest": {"type": "string"}}}"#;

#[test]
fn avro_values_are_framed_and_binary_encoded() {
    let schema = resolved(ValueFormat::Avro, None, PAYMENT_AVRO).unwrap();
    let value = schema
        .encode(br#"{"id": 7, "amount": 1.5, "memo": "hi"}"#)
        .unwrap();
    // Magic byte, id 258 big-endian, then zigzag 7, the double, union
    // branch 1 and the string.
    let mut expected = vec![0, 0, 0, 1, 2, 14];
    expected.extend_from_slice(&1.5f64.to_le_bytes());
    expected.extend_from_slice(&[2, 4, b'h', b'i']);
    assert_eq!(value, expected);
    // A field with a default may be left out.
    let value = schema.encode(br#"{"id": 7, "amount": 2}"#).unwrap();
    assert_eq!(value[value.len() - 1], 0, "the null branch");
}

#[test]
fn a_payload_that_does_not_fit_the_avro_schema_says_why() {
    let schema = resolved(ValueFormat::Avro, Some("AVRO"), PAYMENT_AVRO).unwrap();
    for payload in [
        &br#"{"id": "seven", "amount": 1.5}"#[..],
        br#"{"amount": 1.5}"#,
        br#"{"id": 99999999999, "amount": 1.5}"#,
        b"not json",
    ] {
        let error = schema.encode(payload).unwrap_err();
        assert!(
            error.contains("payments-value") || error.contains("not JSON"),
            "{error}"
        );
    }
}

#[test]
fn json_schema_values_are_validated_and_framed() {
    let schema = resolved(ValueFormat::JsonSchema, Some("JSON"), SHIPMENT_JSON).unwrap();
    let payload = br#"{"id": 3, "dest": "Oslo"}"#;
    let value = schema.encode(payload).unwrap();
    assert_eq!(&value[..5], &[0, 0, 0, 1, 2]);
    assert_eq!(&value[5..], payload);
    let error = schema.encode(br#"{"dest": 5}"#).unwrap_err();
    assert!(error.contains("\"id\" is a required property"), "{error}");
    assert!(error.contains("/dest"), "{error}");
}

#[test]
fn a_schema_of_another_type_is_the_registrys_problem_not_the_rows() {
    let error = resolved(ValueFormat::Avro, Some("JSON"), SHIPMENT_JSON).unwrap_err();
    assert!(error.0.contains("of type JSON"), "{}", error.0);
    let error = resolved(ValueFormat::JsonSchema, None, PAYMENT_AVRO).unwrap_err();
    assert!(error.0.contains("of type AVRO"), "{}", error.0);
    let error = resolved(ValueFormat::Avro, None, "{\"type\": \"nonsense\"}").unwrap_err();
    assert!(error.0.contains("not a valid Avro schema"), "{}", error.0);
}

#[tokio::test]
async fn an_unreachable_registry_is_an_error_to_retry() {
    // Port 9 on loopback: nothing listens (discard is long gone).
    let config: SchemaRegistryConfig = serde_json::from_value(serde_json::json!({
        "url": "http://127.0.0.1:9/apis/ccompat/v7",
        "timeout": "2s",
    }))
    .unwrap();
    let registry = Registry::new(&config).unwrap();
    let subject = SubjectRef {
        subject: "x-value".into(),
        version: SchemaVersion::Pinned(1),
        format: ValueFormat::Avro,
    };
    let error = registry.resolve(&subject).await.unwrap_err();
    assert!(
        error
            .0
            .contains("cannot reach the schema registry at http://127.0.0.1:9"),
        "{}",
        error.0
    );
}

#[test]
fn nested_records_unions_enums_and_arrays_keep_their_meaning() {
    let schema = resolved(
        ValueFormat::Avro,
        None,
        r#"{"type": "record", "name": "Order", "fields": [
            {"name": "n", "type": ["null", "int", "double"]},
            {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}},
            {"name": "lines", "type": {"type": "array", "items": {"type": "record", "name": "Line",
                "fields": [{"name": "sku", "type": "string"}, {"name": "qty", "type": "long"}]}}},
            {"name": "first", "type": ["null", "Line"], "default": null}]}"#,
    )
    .unwrap();
    let value = schema
        .encode(br#"{"n": 5, "status": "PAID", "lines": [{"sku": "a", "qty": 2}], "first": {"sku": "b", "qty": 1}}"#)
        .unwrap();
    // n: branch 1 (int) 5; status 1; one line; first: branch 1.
    assert_eq!(
        &value[5..],
        &[2, 10, 2, 2, 2, b'a', 4, 0, 2, 2, b'b', 2][..]
    );
    // Too large for int: the union's double, not a truncated int.
    let value = schema
        .encode(br#"{"n": 99999999999, "status": "NEW", "lines": []}"#)
        .unwrap();
    assert_eq!(value[5], 4, "branch 2, double");
    let error = schema
        .encode(br#"{"n": null, "status": "LOST", "lines": []}"#)
        .unwrap_err();
    assert!(
        error.contains("`LOST` is not a symbol of enum Status"),
        "{error}"
    );
    let error = schema
        .encode(br#"{"n": null, "status": "NEW", "lines": [{"sku": 1, "qty": 1}]}"#)
        .unwrap_err();
    assert!(error.contains("$.lines[0].sku"), "{error}");
}
