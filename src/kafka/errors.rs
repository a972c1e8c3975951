//! Sorting librdkafka errors by what to do about them.
//!
//! Invariant: a producer that reported a fatal error (fenced included) is
//! never used again. The session ends; the next one must win the leader
//! lock before it creates a new producer, so a zombie that lost the lock
//! waits as a standby and never publishes after a newer instance took over.
//! Only errors no restart can fix (authorization, an unsupported broker)
//! stop the relay.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::error::{Cause, Error};

/// The class of a transactional-producer error, following librdkafka's
/// transaction API contract.
pub fn classify(context: &str, error: &KafkaError) -> Error {
    let message = format!("{context}: {error}");
    let sorted = match error {
        KafkaError::Transaction(rd) if rd.is_fatal() => fatal(message, rd.code()),
        KafkaError::Transaction(rd) if rd.txn_requires_abort() => Error::abort_and_resend(message),
        KafkaError::Transaction(rd) if rd.is_retriable() => Error::retry(message),
        KafkaError::Transaction(rd) => {
            // Neither retriable nor abortable: the producer is in a state we
            // did not plan for. Restarting the session re-initialises it.
            Error::retry(format!("{message} (code {:?})", rd.code()))
        }
        other => match other.rdkafka_error_code() {
            Some(code) if is_fatal_code(code) => fatal(message, code),
            // Inside a transaction any failed delivery poisons the transaction.
            _ => Error::abort_and_resend(message),
        },
    };
    kafka_cause(sorted).caused_by(error.clone())
}

/// A Kafka error's cause, unless `fatal` already named a finer one.
fn kafka_cause(error: Error) -> Error {
    match error.cause {
        Cause::Unspecified => error.because(Cause::Kafka),
        _ => error,
    }
}

/// The class of `error`, seen on a producer that has hit the fatal error
/// `cause`. Once librdkafka raised a fatal error, every later call and
/// delivery fails with a generic "fatal" or "purged" code; the reason that
/// says what to do (fenced by a successor, not authorised) is the cause.
pub fn classify_after_fatal(
    context: &str,
    error: &KafkaError,
    cause: RDKafkaErrorCode,
    cause_reason: &str,
) -> Error {
    kafka_cause(fatal(
        format!("{context}: {error}; the producer's fatal error: {cause_reason}"),
        cause,
    ))
    .caused_by(error.clone())
}

/// Whether a delivery failed because the broker will never take this record,
/// however often it is re-sent: such a row is poison.
pub fn is_record_rejected(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidTopic
    )
}

fn is_fatal_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fatal
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::UnsupportedVersion
    )
}

/// A fatal producer error: the producer is done for. Stop where a restart
/// cannot help; otherwise end the session, whose successor must win the
/// leader lock again before it builds a new producer.
fn fatal(message: String, code: RDKafkaErrorCode) -> Error {
    match code {
        RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch => Error::retry(format!(
            "{message}. This producer was fenced: another instance leading the same outbox table took \
             over, or the broker aborted a transaction that outlived kafka.transaction_timeout. \
             Nothing of the open transaction is visible. Starting a new session: it publishes \
             again only if it wins the leader lock"
        ))
        .because(Cause::Fenced),
        RDKafkaErrorCode::TransactionalIdAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed
        | RDKafkaErrorCode::TopicAuthorizationFailed => Error::stop(format!(
            "{message}. Grant the relay's Kafka principal WRITE and DESCRIBE on its transactional.id and topics"
        ))
        .because(Cause::KafkaAuthorization),
        RDKafkaErrorCode::UnsupportedVersion => Error::stop(format!(
            "{message}. The broker does not support transactions as this relay needs them (Kafka 2.5 or newer)"
        )),
        _ => Error::retry(format!(
            "{message}. The Kafka producer hit a fatal error; nothing of the open transaction is \
             visible. Starting a new session with a new producer"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn fencing_ends_the_session_and_says_why() {
        let error = classify(
            "committing",
            &KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced),
        );
        assert_eq!(error.kind, ErrorKind::Retry);
        assert_eq!(error.cause, crate::error::Cause::Fenced);
        assert!(
            std::error::Error::source(&error).is_some(),
            "the librdkafka error is kept"
        );
        assert!(
            error.message.contains("same outbox table") && error.message.contains("leader lock"),
            "{}",
            error.message
        );
    }

    #[test]
    fn other_fatal_errors_restart_with_a_new_producer() {
        let error = classify(
            "aborting",
            &KafkaError::MessageProduction(RDKafkaErrorCode::Fatal),
        );
        assert_eq!(error.kind, ErrorKind::Retry);
    }

    #[test]
    fn a_generic_fatal_error_is_judged_by_its_cause() {
        let fenced = classify_after_fatal(
            "delivering a record",
            &KafkaError::MessageProduction(RDKafkaErrorCode::Fatal),
            RDKafkaErrorCode::Fenced,
            "producer fenced by newer instance",
        );
        assert_eq!(fenced.kind, ErrorKind::Retry);
        assert_eq!(fenced.cause, crate::error::Cause::Fenced);
        assert!(
            fenced.message.contains("fenced") && fenced.message.contains("leader lock"),
            "{}",
            fenced.message
        );
        let unauthorised = classify_after_fatal(
            "beginning a Kafka transaction",
            &KafkaError::MessageProduction(RDKafkaErrorCode::Fatal),
            RDKafkaErrorCode::TransactionalIdAuthorizationFailed,
            "not authorised",
        );
        assert_eq!(unauthorised.kind, ErrorKind::Stop);
        assert_eq!(unauthorised.cause, crate::error::Cause::KafkaAuthorization);
    }

    #[test]
    fn failed_deliveries_abort_and_resend() {
        let error = classify(
            "delivering",
            &KafkaError::MessageProduction(RDKafkaErrorCode::RequestTimedOut),
        );
        assert_eq!(error.kind, ErrorKind::AbortAndResend);
    }

    #[test]
    fn authorization_failures_stop_with_advice() {
        let error = classify(
            "init",
            &KafkaError::MessageProduction(RDKafkaErrorCode::TransactionalIdAuthorizationFailed),
        );
        assert_eq!(error.kind, ErrorKind::Stop);
        assert!(error.message.contains("Grant"));
    }

    #[test]
    fn oversized_records_are_rejected_for_good() {
        assert!(is_record_rejected(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(!is_record_rejected(RDKafkaErrorCode::RequestTimedOut));
    }
}
