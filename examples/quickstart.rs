//! Quickstart: provision a sync group, publish a row, read it back from the stream, and use
//! compare-and-set.
//!
//! Needs a JetStream-enabled nats-server (`nats-server -js`); set `NATS_URL` if it is not at
//! `nats://127.0.0.1:4222`. Run with `cargo run -p jetsync-examples --example quickstart`.

use jetsync::{Client, Error, StreamConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    sku: String,
    name: String,
    price: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let nats = async_nats::connect(url.as_str()).await?;
    let stream = StreamConfig {
        name: "QUICKSTART".into(),
        subject_prefix: "quickstart".into(),
        ..StreamConfig::default()
    };
    let client = Client::from_nats(nats, stream, "quickstart-1")?;
    println!("stream: {:?}", client.provision().await?);

    let products = client.table::<Product>("products")?;
    let chair = Product {
        sku: "A-1".into(),
        name: "Chair".into(),
        price: 12.5,
    };
    let first = products.upsert("A-1", &chair).await?;
    println!("published seq {}", first.seq);

    let current = products.get("A-1").await?.expect("just written");
    println!("read back at seq {}: {:?}", current.seq, current.row);

    // Compare-and-set: only succeeds against the sequence we last saw.
    let cheaper = Product {
        price: 9.9,
        ..chair.clone()
    };
    let second = products.upsert_if("A-1", &cheaper, current.seq).await?;
    println!(
        "compare-and-set against seq {} stored seq {}",
        current.seq, second.seq
    );
    // The same compare-and-set again is now stale: the row moved on to `second.seq`.
    match products.upsert_if("A-1", &chair, current.seq).await {
        Err(Error::Conflict { current_seq }) => {
            println!(
                "stale write refused: it expected the row at seq {} (read earlier), found seq {current_seq}",
                current.seq
            )
        }
        other => anyhow::bail!("expected a conflict, got {other:?}"),
    }
    Ok(())
}
