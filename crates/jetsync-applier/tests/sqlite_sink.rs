//! The SQLite sink against a model: whatever the batch split, the tables end as "the last event of
//! every key wins" (an upsert replaces the whole row, a delete removes it), and the digest does not
//! depend on the split.

use std::collections::BTreeMap;

use jetsync::{Row, Value};
use jetsync_applier::{Change, Sink, SqliteOptions, SqliteSink};
use proptest::prelude::*;

const GROUP: &str = "MODEL";
/// `texts` rows never carry their key column (the sink fills in the subject key as TEXT);
/// `nums` rows carry `id` as an integer (INTEGER PRIMARY KEY, deleted by the text key).
const TABLES: [&str; 2] = ["texts", "nums"];
const TEXT_KEYS: [&str; 5] = ["k0", "k1", "x'y", "a \"b\"", "12"];

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
        cells: Vec<(&'static str, Cell)>,
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

/// Every column keeps one value kind, so SQLite's column affinity never converts a value and the
/// stored row reads back exactly as published.
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
        .prop_map(|(x, y, z, b)| vec![("x", x), ("y", y), ("z", z), ("weird \"col\"", b)]);
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
            let mut row: Row = cells
                .iter()
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

/// A row without its NULL columns: a column an upsert did not carry reads back as NULL.
fn non_null(row: &Row) -> Row {
    row.iter()
        .filter(|(_, v)| **v != Value::Null)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The model: table → key → the row of the last upsert, as the sink should store it.
fn model(changes: &[Change]) -> BTreeMap<&'static str, BTreeMap<String, Row>> {
    let mut tables: BTreeMap<&'static str, BTreeMap<String, Row>> =
        TABLES.iter().map(|t| (*t, BTreeMap::new())).collect();
    for change in changes {
        let table = tables.get_mut(change.table.as_str()).expect("known table");
        match &change.op {
            jetsync::Change::Upsert(row) => {
                let mut row = non_null(row);
                row.entry("id".to_owned())
                    .or_insert_with(|| Value::Text(change.key.clone()));
                table.insert(change.key.clone(), row);
            }
            jetsync::Change::Delete => {
                table.remove(&change.key);
            }
        }
    }
    tables
}

fn actual(sink: &SqliteSink) -> BTreeMap<&'static str, BTreeMap<String, Row>> {
    TABLES
        .iter()
        .map(|table| {
            let rows = sink
                .read_table(table)
                .expect("read table")
                .iter()
                .map(|row| {
                    let key = match row.get("id") {
                        Some(Value::I64(i)) => i.to_string(),
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

fn run<F: std::future::Future>(future: F) -> F::Output {
    futures::executor::block_on(future)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn batches_end_like_last_event_per_key_wins(
        ops in proptest::collection::vec(op(), 1..60),
        splits in proptest::collection::vec(1usize..12, 1..8),
    ) {
        let changes: Vec<Change> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| to_change(i as u64 + 1, op))
            .collect();
        let dir = tempfile::tempdir().unwrap();

        let mut split = SqliteSink::open(SqliteOptions::new(dir.path().join("split.sqlite")))
            .unwrap();
        let mut rest = changes.as_slice();
        for size in splits.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (batch, tail) = rest.split_at((*size).min(rest.len()));
            let last = batch.last().unwrap().seq;
            run(split.apply(GROUP, batch, last)).unwrap();
            rest = tail;
        }
        prop_assert_eq!(actual(&split), model(&changes));
        prop_assert_eq!(run(split.fence(GROUP)).unwrap(), Some(changes.len() as u64));

        let mut whole = SqliteSink::open(SqliteOptions::new(dir.path().join("whole.sqlite")))
            .unwrap();
        run(whole.apply(GROUP, &changes, changes.len() as u64)).unwrap();
        prop_assert_eq!(run(whole.digest()).unwrap(), run(split.digest()).unwrap());
        prop_assert_eq!(
            run(whole.is_empty()).unwrap(),
            model(&changes).values().all(BTreeMap::is_empty)
        );

        // Replaying the whole history over the final state changes nothing (what a restart
        // without a fence would do).
        run(split.apply(GROUP, &changes, changes.len() as u64)).unwrap();
        prop_assert_eq!(actual(&split), model(&changes));
    }
}
