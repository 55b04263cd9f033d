//! Replay: catching up on a backlog. The ceiling is a raw durable pull consumer with AckAll
//! that decodes nothing and acknowledges the last message of every 1,000 with a `double_ack`
//! (the throughput recipe of the JetStream notes, and what the engine does per batch). Against
//! it: the applier engine in-process into the redb replica, and into SQLite. Every consumer
//! reads the same stream, one after the other, each with its own durable; times run from
//! the start (consumer creation included, for both sides) until the last sequence is applied.
//!
//! Every engine runs with `apply.bootstrap = false`: it catches up by replaying, as an instance
//! that fell behind does. A fresh instance (S = 0, empty sink) would otherwise join from a
//! snapshot; that is the bootstrap phase.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use futures::StreamExt;
use jetsync::StreamConfig;
use jetsync_applier::{RedbOptions, RedbSink, SqliteOptions, SqliteSink, StatsSnapshot};
use serde::Serialize;

use crate::{
    harness::{self, Bench, RunningEngine, RAW_WINDOW},
    probe::{ApplyClock, NullSink, TimedSink},
    workload::{Encoder, Rng},
};

const STREAM: &str = "BENCH_REPLAY";
const PREFIX: &str = "benchreplay";
/// Events per raw batch, and the engine's default `apply.batch_max`.
const BATCH: usize = 1000;
/// Events per row the stream keeps: enough that no event of the backlog is compacted away.
pub(crate) const FULL_HISTORY: i64 = 64;

/// Outcome of the replay phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReplayReport {
    pub(crate) raw_eps: f64,
    pub(crate) redb_eps: f64,
    pub(crate) redb_ratio: f64,
    pub(crate) sqlite_eps: f64,
    pub(crate) sqlite_ratio: f64,
    /// Backlog size.
    pub(crate) events: u64,
    /// The raw consumer ran before and after the engines; `raw_eps` is their mean.
    pub(crate) raw_runs: Vec<f64>,
    /// The engine into a sink that stores nothing: the engine's own ceiling.
    pub(crate) null_sink_eps: f64,
    pub(crate) null_sink_ratio: f64,
    pub(crate) redb: Breakdown,
    pub(crate) sqlite: Breakdown,
    pub(crate) null_sink: Breakdown,
}

pub(crate) async fn run(bench: &Bench, events: u64) -> anyhow::Result<ReplayReport> {
    let stream = fill_backlog(bench, STREAM, PREFIX, events, 0x5eed_0002).await?;
    let timeout = Duration::from_secs(60 + events / 2_000);
    let dir = tempfile::tempdir()?;

    harness::mark("replay raw 1");
    let raw_first = raw_consume(bench, &stream, "bench_raw_1", events, timeout).await?;

    harness::mark("replay engine null");
    let config = replay_config(&bench.url, dir.path(), "replay-null", &stream);
    let null = engine_replay(config, TimedSink::new(NullSink::default()), events, timeout)
        .await
        .context("replay into a null sink")?;

    harness::mark("replay engine redb");
    let config = replay_config(&bench.url, dir.path(), "replay-redb", &stream);
    let sink = RedbSink::open(RedbOptions::new(
        dir.path().join("replay-redb.replica.redb"),
    ))?;
    let redb = engine_replay(config, TimedSink::new(sink), events, timeout)
        .await
        .context("redb replay")?;

    harness::mark("replay engine sqlite");
    let config = replay_config(&bench.url, dir.path(), "replay-sqlite", &stream);
    let sink = SqliteSink::open(SqliteOptions::new(dir.path().join("replay-sqlite.db")))?;
    let sqlite = engine_replay(config, TimedSink::new(sink), events, timeout)
        .await
        .context("sqlite replay")?;

    harness::mark("replay raw 2");
    let raw_second = raw_consume(bench, &stream, "bench_raw_2", events, timeout).await?;
    harness::mark("replay done");
    bench.delete_stream(STREAM).await;

    let raw_runs = vec![raw_first, raw_second];
    let raw_eps = (raw_first + raw_second) / 2.0;
    Ok(ReplayReport {
        raw_eps,
        redb_eps: redb.eps,
        redb_ratio: redb.eps / raw_eps,
        sqlite_eps: sqlite.eps,
        sqlite_ratio: sqlite.eps / raw_eps,
        events,
        raw_runs,
        null_sink_eps: null.eps,
        null_sink_ratio: null.eps / raw_eps,
        redb: redb.breakdown,
        sqlite: sqlite.breakdown,
        null_sink: null.breakdown,
    })
}

/// An engine configuration that catches up by replaying (`apply.bootstrap = false`).
fn replay_config(
    url: &str,
    data_dir: &std::path::Path,
    instance: &str,
    stream: &StreamConfig,
) -> jetsync::Config {
    let mut config = harness::engine_config(url, data_dir, instance, stream);
    config.apply.bootstrap = false;
    config
}

/// Creates stream `name` keeping every event, and publishes `events` workload events to it
/// (raw, pipelined: setup, not measured). Checks that all of them are stored.
pub(crate) async fn fill_backlog(
    bench: &Bench,
    name: &str,
    prefix: &str,
    events: u64,
    seed: u64,
) -> anyhow::Result<StreamConfig> {
    let stream = bench.create_stream(name, prefix, FULL_HISTORY).await?;
    let encoder = Encoder::new(prefix)?;
    let mut rng = Rng::new(seed);
    let messages = (0..events).map(|n| encoder.prepare(&mut rng, n).map(|p| (p.subject, p.body)));
    let last = harness::publish_raw(&bench.js, messages, RAW_WINDOW).await?;
    let (stored, last_seq) = bench.stream_state(name).await?;
    ensure!(
        stored == events && last_seq == events && last == events,
        "backlog of {name}: {stored} events stored up to seq {last_seq}, expected {events}"
    );
    Ok(stream)
}

/// The raw ceiling: a durable pull consumer with AckAll (same settings as the applier's),
/// batches of 1,000, a `double_ack` on the last of each batch, nothing decoded. Returns events/s.
async fn raw_consume(
    bench: &Bench,
    stream: &StreamConfig,
    durable: &str,
    events: u64,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let js = bench.fresh_context().await?;
    let started = Instant::now();
    let deadline = started + timeout;
    let handle = js.get_stream(&stream.name).await?;
    let consumer: PullConsumer = handle
        .create_consumer(pull::Config {
            durable_name: Some(durable.to_owned()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::All,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            filter_subject: jetsync::group_filter(&stream.subject_prefix),
            max_ack_pending: (BATCH * 2) as i64,
            ..Default::default()
        })
        .await
        .context("creating the raw consumer")?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .context("starting the raw pull")?;
    // One deadline around the whole loop: a timer per message would tax the ceiling.
    let mut received = 0u64;
    let consume = async {
        while received < events {
            let message = match messages.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => bail!("raw pull failed after {received} events: {e}"),
                None => bail!("raw pull ended after {received} events"),
            };
            received += 1;
            if received.is_multiple_of(BATCH as u64) || received == events {
                message
                    .double_ack()
                    .await
                    .map_err(|e| anyhow::anyhow!("raw double_ack: {e}"))?;
            }
        }
        anyhow::Ok(())
    };
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, consume).await {
        Ok(result) => result?,
        Err(_) => bail!("raw pull got {received} of {events} events within {timeout:?}"),
    }
    let rate = harness::eps(events, started.elapsed());
    drop(messages);
    let _ = handle.delete_consumer(durable).await;
    Ok(rate)
}

/// Where an engine's replay time went.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Breakdown {
    /// Wall time from start to the last sequence applied.
    pub(crate) total_s: f64,
    /// Time inside `Sink::apply` (the sink transaction, commit included).
    pub(crate) sink_apply_s: f64,
    /// Batches committed.
    pub(crate) batches: u64,
}

/// An engine replay's rate and breakdown.
#[derive(Debug, Clone)]
pub(crate) struct EngineRun {
    pub(crate) eps: f64,
    pub(crate) breakdown: Breakdown,
}

/// Runs a fresh engine on `sink` until it applied seq `last` (= the backlog size).
async fn engine_replay<S: jetsync_applier::Sink + 'static>(
    config: jetsync::Config,
    (sink, clock): (TimedSink<S>, Arc<ApplyClock>),
    last: u64,
    timeout: Duration,
) -> anyhow::Result<EngineRun> {
    let started = Instant::now();
    let (eps, stats) = engine_catch_up(config, sink, last, last, timeout).await?;
    ensure!(
        stats.events_applied == last,
        "the engine applied {} events, expected {last}",
        stats.events_applied
    );
    Ok(EngineRun {
        eps,
        breakdown: Breakdown {
            total_s: started.elapsed().as_secs_f64(),
            sink_apply_s: clock.seconds(),
            batches: clock.calls(),
        },
    })
}

/// Runs a fresh engine on `sink` until it applied seq `last`; returns `counted`/s and the
/// engine's counters.
pub(crate) async fn engine_catch_up<S: jetsync_applier::Sink + 'static>(
    config: jetsync::Config,
    sink: S,
    counted: u64,
    last: u64,
    timeout: Duration,
) -> anyhow::Result<(f64, StatsSnapshot)> {
    let started = Instant::now();
    let mut engine = RunningEngine::start(config, sink);
    engine.wait_applied(last, timeout).await?;
    let elapsed = started.elapsed();
    let stats = engine.stats.snapshot();
    engine.stop().await?;
    Ok((harness::eps(counted, elapsed), stats))
}
