//! The Postgres sink: applies synced tables into the service's own, existing Postgres database.
//!
//! **Tables.** Unlike the SQLite sink, this sink does not own its tables: it writes into tables
//! the service created (in schema [`PostgresOptions::schema`], `public` by default) and never
//! creates, alters or drops one. An event for a table that does not exist is
//! [`SinkError::Rejected`] (poison) with a message naming the table. The key column is
//! configurable per table ([`PostgresOptions::key_columns`]) and must carry a PRIMARY KEY, a
//! UNIQUE constraint or a full unique index on that column alone (`ON CONFLICT` needs one); a
//! table without one is [`SinkError::Fatal`].
//!
//! **Columns.** An upsert is `INSERT … ON CONFLICT (key) DO UPDATE SET` of exactly the columns
//! the event carries: columns it does not carry keep their value on update and get their
//! default on insert. This differs on purpose from the SQLite sink (which owns its tables and
//! makes an upsert replace the whole row): a service's table may hold columns the events never
//! carry (`updated_at timestamptz default now()`, a column only the local service writes), and
//! those must not be wiped by every replicated event. Columns an event carries that the table
//! lacks are rejected naming the column (`unknown_columns = "error"`, the default) or dropped
//! (`"ignore"`). Values events carry for columns the table *generates* (`GENERATED ALWAYS AS
//! (…) STORED`) are ignored: the database computes them from the other columns. Identity
//! columns (`GENERATED ALWAYS AS IDENTITY`) are written with the replicated value
//! (`OVERRIDING SYSTEM VALUE`). Column names match exactly, else ASCII-case-insensitively when
//! that names exactly one column.
//!
//! **Types.** Columns are discovered from `pg_attribute` (types resolved through domains),
//! cached per table, and looked up again when a change does not fit the cached description
//! (an unknown column, a value that does not convert, a missing key) or the database reports a
//! schema error. Each [`Value`] is converted to its column's type before anything is sent:
//!
//! | column type | accepted values |
//! | --- | --- |
//! | `smallint`, `integer`, `bigint` | `I64` (range-checked), `Text` of an integer, `F64` without fraction |
//! | `real`, `double precision` | `F64`, `I64`, `Text` of a number |
//! | `numeric` | `I64`, `F64`, `Text` of a number (sent as text, cast by the database) |
//! | `text`, `varchar`, `char`, `name` | `Text`; `I64`, `F64`, `Bool` and `Json` as their text |
//! | `boolean` | `Bool`, `I64` 0 or 1, `Text` `true`/`false`/`t`/`f`/`1`/`0` |
//! | `bytea` | `Bytes` |
//! | `json`, `jsonb` | `Json`; `Text` that parses as JSON (else the JSON string); `I64`, `F64`, `Bool` |
//! | `timestamptz` | `Text` RFC 3339 (without offset: UTC), `I64` milliseconds since the Unix epoch |
//! | `timestamp` | the same; an instant with an offset is stored as its UTC wall-clock time |
//! | `date` | `Text` `YYYY-MM-DD`, or an instant (RFC 3339 text, epoch ms) as its UTC date |
//! | `uuid` | `Text` of a UUID, `Bytes` of length 16 |
//! | anything else (enums, `inet`, arrays, …) | `Text` in the type's input syntax; `I64`, `F64`, `Bool`, `Json` as text |
//!
//! `Null` fits every column. `infinity`/`-infinity` are accepted for timestamps and dates. A
//! value that does not convert makes its change [`SinkError::Rejected`] (poison), never Fatal.
//! The subject key (text) is converted to the key column's type the same way, so integer, text
//! and uuid keys all work for upserts and deletes; when a row carries its key column, that
//! value must equal the subject key.
//!
//! **Batches.** A batch is one transaction: consecutive changes of the same table, operation
//! and set of carried columns become one multi-row statement (`INSERT … SELECT … FROM
//! unnest($1, $2, …) ON CONFLICT …`, `DELETE … WHERE key IN (SELECT … FROM unnest($1))`), with
//! one array parameter per column typed to the column, and all statements plus the fence upsert
//! are pipelined on the connection, so a batch costs two round trips (statements, then COMMIT)
//! whatever its size. A group is split where the same key comes again (`ON CONFLICT` cannot
//! touch one row twice in a statement, and every change is still executed, so what is rejected
//! does not depend on how the stream was split into batches) and where the column set changes
//! (two upserts carrying different columns cannot be merged into one).
//!
//! **Fence.** Table `jetsync_offsets (stream text primary key, seq bigint not null)` in the
//! configured schema, created at connect when missing, is written in the same transaction as
//! the rows. Crash windows:
//!
//! - the process dies (or the connection drops) before `COMMIT` reached the server: Postgres
//!   rolls the transaction back, nothing of the batch is visible, the fence is unchanged; the
//!   engine replays the batch after the fence.
//! - it dies after `COMMIT` completed: rows and fence moved together; the engine resumes after
//!   the fence, so nothing is applied twice.
//! - the process dies or the connection drops *while* `COMMIT` is in flight: the old backend
//!   may still execute that COMMIT after the client is gone. So every session takes a
//!   session-level advisory lock per (schema, stream) before it writes, which the old backend
//!   holds until the server has finished with it; while it is held the sink is
//!   [`SinkError::Unavailable`] and the engine retries. A new session that gets the lock
//!   re-reads the fence, and the changes at or below a fence the old session moved are not
//!   applied again (they are in the database already), so a batch is never applied twice, side
//!   effects such as triggers included.
//!
//! The fence is written as given: `parked retry` applies parked (lower) sequences with the
//! current fence as `last_seq`, which leaves the fence where it is.
//!
//! **Replace.** [`Sink::replace`] (snapshot resync) runs as one such transaction, preceded by
//! one statement that `DELETE`s every row of the synced tables: the configured tables
//! ([`PostgresOptions::key_columns`], what [`Sink::digest`] and [`Sink::is_empty`] look at) and
//! every existing table the changes name. `DELETE`, not `TRUNCATE` (whose ACCESS EXCLUSIVE lock
//! would block the service's readers): readers see the old rows until `COMMIT` and the new ones
//! after it. The service's delete triggers and `ON DELETE` actions of foreign keys from its other
//! tables run as for any delete (an `ON DELETE CASCADE` empties the referencing rows too; a
//! restricting foreign key from a table that is not synced makes the replace
//! [`SinkError::Fatal`]). Columns the events do not carry get their defaults again, as on a
//! fresh insert.
//!
//! **Errors.** Connection loss, admin shutdown, serialization failures (40001), deadlocks
//! (40P01), lock timeouts, a full disk or too many connections are [`SinkError::Unavailable`]:
//! the transaction is rolled back (or died with the connection), and the next call reconnects.
//! A change the database refuses for good (23xxx constraint violations, 22xxx data exceptions
//! such as 22P02 or 22003, 42804 datatype mismatch, an undefined column, an exception raised by
//! a trigger) is [`SinkError::Rejected`] with its index and nothing of the batch applied: when a
//! multi-row statement fails the sink cannot tell which row did, so it rolls back and applies the
//! batch again one change per statement in a fresh transaction, which identifies the first
//! failing change (this slow path runs only after such a failure). Missing privileges, a missing
//! schema or a table without a usable key are [`SinkError::Fatal`] with what to fix.
//!
//! **Server.** PostgreSQL 12 or newer (generated columns are read from `pg_attribute`); no TLS.
//! The user of the URL needs `SELECT, INSERT, UPDATE, DELETE` on the synced tables and on
//! `jetsync_offsets`, and `CREATE` on the schema only while `jetsync_offsets` does not exist.
//!
//! **Digest and emptiness.** Only the tables listed in [`PostgresOptions::key_columns`] (the
//! configured `[tables.*]`) are considered: the service's database holds many other tables.
//! [`Sink::digest`] reads every column of those tables (including columns the events do not
//! carry, so a column such as `updated_at default now()` makes instances' digests differ),
//! mapping integers to `I64`, floats to `F64`, `numeric` to `Text`, `boolean` to `Bool`, text
//! types to `Text`, `bytea` to `Bytes`, `json`/`jsonb` to `Json`, `timestamptz` to RFC 3339
//! `Text` in UTC (`2024-05-01T12:00:00.5Z`), `timestamp` to `Text` without offset, `date` to
//! `Text` `YYYY-MM-DD`, `uuid` to lowercase `Text` and every other type to its text form.

use super::sql::{push_quoted, quote};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use futures::future::{maybe_done, BoxFuture, FutureExt};
use futures::TryStreamExt;
use jetsync::{Row, UnknownColumns, Value};
use tokio_postgres::config::Host;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls};

use crate::{Change, DigestBuilder, Sink, SinkError, TableDigest};

/// The advisory lock key of sync group `group` in `schema` (64-bit FNV-1a of both).
fn advisory_key(schema: &str, group: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in "jetsync\0"
        .bytes()
        .chain(schema.bytes())
        .chain([0])
        .chain(group.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// Name of the fence table; also why `jetsync_*` table names are reserved.
const FENCE_TABLE: &str = "jetsync_offsets";
/// Prefix of table names that never hold synced rows.
const RESERVED_PREFIX: &str = "jetsync_";
/// Connect timeout when the URL sets none (`connect_timeout=` in the URL overrides it).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive idle time when the URL keeps the driver's default of two hours, so that a
/// vanished server is noticed while a batch waits for an answer.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(60);
/// Seconds from the Unix epoch to Postgres' epoch, 2000-01-01.
const PG_EPOCH_SECS: i64 = 946_684_800;

/// Configuration of the Postgres sink.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Connection URL, `postgres://user:password@host:5432/database` (any libpq-style URL or
    /// key/value string tokio-postgres accepts). TLS is not supported: `sslmode=require` fails.
    pub url: String,
    /// Schema of the synced tables and of `jetsync_offsets`, usually `public`.
    pub schema: String,
    /// Key column per table (table name → column). These tables are also the ones
    /// [`Sink::is_empty`] and [`Sink::digest`] look at.
    pub key_columns: BTreeMap<String, String>,
    /// Key column of every table not listed in [`key_columns`](Self::key_columns), usually `id`.
    pub default_key_column: String,
    /// What to do with a column an event carries that the table lacks.
    pub unknown_columns: UnknownColumns,
}

impl PostgresOptions {
    /// Options for the database at `url`: schema `public`, key column `id` for every table,
    /// unknown columns rejected.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresOptions {
            url: url.into(),
            schema: "public".to_owned(),
            key_columns: BTreeMap::new(),
            default_key_column: jetsync::DEFAULT_KEY_COLUMN.to_owned(),
            unknown_columns: UnknownColumns::Error,
        }
    }

    /// The key column of `table`.
    pub fn key_column(&self, table: &str) -> &str {
        self.key_columns
            .get(table)
            .map_or(self.default_key_column.as_str(), String::as_str)
    }
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL usually carries a password.
        f.debug_struct("PostgresOptions")
            .field("url", &"<redacted>")
            .field("schema", &self.schema)
            .field("key_columns", &self.key_columns)
            .field("default_key_column", &self.default_key_column)
            .field("unknown_columns", &self.unknown_columns)
            .finish()
    }
}

/// A sink writing synced rows into the service's existing Postgres tables, with the fence in
/// table `jetsync_offsets` of the same transaction (see the module documentation for column
/// semantics, type conversions and crash windows).
///
/// Needs a tokio runtime: the connection runs as a spawned task.
pub struct PostgresSink {
    options: PostgresOptions,
    /// Boxed: the driver's configuration is large, and this sink sits in [`crate::AnySink`].
    config: Box<tokio_postgres::Config>,
    /// `user@host:port/database`, for messages (never the password).
    target: String,
    client: Option<Client>,
    /// A transaction may be open on `client` (a call was cancelled or failed mid-way): roll it
    /// back before the next use.
    in_transaction: bool,
    /// Existing tables the sink has looked at; a table missing from the database has no entry.
    tables: HashMap<String, Arc<TableInfo>>,
    /// Incremented per `apply`: tells which cached tables were looked up during this batch.
    generation: u64,
    /// Requests sent to the server (statements, BEGIN, COMMIT, ...).
    statements_sent: u64,
    fence_upsert: String,
    /// Per-group session state (boxed, like `config`, to keep [`crate::AnySink`] small).
    groups: Box<GroupState>,
}

/// What a [`PostgresSink`] knows per sync group.
#[derive(Default)]
struct GroupState {
    /// Groups whose advisory lock the current connection holds (see
    /// [`PostgresSink::lock_group`]).
    locked: HashSet<String>,
    /// The fence of each group as this sink last read or wrote it.
    known_fence: HashMap<String, u64>,
}

impl fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSink")
            .field("target", &self.target)
            .field("schema", &self.options.schema)
            .field(
                "connected",
                &self.client.as_ref().is_some_and(|c| !c.is_closed()),
            )
            .finish_non_exhaustive()
    }
}

impl PostgresSink {
    /// Connects to the database and creates `jetsync_offsets` in the configured schema when it
    /// is missing.
    ///
    /// Fails with [`SinkError::Unavailable`] when the server cannot be reached (or is starting
    /// up, or has no free connection), and with [`SinkError::Fatal`] saying what to fix when the
    /// URL is invalid, authentication fails, the database or schema does not exist or the user
    /// may not create the fence table. No message contains the password.
    pub async fn connect(options: PostgresOptions) -> Result<PostgresSink, SinkError> {
        validate_name("schema", &options.schema)?;
        validate_name("default key column", &options.default_key_column)?;
        for (table, column) in &options.key_columns {
            validate_name(&format!("key column of table `{table}`"), column)?;
        }
        let mut config: tokio_postgres::Config =
            options.url.parse().map_err(|e| SinkError::Fatal {
                reason: format!(
                    "sink.url is not a valid Postgres connection URL ({}); expected \
                     postgres://user:password@host:5432/database",
                    describe(&e)
                ),
            })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("jetsync-applier");
        }
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(KEEPALIVES_IDLE);
        }
        let target = describe_target(&config);
        let fence_upsert = format!(
            "INSERT INTO {}.{} (stream, seq) VALUES ($1, $2) \
             ON CONFLICT (stream) DO UPDATE SET seq = EXCLUDED.seq",
            quote(&options.schema),
            quote(FENCE_TABLE)
        );
        let mut sink = PostgresSink {
            options,
            config: Box::new(config),
            target,
            client: None,
            in_transaction: false,
            tables: HashMap::new(),
            generation: 0,
            statements_sent: 0,
            fence_upsert,
            groups: Box::default(),
        };
        sink.ensure_connected().await?;
        sink.ensure_fence_table().await?;
        tracing::debug!(target_db = %sink.target, schema = %sink.options.schema, "opened Postgres sink");
        Ok(sink)
    }

    /// The options the sink was built with.
    pub fn options(&self) -> &PostgresOptions {
        &self.options
    }

    /// How many requests (statements, BEGIN, COMMIT, ROLLBACK, schema look-ups) this sink has
    /// sent to the server since it was created; lets tests and benchmarks check that a batch is
    /// applied with a handful of statements rather than one per event.
    pub fn statements_sent(&self) -> u64 {
        self.statements_sent
    }

    /// All rows of `table` (in the configured schema) as the digest sees them, ordered by the
    /// table's key column; a table that does not exist reads as empty.
    pub async fn read_table(&mut self, table: &str) -> Result<Vec<Row>, SinkError> {
        self.ensure_connected().await?;
        self.load_tables(&[table.to_owned()]).await?;
        let Some(info) = self.tables.get(table).cloned() else {
            return Ok(Vec::new());
        };
        let mut rows = Vec::new();
        self.scan(&info, true, |row| rows.push(row)).await?;
        Ok(rows)
    }

    // ---- connection -------------------------------------------------------------------------

    /// Connects when there is no usable connection, and rolls back a transaction a cancelled or
    /// failed call left open.
    async fn ensure_connected(&mut self) -> Result<(), SinkError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            tracing::info!(target_db = %self.target, "Postgres connection lost; reconnecting");
            self.client = None;
        }
        if self.client.is_none() {
            self.in_transaction = false;
            // Advisory locks belong to the session that took them.
            self.groups.locked.clear();
            let (client, connection) = self
                .config
                .connect(NoTls)
                .await
                .map_err(|e| connect_error(&self.target, &self.config, &e))?;
            let target = self.target.clone();
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(target_db = %target, error = %describe(&e), "Postgres connection closed");
                }
            });
            self.client = Some(client);
        }
        if self.in_transaction {
            self.finish_transaction("ROLLBACK")
                .await
                .map_err(|e| self.op_error("roll back a transaction on", &e))?;
        }
        Ok(())
    }

    /// Takes the session-level advisory lock of `group` in this schema unless this connection
    /// holds it already; returns whether it was taken now.
    ///
    /// Why: a killed applier (or a dropped connection) can leave a COMMIT in the old backend's
    /// input that the server still executes after the client is gone. A new session reading the
    /// fence before that COMMIT lands would apply the batch a second time. The old session holds
    /// this lock until the server has finished with it (committed or rolled back, and ended), so
    /// a new session that gets the lock reads a fence that includes the old COMMIT if it
    /// happened. The lock is tried, not waited for: while it is held the sink is
    /// [`SinkError::Unavailable`] and the engine retries with backoff. It also keeps two
    /// appliers from writing the same group into the same schema.
    async fn lock_group(&mut self, group: &str) -> Result<bool, SinkError> {
        if self.groups.locked.contains(group) {
            return Ok(false);
        }
        let key = advisory_key(&self.options.schema, group);
        self.statements_sent += 1;
        let got: bool = self
            .client()?
            .query_typed_one("SELECT pg_try_advisory_lock($1)", &[(&key, Type::INT8)])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.op_error("take the applier's advisory lock on", &e))?;
        if !got {
            return Err(SinkError::Unavailable {
                reason: format!(
                    "{}: another session holds the applier lock of stream `{group}` in schema `{}` \
                     (a previous run's last commit still finishing, or another applier writing \
                     to this schema)",
                    self.target, self.options.schema
                ),
            });
        }
        self.groups.locked.insert(group.to_owned());
        Ok(true)
    }

    /// Before writing `group` up to `last_seq`: takes the group's lock. When it had to be taken
    /// again (a new connection) and `filter` is set, re-reads the fence: a batch the previous
    /// session committed after all (its COMMIT landed after the connection was lost, or after
    /// the process was killed) has moved it past the fence this sink knew. Returns that fence
    /// when it moved, so the changes up to it are not applied a second time.
    async fn prepare_write(
        &mut self,
        group: &str,
        last_seq: u64,
        filter: bool,
    ) -> Result<Option<u64>, SinkError> {
        if !self.lock_group(group).await? || !filter {
            return Ok(None);
        }
        let Some(known) = self.groups.known_fence.get(group).copied() else {
            return Ok(None);
        };
        if known >= last_seq {
            // `parked retry`: older events applied at the current fence.
            return Ok(None);
        }
        let fence = self.read_fence(group).await?.unwrap_or(0);
        if fence > known {
            tracing::info!(
                target_db = %self.target,
                stream = group,
                fence,
                known,
                "the previous session committed up to the fence after all; not applying that part again"
            );
            return Ok(Some(fence));
        }
        Ok(None)
    }

    fn client(&self) -> Result<&Client, SinkError> {
        self.client.as_ref().ok_or_else(|| SinkError::Unavailable {
            reason: format!("not connected to Postgres at {}", self.target),
        })
    }

    /// Sends COMMIT or ROLLBACK for the open transaction; a connection that cannot do that is
    /// dropped (the server rolls back what it had open).
    async fn finish_transaction(&mut self, sql: &str) -> Result<(), tokio_postgres::Error> {
        let Some(client) = self.client.as_ref() else {
            self.in_transaction = false;
            return Ok(());
        };
        self.statements_sent += 1;
        let result = client.batch_execute(sql).await;
        match &result {
            Ok(()) => self.in_transaction = false,
            // A COMMIT the server refused ends the transaction too (it rolls back).
            Err(e) if e.as_db_error().is_some() && !client.is_closed() => {
                self.in_transaction = false;
            }
            Err(_) => {
                self.client = None;
                self.in_transaction = false;
            }
        }
        result
    }

    fn op_error(&self, what: &str, e: &tokio_postgres::Error) -> SinkError {
        op_error(&self.target, &self.options.schema, what, e)
    }

    async fn ensure_fence_table(&mut self) -> Result<(), SinkError> {
        let qualified = format!("{}.{}", quote(&self.options.schema), quote(FENCE_TABLE));
        self.statements_sent += 2;
        let client = self.client()?;
        let exists: bool = client
            .query_typed_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[(&qualified, Type::TEXT)],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.op_error("look for the fence table in", &e))?;
        if exists {
            return Ok(());
        }
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {qualified} (stream text PRIMARY KEY, seq bigint NOT NULL)"
        );
        match client.batch_execute(&sql).await {
            Ok(()) => {
                tracing::info!(schema = %self.options.schema, "created table {FENCE_TABLE}");
                Ok(())
            }
            // Another applier created it at the same moment.
            Err(e) if matches!(sqlstate(&e), Some("42P07" | "23505")) => Ok(()),
            Err(e) => Err(match sqlstate(&e) {
                Some("3F000") => SinkError::Fatal {
                    reason: format!(
                        "schema `{}` does not exist in {}: create it (CREATE SCHEMA {}) or set \
                         sink.schema to the schema of the service's tables",
                        self.options.schema,
                        self.target,
                        quote(&self.options.schema)
                    ),
                },
                Some("42501") => SinkError::Fatal {
                    reason: format!(
                        "the user of sink.url may not create the fence table in schema `{}` of \
                         {} ({}): create it once as an owner with `{sql}` and grant the \
                         applier's user SELECT, INSERT, UPDATE on it",
                        self.options.schema,
                        self.target,
                        describe(&e)
                    ),
                },
                _ => self.op_error("create the fence table in", &e),
            }),
        }
    }

    // ---- schema discovery -------------------------------------------------------------------

    /// Looks `names` up in the database: present tables are (re)cached, tables that do not exist
    /// are forgotten.
    async fn load_tables(&mut self, names: &[String]) -> Result<(), SinkError> {
        if names.is_empty() {
            return Ok(());
        }
        const DISCOVER: &str = "\
            SELECT c.relname::text, a.attname::text, \
                   COALESCE(NULLIF(t.typbasetype, 0), a.atttypid), \
                   format_type(a.atttypid, a.atttypmod), \
                   a.attgenerated <> '', \
                   EXISTS (SELECT 1 FROM pg_index i \
                           WHERE i.indrelid = c.oid AND i.indisunique \
                             AND i.indpred IS NULL AND i.indexprs IS NULL \
                             AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum) \
            FROM pg_class c \
            JOIN pg_namespace n ON n.oid = c.relnamespace \
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
            JOIN pg_type t ON t.oid = a.atttypid \
            WHERE n.nspname = $1 AND c.relname = ANY($2) AND c.relkind IN ('r', 'p') \
            ORDER BY c.relname, a.attnum";
        self.statements_sent += 1;
        let client = self.client()?;
        let rows = client
            .query_typed(
                DISCOVER,
                &[
                    (&self.options.schema, Type::TEXT),
                    (&names, Type::TEXT_ARRAY),
                ],
            )
            .await
            .map_err(|e| self.op_error("read the columns of the synced tables in", &e))?;
        let mut found: BTreeMap<String, Vec<(ColumnInfo, bool)>> = BTreeMap::new();
        for row in rows {
            let parse = || -> Result<(String, ColumnInfo, bool), tokio_postgres::Error> {
                let oid: u32 = row.try_get(2)?;
                Ok((
                    row.try_get(0)?,
                    ColumnInfo {
                        name: row.try_get(1)?,
                        kind: Kind::from_oid(oid),
                        type_name: row.try_get(3)?,
                        generated: row.try_get(4)?,
                    },
                    row.try_get(5)?,
                ))
            };
            let (table, column, unique) = parse()
                .map_err(|e| self.op_error("read the columns of the synced tables in", &e))?;
            found.entry(table).or_default().push((column, unique));
        }
        for name in names {
            match found.remove(name) {
                Some(columns) => {
                    let info = TableInfo::new(
                        name,
                        self.options.key_column(name),
                        columns,
                        self.generation,
                    );
                    self.tables.insert(name.clone(), Arc::new(info));
                }
                None => {
                    self.tables.remove(name);
                }
            }
        }
        Ok(())
    }

    /// Plans `changes`, first looking up tables never seen, and looking a cached table up again
    /// (once per batch) before refusing a change or failing because of it: the service may have
    /// altered the table since it was cached.
    async fn plan_fresh(&mut self, changes: &[Change], grouped: bool) -> Result<Planned, Failure> {
        let mut unknown: Vec<String> = changes
            .iter()
            .map(|c| c.table.as_str())
            .filter(|t| !is_reserved_table(t) && !self.tables.contains_key(*t))
            .collect::<HashSet<_>>()
            .into_iter()
            .map(str::to_owned)
            .collect();
        unknown.sort();
        self.load_tables(&unknown).await.map_err(Failure::Sink)?;
        loop {
            let outcome = plan(changes, &self.tables, &self.options, grouped);
            let problem_table = match &outcome {
                Ok(planned) => planned
                    .refusal
                    .as_ref()
                    .map(|r| changes[r.index].table.as_str()),
                Err(fatal) => Some(fatal.table.as_str()),
            };
            if let Some(table) = problem_table {
                if self
                    .tables
                    .get(table)
                    .is_some_and(|t| t.generation != self.generation)
                {
                    let table = table.to_owned();
                    self.load_tables(&[table]).await.map_err(Failure::Sink)?;
                    continue;
                }
            }
            return outcome.map_err(|fatal| {
                Failure::Sink(SinkError::Fatal {
                    reason: format!("{}: {}", self.target, fatal.reason),
                })
            });
        }
    }

    // ---- applying ---------------------------------------------------------------------------

    /// One batch in one transaction with the fence: [`Sink::apply`] (`clear == false`) or
    /// [`Sink::replace`] (`clear == true`: the synced tables are emptied first, in the same
    /// transaction). Both share planning, the pipelined run and the slow path.
    async fn write_batch(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
        clear: bool,
    ) -> Result<(), SinkError> {
        let fence = seq_to_sql(last_seq)?;
        self.ensure_connected().await?;
        // Changes at or below a fence the previous session moved are in the database already
        // (a batch is ascending), so only the rest is applied; indices are reported against
        // the caller's slice.
        let offset = match self.prepare_write(group, last_seq, !clear).await? {
            Some(fence) => changes.iter().take_while(|c| c.seq <= fence).count(),
            None => 0,
        };
        self.write_slice(group, &changes[offset..], fence, clear)
            .await
            .map_err(|mut e| {
                if let SinkError::Rejected { index, .. } = &mut e {
                    *index += offset;
                }
                e
            })
    }

    /// [`Self::write_batch`] after the lock and fence checks.
    async fn write_slice(
        &mut self,
        group: &str,
        changes: &[Change],
        fence: i64,
        clear: bool,
    ) -> Result<(), SinkError> {
        self.generation += 1;
        let clear = if clear {
            self.clear_sql(changes).await?
        } else {
            None
        };
        let clear = clear.as_deref();
        let outcome = self
            .attempt(group, fence, clear, changes, Mode::Grouped)
            .await;
        let needs_slow_path = match outcome {
            Ok(()) => return Ok(()),
            Err(Failure::Sink(e)) => return Err(e),
            Err(Failure::Refused { index, reason }) => {
                return Err(rejected(changes, index, reason))
            }
            Err(Failure::Statement {
                index,
                single,
                error,
            }) => match classify(&error) {
                Class::Rejected if single => {
                    return Err(rejected(changes, index, describe(&error)))
                }
                Class::Rejected => true,
                Class::Schema => {
                    // Whatever we knew about the tables may be out of date.
                    self.tables.clear();
                    true
                }
                Class::Unavailable | Class::Fatal => {
                    return Err(self.op_error("apply a batch to", &error))
                }
            },
            Err(Failure::Other { what, error }) => match classify(&error) {
                // A deferred constraint failed at COMMIT: find the change.
                Class::Rejected if what == "commit" => true,
                _ => return Err(self.op_error(what, &error)),
            },
        };
        debug_assert!(needs_slow_path);
        self.apply_one_by_one(group, fence, clear, changes).await
    }

    /// The statement that empties the synced tables for a replace, or `None` when none of them
    /// exists. The synced tables are the configured ones (those `digest` and `is_empty` look
    /// at) and every table the changes name, except reserved `jetsync_*` names (changes naming
    /// those are refused while planning). Tables that do not exist are left out: changes naming
    /// them are refused while planning, exactly as in `apply`.
    ///
    /// One `DELETE` per table, all in one statement (data-modifying `WITH` clauses), so that
    /// foreign keys between synced tables are checked once at its end, whatever the order of
    /// the tables. `DELETE`, not `TRUNCATE`: `TRUNCATE` takes an ACCESS EXCLUSIVE lock, which
    /// would block the service's readers until COMMIT, while they should keep seeing the old
    /// rows. Triggers and `ON DELETE` actions of the service's foreign keys run as for any
    /// delete.
    async fn clear_sql(&mut self, changes: &[Change]) -> Result<Option<String>, SinkError> {
        let mut names: BTreeSet<String> = self.options.key_columns.keys().cloned().collect();
        names.extend(changes.iter().map(|c| c.table.clone()));
        names.retain(|table| !is_reserved_table(table));
        let names: Vec<String> = names.into_iter().collect();
        self.load_tables(&names).await?;
        let present: Vec<&String> = names
            .iter()
            .filter(|name| self.tables.contains_key(*name))
            .collect();
        let Some((last, rest)) = present.split_last() else {
            return Ok(None);
        };
        let mut sql = String::new();
        for (index, table) in rest.iter().enumerate() {
            sql.push_str(if index == 0 { "WITH " } else { ", " });
            sql.push_str(&format!("d{index} AS (DELETE FROM "));
            push_quoted(&mut sql, &self.options.schema);
            sql.push('.');
            push_quoted(&mut sql, table);
            sql.push(')');
        }
        if !rest.is_empty() {
            sql.push(' ');
        }
        sql.push_str("DELETE FROM ");
        push_quoted(&mut sql, &self.options.schema);
        sql.push('.');
        push_quoted(&mut sql, last);
        Ok(Some(sql))
    }

    /// The slow path after a multi-row statement failed: the batch again, one change per
    /// statement, in a fresh transaction; the first failing statement names the change. First
    /// with the service's constraint timing; if only COMMIT fails (a deferred constraint), once
    /// more with all constraints checked immediately, which points at the statement.
    async fn apply_one_by_one(
        &mut self,
        group: &str,
        fence: i64,
        clear: Option<&str>,
        changes: &[Change],
    ) -> Result<(), SinkError> {
        tracing::debug!(
            changes = changes.len(),
            "a multi-row statement failed; applying the batch one change at a time"
        );
        for immediate in [false, true] {
            let outcome = self
                .attempt(group, fence, clear, changes, Mode::Single { immediate })
                .await;
            match outcome {
                Ok(()) => return Ok(()),
                Err(Failure::Sink(e)) => return Err(e),
                Err(Failure::Refused { index, reason }) => {
                    return Err(rejected(changes, index, reason))
                }
                Err(Failure::Statement { index, error, .. }) => {
                    return Err(match classify(&error) {
                        Class::Rejected | Class::Schema => {
                            rejected(changes, index, describe(&error))
                        }
                        Class::Unavailable | Class::Fatal => {
                            self.op_error("apply a batch to", &error)
                        }
                    })
                }
                Err(Failure::Other { what, error }) => {
                    if what == "commit" && !immediate && classify(&error) == Class::Rejected {
                        continue;
                    }
                    return Err(self.op_error(what, &error));
                }
            }
        }
        Err(SinkError::Fatal {
            reason: format!(
                "{}: COMMIT keeps failing on a deferred constraint that no single change of \
                 the batch violates on its own; inspect the constraint",
                self.target
            ),
        })
    }

    /// Plans `changes` and runs them in one transaction with the fence (after `clear`, the
    /// statement emptying the synced tables of a replace), committing only when every change
    /// could be planned and every statement succeeded. When a change is refused while planning,
    /// the changes before it are still executed (and rolled back), so that a change the database
    /// refuses earlier in the batch is reported first.
    async fn attempt(
        &mut self,
        group: &str,
        fence: i64,
        clear: Option<&str>,
        changes: &[Change],
        mode: Mode,
    ) -> Result<(), Failure> {
        let planned = self
            .plan_fresh(changes, matches!(mode, Mode::Grouped))
            .await?;
        let complete = planned.refusal.is_none();
        if complete || !planned.statements.is_empty() {
            let immediate = matches!(mode, Mode::Single { immediate: true });
            self.run(
                clear,
                &planned.statements,
                complete.then_some((group, fence)),
                immediate,
            )
            .await?;
        }
        match planned.refusal {
            Some(Refusal { index, reason }) => Err(Failure::Refused { index, reason }),
            None => Ok(()),
        }
    }

    /// Runs `clear` (when given), `statements` and the fence upsert (when given) in one
    /// transaction, pipelined, and commits when `fence` is given and everything succeeded;
    /// otherwise rolls back.
    async fn run(
        &mut self,
        clear: Option<&str>,
        statements: &[Statement],
        fence: Option<(&str, i64)>,
        immediate: bool,
    ) -> Result<(), Failure> {
        self.in_transaction = true;
        self.statements_sent +=
            statements.len() as u64 + 1 + u64::from(clear.is_some()) + u64::from(fence.is_some());
        let client = self.client().map_err(Failure::Sink)?;
        let params: Vec<Vec<(&(dyn ToSql + Sync), Type)>> = statements
            .iter()
            .map(|s| {
                s.columns
                    .iter()
                    .zip(&s.types)
                    .map(|(column, ty)| (column as &(dyn ToSql + Sync), ty.clone()))
                    .collect()
            })
            .collect();
        let fence_params: Option<[(&(dyn ToSql + Sync), Type); 2]> = fence
            .as_ref()
            .map(|(group, seq)| [(group as _, Type::TEXT), (seq as _, Type::INT8)]);
        let begin = if immediate {
            "BEGIN; SET CONSTRAINTS ALL IMMEDIATE"
        } else {
            "BEGIN"
        };
        let mut requests: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> =
            Vec::with_capacity(statements.len() + 3);
        requests.push(client.batch_execute(begin).map(|r| r.map(|()| 0)).boxed());
        if let Some(clear) = clear {
            requests.push(client.batch_execute(clear).map(|r| r.map(|()| 0)).boxed());
        }
        // Position of the first change statement among the requests.
        let first_statement = 1 + usize::from(clear.is_some());
        for (statement, params) in statements.iter().zip(&params) {
            requests.push(client.execute_typed(&statement.sql, params).boxed());
        }
        if let Some(fence_params) = &fence_params {
            requests.push(
                client
                    .execute_typed(&self.fence_upsert, fence_params)
                    .boxed(),
            );
        }
        let results = pipeline(requests).await;

        let mut failure = None;
        for (position, result) in results.into_iter().enumerate() {
            let Err(error) = result else { continue };
            failure = Some(if position == 0 {
                Failure::Other {
                    what: "begin a transaction on",
                    error,
                }
            } else if position < first_statement {
                Failure::Other {
                    what: "clear the synced tables in",
                    error,
                }
            } else if let Some(statement) = statements.get(position - first_statement) {
                Failure::Statement {
                    index: statement.first,
                    single: statement.changes == 1,
                    error,
                }
            } else {
                Failure::Other {
                    what: "write the fence to",
                    error,
                }
            });
            break;
        }
        if let Some(failure) = failure {
            // Best effort: a dead connection rolled back by itself and is reconnected later.
            let _ = self.finish_transaction("ROLLBACK").await;
            return Err(failure);
        }
        if fence.is_none() {
            let _ = self.finish_transaction("ROLLBACK").await;
            return Ok(());
        }
        // Crash window: before this COMMIT reaches the server nothing of the batch is visible
        // and the fence is unchanged; once it completed, rows and fence moved together. A
        // connection lost while it is in flight leaves the outcome unknown: Unavailable, and the
        // engine re-applies the batch, which ends in the same state (see the module docs).
        self.finish_transaction("COMMIT")
            .await
            .map_err(|error| Failure::Other {
                what: "commit",
                error,
            })
    }

    // ---- reading ----------------------------------------------------------------------------

    async fn read_fence(&mut self, group: &str) -> Result<Option<u64>, SinkError> {
        self.ensure_connected().await?;
        let sql = format!(
            "SELECT seq FROM {}.{} WHERE stream = $1",
            quote(&self.options.schema),
            quote(FENCE_TABLE)
        );
        self.statements_sent += 1;
        let client = self.client()?;
        let seq: Option<i64> = client
            .query_typed_opt(&sql, &[(&group, Type::TEXT)])
            .await
            .and_then(|row| row.map(|row| row.try_get(0)).transpose())
            .map_err(|e| self.op_error("read the fence from", &e))?;
        let fence = seq
            .map(|seq| {
                u64::try_from(seq).map_err(|_| SinkError::Fatal {
                    reason: format!(
                        "{}: {FENCE_TABLE} holds the negative sequence {seq} for `{group}`; fix \
                         it with `jetsync-applier reset --to-seq`",
                        self.target
                    ),
                })
            })
            .transpose()?;
        self.groups
            .known_fence
            .insert(group.to_owned(), fence.unwrap_or(0));
        Ok(fence)
    }

    async fn store_fence(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        let sql_seq = seq_to_sql(seq)?;
        self.ensure_connected().await?;
        self.lock_group(group).await?;
        self.statements_sent += 1;
        let client = self.client()?;
        client
            .execute_typed(
                &self.fence_upsert,
                &[(&group, Type::TEXT), (&sql_seq, Type::INT8)],
            )
            .await
            .map_err(|e| self.op_error("set the fence in", &e))?;
        self.groups.known_fence.insert(group.to_owned(), seq);
        Ok(())
    }

    async fn check_empty(&mut self) -> Result<bool, SinkError> {
        self.ensure_connected().await?;
        let names: Vec<String> = self.options.key_columns.keys().cloned().collect();
        self.load_tables(&names).await?;
        let mut sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {}.{})",
            quote(&self.options.schema),
            quote(FENCE_TABLE)
        );
        for name in &names {
            if self.tables.contains_key(name) {
                sql.push_str(&format!(
                    " OR EXISTS (SELECT 1 FROM {}.{})",
                    quote(&self.options.schema),
                    quote(name)
                ));
            }
        }
        self.statements_sent += 1;
        let client = self.client()?;
        let any: bool = client
            .query_typed_one(&sql, &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.op_error("check for rows in", &e))?;
        Ok(!any)
    }

    async fn compute_digest(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        self.ensure_connected().await?;
        // One snapshot for all tables, even while the service writes.
        self.in_transaction = true;
        self.statements_sent += 1;
        self.client()?
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(|e| self.op_error("begin a transaction on", &e))?;
        let result = self.digest_in_transaction().await;
        let end = self.finish_transaction("COMMIT").await;
        let digests = result?;
        end.map_err(|e| self.op_error("compute the digest of", &e))?;
        Ok(digests)
    }

    async fn digest_in_transaction(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        let names: Vec<String> = self.options.key_columns.keys().cloned().collect();
        self.load_tables(&names).await?;
        let mut digests = Vec::new();
        for name in &names {
            let Some(info) = self.tables.get(name).cloned() else {
                continue;
            };
            let mut builder = DigestBuilder::default();
            self.scan(&info, false, |row| builder.add(name, &row))
                .await?;
            digests.push(builder.finish(name));
        }
        Ok(digests)
    }

    /// Calls `f` with every row of the table, mapped back to [`Value`]s.
    async fn scan(
        &mut self,
        info: &TableInfo,
        ordered: bool,
        mut f: impl FnMut(Row) + Send,
    ) -> Result<(), SinkError> {
        let mut sql = String::from("SELECT ");
        for (index, column) in info.columns.iter().enumerate() {
            if index > 0 {
                sql.push_str(", ");
            }
            push_quoted(&mut sql, &column.name);
            sql.push_str("::");
            sql.push_str(column.kind.read_cast());
        }
        sql.push_str(" FROM ");
        push_quoted(&mut sql, &self.options.schema);
        sql.push('.');
        push_quoted(&mut sql, &info.name);
        if let (true, Some(key)) = (ordered, info.key) {
            sql.push_str(" ORDER BY ");
            push_quoted(&mut sql, &info.columns[key].name);
        }
        let what = format!("read table `{}` of", info.name);
        self.statements_sent += 1;
        let client = self.client()?;
        let read = async {
            let stream = client
                .query_typed_raw(&sql, std::iter::empty::<(&(dyn ToSql + Sync), Type)>())
                .await?;
            futures::pin_mut!(stream);
            while let Some(row) = stream.try_next().await? {
                let mut out = Row::new();
                for (index, column) in info.columns.iter().enumerate() {
                    let ReadValue(value) = row.try_get(index)?;
                    out.insert(column.name.clone(), value);
                }
                f(out);
            }
            Ok::<(), tokio_postgres::Error>(())
        };
        read.await.map_err(|e| self.op_error(&what, &e))
    }
}

impl Sink for PostgresSink {
    async fn fence(&mut self, group: &str) -> Result<Option<u64>, SinkError> {
        // This sink keeps a fence: "never applied" is Some(0), so an emptied or replaced
        // database is never mistaken for "trust the redb checkpoint".
        self.read_fence(group).await.map(|f| Some(f.unwrap_or(0)))
    }

    async fn is_empty(&mut self) -> Result<bool, SinkError> {
        self.check_empty().await
    }

    async fn apply(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        self.write_batch(group, changes, last_seq, false).await?;
        self.groups.known_fence.insert(group.to_owned(), last_seq);
        Ok(())
    }

    async fn replace(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        self.write_batch(group, changes, last_seq, true).await?;
        self.groups.known_fence.insert(group.to_owned(), last_seq);
        Ok(())
    }

    async fn set_fence(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        self.store_fence(group, seq).await
    }

    async fn digest(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        self.compute_digest().await
    }
}

/// Runs the requests pipelined and returns their results in order.
///
/// tokio-postgres writes a request into the connection's queue at the first poll of its future
/// (when the statement needs no preparing, as with `execute_typed` and `batch_execute`). Polling
/// every future once, in order, before waiting for any answer makes the server receive, and so
/// execute, the statements in batch order, while the answers of all of them are awaited
/// together: one round trip for the lot.
async fn pipeline<'a, T: Send + 'a>(
    requests: Vec<BoxFuture<'a, Result<T, tokio_postgres::Error>>>,
) -> Vec<Result<T, tokio_postgres::Error>> {
    let mut requests: Vec<_> = requests.into_iter().map(maybe_done).collect();
    for request in &mut requests {
        let _ = futures::poll!(Pin::new(request));
    }
    for request in &mut requests {
        Pin::new(request).await;
    }
    requests
        .into_iter()
        .map(|mut request| {
            Pin::new(&mut request)
                .take_output()
                .expect("every request was awaited to completion")
        })
        .collect()
}

/// How a batch is planned.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Consecutive changes of one shape share a multi-row statement.
    Grouped,
    /// One statement per change (the slow path); `immediate` checks deferred constraints per
    /// statement.
    Single { immediate: bool },
}

/// Why an attempt did not commit.
#[derive(Debug)]
enum Failure {
    /// The sink refused change `index` before sending it (changes before it ran fine).
    Refused { index: usize, reason: String },
    /// The statement starting at change `index` failed; `single` when it held only that change.
    Statement {
        index: usize,
        single: bool,
        error: tokio_postgres::Error,
    },
    /// BEGIN, the fence or COMMIT failed.
    Other {
        what: &'static str,
        error: tokio_postgres::Error,
    },
    /// Already a sink error (connecting, discovering tables, a fatal table).
    Sink(SinkError),
}

fn rejected(changes: &[Change], index: usize, reason: String) -> SinkError {
    let change = &changes[index];
    SinkError::Rejected {
        index,
        seq: change.seq,
        table: change.table.clone(),
        key: change.key.clone(),
        reason,
    }
}

fn seq_to_sql(seq: u64) -> Result<i64, SinkError> {
    i64::try_from(seq).map_err(|_| SinkError::Fatal {
        reason: format!("stream sequence {seq} does not fit Postgres' bigint"),
    })
}

fn validate_name(what: &str, name: &str) -> Result<(), SinkError> {
    if name.is_empty() || name.contains('\0') {
        return Err(SinkError::Fatal {
            reason: format!("postgres sink: invalid {what} {name:?}"),
        });
    }
    Ok(())
}

fn is_reserved_table(table: &str) -> bool {
    table.to_ascii_lowercase().starts_with(RESERVED_PREFIX)
}

// ---- errors ---------------------------------------------------------------------------------

/// How a database error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Transient: retry the batch later.
    Unavailable,
    /// Caused by a change's data: reject that change.
    Rejected,
    /// The table changed under the cached description: look again, then reject the change.
    Schema,
    /// Needs an operator.
    Fatal,
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|code| code.code())
}

fn classify(e: &tokio_postgres::Error) -> Class {
    match sqlstate(e) {
        Some(code) => classify_code(code),
        None if e.is_closed() => Class::Unavailable,
        None => {
            // I/O errors and timeouts (the connection is gone or going); anything else without
            // a SQLSTATE is a driver-side problem nobody can retry away.
            let io = std::iter::successors(std::error::Error::source(e), |cause| cause.source())
                .any(|cause| cause.is::<std::io::Error>());
            if io || e.to_string().starts_with("timeout") {
                Class::Unavailable
            } else {
                Class::Fatal
            }
        }
    }
}

fn classify_code(code: &str) -> Class {
    match code {
        // Connection exceptions, transaction rollbacks (serialization failure, deadlock),
        // insufficient resources, operator intervention (admin shutdown, cannot connect now,
        // query canceled), lock not available, object in use, system errors, read-only
        // transaction (a standby after a failover).
        c if c.starts_with("08")
            || c.starts_with("40")
            || c.starts_with("53")
            || c.starts_with("57")
            || c.starts_with("58") =>
        {
            if c == "57P04" {
                Class::Fatal // database dropped
            } else {
                Class::Unavailable
            }
        }
        "55P03" | "55006" | "25006" => Class::Unavailable,
        // Data exceptions, integrity constraint violations, a row touched twice by ON CONFLICT,
        // exceptions raised by the service's triggers.
        c if c.starts_with("22") || c.starts_with("23") => Class::Rejected,
        "21000" | "P0001" | "P0004" | "42P18" => Class::Rejected,
        // The table changed since we described it: undefined column/table, datatype mismatch,
        // no unique index for ON CONFLICT any more, missing operator or cast, cached plan.
        "42703" | "42P01" | "42804" | "42P10" | "42883" | "42846" | "0A000" => Class::Schema,
        _ => Class::Fatal,
    }
}

/// The error with its causes on one line (tokio-postgres' `Display` leaves the cause out). A
/// database error reads `ERROR: message; DETAIL: …; HINT: … (SQLSTATE code)`.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(db) = e
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::as_db_error)
    {
        let mut out = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            out.push_str("; DETAIL: ");
            out.push_str(detail);
        }
        if let Some(hint) = db.hint() {
            out.push_str("; HINT: ");
            out.push_str(hint);
        }
        out.push_str(&format!(" (SQLSTATE {})", db.code().code()));
        return out.replace('\n', " ");
    }
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// What an operator should do about a fatal error.
fn advice(code: Option<&str>, schema: &str) -> String {
    match code {
        Some("42501") => format!(
            "grant the user of sink.url SELECT, INSERT, UPDATE, DELETE on the synced tables and \
             on {schema}.{FENCE_TABLE}"
        ),
        Some("3F000") => format!("schema `{schema}` does not exist: create it or fix sink.schema"),
        Some("57P04") => "the database was dropped: recreate it and restart the applier".to_owned(),
        _ => "check the database and the synced tables, then restart the applier".to_owned(),
    }
}

fn op_error(target: &str, schema: &str, what: &str, e: &tokio_postgres::Error) -> SinkError {
    match classify(e) {
        Class::Unavailable => SinkError::Unavailable {
            reason: format!("cannot {what} Postgres at {target}: {}", describe(e)),
        },
        Class::Rejected | Class::Schema | Class::Fatal => SinkError::Fatal {
            reason: format!(
                "cannot {what} Postgres at {target}: {}; {}",
                describe(e),
                advice(sqlstate(e), schema)
            ),
        },
    }
}

fn connect_error(
    target: &str,
    config: &tokio_postgres::Config,
    e: &tokio_postgres::Error,
) -> SinkError {
    let user = config.get_user().unwrap_or("(default user)");
    let database = config.get_dbname().unwrap_or(user);
    let fatal = |reason: String| SinkError::Fatal { reason };
    match sqlstate(e) {
        Some("28P01" | "28000") => fatal(format!(
            "Postgres at {target} refused user `{user}`: {}; fix the user and password in \
             sink.url (JETSYNC_SINK__URL) or the server's pg_hba.conf",
            describe(e)
        )),
        Some("3D000") => fatal(format!(
            "database `{database}` does not exist on the Postgres server at {target}: create \
             it or fix the database name in sink.url (JETSYNC_SINK__URL)"
        )),
        Some(code) if classify_code(code) == Class::Unavailable => SinkError::Unavailable {
            reason: format!("cannot connect to Postgres at {target}: {}", describe(e)),
        },
        Some(_) => fatal(format!(
            "cannot connect to Postgres at {target}: {}; check sink.url",
            describe(e)
        )),
        None => match classify(e) {
            Class::Unavailable => SinkError::Unavailable {
                reason: format!("cannot connect to Postgres at {target}: {}", describe(e)),
            },
            _ => fatal(format!(
                "cannot connect to Postgres at {target}: {}; check sink.url (a password the \
                 server asks for, TLS, which this sink does not support)",
                describe(e)
            )),
        },
    }
}

/// `user@host:port/database` of a connection configuration, without the password.
fn describe_target(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(index, host)| {
            let host = match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            let port = config
                .get_ports()
                .get(index)
                .or_else(|| config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost:5432".to_owned()
    } else {
        hosts.join(",")
    };
    let user = config.get_user().unwrap_or("");
    let database = config.get_dbname().unwrap_or(user);
    if user.is_empty() {
        format!("{hosts}/{database}")
    } else {
        format!("{user}@{hosts}/{database}")
    }
}

// ---- identifiers ----------------------------------------------------------------------------

// ---- column types and values ----------------------------------------------------------------

/// How values of a column are converted and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Bool,
    Text,
    Bytea,
    Json,
    Jsonb,
    Timestamp,
    Timestamptz,
    Date,
    Uuid,
    Other,
}

impl Kind {
    /// The kind of a column whose (domain-resolved) type has `oid`.
    fn from_oid(oid: u32) -> Kind {
        let Some(ty) = Type::from_oid(oid) else {
            return Kind::Other;
        };
        let kinds = [
            (Type::INT2, Kind::Int2),
            (Type::INT4, Kind::Int4),
            (Type::INT8, Kind::Int8),
            (Type::FLOAT4, Kind::Float4),
            (Type::FLOAT8, Kind::Float8),
            (Type::NUMERIC, Kind::Numeric),
            (Type::BOOL, Kind::Bool),
            (Type::TEXT, Kind::Text),
            (Type::VARCHAR, Kind::Text),
            (Type::BPCHAR, Kind::Text),
            (Type::NAME, Kind::Text),
            (Type::BYTEA, Kind::Bytea),
            (Type::JSON, Kind::Json),
            (Type::JSONB, Kind::Jsonb),
            (Type::TIMESTAMP, Kind::Timestamp),
            (Type::TIMESTAMPTZ, Kind::Timestamptz),
            (Type::DATE, Kind::Date),
            (Type::UUID, Kind::Uuid),
        ];
        kinds
            .into_iter()
            .find(|(t, _)| *t == ty)
            .map_or(Kind::Other, |(_, kind)| kind)
    }

    /// The type of the array parameter that carries a column of this kind.
    fn param_type(self) -> Type {
        match self {
            Kind::Int2 => Type::INT2_ARRAY,
            Kind::Int4 => Type::INT4_ARRAY,
            Kind::Int8 => Type::INT8_ARRAY,
            Kind::Float4 => Type::FLOAT4_ARRAY,
            Kind::Float8 => Type::FLOAT8_ARRAY,
            Kind::Bool => Type::BOOL_ARRAY,
            Kind::Bytea => Type::BYTEA_ARRAY,
            Kind::Json => Type::JSON_ARRAY,
            Kind::Jsonb => Type::JSONB_ARRAY,
            Kind::Uuid => Type::UUID_ARRAY,
            Kind::Numeric
            | Kind::Text
            | Kind::Timestamp
            | Kind::Timestamptz
            | Kind::Date
            | Kind::Other => Type::TEXT_ARRAY,
        }
    }

    /// Whether values travel as text and need an explicit cast to the column's type (text
    /// columns take text by assignment, which keeps `varchar(n)` length checks strict).
    fn needs_cast(self) -> bool {
        matches!(
            self,
            Kind::Numeric | Kind::Timestamp | Kind::Timestamptz | Kind::Date | Kind::Other
        )
    }

    /// The type a column is read as, for [`ReadValue`].
    fn read_cast(self) -> &'static str {
        match self {
            Kind::Int2 | Kind::Int4 | Kind::Int8 => "int8",
            Kind::Float4 | Kind::Float8 => "float8",
            Kind::Bool => "bool",
            Kind::Bytea => "bytea",
            Kind::Json => "json",
            Kind::Jsonb => "jsonb",
            Kind::Timestamp => "timestamp",
            Kind::Timestamptz => "timestamptz",
            Kind::Date => "date",
            Kind::Uuid => "uuid",
            Kind::Numeric | Kind::Text | Kind::Other => "text",
        }
    }
}

/// One value converted to its column's type, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
    Json(serde_json::Value),
    Uuid(uuid::Uuid),
}

impl ToSql for Cell {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        fn checked<T: ToSql>(
            value: &T,
            ty: &Type,
            out: &mut BytesMut,
        ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
            value.to_sql_checked(ty, out)
        }
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::I16(v) => checked(v, ty, out),
            Cell::I32(v) => checked(v, ty, out),
            Cell::I64(v) => checked(v, ty, out),
            Cell::F32(v) => checked(v, ty, out),
            Cell::F64(v) => checked(v, ty, out),
            Cell::Bool(v) => checked(v, ty, out),
            Cell::Text(v) => checked(v, ty, out),
            Cell::Bytes(v) => checked(v, ty, out),
            Cell::Json(v) => checked(v, ty, out),
            Cell::Uuid(v) => checked(v, ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Each cell checks its own type in `to_sql`.
        true
    }

    to_sql_checked!();
}

/// Converts `value` for a column of `kind`; the error says why it does not fit.
fn convert(kind: Kind, value: &Value) -> Result<Cell, String> {
    if matches!(value, Value::Null) {
        return Ok(Cell::Null);
    }
    match kind {
        Kind::Int2 => {
            let i = integer(value)?;
            i16::try_from(i)
                .map(Cell::I16)
                .map_err(|_| format!("{i} is out of range for smallint"))
        }
        Kind::Int4 => {
            let i = integer(value)?;
            i32::try_from(i)
                .map(Cell::I32)
                .map_err(|_| format!("{i} is out of range for integer"))
        }
        Kind::Int8 => integer(value).map(Cell::I64),
        Kind::Float4 => {
            let f = float(value)?;
            #[allow(clippy::cast_possible_truncation)]
            let narrow = f as f32;
            if f.is_finite() && !narrow.is_finite() {
                Err(format!("{f} is out of range for real"))
            } else {
                Ok(Cell::F32(narrow))
            }
        }
        Kind::Float8 => float(value).map(Cell::F64),
        Kind::Numeric => match value {
            Value::I64(i) => Ok(Cell::Text(i.to_string())),
            Value::F64(f) if f.is_nan() => Ok(Cell::Text("NaN".to_owned())),
            Value::F64(f) if f.is_infinite() => Ok(Cell::Text(
                if *f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned(),
            )),
            Value::F64(f) => Ok(Cell::Text(f.to_string())),
            Value::Text(s) if s.trim().parse::<f64>().is_ok() => {
                Ok(Cell::Text(s.trim().to_owned()))
            }
            Value::Text(s) => Err(format!("{s:?} is not a number")),
            other => Err(format!(
                "{} cannot be stored as numeric",
                describe_value(other)
            )),
        },
        Kind::Bool => match value {
            Value::Bool(b) => Ok(Cell::Bool(*b)),
            Value::I64(0) => Ok(Cell::Bool(false)),
            Value::I64(1) => Ok(Cell::Bool(true)),
            Value::Text(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "t" | "1" => Ok(Cell::Bool(true)),
                "false" | "f" | "0" => Ok(Cell::Bool(false)),
                _ => Err(format!("{s:?} is not a boolean")),
            },
            other => Err(format!("{} is not a boolean", describe_value(other))),
        },
        Kind::Text | Kind::Other => text(value).map(Cell::Text),
        Kind::Bytea => match value {
            Value::Bytes(b) => Ok(Cell::Bytes(b.clone())),
            other => Err(format!(
                "{} cannot be stored as bytea",
                describe_value(other)
            )),
        },
        Kind::Json | Kind::Jsonb => {
            let json = match value {
                Value::Json(j) => j.clone(),
                Value::Text(s) => {
                    serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.clone()))
                }
                Value::I64(i) => serde_json::Value::from(*i),
                Value::F64(f) => serde_json::Number::from_f64(*f)
                    .map(serde_json::Value::Number)
                    .ok_or_else(|| format!("{f} has no JSON form"))?,
                Value::Bool(b) => serde_json::Value::Bool(*b),
                other => {
                    return Err(format!("{} has no JSON form", describe_value(other)));
                }
            };
            if kind == Kind::Jsonb && json_has_nul(&json) {
                return Err("jsonb cannot hold the character U+0000".to_owned());
            }
            Ok(Cell::Json(json))
        }
        Kind::Timestamptz => timestamp(value, true).map(Cell::Text),
        Kind::Timestamp => timestamp(value, false).map(Cell::Text),
        Kind::Date => date(value).map(Cell::Text),
        Kind::Uuid => match value {
            Value::Text(s) => uuid::Uuid::parse_str(s.trim())
                .map(Cell::Uuid)
                .map_err(|e| format!("{s:?} is not a UUID: {e}")),
            Value::Bytes(b) => uuid::Uuid::from_slice(b)
                .map(Cell::Uuid)
                .map_err(|_| format!("{} bytes are not a UUID (16 bytes)", b.len())),
            other => Err(format!("{} is not a UUID", describe_value(other))),
        },
    }
}

fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "NULL".to_owned(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::I64(i) => format!("the integer {i}"),
        Value::F64(f) => format!("the float {f}"),
        Value::Text(s) => format!("the text {s:?}"),
        Value::Bytes(b) => format!("{} bytes", b.len()),
        Value::Json(j) => format!("the JSON {j}"),
    }
}

fn integer(value: &Value) -> Result<i64, String> {
    match value {
        Value::I64(i) => Ok(*i),
        Value::Text(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("{s:?} is not an integer")),
        #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
        Value::F64(f) if f.fract() == 0.0 && *f >= i64::MIN as f64 && *f < i64::MAX as f64 => {
            Ok(*f as i64)
        }
        other => Err(format!("{} is not an integer", describe_value(other))),
    }
}

fn float(value: &Value) -> Result<f64, String> {
    match value {
        Value::F64(f) => Ok(*f),
        #[allow(clippy::cast_precision_loss)]
        Value::I64(i) => Ok(*i as f64),
        Value::Text(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("{s:?} is not a number")),
        other => Err(format!("{} is not a number", describe_value(other))),
    }
}

fn text(value: &Value) -> Result<String, String> {
    let s = match value {
        Value::Text(s) => s.clone(),
        Value::I64(i) => i.to_string(),
        Value::F64(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Json(j) => j.to_string(),
        other => {
            return Err(format!(
                "{} cannot be stored as text",
                describe_value(other)
            ))
        }
    };
    if s.contains('\0') {
        return Err("Postgres text cannot hold the character U+0000".to_owned());
    }
    Ok(s)
}

fn json_has_nul(json: &serde_json::Value) -> bool {
    match json {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(json_has_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v))
        }
        _ => false,
    }
}

/// Special timestamp and date values Postgres accepts as text.
fn special(s: &str) -> Option<&'static str> {
    match s.trim().to_ascii_lowercase().as_str() {
        "infinity" | "+infinity" => Some("infinity"),
        "-infinity" => Some("-infinity"),
        _ => None,
    }
}

/// A point in time: RFC 3339 (or Postgres' `2024-01-02 03:04:05+00` output form).
fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%#z"))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A wall-clock time without offset (`2024-01-02T03:04:05.5`, `2024-01-02 03:04:05`,
/// `2024-01-02`).
fn parse_naive(s: &str) -> Option<NaiveDateTime> {
    let s = s.trim();
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
        .ok()
        .or_else(|| {
            NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })
}

fn epoch_millis(ms: i64) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| format!("{ms} ms since the Unix epoch is out of range"))
}

/// Text for a `timestamptz` (`with_zone`) or `timestamp` column.
fn timestamp(value: &Value, with_zone: bool) -> Result<String, String> {
    let utc = match value {
        Value::Text(s) => {
            if let Some(special) = special(s) {
                return Ok(special.to_owned());
            }
            if let Some(instant) = parse_instant(s) {
                instant
            } else if let Some(naive) = parse_naive(s) {
                naive.and_utc()
            } else {
                return Err(format!(
                    "{s:?} is not an RFC 3339 timestamp (like 2024-05-01T12:00:00Z)"
                ));
            }
        }
        Value::I64(ms) => epoch_millis(*ms)?,
        other => {
            return Err(format!(
                "{} is not a timestamp (use RFC 3339 text or milliseconds since the Unix epoch)",
                describe_value(other)
            ))
        }
    };
    Ok(if with_zone {
        utc.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    } else {
        utc.naive_utc().format("%Y-%m-%dT%H:%M:%S%.f").to_string()
    })
}

/// Text for a `date` column.
fn date(value: &Value) -> Result<String, String> {
    let day = match value {
        Value::Text(s) => {
            if let Some(special) = special(s) {
                return Ok(special.to_owned());
            }
            if let Some(instant) = parse_instant(s) {
                instant.date_naive()
            } else if let Some(naive) = parse_naive(s) {
                naive.date()
            } else {
                return Err(format!("{s:?} is not a date (like 2024-05-01)"));
            }
        }
        Value::I64(ms) => epoch_millis(*ms)?.date_naive(),
        other => {
            return Err(format!(
                "{} is not a date (use YYYY-MM-DD text or milliseconds since the Unix epoch)",
                describe_value(other)
            ))
        }
    };
    Ok(day.format("%Y-%m-%d").to_string())
}

/// A column value read back from the database, as the digest sees it. Columns are selected cast
/// to one of the types of [`Kind::read_cast`], so only those arrive here.
struct ReadValue(Value);

impl<'a> FromSql<'a> for ReadValue {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let value = if *ty == Type::INT8 {
            Value::I64(i64::from_sql(ty, raw)?)
        } else if *ty == Type::FLOAT8 {
            Value::F64(f64::from_sql(ty, raw)?)
        } else if *ty == Type::BOOL {
            Value::Bool(bool::from_sql(ty, raw)?)
        } else if *ty == Type::BYTEA {
            Value::Bytes(raw.to_vec())
        } else if *ty == Type::JSON || *ty == Type::JSONB {
            Value::Json(serde_json::Value::from_sql(ty, raw)?)
        } else if *ty == Type::TIMESTAMPTZ {
            Value::Text(timestamp_text(raw, true)?)
        } else if *ty == Type::TIMESTAMP {
            Value::Text(timestamp_text(raw, false)?)
        } else if *ty == Type::DATE {
            Value::Text(date_text(raw)?)
        } else if *ty == Type::UUID {
            Value::Text(uuid::Uuid::from_sql(ty, raw)?.to_string())
        } else {
            Value::Text(String::from_utf8(raw.to_vec())?)
        };
        Ok(ReadValue(value))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(ReadValue(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A binary `timestamp`/`timestamptz` (microseconds since 2000-01-01) as text.
fn timestamp_text(
    raw: &[u8],
    with_zone: bool,
) -> Result<String, Box<dyn std::error::Error + Sync + Send>> {
    let micros = i64::from_be_bytes(raw.try_into()?);
    match micros {
        i64::MAX => return Ok("infinity".to_owned()),
        i64::MIN => return Ok("-infinity".to_owned()),
        _ => {}
    }
    let Some(utc) = micros
        .checked_add(PG_EPOCH_SECS * 1_000_000)
        .and_then(DateTime::from_timestamp_micros)
    else {
        return Ok(format!("{micros} microseconds since 2000-01-01"));
    };
    Ok(if with_zone {
        utc.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    } else {
        utc.naive_utc().format("%Y-%m-%dT%H:%M:%S%.f").to_string()
    })
}

/// A binary `date` (days since 2000-01-01) as text.
fn date_text(raw: &[u8]) -> Result<String, Box<dyn std::error::Error + Sync + Send>> {
    let days = i32::from_be_bytes(raw.try_into()?);
    match days {
        i32::MAX => return Ok("infinity".to_owned()),
        i32::MIN => return Ok("-infinity".to_owned()),
        _ => {}
    }
    // 2000-01-01 is day 730120 of the common era (0001-01-01 is day 1).
    Ok(days
        .checked_add(730_120)
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .map_or_else(
            || format!("{days} days since 2000-01-01"),
            |d| d.format("%Y-%m-%d").to_string(),
        ))
}

// ---- tables and planning --------------------------------------------------------------------

/// One column of a table.
#[derive(Debug, Clone)]
struct ColumnInfo {
    name: String,
    kind: Kind,
    /// `format_type(atttypid, atttypmod)`: the cast target for values sent as text.
    type_name: String,
    /// `GENERATED ALWAYS AS (…) STORED`: computed by the database, never written.
    generated: bool,
}

/// What the sink knows about one existing table.
#[derive(Debug)]
struct TableInfo {
    name: String,
    columns: Vec<ColumnInfo>,
    exact: HashMap<String, usize>,
    /// ASCII-lowercased name → the one column with that folded name (`None`: ambiguous).
    folded: HashMap<String, Option<usize>>,
    /// The key column, when the table has it.
    key: Option<usize>,
    /// Whether a unique index covers exactly the key column.
    key_unique: bool,
    /// The batch during which this description was read.
    generation: u64,
}

impl TableInfo {
    fn new(
        name: &str,
        key_column: &str,
        columns: Vec<(ColumnInfo, bool)>,
        generation: u64,
    ) -> TableInfo {
        let exact = columns
            .iter()
            .enumerate()
            .map(|(i, (c, _))| (c.name.clone(), i))
            .collect();
        let mut folded: HashMap<String, Option<usize>> = HashMap::new();
        for (i, (c, _)) in columns.iter().enumerate() {
            folded
                .entry(c.name.to_ascii_lowercase())
                .and_modify(|slot| *slot = None)
                .or_insert(Some(i));
        }
        let mut info = TableInfo {
            name: name.to_owned(),
            columns: Vec::new(),
            exact,
            folded,
            key: None,
            key_unique: false,
            generation,
        };
        info.key = info.find(key_column);
        info.key_unique = info.key.is_some_and(|k| columns[k].1);
        info.columns = columns.into_iter().map(|(c, _)| c).collect();
        info
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.exact.get(name).copied().or_else(|| {
            self.folded
                .get(&name.to_ascii_lowercase())
                .copied()
                .flatten()
        })
    }
}

/// What a statement does: upsert these columns (key first), or delete by key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    Upsert(Vec<usize>),
    Delete,
}

/// One multi-row statement of a batch.
#[derive(Debug)]
struct Statement {
    sql: String,
    /// One array parameter per column.
    columns: Vec<Vec<Cell>>,
    types: Vec<Type>,
    /// Index of its first change in the batch.
    first: usize,
    /// How many changes it carries.
    changes: usize,
}

/// A change the sink refuses before sending it.
#[derive(Debug)]
struct Refusal {
    index: usize,
    reason: String,
}

/// A table the batch cannot be applied to at all.
#[derive(Debug)]
struct PlanFatal {
    table: String,
    reason: String,
}

/// The statements of a batch: all of it, or the changes before the refused one.
#[derive(Debug)]
struct Planned {
    statements: Vec<Statement>,
    refusal: Option<Refusal>,
}

/// One change, converted.
struct Prepared {
    shape: Shape,
    /// Values in shape order.
    cells: Vec<Cell>,
    key: Cell,
}

enum Problem {
    Reject(String),
    Fatal(String),
}

/// A statement being filled.
struct Open {
    table: Arc<TableInfo>,
    shape: Shape,
    first: usize,
    count: usize,
    columns: Vec<Vec<Cell>>,
    keys: HashSet<String>,
}

impl Open {
    fn accepts(&self, table: &str, prepared: &Prepared, key_id: &str) -> bool {
        self.table.name == table
            && self.shape == prepared.shape
            && (self.shape == Shape::Delete || !self.keys.contains(key_id))
    }

    fn finish(self, schema: &str) -> Statement {
        let (sql, kinds): (String, Vec<Kind>) = match &self.shape {
            Shape::Upsert(columns) => (
                upsert_sql(schema, &self.table, columns),
                columns
                    .iter()
                    .map(|&c| self.table.columns[c].kind)
                    .collect(),
            ),
            Shape::Delete => {
                let key = self.table.key.expect("planned deletes have a key column");
                (
                    delete_sql(schema, &self.table),
                    vec![self.table.columns[key].kind],
                )
            }
        };
        Statement {
            sql,
            columns: self.columns,
            types: kinds.into_iter().map(Kind::param_type).collect(),
            first: self.first,
            changes: self.count,
        }
    }
}

/// `u.cN`, cast to the column's type when the value travels as text.
fn push_select_expr(sql: &mut String, position: usize, column: &ColumnInfo) {
    sql.push_str(&format!("u.c{position}"));
    if column.kind.needs_cast() {
        sql.push_str("::");
        sql.push_str(&column.type_name);
    }
}

fn upsert_sql(schema: &str, table: &TableInfo, columns: &[usize]) -> String {
    let mut sql = String::with_capacity(128 + 48 * columns.len());
    sql.push_str("INSERT INTO ");
    push_quoted(&mut sql, schema);
    sql.push('.');
    push_quoted(&mut sql, &table.name);
    sql.push_str(" (");
    for (i, &c) in columns.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        push_quoted(&mut sql, &table.columns[c].name);
    }
    sql.push_str(") OVERRIDING SYSTEM VALUE SELECT ");
    for (i, &c) in columns.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        push_select_expr(&mut sql, i, &table.columns[c]);
    }
    sql.push_str(" FROM unnest(");
    for i in 0..columns.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("${}", i + 1));
    }
    sql.push_str(") AS u(");
    for i in 0..columns.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("c{i}"));
    }
    sql.push_str(") ON CONFLICT (");
    push_quoted(&mut sql, &table.columns[columns[0]].name);
    sql.push_str(") DO ");
    if columns.len() == 1 {
        // Only the key: an existing row already is what the event says.
        sql.push_str("NOTHING");
    } else {
        sql.push_str("UPDATE SET ");
        for (i, &c) in columns[1..].iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            let name = &table.columns[c].name;
            push_quoted(&mut sql, name);
            sql.push_str(" = EXCLUDED.");
            push_quoted(&mut sql, name);
        }
    }
    sql
}

fn delete_sql(schema: &str, table: &TableInfo) -> String {
    let key = &table.columns[table.key.expect("planned deletes have a key column")];
    let mut sql = String::from("DELETE FROM ");
    push_quoted(&mut sql, schema);
    sql.push('.');
    push_quoted(&mut sql, &table.name);
    sql.push_str(" WHERE ");
    push_quoted(&mut sql, &key.name);
    sql.push_str(" IN (SELECT ");
    push_select_expr(&mut sql, 0, key);
    sql.push_str(" FROM unnest($1) AS u(c0))");
    sql
}

/// Converts one change for its table.
fn prepare(
    change: &Change,
    info: Option<&TableInfo>,
    options: &PostgresOptions,
) -> Result<Prepared, Problem> {
    let table = change.table.as_str();
    let schema = &options.schema;
    if is_reserved_table(table) {
        return Err(Problem::Reject(format!(
            "table name `{table}` is reserved (jetsync_* tables are not synced)"
        )));
    }
    let Some(info) = info else {
        return Err(Problem::Reject(format!(
            "table `{schema}.{table}` does not exist; the postgres sink applies into the \
             service's existing tables and never creates one: create it, or stop publishing \
             `{table}`"
        )));
    };
    let key_column = options.key_column(table);
    let Some(key) = info.key else {
        return Err(Problem::Fatal(format!(
            "table `{schema}.{table}` has no key column `{key_column}`; set tables.{table}.key \
             to its key column, or add that column"
        )));
    };
    let key_info = &info.columns[key];
    if !info.key_unique {
        return Err(Problem::Fatal(format!(
            "the key column `{}` of `{schema}.{table}` has no PRIMARY KEY, UNIQUE constraint or \
             full unique index on it alone, which upserts need; add one (ALTER TABLE \
             {}.{} ADD UNIQUE ({})) or set tables.{table}.key",
            key_info.name,
            quote(schema),
            quote(table),
            quote(&key_info.name)
        )));
    }
    let key_cell = convert(key_info.kind, &Value::Text(change.key.clone())).map_err(|e| {
        Problem::Reject(format!(
            "the subject key {:?} does not fit key column `{}` ({}): {e}",
            change.key, key_info.name, key_info.type_name
        ))
    })?;
    let row = match &change.op {
        jetsync::Change::Delete => {
            return Ok(Prepared {
                shape: Shape::Delete,
                cells: vec![key_cell.clone()],
                key: key_cell,
            })
        }
        jetsync::Change::Upsert(row) => row,
    };
    let mut key_named: Option<&str> = None;
    let mut chosen: Vec<(usize, &str, Cell)> = Vec::with_capacity(row.len());
    for (name, value) in row {
        let Some(index) = info.find(name) else {
            match options.unknown_columns {
                UnknownColumns::Ignore => continue,
                UnknownColumns::Error => {
                    return Err(Problem::Reject(format!(
                        "column `{name}` does not exist in table `{schema}.{table}` (with \
                         sink.unknown_columns = \"ignore\" such columns are dropped)"
                    )))
                }
            }
        };
        let column = &info.columns[index];
        let clash = |other: &str| {
            Problem::Reject(format!(
                "columns `{other}` and `{name}` both name column `{}` of `{schema}.{table}`",
                column.name
            ))
        };
        if index == key {
            if let Some(other) = key_named {
                return Err(clash(other));
            }
            key_named = Some(name);
            let cell = convert(column.kind, value).map_err(|e| {
                Problem::Reject(format!("key column `{name}` ({}): {e}", column.type_name))
            })?;
            if cell != key_cell {
                return Err(Problem::Reject(format!(
                    "key column `{name}` holds {}, which does not match the subject key {:?}",
                    describe_value(value),
                    change.key
                )));
            }
            continue;
        }
        if column.generated {
            continue; // Computed by the database from the other columns.
        }
        if let Some((_, other, _)) = chosen.iter().find(|(i, _, _)| *i == index) {
            return Err(clash(other));
        }
        let cell = convert(column.kind, value)
            .map_err(|e| Problem::Reject(format!("column `{name}` ({}): {e}", column.type_name)))?;
        chosen.push((index, name, cell));
    }
    chosen.sort_by_key(|(index, _, _)| *index);
    let mut columns = Vec::with_capacity(chosen.len() + 1);
    let mut cells = Vec::with_capacity(chosen.len() + 1);
    columns.push(key);
    cells.push(key_cell.clone());
    for (index, _, cell) in chosen {
        columns.push(index);
        cells.push(cell);
    }
    Ok(Prepared {
        shape: Shape::Upsert(columns),
        cells,
        key: key_cell,
    })
}

/// Turns a batch into statements: consecutive changes of one table, operation and column set
/// share a statement (when `grouped`), split where a key repeats. Stops at the first change the
/// sink refuses, planning the changes before it.
fn plan(
    changes: &[Change],
    tables: &HashMap<String, Arc<TableInfo>>,
    options: &PostgresOptions,
    grouped: bool,
) -> Result<Planned, PlanFatal> {
    let mut statements = Vec::new();
    let mut open: Option<Open> = None;
    let mut refusal = None;
    for (index, change) in changes.iter().enumerate() {
        let info = tables.get(&change.table);
        let prepared = match prepare(change, info.map(|t| &**t), options) {
            Ok(prepared) => prepared,
            Err(Problem::Reject(reason)) => {
                refusal = Some(Refusal { index, reason });
                break;
            }
            Err(Problem::Fatal(reason)) => {
                return Err(PlanFatal {
                    table: change.table.clone(),
                    reason,
                })
            }
        };
        let Some(info) = info else {
            unreachable!("prepare refuses changes of missing tables");
        };
        let key_id = format!("{:?}", prepared.key);
        let fits = grouped
            && open
                .as_ref()
                .is_some_and(|g| g.accepts(&change.table, &prepared, &key_id));
        if !fits {
            if let Some(done) = open.take() {
                statements.push(done.finish(&options.schema));
            }
            open = Some(Open {
                table: Arc::clone(info),
                columns: vec![Vec::new(); prepared.cells.len()],
                shape: prepared.shape.clone(),
                first: index,
                count: 0,
                keys: HashSet::new(),
            });
        }
        let group = open.as_mut().expect("a statement is open");
        for (column, cell) in group.columns.iter_mut().zip(prepared.cells) {
            column.push(cell);
        }
        group.count += 1;
        if group.shape != Shape::Delete {
            group.keys.insert(key_id);
        }
    }
    if let Some(done) = open.take() {
        statements.push(done.finish(&options.schema));
    }
    Ok(Planned {
        statements,
        refusal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, kind: Kind, type_name: &str) -> (ColumnInfo, bool) {
        (
            ColumnInfo {
                name: name.to_owned(),
                kind,
                type_name: type_name.to_owned(),
                generated: false,
            },
            false,
        )
    }

    fn table(name: &str, key_kind: Kind, generation: u64) -> TableInfo {
        let key_type = if key_kind == Kind::Int8 {
            "bigint"
        } else {
            "text"
        };
        let mut columns = vec![
            (column("id", key_kind, key_type).0, true),
            column("name", Kind::Text, "text"),
            column("price", Kind::Numeric, "numeric(10,2)"),
            column("qty", Kind::Int4, "integer"),
            column("Mixed", Kind::Bool, "boolean"),
        ];
        let mut total = column("total", Kind::Int8, "bigint");
        total.0.generated = true;
        columns.push(total);
        TableInfo::new(name, "id", columns, generation)
    }

    fn tables() -> HashMap<String, Arc<TableInfo>> {
        [
            ("nums".to_owned(), Arc::new(table("nums", Kind::Int8, 1))),
            ("texts".to_owned(), Arc::new(table("texts", Kind::Text, 1))),
        ]
        .into_iter()
        .collect()
    }

    fn options() -> PostgresOptions {
        PostgresOptions::new("postgres://u:secret@localhost/db")
    }

    fn up(seq: u64, table: &str, key: &str, pairs: &[(&str, Value)]) -> Change {
        Change {
            seq,
            table: table.to_owned(),
            key: key.to_owned(),
            op: jetsync::Change::Upsert(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
            ),
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

    fn shapes(planned: &Planned) -> Vec<(usize, usize)> {
        planned
            .statements
            .iter()
            .map(|s| (s.first, s.changes))
            .collect()
    }

    #[test]
    fn options_debug_hides_the_url() {
        let text = format!("{:?}", options());
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn consecutive_changes_of_one_shape_share_a_statement() {
        let changes: Vec<Change> = (0..1000u64)
            .map(|i| {
                up(
                    i + 1,
                    "nums",
                    &(i % 800).to_string(),
                    &[("name", Value::from("x")), ("qty", Value::I64(i as i64))],
                )
            })
            .collect();
        let planned = plan(&changes, &tables(), &options(), true).unwrap();
        assert!(planned.refusal.is_none());
        // Split only where key 0 comes again.
        assert_eq!(shapes(&planned), [(0, 800), (800, 200)]);
        let statement = &planned.statements[0];
        assert_eq!(statement.columns.len(), 3);
        assert_eq!(
            statement.types,
            [Type::INT8_ARRAY, Type::TEXT_ARRAY, Type::INT4_ARRAY]
        );
        assert_eq!(
            statement.sql,
            "INSERT INTO \"public\".\"nums\" (\"id\", \"name\", \"qty\") OVERRIDING SYSTEM VALUE \
             SELECT u.c0, u.c1, u.c2 FROM unnest($1, $2, $3) AS u(c0, c1, c2) \
             ON CONFLICT (\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \
             \"qty\" = EXCLUDED.\"qty\""
        );
        let ungrouped = plan(&changes, &tables(), &options(), false).unwrap();
        assert_eq!(ungrouped.statements.len(), 1000);
    }

    #[test]
    fn groups_split_at_table_op_and_column_set_changes() {
        let changes = vec![
            up(1, "nums", "1", &[("name", Value::from("a"))]),
            up(2, "nums", "2", &[("name", Value::from("b"))]),
            up(3, "nums", "3", &[("qty", Value::I64(1))]), // other columns
            up(4, "texts", "3", &[("qty", Value::I64(1))]), // other table
            del(5, "texts", "a"),
            del(6, "texts", "a"), // deletes may repeat a key
            del(7, "nums", "4"),
            up(8, "nums", "4", &[("qty", Value::I64(2))]),
            up(9, "nums", "04", &[("qty", Value::I64(3))]), // same key as 4 once converted
            up(
                10,
                "nums",
                "5",
                &[("total", Value::I64(9)), ("qty", Value::I64(3))],
            ),
        ];
        let planned = plan(&changes, &tables(), &options(), true).unwrap();
        assert_eq!(
            shapes(&planned),
            [(0, 2), (2, 1), (3, 1), (4, 2), (6, 1), (7, 1), (8, 2)]
        );
        // The generated column is not written.
        assert_eq!(planned.statements[6].columns.len(), 2);
        let delete = &planned.statements[3];
        assert_eq!(
            delete.sql,
            "DELETE FROM \"public\".\"texts\" WHERE \"id\" IN (SELECT u.c0 FROM unnest($1) AS u(c0))"
        );
    }

    #[test]
    fn text_sent_values_are_cast_to_the_column_type() {
        let changes = vec![up(1, "texts", "k", &[("price", Value::F64(1.5))])];
        let planned = plan(&changes, &tables(), &options(), true).unwrap();
        assert!(
            planned.statements[0]
                .sql
                .contains("SELECT u.c0, u.c1::numeric(10,2) FROM"),
            "{}",
            planned.statements[0].sql
        );
        assert_eq!(
            planned.statements[0].columns[1],
            [Cell::Text("1.5".to_owned())]
        );
    }

    #[test]
    fn refusals_stop_planning_with_the_index() {
        let mut options = options();
        let changes = vec![
            up(1, "nums", "1", &[("name", Value::from("a"))]),
            up(2, "nums", "2", &[("nope", Value::from("b"))]),
            up(3, "nums", "3", &[("name", Value::from("c"))]),
        ];
        let planned = plan(&changes, &tables(), &options, true).unwrap();
        let refusal = planned.refusal.as_ref().unwrap();
        assert_eq!(refusal.index, 1);
        assert!(refusal.reason.contains("`nope`"), "{}", refusal.reason);
        assert_eq!(shapes(&planned), [(0, 1)]);

        options.unknown_columns = UnknownColumns::Ignore;
        let planned = plan(&changes, &tables(), &options, true).unwrap();
        assert!(planned.refusal.is_none());
        assert_eq!(shapes(&planned), [(0, 1), (1, 1), (2, 1)]);
    }

    #[test]
    fn bad_changes_are_refused() {
        let cases = [
            (up(1, "missing", "1", &[]), "does not exist"),
            (up(1, "jetsync_offsets", "1", &[]), "reserved"),
            (up(1, "nums", "x", &[]), "subject key"),
            (del(1, "nums", "x"), "subject key"),
            (
                up(1, "nums", "1", &[("id", Value::I64(2))]),
                "does not match",
            ),
            (
                up(1, "texts", "a", &[("id", Value::from("b"))]),
                "does not match",
            ),
            (
                up(1, "nums", "1", &[("qty", Value::I64(1 << 40))]),
                "out of range",
            ),
            (
                up(1, "nums", "1", &[("qty", Value::from("1.5"))]),
                "not an integer",
            ),
            (
                up(1, "nums", "1", &[("price", Value::from("abc"))]),
                "not a number",
            ),
            (
                up(1, "nums", "1", &[("name", Value::from("a\0b"))]),
                "U+0000",
            ),
            (
                up(
                    1,
                    "nums",
                    "1",
                    &[("mixed", Value::Bool(true)), ("MIXED", Value::Bool(true))],
                ),
                "both name",
            ),
        ];
        for (change, expected) in cases {
            let planned = plan(std::slice::from_ref(&change), &tables(), &options(), true)
                .unwrap_or_else(|e| panic!("{change:?}: {e:?}"));
            let reason = &planned.refusal.as_ref().expect("refused").reason;
            assert!(reason.contains(expected), "{change:?}: {reason}");
        }
        // Keys that match once converted are fine; columns match case-insensitively when unique.
        let ok = [
            up(
                1,
                "nums",
                "7",
                &[("id", Value::I64(7)), ("mixed", Value::Bool(true))],
            ),
            up(1, "nums", "7", &[("id", Value::from("7"))]),
            up(1, "texts", "7", &[("ID", Value::I64(7))]),
        ];
        for change in ok {
            let planned = plan(std::slice::from_ref(&change), &tables(), &options(), true).unwrap();
            assert!(
                planned.refusal.is_none(),
                "{change:?}: {:?}",
                planned.refusal
            );
        }
    }

    #[test]
    fn tables_without_a_usable_key_are_fatal() {
        let mut tables = tables();
        let columns = vec![
            column("id", Kind::Int8, "bigint"),
            column("v", Kind::Text, "text"),
        ];
        tables.insert(
            "loose".to_owned(),
            Arc::new(TableInfo::new("loose", "id", columns.clone(), 1)),
        );
        tables.insert(
            "keyless".to_owned(),
            Arc::new(TableInfo::new("keyless", "code", columns, 1)),
        );
        let err = plan(&[del(1, "loose", "1")], &tables, &options(), true).unwrap_err();
        assert!(err.reason.contains("UNIQUE"), "{}", err.reason);
        let mut options = options();
        options
            .key_columns
            .insert("keyless".to_owned(), "code".to_owned());
        let err = plan(&[del(1, "keyless", "1")], &tables, &options, true).unwrap_err();
        assert!(
            err.reason.contains("no key column `code`"),
            "{}",
            err.reason
        );
    }

    #[test]
    fn conversions() {
        use Kind as K;
        let ok = [
            (K::Int2, Value::I64(-32768), Cell::I16(-32768)),
            (K::Int4, Value::from(" 42 "), Cell::I32(42)),
            (K::Int8, Value::F64(3.0), Cell::I64(3)),
            (K::Int8, Value::Null, Cell::Null),
            (K::Float4, Value::F64(0.5), Cell::F32(0.5)),
            (K::Float8, Value::I64(2), Cell::F64(2.0)),
            (K::Float8, Value::from("1e3"), Cell::F64(1000.0)),
            (K::Numeric, Value::I64(12), Cell::Text("12".into())),
            (K::Numeric, Value::F64(0.1), Cell::Text("0.1".into())),
            (
                K::Numeric,
                Value::from("123.4500"),
                Cell::Text("123.4500".into()),
            ),
            (K::Numeric, Value::F64(f64::NAN), Cell::Text("NaN".into())),
            (K::Bool, Value::Bool(true), Cell::Bool(true)),
            (K::Bool, Value::I64(0), Cell::Bool(false)),
            (K::Bool, Value::from("t"), Cell::Bool(true)),
            (K::Text, Value::from("x"), Cell::Text("x".into())),
            (K::Text, Value::I64(5), Cell::Text("5".into())),
            (K::Bytea, Value::Bytes(vec![0, 1]), Cell::Bytes(vec![0, 1])),
            (
                K::Jsonb,
                Value::Json(serde_json::json!({"a": 1})),
                Cell::Json(serde_json::json!({"a": 1})),
            ),
            (
                K::Json,
                Value::from("[1,2]"),
                Cell::Json(serde_json::json!([1, 2])),
            ),
            (
                K::Json,
                Value::from("plain"),
                Cell::Json(serde_json::json!("plain")),
            ),
            (K::Jsonb, Value::I64(3), Cell::Json(serde_json::json!(3))),
            (
                K::Timestamptz,
                Value::from("2024-05-01T14:00:00.250+02:00"),
                Cell::Text("2024-05-01T12:00:00.250Z".into()),
            ),
            (
                K::Timestamptz,
                Value::from("2024-05-01 12:00:00"),
                Cell::Text("2024-05-01T12:00:00Z".into()),
            ),
            (
                K::Timestamptz,
                Value::I64(1_714_564_800_123),
                Cell::Text("2024-05-01T12:00:00.123Z".into()),
            ),
            (
                K::Timestamptz,
                Value::from("Infinity"),
                Cell::Text("infinity".into()),
            ),
            (
                K::Timestamp,
                Value::from("2024-05-01T14:00:00+02:00"),
                Cell::Text("2024-05-01T12:00:00".into()),
            ),
            (
                K::Timestamp,
                Value::from("2024-05-01T12:00:00.5"),
                Cell::Text("2024-05-01T12:00:00.500".into()),
            ),
            (
                K::Date,
                Value::from("2024-05-01"),
                Cell::Text("2024-05-01".into()),
            ),
            (
                K::Date,
                Value::I64(1_714_564_800_123),
                Cell::Text("2024-05-01".into()),
            ),
            (
                K::Date,
                Value::from("2024-05-01T23:30:00-02:00"),
                Cell::Text("2024-05-02".into()),
            ),
            (
                K::Uuid,
                Value::from("67E55044-10B1-426F-9247-BB680E5FE0C8"),
                Cell::Uuid(uuid::Uuid::parse_str("67e55044-10b1-426f-9247-bb680e5fe0c8").unwrap()),
            ),
            (K::Other, Value::from("{1,2}"), Cell::Text("{1,2}".into())),
        ];
        for (kind, value, expected) in ok {
            assert_eq!(convert(kind, &value), Ok(expected), "{kind:?} {value:?}");
        }
        let bad = [
            (K::Int2, Value::I64(40_000)),
            (K::Int4, Value::from("12a")),
            (K::Int8, Value::F64(1.5)),
            (K::Int8, Value::Bool(true)),
            (K::Float4, Value::F64(1e300)),
            (K::Float8, Value::Bytes(vec![])),
            (K::Numeric, Value::Bool(true)),
            (K::Bool, Value::I64(2)),
            (K::Bool, Value::from("yes please")),
            (K::Text, Value::Bytes(vec![1])),
            (K::Bytea, Value::from("x")),
            (K::Json, Value::Bytes(vec![1])),
            (K::Jsonb, Value::F64(f64::INFINITY)),
            (K::Jsonb, Value::from("\"a\\u0000b\"")),
            (K::Timestamptz, Value::from("yesterday")),
            (K::Timestamp, Value::Bool(true)),
            (K::Date, Value::from("05/01/2024")),
            (K::Uuid, Value::from("not-a-uuid")),
            (K::Uuid, Value::I64(1)),
        ];
        for (kind, value) in bad {
            assert!(
                convert(kind, &value).is_err(),
                "{kind:?} {value:?} converted"
            );
        }
    }

    #[test]
    fn read_back_of_binary_times() {
        // 2024-05-01T12:00:00.5Z is 767_880_000.5 s after 2000-01-01.
        let micros: i64 = 767_880_000_500_000;
        assert_eq!(
            timestamp_text(&micros.to_be_bytes(), true).unwrap(),
            "2024-05-01T12:00:00.500Z"
        );
        assert_eq!(
            timestamp_text(&micros.to_be_bytes(), false).unwrap(),
            "2024-05-01T12:00:00.500"
        );
        assert_eq!(
            timestamp_text(&i64::MAX.to_be_bytes(), true).unwrap(),
            "infinity"
        );
        assert_eq!(date_text(&0i32.to_be_bytes()).unwrap(), "2000-01-01");
        assert_eq!(date_text(&(-1i32).to_be_bytes()).unwrap(), "1999-12-31");
        assert_eq!(date_text(&i32::MIN.to_be_bytes()).unwrap(), "-infinity");
    }

    #[test]
    fn error_classes() {
        for (code, class) in [
            ("40001", Class::Unavailable),
            ("40P01", Class::Unavailable),
            ("57P01", Class::Unavailable),
            ("08006", Class::Unavailable),
            ("53100", Class::Unavailable),
            ("55P03", Class::Unavailable),
            ("23505", Class::Rejected),
            ("23503", Class::Rejected),
            ("22P02", Class::Rejected),
            ("22003", Class::Rejected),
            ("P0001", Class::Rejected),
            ("42804", Class::Schema),
            ("42703", Class::Schema),
            ("42501", Class::Fatal),
            ("42601", Class::Fatal),
            ("57P04", Class::Fatal),
        ] {
            assert_eq!(classify_code(code), class, "{code}");
        }
    }

    #[test]
    fn names_are_quoted() {
        assert_eq!(quote(r#"we"ird"#), r#""we""ird""#);
        let mut info = table("t\"x", Kind::Text, 1);
        info.columns[1].name = "a\"; DROP TABLE x; --".to_owned();
        let sql = upsert_sql("s\"", &info, &[0, 1]);
        assert!(
            sql.starts_with(r#"INSERT INTO "s"""."t""x" ("id", "a""; DROP TABLE x; --")"#),
            "{sql}"
        );
    }

    // ---- against a real server ------------------------------------------------------------
    //
    // `JETSYNC_TEST_POSTGRES`, by default `postgres://postgres@127.0.0.1:5432/test`. Every test
    // works in a schema of its own, `jsu_<pid>_<n>`, dropped by a guard at the end of the test
    // (also when it fails); schemas of test processes that died are dropped by the next run.

    const PG_DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
    const G: &str = "CATALOG";

    static NEXT_SCHEMA: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    fn pg_url() -> String {
        std::env::var("JETSYNC_TEST_POSTGRES").unwrap_or_else(|_| PG_DEFAULT_URL.to_owned())
    }

    async fn pg_client() -> Client {
        let (client, connection) = tokio_postgres::connect(&pg_url(), NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!("cannot connect to the test Postgres (set JETSYNC_TEST_POSTGRES): {e:?}")
            });
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// A schema of the test's own, dropped when the guard goes out of scope.
    struct PgSchema {
        name: String,
    }

    impl PgSchema {
        /// A fresh schema with `ddl` run in it; the client's search_path points at it.
        async fn new(ddl: &str) -> (PgSchema, Client) {
            let client = pg_client().await;
            let leftovers = client
                .query(
                    "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'jsu\\_%'",
                    &[],
                )
                .await
                .unwrap();
            for row in leftovers {
                let name: String = row.get(0);
                let pid = name.split('_').nth(1).and_then(|p| p.parse::<u32>().ok());
                if let Some(pid) = pid {
                    if pid != std::process::id()
                        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
                    {
                        let _ = client
                            .batch_execute(&format!(
                                "DROP SCHEMA IF EXISTS {} CASCADE",
                                quote(&name)
                            ))
                            .await;
                    }
                }
            }
            let name = format!(
                "jsu_{}_{}",
                std::process::id(),
                NEXT_SCHEMA.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA {0}; SET search_path TO {0}; {ddl}",
                    quote(&name)
                ))
                .await
                .expect("test DDL");
            (PgSchema { name }, client)
        }

        /// A sink on this schema whose configured tables are `tables` (`(table, key column)`).
        async fn sink(&self, tables: &[(&str, &str)]) -> PostgresSink {
            let mut options = PostgresOptions::new(pg_url());
            options.schema = self.name.clone();
            options.key_columns = tables
                .iter()
                .map(|(t, k)| ((*t).to_owned(), (*k).to_owned()))
                .collect();
            PostgresSink::connect(options).await.expect("connect sink")
        }
    }

    impl Drop for PgSchema {
        fn drop(&mut self) {
            // From a thread of its own: usable inside and outside a runtime.
            let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(&self.name));
            let url = pg_url();
            let worker = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    if let Ok((client, connection)) = tokio_postgres::connect(&url, NoTls).await {
                        tokio::spawn(connection);
                        if let Err(e) = client.batch_execute(&sql).await {
                            eprintln!("cleanup failed: {e:?}");
                        }
                    }
                });
            });
            let _ = worker.join();
        }
    }

    fn text(s: &str) -> Value {
        Value::from(s)
    }

    fn pg_row(pairs: &[(&str, Value)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    async fn count(client: &Client, table: &str) -> i64 {
        client
            .query_one(&format!("SELECT count(*) FROM {}", quote(table)), &[])
            .await
            .unwrap()
            .get(0)
    }

    const REPLACE_DDL: &str = "\
        CREATE TABLE items (id text PRIMARY KEY, v bigint); \
        CREATE INDEX items_v ON items (v); \
        CREATE TABLE other (id bigint PRIMARY KEY, item text REFERENCES items (id)); \
        CREATE TABLE extra (id text PRIMARY KEY, w text); \
        CREATE TABLE local (id text PRIMARY KEY);";
    const REPLACE_TABLES: &[(&str, &str)] = &[("items", "id"), ("other", "id")];

    fn replacement() -> Vec<Change> {
        vec![
            up(2, "items", "a", &[("v", Value::I64(20))]),
            up(5, "items", "d", &[("v", Value::I64(5))]),
            del(6, "items", "d"),
            up(7, "other", "2", &[("item", text("a"))]),
            up(8, "extra", "e2", &[("w", text("y"))]),
            up(9, "items", "e", &[("v", Value::I64(9))]),
            del(10, "items", "never"),
            up(11, "items", "e", &[("v", Value::I64(11))]),
        ]
    }

    #[tokio::test]
    async fn replace_swaps_the_contents_and_sets_the_fence() {
        let (schema, client) = PgSchema::new(REPLACE_DDL).await;
        client
            .batch_execute("INSERT INTO local VALUES ('keep')")
            .await
            .unwrap();
        let mut sink = schema.sink(REPLACE_TABLES).await;
        sink.apply(
            G,
            &[
                up(1, "items", "a", &[("v", Value::I64(1))]),
                up(2, "items", "b", &[("v", Value::I64(2))]),
                up(3, "items", "c", &[("v", Value::I64(3))]),
                up(4, "other", "1", &[("item", text("b"))]),
                up(5, "extra", "e1", &[("w", text("x"))]),
            ],
            10,
        )
        .await
        .unwrap();

        // A reader in a transaction that started before keeps seeing the old rows, whole, and
        // does not block the replace.
        let reader = pg_client().await;
        reader
            .batch_execute(&format!(
                "SET search_path TO {}; BEGIN ISOLATION LEVEL REPEATABLE READ",
                quote(&schema.name)
            ))
            .await
            .unwrap();
        assert_eq!(count(&reader, "items").await, 3);

        let changes = replacement();
        sink.replace(G, &changes, 12).await.unwrap();

        assert_eq!(count(&reader, "items").await, 3);
        assert_eq!(count(&reader, "other").await, 1);
        reader.batch_execute("COMMIT").await.unwrap();
        assert_eq!(count(&reader, "items").await, 2);

        assert_eq!(sink.fence(G).await.unwrap(), Some(12));
        assert_eq!(
            sink.read_table("items").await.unwrap(),
            vec![
                pg_row(&[("id", text("a")), ("v", Value::I64(20))]),
                pg_row(&[("id", text("e")), ("v", Value::I64(11))]),
            ]
        );
        assert_eq!(
            sink.read_table("other").await.unwrap(),
            vec![pg_row(&[("id", Value::I64(2)), ("item", text("a"))])]
        );
        // A table the changes name is replaced too, though not configured.
        assert_eq!(
            sink.read_table("extra").await.unwrap(),
            vec![pg_row(&[("id", text("e2")), ("w", text("y"))])]
        );
        // A table that is neither configured nor named is not touched; indexes stay.
        assert_eq!(count(&client, "local").await, 1);
        let index: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND indexname = 'items_v'",
                &[&schema.name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(index, 1);

        // Same contents as a fresh sink that applied the same changes.
        let (fresh_schema, _fresh_client) = PgSchema::new(REPLACE_DDL).await;
        let mut fresh = fresh_schema.sink(REPLACE_TABLES).await;
        fresh.apply(G, &changes, 12).await.unwrap();
        let digest = sink.digest().await.unwrap();
        assert_eq!(digest, fresh.digest().await.unwrap());
        assert_eq!(
            digest
                .iter()
                .map(|d| (d.table.as_str(), d.rows))
                .collect::<Vec<_>>(),
            [("items", 2), ("other", 1)]
        );
        assert_eq!(
            sink.read_table("extra").await.unwrap(),
            fresh.read_table("extra").await.unwrap()
        );

        // Replacing with nothing empties the configured tables and sets the fence.
        sink.replace(G, &[], 3).await.unwrap();

        assert_eq!(sink.fence(G).await.unwrap(), Some(3));
        assert_eq!(count(&client, "items").await, 0);
        assert_eq!(count(&client, "other").await, 0);
    }

    /// The fence is still `fence` and the contents still digest to `digest`.
    async fn assert_untouched(sink: &mut PostgresSink, fence: u64, digest: &[TableDigest]) {
        assert_eq!(sink.fence(G).await.unwrap(), Some(fence));
        assert_eq!(sink.digest().await.unwrap(), digest);
    }

    #[tokio::test]
    async fn replace_with_a_rejected_change_keeps_the_old_contents_and_fence() {
        let (schema, _client) =
            PgSchema::new("CREATE TABLE items (id text PRIMARY KEY, v bigint CHECK (v >= 0));")
                .await;
        let mut sink = schema.sink(&[("items", "id")]).await;
        let old = [
            up(1, "items", "a", &[("v", Value::I64(1))]),
            up(2, "items", "b", &[("v", Value::I64(2))]),
            up(3, "items", "c", &[("v", Value::I64(3))]),
        ];
        sink.apply(G, &old, 10).await.unwrap();
        let before = sink.digest().await.unwrap();

        // The database refuses a row (one multi-row statement fails; the slow path finds it).
        let mut changes = vec![
            up(20, "items", "a", &[("v", Value::I64(100))]),
            up(21, "items", "bad", &[("v", Value::I64(-1))]),
            up(22, "items", "c", &[("v", Value::I64(300))]),
        ];
        let err = sink.replace(G, &changes, 12).await.unwrap_err();
        match &err {
            SinkError::Rejected {
                index,
                seq,
                table,
                key,
                reason,
            } => {
                assert_eq!((*index, *seq), (1, 21));
                assert_eq!((table.as_str(), key.as_str()), ("items", "bad"));
                assert!(reason.contains("23514"), "{reason}");
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert_untouched(&mut sink, 10, &before).await;

        // The sink refuses a change (no such table) before sending it.
        let err = sink
            .replace(
                G,
                &[
                    up(30, "items", "a", &[("v", Value::I64(5))]),
                    up(31, "missing", "k", &[]),
                ],
                12,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                SinkError::Rejected {
                    index: 1,
                    seq: 31,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_untouched(&mut sink, 10, &before).await;

        // A change naming the fence table is refused, and the fence table is never cleared.
        let err = sink
            .replace(
                G,
                &[up(40, "jetsync_offsets", G, &[("seq", Value::I64(1))])],
                12,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, SinkError::Rejected { index: 0, .. }),
            "{err:?}"
        );
        assert_untouched(&mut sink, 10, &before).await;

        // The engine parks the refused change and replaces again without it.
        changes.remove(1);
        sink.replace(G, &changes, 12).await.unwrap();
        assert_eq!(sink.fence(G).await.unwrap(), Some(12));
        assert_eq!(
            sink.read_table("items").await.unwrap(),
            vec![
                pg_row(&[("id", text("a")), ("v", Value::I64(100))]),
                pg_row(&[("id", text("c")), ("v", Value::I64(300))]),
            ]
        );
    }

    #[tokio::test]
    async fn apply_of_lower_sequences_at_the_fence_keeps_the_fence() {
        let (schema, _client) =
            PgSchema::new("CREATE TABLE items (id text PRIMARY KEY, v bigint CHECK (v >= 0));")
                .await;
        let mut sink = schema.sink(&[("items", "id")]).await;
        sink.apply(
            G,
            &[
                up(1, "items", "a", &[("v", Value::I64(1))]),
                up(2, "items", "b", &[("v", Value::I64(2))]),
            ],
            10,
        )
        .await
        .unwrap();
        // `parked retry`: events parked earlier (seqs below the fence), applied with the current
        // fence as last_seq.
        sink.apply(
            G,
            &[
                up(4, "items", "p", &[("v", Value::I64(4))]),
                del(5, "items", "a"),
                up(6, "items", "b", &[("v", Value::I64(6))]),
            ],
            10,
        )
        .await
        .unwrap();
        assert_eq!(sink.fence(G).await.unwrap(), Some(10));
        assert_eq!(
            sink.read_table("items").await.unwrap(),
            vec![
                pg_row(&[("id", text("b")), ("v", Value::I64(6))]),
                pg_row(&[("id", text("p")), ("v", Value::I64(4))]),
            ]
        );
        // A retry the database refuses leaves rows and fence alone.
        let err = sink
            .apply(G, &[up(3, "items", "q", &[("v", Value::I64(-3))])], 10)
            .await
            .unwrap_err();
        assert!(
            matches!(err, SinkError::Rejected { index: 0, .. }),
            "{err:?}"
        );
        assert_eq!(sink.fence(G).await.unwrap(), Some(10));
        assert_eq!(sink.read_table("items").await.unwrap().len(), 2);
        // Later batches move it on as usual.
        sink.apply(G, &[up(11, "items", "q", &[("v", Value::I64(11))])], 11)
            .await
            .unwrap();
        assert_eq!(sink.fence(G).await.unwrap(), Some(11));
    }

    #[test]
    fn target_description_has_no_password() {
        let config: tokio_postgres::Config = "postgres://app:hunter2@db.internal:6543/shop"
            .parse()
            .unwrap();
        assert_eq!(describe_target(&config), "app@db.internal:6543/shop");
    }
}
