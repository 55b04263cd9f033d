//! Flood: peak resident memory of the real `jetsync-applier` binary (SQLite sink) while events
//! of about 1 MiB each stream in (DESIGN 9: < 128 MiB "through a flood of 1 MiB events").
//!
//! The applier runs first; then the events are published as fast as the server takes them
//! (a few in flight), so it applies them live and, once it falls behind, in batches bounded by
//! `apply.batch_max_bytes`. Every body is just under the default `apply.max_event_bytes`
//! (1 MiB), so each event is decoded and written, not parked. The bench's server allows
//! payloads of 4 MiB (`main.rs`). The rows cycle over a few keys, so the SQLite file stays
//! small while the stream (history 64) keeps every event.

use std::{fs, time::Duration};

use anyhow::{ensure, Context as _};
use jetsync::{Row, Value};
use serde::Serialize;

use crate::{
    harness::{self, Bench},
    memory::{self, Applier, Process},
    replay::FULL_HISTORY,
    workload::{key, Encoder},
};

const STREAM: &str = "BENCH_FLOOD";
const PREFIX: &str = "benchflood";
const INSTANCE: &str = "bench-flood";
/// Keys the flood cycles over.
const KEYS: u64 = 20;
/// Text bytes per row: an event body of about 1,040,000 bytes, under the 1 MiB default limit.
const TEXT_BYTES: usize = 1_040_000;
/// Publishes in flight (each 1 MiB).
const WINDOW: usize = 8;

/// Outcome of the flood measurement.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FloodReport {
    pub(crate) events: u64,
    /// Size of every event body.
    pub(crate) event_bytes: u64,
    pub(crate) peak_rss_mib: f64,
    /// Body bytes applied per second (process start included).
    pub(crate) mib_per_s: f64,
}

/// Body of flood event `n`: row `key(n % KEYS)` with one text column of `TEXT_BYTES`.
fn body(encoder: &Encoder, n: u64) -> anyhow::Result<(String, bytes::Bytes)> {
    let k = key(n % KEYS);
    let mut row = Row::new();
    row.insert("id".into(), Value::Text(k.clone()));
    row.insert("n".into(), Value::I64(n as i64));
    let fill = char::from(b'a' + (n % 26) as u8);
    row.insert(
        "payload".into(),
        Value::Text(fill.to_string().repeat(TEXT_BYTES)),
    );
    Ok((encoder.subject(&k)?, encoder.body(row)?))
}

pub(crate) async fn run(
    bench: &Bench,
    events: u64,
    applier: &Applier,
) -> anyhow::Result<FloodReport> {
    let stream = bench.create_stream(STREAM, PREFIX, FULL_HISTORY).await?;
    let encoder = Encoder::new(PREFIX)?;
    let event_bytes = body(&encoder, 0)?.1.len() as u64;
    let limit = jetsync::ApplyConfig::default().max_event_bytes;
    ensure!(
        event_bytes <= limit,
        "flood events of {event_bytes} bytes exceed apply.max_event_bytes {limit}"
    );
    let dir = tempfile::tempdir()?;
    let config = memory::write_config(dir.path(), INSTANCE, &bench.url, &stream, "")?;
    let log = dir.path().join("applier.log");
    let checkpoint = dir.path().join("data").join(format!("{INSTANCE}.redb"));
    let mut process = Process::spawn(&applier.path, &config, &log)?;

    let js = bench.fresh_context().await?;
    let publisher = tokio::spawn(async move {
        let messages = (0..events).map(move |n| body(&encoder, n));
        harness::publish_raw(&js, messages, WINDOW).await
    });
    let timeout = Duration::from_secs(120 + events);
    let (peak_kib, _, elapsed) = memory::sample_peak(&mut process, &log, timeout, false, || {
        let applied = jetsync_applier::read_checkpoint(&checkpoint, STREAM)
            .map(|c| c.applied)
            .unwrap_or(0);
        (applied >= events).then_some(())
    })
    .await?;
    let last = publisher.await.context("flood publisher")??;
    ensure!(last == events, "flood: last seq {last}, expected {events}");
    let status = process.terminate(Duration::from_secs(15))?;
    ensure!(
        status.success(),
        "jetsync-applier did not exit cleanly on SIGTERM ({status}):\n{}",
        memory::tail(&fs::read_to_string(&log).unwrap_or_default(), 30)
    );
    let parked = jetsync_applier::read_parked(&checkpoint, STREAM).unwrap_or_default();
    ensure!(
        parked.is_empty(),
        "flood: {} events parked instead of applied, e.g. seq {:?}: {:?}",
        parked.len(),
        parked.first().map(|p| p.seq),
        parked.first().map(|p| &p.error)
    );
    bench.delete_stream(STREAM).await;
    Ok(FloodReport {
        events,
        event_bytes,
        peak_rss_mib: peak_kib as f64 / 1024.0,
        mib_per_s: (events * event_bytes) as f64 / 1_048_576.0 / elapsed.as_secs_f64().max(1e-9),
    })
}
