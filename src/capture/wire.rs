//! The replication wire client, behind a small trait of ours.
//!
//! ```text
//!  Postgres walsender ──CopyData──▶ WireClient ──▶ StreamItem::{Message, KeepAlive}
//!                      ◀─standby status (flush LSN)── acknowledge(lsn)
//! ```
//!
//! Invariant: the flush position reported to the server only ever comes from
//! [`ReplicationStream::acknowledge`]; the client never advances it by itself,
//! so the slot's `confirmed_flush_lsn` never passes what is safe in Kafka.
//! Items arrive in WAL order, and a keepalive arrives only after every
//! change the server sent before it.
//!
//! `pgwire-replication` does TLS (client certificates too), SCRAM-SHA-256,
//! keepalive replies and backpressure; the pgoutput bodies it hands over are
//! decoded by our own [`pgoutput`](super::pgoutput) module. It connects with
//! `postgres.url` read as the SQL connection (sqlx) reads it, so both reach
//! the same server as the same role, and the replication connection never
//! has less TLS than the SQL one; what it cannot honour is refused by name.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use pgwire_replication::{
    Lsn as WireLsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode,
    TlsConfig,
};

use super::pgoutput::{self, Message};
use crate::error::{Error, Result};
use crate::postgres::lsn::Lsn;

/// How often an advanced flush position is reported to the server.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// Messages the client's own worker buffers before it stops reading the
/// socket (TCP backpressure; it still answers keepalives). Few, because a
/// message can be as large as a row (16 rows of 900 KB took the relay to
/// 75 MB): the real buffer is the one below.
const WORKER_MESSAGES: usize = 4;
/// Bytes of row data buffered between the socket and the relay. Bounded in
/// bytes, not messages, so memory stays flat whether rows are 100 bytes or
/// a megabyte; thousands of small rows fit, which keeps the stream flowing
/// while the relay publishes.
const BUFFERED_BYTES: usize = 4 * 1024 * 1024;

/// What the stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamItem {
    /// A decoded pgoutput message.
    Message(Message),
    /// The server has sent everything up to `wal_end`.
    KeepAlive { wal_end: Lsn },
}

/// A logical replication stream on one slot and publication.
pub trait ReplicationStream: Send {
    /// The next item; `Ok(None)` when the server ended the stream.
    fn next(&mut self) -> impl Future<Output = Result<Option<StreamItem>>> + Send;
    /// Everything up to `lsn` is safe: the server may release WAL before it
    /// and restart the slot there. Monotonic: a lower value is ignored.
    fn acknowledge(&mut self, lsn: Lsn);
}

/// Where and how to open the stream.
#[derive(Debug, Clone)]
pub struct StreamTarget {
    pub slot: String,
    pub publication: String,
    /// The slot's `confirmed_flush_lsn`: what is reported as flushed until
    /// the relay acknowledges more.
    pub confirmed_flush: Lsn,
    /// Where streaming starts when that is past `confirmed_flush`: the
    /// server sends no transaction whose commit record lies before it (it
    /// still reads that WAL, from the slot's `restart_lsn`). `None`: at
    /// `confirmed_flush`.
    pub start_at: Option<StartAt>,
    pub application_name: String,
}

/// A WAL position to start streaming at, and the timeline it was read on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartAt {
    pub lsn: Lsn,
    pub timeline: u32,
}

/// The `pgwire-replication` client, read by a task of its own into a
/// buffer bounded in bytes.
pub struct WireClient {
    events: mpsc::UnboundedReceiver<Buffered>,
    /// Positions to report as flushed; the reader task passes them on.
    /// Dropping it ends the task, which ends the session with the server.
    acknowledgements: Option<mpsc::UnboundedSender<WireLsn>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

/// One event from the server, holding its share of `BUFFERED_BYTES` until
/// the relay has taken it.
struct Buffered {
    event: std::result::Result<Option<ReplicationEvent>, PgWireError>,
    _bytes: OwnedSemaphorePermit,
}

impl WireClient {
    /// Connects with the credentials and TLS settings of `postgres_url` and
    /// sends `START_REPLICATION` (pgoutput protocol version 1) from the slot's
    /// confirmed position, or from `target.start_at` where that server is
    /// still the one it was read on; returns once the server accepted it.
    pub async fn start(postgres_url: &str, target: &StreamTarget) -> Result<WireClient> {
        let client = match target.start_at {
            Some(start_at) => match started_at(postgres_url, target, start_at).await? {
                Some(client) => client,
                None => {
                    let at_slot = StreamTarget {
                        start_at: None,
                        ..target.clone()
                    };
                    started(postgres_url, &at_slot).await?
                }
            },
            None => started(postgres_url, target).await?,
        };
        let (events_sender, events) = mpsc::unbounded_channel();
        let (acknowledgements, acknowledged) = mpsc::unbounded_channel();
        let reader = tokio::spawn(tracing::Instrument::in_current_span(read_into_buffer(
            client,
            events_sender,
            acknowledged,
        )));
        Ok(WireClient {
            events,
            acknowledgements: Some(acknowledgements),
            reader: Some(reader),
        })
    }

    /// Ends the replication session and waits (a few seconds at most) until
    /// the server has released the slot, so whoever takes over next, or an
    /// operator dropping the slot, finds it inactive. Dropping the client
    /// ends the session too, without waiting.
    pub async fn close(mut self) {
        self.acknowledgements = None;
        if let Some(reader) = self.reader.take() {
            if tokio::time::timeout(CLOSE_LIMIT, reader).await.is_err() {
                tracing::debug!("the replication session did not end within {CLOSE_LIMIT:?}; leaving it to the server");
            }
        }
    }
}

/// A replication session that the server has started streaming.
async fn started(postgres_url: &str, target: &StreamTarget) -> Result<ReplicationClient> {
    let config = replication_config(postgres_url, target)?;
    let mut client = ReplicationClient::connect(config)
        .await
        .map_err(|e| wire_error("opening the replication connection", e))?;
    client
        .wait_started()
        .await
        .map_err(|e| wire_error("starting replication", e))?;
    Ok(client)
}

/// A session streaming from `start_at`, if the server it opens on is still
/// the one the position was read on: IDENTIFY_SYSTEM, on the session that
/// then streams, shows the same timeline at or past the position. After a
/// failover the position may lie past where the promoted standby's WAL
/// ended, and the new primary's first transactions would be skipped; then
/// `None`, and the caller starts at the slot's position.
async fn started_at(
    postgres_url: &str,
    target: &StreamTarget,
    start_at: StartAt,
) -> Result<Option<ReplicationClient>> {
    let config = replication_config(postgres_url, target)?;
    let mut client = ReplicationClient::connect_gated(config)
        .await
        .map_err(|e| wire_error("opening the replication connection", e))?;
    let system = client
        .identify_system()
        .await
        .map_err(|e| wire_error("reading the server's timeline (IDENTIFY_SYSTEM)", e))?;
    let flushed = Lsn(system.xlogpos.as_u64());
    if system.timeline != start_at.timeline || flushed < start_at.lsn {
        tracing::warn!(
            slot = %target.slot,
            start_at = %start_at.lsn,
            read_on_timeline = start_at.timeline,
            server_timeline = system.timeline,
            server_flushed = %flushed,
            "the server is not the one the stream's start was read on (a failover?): streaming \
             from the slot's position instead, where the catch-up filter drops what the drain \
             published"
        );
        // Dropping a gated client before it started ends the session.
        drop(client);
        return Ok(None);
    }
    client
        .start()
        .await
        .map_err(|e| wire_error("starting replication", e))?;
    client
        .wait_started()
        .await
        .map_err(|e| wire_error("starting replication", e))?;
    Ok(Some(client))
}

/// Longest wait for the server to end the replication session on close.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Makes an existing slot a failover slot (PostgreSQL 17+), so a standby
/// with `sync_replication_slots = on` keeps it across a promotion. Only
/// the replication protocol has `ALTER_REPLICATION_SLOT`, so this opens a
/// replication session of its own, runs the command before any
/// START_REPLICATION, and ends the session. The slot must be inactive.
pub async fn enable_failover(postgres_url: &str, target: &StreamTarget) -> Result<()> {
    let config = replication_config(postgres_url, target)?;
    let mut client = ReplicationClient::connect_gated(config)
        .await
        .map_err(|e| wire_error("opening a replication connection to alter the slot", e))?;
    // Slot names are `[a-z0-9_]` (checked at load), so naming it unquoted is safe.
    let outcome = client
        .simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} ( FAILOVER true )",
            target.slot
        ))
        .await
        .map(|_| ())
        .map_err(|e| wire_error(&format!("making slot `{}` a failover slot", target.slot), e));
    // Dropping a gated client before it started ends the session.
    drop(client);
    outcome
}

/// The server's system identifier, current timeline and, past timeline
/// 1, its history file (`capture::message_timeline`): IDENTIFY_SYSTEM and
/// TIMELINE_HISTORY, which only the replication protocol has, on a session
/// of their own that ends before any START_REPLICATION.
pub async fn wal_history(
    postgres_url: &str,
    target: &StreamTarget,
) -> Result<crate::capture::message_timeline::WalHistory> {
    let config = replication_config(postgres_url, target)?;
    let mut client = ReplicationClient::connect_gated(config)
        .await
        .map_err(|e| wire_error("opening a replication connection to read the timeline", e))?;
    let outcome = async {
        let system = client
            .identify_system()
            .await
            .map_err(|e| wire_error("reading the server's timeline (IDENTIFY_SYSTEM)", e))?;
        let history = match system.timeline {
            0 | 1 => None,
            timeline => {
                let file = client.timeline_history(timeline).await.map_err(|e| {
                    wire_error("reading the timeline's history (TIMELINE_HISTORY)", e)
                })?;
                Some(String::from_utf8_lossy(&file.content).into_owned())
            }
        };
        Ok(crate::capture::message_timeline::WalHistory {
            system_identifier: system.system_id,
            timeline: system.timeline,
            history,
        })
    }
    .await;
    // Dropping a gated client before it started ends the session.
    drop(client);
    outcome
}

/// Moves events from the client into the relay's buffer while their bytes
/// fit in `BUFFERED_BYTES`, and passes acknowledged positions to the client.
/// Ends (and stops the client, so the server releases the slot) when the
/// relay drops its `WireClient` or the stream ends.
async fn read_into_buffer(
    mut client: ReplicationClient,
    events: mpsc::UnboundedSender<Buffered>,
    mut acknowledged: mpsc::UnboundedReceiver<WireLsn>,
) {
    let budget = Arc::new(Semaphore::new(BUFFERED_BYTES));
    loop {
        let event = tokio::select! {
            biased;
            lsn = acknowledged.recv() => match lsn {
                Some(lsn) => {
                    client.update_applied_lsn(lsn);
                    continue;
                }
                None => break,
            },
            event = client.recv() => event,
        };
        let ended = !matches!(event, Ok(Some(_)));
        // A message larger than the whole budget takes all of it.
        let bytes = buffered_bytes(&event).clamp(1, BUFFERED_BYTES) as u32;
        let permit = loop {
            tokio::select! {
                biased;
                lsn = acknowledged.recv() => match lsn {
                    Some(lsn) => client.update_applied_lsn(lsn),
                    None => break None,
                },
                permit = Arc::clone(&budget).acquire_many_owned(bytes) => match permit {
                    Ok(permit) => break Some(permit),
                    Err(_closed) => break None,
                },
            }
        };
        let Some(permit) = permit else { break };
        let buffered = Buffered {
            event,
            _bytes: permit,
        };
        if events.send(buffered).is_err() || ended {
            break;
        }
    }
    // CopyDone, then wait for the server to end the session: it releases
    // the slot then. Positions acknowledged after this are not reported;
    // the next session starts from the slot's confirmed position.
    let _ = tokio::time::timeout(CLOSE_LIMIT, client.shutdown()).await;
}

/// Bytes an event holds while buffered: its row data, plus a little for
/// the messages without any.
fn buffered_bytes(event: &std::result::Result<Option<ReplicationEvent>, PgWireError>) -> usize {
    const SMALL_MESSAGE: usize = 64;
    match event {
        Ok(Some(ReplicationEvent::XLogData { data, .. })) => data.len() + SMALL_MESSAGE,
        Ok(Some(ReplicationEvent::Message { content, .. })) => content.len() + SMALL_MESSAGE,
        _ => SMALL_MESSAGE,
    }
}

impl ReplicationStream for WireClient {
    async fn next(&mut self) -> Result<Option<StreamItem>> {
        let Some(buffered) = self.events.recv().await else {
            // The reader task ended after passing on the stream's end.
            return Ok(None);
        };
        let event = buffered
            .event
            .map_err(|e| wire_error("reading the replication stream", e))?;
        let item = match event {
            None => return Ok(None),
            Some(ReplicationEvent::KeepAlive { wal_end, .. }) => StreamItem::KeepAlive {
                wal_end: Lsn(wal_end.as_u64()),
            },
            // The client decodes transaction boundaries itself.
            Some(ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            }) => StreamItem::Message(Message::Begin {
                final_lsn: Lsn(final_lsn.as_u64()),
                commit_time_micros,
                xid,
            }),
            Some(ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            }) => StreamItem::Message(Message::Commit {
                flags: 0,
                commit_lsn: Lsn(lsn.as_u64()),
                end_lsn: Lsn(end_lsn.as_u64()),
                commit_time_micros,
            }),
            Some(ReplicationEvent::XLogData {
                data, wal_start, ..
            }) => {
                let message = pgoutput::decode(&data).map_err(|e| {
                    Error::stop(format!(
                        "cannot decode the replication message at {}: {e}. \
                         This is a bug in outboxd or an unsupported server; report it with the server version",
                        Lsn(wal_start.as_u64())
                    ))
                })?;
                StreamItem::Message(message)
            }
            // Logical decoding messages (pg_logical_emit_message): the
            // client decodes them itself, like Begin and Commit. The
            // stream assembler keeps those of the WAL-message outbox
            // and ignores the rest (and all of them for a table).
            Some(ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            }) => StreamItem::Message(Message::Message {
                transactional,
                lsn: Lsn(lsn.as_u64()),
                prefix,
                content: content.to_vec(),
            }),
            // We never set a stop LSN.
            Some(ReplicationEvent::StoppedAt { .. }) => return Ok(None),
        };
        Ok(Some(item))
    }

    fn acknowledge(&mut self, lsn: Lsn) {
        if let Some(acknowledgements) = &self.acknowledgements {
            let _ = acknowledgements.send(WireLsn::from_u64(lsn.0));
        }
    }
}

/// Transient (network, server restart) errors are retried by restarting the
/// session; authentication and TLS problems need an operator.
fn wire_error(doing: &str, error: PgWireError) -> Error {
    let message = format!("{doing}: {error}");
    // The server refusing the login (wrong password, no pg_hba.conf line,
    // a client certificate required) comes as its error response, class 28
    // (`… (SQLSTATE 28P01)` in the client's words): the same every retry.
    let login_refused =
        matches!(&error, PgWireError::Server(text) if text.contains("(SQLSTATE 28"));
    if error.is_tls() {
        Error::stop(format!(
            "{message}. Check postgres.url's sslmode, sslrootcert (the CA that signed the server's \
             certificate) and, for a client certificate, sslcert and sslkey; the replication \
             connection uses the same URL as the SQL one"
        ))
    } else if error.is_auth() || login_refused {
        Error::stop(format!(
            "{message}. Check postgres.url's user, password, sslmode and client certificate \
             (sslcert, sslkey); the role needs the REPLICATION attribute"
        ))
    } else {
        Error::retry(message)
    }
}

/// Builds the client's settings from `postgres.url`, so both connections
/// use the same host, user, password, database and TLS settings.
fn replication_config(postgres_url: &str, target: &StreamTarget) -> Result<ReplicationConfig> {
    let parts = ConnectionParts::parse(postgres_url, |name| std::env::var(name).ok())
        .map_err(Error::stop)?;
    let config = ReplicationConfig::new(
        parts.host.clone(),
        parts.user,
        parts.password,
        parts.database,
        target.slot.clone(),
        target.publication.clone(),
    )
    .with_port(parts.port)
    .with_tls(parts.tls)
    .with_start_lsn(
        target
            .start_at
            .map_or(WireLsn::ZERO, |start| WireLsn::from_u64(start.lsn.0)),
    )
    .with_ack_lsn(WireLsn::from_u64(target.confirmed_flush.0))
    .with_status_interval(STATUS_INTERVAL)
    .with_wakeup_interval(STATUS_INTERVAL * 5)
    .with_buffer_size(WORKER_MESSAGES)
    .with_application_name(target.application_name.clone());
    Ok(config)
}

/// The parts of a `postgres://` URL the replication connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConnectionParts {
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
    tls: TlsConfig,
}

/// What the URL sets; the environment fills in the rest.
#[derive(Default)]
struct UrlValues {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<String>,
    database: Option<String>,
    ssl_mode: Option<String>,
    root_cert: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
}

impl ConnectionParts {
    /// Reads `postgres.url` the way the SQL connection (sqlx) reads it, so
    /// the replication connection reaches the same server as the same role,
    /// never with less TLS:
    ///
    /// - user, password, host and database are percent-decoded only: a `+`
    ///   stays a `+` (form decoding would make it a space, another password);
    /// - query values are read as sqlx reads them (`sslmode`, `sslrootcert`,
    ///   `sslcert`, `sslkey`, `host` (a socket directory if it starts with
    ///   `/`), `hostaddr`, `port`, `dbname`, `user`, `password`, and sqlx's
    ///   dashed spellings); sqlx form-decodes them, so we do too, or the two
    ///   connections would read different values;
    /// - what the URL leaves out comes from the same environment variables
    ///   (`PGSSLMODE`, `PGPASSWORD`, …), read through `env`.
    ///
    /// What the replication client cannot do the same way is refused with
    /// the parameter's name, never dropped; `sslmode=allow` alone is read
    /// as something else, stricter (see [`ssl_mode`]).
    fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<ConnectionParts, String> {
        let url = Self::url_values(text)?;
        let env_value = |name: &str| env(name).filter(|value| !value.is_empty());

        let user = url.user.or_else(|| env_value("PGUSER")).ok_or(
            "postgres.url: has no user name; write postgres://USER@HOST/DB (or set PGUSER)",
        )?;
        let password = url
            .password
            .or_else(|| env_value("PGPASSWORD"))
            .unwrap_or_default();
        let host = url
            .host
            .or_else(|| env_value("PGHOSTADDR"))
            .or_else(|| env_value("PGHOST"))
            .unwrap_or_else(|| "localhost".into());
        let port = match url.port {
            Some(port) => port,
            None => match env_value("PGPORT") {
                Some(port) => port
                    .parse()
                    .map_err(|_| format!("PGPORT (environment) is `{port}`, not a port number"))?,
                None => 5432,
            },
        };
        let database = url
            .database
            .or_else(|| env_value("PGDATABASE"))
            .unwrap_or_else(|| user.clone());

        let ssl_mode = match url.ssl_mode {
            Some(mode) => ssl_mode(&mode).ok_or_else(|| {
                format!("postgres.url: unknown sslmode `{mode}`; use disable, allow, prefer, require, verify-ca or verify-full")
            })?,
            None => match env_value("PGSSLMODE") {
                Some(mode) => ssl_mode(&mode).ok_or_else(|| {
                    format!("PGSSLMODE (environment) is `{mode}`, not an sslmode; use disable, allow, prefer, require, verify-ca or verify-full")
                })?,
                None => SslMode::Prefer,
            },
        };
        let file = |parameter: &str, from_url: Option<String>, variable: &str| {
            let value = from_url.or_else(|| env_value(variable));
            match value {
                // sqlx takes a value that is itself a PEM block as the
                // certificate; the replication client reads files only.
                Some(value) if value.trim_start().starts_with("-----BEGIN") => Err(format!(
                    "postgres.url: {parameter} holds the PEM text itself; the replication connection \
                     reads it from a file: write it to a file and give {parameter} that file's path"
                )),
                value => Ok(value.map(std::path::PathBuf::from)),
            }
        };
        let root_cert = file("sslrootcert", url.root_cert, "PGSSLROOTCERT")?;
        let client_cert = file("sslcert", url.client_cert, "PGSSLCERT")?;
        let client_key = file("sslkey", url.client_key, "PGSSLKEY")?;
        if client_cert.is_some() != client_key.is_some() {
            let (given, missing) = if client_cert.is_some() {
                ("sslcert", "sslkey")
            } else {
                ("sslkey", "sslcert")
            };
            return Err(format!(
                "postgres.url: {given} is set but {missing} is not; a client certificate needs \
                 both the certificate (sslcert) and its private key (sslkey)"
            ));
        }
        let host = host.trim_matches(|c| c == '[' || c == ']').to_string();
        let tls = TlsConfig {
            mode: ssl_mode,
            ca_pem_path: root_cert,
            // The client refuses verify-full on an IP address unless it is
            // named here; named, rustls checks it against the certificate's
            // subjectAltName IP entries, as sqlx does for the SQL connection.
            sni_hostname: host
                .parse::<std::net::IpAddr>()
                .is_ok()
                .then(|| host.clone()),
            client_cert_pem_path: client_cert,
            client_key_pem_path: client_key,
        };
        Ok(ConnectionParts {
            host,
            port,
            user,
            password,
            database,
            tls,
        })
    }

    /// The values `text` itself sets.
    fn url_values(text: &str) -> Result<UrlValues, String> {
        // libpq allows an empty host when `?host=` names a socket directory;
        // the url crate does not, so parse with a placeholder host.
        let (url, placeholder_host) = match url::Url::parse(text) {
            Err(url::ParseError::EmptyHost) => (
                url::Url::parse(&text.replacen("@/", "@localhost/", 1)),
                true,
            ),
            parsed => (parsed, false),
        };
        let url = url.map_err(|e| format!("postgres.url: {e}"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err("postgres.url: must start with postgres://".into());
        }
        let decode = |text: &str, what: &str| -> Result<Option<String>, String> {
            let decoded = percent_encoding::percent_decode_str(text)
                .decode_utf8()
                .map_err(|_| {
                    format!("postgres.url: the {what} is not UTF-8 once percent-decoded")
                })?;
            Ok((!decoded.is_empty()).then(|| decoded.into_owned()))
        };
        let mut values = UrlValues {
            user: decode(url.username(), "user name")?,
            password: match url.password() {
                Some(password) => decode(password, "password")?,
                None => None,
            },
            database: decode(url.path().trim_start_matches('/'), "database name")?,
            port: url.port(),
            ..UrlValues::default()
        };
        if !placeholder_host {
            if let Some(host) = url.host_str().filter(|host| !host.is_empty()) {
                // A percent-encoded socket directory (`%2Fvar%2Frun%2Fpostgresql`).
                values.host = match decode(host, "host")? {
                    Some(decoded) if decoded.starts_with('/') => Some(decoded),
                    _ => Some(host.to_string()),
                };
            }
        }
        for (key, value) in url.query_pairs() {
            let value = value.into_owned();
            match key.as_ref() {
                "sslmode" | "ssl-mode" => values.ssl_mode = Some(value),
                "sslrootcert" | "ssl-root-cert" | "ssl-ca" => values.root_cert = Some(value),
                "sslcert" | "ssl-cert" => values.client_cert = Some(value),
                "sslkey" | "ssl-key" => values.client_key = Some(value),
                "host" => values.host = Some(value),
                "hostaddr" => {
                    value.parse::<std::net::IpAddr>().map_err(|_| {
                        format!("postgres.url: hostaddr `{value}` is not an IP address")
                    })?;
                    values.host = Some(value);
                }
                "port" => {
                    values.port = Some(value.parse().map_err(|_| {
                        format!("postgres.url: port `{value}` is not a port number")
                    })?)
                }
                "dbname" => values.database = Some(value),
                "user" => values.user = Some(value),
                "password" => values.password = Some(value),
                // application_name, options, …: the replication connection
                // sets its own application_name and needs no other.
                _ => {}
            }
        }
        Ok(values)
    }
}

/// libpq's `sslmode` as the replication client can honour it.
fn ssl_mode(text: &str) -> Option<SslMode> {
    Some(match text.to_ascii_lowercase().as_str() {
        "disable" => SslMode::Disable,
        // libpq's `allow` tries without TLS first and with TLS only if the
        // server refuses a plain connection; the client cannot try in that
        // order. `disable` (what sqlx makes of `allow` for the SQL
        // connection) would send every outbox row in clear even where the
        // server offers TLS, and fail against a TLS-only server that libpq
        // reaches. `prefer` connects where `allow` does (TLS first, plain if
        // the server offers no TLS) and encrypts whenever it can, so the
        // replication connection is never less secure than the SQL one.
        "allow" | "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Parses with an empty environment.
    fn parse(url: &str) -> Result<ConnectionParts, String> {
        ConnectionParts::parse(url, |_| None)
    }

    /// Parses with `variables` as the environment.
    fn parse_with_env(url: &str, variables: &[(&str, &str)]) -> Result<ConnectionParts, String> {
        ConnectionParts::parse(url, |name| {
            variables
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn connection_parts_follow_libpq_urls() {
        let parts =
            parse("postgres://relay:p%40ss@db.internal:6543/orders?sslmode=verify-full&sslrootcert=/etc/ca.pem")
                .unwrap();
        assert_eq!(parts.host, "db.internal");
        assert_eq!(parts.port, 6543);
        assert_eq!(parts.user, "relay");
        assert_eq!(parts.password, "p@ss");
        assert_eq!(parts.database, "orders");
        assert_eq!(parts.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            parts.tls.ca_pem_path.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );
        assert_eq!(parts.tls.sni_hostname, None);
        assert!(!parts.tls.is_mtls());

        let parts = parse("postgresql://app@localhost").unwrap();
        assert_eq!((parts.port, parts.database.as_str()), (5432, "app"));
        assert_eq!(parts.tls.mode, SslMode::Prefer);

        let parts = parse("postgres://app@/orders?host=/var/run/postgresql").unwrap();
        assert_eq!(parts.host, "/var/run/postgresql");
        let parts = parse("postgres://app@%2Fvar%2Frun%2Fpostgresql/orders").unwrap();
        assert_eq!(parts.host, "/var/run/postgresql");

        let parts = parse("postgres://app@[::1]:6000/orders").unwrap();
        assert_eq!((parts.host.as_str(), parts.port), ("::1", 6000));
    }

    #[test]
    fn a_plus_in_the_password_stays_a_plus() {
        // Form decoding would turn `+` into a space: another password than
        // the SQL connection's (sqlx percent-decodes only).
        let parts = parse("postgres://relay:a+b%20c%2Bd@db/my+db").unwrap();
        assert_eq!(parts.password, "a+b c+d");
        assert_eq!(parts.database, "my+db");
        let parts = parse("postgres://us+er@db/orders").unwrap();
        assert_eq!(parts.user, "us+er");
        assert!(parse("postgres://relay:%FF@db/orders")
            .unwrap_err()
            .contains("password is not UTF-8"));
    }

    #[test]
    fn query_parameters_are_read_as_sqlx_reads_them() {
        let parts = parse(
            "postgres://ignored@db:1/ignored?user=relay&password=s3cret&port=6432&dbname=orders&hostaddr=10.0.0.7",
        )
        .unwrap();
        assert_eq!(
            (
                parts.user.as_str(),
                parts.password.as_str(),
                parts.port,
                parts.database.as_str(),
                parts.host.as_str()
            ),
            ("relay", "s3cret", 6432, "orders", "10.0.0.7")
        );
        let parts = parse("postgres://a@db/o?ssl-mode=REQUIRE&ssl-ca=/ca.pem").unwrap();
        assert_eq!(parts.tls.mode, SslMode::Require);
        assert_eq!(parts.tls.ca_pem_path.as_deref(), Some(Path::new("/ca.pem")));
        assert!(parse("postgres://a@db/o?port=many")
            .unwrap_err()
            .contains("port"));
        assert!(parse("postgres://a@db/o?hostaddr=db.internal")
            .unwrap_err()
            .contains("hostaddr"));
    }

    #[test]
    fn client_certificates_are_honoured() {
        let parts = parse(
            "postgres://relay@db/orders?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/relay.crt&sslkey=/relay.key",
        )
        .unwrap();
        assert!(parts.tls.is_mtls());
        assert_eq!(
            parts.tls.client_cert_pem_path.as_deref(),
            Some(Path::new("/relay.crt"))
        );
        assert_eq!(
            parts.tls.client_key_pem_path.as_deref(),
            Some(Path::new("/relay.key"))
        );

        // Half a client certificate is refused, naming what is missing.
        let error = parse("postgres://relay@db/orders?sslcert=/relay.crt").unwrap_err();
        assert!(error.contains("sslkey is not"), "{error}");
        let error = parse("postgres://relay@db/orders?sslkey=/relay.key").unwrap_err();
        assert!(error.contains("sslcert is not"), "{error}");
        // sqlx takes PEM text in place of a path; the replication client cannot.
        let error = parse(
            "postgres://relay@db/orders?sslrootcert=-----BEGIN%20CERTIFICATE-----%0AMII%0A-----END%20CERTIFICATE-----",
        )
        .unwrap_err();
        assert!(
            error.contains("sslrootcert") && error.contains("file"),
            "{error}"
        );
    }

    #[test]
    fn sslmode_allow_keeps_tls_where_the_server_offers_it() {
        assert_eq!(
            parse("postgres://a@db/o?sslmode=allow").unwrap().tls.mode,
            SslMode::Prefer
        );
        assert_eq!(
            parse("postgres://a@db/o?sslmode=disable").unwrap().tls.mode,
            SslMode::Disable
        );
        assert_eq!(
            parse("postgres://a@db/o?sslmode=verify-ca")
                .unwrap()
                .tls
                .mode,
            SslMode::VerifyCa
        );
    }

    #[test]
    fn verify_full_on_an_ip_address_checks_the_address() {
        let parts = parse("postgres://a@127.0.0.1:5432/o?sslmode=verify-full").unwrap();
        assert_eq!(parts.tls.sni_hostname.as_deref(), Some("127.0.0.1"));
        let parts = parse("postgres://a@[::1]:5432/o?sslmode=verify-full").unwrap();
        assert_eq!(parts.tls.sni_hostname.as_deref(), Some("::1"));
        let parts = parse("postgres://a@db.internal/o?sslmode=verify-full").unwrap();
        assert_eq!(parts.tls.sni_hostname, None);
    }

    #[test]
    fn the_environment_fills_in_what_the_url_leaves_out() {
        let env = [
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", "/env-ca.pem"),
            ("PGSSLCERT", "/env.crt"),
            ("PGSSLKEY", "/env.key"),
            ("PGPASSWORD", "from-env"),
            ("PGPORT", "6543"),
            ("PGDATABASE", "envdb"),
        ];
        let parts = parse_with_env("postgres://relay@db", &env).unwrap();
        assert_eq!(parts.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            parts.tls.ca_pem_path.as_deref(),
            Some(Path::new("/env-ca.pem"))
        );
        assert!(parts.tls.is_mtls());
        assert_eq!(
            (parts.password.as_str(), parts.port, parts.database.as_str()),
            ("from-env", 6543, "envdb")
        );

        // The URL wins.
        let parts = parse_with_env(
            "postgres://relay:pw@db:1/orders?sslmode=require&sslrootcert=/ca.pem",
            &env,
        )
        .unwrap();
        assert_eq!(parts.tls.mode, SslMode::Require);
        assert_eq!(parts.tls.ca_pem_path.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(
            (parts.password.as_str(), parts.port, parts.database.as_str()),
            ("pw", 1, "orders")
        );

        let parts = parse_with_env(
            "postgres:///orders",
            &[("PGUSER", "relay"), ("PGHOST", "db")],
        );
        let parts = parts.unwrap();
        assert_eq!((parts.user.as_str(), parts.host.as_str()), ("relay", "db"));

        let error = parse_with_env("postgres://a@db/o", &[("PGSSLMODE", "strict")]).unwrap_err();
        assert!(error.contains("PGSSLMODE"), "{error}");
    }

    #[test]
    fn refused_logins_and_tls_stop_transient_errors_retry() {
        let refused = wire_error(
            "opening",
            PgWireError::Server(
                "password authentication failed for user \"relay\" (SQLSTATE 28P01)".into(),
            ),
        );
        assert_eq!(refused.kind, crate::error::ErrorKind::Stop);
        assert!(refused.message.contains("password"), "{}", refused.message);
        let tls = wire_error(
            "opening",
            PgWireError::Tls(
                "TLS handshake failed: invalid peer certificate: UnknownIssuer".into(),
            ),
        );
        assert_eq!(tls.kind, crate::error::ErrorKind::Stop);
        assert!(tls.message.contains("sslrootcert"), "{}", tls.message);
        let restarting = wire_error(
            "reading",
            PgWireError::Server(
                "terminating connection due to administrator command (SQLSTATE 57P01)".into(),
            ),
        );
        assert_eq!(restarting.kind, crate::error::ErrorKind::Retry);
    }

    #[test]
    fn connection_parts_refuse_what_they_cannot_honour() {
        assert!(parse("postgres://db/orders")
            .unwrap_err()
            .contains("no user name"));
        assert!(parse("postgres://a@db/o?sslmode=maybe")
            .unwrap_err()
            .contains("sslmode"));
        assert!(parse("mysql://a@db/o").unwrap_err().contains("postgres://"));
    }
}
