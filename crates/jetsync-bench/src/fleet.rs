//! Capacity (issue #15): N appliers as separate `jetsync-applier run` processes (SQLite sink,
//! the binary's default) on one stream of a private nats-server, at a fixed total event rate.
//!
//! The phase starts its own server, so that the server's CPU time and memory belong to this
//! phase alone. A baseline step runs the publisher with no applier; then instances are added
//! (10, 50, 100 in the full run), each step waits until every instance has caught up, publishes
//! for a fixed time at the fixed rate with the jetsync client, and measures:
//!
//! - publish-to-applied latency of every (event, instance) pair: a poller reads every
//!   instance's fence (`jetsync_offsets` in its SQLite file) in a sweep every
//!   [`SWEEP_PERIOD`], so a latency is late by up to one sweep (the report gives the sweeps'
//!   actual mean period);
//! - nats-server CPU (utime + stime from `/proc/<pid>/stat` over the step) and resident memory,
//!   in total and per instance above the baseline;
//! - appliers' resident memory (mean, max) and CPU.
//!
//! Every instance has the product's per-instance durable consumer as this build creates it
//! (on main: a pull consumer with AckAll and the server's defaults for replicas and storage,
//! i.e. R1 and file storage on a single server).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use jetsync_testkit::NatsServer;
use serde::Serialize;

use crate::{
    harness::{self, Bench},
    live,
    memory::{self, Applier, Process},
    workload::{Rng, TABLE},
};

const STREAM: &str = "BENCH_FLEET";
const PREFIX: &str = "benchfleet";
/// The fleet phase's default total event rate (events/s): what this 2-core machine sustains
/// with 100 instances (see the README's capacity model).
pub(crate) const DEFAULT_RATE: u64 = 50;
/// How often the poller reads every instance's fence.
const SWEEP_PERIOD: Duration = Duration::from_millis(5);
/// How long new instances get to start and catch up.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// Outcome of the fleet phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FleetReport {
    pub(crate) server_version: String,
    /// The sink of every instance.
    pub(crate) sink: &'static str,
    /// Total events per second the publisher writes in every step.
    pub(crate) rate: u64,
    /// Publishing time of each step (s).
    pub(crate) seconds_per_step: f64,
    /// The per-instance consumer as measured.
    pub(crate) consumer: String,
    /// The publisher alone (no applier).
    pub(crate) baseline: FleetStep,
    pub(crate) steps: Vec<FleetStep>,
}

/// One step: `instances` appliers following the stream.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct FleetStep {
    pub(crate) instances: usize,
    /// Events the publisher wrote, and its achieved rate.
    pub(crate) events: u64,
    pub(crate) achieved_eps: f64,
    /// Publish-to-applied latency over every (event, instance) pair (ms).
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// Per event, the last instance to apply it: p99 (ms).
    pub(crate) last_instance_p99_ms: f64,
    /// Mean period of the poller's sweeps over all instances (ms): the latencies' resolution.
    pub(crate) sweep_ms: f64,
    /// nats-server CPU over the step, % of one core.
    pub(crate) server_cpu_pct: f64,
    /// `(server_cpu_pct - baseline) / instances`.
    pub(crate) server_cpu_pct_per_instance: f64,
    /// nats-server resident memory at the end of the step (MiB).
    pub(crate) server_rss_mib: f64,
    /// `(server_rss_mib - baseline) / instances`, in KiB.
    pub(crate) server_rss_kib_per_instance: f64,
    /// Appliers' resident memory at the end of the step (MiB).
    pub(crate) applier_rss_mean_mib: f64,
    pub(crate) applier_rss_max_mib: f64,
    /// All appliers' CPU over the step, % of one core, and per instance.
    pub(crate) applier_cpu_pct: f64,
    pub(crate) applier_cpu_pct_per_instance: f64,
    /// Time the instances added by this step took to start and catch up (s).
    pub(crate) start_s: f64,
}

/// One applier process of the fleet.
struct Instance {
    process: Process,
    db: PathBuf,
}

pub(crate) async fn run(
    applier: &Applier,
    steps: &[usize],
    rate: u64,
    duration: Duration,
) -> anyhow::Result<FleetReport> {
    let server = NatsServer::builder()
        .start()
        .context("starting the fleet's nats-server")?;
    let server_pid = server.pid().context("the fleet server's pid")?;
    let bench = Bench::connect(&server.url()).await?;
    let stream = bench.create_stream(STREAM, PREFIX, 1).await?;
    let dir = tempfile::tempdir()?;
    let mut config = jetsync::Config {
        instance: "fleet-publisher".to_owned(),
        ..jetsync::Config::default()
    };
    config.nats.url = bench.url.clone();
    config.stream = stream.clone();
    let client = jetsync::Client::connect(&config).await?;
    let table = client.rows(TABLE)?;
    let mut rng = Rng::new(0x5eed_0015);
    let tick = harness::clock_ticks()?;

    // The publisher alone; its first event also gives new instances something to apply.
    let mut instances: Vec<Instance> = Vec::new();
    let baseline = step(
        &table, &mut rng, rate, duration, server_pid, &instances, tick, None,
    )
    .await
    .context("baseline (no applier)")?;
    let mut report = FleetReport {
        server_version: server.version().to_owned(),
        sink: "sqlite",
        rate,
        seconds_per_step: duration.as_secs_f64(),
        consumer: "main's durable pull consumer: AckAll, replicas and storage left to the server \
                   (R1, file storage on one server)"
            .to_owned(),
        baseline: baseline.clone(),
        steps: Vec::new(),
    };

    let result = async {
        for &n in steps {
            harness::mark(&format!("fleet {n}"));
            let started = Instant::now();
            while instances.len() < n {
                let name = format!("fleet-{:03}", instances.len() + 1);
                let home = dir.path().join(&name);
                let config =
                    memory::write_config_with(&home, &name, &bench.url, &stream, "kind = \"sqlite\"\n", "")?;
                let process = Process::spawn(&applier.path, &config, &home.join("applier.log"))?;
                instances.push(Instance {
                    process,
                    db: home.join("data").join(format!("{name}.db")),
                });
            }
            let (_, last) = bench.stream_state(STREAM).await?;
            wait_fences(&mut instances, last, START_TIMEOUT).await?;
            let start_s = started.elapsed().as_secs_f64();
            let mut s = step(&table, &mut rng, rate, duration, server_pid, &instances, tick, Some(&baseline))
                .await
                .with_context(|| format!("{n} instances"))?;
            s.start_s = start_s;
            eprintln!(
                "fleet: {n} instances: p50 {:.1} ms p99 {:.1} ms, server CPU {:.1}% RSS {:.1} MiB, applier RSS mean {:.1} MiB",
                s.p50_ms, s.p99_ms, s.server_cpu_pct, s.server_rss_mib, s.applier_rss_mean_mib
            );
            report.steps.push(s);
        }
        anyhow::Ok(())
    }
    .await;

    // SIGTERM to all at once, then reap each.
    let pids: Vec<String> = instances
        .iter()
        .map(|i| i.process.child.id().to_string())
        .collect();
    if !pids.is_empty() {
        let _ = Command::new("kill").arg("-TERM").args(&pids).status();
    }
    for instance in &mut instances {
        let _ = instance.process.terminate(Duration::from_secs(15));
    }
    drop(client);
    drop(server);
    result?;
    Ok(report)
}

/// One measured step: publish at `rate` for `duration` while sampling the server and the
/// instances; then wait until every instance applied the last event.
#[allow(clippy::too_many_arguments)]
async fn step(
    table: &jetsync::Table<jetsync::Row>,
    rng: &mut Rng,
    rate: u64,
    duration: Duration,
    server_pid: u32,
    instances: &[Instance],
    tick: f64,
    baseline: Option<&FleetStep>,
) -> anyhow::Result<FleetStep> {
    let pids: Vec<u32> = instances.iter().map(|i| i.process.child.id()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let dbs: Vec<PathBuf> = instances.iter().map(|i| i.db.clone()).collect();
    let poll_stop = stop.clone();
    let poller = tokio::task::spawn_blocking(move || poll_fences(&dbs, &poll_stop));

    let cpu_server = harness::cpu_ticks(server_pid);
    let cpu_appliers: u64 = pids.iter().map(|p| harness::cpu_ticks(*p)).sum();
    let started = Instant::now();
    let sends = live::publish_paced(table, rng, rate, duration).await?;
    let wall = started.elapsed().as_secs_f64();
    let server_cpu_pct = (harness::cpu_ticks(server_pid) - cpu_server) as f64 / tick / wall * 100.0;
    let applier_cpu_pct = (pids.iter().map(|p| harness::cpu_ticks(*p)).sum::<u64>() - cpu_appliers)
        as f64
        / tick
        / wall
        * 100.0;
    let last = sends.iter().map(|s| s.0).max().unwrap_or(0);

    // Every instance applies the last event; then the poller stops.
    let deadline = Instant::now() + Duration::from_secs(60);
    let outcome = loop {
        if poller.is_finished() {
            break Err(anyhow::anyhow!("the fence poller stopped"));
        }
        let behind = instances
            .iter()
            .filter(|i| read_fence_once(&i.db).unwrap_or(0) < last)
            .count();
        if behind == 0 {
            break Ok(());
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!(
                "{behind} of {} instances had not applied seq {last} 60 s after the step",
                instances.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let (logs, sweep_ms) = poller.await.context("fence poller")??;
    outcome?;

    let server_rss_mib = memory::resident_kib(server_pid) as f64 / 1024.0;
    let rss: Vec<f64> = pids
        .iter()
        .map(|p| memory::resident_kib(*p) as f64 / 1024.0)
        .collect();
    let n = instances.len();
    let mut pairs = Vec::with_capacity(sends.len() * n);
    let mut last_instance = Vec::with_capacity(sends.len());
    for &(seq, sent) in &sends {
        let mut slowest = 0.0f64;
        for (i, log) in logs.iter().enumerate() {
            let at = log.partition_point(|(applied, _)| *applied < seq);
            let Some(&(_, applied_at)) = log.get(at) else {
                bail!("instance {} never showed seq {seq}", i + 1);
            };
            let ms = applied_at.saturating_duration_since(sent).as_secs_f64() * 1e3;
            pairs.push(ms);
            slowest = slowest.max(ms);
        }
        last_instance.push(slowest);
    }
    pairs.sort_by(f64::total_cmp);
    last_instance.sort_by(f64::total_cmp);
    let per = |v: f64, base: f64| if n == 0 { 0.0 } else { (v - base) / n as f64 };
    let (base_cpu, base_rss) =
        baseline.map_or((0.0, 0.0), |b| (b.server_cpu_pct, b.server_rss_mib));
    Ok(FleetStep {
        instances: n,
        events: sends.len() as u64,
        achieved_eps: sends.len() as f64 / wall,
        p50_ms: harness::percentile(&pairs, 0.50),
        p99_ms: harness::percentile(&pairs, 0.99),
        max_ms: pairs.last().copied().unwrap_or(0.0),
        last_instance_p99_ms: harness::percentile(&last_instance, 0.99),
        sweep_ms,
        server_cpu_pct,
        server_cpu_pct_per_instance: per(server_cpu_pct, base_cpu),
        server_rss_mib,
        server_rss_kib_per_instance: per(server_rss_mib, base_rss) * 1024.0,
        applier_rss_mean_mib: if n == 0 {
            0.0
        } else {
            rss.iter().sum::<f64>() / n as f64
        },
        applier_rss_max_mib: rss.iter().copied().fold(0.0, f64::max),
        applier_cpu_pct,
        applier_cpu_pct_per_instance: if n == 0 {
            0.0
        } else {
            applier_cpu_pct / n as f64
        },
        start_s: 0.0,
    })
}

/// Fence moves of every instance: `(fence, first seen)`.
type Logs = Vec<Vec<(u64, Instant)>>;

/// Reads every instance's fence every [`SWEEP_PERIOD`] until `stop`; returns the logs and the
/// sweeps' mean period (ms).
fn poll_fences(dbs: &[PathBuf], stop: &AtomicBool) -> anyhow::Result<(Logs, f64)> {
    let conns = dbs
        .iter()
        .map(|db| {
            rusqlite::Connection::open(db).with_context(|| format!("opening {}", db.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut logs: Logs = vec![Vec::new(); dbs.len()];
    let mut last = vec![0u64; dbs.len()];
    let started = Instant::now();
    let mut sweeps = 0u64;
    let mut stopping = false;
    while !stopping {
        // One last sweep after the stop: the caller saw every fence at its target.
        stopping = stop.load(Ordering::Relaxed);
        let sweep = Instant::now();
        for (i, conn) in conns.iter().enumerate() {
            let fence = read_fence(conn).unwrap_or(0);
            if fence > last[i] {
                last[i] = fence;
                logs[i].push((fence, Instant::now()));
            }
        }
        sweeps += 1;
        if let Some(rest) = SWEEP_PERIOD.checked_sub(sweep.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let mean = started.elapsed().as_secs_f64() * 1e3 / sweeps.max(1) as f64;
    Ok((logs, mean))
}

fn read_fence(conn: &rusqlite::Connection) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT coalesce(max(seq), 0) FROM jetsync_offsets")?
        .query_row([], |row| row.get::<_, i64>(0))
        .map(|v| v as u64)
}

fn read_fence_once(db: &Path) -> anyhow::Result<u64> {
    Ok(read_fence(&rusqlite::Connection::open(db)?)?)
}

/// Waits until every instance's fence reached `seq` (fails if one exits).
async fn wait_fences(
    instances: &mut [Instance],
    seq: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    for instance in instances.iter_mut() {
        loop {
            if let Some(status) = instance.process.child.try_wait()? {
                bail!("applier {} exited ({status})", instance.db.display());
            }
            if instance.db.exists() && read_fence_once(&instance.db).unwrap_or(0) >= seq {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "applier {} did not reach seq {seq} within {timeout:?}",
                    instance.db.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}
