//! One config file listing several test envs' outboxes (`outboxes:`), so
//! one relay process serves them all.
//!
//! Invariant: each outbox in the file is exactly its env's own config (its
//! relay name, database, checkpoint topic, capture mode and topics), so
//! every env's checks (`wait_all_sent`, the checker) hold for it unchanged.

use std::path::PathBuf;

use super::TestEnv;

/// Writes the file and returns its path. `kafka_extra` are YAML lines
/// under the shared `kafka:` section (indented two spaces).
pub fn write_config(envs: &[&TestEnv], kafka_extra: &str) -> PathBuf {
    let first = envs.first().expect("at least one env");
    let entries: Vec<String> = envs.iter().map(|env| outbox_entry(env, "")).collect();
    write_config_of(first, &entries, kafka_extra)
}

/// Like `write_config`, with the `outboxes:` entries given (each from
/// `outbox_entry`, or written by the test); `first` names the file and
/// gives the broker.
pub fn write_config_of(first: &TestEnv, entries: &[String], kafka_extra: &str) -> PathBuf {
    let mut yaml = format!(
        "kafka:\n  bootstrap_servers: {kafka}\n  transaction_timeout: 20s\n{kafka_extra}\
         capture:\n  batch_size: 100\n  poll_interval: 200ms\n\
         log:\n  level: info,librdkafka=warn,rdkafka=warn\n\
         http:\n  listen: 127.0.0.1:0\n\
         outboxes:\n",
        kafka = first.kafka,
    );
    for entry in entries {
        yaml.push_str(entry);
    }
    let path = std::env::temp_dir().join(format!("outboxd-several-{}.yaml", first.id));
    std::fs::write(&path, yaml).expect("write the several-outboxes config");
    path
}

/// One env as an entry of `outboxes:`; `relay_lines` go under its own
/// `relay:` (indented six spaces), none when empty. The env's own extra
/// `postgres` and `capture` keys (a partitioned table, a message outbox)
/// come along.
pub fn outbox_entry(env: &TestEnv, relay_lines: &str) -> String {
    let relay = match relay_lines.is_empty() {
        true => String::new(),
        false => format!("    relay:\n{relay_lines}"),
    };
    format!(
        "  - name: {name}\n{relay}\
         \x20   postgres:\n      url: \"{url}\"\n{postgres_extra}\
         \x20   kafka:\n      checkpoint_topic: {checkpoint_topic}\n\
         \x20   capture:\n      mode: {mode}\n{capture_extra}\
         \x20   routing:\n      topic: \"{prefix}.${{aggregatetype}}\"\n      dead_letter_topic: {prefix}.dlq\n",
        name = env.relay_name(),
        url = env.database_url,
        postgres_extra = indent_under_entry(&env.postgres_extra),
        checkpoint_topic = env.checkpoint_topic(),
        mode = env.mode.config_value(),
        capture_extra = indent_under_entry(&env.capture_extra),
        prefix = env.topic_prefix(),
    )
}

/// Lines written for a section of a one-outbox file (two spaces in) as
/// lines of the same section inside an entry of `outboxes:` (six).
fn indent_under_entry(lines: &str) -> String {
    lines.lines().map(|line| format!("    {line}\n")).collect()
}
