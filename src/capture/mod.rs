//! Capture: finding committed outbox rows that are not yet in Kafka.
//!
//! Invariant: capture only ever yields rows from committed transactions, in
//! an order that keeps each aggregate's events in commit order.
//!
//! Two modes: `polling` claims unsent rows from the table; `replication`
//! tails the table's inserts through a logical replication slot
//! (`wire` → `pgoutput` → `stream`), with `slot` managing the slot and
//! the publication, and `standby_gate` holding streamed transactions back
//! until the synchronous standbys have them.

pub mod message_encoding;
pub mod message_slot;
pub mod message_timeline;
pub mod pgoutput;
pub mod polling;
pub mod slot;
pub mod standby_gate;
pub mod stream;
pub mod wakeup;
pub mod wire;
