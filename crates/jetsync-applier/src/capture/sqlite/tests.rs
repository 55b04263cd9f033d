//! Capture on real SQLite files: triggers, value round trips, no echo, schema changes.

use jetsync::{Change as Op, Row, Value};
use rusqlite::{Connection, OptionalExtension};

use super::*;
use crate::{Change, Sink, SqliteOptions, SqliteSink};

fn service(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

fn setup() -> (tempfile::TempDir, PathBuf, Connection) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    let conn = service(&path);
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; \
         CREATE TABLE capture_items (id TEXT PRIMARY KEY, i INTEGER, r REAL, t TEXT, b BLOB, n);",
    )
    .unwrap();
    (dir, path, conn)
}

/// The applier's SQLite sink on the file, keyed by `id` in the captured table.
fn sink(path: &Path) -> SqliteSink {
    let mut options = SqliteOptions::new(path.to_owned());
    options
        .key_columns
        .insert("capture_items".into(), "id".into());
    SqliteSink::open(options).unwrap()
}

fn tables() -> Vec<(String, String)> {
    vec![("capture_items".into(), "id".into())]
}

fn pending(path: &Path) -> Vec<Batch> {
    let mut store = Store::open(path, tables(), None).unwrap();
    store.check_schema().unwrap();
    store.assign(10_000).unwrap();
    store.pending(10_000).unwrap()
}

fn outbox_rows(conn: &Connection) -> i64 {
    conn.query_row("SELECT count(*) FROM jetsync_outbox", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn every_storage_class_round_trips_with_its_type() {
    let (_dir, path, conn) = setup();
    let report = install(&path, &tables(), false).unwrap();
    assert_eq!(report.tables[0].action, "installed");
    assert_eq!(report.tables[0].columns, ["id", "i", "r", "t", "b", "n"]);
    // Reals that 15 digits do not round-trip, and the extremes.
    let reals: [f64; 8] = [
        0.1,
        1.0 / 3.0,
        -2.5e-300,
        1.7976931348623157e308,
        5e-324,
        123456789.12345679,
        1e22, // (-0.0 is not kept by SQLite itself: it stores 0.0)
        42.0,
    ];
    for (n, r) in reals.iter().enumerate() {
        conn.execute(
            "INSERT INTO capture_items VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
            rusqlite::params![
                format!("k{n}"),
                i64::MIN + n as i64,
                r,
                "text \u{1F600} \"quoted\"",
                vec![0u8, 255, n as u8]
            ],
        )
        .unwrap();
    }
    // The n column has no type: any storage class goes in as it is.
    conn.execute(
        "INSERT INTO capture_items (id, n) VALUES ('mixed', x'00')",
        [],
    )
    .unwrap();
    let batches = pending(&path);
    assert_eq!(batches.len(), 1, "one cycle, one batch");
    let entries = &batches[0].entries;
    assert_eq!(entries.len(), reals.len() + 1);
    for (n, r) in reals.iter().enumerate() {
        let Op::Upsert(row) = &entries[n].change else {
            panic!("upsert expected")
        };
        assert_eq!(entries[n].key, format!("k{n}"));
        assert_eq!(row["id"], Value::Text(format!("k{n}")));
        assert_eq!(row["i"], Value::I64(i64::MIN + n as i64));
        match row["r"] {
            Value::F64(got) => assert_eq!(got.to_bits(), r.to_bits(), "real {r}"),
            ref other => panic!("real {r} came back as {other:?}"),
        }
        assert_eq!(row["t"], Value::Text("text \u{1F600} \"quoted\"".into()));
        assert_eq!(row["b"], Value::Bytes(vec![0, 255, n as u8]));
        assert_eq!(row["n"], Value::Null);
    }
    let Op::Upsert(row) = &entries[reals.len()].change else {
        panic!()
    };
    assert_eq!(row["n"], Value::Bytes(vec![0]));
    assert_eq!(row["i"], Value::Null);
}

#[test]
fn updates_deletes_and_key_changes() {
    let (_dir, path, conn) = setup();
    install(&path, &tables(), false).unwrap();
    conn.execute_batch(
        "BEGIN; INSERT INTO capture_items (id, i) VALUES ('a', 1); \
         UPDATE capture_items SET i = 2 WHERE id = 'a'; \
         UPDATE capture_items SET id = 'b' WHERE id = 'a'; \
         DELETE FROM capture_items WHERE id = 'b'; COMMIT;",
    )
    .unwrap();
    let batches = pending(&path);
    let got: Vec<(String, bool)> = batches[0]
        .entries
        .iter()
        .map(|e| (e.key.clone(), matches!(e.change, Op::Upsert(_))))
        .collect();
    assert_eq!(
        got,
        [
            ("a".into(), true),
            ("a".into(), true),
            ("a".into(), false),
            ("b".into(), true),
            ("b".into(), false)
        ]
    );
}

#[test]
fn integer_keys_are_their_canonical_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    let conn = service(&path);
    conn.execute_batch("CREATE TABLE capture_ints (id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    let t = vec![("capture_ints".to_owned(), "id".to_owned())];
    install(&path, &t, false).unwrap();
    conn.execute("INSERT INTO capture_ints VALUES (-42, 'x')", [])
        .unwrap();
    let mut store = Store::open(&path, t, None).unwrap();
    store.assign(1000).unwrap();
    let batches = store.pending(1000).unwrap();
    assert_eq!(batches[0].entries[0].key, "-42");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_applier_writes_are_not_captured() {
    let (_dir, path, conn) = setup();
    install(&path, &tables(), false).unwrap();
    let mut sink = sink(&path);
    let mut row = Row::new();
    row.insert("i".into(), Value::I64(7));
    let change = |seq, key: &str, op: Op| Change {
        seq,
        table: "capture_items".into(),
        key: key.into(),
        op,
    };
    sink.apply("G", &[change(1, "remote", Op::Upsert(row.clone()))], 1)
        .await
        .unwrap();
    sink.apply("G", &[change(2, "remote", Op::Delete)], 2)
        .await
        .unwrap();
    // Replacement (resync) path.
    sink.replace_begin("G").await.unwrap();
    sink.replace_chunk("G", &[change(3, "again", Op::Upsert(row))])
        .await
        .unwrap();
    sink.replace_commit("G", 3).await.unwrap();
    assert_eq!(
        outbox_rows(&conn),
        0,
        "the applier's own writes were captured"
    );
    let flags: i64 = conn
        .query_row("SELECT count(*) FROM jetsync_capture_applying", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(flags, 0, "the no-echo flag was committed");
    // The service's writes are captured, on the same file at the same time.
    conn.execute("UPDATE capture_items SET i = 8 WHERE id = 'again'", [])
        .unwrap();
    assert_eq!(outbox_rows(&conn), 1);
}

#[test]
fn install_is_idempotent_and_follows_added_columns() {
    let (_dir, path, conn) = setup();
    install(&path, &tables(), false).unwrap();
    let again = install(&path, &tables(), false).unwrap();
    assert_eq!(again.tables[0].action, "reinstalled");
    let triggers: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'trigger'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(triggers, 3);
    let mut store = Store::open(&path, tables(), None).unwrap();
    store.check_schema().unwrap();
    // A nullable column added by the service: the relay reinstalls and captures it.
    conn.execute_batch("ALTER TABLE capture_items ADD COLUMN extra TEXT")
        .unwrap();
    store.check_schema().unwrap();
    conn.execute(
        "INSERT INTO capture_items (id, extra) VALUES ('x', 'new')",
        [],
    )
    .unwrap();
    store.assign(1000).unwrap();
    let batches = store.pending(1000).unwrap();
    let Op::Upsert(row) = &batches[0].entries[0].change else {
        panic!()
    };
    assert_eq!(row["extra"], Value::Text("new".into()));
    // A renamed column: refused until capture install runs again.
    conn.execute_batch("ALTER TABLE capture_items RENAME COLUMN extra TO other")
        .unwrap();
    let err = store.check_schema().unwrap_err();
    assert!(err.to_string().contains("extra"), "{err}");
    install(&path, &tables(), false).unwrap();
    store.check_schema().unwrap();
}

#[test]
fn many_columns_use_chained_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    let conn = service(&path);
    let cols: Vec<String> = (0..150).map(|i| format!("c{i}")).collect();
    conn.execute_batch(&format!(
        "CREATE TABLE capture_wide (id TEXT PRIMARY KEY, {})",
        cols.join(", ")
    ))
    .unwrap();
    let t = vec![("capture_wide".to_owned(), "id".to_owned())];
    install(&path, &t, false).unwrap();
    conn.execute(
        "INSERT INTO capture_wide (id, c149, c0) VALUES ('w', 1.5, x'01')",
        [],
    )
    .unwrap();
    let mut store = Store::open(&path, t, None).unwrap();
    store.assign(1000).unwrap();
    let batches = store.pending(1000).unwrap();
    let Op::Upsert(row) = &batches[0].entries[0].change else {
        panic!()
    };
    assert_eq!(row.len(), 151);
    assert_eq!(row["c149"], Value::F64(1.5));
    assert_eq!(row["c0"], Value::Bytes(vec![1]));
    assert_eq!(row["c77"], Value::Null);
}

#[test]
fn batches_split_at_the_server_limit_and_deletes_count() {
    let (_dir, path, conn) = setup();
    install(&path, &tables(), false).unwrap();
    conn.execute_batch("BEGIN").unwrap();
    for i in 0..2500 {
        conn.execute(
            "INSERT INTO capture_items (id, i) VALUES (?1, ?2)",
            rusqlite::params![format!("k{i}"), i],
        )
        .unwrap();
    }
    conn.execute_batch("COMMIT").unwrap();
    let mut store = Store::open(&path, tables(), None).unwrap();
    assert_eq!(store.assign(10_000).unwrap(), 2500);
    let batches = store.pending(10_000).unwrap();
    let sizes: Vec<usize> = batches.iter().map(|b| b.entries.len()).collect();
    assert_eq!(sizes, [1000, 1000, 500]);
    // Assigned batches are stable: read again, they are the same.
    assert_eq!(store.pending(10_000).unwrap(), batches);
    store.delete(&batches[0], &[]).unwrap();
    assert_eq!(store.counts().unwrap(), (1500, 1000));
    // A later write goes to a new batch; the old ones keep their ids.
    conn.execute("INSERT INTO capture_items (id) VALUES ('late')", [])
        .unwrap();
    store.assign(10_000).unwrap();
    let again = store.pending(10_000).unwrap();
    assert_eq!(again[0], batches[1]);
    assert_eq!(again.len(), 3);
}

/// Waits (up to 10 s) until the store's watcher has recorded a commit boundary at `id`.
fn wait_for_boundary(store: &Store, id: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !store.boundaries.up_to(id).contains(&id) {
        assert!(
            std::time::Instant::now() < deadline,
            "the watcher recorded no boundary at {id}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Commits each transaction (its keys), waiting for the store's watcher to see each commit
/// (its last outbox id).
fn commit_each(conn: &Connection, store: &Store, transactions: &[(i64, &[&str])]) {
    for (id, keys) in transactions {
        conn.execute_batch("BEGIN").unwrap();
        for key in *keys {
            conn.execute("INSERT INTO capture_items (id) VALUES (?1)", [key])
                .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        wait_for_boundary(store, *id);
    }
}

#[test]
fn batches_follow_the_commits_the_watcher_saw() {
    let (_dir, path, conn) = setup();
    install(&path, &tables(), false).unwrap();
    let wake = Arc::new(Notify::new());
    let mut store = Store::open(&path, tables(), Some(wake)).unwrap();
    // Three one-row transactions, then one of two rows.
    commit_each(
        &conn,
        &store,
        &[(1, &["a"]), (2, &["b"]), (3, &["c"]), (5, &["d", "e"])],
    );
    assert_eq!(store.assign(10_000).unwrap(), 5);
    let sizes: Vec<usize> = store
        .pending(10_000)
        .unwrap()
        .iter()
        .map(|b| b.entries.len())
        .collect();
    assert_eq!(sizes, [1, 1, 1, 2]);

    // More commits than are published one by one are merged, never cutting a transaction.
    commit_each(
        &conn,
        &store,
        &[
            (6, &["f"]),
            (8, &["g", "h"]),
            (9, &["i"]),
            (10, &["j"]),
            (11, &["k"]),
        ],
    );
    assert_eq!(store.assign(10_000).unwrap(), 6);
    let batches = store.pending(10_000).unwrap();
    let last: Vec<i64> = batches[4..]
        .iter()
        .flat_map(|b| b.entries.iter().map(|e| e.id))
        .collect();
    assert_eq!(batches.len(), 5, "{batches:?}");
    assert_eq!(last, (6..=11).collect::<Vec<i64>>());
}

#[test]
fn remove_drops_triggers_and_keeps_the_outbox() {
    let (_dir, path, conn) = setup();
    install(&path, &tables(), false).unwrap();
    conn.execute("INSERT INTO capture_items (id) VALUES ('a')", [])
        .unwrap();
    let report = remove(&path).unwrap();
    assert_eq!(report.tables.len(), 1);
    assert_eq!(report.backlog, 1);
    conn.execute("INSERT INTO capture_items (id) VALUES ('b')", [])
        .unwrap();
    assert_eq!(outbox_rows(&conn), 1);
    assert_eq!(counts(&path).unwrap(), (1, 0));
}

#[test]
fn backfill_queues_the_rows_already_there() {
    let (_dir, path, conn) = setup();
    conn.execute_batch(
        "INSERT INTO capture_items (id, i, b) VALUES ('old1', 1, x'0a'); \
         INSERT INTO capture_items (id, r) VALUES ('old2', 2.5);",
    )
    .unwrap();
    let report = install(&path, &tables(), true).unwrap();
    assert!(
        report.tables[0].action.contains("2 existing row(s) queued"),
        "{report:?}"
    );
    let batches = pending(&path);
    let keys: Vec<&str> = batches[0].entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["old1", "old2"]);
    let Op::Upsert(row) = &batches[0].entries[0].change else {
        panic!()
    };
    assert_eq!(row["b"], Value::Bytes(vec![10]));
    assert_eq!(row["i"], Value::I64(1));
}

fn pending_entry(conn: &Connection, key: &str) -> Option<(i64, Option<i64>)> {
    conn.query_row(
        "SELECT outbox_id, seq FROM jetsync_capture_pending WHERE tbl = 'capture_items' AND key = ?1",
        [key],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .unwrap()
}

fn item_i(conn: &Connection, key: &str) -> Option<i64> {
    conn.query_row("SELECT i FROM capture_items WHERE id = ?1", [key], |r| {
        r.get(0)
    })
    .optional()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn older_echo_never_overwrites_a_newer_local_write() {
    let (_dir, path, conn) = setup();
    install(&path, &tables(), false).unwrap();
    // Two local writes of one row; the first is published (seq 10), the second not yet.
    conn.execute("INSERT INTO capture_items (id, i) VALUES ('k', 1)", [])
        .unwrap();
    let mut store = Store::open(&path, tables(), None).unwrap();
    store.assign(10_000).unwrap();
    let first = store.pending(10_000).unwrap();
    conn.execute("UPDATE capture_items SET i = 2 WHERE id = 'k'", [])
        .unwrap();
    let latest = pending_entry(&conn, "k").unwrap();
    assert_eq!(latest.1, None, "a new local change is not published yet");
    store
        .delete(
            &first[0],
            &[Ack {
                id: first[0].entries[0].id,
                seq: Some(10),
            }],
        )
        .unwrap();
    // The ack of the older change does not settle the newer one.
    assert_eq!(pending_entry(&conn, "k"), Some(latest));

    let mut sink = sink(&path);
    let row = Row::new();
    let echo = |seq, i| {
        let mut row = row.clone();
        row.insert("i".into(), Value::I64(i));
        Change {
            seq,
            table: "capture_items".into(),
            key: "k".into(),
            op: Op::Upsert(row),
        }
    };
    // The echo of the first write (and a remote write ordered before our pending one) are
    // skipped: the row keeps the newer local value.
    sink.apply("G", &[echo(10, 1), echo(11, 5)], 11)
        .await
        .unwrap();
    assert_eq!(item_i(&conn, "k"), Some(2));
    // The second write is acknowledged at 12: its echo and what follows apply, and the entry
    // is settled.
    store.assign(10_000).unwrap();
    let second = store.pending(10_000).unwrap();
    store
        .delete(
            &second[0],
            &[Ack {
                id: second[0].entries[0].id,
                seq: Some(12),
            }],
        )
        .unwrap();
    assert_eq!(pending_entry(&conn, "k").unwrap().1, Some(12));
    sink.apply("G", &[echo(12, 2), echo(13, 7)], 13)
        .await
        .unwrap();
    assert_eq!(item_i(&conn, "k"), Some(7));
    assert_eq!(pending_entry(&conn, "k"), None);
    // Rows without a pending entry apply as before.
    sink.apply("G", &[echo(14, 8)], 14).await.unwrap();
    assert_eq!(item_i(&conn, "k"), Some(8));
    assert_eq!(
        outbox_rows(&conn),
        0,
        "the applier's writes are not captured"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_waits_while_the_rows_local_change_is_in_flight() {
    let (_dir, path, conn) = setup();
    install(&path, &tables(), false).unwrap();
    conn.execute("INSERT INTO capture_items (id, i) VALUES ('k', 1)", [])
        .unwrap();
    let mut store = Store::open(&path, tables(), None).unwrap();
    store.assign(10_000).unwrap();
    let batches = store.pending(10_000).unwrap();
    let id = batches[0].entries[0].id;
    store.mark_in_flight(&[id]).unwrap();
    let mut sink = sink(&path);
    let mut row = Row::new();
    row.insert("i".into(), Value::I64(9));
    let remote = Change {
        seq: 5,
        table: "capture_items".into(),
        key: "k".into(),
        op: Op::Upsert(row),
    };
    // Stored before or after ours? Unknown until the relay records the sequence: retried.
    let err = sink
        .apply("G", std::slice::from_ref(&remote), 5)
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(item_i(&conn, "k"), Some(1));
    // Ours was stored at 4: the remote change at 5 is after it and applies.
    store
        .delete(&batches[0], &[Ack { id, seq: Some(4) }])
        .unwrap();
    sink.apply("G", &[remote], 5).await.unwrap();
    assert_eq!(item_i(&conn, "k"), Some(9));
    assert_eq!(pending_entry(&conn, "k"), None);
}
