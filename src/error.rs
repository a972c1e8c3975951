//! The relay's error, typed by what to do about it.
//!
//! Invariant: every failure is sorted into exactly one [`ErrorKind`] where it
//! happens, by the code that knows the cause; callers only act on the kind.
//! The [`Cause`] says what failed, for code and tests that must tell causes
//! apart without reading prose; the underlying error is kept as the source.
//! Messages are written for an operator: what happened and what to do next.

use std::fmt;

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub struct Error {
    pub kind: ErrorKind,
    pub cause: Cause,
    pub message: String,
    /// The library error this one was made from, if any.
    #[source]
    pub source: Option<Source>,
}

/// What failed. Only causes some code or test acts on have a variant of
/// their own; the message always says the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cause {
    /// Nothing finer was recorded; the message says what happened.
    Unspecified,
    /// Postgres refused a statement or the connection failed.
    Postgres,
    /// Postgres' TLS certificate did not verify against `sslrootcert`.
    PostgresCertificate,
    /// The relay's Postgres role lacks a privilege it needs.
    PostgresPrivilege,
    /// The outbox table, its columns or its publication are not as configured.
    OutboxTable,
    /// The replication slot was dropped or invalidated, under `on_slot_lost: halt`.
    SlotLost,
    /// A Kafka call or delivery failed.
    Kafka,
    /// Another instance leading the same outbox table fenced this producer.
    Fenced,
    /// The relay's Kafka principal may not do what it must.
    KafkaAuthorization,
    /// A row cannot be published, under `on_poison: halt`.
    Poison,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A server is unreachable or a connection dropped: reconnect with
    /// backoff and resume from the last checkpoint.
    Retry,
    /// The open Kafka transaction cannot commit: abort it and re-send the same batch.
    AbortAndResend,
    /// Continuing could lose or duplicate events, or cannot work at all (fatal
    /// or fenced producer, poison row under `halt`, missing table): stop and
    /// exit non-zero.
    Stop,
}

impl Error {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            cause: Cause::Unspecified,
            message: message.into(),
            source: None,
        }
    }
    pub fn retry(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Retry, message)
    }
    pub fn abort_and_resend(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::AbortAndResend, message)
    }
    pub fn stop(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Stop, message)
    }

    /// Records what failed.
    pub fn because(mut self, cause: Cause) -> Error {
        self.cause = cause;
        self
    }

    /// Keeps the library error this one was made from.
    pub fn caused_by(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(source));
        self
    }

    /// Sorts a Postgres error. Connection trouble and server restarts are
    /// worth retrying; a missing table, column or privilege will not heal
    /// by itself.
    pub fn from_postgres(context: &str, error: sqlx::Error) -> Error {
        let message = format!("{context}: {error}");
        let sorted = if rejects_certificate(&error) {
            Error::stop(format!(
                "{message}. The server's TLS certificate does not verify: check postgres.url's \
                 sslrootcert (the CA that signed the server's certificate) and, with \
                 sslmode=verify-full, that the host in the URL is one the certificate names"
            ))
            .because(Cause::PostgresCertificate)
        } else {
            match &error {
                sqlx::Error::Database(db) => match db.code().as_deref() {
                    // 08: connection exception, 57P0x: server shutting down,
                    // 40: serialization/deadlock, 53: out of resources, 55P03: lock not available.
                    Some(code)
                        if code.starts_with("08")
                            || code.starts_with("57P")
                            || code.starts_with("40")
                            || code.starts_with("53")
                            || code == "55P03" =>
                    {
                        Error::retry(message).because(Cause::Postgres)
                    }
                    Some("42501") => Error::stop(format!(
                        "{message}. The relay's role lacks a privilege; `outboxd check` names each missing grant with the statement to run (the scripts in migrations/roles/ grant what each capture mode and feature needs)"
                    ))
                    .because(Cause::PostgresPrivilege),
                    _ => Error::stop(message).because(Cause::Postgres),
                },
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => Error::retry(message).because(Cause::Postgres),
                _ => Error::stop(message).because(Cause::Postgres),
            }
        };
        sorted.caused_by(error)
    }
}

/// The server's certificate failed verification (another CA, another host
/// name, expired): every reconnect would fail the same way until an
/// operator changes the URL or the certificate. sqlx reports it as an I/O
/// error around rustls' own.
fn rejects_certificate(error: &sqlx::Error) -> bool {
    let sqlx::Error::Io(io) = error else {
        return false;
    };
    matches!(
        io.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_))
    )
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejected_server_certificate_stops_and_names_sslrootcert() {
        let rejected = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let error = Error::from_postgres("connecting", sqlx::Error::Io(rejected));
        assert_eq!(error.kind, ErrorKind::Stop);
        assert_eq!(error.cause, Cause::PostgresCertificate);
        assert!(error.message.contains("sslrootcert"), "{}", error.message);
        assert!(
            std::error::Error::source(&error).is_some(),
            "the sqlx error is kept"
        );

        // A connection reset during the handshake heals by reconnecting.
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let error = Error::from_postgres("connecting", sqlx::Error::Io(reset));
        assert_eq!(error.kind, ErrorKind::Retry);
        assert_eq!(error.cause, Cause::Postgres);
    }
}
