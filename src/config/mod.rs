//! The relay's configuration: one YAML file plus `OUTBOXD__SECTION__KEY`
//! environment overrides.
//!
//! Invariant: a [`Config`] that exists is well-formed: unknown keys, bad
//! values and impossible combinations of its own keys are rejected at load
//! time with the file and the key in the message. What needs the rest of
//! the relay to judge (table and column names, topic templates, properties
//! outboxd manages) is checked by the `setup` module, which every command
//! starts from, so the relay never starts half-configured. This module
//! imports no other part of outboxd.
//! The doc comments on the fields are the user documentation; the annotated
//! example lives in `examples/outboxd.yaml`.

pub mod duration;
pub mod outboxes;
pub mod secret;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Environment variables starting with this (then `__`) override file keys.
pub const ENV_PREFIX: &str = "OUTBOXD";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub relay: RelayConfig,
    pub postgres: PostgresConfig,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub capture: CaptureConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub http: HttpConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The relay process's name: its Kafka client id, its replication slot
    /// (`outboxd_<name>`), its logs and metrics. The Kafka `transactional.id`,
    /// the checkpoint key and the leader lock belong to the outbox table
    /// (`kafka::identity`), so relays of one table fence each other whatever
    /// their names, and one publishes while the others wait. Keep it unchanged
    /// for a table: a renamed relay leaves its old slot behind, holding WAL.
    pub name: String,
    /// What happens to a row once Kafka committed it: `mark` sets `sent_at`
    /// (the table shows what is pending), `delete` removes it, `none` writes
    /// nothing (replication only: the slot and the checkpoint are the
    /// record, and retention drops whole partitions).
    #[serde(default)]
    pub after_publish: AfterPublish,
    /// What to do with a row that cannot be published (unroutable, too large):
    /// `dead_letter` sends it to `routing.dead_letter_topic`, `halt` stops the relay.
    #[serde(default)]
    pub on_poison: PoisonPolicy,
    /// Deletes rows marked sent longer ago than this (e.g. `7d`), a few
    /// thousand at a time, so the table does not grow forever. Unset keeps
    /// them. With `after_publish: mark`, or `none` on a partitioned table
    /// (whole partitions are dropped once the stream is past them).
    #[serde(default, deserialize_with = "duration::deserialize_optional")]
    pub retention: Option<Duration>,
    /// On SIGTERM/SIGINT: how long the relay may take to finish the Kafka
    /// transaction in flight and acknowledge it before it gives up on it
    /// (safe either way: what is not acknowledged is published after restart).
    #[serde(
        default = "defaults::shutdown_grace",
        deserialize_with = "duration::deserialize"
    )]
    pub shutdown_grace: Duration,
    /// How many Kafka transactions may be committed while their rows are
    /// not yet marked sent. Marking runs behind publishing, so the next
    /// transaction does not wait for the previous one's marks; every
    /// checkpoint names the rows of all of them, and start-up marks them.
    /// `1` publishes, marks, then publishes the next. 1 to 16.
    #[serde(default = "defaults::unacknowledged_batches")]
    pub unacknowledged_batches: usize,
}

impl RelayConfig {
    /// Whether the relay deletes rows (`after_publish: delete`, or
    /// `retention`), so its role needs `DELETE` on the table.
    pub fn deletes_rows(&self) -> bool {
        self.after_publish == AfterPublish::Delete || self.retention.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterPublish {
    #[default]
    Mark,
    Delete,
    /// Write nothing per row: see `relay::replication::unmarked`.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoisonPolicy {
    #[default]
    DeadLetter,
    Halt,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, e.g. `postgres://outboxd@db:5432/orders?sslmode=verify-full&sslrootcert=/etc/ca.pem`.
    pub url: String,
    /// The outbox table, optionally schema-qualified.
    #[serde(default = "defaults::table")]
    pub table: String,
    /// Column names, Debezium's Outbox Event Router names by default.
    #[serde(default)]
    pub columns: ColumnNames,
    /// Channel the migration's insert trigger notifies, so claims wake at once.
    #[serde(default = "defaults::notify_channel")]
    pub notify_channel: String,
    /// Publication on the outbox table, for logical replication capture.
    /// `a-z 0-9 _` only: the replication protocol names it unquoted.
    #[serde(default = "defaults::publication")]
    pub publication: String,
    /// A partitioned outbox: one range partition of `created_at` per
    /// `interval`. `outboxd migrate` creates the table so; the relay creates
    /// partitions ahead of time and drops whole old ones instead of deleting
    /// rows one by one. Unset: a plain table.
    #[serde(default)]
    pub partitioning: Option<Partitioning>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partitioning {
    /// Width of one partition, aligned to UTC midnight: `1d` (the default),
    /// a whole number of days, or whole minutes that divide a day (`1h`, `15m`).
    #[serde(
        default = "defaults::partition_interval",
        deserialize_with = "duration::deserialize"
    )]
    pub interval: Duration,
    /// Partitions kept ready beyond the current one, so an insert never
    /// falls through to the default partition while the relay is down.
    #[serde(default = "defaults::partitions_ahead")]
    pub ahead: u32,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &secret::redact_url(&self.url))
            .field("table", &self.table)
            .field("columns", &self.columns)
            .field("notify_channel", &self.notify_channel)
            .field("publication", &self.publication)
            .field("partitioning", &self.partitioning)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnNames {
    pub seq: String,
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub payload: String,
    /// `null` when the table has no headers column.
    pub headers: Option<String>,
    /// `null` when the table has no trace context column.
    pub tracing_span_context: Option<String>,
    pub created_at: String,
    pub sent_at: String,
}

impl Default for ColumnNames {
    fn default() -> Self {
        Self {
            seq: "seq".into(),
            id: "id".into(),
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            payload: "payload".into(),
            headers: Some("headers".into()),
            tracing_span_context: Some("tracingspancontext".into()),
            created_at: "created_at".into(),
            sent_at: "sent_at".into(),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// A comma-separated list of Kafka bootstrap servers.
    pub bootstrap_servers: String,
    /// Compacted topic holding each relay's last committed checkpoint.
    #[serde(default = "defaults::checkpoint_topic")]
    pub checkpoint_topic: String,
    /// The checkpoint topic this table's relay used before
    /// `checkpoint_topic` was changed. A relay that finds no checkpoint of
    /// its table on `checkpoint_topic` but one on this topic adopts it, so
    /// the old topic's last window is marked, not published again.
    #[serde(default)]
    pub previous_checkpoint_topic: Option<String>,
    /// Kafka `transaction.timeout.ms`: how long the broker keeps a
    /// transaction of a crashed relay open before aborting it.
    #[serde(
        default = "defaults::transaction_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub transaction_timeout: Duration,
    /// Largest record (key + value + headers) the relay will produce; larger
    /// rows are poison. Keep it at or below the topics' `max.message.bytes`.
    #[serde(default = "defaults::max_message_bytes")]
    pub max_message_bytes: usize,
    /// Extra librdkafka properties, passed through as written: TLS and SASL
    /// (`security.protocol: SASL_SSL`, `sasl.mechanism: SCRAM-SHA-512`, …).
    /// From the environment, write dots as underscores:
    /// `OUTBOXD__KAFKA__PROPERTIES__SASL_PASSWORD`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, String> = self
            .properties
            .iter()
            .map(|(key, value)| (key.as_str(), secret::redact_property(key, value)))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("checkpoint_topic", &self.checkpoint_topic)
            .field("previous_checkpoint_topic", &self.previous_checkpoint_topic)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("properties", &properties)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// How rows are found: `replication` tails the table through logical
    /// replication (pgoutput); `polling` claims unsent rows with
    /// `FOR UPDATE SKIP LOCKED`, woken by `LISTEN/NOTIFY`; `auto` picks
    /// replication where the server and role allow it, else polling.
    pub mode: CaptureMode,
    /// Most rows in one Kafka transaction; also bounds the relay's memory.
    /// Large enough that a backlog drains in few transactions (each costs
    /// a few broker round trips); under light load batches stay small,
    /// since a batch is delivered as soon as no more rows are waiting.
    pub batch_size: usize,
    /// A batch also ends once its payloads reach this many bytes, so large
    /// payloads do not multiply memory by `batch_size`: replication delivers
    /// the batch, a claim sizes its rows first (`OutboxTable::claim_sql`).
    pub batch_bytes: usize,
    /// Longest wait between two claims when no notification arrives (polling).
    #[serde(deserialize_with = "duration::deserialize")]
    pub poll_interval: Duration,
    /// Replication slot name; `outboxd_<relay name>` when unset. Postgres
    /// allows lower-case letters, digits and `_`, at most 63 characters.
    pub slot: Option<String>,
    /// What to do when the slot was dropped or invalidated (`wal_status =
    /// lost`): `recover` publishes the rows still unsent from the table and
    /// streams from a new slot; `halt` stops the relay for an operator.
    pub on_slot_lost: SlotLostPolicy,
    /// Updates, deletes and truncates of outbox rows arriving through the
    /// publication (only if it publishes more than inserts): `warn` logs
    /// them, `ignore` drops them silently. They are never published.
    pub other_changes: OtherChangesPolicy,
    /// Replication: where the server has synchronous standbys
    /// (`synchronous_standby_names` is set), publish a transaction only once
    /// they have flushed its commit (`flush_lsn` in `pg_stat_replication`;
    /// `FIRST n` and `ANY n` as the server counts them). Logical decoding
    /// streams a commit as soon as the primary has it, while the writer's
    /// COMMIT still waits for the standbys; without this, a failover right
    /// then leaves an event in Kafka whose row the new primary never had.
    /// One query covers every transaction up to a WAL position, so this
    /// costs a round trip per batch, not per event; a held batch is logged
    /// after 10 s with the standby and its lag, and shown by
    /// `outboxd_sync_standby_holding`. The role needs `pg_read_all_stats`
    /// (or `pg_monitor`) to see the standbys' positions. Skipped where the
    /// server itself holds decoding back (PostgreSQL 17+: a failover slot
    /// and `synchronized_standby_slots`). `false` publishes on the primary's
    /// commit alone.
    pub wait_for_sync_standbys: bool,
    /// Where events come from: `table` (rows of the outbox table, the
    /// default) or `messages` (transactional logical decoding messages,
    /// `pg_logical_emit_message(true, message_prefix, …)`, no table at all;
    /// replication mode only, see docs/wal-messages.md).
    pub source: CaptureSource,
    /// `capture.source: messages`: the prefix the relay's messages carry.
    /// Messages with other prefixes are ignored.
    pub message_prefix: String,
    /// `capture.source: messages`: a stream gap the operator accepted. A
    /// slot lost or found past the last checkpoint means messages may be
    /// gone for good, so the relay refuses to start and names the slot's
    /// position; writing that position here lets it start from the slot,
    /// and stays harmless once the relay has published past it.
    pub accept_message_loss_through: Option<String>,
}

/// Where a relay's events come from (`capture.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CaptureSource {
    #[default]
    Table,
    Messages,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            mode: CaptureMode::Auto,
            batch_size: 2_000,
            batch_bytes: 4 * 1024 * 1024,
            poll_interval: Duration::from_secs(1),
            slot: None,
            on_slot_lost: SlotLostPolicy::Recover,
            other_changes: OtherChangesPolicy::Warn,
            wait_for_sync_standbys: true,
            source: CaptureSource::Table,
            message_prefix: "outboxd".into(),
            accept_message_loss_through: None,
        }
    }
}

impl Config {
    /// `capture.source: messages`: events are WAL messages, not rows.
    pub fn messages(&self) -> bool {
        self.capture.source == CaptureSource::Messages
    }

    /// `relay.after_publish: none` on a table: its rows are never marked.
    pub fn unmarked(&self) -> bool {
        !self.messages() && self.relay.after_publish == AfterPublish::None
    }

    /// Whether the table shows what is pending: not for messages (no
    /// table) nor unmarked rows (the slot shows it).
    pub fn rows_show_pending(&self) -> bool {
        !self.messages() && !self.unmarked()
    }

    /// What checkpoints, the leader lock and the Kafka identity name: the
    /// table's `schema.table`, or `messages:<prefix>` for a WAL-message
    /// outbox, which has no table and must never share a table's identity.
    pub fn source_name(&self, table_display_name: &str) -> String {
        if self.messages() {
            format!("messages:{}", self.capture.message_prefix)
        } else {
            table_display_name.to_string()
        }
    }

    /// The replication slot: `capture.slot`, or `outboxd_<relay name>` with
    /// `-` made `_` (slot names allow only `[a-z0-9_]`).
    pub fn slot_name(&self) -> String {
        self.capture
            .slot
            .clone()
            .unwrap_or_else(|| format!("outboxd_{}", self.relay.name.replace('-', "_")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureMode {
    Auto,
    Replication,
    Polling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotLostPolicy {
    Recover,
    Halt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtherChangesPolicy {
    Warn,
    Ignore,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Topic for events no rule matches; `${aggregatetype}` and `${type}`
    /// are replaced by the row's values.
    pub topic: String,
    /// Exceptions, first match wins.
    pub rules: Vec<RouteRule>,
    /// Which column becomes the Kafka key: `aggregate_id` keeps one
    /// aggregate's events on one partition, in order.
    pub key: KeyColumn,
    /// Where poison rows go, with the reason in a header.
    pub dead_letter_topic: String,
    /// How a key picks its partition. `murmur2_random`, the default, places
    /// every key where Java producers (and so Debezium) place it.
    pub partitioner: Partitioner,
    /// What happens to rows routed to a topic that does not exist on a
    /// broker that does not create topics on first use.
    pub missing_topics: MissingTopics,
    /// How `missing_topics: create` creates a topic.
    pub create_topics: CreateTopics,
    /// CloudEvents attributes as Kafka headers (binary content mode).
    pub cloudevents: CloudEventsConfig,
    /// How the payload becomes the record's value, for rows no rule (or a
    /// rule without its own `value_format`) matches: `raw` sends the stored
    /// bytes as they are; `avro` and `json_schema` encode the JSON payload
    /// against the subject's schema from `schema_registry` and frame it in
    /// the Confluent wire format (magic byte 0, 4-byte schema id, body).
    pub value_format: ValueFormat,
    /// The Confluent-compatible schema registry that `avro` and
    /// `json_schema` take schemas from. Required when either is used.
    pub schema_registry: Option<SchemaRegistryConfig>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            topic: "outbox.${aggregatetype}".into(),
            rules: Vec::new(),
            key: KeyColumn::AggregateId,
            dead_letter_topic: "outboxd.dead-letter".into(),
            partitioner: Partitioner::Murmur2Random,
            missing_topics: MissingTopics::Wait,
            create_topics: CreateTopics::default(),
            cloudevents: CloudEventsConfig::default(),
            value_format: ValueFormat::Raw,
            schema_registry: None,
        }
    }
}

impl RoutingConfig {
    /// Whether any rule or the default encodes against a registry schema.
    pub fn uses_schema_registry(&self) -> bool {
        self.value_format != ValueFormat::Raw
            || self
                .rules
                .iter()
                .any(|rule| rule.value_format.is_some_and(|f| f != ValueFormat::Raw))
    }
}

/// The record value's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// The payload's bytes as stored.
    #[default]
    Raw,
    /// Avro binary encoding of the JSON payload, Confluent-framed.
    Avro,
    /// The JSON payload, validated against a JSON Schema, Confluent-framed.
    JsonSchema,
}

impl ValueFormat {
    pub fn name(self) -> &'static str {
        match self {
            ValueFormat::Raw => "raw",
            ValueFormat::Avro => "avro",
            ValueFormat::JsonSchema => "json_schema",
        }
    }
}

/// A Confluent-compatible schema registry (Confluent Schema Registry,
/// Apicurio's ccompat API, Redpanda, Karapace).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// Base URL of the REST API, e.g. `https://registry:8081` (Apicurio:
    /// `http://apicurio:8080/apis/ccompat/v7`).
    pub url: String,
    /// HTTP basic auth user; needs `password`.
    #[serde(default)]
    pub username: Option<String>,
    /// HTTP basic auth password (a secret: set it from the environment with
    /// `OUTBOXD__ROUTING__SCHEMA_REGISTRY__PASSWORD`).
    #[serde(default)]
    pub password: Option<String>,
    /// A PEM file of CA certificates to trust besides the system's, for a
    /// registry behind a private CA (`https://` URLs).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How a record's subject is named: `topic_name` (`<topic>-value`, the
    /// default) or `record_name` (`record_name`, a template).
    #[serde(default)]
    pub subject_strategy: SubjectStrategy,
    /// With `subject_strategy: record_name`: the subject, a template with
    /// `${aggregatetype}` and `${type}` such as `com.acme.${type}`; a rule's
    /// own `record_name` wins.
    #[serde(default = "defaults::record_name")]
    pub record_name: String,
    /// Which version of the subject's schema: `latest` (looked up again
    /// every 5 minutes) or a version number, pinned. A rule's own
    /// `schema_version` wins.
    #[serde(default)]
    pub version: SchemaVersion,
    /// Per-request timeout.
    #[serde(
        default = "defaults::registry_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub timeout: Duration,
}

impl fmt::Debug for SchemaRegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaRegistryConfig")
            .field("url", &secret::redact_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .field("subject_strategy", &self.subject_strategy)
            .field("record_name", &self.record_name)
            .field("version", &self.version)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategy {
    /// Confluent's TopicNameStrategy: `<topic>-value`.
    #[default]
    TopicName,
    /// Confluent's RecordNameStrategy: the record's full name, from the
    /// `record_name` template.
    RecordName,
}

/// `latest`, or a pinned version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SchemaVersion {
    #[default]
    Latest,
    Pinned(u32),
}

impl fmt::Display for SchemaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchemaVersion::Latest => f.write_str("latest"),
            SchemaVersion::Pinned(version) => write!(f, "{version}"),
        }
    }
}

impl<'de> Deserialize<'de> for SchemaVersion {
    /// `latest`, or a positive integer (from YAML, or as text from an
    /// environment override).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let bad = || serde::de::Error::custom("must be `latest` or a version number (1 or more)");
        let number = match Raw::deserialize(deserializer)? {
            Raw::Text(text) if text == "latest" => return Ok(SchemaVersion::Latest),
            Raw::Text(text) => text.trim().parse::<u64>().map_err(|_| bad())?,
            Raw::Number(number) => number,
        };
        match u32::try_from(number) {
            Ok(version) if version >= 1 => Ok(SchemaVersion::Pinned(version)),
            _ => Err(bad()),
        }
    }
}

/// CloudEvents' Kafka protocol binding, binary content mode: the payload
/// stays the record's value, the attributes become `ce_` headers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudEventsConfig {
    pub enabled: bool,
    /// The `source` attribute, a template like `routing.topic`.
    pub source: String,
    /// The `content-type` header (CloudEvents' `datacontenttype`), unless the
    /// row's own headers set one.
    pub content_type: String,
}

impl Default for CloudEventsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            source: "/outboxd/${aggregatetype}".into(),
            content_type: "application/json".into(),
        }
    }
}

/// Rows routed to a topic that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingTopics {
    /// Hold the rows (and every row behind them) until someone creates the
    /// topic, saying so every minute in the log, in a metric and in `/readyz`.
    Wait,
    /// Create the topic with `routing.create_topics` before producing to it.
    Create,
    /// Treat the rows as poison: `relay.on_poison` decides.
    Poison,
}

/// Settings of topics the relay creates (`routing.missing_topics: create`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CreateTopics {
    /// Partitions; the broker's `num.partitions` when absent.
    pub partitions: Option<i32>,
    /// Replicas; the broker's `default.replication.factor` when absent.
    pub replication_factor: Option<i32>,
    /// Topic configs such as `min.insync.replicas: "2"`.
    pub configs: BTreeMap<String, String>,
}

/// librdkafka's partitioners. The `_random` ones spread records without a
/// key at random; the others send them all to one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// Java's default partitioner (murmur2 of the key): the partitions
    /// Debezium and every Java producer choose for the same key.
    Murmur2Random,
    Murmur2,
    /// librdkafka's own default (CRC32 of the key), which outboxd 0.1 used.
    ConsistentRandom,
    Consistent,
    Fnv1aRandom,
    Fnv1a,
    /// Every record to a random partition, keyed or not: no order per key.
    Random,
}

impl Partitioner {
    /// The value of librdkafka's `partitioner` property.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Partitioner::Murmur2Random => "murmur2_random",
            Partitioner::Murmur2 => "murmur2",
            Partitioner::ConsistentRandom => "consistent_random",
            Partitioner::Consistent => "consistent",
            Partitioner::Fnv1aRandom => "fnv1a_random",
            Partitioner::Fnv1a => "fnv1a",
            Partitioner::Random => "random",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// Matches rows with this `aggregatetype`; any when absent.
    pub aggregate_type: Option<String>,
    /// Matches rows with this `type`; any when absent.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// The topic, a template like `routing.topic`.
    pub topic: String,
    /// The value format of the rows this rule matches; `routing.value_format`
    /// when absent.
    #[serde(default)]
    pub value_format: Option<ValueFormat>,
    /// With `schema_registry.subject_strategy: record_name`: this rule's
    /// subject template.
    #[serde(default)]
    pub record_name: Option<String>,
    /// This rule's schema version, `latest` or a number pinned;
    /// `schema_registry.version` when absent.
    #[serde(default)]
    pub schema_version: Option<SchemaVersion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyColumn {
    AggregateId,
    AggregateType,
    Id,
    /// No key: events spread over partitions, with no order between them.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`. Loopback by default;
    /// in a container set `0.0.0.0:9464` so probes and Prometheus reach it.
    pub listen: std::net::SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` for a terminal, `json` for a log pipeline.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `outboxd=debug,rdkafka=warn`;
    /// `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Human,
    Json,
}

mod defaults {
    use std::time::Duration;

    pub fn table() -> String {
        "public.outbox".into()
    }
    pub fn notify_channel() -> String {
        "outbox_inserted".into()
    }
    pub fn publication() -> String {
        "outbox_publication".into()
    }
    pub fn checkpoint_topic() -> String {
        "outboxd.checkpoints".into()
    }
    pub fn transaction_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn shutdown_grace() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_message_bytes() -> usize {
        1_000_000
    }
    pub fn unacknowledged_batches() -> usize {
        3
    }
    pub fn partition_interval() -> Duration {
        Duration::from_secs(86_400)
    }
    pub fn partitions_ahead() -> u32 {
        3
    }
    pub fn record_name() -> String {
        "${type}".into()
    }
    pub fn registry_timeout() -> Duration {
        Duration::from_secs(10)
    }
}

/// A config that could not be loaded: which file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("invalid config {}: {message}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    pub message: String,
}

impl Config {
    /// Reads `file`, applies `OUTBOXD__…` overrides from the environment and
    /// validates: a file of one outbox. A file listing several `outboxes`
    /// is refused; [`Config::load_all`] reads those.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let mut configs = Config::load_all(file)?;
        if configs.len() != 1 {
            let names: Vec<&str> = configs.iter().map(|c| c.relay.name.as_str()).collect();
            return Err(ConfigError {
                file: file.to_path_buf(),
                message: format!(
                    "outboxes: lists {} outboxes ({}) where one is expected",
                    configs.len(),
                    names.join(", ")
                ),
            });
        }
        Ok(configs.remove(0))
    }

    /// Reads `file`, applies `OUTBOXD__…` overrides from the environment
    /// (to the top-level keys, which every outbox inherits) and validates
    /// each outbox: one config per entry of `outboxes`, or the whole file.
    pub fn load_all(file: &Path) -> Result<Vec<Config>, ConfigError> {
        let error = |message: String| ConfigError {
            file: file.to_path_buf(),
            message,
        };
        if !file.is_file() {
            return Err(error(
                "the file does not exist or is not a regular file".into(),
            ));
        }
        let environment = outboxes::Environment::from_process();
        let raw = config::Config::builder()
            .add_source(config::File::from(file).format(config::FileFormat::Yaml))
            .add_source(environment.top_level())
            .build()
            .map_err(|e| error(e.to_string()))?;
        let keys = raw.cache.into_table().map_err(|e| error(e.to_string()))?;
        outboxes::expand(keys, &environment).map_err(error)
    }

    /// Checks what serde cannot: names, ranges and combinations. The
    /// message starts with the offending key.
    pub fn validate(&self) -> Result<(), String> {
        validate_relay_name(&self.relay.name).map_err(|e| format!("relay.name: {e}"))?;
        if self.postgres.url.trim().is_empty() {
            return Err("postgres.url: must not be empty".into());
        }
        self.postgres
            .url
            .parse::<sqlx::postgres::PgConnectOptions>()
            .map_err(|e| format!("postgres.url: not a valid Postgres URL ({e})"))?;
        validate_identifier(&self.postgres.notify_channel)
            .map_err(|e| format!("postgres.notify_channel: {e}"))?;
        validate_publication_name(&self.postgres.publication)
            .map_err(|e| format!("postgres.publication: {e}"))?;
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return Err("kafka.bootstrap_servers: must not be empty".into());
        }
        if self.kafka.transaction_timeout < Duration::from_secs(1) {
            return Err("kafka.transaction_timeout: must be at least 1s".into());
        }
        if !(1024..=100 * 1024 * 1024).contains(&self.kafka.max_message_bytes) {
            return Err("kafka.max_message_bytes: must be between 1024 and 104857600".into());
        }
        for key in self.kafka.properties.keys() {
            if key == "partitioner" {
                return Err(format!(
                    "kafka.properties.{key}: set routing.partitioner instead (murmur2_random, \
                     the default, places keys as Java producers do)"
                ));
            }
        }
        if self.capture.batch_size == 0 || self.capture.batch_size > 50_000 {
            return Err("capture.batch_size: must be between 1 and 50000".into());
        }
        if !(1..=16).contains(&self.relay.unacknowledged_batches) {
            return Err("relay.unacknowledged_batches: must be between 1 and 16".into());
        }
        if self.capture.batch_bytes < 1024 {
            return Err("capture.batch_bytes: must be at least 1024".into());
        }
        if self.capture.poll_interval < Duration::from_millis(10) {
            return Err("capture.poll_interval: must be at least 10ms".into());
        }
        validate_slot_name(&self.slot_name()).map_err(|e| format!("capture.slot: {e}"))?;
        self.validate_message_source()?;
        self.validate_unmarked()?;
        if let Some(retention) = self.relay.retention {
            if self.relay.after_publish == AfterPublish::Delete {
                return Err(
                    "relay.retention: rows are deleted as soon as they are published \
                     (after_publish: delete); remove retention or use after_publish: mark"
                        .into(),
                );
            }
            if retention < Duration::from_secs(60) {
                return Err("relay.retention: must be at least 1m".into());
            }
        }
        if self.routing.create_topics.partitions.is_some_and(|n| n < 1) {
            return Err("routing.create_topics.partitions: must be at least 1".into());
        }
        if self
            .routing
            .create_topics
            .replication_factor
            .is_some_and(|n| n < 1)
        {
            return Err("routing.create_topics.replication_factor: must be at least 1".into());
        }
        self.validate_schema_registry()?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(format!(
                "log.level: `{}` is not a valid filter such as `info`",
                self.log.level
            ));
        }
        Ok(())
    }
}

impl Config {
    fn validate_accepted_loss(&self) -> Result<(), String> {
        if let Some(through) = &self.capture.accept_message_loss_through {
            through.parse::<crate::postgres::lsn::Lsn>().map_err(|_| {
                format!(
                    "capture.accept_message_loss_through: `{through}` is not a WAL position \
                     such as 0/16B3748"
                )
            })?;
        }
        Ok(())
    }

    /// `relay.after_publish: none` leaves no mark in the table, so only the
    /// stream can tell what is published (polling claims by marks), and only
    /// whole partitions can be removed (row-by-row retention reads marks).
    fn validate_unmarked(&self) -> Result<(), String> {
        if self.relay.after_publish != AfterPublish::None
            || self.capture.source == CaptureSource::Messages
        {
            return Ok(());
        }
        if self.capture.mode != CaptureMode::Replication {
            let mode = match self.capture.mode {
                CaptureMode::Polling => "polling",
                _ => "auto",
            };
            return Err(format!(
                "relay.after_publish: `none` needs capture.mode: replication (it is `{mode}`): \
                 without marks only the replication slot and the checkpoint tell what is \
                 published, and polling finds rows to publish by their marks"
            ));
        }
        self.validate_accepted_loss()?;
        if self.relay.retention.is_some() && self.postgres.partitioning.is_none() {
            return Err(
                "relay.retention: with after_publish: none no row is marked sent, so retention \
                 can only drop whole partitions: set postgres.partitioning (a partitioned \
                 outbox, see docs/adding-the-outbox.md) or remove relay.retention"
                    .into(),
            );
        }
        Ok(())
    }

    /// `routing.schema_registry` is there when a format needs it, and sane.
    /// `capture.source: messages` exists only in the WAL: no table to poll,
    /// so only replication can carry it.
    fn validate_message_source(&self) -> Result<(), String> {
        if self.capture.source != CaptureSource::Messages {
            return Ok(());
        }
        if self.capture.mode != CaptureMode::Replication {
            let mode = match self.capture.mode {
                CaptureMode::Polling => "polling",
                _ => "auto",
            };
            return Err(format!(
                "capture.mode: `{mode}` cannot carry capture.source: messages (the messages \
                 exist only in the WAL, there is no table to poll); set capture.mode: replication"
            ));
        }
        let prefix = &self.capture.message_prefix;
        // It names the relay's Kafka identity too (`messages:<prefix>`), so
        // no character that identity's readers could split on.
        if prefix.is_empty()
            || prefix.len() > 100
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(format!(
                "capture.message_prefix: `{prefix}` must be 1 to 100 characters of a-z, A-Z, \
                 0-9, `_`, `-` and `.`"
            ));
        }
        self.validate_accepted_loss()?;
        if self.relay.retention.is_some() || self.postgres.partitioning.is_some() {
            return Err(
                "capture.source: messages has no table to keep rows or partitions of; \
                        remove relay.retention and postgres.partitioning"
                    .into(),
            );
        }
        Ok(())
    }

    fn validate_schema_registry(&self) -> Result<(), String> {
        let Some(registry) = &self.routing.schema_registry else {
            if self.routing.uses_schema_registry() {
                return Err("routing.schema_registry: needed by value_format avro or \
                            json_schema; set its url"
                    .into());
            }
            return Ok(());
        };
        let url = url::Url::parse(&registry.url).map_err(|e| {
            format!(
                "routing.schema_registry.url: `{}` is not a URL ({e})",
                secret::redact_url(&registry.url)
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "routing.schema_registry.url: the scheme must be http or https, not `{}`",
                url.scheme()
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("routing.schema_registry.url: put credentials in \
                        routing.schema_registry.username and password, not the URL"
                .into());
        }
        match (&registry.username, &registry.password) {
            (Some(_), None) => {
                return Err("routing.schema_registry.password: needed with username".into())
            }
            (None, Some(_)) => {
                return Err("routing.schema_registry.username: needed with password".into())
            }
            _ => {}
        }
        if let Some(ca) = &registry.ca_file {
            if !ca.is_file() {
                return Err(format!(
                    "routing.schema_registry.ca_file: {} does not exist or is not a file",
                    ca.display()
                ));
            }
        }
        if registry.timeout < Duration::from_millis(100) {
            return Err("routing.schema_registry.timeout: must be at least 100ms".into());
        }
        Ok(())
    }
}

/// librdkafka names use dots; environment variables cannot, so `sasl_password`
/// from `OUTBOXD__KAFKA__PROPERTIES__SASL_PASSWORD` becomes `sasl.password`.
fn normalize_property_keys(properties: BTreeMap<String, String>) -> BTreeMap<String, String> {
    properties
        .into_iter()
        .map(|(key, value)| (key.replace('_', "."), value))
        .collect()
}

/// The name becomes a Kafka `transactional.id`, a lock key and a slot name
/// prefix, so keep it to characters all three accept.
fn validate_relay_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 48 {
        return Err("must be 1 to 48 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    {
        return Err(format!("`{name}` may only contain a-z, 0-9, `_` and `-`"));
    }
    Ok(())
}

/// Postgres' rule for replication slot names (`ReplicationSlotValidateName`).
pub fn validate_slot_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("`{name}` must be 1 to 63 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "`{name}` may only contain a-z, 0-9 and `_` (Postgres' rule for slot names)"
        ));
    }
    Ok(())
}

/// The publication is named to the server in pgoutput's `publication_names`
/// option, a list the server reads unquoted: it folds upper case to lower
/// case (`Outbox` streams `outbox`, another publication or none), splits at
/// commas and rejects spaces. So only lower-case identifier characters,
/// which read the same quoted or not.
fn validate_publication_name(name: &str) -> Result<(), String> {
    validate_identifier(name)?;
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "`{name}` may only contain a-z, 0-9 and `_`: the replication protocol's \
             publication_names option reads names unquoted (upper case folded to lower \
             case, split at commas, no spaces). Rename the publication \
             (ALTER PUBLICATION … RENAME TO) or set a new name, which the relay or \
             `outboxd migrate` creates"
        ));
    }
    Ok(())
}

/// A Postgres identifier we will quote; it only has to be non-empty and short.
pub(crate) fn validate_identifier(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 63 {
        return Err(format!(
            "`{name}` is longer than Postgres' 63-byte identifier limit"
        ));
    }
    if name.contains('\0') {
        return Err("must not contain NUL".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
