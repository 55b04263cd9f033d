//! The `Sink` trait: where applied events end up.
//!
//! A sink is built from configuration (config → build → run) and then only ever sees whole
//! batches. The engine guarantees that batches arrive in stream order, one at a time, and that
//! `last_seq` only grows; the sink guarantees that a batch is applied atomically together with
//! its *fence* (the highest stream sequence whose effects are in the sink) wherever its storage
//! allows. That fence is what makes a hard kill harmless: on restart the engine resumes after the
//! fence, whatever the redb checkpoint says.

use std::future::Future;

/// What happened to one row, decoded from one stream message.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The stream sequence of the event.
    pub seq: u64,
    /// The table (already validated as a jetsync table name).
    pub table: String,
    /// The decoded row key (the subject's key token, decoded).
    pub key: String,
    /// Upsert with the full new row, or delete.
    pub op: jetsync::Change,
}

/// Row count and order-independent hash of one table, as reported by `digest`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableDigest {
    /// Table name.
    pub table: String,
    /// Number of rows.
    pub rows: u64,
    /// Order-independent hash of all rows, 16 lowercase hex digits (see `digest.rs`).
    pub hash: String,
}

/// Why a sink could not apply a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The storage is temporarily unavailable (busy, locked, connection lost, I/O hiccup):
    /// nothing was applied; the engine retries the same batch with backoff.
    #[error("sink temporarily unavailable: {reason}")]
    Unavailable {
        /// What went wrong.
        reason: String,
    },
    /// A change of the batch touches a row whose latest captured local change is being
    /// published right now (see `capture/pending.rs`): where it goes in the stream is known
    /// once the relay records the server's acknowledgement, within milliseconds. Nothing was
    /// applied; the engine retries the batch as soon as the relay records it (no backoff, no
    /// warning: this is the normal race between an instance's own echo and its relay).
    #[error("waiting for the capture relay: {reason}")]
    InFlight {
        /// Which change waits for which row.
        reason: String,
    },
    /// The change at `index` of the batch is permanently rejected (constraint or type error,
    /// a key that does not match the row): nothing of the batch was applied. The engine routes
    /// that event to the poison path and retries the rest.
    #[error("sink rejected the event at seq {seq} ({table}/{key}): {reason}")]
    Rejected {
        /// Position of the rejected change in the batch.
        index: usize,
        /// Its stream sequence.
        seq: u64,
        /// Its table.
        table: String,
        /// Its key.
        key: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The sink cannot work at all (cannot open the file, schema it cannot use): an operator
    /// must act.
    #[error("sink failed: {reason}")]
    Fatal {
        /// What went wrong and what to do.
        reason: String,
    },
}

impl SinkError {
    /// Whether retrying the same batch later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SinkError::Unavailable { .. } | SinkError::InFlight { .. }
        )
    }
}

/// A destination for applied events.
///
/// Implementations: the SQLite sink (the binary's default), the embedded redb replica, and any
/// service's own code (an in-memory cache, its own ORM) when it embeds the engine.
pub trait Sink: Send {
    /// The highest stream sequence of sync group `group` whose effects are in this sink (the
    /// fence). A sink that keeps a fence returns `Some(0)` when it never applied anything, so a
    /// wiped or replaced database makes the engine start over instead of trusting a redb
    /// checkpoint that describes data no longer there. `None` means the sink keeps no fence at
    /// all; the engine then trusts its redb checkpoint.
    fn fence(&mut self, group: &str)
        -> impl Future<Output = Result<Option<u64>, SinkError>> + Send;

    /// Whether the sink holds no synced rows at all (used to decide on a snapshot bootstrap).
    fn is_empty(&mut self) -> impl Future<Output = Result<bool, SinkError>> + Send;

    /// Applies `changes` in order and records `last_seq` as the fence of `group`, atomically
    /// where the storage allows. `last_seq` is at least the seq of the last change; it can be
    /// higher when the batch ended with events that were skipped.
    ///
    /// Upserts replace the whole row (columns the event does not carry become NULL); deletes of
    /// absent rows are no-ops. On any error nothing of the batch may remain applied.
    ///
    /// `last_seq` may equal the current fence while `changes` carry lower sequences: that is
    /// how `parked retry` applies events that were parked earlier, without moving the fence.
    fn apply(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Replaces the contents of the synced tables of `group` with the result of applying
    /// `changes` (in order) to empty tables, and sets the fence of `group` to `last_seq`, in one
    /// transaction wherever the storage allows. The provided implementation is
    /// [`Sink::replace_begin`], one [`Sink::replace_chunk`], [`Sink::replace_commit`] (and
    /// [`Sink::replace_abort`] on an error); the engine streams a snapshot through those three
    /// instead, so a resync of any size runs in bounded memory.
    fn replace(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        async move {
            self.replace_begin(group).await?;
            let result = match self.replace_chunk(group, changes).await {
                Ok(()) => self.replace_commit(group, last_seq).await,
                Err(e) => Err(e),
            };
            if result.is_err() {
                self.replace_abort(group).await;
            }
            result
        }
    }

    /// Begins replacing the synced tables of `group` (a snapshot resync): opens one sink
    /// transaction (or builds shadow tables) in which the synced tables start empty. Readers
    /// keep seeing the old contents until [`Sink::replace_commit`].
    ///
    /// The synced tables are the *configured* tables (`[tables.<name>]`; with the SQLite
    /// sink's `apply.other_tables = "create"`, also every table it created), never a service's
    /// own tables, the applier's own tables or the database's internal ones.
    ///
    /// The default implementation refuses: a sink written by a service must implement the
    /// replace methods to support `on_gap = "resync"` and the `resync` command.
    fn replace_begin(&mut self, group: &str) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = group;
        async {
            Err(SinkError::Fatal {
                reason: "this sink cannot replace its tables, so it cannot resync from a snapshot: implement Sink::replace_begin/chunk/commit, or set apply.on_gap = \"halt\"".to_owned(),
            })
        }
    }

    /// Applies `changes` (ascending sequences) inside the replacement begun by
    /// [`Sink::replace_begin`]. A permanently refused change is [`SinkError::Rejected`] with its
    /// index: nothing of *this chunk* remains applied, earlier chunks stay, and the replacement
    /// stays open (the engine parks that change and sends the chunk again without it). Any
    /// other error ends the replacement (nothing of it remains; the engine starts over).
    fn replace_chunk(
        &mut self,
        group: &str,
        changes: &[Change],
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = (group, changes);
        async {
            Err(SinkError::Fatal {
                reason: "this sink cannot replace its tables (Sink::replace_chunk)".to_owned(),
            })
        }
    }

    /// Sets the fence of `group` to `last_seq` and commits the replacement atomically: a reader
    /// sees the old contents or the new ones, never a half-empty table.
    fn replace_commit(
        &mut self,
        group: &str,
        last_seq: u64,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = (group, last_seq);
        async {
            Err(SinkError::Fatal {
                reason: "this sink cannot replace its tables (Sink::replace_commit)".to_owned(),
            })
        }
    }

    /// Abandons an open replacement (rolls it back); a no-op when none is open.
    fn replace_abort(&mut self, group: &str) -> impl Future<Output = ()> + Send {
        let _ = group;
        async {}
    }

    /// Whether the sink must be handed every change, even one a later change of the same row in
    /// the same batch replaces (the redb replica's audit mode counts every sequence). When false
    /// (the default) the engine may write a row changed several times in one batch once, with
    /// its last change (`apply.coalesce`): an upsert replaces the whole row, so the end state is
    /// the same.
    fn sees_every_change(&self) -> bool {
        false
    }

    /// Called by the engine when it has no event in hand (the applier caught up): a sink that
    /// defers durability (the redb replica) makes its last commit durable now.
    fn idle(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }

    /// Sets the fence of `group` to exactly `seq` without touching rows: the operator's explicit
    /// `reset --to-seq`, which may move it back (the next run applies the events after `seq`
    /// again). Every other fence write (`apply`, `replace_commit`) only ever raises the fence.
    fn set_fence(
        &mut self,
        group: &str,
        seq: u64,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Row count and order-independent hash of every synced table, sorted by table name.
    fn digest(&mut self) -> impl Future<Output = Result<Vec<TableDigest>, SinkError>> + Send;
}
