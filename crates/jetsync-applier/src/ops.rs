//! Operator commands that change an instance's state and therefore need its write lock (the
//! applier must be stopped; the redb checkpoint store refuses a second writer): `resync`,
//! `parked retry` and `parked drop`.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use jetsync::Config;
use serde::Serialize;

use crate::{
    apply::{Applier, Rules, NOT_SYNCED_HERE},
    decode::{decode, RawEvent},
    engine,
    offsets::Offsets,
    parked::{group_by_row, ParkedEvent, RowId},
    resync::{self, ResyncDone, SnapshotProgress},
    shutdown::Shutdown,
    startup, EngineError, Sink, SinkError, Stats,
};

/// Rebuilds the instance's synced tables from a snapshot of the stream (`jetsync-applier
/// resync`), reporting progress while the snapshot is read. The applier must be stopped.
/// Returns `None` when `stop` completed first (nothing changed, or a pending resync that the
/// next `run` finishes).
pub async fn resync_instance<S: Sink>(
    config: &Config,
    mut sink: S,
    mut progress: impl FnMut(SnapshotProgress) + Send,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Option<ResyncDone>, EngineError> {
    let mut shutdown = Shutdown::spawn(stop);
    let group = config.stream.name.clone();
    let offsets = Offsets::open(&config.redb_path())?;
    let max_backoff = Duration::from_millis(config.apply.retry_max_backoff_ms);
    let Some(applied) = startup::start_point(
        &mut sink,
        &offsets,
        &group,
        max_backoff,
        &mut shutdown,
        // A resync rebuilds the parked events too: the remedy for a lost data_dir.
        startup::NewStore::Adopt,
    )
    .await?
    else {
        return Ok(None);
    };
    let client = jetsync::Client::connect(config).await?;
    let js = client.jetstream();
    engine::get_stream(js, &group).await?;
    let mut applier = Applier::new(config, sink, offsets, applied, Arc::new(Stats::default()))?;
    let done = resync::resync(js, config, &mut applier, &mut shutdown, &mut progress).await?;
    if done.is_some() {
        // A resync replaces whatever a bootstrap had started.
        applier.offsets.set_bootstrapping(&group, false)?;
    }
    Ok(done)
}

/// What `parked retry` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RetryReport {
    /// Sequences applied (and removed from the parked events), ascending per row.
    pub applied: Vec<u64>,
    /// Events still parked among those selected, with their (updated) error.
    pub still_parked: Vec<ParkedEvent>,
    /// The sink's fence, unchanged by a retry.
    pub fence: u64,
}

/// Applies parked events again, oldest first per row (`parked retry`); `rows` empty means every
/// row. For each row, events are applied in order until one fails again: that one stays parked
/// with the new error and the later ones stay held behind it. Events parked after the sink's
/// fence are left to the engine (it delivers and parks them again on its next run). The applier
/// must be stopped.
///
/// A retried event is applied to the sink and then removed from the parked events: if the
/// process dies in between, the next retry applies it again (the row ends in the same state).
pub async fn retry_parked<S: Sink>(
    config: &Config,
    mut sink: S,
    rows: &[RowId],
) -> Result<RetryReport, EngineError> {
    let group = config.stream.name.clone();
    let offsets = Offsets::open(&config.redb_path())?;
    let mut shutdown = Shutdown::spawn(std::future::pending());
    let max_backoff = Duration::from_millis(config.apply.retry_max_backoff_ms);
    let new_store = startup::NewStore::Refuse(startup::sink_description(config));
    let fence = startup::start_point(
        &mut sink,
        &offsets,
        &group,
        max_backoff,
        &mut shutdown,
        new_store,
    )
    .await?
    .unwrap_or(0);
    retry_rows(config, &mut sink, &offsets, fence, rows).await
}

/// [`retry_parked`] with an open checkpoint store and the sink's `fence` (also used by the
/// engine at start, for rows of tables the configuration now lists).
pub(crate) async fn retry_rows<S: Sink>(
    config: &Config,
    sink: &mut S,
    offsets: &Offsets,
    fence: u64,
    rows: &[RowId],
) -> Result<RetryReport, EngineError> {
    let group = config.stream.name.clone();
    let prefix = config.stream.subject_prefix.clone();
    let rules = Rules::of(config);
    let parked = offsets.parked(&group)?;
    let wanted: BTreeSet<&RowId> = rows.iter().collect();
    let mut report = RetryReport {
        fence,
        ..RetryReport::default()
    };
    for (row, events) in group_by_row(&parked) {
        if !wanted.is_empty() && !row.as_ref().is_some_and(|r| wanted.contains(r)) {
            continue;
        }
        // Decode this row's events in order up to the first that still fails.
        let mut changes = Vec::new();
        let mut failed: Option<(usize, String)> = None;
        for (i, event) in events.iter().enumerate() {
            if event.seq > fence {
                failed = Some((i, event.error.clone()));
                break;
            }
            // A table the configuration does not list stays parked.
            if event.row.as_ref().is_some_and(|r| !rules.syncs(&r.table)) {
                failed = Some((i, NOT_SYNCED_HERE.to_owned()));
                break;
            }
            let raw = RawEvent {
                seq: event.seq,
                subject: &event.subject,
                format: event.format.as_deref(),
                payload: &event.payload,
            };
            let limits = jetsync::codec::DecodeLimits {
                max_columns: config.apply.max_columns,
            };
            match decode(&prefix, raw, limits) {
                Ok(change) => changes.push(change),
                Err(f) => {
                    failed = Some((i, f.reason().to_owned()));
                    break;
                }
            }
        }
        // Apply the decodable prefix; a sink refusal shortens it to the refused change.
        let mut applied_n = changes.len();
        if !changes.is_empty() {
            match sink.apply(&group, &changes, fence).await {
                Ok(()) => {}
                Err(SinkError::Rejected { index, reason, .. }) if index < changes.len() => {
                    if index > 0 {
                        sink.apply(&group, &changes[..index], fence).await?;
                    }
                    applied_n = index;
                    failed = Some((index, format!("rejected by the sink: {reason}")));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let applied: Vec<u64> = events[..applied_n].iter().map(|e| e.seq).collect();
        offsets.unpark(&group, &applied)?;
        report.applied.extend(&applied);
        // The rest stays parked: the first one with its new error, the others held behind it.
        if let Some((at, error)) = failed {
            let head = events[at].seq;
            let mut rest: Vec<ParkedEvent> = Vec::new();
            for (i, e) in events[at..].iter().enumerate() {
                let mut e = (*e).clone();
                if i == 0 {
                    if e.seq <= fence {
                        e.error = error.clone();
                        e.held_behind = None;
                    }
                } else if e.held_behind.is_some() {
                    e.held_behind = Some(head);
                    e.error = format!("held behind parked event {head} of the same row");
                }
                rest.push(e);
            }
            offsets.park(&group, &rest)?;
            report.still_parked.extend(rest);
        }
    }
    Ok(report)
}

/// Removes parked events for good (`parked drop`): those of `rows`, or all when `all`. Their
/// rows are unblocked; what the dropped events would have changed is not applied. Returns the
/// dropped events. The applier must be stopped.
pub fn drop_parked(
    config: &Config,
    rows: &[RowId],
    all: bool,
) -> Result<Vec<ParkedEvent>, EngineError> {
    let group = &config.stream.name;
    let offsets = Offsets::open(&config.redb_path())?;
    let wanted: BTreeSet<&RowId> = rows.iter().collect();
    let dropped: Vec<ParkedEvent> = offsets
        .parked(group)?
        .into_iter()
        .filter(|e| all || e.row.as_ref().is_some_and(|r| wanted.contains(r)))
        .collect();
    let seqs: Vec<u64> = dropped.iter().map(|e| e.seq).collect();
    offsets.unpark(group, &seqs)?;
    Ok(dropped)
}
