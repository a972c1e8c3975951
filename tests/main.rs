//! Integration tests against a real PostgreSQL and a real Apache Kafka
//! broker, started by `make test` (deploy/local/stack.sh). Each test gets its
//! own database, relay name and topics, so tests run in parallel.

#[macro_use]
mod support;

mod aggregate_order;
mod claim_connections;
mod cli;
mod cloudevents;
mod crash;
mod dead_letters;
mod exactly_once;
mod failover;
mod handoffs;
mod insert_only;
mod large_payloads;
mod leader;
mod least_privilege;
mod missing_topics;
mod operations;
mod partitioned_table;
mod partitioning;
mod poison;
mod prometheus;
mod replication;
mod retention;
mod reused_seqs;
mod schema_registry;
mod several_adversary;
mod several_outboxes;
mod shared_checkpoints;
mod shipped_examples;
mod tls;
mod unmarked;
mod wal_messages;
