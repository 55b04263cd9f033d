//! Transactions (needs nats-server >= 2.12.1): the same rows written as transactions of 10
//! next to single pipelined writes, and replayed from a stream of 10-row transactions next to a
//! stream of single events.
//!
//! Publish: the client's `upsert_many` (pipelined, `DEFAULT_PIPELINE_WINDOW` in flight) against
//! `Client::transaction` commits of 10 rows, `TXN_IN_FLIGHT` transactions in flight
//! (`--txn-in-flight N`), and the latency of one transaction at a time. A commit is two round
//! trips (the first member's request and the commit's) and the server stages every batch in a
//! store of its own, so a transaction costs far more than 10 pipelined writes; the phase shows
//! how much. Runs alternate on a stream recreated before every run; medians are compared.
//!
//! Replay: two backlogs of the same events (same seed), one published as single events, one as
//! transactions of 10; a fresh engine replays each into redb and into SQLite (as the replay
//! phase does; `apply.bootstrap = false`). The applier applies a transaction in one sink
//! transaction, stretching its batch to the transaction's end.
//!
//! On an older server the phase is skipped and the report says why.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use futures::{StreamExt, TryStreamExt};
use jetsync::StreamConfig;
use jetsync_applier::{RedbOptions, RedbSink, SqliteOptions, SqliteSink};
use serde::Serialize;

use crate::{
    harness::{self, Bench},
    replay,
    workload::{Encoder, Prepared, Rng, ORIGIN, TABLE},
};

const PUB_STREAM: &str = "BENCH_TXN_PUB";
const PUB_PREFIX: &str = "benchtxnpub";
const SINGLE_STREAM: &str = "BENCH_TXN_SINGLE";
const SINGLE_PREFIX: &str = "benchtxnsingle";
const TXN_STREAM: &str = "BENCH_TXN_REPLAY";
const TXN_PREFIX: &str = "benchtxnreplay";
/// Rows per transaction.
pub(crate) const TXN_ROWS: usize = 10;
/// Transactions in flight while publishing, by default. The server allows 50 batches per
/// stream, but on 2.12.8 more than a few in flight are slower in total (4: ~480 tx/s, 8: ~170,
/// 32: ~200 on the development VM; one at a time ~340): every batch of a file-storage stream is
/// staged in a store of its own.
pub(crate) const TXN_IN_FLIGHT: usize = 4;

/// `--txn-in-flight N`: overrides [`TXN_IN_FLIGHT`] (experiments).
pub(crate) static IN_FLIGHT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

fn in_flight() -> usize {
    IN_FLIGHT.get().copied().unwrap_or(TXN_IN_FLIGHT).max(1)
}
/// Transactions committed one at a time for the sequential latency.
const SEQUENTIAL: usize = 200;

/// Outcome of the transactions phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TxnReport {
    /// Why the phase was not measured (an older server), else `None`.
    pub(crate) skipped: Option<String>,
    pub(crate) figures: Option<TxnFigures>,
}

/// The measured figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TxnFigures {
    /// Rows per run (publish) and per backlog (replay).
    pub(crate) rows: u64,
    pub(crate) rows_per_txn: usize,
    pub(crate) txn_in_flight: usize,
    /// Single pipelined writes of the same rows, rows/s (median).
    pub(crate) single_rows_per_s: f64,
    /// Transactions of `rows_per_txn`, rows/s (median).
    pub(crate) txn_rows_per_s: f64,
    /// Transactions per second (median).
    pub(crate) txn_per_s: f64,
    /// `txn_rows_per_s / single_rows_per_s`.
    pub(crate) publish_ratio: f64,
    /// Commit latency with `txn_in_flight` in flight, ms (all runs).
    pub(crate) commit_p50_ms: f64,
    pub(crate) commit_p99_ms: f64,
    /// Commit latency of one transaction at a time (`SEQUENTIAL` of them), ms: the server's
    /// own cost of an atomic batch.
    pub(crate) sequential_commit_p50_ms: f64,
    pub(crate) sequential_commit_p99_ms: f64,
    pub(crate) single_runs: Vec<f64>,
    pub(crate) txn_runs: Vec<f64>,
    /// Replay into redb: a stream of single events vs one of transactions, events/s.
    pub(crate) replay_redb_single_eps: f64,
    pub(crate) replay_redb_txn_eps: f64,
    pub(crate) replay_redb_ratio: f64,
    /// The same into SQLite.
    pub(crate) replay_sqlite_single_eps: f64,
    pub(crate) replay_sqlite_txn_eps: f64,
    pub(crate) replay_sqlite_ratio: f64,
}

pub(crate) async fn run(
    bench: &Bench,
    server_version: &str,
    rows: u64,
    rounds: usize,
) -> anyhow::Result<TxnReport> {
    if !jetsync::transaction::supports_transactions(server_version) {
        let why = format!("needs nats-server >= 2.12.1, running {server_version}");
        eprintln!("txn: SKIPPED ({why})");
        return Ok(TxnReport {
            skipped: Some(why),
            figures: None,
        });
    }
    // Whole transactions only.
    let rows = rows - rows % TXN_ROWS as u64;
    ensure!(rows > 0, "txn phase needs at least {TXN_ROWS} rows");
    let encoder = Encoder::new(PUB_PREFIX)?;
    let mut rng = Rng::new(0x5eed_0007);
    let prepared: Vec<Prepared> = (0..rows)
        .map(|n| encoder.prepare(&mut rng, n))
        .collect::<anyhow::Result<_>>()?;
    let mut config = jetsync::Config {
        instance: ORIGIN.to_owned(),
        ..jetsync::Config::default()
    };
    config.nats.url = bench.url.clone();
    let base = jetsync::Client::connect(&config)
        .await
        .context("connecting the jetsync client")?;

    // Warm-up on a slice.
    let warm = &prepared[..prepared.len().min(2_000)];
    let mut latencies = Vec::new();
    publish_run(bench, &base, Side::Single, warm, &mut Vec::new()).await?;
    publish_run(bench, &base, Side::Txn, warm, &mut Vec::new()).await?;
    let mut single_runs = Vec::new();
    let mut txn_runs = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Side::Single, Side::Txn]
        } else {
            [Side::Txn, Side::Single]
        };
        for side in order {
            harness::mark(&format!("txn publish {side:?} round {round}"));
            let rate = publish_run(bench, &base, side, &prepared, &mut latencies).await?;
            match side {
                Side::Single => single_runs.push(rate),
                Side::Txn => txn_runs.push(rate),
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    harness::mark("txn sequential");
    let slice = &prepared[..prepared.len().min(SEQUENTIAL * TXN_ROWS)];
    let mut sequential = Vec::new();
    let stream = create_txn_stream(bench, PUB_STREAM, PUB_PREFIX, 1).await?;
    let client = jetsync::Client::from_nats(base.nats().clone(), stream, base.origin())?;
    for chunk in slice.chunks(TXN_ROWS) {
        sequential.extend(commit_all(&client, chunk, 1).await?);
    }
    bench.delete_stream(PUB_STREAM).await;
    sequential.sort_by(f64::total_cmp);
    let single_rows_per_s = harness::median(&single_runs);
    let txn_rows_per_s = harness::median(&txn_runs);

    harness::mark("txn replay");
    let (redb, sqlite) = replay_both(bench, &base, rows).await?;
    harness::mark("txn done");
    Ok(TxnReport {
        skipped: None,
        figures: Some(TxnFigures {
            rows,
            rows_per_txn: TXN_ROWS,
            txn_in_flight: in_flight(),
            single_rows_per_s,
            txn_rows_per_s,
            txn_per_s: txn_rows_per_s / TXN_ROWS as f64,
            publish_ratio: txn_rows_per_s / single_rows_per_s,
            commit_p50_ms: harness::percentile(&latencies, 0.5),
            commit_p99_ms: harness::percentile(&latencies, 0.99),
            sequential_commit_p50_ms: harness::percentile(&sequential, 0.5),
            sequential_commit_p99_ms: harness::percentile(&sequential, 0.99),
            single_runs,
            txn_runs,
            replay_redb_single_eps: redb.0,
            replay_redb_txn_eps: redb.1,
            replay_redb_ratio: redb.1 / redb.0,
            replay_sqlite_single_eps: sqlite.0,
            replay_sqlite_txn_eps: sqlite.1,
            replay_sqlite_ratio: sqlite.1 / sqlite.0,
        }),
    })
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Single,
    Txn,
}

/// A stream of the product's definition with atomic publish allowed, replacing any of that name.
async fn create_txn_stream(
    bench: &Bench,
    name: &str,
    prefix: &str,
    history: i64,
) -> anyhow::Result<StreamConfig> {
    bench
        .create_group_stream(StreamConfig {
            name: name.to_owned(),
            subject_prefix: prefix.to_owned(),
            history,
            provision: false,
            transactions: true,
            ..StreamConfig::default()
        })
        .await
}

/// One publish run of `side` on a fresh stream; returns rows/s. Commit latencies (ms) of the
/// transaction side are appended to `latencies`.
async fn publish_run(
    bench: &Bench,
    base: &jetsync::Client,
    side: Side,
    rows: &[Prepared],
    latencies: &mut Vec<f64>,
) -> anyhow::Result<f64> {
    let stream = create_txn_stream(bench, PUB_STREAM, PUB_PREFIX, 1).await?;
    let client = jetsync::Client::from_nats(base.nats().clone(), stream, base.origin())?;
    let started = Instant::now();
    match side {
        Side::Single => {
            let published = client
                .rows(TABLE)?
                .upsert_many(rows.iter().map(|p| (p.key.as_str(), &p.row)))
                .await
                .context("client pipelined publish")?;
            ensure!(
                published.len() == rows.len(),
                "single writes: not all acknowledged"
            );
        }
        Side::Txn => latencies.extend(commit_all(&client, rows, in_flight()).await?),
    }
    let elapsed = started.elapsed();
    let (_, last_seq) = bench.stream_state(PUB_STREAM).await?;
    ensure!(
        last_seq == rows.len() as u64,
        "{side:?} publish ended at seq {last_seq}, expected {}",
        rows.len()
    );
    bench.delete_stream(PUB_STREAM).await;
    Ok(harness::eps(rows.len() as u64, elapsed))
}

/// Commits `rows` as transactions of [`TXN_ROWS`], `in_flight` at a time; returns each
/// commit's latency in ms.
async fn commit_all(
    client: &jetsync::Client,
    rows: &[Prepared],
    in_flight: usize,
) -> anyhow::Result<Vec<f64>> {
    let table = client.rows(TABLE)?;
    futures::stream::iter(rows.chunks(TXN_ROWS))
        .map(|chunk| {
            let table = &table;
            async move {
                let mut tx = client.transaction();
                for p in chunk {
                    tx.upsert(table, &p.key, &p.row)?;
                }
                let started = Instant::now();
                let committed = tx.commit().await.context("transaction commit")?;
                ensure!(
                    committed.count == chunk.len() as u64 && !committed.duplicate,
                    "unexpected commit outcome {committed:?}"
                );
                anyhow::Ok(started.elapsed().as_secs_f64() * 1e3)
            }
        })
        .buffer_unordered(in_flight)
        .try_collect()
        .await
}

/// Replays a backlog of `rows` single events and one of the same events as transactions, into
/// redb and SQLite (each twice, means); returns ((redb single, redb txn), (sqlite single, sqlite txn)) events/s.
async fn replay_both(
    bench: &Bench,
    base: &jetsync::Client,
    rows: u64,
) -> anyhow::Result<((f64, f64), (f64, f64))> {
    const SEED: u64 = 0x5eed_0008;
    let single = replay::fill_backlog(bench, SINGLE_STREAM, SINGLE_PREFIX, rows, SEED).await?;
    let txn = create_txn_stream(bench, TXN_STREAM, TXN_PREFIX, replay::FULL_HISTORY).await?;
    let encoder = Encoder::new(TXN_PREFIX)?;
    let mut rng = Rng::new(SEED);
    let prepared: Vec<Prepared> = (0..rows)
        .map(|n| encoder.prepare(&mut rng, n))
        .collect::<anyhow::Result<_>>()?;
    let client = jetsync::Client::from_nats(base.nats().clone(), txn.clone(), base.origin())?;
    commit_all(&client, &prepared, in_flight()).await?;
    let (stored, last_seq) = bench.stream_state(TXN_STREAM).await?;
    ensure!(
        stored == rows && last_seq == rows,
        "transaction backlog: {stored} events up to seq {last_seq}, expected {rows}"
    );

    let timeout = Duration::from_secs(60 + rows / 2_000);
    let dir = tempfile::tempdir()?;
    // Each backlog twice per sink, in the order single, txn, txn, single: the mean of the two
    // runs of each tames the drift of a shared machine.
    let mut rates = [[0.0; 2]; 2];
    for (run, s) in [0usize, 1, 1, 0].into_iter().enumerate() {
        let stream = if s == 0 { &single } else { &txn };
        let kind = if s == 0 { "single" } else { "txn" };
        harness::mark(&format!("txn replay {kind} redb"));
        let instance = format!("txn-{kind}-redb-{run}");
        let mut config = harness::engine_config(&bench.url, dir.path(), &instance, stream);
        config.apply.bootstrap = false;
        let sink = RedbSink::open(RedbOptions::new(
            dir.path().join(format!("{instance}.replica.redb")),
        ))?;
        let (eps, _) = replay::engine_catch_up(config, sink, rows, rows, timeout)
            .await
            .with_context(|| format!("redb replay of the {kind} backlog"))?;
        rates[0][s] += eps / 2.0;

        harness::mark(&format!("txn replay {kind} sqlite"));
        let instance = format!("txn-{kind}-sqlite-{run}");
        let mut config = harness::engine_config(&bench.url, dir.path(), &instance, stream);
        config.apply.bootstrap = false;
        let sink = SqliteSink::open(SqliteOptions::new(
            dir.path().join(format!("{instance}.db")),
        ))?;
        let (eps, _) = replay::engine_catch_up(config, sink, rows, rows, timeout)
            .await
            .with_context(|| format!("sqlite replay of the {kind} backlog"))?;
        rates[1][s] += eps / 2.0;
    }
    bench.delete_stream(SINGLE_STREAM).await;
    bench.delete_stream(TXN_STREAM).await;
    Ok(((rates[0][0], rates[0][1]), (rates[1][0], rates[1][1])))
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions() {
        assert!(!jetsync::transaction::supports_transactions("2.9.10"));
        assert!(!jetsync::transaction::supports_transactions("2.12.0"));
        assert!(jetsync::transaction::supports_transactions("2.12.8"));
    }
}
