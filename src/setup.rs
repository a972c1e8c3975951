//! The relay's set-up: a loaded config checked as a whole and turned into
//! the values every command works with (the table, the router, the
//! connection options).
//!
//! Invariant: a [`Setup`] that exists is valid: on top of the file's own
//! checks (`config`), every name, template and property the rest of the
//! relay judges has passed, with the key and the file in any error. `run`,
//! `check`, `status`, `migrate` and `dead-letters` all start from one, so
//! none of them re-derives or re-checks what another already did.

use std::path::Path;

use sqlx::postgres::PgConnectOptions;

use crate::config::{Config, ConfigError};
use crate::routing::{validate_topic_name, Router};
use crate::table::OutboxTable;

pub struct Setup {
    pub config: Config,
    pub table: OutboxTable,
    pub router: Router,
    /// `postgres.url`, with the relay's `application_name`.
    pub connect_options: PgConnectOptions,
}

impl Setup {
    /// Reads and checks `file` (with `OUTBOXD__…` overrides).
    pub fn load(file: &Path) -> Result<Setup, ConfigError> {
        let config = Config::load(file)?;
        Setup::new(config).map_err(|message| ConfigError {
            file: file.to_path_buf(),
            message,
        })
    }

    /// Checks a config already loaded; the error starts with the key.
    pub fn new(config: Config) -> Result<Setup, String> {
        let table =
            OutboxTable::from_config(&config.postgres).map_err(|e| format!("postgres.{e}"))?;
        if let Some(partitioning) = &table.partitioning {
            crate::partitions::validate(partitioning, &table)?;
        }
        validate_topic_name(&config.kafka.checkpoint_topic)
            .map_err(|e| format!("kafka.checkpoint_topic: {e}"))?;
        if let Some(previous) = &config.kafka.previous_checkpoint_topic {
            validate_topic_name(previous)
                .map_err(|e| format!("kafka.previous_checkpoint_topic: {e}"))?;
        }
        if let Some(key) = config
            .kafka
            .properties
            .keys()
            .find(|key| crate::kafka::is_managed_property(key))
        {
            return Err(format!(
                "kafka.properties.{key}: outboxd sets this itself to keep exactly-once; remove it"
            ));
        }
        let router = Router::new(&config.routing, config.kafka.max_message_bytes)?;
        let connect_options: PgConnectOptions = config
            .postgres
            .url
            .parse()
            .map_err(|e| format!("postgres.url: not a valid Postgres URL ({e})"))?;
        let connect_options =
            connect_options.application_name(&format!("outboxd-{}", config.relay.name));
        Ok(Setup {
            config,
            table,
            router,
            connect_options,
        })
    }
}
