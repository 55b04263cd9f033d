//! Embedding the applier in a service: the engine runs in-process with the redb replica sink,
//! and the service reads its rows through a [`Replica`] handle instead of a database driver.
//!
//! It starts a private nats-server (from `NATS_SERVER_BIN`, `PATH` or `/usr/sbin/nats-server`)
//! on a free port, publishes a few products (an update and a delete among them), waits for the
//! replica to apply them (`Replica::wait_for(seq)`: read-your-writes), and reads them back with
//! `Replica::get_as`, `Replica::get` and `Replica::scan`. Exits 0 only if what it reads back is
//! exactly what it wrote.
//!
//! Run: `cargo run -p jetsync-examples --example embedded`.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{bail, ensure, Context};
use jetsync::{Client, Config, SinkKind, TableConfig};
use jetsync_applier::{Engine, RedbOptions, RedbSink, Replica};
use jetsync_testkit::NatsServer;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

const TABLE: &str = "products";
/// Generous: on a loaded machine the first apply includes connecting and creating the consumer.
const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    sku: String,
    name: String,
    price: f64,
    tags: Vec<String>,
}

fn product(sku: &str, name: &str, price: f64, tags: &[&str]) -> Product {
    Product {
        sku: sku.into(),
        name: name.into(),
        price,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

/// Every product in the replica, by sku.
fn read_all(replica: &Replica) -> anyhow::Result<BTreeMap<String, Product>> {
    let mut out = BTreeMap::new();
    for (key, row) in replica.scan(TABLE)? {
        let p: Product = jetsync::from_row(&row).with_context(|| format!("row {key}"))?;
        out.insert(key, p);
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = NatsServer::start().context("starting a private nats-server")?;
    println!(
        "nats-server {} listening on {}",
        server.version(),
        server.url()
    );
    let data = tempfile::tempdir()?;

    // The same configuration the client and the engine share; the sink is the redb replica.
    let mut config = Config {
        instance: "embedded-1".into(),
        data_dir: data.path().into(),
        ..Config::default()
    };
    config.nats.url = server.url();
    config.stream.name = "EMBEDDED".into();
    config.stream.subject_prefix = "embedded".into();
    config.sink.kind = SinkKind::Redb;
    config.tables.insert(
        TABLE.into(),
        TableConfig {
            key: "sku".into(),
            ..Default::default()
        },
    );
    config.validate()?;

    let client = Client::connect(&config).await?;
    client.provision().await?;
    let products = client.table::<Product>(TABLE)?;

    // The engine, in-process. Keep a Replica handle before handing the sink over.
    let sink = RedbSink::open(RedbOptions::new(
        config.sink_path().context("redb sink path")?,
    ))?;
    let replica = sink.replica();
    let (stop, stopped) = oneshot::channel::<()>();
    let engine = tokio::spawn(Engine::new(config.clone(), sink).run(async {
        let _ = stopped.await;
    }));

    // Read-your-writes for one write: publish, wait for its sequence, read.
    let chair = product("A-1", "Chair", 12.5, &["seating"]);
    let p = products.upsert("A-1", &chair).await?;
    replica.wait_for(p.seq, WAIT).await?;
    let read: Option<Product> = replica.get_as(TABLE, "A-1")?;
    ensure!(
        read.as_ref() == Some(&chair),
        "A-1 read back as {read:?} after seq {}",
        p.seq
    );
    println!("wrote A-1 at seq {}, read it back: {read:?}", p.seq);

    // A few more: new rows, an update, a delete.
    let mut expected = BTreeMap::new();
    expected.insert(
        "A-1".to_owned(),
        product("A-1", "Chair", 9.9, &["seating", "sale"]),
    );
    expected.insert("B-7".to_owned(), product("B-7", "Table", 120.0, &[]));
    expected.insert("C-3".to_owned(), product("C-3", "Lamp", 25.0, &["light"]));
    let mut last = 0;
    for (sku, p) in &expected {
        last = products.upsert(sku, p).await?.seq;
    }
    products
        .upsert("D-9", &product("D-9", "Stool", 15.0, &[]))
        .await?;
    last = last.max(products.delete("D-9").await?.seq);
    replica.wait_for(last, WAIT).await?;
    println!(
        "wrote 5 more events (last seq {last}); replica applied {}",
        replica.applied_seq()
    );

    // Read back: one by one, untyped, and the whole table.
    for (sku, want) in &expected {
        let got: Option<Product> = replica.get_as(TABLE, sku)?;
        ensure!(
            got.as_ref() == Some(want),
            "{sku}: got {got:?}, wrote {want:?}"
        );
    }
    ensure!(
        replica.get(TABLE, "D-9")?.is_none(),
        "D-9 was deleted but the replica still has it"
    );
    let row = replica.get(TABLE, "B-7")?.context("B-7 missing")?;
    println!("B-7 as an untyped row: {row:?}");
    let all = read_all(&replica)?;
    if all != expected {
        bail!("the replica holds {all:?}, expected {expected:?}");
    }
    println!("scan({TABLE}):");
    for (sku, p) in &all {
        println!("  {sku:<4} {:<6} {:>7.2} {:?}", p.name, p.price, p.tags);
    }

    let _ = stop.send(());
    engine.await??;
    println!("✔ the embedded replica holds exactly what was written");
    Ok(())
}
