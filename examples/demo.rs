//! The jetsync demo: three instances of a service, each with its own SQLite database, kept in
//! sync through a private nats-server.
//!
//! It starts a nats-server (from `NATS_SERVER_BIN`, `PATH` or `/usr/sbin/nats-server`) on a free
//! port, provisions the stream, runs three appliers in-process, writes through instances 1 and
//! 2, reads the rows back from instance 3's own database, kills instance 3's applier while it
//! applies, writes more, starts it again, shows it catching up, and prints the three digests side by side. Exits 0 only if
//! the three instances converged.
//!
//! Run: `cargo demo` (an alias for `cargo run -p jetsync-examples --example demo`).

use std::{path::Path, time::Duration};

use anyhow::{bail, Context};
use jetsync::{Client, Config, Row, Value};
use jetsync_applier::{Engine, Sink, SqliteOptions, SqliteSink, TableDigest};
use jetsync_testkit::NatsServer;
use tokio::{sync::oneshot, task::JoinHandle};

const STREAM: &str = "INVENTORY";

/// One running applier: its shutdown trigger and task.
struct Applier {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), jetsync_applier::EngineError>>,
}

fn config(url: &str, data: &Path, instance: &str) -> Config {
    let mut c = Config {
        instance: instance.into(),
        data_dir: data.into(),
        ..Config::default()
    };
    c.nats.url = url.into();
    c.stream.name = STREAM.into();
    c.stream.subject_prefix = "inventory".into();
    c.tables.insert(
        "items".into(),
        jetsync::TableConfig {
            key: "sku".into(),
            ..Default::default()
        },
    );
    c
}

fn start_applier(config: &Config) -> anyhow::Result<Applier> {
    let sink = open_sink(config)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let engine = Engine::new(config.clone(), sink);
    let task = tokio::spawn(engine.run(async {
        let _ = stopped.await;
    }));
    Ok(Applier { stop, task })
}

fn open_sink(config: &Config) -> anyhow::Result<SqliteSink> {
    let mut options = SqliteOptions::new(config.sink_path().context("sqlite path")?);
    options.key_columns.insert("items".into(), "sku".into());
    Ok(SqliteSink::open(options)?)
}

async fn stop_applier(applier: Applier) -> anyhow::Result<()> {
    let _ = applier.stop.send(());
    applier.task.await??;
    Ok(())
}

async fn wait_applied(config: &Config, seq: u64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let applied = jetsync_applier::read_checkpoint(&config.redb_path(), STREAM)
            .map(|c| c.applied)
            .unwrap_or(0);
        if applied >= seq {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{} reached only seq {applied} of {seq}", config.instance);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn item(sku: &str, name: &str, qty: i64) -> Row {
    let mut row = Row::new();
    row.insert("sku".into(), Value::from(sku));
    row.insert("name".into(), Value::from(name));
    row.insert("qty".into(), Value::I64(qty));
    row
}

fn read_items(config: &Config) -> anyhow::Result<Vec<(String, String, i64)>> {
    let path = config.sink_path().context("sqlite path")?;
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = conn.prepare("SELECT sku, name, qty FROM items ORDER BY sku")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

async fn digest(config: &Config) -> anyhow::Result<(u64, Vec<TableDigest>)> {
    let mut sink = open_sink(config)?;
    let applied = sink.fence(STREAM).await?.unwrap_or(0);
    Ok((applied, sink.digest().await?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let server = NatsServer::start().context("starting a private nats-server")?;
    println!(
        "① nats-server {} listening on {}",
        server.version(),
        server.url()
    );
    let data = tempfile::tempdir()?;
    let configs: Vec<Config> = (1..=3)
        .map(|i| config(&server.url(), data.path(), &format!("inventory-{i}")))
        .collect();

    let client1 = Client::connect(&configs[0]).await?;
    let client2 = Client::connect(&configs[1]).await?;
    println!("② stream {STREAM}: {:?}", client1.provision().await?);

    let mut appliers: Vec<Option<Applier>> = Vec::new();
    for c in &configs {
        appliers.push(Some(start_applier(c)?));
    }
    println!("③ three instances running, each with its own SQLite file");

    let items1 = client1.rows("items")?;
    let items2 = client2.rows("items")?;
    items1.upsert("A-1", &item("A-1", "Chair", 12)).await?;
    items2.upsert("B-7", &item("B-7", "Table", 3)).await?;
    items1.upsert("C-3", &item("C-3", "Lamp", 40)).await?;
    let last = items2.upsert("A-1", &item("A-1", "Chair", 11)).await?;
    println!(
        "④ wrote 4 events through instances 1 and 2 (last seq {})",
        last.seq
    );

    wait_applied(&configs[2], last.seq).await?;
    println!("⑤ instance 3 reads its own database:");
    for (sku, name, qty) in read_items(&configs[2])? {
        println!("     {sku:<5} {name:<6} qty {qty}");
    }

    // Write 2,000 more events; instance 3's applier is killed while they stream in (its task
    // aborted wherever it is, possibly mid-transaction, which SQLite rolls back: what a SIGKILL
    // would leave).
    let writer = {
        let items1 = items1.clone();
        tokio::spawn(async move {
            let mut pipeline = items1.pipeline();
            for i in 0..2000 {
                let sku = format!("S-{}", i % 500);
                pipeline.upsert(&sku, &item(&sku, "Screw", i)).await?;
            }
            pipeline.finish().await?;
            anyhow::Ok(())
        })
    };
    wait_applied(&configs[2], last.seq + 200).await?;
    let third = appliers[2].take().context("instance 3")?;
    third.task.abort();
    let _ = third.task.await;
    drop(third.stop);
    let at = jetsync_applier::read_checkpoint(&configs[2].redb_path(), STREAM)?.applied;
    println!(
        "⑥ writing 2,000 more events; instance 3's applier killed while applying them, at seq {at}"
    );
    writer.await??;
    // Published after the pipeline finished, so it is the highest sequence.
    let last = items2.delete("B-7").await?.seq;

    let behind = jetsync_applier::read_checkpoint(&configs[2].redb_path(), STREAM)?.applied;
    println!(
        "⑦ instance 3 restarts at seq {behind}, {} behind",
        match last - behind {
            1 => "1 event".to_owned(),
            n => format!("{n} events"),
        }
    );
    let t = std::time::Instant::now();
    appliers[2] = Some(start_applier(&configs[2])?);
    for c in &configs {
        wait_applied(c, last).await?;
    }
    println!("   caught up to seq {last} in {:?}", t.elapsed());

    for a in appliers.iter_mut() {
        if let Some(a) = a.take() {
            stop_applier(a).await?;
        }
    }
    println!("⑧ digests (applied seq, per table: rows and hash):");
    let mut digests = Vec::new();
    for c in &configs {
        let (applied, tables) = digest(c).await?;
        let text = tables
            .iter()
            .map(|t| format!("{} {} rows {}", t.table, t.rows, t.hash))
            .collect::<Vec<_>>()
            .join(", ");
        println!("     {:<12} seq {applied:<6} {text}", c.instance);
        digests.push((applied, tables));
    }
    let converged = digests.windows(2).all(|w| w[0] == w[1]);
    if !converged {
        bail!("the instances did not converge");
    }
    println!(
        "✔ converged: all three instances hold identical data ({:?})",
        started.elapsed()
    );
    Ok(())
}
