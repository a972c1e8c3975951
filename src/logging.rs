//! Logs through `tracing`: human lines for a terminal, JSON for a pipeline.
//!
//! Invariant: set up once, before anything logs; `RUST_LOG` overrides the
//! configured level so an operator can turn on debug without editing files.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests running relays in one process) keeps the first.
    drop(result);
}
