//! Capture against the real Postgres (`JETSYNC_TEST_POSTGRES`), each test in a schema of its
//! own (`capture_<pid>_<n>`), dropped at the end.

use jetsync::{Change as Op, Config, Row, Secret, SinkKind, TableConfig, Value};
use tokio_postgres::{Client, NoTls};

use super::*;
use crate::{Change, PostgresOptions, PostgresSink, Sink};

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn url() -> String {
    std::env::var("JETSYNC_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn plain() -> Client {
    let (client, conn) = url()
        .parse::<tokio_postgres::Config>()
        .unwrap()
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Drops the schema when the test ends (also on failure).
struct Schema(String);

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let client = plain().await;
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                    .await;
            });
        })
        .join();
    }
}

async fn setup(ddl: &str) -> (Schema, Config, Client) {
    let name = format!(
        "capture_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let client = plain().await;
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS \"{name}\" CASCADE; CREATE SCHEMA \"{name}\"; SET search_path = \"{name}\"; {ddl}"
        ))
        .await
        .unwrap();
    let mut config = Config {
        instance: "cap-pg".into(),
        ..Config::default()
    };
    config.sink.kind = SinkKind::Postgres;
    config.sink.url = Some(Secret::new(url()));
    config.sink.schema = Some(name.clone());
    config.tables.insert(
        "items".into(),
        TableConfig {
            key: "id".into(),
            capture: true,
            ..TableConfig::default()
        },
    );
    (Schema(name), config, client)
}

const ITEMS: &str =
    "CREATE TABLE items (id text PRIMARY KEY, qty int, big bigint, price numeric(10,2), \
    ratio float8, ok boolean, pic bytea, doc jsonb, at timestamptz, note text, \
    twice int GENERATED ALWAYS AS (qty * 2) STORED)";

#[tokio::test]
async fn values_keep_their_types_and_key_changes() {
    let (_schema, config, client) = setup(ITEMS).await;
    let report = super::super::install(&config).await.unwrap();
    assert_eq!(report.tables[0].action, "installed");
    client
        .batch_execute(
            "BEGIN; \
             INSERT INTO items VALUES ('a', 3, 9007199254740993, 12.50, 0.1, true, '\\x00ff', \
               '{\"k\": [1, 2.5]}', '2024-01-02T03:04:05.123456Z', 'hi'); \
             UPDATE items SET id = 'b' WHERE id = 'a'; \
             COMMIT; \
             DELETE FROM items WHERE id = 'b';",
        )
        .await
        .unwrap();
    let mut store = Store::open(&config, None).await.unwrap();
    let batches = store.pending(10_000).await.unwrap();
    assert_eq!(batches.len(), 2, "two local transactions: {batches:?}");
    let first = &batches[0].entries;
    let ops: Vec<(&str, bool)> = first
        .iter()
        .map(|e| (e.key.as_str(), matches!(e.change, Op::Upsert(_))))
        .collect();
    assert_eq!(ops, [("a", true), ("a", false), ("b", true)]);
    let Op::Upsert(row) = &first[0].change else {
        panic!()
    };
    assert_eq!(row["qty"], Value::I64(3));
    assert_eq!(row["big"], Value::I64(9007199254740993));
    assert_eq!(row["price"], Value::Text("12.50".into()));
    assert_eq!(row["ratio"], Value::F64(0.1));
    assert_eq!(row["ok"], Value::Bool(true));
    assert_eq!(row["pic"], Value::Bytes(vec![0, 255]));
    assert_eq!(row["doc"], Value::Json(serde_json::json!({"k": [1, 2.5]})));
    assert!(matches!(&row["at"], Value::Text(t) if t.starts_with("2024-01-02T03:04:05.123456")));
    assert_eq!(row["note"], Value::Text("hi".into()));
    assert!(
        !row.contains_key("twice"),
        "generated columns are not published"
    );
    assert_eq!(batches[1].entries.len(), 1);
    assert!(matches!(batches[1].entries[0].change, Op::Delete));
    store.delete(&batches[0], &[]).await.unwrap();
    store.delete(&batches[1], &[]).await.unwrap();
    assert_eq!(store.counts().await.unwrap(), (0, 4));
    // A nullable column added later is captured without reinstalling.
    client
        .batch_execute("ALTER TABLE items ADD COLUMN extra text; INSERT INTO items (id, extra) VALUES ('c', 'new')")
        .await
        .unwrap();
    let batches = store.pending(10_000).await.unwrap();
    let Op::Upsert(row) = &batches[0].entries[0].change else {
        panic!()
    };
    assert_eq!(row["extra"], Value::Text("new".into()));
    // Install again: reinstalled; remove: the outbox stays.
    assert_eq!(
        super::super::install(&config).await.unwrap().tables[0].action,
        "reinstalled"
    );
    let removed = super::super::remove(&config).await.unwrap();
    assert_eq!(removed.tables.len(), 1);
    assert_eq!(removed.backlog, 1);
}

#[tokio::test]
async fn the_applier_writes_are_not_captured() {
    let (schema, config, client) = setup(ITEMS).await;
    super::super::install(&config).await.unwrap();
    let mut options = PostgresOptions::new(url());
    options.schema = Some(schema.0.clone());
    options.key_columns.insert("items".into(), "id".into());
    let mut sink = PostgresSink::connect(options).await.unwrap();
    let mut row = Row::new();
    row.insert("qty".into(), Value::I64(1));
    let change = |seq, key: &str, op: Op| Change {
        seq,
        table: "items".into(),
        key: key.into(),
        op,
    };
    sink.apply("G", &[change(1, "r", Op::Upsert(row.clone()))], 1)
        .await
        .unwrap();
    sink.apply("G", &[change(2, "r", Op::Delete)], 2)
        .await
        .unwrap();
    sink.replace_begin("G").await.unwrap();
    sink.replace_chunk("G", &[change(3, "s", Op::Upsert(row))])
        .await
        .unwrap();
    sink.replace_commit("G", 3).await.unwrap();
    let count_sql = format!("SELECT count(*) FROM \"{}\".jetsync_outbox", schema.0);
    assert_eq!(
        client
            .query_one(&count_sql, &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0,
        "the applier's own writes were captured"
    );
    client
        .batch_execute("UPDATE items SET qty = 5 WHERE id = 's'")
        .await
        .unwrap();
    assert_eq!(
        client
            .query_one(&count_sql, &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        1
    );
}

#[tokio::test]
async fn a_transaction_committing_after_a_later_one_is_not_skipped() {
    let (_schema, config, client) = setup(ITEMS).await;
    super::super::install(&config).await.unwrap();
    let early = plain().await;
    let s = &config.sink.schema.clone().unwrap();
    // `early` takes outbox id 1 and stays open; `client` takes id 2 and commits first.
    early
        .batch_execute(&format!(
            "SET search_path = \"{s}\"; BEGIN; INSERT INTO items (id, qty) VALUES ('early', 1)"
        ))
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO items (id, qty) VALUES ('late', 2)")
        .await
        .unwrap();
    let mut store = Store::open(&config, None).await.unwrap();
    let batches = store.pending(10_000).await.unwrap();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].entries[0].key, "late");
    assert!(batches[0].entries[0].id > 1);
    store.delete(&batches[0], &[]).await.unwrap();
    early.batch_execute("COMMIT").await.unwrap();
    let batches = store.pending(10_000).await.unwrap();
    assert_eq!(
        batches.len(),
        1,
        "the earlier id committed later must still be published"
    );
    assert_eq!(batches[0].entries[0].key, "early");
    assert_eq!(batches[0].entries[0].id, 1);
}

#[tokio::test]
async fn a_service_role_without_outbox_rights_is_captured() {
    let (schema, config, client) = setup(ITEMS).await;
    super::super::install(&config).await.unwrap();
    let role = format!("capture_svc_{}", std::process::id());
    let s = &schema.0;
    client
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role}; \
             GRANT USAGE ON SCHEMA \"{s}\" TO {role}; GRANT ALL ON \"{s}\".items TO {role}"
        ))
        .await
        .unwrap();
    let written = client
        .batch_execute(&format!(
            "SET ROLE {role}; INSERT INTO items (id, qty) VALUES ('svc', 1); RESET ROLE"
        ))
        .await;
    client
        .batch_execute(&format!(
            "RESET ROLE; DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"
        ))
        .await
        .unwrap();
    written.expect("the service's write must not fail for lack of outbox rights");
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM \"{s}\".jetsync_outbox"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn backfill_queues_the_rows_already_there() {
    let (_schema, config, client) = setup(ITEMS).await;
    client
        .batch_execute("INSERT INTO items (id, qty, price) VALUES ('old', 1, 2.50)")
        .await
        .unwrap();
    let report = super::super::install_with(&config, true).await.unwrap();
    assert!(
        report.tables[0].action.contains("1 existing row(s) queued"),
        "{report:?}"
    );
    let mut store = Store::open(&config, None).await.unwrap();
    let batches = store.pending(1000).await.unwrap();
    let Op::Upsert(row) = &batches[0].entries[0].change else {
        panic!()
    };
    assert_eq!(batches[0].entries[0].key, "old");
    assert_eq!(row["price"], Value::Text("2.50".into()));
}

/// A large pending table (a backlog of unpublished local changes) is looked up for the
/// batch's rows only, with the same outcome as reading it whole.
#[tokio::test]
async fn a_large_pending_table_is_looked_up_per_batch() {
    let (schema, config, client) = setup(ITEMS).await;
    super::super::install(&config).await.unwrap();
    let quoted = crate::sinks::sql::quote(&schema.0);
    // 400 entries: even keys stored at 100 + i, odd ones not published yet.
    client
        .batch_execute(&format!(
            "INSERT INTO {quoted}.jetsync_capture_pending (tbl, key, outbox_id, seq) \
             SELECT 'items', 'k' || i, i, CASE WHEN i % 2 = 0 THEN 100 + i END \
             FROM generate_series(0, 399) AS i"
        ))
        .await
        .unwrap();
    let batch = crate::capture::pending::tests::batch_over_entries();
    let pending = crate::capture::pending::load_postgres(&client, &quoted, &batch)
        .await
        .unwrap();
    let kept = pending.keep(&batch).unwrap().expect("some changes skipped");
    assert_eq!(kept.positions, vec![3, 4]);
    crate::capture::pending::settle_postgres(&client, &quoted, &pending, 200)
        .await
        .unwrap();
    let left: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {quoted}.jetsync_capture_pending"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Settled: the even keys stored at or below 200 (k0, k2, ..., k100).
    assert_eq!(left, 400 - 51);
}

/// `TRUNCATE` fires no row trigger: the statement trigger queues a delete of every row, in the
/// truncating transaction; the applier's own `TRUNCATE` is not captured; `remove` drops both.
#[tokio::test]
async fn truncate_is_captured_as_a_delete_of_every_row() {
    let (schema, config, client) = setup(ITEMS).await;
    super::super::install(&config).await.unwrap();
    client
        .batch_execute("INSERT INTO items (id, qty) VALUES ('a', 1), ('b', 2), ('c', 3)")
        .await
        .unwrap();
    let mut store = Store::open(&config, None).await.unwrap();
    let inserted = store.pending(1000).await.unwrap();
    assert_eq!(inserted.len(), 1);
    store.delete(&inserted[0], &[]).await.unwrap();
    client.batch_execute("TRUNCATE items").await.unwrap();
    let batches = store.pending(1000).await.unwrap();
    assert_eq!(batches.len(), 1, "one local transaction: {batches:?}");
    let deletes: Vec<(&str, bool)> = batches[0]
        .entries
        .iter()
        .map(|e| (e.key.as_str(), matches!(e.change, Op::Delete)))
        .collect();
    assert_eq!(deletes, [("a", true), ("b", true), ("c", true)]);
    // The pending rule knows the rows: their entries point at the deletes.
    let s = &schema.0;
    let pending: Vec<(String, i64)> = client
        .query(
            &format!("SELECT key, outbox_id FROM \"{s}\".jetsync_capture_pending ORDER BY key"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: Vec<(String, i64)> = batches[0]
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.id))
        .collect();
    assert_eq!(pending, expected);
    store.delete(&batches[0], &[]).await.unwrap();
    // The applier's own TRUNCATE (jetsync.applying = on) is not captured.
    client
        .batch_execute(
            "INSERT INTO items (id, qty) VALUES ('d', 4); \
             BEGIN; SET LOCAL jetsync.applying = 'on'; TRUNCATE items; COMMIT",
        )
        .await
        .unwrap();
    let batches = store.pending(1000).await.unwrap();
    let ops: Vec<(&str, bool)> = batches
        .iter()
        .flat_map(|b| &b.entries)
        .map(|e| (e.key.as_str(), matches!(e.change, Op::Delete)))
        .collect();
    assert_eq!(ops, [("d", false)], "only the service's insert is captured");
    // Remove drops both triggers.
    super::super::remove(&config).await.unwrap();
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND t.tgname LIKE 'jetsync%'",
            &[s],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}
