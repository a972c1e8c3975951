//! Capture: finding committed outbox rows that are not yet in Kafka.
//!
//! Invariant: capture only ever yields rows from committed transactions, in
//! an order that keeps each aggregate's events in commit order.

pub mod polling;
pub mod wakeup;
