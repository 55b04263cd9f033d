//! Memory: peak resident memory of the real `jetsync-applier` binary (SQLite sink, the
//! binary's default) while it replays a backlog.
//!
//! The binary is built with cargo before any measurement starts (so the compiler does not
//! compete with the measured phases). The phase writes a TOML configuration, spawns
//! `jetsync-applier --config F run`, samples `/proc/<pid>/status` (VmHWM, the kernel's own peak,
//! and VmRSS) every 20 ms until the checkpoint in `<data_dir>/<instance>.redb` reaches the last
//! sequence, then stops it with SIGTERM, as an operator would, and checks it exits cleanly.
//! It runs with `apply.bootstrap = false`, so it replays the backlog rather than joining from a
//! snapshot.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde::Serialize;

use crate::{harness::Bench, replay};

const STREAM: &str = "BENCH_MEM";
const PREFIX: &str = "benchmem";
const INSTANCE: &str = "bench-mem";

/// Outcome of the memory phase: the backlog replay (this module), the flood of 1 MiB events
/// (`flood.rs`) and the resync (`resync.rs`); a part that failed is left out (its error is in
/// the report's `errors`).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct MemoryReport {
    /// The backlog replay: `backlog`, `peak_rss_mib`, `sink`, `replay_eps`, `binary_fresh`.
    #[serde(flatten)]
    pub(crate) backlog: Option<BacklogReport>,
    /// Events of about 1 MiB in the flood.
    pub(crate) flood_events: Option<u64>,
    /// Bytes of every flood event body.
    pub(crate) flood_event_bytes: Option<u64>,
    /// Peak RSS of `jetsync-applier run` through the flood.
    pub(crate) flood_peak_rss_mib: Option<f64>,
    /// Body bytes applied per second through the flood.
    pub(crate) flood_mib_per_s: Option<f64>,
    /// Rows of the resync.
    pub(crate) resync_rows: Option<u64>,
    /// Peak RSS of `jetsync-applier resync`.
    pub(crate) resync_peak_rss_mib: Option<f64>,
    /// Wall time of the `resync` command, process start included.
    pub(crate) resync_s: Option<f64>,
    /// Peak RSS of the `run` that bootstrapped the same rows before the resync.
    pub(crate) resync_bootstrap_peak_rss_mib: Option<f64>,
    /// Wall time of that bootstrap.
    pub(crate) resync_bootstrap_s: Option<f64>,
}

impl MemoryReport {
    /// Takes the flood's figures.
    pub(crate) fn set_flood(&mut self, flood: crate::flood::FloodReport) {
        self.flood_events = Some(flood.events);
        self.flood_event_bytes = Some(flood.event_bytes);
        self.flood_peak_rss_mib = Some(flood.peak_rss_mib);
        self.flood_mib_per_s = Some(flood.mib_per_s);
    }

    /// Takes the resync's figures.
    pub(crate) fn set_resync(&mut self, resync: crate::resync::ResyncReport) {
        self.resync_rows = Some(resync.rows);
        self.resync_peak_rss_mib = Some(resync.peak_rss_mib);
        self.resync_s = Some(resync.resync_s);
        self.resync_bootstrap_peak_rss_mib = Some(resync.bootstrap_peak_rss_mib);
        self.resync_bootstrap_s = Some(resync.bootstrap_s);
    }
}

/// Outcome of the backlog replay.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BacklogReport {
    pub(crate) backlog: u64,
    pub(crate) peak_rss_mib: f64,
    /// The sink the binary ran with.
    pub(crate) sink: &'static str,
    /// The binary's own catch-up rate (process start included).
    pub(crate) replay_eps: f64,
    /// Whether the binary was rebuilt from the current sources for this run.
    pub(crate) binary_fresh: bool,
}

/// The `jetsync-applier` binary, and whether it is fresh.
#[derive(Debug, Clone)]
pub(crate) struct Applier {
    pub(crate) path: PathBuf,
    pub(crate) fresh: bool,
}

/// The workspace root (`crates/jetsync-bench/../..`).
fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.join("..").join("..")
}

/// The cargo target directory (`CARGO_TARGET_DIR`, else `<workspace>/target`).
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds `jetsync-applier` in release mode (bounded by `timeout`: other builds may hold the
/// target directory's lock). When the build does not finish in time but a binary exists, that
/// binary is used and reported as not fresh. Ctrl-C stops the build and fails.
pub(crate) async fn build_applier(timeout: Duration) -> anyhow::Result<Applier> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = workspace_root().join("Cargo.toml");
    let path = target_dir().join("release").join("jetsync-applier");
    let log = tempfile::NamedTempFile::new()?;
    let mut child = tokio::process::Command::new(&cargo)
        // `-p jetsync-bench` too: the same package set as `cargo run -p jetsync-bench`, hence the
        // same feature unification, so the libraries the bench was built with are reused and only
        // the applier's binary target is compiled.
        .args([
            "build",
            "--release",
            "-p",
            "jetsync-bench",
            "-p",
            "jetsync-applier",
            "--bin",
            "jetsync-applier",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen()?)
        // Its own process group, so a build that is cut short stops with its compilers.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {cargo:?} build"))?;
    let pgid = child.id().map(|id| format!("-{id}"));
    let outcome = tokio::select! {
        status = child.wait() => Some(status?),
        _ = tokio::time::sleep(timeout) => None,
        _ = tokio::signal::ctrl_c() => {
            if let Some(group) = &pgid {
                signal(group, "TERM");
            }
            let _ = child.wait().await;
            bail!("interrupted while building jetsync-applier");
        }
    };
    let text = fs::read_to_string(log.path()).unwrap_or_default();
    match outcome {
        Some(status) if status.success() => Ok(Applier { path, fresh: true }),
        Some(status) => bail!(
            "building jetsync-applier failed ({status}):\n{}",
            tail(&text, 40)
        ),
        None => {
            // Stop the build's process group (cargo and the compilers it started).
            if let Some(group) = &pgid {
                signal(group, "TERM");
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            if path.exists() {
                eprintln!(
                    "warning: building jetsync-applier took over {timeout:?} (another build holds \
                     the target dir?); using the existing {}",
                    path.display()
                );
                Ok(Applier { path, fresh: false })
            } else {
                bail!(
                    "building jetsync-applier did not finish within {timeout:?}:\n{}",
                    tail(&text, 40)
                )
            }
        }
    }
}

pub(crate) async fn run(
    bench: &Bench,
    backlog: u64,
    applier: &Applier,
) -> anyhow::Result<BacklogReport> {
    let stream = replay::fill_backlog(bench, STREAM, PREFIX, backlog, 0x5eed_0004).await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let config_path = write_config(
        dir.path(),
        INSTANCE,
        &bench.url,
        &stream,
        "bootstrap = false\n",
    )?;
    let log_path = dir.path().join("applier.log");
    let checkpoint = data.join(format!("{INSTANCE}.redb"));
    let timeout = Duration::from_secs(60 + backlog / 2_000);

    let started = Instant::now();
    let mut process = Process::spawn(&applier.path, &config_path, &log_path)?;
    let pid = process.child.id();
    let deadline = started + timeout;
    let mut peak_kib = 0u64;
    let mut tick = 0u64;
    let replay_eps = loop {
        if let Some(status) = process.child.try_wait()? {
            bail!(
                "jetsync-applier exited early ({status}):\n{}",
                tail(&fs::read_to_string(&log_path).unwrap_or_default(), 30)
            );
        }
        peak_kib = peak_kib.max(resident_peak_kib(pid));
        if tick.is_multiple_of(5) {
            let applied = jetsync_applier::read_checkpoint(&checkpoint, STREAM)
                .map(|c| c.applied)
                .unwrap_or(0);
            if applied >= backlog {
                break crate::harness::eps(backlog, started.elapsed());
            }
            if Instant::now() >= deadline {
                bail!(
                    "jetsync-applier applied only seq {applied} of {backlog} within {timeout:?}:\n{}",
                    tail(&fs::read_to_string(&log_path).unwrap_or_default(), 30)
                );
            }
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // VmHWM is the kernel's high-water mark: read it once more just before stopping.
    peak_kib = peak_kib.max(resident_peak_kib(pid));
    let status = process.terminate(Duration::from_secs(15))?;
    if !status.success() {
        bail!(
            "jetsync-applier did not exit cleanly on SIGTERM ({status}):\n{}",
            tail(&fs::read_to_string(&log_path).unwrap_or_default(), 30)
        );
    }
    bench.delete_stream(STREAM).await;
    Ok(BacklogReport {
        backlog,
        peak_rss_mib: peak_kib as f64 / 1024.0,
        sink: "sqlite",
        replay_eps,
        binary_fresh: applier.fresh,
    })
}

/// Writes `<dir>/jetsync.toml` for instance `instance` (data in `<dir>/data`, table `items`
/// keyed by `id` (an unconfigured table's events would only be parked), SQLite sink, the
/// bench's `apply.batch_max`, `apply_extra` appended to `[apply]`, warnings only) on `stream`,
/// which the bench created (`provision = false`); returns its path.
pub(crate) fn write_config(
    dir: &Path,
    instance: &str,
    url: &str,
    stream: &jetsync::StreamConfig,
    apply_extra: &str,
) -> anyhow::Result<PathBuf> {
    write_config_with(
        dir,
        instance,
        url,
        stream,
        "kind = \"sqlite\"\n",
        apply_extra,
    )
}

/// [`write_config`] with `sink` as the body of the `[sink]` section.
pub(crate) fn write_config_with(
    dir: &Path,
    instance: &str,
    url: &str,
    stream: &jetsync::StreamConfig,
    sink: &str,
    apply_extra: &str,
) -> anyhow::Result<PathBuf> {
    let data = dir.join("data");
    let config_path = dir.join("jetsync.toml");
    fs::create_dir_all(dir)?;
    fs::write(
        &config_path,
        format!(
            "instance = {instance:?}\n\
             data_dir = {data:?}\n\
             \n[nats]\nurl = {url:?}\n\
             \n[stream]\nname = {name:?}\nsubject_prefix = {prefix:?}\nhistory = {history}\nprovision = false\n\
             \n[tables.{table}]\nkey = \"id\"\n\
             \n[sink]\n{sink}\
             \n[apply]\nbatch_max = {batch_max}\n{apply_extra}\
             \n[log]\nlevel = \"warn\"\n",
            data = data.to_string_lossy(),
            table = crate::workload::TABLE,
            name = stream.name,
            prefix = stream.subject_prefix,
            history = stream.history,
            batch_max = crate::harness::batch_max(),
        ),
    )?;
    Ok(config_path)
}

/// Samples the peak resident memory of `process` every 20 ms until `done()` returns `Some`
/// (checked every 100 ms), the process exits (an error unless `exit_ok`), or `timeout` passes
/// (an error). Returns the peak in KiB, `done`'s value (`None` when the process exited) and
/// the elapsed time.
pub(crate) async fn sample_peak<T>(
    process: &mut Process,
    log: &Path,
    timeout: Duration,
    exit_ok: bool,
    mut done: impl FnMut() -> Option<T>,
) -> anyhow::Result<(u64, Option<T>, Duration)> {
    let started = Instant::now();
    let pid = process.child.id();
    let mut peak_kib = 0u64;
    let mut tick = 0u64;
    loop {
        // VmHWM is the kernel's high-water mark: read before the exit check, so the last
        // sample of a process that just exited is not lost (while it is a zombie it reads 0).
        peak_kib = peak_kib.max(resident_peak_kib(pid));
        if let Some(status) = process.child.try_wait()? {
            process.done = true;
            if exit_ok && status.success() {
                return Ok((peak_kib, None, started.elapsed()));
            }
            bail!(
                "jetsync-applier exited ({status}):\n{}",
                tail(&fs::read_to_string(log).unwrap_or_default(), 30)
            );
        }
        if tick.is_multiple_of(5) {
            if let Some(value) = done() {
                peak_kib = peak_kib.max(resident_peak_kib(pid));
                return Ok((peak_kib, Some(value), started.elapsed()));
            }
            if started.elapsed() >= timeout {
                bail!(
                    "jetsync-applier did not finish within {timeout:?}:\n{}",
                    tail(&fs::read_to_string(log).unwrap_or_default(), 30)
                );
            }
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// VmRSS of `pid` in KiB (0 when unreadable).
pub(crate) fn resident_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// max(VmHWM, VmRSS) of `pid` in KiB (0 when unreadable).
pub(crate) fn resident_peak_kib(pid: u32) -> u64 {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .filter(|l| l.starts_with("VmHWM:") || l.starts_with("VmRSS:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// A spawned applier that is killed (SIGKILL) and reaped if the phase fails before stopping it.
pub(crate) struct Process {
    pub(crate) child: Child,
    done: bool,
}

impl Process {
    pub(crate) fn spawn(binary: &Path, config: &Path, log: &Path) -> anyhow::Result<Process> {
        Process::spawn_command(binary, config, &["run"], None, log)
    }

    /// Starts `binary --config <config> <args>`, its stderr into `log` and its stdout into
    /// `stdout` (discarded when `None`).
    pub(crate) fn spawn_command(
        binary: &Path,
        config: &Path,
        args: &[&str],
        stdout: Option<&Path>,
        log: &Path,
    ) -> anyhow::Result<Process> {
        let log = fs::File::create(log)?;
        let stdout = match stdout {
            Some(path) => Stdio::from(fs::File::create(path)?),
            None => Stdio::null(),
        };
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .env_remove("RUST_LOG");
        // An experiment knob: the binaries' log filter (e.g. `jetsync_applier::engine=trace`);
        // with `JETSYNC_BENCH_KEEP` the replay keeps the logs.
        if let Some(filter) = std::env::var_os("JETSYNC_BENCH_APPLIER_LOG") {
            command.env("RUST_LOG", filter);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Process { child, done: false })
    }

    /// SIGTERM, then wait up to `grace` (SIGKILL after it).
    pub(crate) fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        signal(&self.child.id().to_string(), "TERM");
        let status = match wait_deadline(&mut self.child, Instant::now() + grace)? {
            Some(status) => status,
            None => {
                let _ = self.child.kill();
                let status = self.child.wait()?;
                self.done = true;
                bail!("jetsync-applier ignored SIGTERM for {grace:?}; killed it ({status})");
            }
        };
        self.done = true;
        Ok(status)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `kill -<sig> <target>` (target: a pid, or `-pgid` for a process group).
fn signal(target: &str, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits for `child` until `deadline`; `None` if it is still running then.
fn wait_deadline(child: &mut Child, deadline: Instant) -> anyhow::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
