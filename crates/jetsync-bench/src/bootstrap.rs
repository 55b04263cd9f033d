//! Bootstrap: how fast a new instance gets the current state of every row.
//!
//! A new instance (S = 0, empty sink) joins from a snapshot (DESIGN 5, "Snapshot"): an ordered
//! consumer delivering the latest event of every row. This phase writes R rows three times each
//! on a compacted stream (`history = 1`, so the stream keeps the last write of each), starts a
//! fresh engine and measures rows/s until it applied the last sequence. Measured into the redb
//! replica (the headline figure) and into SQLite.

use std::time::Duration;

use anyhow::ensure;
use jetsync_applier::{RedbOptions, RedbSink, SqliteOptions, SqliteSink};
use serde::Serialize;

use crate::{
    harness::{self, Bench, RAW_WINDOW},
    replay,
    workload::Encoder,
};

const STREAM: &str = "BENCH_BOOT";
const PREFIX: &str = "benchboot";
const WRITES_PER_ROW: u64 = 3;

/// Outcome of the bootstrap phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BootstrapReport {
    pub(crate) rows_per_s: f64,
    /// What was measured, honestly named.
    pub(crate) method: &'static str,
    /// Sink of `rows_per_s`.
    pub(crate) sink: &'static str,
    pub(crate) sqlite_rows_per_s: f64,
    pub(crate) rows: u64,
    pub(crate) writes_per_row: u64,
}

pub(crate) async fn run(bench: &Bench, rows: u64) -> anyhow::Result<BootstrapReport> {
    let stream = bench.create_stream(STREAM, PREFIX, 1).await?;
    let encoder = Encoder::new(PREFIX)?;
    let messages = (0..WRITES_PER_ROW).flat_map(|pass| {
        let encoder = &encoder;
        (0..rows).map(move |i| encoder.prepare_key(i, pass).map(|p| (p.subject, p.body)))
    });
    let last = harness::publish_raw(&bench.js, messages, RAW_WINDOW).await?;
    let (stored, last_seq) = bench.stream_state(STREAM).await?;
    ensure!(
        stored == rows && last_seq == rows * WRITES_PER_ROW && last == last_seq,
        "compacted stream holds {stored} events up to seq {last_seq}, expected {rows} up to {}",
        rows * WRITES_PER_ROW
    );
    let timeout = Duration::from_secs(60 + rows / 1_000);
    let dir = tempfile::tempdir()?;

    let config = harness::engine_config(&bench.url, dir.path(), "boot-redb", &stream);
    let sink = RedbSink::open(RedbOptions::new(dir.path().join("boot-redb.replica.redb")))?;
    let (rows_per_s, stats) =
        replay::engine_catch_up(config, sink, rows, last_seq, timeout).await?;
    let applied = stats.events_applied;
    ensure!(
        applied == rows,
        "the redb engine applied {applied} events, expected {rows}"
    );

    let config = harness::engine_config(&bench.url, dir.path(), "boot-sqlite", &stream);
    let sink = SqliteSink::open(SqliteOptions::new(dir.path().join("boot-sqlite.db")))?;
    let (sqlite_rows_per_s, stats) =
        replay::engine_catch_up(config, sink, rows, last_seq, timeout).await?;
    let applied = stats.events_applied;
    ensure!(
        applied == rows,
        "the SQLite engine applied {applied} events, expected {rows}"
    );

    bench.delete_stream(STREAM).await;
    Ok(BootstrapReport {
        rows_per_s,
        method: "snapshot bootstrap (latest event of every row) on a compacted stream",
        sink: "redb",
        sqlite_rows_per_s,
        rows,
        writes_per_row: WRITES_PER_ROW,
    })
}
