//! Command-line interface: argument parsing, configuration loading, exit codes.
//!
//! Exit codes (DESIGN 7): 0 ok, 1 runtime failure, 2 usage or configuration error.

mod commands;
mod output;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

/// Keep every instance's database in sync through NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "jetsync-applier", version, about, propagate_version = true)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub(crate) struct Global {
    /// Configuration file (TOML); JETSYNC_* environment variables override it.
    #[arg(long, short = 'c', global = true, env = "JETSYNC_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Output options. `--json` is per command rather than global because `publish` uses
/// `--json ROW` for the row itself (its machine-readable output is `--json-output`).
#[derive(Debug, Args, Clone, Copy)]
pub(crate) struct Output {
    /// Machine-readable JSON output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the applier until SIGINT/SIGTERM (finishes the batch in hand, then exits 0).
    Run {
        #[command(flatten)]
        out: Output,
    },
    /// Applied sequence, stream position, lag and consumer state (works while `run` runs).
    Status {
        #[command(flatten)]
        out: Output,
    },
    /// Create or update the sync group's stream.
    Provision {
        #[command(flatten)]
        out: Output,
    },
    /// Per-table row count and order-independent hash, plus the applied sequence.
    Digest {
        #[command(flatten)]
        out: Output,
    },
    /// Set the applied sequence (the applier must be stopped); the next run resumes at N + 1.
    Reset {
        /// The new applied sequence.
        #[arg(long = "to-seq", value_name = "N")]
        to_seq: u64,
        #[command(flatten)]
        out: Output,
    },
    /// Rebuild the synced tables from a snapshot of the stream, in one transaction (the applier
    /// must be stopped). Progress is shown on a terminal.
    Resync {
        #[command(flatten)]
        out: Output,
    },
    /// Inspect and resolve parked (poison) events.
    Parked {
        #[command(subcommand)]
        action: ParkedAction,
    },
    /// Publish one row change.
    Publish {
        /// Table name.
        #[arg(long)]
        table: String,
        /// Row key.
        #[arg(long)]
        key: String,
        /// The full row as a JSON object.
        #[arg(
            long,
            value_name = "ROW",
            conflicts_with = "delete",
            required_unless_present = "delete"
        )]
        json: Option<String>,
        /// Publish a delete (tombstone) instead of an upsert.
        #[arg(long)]
        delete: bool,
        /// Idempotency key (Nats-Msg-Id); generated when absent.
        #[arg(long)]
        msg_id: Option<String>,
        /// Machine-readable JSON output.
        #[arg(long)]
        json_output: bool,
    },
    /// Print events as they arrive.
    Tail {
        /// Only this table.
        #[arg(long)]
        table: Option<String>,
        /// Start from the beginning of the stream instead of new events only.
        #[arg(long)]
        all: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object per event.
        #[command(flatten)]
        out: Output,
    },
}

/// `parked` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum ParkedAction {
    /// List parked events (works while `run` runs).
    List {
        #[command(flatten)]
        out: Output,
    },
    /// Apply parked events again, oldest first per row, after fixing their cause (the applier
    /// must be stopped).
    Retry {
        /// Only this row, as TABLE/KEY (repeatable); default: every row.
        #[arg(long = "row", value_name = "TABLE/KEY")]
        rows: Vec<jetsync_applier::RowId>,
        #[command(flatten)]
        out: Output,
    },
    /// Discard parked events for good (the applier must be stopped).
    Drop {
        /// The rows whose parked events to discard, as TABLE/KEY (repeatable).
        #[arg(
            long = "row",
            value_name = "TABLE/KEY",
            required_unless_present = "all"
        )]
        rows: Vec<jetsync_applier::RowId>,
        /// Discard every parked event.
        #[arg(long, conflicts_with = "rows")]
        all: bool,
        #[command(flatten)]
        out: Output,
    },
}

/// A failure with its exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Command {
    /// Whether the command's output is machine-readable.
    pub(crate) fn json(&self) -> bool {
        match self {
            Command::Run { out }
            | Command::Status { out }
            | Command::Provision { out }
            | Command::Digest { out }
            | Command::Reset { out, .. }
            | Command::Tail { out, .. }
            | Command::Resync { out } => out.json,
            Command::Parked { action } => match action {
                ParkedAction::List { out }
                | ParkedAction::Retry { out, .. }
                | ParkedAction::Drop { out, .. } => out.json,
            },
            Command::Publish { json_output, .. } => *json_output,
        }
    }
}

impl Failure {
    pub(crate) fn usage(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code: 2,
            error: error.into(),
        }
    }
    pub(crate) fn runtime(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code: 1,
            error: error.into(),
        }
    }
}

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.command.json();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if json {
                let body = serde_json::json!({
                    "error": format!("{:#}", failure.error),
                    "exit_code": failure.code,
                });
                eprintln!("{body}");
            } else {
                eprintln!("error: {:#}", failure.error);
            }
            ExitCode::from(failure.code)
        }
    }
}
