//! Command-line interface: argument parsing, configuration loading, exit codes.
//!
//! Exit codes (DESIGN 7): 0 ok, 1 runtime failure, 2 usage or configuration error.

mod commands;
mod output;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

/// What `--version` prints: the version and the wire format this build reads and writes.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (wire format v1: postcard/1, json/1; transactions with nats-server 2.12.1+)"
);

/// Keep every instance's database in sync through NATS JetStream.
#[derive(Debug, Parser)]
#[command(
    name = "jetsync-applier",
    version = VERSION,
    about,
    propagate_version = true,
    after_help = "Examples:\n  jetsync-applier --config jetsync.toml run\n  jetsync-applier --config jetsync.toml status"
)]
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
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml run\n  JETSYNC_NATS__URL=nats://10.0.0.5:4222 jetsync-applier -c jetsync.toml run"
    )]
    Run {
        #[command(flatten)]
        out: Output,
    },
    /// Applied sequence, stream position, lag and consumer state (works while `run` runs).
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml status\n  jetsync-applier --config jetsync.toml status --json"
    )]
    Status {
        #[command(flatten)]
        out: Output,
    },
    /// Create or update the sync group's stream.
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml provision\n  jetsync-applier --config jetsync.toml provision --json"
    )]
    Provision {
        #[command(flatten)]
        out: Output,
    },
    /// Per-table row count and order-independent hash, plus the applied sequence.
    #[command(
        after_help = "Examples:\n  jetsync-applier --config catalog-1.toml digest\n  jetsync-applier --config catalog-2.toml digest --json   # equal at equal applied_seq = converged"
    )]
    Digest {
        #[command(flatten)]
        out: Output,
    },
    /// Set the applied sequence (the applier must be stopped); the next run resumes at N + 1.
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml reset --to-seq 0      # replay everything the stream holds\n  jetsync-applier --config jetsync.toml reset --to-seq 1200"
    )]
    Reset {
        /// The new applied sequence.
        #[arg(long = "to-seq", value_name = "N")]
        to_seq: u64,
        #[command(flatten)]
        out: Output,
    },
    /// Rebuild the synced tables from a snapshot of the stream, in one transaction (the applier
    /// must be stopped). Progress is shown on a terminal.
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml resync\n  jetsync-applier --config jetsync.toml resync --json"
    )]
    Resync {
        #[command(flatten)]
        out: Output,
    },
    /// Inspect and resolve parked (poison) events.
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml parked list\n  jetsync-applier --config jetsync.toml parked retry --row products/A-1"
    )]
    Parked {
        #[command(subcommand)]
        action: ParkedAction,
    },
    /// Publish one row change.
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml publish --table products --key A-1 --json '{\"sku\":\"A-1\",\"price\":12.5}'\n  jetsync-applier --config jetsync.toml publish --table products --key A-1 --delete"
    )]
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
    /// Change capture: triggers that publish what services write straight into their SQL
    /// tables (`[tables.<name>] capture = true`).
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml capture install\n  jetsync-applier --config jetsync.toml capture remove --json"
    )]
    Capture {
        #[command(subcommand)]
        action: CaptureAction,
    },
    /// Every instance of the sync group: applied sequence, lag, parked events, consumer, gap
    /// margin, version, uptime, last error; instances that stopped answering are shown from
    /// their last report. `--digest` also compares their digests at one applied sequence and
    /// exits 1 when one diverged or an instance is missing.
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml fleet\n  jetsync-applier --config jetsync.toml fleet --digest --json"
    )]
    Fleet {
        /// Compare the instances' digests at a common applied sequence (exit 1 on divergence
        /// or a missing instance).
        #[arg(long)]
        digest: bool,
        /// How long to wait for the instances' answers, ms.
        #[arg(long, value_name = "MS", default_value_t = 3000)]
        timeout_ms: u64,
        /// With --digest: how long to wait for every instance to reach the stream's last
        /// sequence, ms.
        #[arg(long, value_name = "MS", default_value_t = 30_000)]
        wait_ms: u64,
        #[command(flatten)]
        out: Output,
    },
    /// Print events as they arrive.
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml tail\n  jetsync-applier --config jetsync.toml tail --all --count 10 --table products --json"
    )]
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
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml parked list\n  jetsync-applier --config jetsync.toml parked list --json"
    )]
    List {
        #[command(flatten)]
        out: Output,
    },
    /// Apply parked events again, oldest first per row and a transaction whole, after fixing
    /// their cause (the applier must be stopped).
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml parked retry\n  jetsync-applier --config jetsync.toml parked retry --row products/A-1 --row orders/o-17"
    )]
    Retry {
        /// Only this row, as TABLE/KEY (repeatable); default: every row.
        #[arg(long = "row", value_name = "TABLE/KEY")]
        rows: Vec<jetsync_applier::RowId>,
        #[command(flatten)]
        out: Output,
    },
    /// Discard parked events for good (the applier must be stopped).
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml parked drop --row products/A-1\n  jetsync-applier --config jetsync.toml parked drop --all"
    )]
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

/// `capture` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum CaptureAction {
    /// Create the outbox (`jetsync_outbox`) and the capture triggers of every table with
    /// `capture = true`, replacing older triggers; drops the triggers of tables no longer
    /// captured. Idempotent; safe while the service and `run` are running.
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml capture install\n  jetsync-applier --config jetsync.toml capture install --backfill   # also publish the rows already there"
    )]
    Install {
        /// Also queue every current row of the captured tables for publishing (rows written
        /// before capture was installed are not captured otherwise).
        #[arg(long)]
        backfill: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Drop every capture trigger. Rows already in the outbox stay there and are published by
    /// the next `run` whose configuration still captures a table (or stay until then).
    #[command(
        after_help = "Examples:\n  jetsync-applier --config jetsync.toml capture remove\n  jetsync-applier --config jetsync.toml capture remove --json"
    )]
    Remove {
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
            | Command::Resync { out }
            | Command::Fleet { out, .. } => out.json,
            Command::Parked { action } => match action {
                ParkedAction::List { out }
                | ParkedAction::Retry { out, .. }
                | ParkedAction::Drop { out, .. } => out.json,
            },
            Command::Capture { action } => match action {
                CaptureAction::Install { out, .. } | CaptureAction::Remove { out } => out.json,
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

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory;

    /// Every command's `--help` ends with real examples, and `--version` names the wire format.
    #[test]
    fn every_command_has_examples() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            let help = cmd
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            if !help.starts_with("Examples:") || !help.contains("jetsync-applier ") {
                missing.push(path.clone());
            }
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "no examples in the help of {missing:?}");
        let version = super::Cli::command().render_version();
        assert!(version.contains("wire format v1"), "{version}");
    }
}
