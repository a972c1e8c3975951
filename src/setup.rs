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

use crate::config::outboxes::{check_distinct, Distinct, OUTBOXES_KEY};
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

    /// Reads and checks `file` listing one outbox or several (`outboxes:`):
    /// each a whole [`Setup`], and no two sharing a name, or a table, slot
    /// or publication in one database.
    pub fn load_all(file: &Path) -> Result<Vec<Setup>, ConfigError> {
        let error = |message: String| ConfigError {
            file: file.to_path_buf(),
            message,
        };
        let configs = Config::load_all(file)?;
        let several = configs.len() > 1;
        let mut setups = Vec::with_capacity(configs.len());
        for (index, config) in configs.into_iter().enumerate() {
            let name = config.relay.name.clone();
            let setup = Setup::new(config).map_err(|message| {
                error(if several {
                    format!("{OUTBOXES_KEY}[{index}] ({name}): {message}")
                } else {
                    message
                })
            })?;
            setups.push(setup);
        }
        let distinct: Vec<Distinct> = setups.iter().map(Setup::distinct).collect();
        check_distinct(&distinct).map_err(error)?;
        Ok(setups)
    }

    /// The names no other outbox of the file may share.
    fn distinct(&self) -> Distinct {
        let options = &self.connect_options;
        Distinct {
            name: self.config.relay.name.clone(),
            server: format!("{}:{}", options.get_host(), options.get_port()),
            // Without a database in the URL, Postgres takes the user's name.
            database: options
                .get_database()
                .unwrap_or(options.get_username())
                .to_string(),
            source: self.config.source_name(&self.table.display_name()),
            slot: self.config.slot_name(),
            publication: self.config.postgres.publication.clone(),
            emit_function: self.config.messages().then(|| {
                format!(
                    "{}.{}",
                    self.table.schema,
                    crate::capture::message_encoding::EMIT_FUNCTION
                )
            }),
        }
    }

    /// The outbox's name: its `relay.name`.
    pub fn name(&self) -> &str {
        &self.config.relay.name
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
