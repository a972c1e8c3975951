//! outboxd publishes the rows of a PostgreSQL outbox table to Apache Kafka
//! exactly once, then marks them sent.
//!
//! The pipeline, one module per stage, in the order a row travels:
//!
//! - [`capture`]: finds committed, unsent rows: streamed from a logical
//!   replication slot (our own pgoutput decoder), or claimed with
//!   `FOR UPDATE SKIP LOCKED`, woken by `LISTEN/NOTIFY`.
//! - [`event`]: `OutboxEvent`, the one type that flows through the pipeline.
//! - [`routing`]: rules → topic, key and headers; or why a row is poison.
//! - [`registry`]: schema registry subjects → schemas and ids (cached), and
//!   payloads encoded against them in the Confluent wire format.
//! - [`batch`]: claimed events → the records of one Kafka transaction.
//! - [`kafka`]: the transactional publisher, the checkpoint record, error classes.
//! - [`acknowledge`]: marks published rows sent (or deletes them); the
//!   replication slot is confirmed after that.
//! - [`relay`]: the loop tying them together: `relay::run(setup, metrics, shutdown)`.
//! - [`relays`]: one relay per outbox of the config, side by side in one
//!   process, none stalling another.
//!
//! Around it:
//!
//! - [`config`]: the YAML file plus `OUTBOXD__…` overrides, its own keys checked.
//! - [`setup`]: the config checked as a whole, and the table, router and
//!   connection options every command takes.
//! - [`shutdown`]: the request to stop, as every task waits on it.
//! - [`postgres`]: Postgres facts every stage shares, below them all: WAL
//!   positions, the settled WAL position, `created_at` text.
//! - [`table`]: the outbox table contract and the SQL built from it.
//! - [`insert_only`]: why outbox rows are insert-only, and the guard
//!   triggers that refuse changing one before the relay publishes it.
//! - [`schema`]: what the live database says about that table.
//! - [`leader`]: the advisory lock that makes one instance per outbox table publish.
//! - [`retention`]: deletes rows published longer ago than `relay.retention`,
//!   and for a [`partitions`]ed table creates partitions ahead and drops old ones.
//! - [`metrics`], [`lag`], [`http`]: the figures an operator watches, the
//!   task that samples the lag, and `/metrics`, `/healthz`, `/readyz`.
//! - [`migrate`], [`check`], [`status`], [`dead_letters`]: the CLI's set-up,
//!   preflight, lag and dead-letter commands; [`replay_record`], the table
//!   that makes a dead letter's replay happen once.
//! - [`logging`]: human or JSON logs through `tracing`.
//! - [`error`]: one error type, sorted by what to do about it, with its cause.
//! - [`failpoint`]: named kill points for the fault-injection suite.
//!
//! The exactly-once argument lives in [`kafka::checkpoint`].

pub mod acknowledge;
pub mod batch;
pub mod capture;
pub mod check;
pub mod config;
pub mod dead_letters;
pub mod error;
pub mod event;
pub mod failpoint;
pub mod http;
pub mod insert_only;
pub mod kafka;
pub mod lag;
pub mod leader;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod partitions;
pub mod postgres;
pub mod registry;
pub mod relay;
pub mod relays;
pub mod replay_record;
pub mod retention;
pub mod routing;
pub mod schema;
pub mod setup;
pub mod shutdown;
pub mod status;
pub mod table;

pub use config::Config;
pub use error::{Cause, Error, ErrorKind};
