//! A batch: the claimed events turned into the records of one Kafka
//! transaction, with poison rows diverted to the dead-letter topic.
//!
//! Invariant: every claimed event ends up in exactly one of `published` or
//! `dead_lettered`, and has exactly one record, so acknowledging the batch
//! accounts for every row it claimed — none is dropped silently.

use std::collections::HashMap;

use crate::config::PoisonPolicy;
use crate::error::{Error, Result};
use crate::event::OutboxEvent;
use crate::registry::Schemas;
use crate::routing::{RoutedRecord, Router};

#[derive(Debug, Default)]
pub struct Batch<'a> {
    pub records: Vec<RoutedRecord<'a>>,
    /// The seq of each record, index for index.
    pub record_seqs: Vec<i64>,
    pub published: Vec<i64>,
    pub dead_lettered: Vec<i64>,
}

impl<'a> Batch<'a> {
    /// Routes `events`, encoding values with `schemas` (resolved for these
    /// events). `known_rejections` holds rows the broker refused on an
    /// earlier attempt (say, over a topic's own size limit), by seq.
    pub fn route(
        router: &'a Router,
        schemas: &Schemas,
        events: &'a [OutboxEvent],
        known_rejections: &HashMap<i64, String>,
        policy: PoisonPolicy,
    ) -> Result<Batch<'a>> {
        let mut batch = Batch::default();
        for event in events {
            let routed = match known_rejections.get(&event.seq) {
                Some(reason) => Err(reason.clone()),
                None => router.route_with(event, schemas),
            };
            match routed {
                Ok(record) => {
                    batch.records.push(record);
                    batch.published.push(event.seq);
                }
                Err(reason) => {
                    if policy == PoisonPolicy::Halt {
                        return Err(Error::stop(format!(
                            "outbox row seq {} (id {}, {} {}) cannot be published: {reason}. \
                             relay.on_poison is `halt`; fix or remove the row, or set on_poison: dead_letter",
                            event.seq, event.id, event.aggregate_type, event.event_type
                        ))
                        .because(crate::error::Cause::Poison));
                    }
                    tracing::warn!(
                        seq = event.seq,
                        id = %event.id,
                        aggregate_type = %event.aggregate_type,
                        event_type = %event.event_type,
                        %reason,
                        "poison row: sending it to the dead-letter topic; the row stays in the table, marked sent"
                    );
                    batch.records.push(router.dead_letter(event, &reason));
                    batch.dead_lettered.push(event.seq);
                }
            }
            batch.record_seqs.push(event.seq);
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoutingConfig;

    fn event(seq: i64, aggregate_type: &str) -> OutboxEvent {
        OutboxEvent {
            seq,
            id: format!("id-{seq}"),
            aggregate_type: aggregate_type.into(),
            aggregate_id: "a-1".into(),
            event_type: "Created".into(),
            payload: Some(b"{}".to_vec()),
            headers_json: None,
            trace_parent: None,
            position: None,
            committed_at: None,
            poison: None,
            created_at: None,
        }
    }

    fn router() -> Router {
        Router::new(&RoutingConfig::default(), 1_000_000).unwrap()
    }

    #[test]
    fn every_event_is_either_published_or_dead_lettered() {
        let events = [
            event(1, "Order"),
            event(2, "not a topic!"),
            event(3, "Order"),
        ];
        let router = router();
        let batch = Batch::route(
            &router,
            &Schemas::new(),
            &events,
            &HashMap::new(),
            PoisonPolicy::DeadLetter,
        )
        .unwrap();
        assert_eq!(batch.published, vec![1, 3]);
        assert_eq!(batch.dead_lettered, vec![2]);
        assert_eq!(batch.record_seqs, vec![1, 2, 3]);
        assert_eq!(batch.records[1].topic, "outboxd.dead-letter");
    }

    #[test]
    fn rows_the_broker_rejected_before_go_to_the_dead_letter_topic() {
        let rejections = HashMap::from([(1, "rejected by Kafka: message too large".to_string())]);
        let router = router();
        let events = [event(1, "Order")];
        let batch = Batch::route(
            &router,
            &Schemas::new(),
            &events,
            &rejections,
            PoisonPolicy::DeadLetter,
        )
        .unwrap();
        assert_eq!(batch.dead_lettered, vec![1]);
    }

    #[test]
    fn halt_policy_stops_with_the_row_named() {
        let router = router();
        let events = [event(9, "bad topic")];
        let error = Batch::route(
            &router,
            &Schemas::new(),
            &events,
            &HashMap::new(),
            PoisonPolicy::Halt,
        )
        .unwrap_err();
        assert_eq!(error.kind, crate::error::ErrorKind::Stop);
        assert!(error.message.contains("seq 9"), "{}", error.message);
    }
}
