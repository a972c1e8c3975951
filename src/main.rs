//! The `outboxd` command: thin clap glue over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outboxd::check::Status;
use outboxd::setup::Setup;
use outboxd::{http, logging, migrate, relays, status};

const EXAMPLES: &str = "\
Examples:
  outboxd check   --config /etc/outboxd/outboxd.yaml   # can it run? what is missing?
  outboxd migrate --config /etc/outboxd/outboxd.yaml   # create the outbox table (idempotent)
  outboxd migrate --config outboxd.yaml --print        # show the SQL instead
  outboxd run     --config /etc/outboxd/outboxd.yaml   # relay until SIGTERM
  outboxd status  --config /etc/outboxd/outboxd.yaml   # how far behind is it? (--json)
  OUTBOXD__KAFKA__BOOTSTRAP_SERVERS=kafka:9092 outboxd run --config outboxd.yaml

Every config key can be overridden from the environment as OUTBOXD__SECTION__KEY.";

#[derive(Parser)]
#[command(name = "outboxd", version, about = "Publishes PostgreSQL outbox rows to Kafka exactly once", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Relay outbox rows to Kafka until SIGTERM or Ctrl-C.
    Run {
        /// The YAML config file.
        #[arg(long, short, env = "OUTBOXD_CONFIG")]
        config: PathBuf,
    },
    /// Create the outbox table, index, notify trigger, insert-only guard, replay record and publication (idempotent).
    Migrate {
        #[arg(long, short, env = "OUTBOXD_CONFIG")]
        config: PathBuf,
        /// Print the SQL for this config instead of applying it.
        #[arg(long)]
        print: bool,
    },
    /// Validate the config, connect to Postgres and Kafka, report what is missing.
    Check {
        #[arg(long, short, env = "OUTBOXD_CONFIG")]
        config: PathBuf,
    },
    /// Show the lag: pending rows, oldest unsent age, slot, last checkpoint, leader.
    Status {
        #[arg(long, short, env = "OUTBOXD_CONFIG")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the rows the relay dead-lettered, or put them back in the outbox.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Reason, seq, id, type, aggregate and age of each dead-lettered row.
    List {
        #[arg(long, short, env = "OUTBOXD_CONFIG")]
        config: PathBuf,
        /// Which outbox, when the config lists several (its `name`).
        #[arg(long)]
        outbox: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Insert dead-lettered rows again as new unsent rows (same event id),
    /// so the relay publishes them once the cause is fixed.
    Replay {
        #[arg(long, short, env = "OUTBOXD_CONFIG")]
        config: PathBuf,
        /// Which outbox, when the config lists several (its `name`).
        #[arg(long)]
        outbox: Option<String>,
        /// One row, by its seq.
        #[arg(long, conflicts_with_all = ["from", "all"])]
        seq: Option<i64>,
        /// The first seq of a range (with --to).
        #[arg(long, requires = "to", conflicts_with = "all")]
        from: Option<i64>,
        /// The last seq of a range (with --from).
        #[arg(long, requires = "from")]
        to: Option<i64>,
        /// Every dead-lettered row of the table.
        #[arg(long)]
        all: bool,
    },
}

impl DeadLetterAction {
    fn outbox(&self) -> Option<&str> {
        match self {
            DeadLetterAction::List { outbox, .. } | DeadLetterAction::Replay { outbox, .. } => {
                outbox.as_deref()
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_path = match &cli.command {
        Command::Run { config }
        | Command::Migrate { config, .. }
        | Command::Check { config }
        | Command::Status { config, .. }
        | Command::DeadLetters {
            action: DeadLetterAction::List { config, .. } | DeadLetterAction::Replay { config, .. },
        } => config.clone(),
    };
    let setups = match Setup::load_all(&config_path) {
        Ok(setups) => setups,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    // `log` and `http` are the process's: every outbox has the file's.
    logging::init(&setups[0].config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run { .. } => run(setups).await,
            Command::Migrate { print, .. } => {
                // Printed SQL stays SQL: its headings are comments.
                let heading = if print { "-- " } else { "" };
                for_each_outbox(setups, heading, |setup| migrate_command(setup, print)).await
            }
            Command::Check { .. } => for_each_outbox(setups, "", check).await,
            Command::Status { json: true, .. } => status_json(setups).await,
            Command::Status { .. } => {
                for_each_outbox(setups, "", |setup| status_command(setup, false)).await
            }
            Command::DeadLetters { action } => match one_outbox(setups, action.outbox()) {
                Ok(setup) => dead_letters_command(setup, action).await,
                Err(message) => {
                    eprintln!("error: {message}");
                    ExitCode::from(2)
                }
            },
        }
    });
    // A librdkafka call the relay gave up on (kafka::publisher) may still
    // hold a blocking thread; its session already ended and settled, so the
    // exit must not wait for it.
    runtime.shutdown_timeout(EXIT_WAIT);
    code
}

/// How long the exit waits for blocking tasks still running.
const EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `command` on each outbox of the config in turn, under a heading
/// naming it (after `heading_prefix`) when there are several; fails if any
/// failed.
async fn for_each_outbox<F, Fut>(setups: Vec<Setup>, heading_prefix: &str, command: F) -> ExitCode
where
    F: Fn(Setup) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let several = setups.len() > 1;
    let mut failed = Vec::new();
    for setup in setups {
        let name = setup.name().to_string();
        if several {
            println!("{heading_prefix}== outbox {name} ==");
        }
        if command(setup).await != ExitCode::SUCCESS {
            failed.push(name);
        }
        if several {
            println!();
        }
    }
    match failed.is_empty() {
        true => ExitCode::SUCCESS,
        false if several => {
            println!(
                "{heading_prefix}failed for outbox(es): {}",
                failed.join(", ")
            );
            ExitCode::FAILURE
        }
        false => ExitCode::FAILURE,
    }
}

/// The outbox a command about one outbox's rows works on: `--outbox`, or
/// the only one.
fn one_outbox(setups: Vec<Setup>, name: Option<&str>) -> Result<Setup, String> {
    let names: Vec<String> = setups.iter().map(|s| s.name().to_string()).collect();
    match name {
        Some(name) => setups
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| {
                format!(
                    "--outbox {name}: no outbox of that name in the config; it has {}",
                    names.join(", ")
                )
            }),
        None if setups.len() == 1 => Ok(setups.into_iter().next().expect("one outbox")),
        None => Err(format!(
            "the config lists {} outboxes; say which with --outbox ({})",
            names.len(),
            names.join(", ")
        )),
    }
}

async fn run(setups: Vec<Setup>) -> ExitCode {
    let config = &setups[0].config;
    if let Err(error) = outboxd::failpoint::announce() {
        eprintln!("error: {error}");
        return ExitCode::from(2);
    }
    // Install the handlers before any work starts, so a SIGTERM that arrives
    // early is a graceful stop too, never the default abrupt exit.
    let shutdown = match shutdown_signal() {
        Ok(shutdown) => shutdown,
        Err(error) => {
            eprintln!("error: cannot install signal handlers: {error}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = relays::metrics_for(&setups);
    let listener = match http::bind(config.http.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        listen = %config.http.listen,
        "serving /metrics, /healthz and /readyz"
    );
    // Served until the process exits, so the last state stays visible.
    tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        std::future::pending(),
    ));
    if setups.len() > 1 {
        let names: Vec<&str> = setups.iter().map(|s| s.name()).collect();
        tracing::info!(
            outboxes = %names.join(", "),
            "relaying {} outboxes, each with its own connections, slot, leader lock and producer",
            names.len()
        );
    }
    let several = setups.len() > 1;
    let stopped = relays::run(setups, metrics, shutdown).await;
    for (name, error) in &stopped {
        if several {
            eprintln!("error: relay of outbox `{name}` stopped: {error}");
        } else {
            tracing::error!(kind = ?error.kind, "relay stopped: {error}");
            eprintln!("error: relay stopped: {error}");
        }
    }
    match stopped.is_empty() {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    }
}

async fn migrate_command(setup: Setup, print: bool) -> ExitCode {
    if setup.config.messages() {
        return migrate_messages_command(setup, print).await;
    }
    if print {
        let postgres = &setup.config.postgres;
        print!(
            "{}",
            migrate::render(
                &setup.table,
                &postgres.notify_channel,
                &postgres.publication
            )
        );
        return ExitCode::SUCCESS;
    }
    match migrate::apply(&setup).await {
        Ok(table) => {
            println!("migrated: outbox table {} is ready", table.display_name());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: migration failed: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `capture.source: messages`: the helper function, the publication and
/// the slot instead of a table.
async fn migrate_messages_command(setup: Setup, print: bool) -> ExitCode {
    if print {
        print!(
            "{}",
            migrate::render_messages(&setup.config, &setup.table.schema)
        );
        return ExitCode::SUCCESS;
    }
    match migrate::apply_messages(&setup).await {
        Ok(summary) => {
            println!("migrated: {summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: migration failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn check(setup: Setup) -> ExitCode {
    let findings = outboxd::check::run(&setup).await;
    for finding in &findings {
        println!("{finding}");
    }
    let failed = findings
        .iter()
        .filter(|f| f.status == Status::Failed)
        .count();
    if failed > 0 {
        println!("{failed} check(s) failed: the relay cannot run with this setup");
        ExitCode::FAILURE
    } else {
        println!("all checks passed");
        ExitCode::SUCCESS
    }
}

/// `status --json`: one object for one outbox (as always), a list for several.
async fn status_json(setups: Vec<Setup>) -> ExitCode {
    if setups.len() == 1 {
        return status_command(setups.into_iter().next().expect("one outbox"), true).await;
    }
    let mut statuses = Vec::new();
    let mut failed = false;
    for setup in &setups {
        match status::read(setup).await {
            Ok(status) => statuses.push(serde_json::to_value(&status).unwrap_or_default()),
            Err(error) => {
                failed = true;
                statuses.push(serde_json::json!({
                    "relay": setup.name(),
                    "error": error.to_string(),
                }));
            }
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&statuses).unwrap_or_default()
    );
    match failed {
        true => ExitCode::FAILURE,
        false => ExitCode::SUCCESS,
    }
}

async fn status_command(setup: Setup, json: bool) -> ExitCode {
    match status::read(&setup).await {
        Ok(status) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&status).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(status) => {
            print!("{status}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn dead_letters_command(setup: Setup, action: DeadLetterAction) -> ExitCode {
    use outboxd::dead_letters::{self, Selection};
    if setup.config.messages() {
        // Both commands read and write the outbox table, which a message
        // outbox does not have.
        eprintln!(
            "error: capture.source is messages: dead letters have no row to list or put back. \
             Read the dead-letter topic `{}` (each record carries the reason and the content), \
             and emit an event again with {}()",
            setup.config.routing.dead_letter_topic,
            outboxd::capture::message_encoding::EMIT_FUNCTION
        );
        return ExitCode::FAILURE;
    }
    match action {
        DeadLetterAction::List { json, .. } => match dead_letters::list(&setup).await {
            Ok(listing) if json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&listing).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Ok(listing) => {
                println!(
                    "{} dead-lettered row(s) of this table in {}",
                    listing.dead_letters.len(),
                    listing.topic
                );
                for d in &listing.dead_letters {
                    println!(
                        "seq {}  id {}  {} {}  aggregate {}  {}s ago\n    reason: {}",
                        d.seq,
                        d.id,
                        d.aggregate_type,
                        d.event_type,
                        d.key.as_deref().unwrap_or("-"),
                        d.age_seconds,
                        d.reason
                    );
                }
                if listing.left_out > 0 {
                    println!(
                        "({} record(s) left out: other tables' dead letters, or rows no longer in this table)",
                        listing.left_out
                    );
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        },
        DeadLetterAction::Replay {
            seq, from, to, all, ..
        } => {
            let selection = match (seq, from, to, all) {
                (Some(seq), _, _, _) => Selection::One(seq),
                (_, Some(from), Some(to), _) => Selection::Range { from, to },
                (_, _, _, true) => Selection::All,
                _ => {
                    eprintln!("error: say which rows: --seq N, --from A --to B, or --all");
                    return ExitCode::from(2);
                }
            };
            match dead_letters::replay(&setup, selection).await {
                Ok(replayed) if replayed.is_empty() => {
                    println!("no dead-lettered row of this table matches; see `outboxd dead-letters list`");
                    ExitCode::FAILURE
                }
                Ok(replayed) => {
                    for r in &replayed {
                        match r.new_seq {
                            Some(new_seq) => println!(
                                "seq {} (id {}) re-inserted as seq {new_seq}; the relay publishes it",
                                r.seq, r.id
                            ),
                            None => println!(
                                "seq {} (id {}) was replayed before; not inserted again",
                                r.seq, r.id
                            ),
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A future that resolves on SIGTERM (what orchestrators send) or Ctrl-C.
/// The handlers are registered when this function returns, not when the
/// future is first polled.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received; stopping"),
            _ = interrupt.recv() => tracing::info!("SIGINT received; stopping"),
        }
    })
}
