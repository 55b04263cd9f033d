//! Shared plumbing of the phases: streams, the raw pipelined publisher, in-process engines,
//! bounded waits and percentiles.

use std::{
    collections::VecDeque,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use async_nats::{
    jetstream::{self, context::PublishAckFuture, message::PublishMessage},
    HeaderMap,
};
use bytes::Bytes;
use jetsync::{codec::FORMAT_HEADER, Config, StreamConfig};
use jetsync_applier::{Engine, EngineError, Sink, Stats};
use tokio::{sync::oneshot, task::JoinHandle};

/// In-flight window of the raw pipelined publisher: the client's default, so both sides of the
/// publish comparison pipeline equally deep.
pub(crate) const RAW_WINDOW: usize = jetsync::DEFAULT_PIPELINE_WINDOW;

/// The server and a raw connection to it, shared by every phase.
pub(crate) struct Bench {
    pub(crate) url: String,
    pub(crate) js: jetstream::Context,
}

impl Bench {
    pub(crate) async fn connect(url: &str) -> anyhow::Result<Bench> {
        let nats = async_nats::connect(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(Bench {
            url: url.to_owned(),
            js: jetstream::new(nats),
        })
    }

    /// A fresh JetStream connection (its own socket), for phases that must not share one.
    pub(crate) async fn fresh_context(&self) -> anyhow::Result<jetstream::Context> {
        let nats = async_nats::connect(&self.url)
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        Ok(jetstream::new(nats))
    }

    /// Creates the stream of sync group `name`/`prefix` with the product's definition (file
    /// storage, `history` events per row), replacing any stream of that name.
    pub(crate) async fn create_stream(
        &self,
        name: &str,
        prefix: &str,
        history: i64,
    ) -> anyhow::Result<StreamConfig> {
        self.create_group_stream(StreamConfig {
            name: name.to_owned(),
            subject_prefix: prefix.to_owned(),
            history,
            provision: false,
            ..StreamConfig::default()
        })
        .await
    }

    /// Creates the stream `cfg` describes with the product's definition, replacing any stream
    /// of that name.
    pub(crate) async fn create_group_stream(
        &self,
        cfg: StreamConfig,
    ) -> anyhow::Result<StreamConfig> {
        let _ = self.js.delete_stream(&cfg.name).await;
        self.js
            .create_stream(jetsync::stream_definition(&cfg))
            .await
            .with_context(|| format!("creating stream {}", cfg.name))?;
        Ok(cfg)
    }

    /// Creates the stream of sync group `name`/`prefix` like [`Bench::create_stream`] with
    /// `history` = 64 in the configuration, but keeping every event of every row on the server
    /// (`max_msgs_per_subject = -1`), for backlogs with hot keys: the engine does not check
    /// this limit of a stream it does not provision.
    pub(crate) async fn create_stream_keeping_all(
        &self,
        name: &str,
        prefix: &str,
    ) -> anyhow::Result<StreamConfig> {
        let cfg = StreamConfig {
            name: name.to_owned(),
            subject_prefix: prefix.to_owned(),
            history: 64,
            provision: false,
            ..StreamConfig::default()
        };
        let _ = self.js.delete_stream(name).await;
        let mut definition = jetsync::stream_definition(&cfg);
        definition.max_messages_per_subject = -1;
        self.js
            .create_stream(definition)
            .await
            .with_context(|| format!("creating stream {name}"))?;
        Ok(cfg)
    }

    /// Deletes a stream (best effort: phases clean up after themselves to keep the server lean).
    pub(crate) async fn delete_stream(&self, name: &str) {
        let _ = self.js.delete_stream(name).await;
    }

    /// Stream message count and last sequence.
    pub(crate) async fn stream_state(&self, name: &str) -> anyhow::Result<(u64, u64)> {
        let mut stream = self.js.get_stream(name).await?;
        let info = stream.info().await?;
        Ok((info.state.messages, info.state.last_sequence))
    }
}

/// Publishes `messages` (subject, body) pipelined with `window` acknowledgements in flight,
/// with the headers the client sends (a fresh `Nats-Msg-Id`, `Jetsync-Format: postcard/1`).
/// Returns the last acknowledged sequence. Every acknowledgement is awaited and checked.
pub(crate) async fn publish_raw<I>(
    js: &jetstream::Context,
    messages: I,
    window: usize,
) -> anyhow::Result<u64>
where
    I: IntoIterator<Item = anyhow::Result<(String, Bytes)>>,
{
    publish_raw_as(js, messages, window, jetsync::codec::Format::Postcard1).await
}

/// [`publish_raw`] of bodies in `format` (the `Jetsync-Format` header names it).
pub(crate) async fn publish_raw_as<I>(
    js: &jetstream::Context,
    messages: I,
    window: usize,
    format: jetsync::codec::Format,
) -> anyhow::Result<u64>
where
    I: IntoIterator<Item = anyhow::Result<(String, Bytes)>>,
{
    let mut in_flight: VecDeque<PublishAckFuture> = VecDeque::with_capacity(window);
    let mut last = 0;
    for message in messages {
        let (subject, body) = message?;
        if in_flight.len() >= window {
            if let Some(pending) = in_flight.pop_front() {
                last = pending
                    .await
                    .context("raw publish acknowledgement")?
                    .sequence;
            }
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", nuid::next().to_string().as_str());
        headers.insert(FORMAT_HEADER, format.header_value());
        let publish = PublishMessage::build().payload(body).headers(headers);
        let pending = js
            .send_publish(subject, publish)
            .await
            .context("raw publish")?;
        in_flight.push_back(pending);
    }
    while let Some(pending) = in_flight.pop_front() {
        last = pending
            .await
            .context("raw publish acknowledgement")?
            .sequence;
    }
    Ok(last)
}

/// The configuration of an in-process engine for `instance` on `stream`, data under `data_dir`.
pub(crate) fn engine_config(
    url: &str,
    data_dir: &Path,
    instance: &str,
    stream: &StreamConfig,
) -> Config {
    let mut config = Config {
        instance: instance.to_owned(),
        data_dir: data_dir.to_owned(),
        ..Config::default()
    };
    config.nats.url = url.to_owned();
    config.stream = stream.clone();
    config.stream.provision = false;
    // Only configured tables are applied (others are parked as "not synced here").
    config.tables.insert(
        crate::workload::TABLE.to_owned(),
        jetsync::TableConfig {
            key: "id".to_owned(),
            ..jetsync::TableConfig::default()
        },
    );
    if let Some(&batch_max) = BATCH_MAX.get() {
        config.apply.batch_max = batch_max;
    }
    // Experiments: `JETSYNC_BENCH_BATCH_WAIT_MS` overrides `apply.batch_wait_ms`.
    if let Some(ms) = std::env::var("JETSYNC_BENCH_BATCH_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.apply.batch_wait_ms = ms;
    }
    config
}

/// `--batch-max N`: overrides `apply.batch_max` of every engine the bench runs (experiments).
pub(crate) static BATCH_MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// The `apply.batch_max` the bench's engines run with.
pub(crate) fn batch_max() -> usize {
    BATCH_MAX
        .get()
        .copied()
        .unwrap_or_else(|| jetsync::ApplyConfig::default().batch_max)
}

/// An engine running in this process.
pub(crate) struct RunningEngine {
    pub(crate) stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), EngineError>>>,
}

impl RunningEngine {
    /// Spawns `Engine::new(config, sink).run(..)` on the runtime.
    pub(crate) fn start<S: Sink + 'static>(config: Config, sink: S) -> RunningEngine {
        let engine = Engine::new(config, sink);
        let stats = engine.stats();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(engine.run(async move {
            let _ = stopped.await;
        }));
        RunningEngine {
            stats,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub(crate) fn applied(&self) -> u64 {
        self.stats.snapshot().applied_seq
    }

    /// Whether the engine task ended (an error, since only `stop` ends it normally).
    pub(crate) fn finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits until the engine applied `seq`, polling every millisecond; fails after `timeout` or
    /// if the engine stopped.
    pub(crate) async fn wait_applied(&mut self, seq: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.applied() >= seq {
                return Ok(());
            }
            if self.finished() {
                let outcome = self.stop().await;
                bail!(
                    "the engine stopped at seq {} before reaching {seq}: {outcome:?}",
                    self.applied()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the engine reached only seq {} of {seq} within {timeout:?}",
                    self.applied()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Asks the engine to stop and waits (at most 30 s) for it.
    pub(crate) async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(anyhow::Error::new(e).context("engine failed")),
            Ok(Err(join)) => Err(anyhow::Error::new(join).context("engine task panicked")),
            Err(_) => bail!("the engine did not stop within 30 s"),
        }
    }
}

impl Drop for RunningEngine {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A durable pull consumer of every event of `stream` (deliver all, AckAll, 30 s ack wait,
/// unlimited deliveries, `2 x batch` acknowledgements pending): what a careful hand-written
/// consumer creates, and what the bench's raw ceiling reads with.
pub(crate) async fn ack_all_consumer(
    js: &async_nats::jetstream::Context,
    stream: &StreamConfig,
    durable: &str,
    batch: usize,
) -> anyhow::Result<async_nats::jetstream::consumer::PullConsumer> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let handle = js.get_stream(&stream.name).await?;
    let consumer = handle
        .create_consumer(pull::Config {
            durable_name: Some(durable.to_owned()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::All,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            filter_subject: jetsync::group_filter(&stream.subject_prefix),
            max_ack_pending: (batch * 2) as i64,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the durable consumer {durable}"))?;
    Ok(consumer)
}

/// Nearest-rank percentile of sorted values (`q` in 0..=1); 0 for no values.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of a few measurements (the middle one; the upper middle for an even count).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Events per second.
pub(crate) fn eps(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Prints a phase marker with the time since boot (`/proc/uptime`), so that a `perf record -k
/// CLOCK_MONOTONIC` of the bench can be cut into phases (`perf report --time a,b`).
pub(crate) fn mark(what: &str) {
    if std::env::var_os("JETSYNC_BENCH_MARKS").is_some() {
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
        let t = uptime.split_whitespace().next().unwrap_or("?");
        eprintln!("mark {t} {what}");
    }
}

/// utime + stime of `pid` in clock ticks (0 when unreadable).
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub(crate) fn clock_ticks() -> anyhow::Result<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse::<f64>()
        .with_context(|| format!("getconf CLK_TCK: {text:?}"))
}

static SERVER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Notes the process id of the bench's nats-server (for its CPU time).
pub(crate) fn set_server_pid(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = SERVER_PID.set(pid);
    }
}

/// The process id of the bench's nats-server, when known.
pub(crate) fn server_pid() -> Option<u32> {
    SERVER_PID.get().copied()
}

/// The CPU time (user + system) a process had used at some moment, to turn into CPU per event.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuMark {
    pid: Option<u32>,
    ticks: u64,
}

impl CpuMark {
    /// The CPU time process `pid` used so far (`None`: not known, nothing is counted).
    pub(crate) fn now(pid: Option<u32>) -> CpuMark {
        CpuMark {
            pid,
            ticks: pid.map_or(0, cpu_ticks),
        }
    }

    /// The CPU time of this process so far.
    pub(crate) fn own() -> CpuMark {
        CpuMark::now(Some(std::process::id()))
    }

    /// Microseconds of CPU per event the process used since this mark, over `events`; `None`
    /// when the process or the clock tick is unknown or nothing was counted.
    pub(crate) fn us_per_event(&self, events: u64) -> Option<f64> {
        static TICK: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
        let tick = (*TICK.get_or_init(|| clock_ticks().ok()))?;
        let used = cpu_ticks(self.pid?).checked_sub(self.ticks)?;
        (used > 0 && events > 0).then(|| used as f64 / tick * 1e6 / events as f64)
    }
}
