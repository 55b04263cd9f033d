//! The Postgres sink: applies synced tables into the service's own, existing Postgres database.
//!
//! **Tables.** Unlike the SQLite sink, this sink does not own its tables: it writes into tables
//! the service created and never creates, alters or drops one. The schema is
//! [`PostgresOptions::schema`] (`sink.schema`), or, when that is unset, the connection's
//! `current_schema()` (so a `search_path` of the user or of the URL is honoured). Only the
//! tables configured under `[tables]` ([`PostgresOptions::key_columns`]) are written, cleared by
//! a resync, or looked at by the digest: a change for another table is [`SinkError::Rejected`]
//! ("not synced here"), and `jetsync_*` and `pg_*` tables are never written. An event for a
//! configured table that does not exist is Rejected with a message naming the table. The key
//! column is configurable per table and must carry a PRIMARY KEY, a UNIQUE constraint or a full
//! unique index on that column alone (`ON CONFLICT` needs one); a change for a table without
//! one is Rejected too.
//!
//! **Columns.** By default an upsert *replaces the row's synced columns*: `INSERT … ON CONFLICT
//! (key) DO UPDATE SET` every column except the key, generated columns and identity columns the
//! event does not carry, to the event's value or to `DEFAULT` when the event lacks the column.
//! So a row depends only on its last event, and an instance that joined from a snapshot holds
//! the same rows as one that replayed the history (DESIGN §5, the convergence rule). A column
//! the service fills itself (`updated_at timestamptz default now()`) is reset to its default by
//! every replicated upsert. `tables.<name>.merge = true` ([`PostgresOptions::merge_tables`])
//! updates only the carried columns instead and keeps the others; the caveat: a merged row
//! depends on which earlier events an instance saw, so an instance that bootstrapped from a
//! snapshot (or resynced) can hold different values than one that replayed every event, and
//! their digests differ. Columns an event carries that the table lacks are rejected naming the
//! column (`unknown_columns = "error"`, the default) or dropped (`"ignore"`). Values events
//! carry for columns the table *generates* (`GENERATED ALWAYS AS (…) STORED`) are ignored.
//! Identity columns (`GENERATED ALWAYS AS IDENTITY`) are written with the replicated value
//! (`OVERRIDING SYSTEM VALUE`). Column names match exactly, else ASCII-case-insensitively when
//! that names exactly one column.
//!
//! **Types.** Columns are discovered from `pg_attribute` (types resolved through domains),
//! cached per table, and looked up again when a change does not fit the cached description
//! or the database reports a schema error. Each [`jetsync::Value`] is converted to its column's
//! type before anything is sent:
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
//! `Null` fits every column. A value that does not convert makes its change Rejected (poison).
//!
//! **Keys: one row, one subject.** The subject key (text) must be the canonical spelling of the
//! key column's value, or the change is Rejected: Postgres would coerce `042`, `+42`, ` 42` or
//! `4.2e1` into the integer 42 and an upper-case or brace-wrapped uuid into the lower-case one,
//! so two subjects would write one row. Integer keys are plain decimals, uuid keys lower-case
//! hyphenated, numeric keys decimals without leading or trailing zeros (and no more fraction
//! digits than the column keeps), boolean keys `true`/`false`, date keys `YYYY-MM-DD`; text
//! keys are taken as they are (except trailing spaces in `char`/`varchar` columns, which
//! Postgres may drop); key columns of other types are refused. When a row carries its key
//! column, that value must equal the subject key.
//!
//! **Batches.** A batch is one transaction of a few multi-row statements (see `plan.rs`), all
//! pipelined with the fence upsert, so a batch costs two round trips whatever its size.
//!
//! **Fence.** Table `jetsync_offsets (stream text primary key, seq bigint not null, instance
//! text)` in the schema, created at connect when missing (`instance` is added to an older
//! table), is written in the same transaction as the rows. It records which instance owns the
//! stream in this schema: a second instance configured onto the same schema and stream is
//! refused ([`SinkError::Fatal`], naming both). **A fence never decreases through a batch**:
//! every session takes a per-(schema, stream) advisory lock before it reads the fence, and a
//! batch writes `GREATEST(current, last_seq)`. Crash windows (see `fence.rs` and `write.rs`):
//!
//! - the process dies (or the connection drops) before `COMMIT` reached the server: Postgres
//!   rolls the transaction back, nothing of the batch is visible, the fence is unchanged; the
//!   engine replays the batch after the fence.
//! - it dies after `COMMIT` completed: rows and fence moved together; the engine resumes after
//!   the fence.
//! - it dies *while* `COMMIT` is in flight: the old backend may still execute that COMMIT after
//!   the client is gone, and it holds the advisory lock until it has. A new session gets the
//!   lock only afterwards ([`SinkError::Unavailable`] meanwhile; the engine retries), then reads
//!   the fence, and skips the changes of a forward-moving batch at or below it: they are in the
//!   database already. So no event is applied twice (triggers included), even when the
//!   restarted applier's batches end below that fence.
//!
//! `parked retry` applies parked (lower) sequences with the fence the engine knows as
//! `last_seq`: such a batch is applied whole and leaves the fence where it is. `reset
//! --to-seq` ([`Sink::set_fence`]) is the one explicit way to move the fence back; a resync
//! sets it to the snapshot's last sequence with the replaced rows.
//!
//! **Replace.** A resync streams the snapshot through [`Sink::replace_begin`],
//! [`Sink::replace_chunk`] and [`Sink::replace_commit`]: one transaction that takes the lock,
//! `DELETE`s every row of the configured tables (not `TRUNCATE`, whose ACCESS EXCLUSIVE lock
//! would block the service's readers: they see the old rows until `COMMIT`), applies each chunk
//! inside a `SAVEPOINT` (a Rejected change rolls back only its chunk and the replacement stays
//! open), then sets the fence and commits. Delete triggers and `ON DELETE` actions of foreign
//! keys run as for any delete. A deferred constraint that only fails at the final `COMMIT`
//! cannot be traced to one change: the replacement is rolled back and reported Unavailable.
//!
//! **Errors.** Classified by SQLSTATE in `errors.rs`: the content of one event (data
//! exceptions, constraint violations, program limits, permission denied on a table, a missing
//! table or column, a view, a table without a usable key) is Rejected with the change's index
//! and nothing of the batch applied (when a multi-row statement fails the sink rolls back and
//! applies the batch again one change per statement to find the change); failures of the whole
//! sink (connection, shutdown, resources, serialization failures and deadlocks, a read-only
//! standby) are Unavailable; what an event contains never yields Fatal.
//!
//! **Server.** PostgreSQL 12 or newer; no TLS. The user of the URL needs `SELECT, INSERT,
//! UPDATE, DELETE` on the synced tables and on `jetsync_offsets`, and `CREATE` on the schema
//! only while `jetsync_offsets` does not exist (or lacks its `instance` column).
//!
//! **Digest and emptiness.** Only the configured tables are considered. [`Sink::digest`] reads
//! every column of those tables (so a column such as `updated_at default now()` makes
//! instances' digests differ), mapping integers to `I64`, floats to `F64`, `numeric` to `Text`,
//! `boolean` to `Bool`, text types to `Text`, `bytea` to `Bytes`, `json`/`jsonb` to `Json`,
//! `timestamptz` to RFC 3339 `Text` in UTC (`2024-05-01T12:00:00.5Z`), `timestamp` to `Text`
//! without offset, `date` to `Text` `YYYY-MM-DD`, `uuid` to lowercase `Text` and every other
//! type to its text form; NULL columns count as absent.

mod catalog;
mod digest;
mod errors;
mod fence;
mod options;
mod plan;
mod types;
mod write;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use jetsync::Row;
use tokio_postgres::{Client, NoTls};

pub use self::options::PostgresOptions;

use self::errors::{connect_error, describe, describe_target, op_error, url_error};
use self::plan::TableInfo;
use crate::{Change, Sink, SinkError, TableDigest};

/// Name of the fence table; also why `jetsync_*` table names are reserved.
const FENCE_TABLE: &str = "jetsync_offsets";
/// Connect timeout when the URL sets none (`connect_timeout=` in the URL overrides it).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive idle time when the URL keeps the driver's default of two hours, so that a
/// vanished server is noticed while a batch waits for an answer.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(60);

/// A sink writing synced rows into the service's existing Postgres tables, with the fence in
/// table `jetsync_offsets` of the same transaction (see the module documentation for column
/// semantics, type conversions and crash windows).
///
/// Needs a tokio runtime: the connection runs as a spawned task.
pub struct PostgresSink {
    options: PostgresOptions,
    /// The schema of the synced tables: [`PostgresOptions::schema`], or the connection's
    /// current schema, resolved at connect.
    schema: String,
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
    /// Incremented per batch: tells which cached tables were looked up during this batch.
    generation: u64,
    /// Requests sent to the server (statements, BEGIN, COMMIT, ...).
    statements_sent: u64,
    /// Per-group session state (boxed, like `config`, to keep [`crate::AnySink`] small).
    groups: Box<GroupState>,
}

/// What a [`PostgresSink`] knows per sync group.
#[derive(Default)]
struct GroupState {
    /// Groups whose advisory lock the current connection holds (see `fence.rs`).
    locked: HashSet<String>,
    /// The fence in the database, read under the lock and kept up to date while it is held
    /// (no other session writes it then).
    stored: HashMap<String, u64>,
    /// The fence as the engine knows it: what [`Sink::fence`] last returned or the last
    /// `last_seq` it gave. A batch ending above it moves forward; one ending at or below it is
    /// a `parked retry` of events that were never applied.
    told: HashMap<String, u64>,
    /// The group of the replacement (resync) open on the connection.
    replacing: Option<String>,
    /// A replacement call was cancelled half-way: the replacement must start over.
    replace_interrupted: bool,
}

impl fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSink")
            .field("target", &self.target)
            .field("schema", &self.schema)
            .field(
                "connected",
                &self.client.as_ref().is_some_and(|c| !c.is_closed()),
            )
            .finish_non_exhaustive()
    }
}

/// The startup option that marks the sink's sessions for the capture triggers.
pub(crate) const APPLYING_OPTION: &str = "-c jetsync.applying=on";

impl PostgresSink {
    /// Connects to the database, resolves the schema and creates `jetsync_offsets` in it when it
    /// is missing (adding its `instance` column to an older one).
    ///
    /// Fails with [`SinkError::Unavailable`] when the server cannot be reached (or is starting
    /// up, or has no free connection), and with [`SinkError::Fatal`] saying what to fix when
    /// authentication fails, the database or schema does not exist or the user may not create
    /// the fence table. Configuration errors are Fatal with a reason that starts with the key:
    /// `sink.url: ` (a URL that does not parse), `sink.schema: ` (an unusable schema name, or
    /// no schema given and none current), `tables.<name>: ` (a reserved table name or an empty
    /// key column). No message contains the password.
    pub async fn connect(options: PostgresOptions) -> Result<PostgresSink, SinkError> {
        validate_options(&options)?;
        let mut config: tokio_postgres::Config = options
            .url
            .parse()
            .map_err(|e| url_error(&options.url, &e))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("jetsync-applier");
        }
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(KEEPALIVES_IDLE);
        }
        // Every session of the sink carries `jetsync.applying = on`, so that capture triggers
        // (`capture install`) skip the applier's own writes (apply, resync, parked retries):
        // no echo. A custom setting needs no privilege; only this session sees it.
        let startup = match config.get_options() {
            Some(given) if !given.trim().is_empty() => format!("{given} {APPLYING_OPTION}"),
            _ => APPLYING_OPTION.to_owned(),
        };
        config.options(&startup);
        let target = describe_target(&config);
        let mut sink = PostgresSink {
            schema: options.schema.clone().unwrap_or_default(),
            options,
            config: Box::new(config),
            target,
            client: None,
            in_transaction: false,
            tables: HashMap::new(),
            generation: 0,
            statements_sent: 0,
            groups: Box::default(),
        };
        sink.ensure_connected().await?;
        if sink.options.schema.is_none() {
            sink.schema = sink.current_schema().await?;
        }
        sink.ensure_fence_table().await?;
        tracing::debug!(target_db = %sink.target, schema = %sink.schema, "opened Postgres sink");
        Ok(sink)
    }

    /// The options the sink was built with.
    pub fn options(&self) -> &PostgresOptions {
        &self.options
    }

    /// The schema of the synced tables and of `jetsync_offsets` (the configured one, or the
    /// connection's current schema when none was configured).
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// How many requests (statements, BEGIN, COMMIT, ROLLBACK, schema look-ups) this sink has
    /// sent to the server since it was created; lets tests and benchmarks check that a batch is
    /// applied with a handful of statements rather than one per event.
    pub fn statements_sent(&self) -> u64 {
        self.statements_sent
    }

    /// All rows of `table` (in the sink's schema) as the digest sees them, ordered by the
    /// table's key column when it is configured; a table that does not exist reads as empty.
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
    /// failed call left open (an open replacement included: any call but the replacement's own
    /// ends it).
    async fn ensure_connected(&mut self) -> Result<(), SinkError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            tracing::info!(target_db = %self.target, "Postgres connection lost; reconnecting");
            self.client = None;
        }
        if self.client.is_none() {
            self.in_transaction = false;
            // Advisory locks belong to the session that took them, and so does the fence
            // read under them.
            self.groups.locked.clear();
            self.groups.stored.clear();
            self.groups.replacing = None;
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
            self.groups.replacing = None;
            self.finish_transaction("ROLLBACK")
                .await
                .map_err(|e| self.op_error("roll back a transaction on", &e))?;
        }
        Ok(())
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
        op_error(&self.target, &self.schema, what, e)
    }

    /// `current_schema()` of the connection: the first schema of its `search_path` that exists.
    async fn current_schema(&mut self) -> Result<String, SinkError> {
        self.statements_sent += 1;
        let schema: Option<String> = self
            .client()?
            .query_typed_one("SELECT current_schema()::text", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.op_error("read the current schema of", &e))?;
        let schema = schema.ok_or_else(|| SinkError::Fatal {
            reason: format!(
                "sink.schema: not set, and the search_path of the connection to {} names no \
                 existing schema: set sink.schema to the schema of the service's tables",
                self.target
            ),
        })?;
        validate_schema(&schema)?;
        Ok(schema)
    }
}

impl Sink for PostgresSink {
    async fn fence(&mut self, group: &str) -> Result<Option<u64>, SinkError> {
        // This sink keeps a fence: "never applied" is Some(0), so an emptied or replaced
        // database is never mistaken for "trust the redb checkpoint".
        self.current_fence(group).await.map(Some)
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
        self.apply_batch(group, changes, last_seq).await
    }

    async fn replace_begin(&mut self, group: &str) -> Result<(), SinkError> {
        self.begin_replacement(group).await
    }

    async fn replace_chunk(&mut self, group: &str, changes: &[Change]) -> Result<(), SinkError> {
        self.replacement_chunk(group, changes).await
    }

    async fn replace_commit(&mut self, group: &str, last_seq: u64) -> Result<(), SinkError> {
        self.commit_replacement(group, last_seq).await
    }

    async fn replace_abort(&mut self, group: &str) {
        self.abort_replacement(group).await;
    }

    async fn set_fence(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        self.rewind_fence(group, seq).await
    }

    async fn digest(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        self.compute_digest().await
    }
}

/// Whether `table` may never hold synced rows: the applier's own `jetsync_*` tables and names
/// of the database's internal `pg_*` kind.
fn is_reserved_table(table: &str) -> bool {
    let lower = table.to_ascii_lowercase();
    lower.starts_with("jetsync_") || lower.starts_with("pg_")
}

/// Checks the configuration the sink can check before connecting.
fn validate_options(options: &PostgresOptions) -> Result<(), SinkError> {
    if let Some(schema) = &options.schema {
        validate_schema(schema)?;
    }
    for (table, column) in &options.key_columns {
        if is_reserved_table(table) {
            return Err(SinkError::Fatal {
                reason: format!(
                    "tables.{table}: table names starting with jetsync_ or pg_ are reserved and \
                     never synced by the postgres sink: rename the table"
                ),
            });
        }
        if column.is_empty() || column.contains('\0') {
            return Err(SinkError::Fatal {
                reason: format!("tables.{table}.key: invalid key column name {column:?}"),
            });
        }
    }
    Ok(())
}

/// The schema must be a usable name, and not one of the database's own schemas.
fn validate_schema(schema: &str) -> Result<(), SinkError> {
    let lower = schema.to_ascii_lowercase();
    let why = if schema.is_empty() || schema.contains('\0') {
        "is not a valid schema name"
    } else if lower.starts_with("pg_") || lower == "information_schema" {
        "is one of the database's internal schemas, which the applier never writes"
    } else {
        return Ok(());
    };
    Err(SinkError::Fatal {
        reason: format!(
            "sink.schema: {schema:?} {why}; set sink.schema to the schema of the service's tables"
        ),
    })
}
