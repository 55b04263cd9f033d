//! Coalescing (`apply.coalesce`, issue #16): within one batch a row changed several times is
//! written once, with its last change; `apply.coalesce = false` and the redb audit mode see
//! every change; a row held behind a parked event is not coalesced past it.
//!
//! The events are published before the engine starts, so they arrive as a backlog and share
//! batches. Engines run in-process, so their counters (`events_coalesced`) can be read.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{ensure, Context, Result};
use async_nats::HeaderMap;
use jetsync::{Row, Value};
use jetsync_applier::{Engine, RedbOptions, RedbSink, Sink, SqliteOptions, SqliteSink, Stats};
use jetsync_e2e::{sqlite_rows, Group};
use jetsync_testkit::NatsServer;

/// Rows, and versions of each row, published before the engines start.
const KEYS: usize = 20;
const VERSIONS: i64 = 30;

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn row(n: i64) -> Row {
    let mut row = Row::new();
    row.insert("n".into(), Value::I64(n));
    row
}

/// The configuration of an in-process instance `name` of `group` under `root`.
fn config(
    group: &Group,
    root: &Path,
    name: &str,
    extra: impl FnOnce(&mut jetsync::Config),
) -> jetsync::Config {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("instance dir");
    let mut config = group.config(name, &dir);
    config.stream.history = 64;
    config.apply.bootstrap = false;
    config
        .tables
        .insert("items".into(), jetsync::TableConfig::default());
    extra(&mut config);
    config
}

/// Runs an engine until it applied `last`, then stops it; returns its counters.
async fn run_until<S: Sink + 'static>(
    config: jetsync::Config,
    sink: S,
    last: u64,
) -> Result<Arc<Stats>> {
    let engine = Engine::new(config, sink);
    let stats = engine.stats();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(engine.run(async move {
        let _ = rx.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stats.snapshot().applied_seq < last {
        ensure!(
            tokio::time::Instant::now() < deadline && !task.is_finished(),
            "engine stopped or stuck at {:?}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .context("engine did not stop")?
        .context("engine panicked")??;
    Ok(stats)
}

/// Creates `items` in a new SQLite file with triggers that log every row write into `writes`,
/// so a test sees how many writes the sink made.
fn sqlite_with_write_log(path: &Path) -> Result<()> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER);
         CREATE TABLE writes (id TEXT, n INTEGER);
         CREATE TRIGGER items_ins AFTER INSERT ON items BEGIN INSERT INTO writes VALUES (new.id, new.n); END;
         CREATE TRIGGER items_upd AFTER UPDATE ON items BEGIN INSERT INTO writes VALUES (new.id, new.n); END;",
    )?;
    Ok(())
}

fn logged_writes(path: &Path) -> Result<u64> {
    let conn = rusqlite::Connection::open(path)?;
    Ok(conn.query_row("SELECT count(*) FROM writes", [], |r| r.get::<_, i64>(0))? as u64)
}

/// A row changed 30 times in one backlog ends with its last value whether coalesced or not;
/// with coalescing the sink writes far fewer rows (counted by triggers) and `events_coalesced`
/// says how many; with `apply.coalesce = false` every change is written, and the redb replica in
/// audit mode sees every sequence exactly once although coalescing is on.
#[test]
fn a_row_changed_many_times_in_a_batch_is_written_once() -> Result<()> {
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = Group::new(server.url(), "COALESCE", "coalesce");
        let publisher = config(&group, root.path(), "pub", |_| {});
        let client = jetsync::Client::connect(&publisher).await?;
        client.provision().await?;
        let items = client.rows("items")?;
        let mut last = 0;
        for v in 1..=VERSIONS {
            let batch: Vec<(String, Row)> = (0..KEYS)
                .map(|k| (format!("k{k}"), row(v * 100 + k as i64)))
                .collect();
            for p in items
                .upsert_many(batch.iter().map(|(k, r)| (k.as_str(), r)))
                .await?
            {
                last = last.max(p.seq);
            }
        }
        // One row ends deleted: its last change is a delete.
        last = last.max(items.delete("k0").await?.seq);
        let events = (KEYS as u64) * (VERSIONS as u64) + 1;
        ensure!(
            last == events,
            "stream holds {last} events, expected {events}"
        );

        let check_rows = |path: &Path| -> Result<()> {
            let rows = sqlite_rows(path, "items", "id")?;
            ensure!(rows.len() == KEYS - 1, "{} rows", rows.len());
            for k in 1..KEYS {
                let got = rows.get(&format!("k{k}")).context("row missing")?;
                ensure!(
                    got.get("n") == Some(&Value::I64(VERSIONS * 100 + k as i64)),
                    "row k{k} is {got:?}, not its last version"
                );
            }
            Ok(())
        };

        // Coalescing on (the default).
        let on = config(&group, root.path(), "on", |_| {});
        let path = root.path().join("on.db");
        sqlite_with_write_log(&path)?;
        let stats = run_until(
            on,
            SqliteSink::open(SqliteOptions::new(path.clone()))?,
            last,
        )
        .await?;
        check_rows(&path)?;
        let s = stats.snapshot();
        ensure!(
            s.events_applied == events,
            "events_applied {} != {events}",
            s.events_applied
        );
        ensure!(s.events_coalesced > 0, "nothing coalesced: {s:?}");
        let writes = logged_writes(&path)?;
        ensure!(
            writes + s.events_coalesced == events - 1,
            "{writes} row writes + {} coalesced != {} upserts",
            s.events_coalesced,
            events - 1
        );
        ensure!(
            writes < events / 2,
            "{writes} row writes for {events} events: coalescing did little"
        );

        // Coalescing off: every change reaches the sink.
        let off = config(&group, root.path(), "off", |c| c.apply.coalesce = false);
        let path = root.path().join("off.db");
        sqlite_with_write_log(&path)?;
        let stats = run_until(
            off,
            SqliteSink::open(SqliteOptions::new(path.clone()))?,
            last,
        )
        .await?;
        check_rows(&path)?;
        let s = stats.snapshot();
        ensure!(
            s.events_coalesced == 0,
            "coalesced with coalesce = false: {s:?}"
        );
        ensure!(
            logged_writes(&path)? == events - 1,
            "not every upsert was written"
        );

        // The redb audit mode sees every sequence once, coalescing on.
        let audit = config(&group, root.path(), "audit", |c| {
            c.sink.kind = jetsync::SinkKind::Redb;
            c.sink.audit = true;
        });
        let path = root.path().join("audit.redb");
        let sink = RedbSink::open(RedbOptions {
            path: path.clone(),
            audit: true,
        })?;
        let replica = sink.replica();
        let stats = run_until(audit, sink, last).await?;
        ensure!(
            stats.snapshot().events_coalesced == 0,
            "audit mode coalesced"
        );
        ensure!(
            replica
                .get("items", "k1")?
                .and_then(|r| r.get("n").cloned())
                == Some(Value::I64(VERSIONS * 100 + 1)),
            "redb row k1 is not its last version"
        );
        drop(replica);
        let counts = jetsync_applier::read_audit(&path)?;
        ensure!(
            counts.len() as u64 == events && counts.values().all(|&c| c == 1),
            "audit: {} sequences, not every one applied exactly once",
            counts.len()
        );
        Ok(())
    })
}

/// A row whose event in the middle of a backlog is poison: the change before it is applied, the
/// changes after it are held behind it (parked), never coalesced into the row past it; another
/// row in the same batch is coalesced as usual.
#[test]
fn a_held_row_is_not_coalesced_past_its_parked_event() -> Result<()> {
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = Group::new(server.url(), "COALESCEHELD", "coalesceheld");
        let publisher = config(&group, root.path(), "pub", |_| {});
        let client = jetsync::Client::connect(&publisher).await?;
        client.provision().await?;
        let items = client.rows("items")?;
        let nats = async_nats::connect(server.url()).await?;
        let js = async_nats::jetstream::new(nats);
        items.upsert("held", &row(1)).await?;
        items.upsert("free", &row(1)).await?;
        // Poison for row `held`: a body that does not decode.
        let mut headers = HeaderMap::new();
        headers.insert("Jetsync-Format", "json/1");
        let poison = js
            .publish_with_headers("coalesceheld.items.held", headers, "{not json".into())
            .await?
            .await?
            .sequence;
        let mut last = 0;
        for v in 2..=5 {
            items.upsert("held", &row(v)).await?;
            last = items.upsert("free", &row(v)).await?.seq;
        }

        let on = config(&group, root.path(), "on", |_| {});
        let path = root.path().join("on.db");
        let stats = run_until(
            on,
            SqliteSink::open(SqliteOptions::new(path.clone()))?,
            last,
        )
        .await?;
        let rows = sqlite_rows(&path, "items", "id")?;
        ensure!(
            rows.get("held").and_then(|r| r.get("n")) == Some(&Value::I64(1)),
            "row `held` moved past its parked event {poison}: {:?}",
            rows.get("held")
        );
        ensure!(
            rows.get("free").and_then(|r| r.get("n")) == Some(&Value::I64(5)),
            "row `free` is {:?}",
            rows.get("free")
        );
        let s = stats.snapshot();
        // The poison event and the four changes held behind it.
        ensure!(
            s.parked == 5,
            "parked {} (expected the poison event and 4 held)",
            s.parked
        );
        ensure!(
            s.events_coalesced > 0,
            "row `free` was not coalesced: {s:?}"
        );
        Ok(())
    })
}
