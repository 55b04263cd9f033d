//! The SQLite sink: the applier binary's default destination.
//!
//! One SQLite file per instance. The applier is its only writer; the service reads it with any
//! SQLite driver at the same time (WAL mode, so readers never block the writer and never see a
//! half-applied batch).
//!
//! **Tables.** A table is created on its first upsert from that row's columns, unless it already
//! exists (a table the service created itself is used as it is). The key column is configurable
//! per table ([`SqliteOptions::key_columns`]) and must be the table's single-column primary key or
//! carry a unique index. Columns an event carries that the table lacks are added with
//! `ALTER TABLE ADD COLUMN` (additive schema evolution); nothing is ever dropped or retyped. An
//! upsert replaces the whole row: every column the event does not carry becomes NULL, so that
//! replaying history and bootstrapping from a snapshot end in the same state.
//!
//! **Fence.** Table `jetsync_offsets (stream, seq)` holds, per sync group, the highest stream
//! sequence whose effects are in the file. [`Sink::apply`] writes the rows and the fence in one
//! `BEGIN IMMEDIATE … COMMIT` transaction. The crash windows are therefore:
//!
//! - killed before `COMMIT` completes: SQLite rolls the transaction back on the next open (or
//!   the WAL frames of an uncommitted transaction are simply ignored), so no row of the batch is
//!   visible and the fence is unchanged; the engine replays the whole batch after the fence.
//! - killed after `COMMIT`: rows and fence moved together; the engine resumes after the new fence,
//!   whatever its redb checkpoint says, so nothing is applied twice.
//!
//! There is no window in which rows are committed without the fence or the other way round.
//! The fence is written as given: `parked retry` applies parked (lower) sequences with the
//! current fence as `last_seq`, which leaves the fence where it is.
//!
//! **Replace.** [`Sink::replace`] (snapshot resync) is the same single `BEGIN IMMEDIATE`
//! transaction, preceded by `DELETE FROM` every synced table (every table [`Sink::digest`]
//! reports; `DELETE`, not `DROP`, so the service's schema, indexes and triggers stay). Readers
//! see the old contents until the `COMMIT` and the new ones after it, never a half-empty table;
//! a crash before the `COMMIT` leaves the old contents and fence.
//!
//! **Errors.** Busy/locked database, I/O errors and a full disk are [`SinkError::Unavailable`]
//! (the transaction is rolled back first, so the engine can retry the same batch). A change the
//! database refuses for good (a constraint or `CHECK` the service defined, a `STRICT` type
//! mismatch, a value too big, a key that does not match the row) is [`SinkError::Rejected`] with
//! its index, and nothing of the batch remains. Anything else (a damaged file, a table whose key
//! column is not unique) is [`SinkError::Fatal`] with a message saying what to do.

use super::sql::{push_quoted, quote};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jetsync::{Row, Value};
use rusqlite::ffi::ErrorCode;
use rusqlite::types::{ToSql, ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::{Change, DigestBuilder, Sink, SinkError, TableDigest};

/// Name of the fence table; also the reason `jetsync_*` table names are reserved.
const FENCE_TABLE: &str = "jetsync_offsets";
/// Prefixes of table names that never hold synced rows: ours, and SQLite's own.
const RESERVED_PREFIXES: [&str; 2] = ["jetsync_", "sqlite_"];
/// Prepared statements kept per connection. One upsert statement exists per (table, set of
/// columns an event carries); real services have far fewer shapes than this.
const STATEMENT_CACHE_CAPACITY: usize = 256;
/// How long a statement waits for a lock held by the service before failing with SQLITE_BUSY
/// (which then becomes a retryable [`SinkError::Unavailable`]).
const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// Configuration of the SQLite sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// The database file; created (with its parent directory) when missing.
    pub path: PathBuf,
    /// Key column per table (table name → column), for tables whose key column is not
    /// [`default_key_column`](Self::default_key_column).
    pub key_columns: BTreeMap<String, String>,
    /// Key column of every table not listed in [`key_columns`](Self::key_columns), usually `id`.
    pub default_key_column: String,
}

impl SqliteOptions {
    /// Options for the file at `path`, with key column `id` for every table.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteOptions {
            path: path.into(),
            key_columns: BTreeMap::new(),
            default_key_column: "id".to_owned(),
        }
    }

    /// The key column of `table`.
    pub fn key_column(&self, table: &str) -> &str {
        self.key_columns
            .get(table)
            .map_or(self.default_key_column.as_str(), String::as_str)
    }
}

/// A sink writing synced tables into one SQLite file (WAL mode), which the service reads with any
/// SQLite driver while the applier writes.
///
/// Tables are created on first upsert from the row's columns unless they exist; new columns are
/// added with `ALTER TABLE ADD COLUMN`; an upsert replaces the whole row (columns it lacks become
/// NULL). Every [`Sink::apply`] is one transaction that also moves the group's fence in table
/// `jetsync_offsets`: before its COMMIT nothing of the batch is visible and the fence is unchanged,
/// after it rows and fence moved together, so a crash at any point loses nothing and applies
/// nothing twice.
#[derive(Debug)]
pub struct SqliteSink {
    conn: Connection,
    options: SqliteOptions,
    schema: SchemaCache,
}

impl SqliteSink {
    /// Opens (or creates) the database file, switches it to WAL mode and creates the fence
    /// table.
    ///
    /// Fails with [`SinkError::Fatal`], naming the path and the cause, when the file or its
    /// directory cannot be created or opened, or is not an SQLite database.
    pub fn open(options: SqliteOptions) -> Result<SqliteSink, SinkError> {
        let path = options.path.clone();
        let fatal = |what: &str, cause: &dyn std::fmt::Display| SinkError::Fatal {
            reason: format!(
                "cannot {what} SQLite database {}: {cause}; check the path and its permissions",
                path.display()
            ),
        };
        validate_identifier(&options.default_key_column).map_err(|e| SinkError::Fatal {
            reason: format!("sqlite sink: invalid default key column: {e}"),
        })?;
        for (table, column) in &options.key_columns {
            validate_identifier(column).map_err(|e| SinkError::Fatal {
                reason: format!("sqlite sink: invalid key column for table `{table}`: {e}"),
            })?;
        }
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| fatal("create the directory of", &e))?;
            }
        }
        let conn = Connection::open(&path).map_err(|e| fatal("open", &e))?;
        // Before anything that takes a lock: the service may hold the file right now.
        conn.busy_timeout(DEFAULT_BUSY_TIMEOUT)
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
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jetsync_offsets \
             (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL)",
        )
        .map_err(|e| fatal("create the fence table in", &e))?;
        tracing::debug!(path = %path.display(), "opened SQLite sink");
        Ok(SqliteSink {
            conn,
            options,
            schema: SchemaCache::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.options.path
    }

    /// Changes how long a statement waits for a lock held by another connection before the
    /// operation fails with [`SinkError::Unavailable`] (5 s by default).
    pub fn set_busy_timeout(&mut self, timeout: Duration) -> Result<(), SinkError> {
        self.conn
            .busy_timeout(timeout)
            .map_err(|e| self.error("set the busy timeout", Error::Sql(e)))
    }

    /// All rows of `table` as they are stored, ordered by the table's key column (in storage
    /// order when the table has no such column). Column types map back as INTEGER → `I64`,
    /// REAL → `F64`, TEXT → `Text`, BLOB → `Bytes`, NULL → `Null`; a table that does not exist
    /// reads as empty.
    pub fn read_table(&self, table: &str) -> Result<Vec<Row>, SinkError> {
        let read = || -> Result<Vec<Row>, Error> {
            let Some(info) = discover(&self.conn, table, self.options.key_column(table), false)?
            else {
                return Ok(Vec::new());
            };
            let order_by = info.key.map(|key| info.columns[key].name.as_str());
            let mut rows = Vec::new();
            for_each_row(&self.conn, table, order_by, |row| rows.push(row))?;
            Ok(rows)
        };
        read().map_err(|e| self.error(&format!("read table `{table}` of"), e))
    }

    fn read_fence(&self, group: &str) -> Result<Option<u64>, SinkError> {
        let seq: Option<i64> = self
            .conn
            .prepare_cached("SELECT seq FROM jetsync_offsets WHERE stream = ?1")
            .and_then(|mut stmt| stmt.query_row([group], |row| row.get(0)).optional())
            .map_err(|e| self.error("read the fence from", Error::Sql(e)))?;
        seq.map(|seq| {
            u64::try_from(seq).map_err(|_| SinkError::Fatal {
                reason: format!(
                    "{}: {FENCE_TABLE} holds the negative sequence {seq} for `{group}`; \
                     fix it with `jetsync-applier reset --to-seq`",
                    self.options.path.display()
                ),
            })
        })
        .transpose()
    }

    fn store_fence(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        let seq = seq_to_sql(seq)?;
        let result = (|| -> Result<(), Error> {
            let tx = begin(&self.conn, TransactionBehavior::Immediate)?;
            write_fence(&tx, group, seq)?;
            tx.commit()?;
            Ok(())
        })();
        result.map_err(|e| self.error("set the fence in", e))
    }

    fn check_empty(&self) -> Result<bool, SinkError> {
        let check = || -> Result<bool, Error> {
            for table in user_tables(&self.conn)? {
                let sql = format!("SELECT EXISTS (SELECT 1 FROM {})", quote(&table));
                let any: bool = self
                    .conn
                    .prepare_cached(&sql)?
                    .query_row([], |r| r.get(0))?;
                if any {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        check().map_err(|e| self.error("check for rows in", e))
    }

    fn compute_digest(&self) -> Result<Vec<TableDigest>, SinkError> {
        let compute = || -> Result<Vec<TableDigest>, Error> {
            // One read transaction, so all tables are read at the same point in time even if the
            // service writes meanwhile.
            let tx = begin(&self.conn, TransactionBehavior::Deferred)?;
            let mut digests = Vec::new();
            for table in user_tables(&tx)? {
                let mut builder = DigestBuilder::default();
                for_each_row(&tx, &table, None, |row| builder.add(&table, &row))?;
                digests.push(builder.finish(&table));
            }
            tx.finish()?;
            Ok(digests)
        };
        compute().map_err(|e| self.error("compute the digest of", e))
    }

    /// One batch in one transaction with the fence: [`Sink::apply`] (`clear == false`) or
    /// [`Sink::replace`] (`clear == true`: every synced table is emptied first).
    fn write_batch(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
        clear: bool,
    ) -> Result<(), SinkError> {
        let fence = seq_to_sql(last_seq)?;
        let result = self.write_in_transaction(group, changes, fence, clear);
        if result.is_err() {
            // The transaction was rolled back, possibly together with tables or columns it had
            // created: forget what we learned about the schema.
            self.schema.clear();
        }
        result
    }

    fn write_in_transaction(
        &mut self,
        group: &str,
        changes: &[Change],
        fence: i64,
        clear: bool,
    ) -> Result<(), SinkError> {
        let SqliteSink {
            conn,
            options,
            schema,
        } = self;
        let options = &*options;
        let op_error = |what: &str, e: Error| sink_error(&options.path, what, e, None);
        // IMMEDIATE takes the write lock now, so the service cannot change the schema between
        // our schema check and our writes, and a busy database fails here, before any work.
        let tx = begin(conn, TransactionBehavior::Immediate)
            .map_err(|e| op_error("begin a transaction on", e))?;
        schema
            .revalidate(&tx)
            .map_err(|e| op_error("read the schema of", e))?;
        if clear {
            // Every table `digest` reports, which includes every existing table the changes
            // name (reserved ones are rejected by `apply_changes`; tables that do not exist yet
            // are created empty there). DELETE, not DROP: the service's schema, indexes and
            // triggers stay. Readers keep seeing the old rows until COMMIT (WAL).
            let tables = user_tables(&tx).map_err(|e| op_error("list the tables of", e))?;
            for table in tables {
                let mut sql = String::from("DELETE FROM ");
                push_quoted(&mut sql, &table);
                tx.execute(&sql, [])
                    .map_err(|e| op_error(&format!("clear table `{table}` of"), e.into()))?;
            }
        }
        apply_changes(&tx, schema, options, changes)?;
        write_fence(&tx, group, fence).map_err(|e| op_error("write the fence to", e))?;
        schema
            .after_ddl(&tx)
            .map_err(|e| op_error("read the schema of", e))?;
        // Crash window: before this COMMIT completes, nothing of the batch is visible and the
        // fence is unchanged (for a replace: the old contents are all still there); after it,
        // rows and fence moved together.
        tx.commit()
            .map_err(|e| op_error("commit a batch to", e.into()))?;
        Ok(())
    }

    fn error(&self, what: &str, e: Error) -> SinkError {
        sink_error(&self.options.path, what, e, None)
    }
}

impl Sink for SqliteSink {
    async fn fence(&mut self, group: &str) -> Result<Option<u64>, SinkError> {
        // This sink keeps a fence: "never applied" is Some(0), so an emptied or replaced file is
        // never mistaken for "trust the redb checkpoint".
        blocking(|| self.read_fence(group)).map(|f| Some(f.unwrap_or(0)))
    }

    async fn is_empty(&mut self) -> Result<bool, SinkError> {
        blocking(|| self.check_empty())
    }

    async fn apply(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        blocking(|| self.write_batch(group, changes, last_seq, false))
    }

    async fn replace(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        blocking(|| self.write_batch(group, changes, last_seq, true))
    }

    async fn set_fence(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        blocking(|| self.store_fence(group, seq))
    }

    async fn digest(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        blocking(|| self.compute_digest())
    }
}

/// Runs blocking SQLite work from async code. On a multi-threaded tokio runtime the worker thread
/// is handed over to other tasks meanwhile (`block_in_place`); elsewhere (a current-thread
/// runtime, a plain executor) the work runs inline: a batch takes milliseconds, and the engine
/// has only one batch in flight anyway.
fn blocking<R>(work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// What went wrong inside the sink, before it is attributed to a change or an operation.
#[derive(Debug)]
enum Error {
    /// SQLite failed; classified by its result code.
    Sql(rusqlite::Error),
    /// The change itself is unacceptable (bad key, bad column name).
    Reject(String),
    /// The database cannot be used as it is; an operator must act.
    Fatal(String),
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Sql(e)
    }
}

/// How an SQLite failure is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Transient: retry the batch later.
    Unavailable,
    /// Caused by the change's data: reject that change.
    Rejected,
    /// Needs an operator.
    Fatal,
}

fn classify(e: &rusqlite::Error) -> Class {
    match e.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::SchemaChanged
            | ErrorCode::OperationInterrupted,
        ) => Class::Unavailable,
        Some(ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig) => {
            Class::Rejected
        }
        _ => Class::Fatal,
    }
}

/// What an operator should do about a fatal SQLite error.
fn advice(e: &rusqlite::Error) -> &'static str {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            "the file is damaged or not an SQLite database: stop the applier, move the file \
             away and restart it so that it rebuilds the file from a snapshot"
        }
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen) => {
            "make the file, its -wal/-shm files and its directory writable by the applier"
        }
        _ => {
            "inspect the file with the sqlite3 shell and fix the table's schema (or the sqlite \
             sink's key_columns setting), then restart the applier"
        }
    }
}

/// Turns an internal error into the trait's error; `change` is the change being applied, if any.
fn sink_error(path: &Path, what: &str, e: Error, change: Option<(usize, &Change)>) -> SinkError {
    let rejected = |reason: String| match change {
        Some((index, change)) => SinkError::Rejected {
            index,
            seq: change.seq,
            table: change.table.clone(),
            key: change.key.clone(),
            reason,
        },
        None => SinkError::Fatal {
            reason: format!("cannot {what} {}: {reason}", path.display()),
        },
    };
    match e {
        Error::Reject(reason) => rejected(reason),
        Error::Fatal(reason) => SinkError::Fatal {
            reason: format!("{}: {reason}", path.display()),
        },
        Error::Sql(e) => match classify(&e) {
            Class::Unavailable => SinkError::Unavailable {
                reason: format!("cannot {what} {}: {e}", path.display()),
            },
            Class::Rejected if change.is_some() => rejected(e.to_string()),
            Class::Rejected | Class::Fatal => SinkError::Fatal {
                reason: format!("cannot {what} {}: {e}; {}", path.display(), advice(&e)),
            },
        },
    }
}

fn seq_to_sql(seq: u64) -> Result<i64, SinkError> {
    i64::try_from(seq).map_err(|_| SinkError::Fatal {
        reason: format!("stream sequence {seq} does not fit SQLite's signed 64-bit integers"),
    })
}

/// Starts a transaction, first rolling back any transaction a failed earlier call left open
/// (so one failure cannot wedge the connection).
fn begin(conn: &Connection, behavior: TransactionBehavior) -> Result<Transaction<'_>, Error> {
    if !conn.is_autocommit() {
        conn.execute_batch("ROLLBACK")?;
    }
    Ok(Transaction::new_unchecked(conn, behavior)?)
}

fn write_fence(conn: &Connection, group: &str, seq: i64) -> Result<(), Error> {
    conn.prepare_cached(
        "INSERT INTO jetsync_offsets (stream, seq) VALUES (?1, ?2) \
         ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq",
    )?
    .execute((group, seq))?;
    Ok(())
}

/// Names SQLite cannot store as identifiers. Everything else is allowed (quoted).
fn validate_identifier(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty column name is not allowed".to_owned());
    }
    if name.contains('\0') {
        return Err(format!("column name {name:?} contains a NUL character"));
    }
    Ok(())
}

fn is_reserved_table(table: &str) -> bool {
    let lower = table.to_ascii_lowercase();
    RESERVED_PREFIXES.iter().any(|p| lower.starts_with(p))
}

fn check_table_name(table: &str) -> Result<(), Error> {
    if is_reserved_table(table) {
        return Err(Error::Reject(format!(
            "table name `{table}` is reserved (jetsync_* and sqlite_* tables are not synced)"
        )));
    }
    validate_identifier(table).map_err(Error::Reject)
}

/// Declared SQL type of a new column whose first value is `value` (`None`: no declared type,
/// so SQLite stores values as they come).
fn declared_type(value: &Value) -> Option<&'static str> {
    match value {
        Value::Null => None,
        Value::Bool(_) | Value::I64(_) => Some("INTEGER"),
        Value::F64(_) => Some("REAL"),
        Value::Text(_) | Value::Json(_) => Some("TEXT"),
        Value::Bytes(_) => Some("BLOB"),
    }
}

/// One bound parameter: a value of the event, or the subject key.
enum Param<'a> {
    Value(&'a Value),
    Key(&'a str),
}

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Param::Key(key) => ToSqlOutput::Borrowed(ValueRef::Text(key.as_bytes())),
            Param::Value(value) => match value {
                Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
                Value::Bool(b) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*b))),
                Value::I64(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
                Value::F64(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
                Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
                Value::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
                Value::Json(j) => ToSqlOutput::Owned(SqlValue::Text(j.to_string())),
            },
        })
    }
}

fn from_sql(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::I64(i),
        ValueRef::Real(f) => Value::F64(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
    }
}

/// One column of a table, as `PRAGMA table_xinfo` reports it.
#[derive(Debug)]
struct Column {
    name: String,
    /// Generated (or otherwise hidden) columns cannot be written.
    generated: bool,
}

/// What the sink knows about one existing table.
#[derive(Debug)]
struct TableInfo {
    columns: Vec<Column>,
    /// Column name → index. SQLite matches identifiers ASCII-case-insensitively, so this is keyed
    /// by the ASCII-lowercased name; `exact` spares the lowercasing in the common case.
    exact: HashMap<String, usize>,
    folded: HashMap<String, usize>,
    /// Index of the key column, if the table has it (always `Some` for tables written to).
    key: Option<usize>,
}

impl TableInfo {
    fn find(&self, name: &str) -> Option<usize> {
        self.exact
            .get(name)
            .or_else(|| self.folded.get(&name.to_ascii_lowercase()))
            .copied()
    }
}

/// Reads the columns of `table`; `None` when it does not exist. With `require_key`, a table
/// without a usable key column is a fatal error (upserts and deletes need one).
fn discover(
    conn: &Connection,
    table: &str,
    key_column: &str,
    require_key: bool,
) -> Result<Option<TableInfo>, Error> {
    let mut stmt = conn.prepare_cached("SELECT name, pk, hidden FROM pragma_table_xinfo(?1)")?;
    let rows = stmt.query_map([table], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, i64>(2)?,
        ))
    })?;
    let mut columns = Vec::new();
    let mut pks = Vec::new();
    for row in rows {
        let (name, pk, hidden) = row?;
        if pk > 0 {
            pks.push(columns.len());
        }
        columns.push(Column {
            name,
            generated: hidden != 0,
        });
    }
    if columns.is_empty() {
        return Ok(None);
    }
    let exact: HashMap<String, usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.clone(), i))
        .collect();
    let folded: HashMap<String, usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.to_ascii_lowercase(), i))
        .collect();
    let mut info = TableInfo {
        columns,
        exact,
        folded,
        key: None,
    };
    info.key = info.find(key_column);
    if require_key {
        let Some(key) = info.key else {
            return Err(Error::Fatal(format!(
                "table `{table}` exists but has no key column `{key_column}`; set the sqlite \
                 sink's key_columns for `{table}` to its key column, or add that column"
            )));
        };
        if !(pks == [key] || has_unique_index(conn, table, &info.columns[key].name)?) {
            return Err(Error::Fatal(format!(
                "the key column `{key_column}` of table `{table}` is neither its only PRIMARY \
                 KEY column nor covered by a UNIQUE index; add `CREATE UNIQUE INDEX ... ON \
                 {table} ({key_column})` or set the sqlite sink's key_columns for `{table}`"
            )));
        }
    }
    Ok(Some(info))
}

/// Whether a full (non-partial) unique index on exactly `column` exists, which `ON CONFLICT`
/// needs.
fn has_unique_index(conn: &Connection, table: &str, column: &str) -> Result<bool, Error> {
    let indexes: Vec<String> = conn
        .prepare_cached(
            "SELECT name FROM pragma_index_list(?1) WHERE \"unique\" = 1 AND partial = 0",
        )?
        .query_map([table], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    for index in indexes {
        let columns: Vec<Option<String>> = conn
            .prepare_cached("SELECT name FROM pragma_index_info(?1)")?
            .query_map([&index], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        if let [Some(name)] = columns.as_slice() {
            if name.eq_ignore_ascii_case(column) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Columns of the tables the sink has written to, so that a batch does not query the schema
/// per event. Validated against `PRAGMA schema_version` at the start of every transaction, so
/// a column the service added meanwhile is seen (and set to NULL by upserts that lack it).
#[derive(Debug, Default)]
struct SchemaCache {
    /// Table → its columns; `None` for a table known not to exist.
    tables: HashMap<String, Option<TableInfo>>,
    /// The `schema_version` the cache describes.
    version: Option<i64>,
    /// This transaction created or altered a table.
    changed: bool,
}

impl SchemaCache {
    fn clear(&mut self) {
        self.tables.clear();
        self.version = None;
        self.changed = false;
    }

    fn revalidate(&mut self, conn: &Connection) -> Result<(), Error> {
        let version = schema_version(conn)?;
        if self.version != Some(version) {
            self.tables.clear();
            self.version = Some(version);
        }
        self.changed = false;
        Ok(())
    }

    /// Records the schema version our own DDL produced, so the next batch keeps the cache.
    fn after_ddl(&mut self, conn: &Connection) -> Result<(), Error> {
        if self.changed {
            self.version = Some(schema_version(conn)?);
            self.changed = false;
        }
        Ok(())
    }

    fn lookup(
        &mut self,
        conn: &Connection,
        options: &SqliteOptions,
        table: &str,
    ) -> Result<Option<&TableInfo>, Error> {
        if !self.tables.contains_key(table) {
            self.refresh(conn, options, table)?;
        }
        Ok(self.tables.get(table).and_then(Option::as_ref))
    }

    fn refresh(
        &mut self,
        conn: &Connection,
        options: &SqliteOptions,
        table: &str,
    ) -> Result<(), Error> {
        let info = discover(conn, table, options.key_column(table), true)?;
        self.tables.insert(table.to_owned(), info);
        Ok(())
    }
}

fn schema_version(conn: &Connection) -> Result<i64, Error> {
    Ok(conn
        .prepare_cached("PRAGMA schema_version")?
        .query_row([], |row| row.get(0))?)
}

/// Rejects rows with two columns SQLite would treat as the same column.
fn check_distinct<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), Error> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(Error::Reject(format!(
                "column `{name}` appears twice (SQLite column names ignore ASCII case)"
            )));
        }
    }
    Ok(())
}

/// Whether the row's key column value is the subject key.
fn check_key(value: &Value, key: &str, column: &str) -> Result<(), Error> {
    let matches = match value {
        Value::I64(i) => i.to_string() == key,
        Value::Text(s) => s == key,
        other => {
            return Err(Error::Reject(format!(
                "key column `{column}` holds {other:?}; a key must be text or an integer"
            )))
        }
    };
    if matches {
        Ok(())
    } else {
        Err(Error::Reject(format!(
            "key column `{column}` holds {value:?}, which does not match the subject key `{key}`"
        )))
    }
}

fn create_table(
    conn: &Connection,
    table: &str,
    key_column: &str,
    row: &Row,
    key: &str,
) -> Result<(), Error> {
    check_distinct(row.keys().map(String::as_str))?;
    let key_value = row
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(key_column));
    if let Some((name, value)) = key_value {
        check_key(value, key, name)?;
    }
    let key_type = match key_value {
        Some((_, Value::I64(_))) => "INTEGER",
        _ => "TEXT",
    };
    let mut sql = String::from("CREATE TABLE ");
    push_quoted(&mut sql, table);
    sql.push_str(" (");
    push_quoted(&mut sql, key_column);
    sql.push(' ');
    sql.push_str(key_type);
    sql.push_str(" PRIMARY KEY");
    for (name, value) in row {
        if name.eq_ignore_ascii_case(key_column) {
            continue;
        }
        sql.push_str(", ");
        push_quoted(&mut sql, name);
        if let Some(ty) = declared_type(value) {
            sql.push(' ');
            sql.push_str(ty);
        }
    }
    sql.push(')');
    conn.execute_batch(&sql)?;
    tracing::info!(table, key_column, "created table for synced rows");
    Ok(())
}

/// Applies `changes` in order inside the caller's transaction, creating tables and adding
/// columns as needed; the per-change step shared by [`Sink::apply`] and [`Sink::replace`]. A
/// failing change is attributed to its index (see [`sink_error`]); the caller rolls back.
fn apply_changes(
    conn: &Connection,
    schema: &mut SchemaCache,
    options: &SqliteOptions,
    changes: &[Change],
) -> Result<(), SinkError> {
    for (index, change) in changes.iter().enumerate() {
        let result = match &change.op {
            jetsync::Change::Upsert(row) => upsert(conn, schema, options, change, row),
            jetsync::Change::Delete => delete(conn, schema, options, change),
        };
        result.map_err(|e| {
            sink_error(&options.path, "apply a change to", e, Some((index, change)))
        })?;
    }
    Ok(())
}

fn upsert(
    conn: &Connection,
    schema: &mut SchemaCache,
    options: &SqliteOptions,
    change: &Change,
    row: &Row,
) -> Result<(), Error> {
    let table = change.table.as_str();
    check_table_name(table)?;
    for name in row.keys() {
        validate_identifier(name).map_err(Error::Reject)?;
    }
    if schema.lookup(conn, options, table)?.is_none() {
        create_table(conn, table, options.key_column(table), row, &change.key)?;
        schema.changed = true;
        schema.refresh(conn, options, table)?;
    }
    let info = schema
        .lookup(conn, options, table)?
        .ok_or_else(|| Error::Fatal(format!("table `{table}` vanished right after creation")))?;

    // Additive schema evolution: add the columns this event carries and the table lacks.
    let missing: Vec<(&String, &Value)> = row
        .iter()
        .filter(|(name, _)| info.find(name).is_none())
        .collect();
    if !missing.is_empty() {
        check_distinct(missing.iter().map(|(name, _)| name.as_str()))?;
        for (name, value) in &missing {
            let mut sql = String::from("ALTER TABLE ");
            push_quoted(&mut sql, table);
            sql.push_str(" ADD COLUMN ");
            push_quoted(&mut sql, name);
            if let Some(ty) = declared_type(value) {
                sql.push(' ');
                sql.push_str(ty);
            }
            conn.execute_batch(&sql)?;
            tracing::info!(table, column = %name, "added column for synced rows");
        }
        schema.changed = true;
        schema.refresh(conn, options, table)?;
    }
    let info = schema
        .lookup(conn, options, table)?
        .ok_or_else(|| Error::Fatal(format!("table `{table}` vanished while altering it")))?;
    let key = info
        .key
        .ok_or_else(|| Error::Fatal(format!("table `{table}` lost its key column")))?;

    let mut present = vec![false; info.columns.len()];
    present[key] = true;
    let mut key_param = Param::Key(&change.key);
    let mut others: Vec<(usize, Param<'_>)> = Vec::with_capacity(row.len());
    for (name, value) in row {
        let index = info
            .find(name)
            .ok_or_else(|| Error::Fatal(format!("column `{name}` of `{table}` vanished")))?;
        let column = &info.columns[index];
        if index == key {
            check_key(value, &change.key, name)?;
            key_param = Param::Value(value);
            continue;
        }
        if present[index] {
            return Err(Error::Reject(format!(
                "columns `{name}` and `{}` are the same SQLite column (names ignore ASCII case)",
                column.name
            )));
        }
        if column.generated {
            return Err(Error::Reject(format!(
                "column `{}` of `{table}` is a generated column and cannot be written",
                column.name
            )));
        }
        present[index] = true;
        others.push((index, Param::Value(value)));
    }

    // INSERT … ON CONFLICT DO UPDATE: the event's row replaces the stored row entirely; every
    // column the event lacks becomes NULL, so replay and snapshot end in the same state.
    let key_name = &info.columns[key].name;
    let mut sql = String::with_capacity(64 + 24 * info.columns.len());
    sql.push_str("INSERT INTO ");
    push_quoted(&mut sql, table);
    sql.push_str(" (");
    push_quoted(&mut sql, key_name);
    for (index, _) in &others {
        sql.push_str(", ");
        push_quoted(&mut sql, &info.columns[*index].name);
    }
    sql.push_str(") VALUES (?");
    for _ in &others {
        sql.push_str(", ?");
    }
    sql.push_str(") ON CONFLICT (");
    push_quoted(&mut sql, key_name);
    sql.push_str(") DO ");
    let mut first = true;
    let mut set = |sql: &mut String, name: &str, excluded: bool| {
        sql.push_str(if first { "UPDATE SET " } else { ", " });
        first = false;
        push_quoted(sql, name);
        if excluded {
            sql.push_str(" = excluded.");
            push_quoted(sql, name);
        } else {
            sql.push_str(" = NULL");
        }
    };
    for (index, _) in &others {
        set(&mut sql, &info.columns[*index].name, true);
    }
    for (index, column) in info.columns.iter().enumerate() {
        if !present[index] && !column.generated {
            set(&mut sql, &column.name, false);
        }
    }
    if first {
        // The table has nothing but its key: an existing row is already what the event says.
        sql.push_str("NOTHING");
    }

    let params = std::iter::once(&key_param).chain(others.iter().map(|(_, p)| p));
    conn.prepare_cached(&sql)?
        .execute(rusqlite::params_from_iter(params))?;
    Ok(())
}

fn delete(
    conn: &Connection,
    schema: &mut SchemaCache,
    options: &SqliteOptions,
    change: &Change,
) -> Result<(), Error> {
    let table = change.table.as_str();
    check_table_name(table)?;
    let Some(info) = schema.lookup(conn, options, table)? else {
        return Ok(()); // Nothing was ever stored there: deleting is a no-op.
    };
    let key = info
        .key
        .ok_or_else(|| Error::Fatal(format!("table `{table}` has no key column")))?;
    let mut sql = String::from("DELETE FROM ");
    push_quoted(&mut sql, table);
    sql.push_str(" WHERE ");
    push_quoted(&mut sql, &info.columns[key].name);
    sql.push_str(" = ?1");
    // Bound as text: the key column's affinity converts it, so "42" also matches INTEGER 42.
    conn.prepare_cached(&sql)?.execute([change.key.as_str()])?;
    Ok(())
}

/// The tables that may hold synced rows: every ordinary table of the main database except
/// `jetsync_*` and `sqlite_*`, sorted by name. Views, virtual tables and their shadow tables are
/// not included.
fn user_tables(conn: &Connection) -> Result<Vec<String>, Error> {
    let mut tables: Vec<String> = conn
        .prepare_cached(
            "SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'table'",
        )?
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    tables.retain(|t| !is_reserved_table(t));
    tables.sort();
    Ok(tables)
}

/// Calls `f` with every row of `table`, optionally ordered by a column.
fn for_each_row(
    conn: &Connection,
    table: &str,
    order_by: Option<&str>,
    mut f: impl FnMut(Row),
) -> Result<(), Error> {
    let mut sql = String::from("SELECT * FROM ");
    push_quoted(&mut sql, table);
    if let Some(column) = order_by {
        sql.push_str(" ORDER BY ");
        push_quoted(&mut sql, column);
    }
    // Not `prepare_cached`: SQLite re-expands `*` only when it re-prepares a statement at its
    // first step, so a cached statement would report the column names from before an
    // `ALTER TABLE`.
    let mut stmt = conn.prepare(&sql)?;
    let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let mut out = Row::new();
        for (index, name) in names.iter().enumerate() {
            out.insert(name.clone(), from_sql(row.get_ref(index)?));
        }
        f(out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: &str = "CATALOG";

    fn row(pairs: &[(&str, Value)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn up(seq: u64, table: &str, key: &str, pairs: &[(&str, Value)]) -> Change {
        Change {
            seq,
            table: table.to_owned(),
            key: key.to_owned(),
            op: jetsync::Change::Upsert(row(pairs)),
        }
    }

    fn del(seq: u64, table: &str, key: &str) -> Change {
        Change {
            seq,
            table: table.to_owned(),
            key: key.to_owned(),
            op: jetsync::Change::Delete,
        }
    }

    fn run<F: std::future::Future>(future: F) -> F::Output {
        futures::executor::block_on(future)
    }

    fn open_at(path: &Path) -> SqliteSink {
        SqliteSink::open(SqliteOptions::new(path)).expect("open sink")
    }

    fn fresh() -> (tempfile::TempDir, SqliteSink) {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = open_at(&dir.path().join("nested/dir/replica.sqlite"));
        (dir, sink)
    }

    fn apply(sink: &mut SqliteSink, changes: &[Change]) -> Result<(), SinkError> {
        let last = changes.last().map_or(0, |c| c.seq);
        run(sink.apply(G, changes, last))
    }

    fn service_conn(sink: &SqliteSink) -> Connection {
        Connection::open(sink.path()).expect("second connection")
    }

    #[test]
    fn upsert_creates_table_with_typed_columns() {
        let (_dir, mut sink) = fresh();
        assert!(run(sink.is_empty()).unwrap());
        let values = [
            ("id", Value::I64(1)),
            ("name", Value::from("Chair")),
            ("price", Value::F64(12.5)),
            ("active", Value::Bool(true)),
            ("blob", Value::Bytes(vec![0, 1, 2])),
            (
                "meta",
                Value::Json(serde_json::json!({"b": [1, 2], "a": null})),
            ),
            ("nothing", Value::Null),
        ];
        apply(&mut sink, &[up(1, "products", "1", &values)]).unwrap();
        assert!(!run(sink.is_empty()).unwrap());
        let rows = sink.read_table("products").unwrap();
        assert_eq!(
            rows,
            vec![row(&[
                ("id", Value::I64(1)),
                ("name", Value::from("Chair")),
                ("price", Value::F64(12.5)),
                ("active", Value::I64(1)),
                ("blob", Value::Bytes(vec![0, 1, 2])),
                ("meta", Value::from(r#"{"a":null,"b":[1,2]}"#)),
                ("nothing", Value::Null),
            ])]
        );
        let conn = service_conn(&sink);
        let types: Vec<(String, String, i64)> = conn
            .prepare("SELECT name, type, pk FROM pragma_table_info('products') ORDER BY cid")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let types: Vec<(&str, &str, i64)> = types
            .iter()
            .map(|(n, t, p)| (n.as_str(), t.as_str(), *p))
            .collect();
        assert_eq!(
            types,
            [
                ("id", "INTEGER", 1),
                ("active", "INTEGER", 0),
                ("blob", "BLOB", 0),
                ("meta", "TEXT", 0),
                ("name", "TEXT", 0),
                ("nothing", "", 0),
                ("price", "REAL", 0),
            ]
        );
    }

    #[test]
    fn row_without_key_column_gets_text_key() {
        let (_dir, mut sink) = fresh();
        apply(
            &mut sink,
            &[up(1, "t", "A-1", &[("name", Value::from("x"))])],
        )
        .unwrap();
        assert_eq!(
            sink.read_table("t").unwrap(),
            vec![row(&[
                ("id", Value::from("A-1")),
                ("name", Value::from("x"))
            ])]
        );
    }

    #[test]
    fn new_columns_are_added_and_missing_columns_become_null() {
        let (_dir, mut sink) = fresh();
        apply(&mut sink, &[up(1, "t", "a", &[("x", Value::I64(1))])]).unwrap();
        apply(
            &mut sink,
            &[up(
                2,
                "t",
                "a",
                &[("x", Value::I64(2)), ("y", Value::from("new"))],
            )],
        )
        .unwrap();
        assert_eq!(
            sink.read_table("t").unwrap(),
            vec![row(&[
                ("id", Value::from("a")),
                ("x", Value::I64(2)),
                ("y", Value::from("new"))
            ])]
        );
        // Same batch: add a column, then drop it again from the row.
        apply(
            &mut sink,
            &[
                up(3, "t", "b", &[("z", Value::F64(0.5))]),
                up(4, "t", "a", &[("y", Value::from("only y"))]),
            ],
        )
        .unwrap();
        assert_eq!(
            sink.read_table("t").unwrap(),
            vec![
                row(&[
                    ("id", Value::from("a")),
                    ("x", Value::Null),
                    ("y", Value::from("only y")),
                    ("z", Value::Null)
                ]),
                row(&[
                    ("id", Value::from("b")),
                    ("x", Value::Null),
                    ("y", Value::Null),
                    ("z", Value::F64(0.5))
                ]),
            ]
        );
        assert_eq!(run(sink.fence(G)).unwrap(), Some(4));
    }

    #[test]
    fn deletes_remove_rows_and_missing_things_are_no_ops() {
        let (_dir, mut sink) = fresh();
        apply(
            &mut sink,
            &[
                del(1, "nowhere", "x"),
                up(2, "t", "a", &[("v", Value::I64(1))]),
                up(3, "t", "b", &[("v", Value::I64(2))]),
                del(4, "t", "a"),
                del(5, "t", "never-existed"),
            ],
        )
        .unwrap();
        assert_eq!(
            sink.read_table("t").unwrap(),
            vec![row(&[("id", Value::from("b")), ("v", Value::I64(2))])]
        );
        assert!(sink.read_table("nowhere").unwrap().is_empty());
        assert_eq!(run(sink.fence(G)).unwrap(), Some(5));
        apply(&mut sink, &[del(6, "t", "b")]).unwrap();
        assert!(run(sink.is_empty()).unwrap());
    }

    #[test]
    fn integer_key_table_deletes_by_text_key() {
        let (_dir, mut sink) = fresh();
        apply(
            &mut sink,
            &[
                up(
                    1,
                    "n",
                    "41",
                    &[("id", Value::I64(41)), ("v", Value::from("a"))],
                ),
                up(
                    2,
                    "n",
                    "42",
                    &[("id", Value::I64(42)), ("v", Value::from("b"))],
                ),
                // A row without the key column: the text key lands as INTEGER 43 by affinity.
                up(3, "n", "43", &[("v", Value::from("c"))]),
            ],
        )
        .unwrap();
        apply(&mut sink, &[del(4, "n", "42"), del(5, "n", "43")]).unwrap();
        assert_eq!(
            sink.read_table("n").unwrap(),
            vec![row(&[("id", Value::I64(41)), ("v", Value::from("a"))])]
        );
        let typeof_id: String = service_conn(&sink)
            .query_row("SELECT typeof(id) FROM n", [], |r| r.get(0))
            .unwrap();
        assert_eq!(typeof_id, "integer");
    }

    #[test]
    fn key_column_must_match_subject_key() {
        let (_dir, mut sink) = fresh();
        let err = apply(
            &mut sink,
            &[
                up(1, "n", "1", &[("id", Value::I64(1))]),
                up(2, "n", "2", &[("id", Value::I64(3))]),
            ],
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                SinkError::Rejected {
                    index: 1,
                    seq: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = apply(&mut sink, &[up(3, "n", "1", &[("id", Value::F64(1.0))])]).unwrap_err();
        assert!(
            matches!(err, SinkError::Rejected { index: 0, .. }),
            "{err:?}"
        );
        // Nothing of the first batch remained, not even the table.
        assert!(sink.read_table("n").unwrap().is_empty());
        assert!(run(sink.is_empty()).unwrap());
    }

    #[test]
    fn configured_key_column() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = SqliteOptions::new(dir.path().join("r.sqlite"));
        options.key_columns.insert("products".into(), "sku".into());
        let mut sink = SqliteSink::open(options).unwrap();
        apply(
            &mut sink,
            &[
                up(
                    1,
                    "products",
                    "A-1",
                    &[("sku", Value::from("A-1")), ("n", Value::I64(1))],
                ),
                up(
                    2,
                    "products",
                    "A-1",
                    &[("sku", Value::from("A-1")), ("n", Value::I64(2))],
                ),
                up(3, "other", "k", &[("n", Value::I64(3))]),
            ],
        )
        .unwrap();
        assert_eq!(
            sink.read_table("products").unwrap(),
            vec![row(&[("sku", Value::from("A-1")), ("n", Value::I64(2))])]
        );
        assert_eq!(
            sink.read_table("other").unwrap(),
            vec![row(&[("id", Value::from("k")), ("n", Value::I64(3))])]
        );
    }

    #[test]
    fn fence_moves_with_apply_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        {
            let mut sink = open_at(&path);
            assert_eq!(run(sink.fence(G)).unwrap(), Some(0));
            run(sink.apply(G, &[up(3, "t", "a", &[("v", Value::I64(1))])], 7)).unwrap();
            assert_eq!(run(sink.fence(G)).unwrap(), Some(7));
            // An empty batch (all events skipped) still moves the fence.
            run(sink.apply(G, &[], 9)).unwrap();
            run(sink.set_fence("OTHER", 100)).unwrap();
        }
        let mut sink = open_at(&path);
        assert_eq!(run(sink.fence(G)).unwrap(), Some(9));
        assert_eq!(run(sink.fence("OTHER")).unwrap(), Some(100));
        run(sink.set_fence(G, 2)).unwrap();
        assert_eq!(run(sink.fence(G)).unwrap(), Some(2));
        assert_eq!(sink.read_table("t").unwrap().len(), 1);
        // The fence table is no synced table.
        assert_eq!(run(sink.digest()).unwrap().len(), 1);
    }

    /// Tables with at least one row, for comparing a replaced sink (which keeps its emptied
    /// tables) with a fresh one.
    fn non_empty(digests: Vec<TableDigest>) -> Vec<TableDigest> {
        digests.into_iter().filter(|d| d.rows > 0).collect()
    }

    /// `t` (a, b, c), `u` (x) and the service's own table `svc` with an index and a row; fence
    /// 10.
    fn filled() -> (tempfile::TempDir, SqliteSink) {
        let (dir, mut sink) = fresh();
        apply(
            &mut sink,
            &[
                up(1, "t", "a", &[("v", Value::I64(1))]),
                up(2, "t", "b", &[("v", Value::I64(2))]),
                up(3, "t", "c", &[("v", Value::I64(3))]),
                up(4, "u", "x", &[("w", Value::from("x"))]),
            ],
        )
        .unwrap();
        service_conn(&sink)
            .execute_batch(
                "CREATE TABLE svc (id TEXT PRIMARY KEY, n INTEGER); \
                 CREATE INDEX svc_n ON svc (n); INSERT INTO svc VALUES ('s', 1);",
            )
            .unwrap();
        run(sink.set_fence(G, 10)).unwrap();
        (dir, sink)
    }

    fn replacement() -> Vec<Change> {
        vec![
            up(2, "t", "a", &[("v", Value::I64(20))]),
            up(5, "t", "d", &[("v", Value::I64(5))]),
            del(6, "t", "d"),
            up(7, "fresh", "k", &[("n", Value::I64(7))]),
            up(8, "t", "e", &[("v", Value::I64(8))]),
            del(9, "t", "never"),
            up(11, "t", "e", &[("v", Value::I64(11))]),
        ]
    }

    #[test]
    fn replace_swaps_the_contents_and_sets_the_fence() {
        let (_dir, mut sink) = filled();
        let reader = service_conn(&sink);
        reader.execute_batch("BEGIN").unwrap();
        let count = |c: &Connection, table: &str| -> i64 {
            c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count(&reader, "t"), 3);

        let changes = replacement();
        run(sink.replace(G, &changes, 12)).unwrap();

        // A read transaction that started before still sees the old contents, whole.
        assert_eq!(count(&reader, "t"), 3);
        assert_eq!(count(&reader, "u"), 1);
        reader.execute_batch("COMMIT").unwrap();

        assert_eq!(run(sink.fence(G)).unwrap(), Some(12));
        assert_eq!(
            sink.read_table("t").unwrap(),
            vec![
                row(&[("id", Value::from("a")), ("v", Value::I64(20))]),
                row(&[("id", Value::from("e")), ("v", Value::I64(11))]),
            ]
        );
        assert_eq!(
            sink.read_table("fresh").unwrap(),
            vec![row(&[("id", Value::from("k")), ("n", Value::I64(7))])]
        );
        // Rows absent from the changes are gone, from every synced table, the service's own
        // included; the tables and their indexes stay.
        assert!(sink.read_table("u").unwrap().is_empty());
        assert!(sink.read_table("svc").unwrap().is_empty());
        let index: i64 = reader
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'svc_n'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 1);

        // Same contents as a fresh sink that applied the same changes.
        let (_d2, mut other) = fresh();
        apply(&mut other, &changes).unwrap();
        let digest = run(sink.digest()).unwrap();
        assert_eq!(
            digest
                .iter()
                .map(|d| (d.table.as_str(), d.rows))
                .collect::<Vec<_>>(),
            [("fresh", 1), ("svc", 0), ("t", 2), ("u", 0)]
        );
        assert_eq!(non_empty(digest), run(other.digest()).unwrap());

        // Replacing with nothing empties every table and still sets the fence (backwards too).
        run(sink.replace(G, &[], 3)).unwrap();
        assert!(run(sink.is_empty()).unwrap());
        assert_eq!(run(sink.fence(G)).unwrap(), Some(3));
    }

    #[test]
    fn replace_with_a_rejected_change_keeps_the_old_contents_and_fence() {
        let (_dir, mut sink) = filled();
        service_conn(&sink)
            .execute_batch(
                "CREATE TRIGGER t_no_bad BEFORE INSERT ON t WHEN NEW.id = 'bad' \
                 BEGIN SELECT RAISE(ABORT, 'no bad rows'); END;",
            )
            .unwrap();
        let before = run(sink.digest()).unwrap();
        let mut changes = replacement();
        changes.insert(3, up(7, "t", "bad", &[("v", Value::I64(-1))]));
        let err = run(sink.replace(G, &changes, 12)).unwrap_err();
        match &err {
            SinkError::Rejected {
                index,
                seq,
                table,
                key,
                reason,
            } => {
                assert_eq!((*index, *seq), (3, 7));
                assert_eq!((table.as_str(), key.as_str()), ("t", "bad"));
                assert!(reason.contains("no bad rows"), "{reason}");
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert_eq!(run(sink.fence(G)).unwrap(), Some(10));
        assert_eq!(run(sink.digest()).unwrap(), before);
        assert_eq!(sink.read_table("t").unwrap().len(), 3);
        assert_eq!(sink.read_table("u").unwrap().len(), 1);
        assert!(sink.read_table("fresh").unwrap().is_empty());

        // A reserved table in the changes is rejected too, and never cleared.
        let err = run(sink.replace(G, &[up(1, "jetsync_offsets", G, &[])], 12)).unwrap_err();
        assert!(
            matches!(err, SinkError::Rejected { index: 0, .. }),
            "{err:?}"
        );
        assert_eq!(run(sink.fence(G)).unwrap(), Some(10));
        assert_eq!(run(sink.digest()).unwrap(), before);

        // The engine parks the bad change and replaces again without it.
        changes.remove(3);
        run(sink.replace(G, &changes, 12)).unwrap();
        assert_eq!(run(sink.fence(G)).unwrap(), Some(12));
        assert_eq!(sink.read_table("t").unwrap().len(), 2);
        assert_eq!(sink.read_table("fresh").unwrap().len(), 1);
    }

    #[test]
    fn busy_database_makes_replace_unavailable() {
        let (_dir, mut sink) = filled();
        sink.set_busy_timeout(Duration::from_millis(20)).unwrap();
        let writer = service_conn(&sink);
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        let err = run(sink.replace(G, &replacement(), 12)).unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        writer.execute_batch("ROLLBACK").unwrap();
        assert_eq!(sink.read_table("t").unwrap().len(), 3);
        run(sink.replace(G, &replacement(), 12)).unwrap();
        assert_eq!(sink.read_table("t").unwrap().len(), 2);
    }

    #[test]
    fn apply_of_lower_sequences_at_the_fence_keeps_the_fence() {
        let (_dir, mut sink) = filled();
        // `parked retry`: events parked earlier (seqs below the fence), applied with the current
        // fence as last_seq.
        run(sink.apply(
            G,
            &[
                up(5, "t", "p", &[("v", Value::I64(5))]),
                del(6, "t", "a"),
                up(7, "t", "b", &[("v", Value::I64(7))]),
            ],
            10,
        ))
        .unwrap();
        assert_eq!(run(sink.fence(G)).unwrap(), Some(10));
        assert_eq!(
            sink.read_table("t").unwrap(),
            vec![
                row(&[("id", Value::from("b")), ("v", Value::I64(7))]),
                row(&[("id", Value::from("c")), ("v", Value::I64(3))]),
                row(&[("id", Value::from("p")), ("v", Value::I64(5))]),
            ]
        );
        // A rejected retry leaves rows and fence alone as well.
        let err = run(sink.apply(G, &[up(3, "jetsync_x", "k", &[])], 10)).unwrap_err();
        assert!(
            matches!(err, SinkError::Rejected { index: 0, .. }),
            "{err:?}"
        );
        assert_eq!(run(sink.fence(G)).unwrap(), Some(10));
        // And later batches move it on as usual.
        run(sink.apply(G, &[up(11, "t", "q", &[])], 11)).unwrap();
        assert_eq!(run(sink.fence(G)).unwrap(), Some(11));
    }

    #[test]
    fn rejected_change_rolls_back_the_whole_batch() {
        let (_dir, mut sink) = fresh();
        service_conn(&sink)
            .execute_batch(
                "CREATE TABLE products (id TEXT PRIMARY KEY, price REAL CHECK (price >= 0))",
            )
            .unwrap();
        apply(
            &mut sink,
            &[up(1, "products", "a", &[("price", Value::F64(1.0))])],
        )
        .unwrap();
        let err = apply(
            &mut sink,
            &[
                up(2, "products", "a", &[("price", Value::F64(2.0))]),
                up(3, "fresh", "x", &[("v", Value::I64(1))]),
                up(
                    4,
                    "products",
                    "b",
                    &[("price", Value::F64(-1.0)), ("new", Value::I64(1))],
                ),
                up(5, "products", "c", &[("price", Value::F64(3.0))]),
            ],
        )
        .unwrap_err();
        match &err {
            SinkError::Rejected {
                index,
                seq,
                table,
                key,
                reason,
            } => {
                assert_eq!((*index, *seq), (2, 4));
                assert_eq!((table.as_str(), key.as_str()), ("products", "b"));
                assert!(reason.contains("CHECK"), "{reason}");
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert!(!err.is_retryable());
        assert_eq!(run(sink.fence(G)).unwrap(), Some(1));
        assert_eq!(
            sink.read_table("products").unwrap(),
            vec![row(&[("id", Value::from("a")), ("price", Value::F64(1.0))])]
        );
        assert!(sink.read_table("fresh").unwrap().is_empty());
        // The engine retries without the poison event; the table and column created by the
        // rolled-back batch must be created again.
        apply(
            &mut sink,
            &[
                up(2, "products", "a", &[("price", Value::F64(2.0))]),
                up(3, "fresh", "x", &[("v", Value::I64(1))]),
                up(
                    5,
                    "products",
                    "c",
                    &[("price", Value::F64(3.0)), ("new", Value::I64(5))],
                ),
            ],
        )
        .unwrap();
        assert_eq!(run(sink.fence(G)).unwrap(), Some(5));
        assert_eq!(sink.read_table("products").unwrap().len(), 2);
        assert_eq!(sink.read_table("fresh").unwrap().len(), 1);
    }

    #[test]
    fn not_null_and_strict_violations_are_rejected() {
        let (_dir, mut sink) = fresh();
        service_conn(&sink)
            .execute_batch("CREATE TABLE s (id TEXT PRIMARY KEY, n INTEGER NOT NULL) STRICT;")
            .unwrap();
        let err = apply(&mut sink, &[up(1, "s", "a", &[("other", Value::I64(1))])]).unwrap_err();
        assert!(
            matches!(err, SinkError::Rejected { index: 0, .. }),
            "{err:?}"
        );
        let err = apply(&mut sink, &[up(1, "s", "a", &[("n", Value::from("text"))])]).unwrap_err();
        assert!(
            matches!(err, SinkError::Rejected { index: 0, .. }),
            "{err:?}"
        );
        apply(&mut sink, &[up(1, "s", "a", &[("n", Value::I64(3))])]).unwrap();
    }

    #[test]
    fn service_created_table_with_other_column_order_and_case() {
        let (_dir, mut sink) = fresh();
        service_conn(&sink)
            .execute_batch(
                "CREATE TABLE items (Name TEXT NOT NULL DEFAULT '', qty INTEGER, \
                 ID INTEGER PRIMARY KEY, total INTEGER GENERATED ALWAYS AS (qty * 2) VIRTUAL)",
            )
            .unwrap();
        apply(
            &mut sink,
            &[
                up(
                    1,
                    "items",
                    "7",
                    &[("qty", Value::I64(3)), ("name", Value::from("bolt"))],
                ),
                up(
                    2,
                    "items",
                    "8",
                    &[("id", Value::I64(8)), ("Name", Value::from("nut"))],
                ),
            ],
        )
        .unwrap();
        assert_eq!(
            sink.read_table("items").unwrap(),
            vec![
                row(&[
                    ("Name", Value::from("bolt")),
                    ("qty", Value::I64(3)),
                    ("ID", Value::I64(7)),
                    ("total", Value::I64(6)),
                ]),
                row(&[
                    ("Name", Value::from("nut")),
                    ("qty", Value::Null),
                    ("ID", Value::I64(8)),
                    ("total", Value::Null),
                ]),
            ]
        );
        let err = apply(
            &mut sink,
            &[up(3, "items", "9", &[("total", Value::I64(1))])],
        )
        .unwrap_err();
        assert!(matches!(err, SinkError::Rejected { .. }), "{err:?}");
        let err = apply(
            &mut sink,
            &[up(
                3,
                "items",
                "9",
                &[("qty", Value::I64(1)), ("QTY", Value::I64(2))],
            )],
        )
        .unwrap_err();
        assert!(matches!(err, SinkError::Rejected { .. }), "{err:?}");
    }

    #[test]
    fn service_table_without_unique_key_is_fatal() {
        let (_dir, mut sink) = fresh();
        service_conn(&sink)
            .execute_batch("CREATE TABLE loose (id TEXT, v INTEGER)")
            .unwrap();
        let err = apply(&mut sink, &[del(1, "loose", "a")]).unwrap_err();
        assert!(
            matches!(&err, SinkError::Fatal { reason } if reason.contains("UNIQUE")),
            "{err:?}"
        );
        // A unique index is enough.
        service_conn(&sink)
            .execute_batch("CREATE UNIQUE INDEX loose_id ON loose (id)")
            .unwrap();
        apply(&mut sink, &[up(1, "loose", "a", &[("v", Value::I64(1))])]).unwrap();
        apply(&mut sink, &[up(2, "loose", "a", &[("v", Value::I64(2))])]).unwrap();
        assert_eq!(
            sink.read_table("loose").unwrap(),
            vec![row(&[("id", Value::from("a")), ("v", Value::I64(2))])]
        );
    }

    #[test]
    fn hostile_names_are_quoted() {
        let (_dir, mut sink) = fresh();
        let evil = r#"we"ird col; DROP TABLE jetsync_offsets; --"#;
        apply(
            &mut sink,
            &[
                up(
                    1,
                    "t",
                    "k'1",
                    &[(evil, Value::from("v")), ("with space", Value::I64(1))],
                ),
                up(2, "t", "k\"2", &[("select", Value::I64(2))]),
            ],
        )
        .unwrap();
        let rows = sink.read_table("t").unwrap();
        assert_eq!(rows.len(), 2);
        // Ordered by key: '"' sorts before '\''.
        assert_eq!(rows[0].get("id"), Some(&Value::from("k\"2")));
        assert_eq!(rows[0].get("select"), Some(&Value::I64(2)));
        assert_eq!(rows[1].get("id"), Some(&Value::from("k'1")));
        assert_eq!(rows[1].get(evil), Some(&Value::from("v")));
        assert_eq!(rows[1].get("with space"), Some(&Value::I64(1)));
        assert_eq!(run(sink.fence(G)).unwrap(), Some(2));
        apply(&mut sink, &[del(3, "t", "k'1")]).unwrap();
        assert_eq!(sink.read_table("t").unwrap().len(), 1);

        let err = apply(
            &mut sink,
            &[up(4, "t", "x", &[("nul\0byte", Value::I64(1))])],
        )
        .unwrap_err();
        assert!(
            matches!(err, SinkError::Rejected { index: 0, .. }),
            "{err:?}"
        );
        let err = apply(&mut sink, &[up(4, "t", "x", &[("", Value::I64(1))])]).unwrap_err();
        assert!(
            matches!(err, SinkError::Rejected { index: 0, .. }),
            "{err:?}"
        );
        for table in ["jetsync_offsets", "sqlite_master"] {
            let err =
                apply(&mut sink, &[up(4, table, "x", &[("seq", Value::I64(1))])]).unwrap_err();
            assert!(matches!(err, SinkError::Rejected { .. }), "{err:?}");
            let err = apply(&mut sink, &[del(4, table, G)]).unwrap_err();
            assert!(matches!(err, SinkError::Rejected { .. }), "{err:?}");
        }
        assert_eq!(run(sink.fence(G)).unwrap(), Some(3));
    }

    #[test]
    fn digest_does_not_depend_on_batch_split() {
        let changes: Vec<Change> = (1..=60u64)
            .map(|seq| {
                let key = (seq % 7).to_string();
                match seq % 5 {
                    0 => del(seq, "b", &key),
                    1 => up(seq, "b", &key, &[("v", Value::I64(seq as i64))]),
                    _ => up(seq, "a", &key, &[("s", Value::from(format!("s{seq}")))]),
                }
            })
            .collect();
        let (_d1, mut one) = fresh();
        apply(&mut one, &changes).unwrap();
        let (_d2, mut many) = fresh();
        for chunk in changes.chunks(7) {
            apply(&mut many, chunk).unwrap();
        }
        let d1 = run(one.digest()).unwrap();
        assert_eq!(d1, run(many.digest()).unwrap());
        assert_eq!(
            d1.iter().map(|d| d.table.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        // And it does see a difference.
        apply(
            &mut many,
            &[up(61, "a", "0", &[("s", Value::from("changed"))])],
        )
        .unwrap();
        assert_ne!(d1, run(many.digest()).unwrap());
    }

    #[test]
    fn service_reads_while_sink_is_open() {
        let (_dir, mut sink) = fresh();
        apply(&mut sink, &[up(1, "t", "a", &[("v", Value::I64(1))])]).unwrap();
        let reader = service_conn(&sink);
        let mode: String = reader
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        // A long read transaction does not block the applier (WAL), and sees a stable snapshot.
        reader.execute_batch("BEGIN").unwrap();
        let count = |c: &Connection| -> i64 {
            c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count(&reader), 1);
        apply(&mut sink, &[up(2, "t", "b", &[("v", Value::I64(2))])]).unwrap();
        assert_eq!(count(&reader), 1);
        reader.execute_batch("COMMIT").unwrap();
        assert_eq!(count(&reader), 2);
    }

    #[test]
    fn busy_database_is_unavailable_and_retry_succeeds() {
        let (_dir, mut sink) = fresh();
        sink.set_busy_timeout(Duration::from_millis(20)).unwrap();
        let writer = service_conn(&sink);
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        let batch = [up(1, "t", "a", &[("v", Value::I64(1))])];
        let err = apply(&mut sink, &batch).unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        writer.execute_batch("ROLLBACK").unwrap();
        apply(&mut sink, &batch).unwrap();
        assert_eq!(run(sink.fence(G)).unwrap(), Some(1));
    }

    #[test]
    fn column_added_by_the_service_is_nulled_by_later_upserts() {
        let (_dir, mut sink) = fresh();
        apply(&mut sink, &[up(1, "t", "a", &[("v", Value::I64(1))])]).unwrap();
        service_conn(&sink)
            .execute_batch("ALTER TABLE t ADD COLUMN extra TEXT; UPDATE t SET extra = 'x'")
            .unwrap();
        apply(&mut sink, &[up(2, "t", "a", &[("v", Value::I64(2))])]).unwrap();
        assert_eq!(
            sink.read_table("t").unwrap(),
            vec![row(&[
                ("id", Value::from("a")),
                ("v", Value::I64(2)),
                ("extra", Value::Null)
            ])]
        );
    }

    #[test]
    fn open_fails_fatally_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"not a database, definitely not one at all......").unwrap();
        for path in [file.join("sub/r.sqlite"), file.clone()] {
            let err = SqliteSink::open(SqliteOptions::new(&path)).unwrap_err();
            match err {
                SinkError::Fatal { reason } => {
                    assert!(reason.contains(&path.display().to_string()), "{reason}")
                }
                other => panic!("expected Fatal, got {other:?}"),
            }
        }
    }

    #[test]
    fn thousand_event_batch_is_fast() {
        let (_dir, mut sink) = fresh();
        let batch = |base: u64| -> Vec<Change> {
            (0..1000u64)
                .map(|i| {
                    up(
                        base + i,
                        "bulk",
                        &(i % 800).to_string(),
                        &[
                            ("name", Value::from(format!("item {i}"))),
                            ("price", Value::F64(i as f64 / 4.0)),
                            ("qty", Value::I64(i as i64)),
                        ],
                    )
                })
                .collect()
        };
        apply(&mut sink, &batch(1)).unwrap(); // creates the table, warms the statement cache
        let second = batch(1001);
        let started = std::time::Instant::now();
        apply(&mut sink, &second).unwrap();
        let elapsed = started.elapsed();
        eprintln!("1000-event batch applied in {elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert_eq!(sink.read_table("bulk").unwrap().len(), 800);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn works_on_a_multi_threaded_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open_at(&dir.path().join("r.sqlite"));
        let handle = tokio::spawn(async move {
            sink.apply(G, &[up(1, "t", "a", &[("v", Value::I64(1))])], 1)
                .await
                .unwrap();
            sink.fence(G).await.unwrap()
        });
        assert_eq!(handle.await.unwrap(), Some(1));
    }
}
