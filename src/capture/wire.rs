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
//! `pgwire-replication` does TLS, SCRAM-SHA-256, keepalive replies and
//! backpressure; the pgoutput bodies it hands over are decoded by our own
//! [`pgoutput`](super::pgoutput) module.

use std::future::Future;
use std::time::Duration;

use pgwire_replication::{
    Lsn as WireLsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode,
    TlsConfig,
};

use super::lsn::Lsn;
use super::pgoutput::{self, Message};
use crate::error::{Error, Result};

/// How often an advanced flush position is reported to the server.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// Decoded messages buffered between the socket and the relay; it bounds
/// memory, and when it is full the client stops reading (TCP backpressure)
/// while still answering keepalives.
const BUFFERED_MESSAGES: usize = 4096;

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
    pub application_name: String,
}

/// The `pgwire-replication` client.
pub struct WireClient {
    client: ReplicationClient,
}

impl WireClient {
    /// Connects with the credentials and TLS settings of `postgres_url` and
    /// sends `START_REPLICATION` (pgoutput protocol version 1) from the slot's
    /// confirmed position; returns once the server accepted it.
    pub async fn start(postgres_url: &str, target: &StreamTarget) -> Result<WireClient> {
        let config = replication_config(postgres_url, target)?;
        let mut client = ReplicationClient::connect(config)
            .await
            .map_err(|e| wire_error("opening the replication connection", e))?;
        client
            .wait_started()
            .await
            .map_err(|e| wire_error("starting replication", e))?;
        Ok(WireClient { client })
    }
}

impl ReplicationStream for WireClient {
    async fn next(&mut self) -> Result<Option<StreamItem>> {
        loop {
            let event = self
                .client
                .recv()
                .await
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
                // Logical decoding messages (pg_logical_emit_message) are not outbox rows.
                Some(ReplicationEvent::Message { .. }) => continue,
                // We never set a stop LSN.
                Some(ReplicationEvent::StoppedAt { .. }) => return Ok(None),
            };
            return Ok(Some(item));
        }
    }

    fn acknowledge(&mut self, lsn: Lsn) {
        self.client.update_applied_lsn(WireLsn::from_u64(lsn.0));
    }
}

impl Drop for WireClient {
    fn drop(&mut self) {
        // CopyDone: the server ends the session and releases the slot at once.
        self.client.stop();
    }
}

/// Transient (network, server restart) errors are retried by restarting the
/// session; authentication and TLS problems need an operator.
fn wire_error(doing: &str, error: PgWireError) -> Error {
    let message = format!("{doing}: {error}");
    if error.is_auth() || error.is_tls() {
        Error::stop(format!(
            "{message}. Check postgres.url's user, password and sslmode; the role needs the REPLICATION attribute"
        ))
    } else {
        Error::retry(message)
    }
}

/// Builds the client's settings from `postgres.url`, so both connections
/// use the same host, user, password, database and TLS mode.
fn replication_config(postgres_url: &str, target: &StreamTarget) -> Result<ReplicationConfig> {
    let parts = ConnectionParts::parse(postgres_url).map_err(Error::stop)?;
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
    .with_start_lsn(WireLsn::ZERO)
    .with_ack_lsn(WireLsn::from_u64(target.confirmed_flush.0))
    .with_status_interval(STATUS_INTERVAL)
    .with_wakeup_interval(STATUS_INTERVAL * 5)
    .with_buffer_size(BUFFERED_MESSAGES)
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

impl ConnectionParts {
    /// Follows libpq's URL rules for what we support: host, port, user,
    /// password, database, `sslmode`, `sslrootcert`, `host=` for a Unix socket.
    fn parse(text: &str) -> Result<ConnectionParts, String> {
        // libpq allows an empty host when `?host=` names a socket directory;
        // the url crate does not, so parse with a placeholder host.
        let url = match url::Url::parse(text) {
            Err(url::ParseError::EmptyHost) => {
                url::Url::parse(&text.replacen("@/", "@localhost/", 1))
            }
            parsed => parsed,
        }
        .map_err(|e| format!("postgres.url: {e}"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err("postgres.url: must start with postgres://".into());
        }
        let decode = |text: &str| {
            url::form_urlencoded::parse(format!("x={text}").as_bytes())
                .next()
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default()
        };
        let user = decode(url.username());
        if user.is_empty() {
            return Err("postgres.url: has no user name; write postgres://USER@HOST/DB".into());
        }
        let password = url.password().map(decode).unwrap_or_default();
        let mut host = url.host_str().unwrap_or("localhost").to_string();
        let mut database = decode(url.path().trim_start_matches('/'));
        let mut ssl_mode = "prefer".to_string();
        let mut root_cert = None;
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "sslmode" => ssl_mode = value.into_owned(),
                "sslrootcert" => root_cert = Some(std::path::PathBuf::from(value.as_ref())),
                "host" => host = value.into_owned(),
                "dbname" => database = value.into_owned(),
                _ => {}
            }
        }
        if database.is_empty() {
            database = user.clone();
        }
        let mode = match ssl_mode.as_str() {
            "disable" | "allow" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(format!("postgres.url: unknown sslmode `{other}`")),
        };
        let tls = TlsConfig {
            mode,
            ca_pem_path: root_cert,
            ..TlsConfig::default()
        };
        Ok(ConnectionParts {
            host: host.trim_matches(|c| c == '[' || c == ']').to_string(),
            port: url.port().unwrap_or(5432),
            user,
            password,
            database,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_parts_follow_libpq_urls() {
        let parts =
            ConnectionParts::parse("postgres://relay:p%40ss@db.internal:6543/orders?sslmode=verify-full&sslrootcert=/etc/ca.pem")
                .unwrap();
        assert_eq!(parts.host, "db.internal");
        assert_eq!(parts.port, 6543);
        assert_eq!(parts.user, "relay");
        assert_eq!(parts.password, "p@ss");
        assert_eq!(parts.database, "orders");
        assert_eq!(parts.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            parts.tls.ca_pem_path.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );

        let parts = ConnectionParts::parse("postgresql://app@localhost").unwrap();
        assert_eq!((parts.port, parts.database.as_str()), (5432, "app"));
        assert_eq!(parts.tls.mode, SslMode::Prefer);

        let parts =
            ConnectionParts::parse("postgres://app@/orders?host=/var/run/postgresql").unwrap();
        assert_eq!(parts.host, "/var/run/postgresql");
    }

    #[test]
    fn connection_parts_refuse_what_they_cannot_honour() {
        assert!(ConnectionParts::parse("postgres://db/orders")
            .unwrap_err()
            .contains("no user name"));
        assert!(ConnectionParts::parse("postgres://a@db/o?sslmode=maybe")
            .unwrap_err()
            .contains("sslmode"));
        assert!(ConnectionParts::parse("mysql://a@db/o")
            .unwrap_err()
            .contains("postgres://"));
    }
}
