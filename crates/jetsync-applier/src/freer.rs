//! Freeing applied batches on a thread of their own.
//!
//! A batch of 1,000–2,000 delivered messages and decoded rows is tens of thousands of
//! allocations (header maps, subjects, row maps, column names, values). Dropping them on the
//! engine's task, between one sink commit and the next, was about a tenth of that thread's time
//! in a replay profile, and the sink waited meanwhile. The engine hands what it no longer needs
//! to this thread instead. The hand-over never blocks: when the thread is still busy with the
//! previous batch, the engine drops the new one itself, so at most one applied batch waits here
//! and memory stays bounded.

use std::{
    sync::mpsc::{self, SyncSender, TrySendError},
    thread::JoinHandle,
};

type Garbage = Box<dyn Send>;

/// A thread that drops what it is handed.
pub(crate) struct Freer {
    tx: Option<SyncSender<Garbage>>,
    thread: Option<JoinHandle<()>>,
}

impl Freer {
    /// Starts the thread. Should the system refuse a thread, values are dropped in place.
    pub(crate) fn spawn() -> Freer {
        let (tx, rx) = mpsc::sync_channel::<Garbage>(1);
        let thread = std::thread::Builder::new()
            .name("jetsync-free".into())
            .spawn(move || {
                for garbage in rx {
                    drop(garbage);
                }
            });
        match thread {
            Ok(thread) => Freer {
                tx: Some(tx),
                thread: Some(thread),
            },
            Err(e) => {
                tracing::debug!(error = %e, "no thread to free batches on; freeing them in place");
                Freer {
                    tx: None,
                    thread: None,
                }
            }
        }
    }

    /// Drops `value` on the freeing thread, or here when that thread is busy or gone.
    pub(crate) fn free<T: Send + 'static>(&self, value: T) {
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(Box::new(value)) {
            Ok(()) => {}
            Err(TrySendError::Full(garbage) | TrySendError::Disconnected(garbage)) => drop(garbage),
        }
    }
}

impl Drop for Freer {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it dropped what it holds.
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Freer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Freer")
            .field("thread", &self.thread.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use super::Freer;

    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn everything_handed_over_is_dropped_once_by_the_time_the_freer_is_gone() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let freer = Freer::spawn();
        for _ in 0..100 {
            freer.free(vec![Counted(dropped.clone()), Counted(dropped.clone())]);
        }
        drop(freer);
        assert_eq!(dropped.load(Ordering::SeqCst), 200);
    }
}
