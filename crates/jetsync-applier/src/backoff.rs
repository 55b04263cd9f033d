//! Capped exponential backoff for retrying transient failures forever, with each state change
//! logged once (the first failure at WARN, recovery at INFO, repeats only at DEBUG).

use std::time::Duration;

use crate::shutdown::Shutdown;

/// Backoff state for one kind of operation.
#[derive(Debug)]
pub(crate) struct Backoff {
    what: &'static str,
    next: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(what: &'static str, max: Duration) -> Backoff {
        Backoff {
            what,
            next: Duration::from_millis(100).min(max),
            max,
            failures: 0,
        }
    }

    /// Records a failure, logs it if it is the first of a run, and sleeps (unless shutdown is
    /// requested first). Returns false when shutdown interrupted the wait.
    pub(crate) async fn fail(
        &mut self,
        error: &(dyn std::fmt::Display + Sync),
        shutdown: &mut Shutdown,
    ) -> bool {
        self.failures += 1;
        if self.failures == 1 {
            tracing::warn!(error = %error, "{} failed; retrying with backoff", self.what);
        } else {
            tracing::debug!(error = %error, attempt = self.failures, "{} still failing", self.what);
        }
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = shutdown.requested() => false,
        }
    }

    /// Records a success; logs the recovery if there were failures.
    pub(crate) fn succeed(&mut self) {
        if self.failures > 0 {
            tracing::info!(attempts = self.failures + 1, "{} recovered", self.what);
        }
        self.failures = 0;
        self.next = Duration::from_millis(100).min(self.max);
    }
}
