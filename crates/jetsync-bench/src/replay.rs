//! Replay: catching up on a backlog of 500,000 `json/1` upserts of five columns over 100,000
//! keys (issue #16's workload; quick mode: 50,000), measured against what bounds it, all in
//! one run on the same backlog:
//!
//! - the JetStream ceiling: a raw durable pull consumer with AckAll that decodes nothing and
//!   acknowledges the last message of every 1,000 with a `double_ack` (before and after the
//!   rest; the mean of both);
//! - the engine's own ceiling: the engine in-process into a sink that stores nothing;
//! - per sink (SQLite, the redb replica, Postgres) the sink ceiling (`ceiling.rs`: the same
//!   changes straight into the sink, same batch size, no NATS), and for SQLite also the plain
//!   rusqlite fast path;
//! - the careful hand-written consumer (`handwritten.rs`, SQLite);
//! - `jetsync-applier run`, the real binary, catching up into each sink (`catchup.rs`);
//! - the hot-key workload: the same number of events on Zipf-distributed keys (s = 1.1),
//!   replayed by the binary into SQLite, against the uniform rate of this run.
//!
//! Every consumer reads the same stream, one after the other, each with its own durable; times
//! run from the start (consumer creation or process start included) until the last sequence is
//! applied. Every engine runs with `apply.bootstrap = false`: it catches up by replaying, as an
//! instance that fell behind does (a fresh instance would otherwise join from a snapshot; that
//! is the bootstrap phase).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use futures::StreamExt;
use jetsync::{codec::Format, StreamConfig};
use jetsync_applier::{Sink as _, StatsSnapshot};
use serde::Serialize;

use crate::{
    catchup, ceiling, handwritten,
    harness::{self, Bench, RunningEngine, RAW_WINDOW},
    memory::Applier,
    pg,
    probe::{ApplyClock, NullSink, TimedSink},
    workload::{Draws, Encoder, Keys, Rng, Zipf},
};

const STREAM: &str = "BENCH_REPLAY";
const PREFIX: &str = "benchreplay";
const HOT_STREAM: &str = "BENCH_HOT";
const HOT_PREFIX: &str = "benchhot";
const SEED: u64 = 0x5eed_0002;
const HOT_SEED: u64 = 0x5eed_0012;
/// Exponent of the hot-key workload's Zipf distribution.
pub(crate) const ZIPF_S: f64 = 1.1;
/// Events per raw batch, and the engine's default `apply.batch_max`.
const BATCH: usize = 1000;
/// Events per row the stream keeps: enough that no event of the backlog is compacted away.
pub(crate) const FULL_HISTORY: i64 = 64;

/// Outcome of the replay phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReplayReport {
    /// Backlog size.
    pub(crate) events: u64,
    /// Body format of the backlog.
    pub(crate) format: &'static str,
    /// Key distribution of the backlog.
    pub(crate) keys: String,
    /// Batch size of every writer (`apply.batch_max` of the engines).
    pub(crate) batch: usize,
    /// The JetStream ceiling: raw pull-consume rate (mean of `raw_runs`).
    pub(crate) raw_eps: f64,
    /// The raw consumer ran before and after the rest.
    pub(crate) raw_runs: Vec<f64>,
    /// CPU time per event (µs) of the nats-server while the raw consumer ran (mean of the
    /// runs that measured it).
    pub(crate) raw_server_cpu_us: Option<f64>,
    /// CPU time per event (µs) of the raw consumer's process (the bench) meanwhile.
    pub(crate) raw_client_cpu_us: Option<f64>,
    /// CPU time per event (µs) of the engine into the null sink (receiving, decoding,
    /// checking, acknowledging: everything but a sink's writes).
    pub(crate) null_sink_cpu_us: Option<f64>,
    /// CPU time per event (µs) of the nats-server while the null-sink engine ran.
    pub(crate) null_sink_server_cpu_us: Option<f64>,
    /// Cores of the machine, which the server, the consumer and the sink share.
    pub(crate) cores: usize,
    /// The engine in-process into a sink that stores nothing: the engine's own ceiling.
    pub(crate) null_sink_eps: f64,
    /// `null_sink_eps / raw_eps`.
    pub(crate) null_sink_ratio: f64,
    pub(crate) null_sink: Breakdown,
    pub(crate) sqlite: Option<SinkFigures>,
    pub(crate) redb: Option<SinkFigures>,
    pub(crate) postgres: Option<SinkFigures>,
    /// The careful hand-written consumer (SQLite).
    pub(crate) handwritten_eps: Option<f64>,
    /// `sqlite.replay_eps / handwritten_eps` (target >= 1.3).
    pub(crate) replay_vs_handwritten: Option<f64>,
    pub(crate) hot_key: Option<HotKey>,
    /// Whether the `jetsync-applier` binary was rebuilt from the current sources for this run.
    pub(crate) binary_fresh: bool,
    /// Parts of the phase that failed (the rest was measured).
    #[serde(skip)]
    pub(crate) failures: Vec<(&'static str, String)>,
}

/// One sink's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct SinkFigures {
    /// The sink ceiling through the sink's own `Sink::apply` (events/s of time in `apply`).
    pub(crate) sink_apply_eps: Option<f64>,
    /// CPU time per event (µs) of that ceiling, every thread of the sink included.
    pub(crate) sink_apply_cpu_us: Option<f64>,
    /// SQLite only: the plain rusqlite fast path (prepared upsert, 1,000 per transaction, the
    /// sink's settings).
    pub(crate) plain_eps: Option<f64>,
    /// The ceiling the target uses: the higher of `sink_apply_eps` and `plain_eps`.
    pub(crate) ceiling_eps: Option<f64>,
    /// Which of the two `ceiling_eps` is: `"Sink::apply"` or `"plain rusqlite"`.
    pub(crate) ceiling_from: Option<&'static str>,
    /// `jetsync-applier run` catching up (process start included).
    pub(crate) replay_eps: Option<f64>,
    /// `replay_eps / ceiling_eps` (target >= 0.9 SQLite and redb, >= 0.8 Postgres).
    pub(crate) replay_ratio: Option<f64>,
    /// `replay_eps / sink_apply_eps`.
    pub(crate) replay_vs_sink_apply: Option<f64>,
    /// `replay_eps / raw_eps`.
    pub(crate) replay_vs_raw: Option<f64>,
    /// CPU time per event (µs) of the `jetsync-applier` process through its replay.
    pub(crate) replay_applier_cpu_us: Option<f64>,
    /// CPU time per event (µs) of the nats-server through that replay.
    pub(crate) replay_server_cpu_us: Option<f64>,
    /// What the machine's cores allow the engine with this sink, were every core busy all the
    /// time: `cores` / (CPU per event of the engine into the null sink and of the server
    /// meanwhile + the `Sink::apply` ceiling's CPU per event). SQLite and redb only (the
    /// Postgres sink's work is mostly in another process).
    pub(crate) cores_bound_eps: Option<f64>,
    /// `replay_eps / cores_bound_eps`.
    pub(crate) replay_vs_cores_bound: Option<f64>,
    /// Peak RSS of the binary through this replay (MiB).
    pub(crate) replay_peak_rss_mib: Option<f64>,
}

impl SinkFigures {
    /// Takes the figures of the `Sink::apply` ceiling.
    fn ceiling(&mut self, ceiling: Option<ceiling::Ceiling>) {
        self.sink_apply_eps = ceiling.map(|c| c.eps);
        self.sink_apply_cpu_us = ceiling.and_then(|c| c.cpu_us);
    }

    /// Takes the figures of the binary's replay.
    fn took(&mut self, c: &catchup::CatchUp) {
        self.replay_eps = Some(c.eps);
        self.replay_peak_rss_mib = Some(c.peak_rss_mib);
        self.replay_applier_cpu_us = c.applier_cpu_us;
        self.replay_server_cpu_us = c.server_cpu_us;
    }

    fn settle(&mut self, raw_eps: f64, engine_cpu_us: Option<f64>, cores: usize, bounded: bool) {
        let ceiling = match (self.sink_apply_eps, self.plain_eps) {
            (Some(s), Some(p)) if p > s => Some((p, "plain rusqlite")),
            (Some(s), _) => Some((s, "Sink::apply")),
            (None, Some(p)) => Some((p, "plain rusqlite")),
            (None, None) => None,
        };
        self.ceiling_eps = ceiling.map(|c| c.0);
        self.ceiling_from = ceiling.map(|c| c.1);
        if let Some(replay) = self.replay_eps {
            self.replay_ratio = self.ceiling_eps.map(|c| replay / c);
            self.replay_vs_sink_apply = self.sink_apply_eps.map(|c| replay / c);
            self.replay_vs_raw = Some(replay / raw_eps);
        }
        if let (true, Some(engine_us), Some(sink_us)) =
            (bounded, engine_cpu_us, self.sink_apply_cpu_us)
        {
            let bound = cores as f64 * 1e6 / (engine_us + sink_us);
            self.cores_bound_eps = Some(bound);
            self.replay_vs_cores_bound = self.replay_eps.map(|r| r / bound);
        }
    }
}

/// The hot-key workload against the uniform one.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HotKey {
    /// Key distribution of the hot-key backlog.
    pub(crate) keys: String,
    /// Share of the events that go to the hottest key.
    pub(crate) top_key_share: f64,
    /// Mean distinct keys per 1,000 consecutive events (what coalescing can shrink a batch to).
    pub(crate) distinct_keys_per_1000: f64,
    /// The sink of both replays.
    pub(crate) sink: &'static str,
    /// `jetsync-applier run` into SQLite on the hot-key backlog.
    pub(crate) replay_eps: f64,
    /// The same on the uniform backlog (`sqlite.replay_eps`).
    pub(crate) uniform_replay_eps: f64,
    /// `replay_eps / uniform_replay_eps` (target >= 2 with coalescing on).
    pub(crate) ratio: f64,
}

/// Records a part's failure and goes on.
fn part<T>(
    failures: &mut Vec<(&'static str, String)>,
    name: &'static str,
    result: anyhow::Result<T>,
) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("{name}: FAILED: {e:#}");
            failures.push((name, format!("{e:#}")));
            None
        }
    }
}

pub(crate) async fn run(
    bench: &Bench,
    events: u64,
    applier: Option<&Applier>,
) -> anyhow::Result<ReplayReport> {
    let batch = harness::batch_max();
    let uniform = Draws::new(SEED, Keys::Uniform);
    let stream = fill(bench, STREAM, PREFIX, events, uniform.clone()).await?;
    let timeout = Duration::from_secs(60 + events / 2_000);
    let keep = std::env::var_os("JETSYNC_BENCH_KEEP").is_some();
    let dir = tempfile::Builder::new().disable_cleanup(keep).tempdir()?;
    if keep {
        println!(
            "replay: keeping {} (JETSYNC_BENCH_KEEP)",
            dir.path().display()
        );
    }
    let mut failures = Vec::new();
    let url = bench.url.clone();

    harness::mark("replay raw 1");
    let raw_first = raw_consume(bench, &stream, "bench_raw_1", events, timeout).await?;

    harness::mark("replay engine null");
    let config = replay_config(&bench.url, dir.path(), "replay-null", &stream);
    let null = engine_replay(config, TimedSink::new(NullSink::default()), events, timeout)
        .await
        .context("replay into a null sink")?;

    // Per sink, its ceilings (the same changes straight into it) and then the real binary into
    // it, next to each other in time: on a shared machine the disk's and the cores' load moves
    // within minutes, and each ratio compares two neighbouring measurements.
    let mut sqlite = SinkFigures::default();
    let mut redb = SinkFigures::default();
    let mut postgres = SinkFigures::default();
    if applier.is_none() {
        failures.push((
            "replay-binary",
            "no jetsync-applier binary (see the build error)".into(),
        ));
    }
    harness::mark("replay sqlite");
    sqlite.ceiling(part(
        &mut failures,
        "replay-sqlite-ceiling",
        sink_ceiling(
            &url,
            dir.path(),
            "ceil-sqlite",
            "kind = \"sqlite\"\n",
            uniform.clone(),
            events,
        )
        .await,
    ));
    let plain_path = dir.path().join("plain.db");
    sqlite.plain_eps = part(
        &mut failures,
        "replay-sqlite-plain",
        tokio::task::block_in_place(|| {
            ceiling::plain_sqlite(&plain_path, uniform.clone(), events, batch)
        }),
    );
    if let Some(applier) = applier {
        if let Some(c) = part(
            &mut failures,
            "replay-sqlite",
            catchup::run(
                applier,
                &dir.path().join("bin-sqlite"),
                "replay-sqlite",
                &url,
                &stream,
                "kind = \"sqlite\"\n",
                "",
                events,
            )
            .await,
        ) {
            sqlite.took(&c);
        }
    }
    harness::mark("replay redb");
    redb.ceiling(part(
        &mut failures,
        "replay-redb-ceiling",
        sink_ceiling(
            &url,
            dir.path(),
            "ceil-redb",
            "kind = \"redb\"\n",
            uniform.clone(),
            events,
        )
        .await,
    ));
    if let Some(applier) = applier {
        if let Some(c) = part(
            &mut failures,
            "replay-redb",
            catchup::run(
                applier,
                &dir.path().join("bin-redb"),
                "replay-redb",
                &url,
                &stream,
                "kind = \"redb\"\n",
                "",
                events,
            )
            .await,
        ) {
            redb.took(&c);
        }
    }
    harness::mark("replay postgres");
    postgres.ceiling(part(
        &mut failures,
        "replay-postgres-ceiling",
        pg_ceiling(&url, dir.path(), uniform.clone(), events).await,
    ));
    if let Some(applier) = applier {
        if let Some(c) = part(
            &mut failures,
            "replay-postgres",
            pg_replay(applier, dir.path(), &url, &stream, events).await,
        ) {
            postgres.took(&c);
        }
    }

    harness::mark("replay handwritten");
    let handwritten_eps = part(
        &mut failures,
        "replay-handwritten",
        handwritten::run(
            bench,
            &stream,
            &dir.path().join("handwritten.db"),
            events,
            batch,
            timeout,
        )
        .await,
    );

    harness::mark("replay raw 2");
    let raw_second = raw_consume(bench, &stream, "bench_raw_2", events, timeout).await?;
    bench.delete_stream(STREAM).await;

    let raw_runs = vec![raw_first.eps, raw_second.eps];
    let raw_eps = (raw_first.eps + raw_second.eps) / 2.0;
    let mean = |f: fn(&RawRun) -> Option<f64>| {
        let v: Vec<f64> = [&raw_first, &raw_second]
            .into_iter()
            .filter_map(f)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let raw_server_cpu_us = mean(|r| r.server_cpu_us);
    let raw_client_cpu_us = mean(|r| r.client_cpu_us);
    // The engine's own work and the server's, per event, without a sink.
    let engine_cpu_us = null.server_cpu_us.zip(null.cpu_us).map(|(s, c)| s + c);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (figures, bounded) in [
        (&mut sqlite, true),
        (&mut redb, true),
        (&mut postgres, false),
    ] {
        figures.settle(raw_eps, engine_cpu_us, cores, bounded);
    }

    // The hot-key workload.
    harness::mark("replay hot key");
    let hot_key = match (applier, sqlite.replay_eps) {
        (Some(applier), Some(uniform_eps)) => part(
            &mut failures,
            "replay-hotkey",
            hot_key(bench, dir.path(), applier, events, uniform_eps).await,
        ),
        _ => None,
    };
    harness::mark("replay done");

    let replay_vs_handwritten = match (sqlite.replay_eps, handwritten_eps) {
        (Some(r), Some(h)) => Some(r / h),
        _ => None,
    };
    let present =
        |f: SinkFigures| (f.sink_apply_eps.is_some() || f.replay_eps.is_some()).then_some(f);
    Ok(ReplayReport {
        events,
        format: "json/1",
        keys: Keys::Uniform.describe(),
        batch,
        raw_eps,
        raw_runs,
        raw_server_cpu_us,
        raw_client_cpu_us,
        null_sink_cpu_us: null.cpu_us,
        null_sink_server_cpu_us: null.server_cpu_us,
        cores,
        null_sink_eps: null.eps,
        null_sink_ratio: null.eps / raw_eps,
        null_sink: null.breakdown,
        sqlite: present(sqlite),
        redb: present(redb),
        postgres: present(postgres),
        handwritten_eps,
        replay_vs_handwritten,
        hot_key,
        binary_fresh: applier.is_some_and(|a| a.fresh),
        failures,
    })
}

/// Creates stream `name` keeping every event (no per-row limit: a hot key gets far more than
/// [`FULL_HISTORY`] events) and publishes `events` `json/1` events of `draws` to it.
async fn fill(
    bench: &Bench,
    name: &str,
    prefix: &str,
    events: u64,
    draws: Draws,
) -> anyhow::Result<StreamConfig> {
    let stream = bench.create_stream_keeping_all(name, prefix).await?;
    let encoder = Encoder::with_format(prefix, Format::Json1)?;
    let messages = draws
        .take(events as usize)
        .map(|(i, n)| encoder.prepare_key(i, n).map(|p| (p.subject, p.body)));
    let last = harness::publish_raw_as(&bench.js, messages, RAW_WINDOW, encoder.format()).await?;
    check_stored(bench, name, events, last).await?;
    Ok(stream)
}

async fn check_stored(bench: &Bench, name: &str, events: u64, last: u64) -> anyhow::Result<()> {
    let (stored, last_seq) = bench.stream_state(name).await?;
    ensure!(
        stored == events && last_seq == events && last == events,
        "backlog of {name}: {stored} events stored up to seq {last_seq}, expected {events}"
    );
    Ok(())
}

/// The ceiling of the sink `[sink]` = `sink_toml` builds (`jetsync_applier::build_sink`, the
/// binary's own code path), fed `events` changes of `draws`.
async fn sink_ceiling(
    url: &str,
    dir: &std::path::Path,
    instance: &str,
    sink_toml: &str,
    draws: Draws,
    events: u64,
) -> anyhow::Result<ceiling::Ceiling> {
    let stream = StreamConfig {
        name: format!("CEIL_{instance}"),
        subject_prefix: "ceil".into(),
        ..StreamConfig::default()
    };
    let path = crate::memory::write_config_with(dir, instance, url, &stream, sink_toml, "")?;
    let config = jetsync::Config::load(Some(&path))?;
    let mut sink = jetsync_applier::build_sink(&config).await?;
    let _ = sink.fence(&stream.name).await?;
    ceiling::through_sink(&mut sink, &stream.name, draws, events, harness::batch_max()).await
}

/// The Postgres sink ceiling, in a fresh schema.
async fn pg_ceiling(
    url: &str,
    dir: &std::path::Path,
    draws: Draws,
    events: u64,
) -> anyhow::Result<ceiling::Ceiling> {
    let schema = pg::Schema::create("ceiling").await?;
    let sink = pg_sink_toml(&schema.name);
    let result = sink_ceiling(
        url,
        &dir.join("pg-ceiling"),
        "ceil-pg",
        &sink,
        draws,
        events,
    )
    .await;
    let rows = schema.rows().await;
    schema.drop().await;
    let rate = result?;
    ensure!(
        rows? > 0,
        "no rows in the Postgres table after the ceiling run"
    );
    Ok(rate)
}

/// `[sink]` of the Postgres sink in `schema`.
fn pg_sink_toml(schema: &str) -> String {
    format!(
        "kind = \"postgres\"\nurl = {:?}\nschema = {schema:?}\n",
        pg::url()
    )
}

/// `jetsync-applier run` into a fresh Postgres schema.
async fn pg_replay(
    applier: &Applier,
    dir: &std::path::Path,
    url: &str,
    stream: &StreamConfig,
    events: u64,
) -> anyhow::Result<catchup::CatchUp> {
    let schema = pg::Schema::create("replay").await?;
    let sink = pg_sink_toml(&schema.name);
    let result = catchup::run(
        applier,
        &dir.join("bin-pg"),
        "replay-pg",
        url,
        stream,
        &sink,
        "",
        events,
    )
    .await;
    schema.drop().await;
    result
}

/// The hot-key backlog (Zipf keys, same size), replayed by the binary into SQLite.
async fn hot_key(
    bench: &Bench,
    dir: &std::path::Path,
    applier: &Applier,
    events: u64,
    uniform_replay_eps: f64,
) -> anyhow::Result<HotKey> {
    let zipf = Zipf::new(ZIPF_S);
    let top_key_share = zipf.top_share();
    let keys = Keys::Zipf(zipf);
    let draws = Draws::new(HOT_SEED, keys.clone());
    let distinct_keys_per_1000 = distinct_per_1000(draws.clone(), events);
    let stream = fill(bench, HOT_STREAM, HOT_PREFIX, events, draws).await?;
    let result = catchup::run(
        applier,
        &dir.join("bin-hot"),
        "replay-hot",
        &bench.url,
        &stream,
        "kind = \"sqlite\"\n",
        "",
        events,
    )
    .await;
    bench.delete_stream(HOT_STREAM).await;
    let replay_eps = result?.eps;
    Ok(HotKey {
        keys: keys.describe(),
        top_key_share,
        distinct_keys_per_1000,
        sink: "sqlite",
        replay_eps,
        uniform_replay_eps,
        ratio: replay_eps / uniform_replay_eps,
    })
}

/// Mean number of distinct keys in each run of 1,000 consecutive events.
fn distinct_per_1000(draws: Draws, events: u64) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0usize;
    let mut chunks = 0usize;
    for (n, (i, _)) in draws.take(events as usize).enumerate() {
        seen.insert(i);
        if (n + 1) % 1000 == 0 {
            total += seen.len();
            chunks += 1;
            seen.clear();
        }
    }
    total as f64 / chunks.max(1) as f64
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
/// One raw pull-consume run.
struct RawRun {
    eps: f64,
    /// CPU time per event (µs) of the nats-server.
    server_cpu_us: Option<f64>,
    /// CPU time per event (µs) of this process (the consumer).
    client_cpu_us: Option<f64>,
}

async fn raw_consume(
    bench: &Bench,
    stream: &StreamConfig,
    durable: &str,
    events: u64,
    timeout: Duration,
) -> anyhow::Result<RawRun> {
    let js = bench.fresh_context().await?;
    let (server_cpu, client_cpu) = (
        harness::CpuMark::now(harness::server_pid()),
        harness::CpuMark::own(),
    );
    let started = Instant::now();
    let deadline = started + timeout;
    let consumer = harness::ack_all_consumer(&js, stream, durable, BATCH).await?;
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
    let run = RawRun {
        eps: rate,
        server_cpu_us: server_cpu.us_per_event(events),
        client_cpu_us: client_cpu.us_per_event(events),
    };
    drop(messages);
    let _ = js.delete_consumer_from_stream(durable, &stream.name).await;
    Ok(run)
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
    /// CPU time per event (µs) of this process (the engine and its sink).
    pub(crate) cpu_us: Option<f64>,
    /// CPU time per event (µs) of the nats-server meanwhile.
    pub(crate) server_cpu_us: Option<f64>,
    pub(crate) breakdown: Breakdown,
}

/// Runs a fresh engine on `sink` until it applied seq `last` (= the backlog size).
async fn engine_replay<S: jetsync_applier::Sink + 'static>(
    config: jetsync::Config,
    (sink, clock): (TimedSink<S>, Arc<ApplyClock>),
    last: u64,
    timeout: Duration,
) -> anyhow::Result<EngineRun> {
    let (server_cpu, own_cpu) = (
        harness::CpuMark::now(harness::server_pid()),
        harness::CpuMark::own(),
    );
    let started = Instant::now();
    let (eps, stats) = engine_catch_up(config, sink, last, last, timeout).await?;
    let (cpu_us, server_cpu_us) = (own_cpu.us_per_event(last), server_cpu.us_per_event(last));
    ensure!(
        stats.events_applied == last,
        "the engine applied {} events, expected {last}",
        stats.events_applied
    );
    Ok(EngineRun {
        eps,
        cpu_us,
        server_cpu_us,
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
