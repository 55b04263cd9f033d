//! Capture on Postgres: the outbox, the trigger, and the relay's reads and writes of the outbox.
//!
//! In the sink's schema:
//! - `jetsync_outbox (id bigserial, xid bigint DEFAULT txid_current(), tbl, op, key, row jsonb)`:
//!   one row per captured change, tagged with the local transaction id.
//! - `jetsync_capture_state (published)`: entries published over the instance's life.
//! - function `jetsync_capture_truncate()` and, per captured table, trigger
//!   `jetsync_capture_truncate` (BEFORE TRUNCATE, FOR EACH STATEMENT): `TRUNCATE` fires no row
//!   trigger, so this one queues a delete of every row the table holds (keys spelled as the row
//!   trigger spells them), in the truncating transaction. Without it a service's `TRUNCATE`
//!   would empty the table on its own instance only.
//! - function `jetsync_capture()` and, per captured table, trigger `jetsync_capture` (AFTER
//!   INSERT OR UPDATE OR DELETE, FOR EACH ROW) with the key column as its argument. The row
//!   image is `to_jsonb(NEW)`, so a column added later is captured without reinstalling. It
//!   fires only `WHEN (current_setting('jetsync.applying', true) IS DISTINCT FROM 'on')`: the
//!   sink's sessions set it (no echo). The function runs with its owner's rights (`SECURITY
//!   DEFINER`, fixed `search_path`), so the service's database user needs no privilege on the
//!   outbox: whoever installs capture owns it. It also notifies channel `jetsync_capture` with
//!   the schema's name, which Postgres delivers at commit: the relay, listening, publishes at
//!   once rather than at its next poll (`capture.poll_ms` stays the fallback, e.g. for
//!   triggers installed by an older version).
//!
//! Values: the relay reads each image column as text (`jsonb_each_text`, exact for numeric)
//! and converts it by the column's type: integers → i64, float4/8 → f64, numeric → text (its
//! exact decimal spelling), bool → bool, bytea → bytes, json/jsonb → json, anything else
//! (text, timestamps, uuid, ...) → text, which the Postgres sink of every instance converts back
//! to the column's type.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use futures::StreamExt as _;
use jetsync::{Change, Config, Row, Value, MAX_TRANSACTION_ROWS};
use tokio::sync::Notify;
use tokio_postgres::{types::Type, AsyncMessage, Client, NoTls};

use super::{image, Ack, Batch, CaptureError, CaptureReport, Entry, TableAction};
use crate::sinks::sql::push_quoted;

fn quoted(name: &str) -> String {
    let mut out = String::new();
    push_quoted(&mut out, name);
    out
}

/// How long the relay's statements wait for a row lock held by another session. A service
/// transaction that is still open may hold the pending entry of a row the relay settles; the
/// relay must not wait for it while holding entries of its own: a service that keeps one
/// transaction open while it runs another (on a second connection) would wait for the relay in
/// that other transaction, a cycle Postgres cannot see. The relay rolls back instead and tries
/// again at its next cycle ([`CaptureError::Busy`]).
const RELAY_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '100ms'";

fn pg_error(what: &str, e: &tokio_postgres::Error) -> CaptureError {
    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
        return CaptureError::Busy(format!(
            "Postgres: {what}: a row is locked by a transaction still open; retrying"
        ));
    }
    let detail = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string());
    CaptureError::Database(format!("Postgres: {what}: {detail}"))
}

/// The channel the capture triggers notify at commit (payload: the outbox's schema), so that
/// the relay publishes at once instead of at its next poll.
pub(super) const CHANNEL: &str = "jetsync_capture";

/// Connects (as a plain session: this one's writes are captured like the service's) and
/// returns the client with the sink's schema.
pub(super) async fn connect(config: &Config) -> Result<(Client, String), CaptureError> {
    connect_notified(config, None).await
}

/// [`connect`], and wakes `wake` on every notification the session receives (see
/// [`CHANNEL`]) for the sink's schema.
async fn connect_notified(
    config: &Config,
    wake: Option<Arc<Notify>>,
) -> Result<(Client, String), CaptureError> {
    let url = config
        .sink
        .url
        .as_ref()
        .ok_or_else(|| CaptureError::Config {
            key: "sink.url".into(),
            reason: "must be set for the postgres sink".into(),
        })?;
    let pg: tokio_postgres::Config = url.expose().parse().map_err(|e| CaptureError::Config {
        key: "sink.url".into(),
        reason: format!("not a valid Postgres connection string: {e}"),
    })?;
    let (client, connection) = pg
        .connect(NoTls)
        .await
        .map_err(|e| pg_error("connect", &e))?;
    // The schema is known once the session can answer; notifications come only after LISTEN.
    let known_schema = Arc::new(OnceLock::<String>::new());
    let for_driver = known_schema.clone();
    tokio::spawn(async move {
        // Drives the connection; notifications for our schema wake the relay.
        let mut connection = connection;
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let ours = for_driver.get().is_none_or(|s| s == n.payload());
                    if let (true, Some(wake)) = (ours, &wake) {
                        wake.notify_one();
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "capture's Postgres connection closed");
                    break;
                }
            }
        }
    });
    let schema = match &config.sink.schema {
        Some(schema) => schema.clone(),
        None => client
            .query_one("SELECT current_schema()", &[])
            .await
            .map_err(|e| pg_error("read the current schema", &e))?
            .get::<_, Option<String>>(0)
            .ok_or_else(|| CaptureError::Config {
                key: "sink.schema".into(),
                reason: "no schema given and the connection has no current schema".into(),
            })?,
    };
    let _ = known_schema.set(schema.clone());
    Ok((client, schema))
}

/// The outbox, the capture state and pending tables and the trigger function of schema
/// `schema` (`s`: its quoted name). The function notifies [`CHANNEL`] with the schema's name:
/// Postgres delivers it at commit (once per transaction), which wakes the relay.
fn create_sql(schema: &str, s: &str) -> String {
    let channel = CHANNEL;
    let payload = format!("'{}'", schema.replace('\'', "''"));
    // The schema inside the truncate function's `format` string (a SQL literal there).
    let sf = s.replace('%', "%%").replace('\'', "''");
    format!(
        "CREATE TABLE IF NOT EXISTS {s}.jetsync_outbox (\
            id bigserial PRIMARY KEY, xid bigint NOT NULL DEFAULT txid_current(), \
            tbl text NOT NULL, op text NOT NULL, key text, row jsonb); \
         CREATE TABLE IF NOT EXISTS {s}.jetsync_capture_state (\
            id int PRIMARY KEY CHECK (id = 1), published bigint NOT NULL); \
         INSERT INTO {s}.jetsync_capture_state (id, published) VALUES (1, 0) ON CONFLICT DO NOTHING; \
         CREATE TABLE IF NOT EXISTS {s}.jetsync_capture_pending (\
            tbl text NOT NULL, key text NOT NULL, outbox_id bigint NOT NULL, seq bigint, \
            PRIMARY KEY (tbl, key)); \
         CREATE INDEX IF NOT EXISTS jetsync_capture_pending_outbox ON {s}.jetsync_capture_pending (outbox_id); \
         CREATE INDEX IF NOT EXISTS jetsync_capture_pending_seq ON {s}.jetsync_capture_pending (seq); \
         CREATE OR REPLACE FUNCTION {s}.jetsync_capture() RETURNS trigger LANGUAGE plpgsql \
         SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $jetsync$ \
         DECLARE k text := TG_ARGV[0]; oid bigint; rk text; \
         BEGIN \
           IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND (to_jsonb(OLD) -> k) IS DISTINCT FROM (to_jsonb(NEW) -> k)) THEN \
             rk := to_jsonb(OLD) ->> k; \
             INSERT INTO {s}.jetsync_outbox (tbl, op, key) VALUES (TG_TABLE_NAME, 'delete', rk) RETURNING id INTO oid; \
             INSERT INTO {s}.jetsync_capture_pending (tbl, key, outbox_id) VALUES (TG_TABLE_NAME, rk, oid) \
               ON CONFLICT (tbl, key) DO UPDATE SET outbox_id = EXCLUDED.outbox_id, seq = NULL; \
           END IF; \
           IF TG_OP = 'DELETE' THEN \
             PERFORM pg_notify('{channel}', {payload}); \
             RETURN NULL; \
           END IF; \
           rk := to_jsonb(NEW) ->> k; \
           INSERT INTO {s}.jetsync_outbox (tbl, op, key, row) VALUES (TG_TABLE_NAME, 'upsert', rk, to_jsonb(NEW)) RETURNING id INTO oid; \
           INSERT INTO {s}.jetsync_capture_pending (tbl, key, outbox_id) VALUES (TG_TABLE_NAME, rk, oid) \
             ON CONFLICT (tbl, key) DO UPDATE SET outbox_id = EXCLUDED.outbox_id, seq = NULL; \
           PERFORM pg_notify('{channel}', {payload}); \
           RETURN NULL; \
         END $jetsync$; \
         CREATE OR REPLACE FUNCTION {s}.jetsync_capture_truncate() RETURNS trigger LANGUAGE plpgsql \
         SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $jetsync$ \
         BEGIN \
           EXECUTE format('WITH gone AS (\
               INSERT INTO {sf}.jetsync_outbox (tbl, op, key) \
               SELECT %L, ''delete'', k FROM (SELECT DISTINCT to_jsonb(x) ->> %L AS k FROM %I.%I x) d \
               ORDER BY k RETURNING id, tbl, key) \
             INSERT INTO {sf}.jetsync_capture_pending (tbl, key, outbox_id) SELECT tbl, key, id FROM gone \
             ON CONFLICT (tbl, key) DO UPDATE SET outbox_id = EXCLUDED.outbox_id, seq = NULL', \
             TG_TABLE_NAME, TG_ARGV[0], TG_TABLE_SCHEMA, TG_TABLE_NAME); \
           PERFORM pg_notify('{channel}', {payload}); \
           RETURN NULL; \
         END $jetsync$"
    )
}

/// The triggers capture puts on a table (`TRUNCATE` fires no row trigger: a statement trigger
/// of its own turns it into a delete of every row the table held).
const TRIGGERS: [&str; 2] = ["jetsync_capture", "jetsync_capture_truncate"];

/// The triggers' condition: the session is not the applier's (no echo).
const NOT_APPLYING: &str = "current_setting('jetsync.applying', true) IS DISTINCT FROM 'on'";

/// Drops both capture triggers of table `t` (schema-qualified and quoted).
fn drop_triggers_sql(t: &str) -> String {
    TRIGGERS
        .iter()
        .map(|name| format!("DROP TRIGGER IF EXISTS {name} ON {t}; "))
        .collect()
}

/// `capture install`.
pub(super) async fn install(
    config: &Config,
    tables: &[(String, String)],
    backfill: bool,
) -> Result<CaptureReport, CaptureError> {
    let (mut client, schema) = connect(config).await?;
    let s = quoted(&schema);
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error("begin", &e))?;
    tx.batch_execute(&create_sql(&schema, &s))
        .await
        .map_err(|e| pg_error("create the outbox and the capture function", &e))?;
    let mut actions = Vec::new();
    for (table, key) in tables {
        let columns: Vec<String> = tx
            .query(
                "SELECT a.attname::text FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&schema, table],
            )
            .await
            .map_err(|e| pg_error("read the columns", &e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if columns.is_empty() {
            return Err(CaptureError::Config {
                key: format!("tables.{table}.capture"),
                reason: format!(
                    "table {schema}.{table} does not exist; create it first (capture puts \
                     triggers on the service's existing tables)"
                ),
            });
        }
        if !columns.contains(key) {
            return Err(CaptureError::Config {
                key: format!("tables.{table}.key"),
                reason: format!(
                    "table {schema}.{table} has no column `{key}` (its columns: {})",
                    columns.join(", ")
                ),
            });
        }
        let existed: bool = tx
            .query_one(
                "SELECT count(*) > 0 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND t.tgname = 'jetsync_capture'",
                &[&schema, table],
            )
            .await
            .map_err(|e| pg_error("read the triggers", &e))?
            .get(0);
        let t = format!("{s}.{}", quoted(table));
        let key_literal = format!("'{}'", key.replace('\'', "''"));
        tx.batch_execute(&format!(
            "{drop}\
             CREATE TRIGGER jetsync_capture AFTER INSERT OR UPDATE OR DELETE ON {t} \
             FOR EACH ROW WHEN ({NOT_APPLYING}) EXECUTE FUNCTION {s}.jetsync_capture({key_literal}); \
             CREATE TRIGGER jetsync_capture_truncate BEFORE TRUNCATE ON {t} \
             FOR EACH STATEMENT WHEN ({NOT_APPLYING}) \
             EXECUTE FUNCTION {s}.jetsync_capture_truncate({key_literal})",
            drop = drop_triggers_sql(&t)
        ))
        .await
        .map_err(|e| pg_error(&format!("create the capture trigger of {table}"), &e))?;
        let mut action = if existed { "reinstalled" } else { "installed" }.to_owned();
        if backfill {
            let rows = tx
                .execute(
                    &format!(
                        "INSERT INTO {s}.jetsync_outbox (tbl, op, key, row) \
                         SELECT $1, 'upsert', to_jsonb(x) ->> $2, to_jsonb(x) FROM {t} x"
                    ),
                    &[table, key],
                )
                .await
                .map_err(|e| pg_error(&format!("queue the rows of {table}"), &e))?;
            tx.execute(
                &format!(
                    "INSERT INTO {s}.jetsync_capture_pending (tbl, key, outbox_id) \
                     SELECT tbl, key, max(id) FROM {s}.jetsync_outbox \
                     WHERE tbl = $1 AND key IS NOT NULL GROUP BY tbl, key \
                     ON CONFLICT (tbl, key) DO UPDATE SET outbox_id = EXCLUDED.outbox_id, seq = NULL"
                ),
                &[table],
            )
            .await
            .map_err(|e| pg_error(&format!("queue the rows of {table}"), &e))?;
            action += &format!(", {rows} existing row(s) queued (backfill)");
        }
        actions.push(TableAction {
            table: table.clone(),
            action,
            columns: Vec::new(),
        });
    }
    // Tables captured before but not any more.
    for table in triggered_tables(&tx, &schema).await? {
        if !tables.iter().any(|(t, _)| *t == table) {
            tx.batch_execute(&drop_triggers_sql(&format!("{s}.{}", quoted(&table))))
                .await
                .map_err(|e| pg_error("drop a trigger", &e))?;
            actions.push(TableAction {
                table,
                action: "removed (no longer capture = true)".into(),
                columns: Vec::new(),
            });
        }
    }
    tx.commit().await.map_err(|e| pg_error("commit", &e))?;
    let (backlog, _) = counts_on(&client, &schema).await?;
    Ok(CaptureReport {
        outbox: format!("{schema}.{}", super::OUTBOX_TABLE),
        tables: actions,
        backlog,
        note: None,
    })
}

async fn triggered_tables(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
) -> Result<Vec<String>, CaptureError> {
    Ok(client
        .query(
            "SELECT c.relname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND t.tgname = ANY($2) GROUP BY 1 ORDER BY 1",
            &[&schema, &TRIGGERS.as_slice()],
        )
        .await
        .map_err(|e| pg_error("read the triggers", &e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// `capture remove`: drops every capture trigger in the schema; the outbox stays.
pub(super) async fn remove(config: &Config) -> Result<CaptureReport, CaptureError> {
    let (mut client, schema) = connect(config).await?;
    let s = quoted(&schema);
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error("begin", &e))?;
    let mut actions = Vec::new();
    for table in triggered_tables(&tx, &schema).await? {
        tx.batch_execute(&drop_triggers_sql(&format!("{s}.{}", quoted(&table))))
            .await
            .map_err(|e| pg_error("drop a trigger", &e))?;
        actions.push(TableAction {
            table,
            action: "removed".into(),
            columns: Vec::new(),
        });
    }
    tx.commit().await.map_err(|e| pg_error("commit", &e))?;
    let (backlog, _) = counts_on(&client, &schema).await.unwrap_or((0, 0));
    Ok(CaptureReport {
        outbox: format!("{schema}.{}", super::OUTBOX_TABLE),
        tables: actions,
        backlog,
        note: None,
    })
}

async fn counts_on(client: &Client, schema: &str) -> Result<(u64, u64), CaptureError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass(format('%I.jetsync_capture_state', $1::text)) IS NOT NULL",
            &[&schema],
        )
        .await
        .map_err(|e| pg_error("look for the outbox", &e))?
        .get(0);
    if !exists {
        return Ok((0, 0));
    }
    let s = quoted(schema);
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {s}.jetsync_outbox), \
                 (SELECT published FROM {s}.jetsync_capture_state WHERE id = 1)"
            ),
            &[],
        )
        .await
        .map_err(|e| pg_error("count the outbox", &e))?;
    let backlog: i64 = row.get(0);
    let published: Option<i64> = row.get(1);
    Ok((backlog.max(0) as u64, published.unwrap_or(0).max(0) as u64))
}

/// (backlog, published over the instance's life).
pub(super) async fn counts(config: &Config) -> Result<(u64, u64), CaptureError> {
    let (client, schema) = connect(config).await?;
    counts_on(&client, &schema).await
}

/// How an image column becomes a jetsync value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Float,
    Bool,
    Bytea,
    Json,
    Text,
    /// A generated column: computed by every instance's database, never published.
    Generated,
}

impl Kind {
    fn of(oid: u32) -> Kind {
        match Type::from_oid(oid) {
            Some(Type::INT2 | Type::INT4 | Type::INT8) => Kind::Integer,
            Some(Type::FLOAT4 | Type::FLOAT8) => Kind::Float,
            Some(Type::BOOL) => Kind::Bool,
            Some(Type::BYTEA) => Kind::Bytea,
            Some(Type::JSON | Type::JSONB) => Kind::Json,
            _ => Kind::Text,
        }
    }

    fn convert(self, text: Option<String>) -> Result<Value, String> {
        let Some(text) = text else {
            return Ok(Value::Null);
        };
        Ok(match self {
            Kind::Integer => Value::I64(
                text.parse()
                    .map_err(|_| format!("{text:?} is not an integer"))?,
            ),
            Kind::Float => Value::F64(
                text.parse()
                    .map_err(|_| format!("{text:?} is not a float"))?,
            ),
            Kind::Bool => Value::Bool(text == "true"),
            Kind::Bytea => Value::Bytes(
                text.strip_prefix("\\x")
                    .and_then(image::decode_hex)
                    .ok_or_else(|| "a bytea value is not \\x hex".to_owned())?,
            ),
            Kind::Json => Value::Json(
                serde_json::from_str(&text).map_err(|e| format!("bad json value: {e}"))?,
            ),
            Kind::Text | Kind::Generated => Value::Text(text),
        })
    }
}

/// The relay's handle on the outbox of one Postgres schema.
pub(super) struct Store {
    client: Client,
    schema: String,
    /// table → column → kind.
    kinds: HashMap<String, HashMap<String, Kind>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("schema", &self.schema)
            .finish()
    }
}

impl Store {
    /// Opens the relay's session; with `wake`, it listens on [`CHANNEL`], and a commit of
    /// captured changes in the schema wakes `wake`.
    pub(super) async fn open(
        config: &Config,
        wake: Option<Arc<Notify>>,
    ) -> Result<Store, CaptureError> {
        let listen = wake.is_some();
        let (client, schema) = connect_notified(config, wake).await?;
        if listen {
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(|e| pg_error("listen for captured commits", &e))?;
        }
        Ok(Store {
            client,
            schema,
            kinds: HashMap::new(),
        })
    }

    /// Whether the connection is gone (the relay opens a new store then).
    pub(super) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn load_kinds(&mut self, table: &str) -> Result<(), CaptureError> {
        let rows = self
            .client
            .query(
                "SELECT a.attname::text, COALESCE(NULLIF(t.typbasetype, 0), a.atttypid), \
                 a.attgenerated <> '' \
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&self.schema, &table],
            )
            .await
            .map_err(|e| pg_error("read column types", &e))?;
        let kinds = rows
            .iter()
            .map(|r| {
                let kind = if r.get::<_, bool>(2) {
                    Kind::Generated
                } else {
                    Kind::of(r.get::<_, u32>(1))
                };
                (r.get::<_, String>(0), kind)
            })
            .collect();
        self.kinds.insert(table.to_owned(), kinds);
        Ok(())
    }

    /// The committed outbox transactions, ordered by their highest outbox id, up to about
    /// `max_rows` rows (whole transactions; one larger than [`MAX_TRANSACTION_ROWS`] is split
    /// with a WARN naming it).
    pub(super) async fn pending(&mut self, max_rows: usize) -> Result<Vec<Batch>, CaptureError> {
        let s = quoted(&self.schema);
        // One cheap statement while the outbox is empty (the relay's idle cycles).
        let any: bool = self
            .client
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {s}.jetsync_outbox)"),
                &[],
            )
            .await
            .map_err(|e| pg_error("read the outbox", &e))?
            .get(0);
        if !any {
            return Ok(Vec::new());
        }
        let tx = self
            .client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| pg_error("begin", &e))?;
        let groups = tx
            .query(
                &format!(
                    "SELECT xid, max(id), count(*) FROM {s}.jetsync_outbox GROUP BY xid \
                     ORDER BY max(id)"
                ),
                &[],
            )
            .await
            .map_err(|e| pg_error("read the outbox", &e))?;
        let mut xids: Vec<i64> = Vec::new();
        let mut rows = 0usize;
        for g in &groups {
            let n = g.get::<_, i64>(2) as usize;
            if rows > 0 && rows + n > max_rows {
                break;
            }
            rows += n;
            xids.push(g.get(0));
        }
        if xids.is_empty() {
            return Ok(Vec::new());
        }
        let lines = tx
            .query(
                &format!(
                    "SELECT o.id, o.xid, o.tbl, o.op, o.key, e.key, e.value \
                     FROM {s}.jetsync_outbox o LEFT JOIN LATERAL jsonb_each_text(o.row) e ON true \
                     WHERE o.xid = ANY($1) ORDER BY o.id"
                ),
                &[&xids],
            )
            .await
            .map_err(|e| pg_error("read the outbox", &e))?;
        tx.commit().await.map_err(|e| pg_error("commit", &e))?;
        // Outbox rows (one line per image column), grouped by transaction.
        struct Raw {
            id: i64,
            table: String,
            op: String,
            key: Option<String>,
            columns: Vec<(String, Option<String>)>,
        }
        let mut by_xid: HashMap<i64, Vec<Raw>> = HashMap::new();
        for line in &lines {
            let id: i64 = line.get(0);
            let xid: i64 = line.get(1);
            let list = by_xid.entry(xid).or_default();
            if list.last().is_none_or(|r| r.id != id) {
                list.push(Raw {
                    id,
                    table: line.get(2),
                    op: line.get(3),
                    key: line.get(4),
                    columns: Vec::new(),
                });
            }
            if let Some(column) = line.get::<_, Option<String>>(5) {
                let raw = list.last_mut().expect("pushed above");
                raw.columns.push((column, line.get(6)));
            }
        }
        let mut batches = Vec::new();
        for xid in xids {
            let raws = by_xid.remove(&xid).unwrap_or_default();
            if raws.len() > MAX_TRANSACTION_ROWS {
                tracing::warn!(
                    transaction = xid,
                    rows = raws.len(),
                    max = MAX_TRANSACTION_ROWS,
                    "captured local transaction is larger than one atomic batch: published as \
                     several transactions (other instances may see it in parts)"
                );
            }
            for chunk in raws.chunks(MAX_TRANSACTION_ROWS) {
                let mut batch = Batch {
                    id: chunk[0].id,
                    entries: Vec::new(),
                    unpublishable: Vec::new(),
                };
                for raw in chunk {
                    match self
                        .entry(raw.id, &raw.table, &raw.op, &raw.key, &raw.columns)
                        .await
                    {
                        Ok(entry) => batch.entries.push(entry),
                        Err(reason) => batch
                            .unpublishable
                            .push((raw.id, format!("table `{}`: {reason}", raw.table))),
                    }
                }
                batches.push(batch);
            }
        }
        Ok(batches)
    }

    async fn entry(
        &mut self,
        id: i64,
        table: &str,
        op: &str,
        key: &Option<String>,
        columns: &[(String, Option<String>)],
    ) -> Result<Entry, String> {
        let key = key.clone().ok_or("the key is NULL")?;
        let change = match op {
            "delete" => Change::Delete,
            "upsert" => {
                let unknown = |kinds: &HashMap<String, HashMap<String, Kind>>| {
                    kinds
                        .get(table)
                        .is_none_or(|k| columns.iter().any(|(c, _)| !k.contains_key(c)))
                };
                if unknown(&self.kinds) {
                    self.load_kinds(table).await.map_err(|e| e.to_string())?;
                }
                let kinds = self.kinds.get(table);
                let mut row = Row::new();
                for (column, text) in columns {
                    let kind = kinds
                        .and_then(|k| k.get(column))
                        .copied()
                        .unwrap_or(Kind::Text);
                    if kind == Kind::Generated {
                        continue;
                    }
                    let value = kind
                        .convert(text.clone())
                        .map_err(|e| format!("column `{column}`: {e}"))?;
                    row.insert(column.clone(), value);
                }
                Change::Upsert(row)
            }
            other => return Err(format!("unknown op `{other}`")),
        };
        Ok(Entry {
            id,
            table: table.to_owned(),
            key,
            change,
        })
    }

    /// Deletes a published batch and counts its entries as published, in one transaction.
    ///
    /// `acks` gives the stream sequence the server acknowledged for each published entry
    /// (`None`: unknown), written to the rows' pending entries (`pending.rs`).
    #[cfg(test)]
    pub(super) async fn delete(&mut self, batch: &Batch, acks: &[Ack]) -> Result<(), CaptureError> {
        self.delete_many(&[batch], acks).await
    }

    /// Deletes several published batches and counts their entries as published, in one
    /// transaction (one commit for all the batches a relay cycle published).
    pub(super) async fn delete_many(
        &mut self,
        batches: &[&Batch],
        acks: &[Ack],
    ) -> Result<(), CaptureError> {
        let s = quoted(&self.schema);
        let ids: Vec<i64> = batches
            .iter()
            .flat_map(|batch| {
                batch
                    .entries
                    .iter()
                    .map(|e| e.id)
                    .chain(batch.unpublishable.iter().map(|(id, _)| *id))
            })
            .collect();
        let published: i64 = batches.iter().map(|b| b.entries.len() as i64).sum();
        let tx = self.relay_transaction().await?;
        let (known, seqs): (Vec<i64>, Vec<i64>) = acks
            .iter()
            .filter_map(|a| a.seq.map(|seq| (a.id, seq as i64)))
            .unzip();
        let unknown: Vec<i64> = acks
            .iter()
            .filter(|a| a.seq.is_none())
            .map(|a| a.id)
            .collect();
        if !known.is_empty() {
            tx.execute(
                &format!(
                    "UPDATE {s}.jetsync_capture_pending p SET seq = a.seq \
                     FROM unnest($1::bigint[], $2::bigint[]) AS a(id, seq) WHERE p.outbox_id = a.id"
                ),
                &[&known, &seqs],
            )
            .await
            .map_err(|e| pg_error("record acknowledged sequences", &e))?;
        }
        if !unknown.is_empty() {
            tx.execute(
                &format!("DELETE FROM {s}.jetsync_capture_pending WHERE outbox_id = ANY($1)"),
                &[&unknown],
            )
            .await
            .map_err(|e| pg_error("record acknowledged sequences", &e))?;
        }
        tx.execute(
            &format!("DELETE FROM {s}.jetsync_outbox WHERE id = ANY($1)"),
            &[&ids],
        )
        .await
        .map_err(|e| pg_error("delete published rows", &e))?;
        tx.execute(
            &format!(
                "UPDATE {s}.jetsync_capture_state SET published = published + $1 WHERE id = 1"
            ),
            &[&published],
        )
        .await
        .map_err(|e| pg_error("count published rows", &e))?;
        tx.commit().await.map_err(|e| pg_error("commit", &e))
    }

    /// A transaction whose statements wait at most [`RELAY_LOCK_TIMEOUT`] for a row lock.
    async fn relay_transaction(&mut self) -> Result<tokio_postgres::Transaction<'_>, CaptureError> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| pg_error("begin", &e))?;
        tx.batch_execute(RELAY_LOCK_TIMEOUT)
            .await
            .map_err(|e| pg_error("set the lock timeout", &e))?;
        Ok(tx)
    }

    /// Marks the pending entries of these outbox ids as being published (`pending.rs`).
    pub(super) async fn mark_in_flight(&mut self, ids: &[i64]) -> Result<(), CaptureError> {
        let s = quoted(&self.schema);
        let tx = self.relay_transaction().await?;
        tx.execute(
            &format!("UPDATE {s}.jetsync_capture_pending SET seq = $1 WHERE outbox_id = ANY($2)"),
            &[&super::pending::IN_FLIGHT, &ids],
        )
        .await
        .map_err(|e| pg_error("mark published rows", &e))?;
        tx.commit().await.map_err(|e| pg_error("commit", &e))
    }

    /// (backlog, published over the instance's life).
    pub(super) async fn counts(&self) -> Result<(u64, u64), CaptureError> {
        counts_on(&self.client, &self.schema).await
    }
}

#[cfg(test)]
mod tests;
