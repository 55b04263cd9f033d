//! The capture relay against a real nats-server (2.12.1+ for the atomic path; the test prints a
//! loud SKIPPED line on older servers) and a real SQLite file: every captured change is stored
//! exactly once with message id `<instance>-<outbox id>`, one local transaction is one atomic
//! batch, and a relay that publishes the same outbox entries again (as after a kill between
//! publish and delete) stores nothing new.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use jetsync::{Config, TableConfig};
use jetsync_applier::{capture, Stats};
use jetsync_testkit::NatsServer;
use rusqlite::Connection;

const INSTANCE: &str = "relay-t";

fn config(url: &str, dir: &std::path::Path, atomic: bool) -> Config {
    let mut config = Config {
        instance: INSTANCE.into(),
        data_dir: dir.into(),
        ..Config::default()
    };
    config.nats.url = url.into();
    config.stream.name = "CAPR".into();
    config.stream.subject_prefix = "capr".into();
    config.stream.history = 64;
    config.stream.transactions = atomic;
    config.capture.atomic = atomic;
    config.sink.path = Some(dir.join("svc.db"));
    config.tables.insert(
        "items".into(),
        TableConfig {
            key: "id".into(),
            capture: true,
            ..TableConfig::default()
        },
    );
    config
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every stored message: (msg id, batch id, subject).
async fn stored(url: &str) -> Vec<(String, Option<String>, String)> {
    let nats = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(nats);
    let stream = js.get_stream("CAPR").await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < last {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("stream delivery")
            .unwrap()
            .unwrap();
        let h = m.headers.clone().unwrap_or_default();
        out.push((
            h.get("Nats-Msg-Id")
                .map(|v| v.to_string())
                .unwrap_or_default(),
            h.get("Nats-Batch-Id").map(|v| v.to_string()),
            m.subject.to_string(),
        ));
    }
    out
}

async fn run_case(atomic: bool) {
    let server = NatsServer::start().expect("nats-server");
    let version = jetsync_testkit::server_version().unwrap_or_default();
    if atomic && !jetsync::transaction::supports_transactions(&version) {
        eprintln!(
            "capture_relay (atomic): SKIPPED (nats-server {version} has no atomic batches; set NATS_SERVER_BIN to a 2.12.1+ server)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = config(&server.url(), dir.path(), atomic);
    let client = jetsync::Client::connect(&config).await.unwrap();
    client.provision().await.unwrap();
    capture::check_server(&config).await.unwrap();

    let db = Connection::open(dir.path().join("svc.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode = WAL; CREATE TABLE items (id TEXT PRIMARY KEY, qty INTEGER, pic BLOB)",
    )
    .unwrap();
    capture::install(&config).await.unwrap();
    // One multi-row local transaction, then single writes.
    db.execute_batch(
        "BEGIN; INSERT INTO items VALUES ('a', 1, x'01'); INSERT INTO items VALUES ('b', 2, NULL); \
         UPDATE items SET qty = 3 WHERE id = 'a'; COMMIT;",
    )
    .unwrap();
    // Keep a copy of the outbox: re-inserted later, it is what a relay killed between publish
    // and delete would find.
    db.execute_batch("CREATE TABLE outbox_copy AS SELECT * FROM jetsync_outbox")
        .unwrap();
    let stats = Arc::new(Stats::default());
    let relay = capture::Relay::start(config.clone(), stats.clone()).expect("a captured table");
    wait_for("the first transaction published", || {
        stats.capture().snapshot().published == 3
    })
    .await;
    // Each row's latest local change gets the exact sequence the server stored it at (members
    // of an atomic batch too): 'b' (outbox id 2) at 2, 'a' (its UPDATE, id 3) at 3. With the
    // commit's sequence for every member, the origin would skip its own echo of 'b'.
    let pending: BTreeMap<String, i64> = db
        .prepare("SELECT key, seq FROM jetsync_capture_pending")
        .unwrap()
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let want: BTreeMap<String, i64> = [("a".to_owned(), 3), ("b".to_owned(), 2)].into();
    assert_eq!(pending, want, "pending entries after the first transaction");
    db.execute("DELETE FROM items WHERE id = 'b'", []).unwrap();
    db.execute("INSERT INTO items VALUES ('c', 4, NULL)", [])
        .unwrap();
    wait_for("every change published", || {
        stats.capture().snapshot().published == 5
    })
    .await;
    // The same entries again: the server drops them as duplicates.
    db.execute_batch("INSERT INTO jetsync_outbox SELECT * FROM outbox_copy")
        .unwrap();
    wait_for("the republished entries acknowledged", || {
        stats.capture().snapshot().published == 8
    })
    .await;
    let backlog: i64 = db
        .query_row("SELECT count(*) FROM jetsync_outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(backlog, 0);
    relay.stop().await;

    let messages = stored(&server.url()).await;
    let ids: Vec<&str> = messages.iter().map(|m| m.0.as_str()).collect();
    let expected: Vec<String> = (1..=5).map(|i| format!("{INSTANCE}-{i}")).collect();
    assert_eq!(ids, expected, "each captured change stored once, in order");
    let batches: BTreeMap<&str, usize> =
        messages
            .iter()
            .filter_map(|m| m.1.as_deref())
            .fold(BTreeMap::new(), |mut acc, b| {
                *acc.entry(b).or_default() += 1;
                acc
            });
    if atomic {
        // The local transaction (ids 1-3) is one atomic batch of its own. The two later
        // single writes are plain messages, unless they were committed too close together for
        // the relay's watcher to tell them apart: then they share one batch (a superset).
        let batch = |i: usize| messages[i].1.clone();
        assert!(batch(0).is_some(), "{messages:?}");
        assert_eq!(batch(0), batch(1), "{messages:?}");
        assert_eq!(batch(0), batch(2), "{messages:?}");
        assert_ne!(batch(2), batch(3), "{messages:?}");
        assert_eq!(batch(3), batch(4), "{messages:?}");
        let in_batches = batches.values().sum::<usize>();
        assert!(in_batches == 3 || in_batches == 5, "{messages:?}");
    } else {
        assert!(batches.is_empty(), "{messages:?}");
    }
    let published: i64 = db
        .query_row("SELECT published FROM jetsync_capture_state", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(published, 8, "acknowledged entries, duplicates included");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_relay_publishes_each_change_once() {
    run_case(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_row_relay_publishes_each_change_once() {
    run_case(false).await;
}
