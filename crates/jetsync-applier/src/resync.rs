//! Rebuilding the synced tables from a snapshot (a resync: a gap, or `jetsync-applier resync`),
//! streamed in bounded memory: the snapshot is read in batches of [`BOOTSTRAP_BATCH`] events, and
//! each batch is classified (poison and held events parked, exactly as in Apply mode, see
//! `apply.rs`), sent to the sink as one chunk of one open replacement
//! ([`Sink::replace_begin`] / [`Sink::replace_chunk`] / [`Sink::replace_commit`]) and dropped.
//! Readers see the old tables until the commit, the new ones after it.
//!
//! Crash windows (what survives a SIGKILL at each point):
//! 1. before [`Offsets::start_resync`](crate::Offsets::start_resync): nothing changed.
//! 2. after it, before the sink's commit: the resync marker is set and the old parked events are
//!    gone; the snapshot's parked events so far are recorded (each chunk's parks are committed
//!    before the sink sees the chunk). The sink rolls the open replacement back, so its rows and
//!    fence are the old ones. The restart sees the marker and redoes the whole resync from a new
//!    snapshot, which rebuilds the parked events from nothing (`start_resync` again).
//! 3. after the sink's commit, before [`Offsets::finish_resync`](crate::Offsets::finish_resync):
//!    the sink holds the new tables and fence; the marker makes the restart redo the resync,
//!    which gives the same tables (a pure function of the stream) at a later snapshot.
//! 4. after `finish_resync`: done; the engine continues with the durable consumer after the
//!    snapshot's last sequence.
//!
//! A sink that becomes unavailable mid-way ends the replacement (nothing of it remains): the
//! resync backs off and starts over from a new snapshot. Shutdown aborts the replacement; the
//! marker makes the next run redo it.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use async_nats::jetstream;
use jetsync::{Config, OnPoison};

use crate::{
    apply::{take_rejected, Applier, Classified},
    backoff::Backoff,
    bootstrap::BOOTSTRAP_BATCH,
    delivery::Delivery,
    parked::{ParkedEvent, RowId},
    shutdown::Shutdown,
    snapshot::start_snapshot,
    EngineError, Sink, SinkError,
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

/// Rebuilds the synced tables from a snapshot in one sink replacement streamed chunk by chunk
/// (see the module docs), and replaces the parked events by those of the snapshot. Retries
/// (from a new snapshot) while NATS or the sink are unavailable. Returns `None` on shutdown
/// (nothing changed in the sink; a pending resync that the next run redoes).
pub(crate) async fn resync<S: Sink>(
    js: &jetstream::Context,
    config: &Config,
    applier: &mut Applier<S>,
    shutdown: &mut Shutdown,
    progress: &mut (dyn FnMut(SnapshotProgress) + Send),
) -> Result<Option<ResyncDone>, EngineError> {
    let mut backoff = Backoff::new("resyncing from a snapshot", applier.max_backoff);
    loop {
        match attempt(js, config, applier, shutdown, progress).await {
            Ok(done) => {
                backoff.succeed();
                return Ok(done);
            }
            Err(e) if e.is_retryable() => {
                if !backoff.fail(&e, shutdown).await {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// One resync from one snapshot.
async fn attempt<S: Sink>(
    js: &jetstream::Context,
    config: &Config,
    applier: &mut Applier<S>,
    shutdown: &mut Shutdown,
    progress: &mut (dyn FnMut(SnapshotProgress) + Send),
) -> Result<Option<ResyncDone>, EngineError> {
    let group = applier.group.clone();
    let mut snapshot = start_snapshot(js, config).await?;
    // Crash window 2 starts: marker set, old parked events gone, sink untouched.
    applier.offsets.start_resync(&group, snapshot.stop_at())?;
    applier.sink.replace_begin(&group).await?;
    let mut state = Streamed::default();
    let streamed = stream(&mut snapshot, applier, &mut state, shutdown, progress).await;
    match streamed {
        Ok(true) => {}
        Ok(false) => {
            applier.sink.replace_abort(&group).await;
            return Ok(None);
        }
        Err(e) => {
            applier.sink.replace_abort(&group).await;
            return Err(e);
        }
    }
    let through = snapshot.last_seq();
    if let Err(e) = applier.sink.replace_commit(&group, through).await {
        applier.sink.replace_abort(&group).await;
        return Err(e.into());
    }
    // Crash window 3: the sink is replaced up to `through`; the marker still says pending.
    applier
        .offsets
        .finish_resync(&group, through, state.events)?;
    // Crash window 4: done.
    applier.applied = through;
    applier.blocked = state.blocked;
    applier
        .stats
        .set_parked(applier.offsets.parked_count(&group)?);
    applier.stats.set_applied(through);
    for p in state.parks_logged.iter() {
        tracing::warn!(seq = p.0, subject = %p.1, error = %p.2, "poison event of the snapshot parked; later events of its row are held behind it (see `jetsync-applier parked list`)");
    }
    Ok(Some(ResyncDone {
        applied_seq: through,
        events: state.events,
    }))
}

/// What a resync carries from chunk to chunk (a few counters and the blocked rows, never the
/// events).
#[derive(Default)]
struct Streamed {
    /// Rows with a parked event → the sequence of their first parked event.
    blocked: HashMap<RowId, u64>,
    /// Changes sent to the sink.
    events: u64,
    /// The first parked events (at most [`LOGGED_PARKS`]): logged once the resync committed.
    parks_logged: Vec<(u64, String, String)>,
}

/// How many parked events of a resync are logged one by one.
const LOGGED_PARKS: usize = 20;

/// Streams the snapshot into the open replacement. Returns false on shutdown.
async fn stream<S: Sink>(
    snapshot: &mut crate::snapshot::Snapshot,
    applier: &mut Applier<S>,
    state: &mut Streamed,
    shutdown: &mut Shutdown,
    progress: &mut (dyn FnMut(SnapshotProgress) + Send),
) -> Result<bool, EngineError> {
    let mut last_report = Instant::now();
    while let Some(batch) = snapshot.next_batch(BOOTSTRAP_BATCH, shutdown).await? {
        if shutdown.is_requested() {
            return Ok(false);
        }
        let events: Vec<(u64, &Delivery)> = batch.iter().map(|(s, m)| (*s, m)).collect();
        if !chunk(applier, state, &events, shutdown).await? {
            return Ok(false);
        }
        drop(events);
        drop(batch);
        if last_report.elapsed() >= Duration::from_millis(200) {
            progress(SnapshotProgress {
                loaded: snapshot.delivered(),
                total: snapshot.total(),
            });
            last_report = Instant::now();
        }
    }
    progress(SnapshotProgress {
        loaded: snapshot.delivered(),
        total: snapshot.total(),
    });
    Ok(true)
}

/// Classifies one snapshot batch like Apply mode does ([`Rules::classify`](crate::apply::Rules):
/// poison, tables not synced here, oversized events, held rows), parks what cannot be applied (durably,
/// before the sink sees the chunk, so the commit can never pass an unrecorded park) and sends
/// the rest as one chunk. A change the sink rejects is parked (with the later changes of its
/// row in the chunk held behind it) and the chunk is sent again without them.
async fn chunk<S: Sink>(
    applier: &mut Applier<S>,
    state: &mut Streamed,
    events: &[(u64, &Delivery)],
    shutdown: &mut Shutdown,
) -> Result<bool, EngineError> {
    let group = applier.group.clone();
    // A table this instance deliberately skips holds no rows here; a transaction with a parked
    // member is parked whole.
    let Classified {
        mut changes,
        mut sources,
        parks,
        ..
    } = applier
        .rules
        .classify_run(events, &mut [], 0, &mut state.blocked);
    if applier.on_poison == OnPoison::Halt {
        if let Some(p) = parks.first() {
            return Err(EngineError::Poison {
                seq: p.seq,
                subject: p.subject.clone(),
                reason: p.error.clone(),
            });
        }
    }
    park(applier, state, &parks)?;
    loop {
        if shutdown.is_requested() {
            return Ok(false);
        }
        match applier.sink.replace_chunk(&group, &changes).await {
            Ok(()) => break,
            Err(SinkError::Rejected {
                index,
                seq,
                table,
                key,
                reason,
            }) if index < changes.len() => {
                if applier.on_poison == OnPoison::Halt {
                    return Err(EngineError::Poison {
                        seq,
                        subject: format!("{table}/{key}"),
                        reason,
                    });
                }
                let new_parks = take_rejected(
                    &mut changes,
                    &mut sources,
                    events,
                    index,
                    &reason,
                    &mut state.blocked,
                );
                park(applier, state, &new_parks)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    state.events += changes.len() as u64;
    Ok(true)
}

/// Durably parks `parks` (before the sink can commit past them) and keeps the first few for the
/// log.
fn park<S: Sink>(
    applier: &Applier<S>,
    state: &mut Streamed,
    parks: &[ParkedEvent],
) -> Result<(), EngineError> {
    applier.offsets.park(&applier.group, parks)?;
    for p in parks.iter().filter(|p| p.held_behind.is_none()) {
        if state.parks_logged.len() < LOGGED_PARKS {
            state
                .parks_logged
                .push((p.seq, p.subject.clone(), p.error.clone()));
        }
    }
    Ok(())
}
