use std::io::Write;

use super::*;

const MINIMAL: &str = "\
relay:
  name: orders
postgres:
  url: postgres://outboxd@localhost/orders
kafka:
  bootstrap_servers: localhost:9092
";

fn write_config(text: &str) -> tempfile_path::TempConfig {
    tempfile_path::TempConfig::new(text)
}

/// A config file that removes itself.
mod tempfile_path {
    use super::*;

    pub struct TempConfig(pub PathBuf);

    impl TempConfig {
        pub fn new(text: &str) -> TempConfig {
            static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = std::env::temp_dir().join(format!(
                "outboxd-config-test-{}-{n}.yaml",
                std::process::id()
            ));
            let mut file = std::fs::File::create(&path).unwrap();
            file.write_all(text.as_bytes()).unwrap();
            TempConfig(path)
        }
    }

    impl Drop for TempConfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// The error a user sees for `text`: from the file's own checks or from
/// the set-up's (tests only reach past `config` to judge the whole load).
fn load_error(text: &str) -> String {
    let file = write_config(text);
    let error = match crate::setup::Setup::load_all(&file.0) {
        Ok(_) => panic!("expected an invalid config:\n{text}"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains(&file.0.display().to_string()),
        "error does not name the file: {error}"
    );
    error
}

fn load(text: &str) -> Config {
    let file = write_config(text);
    Config::load(&file.0).unwrap()
}

#[test]
fn minimal_config_gets_debezium_defaults() {
    let file = write_config(MINIMAL);
    let config = Config::load(&file.0).unwrap();
    assert_eq!(config.postgres.table, "public.outbox");
    assert_eq!(config.postgres.columns.aggregate_id, "aggregateid");
    assert_eq!(config.relay.after_publish, AfterPublish::Mark);
    assert_eq!(config.capture.batch_size, 2_000);
    assert_eq!(config.capture.batch_bytes, 4 * 1024 * 1024);
    assert_eq!(config.routing.topic, "outbox.${aggregatetype}");
    assert_eq!(config.kafka.transaction_timeout, Duration::from_secs(60));
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/outboxd.yaml");
    let config = Config::load(&example).unwrap();
    assert_eq!(config.routing.rules.len(), 1);
}

#[test]
fn unknown_keys_are_named() {
    let error = load_error(&format!("{MINIMAL}capture:\n  batch_sise: 10\n"));
    assert!(error.contains("batch_sise"), "{error}");
}

#[test]
fn bad_values_name_their_key() {
    let error = load_error(&format!("{MINIMAL}capture:\n  poll_interval: 5\n"));
    assert!(
        error.contains("poll_interval") && error.contains("no unit"),
        "{error}"
    );
    let error = load_error(&format!("{MINIMAL}relay_extra: 1\n"));
    assert!(error.contains("relay_extra"), "{error}");
    let error = load_error(&MINIMAL.replace("name: orders", "name: Orders Relay"));
    assert!(error.contains("relay.name"), "{error}");
    let error = load_error(&format!(
        "{MINIMAL}routing:\n  topic: \"outbox.${{nope}}\"\n"
    ));
    assert!(
        error.contains("routing.topic") && error.contains("unknown placeholder"),
        "{error}"
    );
    let error = load_error(&format!("{MINIMAL}capture:\n  batch_size: 0\n"));
    assert!(error.contains("capture.batch_size"), "{error}");
    let error = load_error(&format!("{MINIMAL}capture:\n  batch_bytes: 10\n"));
    assert!(error.contains("capture.batch_bytes"), "{error}");
    let error =
        load_error(&MINIMAL.replace("name: orders", "name: orders\n  after_publish: archive"));
    assert!(error.contains("archive"), "{error}");
}

#[test]
fn capture_defaults_to_auto_with_a_slot_named_after_the_relay() {
    let config = load(&MINIMAL.replace("name: orders", "name: order-relay"));
    assert_eq!(config.capture.mode, CaptureMode::Auto);
    assert_eq!(config.slot_name(), "outboxd_order_relay");
    assert_eq!(config.capture.on_slot_lost, SlotLostPolicy::Recover);
}

#[test]
fn publication_names_must_read_the_same_unquoted() {
    // pgoutput's publication_names would fold, split or reject most of
    // these; anything outside lower-case identifier characters is refused.
    for bad in [
        "Outbox",
        "outbox publication",
        "outbox,other",
        "outbox-pub",
        "\"outbox\"",
        "",
    ] {
        let error = load_error(&MINIMAL.replace(
            "  url: postgres://outboxd@localhost/orders\n",
            &format!("  url: postgres://outboxd@localhost/orders\n  publication: '{bad}'\n"),
        ));
        assert!(error.contains("postgres.publication"), "{bad}: {error}");
    }
    let config = load(&MINIMAL.replace(
        "  url: postgres://outboxd@localhost/orders\n",
        "  url: postgres://outboxd@localhost/orders\n  publication: outbox_pub_2\n",
    ));
    assert_eq!(config.postgres.publication, "outbox_pub_2");
}

#[test]
fn slot_names_follow_postgres_rules() {
    for bad in ["Orders", "orders-slot", "ordérs", &"s".repeat(64)] {
        let error = load_error(&format!("{MINIMAL}capture:\n  slot: \"{bad}\"\n"));
        assert!(error.contains("capture.slot"), "{bad}: {error}");
    }
    let config = load(&format!(
        "{MINIMAL}capture:\n  mode: replication\n  slot: orders_1\n"
    ));
    assert_eq!(config.slot_name(), "orders_1");
    assert_eq!(config.capture.mode, CaptureMode::Replication);
    let error = load_error(&format!("{MINIMAL}capture:\n  mode: logical\n"));
    assert!(error.contains("logical"), "{error}");
}

#[test]
fn missing_required_keys_are_named() {
    let error = load_error("relay:\n  name: orders\nkafka:\n  bootstrap_servers: k:9092\n");
    assert!(error.contains("postgres"), "{error}");
}

#[test]
fn managed_kafka_properties_are_refused() {
    let error = load_error(&format!(
        "{MINIMAL}  properties:\n    transactional.id: mine\n"
    ));
    assert!(
        error.contains("kafka.properties.transactional.id"),
        "{error}"
    );
}

#[test]
fn dotted_property_keys_survive_and_secrets_are_redacted_in_debug() {
    let file = write_config(&format!(
        "{MINIMAL}  properties:\n    security.protocol: SASL_SSL\n    sasl.password: hunter2\n"
    ));
    let config = Config::load(&file.0).unwrap();
    assert_eq!(
        config
            .kafka
            .properties
            .get("security.protocol")
            .map(String::as_str),
        Some("SASL_SSL")
    );
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let error = Config::load(Path::new("/nonexistent/outboxd.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("/nonexistent/outboxd.yaml") && error.contains("does not exist"),
        "{error}"
    );
}

#[test]
fn keys_are_partitioned_as_java_producers_do_unless_told_otherwise() {
    assert_eq!(
        load(MINIMAL).routing.partitioner,
        Partitioner::Murmur2Random
    );
    let config = load(&format!(
        "{MINIMAL}routing:\n  partitioner: consistent_random\n"
    ));
    assert_eq!(
        config.routing.partitioner.librdkafka_name(),
        "consistent_random"
    );
    let error = load_error(&format!("{MINIMAL}routing:\n  partitioner: crc32\n"));
    assert!(
        error.contains("partitioner") && error.contains("crc32"),
        "{error}"
    );
    let error = load_error(&format!(
        "{MINIMAL}  properties:\n    partitioner: murmur2\n"
    ));
    assert!(
        error.contains("kafka.properties.partitioner") && error.contains("routing.partitioner"),
        "{error}"
    );
}

#[test]
fn missing_topics_wait_unless_told_to_create_them_or_treat_them_as_poison() {
    assert_eq!(load(MINIMAL).routing.missing_topics, MissingTopics::Wait);
    let config = load(&format!(
        "{MINIMAL}routing:\n  missing_topics: create\n  create_topics:\n    partitions: 6\n    \
         replication_factor: 3\n    configs:\n      min.insync.replicas: \"2\"\n"
    ));
    assert_eq!(config.routing.missing_topics, MissingTopics::Create);
    assert_eq!(config.routing.create_topics.partitions, Some(6));
    assert_eq!(
        config
            .routing
            .create_topics
            .configs
            .get("min.insync.replicas"),
        Some(&"2".to_string())
    );
    let error = load_error(&format!(
        "{MINIMAL}routing:\n  create_topics:\n    partitions: 0\n"
    ));
    assert!(
        error.contains("routing.create_topics.partitions"),
        "{error}"
    );
    let error = load_error(&format!("{MINIMAL}routing:\n  missing_topics: ignore\n"));
    assert!(
        error.contains("missing_topics") && error.contains("ignore"),
        "{error}"
    );
}

#[test]
fn cloudevents_are_off_by_default_and_need_a_source() {
    assert!(!load(MINIMAL).routing.cloudevents.enabled);
    let config = load(&format!(
        "{MINIMAL}routing:\n  cloudevents:\n    enabled: true\n    source: \"/orders/${{aggregatetype}}\"\n"
    ));
    assert!(config.routing.cloudevents.enabled);
    let error = load_error(&format!(
        "{MINIMAL}routing:\n  cloudevents:\n    enabled: true\n    source: \"\"\n"
    ));
    assert!(error.contains("routing.cloudevents.source"), "{error}");
    let error = load_error(&format!(
        "{MINIMAL}routing:\n  cloudevents:\n    source: \"/x/${{aggregateid}}\"\n"
    ));
    assert!(error.contains("routing.cloudevents.source"), "{error}");
}

#[test]
fn partitioning_defaults_to_daily_three_ahead_and_rejects_what_cannot_tile_a_day() {
    let with = |lines: &str| MINIMAL.replace("postgres:\n", &format!("postgres:\n{lines}"));
    let file = write_config(&with("  partitioning: {}\n"));
    let config = Config::load(&file.0).expect("valid");
    assert_eq!(
        config.postgres.partitioning,
        Some(Partitioning {
            interval: Duration::from_secs(86_400),
            ahead: 3
        })
    );
    assert!(Config::load(&write_config(MINIMAL).0)
        .unwrap()
        .postgres
        .partitioning
        .is_none());

    let error = load_error(&with("  partitioning:\n    interval: 7m\n"));
    assert!(error.contains("postgres.partitioning.interval"), "{error}");
    let error = load_error(&with("  partitioning:\n    ahead: 0\n"));
    assert!(error.contains("postgres.partitioning.ahead"), "{error}");
    let long = "t".repeat(50);
    let error = load_error(&with(&format!(
        "  table: {long}\n  partitioning:\n    interval: 1h\n"
    )));
    assert!(error.contains("postgres.partitioning"), "{error}");
    assert!(error.contains("63"), "{error}");
}

#[test]
fn schema_registry_formats_and_subjects_load() {
    let config = load(&format!(
        "{MINIMAL}routing:\n  value_format: avro\n  schema_registry:\n    url: http://registry:8081\n    \
         username: outboxd\n    password: s3cret\n    version: 3\n  rules:\n    - aggregate_type: Shipment\n      \
         topic: shipments\n      value_format: json_schema\n      schema_version: latest\n    \
         - aggregate_type: Audit\n      topic: audit\n      value_format: raw\n"
    ));
    assert_eq!(config.routing.value_format, ValueFormat::Avro);
    let registry = config.routing.schema_registry.as_ref().unwrap();
    assert_eq!(registry.version, SchemaVersion::Pinned(3));
    assert_eq!(registry.subject_strategy, SubjectStrategy::TopicName);
    assert_eq!(
        config.routing.rules[0].value_format,
        Some(ValueFormat::JsonSchema)
    );
    assert_eq!(
        config.routing.rules[0].schema_version,
        Some(SchemaVersion::Latest)
    );
    assert!(
        !format!("{registry:?}").contains("s3cret"),
        "the password stays out of Debug output"
    );
    assert_eq!(load(MINIMAL).routing.value_format, ValueFormat::Raw);
}

#[test]
fn malformed_schema_registry_settings_name_their_key() {
    let cases = [
        (
            "routing:\n  value_format: avro\n",
            "routing.schema_registry: needed",
        ),
        (
            "routing:\n  rules:\n    - type: X\n      topic: x\n      value_format: json_schema\n",
            "routing.schema_registry: needed",
        ),
        (
            "routing:\n  value_format: protobuf\n",
            "does not have variant constructor protobuf for key `routing.value_format`",
        ),
        (
            "routing:\n  schema_registry:\n    url: http://r:8081\n    version: 0\n",
            "must be `latest` or a version number",
        ),
        (
            "routing:\n  schema_registry:\n    url: http://r:8081\n    version: newest\n",
            "must be `latest` or a version number",
        ),
        (
            "routing:\n  schema_registry:\n    url: ftp://r\n",
            "routing.schema_registry.url: the scheme must be http or https",
        ),
        (
            "routing:\n  schema_registry:\n    url: http://u:p@r:8081\n",
            "routing.schema_registry.url: put credentials",
        ),
        (
            "routing:\n  schema_registry:\n    url: http://r:8081\n    username: u\n",
            "routing.schema_registry.password: needed with username",
        ),
        (
            "routing:\n  schema_registry:\n    url: http://r:8081\n    ca_file: /nonexistent/ca.pem\n",
            "routing.schema_registry.ca_file: /nonexistent/ca.pem does not exist",
        ),
        (
            "routing:\n  value_format: avro\n  schema_registry:\n    url: http://r:8081\n    \
             subject_strategy: record_name\n    record_name: \"${nope}\"\n",
            "routing.schema_registry.record_name: `${nope}` uses unknown placeholder",
        ),
    ];
    for (routing, expected) in cases {
        let error = load_error(&format!("{MINIMAL}{routing}"));
        assert!(error.contains(expected), "{routing}: {error}");
    }
}

#[test]
fn message_source_needs_replication_and_a_plain_prefix() {
    let config = load(MINIMAL);
    assert_eq!(config.capture.source, CaptureSource::Table);
    assert_eq!(config.capture.message_prefix, "outboxd");
    assert!(!config.messages());
    assert_eq!(config.source_name("public.outbox"), "public.outbox");

    let messages = format!("{MINIMAL}capture:\n  mode: replication\n  source: messages\n");
    let config = load(&messages);
    assert!(config.messages());
    assert_eq!(config.source_name("public.outbox"), "messages:outboxd");

    for mode in ["polling", "auto"] {
        let error = load_error(&format!(
            "{MINIMAL}capture:\n  mode: {mode}\n  source: messages\n"
        ));
        assert!(
            error.contains("capture.mode") && error.contains(mode) && error.contains("replication"),
            "{error}"
        );
    }
    // Left out, the mode is auto: refused as well.
    let error = load_error(&format!("{MINIMAL}capture:\n  source: messages\n"));
    assert!(error.contains("capture.mode: `auto`"), "{error}");
    let error = load_error(&format!("{messages}  message_prefix: \"a/b\"\n"));
    assert!(error.contains("capture.message_prefix"), "{error}");
    let error = load_error(&format!("{messages}  accept_message_loss_through: soon\n"));
    assert!(
        error.contains("capture.accept_message_loss_through"),
        "{error}"
    );
    let config = load(&format!(
        "{messages}  accept_message_loss_through: 0/16B3748\n"
    ));
    assert_eq!(
        config.capture.accept_message_loss_through.as_deref(),
        Some("0/16B3748")
    );
    let error =
        load_error(&messages.replace("  name: orders\n", "  name: orders\n  retention: 7d\n"));
    assert!(error.contains("relay.retention"), "{error}");
    let error = load_error(&format!("{MINIMAL}capture:\n  source: rows\n"));
    assert!(
        error.contains("capture") && error.contains("source"),
        "{error}"
    );
}

#[test]
fn unmarked_rows_need_replication_and_partitions_for_retention() {
    let none = MINIMAL.replace(
        "  name: orders\n",
        "  name: orders\n  after_publish: none\n",
    );
    for mode in ["polling", "auto"] {
        let error = load_error(&format!("{none}capture:\n  mode: {mode}\n"));
        assert!(
            error.contains("relay.after_publish") && error.contains(mode),
            "{error}"
        );
    }
    let replication = format!("{none}capture:\n  mode: replication\n");
    let config = load(&replication);
    assert!(config.unmarked() && !config.rows_show_pending());
    assert!(load(MINIMAL).rows_show_pending());
    // Row-by-row retention reads marks: only whole partitions can go.
    let retained = replication.replace(
        "  after_publish: none\n",
        "  after_publish: none\n  retention: 7d\n",
    );
    let error = load_error(&retained);
    assert!(
        error.contains("relay.retention") && error.contains("postgres.partitioning"),
        "{error}"
    );
    let partitioned = retained.replace(
        "postgres:\n  url: postgres://outboxd@localhost/orders\n",
        "postgres:\n  url: postgres://outboxd@localhost/orders\n  partitioning:\n    interval: 1d\n",
    );
    assert_eq!(
        load(&partitioned).relay.retention,
        Some(std::time::Duration::from_secs(7 * 86_400))
    );
    let error = load_error(&format!(
        "{replication}  accept_message_loss_through: soon\n"
    ));
    assert!(
        error.contains("capture.accept_message_loss_through"),
        "{error}"
    );
}

#[test]
fn the_message_outbox_example_loads() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/messages/outboxd.yaml");
    let setup = crate::setup::Setup::load(&example).expect("examples/messages/outboxd.yaml loads");
    assert!(setup.config.messages());
    assert_eq!(setup.config.capture.mode, CaptureMode::Replication);
}

#[test]
fn the_several_outboxes_example_loads_each_outbox_as_it_says() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/several/outboxd.yaml");
    let setups =
        crate::setup::Setup::load_all(&example).expect("examples/several/outboxd.yaml loads");
    let names: Vec<&str> = setups.iter().map(|s| s.name()).collect();
    assert_eq!(names, ["orders", "billing", "shipping"]);
    let (orders, billing, shipping) = (&setups[0].config, &setups[1].config, &setups[2].config);
    assert_eq!(
        orders.relay.retention,
        Some(Duration::from_secs(7 * 86_400))
    );
    assert_eq!(orders.postgres.table, "orders.outbox");
    assert_eq!(billing.relay.after_publish, AfterPublish::Delete);
    assert_eq!(billing.relay.retention, None);
    assert_eq!(billing.capture.mode, CaptureMode::Polling);
    assert!(shipping.messages());
    assert_eq!(
        shipping.postgres.url,
        "postgres://outboxd@localhost:5432/shipping"
    );
    // Inherited from the top level by every outbox.
    for config in [orders, billing, shipping] {
        assert_eq!(config.routing.dead_letter_topic, "outbox.dead-letters");
        assert_eq!(config.http.listen.port(), 9464);
    }
    // A command about one outbox's rows refuses the file.
    let error = Config::load(&example).unwrap_err().to_string();
    assert!(
        error.contains("lists 3 outboxes (orders, billing, shipping)"),
        "{error}"
    );
}

#[test]
fn several_outboxes_may_not_share_a_publication_in_one_database() {
    let error = load_error(&format!(
        "{MINIMAL}outboxes:\n  - name: a\n    postgres: {{table: a.outbox}}\n  - name: b\n    postgres: {{table: b.outbox}}\n"
    ));
    assert!(
        error.contains("outboxes[1] (b).postgres.publication: in the same database, the publication `outbox_publication` is also outbox `a`'s"),
        "{error}"
    );
}
