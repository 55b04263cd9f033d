//! Unit tests of the SQLite sink, against real SQLite files.

use super::*;
use jetsync::Value;
use std::path::{Path, PathBuf};

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
fn upsert_creates_table_with_untyped_columns() {
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
            ("id", Value::from("1")),
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
            ("id", "", 1),
            ("active", "", 0),
            ("blob", "", 0),
            ("meta", "", 0),
            ("name", "", 0),
            ("nothing", "", 0),
            ("price", "", 0),
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
fn created_table_stores_every_key_as_text() {
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
            // A row without the key column: the same text key as the rows that carry it.
            up(3, "n", "43", &[("v", Value::from("c"))]),
            up(4, "n", "41", &[("v", Value::from("a2"))]),
        ],
    )
    .unwrap();
    apply(&mut sink, &[del(5, "n", "42"), del(6, "n", "43")]).unwrap();
    assert_eq!(
        sink.read_table("n").unwrap(),
        vec![row(&[("id", Value::from("41")), ("v", Value::from("a2"))])]
    );
    let typeof_id: String = service_conn(&sink)
        .query_row("SELECT typeof(id) FROM n", [], |r| r.get(0))
        .unwrap();
    assert_eq!(typeof_id, "text");
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
    // Batches never move the fence back; `set_fence` (the operator's `reset --to-seq`) does.
    run(sink.apply(G, &[], 5)).unwrap();
    assert_eq!(run(sink.fence(G)).unwrap(), Some(9));
    run(sink.set_fence(G, 2)).unwrap();
    assert_eq!(run(sink.fence(G)).unwrap(), Some(2));
    assert_eq!(sink.read_table("t").unwrap().len(), 1);
    // The fence table is no synced table.
    assert_eq!(run(sink.digest()).unwrap().len(), 1);
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
    // Rows absent from the changes are gone from every synced table; the tables stay. The
    // service's own table is no synced table: its row and its index stay.
    assert!(sink.read_table("u").unwrap().is_empty());
    assert_eq!(
        sink.read_table("svc").unwrap(),
        vec![row(&[("id", Value::from("s")), ("n", Value::I64(1))])]
    );
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
        [("fresh", 1), ("t", 2)]
    );
    assert_eq!(digest, run(other.digest()).unwrap());

    // Replacing with nothing empties every synced table; the fence never moves back.
    run(sink.replace(G, &[], 3)).unwrap();
    assert!(run(sink.is_empty()).unwrap());
    assert_eq!(run(sink.fence(G)).unwrap(), Some(12));
    assert_eq!(sink.read_table("svc").unwrap().len(), 1);
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
        .execute_batch("CREATE TABLE products (id TEXT PRIMARY KEY, price REAL CHECK (price >= 0))")
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
fn service_table_without_unique_key_is_rejected() {
    let (_dir, mut sink) = fresh();
    service_conn(&sink)
        .execute_batch("CREATE TABLE loose (id TEXT, v INTEGER)")
        .unwrap();
    for change in [
        del(1, "loose", "a"),
        up(1, "loose", "a", &[("v", Value::I64(1))]),
    ] {
        let err = apply(&mut sink, &[change]).unwrap_err();
        assert!(
            matches!(&err, SinkError::Rejected { index: 0, reason, .. } if reason.contains("UNIQUE")),
            "{err:?}"
        );
    }
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
        let err = apply(&mut sink, &[up(4, table, "x", &[("seq", Value::I64(1))])]).unwrap_err();
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

/// The upsert statement kept per table and row shape: rows of two tables interleaved, a new
/// column half-way through a batch, then the old shape again, each row written in full.
#[test]
fn row_shapes_interleaved_across_tables_and_columns() {
    let (_dir, mut sink) = fresh();
    apply(
        &mut sink,
        &[
            up(1, "t", "a", &[("v", Value::I64(1))]),
            up(2, "u", "a", &[("v", Value::from("u1"))]),
            up(3, "t", "b", &[("v", Value::I64(2))]),
            up(
                4,
                "t",
                "c",
                &[("v", Value::I64(3)), ("w", Value::Bool(true))],
            ),
            up(5, "t", "a", &[("v", Value::I64(4))]),
            up(6, "u", "b", &[("v", Value::from("u2"))]),
            up(
                7,
                "t",
                "b",
                &[("id", Value::from("b")), ("v", Value::I64(5))],
            ),
        ],
    )
    .unwrap();
    let t = |id: &str, v: i64, w: Value| {
        row(&[("id", Value::from(id)), ("v", Value::I64(v)), ("w", w)])
    };
    assert_eq!(
        sink.read_table("t").unwrap(),
        vec![
            t("a", 4, Value::Null),
            t("b", 5, Value::Null),
            t("c", 3, Value::I64(1))
        ]
    );
    assert_eq!(sink.read_table("u").unwrap().len(), 2);
    // The same shape with a key that does not match is still refused.
    let err = apply(
        &mut sink,
        &[up(
            8,
            "t",
            "d",
            &[("id", Value::from("x")), ("v", Value::I64(6))],
        )],
    )
    .unwrap_err();
    assert!(
        matches!(err, SinkError::Rejected { index: 0, .. }),
        "{err:?}"
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

// ---- Typing independent of history (#12.1) ----

fn typeof_v(sink: &SqliteSink, table: &str) -> String {
    service_conn(sink)
        .query_row(&format!("SELECT typeof(v) FROM \"{table}\""), [], |r| {
            r.get(0)
        })
        .unwrap()
}

#[test]
fn value_types_do_not_depend_on_history() {
    let kinds = [
        (Value::Null, "null"),
        (Value::Bool(true), "integer"),
        (Value::I64(5), "integer"),
        (Value::F64(5.0), "real"),
        (Value::from("5"), "text"),
        (Value::Bytes(b"5".to_vec()), "blob"),
        (Value::Json(serde_json::json!({"b": 1, "a": [5]})), "text"),
    ];
    for (first, _) in &kinds {
        for (value, expected) in &kinds {
            let (_d1, mut seen_history) = fresh();
            apply(
                &mut seen_history,
                &[
                    up(1, "t", "k", &[("v", first.clone())]),
                    up(2, "t", "k", &[("v", value.clone())]),
                ],
            )
            .unwrap();
            let (_d2, mut joined_later) = fresh();
            apply(
                &mut joined_later,
                &[up(2, "t", "k", &[("v", value.clone())])],
            )
            .unwrap();
            let what = format!("{first:?} then {value:?}");
            assert_eq!(typeof_v(&seen_history, "t"), *expected, "{what}");
            assert_eq!(typeof_v(&joined_later, "t"), *expected, "{what}");
            assert_eq!(
                seen_history.read_table("t").unwrap(),
                joined_later.read_table("t").unwrap(),
                "{what}"
            );
            assert_eq!(
                run(seen_history.digest()).unwrap(),
                run(joined_later.digest()).unwrap(),
                "{what}"
            );
        }
    }
}

#[test]
fn values_read_back_as_stored_kinds() {
    let (_dir, mut sink) = fresh();
    apply(
        &mut sink,
        &[up(
            1,
            "t",
            "k",
            &[
                ("b", Value::Bool(false)),
                ("j", Value::Json(serde_json::json!({"z": 1, "a": null}))),
                ("x", Value::Bytes(vec![0, 255])),
            ],
        )],
    )
    .unwrap();
    assert_eq!(
        sink.read_table("t").unwrap(),
        vec![row(&[
            ("id", Value::from("k")),
            ("b", Value::I64(0)),
            ("j", Value::from(r#"{"a":null,"z":1}"#)),
            ("x", Value::Bytes(vec![0, 255])),
        ])]
    );
}

#[test]
fn a_column_only_older_events_carried_does_not_change_the_digest() {
    let (_d1, mut replayed) = fresh();
    apply(
        &mut replayed,
        &[
            up(1, "t", "a", &[("x", Value::I64(1)), ("old", Value::I64(2))]),
            up(2, "t", "a", &[("x", Value::I64(1))]),
            up(3, "gone", "g", &[("x", Value::I64(1))]),
            del(4, "gone", "g"),
        ],
    )
    .unwrap();
    let (_d2, mut bootstrapped) = fresh();
    apply(
        &mut bootstrapped,
        &[
            up(2, "t", "a", &[("x", Value::I64(1))]),
            del(4, "gone", "g"),
        ],
    )
    .unwrap();
    assert_eq!(
        replayed.read_table("t").unwrap()[0].get("old"),
        Some(&Value::Null)
    );
    let digest = run(replayed.digest()).unwrap();
    assert_eq!(digest, run(bootstrapped.digest()).unwrap());
    // The emptied table counts as absent.
    assert_eq!(digest.len(), 1);
}

// ---- Errors classified by cause (#11.2) ----

fn assert_rejected(err: &SinkError, index: usize, needle: &str) {
    match err {
        SinkError::Rejected {
            index: i, reason, ..
        } => {
            assert_eq!(*i, index, "{err:?}");
            assert!(
                reason.to_lowercase().contains(&needle.to_lowercase()),
                "reason {reason:?} lacks {needle:?}"
            );
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[test]
fn every_sqlite_error_class_is_mapped_by_cause() {
    use rusqlite::ffi;
    let change = up(7, "t", "k", &[]);
    let classify = |code: i32| {
        let e = rusqlite::Error::SqliteFailure(ffi::Error::new(code), Some("msg".into()));
        sink_error(
            Path::new("x.db"),
            "apply",
            Error::Sql(e),
            Some((3, &change)),
        )
    };
    let whole_sink = [
        ffi::SQLITE_BUSY,
        ffi::SQLITE_BUSY_SNAPSHOT,
        ffi::SQLITE_LOCKED,
        ffi::SQLITE_LOCKED_SHAREDCACHE,
        ffi::SQLITE_FULL,
        ffi::SQLITE_IOERR,
        ffi::SQLITE_IOERR_WRITE,
        ffi::SQLITE_IOERR_FSYNC,
        ffi::SQLITE_CANTOPEN,
        ffi::SQLITE_READONLY,
        ffi::SQLITE_READONLY_DBMOVED,
        ffi::SQLITE_CORRUPT,
        ffi::SQLITE_NOTADB,
        ffi::SQLITE_NOMEM,
        ffi::SQLITE_PROTOCOL,
        ffi::SQLITE_PERM,
        ffi::SQLITE_SCHEMA,
        ffi::SQLITE_INTERRUPT,
    ];
    for code in whole_sink {
        let err = classify(code);
        assert!(
            matches!(err, SinkError::Unavailable { .. }),
            "{code}: {err:?}"
        );
    }
    let content = [
        ffi::SQLITE_CONSTRAINT,
        ffi::SQLITE_CONSTRAINT_CHECK,
        ffi::SQLITE_CONSTRAINT_NOTNULL,
        ffi::SQLITE_CONSTRAINT_UNIQUE,
        ffi::SQLITE_CONSTRAINT_PRIMARYKEY,
        ffi::SQLITE_CONSTRAINT_FOREIGNKEY,
        ffi::SQLITE_CONSTRAINT_TRIGGER,
        ffi::SQLITE_CONSTRAINT_DATATYPE,
        ffi::SQLITE_MISMATCH,
        ffi::SQLITE_TOOBIG,
        ffi::SQLITE_ERROR,
        ffi::SQLITE_RANGE,
        ffi::SQLITE_AUTH,
    ];
    for code in content {
        let err = classify(code);
        assert!(
            matches!(
                err,
                SinkError::Rejected {
                    index: 3,
                    seq: 7,
                    ..
                }
            ),
            "{code}: {err:?}"
        );
    }
    // Outside any change, a content-like error is not retried but needs an operator.
    let e = rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_ERROR), None);
    let err = sink_error(Path::new("x.db"), "write the fence to", Error::Sql(e), None);
    assert!(matches!(err, SinkError::Fatal { .. }), "{err:?}");
}

#[test]
fn constraint_violations_of_every_kind_are_rejected() {
    let (_dir, mut sink) = fresh();
    service_conn(&sink)
        .execute_batch(
            "CREATE TABLE uq (id TEXT PRIMARY KEY, email TEXT UNIQUE, n INTEGER NOT NULL DEFAULT 0, \
                 c INTEGER CHECK (c > 0));",
        )
        .unwrap();
    let ok = |seq, key: &str, email: &str| {
        up(
            seq,
            "uq",
            key,
            &[("email", Value::from(email)), ("n", Value::I64(1))],
        )
    };
    // UNIQUE on another column than the key.
    let err = apply(&mut sink, &[ok(1, "a", "x@y"), ok(2, "b", "x@y")]).unwrap_err();
    assert_rejected(&err, 1, "UNIQUE");
    // NOT NULL: a column the event lacks is NULL, even where the service set a DEFAULT.
    let err = apply(
        &mut sink,
        &[up(1, "uq", "a", &[("email", Value::from("e"))])],
    )
    .unwrap_err();
    assert_rejected(&err, 0, "NOT NULL");
    // CHECK.
    let err = apply(
        &mut sink,
        &[up(
            1,
            "uq",
            "a",
            &[("n", Value::I64(1)), ("c", Value::I64(0))],
        )],
    )
    .unwrap_err();
    assert_rejected(&err, 0, "CHECK");
    assert!(sink.read_table("uq").unwrap().is_empty());
    apply(&mut sink, &[ok(1, "a", "x@y"), ok(2, "b", "z@y")]).unwrap();
    assert_eq!(sink.read_table("uq").unwrap().len(), 2);
}

#[test]
fn datatype_mismatch_on_an_integer_primary_key_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = SqliteOptions::new(dir.path().join("r.sqlite"));
    options.key_columns.insert("ipk".into(), "k".into());
    let mut sink = SqliteSink::open(options).unwrap();
    service_conn(&sink)
        .execute_batch("CREATE TABLE ipk (rid INTEGER PRIMARY KEY, k TEXT UNIQUE)")
        .unwrap();
    let err = apply(
        &mut sink,
        &[up(1, "ipk", "a", &[("rid", Value::from("abc"))])],
    )
    .unwrap_err();
    assert_rejected(&err, 0, "mismatch");
    apply(&mut sink, &[up(1, "ipk", "a", &[("rid", Value::I64(5))])]).unwrap();
}

#[test]
fn a_value_too_big_is_rejected() {
    let (_dir, mut sink) = fresh();
    // SQLite refuses a blob over its length limit (1e9 bytes) before allocating it.
    service_conn(&sink)
        .execute_batch(
            "CREATE TABLE big (id TEXT PRIMARY KEY, v); \
             CREATE TRIGGER big_v BEFORE INSERT ON big WHEN NEW.v = 'huge' \
             BEGIN SELECT zeroblob(2000000000); END;",
        )
        .unwrap();
    let err = apply(
        &mut sink,
        &[
            up(1, "big", "a", &[("v", Value::from("small"))]),
            up(2, "big", "b", &[("v", Value::from("huge"))]),
        ],
    )
    .unwrap_err();
    assert_rejected(&err, 1, "too big");
    assert!(sink.read_table("big").unwrap().is_empty());
}

fn wide_row(columns: usize, prefix: &str) -> Vec<(String, Value)> {
    (0..columns)
        .map(|i| (format!("{prefix}{i}"), Value::I64(i as i64)))
        .collect()
}

fn up_owned(seq: u64, table: &str, key: &str, pairs: &[(String, Value)]) -> Change {
    Change {
        seq,
        table: table.to_owned(),
        key: key.to_owned(),
        op: jetsync::Change::Upsert(pairs.iter().cloned().collect()),
    }
}

#[test]
fn too_many_columns_are_rejected_on_create_and_on_add() {
    let (_dir, mut sink) = fresh();
    // 2,001 columns (SQLite's limit is 2,000): the table cannot be created.
    let err = apply(
        &mut sink,
        &[
            up(1, "fine", "a", &[("v", Value::I64(1))]),
            up_owned(2, "wide", "a", &wide_row(2001, "c")),
        ],
    )
    .unwrap_err();
    assert_rejected(&err, 1, "too many columns");
    assert!(run(sink.is_empty()).unwrap());
    // 1,999 columns and the key: exactly the limit. One more column cannot be added.
    apply(&mut sink, &[up_owned(1, "wide", "a", &wide_row(1999, "c"))]).unwrap();
    let err = apply(
        &mut sink,
        &[up(2, "wide", "a", &[("extra", Value::I64(1))])],
    )
    .unwrap_err();
    assert_rejected(&err, 0, "too many columns");
    assert_eq!(sink.read_table("wide").unwrap().len(), 1);
}

#[test]
fn strict_table_gets_new_columns_without_affinity() {
    let (_dir, mut sink) = fresh();
    service_conn(&sink)
        .execute_batch("CREATE TABLE s (id TEXT PRIMARY KEY, n INTEGER) STRICT")
        .unwrap();
    apply(
        &mut sink,
        &[
            up(
                1,
                "s",
                "a",
                &[("n", Value::I64(1)), ("x", Value::from("5"))],
            ),
            up(2, "s", "b", &[("n", Value::I64(2)), ("x", Value::I64(5))]),
        ],
    )
    .unwrap();
    let types: Vec<String> = service_conn(&sink)
        .prepare("SELECT typeof(x) FROM s ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(types, ["text", "integer"]);
}

#[test]
fn views_and_tables_without_a_usable_key_are_rejected() {
    let (_dir, mut sink) = fresh();
    apply(&mut sink, &[up(1, "t", "a", &[("v", Value::I64(1))])]).unwrap();
    service_conn(&sink)
        .execute_batch(
            "CREATE VIEW vw AS SELECT id, v FROM t; \
             CREATE TABLE nokey (sku TEXT PRIMARY KEY, v);",
        )
        .unwrap();
    for change in [up(2, "vw", "a", &[("v", Value::I64(2))]), del(2, "vw", "a")] {
        let err = apply(&mut sink, &[change]).unwrap_err();
        assert_rejected(&err, 0, "view");
    }
    let err = apply(&mut sink, &[up(2, "nokey", "a", &[("v", Value::I64(2))])]).unwrap_err();
    assert_rejected(&err, 0, "no key column `id`");
    assert_eq!(run(sink.fence(G)).unwrap(), Some(1));
}

#[test]
fn read_only_database_is_unavailable() {
    let (_dir, mut sink) = fresh();
    apply(&mut sink, &[up(1, "t", "a", &[("v", Value::I64(1))])]).unwrap();
    sink.conn.pragma_update(None, "query_only", true).unwrap();
    let batch = [up(2, "t", "b", &[("v", Value::I64(2))])];
    let err = apply(&mut sink, &batch).unwrap_err();
    assert!(
        matches!(&err, SinkError::Unavailable { reason } if reason.contains("writable")),
        "{err:?}"
    );
    let err = run(sink.replace_begin(G)).unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    sink.conn.pragma_update(None, "query_only", false).unwrap();
    apply(&mut sink, &batch).unwrap();
    assert_eq!(run(sink.fence(G)).unwrap(), Some(2));
}

#[test]
fn full_disk_is_unavailable() {
    let (_dir, mut sink) = fresh();
    apply(&mut sink, &[up(1, "t", "a", &[("v", Value::I64(1))])]).unwrap();
    let pages: i64 = sink
        .conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    sink.conn
        .pragma_update(None, "max_page_count", pages)
        .unwrap();
    let err = apply(
        &mut sink,
        &[up(2, "t", "b", &[("v", Value::Bytes(vec![7; 64 * 1024]))])],
    )
    .unwrap_err();
    assert!(
        matches!(&err, SinkError::Unavailable { reason } if reason.contains("full")),
        "{err:?}"
    );
    assert_eq!(sink.read_table("t").unwrap().len(), 1);
    assert_eq!(run(sink.fence(G)).unwrap(), Some(1));
}

#[test]
fn damaged_file_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.sqlite");
    {
        let mut sink = open_at(&path);
        apply(&mut sink, &[up(1, "t", "a", &[("v", Value::I64(1))])]).unwrap();
        sink.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
    }
    // Everything but the schema page (page 1) becomes garbage.
    let mut bytes = std::fs::read(&path).unwrap();
    let page = 4096;
    assert!(bytes.len() > page);
    bytes[page..].fill(0xA5);
    std::fs::write(&path, &bytes).unwrap();
    let mut sink = open_at(&path);
    let err = apply(&mut sink, &[up(2, "t", "b", &[("v", Value::I64(2))])]).unwrap_err();
    assert!(
        matches!(&err, SinkError::Unavailable { reason } if reason.contains("damaged")),
        "{err:?}"
    );
}

// ---- Only configured tables (#11.3) ----

fn configured(dir: &tempfile::TempDir, tables: &[&str], any_table: bool) -> SqliteSink {
    let mut options = SqliteOptions::new(dir.path().join("r.sqlite"));
    options.any_table = any_table;
    for table in tables {
        options.key_columns.insert((*table).into(), "id".into());
    }
    SqliteSink::open(options).unwrap()
}

#[test]
fn a_table_not_configured_is_rejected_without_any_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = configured(&dir, &["t"], false);
    let err = apply(
        &mut sink,
        &[
            up(1, "t", "a", &[("v", Value::I64(1))]),
            up(2, "other", "a", &[("v", Value::I64(1))]),
        ],
    )
    .unwrap_err();
    assert_rejected(&err, 1, "table not synced here");
    let err = apply(&mut sink, &[del(2, "other", "a")]).unwrap_err();
    assert_rejected(&err, 0, "table not synced here");
    // Not even an existing table of the service.
    service_conn(&sink)
        .execute_batch("CREATE TABLE svc (id TEXT PRIMARY KEY, v)")
        .unwrap();
    let err = apply(&mut sink, &[up(2, "svc", "a", &[])]).unwrap_err();
    assert_rejected(&err, 0, "table not synced here");
    apply(&mut sink, &[up(1, "t", "a", &[("v", Value::I64(1))])]).unwrap();
    assert!(sink.read_table("other").unwrap().is_empty());
}

#[test]
fn internal_tables_virtual_tables_and_shadow_tables_are_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = configured(&dir, &["sqlite_stat1", "docs", "docs_content", "t"], true);
    apply(&mut sink, &[up(1, "t", "a", &[("v", Value::I64(1))])]).unwrap();
    service_conn(&sink)
        .execute_batch(
            "CREATE VIRTUAL TABLE docs USING fts5(body); INSERT INTO docs VALUES ('hello'); \
             CREATE VIRTUAL TABLE boxes USING rtree(id, x0, x1); ANALYZE;",
        )
        .unwrap();
    for table in [
        "sqlite_stat1",
        "SQLITE_SEQUENCE",
        "jetsync_tables",
        "docs",
        "docs_content",
        "docs_data",
        "docs_idx",
        "docs_config",
        "docs_docsize",
        "boxes",
        "boxes_node",
        "boxes_parent",
        "boxes_rowid",
        "Boxes_Node",
    ] {
        for change in [
            up(2, table, "1", &[("v", Value::I64(1))]),
            del(2, table, "1"),
        ] {
            let err = apply(&mut sink, &[change]).unwrap_err();
            assert!(
                matches!(err, SinkError::Rejected { index: 0, .. }),
                "{table}: {err:?}"
            );
        }
    }
    // A resync clears none of them.
    run(sink.replace(G, &[], 5)).unwrap();
    let conn = service_conn(&sink);
    let count = |table: &str| -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(count("docs"), 1);
    assert!(count("sqlite_stat1") > 0);
    assert_eq!(count("t"), 0);
    assert_eq!(run(sink.digest()).unwrap(), vec![]);
}

#[test]
fn a_table_name_differing_only_in_case_is_rejected_for_unconfigured_tables() {
    let (_dir, mut sink) = fresh();
    apply(&mut sink, &[up(1, "t", "a", &[("v", Value::I64(1))])]).unwrap();
    let err = apply(&mut sink, &[up(2, "T", "a", &[("v", Value::I64(2))])]).unwrap_err();
    assert_rejected(&err, 0, "ignore ASCII case");
    assert_eq!(
        sink.read_table("t").unwrap()[0].get("v"),
        Some(&Value::I64(1))
    );
}

// ---- Streaming replace ----

#[test]
fn streaming_replace_with_a_rejected_change_in_the_second_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = configured(&dir, &["t", "u", "never_created"], false);
    apply(
        &mut sink,
        &[
            up(1, "t", "a", &[("v", Value::I64(1))]),
            up(2, "t", "b", &[("v", Value::I64(2))]),
            up(3, "u", "x", &[("w", Value::I64(3))]),
        ],
    )
    .unwrap();
    let service = service_conn(&sink);
    service
        .execute_batch(
            "CREATE TABLE svc (id TEXT PRIMARY KEY, n INTEGER); INSERT INTO svc VALUES ('s', 1); \
             CREATE TRIGGER t_no_bad BEFORE INSERT ON t WHEN NEW.id = 'bad' \
             BEGIN SELECT RAISE(ABORT, 'no bad rows'); END;",
        )
        .unwrap();
    let count = |table: &str| -> i64 {
        service
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    };

    run(sink.replace_begin(G)).unwrap();
    run(sink.replace_chunk(
        G,
        &[
            up(4, "t", "c", &[("v", Value::I64(4))]),
            up(5, "u", "y", &[("w", Value::I64(5))]),
        ],
    ))
    .unwrap();
    // Old contents for every reader until the commit.
    assert_eq!((count("t"), count("u")), (2, 1));
    let second = [
        up(6, "t", "d", &[("v", Value::I64(6)), ("new", Value::I64(1))]),
        up(7, "t", "bad", &[("v", Value::I64(7))]),
        up(8, "t", "e", &[("v", Value::I64(8))]),
    ];
    let err = run(sink.replace_chunk(G, &second)).unwrap_err();
    match &err {
        SinkError::Rejected {
            index, seq, reason, ..
        } => {
            assert_eq!((*index, *seq), (1, 7));
            assert!(reason.contains("no bad rows"), "{reason}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!((count("t"), count("u")), (2, 1));
    // The engine sends the chunk again without the rejected change.
    run(sink.replace_chunk(G, &[second[0].clone(), second[2].clone()])).unwrap();
    assert_eq!(count("t"), 2);
    run(sink.replace_commit(G, 8)).unwrap();

    assert_eq!(run(sink.fence(G)).unwrap(), Some(8));
    let ids = |table: &str| -> Vec<Value> {
        sink.read_table(table)
            .unwrap()
            .iter()
            .map(|r| r["id"].clone())
            .collect()
    };
    assert_eq!(
        ids("t"),
        [Value::from("c"), Value::from("d"), Value::from("e")]
    );
    assert_eq!(ids("u"), [Value::from("y")]);
    // The service's table in the same file keeps its row.
    assert_eq!(count("svc"), 1);
    assert_eq!(sink.read_table("t").unwrap()[1]["new"], Value::I64(1));
}

#[test]
fn streaming_replace_abort_keeps_everything() {
    let (_dir, mut sink) = filled();
    let before = run(sink.digest()).unwrap();
    run(sink.replace_begin(G)).unwrap();
    run(sink.replace_chunk(G, &[up(11, "t", "z", &[("v", Value::I64(1))])])).unwrap();
    run(sink.replace_abort(G));
    assert_eq!(run(sink.digest()).unwrap(), before);
    assert_eq!(run(sink.fence(G)).unwrap(), Some(10));
    // Nothing is open any more.
    let err = run(sink.replace_chunk(G, &[])).unwrap_err();
    assert!(matches!(err, SinkError::Fatal { .. }), "{err:?}");
    // A later replacement works.
    run(sink.replace(G, &[up(11, "t", "z", &[])], 11)).unwrap();
    assert_eq!(sink.read_table("t").unwrap().len(), 1);
}

#[test]
fn a_rollback_trigger_ends_the_replacement_and_says_so() {
    let (_dir, mut sink) = filled();
    service_conn(&sink)
        .execute_batch(
            "CREATE TRIGGER t_rb BEFORE INSERT ON t WHEN NEW.id = 'bad' \
             BEGIN SELECT RAISE(ROLLBACK, 'rolled back'); END;",
        )
        .unwrap();
    run(sink.replace_begin(G)).unwrap();
    let err = run(sink.replace_chunk(G, &[up(11, "t", "bad", &[])])).unwrap_err();
    assert_rejected(&err, 0, "rolled back");
    let err = run(sink.replace_chunk(G, &[])).unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(sink.read_table("t").unwrap().len(), 3);
    assert_eq!(run(sink.fence(G)).unwrap(), Some(10));
}

// ---- One row, one subject (#11.5) ----

#[test]
fn canonical_integers() {
    for ok in [
        "0",
        "42",
        "-7",
        "9223372036854775807",
        "-9223372036854775808",
    ] {
        assert!(write::canonical_integer(ok).is_some(), "{ok}");
    }
    for bad in [
        "042",
        "+42",
        " 42",
        "42 ",
        "4.2e1",
        "42.0",
        "-0",
        "",
        "abc",
        "9223372036854775808",
    ] {
        assert_eq!(write::canonical_integer(bad), None, "{bad}");
    }
}

#[test]
fn keys_an_integer_key_column_would_convert_are_rejected() {
    for declared in ["INTEGER", "NUMERIC", "REAL", "BIGINT"] {
        let (_dir, mut sink) = fresh();
        service_conn(&sink)
            .execute_batch(&format!(
                "CREATE TABLE n (id {declared} PRIMARY KEY, v TEXT)"
            ))
            .unwrap();
        apply(
            &mut sink,
            &[
                up(1, "n", "42", &[("v", Value::from("a"))]),
                up(
                    2,
                    "n",
                    "-7",
                    &[("id", Value::I64(-7)), ("v", Value::from("b"))],
                ),
            ],
        )
        .unwrap();
        for key in ["042", "+42", " 42", "4.2e1", "42.0", "abc"] {
            let err = apply(&mut sink, &[up(3, "n", key, &[("v", Value::from("x"))])]).unwrap_err();
            assert_rejected(&err, 0, &format!("key `{key}`"));
            assert_rejected(&err, 0, declared);
            let err = apply(&mut sink, &[del(3, "n", key)]).unwrap_err();
            assert_rejected(&err, 0, "canonical");
        }
        let rows = sink.read_table("n").unwrap();
        assert_eq!(rows.len(), 2, "{declared}");
        assert_eq!(rows[1]["v"], Value::from("a"), "{declared}");
        apply(&mut sink, &[del(4, "n", "42")]).unwrap();
        assert_eq!(sink.read_table("n").unwrap().len(), 1, "{declared}");
    }
}

#[test]
fn a_text_key_column_keeps_keys_apart() {
    let (_dir, mut sink) = fresh();
    service_conn(&sink)
        .execute_batch("CREATE TABLE s (id TEXT PRIMARY KEY, v)")
        .unwrap();
    apply(
        &mut sink,
        &[
            up(1, "s", "42", &[("v", Value::I64(1))]),
            up(2, "s", "042", &[("v", Value::I64(2))]),
            up(3, "s", "+42", &[("v", Value::I64(3))]),
            up(4, "fresh", "42", &[("v", Value::I64(4))]),
            up(5, "fresh", "042", &[("v", Value::I64(5))]),
        ],
    )
    .unwrap();
    assert_eq!(sink.read_table("s").unwrap().len(), 3);
    assert_eq!(sink.read_table("fresh").unwrap().len(), 2);
}

// ---- Fence never decreases (#12.3) ----

#[test]
fn the_fence_never_decreases() {
    let (_dir, mut sink) = fresh();
    run(sink.apply(G, &[up(10, "t", "a", &[])], 10)).unwrap();
    run(sink.apply(G, &[up(5, "t", "b", &[])], 5)).unwrap();
    assert_eq!(run(sink.fence(G)).unwrap(), Some(10));
    run(sink.replace(G, &[up(4, "t", "a", &[])], 4)).unwrap();
    assert_eq!(run(sink.fence(G)).unwrap(), Some(10));
    run(sink.apply(G, &[], 12)).unwrap();
    assert_eq!(run(sink.fence(G)).unwrap(), Some(12));
    // Only the operator's explicit reset (`set_fence`, `reset --to-seq`) moves it back.
    run(sink.set_fence(G, 1)).unwrap();
    assert_eq!(run(sink.fence(G)).unwrap(), Some(1));
}

// ---- File permissions (#11.6) ----

#[cfg(unix)]
#[test]
fn a_new_database_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.sqlite");
    let mut sink = open_at(&path);
    apply(&mut sink, &[up(1, "t", "a", &[("v", Value::I64(1))])]).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        assert!(file.exists(), "{}", file.display());
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    // An existing file keeps the mode its operator gave it.
    let shared = dir.path().join("shared.sqlite");
    std::fs::write(&shared, b"").unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut sink = open_at(&shared);
    apply(&mut sink, &[up(1, "t", "a", &[])]).unwrap();
    assert_eq!(mode(&shared), 0o640);
}
