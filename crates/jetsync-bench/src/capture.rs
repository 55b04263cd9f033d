//! Capture: capture-to-applied latency (issue #14). A "service" writes plain SQL into instance
//! A's SQLite file at a paced rate (one row per local transaction); A's `jetsync-applier run`
//! captures each commit through its triggers and relays it; instance B's `jetsync-applier run`
//! applies it into B's SQLite file. Latency is the time from A's `COMMIT` returning to the row
//! being readable in B's database (a reader polls B's file every 0.2 ms), so it covers the
//! trigger, the relay's poll interval (`capture.poll_ms`), the publish, the delivery and B's
//! apply.
//!
//! Both instances are the real binary (the relay runs inside `run`). On servers without atomic
//! batches (before 2.12.1) A runs with `capture.atomic = false` (per-row publishing), and the
//! report says so.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use futures::StreamExt as _;
use jetsync::transaction::{BATCH_COMMIT_HEADER, BATCH_ID_HEADER, BATCH_SEQUENCE_HEADER};
use serde::Serialize;

use crate::{
    harness::{self, Bench},
    memory::{Applier, Process},
};

const STREAM: &str = "BENCH_CAPTURE";
const PREFIX: &str = "benchcap";
const TABLE: &str = "capbench";
/// Writes per second of the measured service (the figure).
pub(crate) const RATE: u64 = 1_000;
/// The relay's poll interval: the product's default.
const POLL_MS: u64 = 10;
/// Rows written (and awaited on B) before measuring.
const WARM_UP: u64 = 50;

/// Capture-to-applied latency at one write rate.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CaptureReport {
    /// Target writes per second (one row per local transaction).
    pub(crate) rate: u64,
    /// Writes measured.
    pub(crate) writes: u64,
    /// The rate the writer achieved.
    pub(crate) achieved_wps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
    /// p99 of the service's own `COMMIT` on A (the triggers' cost is in it).
    pub(crate) commit_p99_ms: f64,
    /// From A's `COMMIT` to the event reaching a plain NATS subscriber of the stream's
    /// subjects (A's side: the relay's wake-up, outbox reads and publish), p50 and p99.
    pub(crate) published_p50_ms: f64,
    pub(crate) published_p99_ms: f64,
    /// From the event reaching the plain subscriber to the row being readable in B's file
    /// (B's side: delivery, apply, commit, and the watcher's poll), p50 and p99.
    pub(crate) applied_after_publish_p50_ms: f64,
    pub(crate) applied_after_publish_p99_ms: f64,
    /// The server's own publish round trip at the same rate, without jetsync (a request per
    /// message, paced at `rate`): a plain publish, p50 and p99.
    pub(crate) server_plain_p50_ms: f64,
    pub(crate) server_plain_p99_ms: f64,
    /// The same for a one-message atomic batch (what the relay sends for a local transaction
    /// of one change on servers with atomic batches); 0 where the server has none.
    pub(crate) server_atomic_p50_ms: f64,
    pub(crate) server_atomic_p99_ms: f64,
    /// Whether captured transactions were published as atomic batches.
    pub(crate) atomic: bool,
    /// `capture.poll_ms` of the relay.
    pub(crate) poll_ms: u64,
    /// CPU per measured write (µs) of A's applier (relay, watcher and the engine applying
    /// A's own echoes), of B's applier, of nats-server and of the bench process (the
    /// service's writes, B's watcher and the plain subscriber): where the two cores go.
    pub(crate) cpu_us_a: f64,
    pub(crate) cpu_us_b: f64,
    pub(crate) cpu_us_server: f64,
    pub(crate) cpu_us_bench: f64,
}

/// Writes the configuration of `instance` under `dir` (data in `dir/data`); returns its path.
fn write_config(
    dir: &Path,
    instance: &str,
    url: &str,
    capture: bool,
    atomic: bool,
) -> anyhow::Result<PathBuf> {
    let data = dir.join("data");
    fs::create_dir_all(&data)?;
    let path = dir.join("jetsync.toml");
    let capture_toml = if capture {
        format!("capture = true\n\n[capture]\natomic = {atomic}\npoll_ms = {POLL_MS}\n")
    } else {
        String::new()
    };
    fs::write(
        &path,
        format!(
            "instance = {instance:?}\n\
             data_dir = {data:?}\n\
             \n[nats]\nurl = {url:?}\n\
             \n[stream]\nname = {STREAM:?}\nsubject_prefix = {PREFIX:?}\nprovision = true\ntransactions = {atomic}\n\
             \n[sink]\nkind = \"sqlite\"\n\
             \n[apply]\nbatch_max = {batch_max}\n\
             \n[log]\nlevel = {level:?}\n\
             \n[tables.{TABLE}]\nkey = \"id\"\n{capture_toml}",
            data = data.to_string_lossy(),
            batch_max = harness::batch_max(),
            // `JETSYNC_BENCH_CAPTURE_LOG=jetsync_applier::capture=trace` (with
            // `JETSYNC_BENCH_KEEP=1`) logs the relay's cycles with their timings.
            level = std::env::var("JETSYNC_BENCH_CAPTURE_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    )?;
    Ok(path)
}

/// The SQLite file of `instance` under `dir` (the sink's default path).
fn sqlite_path(dir: &Path, instance: &str) -> PathBuf {
    dir.join("data").join(format!("{instance}.db"))
}

/// Rows of the bench table in `path`; 0 while the file or the table does not exist yet.
fn row_count(conn: &mut Option<rusqlite::Connection>, path: &Path) -> u64 {
    if conn.is_none() {
        if !path.exists() {
            return 0;
        }
        let Ok(c) = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        ) else {
            return 0;
        };
        let _ = c.busy_timeout(Duration::from_secs(1));
        *conn = Some(c);
    }
    conn.as_ref()
        .and_then(|c| {
            c.prepare_cached(&format!("SELECT count(*) FROM {TABLE}"))
                .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
                .ok()
        })
        .map_or(0, |n| n as u64)
}

/// The file's `PRAGMA data_version` (changes when another connection commits), or `None`.
fn data_version(conn: &Option<rusqlite::Connection>) -> Option<i64> {
    conn.as_ref()?
        .query_row("PRAGMA data_version", [], |r| r.get(0))
        .ok()
}

/// Polls B's file until `target` rows are visible or `stop`; returns when each row count was
/// first seen (`seen[n - 1]` = when the n-th row became readable). The rows are counted only
/// when the file's data version moved: a `count(*)` every 0.2 ms would load the two cores
/// everything measured here runs on.
fn watch(path: PathBuf, target: u64, stop: Arc<AtomicBool>) -> Vec<Instant> {
    let mut conn = None;
    let mut seen = Vec::with_capacity(target as usize);
    let mut version = None;
    while (seen.len() as u64) < target && !stop.load(Ordering::Relaxed) {
        let now_version = data_version(&conn);
        if now_version.is_none() || now_version != version {
            version = now_version;
            let n = row_count(&mut conn, &path);
            let now = Instant::now();
            while (seen.len() as u64) < n.min(target) {
                seen.push(now);
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    seen
}

/// Inserts rows `first..first + count` into A's file at `rate` per second, one transaction
/// each; returns when each `COMMIT` returned and how long it took.
fn write(
    path: &Path,
    first: u64,
    count: u64,
    rate: u64,
) -> anyhow::Result<(Vec<Instant>, Vec<f64>)> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let mut insert = conn.prepare(&format!(
        "INSERT INTO {TABLE} (id, written_us, pad) VALUES (?1, ?2, 'capture-bench-row')"
    ))?;
    let start = Instant::now();
    let mut committed = Vec::with_capacity(count as usize);
    let mut commit_ms = Vec::with_capacity(count as usize);
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let began = Instant::now();
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        insert.execute(rusqlite::params![(first + i) as i64, micros])?;
        conn.execute_batch("COMMIT")?;
        let done = Instant::now();
        committed.push(done);
        commit_ms.push((done - began).as_secs_f64() * 1e3);
    }
    Ok((committed, commit_ms))
}

/// Round trips of `count` publishes (requests awaiting the server's acknowledgement) paced at
/// `rate` per second into a scratch stream, sorted, in ms: plain messages, or one-message
/// atomic batches. The floor under the relay's publish, measured on the same server.
async fn server_round_trips(
    bench: &Bench,
    atomic: bool,
    count: u64,
    rate: u64,
) -> anyhow::Result<Vec<f64>> {
    const RT_STREAM: &str = "BENCH_CAPTURE_RT";
    const RT_PREFIX: &str = "benchcaprt";
    bench
        .create_group_stream(jetsync::StreamConfig {
            name: RT_STREAM.into(),
            subject_prefix: RT_PREFIX.into(),
            provision: false,
            transactions: atomic,
            ..jetsync::StreamConfig::default()
        })
        .await?;
    let nats = async_nats::connect(&bench.url).await?;
    let body = bytes::Bytes::from_static(&[b'x'; 120]);
    let start = Instant::now();
    let mut times = Vec::with_capacity(count as usize);
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("rt-{atomic}-{i}").as_str());
        if atomic {
            headers.insert(BATCH_ID_HEADER, format!("rtb{i}").as_str());
            headers.insert(BATCH_SEQUENCE_HEADER, "1");
            headers.insert(BATCH_COMMIT_HEADER, "1");
        }
        let began = Instant::now();
        let reply = nats
            .request_with_headers(format!("{RT_PREFIX}.t.{}", i % 500), headers, body.clone())
            .await?;
        times.push(began.elapsed().as_secs_f64() * 1e3);
        if i == 0 && !String::from_utf8_lossy(&reply.payload).contains("\"seq\"") {
            bail!(
                "the server did not store a probe message: {}",
                String::from_utf8_lossy(&reply.payload)
            );
        }
    }
    bench.delete_stream(RT_STREAM).await;
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Runs a one-shot subcommand of the binary and fails unless it exits 0.
fn one_shot(applier: &Applier, config: &Path, args: &[&str], dir: &Path) -> anyhow::Result<()> {
    let log = dir.join(format!("{}.log", args.join("-")));
    let mut process = Process::spawn_command(&applier.path, config, args, None, &log)?;
    let status = process.child.wait()?;
    if !status.success() {
        bail!(
            "jetsync-applier {args:?} failed ({status}): {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
    }
    Ok(())
}

pub(crate) async fn run(
    bench: &Bench,
    server_version: &str,
    applier: &Applier,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<CaptureReport> {
    let atomic = jetsync::transaction::supports_transactions(server_version);
    bench.delete_stream(STREAM).await;
    let root = tempfile::tempdir()?;
    let root_path = root.path().to_owned();
    if std::env::var_os("JETSYNC_BENCH_KEEP").is_some() {
        eprintln!(
            "capture: keeping {} (JETSYNC_BENCH_KEEP)",
            root.path().display()
        );
    }
    let (dir_a, dir_b) = (root.path().join("a"), root.path().join("b"));
    let config_a = write_config(&dir_a, "capbench-a", &bench.url, true, atomic)?;
    let config_b = write_config(&dir_b, "capbench-b", &bench.url, false, atomic)?;
    let (db_a, db_b) = (
        sqlite_path(&dir_a, "capbench-a"),
        sqlite_path(&dir_b, "capbench-b"),
    );

    // The service's own table, then capture on it.
    {
        let conn = rusqlite::Connection::open(&db_a)?;
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; \
             CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, written_us INTEGER NOT NULL, pad TEXT)"
        ))?;
    }
    one_shot(applier, &config_a, &["capture", "install"], root.path())?;
    let mut a = Process::spawn(&applier.path, &config_a, &dir_a.join("run.log"))?;
    let mut b = Process::spawn(&applier.path, &config_b, &dir_b.join("run.log"))?;
    let logs = || {
        format!(
            "A:\n{}\nB:\n{}",
            fs::read_to_string(dir_a.join("run.log")).unwrap_or_default(),
            fs::read_to_string(dir_b.join("run.log")).unwrap_or_default()
        )
    };

    // Warm-up: B has applied the first rows before anything is measured.
    let writes = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let total = WARM_UP + writes;
    let stop = Arc::new(AtomicBool::new(false));
    // A plain subscriber of the group's subjects: when each row's event left A (the first
    // arrival per row id, from the subject's key; a republished duplicate counts once).
    let nats = async_nats::connect(&bench.url).await?;
    let mut subscription = nats.subscribe(format!("{PREFIX}.>")).await?;
    nats.flush().await?;
    let arrivals = tokio::spawn(async move {
        let mut arrived: Vec<Option<Instant>> = vec![None; total as usize + 1];
        let mut count = 0u64;
        while count < total {
            match tokio::time::timeout(Duration::from_secs(90), subscription.next()).await {
                Ok(Some(message)) => {
                    let now = Instant::now();
                    let id = message
                        .subject
                        .rsplit('.')
                        .next()
                        .and_then(|k| k.parse::<usize>().ok());
                    if let Some(slot) = id.and_then(|id| arrived.get_mut(id)) {
                        if slot.is_none() {
                            *slot = Some(now);
                            count += 1;
                        }
                    }
                }
                _ => break,
            }
        }
        arrived
    });
    let watcher = {
        let (path, stop) = (db_b.clone(), stop.clone());
        std::thread::spawn(move || watch(path, total, stop))
    };
    let outcome = async {
        let path = db_a.clone();
        let (warm, _) =
            tokio::task::spawn_blocking(move || write(&path, 1, WARM_UP, rate)).await??;
        drop(warm);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut conn = None;
        while row_count(&mut conn, &db_b) < WARM_UP {
            if let Some(status) = a.child.try_wait()?.or(b.child.try_wait()?) {
                bail!("an applier exited ({status}):\n{}", logs());
            }
            if Instant::now() >= deadline {
                bail!("B did not apply the warm-up rows within 60 s:\n{}", logs());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let path = db_a.clone();
        let started = Instant::now();
        let cpu = [
            harness::CpuMark::now(Some(a.child.id())),
            harness::CpuMark::now(Some(b.child.id())),
            harness::CpuMark::now(harness::server_pid()),
            harness::CpuMark::own(),
        ];
        let (committed, commit_ms) =
            tokio::task::spawn_blocking(move || write(&path, WARM_UP + 1, writes, rate)).await??;
        let achieved = harness::eps(writes, started.elapsed());
        let cpu_us = cpu.map(|mark| mark.us_per_event(writes).unwrap_or(0.0));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !watcher.is_finished() {
            if Instant::now() >= deadline {
                bail!(
                    "B did not apply every row within 60 s of the last write:\n{}",
                    logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok((committed, commit_ms, achieved, cpu_us))
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let seen = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the watcher panicked"))?;
    let (committed, mut commit_ms, achieved, cpu_us) = outcome?;
    for p in [&mut a, &mut b] {
        let status = p.terminate(Duration::from_secs(15))?;
        if !status.success() {
            bail!("an applier exited {status} on SIGTERM:\n{}", logs());
        }
    }
    bench.delete_stream(STREAM).await;
    if std::env::var_os("JETSYNC_BENCH_KEEP").is_some() {
        let _ = root.keep();
    }

    // The server's own floor, after the appliers stopped (nothing else loads it).
    let probes = writes.min(3 * RATE);
    let plain = server_round_trips(bench, false, probes, rate).await?;
    let atomic_rt = if atomic {
        server_round_trips(bench, true, probes, rate).await?
    } else {
        Vec::new()
    };
    let measured = &seen[WARM_UP as usize..];
    if measured.len() != committed.len() {
        bail!(
            "{} rows seen on B, {} written",
            measured.len(),
            committed.len()
        );
    }
    let arrived = arrivals.await?;
    // Row ids WARM_UP + 1 ..= total were the measured writes, in order.
    let mut published: Vec<f64> = arrived
        .get(WARM_UP as usize + 1..)
        .unwrap_or_default()
        .iter()
        .zip(&committed)
        .filter_map(|(at, committed)| {
            at.map(|at| at.saturating_duration_since(*committed).as_secs_f64() * 1e3)
        })
        .collect();
    if std::env::var_os("JETSYNC_BENCH_KEEP").is_some() {
        // Investigation aid: per measured row, when its COMMIT returned on A and when its event
        // reached the plain subscriber, in Unix µs (to line up with the appliers' trace logs).
        let (wall, now) = (std::time::SystemTime::now(), Instant::now());
        let unix_us = |at: Instant| {
            let wall_at = wall - now.saturating_duration_since(at);
            wall_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros())
        };
        let mut csv = String::from("id,committed_us,published_us\n");
        for (i, committed) in committed.iter().enumerate() {
            let id = WARM_UP as usize + 1 + i;
            let at = arrived.get(id).copied().flatten().map_or(0, unix_us);
            csv.push_str(&format!("{id},{},{at}\n", unix_us(*committed)));
        }
        let _ = fs::write(root_path.join("timeline.csv"), csv);
    }
    published.sort_by(f64::total_cmp);
    let mut after_publish: Vec<f64> = arrived
        .get(WARM_UP as usize + 1..)
        .unwrap_or_default()
        .iter()
        .zip(measured)
        .filter_map(|(at, seen)| {
            at.map(|at| seen.saturating_duration_since(at).as_secs_f64() * 1e3)
        })
        .collect();
    after_publish.sort_by(f64::total_cmp);
    let mut latencies: Vec<f64> = measured
        .iter()
        .zip(&committed)
        .map(|(seen, committed)| seen.saturating_duration_since(*committed).as_secs_f64() * 1e3)
        .collect();
    latencies.sort_by(f64::total_cmp);
    commit_ms.sort_by(f64::total_cmp);
    Ok(CaptureReport {
        rate,
        writes,
        achieved_wps: achieved,
        p50_ms: harness::percentile(&latencies, 0.50),
        p99_ms: harness::percentile(&latencies, 0.99),
        p999_ms: harness::percentile(&latencies, 0.999),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        commit_p99_ms: harness::percentile(&commit_ms, 0.99),
        published_p50_ms: harness::percentile(&published, 0.50),
        published_p99_ms: harness::percentile(&published, 0.99),
        applied_after_publish_p50_ms: harness::percentile(&after_publish, 0.50),
        applied_after_publish_p99_ms: harness::percentile(&after_publish, 0.99),
        server_plain_p50_ms: harness::percentile(&plain, 0.50),
        server_plain_p99_ms: harness::percentile(&plain, 0.99),
        server_atomic_p50_ms: harness::percentile(&atomic_rt, 0.50),
        server_atomic_p99_ms: harness::percentile(&atomic_rt, 0.99),
        atomic,
        poll_ms: POLL_MS,
        cpu_us_a: cpu_us[0],
        cpu_us_b: cpu_us[1],
        cpu_us_server: cpu_us[2],
        cpu_us_bench: cpu_us[3],
    })
}
