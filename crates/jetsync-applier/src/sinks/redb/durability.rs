//! When the redb replica makes a commit durable (see the crash windows in `mod.rs`), and running its blocking calls.

use super::*;

/// How old the last durable commit may get before a batch's commit is made durable (see the
/// module's crash windows). A durable commit writes every page dirtied since the previous one
/// and waits for an fsync; deferring it while catching up lets many batches share one. A kill
/// costs at most this much progress, which is applied again.
pub const DURABLE_EVERY: Duration = Duration::from_millis(100);

/// A commit is made durable at once while at most this many changes were committed since the
/// last durable commit (this batch's included): the small batches of an applier that keeps up.
/// Measured with `just bench` (live, 5,000 events/s, three appliers on two cores): deferring
/// durability by time alone made every 100 ms commit an fsync of hundreds of pages (p50 4.7 ms,
/// p90 20 ms) that delayed all events behind it (p99 23–41 ms); durable small commits cost
/// about 0.5 ms each and gave p99 7.6 ms.
pub const DURABLE_UP_TO: usize = 256;

/// Whether a commit that moves a fence forward is made durable, with `since_durable` changes
/// committed since the last durable commit (this one's included) and that commit made at
/// `durable_at` (see the module's crash windows).
pub(super) fn durable_now(since_durable: usize, durable_at: Option<Instant>) -> bool {
    since_durable <= DURABLE_UP_TO || durable_at.is_none_or(|at| at.elapsed() >= DURABLE_EVERY)
}

/// Runs a blocking redb call (a commit waits for an fsync) without stalling the other tasks of a
/// multi-threaded runtime. On a current-thread runtime it runs inline: the call is short, and
/// the alternative (`spawn_blocking`) would mean copying the batch. (Also used by the
/// checkpoint store's commits.)
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
