//! Live counters of a running engine, shared with status reporting, progress logs and the HTTP
//! endpoint's `/metrics` and `/readyz`.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use crate::Change;

/// Upper bounds, in seconds, of the buckets of the batch apply duration histogram (a last,
/// unbounded bucket follows them).
pub const BATCH_SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters a running engine updates; read them from any thread.
#[derive(Debug, Default)]
pub struct Stats {
    applied_seq: AtomicU64,
    stream_last_seq: AtomicU64,
    pending: AtomicU64,
    events_applied: AtomicU64,
    batches: AtomicU64,
    consumer_resets: AtomicU64,
    events_skipped: AtomicU64,
    resyncs: AtomicU64,
    transactions_applied: AtomicU64,
    events_coalesced: AtomicU64,
    parked: AtomicU64,
    connected: AtomicBool,
    /// table → events applied, indexed by `OpKind as usize`.
    by_table_op: Mutex<BTreeMap<String, [u64; 2]>>,
    batch_durations: Mutex<BatchDurations>,
    /// The capture relay's counters (idle when no table is captured).
    capture: crate::capture::CaptureStats,
    fleet: Mutex<FleetGauges>,
}

/// What the fleet member (`service.rs`) last found: the margin to a gap and the convergence
/// check. `None` where unknown or not applicable (no stream limit, no digest taken yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct FleetGauges {
    /// `jetsync_gap_margin_events`.
    pub gap_margin_events: Option<u64>,
    /// `jetsync_gap_margin_seconds`.
    pub gap_margin_seconds: Option<u64>,
    /// Applied sequence of this instance's last periodic digest.
    pub digest_seq: Option<u64>,
    /// Tables whose digest differed from the reference recorded at the same applied sequence.
    pub diverged_tables: Option<u64>,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct StatsSnapshot {
    /// Last applied stream sequence.
    pub applied_seq: u64,
    /// Highest stream sequence known to exist.
    pub stream_last_seq: u64,
    /// Events known to be waiting for this instance (the consumer's pending count).
    pub pending: u64,
    /// Events applied by this run.
    pub events_applied: u64,
    /// Batches committed by this run.
    pub batches: u64,
    /// Times the durable consumer was recreated by this run (reconnects, lost deliveries).
    pub consumer_resets: u64,
    /// Events acknowledged without being applied by this run: tables this instance does not
    /// sync, with `apply.other_tables = "skip"`.
    pub events_skipped: u64,
    /// Snapshot resyncs done by this run.
    pub resyncs: u64,
    /// Transactions (atomic batches) applied by this run, each in one sink transaction.
    pub transactions_applied: u64,
    /// Events currently parked (poison events and the events held behind them).
    pub parked: u64,
    /// Events of this run's applied events whose write was folded into a later change of the
    /// same row in the same batch (`apply.coalesce`); they are counted in `events_applied` too.
    pub events_coalesced: u64,
    /// Whether a consumer session is running: connected to NATS, consumer reconciled, pulling.
    pub connected: bool,
}

impl StatsSnapshot {
    /// How many events this instance is behind the stream, as far as the engine knows: the
    /// consumer's pending count from the last delivery (or, before the first one, the stream's
    /// last sequence minus the applied sequence). Unlike `stream_last_seq - applied_seq` it is
    /// exact on a compacted stream, whose sequences have holes.
    pub fn lag(&self) -> u64 {
        self.pending
    }
}

/// The kind of change an event carries (the `op` label of the per-table counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    /// The row was inserted or replaced.
    Upsert = 0,
    /// The row was deleted.
    Delete = 1,
}

impl OpKind {
    /// `"upsert"` or `"delete"`.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Upsert => "upsert",
            OpKind::Delete => "delete",
        }
    }

    fn of(change: &jetsync::Change) -> OpKind {
        match change {
            jetsync::Change::Upsert(_) => OpKind::Upsert,
            jetsync::Change::Delete => OpKind::Delete,
        }
    }
}

/// Events applied by this run for one table and kind of change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableOpCount {
    /// The table.
    pub table: String,
    /// Upsert or delete.
    pub op: OpKind,
    /// Events applied.
    pub events: u64,
}

/// Histogram of how long committed batches took to apply (sink transaction with its retries,
/// plus the checkpoint commit).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct BatchDurations {
    /// Observations per bucket, not cumulative: index `i < BATCH_SECONDS_BUCKETS.len()` counts
    /// durations in `(BATCH_SECONDS_BUCKETS[i-1], BATCH_SECONDS_BUCKETS[i]]`, the last index
    /// those above every bound.
    pub buckets: [u64; BATCH_SECONDS_BUCKETS.len() + 1],
    /// Sum of all observations, in seconds.
    pub sum_seconds: f64,
    /// Number of observations.
    pub count: u64,
}

impl BatchDurations {
    fn observe(&mut self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let index = BATCH_SECONDS_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BATCH_SECONDS_BUCKETS.len());
        self.buckets[index] += 1;
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

/// Marks the engine connected while alive (see [`Stats::session_started`]).
#[derive(Debug)]
pub(crate) struct SessionGuard(Arc<Stats>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.connected.store(false, Ordering::Relaxed);
    }
}

/// Locks a mutex, ignoring poisoning: the counters stay meaningful after a panic elsewhere.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Stats {
    /// The capture relay's counters.
    pub fn capture(&self) -> &crate::capture::CaptureStats {
        &self.capture
    }

    /// A copy of the counters. The batch counters are at least as new as `applied_seq`: a
    /// batch is counted before its sequence is published (`Release`/`Acquire`), so a reader that
    /// sees a batch's sequence also sees its events counted.
    pub fn snapshot(&self) -> StatsSnapshot {
        let applied_seq = self.applied_seq.load(Ordering::Acquire);
        StatsSnapshot {
            applied_seq,
            stream_last_seq: self.stream_last_seq.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            events_applied: self.events_applied.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            consumer_resets: self.consumer_resets.load(Ordering::Relaxed),
            events_skipped: self.events_skipped.load(Ordering::Relaxed),
            resyncs: self.resyncs.load(Ordering::Relaxed),
            transactions_applied: self.transactions_applied.load(Ordering::Relaxed),
            parked: self.parked.load(Ordering::Relaxed),
            events_coalesced: self.events_coalesced.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
        }
    }

    /// Events applied by this run per table and kind of change, sorted by table then kind.
    pub fn events_by_table_op(&self) -> Vec<TableOpCount> {
        let counts = lock(&self.by_table_op);
        let mut out = Vec::with_capacity(counts.len() * 2);
        for (table, per_op) in counts.iter() {
            for op in [OpKind::Upsert, OpKind::Delete] {
                if per_op[op as usize] > 0 {
                    out.push(TableOpCount {
                        table: table.clone(),
                        op,
                        events: per_op[op as usize],
                    });
                }
            }
        }
        out
    }

    /// The fleet member's last findings (gap margin, convergence).
    pub fn fleet_gauges(&self) -> FleetGauges {
        *lock(&self.fleet)
    }

    /// Updates the fleet member's findings.
    pub(crate) fn update_fleet_gauges(&self, update: impl FnOnce(&mut FleetGauges)) {
        update(&mut lock(&self.fleet));
    }

    /// The batch apply duration histogram of this run.
    pub fn batch_durations(&self) -> BatchDurations {
        lock(&self.batch_durations).clone()
    }

    /// Publishes the applied sequence; call it after [`add_batch`](Self::add_batch) of the
    /// batch that reached it.
    pub(crate) fn set_applied(&self, seq: u64) {
        self.applied_seq.store(seq, Ordering::Release);
        self.stream_last_seq.fetch_max(seq, Ordering::Relaxed);
    }

    pub(crate) fn observe_stream(&self, last_seq: u64, pending: u64) {
        self.stream_last_seq.fetch_max(last_seq, Ordering::Relaxed);
        self.pending.store(pending, Ordering::Relaxed);
    }

    /// Records a committed batch: its changes (counted per table and kind) and how long
    /// applying it took.
    pub(crate) fn add_batch(&self, changes: &[Change], elapsed: Duration) {
        {
            let mut counts = lock(&self.by_table_op);
            for change in changes {
                let op = OpKind::of(&change.op) as usize;
                match counts.get_mut(change.table.as_str()) {
                    Some(per_op) => per_op[op] += 1,
                    None => {
                        let mut per_op = [0; 2];
                        per_op[op] = 1;
                        counts.insert(change.table.clone(), per_op);
                    }
                }
            }
        }
        lock(&self.batch_durations).observe(elapsed);
        self.events_applied
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts transactions applied by a batch.
    pub(crate) fn add_transactions(&self, n: u64) {
        if n > 0 {
            self.transactions_applied.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts applied events whose write a later change of the same row replaced.
    pub(crate) fn add_coalesced(&self, events: u64) {
        if events > 0 {
            self.events_coalesced.fetch_add(events, Ordering::Relaxed);
        }
    }

    /// Counts events skipped (not applied, acknowledged) by a batch.
    pub(crate) fn add_skipped(&self, events: u64) {
        if events > 0 {
            self.events_skipped.fetch_add(events, Ordering::Relaxed);
        }
    }

    pub(crate) fn add_consumer_reset(&self) {
        self.consumer_resets.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the engine connected (a consumer session is pulling) until the guard is dropped.
    pub(crate) fn session_started(self: &Arc<Self>) -> SessionGuard {
        self.connected.store(true, Ordering::Relaxed);
        SessionGuard(self.clone())
    }

    /// Records the number of parked events (for the poison-parking path).
    #[allow(dead_code)] // called by the parking path once it exists
    pub(crate) fn set_parked(&self, parked: u64) {
        self.parked.store(parked, Ordering::Relaxed);
    }

    /// Counts a snapshot resync (for the resync path).
    #[allow(dead_code)] // called by the resync path once it exists
    pub(crate) fn add_resync(&self) {
        self.resyncs.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: u64, table: &str, delete: bool) -> Change {
        Change {
            seq,
            table: table.into(),
            key: format!("k{seq}"),
            op: if delete {
                jetsync::Change::Delete
            } else {
                jetsync::Change::Upsert(jetsync::Row::new())
            },
        }
    }

    #[test]
    fn batches_are_counted_per_table_and_op() {
        let stats = Stats::default();
        stats.add_batch(
            &[
                change(1, "b", false),
                change(2, "a", true),
                change(3, "b", false),
            ],
            Duration::from_millis(3),
        );
        stats.add_batch(&[change(4, "a", false)], Duration::from_secs(60));
        let counts = stats.events_by_table_op();
        let flat: Vec<(&str, &str, u64)> = counts
            .iter()
            .map(|c| (c.table.as_str(), c.op.as_str(), c.events))
            .collect();
        assert_eq!(
            flat,
            [("a", "upsert", 1), ("a", "delete", 1), ("b", "upsert", 2)]
        );
        let snap = stats.snapshot();
        assert_eq!((snap.events_applied, snap.batches), (4, 2));

        let h = stats.batch_durations();
        assert_eq!(h.count, 2);
        assert!((h.sum_seconds - 60.003).abs() < 1e-9, "{}", h.sum_seconds);
        // 3 ms falls in the (2.5 ms, 5 ms] bucket, 60 s in the unbounded one.
        assert_eq!(h.buckets[3], 1);
        assert_eq!(h.buckets[BATCH_SECONDS_BUCKETS.len()], 1);
        assert_eq!(h.buckets.iter().sum::<u64>(), 2);
    }

    #[test]
    fn bucket_bounds_are_inclusive() {
        let mut h = BatchDurations::default();
        h.observe(Duration::from_millis(10));
        assert_eq!(h.buckets[4], 1, "{h:?}");
    }

    #[test]
    fn connected_while_the_session_guard_lives() {
        let stats = Arc::new(Stats::default());
        assert!(!stats.snapshot().connected);
        let guard = stats.session_started();
        assert!(stats.snapshot().connected);
        drop(guard);
        assert!(!stats.snapshot().connected);
    }

    #[test]
    fn lag_is_the_pending_count() {
        let stats = Stats::default();
        stats.set_applied(10);
        stats.observe_stream(50, 40);
        assert_eq!(stats.snapshot().lag(), 40);
        stats.set_applied(50);
        stats.observe_stream(50, 0);
        assert_eq!(stats.snapshot().lag(), 0);
        assert_eq!(stats.snapshot().stream_last_seq, 50);
    }
}
