//! Publish: raw async-nats pipelined JetStream publish against the client's pipelined publish
//! (`Table::upsert_many`) of the same rows, same subjects, same key distribution.
//!
//! The raw side is the ceiling: it is handed the finished subjects and bodies and only adds the
//! headers the client sends. The client side is handed rows and does everything a service's
//! call does (row → event, encode, subject, headers, publish, collect outcomes). Both keep
//! `jetsync::DEFAULT_PIPELINE_WINDOW` acknowledgements in flight. Runs alternate (raw, client,
//! client, raw, ...) on a stream recreated before every run, and the medians are compared, which
//! tames the drift of a shared machine.

use std::time::Instant;

use anyhow::{ensure, Context as _};
use serde::Serialize;

use crate::{
    harness::{self, Bench, RAW_WINDOW},
    workload::{Encoder, Prepared, Rng, ORIGIN, TABLE},
};

const STREAM: &str = "BENCH_PUB";
const PREFIX: &str = "benchpub";

/// Outcome of the publish phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PublishReport {
    pub(crate) raw_eps: f64,
    pub(crate) client_eps: f64,
    pub(crate) ratio: f64,
    /// Events per run.
    pub(crate) events: u64,
    /// Acknowledgements in flight, both sides.
    pub(crate) window: usize,
    /// Average encoded body size in bytes.
    pub(crate) body_bytes: f64,
    pub(crate) raw_runs: Vec<f64>,
    pub(crate) client_runs: Vec<f64>,
    /// CPU the client spends per event before anything reaches async-nats, measured on one
    /// thread over the same rows (ns): what the raw side is spared.
    pub(crate) client_cpu_ns: ClientCpu,
}

/// Per-event costs of the client's own work, in nanoseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ClientCpu {
    /// `Client::rows()`'s `to_row`: a clone of the row.
    pub(crate) row_clone: f64,
    /// `Event::upsert` (origin copied) + `codec::encode` (postcard), of an already cloned row.
    pub(crate) event_encode: f64,
    /// `row_subject` (key validation + formatting).
    pub(crate) subject: f64,
}

/// Measures [`ClientCpu`] over `rows`.
fn client_cpu(encoder: &Encoder, rows: &[Prepared]) -> anyhow::Result<ClientCpu> {
    let n = rows.len().max(1) as f64;
    let started = Instant::now();
    let clones: Vec<jetsync::Row> = rows.iter().map(|p| p.row.clone()).collect();
    let row_clone = started.elapsed().as_nanos() as f64 / n;
    let started = Instant::now();
    let mut bytes = 0usize;
    for row in clones {
        bytes += encoder.body(row)?.len();
    }
    let event_encode = started.elapsed().as_nanos() as f64 / n;
    let started = Instant::now();
    for p in rows {
        bytes += encoder.subject(&p.key)?.len();
    }
    let subject = started.elapsed().as_nanos() as f64 / n;
    std::hint::black_box(bytes);
    Ok(ClientCpu {
        row_clone,
        event_encode,
        subject,
    })
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Raw,
    Client,
}

pub(crate) async fn run(
    bench: &Bench,
    events: u64,
    rounds: usize,
) -> anyhow::Result<PublishReport> {
    let encoder = Encoder::new(PREFIX)?;
    let mut rng = Rng::new(0x5eed_0001);
    let prepared: Vec<Prepared> = (0..events)
        .map(|n| encoder.prepare(&mut rng, n))
        .collect::<anyhow::Result<_>>()?;
    let body_bytes =
        prepared.iter().map(|p| p.body.len()).sum::<usize>() as f64 / prepared.len().max(1) as f64;

    let client_cpu_ns = client_cpu(&encoder, &prepared)?;
    let raw_js = bench.fresh_context().await?;
    let mut config = jetsync::Config {
        instance: ORIGIN.to_owned(),
        ..jetsync::Config::default()
    };
    config.nats.url = bench.url.clone();
    let client = jetsync::Client::connect(&config)
        .await
        .context("connecting the jetsync client")?;

    // Warm both paths up (connections, allocator, server) on a slice of the workload.
    let warm = &prepared[..prepared.len().min(20_000)];
    run_side(bench, &raw_js, &client, Side::Raw, warm).await?;
    run_side(bench, &raw_js, &client, Side::Client, warm).await?;

    let mut raw_runs = Vec::new();
    let mut client_runs = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Side::Raw, Side::Client]
        } else {
            [Side::Client, Side::Raw]
        };
        for side in order {
            harness::mark(&format!("publish {side:?} round {round}"));
            let rate = run_side(bench, &raw_js, &client, side, &prepared).await?;
            match side {
                Side::Raw => raw_runs.push(rate),
                Side::Client => client_runs.push(rate),
            }
        }
    }
    harness::mark("publish done");
    let raw_eps = harness::median(&raw_runs);
    let client_eps = harness::median(&client_runs);
    Ok(PublishReport {
        raw_eps,
        client_eps,
        ratio: client_eps / raw_eps,
        events,
        window: RAW_WINDOW,
        body_bytes,
        raw_runs,
        client_runs,
        client_cpu_ns,
    })
}

/// One run of `side` on a fresh stream; returns events/s.
async fn run_side(
    bench: &Bench,
    raw_js: &async_nats::jetstream::Context,
    client: &jetsync::Client,
    side: Side,
    rows: &[Prepared],
) -> anyhow::Result<f64> {
    let stream = bench.create_stream(STREAM, PREFIX, 1).await?;
    let client = client_for(client, &stream)?;
    let started = Instant::now();
    let last = match side {
        Side::Raw => {
            let messages = rows.iter().map(|p| Ok((p.subject.clone(), p.body.clone())));
            harness::publish_raw(raw_js, messages, RAW_WINDOW).await?
        }
        Side::Client => {
            let table = client.rows(TABLE)?;
            let published = table
                .upsert_many(rows.iter().map(|p| (p.key.as_str(), &p.row)))
                .await
                .context("client pipelined publish")?;
            published.last().map_or(0, |p| p.seq)
        }
    };
    let elapsed = started.elapsed();
    ensure!(
        last == rows.len() as u64,
        "{side:?} publish ended at seq {last}, expected {}",
        rows.len()
    );
    bench.delete_stream(STREAM).await;
    Ok(harness::eps(rows.len() as u64, elapsed))
}

/// A client on `stream` sharing `base`'s connection.
fn client_for(
    base: &jetsync::Client,
    stream: &jetsync::StreamConfig,
) -> anyhow::Result<jetsync::Client> {
    Ok(jetsync::Client::from_nats(
        base.nats().clone(),
        stream.clone(),
        base.origin(),
    )?)
}
