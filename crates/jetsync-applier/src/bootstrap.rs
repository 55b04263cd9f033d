//! Joining from a snapshot: an instance with nothing applied (S = 0 and an empty sink) applies
//! the latest event of every row instead of replaying all history.
//!
//! Crash windows: every batch of [`BOOTSTRAP_BATCH`] events is applied with its fence like a
//! durable-consumer batch (see `apply.rs`), and the bootstrap marker in the checkpoint store stays
//! set until the end, so a killed bootstrap resumes after its last committed batch with a new
//! snapshot (any prefix of a snapshot is a valid start, see `snapshot.rs`).

use std::time::Instant;

use async_nats::jetstream;
use jetsync::Config;

use crate::{
    apply::{Applier, Mode},
    delivery::Delivery,
    engine::PROGRESS_EVERY,
    shutdown::Shutdown,
    snapshot::start_snapshot,
    EngineError, Sink,
};

/// Events per sink call while bootstrapping, whatever `apply.batch_max`: each batch commits its
/// fence, and a killed bootstrap resumes after the last one, so this bounds the work redone.
pub(crate) const BOOTSTRAP_BATCH: usize = 5_000;

/// Joins from a snapshot (S = 0 and an empty sink, or resuming an interrupted bootstrap): the
/// latest event of every row, applied in ascending batches, each with its fence, so a crash
/// resumes after the last one. Returns false on shutdown.
pub(crate) async fn bootstrap<S: Sink>(
    js: &jetstream::Context,
    config: &Config,
    applier: &mut Applier<S>,
    shutdown: &mut Shutdown,
) -> Result<bool, EngineError> {
    let started = Instant::now();
    let from = applier.applied;
    let mut snapshot = start_snapshot(js, config).await?;
    tracing::info!(
        rows = snapshot.total(),
        resuming_after = from,
        "bootstrapping from a snapshot (latest event of every row)"
    );
    let mut last_log = Instant::now();
    while let Some(batch) = snapshot.next_batch(BOOTSTRAP_BATCH, shutdown).await? {
        let events: Vec<(u64, &Delivery)> = batch.iter().map(|(s, m)| (*s, m)).collect();
        let through = events.last().map(|e| e.0).unwrap_or(applier.applied);
        if !applier
            .apply(&events, &mut [], through, Mode::Apply, None, shutdown)
            .await?
        {
            return Ok(false);
        }
        if last_log.elapsed() >= PROGRESS_EVERY {
            tracing::info!(
                loaded = snapshot.delivered(),
                rows = snapshot.total(),
                "bootstrapping"
            );
            last_log = Instant::now();
        }
        if shutdown.is_requested() {
            return Ok(false);
        }
    }
    if !applier.advance(snapshot.last_seq(), shutdown).await? {
        return Ok(false);
    }
    applier.offsets.set_bootstrapping(&applier.group, false)?;
    tracing::info!(
        events = snapshot.delivered(),
        applied = applier.applied,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "bootstrap complete; continuing with the durable consumer"
    );
    Ok(true)
}
