//! Resync: peak resident memory of `jetsync-applier resync` rebuilding the tables of an
//! instance from a snapshot of N rows (DESIGN 9: < 128 MiB through a 1,000,000-row resync;
//! DESIGN 5: "a resync streams the snapshot in bounded memory").
//!
//! N distinct rows are written once each on a compacted stream; `jetsync-applier run` brings a
//! fresh instance to the fence (it joins from a snapshot: a bootstrap of the same N rows, whose
//! peak is reported too) and is stopped with SIGTERM; then `jetsync-applier resync --json`
//! replaces the tables from a new snapshot, and its peak is sampled until it exits.

use std::{fs, time::Duration};

use anyhow::{ensure, Context as _};
use serde::Serialize;

use crate::{
    harness::{self, Bench, RAW_WINDOW},
    memory::{self, Applier, Process},
    workload::Encoder,
};

const STREAM: &str = "BENCH_RESYNC";
const PREFIX: &str = "benchresync";
const INSTANCE: &str = "bench-resync";

/// Outcome of the resync measurement.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ResyncReport {
    pub(crate) rows: u64,
    /// Peak of the `resync` command.
    pub(crate) peak_rss_mib: f64,
    pub(crate) resync_s: f64,
    /// Peak of the `run` that brought the instance to the fence (a bootstrap of the rows).
    pub(crate) bootstrap_peak_rss_mib: f64,
    pub(crate) bootstrap_s: f64,
}

pub(crate) async fn run(
    bench: &Bench,
    rows: u64,
    applier: &Applier,
) -> anyhow::Result<ResyncReport> {
    let stream = bench.create_stream(STREAM, PREFIX, 1).await?;
    let encoder = Encoder::new(PREFIX)?;
    let messages = (0..rows).map(|i| encoder.prepare_key(i, 0).map(|p| (p.subject, p.body)));
    let last = harness::publish_raw(&bench.js, messages, RAW_WINDOW).await?;
    ensure!(last == rows, "resync: last seq {last}, expected {rows}");

    let dir = tempfile::tempdir()?;
    let config = memory::write_config(dir.path(), INSTANCE, &bench.url, &stream, "")?;
    let checkpoint = dir.path().join("data").join(format!("{INSTANCE}.redb"));
    let timeout = Duration::from_secs(60 + rows / 2_000);

    let run_log = dir.path().join("run.log");
    let mut process = Process::spawn(&applier.path, &config, &run_log)?;
    let (bootstrap_kib, _, bootstrap) =
        memory::sample_peak(&mut process, &run_log, timeout, false, || {
            let applied = jetsync_applier::read_checkpoint(&checkpoint, STREAM)
                .map(|c| c.applied)
                .unwrap_or(0);
            (applied >= rows).then_some(())
        })
        .await?;
    let status = process.terminate(Duration::from_secs(15))?;
    ensure!(
        status.success(),
        "jetsync-applier run did not exit cleanly on SIGTERM ({status}):\n{}",
        memory::tail(&fs::read_to_string(&run_log).unwrap_or_default(), 30)
    );

    let resync_log = dir.path().join("resync.log");
    let out = dir.path().join("resync.json");
    let mut process = Process::spawn_command(
        &applier.path,
        &config,
        &["resync", "--json"],
        Some(&out),
        &resync_log,
    )?;
    let (resync_kib, _, resync) =
        memory::sample_peak(&mut process, &resync_log, timeout, true, || None::<()>).await?;
    let text = fs::read_to_string(&out)?;
    let report: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("resync --json printed {text:?}"))?;
    ensure!(
        report["applied_seq"].as_u64() == Some(rows) && report["events"].as_u64() == Some(rows),
        "resync rebuilt {report}, expected {rows} events up to seq {rows}"
    );
    bench.delete_stream(STREAM).await;
    Ok(ResyncReport {
        rows,
        peak_rss_mib: resync_kib as f64 / 1024.0,
        resync_s: resync.as_secs_f64(),
        bootstrap_peak_rss_mib: bootstrap_kib as f64 / 1024.0,
        bootstrap_s: bootstrap.as_secs_f64(),
    })
}
