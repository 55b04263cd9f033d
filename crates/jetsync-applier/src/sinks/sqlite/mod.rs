//! The SQLite sink: the applier binary's default destination.
//!
//! One SQLite file per instance. The applier is its only writer; the service reads it with any
//! SQLite driver at the same time (WAL mode, so readers never block the writer and never see a
//! half-applied batch). The file is created readable by its owner only (0600 on Unix).
//!
//! **Tables** (`scope.rs`). Only *synced tables* are written, created or cleared: the configured
//! ones ([`SqliteOptions::key_columns`]) and, with [`SqliteOptions::any_table`]
//! (`apply.other_tables = "create"`), every table the sink created itself. A change for another
//! table is [`SinkError::Rejected`] ("table not synced here"). The applier's own tables
//! (`jetsync_*`), SQLite's (`sqlite_*`), views, virtual tables and their shadow tables are never
//! written, whatever the configuration; a service's other tables in the file are never touched.
//!
//! **Columns** (`schema.rs`). A table is created on its first upsert from that row's columns,
//! unless it exists (a table the service created itself is used as it is; its key column must
//! be its single-column primary key or carry a unique index). Columns an event carries that the
//! table lacks are added with `ALTER TABLE ADD COLUMN` (additive schema evolution); nothing is
//! ever dropped or retyped. Columns the sink creates have **no declared type**, so SQLite
//! never converts a value: it keeps the type it has in the event (integer, real, text, blob,
//! null; a boolean as the integer 0 or 1, JSON as its canonical text) in every instance,
//! whichever events an instance happened to see first. The key column holds the subject key as
//! text.
//!
//! *Files written by an older jetsync* keep working, but a table it created keeps the affinities
//! it was given (a column first seen with an integer has INTEGER affinity and stores `'5'` as
//! 5), so such a table can still differ from an instance that created it afresh. To migrate,
//! resync into a new file: stop the applier, point `sink.path` at a new file (or move the old
//! one away) and start it; it finds fence 0 and an empty file and bootstraps from a snapshot.
//!
//! **Rows** (`write.rs`). An upsert replaces the whole row: every column the event does not
//! carry becomes NULL, so that replaying history and bootstrapping from a snapshot end in the
//! same state. A key the key column would convert (`042` into an INTEGER column) is rejected,
//! so two subjects never write one row.
//!
//! **Fence** (`fence.rs`). Table `jetsync_offsets (stream, seq)` holds, per sync group, the
//! highest stream sequence whose effects are in the file; it never decreases.
//! [`Sink::apply`] writes the rows and the fence in one `BEGIN IMMEDIATE … COMMIT` transaction.
//! The crash windows are therefore:
//!
//! - killed before `COMMIT` completes: SQLite rolls the transaction back on the next open (or
//!   the WAL frames of an uncommitted transaction are simply ignored), so no row of the batch is
//!   visible and the fence is unchanged; the engine replays the whole batch after the fence.
//! - killed after `COMMIT`: rows and fence moved together; the engine resumes after the new fence,
//!   whatever its redb checkpoint says, so nothing is applied twice.
//!
//! There is no window in which rows are committed without the fence or the other way round.
//!
//! **Replace** (snapshot resync, streamed). [`Sink::replace_begin`] opens one `BEGIN IMMEDIATE`
//! transaction and empties every synced table (`DELETE`, not `DROP`, so the service's schema,
//! indexes and triggers stay); each [`Sink::replace_chunk`] writes its rows inside a savepoint
//! and drops them (nothing accumulates in memory across chunks); [`Sink::replace_commit`] writes
//! the fence and commits. Crash windows: killed at any point before that `COMMIT` completes,
//! the whole replacement is rolled back, the old contents and fence are all there and the
//! engine starts the resync over; after it, new contents and fence moved together. Readers see
//! the old contents until the `COMMIT` and the new ones after it, never a half-empty table. A
//! rejected change rolls back to its chunk's savepoint only, and the replacement stays open.
//!
//! **Errors** (`errors.rs`). A failure of the whole file (busy or locked, disk full, I/O error,
//! unwritable, read-only, damaged, out of memory) is [`SinkError::Unavailable`]: the transaction
//! is rolled back and the engine retries the same batch. Any other failure while applying a
//! change (a constraint or `CHECK` the service defined, a `STRICT` type mismatch, a value too
//! big, too many columns, a view or a table without a usable key, a table not synced here) is
//! [`SinkError::Rejected`] with its index, and nothing of the batch remains. What an event
//! contains never makes the sink fail with [`SinkError::Fatal`].

mod checkpoint;
mod connection;
mod digest;
mod errors;
mod fence;
mod options;
mod schema;
mod scope;
mod write;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::time::Duration;

use jetsync::Row;
use rusqlite::Connection;

use self::checkpoint::Checkpointer;
use self::errors::{sink_error, Error};
use self::schema::SchemaCache;
use crate::{Change, Sink, SinkError, TableDigest};

pub(crate) use self::connection::busy_wait;
pub use self::options::SqliteOptions;

/// A sink writing synced tables into one SQLite file (WAL mode), which the service reads with any
/// SQLite driver while the applier writes.
///
/// Tables are created on first upsert from the row's columns (without type affinity) unless they
/// exist; new columns are added with `ALTER TABLE ADD COLUMN`; an upsert replaces the whole row
/// (columns it lacks become NULL). Every [`Sink::apply`] is one transaction that also moves the
/// group's fence in table `jetsync_offsets`: before its COMMIT nothing of the batch is visible and
/// the fence is unchanged, after it rows and fence moved together, so a crash at any point loses
/// nothing and applies nothing twice.
#[derive(Debug)]
pub struct SqliteSink {
    conn: Connection,
    options: SqliteOptions,
    schema: SchemaCache,
    /// The sync group whose replacement (snapshot resync) is open, if any: the connection is
    /// inside its transaction between `replace_begin` and `replace_commit`/`replace_abort`.
    replacing: Option<String>,
    /// The thread that checkpoints the WAL off the writer's thread (`checkpoint.rs`); `None`
    /// for an in-memory database, or when it could not be started.
    _checkpointer: Option<Checkpointer>,
}

impl SqliteSink {
    /// Opens (or creates, readable by the owner only) the database file, switches it to WAL mode
    /// and creates the applier's tables (`jetsync_offsets`, `jetsync_tables`).
    ///
    /// Fails with [`SinkError::Fatal`], naming the path and the cause, when a key column name is
    /// unusable, or the file or its directory cannot be created or opened, or is not an SQLite
    /// database.
    pub fn open(options: SqliteOptions) -> Result<SqliteSink, SinkError> {
        options
            .validate()
            .map_err(|reason| SinkError::Fatal { reason })?;
        let mut conn = connection::open(&options.path)?;
        let checkpointer = if options.path.as_os_str() == ":memory:" {
            None
        } else {
            Checkpointer::start(&options.path, &mut conn)
        };
        tracing::debug!(path = %options.path.display(), "opened SQLite sink");
        Ok(SqliteSink {
            conn,
            options,
            schema: SchemaCache::default(),
            replacing: None,
            _checkpointer: checkpointer,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.options.path
    }

    /// The options the sink was opened with.
    pub fn options(&self) -> &SqliteOptions {
        &self.options
    }

    /// Changes how long a statement waits for a lock held by another connection before the
    /// operation fails with [`SinkError::Unavailable`] (5 s by default).
    pub fn set_busy_timeout(&mut self, timeout: Duration) -> Result<(), SinkError> {
        self.conn
            .busy_timeout(timeout)
            .map_err(|e| self.error("set the busy timeout", Error::Sql(e)))
    }

    /// All rows of `table` as they are stored, ordered by the table's key column (in storage
    /// order when the table has no such column). Values map back by their storage class:
    /// INTEGER → `I64`, REAL → `F64`, TEXT → `Text`, BLOB → `Bytes`, NULL → `Null`; a table
    /// that does not exist reads as empty. Any table can be read, synced or not.
    pub fn read_table(&self, table: &str) -> Result<Vec<Row>, SinkError> {
        let read = || -> Result<Vec<Row>, Error> {
            let columns = schema::raw_columns(&self.conn, table)?;
            if columns.is_empty() {
                return Ok(Vec::new());
            }
            let key_column = self.options.key_column(table);
            let order_by = columns
                .iter()
                .map(|(name, ..)| name.as_str())
                .find(|name| name.eq_ignore_ascii_case(key_column));
            let mut rows = Vec::new();
            digest::for_each_row(&self.conn, table, order_by, |row| rows.push(row))?;
            Ok(rows)
        };
        read().map_err(|e| self.error(&format!("read table `{table}` of"), e))
    }

    /// Sets the fence of `group` to exactly `seq`, even below its current value: the explicit
    /// operator rewind of `reset --to-seq` (the next run applies the events after `seq` again).
    /// [`Sink::set_fence`] is this; every other fence write only ever raises it.
    pub fn rewind_fence(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        let seq = fence::to_sql(seq)?;
        self.replacing = None;
        let result = (|| -> Result<(), Error> {
            connection::begin_immediate(&self.conn)?;
            fence::set_exactly(&self.conn, group, seq)?;
            connection::commit(&self.conn)?;
            Ok(())
        })();
        result.map_err(|e| {
            connection::rollback(&self.conn);
            self.error("rewind the fence in", e)
        })
    }

    fn read_fence(&self, group: &str) -> Result<Option<u64>, SinkError> {
        let seq =
            fence::read(&self.conn, group).map_err(|e| self.error("read the fence from", e))?;
        seq.map(|seq| {
            u64::try_from(seq).map_err(|_| SinkError::Fatal {
                reason: format!(
                    "{}: jetsync_offsets holds the negative sequence {seq} for `{group}`; \
                     fix it with `jetsync-applier reset --to-seq`",
                    self.options.path.display()
                ),
            })
        })
        .transpose()
    }

    /// Runs `read` in one read transaction (so all tables are read at the same point in time
    /// even if the service writes meanwhile), or inside the open replacement.
    fn read<R>(&self, read: impl FnOnce(&Connection) -> Result<R, Error>) -> Result<R, Error> {
        if !self.conn.is_autocommit() {
            return read(&self.conn);
        }
        self.conn.execute_batch("BEGIN")?;
        let result = read(&self.conn);
        connection::rollback(&self.conn);
        result
    }

    /// One batch in one transaction with the fence ([`Sink::apply`]).
    fn write_batch(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        let fence = fence::to_sql(last_seq)?;
        // A batch outside a replacement ends any replacement left open (rolled back).
        self.replacing = None;
        let result = self.write_in_transaction(group, changes, fence);
        if result.is_err() {
            connection::rollback(&self.conn);
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
    ) -> Result<(), SinkError> {
        let SqliteSink {
            conn,
            options,
            schema,
            ..
        } = self;
        let options = &*options;
        let op_error = |what: &str, e: Error| sink_error(&options.path, what, e, None);
        connection::begin_immediate(conn)
            .map_err(|e| op_error("begin a transaction on", e.into()))?;
        schema
            .revalidate(conn)
            .map_err(|e| op_error("read the schema of", e))?;
        // Capture: skip the changes of rows whose newer local change is still pending.
        let pending = crate::capture::pending::load_sqlite(conn, changes)
            .map_err(|e| op_error("read", e.into()))?;
        let kept = pending.keep(changes)?;
        let applied = kept.as_ref().map_or(changes, |k| k.changes.as_slice());
        write::apply_changes(conn, schema, options, applied)
            .map_err(|e| crate::capture::pending::reposition(e, kept.as_ref()))?;
        crate::capture::pending::settle_sqlite(conn, &pending, fence)
            .map_err(|e| op_error("write", e.into()))?;
        fence::advance(conn, group, fence).map_err(|e| op_error("write the fence to", e))?;
        schema
            .after_ddl(conn)
            .map_err(|e| op_error("read the schema of", e))?;
        // Crash window: before this COMMIT completes, nothing of the batch is visible and the
        // fence is unchanged; after it, rows and fence moved together.
        connection::commit(conn).map_err(|e| op_error("commit a batch to", e.into()))?;
        Ok(())
    }

    fn begin_replacement(&mut self, group: &str) -> Result<(), SinkError> {
        self.replacing = None;
        let SqliteSink {
            conn,
            options,
            schema,
            ..
        } = self;
        let options = &*options;
        let result = (|| -> Result<(), Error> {
            connection::begin_immediate(conn)?;
            schema.revalidate(conn)?;
            // Crash window: from here to the COMMIT in `commit_replacement`, a crash rolls
            // everything back; the old contents and fence stay.
            scope::clear_synced(conn, options)
        })();
        match result {
            Ok(()) => {
                self.replacing = Some(group.to_owned());
                Ok(())
            }
            Err(e) => {
                connection::rollback(&self.conn);
                self.schema.clear();
                Err(self.error("begin replacing the synced tables of", e))
            }
        }
    }

    /// Fails unless the replacement of `group` is open.
    fn check_replacing(&mut self, group: &str) -> Result<(), SinkError> {
        match &self.replacing {
            Some(open) if open == group && !self.conn.is_autocommit() => Ok(()),
            Some(open) if open == group => {
                // A service trigger's RAISE(ROLLBACK) or an ON CONFLICT ROLLBACK constraint
                // ended the whole transaction while rejecting a change.
                self.replacing = None;
                self.schema.clear();
                Err(SinkError::Unavailable {
                    reason: format!(
                        "the replacement of the synced tables of {} was rolled back by the \
                         database (a ROLLBACK constraint or trigger); the resync starts over",
                        self.options.path.display()
                    ),
                })
            }
            _ => Err(SinkError::Fatal {
                reason: format!(
                    "no replacement of `{group}` is open in {}: call replace_begin first",
                    self.options.path.display()
                ),
            }),
        }
    }

    fn replacement_chunk(&mut self, group: &str, changes: &[Change]) -> Result<(), SinkError> {
        self.check_replacing(group)?;
        let SqliteSink {
            conn,
            options,
            schema,
            ..
        } = self;
        let options = &*options;
        let op_error = |what: &str, e: Error| sink_error(&options.path, what, e, None);
        let mut result = conn
            .execute_batch("SAVEPOINT jetsync_chunk")
            .map_err(|e| op_error("begin a chunk in", e.into()));
        if result.is_ok() {
            result = write::apply_changes(conn, schema, options, changes);
        }
        if result.is_ok() {
            result = conn
                .execute_batch("RELEASE jetsync_chunk")
                .map_err(|e| op_error("finish a chunk in", e.into()))
                .and_then(|()| {
                    schema
                        .after_ddl(conn)
                        .map_err(|e| op_error("read the schema of", e))
                });
        }
        let Err(error) = result else {
            return Ok(());
        };
        if matches!(error, SinkError::Rejected { .. }) && !conn.is_autocommit() {
            // Undo this chunk only; the replacement stays open for the chunk without the
            // rejected change. The rollback may undo our own DDL: forget the schema.
            let undone = conn
                .execute_batch("ROLLBACK TO jetsync_chunk; RELEASE jetsync_chunk")
                .map_err(Error::from)
                .and_then(|()| {
                    schema.clear();
                    schema.revalidate(conn)
                });
            match undone {
                Ok(()) => return Err(error),
                Err(e) => {
                    connection::rollback(conn);
                    self.replacing = None;
                    self.schema.clear();
                    return Err(self.error("undo a rejected chunk in", e));
                }
            }
        }
        if !matches!(error, SinkError::Rejected { .. }) {
            // Anything else ends the replacement.
            connection::rollback(&self.conn);
            self.replacing = None;
        }
        // A rejection that rolled back the whole transaction leaves `replacing` set, so the
        // next call reports that the replacement is gone (see `check_replacing`).
        self.schema.clear();
        Err(error)
    }

    fn commit_replacement(&mut self, group: &str, last_seq: u64) -> Result<(), SinkError> {
        self.check_replacing(group)?;
        let seq = fence::to_sql(last_seq)?;
        self.replacing = None;
        let result = (|| -> Result<(), Error> {
            fence::advance(&self.conn, group, seq)?;
            self.schema.after_ddl(&self.conn)?;
            // Crash window: before this COMMIT completes, the old contents and fence are all
            // there; after it, the new contents and fence.
            connection::commit(&self.conn)?;
            Ok(())
        })();
        result.map_err(|e| {
            connection::rollback(&self.conn);
            self.schema.clear();
            self.error("commit the replacement of the synced tables of", e)
        })
    }

    fn abort_replacement(&mut self) {
        if self.replacing.take().is_some() {
            connection::rollback(&self.conn);
            self.schema.clear();
        }
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
        blocking(|| {
            self.read(|conn| digest::is_empty(conn, &self.options))
                .map_err(|e| self.error("check for rows in", e))
        })
    }

    async fn apply(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        blocking(|| self.write_batch(group, changes, last_seq))
    }

    async fn replace_begin(&mut self, group: &str) -> Result<(), SinkError> {
        blocking(|| self.begin_replacement(group))
    }

    async fn replace_chunk(&mut self, group: &str, changes: &[Change]) -> Result<(), SinkError> {
        blocking(|| self.replacement_chunk(group, changes))
    }

    async fn replace_commit(&mut self, group: &str, last_seq: u64) -> Result<(), SinkError> {
        blocking(|| self.commit_replacement(group, last_seq))
    }

    async fn replace_abort(&mut self, _group: &str) {
        blocking(|| self.abort_replacement());
    }

    async fn set_fence(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        blocking(|| self.rewind_fence(group, seq))
    }

    async fn digest(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        blocking(|| {
            self.read(|conn| digest::digest(conn, &self.options))
                .map_err(|e| self.error("compute the digest of", e))
        })
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
