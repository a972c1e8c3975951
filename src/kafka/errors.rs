//! Sorting librdkafka errors by what to do about them.
//!
//! Invariant: a producer that reported a fatal error (fenced included) is
//! never used again; the relay stops, so a zombie can never publish after a
//! newer instance took over.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::error::Error;

/// The class of a transactional-producer error, following librdkafka's
/// transaction API contract.
pub fn classify(context: &str, error: &KafkaError) -> Error {
    let message = format!("{context}: {error}");
    match error {
        KafkaError::Transaction(rd) if rd.is_fatal() => {
            Error::stop(fatal_message(message, rd.code()))
        }
        KafkaError::Transaction(rd) if rd.txn_requires_abort() => Error::abort_and_resend(message),
        KafkaError::Transaction(rd) if rd.is_retriable() => Error::retry(message),
        KafkaError::Transaction(rd) => {
            // Neither retriable nor abortable: the producer is in a state we
            // did not plan for. Restarting the session re-initialises it.
            Error::retry(format!("{message} (code {:?})", rd.code()))
        }
        other => match other.rdkafka_error_code() {
            Some(code) if is_fatal_code(code) => Error::stop(fatal_message(message, code)),
            // Inside a transaction any failed delivery poisons the transaction.
            _ => Error::abort_and_resend(message),
        },
    }
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

fn fatal_message(message: String, code: RDKafkaErrorCode) -> String {
    match code {
        RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch => format!(
            "{message}. Another relay with the same relay.name took over this transactional.id; \
             this instance stops so only one publishes"
        ),
        RDKafkaErrorCode::TransactionalIdAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed
        | RDKafkaErrorCode::TopicAuthorizationFailed => format!(
            "{message}. Grant the relay's Kafka principal WRITE and DESCRIBE on its transactional.id and topics"
        ),
        _ => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn fencing_stops_the_relay_and_says_why() {
        let error = classify(
            "committing",
            &KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced),
        );
        assert_eq!(error.kind, ErrorKind::Stop);
        assert!(
            error.message.contains("same relay.name"),
            "{}",
            error.message
        );
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
