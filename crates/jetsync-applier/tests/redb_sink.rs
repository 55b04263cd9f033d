//! The redb replica sink survives `kill -9` at any point with exactly-once effects: after every
//! kill, the fence, the rows and the audit counts describe the same prefix of the stream.
//!
//! This file has its own `main` (`harness = false`): run normally it is the parent test; run
//! with `JETSYNC_REDB_CRASH_CHILD` set, the same binary is the child, which applies batches
//! of a deterministic event stream in a loop until the parent kills it with SIGKILL. The parent
//! then reopens the file and checks that the rows equal a replay of events `1..=fence`, that every
//! one of those sequences was applied exactly once, and that nothing past the fence was; the next
//! child resumes after the fence, as the engine would.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use jetsync::{Row, Value};
use jetsync_applier::{read_audit, Change, RedbOptions, RedbSink, Sink};

const GROUP: &str = "crash";
const TABLES: [&str; 2] = ["alpha", "beta"];
/// Environment variable that turns this binary into the child's writer loop.
const CHILD_ENV: &str = "JETSYNC_REDB_CRASH_CHILD";
/// Environment variable that turns this binary into the child that catches up, goes idle and
/// waits to be killed.
const IDLE_CHILD_ENV: &str = "JETSYNC_REDB_IDLE_CHILD";
/// What the child prints once it has committed its first batch.
const READY: &str = "jetsync-redb-crash-child-ready";

/// Event `seq` of the deterministic stream: every seventh is a delete.
fn event(seq: u64) -> Change {
    let table = TABLES[(seq % 2) as usize];
    let key = format!("k{}", seq % 23);
    let op = if seq.is_multiple_of(7) {
        jetsync::Change::Delete
    } else {
        let mut row = Row::new();
        row.insert("seq".into(), Value::I64(seq as i64));
        row.insert("pad".into(), Value::from("x".repeat((seq % 50) as usize)));
        jetsync::Change::Upsert(row)
    };
    Change {
        seq,
        table: table.into(),
        key,
        op,
    }
}

/// The state after applying events `1..=fence`, per table in key order.
fn model(fence: u64) -> BTreeMap<String, BTreeMap<String, Row>> {
    let mut tables: BTreeMap<String, BTreeMap<String, Row>> = BTreeMap::new();
    for seq in 1..=fence {
        let change = event(seq);
        let rows = tables.entry(change.table).or_default();
        match change.op {
            jetsync::Change::Upsert(row) => {
                rows.insert(change.key, row);
            }
            jetsync::Change::Delete => {
                rows.remove(&change.key);
            }
        }
    }
    tables
}

fn options(path: &Path) -> RedbOptions {
    RedbOptions {
        path: path.to_owned(),
        audit: true,
    }
}

fn main() {
    if let Some(path) = std::env::var_os(IDLE_CHILD_ENV) {
        return idle_child(PathBuf::from(path));
    }
    match std::env::var_os(CHILD_ENV) {
        Some(path) => crash_child(PathBuf::from(path)),
        None => {
            survives_kill_9();
            idle_after_a_catch_up_is_durable();
            // The plain closing line test-output readers understand (a failure panics above).
            println!("test result: ok. 2 passed; 0 failed");
        }
    }
}

/// The writer loop of the child process started by `survives_kill_9`; runs until killed.
fn crash_child(path: PathBuf) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut sink = RedbSink::open(options(&path)).unwrap();
        let mut next = sink.fence(GROUP).await.unwrap().unwrap_or(0) + 1;
        // Batch sizes vary (1..=97) so kills land in transactions of many shapes.
        let mut announced = false;
        loop {
            let size = 1 + (next * 31) % 97;
            let batch: Vec<Change> = (next..next + size).map(event).collect();
            let last = next + size - 1;
            sink.apply(GROUP, &batch, last).await.unwrap();
            next = last + 1;
            if !announced {
                // Tells the parent that this run has committed, so every kill lands mid-loop.
                println!("{READY}");
                std::io::stdout().flush().unwrap();
                announced = true;
            }
        }
    });
}

fn survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.redb");
    let exe = std::env::current_exe().unwrap();
    let mut last_fence = 0;
    // Every round needs at least one commit more, so the kills cannot all miss the loop.
    for round in 0..10u64 {
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let ready = stdout
            .lines()
            .map_while(Result::ok)
            .any(|line| line.trim() == READY);
        assert!(
            ready,
            "round {round}: the child exited before its first commit"
        );
        // Kill at a different point of the loop every round.
        std::thread::sleep(Duration::from_millis(round * 9));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        // The audit is read first, opening (and if need be repairing) the file on its own.
        let audit = read_audit(&path).unwrap();
        let sink = RedbSink::open(options(&path)).unwrap();
        let replica = sink.replica();
        let fence = replica.applied_seq();
        eprintln!("round {round}: killed at fence {fence}");
        assert!(
            fence > last_fence,
            "round {round}: the fence did not move past {last_fence} although the child committed"
        );

        // Exactly once: sequences 1..=fence, each applied once, and nothing beyond the fence.
        let expected: BTreeMap<u64, u64> = (1..=fence).map(|seq| (seq, 1)).collect();
        assert_eq!(
            audit, expected,
            "round {round}: audit does not match fence {fence}"
        );

        // The rows are exactly a replay of 1..=fence.
        let want = model(fence);
        for table in TABLES {
            let got: BTreeMap<String, Row> = replica.scan(table).unwrap().into_iter().collect();
            let empty = BTreeMap::new();
            assert_eq!(
                &got,
                want.get(table).unwrap_or(&empty),
                "round {round}: rows of {table} do not match fence {fence}"
            );
        }
        drop(replica);
        drop(sink);
        last_fence = fence;
    }
}

/// The child of `idle_after_a_catch_up_is_durable`: catches up in batches of more than
/// `DURABLE_UP_TO` changes (all but the first commit deferred), goes idle (`Sink::idle`, as the
/// engine does when it has no event in hand), prints its fence, and waits to be killed.
fn idle_child(path: PathBuf) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut sink = RedbSink::open(options(&path)).unwrap();
        let mut next = 1;
        for _ in 0..5 {
            let batch: Vec<Change> = (next..next + 400).map(event).collect();
            sink.apply(GROUP, &batch, next + 399).await.unwrap();
            next += 400;
        }
        let deferred = !sink.is_durable();
        sink.idle().await.unwrap();
        assert!(sink.is_durable());
        println!("idle {} deferred={deferred}", next - 1);
        std::io::stdout().flush().unwrap();
        std::future::pending::<()>().await;
    });
}

/// #12.5: the last catch-up batch is made durable when the applier goes idle, so a SIGKILL
/// right after loses nothing: the reopened file holds the whole catch-up.
fn idle_after_a_catch_up_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idle.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(IDLE_CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let line = stdout
        .lines()
        .map_while(Result::ok)
        .find(|line| line.starts_with("idle "))
        .expect("the idle child exited before going idle");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    eprintln!("idle child: {line}");
    let fence: u64 = line.split(' ').nth(1).unwrap().parse().unwrap();
    assert_eq!(fence, 2000);
    let audit = read_audit(&path).unwrap();
    assert_eq!(
        audit.len(),
        2000,
        "every change of the catch-up survived the kill"
    );
    let sink = RedbSink::open(options(&path)).unwrap();
    assert_eq!(sink.replica().applied_seq(), 2000);
    let want = model(2000);
    let replica = sink.replica();
    for table in TABLES {
        let got: BTreeMap<String, Row> = replica.scan(table).unwrap().into_iter().collect();
        assert_eq!(&got, want.get(table).unwrap_or(&BTreeMap::new()));
    }
}
