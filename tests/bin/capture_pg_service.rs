//! The "service" of the Postgres capture tests: a separate process that writes plain SQL to its
//! own schema with tokio-postgres (no jetsync client), like `examples/capture/service.py` does
//! for SQLite.
//!
//! Usage: `capture-pg-service <postgres-url> <schema> <writes> <keys> <tx-fraction> <seed>
//! <rate> <interleave-fraction>`.
//!
//! Table `<schema>.items(id text primary key, n bigint, s text, f double precision)` must exist.
//! Each write picks a key and inserts or updates it (50 %, one `INSERT .. ON CONFLICT`),
//! updates it if present (25 %) or deletes it if present (25 %). About `tx-fraction` of the writes run in multi-row transactions of 2 to 5 writes.
//! `interleave-fraction` of the transactions are pairs on two connections that commit out of
//! id order: T1 writes first (takes the lower outbox id), T2 writes and commits, then T1
//! commits. `rate` paces the writes (per second, 0 = unpaced).
//!
//! Prints `{"progress": n}` lines and, at the end, `{"done": true, "writes": .., "changes": ..,
//! "out_of_order_pairs": ..}`, `changes` counting the rows changed by committed transactions.

use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio_postgres::{Client, NoTls};

/// One planned write: key, choice in [0, 1), new `n`, new `s`, new `f`.
type Plan = (String, f64, i64, String, f64);

fn plan(rng: &mut StdRng, keys: usize) -> Plan {
    let key = format!("k{:04}", rng.gen_range(0..keys));
    let len = rng.gen_range(0..12);
    let s: String = (0..len).map(|_| rng.gen_range('a'..='z')).collect();
    (
        key,
        rng.gen::<f64>(),
        rng.gen_range(-1_000_000_000_i64..1_000_000_000),
        s,
        rng.gen_range(-1.0e6_f64..1.0e6),
    )
}

/// Applies one write with one statement (inside the open transaction of `client`, or on its
/// own); returns the rows changed. Choice < 0.5: insert, or update when the row exists (one
/// `INSERT .. ON CONFLICT`); < 0.75: update (no-op if absent); else delete (no-op if absent).
async fn write(client: &Client, schema: &str, plan: &Plan) -> Result<u64> {
    let (key, choice, n, s, f) = plan;
    let changed = if *choice < 0.5 {
        client
            .execute(
                &format!(
                    "INSERT INTO \"{schema}\".items (id, n, s, f) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (id) DO UPDATE SET n = excluded.n, s = excluded.s, f = excluded.f"
                ),
                &[key, n, s, f],
            )
            .await?
    } else if *choice < 0.75 {
        client
            .execute(
                &format!("UPDATE \"{schema}\".items SET n = $2, s = $3 WHERE id = $1"),
                &[key, n, s],
            )
            .await?
    } else {
        client
            .execute(
                &format!("DELETE FROM \"{schema}\".items WHERE id = $1"),
                &[key],
            )
            .await?
    };
    Ok(changed)
}

/// Runs `plans` in one transaction on `client`, retrying on serialization failures and
/// deadlocks; returns the rows changed once committed.
async fn transaction(client: &Client, schema: &str, plans: &[Plan]) -> Result<u64> {
    if let [single] = plans {
        // One statement commits on its own (autocommit): one round trip.
        loop {
            match write(client, schema, single).await {
                Err(e) if retryable(&e) => continue,
                other => return other,
            }
        }
    }
    loop {
        client.batch_execute("BEGIN").await?;
        let mut changed = 0;
        let mut failed = None;
        for p in plans {
            match write(client, schema, p).await {
                Ok(n) => changed += n,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let outcome = match failed {
            None => client.batch_execute("COMMIT").await.map_err(Into::into),
            Some(e) => Err(e),
        };
        match outcome {
            Ok(()) => return Ok(changed),
            Err(e) if retryable(&e) => {
                let _ = client.batch_execute("ROLLBACK").await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Serialization failures, deadlocks, lock timeouts (see [`out_of_order_pair`]) and unique
/// violations (two connections inserting the same new key) are retried.
fn retryable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        .is_some_and(|c| matches!(c.code(), "40001" | "40P01" | "55P03" | "23505" | "25P02"))
}

/// T1 writes first, T2 writes and commits, then T1 commits: T1's outbox id is the lower one,
/// its commit the later. Keys of the two are distinct (else T2 would wait for T1's row lock).
/// Returns the rows changed, or `None` when the pair had to be abandoned (a retryable error).
///
/// T1 waiting for T2 in this process is a lock edge Postgres cannot see: when T2 waits for a
/// row lock held by a third session (the applier applying a remote change) that itself waits
/// for T1's row, nobody would ever move. T2 therefore waits at most `lock_timeout` for a lock
/// and the pair is abandoned (55P03), as a careful service holding one transaction open while
/// it runs another would do.
async fn out_of_order_pair(
    c1: &Client,
    c2: &Client,
    schema: &str,
    p1: &Plan,
    p2: &Plan,
) -> Result<Option<u64>> {
    c1.batch_execute("BEGIN").await?;
    c2.batch_execute("BEGIN; SET LOCAL lock_timeout = '1s'")
        .await?;
    let attempt = async {
        let a = write(c1, schema, p1).await?;
        let b = write(c2, schema, p2).await?;
        c2.batch_execute("COMMIT").await?;
        Ok::<_, anyhow::Error>((a, b))
    }
    .await;
    match attempt {
        Ok((a, b)) => {
            c1.batch_execute("COMMIT").await?;
            Ok(Some(a + b))
        }
        Err(e) if retryable(&e) => {
            let _ = c2.batch_execute("ROLLBACK").await;
            let _ = c1.batch_execute("ROLLBACK").await;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn emit(value: serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")?;
    out.flush()?;
    Ok(())
}

async fn run(args: &[String]) -> Result<()> {
    let [url, schema, writes, keys, tx_fraction, seed, rate, interleave] = args else {
        bail!("usage: capture-pg-service <postgres-url> <schema> <writes> <keys> <tx-fraction> <seed> <rate> <interleave-fraction>");
    };
    let writes: usize = writes.parse().context("writes")?;
    let keys: usize = keys.parse().context("keys")?;
    let tx_fraction: f64 = tx_fraction.parse().context("tx-fraction")?;
    let rate: f64 = rate.parse().context("rate")?;
    let interleave: f64 = interleave.parse().context("interleave-fraction")?;
    let mut rng = StdRng::seed_from_u64(seed.parse().context("seed")?);
    let c1 = connect(url).await?;
    let c2 = connect(url).await?;
    // Probability of a group so that about `tx_fraction` of the writes are in groups of 2..=5.
    let p_group = if tx_fraction <= 0.0 {
        0.0
    } else {
        tx_fraction / (3.5 * (1.0 - tx_fraction) + tx_fraction)
    };
    let started = Instant::now();
    let (mut done, mut changes, mut pairs) = (0usize, 0u64, 0u64);
    let mut next_progress = 250;
    while done < writes {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(done as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        if writes - done >= 2 && rng.gen_bool(interleave.clamp(0.0, 1.0)) {
            let p1 = plan(&mut rng, keys);
            let mut p2 = plan(&mut rng, keys);
            while p2.0 == p1.0 {
                p2 = plan(&mut rng, keys);
            }
            if let Some(n) = out_of_order_pair(&c1, &c2, schema, &p1, &p2).await? {
                changes += n;
                pairs += 1;
                done += 2;
            }
        } else {
            let size = if rng.gen_bool(p_group.clamp(0.0, 1.0)) {
                rng.gen_range(2..=5).min(writes - done)
            } else {
                1
            };
            let plans: Vec<Plan> = (0..size).map(|_| plan(&mut rng, keys)).collect();
            changes += transaction(&c1, schema, &plans).await?;
            done += size;
        }
        if done >= next_progress {
            emit(serde_json::json!({ "progress": done }))?;
            next_progress += 250;
        }
    }
    emit(serde_json::json!({
        "done": true, "writes": done, "changes": changes, "out_of_order_pairs": pairs
    }))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(&args))
}
