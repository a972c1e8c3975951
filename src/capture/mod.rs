//! Capture: finding committed outbox rows that are not yet in Kafka.
//!
//! Invariant: capture only ever yields rows from committed transactions, in
//! an order that keeps each aggregate's events in commit order.
//!
//! Two modes: `polling` claims unsent rows from the table; `replication`
//! tails the table's inserts through a logical replication slot
//! (`wire` → `pgoutput` → `stream`), with `slot` managing the slot and
//! the publication.

pub mod pgoutput;
pub mod polling;
pub mod slot;
pub mod stream;
pub mod wakeup;
pub mod wire;
