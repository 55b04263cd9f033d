//! Live counters of a running engine, shared with status reporting and progress logs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters a running engine updates; read them from any thread.
#[derive(Debug, Default)]
pub struct Stats {
    applied_seq: AtomicU64,
    stream_last_seq: AtomicU64,
    pending: AtomicU64,
    events_applied: AtomicU64,
    batches: AtomicU64,
    consumer_resets: AtomicU64,
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
}

impl Stats {
    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            applied_seq: self.applied_seq.load(Ordering::Relaxed),
            stream_last_seq: self.stream_last_seq.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            events_applied: self.events_applied.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            consumer_resets: self.consumer_resets.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn set_applied(&self, seq: u64) {
        self.applied_seq.store(seq, Ordering::Relaxed);
        self.stream_last_seq.fetch_max(seq, Ordering::Relaxed);
    }

    pub(crate) fn observe_stream(&self, last_seq: u64, pending: u64) {
        self.stream_last_seq.fetch_max(last_seq, Ordering::Relaxed);
        self.pending.store(pending, Ordering::Relaxed);
    }

    pub(crate) fn add_batch(&self, events: u64) {
        self.events_applied.fetch_add(events, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_consumer_reset(&self) {
        self.consumer_resets.fetch_add(1, Ordering::Relaxed);
    }
}
