//! The SQLite sink against a model: whatever the batch split, and whichever path an instance
//! took (replaying every event, bootstrapping from the latest event of every row, or resyncing
//! over old contents with a streamed replace), the tables end as "the last event of every key
//! wins" (an upsert replaces the whole row, a delete removes it), values keep the kind they had
//! in the event whatever kinds a column saw before, and the digests are equal.

use std::collections::BTreeMap;

use jetsync::{Row, Value};
use jetsync_applier::{Change, Sink, SqliteOptions, SqliteSink};
use proptest::prelude::*;

const GROUP: &str = "MODEL";
/// `texts` rows never carry their key column (the sink fills in the subject key);
/// `nums` rows carry `id` as an integer (stored, like every key, as the subject key's text).
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

/// Any value kind, in any column: the stored kind must not depend on earlier events.
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        (-3i64..3).prop_map(Value::I64),
        any::<i64>().prop_map(Value::I64),
        prop_oneof![
            Just(5.0),
            Just(-0.5),
            any::<f64>().prop_filter("finite", |f| f.is_finite())
        ]
        .prop_map(Value::F64),
        "[a-z0-9 '\"]{0,8}".prop_map(Value::Text),
        Just(Value::Text("5".into())),
        proptest::collection::vec(any::<u8>(), 0..6).prop_map(Value::Bytes),
        (any::<i32>(), "[a-z]{0,3}")
            .prop_map(|(n, s)| Value::Json(serde_json::json!({ "s": s, "n": n }))),
    ]
}

fn cell() -> impl Strategy<Value = Cell> {
    prop_oneof![
        2 => Just(Cell::Absent),
        1 => Just(Cell::Null),
        4 => value().prop_map(Cell::Set),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let cells = proptest::collection::vec(cell(), COLUMNS.len());
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
            if TABLES[*table] == "nums" {
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

/// A value as the sink stores it: booleans as 0/1, JSON as its canonical text.
fn stored(value: &Value) -> Value {
    match value {
        Value::Bool(b) => Value::I64(i64::from(*b)),
        Value::Json(j) => Value::Text(j.to_string()),
        other => other.clone(),
    }
}

/// A row without its NULL columns: a column an upsert did not carry reads back as NULL.
fn non_null(row: &Row) -> Row {
    row.iter()
        .filter(|(_, v)| **v != Value::Null)
        .map(|(k, v)| (k.clone(), stored(v)))
        .collect()
}

type Tables = BTreeMap<&'static str, BTreeMap<String, Row>>;

/// The model: table → key → the row of the last upsert, as the sink should store it.
fn model(changes: &[Change]) -> Tables {
    let mut tables: Tables = TABLES.iter().map(|t| (*t, BTreeMap::new())).collect();
    for change in changes {
        let table = tables.get_mut(change.table.as_str()).expect("known table");
        match &change.op {
            jetsync::Change::Upsert(row) => {
                let mut row = non_null(row);
                // The key column always holds the subject key as text.
                row.insert("id".to_owned(), Value::Text(change.key.clone()));
                table.insert(change.key.clone(), row);
            }
            jetsync::Change::Delete => {
                table.remove(&change.key);
            }
        }
    }
    tables
}

fn actual(sink: &SqliteSink) -> Tables {
    TABLES
        .iter()
        .map(|table| {
            let rows = sink
                .read_table(table)
                .expect("read table")
                .iter()
                .map(|row| {
                    let key = match row.get("id") {
                        Some(Value::Text(s)) => s.clone(),
                        other => panic!("unexpected key {other:?}"),
                    };
                    (key, non_null(row))
                })
                .collect();
            (*table, rows)
        })
        .collect()
}

/// What a snapshot delivers: the latest event of every row, in stream order.
fn latest_per_row(changes: &[Change]) -> Vec<Change> {
    let mut latest: BTreeMap<(String, String), &Change> = BTreeMap::new();
    for change in changes {
        latest.insert((change.table.clone(), change.key.clone()), change);
    }
    let mut out: Vec<Change> = latest.into_values().cloned().collect();
    out.sort_by_key(|c| c.seq);
    out
}

fn run<F: std::future::Future>(future: F) -> F::Output {
    futures::executor::block_on(future)
}

/// A sink that syncs exactly the model's tables (as the binary configures it).
fn open(dir: &tempfile::TempDir, name: &str) -> SqliteSink {
    let mut options = SqliteOptions::new(dir.path().join(name));
    options.any_table = false;
    for table in TABLES {
        options
            .key_columns
            .insert(table.to_owned(), "id".to_owned());
    }
    SqliteSink::open(options).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_path_ends_like_last_event_per_key_wins(
        ops in proptest::collection::vec(op(), 1..60),
        splits in proptest::collection::vec(1usize..12, 1..8),
        old in proptest::collection::vec(op(), 0..10),
    ) {
        let changes: Vec<Change> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| to_change(i as u64 + 1, op))
            .collect();
        let last = changes.len() as u64;
        let dir = tempfile::tempdir().unwrap();

        // Replay in batches of any split.
        let mut split = open(&dir, "split.sqlite");
        let mut rest = changes.as_slice();
        for size in splits.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (batch, tail) = rest.split_at((*size).min(rest.len()));
            run(split.apply(GROUP, batch, batch.last().unwrap().seq)).unwrap();
            rest = tail;
        }
        prop_assert_eq!(actual(&split), model(&changes));
        prop_assert_eq!(run(split.fence(GROUP)).unwrap(), Some(last));

        // One batch.
        let mut whole = open(&dir, "whole.sqlite");
        run(whole.apply(GROUP, &changes, last)).unwrap();
        let digest = run(split.digest()).unwrap();
        prop_assert_eq!(&run(whole.digest()).unwrap(), &digest);
        prop_assert_eq!(
            run(whole.is_empty()).unwrap(),
            model(&changes).values().all(BTreeMap::is_empty)
        );

        // Bootstrap: only the latest event of every row.
        let snapshot = latest_per_row(&changes);
        let mut bootstrapped = open(&dir, "boot.sqlite");
        run(bootstrapped.apply(GROUP, &snapshot, last)).unwrap();
        prop_assert_eq!(actual(&bootstrapped), model(&changes));
        prop_assert_eq!(&run(bootstrapped.digest()).unwrap(), &digest);

        // Resync over other contents, streamed in chunks of 3, with a service table beside.
        let mut resynced = open(&dir, "resync.sqlite");
        let old: Vec<Change> = old.iter().enumerate().map(|(i, op)| to_change(i as u64 + 1, op)).collect();
        run(resynced.apply(GROUP, &old, old.len() as u64)).unwrap();
        rusqlite::Connection::open(dir.path().join("resync.sqlite"))
            .unwrap()
            .execute_batch("CREATE TABLE svc (k TEXT PRIMARY KEY); INSERT INTO svc VALUES ('s')")
            .unwrap();
        run(resynced.replace_begin(GROUP)).unwrap();
        for chunk in snapshot.chunks(3) {
            run(resynced.replace_chunk(GROUP, chunk)).unwrap();
        }
        run(resynced.replace_commit(GROUP, last)).unwrap();
        prop_assert_eq!(actual(&resynced), model(&changes));
        prop_assert_eq!(&run(resynced.digest()).unwrap(), &digest);
        prop_assert_eq!(resynced.read_table("svc").unwrap().len(), 1);

        // Replaying the whole history over the final state changes nothing (what a restart
        // without a fence would do).
        run(split.apply(GROUP, &changes, last)).unwrap();
        prop_assert_eq!(actual(&split), model(&changes));
    }
}
