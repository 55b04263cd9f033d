//! Rebuilding the synced tables from a snapshot (a resync: a gap, or `jetsync-applier resync`).

use std::time::{Duration, Instant};

use async_nats::jetstream;
use jetsync::Config;

use crate::{
    apply::{Applier, Mode},
    bootstrap::BOOTSTRAP_BATCH,
    shutdown::Shutdown,
    snapshot::start_snapshot,
    EngineError, Sink,
};

/// Progress of a snapshot being read.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotProgress {
    /// Events read so far.
    pub loaded: u64,
    /// Rows the server reported when the snapshot started.
    pub total: u64,
}

/// What a completed resync did.
#[derive(Debug, Clone, Copy)]
pub struct ResyncDone {
    /// The sequence the rebuilt tables are at.
    pub applied_seq: u64,
    /// Events applied from the snapshot.
    pub events: u64,
}

/// Rebuilds the synced tables from a snapshot in one sink transaction (`Sink::replace`), and
/// replaces the parked events by those of the snapshot. Returns `None` on shutdown (nothing
/// changed unless the replacement had begun, in which case a restart finishes it).
pub(crate) async fn resync<S: Sink>(
    js: &jetstream::Context,
    config: &Config,
    applier: &mut Applier<S>,
    shutdown: &mut Shutdown,
    progress: &mut (dyn FnMut(SnapshotProgress) + Send),
) -> Result<Option<ResyncDone>, EngineError> {
    let mut snapshot = start_snapshot(js, config).await?;
    let mut all = Vec::new();
    let mut last_report = Instant::now();
    while let Some(batch) = snapshot.next_batch(BOOTSTRAP_BATCH, shutdown).await? {
        all.extend(batch);
        if last_report.elapsed() >= Duration::from_millis(200) {
            progress(SnapshotProgress {
                loaded: snapshot.delivered(),
                total: snapshot.total(),
            });
            last_report = Instant::now();
        }
        if shutdown.is_requested() {
            return Ok(None);
        }
    }
    progress(SnapshotProgress {
        loaded: snapshot.delivered(),
        total: snapshot.total(),
    });
    let events: Vec<(u64, &jetstream::Message)> = all.iter().map(|(s, m)| (*s, m)).collect();
    if !applier
        .apply(&events, snapshot.last_seq(), Mode::Replace, false, shutdown)
        .await?
    {
        return Ok(None);
    }
    Ok(Some(ResyncDone {
        applied_seq: applier.applied,
        events: events.len() as u64,
    }))
}
