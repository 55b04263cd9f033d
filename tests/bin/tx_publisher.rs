//! A publisher process for the transaction tests: sends the first members of a transaction
//! (an atomic batch) with plain async-nats, reports `sent <n>` on stdout, then waits to be
//! killed before it commits.
//!
//! Usage: `tx-publisher <nats-url> <subject-prefix> <batch-id> <members>`; member `n` upserts
//! row `x<n>` of table `items` with `n = 100 + n`.

use std::{io::Write, time::Duration};

use anyhow::{Context, Result};
use jetsync_e2e::{raw_transaction, RawMember};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, prefix, batch_id, members] = args.as_slice() else {
        anyhow::bail!("usage: tx-publisher <nats-url> <subject-prefix> <batch-id> <members>");
    };
    let count: usize = members.parse().context("members")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let nats = async_nats::connect(url.as_str()).await?;
        let members: Vec<RawMember> = (1..=count)
            .map(|n| {
                let key = format!("x{n}");
                RawMember::upsert(
                    format!("{prefix}.items.{key}"),
                    serde_json::json!({"id": key, "n": 100 + n}),
                    &format!("{batch_id}-{n}"),
                )
            })
            .collect();
        // Not the commit: the batch stays open on the server.
        raw_transaction(&nats, batch_id, &members, false).await?;
        println!("sent {count}");
        std::io::stdout().flush()?;
        // The test kills this process now; never linger if it does not.
        tokio::time::sleep(Duration::from_secs(120)).await;
        anyhow::Ok(())
    })
}
