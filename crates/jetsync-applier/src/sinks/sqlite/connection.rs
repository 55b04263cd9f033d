//! Opening the database file: its permissions, the connection's settings and the sink's own
//! tables.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::scope::CREATE_OWN_TABLES;
use crate::SinkError;

/// Prepared statements kept per connection. One upsert statement exists per (table, set of
/// columns an event carries); real services have far fewer shapes than this.
const STATEMENT_CACHE_CAPACITY: usize = 256;
/// How long a statement waits for a lock held by the service before failing with SQLITE_BUSY
/// (which then becomes a retryable [`SinkError::Unavailable`]).
pub(super) const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// Busy handler: while another connection holds the lock, retries every 50 µs for the first
/// 2 ms, then every millisecond, for about `MS` ms in all; then the statement fails with
/// SQLITE_BUSY. SQLite's own handler (`busy_timeout`) sleeps 1 ms, then 2, 5, 10 ms and more
/// between tries, which puts whole milliseconds on every short lock conflict between the
/// service's writes, the capture relay and the sink (each holds the lock for well under a
/// millisecond).
pub(crate) fn busy_wait<const MS: i32>(count: i32) -> bool {
    const FINE_TRIES: i32 = 40;
    if count < FINE_TRIES {
        std::thread::sleep(Duration::from_micros(50));
        true
    } else if count < FINE_TRIES + MS {
        std::thread::sleep(Duration::from_millis(1));
        true
    } else {
        false
    }
}

/// Creates the file readable and writable by its owner only (0600) when it does not exist, so
/// that synced rows are not readable by every local user; SQLite gives the `-wal` and `-shm`
/// files it creates later the same mode. An existing file keeps its mode: the operator chose
/// it. (Elsewhere than Unix the platform's defaults apply.)
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        // An empty file is a valid empty SQLite database.
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens (or creates) the database at `path`, switches it to WAL mode and creates the sink's
/// own tables. Fails with [`SinkError::Fatal`], naming the path and the cause.
pub(super) fn open(path: &Path) -> Result<Connection, SinkError> {
    let fatal = |what: &str, cause: &dyn std::fmt::Display| SinkError::Fatal {
        reason: format!(
            "cannot {what} SQLite database {}: {cause}; check the path and its permissions",
            path.display()
        ),
    };
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| fatal("create the directory of", &e))?;
        }
    }
    if path.as_os_str() != ":memory:" {
        create_private(path).map_err(|e| fatal("create", &e))?;
    }
    let mut conn = Connection::open(path).map_err(|e| fatal("open", &e))?;
    // Before anything that takes a lock: the service may hold the file right now.
    conn.busy_handler(Some(
        busy_wait::<{ DEFAULT_BUSY_TIMEOUT.as_millis() as i32 }>,
    ))
    .map_err(|e| fatal("configure", &e))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| fatal("open", &e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            path = %path.display(),
            journal_mode = %mode,
            "SQLite refused WAL mode; readers will block the applier while they read"
        );
    }
    // synchronous=NORMAL in WAL mode does not fsync on every COMMIT, only at checkpoints.
    // That is safe here: a killed process loses nothing committed (the WAL is in the OS page
    // cache); an OS crash or power loss can lose the last few commits, but the fence lives in
    // the same transactions as the rows, so the file rolls back to a consistent earlier
    // (rows, fence) pair and the engine replays the events after that fence from the stream.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| fatal("configure", &e))?;
    // One batch of 1,000 rows on random keys dirties about 1,000 pages, the default
    // auto-checkpoint threshold, so nearly every commit paid for a checkpoint; checkpoint
    // less often (the bench measured about a third more throughput).
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)
        .map_err(|e| fatal("configure", &e))?;
    // Batches on random keys touch pages all over a table: with SQLite's default 2 MiB page
    // cache a table of 100,000 rows (~25 MiB) is read back from the OS for nearly every
    // row. A 16 MiB cache (allocated as used, per connection) keeps the hot part in memory
    // while the applier stays well under its memory budget (DESIGN 9: 64 MiB).
    conn.pragma_update(None, "cache_size", -16_384)
        .map_err(|e| fatal("configure", &e))?;
    // The service's foreign keys must not make the order of replicated events matter.
    conn.pragma_update(None, "foreign_keys", "OFF")
        .map_err(|e| fatal("configure", &e))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    conn.execute_batch(CREATE_OWN_TABLES)
        .map_err(|e| fatal("create the applier's tables in", &e))?;
    Ok(conn)
}

/// Starts a write transaction, first rolling back any transaction a failed earlier call left
/// open (so one failure cannot wedge the connection). `IMMEDIATE` takes the write lock now, so
/// the service cannot change the schema between our schema check and our writes, and a busy
/// database fails here, before any work.
///
/// It also raises the capture flag (a row in `jetsync_capture_applying`, removed again by
/// [`commit`]): capture triggers skip changes while the flag is visible, so the applier's own
/// writes are never captured. The flag is never committed, so the service's connections never
/// see it.
pub(super) fn begin_immediate(conn: &Connection) -> rusqlite::Result<()> {
    rollback(conn);
    conn.execute_batch("BEGIN IMMEDIATE; INSERT INTO jetsync_capture_applying (flag) VALUES (1)")
}

/// Commits the transaction [`begin_immediate`] opened, lowering the capture flag first.
pub(super) fn commit(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("DELETE FROM jetsync_capture_applying; COMMIT")
}

/// Rolls back the open transaction, if any. A failing ROLLBACK leaves nothing to do: SQLite
/// rolls the transaction back itself when it cannot continue it.
pub(super) fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::debug!(error = %e, "ROLLBACK failed");
        }
    }
}
