//! Operator commands that change an instance's state and therefore need its write lock (the
//! applier must be stopped; the redb checkpoint store refuses a second writer): `resync`,
//! `parked retry` and `parked drop`.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use jetsync::Config;
use serde::Serialize;

use crate::{
    apply::{Applier, Rules, NOT_SYNCED_HERE},
    decode::{decode, RawEvent},
    engine,
    offsets::Offsets,
    parked::{ParkedEvent, RowId},
    resync::{self, ResyncDone, SnapshotProgress},
    shutdown::Shutdown,
    startup, Change, EngineError, Sink, SinkError, Stats,
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
    let limits = jetsync::codec::DecodeLimits {
        max_columns: config.apply.max_columns,
    };
    let wanted: BTreeSet<&RowId> = rows.iter().collect();
    let mut report = RetryReport {
        fence,
        ..RetryReport::default()
    };
    // Units in stream order: a transaction's parked members together, any other event alone.
    let mut queue: VecDeque<Unit> = units(offsets.parked(&group)?).into();
    // Rows that stay parked after this retry → their first parked sequence: a later unit
    // touching one of them waits behind it.
    let mut stuck: HashMap<RowId, u64> = HashMap::new();
    // Decoded units waiting to be applied together.
    let mut ready: Vec<(Unit, Vec<Change>)> = Vec::new();
    loop {
        let Some(unit) = queue.pop_front() else {
            if ready.is_empty() {
                break;
            }
            flush(
                sink,
                offsets,
                &group,
                fence,
                &mut ready,
                &mut queue,
                &mut stuck,
                &mut report,
            )
            .await?;
            continue;
        };
        let selected = wanted.is_empty()
            || unit
                .events
                .iter()
                .any(|e| e.row.as_ref().is_some_and(|r| wanted.contains(r)));
        let held = unit.events.iter().find_map(|e| {
            let row = e.row.as_ref()?;
            stuck
                .get(row)
                .filter(|&&head| head < e.seq)
                .map(|&head| (e.seq, head))
        });
        let outcome = if !selected {
            Outcome::Untouched
        } else if let Some((seq, head)) = held {
            Outcome::Failed {
                seq,
                error: format!("held behind parked event {head} of the same row"),
                held_behind: Some(head),
            }
        } else if unit.events.iter().any(|e| e.seq > fence) {
            // Parked after the fence (crash window 1 of `apply.rs`) and held by nothing any
            // more: released to the engine, which delivers it again after the fence.
            Outcome::Release
        } else {
            match decode_unit(&unit, &rules, &prefix, limits) {
                Ok(changes) => Outcome::Ready(changes),
                Err((seq, error)) => Outcome::Failed {
                    seq,
                    error,
                    held_behind: None,
                },
            }
        };
        if !matches!(outcome, Outcome::Ready(_)) && !ready.is_empty() {
            // Its fate depends on what is pending (that may hold its rows, or fail and hold
            // them): apply that first, then look at it again.
            queue.push_front(unit);
            flush(
                sink,
                offsets,
                &group,
                fence,
                &mut ready,
                &mut queue,
                &mut stuck,
                &mut report,
            )
            .await?;
            continue;
        }
        match outcome {
            Outcome::Ready(changes) => {
                ready.push((unit, changes));
                if ready.iter().map(|(_, c)| c.len()).sum::<usize>() >= RETRY_BATCH {
                    flush(
                        sink,
                        offsets,
                        &group,
                        fence,
                        &mut ready,
                        &mut queue,
                        &mut stuck,
                        &mut report,
                    )
                    .await?;
                }
                continue;
            }
            Outcome::Release => {
                let released: Vec<u64> = unit.events.iter().map(|e| e.seq).collect();
                offsets.unpark(&group, &released)?;
                report.released.extend(released);
            }
            Outcome::Untouched | Outcome::Failed { .. } => {
                for e in &unit.events {
                    if let Some(row) = &e.row {
                        stuck.entry(row.clone()).or_insert(e.seq);
                    }
                }
                if let Outcome::Failed {
                    seq,
                    error,
                    held_behind,
                } = outcome
                {
                    let rest = reparked(&unit, seq, &error, held_behind);
                    offsets.park(&group, &rest)?;
                    report.still_parked.extend(rest);
                } else if selected {
                    report.still_parked.extend(unit.events);
                }
            }
        }
    }
    Ok(report)
}

/// Changes applied by one sink call of `parked retry`.
const RETRY_BATCH: usize = 1000;

/// The parked events that are retried together: a transaction's members, or one event.
#[derive(Debug)]
struct Unit {
    events: Vec<ParkedEvent>,
}

/// What `parked retry` does with one unit.
enum Outcome {
    /// Decoded; to be applied.
    Ready(Vec<Change>),
    /// After the fence and free: unparked, for the engine to deliver again.
    Release,
    /// Not selected: stays as it is (holding its rows).
    Untouched,
    /// Stays parked: the member at `seq` fails with `error`.
    Failed {
        seq: u64,
        error: String,
        held_behind: Option<u64>,
    },
}

/// Groups parked events (ascending) into retry units.
fn units(parked: Vec<ParkedEvent>) -> Vec<Unit> {
    let mut out: Vec<Unit> = Vec::new();
    for event in parked {
        if let (Some(id), Some(last)) = (&event.txn, out.last_mut()) {
            if last.events.last().and_then(|e| e.txn.as_ref()) == Some(id) {
                last.events.push(event);
                continue;
            }
        }
        out.push(Unit {
            events: vec![event],
        });
    }
    out
}

/// Decodes every member of `unit`, or names the first that fails.
fn decode_unit(
    unit: &Unit,
    rules: &Rules,
    prefix: &str,
    limits: jetsync::codec::DecodeLimits,
) -> Result<Vec<Change>, (u64, String)> {
    let mut changes = Vec::with_capacity(unit.events.len());
    for event in &unit.events {
        // A table the configuration does not list stays parked.
        if event.row.as_ref().is_some_and(|r| !rules.syncs(&r.table)) {
            return Err((event.seq, NOT_SYNCED_HERE.to_owned()));
        }
        let raw = RawEvent {
            seq: event.seq,
            subject: &event.subject,
            format: event.format.as_deref(),
            payload: &event.payload,
        };
        match decode(prefix, raw, limits) {
            Ok(change) => changes.push(change),
            Err(f) => return Err((event.seq, f.reason().to_owned())),
        }
    }
    Ok(changes)
}

/// The records of a unit that stays parked because its member `seq` fails with `error`.
fn reparked(unit: &Unit, seq: u64, error: &str, held_behind: Option<u64>) -> Vec<ParkedEvent> {
    unit.events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            if e.seq == seq {
                e.error = error.to_owned();
                e.held_behind = held_behind;
            } else if let Some(id) = &e.txn {
                e.error = format!("part of transaction {id}, whose member at seq {seq} is parked");
                e.held_behind = None;
            }
            e
        })
        .collect()
}

/// Applies the ready units in one sink transaction (fence unchanged) and unparks them. When the
/// sink refuses a change, the units before its unit are applied, and its unit and the ones after
/// it: the refused unit stays parked with the refusal (its rows `stuck`), the ones after it go
/// back to the front of `queue` to be looked at again.
#[allow(clippy::too_many_arguments)]
async fn flush<S: Sink>(
    sink: &mut S,
    offsets: &Offsets,
    group: &str,
    fence: u64,
    ready: &mut Vec<(Unit, Vec<Change>)>,
    queue: &mut VecDeque<Unit>,
    stuck: &mut HashMap<RowId, u64>,
    report: &mut RetryReport,
) -> Result<(), EngineError> {
    if ready.is_empty() {
        return Ok(());
    }
    let changes: Vec<Change> = ready.iter().flat_map(|(_, c)| c.iter().cloned()).collect();
    let applied_units = match sink.apply(group, &changes, fence).await {
        Ok(()) => ready.len(),
        Err(SinkError::Rejected { index, reason, .. }) if index < changes.len() => {
            let mut before = 0;
            let mut failing = 0;
            for (i, (_, c)) in ready.iter().enumerate() {
                if index < before + c.len() {
                    failing = i;
                    break;
                }
                before += c.len();
            }
            if failing > 0 {
                sink.apply(group, &changes[..before], fence).await?;
            }
            let mut back: Vec<Unit> = ready.drain(failing..).map(|(u, _)| u).collect();
            // The refused unit stays parked with the refusal.
            let refused = back.remove(0);
            let seq = changes[index].seq;
            let rest = reparked(
                &refused,
                seq,
                &format!("rejected by the sink: {reason}"),
                None,
            );
            offsets.park(group, &rest)?;
            for e in &rest {
                if let Some(row) = &e.row {
                    stuck.entry(row.clone()).or_insert(e.seq);
                }
            }
            report.still_parked.extend(rest);
            // Its rows now hold what follows: look at the later units again.
            for unit in back.into_iter().rev() {
                queue.push_front(unit);
            }
            failing
        }
        Err(e) => return Err(e.into()),
    };
    for (unit, _) in ready.drain(..applied_units) {
        let seqs: Vec<u64> = unit.events.iter().map(|e| e.seq).collect();
        offsets.unpark(group, &seqs)?;
        report.applied.extend(seqs);
    }
    ready.clear();
    Ok(())
}

/// Removes parked events for good (`parked drop`): those of `rows` (with every member of their
/// transactions), or all when `all`. Their
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
    let parked = offsets.parked(group)?;
    let chosen = |e: &ParkedEvent| all || e.row.as_ref().is_some_and(|r| wanted.contains(r));
    // A transaction is dropped whole, like it is applied whole.
    let txns: BTreeSet<String> = parked
        .iter()
        .filter(|e| chosen(e))
        .filter_map(|e| e.txn.clone())
        .collect();
    let dropped: Vec<ParkedEvent> = parked
        .into_iter()
        .filter(|e| chosen(e) || e.txn.as_ref().is_some_and(|t| txns.contains(t)))
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

    fn member(seq: u64, key: &str, body: &str, txn: &str) -> ParkedEvent {
        ParkedEvent {
            subject: format!("g.items.{key}"),
            row: Some(format!("items/{key}").parse().unwrap()),
            txn: Some(txn.into()),
            ..parked(seq, body, None)
        }
    }

    /// A parked transaction is retried whole: nothing of it while one member still fails (and
    /// the rows it touches hold their later events), all of it in one go once every member
    /// applies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parked_transaction_is_retried_whole() {
        let dir = tempfile::tempdir().unwrap();
        let config = config();
        let offsets = Offsets::open(&dir.path().join("o.redb")).unwrap();
        let mut sink = RedbSink::open(RedbOptions::new(dir.path().join("r.redb"))).unwrap();
        let replica = sink.replica();
        sink.apply("G", &[], 9).await.unwrap();
        // Transaction T: a@3, b@4 (b undecodable); then b@6 alone, held behind it.
        let held = ParkedEvent {
            held_behind: Some(4),
            ..member(6, "b", &upsert(6), "x")
        };
        let held = ParkedEvent { txn: None, ..held };
        offsets
            .park(
                "G",
                &[
                    member(3, "a", &upsert(3), "T"),
                    member(4, "b", "not json", "T"),
                    held.clone(),
                ],
            )
            .unwrap();
        let report = retry_rows(&config, &mut sink, &offsets, 9, &[])
            .await
            .unwrap();
        assert!(report.applied.is_empty(), "{report:?}");
        assert!(replica.get("items", "a").unwrap().is_none());
        let left = offsets.parked("G").unwrap();
        assert_eq!(left.len(), 3);
        assert!(
            left[0].error.contains("part of transaction T"),
            "{}",
            left[0].error
        );
        assert_eq!((left[2].seq, left[2].held_behind), (6, Some(4)));

        // Fixed: the whole transaction, then the held event.
        offsets
            .park("G", &[member(4, "b", &upsert(4), "T")])
            .unwrap();
        let report = retry_rows(&config, &mut sink, &offsets, 9, &[])
            .await
            .unwrap();
        assert_eq!(report.applied, [3, 4, 6]);
        assert!(offsets.parked("G").unwrap().is_empty());
        assert_eq!(
            replica.get("items", "a").unwrap().unwrap()["v"],
            jetsync::Value::I64(3)
        );
        assert_eq!(
            replica.get("items", "b").unwrap().unwrap()["v"],
            jetsync::Value::I64(6)
        );
    }
}
