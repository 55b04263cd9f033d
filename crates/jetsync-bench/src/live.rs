//! Live: publish-to-applied latency with three appliers (three in-process engines, redb replica
//! sinks) following a stream that the jetsync client writes at a paced rate, against the raw
//! JetStream publish-to-delivery latency at the same rates in the same run (three raw consumers
//! that write nothing, `live_raw.rs`, on a second stream fed by the same publisher; at each
//! rate the raw pass runs first, then the jetsync pass). DESIGN 9: jetsync's p99 <= 2 x the raw
//! p99 + 1 ms at 1,000 and 5,000 events/s, and it keeps up at 10,000 events/s.
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
    live_raw::RawConsumer,
    workload::{self, Rng, KEY_SPACE, ORIGIN, TABLE},
};

const STREAM: &str = "BENCH_LIVE";
const PREFIX: &str = "benchlive";
const RAW_STREAM: &str = "BENCH_LIVE_RAW";
const RAW_PREFIX: &str = "benchliveraw";
/// A rate is kept up with when every applier applied the last event within this time after
/// the publisher stopped (a backlog that grew through the run takes longer to drain).
const KEPT_UP_WITHIN: Duration = Duration::from_secs(1);
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
    /// Raw JetStream publish-to-delivery latency at the same rate (the slowest of three raw
    /// consumers per event).
    pub(crate) raw_p50_ms: f64,
    pub(crate) raw_p99_ms: f64,
    pub(crate) raw_max_ms: f64,
    /// The rate the publisher achieved in the raw pass.
    pub(crate) raw_achieved_eps: f64,
    /// Raw deliveries missing at the end of the pass ((event, consumer) pairs; should be 0).
    pub(crate) raw_missing: u64,
    /// `2 x raw_p99_ms + 1`: the bound of DESIGN 9.
    pub(crate) p99_bound_ms: f64,
    /// `p99_ms / p99_bound_ms` (target <= 1).
    pub(crate) p99_vs_bound: f64,
    /// `p99_ms / raw_p99_ms`.
    pub(crate) p99_vs_raw: f64,
    /// Time from the publisher's last acknowledgement until every applier applied it.
    pub(crate) drain_ms: f64,
    /// Whether the appliers kept up: the publisher achieved 95% of the rate and the appliers
    /// applied the last event within 1 s of its acknowledgement.
    pub(crate) kept_up: bool,
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

    let connect = |stream: &jetsync::StreamConfig| {
        let mut config = jetsync::Config {
            instance: ORIGIN.to_owned(),
            ..jetsync::Config::default()
        };
        config.nats.url = bench.url.clone();
        config.stream = stream.clone();
        config
    };
    let client = jetsync::Client::connect(&connect(&stream)).await?;
    let table = client.rows(TABLE)?;
    let mut rng = Rng::new(0x5eed_0003);

    // The raw side: its own stream and publisher client, three consumers that write nothing.
    let raw_stream = bench.create_stream(RAW_STREAM, RAW_PREFIX, 1).await?;
    let raw_client = jetsync::Client::connect(&connect(&raw_stream)).await?;
    let raw_table = raw_client.rows(TABLE)?;
    let raw_stop = Arc::new(AtomicBool::new(false));
    let mut raw_consumers = Vec::new();
    for i in 1..=APPLIERS {
        raw_consumers.push(
            RawConsumer::start(
                bench,
                &raw_stream,
                &format!("bench_live_raw_{i}"),
                raw_stop.clone(),
            )
            .await?,
        );
    }

    // Every engine is consuming once each replica applied a first event; then half a second at
    // the lowest rate warms the path up (neither is measured). The same for the raw side.
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
    let warm = publish_paced(&raw_table, &mut rng, warm_rate, Duration::from_millis(500)).await?;
    wait_raw(
        &raw_consumers,
        warm.last().map_or(0, |s| s.0),
        Duration::from_secs(30),
    )
    .await?;

    // A rate the appliers cannot absorb leaves a backlog behind: it is reported as an error,
    // the rates measured before it are kept, and the higher ones are skipped.
    let mut runs = Vec::new();
    let mut failure = None;
    for &rate in rates {
        harness::mark(&format!("live raw {rate}"));
        let started = Instant::now();
        let raw_sends = publish_paced(&raw_table, &mut rng, rate, duration).await?;
        let raw_achieved = raw_sends.len() as f64 / started.elapsed().as_secs_f64();
        let raw_last = raw_sends.iter().map(|s| s.0).max().unwrap_or(0);
        if let Err(e) = wait_raw(&raw_consumers, raw_last, CATCH_UP).await {
            failure = Some(e.context(format!("the raw consumers fell behind at {rate} events/s")));
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        harness::mark(&format!("live {rate}"));
        let started = Instant::now();
        let sends = publish_paced(&table, &mut rng, rate, duration).await?;
        let achieved = sends.len() as f64 / started.elapsed().as_secs_f64();
        let published = Instant::now();
        let last = sends.iter().map(|s| s.0).max().unwrap_or(0);
        if let Err(e) = wait_all(&replicas, last, CATCH_UP).await {
            failure = Some(e.context(format!(
                "the appliers did not catch up within {CATCH_UP:?} after {rate} events/s"
            )));
            break;
        }
        let drain = published.elapsed();
        harness::mark(&format!("live {rate} caught up"));
        runs.push(Pass {
            rate,
            achieved,
            sends,
            drain,
            raw_achieved,
            raw_sends,
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    stop.store(true, Ordering::Relaxed);
    raw_stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for watcher in watchers {
        logs.push(watcher.await.context("replica watcher")?);
    }
    let mut raw_logs = Vec::new();
    for consumer in raw_consumers {
        raw_logs.push(consumer.finish().await?);
    }
    for engine in &mut engines {
        engine.stop().await?;
    }
    bench.delete_stream(STREAM).await;
    bench.delete_stream(RAW_STREAM).await;

    let mut points = Vec::new();
    for pass in runs {
        let rate = pass.rate;
        let point = (|| {
            let jetsync = summarize(&pass.sends, &logs)?;
            anyhow::ensure!(
                jetsync.missing == 0,
                "{} (event, applier) pairs never applied at {} events/s",
                jetsync.missing,
                pass.rate
            );
            let raw = summarize(&pass.raw_sends, &raw_logs)?;
            let bound = 2.0 * raw.p99 + 1.0;
            Ok(LivePoint {
                rate: pass.rate,
                p50_ms: jetsync.p50,
                p99_ms: jetsync.p99,
                p999_ms: jetsync.p999,
                max_ms: jetsync.max,
                events: pass.sends.len() as u64,
                achieved_eps: pass.achieved,
                per_applier_p99_ms: jetsync.each_p99,
                raw_p50_ms: raw.p50,
                raw_p99_ms: raw.p99,
                raw_max_ms: raw.max,
                raw_achieved_eps: pass.raw_achieved,
                raw_missing: raw.missing,
                p99_bound_ms: bound,
                p99_vs_bound: jetsync.p99 / bound,
                p99_vs_raw: jetsync.p99 / raw.p99.max(1e-3),
                drain_ms: pass.drain.as_secs_f64() * 1e3,
                kept_up: pass.achieved >= 0.95 * pass.rate as f64 && pass.drain <= KEPT_UP_WITHIN,
            })
        })();
        // One rate's bad log does not lose the others' figures.
        match point {
            Ok(point) => points.push(point),
            Err(e) if failure.is_none() => failure = Some(e.context(format!("{rate} events/s"))),
            Err(_) => {}
        }
    }
    Ok((points, failure))
}

/// One rate's raw and jetsync passes.
struct Pass {
    rate: u64,
    achieved: f64,
    sends: Vec<(u64, Instant)>,
    drain: Duration,
    raw_achieved: f64,
    raw_sends: Vec<(u64, Instant)>,
}

/// Waits until every raw consumer was delivered `seq`.
async fn wait_raw(consumers: &[RawConsumer], seq: u64, timeout: Duration) -> anyhow::Result<()> {
    for (i, consumer) in consumers.iter().enumerate() {
        consumer
            .wait_for(seq, timeout)
            .await
            .with_context(|| format!("raw consumer {} waiting for seq {seq}", i + 1))?;
    }
    Ok(())
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
            // A failed read (the replica busy with a commit) is tried again: a watcher that
            // gave up would lose every later fence move.
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    log
}

/// Publishes at `rate` events/s for `duration` with the client's `upsert`, many in flight;
/// returns `(seq, sent_at)` of every event.
pub(crate) async fn publish_paced(
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

/// Latency percentiles of one pass: per event, the slowest of the logs.
struct Summary {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    each_p99: Vec<f64>,
    /// (event, log) pairs with no entry at or after the event: a raw consumer that was not
    /// delivered the event and every later one (a client-side slow-consumer drop at the end).
    missing: u64,
}

fn summarize(sends: &[(u64, Instant)], logs: &[FenceLog]) -> anyhow::Result<Summary> {
    let mut all = Vec::with_capacity(sends.len());
    let mut each: Vec<Vec<f64>> = vec![Vec::with_capacity(sends.len()); logs.len()];
    let mut missing = 0u64;
    for &(seq, sent) in sends {
        let mut slowest = None::<f64>;
        for (r, log) in logs.iter().enumerate() {
            // Logs are in sequence order: fence moves only grow, and a consumer is delivered
            // in stream order (a dropped message leaves a hole, so the next one counts).
            let at = log.partition_point(|(applied, _)| *applied < seq);
            let Some(&(_, applied_at)) = log.get(at) else {
                missing += 1;
                continue;
            };
            let ms = applied_at.saturating_duration_since(sent).as_secs_f64() * 1e3;
            each[r].push(ms);
            slowest = Some(slowest.map_or(ms, |s: f64| s.max(ms)));
        }
        if let Some(ms) = slowest {
            all.push(ms);
        }
    }
    if all.is_empty() && !sends.is_empty() {
        bail!("no log reached any of {} events", sends.len());
    }
    all.sort_by(f64::total_cmp);
    let each_p99 = each
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            harness::percentile(v, 0.99)
        })
        .collect();
    Ok(Summary {
        p50: harness::percentile(&all, 0.50),
        p99: harness::percentile(&all, 0.99),
        p999: harness::percentile(&all, 0.999),
        max: all.last().copied().unwrap_or(0.0),
        each_p99,
        missing,
    })
}
