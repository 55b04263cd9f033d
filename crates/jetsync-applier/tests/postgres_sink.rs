//! The Postgres sink against a real server: `JETSYNC_TEST_POSTGRES`, by default
//! `postgres://postgres@127.0.0.1:5432/test`. Every test works in a schema of its own, named
//! `jst_<pid>_<n>`, which a guard drops at the end of the test, also when it fails; schemas of
//! test processes that died without cleaning up are dropped by the next run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use jetsync::{Row, UnknownColumns, Value};
use jetsync_applier::{Change, PostgresOptions, PostgresSink, Sink, SinkError};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use tokio_postgres::{Client, NoTls};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const G: &str = "CATALOG";

fn url() -> String {
    std::env::var("JETSYNC_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// `url()` with an extra connection parameter.
fn url_with(param: &str) -> String {
    let url = url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

async fn service_client(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("cannot connect to the test Postgres (set JETSYNC_TEST_POSTGRES): {e:?}")
        });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Runs `sql` on a fresh connection from a thread of its own (usable from `Drop`, inside or
/// outside a runtime).
fn run_blocking(sql: String) {
    let url = url();
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

/// A schema of the test's own, dropped when the guard goes out of scope.
struct TestSchema {
    name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl TestSchema {
    async fn new() -> (TestSchema, Client) {
        let client = service_client(&url()).await;
        // Leftovers of test processes that were killed before their guards ran.
        let rows = client
            .query(
                "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'jst\\_%'",
                &[],
            )
            .await
            .unwrap();
        for row in rows {
            let name: String = row.get(0);
            let pid = name.split('_').nth(1).and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != std::process::id()
                    && !std::path::Path::new(&format!("/proc/{pid}")).exists()
                {
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                        .await;
                }
            }
        }
        let name = format!(
            "jst_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        client
            .batch_execute(&format!(
                "CREATE SCHEMA \"{name}\"; SET search_path TO \"{name}\""
            ))
            .await
            .unwrap();
        (TestSchema { name }, client)
    }

    fn options(&self) -> PostgresOptions {
        let mut options = PostgresOptions::new(url());
        options.schema = Some(self.name.clone());
        options.instance = "test-instance".to_owned();
        options
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        run_blocking(format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name));
    }
}

/// A fresh schema with `ddl` run in it, and a sink on it whose tables are `tables`
/// (`(table, key column)`).
async fn setup(ddl: &str, tables: &[(&str, &str)]) -> (TestSchema, Client, PostgresSink) {
    let (schema, client) = TestSchema::new().await;
    client.batch_execute(ddl).await.expect("test DDL");
    let mut options = schema.options();
    options.key_columns = tables
        .iter()
        .map(|(t, k)| ((*t).to_owned(), (*k).to_owned()))
        .collect();
    let sink = PostgresSink::connect(options).await.expect("connect sink");
    (schema, client, sink)
}

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

async fn apply(sink: &mut PostgresSink, changes: &[Change]) -> Result<(), SinkError> {
    let last = changes.last().map_or(0, |c| c.seq);
    sink.apply(G, changes, last).await
}

/// Evaluates `$call` (an awaited sink call) again while it fails with `Unavailable` because
/// another session (a dropped sink whose backend is still exiting, or a previous run) holds the
/// applier lock, as the engine would, for at most 30 s.
macro_rules! once_lock_free {
    ($call:expr) => {{
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match $call {
                Err(SinkError::Unavailable { reason })
                    if reason.contains("lock") && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other,
            }
        }
    }};
}

/// [`apply`], retrying (30 s at most) while another sink's session on the schema, just dropped,
/// still holds the group's lock (the server releases it when that backend has ended).
async fn apply_once_free(sink: &mut PostgresSink, changes: &[Change]) -> Result<(), SinkError> {
    once_lock_free!(apply(sink, changes).await)
}

fn expect_rejected(err: SinkError, index: usize, needle: &str) -> String {
    match err {
        SinkError::Rejected {
            index: got, reason, ..
        } => {
            assert_eq!(got, index, "{reason}");
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
            reason
        }
        other => panic!("expected Rejected at {index}, got {other:?}"),
    }
}

#[tokio::test]
async fn upsert_and_delete_with_bigint_and_text_keys() {
    let (_schema, service, mut sink) = setup(
        "CREATE TABLE nums (id bigint PRIMARY KEY, name text, qty integer, \
                            note text DEFAULT 'local', \
                            updated_at timestamptz NOT NULL DEFAULT now()); \
         CREATE TABLE texts (code text PRIMARY KEY, v text);",
        &[("nums", "id"), ("texts", "code")],
    )
    .await;
    assert!(sink.is_empty().await.unwrap());
    assert_eq!(sink.fence(G).await.unwrap(), Some(0));
    apply(
        &mut sink,
        &[
            up(
                1,
                "nums",
                "1",
                &[("name", Value::from("one")), ("qty", Value::I64(1))],
            ),
            up(
                2,
                "nums",
                "2",
                &[("id", Value::I64(2)), ("name", Value::from("two"))],
            ),
            up(3, "texts", "a'b", &[("v", Value::from("x"))]),
            up(
                4,
                "texts",
                "B",
                &[("code", Value::from("B")), ("v", Value::from("y"))],
            ),
        ],
    )
    .await
    .unwrap();
    assert!(!sink.is_empty().await.unwrap());
    assert_eq!(sink.fence(G).await.unwrap(), Some(4));
    let nums = sink.read_table("nums").await.unwrap();
    assert_eq!(nums.len(), 2);
    assert_eq!(nums[0]["name"], Value::from("one"));
    assert_eq!(nums[0]["note"], Value::from("local"), "defaulted on insert");
    assert!(matches!(nums[0]["updated_at"], Value::Text(_)));
    assert_eq!(nums[1]["qty"], Value::Null);

    // Upserts replace the synced columns: those they do not carry take their default.
    service
        .batch_execute("UPDATE nums SET note = 'changed locally'")
        .await
        .unwrap();
    apply(
        &mut sink,
        &[
            up(5, "nums", "1", &[("qty", Value::I64(10))]),
            up(6, "nums", "2", &[("name", Value::Null)]),
            up(7, "texts", "B", &[("v", Value::from("z"))]),
        ],
    )
    .await
    .unwrap();
    let nums = sink.read_table("nums").await.unwrap();
    assert_eq!(nums[0]["name"], Value::Null, "not carried: its default");
    assert_eq!(nums[0]["qty"], Value::I64(10));
    assert_eq!(nums[0]["note"], Value::from("local"), "back to its default");
    assert_eq!(nums[1]["name"], Value::Null);
    assert_eq!(nums[1]["qty"], Value::Null);

    // Deletes by text subject key on both key types; deleting an absent row is a no-op.
    apply(
        &mut sink,
        &[
            del(8, "nums", "2"),
            del(9, "nums", "99"),
            del(10, "texts", "a'b"),
        ],
    )
    .await
    .unwrap();
    let nums = sink.read_table("nums").await.unwrap();
    assert_eq!(nums.len(), 1);
    assert_eq!(
        sink.read_table("texts").await.unwrap(),
        vec![row(&[("code", Value::from("B")), ("v", Value::from("z"))])]
    );
    // Upsert after delete in one batch, and a delete followed by an upsert of the same key.
    apply(
        &mut sink,
        &[
            up(11, "nums", "3", &[("name", Value::from("three"))]),
            del(12, "nums", "3"),
            up(13, "nums", "1", &[("name", Value::from("uno"))]),
            del(14, "nums", "1"),
            up(15, "nums", "1", &[("qty", Value::I64(5))]),
        ],
    )
    .await
    .unwrap();
    let nums = sink.read_table("nums").await.unwrap();
    assert_eq!(nums.len(), 1);
    assert_eq!(nums[0]["name"], Value::Null, "re-inserted after the delete");
    assert_eq!(nums[0]["qty"], Value::I64(5));
    assert_eq!(sink.fence(G).await.unwrap(), Some(15));
}

#[tokio::test]
async fn every_column_type_is_converted_and_read_back() {
    let (_schema, _service, mut sink) = setup(
        "CREATE TYPE mood AS ENUM ('sad', 'happy'); \
         CREATE DOMAIN positive AS integer CHECK (VALUE > 0); \
         CREATE TABLE typed ( \
            id bigint PRIMARY KEY, i2 smallint, i4 integer, f4 real, f8 double precision, \
            num numeric(10,2), t text, vc varchar(5), ch char(3), b boolean, bin bytea, \
            j json, jb jsonb, ts timestamp, tstz timestamptz, d date, u uuid, m mood, \
            arr integer[], ip inet, pos positive); \
         CREATE TABLE by_uuid (id uuid PRIMARY KEY, v integer); \
         CREATE TABLE by_int4 (id integer PRIMARY KEY, v integer);",
        &[("typed", "id"), ("by_uuid", "id"), ("by_int4", "id")],
    )
    .await;
    let values = [
        ("i2", Value::from("-12")),
        ("i4", Value::I64(70_000)),
        ("f4", Value::F64(0.5)),
        ("f8", Value::from("2.25")),
        ("num", Value::F64(12.345)),
        ("t", Value::I64(42)),
        ("vc", Value::from("abc")),
        ("ch", Value::from("x")),
        ("b", Value::I64(1)),
        ("bin", Value::Bytes(vec![0, 255, 7])),
        ("j", Value::from(r#"{"b": [1, 2], "a": null}"#)),
        ("jb", Value::Json(serde_json::json!({"k": "v", "n": 1.5}))),
        ("ts", Value::from("2024-05-01T14:00:00.5+02:00")),
        ("tstz", Value::I64(1_714_564_800_123)),
        ("d", Value::from("2024-02-29")),
        ("u", Value::from("67E55044-10B1-426F-9247-BB680E5FE0C8")),
        ("m", Value::from("happy")),
        ("arr", Value::from("{1,2,3}")),
        ("ip", Value::from("10.1.2.3")),
        ("pos", Value::I64(3)),
    ];
    apply(
        &mut sink,
        &[
            up(1, "typed", "1", &values),
            up(2, "typed", "2", &[]),
            up(
                3,
                "by_uuid",
                "67e55044-10b1-426f-9247-bb680e5fe0c8",
                &[("v", Value::I64(1))],
            ),
            up(
                4,
                "by_uuid",
                "00000000-0000-0000-0000-000000000001",
                &[("v", Value::I64(2))],
            ),
            up(
                5,
                "by_int4",
                "7",
                &[("id", Value::I64(7)), ("v", Value::I64(1))],
            ),
        ],
    )
    .await
    .unwrap();
    let rows = sink.read_table("typed").await.unwrap();
    let expected = row(&[
        ("id", Value::I64(1)),
        ("i2", Value::I64(-12)),
        ("i4", Value::I64(70_000)),
        ("f4", Value::F64(0.5)),
        ("f8", Value::F64(2.25)),
        ("num", Value::from("12.35")),
        ("t", Value::from("42")),
        ("vc", Value::from("abc")),
        ("ch", Value::from("x")), // char(n) loses its padding in text form
        ("b", Value::Bool(true)),
        ("bin", Value::Bytes(vec![0, 255, 7])),
        (
            "j",
            Value::Json(serde_json::json!({"a": null, "b": [1, 2]})),
        ),
        ("jb", Value::Json(serde_json::json!({"k": "v", "n": 1.5}))),
        ("ts", Value::from("2024-05-01T12:00:00.500")),
        ("tstz", Value::from("2024-05-01T12:00:00.123Z")),
        ("d", Value::from("2024-02-29")),
        ("u", Value::from("67e55044-10b1-426f-9247-bb680e5fe0c8")),
        ("m", Value::from("happy")),
        ("arr", Value::from("{1,2,3}")),
        ("ip", Value::from("10.1.2.3/32")),
        ("pos", Value::I64(3)),
    ]);
    assert_eq!(rows[0], expected);
    assert!(
        rows[1].iter().all(|(k, v)| k == "id" || *v == Value::Null),
        "{:?}",
        rows[1]
    );

    // uuid and int4 keys work for deletes too.
    apply(
        &mut sink,
        &[
            del(6, "by_uuid", "67e55044-10b1-426f-9247-bb680e5fe0c8"),
            del(7, "by_int4", "7"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(sink.read_table("by_uuid").await.unwrap().len(), 1);
    assert!(sink.read_table("by_int4").await.unwrap().is_empty());

    // One row, one subject: another spelling of a key is refused, never merged onto the row.
    for (table, key) in [
        ("by_uuid", "00000000-0000-0000-0000-00000000000A"),
        ("by_uuid", "{00000000-0000-0000-0000-000000000001}"),
        ("by_int4", "042"),
        ("by_int4", "+42"),
        ("by_int4", " 42"),
        ("by_int4", "4.2e1"),
    ] {
        let err = apply(&mut sink, &[up(8, table, key, &[("v", Value::I64(9))])])
            .await
            .unwrap_err();
        expect_rejected(err, 0, "does not fit key column");
    }
    assert_eq!(sink.read_table("by_uuid").await.unwrap().len(), 1);

    // Values that do not convert, in the sink or in the database, reject their change only.
    let bad: [(&str, Value, &str); 9] = [
        ("i2", Value::I64(1 << 20), "out of range"),
        ("i4", Value::from("x"), "not an integer"),
        ("b", Value::from("maybe"), "boolean"),
        ("u", Value::from("nope"), "UUID"),
        ("tstz", Value::from("yesterday"), "RFC 3339"),
        ("vc", Value::from("toolong"), "22001"),
        ("m", Value::from("angry"), "22P02"),
        ("num", Value::from("123456789012"), "22003"),
        ("pos", Value::I64(-1), "23514"),
    ];
    for (seq, (column, value, needle)) in (8u64..).zip(bad) {
        let batch = [
            up(seq, "typed", "10", &[("t", Value::from("fine"))]),
            up(
                seq,
                "typed",
                "11",
                &[("t", Value::from("fine")), (column, value.clone())],
            ),
        ];
        // Same shape for the database-side failures, so they share a statement.
        let batch = if needle.len() == 5 {
            vec![
                up(seq, "typed", "10", &[(column, Value::Null)]),
                up(seq, "typed", "11", &[(column, value)]),
                up(seq, "typed", "12", &[(column, Value::Null)]),
            ]
        } else {
            batch.to_vec()
        };
        let err = apply(&mut sink, &batch).await.unwrap_err();
        expect_rejected(err, 1, needle);
    }
    assert_eq!(sink.read_table("typed").await.unwrap().len(), 2);
    assert_eq!(sink.fence(G).await.unwrap(), Some(7));
}

#[tokio::test]
async fn a_failing_change_rejects_the_batch_with_its_index_and_leaves_the_fence() {
    let (_schema, service, mut sink) = setup(
        "CREATE TABLE items (id bigint PRIMARY KEY, sku text UNIQUE, \
                             qty integer CHECK (qty >= 0)); \
         CREATE FUNCTION no_evil() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN IF NEW.sku = 'evil' THEN RAISE EXCEPTION 'evil sku'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER no_evil BEFORE INSERT OR UPDATE ON items \
           FOR EACH ROW EXECUTE FUNCTION no_evil();",
        &[("items", "id")],
    )
    .await;
    apply(&mut sink, &[up(1, "items", "1", &[("qty", Value::I64(1))])])
        .await
        .unwrap();
    let batch = |bad: Option<(usize, Value)>| -> Vec<Change> {
        (0..10usize)
            .map(|i| {
                let qty = match &bad {
                    Some((at, v)) if *at == i => v.clone(),
                    _ => Value::I64(i as i64),
                };
                up(
                    10 + i as u64,
                    "items",
                    &(100 + i).to_string(),
                    &[("qty", qty)],
                )
            })
            .collect()
    };
    let err = apply(&mut sink, &batch(Some((6, Value::I64(-1)))))
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    match &err {
        SinkError::Rejected {
            seq, table, key, ..
        } => {
            assert_eq!((*seq, table.as_str(), key.as_str()), (16, "items", "106"));
        }
        other => panic!("{other:?}"),
    }
    expect_rejected(err, 6, "23514");
    assert_eq!(sink.fence(G).await.unwrap(), Some(1));
    assert_eq!(sink.read_table("items").await.unwrap().len(), 1);

    // A unique violation against an earlier change of the same batch, a trigger's exception.
    let err = apply(
        &mut sink,
        &[
            up(20, "items", "2", &[("sku", Value::from("s"))]),
            up(21, "items", "3", &[("sku", Value::from("t"))]),
            up(22, "items", "4", &[("sku", Value::from("s"))]),
        ],
    )
    .await
    .unwrap_err();
    expect_rejected(err, 2, "23505");
    let err = apply(
        &mut sink,
        &[
            up(20, "items", "2", &[("sku", Value::from("s"))]),
            up(21, "items", "3", &[("sku", Value::from("evil"))]),
        ],
    )
    .await
    .unwrap_err();
    expect_rejected(err, 1, "evil sku");

    // A change the database refuses before one the sink refuses: the earlier one is reported.
    let err = apply(
        &mut sink,
        &[
            up(30, "items", "5", &[("qty", Value::I64(1))]),
            up(31, "items", "6", &[("qty", Value::I64(-1))]),
            up(32, "items", "7", &[("qty", Value::I64(1))]),
            up(33, "items", "8", &[("nope", Value::I64(1))]),
        ],
    )
    .await
    .unwrap_err();
    expect_rejected(err, 1, "23514");
    let err = apply(
        &mut sink,
        &[
            up(30, "items", "5", &[("qty", Value::I64(1))]),
            up(33, "items", "8", &[("nope", Value::I64(1))]),
            del(34, "gone", "1"),
        ],
    )
    .await
    .unwrap_err();
    expect_rejected(err, 1, "`nope`");
    let err = apply(&mut sink, &[del(34, "gone", "1")]).await.unwrap_err();
    expect_rejected(err, 0, "gone");
    assert_eq!(sink.fence(G).await.unwrap(), Some(1));
    assert_eq!(sink.read_table("items").await.unwrap().len(), 1);

    // Without the poison the batch goes through.
    let mut good = batch(None);
    good.remove(6);
    apply(&mut sink, &good).await.unwrap();
    assert_eq!(sink.fence(G).await.unwrap(), Some(19));
    let count: i64 = service
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 10);
}

#[tokio::test]
async fn unknown_columns_are_rejected_or_ignored() {
    let (schema, _service, mut sink) = setup(
        "CREATE TABLE t (id text PRIMARY KEY, a integer);",
        &[("t", "id")],
    )
    .await;
    let batch = [up(
        1,
        "t",
        "k",
        &[("a", Value::I64(1)), ("extra", Value::from("x"))],
    )];
    let err = apply(&mut sink, &batch).await.unwrap_err();
    expect_rejected(err, 0, "`extra`");
    let mut options = schema.options();
    options.key_columns.insert("t".to_owned(), "id".to_owned());
    options.unknown_columns = UnknownColumns::Ignore;
    drop(sink);
    let mut lenient = PostgresSink::connect(options).await.unwrap();
    apply_once_free(&mut lenient, &batch).await.unwrap();
    assert_eq!(
        lenient.read_table("t").await.unwrap(),
        vec![row(&[("id", Value::from("k")), ("a", Value::I64(1))])]
    );
}

#[tokio::test]
async fn schema_changes_of_the_service_are_picked_up() {
    let (_schema, service, mut sink) = setup(
        "CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, a integer, \
                         doubled integer GENERATED ALWAYS AS (a * 2) STORED);",
        &[("t", "id")],
    )
    .await;
    // Identity keys take the replicated value; generated columns are computed.
    apply(
        &mut sink,
        &[up(
            1,
            "t",
            "5",
            &[
                ("id", Value::I64(5)),
                ("a", Value::I64(2)),
                ("doubled", Value::I64(99)),
            ],
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        sink.read_table("t").await.unwrap()[0]["doubled"],
        Value::I64(4)
    );
    // A column added by the service after the sink cached the table.
    service
        .batch_execute("ALTER TABLE t ADD COLUMN b text")
        .await
        .unwrap();
    apply(&mut sink, &[up(2, "t", "5", &[("b", Value::from("new"))])])
        .await
        .unwrap();
    assert_eq!(
        sink.read_table("t").await.unwrap()[0]["b"],
        Value::from("new")
    );
    // A column dropped by the service: the cached statement fails, the sink looks again.
    service
        .batch_execute("ALTER TABLE t DROP COLUMN b")
        .await
        .unwrap();
    let err = apply(
        &mut sink,
        &[
            up(3, "t", "6", &[("a", Value::I64(1))]),
            up(
                4,
                "t",
                "7",
                &[("a", Value::I64(1)), ("b", Value::from("x"))],
            ),
            up(
                5,
                "t",
                "8",
                &[("a", Value::I64(1)), ("b", Value::from("y"))],
            ),
        ],
    )
    .await
    .unwrap_err();
    expect_rejected(err, 1, "`b`");
    apply(&mut sink, &[up(3, "t", "6", &[("a", Value::I64(1))])])
        .await
        .unwrap();
    assert_eq!(sink.read_table("t").await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_thousand_change_batch_takes_a_few_statements() {
    let (_schema, _service, mut sink) = setup(
        "CREATE TABLE bulk (id text PRIMARY KEY, name text, price double precision, \
                            qty bigint);",
        &[("bulk", "id")],
    )
    .await;
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
    apply(&mut sink, &batch(1)).await.unwrap();
    let before = sink.statements_sent();
    let started = Instant::now();
    apply(&mut sink, &batch(1001)).await.unwrap();
    let elapsed = started.elapsed();
    let sent = sink.statements_sent() - before;
    eprintln!("1000-change batch: {sent} requests, {elapsed:?}");
    // BEGIN, two upserts (a key repeats after 800), the fence, COMMIT.
    assert_eq!(sent, 5);
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    let rows = sink.read_table("bulk").await.unwrap();
    assert_eq!(rows.len(), 800);
    let zero = rows.iter().find(|r| r["id"] == Value::from("0")).unwrap();
    assert_eq!(zero["qty"], Value::I64(800));

    // Mixed upserts and deletes: still one statement per run of one shape.
    let mixed: Vec<Change> = (0..500u64)
        .map(|i| del(3000 + i, "bulk", &i.to_string()))
        .chain((0..500u64).map(|i| {
            up(
                3500 + i,
                "bulk",
                &(1000 + i).to_string(),
                &[("qty", Value::I64(1))],
            )
        }))
        .collect();
    let before = sink.statements_sent();
    apply(&mut sink, &mixed).await.unwrap();
    assert_eq!(sink.statements_sent() - before, 5);
    assert_eq!(sink.read_table("bulk").await.unwrap().len(), 800);
}

#[tokio::test]
async fn killed_connection_is_unavailable_then_the_next_apply_succeeds() {
    let (schema, service, _) = setup(
        "CREATE TABLE t (id text PRIMARY KEY, v bigint);",
        &[("t", "id")],
    )
    .await;
    let app = format!("jst_kill_{}", schema.name);
    let mut options = schema.options();
    options.url = url_with(&format!("application_name={app}"));
    options.key_columns.insert("t".to_owned(), "id".to_owned());
    let mut sink = PostgresSink::connect(options).await.unwrap();
    apply(&mut sink, &[up(1, "t", "a", &[("v", Value::I64(1))])])
        .await
        .unwrap();

    // Killed while the batch waits for a lock the service holds.
    let locker = service_client(&url()).await;
    locker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE \"{}\".t IN ACCESS EXCLUSIVE MODE",
            schema.name
        ))
        .await
        .unwrap();
    let batch = [up(2, "t", "b", &[("v", Value::I64(2))])];
    let kill = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let killed: Vec<tokio_postgres::Row> = service
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    &[&app],
                )
                .await
                .unwrap();
            if !killed.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sink never waited for the lock"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (result, ()) = tokio::join!(sink.apply(G, &batch, 2), kill);
    locker.batch_execute("ROLLBACK").await.unwrap();
    let err = result.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(matches!(err, SinkError::Unavailable { .. }), "{err:?}");
    assert_eq!(sink.fence(G).await.unwrap(), Some(1));
    sink.apply(G, &batch, 2).await.unwrap();
    assert_eq!(sink.fence(G).await.unwrap(), Some(2));

    // Killed while idle: at most one Unavailable, then it reconnects by itself.
    service
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let batch = [up(3, "t", "c", &[("v", Value::I64(3))])];
    if let Err(err) = sink.apply(G, &batch, 3).await {
        assert!(matches!(err, SinkError::Unavailable { .. }), "{err:?}");
        sink.apply(G, &batch, 3).await.unwrap();
    }
    assert_eq!(sink.fence(G).await.unwrap(), Some(3));
    assert_eq!(sink.read_table("t").await.unwrap().len(), 3);
}

#[tokio::test]
async fn fence_moves_with_batches_and_set_fence() {
    let (schema, _service, mut sink) = setup(
        "CREATE TABLE t (id text PRIMARY KEY, v bigint);",
        &[("t", "id")],
    )
    .await;
    assert_eq!(sink.fence(G).await.unwrap(), Some(0));
    sink.apply(G, &[up(3, "t", "a", &[("v", Value::I64(1))])], 7)
        .await
        .unwrap();
    assert_eq!(sink.fence(G).await.unwrap(), Some(7));
    sink.apply(G, &[], 9).await.unwrap();
    sink.set_fence("OTHER", 100).await.unwrap();
    drop(sink);
    let mut options = schema.options();
    options.key_columns.insert("t".to_owned(), "id".to_owned());
    let mut sink = PostgresSink::connect(options).await.unwrap();
    assert_eq!(sink.fence(G).await.unwrap(), Some(9));
    assert_eq!(sink.fence("OTHER").await.unwrap(), Some(100));
    // The dropped sink's backend may still hold the lock for a moment.
    once_lock_free!(sink.set_fence(G, 2).await).unwrap();
    assert_eq!(sink.fence(G).await.unwrap(), Some(2));
    let digest = sink.digest().await.unwrap();
    assert_eq!(digest.len(), 1);
    assert_eq!((digest[0].table.as_str(), digest[0].rows), ("t", 1));
    // Reserved tables cannot be written through events.
    let err = apply(
        &mut sink,
        &[up(10, "jetsync_offsets", G, &[("seq", Value::I64(1))])],
    )
    .await
    .unwrap_err();
    expect_rejected(err, 0, "reserved");
}

#[tokio::test]
async fn connect_errors_say_what_to_fix_without_the_password() {
    let err = PostgresSink::connect(PostgresOptions::new(
        "postgres://postgres:sekrit@127.0.0.1:1/test?connect_timeout=2",
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, SinkError::Unavailable { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("sekrit"));

    let base: tokio_postgres::Config = url().parse().unwrap();
    let host = match &base.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("{other:?}"),
    };
    let port = base.get_ports().first().copied().unwrap_or(5432);
    let user = base.get_user().unwrap_or("postgres");
    let err = PostgresSink::connect(PostgresOptions::new(format!(
        "postgres://{user}:sekrit@{host}:{port}/jst_no_such_database"
    )))
    .await
    .unwrap_err();
    match &err {
        SinkError::Fatal { reason } => {
            assert!(reason.contains("jst_no_such_database"), "{reason}");
            assert!(!reason.contains("sekrit"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let err = PostgresSink::connect(PostgresOptions::new(format!(
        "postgres://jst_no_such_user:sekrit@{host}:{port}/test"
    )))
    .await
    .unwrap_err();
    match &err {
        SinkError::Fatal { reason } => {
            assert!(reason.contains("jst_no_such_user"), "{reason}");
            assert!(!reason.contains("sekrit"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let mut options = PostgresOptions::new(url());
    options.schema = Some("jst_no_such_schema".to_owned());
    let err = PostgresSink::connect(options).await.unwrap_err();
    assert!(
        matches!(&err, SinkError::Fatal { reason } if reason.starts_with("sink.schema: ")
            && reason.contains("jst_no_such_schema")),
        "{err:?}"
    );
    let err = PostgresSink::connect(PostgresOptions::new(
        "postgres://app:sekrit@host:notaport/db",
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(&err, SinkError::Fatal { reason } if reason.starts_with("sink.url: ")
            && !reason.contains("sekrit")),
        "{err:?}"
    );
}

const MODEL_DDL: &str = "\
    CREATE TABLE nums (id bigint PRIMARY KEY, x bigint, y text, z double precision, \
                       \"weird \"\"col\"\"\" bytea, j jsonb); \
    CREATE TABLE texts (id text PRIMARY KEY, x bigint, y text, z double precision, \
                        \"weird \"\"col\"\"\" bytea, j jsonb);";

#[tokio::test]
async fn digest_does_not_depend_on_batch_split() {
    let changes: Vec<Change> = (1..=60u64)
        .map(|seq| {
            let key = (seq % 7).to_string();
            match seq % 5 {
                0 => del(seq, "nums", &key),
                1 => up(seq, "nums", &key, &[("x", Value::I64(seq as i64))]),
                2 => up(
                    seq,
                    "texts",
                    &key,
                    &[("j", Value::Json(serde_json::json!({"s": seq})))],
                ),
                _ => up(seq, "texts", &key, &[("y", Value::from(format!("s{seq}")))]),
            }
        })
        .collect();
    let tables = [("nums", "id"), ("texts", "id")];
    let (_a, _sa, mut one) = setup(MODEL_DDL, &tables).await;
    apply(&mut one, &changes).await.unwrap();
    let (_b, _sb, mut many) = setup(MODEL_DDL, &tables).await;
    for chunk in changes.chunks(7) {
        apply(&mut many, chunk).await.unwrap();
    }
    let d1 = one.digest().await.unwrap();
    assert_eq!(d1, many.digest().await.unwrap());
    assert_eq!(
        d1.iter().map(|d| d.table.as_str()).collect::<Vec<_>>(),
        ["nums", "texts"]
    );
    apply(
        &mut many,
        &[up(61, "texts", "0", &[("y", Value::from("changed"))])],
    )
    .await
    .unwrap();
    assert_ne!(d1, many.digest().await.unwrap());
}

// ---- model test ---------------------------------------------------------------------------

const TABLES: [&str; 2] = ["texts", "nums"];
const TEXT_KEYS: [&str; 5] = ["k0", "k1", "x'y", "a \"b\"", "12"];
const COLUMNS: [&str; 4] = ["x", "y", "z", "weird \"col\""];

/// One column of an event: not carried, carried as NULL, or carried with a value.
#[derive(Debug, Clone)]
enum Cell {
    Absent,
    Null,
    Set(Value),
}

#[derive(Debug, Clone)]
enum Op {
    Upsert {
        table: usize,
        key: usize,
        cells: Vec<Cell>,
    },
    Delete {
        table: usize,
        key: usize,
    },
}

fn cell(value: impl Strategy<Value = Value>) -> impl Strategy<Value = Cell> {
    prop_oneof![
        2 => Just(Cell::Absent),
        1 => Just(Cell::Null),
        4 => value.prop_map(Cell::Set),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let cells = (
        cell(any::<i64>().prop_map(Value::I64)),
        cell("[a-z0-9 '\"]{0,8}".prop_map(Value::Text)),
        cell(
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::F64),
        ),
        cell(proptest::collection::vec(any::<u8>(), 0..6).prop_map(Value::Bytes)),
    )
        .prop_map(|(x, y, z, b)| vec![x, y, z, b]);
    prop_oneof![
        3 => (0..TABLES.len(), 0..TEXT_KEYS.len(), cells)
            .prop_map(|(table, key, cells)| Op::Upsert { table, key, cells }),
        1 => (0..TABLES.len(), 0..TEXT_KEYS.len()).prop_map(|(table, key)| Op::Delete { table, key }),
    ]
}

fn key_of(table: usize, key: usize) -> String {
    if TABLES[table] == "nums" {
        key.to_string()
    } else {
        TEXT_KEYS[key].to_owned()
    }
}

fn to_change(seq: u64, op: &Op) -> Change {
    match op {
        Op::Upsert { table, key, cells } => {
            let mut row: Row = COLUMNS
                .iter()
                .zip(cells)
                .filter_map(|(name, cell)| match cell {
                    Cell::Absent => None,
                    Cell::Null => Some(((*name).to_owned(), Value::Null)),
                    Cell::Set(v) => Some(((*name).to_owned(), v.clone())),
                })
                .collect();
            if TABLES[*table] == "nums" && key % 2 == 0 {
                row.insert("id".to_owned(), Value::I64(*key as i64));
            }
            Change {
                seq,
                table: TABLES[*table].to_owned(),
                key: key_of(*table, *key),
                op: jetsync::Change::Upsert(row),
            }
        }
        Op::Delete { table, key } => Change {
            seq,
            table: TABLES[*table].to_owned(),
            key: key_of(*table, *key),
            op: jetsync::Change::Delete,
        },
    }
}

type Tables = BTreeMap<&'static str, BTreeMap<String, Row>>;

/// The model: an upsert replaces the row with the columns it carries, the others NULL (their
/// default); a delete removes the row.
fn model(changes: &[Change]) -> Tables {
    let mut tables: Tables = TABLES.iter().map(|t| (*t, BTreeMap::new())).collect();
    for change in changes {
        let table = tables.get_mut(change.table.as_str()).expect("known table");
        match &change.op {
            jetsync::Change::Upsert(row) => {
                table.remove(&change.key);
                let stored = table.entry(change.key.clone()).or_insert_with(|| {
                    let mut fresh: Row = COLUMNS
                        .iter()
                        .chain(&["j"])
                        .map(|c| ((*c).to_owned(), Value::Null))
                        .collect();
                    let id = if change.table == "nums" {
                        Value::I64(change.key.parse().expect("numeric key"))
                    } else {
                        Value::Text(change.key.clone())
                    };
                    fresh.insert("id".to_owned(), id);
                    fresh
                });
                for (column, value) in row {
                    if column != "id" {
                        stored.insert(column.clone(), value.clone());
                    }
                }
            }
            jetsync::Change::Delete => {
                table.remove(&change.key);
            }
        }
    }
    tables
}

async fn actual(sink: &mut PostgresSink) -> Tables {
    let mut out = Tables::new();
    for table in TABLES {
        let rows = sink
            .read_table(table)
            .await
            .expect("read table")
            .into_iter()
            .map(|row| {
                let key = match &row["id"] {
                    Value::I64(i) => i.to_string(),
                    Value::Text(s) => s.clone(),
                    other => panic!("unexpected key {other:?}"),
                };
                (key, row)
            })
            .collect();
        out.insert(table, rows);
    }
    out
}

#[test]
fn model_random_batches_match_the_model_and_each_other() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tables = [("nums", "id"), ("texts", "id")];
    let (one_schema, one_service, one) = runtime.block_on(setup(MODEL_DDL, &tables));
    let (many_schema, many_service, many) = runtime.block_on(setup(MODEL_DDL, &tables));
    let sinks = tokio::sync::Mutex::new((one, many));
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    });
    let strategy = (
        proptest::collection::vec(op(), 0..40),
        proptest::collection::vec(1usize..9, 1..10),
    );
    let result = runner.run(&strategy, |(ops, splits)| {
        let changes: Vec<Change> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| to_change(i as u64 + 1, op))
            .collect();
        runtime.block_on(async {
            for service in [&one_service, &many_service] {
                service.batch_execute("TRUNCATE nums, texts").await.unwrap();
            }
            let mut guard = sinks.lock().await;
            let (one, many) = &mut *guard;
            // A new history: the operator's explicit rewind (`reset --to-seq 0`).
            one.set_fence(G, 0).await.unwrap();
            many.set_fence(G, 0).await.unwrap();
            apply(one, &changes).await.unwrap();
            let mut rest = &changes[..];
            let mut split = splits.iter().cycle();
            while !rest.is_empty() {
                let n = (*split.next().unwrap()).min(rest.len());
                apply(many, &rest[..n]).await.unwrap();
                rest = &rest[n..];
            }
            let expected = model(&changes);
            prop_assert_eq!(&actual(one).await, &expected);
            prop_assert_eq!(&actual(many).await, &expected);
            prop_assert_eq!(one.digest().await.unwrap(), many.digest().await.unwrap());
            let last = changes.last().map_or(0, |c| c.seq);
            prop_assert_eq!(many.fence(G).await.unwrap(), Some(last));
            Ok(())
        })
    });
    drop(sinks);
    drop((one_schema, many_schema));
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A batch a previous session committed after this sink last read the fence (a killed
/// applier's COMMIT that the server executed after the process was gone) is not applied a
/// second time: the sink takes the group's advisory lock before writing, re-reads the fence on
/// a new session and skips what is already there. While another session holds the lock, the
/// sink is Unavailable (the engine retries).
#[tokio::test]
async fn a_batch_committed_by_a_previous_session_is_not_applied_again() {
    let (schema, client, mut sink) = setup(
        "CREATE TABLE items (id text PRIMARY KEY, n bigint);
         CREATE TABLE applications (id text, n bigint);
         CREATE FUNCTION count_application() RETURNS trigger AS $$
           BEGIN
             EXECUTE format('INSERT INTO %I.applications VALUES ($1, $2)', TG_TABLE_SCHEMA)
               USING NEW.id, NEW.n;
             RETURN NEW;
           END $$ LANGUAGE plpgsql;
         CREATE TRIGGER count_application AFTER INSERT OR UPDATE ON items
           FOR EACH ROW EXECUTE FUNCTION count_application();",
        &[("items", "id")],
    )
    .await;
    let batch: Vec<Change> = (1..=10)
        .map(|i| {
            up(
                i,
                "items",
                &format!("k{i}"),
                &[
                    ("id", Value::from(format!("k{i}").as_str())),
                    ("n", Value::I64(i as i64)),
                ],
            )
        })
        .collect();
    // Another session (the previous run) holds the lock; this sink reads the fence without it
    // (0), as a restarted engine does while the old COMMIT is still in flight.
    let mut options = schema.options();
    options
        .key_columns
        .insert("items".to_owned(), "id".to_owned());
    let mut previous = PostgresSink::connect(options).await.unwrap();
    assert_eq!(previous.fence(G).await.unwrap(), Some(0));
    assert_eq!(sink.fence(G).await.unwrap(), Some(0));
    // The previous session commits the batch; this one may not write meanwhile.
    previous.apply(G, &batch, 10).await.unwrap();
    let busy = apply(&mut sink, &batch).await.unwrap_err();
    assert!(
        matches!(&busy, SinkError::Unavailable { reason } if reason.contains("lock")),
        "{busy:?}"
    );
    drop(previous);
    // A shorter batch (a smaller batch_max after the restart), wholly at or below the fence
    // the previous session reached: skipped, and the fence does not move back.
    apply_once_free(&mut sink, &batch[..4]).await.unwrap();
    assert_eq!(sink.fence(G).await.unwrap(), Some(10));
    // Once the old session is gone, the same batch plus two new events: only the new ones are
    // written.
    let mut more = batch.clone();
    for i in 11..=12 {
        more.push(up(
            i,
            "items",
            &format!("k{i}"),
            &[
                ("id", Value::from(format!("k{i}").as_str())),
                ("n", Value::I64(i as i64)),
            ],
        ));
    }
    apply_once_free(&mut sink, &more).await.unwrap();
    let applications: i64 = client
        .query_one("SELECT count(*) FROM applications", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applications, 12, "every event applied exactly once");
    assert_eq!(sink.fence(G).await.unwrap(), Some(12));
}

/// What an event contains is Rejected (poison) with its index and nothing of the batch
/// applied, never Fatal: an index row too big (54000), a view (42809 / 0A000), a table without
/// a usable key (42P10), permission denied on one table (42501).
#[tokio::test]
async fn content_errors_are_rejected_with_their_index() {
    let (schema, service, mut sink) = setup(
        "CREATE TABLE ok (id text PRIMARY KEY, v text); \
         CREATE TABLE indexed (id text PRIMARY KEY, v text); \
         CREATE INDEX indexed_v ON indexed (v); \
         CREATE TABLE loose (id text, v text); \
         CREATE VIEW a_view AS SELECT * FROM ok; \
         CREATE TABLE guarded (id text PRIMARY KEY, v text);",
        &[
            ("ok", "id"),
            ("indexed", "id"),
            ("loose", "id"),
            ("a_view", "id"),
            ("guarded", "id"),
        ],
    )
    .await;
    // Incompressible, far over the ~2.7 kB a btree entry may hold.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let huge: String = (0..20_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect();
    let cases: [(&str, &str); 3] = [
        ("indexed", "54000"),
        ("loose", "UNIQUE"),
        ("a_view", "does not exist"),
    ];
    for (seq, (table, needle)) in (1u64..).zip(cases) {
        let batch = [
            up(seq, "ok", "a", &[("v", Value::from("fine"))]),
            up(seq, table, "k", &[("v", Value::from(huge.as_str()))]),
        ];
        let err = apply(&mut sink, &batch).await.unwrap_err();
        expect_rejected(err, 1, needle);
    }
    assert!(
        sink.read_table("ok").await.unwrap().is_empty(),
        "nothing of a batch"
    );

    // Permission denied on one table, for a user that may write the others.
    let role = format!("jst_role_{}", std::process::id());
    service
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN; \
             GRANT USAGE ON SCHEMA \"{0}\" TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON \"{0}\".ok, \"{0}\".jetsync_offsets TO {role}; \
             GRANT SELECT ON \"{0}\".guarded TO {role};",
            schema.name
        ))
        .await
        .unwrap();
    let base: tokio_postgres::Config = url().parse().unwrap();
    let host = match &base.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("{other:?}"),
    };
    let port = base.get_ports().first().copied().unwrap_or(5432);
    let database = base.get_dbname().unwrap_or("test");
    let mut options = schema.options();
    options.url = format!("postgres://{role}@{host}:{port}/{database}");
    options.key_columns = [("ok", "id"), ("guarded", "id")]
        .iter()
        .map(|(t, k)| ((*t).to_owned(), (*k).to_owned()))
        .collect();
    drop(sink);
    let result = async {
        let mut limited = PostgresSink::connect(options).await.unwrap();
        let batch = [
            up(10, "ok", "a", &[("v", Value::from("fine"))]),
            up(11, "guarded", "k", &[("v", Value::from("no"))]),
        ];
        let err = once_lock_free!(apply(&mut limited, &batch).await).unwrap_err();
        expect_rejected(err, 1, "42501");
        apply(&mut limited, &batch[..1]).await.unwrap();
        assert_eq!(limited.fence(G).await.unwrap(), Some(10));
    };
    result.await;
    drop(schema);
    let _ = service
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"))
        .await;
}

/// Rows are independent of history (issue #12.2): an instance that replayed `{a:1,b:1}` then
/// `{a:2}` holds the same row, and the same digest, as one that joined from a snapshot holding
/// only `{a:2}`.
#[tokio::test]
async fn digests_do_not_depend_on_history() {
    let ddl = "CREATE TABLE t (id text PRIMARY KEY, a bigint, b bigint);";
    let (_replayed_schema, _s1, mut replayed) = setup(ddl, &[("t", "id")]).await;
    let (_joined_schema, _s2, mut joined) = setup(ddl, &[("t", "id")]).await;
    apply(
        &mut replayed,
        &[
            up(1, "t", "k", &[("a", Value::I64(1)), ("b", Value::I64(1))]),
            up(2, "t", "k", &[("a", Value::I64(2))]),
        ],
    )
    .await
    .unwrap();
    joined
        .replace(G, &[up(2, "t", "k", &[("a", Value::I64(2))])], 2)
        .await
        .unwrap();
    assert_eq!(
        replayed.read_table("t").await.unwrap(),
        joined.read_table("t").await.unwrap()
    );
    assert_eq!(
        replayed.digest().await.unwrap(),
        joined.digest().await.unwrap()
    );
}
