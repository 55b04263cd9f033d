//! Capture on SQLite: the outbox, the triggers, and the relay's reads and writes of the outbox.
//!
//! Tables (in the sink's file, beside the synced tables):
//! - `jetsync_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, batch, tbl, op, key, row)`: one row
//!   per captured change. AUTOINCREMENT, so an id (and the message id `<instance>-<id>`) is never
//!   reused even after the outbox was emptied. `batch` is NULL until the relay assigns the row
//!   to a publish batch.
//! - `jetsync_capture_tables (tbl, columns)`: the columns each table's triggers capture, so the
//!   relay notices added or removed columns.
//! - `jetsync_capture_state (published)`: entries published over the instance's life.
//! - `jetsync_capture_applying`: the no-echo flag (see the sink's `connection.rs`).

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use jetsync::{Change, Config, MAX_TRANSACTION_ROWS};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::Notify;

use super::{
    commits::{self, Boundaries, Grouping},
    image, Ack, Batch, CaptureError, CaptureReport, Entry, TableAction,
};
use crate::sinks::sql::push_quoted;

/// How long the relay's and install's statements wait for the service's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_millis(2000);

/// Most columns one `json_object` call gets (SQLite's default limit is 127 arguments).
const COLUMNS_PER_CALL: usize = 60;

const CREATE_TABLES: &str = "\
    CREATE TABLE IF NOT EXISTS jetsync_outbox (\
        id INTEGER PRIMARY KEY AUTOINCREMENT, batch INTEGER, tbl TEXT NOT NULL, \
        op TEXT NOT NULL, key, row TEXT); \
    CREATE INDEX IF NOT EXISTS jetsync_outbox_batch ON jetsync_outbox (batch); \
    CREATE TABLE IF NOT EXISTS jetsync_capture_tables (tbl TEXT PRIMARY KEY, columns TEXT NOT NULL); \
    CREATE TABLE IF NOT EXISTS jetsync_capture_state (\
        id INTEGER PRIMARY KEY CHECK (id = 1), published INTEGER NOT NULL); \
    INSERT OR IGNORE INTO jetsync_capture_state (id, published) VALUES (1, 0); \
    CREATE TABLE IF NOT EXISTS jetsync_capture_applying (flag INTEGER); \
    CREATE TABLE IF NOT EXISTS jetsync_capture_pending (\
        tbl TEXT NOT NULL, key TEXT NOT NULL, outbox_id INTEGER NOT NULL, seq INTEGER, \
        PRIMARY KEY (tbl, key)); \
    CREATE INDEX IF NOT EXISTS jetsync_capture_pending_outbox ON jetsync_capture_pending (outbox_id); \
    CREATE INDEX IF NOT EXISTS jetsync_capture_pending_seq ON jetsync_capture_pending (seq)";

/// The SQLite file of the sink.
pub(super) fn sink_path(config: &Config) -> PathBuf {
    config
        .sink_path()
        .unwrap_or_else(|| config.data_dir.join(format!("{}.db", config.instance)))
}

fn db_error(path: &Path, what: &str, e: rusqlite::Error) -> CaptureError {
    CaptureError::Database(format!("{what} {}: {e}", path.display()))
}

/// Opens the file for capture work (creating it and the capture tables when missing).
pub(super) fn open(path: &Path) -> Result<Connection, CaptureError> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(|e| CaptureError::Database(format!("create {}: {e}", parent.display())))?;
        }
    }
    let mut conn = Connection::open(path).map_err(|e| db_error(path, "open", e))?;
    conn.busy_handler(Some(
        crate::sinks::sqlite::busy_wait::<{ BUSY_TIMEOUT.as_millis() as i32 }>,
    ))
    .map_err(|e| db_error(path, "configure", e))?;
    let _: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| db_error(path, "switch to WAL mode", e))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| db_error(path, "configure", e))?;
    conn.execute_batch(CREATE_TABLES)
        .map_err(|e| db_error(path, "create the capture tables in", e))?;
    Ok(conn)
}

fn quoted(name: &str) -> String {
    let mut out = String::new();
    push_quoted(&mut out, name);
    out
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn trigger_name(table: &str, op: &str) -> String {
    format!("jetsync_capture_{table}_{op}")
}

/// The columns of `table`, in declaration order (empty when it does not exist).
fn table_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let names = stmt
        .query_map([table], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(names)
}

/// The JSON image of the row `prefix` (`NEW`) over `columns`.
fn image_sql(prefix: &str, columns: &[String]) -> String {
    let mut chunks = columns.chunks(COLUMNS_PER_CALL);
    let pair = |c: &String| {
        format!(
            "{}, {}",
            literal(c),
            image::sqlite_value_sql(prefix, &quoted(c))
        )
    };
    let first = chunks
        .next()
        .map(|cs| cs.iter().map(pair).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    let mut sql = format!("json_object({first})");
    for chunk in chunks {
        let pairs = chunk
            .iter()
            .map(|c| {
                format!(
                    "{}, {}",
                    literal(&format!("$.{}", quoted(c))),
                    image::sqlite_value_sql(prefix, &quoted(c))
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        sql = format!("json_insert({sql}, {pairs})");
    }
    sql
}

/// The three triggers of `table` (key column `key`, capturing `columns`).
fn trigger_sql(table: &str, key: &str, columns: &[String]) -> String {
    let t = quoted(table);
    let tl = literal(table);
    let k = quoted(key);
    let when = "WHEN NOT EXISTS (SELECT 1 FROM jetsync_capture_applying)";
    let image = image_sql("NEW", columns);
    // The row's pending entry (see `pending.rs`): the outbox id just written, not yet published.
    let pending = |row: &str, filter: &str| {
        format!(
            "INSERT OR REPLACE INTO jetsync_capture_pending (tbl, key, outbox_id, seq) \
             SELECT {tl}, CAST({row}.{k} AS TEXT), (SELECT max(id) FROM jetsync_outbox), NULL{filter};"
        )
    };
    let old_key_moved = format!(" WHERE OLD.{k} IS NOT NEW.{k}");
    format!(
        "CREATE TRIGGER {ins} AFTER INSERT ON {t} {when} BEGIN \
           INSERT INTO jetsync_outbox (tbl, op, key, row) VALUES ({tl}, 'upsert', NEW.{k}, {image}); \
           {pending_new} \
         END; \
         CREATE TRIGGER {upd} AFTER UPDATE ON {t} {when} BEGIN \
           INSERT INTO jetsync_outbox (tbl, op, key) SELECT {tl}, 'delete', OLD.{k} WHERE OLD.{k} IS NOT NEW.{k}; \
           {pending_moved} \
           INSERT INTO jetsync_outbox (tbl, op, key, row) VALUES ({tl}, 'upsert', NEW.{k}, {image}); \
           {pending_new} \
         END; \
         CREATE TRIGGER {del} AFTER DELETE ON {t} {when} BEGIN \
           INSERT INTO jetsync_outbox (tbl, op, key) VALUES ({tl}, 'delete', OLD.{k}); \
           {pending_old} \
         END;",
        pending_new = pending("NEW", ""),
        pending_moved = pending("OLD", &old_key_moved),
        pending_old = pending("OLD", ""),
        ins = quoted(&trigger_name(table, "insert")),
        upd = quoted(&trigger_name(table, "update")),
        del = quoted(&trigger_name(table, "delete")),
    )
}

fn drop_triggers(conn: &Connection, table: &str) -> rusqlite::Result<()> {
    for op in ["insert", "update", "delete"] {
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {}",
            quoted(&trigger_name(table, op))
        ))?;
    }
    Ok(())
}

/// The columns recorded for `table` at its last install, if any.
fn recorded_columns(conn: &Connection, table: &str) -> rusqlite::Result<Option<Vec<String>>> {
    let text: Option<String> = conn
        .query_row(
            "SELECT columns FROM jetsync_capture_tables WHERE tbl = ?1",
            [table],
            |row| row.get(0),
        )
        .optional()?;
    Ok(text.map(|t| serde_json::from_str(&t).unwrap_or_default()))
}

/// Installs the triggers of one table inside the caller's transaction; returns the action.
fn install_table(conn: &Connection, table: &str, key: &str) -> Result<TableAction, String> {
    let columns = table_columns(conn, table).map_err(|e| e.to_string())?;
    if columns.is_empty() {
        return Err(format!(
            "tables.{table}.capture: table `{table}` does not exist in the database; create it \
             first (capture puts triggers on the service's existing tables)"
        ));
    }
    if !columns.iter().any(|c| c == key) {
        return Err(format!(
            "tables.{table}.key: table `{table}` has no column `{key}` (its columns: {})",
            columns.join(", ")
        ));
    }
    let before = recorded_columns(conn, table).map_err(|e| e.to_string())?;
    drop_triggers(conn, table).map_err(|e| e.to_string())?;
    conn.execute_batch(&trigger_sql(table, key, &columns))
        .map_err(|e| format!("create the capture triggers of `{table}`: {e}"))?;
    conn.execute(
        "INSERT INTO jetsync_capture_tables (tbl, columns) VALUES (?1, ?2) \
         ON CONFLICT (tbl) DO UPDATE SET columns = excluded.columns",
        params![table, serde_json::to_string(&columns).unwrap_or_default()],
    )
    .map_err(|e| e.to_string())?;
    Ok(TableAction {
        table: table.to_owned(),
        action: if before.is_some() {
            "reinstalled"
        } else {
            "installed"
        }
        .into(),
        columns,
    })
}

/// Queues an upsert of every current row of `table` (`capture install --backfill`), inside
/// the caller's transaction, with the image the triggers write.
fn queue_every_row(
    conn: &Connection,
    table: &str,
    key: &str,
    columns: &[String],
) -> rusqlite::Result<usize> {
    let t = quoted(table);
    conn.execute(
        &format!(
            "INSERT INTO jetsync_outbox (tbl, op, key, row) SELECT {}, 'upsert', {t}.{}, {} \
             FROM {t} ORDER BY {t}.{}",
            literal(table),
            quoted(key),
            image_sql(&t, columns),
            quoted(key),
        ),
        [],
    )
}

/// Writes the pending entry (`pending.rs`) of every row of `table` in the outbox: its latest
/// outbox id, not yet published.
fn queue_pending(conn: &Connection, table: &str) -> rusqlite::Result<usize> {
    conn.execute(
        "INSERT OR REPLACE INTO jetsync_capture_pending (tbl, key, outbox_id, seq) \
         SELECT tbl, CAST(key AS TEXT), max(id), NULL FROM jetsync_outbox WHERE tbl = ?1 \
         GROUP BY tbl, CAST(key AS TEXT)",
        [table],
    )
}

/// `capture install` on the file at `path`; with `backfill`, every current row of the
/// captured tables is queued as an upsert too, in the same transaction.
pub(super) fn install(
    path: &Path,
    tables: &[(String, String)],
    backfill: bool,
) -> Result<CaptureReport, CaptureError> {
    let conn = open(path)?;
    let run = || -> Result<Vec<TableAction>, CaptureError> {
        conn.execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| db_error(path, "lock", e))?;
        let mut actions = Vec::new();
        for (table, key) in tables {
            let action = install_table(&conn, table, key).map_err(|reason| {
                match reason.split_once(": ") {
                    Some((key, rest)) if key.starts_with("tables.") => CaptureError::Config {
                        key: key.to_owned(),
                        reason: rest.to_owned(),
                    },
                    _ => CaptureError::Database(reason),
                }
            })?;
            if backfill {
                let rows = queue_every_row(&conn, table, key, &action.columns)
                    .map_err(|e| db_error(path, "queue the rows of", e))?;
                queue_pending(&conn, table).map_err(|e| db_error(path, "queue the rows of", e))?;
                let mut action = action;
                action.action += &format!(", {rows} existing row(s) queued (backfill)");
                actions.push(action);
            } else {
                actions.push(action);
            }
        }
        // Tables captured before but not any more.
        let recorded: Vec<String> = conn
            .prepare("SELECT tbl FROM jetsync_capture_tables ORDER BY tbl")
            .and_then(|mut s| {
                s.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| db_error(path, "read", e))?;
        for table in recorded {
            if !tables.iter().any(|(t, _)| *t == table) {
                drop_triggers(&conn, &table).map_err(|e| db_error(path, "drop triggers in", e))?;
                conn.execute(
                    "DELETE FROM jetsync_capture_tables WHERE tbl = ?1",
                    [&table],
                )
                .map_err(|e| db_error(path, "write", e))?;
                actions.push(TableAction {
                    table,
                    action: "removed (no longer capture = true)".into(),
                    columns: Vec::new(),
                });
            }
        }
        conn.execute_batch("COMMIT")
            .map_err(|e| db_error(path, "commit", e))?;
        Ok(actions)
    };
    let actions = run();
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    let tables = actions?;
    let (backlog, _) = counts_on(&conn, path)?;
    Ok(CaptureReport {
        outbox: format!("{} (table {})", path.display(), super::OUTBOX_TABLE),
        tables,
        backlog,
        note: None,
    })
}

/// `capture remove` on the file at `path`: drops every capture trigger; the outbox stays.
pub(super) fn remove(path: &Path) -> Result<CaptureReport, CaptureError> {
    let conn = open(path)?;
    let run = || -> rusqlite::Result<Vec<TableAction>> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let triggers: Vec<(String, String)> = conn
            .prepare(
                "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' \
                 AND name LIKE 'jetsync\\_capture\\_%' ESCAPE '\\' ORDER BY tbl_name, name",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut actions: Vec<TableAction> = Vec::new();
        for (name, table) in triggers {
            conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quoted(&name)))?;
            if actions.last().is_none_or(|a| a.table != table) {
                actions.push(TableAction {
                    table,
                    action: "removed".into(),
                    columns: Vec::new(),
                });
            }
        }
        conn.execute_batch("DELETE FROM jetsync_capture_tables; COMMIT")?;
        Ok(actions)
    };
    let actions = run();
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    let tables = actions.map_err(|e| db_error(path, "remove the triggers from", e))?;
    let (backlog, _) = counts_on(&conn, path)?;
    Ok(CaptureReport {
        outbox: format!("{} (table {})", path.display(), super::OUTBOX_TABLE),
        tables,
        backlog,
        note: None,
    })
}

fn counts_on(conn: &Connection, path: &Path) -> Result<(u64, u64), CaptureError> {
    conn.query_row(
        "SELECT (SELECT count(*) FROM jetsync_outbox), \
                (SELECT published FROM jetsync_capture_state WHERE id = 1)",
        [],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<i64>>(1)?.unwrap_or(0),
            ))
        },
    )
    .map(|(b, p)| (b.max(0) as u64, p.max(0) as u64))
    .map_err(|e| db_error(path, "count the outbox of", e))
}

/// (backlog, published over the instance's life), read-only; zeros when capture was never
/// installed in the file.
pub(super) fn counts(path: &Path) -> Result<(u64, u64), CaptureError> {
    if !path.exists() {
        return Ok((0, 0));
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| db_error(path, "open", e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| db_error(path, "configure", e))?;
    let has_outbox: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'jetsync_capture_state'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| db_error(path, "read", e))?;
    if !has_outbox {
        return Ok((0, 0));
    }
    counts_on(&conn, path)
}

/// How often the watcher looks for commits of other connections where it cannot sleep until
/// the file is written to (no inotify).
const WATCH_INTERVAL: Duration = Duration::from_micros(250);
/// With inotify: the longest sleep without a write (a bound should an event be missed).
const EVENT_TIMEOUT: Duration = Duration::from_millis(50);
/// With inotify: after a write that showed no new commit yet, how often and how many times the
/// watcher looks again (the committer publishes the commit in the WAL index just after writing
/// its pages, which is what the event reports).
const RECHECK_INTERVAL: Duration = Duration::from_micros(100);
const RECHECKS: u32 = 3;

/// How the watcher waits between two looks at the file.
enum Pace {
    /// Sleeps until a file of the directory is written to ([`inotify::Inotify`]).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    Events {
        watch: inotify::Inotify,
        /// Looks left after the last write before sleeping until the next one.
        rechecks: u32,
    },
    /// Looks every [`WATCH_INTERVAL`].
    Poll,
}

impl Pace {
    fn new(path: &Path) -> Pace {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let dir = path.parent().unwrap_or(Path::new("."));
            match inotify::Inotify::new(dir) {
                Ok(watch) => return Pace::Events { watch, rechecks: 0 },
                Err(e) => tracing::debug!(
                    dir = %dir.display(),
                    error = %e,
                    "capture watcher cannot use inotify; polling the file instead"
                ),
            }
        }
        let _ = path;
        Pace::Poll
    }

    /// Waits before the next look; `changed`: whether the last look saw a new commit.
    fn wait(&mut self, changed: bool) {
        match self {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Pace::Events { watch, rechecks } => {
                if changed {
                    *rechecks = 0;
                }
                if *rechecks > 0 {
                    *rechecks -= 1;
                    std::thread::sleep(RECHECK_INTERVAL);
                } else if watch.wait(EVENT_TIMEOUT) {
                    *rechecks = RECHECKS;
                }
            }
            Pace::Poll => std::thread::sleep(WATCH_INTERVAL),
        }
    }
}

/// Wakes the relay when another connection (the service) commits to the file: a thread with its
/// own read-only connection compares `PRAGMA data_version` (a read of the WAL index header, not
/// of the database) whenever a file of the directory was written to (inotify, with a 50 ms
/// bound), else every [`WATCH_INTERVAL`]. On every commit it also records the outbox's commit
/// boundary ([`Boundaries`]), and it wakes the relay only when that moved (a commit that added
/// outbox rows). Stops when dropped.
struct Watcher {
    stop: Arc<AtomicBool>,
}

impl Watcher {
    fn start(
        path: &Path,
        wake: Arc<Notify>,
        boundaries: Boundaries,
    ) -> Result<Watcher, CaptureError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| db_error(path, "open (to watch for commits)", e))?;
        let mut pace = Pace::new(path);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("jetsync-capture-watch".into())
            .spawn(move || {
                let mut last: Option<i64> = None;
                let mut last_highest: Option<i64> = None;
                while !stopped.load(Ordering::Relaxed) {
                    // An error (the file busy, replaced) just means no wake-up: the relay's
                    // own poll (`capture.poll_ms`) still finds the rows.
                    let version = conn
                        .prepare_cached("PRAGMA data_version")
                        .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
                        .ok();
                    let changed = version.is_some() && last.is_some() && version != last;
                    if changed {
                        // The highest outbox id handed out so far ends a transaction
                        // (`commits.rs`); recorded before the relay wakes up to use it.
                        let highest = conn
                            .prepare_cached(
                                "SELECT seq FROM sqlite_sequence WHERE name = 'jetsync_outbox'",
                            )
                            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)).optional());
                        match highest {
                            // No new outbox row: a commit of the applier's sink or of the
                            // relay itself, or a service write to no captured table. Waking
                            // the relay for those would only cost both cores a cycle.
                            Ok(Some(highest)) if last_highest == Some(highest) => {}
                            Ok(Some(highest)) => {
                                tracing::trace!(highest, "capture watcher saw a commit");
                                boundaries.record(highest);
                                last_highest = Some(highest);
                                wake.notify_one();
                            }
                            // No outbox row ever (or the read failed): wake the relay anyway.
                            _ => wake.notify_one(),
                        }
                    }
                    last = version.or(last);
                    pace.wait(changed);
                }
            })
            .map_err(|e| CaptureError::Database(format!("start the commit watcher: {e}")))?;
        Ok(Watcher { stop })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The relay's handle on the outbox of one SQLite file.
pub(super) struct Store {
    conn: Connection,
    path: PathBuf,
    tables: Vec<(String, String)>,
    /// `PRAGMA schema_version` at the last schema check.
    schema_version: Option<i64>,
    /// Wakes the relay on the service's commits (`None` without a wake-up).
    _watcher: Option<Watcher>,
    /// Outbox ids the last [`Store::assign`] assigned and marked in flight, in id order.
    marked: Vec<i64>,
    /// Commit boundaries the watcher saw (empty without a watcher).
    boundaries: Boundaries,
}

impl Store {
    /// Opens the relay's connection; with `wake`, a watcher wakes it on every commit of
    /// another connection to the file.
    pub(super) fn open(
        path: &Path,
        tables: Vec<(String, String)>,
        wake: Option<Arc<Notify>>,
    ) -> Result<Store, CaptureError> {
        let conn = open(path)?;
        let boundaries = Boundaries::default();
        let watcher = wake
            .map(|w| Watcher::start(path, w, boundaries.clone()))
            .transpose()?;
        Ok(Store {
            conn,
            path: path.to_owned(),
            tables,
            schema_version: None,
            _watcher: watcher,
            marked: Vec::new(),
            boundaries,
        })
    }

    fn err(&self, what: &str, e: rusqlite::Error) -> CaptureError {
        db_error(&self.path, what, e)
    }

    /// Follows the captured tables' schema: a column added since the install gets its triggers
    /// reinstalled (WARN naming it); a captured column gone, a table gone or triggers missing
    /// are [`CaptureError::Schema`] (run `capture install` again). Cheap when nothing changed.
    pub(super) fn check_schema(&mut self) -> Result<(), CaptureError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA schema_version", [], |r| r.get(0))
            .map_err(|e| self.err("read the schema version of", e))?;
        if self.schema_version == Some(version) {
            return Ok(());
        }
        for (table, key) in self.tables.clone() {
            let columns = table_columns(&self.conn, &table).map_err(|e| self.err("read", e))?;
            let recorded = recorded_columns(&self.conn, &table).map_err(|e| self.err("read", e))?;
            let triggers: i64 = self
                .conn
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?1 \
                     AND name IN (?2, ?3, ?4)",
                    params![
                        table,
                        trigger_name(&table, "insert"),
                        trigger_name(&table, "update"),
                        trigger_name(&table, "delete")
                    ],
                    |r| r.get(0),
                )
                .map_err(|e| self.err("read", e))?;
            let Some(recorded) = recorded.filter(|_| triggers == 3) else {
                return Err(CaptureError::Schema(format!(
                    "table `{table}` has tables.{table}.capture = true but its capture triggers \
                     are not installed in {}: run `jetsync-applier capture install`",
                    self.path.display()
                )));
            };
            if columns.is_empty() {
                return Err(CaptureError::Schema(format!(
                    "captured table `{table}` is gone from {}",
                    self.path.display()
                )));
            }
            let gone: Vec<&String> = recorded.iter().filter(|c| !columns.contains(c)).collect();
            if !gone.is_empty() {
                return Err(CaptureError::Schema(format!(
                    "captured column(s) {gone:?} of table `{table}` are gone (renamed or dropped): \
                     changes to them cannot be captured; make the same change on every instance, \
                     then run `jetsync-applier capture install` again"
                )));
            }
            let added: Vec<&String> = columns.iter().filter(|c| !recorded.contains(c)).collect();
            if !added.is_empty() {
                tracing::warn!(
                    table = %table,
                    columns = ?added,
                    "captured table has new columns: reinstalling its capture triggers to capture them"
                );
                let tx = || -> Result<(), String> {
                    self.conn
                        .execute_batch("BEGIN IMMEDIATE")
                        .map_err(|e| e.to_string())?;
                    install_table(&self.conn, &table, &key)?;
                    self.conn.execute_batch("COMMIT").map_err(|e| e.to_string())
                };
                let result = tx();
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                result.map_err(CaptureError::Database)?;
            }
        }
        self.schema_version = Some(
            self.conn
                .query_row("PRAGMA schema_version", [], |r| r.get(0))
                .map_err(|e| self.err("read the schema version of", e))?,
        );
        Ok(())
    }

    /// Assigns up to `max_rows` committed, unassigned outbox rows to publish batches of at most
    /// [`MAX_TRANSACTION_ROWS`], in one short write transaction, split at the commit boundaries
    /// the watcher saw ([`commits::group`]). Returns the rows assigned.
    pub(super) fn assign(&mut self, max_rows: usize) -> Result<usize, CaptureError> {
        // A read first: the write lock is taken only when there is something to assign, so an
        // idle relay never competes with the service's writers.
        let waiting: bool = self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM jetsync_outbox WHERE batch IS NULL)")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(|e| self.err("read the outbox of", e))?;
        if !waiting {
            return Ok(0);
        }
        let boundaries = &self.boundaries;
        let run = |conn: &Connection| -> rusqlite::Result<(Vec<i64>, Grouping)> {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            let mut ids: Vec<i64> = conn
                .prepare_cached(
                    "SELECT id FROM jetsync_outbox WHERE batch IS NULL ORDER BY id LIMIT ?1",
                )?
                .query_map([max_rows as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            // The write lock is held: no transaction is under way, so the last row read ends
            // one (unless the limit cut the read).
            let bounds = ids.last().map_or_else(Vec::new, |l| boundaries.up_to(*l));
            let grouping =
                commits::group(&ids, &bounds, ids.len() >= max_rows, MAX_TRANSACTION_ROWS);
            ids.truncate(ids.len() - grouping.held_back);
            for (first, last) in &grouping.batches {
                conn.prepare_cached(
                    "UPDATE jetsync_outbox SET batch = ?1 WHERE id BETWEEN ?1 AND ?2 AND batch IS NULL",
                )?
                .execute(params![first, last])?;
            }
            // The relay publishes these next: their pending entries are marked in flight in
            // the same transaction, which spares [`Store::mark_in_flight`] its own write
            // transaction (and the service a lock wait) on the way to the publish.
            for id in &ids {
                conn.prepare_cached(
                    "UPDATE jetsync_capture_pending SET seq = ?1 WHERE outbox_id = ?2",
                )?
                .execute(params![super::pending::IN_FLIGHT, id])?;
            }
            conn.execute_batch("COMMIT")?;
            Ok((ids, grouping))
        };
        let result = run(&self.conn);
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let (ids, grouping) = result.map_err(|e| self.err("assign outbox rows in", e))?;
        if let Some(last) = ids.last() {
            self.boundaries.forget_through(*last);
        }
        self.marked = ids.clone();
        for (first_id, last_id, rows) in grouping.cut {
            tracing::warn!(
                rows,
                first_id,
                last_id,
                max = MAX_TRANSACTION_ROWS,
                "captured changes of one commit (outbox ids first_id..=last_id; a local \
                 transaction, or several committed too close together to tell apart) exceed one \
                 atomic batch: published as several transactions, so a local transaction among \
                 them is split"
            );
        }
        Ok(ids.len())
    }

    /// The assigned batches, oldest first, up to about `max_rows` rows (whole batches only).
    pub(super) fn pending(&mut self, max_rows: usize) -> Result<Vec<Batch>, CaptureError> {
        let run = |conn: &Connection| -> rusqlite::Result<Vec<Batch>> {
            let mut bound = None;
            let mut rows = 0usize;
            {
                let mut stmt = conn.prepare_cached(
                    "SELECT batch, count(*) FROM jetsync_outbox WHERE batch IS NOT NULL \
                     GROUP BY batch ORDER BY batch",
                )?;
                let mut q = stmt.query([])?;
                while let Some(r) = q.next()? {
                    let (batch, n): (i64, i64) = (r.get(0)?, r.get(1)?);
                    if rows > 0 && rows + n as usize > max_rows {
                        break;
                    }
                    rows += n as usize;
                    bound = Some(batch);
                }
            }
            let Some(bound) = bound else {
                return Ok(Vec::new());
            };
            let mut stmt = conn.prepare_cached(
                "SELECT id, batch, tbl, op, key, row FROM jetsync_outbox \
                 WHERE batch IS NOT NULL AND batch <= ?1 ORDER BY batch, id",
            )?;
            let mut q = stmt.query([bound])?;
            let mut batches: Vec<Batch> = Vec::new();
            while let Some(r) = q.next()? {
                let id: i64 = r.get(0)?;
                let batch: i64 = r.get(1)?;
                if batches.last().is_none_or(|b| b.id != batch) {
                    batches.push(Batch {
                        id: batch,
                        entries: Vec::new(),
                        unpublishable: Vec::new(),
                    });
                }
                let current = batches.last_mut().expect("pushed above");
                let table: String = r.get(2)?;
                let op: String = r.get(3)?;
                let entry = (|| -> Result<Entry, String> {
                    let key = image::key_of(r.get_ref(4).map_err(|e| e.to_string())?)?;
                    let change = match op.as_str() {
                        "delete" => Change::Delete,
                        "upsert" => {
                            let text: Option<String> = r.get(5).map_err(|e| e.to_string())?;
                            Change::Upsert(image::decode_sqlite_row(&text.unwrap_or_default())?)
                        }
                        other => return Err(format!("unknown op `{other}`")),
                    };
                    Ok(Entry {
                        id,
                        table: table.clone(),
                        key,
                        change,
                    })
                })();
                match entry {
                    Ok(entry) => current.entries.push(entry),
                    Err(reason) => current
                        .unpublishable
                        .push((id, format!("table `{table}`: {reason}"))),
                }
            }
            Ok(batches)
        };
        run(&self.conn).map_err(|e| self.err("read the outbox of", e))
    }

    /// Deletes a published batch and counts its entries as published, in one transaction.
    /// `acks` gives the stream sequence the server acknowledged for each published entry
    /// (`None`: unknown), written to the rows' pending entries (`pending.rs`).
    #[cfg(test)]
    pub(super) fn delete(&mut self, batch: &Batch, acks: &[Ack]) -> Result<(), CaptureError> {
        self.delete_many(&[batch], acks)
    }

    /// Deletes several published batches and counts their entries as published, in one
    /// transaction (one commit for all the batches a relay cycle published).
    pub(super) fn delete_many(
        &mut self,
        batches: &[&Batch],
        acks: &[Ack],
    ) -> Result<(), CaptureError> {
        let published: i64 = batches.iter().map(|b| b.entries.len() as i64).sum();
        let run = |conn: &Connection| -> rusqlite::Result<()> {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            for ack in acks {
                match ack.seq {
                    Some(seq) => conn
                        .prepare_cached(
                            "UPDATE jetsync_capture_pending SET seq = ?1 WHERE outbox_id = ?2",
                        )?
                        .execute(params![seq as i64, ack.id])?,
                    None => conn
                        .prepare_cached("DELETE FROM jetsync_capture_pending WHERE outbox_id = ?1")?
                        .execute([ack.id])?,
                };
            }
            for batch in batches {
                conn.prepare_cached("DELETE FROM jetsync_outbox WHERE batch = ?1")?
                    .execute([batch.id])?;
            }
            conn.prepare_cached(
                "UPDATE jetsync_capture_state SET published = published + ?1 WHERE id = 1",
            )?
            .execute([published])?;
            conn.execute_batch("COMMIT")
        };
        let result = run(&self.conn);
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        result.map_err(|e| self.err("delete published rows from", e))
    }

    /// Marks the pending entries of these outbox ids as being published (`pending.rs`).
    pub(super) fn mark_in_flight(&mut self, ids: &[i64]) -> Result<(), CaptureError> {
        // Those the last `assign` marked are done (`marked` is in id order).
        let marked = std::mem::take(&mut self.marked);
        let ids: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| marked.binary_search(id).is_err())
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let run = |conn: &Connection| -> rusqlite::Result<()> {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            for id in &ids {
                conn.prepare_cached(
                    "UPDATE jetsync_capture_pending SET seq = ?1 WHERE outbox_id = ?2",
                )?
                .execute(params![super::pending::IN_FLIGHT, id])?;
            }
            conn.execute_batch("COMMIT")
        };
        let result = run(&self.conn);
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        result.map_err(|e| self.err("mark published rows in", e))
    }

    /// (backlog, published over the instance's life).
    pub(super) fn counts(&self) -> Result<(u64, u64), CaptureError> {
        counts_on(&self.conn, &self.path)
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod inotify;
#[cfg(test)]
mod tests;
