//! Routing: which topic, key and headers an event gets, or why it cannot be
//! published (a poison row).
//!
//! Invariant: routing is a pure function of the row, the config and the
//! schemas resolved for the batch beforehand. The same row always yields
//! the same record, so a batch that is aborted and re-sent is byte-for-byte
//! the batch it replaces.

use std::borrow::Cow;
use std::collections::HashSet;

use crate::config::{KeyColumn, RoutingConfig, SchemaVersion, SubjectStrategy, ValueFormat};
use crate::event::OutboxEvent;
use crate::registry::{Registry, RegistryError, Schemas, SubjectRef};

/// Kafka's own limit on topic name length.
const MAX_TOPIC_NAME_LEN: usize = 249;

/// Header names the relay adds to every record.
pub mod header {
    pub const ID: &str = "id";
    pub const TYPE: &str = "type";
    pub const AGGREGATE_TYPE: &str = "aggregatetype";
    pub const TRACEPARENT: &str = "traceparent";
    /// On dead-lettered records: why the row could not be published.
    pub const DEAD_LETTER_REASON: &str = "outboxd.dead_letter.reason";
    /// On dead-lettered records: the row's seq, to find it in the table.
    pub const SOURCE_SEQ: &str = "outboxd.source.seq";
    /// On dead-lettered records: present when the payload was too large to carry.
    pub const PAYLOAD_OMITTED: &str = "outboxd.payload_omitted";
    /// CloudEvents attributes, Kafka protocol binding, binary content mode.
    pub const CE_SPECVERSION: &str = "ce_specversion";
    pub const CE_ID: &str = "ce_id";
    pub const CE_SOURCE: &str = "ce_source";
    pub const CE_TYPE: &str = "ce_type";
    pub const CE_TIME: &str = "ce_time";
    pub const CE_SUBJECT: &str = "ce_subject";
    pub const CONTENT_TYPE: &str = "content-type";
}

/// A record ready for Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedRecord<'a> {
    pub topic: Cow<'a, str>,
    pub key: Option<Cow<'a, [u8]>>,
    pub headers: Vec<RecordHeader<'a>>,
    pub payload: Option<Cow<'a, [u8]>>,
}

/// A Kafka header: name and value, borrowed from the row where they can be.
pub type RecordHeader<'a> = (Cow<'a, str>, Cow<'a, [u8]>);

impl RoutedRecord<'_> {
    /// Bytes this record occupies on the wire, near enough to compare with
    /// the broker's `max.message.bytes`.
    pub fn approximate_size(&self) -> usize {
        // Kafka's per-record and per-header framing is a few varints; 64 bytes
        // covers it with room to spare.
        const FRAMING: usize = 64;
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len() + 8)
            .sum();
        FRAMING
            + self.key.as_ref().map_or(0, |key| key.len())
            + self.payload.as_ref().map_or(0, |payload| payload.len())
            + headers
    }
}

/// A template: literal text with `${aggregatetype}` and `${type}`, for
/// topics and for the CloudEvents `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    AggregateType,
    EventType,
}

impl Template {
    /// A topic template; a literal one must be a legal topic name.
    pub fn topic(template: &str) -> Result<Template, String> {
        let template = Template::text(template)?;
        if template.is_literal() {
            validate_topic_name(&template.render("", ""))?;
        }
        Ok(template)
    }

    /// A template of any text.
    pub fn text(template: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(TemplatePart::Literal(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("`{template}` has an unclosed `${{`"))?;
            parts.push(match &after[..end] {
                "aggregatetype" => TemplatePart::AggregateType,
                "type" => TemplatePart::EventType,
                other => {
                    return Err(format!(
                        "`{template}` uses unknown placeholder `${{{other}}}`; use `${{aggregatetype}}` or `${{type}}`"
                    ))
                }
            });
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_string()));
        }
        Ok(Template { parts })
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The template as written.
    pub fn as_written(&self) -> String {
        self.render("${aggregatetype}", "${type}").into_owned()
    }

    fn is_literal(&self) -> bool {
        self.parts
            .iter()
            .all(|part| matches!(part, TemplatePart::Literal(_)))
    }

    fn render<'a>(&'a self, aggregate_type: &'a str, event_type: &'a str) -> Cow<'a, str> {
        let text = |part: &'a TemplatePart| match part {
            TemplatePart::Literal(text) => text.as_str(),
            TemplatePart::AggregateType => aggregate_type,
            TemplatePart::EventType => event_type,
        };
        match self.parts.as_slice() {
            // One part (a literal topic, or `${aggregatetype}` alone): no copy.
            [only] => Cow::Borrowed(text(only)),
            parts => Cow::Owned(parts.iter().map(text).collect()),
        }
    }
}

/// Kafka's topic name rules: 1–249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_NAME_LEN {
        return Err(format!(
            "topic name `{topic}` must be 1 to {MAX_TOPIC_NAME_LEN} characters"
        ));
    }
    if topic == "." || topic == ".." {
        return Err(format!("`{topic}` is not a legal topic name"));
    }
    if let Some(bad) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name `{topic}` contains `{bad}`; Kafka allows only a-z, A-Z, 0-9, `.`, `_`, `-`"
        ));
    }
    Ok(())
}

struct Rule {
    aggregate_type: Option<String>,
    event_type: Option<String>,
    topic: Template,
    value: ValueSpec,
}

/// How a rule's (or the default's) rows become record values.
struct ValueSpec {
    format: ValueFormat,
    /// The subject under `subject_strategy: record_name`.
    record_name: Option<Template>,
    version: SchemaVersion,
}

impl Rule {
    fn matches(&self, event: &OutboxEvent) -> bool {
        self.aggregate_type
            .as_ref()
            .is_none_or(|wanted| *wanted == event.aggregate_type)
            && self
                .event_type
                .as_ref()
                .is_none_or(|wanted| *wanted == event.event_type)
    }
}

/// Turns events into records. Built once from validated config.
pub struct Router {
    default_topic: Template,
    default_value: ValueSpec,
    rules: Vec<Rule>,
    key: KeyColumn,
    dead_letter_topic: String,
    max_message_bytes: usize,
    cloudevents: Option<CloudEvents>,
    /// Present when some rows are encoded against registry schemas.
    registry: Option<Registry>,
}

/// What the CloudEvents headers need beyond the row.
struct CloudEvents {
    source: Template,
    content_type: String,
}

impl Router {
    /// The router for `config`; an error starts with the offending key
    /// under `routing.`.
    pub fn new(config: &RoutingConfig, max_message_bytes: usize) -> Result<Router, String> {
        let default_topic =
            Template::topic(&config.topic).map_err(|e| format!("routing.topic: {e}"))?;
        let registry_config = config.schema_registry.as_ref();
        let strategy = registry_config
            .map(|r| r.subject_strategy)
            .unwrap_or_default();
        let default_version = registry_config.map(|r| r.version).unwrap_or_default();
        let value_spec = |key: &str,
                          format: ValueFormat,
                          record_name: Option<&str>,
                          version: SchemaVersion|
         -> Result<ValueSpec, String> {
            let record_name = match (format, strategy) {
                (ValueFormat::Raw, _) | (_, SubjectStrategy::TopicName) => None,
                (_, SubjectStrategy::RecordName) => {
                    let (template_key, template) = match record_name {
                        Some(name) => (format!("{key}.record_name"), name),
                        None => (
                            "routing.schema_registry.record_name".to_string(),
                            registry_config.map_or("${type}", |r| r.record_name.as_str()),
                        ),
                    };
                    let template =
                        Template::text(template).map_err(|e| format!("{template_key}: {e}"))?;
                    if template.is_empty() {
                        return Err(format!("{template_key}: must not be empty"));
                    }
                    Some(template)
                }
            };
            Ok(ValueSpec {
                format,
                record_name,
                version,
            })
        };
        let default_value = value_spec("routing", config.value_format, None, default_version)?;
        let rules = config
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                if rule.aggregate_type.is_none() && rule.event_type.is_none() {
                    return Err(format!(
                        "routing.rules[{index}]: needs `aggregate_type` or `type` to match on; \
                         to route everything, set routing.topic"
                    ));
                }
                Ok(Rule {
                    aggregate_type: rule.aggregate_type.clone(),
                    event_type: rule.event_type.clone(),
                    topic: Template::topic(&rule.topic)
                        .map_err(|e| format!("routing.rules[{index}].topic: {e}"))?,
                    value: value_spec(
                        &format!("routing.rules[{index}]"),
                        rule.value_format.unwrap_or(config.value_format),
                        rule.record_name.as_deref(),
                        rule.schema_version.unwrap_or(default_version),
                    )?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        validate_topic_name(&config.dead_letter_topic)
            .map_err(|e| format!("routing.dead_letter_topic: {e}"))?;
        // Checked even while disabled, so turning CloudEvents on later
        // cannot meet a config error at start-up.
        let source = Template::text(&config.cloudevents.source)
            .map_err(|e| format!("routing.cloudevents.source: {e}"))?;
        if source.is_empty() {
            return Err(
                "routing.cloudevents.source: must not be empty (CloudEvents requires a source)"
                    .into(),
            );
        }
        if config.cloudevents.content_type.trim().is_empty() {
            return Err("routing.cloudevents.content_type: must not be empty".into());
        }
        let registry = match registry_config {
            Some(registry) if config.uses_schema_registry() => Some(Registry::new(registry)?),
            _ => None,
        };
        Ok(Router {
            default_topic,
            default_value,
            rules,
            key: config.key,
            dead_letter_topic: config.dead_letter_topic.clone(),
            max_message_bytes,
            cloudevents: config.cloudevents.enabled.then(|| CloudEvents {
                source,
                content_type: config.cloudevents.content_type.clone(),
            }),
            registry,
        })
    }

    /// The schema registry client, when some rows need schemas.
    pub fn registry(&self) -> Option<&Registry> {
        self.registry.as_ref()
    }

    /// The topic template and value spec of `event`'s rule (or the default).
    fn rule_for(&self, event: &OutboxEvent) -> (&Template, &ValueSpec) {
        self.rules
            .iter()
            .find(|rule| rule.matches(event))
            .map_or((&self.default_topic, &self.default_value), |rule| {
                (&rule.topic, &rule.value)
            })
    }

    /// The subject whose schema encodes `event`'s value on `topic`; `None`
    /// for a raw value.
    fn subject_of(&self, event: &OutboxEvent, spec: &ValueSpec, topic: &str) -> Option<SubjectRef> {
        if spec.format == ValueFormat::Raw {
            return None;
        }
        let subject = match &spec.record_name {
            Some(template) => template
                .render(&event.aggregate_type, &event.event_type)
                .into_owned(),
            None => format!("{topic}-value"),
        };
        Some(SubjectRef {
            subject,
            version: spec.version,
            format: spec.format,
        })
    }

    /// Each rule's subject (and the default's), for `check`: by the config
    /// key it comes from, the subject when it is the same for every row,
    /// else the template it follows. Raw values have none.
    pub fn configured_subjects(&self) -> Vec<(String, Result<SubjectRef, String>)> {
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| (format!("routing.rules[{index}]"), &rule.topic, &rule.value));
        std::iter::once((
            "routing".to_string(),
            &self.default_topic,
            &self.default_value,
        ))
        .chain(rules)
        .filter(|(_, _, spec)| spec.format != ValueFormat::Raw)
        .map(|(key, topic, spec)| {
            let subject = match &spec.record_name {
                Some(name) if name.is_literal() => Ok(name.as_written()),
                Some(name) => Err(name.as_written()),
                None if topic.is_literal() => Ok(format!("{}-value", topic.as_written())),
                None => Err(format!("{}-value", topic.as_written())),
            };
            let subject = subject.map(|subject| SubjectRef {
                subject,
                version: spec.version,
                format: spec.format,
            });
            (key, subject)
        })
        .collect()
    }

    /// The subjects the values of `events` are encoded with, each once.
    /// Rows that cannot be routed anyway (a bad topic, no payload) need none.
    pub fn subjects(&self, events: &[OutboxEvent]) -> Vec<SubjectRef> {
        let mut seen = HashSet::new();
        let mut subjects = Vec::new();
        for event in events {
            let (template, spec) = self.rule_for(event);
            if spec.format == ValueFormat::Raw || event.payload.is_none() || event.poison.is_some()
            {
                continue;
            }
            let topic = template.render(&event.aggregate_type, &event.event_type);
            if validate_topic_name(&topic).is_err() {
                continue;
            }
            if let Some(subject) = self.subject_of(event, spec, &topic) {
                if seen.insert(subject.clone()) {
                    subjects.push(subject);
                }
            }
        }
        subjects
    }

    /// The schemas every row of `events` is encoded with, from the
    /// registry (or its cache). An error is the registry's, never a row's.
    pub async fn resolve_schemas(&self, events: &[OutboxEvent]) -> Result<Schemas, RegistryError> {
        let mut schemas = Schemas::new();
        let Some(registry) = &self.registry else {
            return Ok(schemas);
        };
        for subject in self.subjects(events) {
            let resolved = registry.resolve(&subject).await?;
            schemas.insert(subject, resolved);
        }
        Ok(schemas)
    }

    /// The record for `event` when no row needs a schema (raw values).
    pub fn route<'a>(&'a self, event: &'a OutboxEvent) -> Result<RoutedRecord<'a>, String> {
        self.route_with(event, &Schemas::new())
    }

    /// The record for `event`, its value encoded with `schemas` (from
    /// [`Router::resolve_schemas`] for its batch), or the reason it is poison.
    pub fn route_with<'a>(
        &'a self,
        event: &'a OutboxEvent,
        schemas: &Schemas,
    ) -> Result<RoutedRecord<'a>, String> {
        // Capture found it poison (a WAL message that does not decode).
        if let Some(reason) = &event.poison {
            return Err(reason.clone());
        }
        let (template, spec) = self.rule_for(event);
        let topic = template.render(&event.aggregate_type, &event.event_type);
        validate_topic_name(&topic).map_err(|e| format!("unroutable: {e}"))?;
        let mut headers = headers_of(event)?;
        if let Some(cloudevents) = &self.cloudevents {
            cloudevents.add_headers(event, &mut headers);
        }
        let payload = match (&event.payload, self.subject_of(event, spec, &topic)) {
            (None, _) => None,
            (Some(payload), None) => Some(Cow::Borrowed(payload.as_slice())),
            (Some(payload), Some(subject)) => {
                // resolve_schemas asked for every subject this function
                // computes for the batch, so a miss is a caller's bug;
                // it is still the row's reason, never a silent raw value.
                let schema = schemas
                    .get(&subject)
                    .ok_or_else(|| format!("schema: {subject} was not resolved for this batch"))?;
                Some(Cow::Owned(
                    schema.encode(payload).map_err(|e| format!("schema: {e}"))?,
                ))
            }
        };
        let record = RoutedRecord {
            topic,
            key: self.key_of(event),
            headers,
            payload,
        };
        let size = record.approximate_size();
        if size > self.max_message_bytes {
            return Err(format!(
                "too large: the record is about {size} bytes, over kafka.max_message_bytes ({})",
                self.max_message_bytes
            ));
        }
        Ok(record)
    }

    /// The dead-letter record for a poison `event`: its payload when that
    /// fits, the reason and the row's seq as headers, so nothing vanishes.
    pub fn dead_letter<'a>(&'a self, event: &'a OutboxEvent, reason: &str) -> RoutedRecord<'a> {
        let mut headers = vec![
            (
                Cow::Borrowed(header::DEAD_LETTER_REASON),
                Cow::Owned(reason.as_bytes().to_vec()),
            ),
            (
                Cow::Borrowed(header::SOURCE_SEQ),
                Cow::Owned(event.seq.to_string().into_bytes()),
            ),
        ];
        headers.extend(base_headers(event));
        let mut record = RoutedRecord {
            topic: Cow::Borrowed(&self.dead_letter_topic),
            key: self.key_of(event),
            headers,
            payload: event.payload.as_deref().map(Cow::Borrowed),
        };
        if record.approximate_size() > self.max_message_bytes {
            record.payload = None;
            record.headers.push((
                Cow::Borrowed(header::PAYLOAD_OMITTED),
                Cow::Borrowed(b"true"),
            ));
        }
        record
    }

    fn key_of<'a>(&self, event: &'a OutboxEvent) -> Option<Cow<'a, [u8]>> {
        let key = match self.key {
            KeyColumn::AggregateId => &event.aggregate_id,
            KeyColumn::AggregateType => &event.aggregate_type,
            KeyColumn::Id => &event.id,
            KeyColumn::None => return None,
        };
        Some(Cow::Borrowed(key.as_bytes()))
    }
}

impl CloudEvents {
    /// The required attributes, `time` and `subject` where the row has
    /// them, and `content-type` unless the row's own headers set it.
    fn add_headers<'a>(&'a self, event: &'a OutboxEvent, headers: &mut Vec<RecordHeader<'a>>) {
        let has_content_type = headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case(header::CONTENT_TYPE));
        headers.push((Cow::Borrowed(header::CE_SPECVERSION), Cow::Borrowed(b"1.0")));
        headers.push(borrowed_header(header::CE_ID, &event.id));
        let source = self.source.render(&event.aggregate_type, &event.event_type);
        headers.push((
            Cow::Borrowed(header::CE_SOURCE),
            match source {
                Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
                Cow::Owned(text) => Cow::Owned(text.into_bytes()),
            },
        ));
        headers.push(borrowed_header(header::CE_TYPE, &event.event_type));
        if let Some(time) = &event.created_at {
            headers.push(borrowed_header(header::CE_TIME, time));
        }
        headers.push(borrowed_header(header::CE_SUBJECT, &event.aggregate_id));
        if !has_content_type {
            headers.push(borrowed_header(header::CONTENT_TYPE, &self.content_type));
        }
    }
}

fn base_headers(event: &OutboxEvent) -> Vec<RecordHeader<'_>> {
    let mut headers = Vec::with_capacity(4);
    headers.push(borrowed_header(header::ID, &event.id));
    headers.push(borrowed_header(header::TYPE, &event.event_type));
    headers.push(borrowed_header(
        header::AGGREGATE_TYPE,
        &event.aggregate_type,
    ));
    if let Some(trace_parent) = &event.trace_parent {
        headers.push(borrowed_header(header::TRACEPARENT, trace_parent));
    }
    headers
}

/// A header whose name and value are borrowed, not copied.
fn borrowed_header<'a>(name: &'static str, value: &'a str) -> RecordHeader<'a> {
    (Cow::Borrowed(name), Cow::Borrowed(value.as_bytes()))
}

/// The relay's headers, then the row's `headers` JSON object: strings as
/// they are, other JSON values as their JSON text.
fn headers_of(event: &OutboxEvent) -> Result<Vec<RecordHeader<'_>>, String> {
    let mut headers = base_headers(event);
    let Some(json) = &event.headers_json else {
        return Ok(headers);
    };
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| format!("unroutable: the headers column is not valid JSON ({e})"))?;
    match value {
        serde_json::Value::Null => {}
        serde_json::Value::Object(map) => {
            for (name, value) in map {
                let bytes = match value {
                    serde_json::Value::String(text) => text.into_bytes(),
                    serde_json::Value::Null => Vec::new(),
                    other => other.to_string().into_bytes(),
                };
                headers.push((Cow::Owned(name), Cow::Owned(bytes)));
            }
        }
        _ => return Err("unroutable: the headers column must hold a JSON object".into()),
    }
    Ok(headers)
}

#[cfg(test)]
mod tests;
