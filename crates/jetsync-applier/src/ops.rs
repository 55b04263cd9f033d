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
    /// Events after the fence that were held behind an event this retry applied: no longer
    /// parked; the engine delivers them again after the fence and applies them in order.
    pub released: Vec<u64>,
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
        // Events after the fence are not applied by a retry. Once nothing of the row at or
        // below the fence is parked any more, they are released: held behind an event that is
        // no longer parked, they would block the row for good; the engine delivers them again
        // after the fence (they were parked in crash window 1 of `apply.rs`) and classifies
        // them afresh.
        if let Some((at, _)) = failed.as_ref().filter(|(at, _)| events[*at].seq > fence) {
            let released: Vec<u64> = events[*at..].iter().map(|e| e.seq).collect();
            offsets.unpark(&group, &released)?;
            report.released.extend(released);
            continue;
        }
        // The rest stays parked: the first one (at or below the fence) with its new error as
        // the row's head, the others held behind it.
        if let Some((at, error)) = failed {
            let head = events[at].seq;
            let mut rest: Vec<ParkedEvent> = Vec::new();
            for (i, e) in events[at..].iter().enumerate() {
                let mut e = (*e).clone();
                if i == 0 {
                    e.error = error.clone();
                    e.held_behind = None;
                } else if row.is_some() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RedbOptions, RedbSink};

    fn config() -> Config {
        let mut config = Config::default();
        config.stream.name = "G".into();
        config.stream.subject_prefix = "g".into();
        config
            .tables
            .insert("items".into(), jetsync::TableConfig::default());
        config
    }

    fn parked(seq: u64, body: &str, held_behind: Option<u64>) -> ParkedEvent {
        ParkedEvent {
            seq,
            subject: "g.items.a".into(),
            row: Some("items/a".parse().unwrap()),
            format: Some("json/1".into()),
            msg_id: None,
            payload: body.as_bytes().to_vec(),
            error: "e".into(),
            held_behind,
            parked_at_ms: 1,
            raw_headers: None,
            txn: None,
        }
    }

    fn upsert(v: i64) -> String {
        format!(r#"{{"op":"upsert","row":{{"v":{v}}},"origin":"t","ts_ms":0}}"#)
    }

    /// Retrying a row's head must not leave the events held behind it pointing at an event
    /// that is no longer parked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retried_head_releases_or_rewrites_the_events_held_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = config();
        let offsets = Offsets::open(&dir.path().join("o.redb")).unwrap();
        let mut sink = RedbSink::open(RedbOptions::new(dir.path().join("r.redb"))).unwrap();
        let replica = sink.replica();
        sink.apply("G", &[], 5).await.unwrap();

        // Head 3 and held 4 at or below the fence, held 7 after it (parked before a kill).
        offsets
            .park(
                "G",
                &[
                    parked(3, &upsert(3), None),
                    parked(4, &upsert(4), Some(3)),
                    parked(7, &upsert(7), Some(3)),
                ],
            )
            .unwrap();
        let report = retry_rows(&config, &mut sink, &offsets, 5, &[])
            .await
            .unwrap();
        assert_eq!(report.applied, [3, 4]);
        assert_eq!(report.released, [7]);
        assert!(offsets.parked("G").unwrap().is_empty());
        assert_eq!(
            replica.get("items", "a").unwrap().unwrap()["v"],
            jetsync::Value::I64(4)
        );
        assert_eq!(
            sink.fence("G").await.unwrap(),
            Some(5),
            "retry never moves the fence"
        );

        // Head 3 applies, 4 still fails: 4 becomes the head, 7 is held behind 4.
        offsets
            .park(
                "G",
                &[
                    parked(3, &upsert(30), None),
                    parked(4, "not json", Some(3)),
                    parked(7, &upsert(7), Some(3)),
                ],
            )
            .unwrap();
        let report = retry_rows(&config, &mut sink, &offsets, 5, &[])
            .await
            .unwrap();
        assert_eq!(report.applied, [3]);
        let left = offsets.parked("G").unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!((left[0].seq, left[0].held_behind), (4, None));
        assert_ne!(left[0].error, "e");
        assert_eq!((left[1].seq, left[1].held_behind), (7, Some(4)));
        assert_eq!(
            offsets
                .blocked_rows("G")
                .unwrap()
                .values()
                .copied()
                .collect::<Vec<_>>(),
            [4]
        );
    }
}
