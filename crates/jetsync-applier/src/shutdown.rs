//! Shutdown signalling: the caller's shutdown future becomes a cheap, cloneable flag that every
//! wait in the engine can race against. Work in hand (one batch) is always finished first.

use std::future::Future;

use tokio::sync::watch;

/// A cloneable view of "has shutdown been requested?".
#[derive(Debug, Clone)]
pub(crate) struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Spawns a task that flips the flag when `signal` completes.
    pub(crate) fn spawn(signal: impl Future<Output = ()> + Send + 'static) -> Shutdown {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            signal.await;
            let _ = tx.send(true);
        });
        Shutdown { rx }
    }

    /// The flag a `watch` channel carries (`true`: shutdown requested).
    pub(crate) fn from_receiver(rx: watch::Receiver<bool>) -> Shutdown {
        Shutdown { rx }
    }

    /// Whether shutdown was requested.
    pub(crate) fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes once shutdown is requested (immediately if it already was).
    pub(crate) async fn requested(&mut self) {
        // An error means the sender is gone without signalling: treat that as "never".
        if self.rx.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
