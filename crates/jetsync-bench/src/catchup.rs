//! Replay by the real binary: `jetsync-applier run` (with `apply.bootstrap = false`) catching
//! up on a backlog into a given sink, timed from the process start until its checkpoint
//! (`<data_dir>/<instance>.redb`) reaches the last sequence, then stopped with SIGTERM.

use std::{fs, path::Path, time::Duration};

use anyhow::{bail, Context as _};
use jetsync::StreamConfig;

use crate::{
    harness,
    memory::{self, Applier, Process},
};

/// A finished catch-up.
#[derive(Debug, Clone)]
pub(crate) struct CatchUp {
    /// Events per second, process start included.
    pub(crate) eps: f64,
    /// Peak resident memory of the process (MiB).
    pub(crate) peak_rss_mib: f64,
    /// CPU time per event of the process (µs), start-up included.
    pub(crate) applier_cpu_us: Option<f64>,
    /// CPU time per event of the nats-server meanwhile (µs).
    pub(crate) server_cpu_us: Option<f64>,
}

/// Runs `jetsync-applier run` as instance `instance` (its files under `dir`) with `sink` as the
/// body of `[sink]` and `apply_extra` in `[apply]`, until it applied seq `last`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    applier: &Applier,
    dir: &Path,
    instance: &str,
    url: &str,
    stream: &StreamConfig,
    sink: &str,
    apply_extra: &str,
    last: u64,
) -> anyhow::Result<CatchUp> {
    fs::create_dir_all(dir)?;
    let apply = format!("bootstrap = false\n{apply_extra}");
    let config = memory::write_config_with(dir, instance, url, stream, sink, &apply)?;
    let log = dir.join("applier.log");
    let checkpoint = dir.join("data").join(format!("{instance}.redb"));
    let timeout = Duration::from_secs(60 + last / 1_000);
    harness::mark(&format!("{instance} binary"));
    let server_cpu = harness::CpuMark::now(harness::server_pid());
    let mut process = Process::spawn(&applier.path, &config, &log)?;
    let own_cpu = harness::CpuMark::now(Some(process.child.id()));
    let (peak_kib, done, elapsed) = memory::sample_peak(&mut process, &log, timeout, false, || {
        let applied = jetsync_applier::read_checkpoint(&checkpoint, &stream.name)
            .map(|c| c.applied)
            .unwrap_or(0);
        (applied >= last).then_some(())
    })
    .await
    .with_context(|| format!("jetsync-applier run ({instance})"))?;
    harness::mark(&format!("{instance} binary done"));
    if done.is_none() {
        bail!("jetsync-applier ({instance}) exited before applying seq {last}");
    }
    let (applier_cpu_us, server_cpu_us) =
        (own_cpu.us_per_event(last), server_cpu.us_per_event(last));
    let status = process.terminate(Duration::from_secs(15))?;
    if !status.success() {
        bail!(
            "jetsync-applier ({instance}) did not exit cleanly on SIGTERM ({status}):\n{}",
            memory::tail(&fs::read_to_string(&log).unwrap_or_default(), 20)
        );
    }
    Ok(CatchUp {
        eps: harness::eps(last, elapsed),
        peak_rss_mib: peak_kib as f64 / 1024.0,
        applier_cpu_us,
        server_cpu_us,
    })
}
