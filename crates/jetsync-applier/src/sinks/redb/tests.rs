//! Unit tests of the redb replica sink.

use std::collections::BTreeMap;

use jetsync::Value;
use proptest::prelude::*;

use super::*;

const GROUP: &str = "main";

fn row(pairs: &[(&str, Value)]) -> Row {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn upsert(seq: u64, table: &str, key: &str, row: Row) -> Change {
    Change {
        seq,
        table: table.to_owned(),
        key: key.to_owned(),
        op: jetsync::Change::Upsert(row),
    }
}

fn delete(seq: u64, table: &str, key: &str) -> Change {
    Change {
        seq,
        table: table.to_owned(),
        key: key.to_owned(),
        op: jetsync::Change::Delete,
    }
}

fn product(name: &str, price: f64) -> Row {
    row(&[
        ("name", Value::from(name)),
        ("price", Value::F64(price)),
        ("tags", Value::Json(serde_json::json!(["a", {"b": 1}]))),
        ("blob", Value::Bytes(vec![0, 1, 255])),
        ("gone", Value::Null),
    ])
}

fn open(dir: &tempfile::TempDir, audit: bool) -> RedbSink {
    RedbSink::open(RedbOptions {
        path: dir.path().join("nested/dir/instance.redb"),
        audit,
    })
    .expect("open")
}

#[tokio::test]
async fn upsert_get_delete_scan() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(&dir, false);
    let replica = sink.replica();
    assert!(sink.is_empty().await.unwrap());
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(0));
    assert_eq!(replica.get("products", "A-1").unwrap(), None);
    assert_eq!(replica.scan("products").unwrap(), vec![]);

    let batch = [
        upsert(1, "products", "B-2", product("Table", 99.0)),
        upsert(2, "products", "A-1", product("Chair", 12.5)),
        upsert(3, "orders", "1", row(&[("qty", Value::I64(3))])),
        upsert(
            4,
            "products",
            "",
            row(&[("name", Value::from("empty key"))]),
        ),
        upsert(5, "productsX", "A-0", row(&[])),
        upsert(6, "products", "A-1", product("Armchair", 15.0)),
    ];
    sink.apply(GROUP, &batch, 6).await.unwrap();
    assert!(!sink.is_empty().await.unwrap());
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(6));
    assert_eq!(replica.applied_seq(), 6);
    assert_eq!(
        replica.get("products", "A-1").unwrap(),
        Some(product("Armchair", 15.0))
    );
    let keys: Vec<String> = replica
        .scan("products")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["", "A-1", "B-2"]);
    assert_eq!(replica.scan("orders").unwrap().len(), 1);
    assert_eq!(replica.scan("order").unwrap(), vec![]);

    // Deletes remove the key; deleting an absent row is a no-op.
    let batch = [
        delete(7, "products", "A-1"),
        delete(8, "products", "nope"),
        delete(9, "orders", "1"),
    ];
    sink.apply(GROUP, &batch, 10).await.unwrap();
    assert_eq!(replica.get("products", "A-1").unwrap(), None);
    assert_eq!(replica.scan("orders").unwrap(), vec![]);
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(10));
    assert_eq!(replica.applied_seq(), 10);

    // A batch of only skipped events still moves the fence.
    sink.apply(GROUP, &[], 12).await.unwrap();
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(12));
    assert_eq!(sink.fence("other").await.unwrap(), Some(0));
}

#[tokio::test]
async fn get_as_deserializes_rows() {
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Item {
        name: String,
        qty: i64,
    }
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(&dir, false);
    let r = row(&[("name", Value::from("x")), ("qty", Value::I64(2))]);
    sink.apply(GROUP, &[upsert(1, "items", "k", r)], 1)
        .await
        .unwrap();
    let replica = sink.replica();
    let item: Option<Item> = replica.get_as("items", "k").unwrap();
    assert_eq!(
        item,
        Some(Item {
            name: "x".into(),
            qty: 2
        })
    );
    assert!(replica.get_as::<Item>("items", "absent").unwrap().is_none());
    let err = replica.get_as::<u64>("items", "k").unwrap_err();
    assert!(matches!(err, ReplicaError::Deserialize { .. }), "{err}");
}

#[tokio::test]
async fn fence_and_rows_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = {
        let mut sink = open(&dir, false);
        sink.apply(GROUP, &[upsert(41, "t", "k", row(&[]))], 42)
            .await
            .unwrap();
        sink.set_fence("second", 7).await.unwrap();
        sink.path().to_owned()
    };
    let mut sink = open(&dir, false);
    assert_eq!(sink.path(), path);
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(42));
    assert_eq!(sink.fence("second").await.unwrap(), Some(7));
    assert_eq!(sink.replica().applied_seq(), 42);
    assert_eq!(sink.replica().get("t", "k").unwrap(), Some(row(&[])));

    // set_fence moves the fence either way without touching rows.
    sink.set_fence(GROUP, 40).await.unwrap();
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(40));
    assert_eq!(sink.replica().applied_seq(), 40);
    assert!(!sink.is_empty().await.unwrap());
}

#[tokio::test]
async fn audit_counts_every_applied_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = {
        let mut sink = open(&dir, true);
        let batch = [
            upsert(1, "t", "a", row(&[])),
            upsert(2, "t", "b", row(&[])),
            delete(3, "t", "a"),
        ];
        sink.apply(GROUP, &batch, 3).await.unwrap();
        sink.apply(GROUP, &[upsert(4, "t", "c", row(&[]))], 5)
            .await
            .unwrap();
        let expected: BTreeMap<u64, u64> = [(1, 1), (2, 1), (3, 1), (4, 1)].into();
        assert_eq!(sink.audit_counts().unwrap(), expected);
        // A replayed change (what a broken fence would cause) shows up as a count of 2.
        sink.apply(GROUP, &[upsert(4, "t", "c", row(&[]))], 5)
            .await
            .unwrap();
        assert_eq!(sink.audit_counts().unwrap()[&4], 2);
        // While the sink holds the file, read_audit cannot open it.
        let err = read_audit(sink.path()).unwrap_err();
        assert!(err.to_string().contains("another applier"), "{err}");
        sink.path().to_owned()
    };
    let counts = read_audit(&path).unwrap();
    assert_eq!(counts, [(1, 1), (2, 1), (3, 1), (4, 2)].into());

    // Without audit nothing is counted.
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(&dir, false);
    sink.apply(GROUP, &[upsert(1, "t", "a", row(&[]))], 1)
        .await
        .unwrap();
    assert!(sink.audit_counts().unwrap().is_empty());
    let path = sink.path().to_owned();
    drop(sink);
    assert!(read_audit(&path).unwrap().is_empty());
    assert!(read_audit(&dir.path().join("missing.redb")).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_resolves_after_apply_from_another_task() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(&dir, false);
    sink.apply(GROUP, &[upsert(1, "t", "a", row(&[]))], 1)
        .await
        .unwrap();
    let replica = sink.replica();
    // Already applied: resolves at once.
    replica.wait_for(1, Duration::ZERO).await.unwrap();

    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let v = row(&[("v", Value::I64(5))]);
        sink.apply(GROUP, &[upsert(5, "t", "b", v)], 5)
            .await
            .unwrap();
        sink
    });
    let r = replica.clone();
    r.wait_for(5, Duration::from_secs(10)).await.unwrap();
    // Read-your-writes: once the wait resolved, the row is there.
    assert_eq!(r.get("t", "b").unwrap(), Some(row(&[("v", Value::I64(5))])));

    let sink = writer.await.unwrap();
    let err = replica
        .wait_for(6, Duration::from_millis(30))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ReplicaError::Timeout { seq: 6, applied: 5 }),
        "{err}"
    );

    // The applier stopping ends waits instead of letting them run into the timeout.
    drop(sink);
    let err = replica
        .wait_for(6, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ReplicaError::Closed { seq: 6, applied: 5 }),
        "{err}"
    );
}

#[tokio::test]
async fn wait_for_on_current_thread_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(&dir, false);
    let replica = sink.replica();
    let waiter = tokio::spawn(async move { replica.wait_for(3, Duration::from_secs(10)).await });
    tokio::task::yield_now().await;
    sink.apply(GROUP, &[upsert(3, "t", "a", row(&[]))], 3)
        .await
        .unwrap();
    waiter.await.unwrap().unwrap();
}

#[tokio::test]
async fn digest_is_independent_of_batch_splits() {
    let changes: Vec<Change> = (1..=60u64)
        .map(|seq| {
            let table = ["a", "b", "c"][(seq % 3) as usize];
            let key = format!("k{}", seq % 7);
            if seq.is_multiple_of(5) {
                delete(seq, table, &key)
            } else {
                upsert(seq, table, &key, row(&[("v", Value::I64(seq as i64))]))
            }
        })
        .collect();
    let dir1 = tempfile::tempdir().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let mut one = open(&dir1, false);
    let mut two = open(&dir2, false);
    one.apply(GROUP, &changes, 60).await.unwrap();
    for chunk in changes.chunks(7) {
        two.apply(GROUP, chunk, chunk.last().unwrap().seq)
            .await
            .unwrap();
    }
    let d1 = one.digest().await.unwrap();
    let d2 = two.digest().await.unwrap();
    assert_eq!(d1, d2);
    let tables: Vec<&str> = d1.iter().map(|d| d.table.as_str()).collect();
    assert_eq!(tables, ["a", "b", "c"]);
    for d in &d1 {
        assert_eq!(d.rows, one.replica().scan(&d.table).unwrap().len() as u64);
    }

    // A different content gives a different digest.
    two.apply(GROUP, &[upsert(61, "a", "k0", row(&[]))], 61)
        .await
        .unwrap();
    assert_ne!(one.digest().await.unwrap(), two.digest().await.unwrap());
    let dir3 = tempfile::tempdir().unwrap();
    assert!(open(&dir3, false).digest().await.unwrap().is_empty());
}

#[tokio::test]
async fn replace_swaps_the_rows_sets_the_fence_and_audits() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(&dir, true);
    let replica = sink.replica();
    let v = |v: i64| row(&[("v", Value::I64(v))]);
    let before = [
        upsert(1, "a", "k1", v(1)),
        upsert(2, "a", "k2", v(2)),
        upsert(3, "b", "k1", v(3)),
        upsert(4, "c", "k1", v(4)),
    ];
    sink.apply(GROUP, &before, 5).await.unwrap();

    let changes = [
        upsert(2, "a", "k2", v(20)),
        upsert(3, "d", "k", v(3)),
        delete(4, "d", "k"),
        upsert(6, "a", "k9", v(6)),
        delete(7, "c", "absent"),
        upsert(8, "e", "k", v(8)),
        upsert(9, "a", "k9", v(9)),
    ];
    sink.replace(GROUP, &changes, 10).await.unwrap();
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(10));
    assert_eq!(replica.applied_seq(), 10);
    assert_eq!(
        replica.scan("a").unwrap(),
        vec![("k2".to_owned(), v(20)), ("k9".to_owned(), v(9))]
    );
    // Rows absent from the changes are gone, in every table.
    assert_eq!(replica.get("a", "k1").unwrap(), None);
    assert!(replica.scan("b").unwrap().is_empty());
    assert!(replica.scan("c").unwrap().is_empty());
    assert!(replica.scan("d").unwrap().is_empty());
    assert_eq!(replica.scan("e").unwrap().len(), 1);

    // The same state as a fresh sink that applied the same changes.
    let fresh_dir = tempfile::tempdir().unwrap();
    let mut fresh = open(&fresh_dir, false);
    fresh.apply(GROUP, &changes, 10).await.unwrap();
    let digest = sink.digest().await.unwrap();
    assert_eq!(digest, fresh.digest().await.unwrap());
    assert_eq!(
        digest.iter().map(|d| d.table.as_str()).collect::<Vec<_>>(),
        ["a", "e"]
    );

    // The audit counts what the replace applied, like apply does.
    let counts = sink.audit_counts().unwrap();
    let expected: BTreeMap<u64, u64> = [
        (1, 1),
        (2, 2),
        (3, 2),
        (4, 2),
        (6, 1),
        (7, 1),
        (8, 1),
        (9, 1),
    ]
    .into();
    assert_eq!(counts, expected);

    // Survives a reopen; replacing with nothing empties everything and sets the fence.
    drop(replica);
    drop(sink);
    let mut sink = open(&dir, true);
    assert_eq!(sink.digest().await.unwrap(), digest);
    sink.replace(GROUP, &[], 11).await.unwrap();
    assert!(sink.is_empty().await.unwrap());
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(11));
    assert_eq!(sink.replica().applied_seq(), 11);
}

#[tokio::test]
async fn apply_of_lower_sequences_at_the_fence_keeps_the_fence() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(&dir, true);
    let replica = sink.replica();
    sink.apply(GROUP, &[upsert(1, "t", "a", row(&[]))], 10)
        .await
        .unwrap();
    // `parked retry`: events parked earlier (seqs below the fence), applied with the current
    // fence as last_seq.
    let retried = [
        upsert(4, "t", "p", row(&[("v", Value::I64(4))])),
        delete(5, "t", "a"),
    ];
    sink.apply(GROUP, &retried, 10).await.unwrap();
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(10));
    assert_eq!(replica.applied_seq(), 10);
    assert_eq!(replica.get("t", "a").unwrap(), None);
    assert_eq!(
        replica.get("t", "p").unwrap(),
        Some(row(&[("v", Value::I64(4))]))
    );
    assert_eq!(
        sink.audit_counts().unwrap(),
        [(1, 1), (4, 1), (5, 1)].into()
    );
    sink.apply(GROUP, &[upsert(11, "t", "q", row(&[]))], 11)
        .await
        .unwrap();
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(11));
}

/// The rows of `changes`, keys k0..kn of table t, sequences from `first`.
fn many(first: u64, n: usize) -> Vec<Change> {
    (0..n)
        .map(|i| {
            upsert(
                first + i as u64,
                "t",
                &format!("k{i}"),
                row(&[("v", Value::I64(i as i64))]),
            )
        })
        .collect()
}

/// The fence of a copy of the file taken now: what a kill at this moment would leave (the
/// copy reopens at the last durable commit).
fn fence_after_a_crash_now(path: &Path) -> u64 {
    let copy_dir = tempfile::tempdir().unwrap();
    let copy = copy_dir.path().join("copy.redb");
    std::fs::copy(path, &copy).unwrap();
    let db = Database::create(&copy).unwrap();
    let txn = db.begin_read().unwrap();
    let offsets = txn.open_table(OFFSETS).unwrap();
    let fence = offsets.get(GROUP).unwrap().map_or(0, |v| v.value());
    fence
}

#[tokio::test]
async fn idle_makes_a_deferred_catch_up_commit_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(&dir, false);
    let path = sink.path().to_owned();
    // The first commit is durable; the next big one within DURABLE_EVERY is deferred.
    sink.apply(GROUP, &many(1, 300), 300).await.unwrap();
    sink.apply(GROUP, &many(301, 300), 600).await.unwrap();
    if !sink.is_durable() {
        assert_eq!(fence_after_a_crash_now(&path), 300);
    }
    sink.idle().await.unwrap();
    assert!(sink.is_durable());
    assert_eq!(fence_after_a_crash_now(&path), 600);
    // Idle with nothing deferred is a no-op.
    sink.idle().await.unwrap();
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(600));
}

#[tokio::test]
async fn streamed_replace_keeps_old_rows_until_commit_and_never_lowers_the_fence() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(&dir, false);
    let replica = sink.replica();
    let v = |v: i64| row(&[("v", Value::I64(v))]);
    sink.apply(GROUP, &[upsert(1, "old", "k", v(1))], 5)
        .await
        .unwrap();
    sink.replace_begin(GROUP).await.unwrap();
    sink.replace_chunk(GROUP, &[upsert(2, "a", "k1", v(2))])
        .await
        .unwrap();
    // Readers still see the old rows while the replacement is open.
    assert_eq!(replica.get("old", "k").unwrap(), Some(v(1)));
    assert_eq!(replica.get("a", "k1").unwrap(), None);
    sink.replace_chunk(
        GROUP,
        &[upsert(3, "a", "k2", v(3)), upsert(4, "a", "k3", v(4))],
    )
    .await
    .unwrap();
    // A commit below the fence keeps the fence (it never decreases).
    sink.replace_commit(GROUP, 4).await.unwrap();
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(5));
    assert_eq!(replica.get("old", "k").unwrap(), None);
    assert_eq!(replica.scan("a").unwrap().len(), 3);
    assert!(sink.is_durable());

    // An abort leaves everything as it was; the sink stays usable.
    sink.replace_begin(GROUP).await.unwrap();
    sink.replace_chunk(GROUP, &[upsert(9, "z", "k", v(9))])
        .await
        .unwrap();
    sink.replace_abort(GROUP).await;
    assert_eq!(replica.scan("a").unwrap().len(), 3);
    assert!(replica.scan("z").unwrap().is_empty());
    sink.apply(GROUP, &[upsert(10, "z", "k", v(10))], 10)
        .await
        .unwrap();
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(10));
    // apply below the fence keeps it; only set_fence (reset --to-seq) rewinds it.
    sink.apply(GROUP, &[upsert(3, "z", "k", v(3))], 3)
        .await
        .unwrap();
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(10));
    sink.set_fence(GROUP, 2).await.unwrap();
    assert_eq!(sink.fence(GROUP).await.unwrap(), Some(2));
}

#[cfg(unix)]
#[test]
fn a_new_replica_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sink = open(&dir, false);
    let mode = std::fs::metadata(sink.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}

#[test]
fn small_commits_are_durable_big_ones_deferred_for_a_while() {
    let just_now = Some(Instant::now());
    // Keeping up: few changes since the last durable commit → durable at once.
    assert!(durable_now(1, just_now));
    assert!(durable_now(DURABLE_UP_TO, just_now));
    // Catching up: many changes, last durable commit recent → deferred.
    assert!(!durable_now(DURABLE_UP_TO + 1, just_now));
    assert!(!durable_now(10_000, just_now));
    // ... but never for longer than DURABLE_EVERY, and never before a first durable commit.
    let long_ago = Instant::now().checked_sub(DURABLE_EVERY * 2);
    assert!(long_ago.is_some());
    assert!(durable_now(10_000, long_ago));
    assert!(durable_now(10_000, None));
}

#[test]
fn second_open_is_a_clear_fatal_error() {
    let dir = tempfile::tempdir().unwrap();
    let sink = open(&dir, false);
    let err = RedbSink::open(RedbOptions::new(sink.path())).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, SinkError::Fatal { .. }), "{message}");
    assert!(!err.is_retryable());
    assert!(message.contains("instance.redb"), "{message}");
    assert!(
        message.contains("is another applier running for this instance?"),
        "{message}"
    );
    // A replica keeps the file open after the sink is gone.
    let replica = sink.replica();
    drop(sink);
    assert!(RedbSink::open(RedbOptions::new(
        dir.path().join("nested/dir/instance.redb")
    ))
    .is_err());
    drop(replica);
    RedbSink::open(RedbOptions::new(
        dir.path().join("nested/dir/instance.redb"),
    ))
    .unwrap();
}

#[test]
fn unusable_path_is_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let err = RedbSink::open(RedbOptions::new(file.join("x.redb"))).unwrap_err();
    assert!(matches!(err, SinkError::Fatal { .. }), "{err}");
    assert!(err.to_string().contains("plain-file"), "{err}");

    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
    let err = RedbSink::open(RedbOptions::new(&garbage)).unwrap_err();
    assert!(matches!(err, SinkError::Fatal { .. }), "{err}");
    assert!(err.to_string().contains("garbage.redb"), "{err}");
}

/// One generated operation: `(table, key, Some(value))` upserts, `None` deletes.
type Op = (u8, u8, Option<i64>);

fn op_strategy() -> impl Strategy<Value = Op> {
    (
        0u8..3,
        0u8..6,
        proptest::option::weighted(0.7, any::<i64>()),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random upserts and deletes, applied in random batch splits, end equal to a model where
    /// the last event per key wins.
    #[test]
    fn matches_btreemap_model(
        ops in proptest::collection::vec(op_strategy(), 0..80),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(&dir, true);
        let replica = sink.replica();

        let changes: Vec<Change> = ops
            .iter()
            .enumerate()
            .map(|(i, (t, k, v))| {
                let seq = i as u64 + 1;
                let table = format!("t{t}");
                let key = format!("k{k}");
                match v {
                    Some(v) => upsert(seq, &table, &key, row(&[("v", Value::I64(*v))])),
                    None => delete(seq, &table, &key),
                }
            })
            .collect();
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(changes.len() + 1)).collect();
        bounds.push(0);
        bounds.push(changes.len());
        bounds.sort_unstable();
        bounds.dedup();

        let mut model: BTreeMap<(String, String), Row> = BTreeMap::new();
        runtime.block_on(async {
            for pair in bounds.windows(2) {
                let batch = &changes[pair[0]..pair[1]];
                sink.apply(GROUP, batch, pair[1] as u64).await.unwrap();
            }
        });
        for change in &changes {
            let id = (change.table.clone(), change.key.clone());
            match &change.op {
                jetsync::Change::Upsert(r) => { model.insert(id, r.clone()); }
                jetsync::Change::Delete => { model.remove(&id); }
            }
        }

        for t in 0..3 {
            let table = format!("t{t}");
            let expected: Vec<(String, Row)> = model
                .iter()
                .filter(|((mt, _), _)| *mt == table)
                .map(|((_, k), r)| (k.clone(), r.clone()))
                .collect();
            prop_assert_eq!(replica.scan(&table).unwrap(), expected);
            for k in 0..6 {
                let key = format!("k{k}");
                prop_assert_eq!(
                    replica.get(&table, &key).unwrap(),
                    model.get(&(table.clone(), key.clone())).cloned()
                );
            }
        }
        let fence = runtime.block_on(sink.fence(GROUP)).unwrap();
        prop_assert_eq!(fence, Some(changes.len() as u64));
        prop_assert_eq!(runtime.block_on(sink.is_empty()).unwrap(), model.is_empty());
        let counts = sink.audit_counts().unwrap();
        prop_assert_eq!(counts.len(), changes.len());
        prop_assert!(counts.values().all(|c| *c == 1));
    }
}
