//! Change capture: services keep writing SQL to their own tables, jetsync publishes the changes.
//!
//! **Install** (`jetsync-applier capture install`, [`install`]): for every table with
//! `capture = true`, triggers on INSERT, UPDATE and DELETE write the full row image after the
//! change (the key alone for a delete; a delete of the old key first when an UPDATE changes the
//! key) into the outbox table `jetsync_outbox`, in the same local transaction as the change.
//! SQLite (`sqlite.rs`): the file of `sink.path`; Postgres (`postgres.rs`): the sink's schema.
//!
//! **No echo.** The applier's own writes are never captured: on SQLite every sink transaction
//! holds a row in `jetsync_capture_applying` while it runs (never committed, so no other
//! connection sees it) and the triggers fire only `WHEN NOT EXISTS` such a row; on Postgres
//! every sink session starts with `jetsync.applying = on` and the trigger fires only when that
//! setting is not `on`.
//!
//! **Relay** (`relay.rs`, a task of `run`): reads the committed outbox rows, publishes one
//! local transaction as one atomic transaction (nats-server 2.12.1+), every entry with message
//! id `<instance>-<outbox id>`, and deletes entries only after the server acknowledged them.
//! Local transaction identity:
//! - Postgres: the transaction id (`txid_current()`), groups ordered by their highest outbox
//!   id; every cycle scans what is left, never a high-water mark.
//! - SQLite gives triggers no transaction id. SQLite runs one writer at a time, so the relay, in
//!   one short write transaction per cycle, assigns every committed, unassigned outbox row to a
//!   publish batch (column `batch` = the batch's first id) before publishing, split at the
//!   commit boundaries its watcher saw (`commits.rs`): local transactions committed too close
//!   together to tell apart (or more than four waiting at once) become
//!   one atomic transaction, a superset, so no reader anywhere sees part of one. A commit of
//!   more than [`jetsync::MAX_TRANSACTION_ROWS`] rows is split into several batches with a WARN
//!   (this happens after the relay was not running while the service wrote).
//!
//! A batch of one change is published as a plain message (one message is stored whole or not
//! at all); only batches of several changes need the server's atomic batches.
//!
//! **Pending local changes** (`pending.rs`, table `jetsync_capture_pending`): the origin never
//! applies a change of a row over a newer local change of that row that has not come back
//! through the stream yet.
//!
//! Batches are written down before they are published, so a relay killed between publish and
//! delete republishes exactly the same batches with the same message ids, which the server
//! drops as duplicates within the stream's duplicate window.

mod commits;
mod image;
pub mod pending;
mod postgres;
mod relay;
mod sqlite;
mod stats;

use jetsync::{Config, SinkKind};

pub use relay::{check_server, Relay};
pub use stats::{CaptureSnapshot, CaptureStats};

/// The outbox table, in the sink's database (SQLite file or Postgres schema).
pub const OUTBOX_TABLE: &str = "jetsync_outbox";

/// Everything capture can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// A configuration problem; the message starts with the key to fix.
    #[error("{key}: {reason}")]
    Config {
        /// The configuration key (`tables.products.capture`, `capture.atomic`, ...).
        key: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A captured table's schema no longer matches its triggers in a way capture cannot follow
    /// by itself (a column went away, the table is gone): run `capture install` again.
    #[error("capture: {0}")]
    Schema(String),
    /// The database could not be read or written (retried by the relay).
    #[error("capture: {0}")]
    Database(String),
    /// Publishing failed.
    #[error("capture: publishing: {0}")]
    Publish(#[from] jetsync::Error),
    /// A row the relay must update is locked by a service transaction still open (Postgres):
    /// the relay gave up its own transaction rather than wait while holding locks, and tries
    /// again shortly (see `postgres.rs`).
    #[error("capture: {0}")]
    Busy(String),
}

/// What `capture install` or `capture remove` did, one line per table (plus the outbox).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CaptureReport {
    /// Where the outbox lives (`/path/db.sqlite` or `schema.jetsync_outbox`).
    pub outbox: String,
    /// One entry per table acted on.
    pub tables: Vec<TableAction>,
    /// Rows waiting in the outbox now.
    pub backlog: u64,
    /// What happens next, when there is something to say.
    pub note: Option<String>,
}

/// What was done to one table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableAction {
    /// The table.
    pub table: String,
    /// `installed`, `reinstalled`, `removed` or `not installed`.
    pub action: String,
    /// The columns the triggers capture (SQLite; empty for Postgres, which captures every
    /// column of the row as it is at the time of the change).
    pub columns: Vec<String>,
}

impl CaptureReport {
    /// The human-readable rendering.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            out += &format!("{}: {}", t.table, t.action);
            if !t.columns.is_empty() {
                out += &format!(" (columns {})", t.columns.join(", "));
            }
            out.push('\n');
        }
        out += &format!(
            "outbox {}: {} row{} waiting",
            self.outbox,
            self.backlog,
            if self.backlog == 1 { "" } else { "s" }
        );
        if let Some(note) = &self.note {
            out += &format!("\n{note}");
        }
        out
    }
}

/// The captured tables with their key columns.
fn captured(config: &Config) -> Vec<(String, String)> {
    config
        .tables
        .iter()
        .filter(|(_, t)| t.capture)
        .map(|(name, t)| (name.clone(), t.key.clone()))
        .collect()
}

/// Installs (or replaces) the outbox and the triggers of every table with `capture = true`,
/// and drops the triggers of tables that no longer have it. Idempotent.
///
/// With no table captured it only drops stale triggers and says so.
pub async fn install(config: &Config) -> Result<CaptureReport, CaptureError> {
    install_with(config, false).await
}

/// [`install`], and with `backfill` also queues every current row of the captured tables as an
/// upsert (in the same database transaction as the triggers), so that rows written before
/// capture was installed are published too (`capture install --backfill`).
pub async fn install_with(config: &Config, backfill: bool) -> Result<CaptureReport, CaptureError> {
    let tables = captured(config);
    let mut report = match config.sink.kind {
        SinkKind::Sqlite => {
            let path = sqlite::sink_path(config);
            let list = tables.clone();
            tokio::task::spawn_blocking(move || sqlite::install(&path, &list, backfill))
                .await
                .map_err(|e| CaptureError::Database(e.to_string()))??
        }
        SinkKind::Postgres => postgres::install(config, &tables, backfill).await?,
        SinkKind::Redb if tables.is_empty() => CaptureReport {
            outbox: "(none: the redb sink has no SQL writers to capture)".into(),
            ..CaptureReport::default()
        },
        SinkKind::Redb => return Err(unsupported_sink()),
    };
    if tables.is_empty() {
        report.note = Some(
            "no table has capture = true: nothing installed (set capture = true under \
             [tables.<name>] to capture a table)"
                .into(),
        );
    } else {
        report.note = Some(
            "the service's changes to these tables are captured from now on and published by \
             `jetsync-applier run`; rows written before are not, unless installed with \
             --backfill (see Capture in the README)"
                .into(),
        );
    }
    Ok(report)
}

/// Drops every capture trigger (of every table, captured in the configuration or not). The
/// outbox table and the rows in it stay: the next `run` with capture publishes them.
pub async fn remove(config: &Config) -> Result<CaptureReport, CaptureError> {
    let mut report = match config.sink.kind {
        SinkKind::Sqlite => {
            let path = sqlite::sink_path(config);
            tokio::task::spawn_blocking(move || sqlite::remove(&path))
                .await
                .map_err(|e| CaptureError::Database(e.to_string()))??
        }
        SinkKind::Postgres => postgres::remove(config).await?,
        SinkKind::Redb => return Err(unsupported_sink()),
    };
    if report.tables.is_empty() {
        report.note = Some("no capture triggers were installed".into());
    }
    if report.backlog > 0 {
        report.note = Some(format!(
            "changes are no longer captured. The {} row(s) already in the outbox stay there: \
             a running `run` keeps publishing them (as does the next `run` while some table has \
             capture = true); to discard them instead, delete the rows of {OUTBOX_TABLE}",
            report.backlog
        ));
    }
    Ok(report)
}

/// What `status` reports about capture.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaptureStatus {
    /// Rows in the outbox now (captured, not yet acknowledged by the server).
    pub backlog: u64,
    /// Outbox entries published over the instance's life (kept in the outbox database).
    pub published: u64,
    /// The captured tables.
    pub tables: Vec<String>,
    /// Why the outbox could not be read, when it could not.
    pub error: Option<String>,
}

/// The capture status of the instance, `None` when no table is captured. Reads the outbox
/// database (works while `run` runs).
pub async fn status(config: &Config) -> Option<CaptureStatus> {
    let tables: Vec<String> = captured(config).into_iter().map(|(t, _)| t).collect();
    if tables.is_empty() {
        return None;
    }
    let counts = match config.sink.kind {
        SinkKind::Sqlite => {
            let path = sqlite::sink_path(config);
            tokio::task::spawn_blocking(move || sqlite::counts(&path))
                .await
                .map_err(|e| CaptureError::Database(e.to_string()))
                .and_then(|r| r)
        }
        SinkKind::Postgres => postgres::counts(config).await,
        SinkKind::Redb => Err(unsupported_sink()),
    };
    Some(match counts {
        Ok((backlog, published)) => CaptureStatus {
            backlog,
            published,
            tables,
            error: None,
        },
        Err(e) => CaptureStatus {
            backlog: 0,
            published: 0,
            tables,
            error: Some(e.to_string()),
        },
    })
}

fn unsupported_sink() -> CaptureError {
    CaptureError::Config {
        key: "sink.kind".into(),
        reason: "capture works with the sqlite and postgres sinks only".into(),
    }
}

/// One outbox entry, ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// The outbox id (message id `<instance>-<id>`).
    pub id: i64,
    /// The table.
    pub table: String,
    /// The row key, as the subject carries it.
    pub key: String,
    /// The change.
    pub change: jetsync::Change,
}

/// Outbox entries published as one atomic transaction.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Batch {
    /// The batch's first outbox id.
    pub id: i64,
    /// Its entries, in outbox id order.
    pub entries: Vec<Entry>,
    /// Entries that cannot be published (a key that is neither text nor an integer, a row
    /// image that does not decode): logged and deleted with the batch.
    pub unpublishable: Vec<(i64, String)>,
}

/// What the server acknowledged for one published outbox entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ack {
    /// The outbox id.
    pub id: i64,
    /// The stream sequence the entry is stored at (or an upper bound within its own atomic
    /// batch); `None` when unknown (a duplicate whose sequence the server no longer tells, or
    /// an entry that was not published): its pending entry is then dropped.
    pub seq: Option<u64>,
}
