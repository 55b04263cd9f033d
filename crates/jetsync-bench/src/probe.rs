//! Instruments for the breakdown of a replay: a sink that stores nothing (the engine's own
//! ceiling: pull, decode, checkpoint, ack) and a wrapper that times a real sink's `apply`.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use jetsync_applier::{Change, Sink, SinkError, TableDigest};

/// A sink that applies nothing and keeps its fence in memory.
#[derive(Debug, Default)]
pub(crate) struct NullSink {
    fence: u64,
}

impl Sink for NullSink {
    async fn fence(&mut self, _group: &str) -> Result<Option<u64>, SinkError> {
        Ok(Some(self.fence))
    }

    async fn is_empty(&mut self) -> Result<bool, SinkError> {
        Ok(self.fence == 0)
    }

    async fn apply(
        &mut self,
        _group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        std::hint::black_box(changes);
        self.fence = last_seq;
        Ok(())
    }

    async fn set_fence(&mut self, _group: &str, seq: u64) -> Result<(), SinkError> {
        self.fence = seq;
        Ok(())
    }

    async fn digest(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        Ok(Vec::new())
    }
}

/// Time spent inside a sink's `apply`, shared with the bench.
#[derive(Debug, Default)]
pub(crate) struct ApplyClock {
    nanos: AtomicU64,
    calls: AtomicU64,
}

impl ApplyClock {
    pub(crate) fn seconds(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    pub(crate) fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// Wraps a sink and adds the wall time of every `apply` to an [`ApplyClock`].
#[derive(Debug)]
pub(crate) struct TimedSink<S> {
    inner: S,
    clock: Arc<ApplyClock>,
}

impl<S> TimedSink<S> {
    pub(crate) fn new(inner: S) -> (TimedSink<S>, Arc<ApplyClock>) {
        let clock = Arc::new(ApplyClock::default());
        (
            TimedSink {
                inner,
                clock: clock.clone(),
            },
            clock,
        )
    }
}

impl<S: Sink> Sink for TimedSink<S> {
    async fn fence(&mut self, group: &str) -> Result<Option<u64>, SinkError> {
        self.inner.fence(group).await
    }

    async fn is_empty(&mut self) -> Result<bool, SinkError> {
        self.inner.is_empty().await
    }

    async fn apply(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        let started = Instant::now();
        let result = self.inner.apply(group, changes, last_seq).await;
        self.clock
            .nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.clock.calls.fetch_add(1, Ordering::Relaxed);
        result
    }

    async fn set_fence(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        self.inner.set_fence(group, seq).await
    }

    async fn digest(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        self.inner.digest().await
    }
}
