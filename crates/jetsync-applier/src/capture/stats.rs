//! Live counters of the capture relay, for `/metrics` and `/readyz`.

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Mutex,
};

/// Counters the relay updates; read them from any thread.
#[derive(Debug, Default)]
pub struct CaptureStats {
    enabled: AtomicBool,
    backlog: AtomicU64,
    published: AtomicU64,
    transactions: AtomicU64,
    unpublishable: AtomicU64,
    error: Mutex<Option<String>>,
}

/// A point-in-time copy of [`CaptureStats`].
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct CaptureSnapshot {
    /// Whether the relay runs (some table has `capture = true`).
    pub enabled: bool,
    /// Rows in the outbox at the relay's last look.
    pub backlog: u64,
    /// Outbox entries published by this run.
    pub published: u64,
    /// Publishes (atomic transactions, or single rows with `capture.atomic = false`) by this run.
    pub transactions: u64,
    /// Outbox entries dropped by this run because they cannot be published (logged).
    pub unpublishable: u64,
    /// The relay's current problem, if it is stuck on one.
    pub error: Option<String>,
}

impl CaptureStats {
    /// A copy of the counters.
    pub fn snapshot(&self) -> CaptureSnapshot {
        CaptureSnapshot {
            enabled: self.enabled.load(Ordering::Relaxed),
            backlog: self.backlog.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            unpublishable: self.unpublishable.load(Ordering::Relaxed),
            error: self.error.lock().map(|e| e.clone()).unwrap_or_default(),
        }
    }

    pub(crate) fn set_enabled(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_backlog(&self, backlog: u64) {
        self.backlog.store(backlog, Ordering::Relaxed);
    }

    pub(crate) fn add_published(&self, entries: u64, publishes: u64) {
        self.published.fetch_add(entries, Ordering::Relaxed);
        self.transactions.fetch_add(publishes, Ordering::Relaxed);
    }

    pub(crate) fn add_unpublishable(&self, entries: u64) {
        self.unpublishable.fetch_add(entries, Ordering::Relaxed);
    }

    pub(crate) fn set_error(&self, error: Option<String>) {
        if let Ok(mut slot) = self.error.lock() {
            *slot = error;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_backlog_bound() {
        let mut config = jetsync::Config::default();
        config.capture.ready_max_backlog = 10;
        let stats = CaptureStats::default();
        stats.set_backlog(500);
        // Not captured: always ready.
        assert!(crate::capture_readiness(&stats.snapshot(), &config).is_ok());
        stats.set_enabled();
        stats.set_error(Some("NATS down".into()));
        let reason = crate::capture_readiness(&stats.snapshot(), &config).unwrap_err();
        assert!(
            reason.contains("capture backlog 500") && reason.contains("NATS down"),
            "{reason}"
        );
        stats.set_backlog(10);
        assert!(crate::capture_readiness(&stats.snapshot(), &config).is_ok());
        config.capture.ready_max_backlog = 0;
        stats.set_backlog(1_000_000);
        assert!(crate::capture_readiness(&stats.snapshot(), &config).is_ok());
        stats.add_published(3, 1);
        assert_eq!(stats.snapshot().published, 3);
    }
}
