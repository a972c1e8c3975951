//! The fault-injection suite: the real relay binary, the realistic
//! workload, and one kind of fault per test, in both capture modes; every
//! test ends with the invariant checker over everything that happened.
//! Relay kills, server restarts, network faults, poison and the backlog
//! also run on the WAL-message outbox (`in_every_source!`, tests named
//! `…::messages`), whose writers emit their events as messages.
//!
//! `make test` runs each fault a few times; `make chaos` runs the same
//! tests with `OUTBOXD_CHAOS=long` (hundreds of faults) and prints a table.
//! The tests restart the shared broker and Postgres, so they hold one lock
//! and run one at a time.

#[macro_use]
#[path = "../support/mod.rs"]
mod support;

mod backlog;
mod checker;
mod cluster;
mod failover;
mod kill_points;
mod network;
mod operator_actions;
mod poison;
mod proxy;
mod random_kills;
mod second_relay;
mod server_restarts;
mod several_outboxes;
mod shared_topic;
mod versions;
mod window;
