//! Live: publish-to-applied latency with three appliers (three in-process engines, redb replica
//! sinks) following a stream that the jetsync client writes at a paced rate.
//!
//! The publisher is the client's `Table::upsert`, many in flight at once, paced by a 1 ms ticker
//! that keeps the cumulative count on `rate × elapsed`. It stamps each event just before sending
//! it and learns its sequence from the acknowledgement. A watcher per replica wakes on every
//! move of the replica's applied fence (`Replica::wait_for(applied + 1)`) and logs
//! `(applied_seq, instant)`. An event's latency is the time from its send until the LAST of the
//! three replicas had applied it (each replica's latency is reported too, as its p99).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use futures::{stream::FuturesUnordered, StreamExt};
use jetsync_applier::{RedbOptions, RedbSink, Replica, ReplicaError};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::{
    harness::{self, Bench, RunningEngine},
    workload::{self, Rng, KEY_SPACE, ORIGIN, TABLE},
};

const STREAM: &str = "BENCH_LIVE";
const PREFIX: &str = "benchlive";
const APPLIERS: usize = 3;
/// Publishes allowed in flight before the publisher counts itself saturated and stops adding.
const MAX_IN_FLIGHT: usize = 20_000;
/// How long the appliers get to apply everything published at one rate.
const CATCH_UP: Duration = Duration::from_secs(90);

/// Latency at one publish rate.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LivePoint {
    pub(crate) rate: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
    /// Events published at this rate.
    pub(crate) events: u64,
    /// The rate the publisher actually achieved.
    pub(crate) achieved_eps: f64,
    /// p99 of each applier on its own.
    pub(crate) per_applier_p99_ms: Vec<f64>,
}

/// A fence move of one replica: everything up to `applied` was readable at `at`.
type FenceLog = Vec<(u64, Instant)>;

/// The measured points, and the error that cut the series short, if any.
pub(crate) type LiveOutcome = (Vec<LivePoint>, Option<anyhow::Error>);

pub(crate) async fn run(
    bench: &Bench,
    rates: &[u64],
    duration: Duration,
) -> anyhow::Result<LiveOutcome> {
    let stream = bench.create_stream(STREAM, PREFIX, 1).await?;
    let dir = tempfile::tempdir()?;
    let mut engines = Vec::new();
    let mut replicas = Vec::new();
    for i in 1..=APPLIERS {
        let instance = format!("live-{i}");
        let config = harness::engine_config(&bench.url, dir.path(), &instance, &stream);
        let sink = RedbSink::open(RedbOptions::new(
            dir.path().join(format!("{instance}.replica.redb")),
        ))?;
        replicas.push(sink.replica());
        engines.push(RunningEngine::start(config, sink));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let watchers: Vec<JoinHandle<FenceLog>> = replicas
        .iter()
        .cloned()
        .map(|replica| tokio::spawn(watch(replica, stop.clone())))
        .collect();

    let mut config = jetsync::Config {
        instance: ORIGIN.to_owned(),
        ..jetsync::Config::default()
    };
    config.nats.url = bench.url.clone();
    config.stream = stream.clone();
    let client = jetsync::Client::connect(&config).await?;
    let table = client.rows(TABLE)?;
    let mut rng = Rng::new(0x5eed_0003);

    // Every engine is consuming once each replica applied a first event; then half a second at
    // the lowest rate warms the path up (neither is measured).
    let first = publish_paced(&table, &mut rng, 1, Duration::from_millis(1)).await?;
    let last_warm = first.last().map_or(0, |s| s.0);
    wait_all(&replicas, last_warm, Duration::from_secs(30)).await?;
    let warm_rate = rates.iter().copied().min().unwrap_or(1000);
    let warm = publish_paced(&table, &mut rng, warm_rate, Duration::from_millis(500)).await?;
    wait_all(
        &replicas,
        warm.last().map_or(0, |s| s.0),
        Duration::from_secs(30),
    )
    .await?;

    // A rate the appliers cannot absorb leaves a backlog behind: it is reported as an error,
    // the rates measured before it are kept, and the higher ones are skipped.
    let mut runs = Vec::new();
    let mut failure = None;
    for &rate in rates {
        harness::mark(&format!("live {rate}"));
        let started = Instant::now();
        let sends = publish_paced(&table, &mut rng, rate, duration).await?;
        let achieved = sends.len() as f64 / started.elapsed().as_secs_f64();
        let last = sends.iter().map(|s| s.0).max().unwrap_or(0);
        if let Err(e) = wait_all(&replicas, last, CATCH_UP).await {
            failure = Some(e.context(format!(
                "the appliers did not catch up within {CATCH_UP:?} after {rate} events/s"
            )));
            break;
        }
        harness::mark(&format!("live {rate} caught up"));
        runs.push((rate, achieved, sends));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for watcher in watchers {
        logs.push(watcher.await.context("replica watcher")?);
    }
    for engine in &mut engines {
        engine.stop().await?;
    }
    bench.delete_stream(STREAM).await;

    let points = runs
        .into_iter()
        .map(|(rate, achieved, sends)| summarize(rate, achieved, &sends, &logs))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((points, failure))
}

/// Logs every move of `replica`'s applied fence until `stop`.
async fn watch(replica: Replica, stop: Arc<AtomicBool>) -> FenceLog {
    let mut log = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Relaxed) {
        let current = replica.applied_seq();
        match replica
            .wait_for(current + 1, Duration::from_millis(50))
            .await
        {
            Ok(()) => log.push((replica.applied_seq(), Instant::now())),
            Err(ReplicaError::Timeout { .. }) => {}
            Err(_) => break,
        }
    }
    log
}

/// Publishes at `rate` events/s for `duration` with the client's `upsert`, many in flight;
/// returns `(seq, sent_at)` of every event.
async fn publish_paced(
    table: &jetsync::Table<jetsync::Row>,
    rng: &mut Rng,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Vec<(u64, Instant)>> {
    let mut in_flight = FuturesUnordered::new();
    let mut sends = Vec::with_capacity((rate as f64 * duration.as_secs_f64()) as usize + 16);
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let end = started + duration;
    let mut issued = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let due = ((now - started).as_secs_f64() * rate as f64).ceil() as u64;
                while issued < due.max(1) && in_flight.len() < MAX_IN_FLIGHT {
                    let i = rng.below(KEY_SPACE);
                    let key = workload::key(i);
                    let row = workload::row(i, issued);
                    in_flight.push(async move {
                        let sent = Instant::now();
                        let published = table.upsert(&key, &row).await?;
                        anyhow::Ok((published.seq, sent))
                    });
                    issued += 1;
                }
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => sends.push(done?),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !in_flight.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, in_flight.next()).await {
            Ok(Some(done)) => sends.push(done?),
            Ok(None) => break,
            Err(_) => bail!(
                "{} publishes still unacknowledged after 30 s",
                in_flight.len()
            ),
        }
    }
    Ok(sends)
}

/// Waits until every replica applied `seq`.
async fn wait_all(replicas: &[Replica], seq: u64, timeout: Duration) -> anyhow::Result<()> {
    for (i, replica) in replicas.iter().enumerate() {
        replica
            .wait_for(seq, timeout)
            .await
            .with_context(|| format!("applier live-{} waiting for seq {seq}", i + 1))?;
    }
    Ok(())
}

fn summarize(
    rate: u64,
    achieved: f64,
    sends: &[(u64, Instant)],
    logs: &[FenceLog],
) -> anyhow::Result<LivePoint> {
    let mut all = Vec::with_capacity(sends.len());
    let mut each: Vec<Vec<f64>> = vec![Vec::with_capacity(sends.len()); logs.len()];
    for &(seq, sent) in sends {
        let mut slowest = 0.0f64;
        for (r, log) in logs.iter().enumerate() {
            let at = log.partition_point(|(applied, _)| *applied < seq);
            let Some(&(_, applied_at)) = log.get(at) else {
                bail!("replica live-{} never logged seq {seq}", r + 1);
            };
            let ms = applied_at.saturating_duration_since(sent).as_secs_f64() * 1e3;
            each[r].push(ms);
            slowest = slowest.max(ms);
        }
        all.push(slowest);
    }
    all.sort_by(f64::total_cmp);
    let per_applier_p99_ms = each
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            harness::percentile(v, 0.99)
        })
        .collect();
    Ok(LivePoint {
        rate,
        p50_ms: harness::percentile(&all, 0.50),
        p99_ms: harness::percentile(&all, 0.99),
        p999_ms: harness::percentile(&all, 0.999),
        max_ms: all.last().copied().unwrap_or(0.0),
        events: sends.len() as u64,
        achieved_eps: achieved,
        per_applier_p99_ms,
    })
}
