//! The schema registry: which schema (and id) a subject names, learnt over
//! Confluent's Schema Registry REST API and kept in a bounded cache.
//!
//! Invariant: nothing that goes wrong while learning a schema is a row's
//! fault. Every error here is a [`RegistryError`], which the relay retries
//! with backoff (the rows wait, none is dead-lettered); only
//! [`Resolved::encode`], with a schema in hand, judges a payload, and its
//! error makes that one row poison.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::{secret, SchemaRegistryConfig, SchemaVersion, ValueFormat};

mod avro;
mod encode;

/// Subjects whose schemas are kept at once; a relay routing to more evicts
/// the one fetched longest ago (and fetches it again when it needs it).
const CACHE_CAPACITY: usize = 1024;

/// How long `latest` stands for the version it resolved to, so a schema
/// registered later is used within this long without a lookup per batch.
const LATEST_TTL: Duration = Duration::from_secs(300);

/// The schema a record's value is encoded against: the registry subject,
/// the version asked for, and the format the rule wants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubjectRef {
    pub subject: String,
    pub version: SchemaVersion,
    pub format: ValueFormat,
}

impl fmt::Display for SubjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "subject `{}` version {} ({})",
            self.subject,
            self.version,
            self.format.name()
        )
    }
}

/// The schemas one batch is encoded with, resolved before it is routed so
/// routing itself stays a pure function of the rows and these.
pub type Schemas = HashMap<SubjectRef, Arc<Resolved>>;

/// A subject's schema as the registry has it, parsed and ready to encode.
pub struct Resolved {
    pub subject: String,
    /// The registry's global id of the schema: the wire format's bytes 1–4.
    pub id: u32,
    pub version: u32,
    schema: Compiled,
}

enum Compiled {
    Avro(apache_avro::Schema),
    Json(Box<jsonschema::Validator>),
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolved")
            .field("subject", &self.subject)
            .field("id", &self.id)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The registry could not say what a subject's schema is: unreachable,
/// refusing us, without the subject or version, or holding a schema the
/// rule's format cannot use. Retried; never the row's fault.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RegistryError(pub String);

pub struct Registry {
    http: reqwest::Client,
    base: url::Url,
    /// For messages: the URL without credentials.
    shown: String,
    auth: Option<(String, String)>,
    cache: Mutex<HashMap<SubjectRef, Cached>>,
}

struct Cached {
    fetched: Instant,
    resolved: Arc<Resolved>,
}

/// `GET /subjects/{subject}/versions/{version}`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VersionResponse {
    id: u32,
    version: u32,
    schema: String,
    /// Absent for Avro, as Confluent's own registry answers.
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<serde_json::Value>,
}

/// The body of an error response.
#[derive(Deserialize)]
struct ErrorResponse {
    error_code: Option<i64>,
    message: Option<String>,
}

impl Registry {
    /// A client for `config` (already validated); an error names the key.
    pub fn new(config: &SchemaRegistryConfig) -> Result<Registry, String> {
        let mut base = url::Url::parse(&config.url)
            .map_err(|e| format!("routing.schema_registry.url: not a URL ({e})"))?;
        // `…/ccompat/v7` and `…/ccompat/v7/` both mean the API's root.
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("outboxd/", env!("CARGO_PKG_VERSION")));
        if let Some(ca_file) = &config.ca_file {
            let pem = std::fs::read(ca_file).map_err(|e| {
                format!(
                    "routing.schema_registry.ca_file: cannot read {} ({e})",
                    ca_file.display()
                )
            })?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!(
                    "routing.schema_registry.ca_file: {} holds no PEM certificates ({e})",
                    ca_file.display()
                )
            })?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
            .build()
            .map_err(|e| format!("routing.schema_registry: cannot make an HTTP client ({e})"))?;
        Ok(Registry {
            http,
            shown: secret::redact_url(&config.url),
            base,
            auth: config.username.clone().zip(config.password.clone()),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The registry's URL, fit to print.
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// The schema `subject` names, from the cache while it is fresh (a
    /// pinned version always is; `latest` for [`LATEST_TTL`]).
    pub async fn resolve(&self, subject: &SubjectRef) -> Result<Arc<Resolved>, RegistryError> {
        if let Some(cached) = self.cached(subject) {
            return Ok(cached);
        }
        let resolved = Arc::new(self.fetch(subject).await?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAPACITY && !cache.contains_key(subject) {
            if let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, cached)| cached.fetched)
                .map(|(key, _)| key.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(
            subject.clone(),
            Cached {
                fetched: Instant::now(),
                resolved: resolved.clone(),
            },
        );
        Ok(resolved)
    }

    fn cached(&self, subject: &SubjectRef) -> Option<Arc<Resolved>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let cached = cache.get(subject)?;
        let fresh =
            subject.version != SchemaVersion::Latest || cached.fetched.elapsed() < LATEST_TTL;
        fresh.then(|| cached.resolved.clone())
    }

    /// Asks the registry, whatever the cache holds.
    pub async fn fetch(&self, subject: &SubjectRef) -> Result<Resolved, RegistryError> {
        let version = subject.version.to_string();
        let body = self
            .get(
                &["subjects", &subject.subject, "versions", &version],
                Some(subject),
            )
            .await?;
        let answer: VersionResponse = serde_json::from_slice(&body).map_err(|e| {
            RegistryError(format!(
                "the schema registry at {} answered for {subject} with something that is not \
                 a schema version ({e})",
                self.shown
            ))
        })?;
        compile(subject, answer)
    }

    /// The subjects the registry holds (`GET /subjects`): whether it
    /// answers us at all, for `check`.
    pub async fn subjects(&self) -> Result<Vec<String>, RegistryError> {
        let body = self.get(&["subjects"], None).await?;
        serde_json::from_slice(&body).map_err(|e| {
            RegistryError(format!(
                "the schema registry at {} answered GET /subjects with something that is not \
                 a list of subjects ({e}); is the URL the API's root?",
                self.shown
            ))
        })
    }

    /// The body of a successful `GET` of `segments` under the base URL.
    async fn get(
        &self,
        segments: &[&str],
        subject: Option<&SubjectRef>,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| RegistryError(format!("{} cannot be a base URL", self.shown)))?
            .pop_if_empty()
            .extend(segments);
        let mut request = self.http.get(url);
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password));
        }
        let response = request
            .header(
                "Accept",
                "application/vnd.schemaregistry.v1+json, application/json",
            )
            .send()
            .await
            .map_err(|e| {
                RegistryError(format!(
                    "cannot reach the schema registry at {}: {}",
                    self.shown,
                    error_chain(&e)
                ))
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| {
            RegistryError(format!(
                "the schema registry at {} broke off its answer: {}",
                self.shown,
                error_chain(&e)
            ))
        })?;
        if !status.is_success() {
            return Err(self.refusal(subject, segments, status, &body));
        }
        Ok(body.to_vec())
    }

    fn refusal(
        &self,
        subject: Option<&SubjectRef>,
        segments: &[&str],
        status: reqwest::StatusCode,
        body: &[u8],
    ) -> RegistryError {
        let error: Option<ErrorResponse> = serde_json::from_slice(body).ok();
        let code = error.as_ref().and_then(|e| e.error_code);
        let message = error
            .and_then(|e| e.message)
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into());
        let what = match (status.as_u16(), code, subject) {
            (404, Some(40401), Some(subject)) => format!(
                "has no subject `{}`; register its schema, or fix the topic or \
                 routing.schema_registry.subject_strategy",
                subject.subject
            ),
            (404, Some(40402), Some(subject)) => format!(
                "has no version {} of subject `{}`",
                subject.version, subject.subject
            ),
            (401 | 403, _, _) => format!(
                "refused the request ({status}): check routing.schema_registry.username and password"
            ),
            (_, _, Some(subject)) => format!("answered {status} for {subject}"),
            (_, _, None) => format!("answered {status} for /{}", segments.join("/")),
        };
        RegistryError(format!(
            "the schema registry at {} {what} ({message})",
            self.shown
        ))
    }
}

/// The schema in `answer`, parsed for `subject`'s format.
fn compile(subject: &SubjectRef, answer: VersionResponse) -> Result<Resolved, RegistryError> {
    let schema_type = answer.schema_type.as_deref().unwrap_or("AVRO");
    let unusable =
        |why: String| RegistryError(format!("{subject} (schema id {}): {why}", answer.id));
    if !answer.references.is_empty() {
        return Err(unusable(
            "the schema has references to other subjects, which outboxd does not resolve yet"
                .into(),
        ));
    }
    let schema = match (subject.format, schema_type) {
        (ValueFormat::Avro, "AVRO") => Compiled::Avro(
            apache_avro::Schema::parse_str(&answer.schema)
                .map_err(|e| unusable(format!("not a valid Avro schema ({e})")))?,
        ),
        (ValueFormat::JsonSchema, "JSON") => {
            let schema: serde_json::Value = serde_json::from_str(&answer.schema)
                .map_err(|e| unusable(format!("not JSON ({e})")))?;
            Compiled::Json(Box::new(
                jsonschema::validator_for(&schema)
                    .map_err(|e| unusable(format!("not a valid JSON Schema ({e})")))?,
            ))
        }
        (format, other) => {
            return Err(unusable(format!(
                "the schema is of type {other}, which value_format {} cannot use",
                format.name()
            )))
        }
    };
    Ok(Resolved {
        subject: subject.subject.clone(),
        id: answer.id,
        version: answer.version,
        schema,
    })
}

/// An error and its sources, one line: reqwest's own message is only the
/// outermost ("error sending request").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests;
