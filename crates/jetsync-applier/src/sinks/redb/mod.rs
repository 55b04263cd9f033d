//! The embedded redb replica sink: rows in a redb file that the service reads in-process through
//! a [`Replica`] handle.
//!
//! For services that embed the applier engine: instead of a SQLite file read through a driver,
//! the synced rows live in a redb file owned by the same process, and the service reads them
//! with [`Replica::get`], [`Replica::scan`] and waits for its own writes with
//! [`Replica::wait_for`] (read-your-writes: publish, take `Published.seq`, wait for it).
//!
//! # Layout
//!
//! - `jetsync_rows`: `(table, key) → row`, the row encoded with jetsync's postcard codec (the
//!   wire codec, so there is one row encoding in the project, not two). Keys sort by table, then
//!   key, so a table is one contiguous range.
//! - `jetsync_offsets`: `group → seq`, the fence (DESIGN section 5).
//! - `jetsync_audit` (only with [`RedbOptions::audit`]): `seq → how many times that sequence was
//!   applied`. Crash tests read it with [`read_audit`] to prove exactly-once: every count is 1.
//!
//! # Crash windows
//!
//! A batch is one redb write transaction holding the rows, the fence and the audit counts,
//! committed once, so rows, fence and audit always move together. A commit that moves a fence
//! forward is made durable ([`Durability::Immediate`], which also makes every commit before it
//! durable) when the changes committed since the last durable commit, this batch's included, are
//! at most [`DURABLE_UP_TO`](durability::DURABLE_UP_TO) (an applier keeping up with live traffic: few dirty pages, a short
//! fsync, so every commit is durable and the fsync never grows into a stall), when the last
//! durable commit is [`DURABLE_EVERY`](durability::DURABLE_EVERY) old, or when there was none since the file was opened.
//! The ones in between (catching up with big batches) are [`Durability::None`]: visible to
//! readers at once, kept in redb's write buffer, but not made crash-safe (redb's header still
//! names the last durable commit). A durable batch commit is made in two steps: the batch is
//! committed without durability (and its fence published to replicas), then an empty durable
//! commit makes it and everything before it crash-safe before `apply` returns. Readers waiting
//! for the fence thus do not also wait for the fsync; the engine still learns of the batch only
//! once it is durable. If that second commit fails, the sink reports [`SinkError::Fatal`]: the
//! rows are visible in this process but may not survive it. A commit that does not move a fence
//! forward (`parked retry` applying parked events at the fence), a replacement's commit and
//! [`Sink::set_fence`] are always durable in one step, as is the close of the file (redb makes
//! pending commits durable when the last handle is dropped). When the engine goes idle it calls
//! [`Sink::idle`], which makes the last deferred commits durable with an empty durable commit:
//! the end of a catch-up does not wait for the next event to become crash-safe.
//!
//! The fence never decreases: a batch whose `last_seq` is below it leaves it, and so does a
//! replacement committed below it; only [`Sink::set_fence`] (`reset --to-seq`, an explicit
//! operator rewind) moves it down.
//! - Killed before a commit: nothing of the batch is visible, on disk or to readers; the fence
//!   still names the previous batch, so the engine replays this one.
//! - Killed after a durable commit returned: rows, fence and audit moved together; the engine
//!   resumes after the fence whatever its own redb checkpoint says.
//! - Killed after non-durable commits (also between the two steps of a durable batch commit):
//!   the file reopens at the last durable commit, rows, fence and audit together (at most
//!   [`DURABLE_EVERY`](durability::DURABLE_EVERY) of progress older), and the engine replays
//!   from that fence, also when its checkpoint or the server's acknowledgements had gone further
//!   (both are brought to the fence at start). A [`Replica`] dies with the process, so no reader
//!   sees the older state except a restarted service before the engine has caught up again,
//!   just as after any downtime.
//! - Killed during a commit: redb's "1PC+C" commit (checksummed tree, then a flip of the
//!   primary header) leaves the file at the last complete durable commit, i.e. one of the cases
//!   above. Reopening repairs the file if needed.
//!
//! The in-process fence seen by replicas is published only after the commit returned, so a
//! [`Replica`] never reports a sequence whose rows it cannot read.
//!
//! A snapshot resync is one write transaction held open across chunks
//! ([`Sink::replace_begin`] drops and recreates the rows table in it, each
//! [`Sink::replace_chunk`] writes into it, [`Sink::replace_commit`] sets the fence and commits
//! durably): readers see the old rows until the commit, the new ones after it; a kill or an
//! abort before the commit leaves the old rows and fence. A chunk's rows are encoded and checked
//! before any is written, so a refused row ([`SinkError::Rejected`]) leaves nothing of its chunk
//! and the replacement open. With [`RedbOptions::audit`] it counts the sequences it applies like
//! [`Sink::apply`] does (a resync re-applies sequences, so their counts may exceed 1 afterwards).
//!
//! # Locking
//!
//! redb's default `ExclusiveWriter` mode locks the whole file: a second open, from this process
//! or another, read-only included, fails. [`RedbSink::open`] says so in its error. Replicas hold
//! the database too, so the file stays locked until the sink and every replica are dropped.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jetsync::codec::{self, Format};
use jetsync::{Event, Row};
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    StorageError, TableDefinition, TableError, WriteTransaction,
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::{Change, DigestBuilder, Sink, SinkError, TableDigest};

/// Synced rows: `(table, key) → encoded row`.
const ROWS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("jetsync_rows");
/// The fence: `group → last applied stream sequence`.
const OFFSETS: TableDefinition<'_, &str, u64> = TableDefinition::new("jetsync_offsets");
/// Exactly-once audit: `seq → times applied`.
const AUDIT: TableDefinition<'_, u64, u64> = TableDefinition::new("jetsync_audit");

mod audit;
mod durability;
mod errors;
mod options;
mod replica;
mod rows;
#[cfg(test)]
mod tests;

pub use audit::read_audit;
pub(crate) use durability::blocking;
#[cfg(test)]
use durability::{DURABLE_EVERY, DURABLE_UP_TO};
pub use options::RedbOptions;
pub use replica::{Replica, ReplicaError};

use audit::read_audit_from;
use durability::durable_now;
use errors::{open_error, sink_error};
use rows::{apply_changes, count_applied, decode_row, encode_changes, write_encoded};

/// The embedded redb replica sink (see the module docs).
pub struct RedbSink {
    db: Arc<Database>,
    path: PathBuf,
    audit: bool,
    /// The committed fence of every group, mirrored in memory so that the value published to
    /// replicas can be computed without a read transaction.
    fences: BTreeMap<String, u64>,
    /// The applied fence as replicas see it: the highest fence over all groups (with one group
    /// per sink, the embedded case, exactly that group's fence). Updated after each commit.
    applied: watch::Sender<u64>,
    /// When this handle last committed durably (`None`: not yet).
    durable_at: Option<Instant>,
    /// Changes committed without durability since the last durable commit.
    undurable_changes: usize,
    /// The open replacement of a streamed resync ([`Sink::replace_begin`] until
    /// [`Sink::replace_commit`] or [`Sink::replace_abort`]): one write transaction held across
    /// chunks. Dropping it aborts it.
    replacing: Option<Box<Replacement>>,
}

/// A replacement in progress: its write transaction (the rows table already emptied in it).
struct Replacement {
    txn: WriteTransaction,
    group: String,
}

impl fmt::Debug for RedbSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbSink")
            .field("path", &self.path)
            .field("audit", &self.audit)
            .field("fences", &self.fences)
            .finish_non_exhaustive()
    }
}

/// redb's own page cache for the replica. redb's default (1 GiB) keeps every page it ever
/// touched, so the applier's memory grew with the replica: about 100 MiB replaying 500,000
/// events over 100,000 rows, over the 64 MiB budget (DESIGN 9). Pages it evicts stay in the
/// operating system's file cache, so reads of a replica larger than this stay fast.
const REPLICA_CACHE_BYTES: usize = 32 * 1024 * 1024;

impl RedbSink {
    /// Opens (or creates) the redb file at `options.path`, creating its parent directory and the
    /// sink's tables.
    ///
    /// Fails with [`SinkError::Fatal`] naming the path and the cause, in particular when the
    /// file is already open (another applier for the same instance, or a leftover handle).
    pub fn open(options: RedbOptions) -> Result<RedbSink, SinkError> {
        let RedbOptions { path, audit } = options;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| SinkError::Fatal {
                reason: format!(
                    "cannot create directory {} for the redb replica: {e}",
                    parent.display()
                ),
            })?;
        }
        // Owner-only (0600) when new: the replica holds the synced rows.
        crate::offsets::create_private(&path).map_err(|e| SinkError::Fatal {
            reason: format!("cannot create redb replica {}: {e}", path.display()),
        })?;
        let db = redb::Builder::new()
            .set_cache_size(REPLICA_CACHE_BYTES)
            .create(&path)
            .map_err(|e| open_error(&path, e))?;

        // Create the tables up front (one small durable commit) so that readers never have to
        // tell "no table yet" from "empty", and load the fences.
        let fatal = |e: redb::Error| SinkError::Fatal {
            reason: format!("cannot initialise redb replica {}: {e}", path.display()),
        };
        let txn = db.begin_write().map_err(|e| fatal(e.into()))?;
        let mut fences = BTreeMap::new();
        {
            txn.open_table(ROWS).map_err(|e| fatal(e.into()))?;
            if audit {
                txn.open_table(AUDIT).map_err(|e| fatal(e.into()))?;
            }
            let offsets = txn.open_table(OFFSETS).map_err(|e| fatal(e.into()))?;
            for entry in offsets.iter().map_err(|e| fatal(e.into()))? {
                let (group, seq) = entry.map_err(|e| fatal(e.into()))?;
                fences.insert(group.value().to_owned(), seq.value());
            }
        }
        txn.commit().map_err(|e| fatal(e.into()))?;

        let initial = fences.values().copied().max().unwrap_or(0);
        let (applied, _) = watch::channel(initial);
        tracing::debug!(path = %path.display(), audit, fence = initial, "opened redb replica");
        Ok(RedbSink {
            db: Arc::new(db),
            path,
            audit,
            fences,
            applied,
            durable_at: None,
            undurable_changes: 0,
            replacing: None,
        })
    }

    /// A read handle on the rows, cheap to clone and usable from any task or thread.
    pub fn replica(&self) -> Replica {
        Replica {
            db: Arc::clone(&self.db),
            applied: self.applied.subscribe(),
        }
    }

    /// The redb file this sink writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times every sequence was applied (empty unless opened with `audit`).
    pub fn audit_counts(&self) -> Result<BTreeMap<u64, u64>, SinkError> {
        read_audit_from(&self.db)
    }

    fn fence_blocking(&self, group: &str) -> Result<Option<u64>, SinkError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| sink_error("read the fence", e))?;
        let offsets = txn
            .open_table(OFFSETS)
            .map_err(|e| sink_error("read the fence", e))?;
        let seq = offsets
            .get(group)
            .map_err(|e| sink_error("read the fence", e))?;
        Ok(seq.map(|s| s.value()))
    }

    fn is_empty_blocking(&self) -> Result<bool, SinkError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| sink_error("count rows", e))?;
        let rows = txn
            .open_table(ROWS)
            .map_err(|e| sink_error("count rows", e))?;
        rows.is_empty().map_err(|e| sink_error("count rows", e))
    }

    /// One batch ([`Sink::apply`]) in one write transaction with the fence (and the audit
    /// counts). The fence never decreases: a `last_seq` below it (`parked retry` applying events
    /// parked earlier) leaves it where it is.
    fn write_batch(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        const WHAT: &str = "apply a batch";
        self.abort_replacement();
        let current = self.fences.get(group).copied();
        let advances = current.is_none_or(|fence| last_seq > fence);
        let last_seq = current.map_or(last_seq, |fence| fence.max(last_seq));
        let since_durable = self.undurable_changes + changes.len();
        let durable = !advances || durable_now(since_durable, self.durable_at);
        // A durable commit that only moves the fence forward is split: the batch commits without
        // durability (visible at once), then an empty durable commit makes it crash-safe, so
        // readers waiting for the fence do not also wait for the fsync.
        let split = durable && advances;
        let mut txn = self.db.begin_write().map_err(|e| sink_error(WHAT, e))?;
        txn.set_durability(if durable && !split {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(|e| sink_error(WHAT, e))?;
        {
            // One open_table per table per transaction, however many changes.
            let mut rows = txn.open_table(ROWS).map_err(|e| sink_error(WHAT, e))?;
            apply_changes(&mut rows, changes)?;

            let mut offsets = txn.open_table(OFFSETS).map_err(|e| sink_error(WHAT, e))?;
            offsets
                .insert(group, last_seq)
                .map_err(|e| sink_error(WHAT, e))?;

            if self.audit {
                count_applied(&txn, changes)?;
            }
        }
        // Crash window: before this returns nothing of the batch is visible or durable; after it, rows, fence and audit are
        // visible, and on disk if `durable` (else from the next durable commit on; see the
        // module docs). An error above drops `txn`, which aborts it.
        txn.commit().map_err(|e| sink_error(WHAT, e))?;
        self.committed_fence(group, last_seq);
        if split {
            let persist = || -> Result<(), redb::Error> {
                let mut txn = self.db.begin_write()?;
                txn.set_durability(Durability::Immediate)?;
                txn.commit()?;
                Ok(())
            };
            persist().map_err(|e| SinkError::Fatal {
                reason: format!(
                    "redb replica {}: a batch committed but could not be made durable: {e}",
                    self.path.display()
                ),
            })?;
        }
        if durable {
            self.durable_at = Some(Instant::now());
            self.undurable_changes = 0;
        } else {
            self.undurable_changes = since_durable;
        }
        Ok(())
    }

    /// Ends an open replacement, if any (dropping its transaction aborts it). A write
    /// transaction outside it would otherwise wait for it forever.
    fn abort_replacement(&mut self) {
        if let Some(r) = self.replacing.take() {
            tracing::debug!(group = %r.group, "redb replica: replacement aborted");
        }
    }

    /// [`Sink::replace_begin`]: one write transaction in which the rows table starts empty.
    fn replace_begin_blocking(&mut self, group: &str) -> Result<(), SinkError> {
        const WHAT: &str = "begin replacing the rows";
        self.abort_replacement();
        let txn = self.db.begin_write().map_err(|e| sink_error(WHAT, e))?;
        // All synced tables live in this one redb table: drop it (freeing its pages in bulk)
        // and start an empty one. Readers keep seeing the old rows until the commit.
        txn.delete_table(ROWS).map_err(|e| sink_error(WHAT, e))?;
        txn.open_table(ROWS).map_err(|e| sink_error(WHAT, e))?;
        self.replacing = Some(Box::new(Replacement {
            txn,
            group: group.to_owned(),
        }));
        Ok(())
    }

    /// [`Sink::replace_chunk`]: every row is encoded and checked before anything is written,
    /// so a [`SinkError::Rejected`] leaves nothing of the chunk in the replacement (which stays
    /// open); any other error ends the replacement.
    fn replace_chunk_blocking(&mut self, changes: &[Change]) -> Result<(), SinkError> {
        const WHAT: &str = "replace the rows";
        let Some(replacement) = self.replacing.as_ref() else {
            return Err(SinkError::Fatal {
                reason: "redb replica: replace_chunk without replace_begin (an engine bug)".into(),
            });
        };
        let encoded = encode_changes(changes)?;
        let written = (|| {
            {
                let mut rows = replacement
                    .txn
                    .open_table(ROWS)
                    .map_err(|e| sink_error(WHAT, e))?;
                write_encoded(&mut rows, changes, &encoded)?;
            }
            if self.audit {
                count_applied(&replacement.txn, changes)?;
            }
            Ok(())
        })();
        if written.is_err() {
            self.abort_replacement();
        }
        written
    }

    /// [`Sink::replace_commit`]: the fence (never lower than before) and the rows in one durable
    /// commit.
    fn replace_commit_blocking(&mut self, group: &str, last_seq: u64) -> Result<(), SinkError> {
        const WHAT: &str = "commit the replaced rows";
        let Some(mut txn) = self.replacing.take().map(|r| r.txn) else {
            return Err(SinkError::Fatal {
                reason: "redb replica: replace_commit without replace_begin (an engine bug)".into(),
            });
        };
        let fence = self
            .fences
            .get(group)
            .map_or(last_seq, |&f| f.max(last_seq));
        txn.set_durability(Durability::Immediate)
            .map_err(|e| sink_error(WHAT, e))?;
        {
            let mut offsets = txn.open_table(OFFSETS).map_err(|e| sink_error(WHAT, e))?;
            offsets
                .insert(group, fence)
                .map_err(|e| sink_error(WHAT, e))?;
        }
        // Crash window: before this returns the old rows and fence are all still there (on
        // disk and for readers); after it, the new ones, durably (and every earlier commit).
        txn.commit().map_err(|e| sink_error(WHAT, e))?;
        self.durable_at = Some(Instant::now());
        self.undurable_changes = 0;
        self.committed_fence(group, fence);
        Ok(())
    }

    /// [`Sink::idle`]: makes the last non-durable commits durable (an empty durable commit), so
    /// an applier that caught up with big batches and then went idle is crash-safe at once
    /// rather than only at its next batch.
    fn idle_blocking(&mut self) -> Result<(), SinkError> {
        if self.undurable_changes == 0 || self.replacing.is_some() {
            return Ok(());
        }
        let persist = || -> Result<(), redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            txn.commit()?;
            Ok(())
        };
        persist().map_err(|e| sink_error("make the last commits durable", e))?;
        self.durable_at = Some(Instant::now());
        self.undurable_changes = 0;
        Ok(())
    }

    /// Whether every commit of this handle is durable (nothing waits for a deferred fsync).
    pub fn is_durable(&self) -> bool {
        self.undurable_changes == 0
    }

    /// Sets the fence to `seq`, up or down: the explicit operator rewind of `reset --to-seq`
    /// (the only way a fence moves backwards).
    fn set_fence_blocking(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        const WHAT: &str = "set the fence";
        self.abort_replacement();
        let mut txn = self.db.begin_write().map_err(|e| sink_error(WHAT, e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| sink_error(WHAT, e))?;
        {
            let mut offsets = txn.open_table(OFFSETS).map_err(|e| sink_error(WHAT, e))?;
            offsets
                .insert(group, seq)
                .map_err(|e| sink_error(WHAT, e))?;
        }
        txn.commit().map_err(|e| sink_error(WHAT, e))?;
        self.durable_at = Some(Instant::now());
        self.undurable_changes = 0;
        self.committed_fence(group, seq);
        Ok(())
    }

    /// Records a committed fence and tells the replicas (only ever after the commit).
    fn committed_fence(&mut self, group: &str, seq: u64) {
        match self.fences.get_mut(group) {
            Some(fence) => *fence = seq,
            None => {
                self.fences.insert(group.to_owned(), seq);
            }
        }
        let applied = self.fences.values().copied().max().unwrap_or(0);
        self.applied.send_if_modified(|current| {
            let changed = *current != applied;
            *current = applied;
            changed
        });
    }

    fn digest_blocking(&self) -> Result<Vec<TableDigest>, SinkError> {
        const WHAT: &str = "compute the digest";
        let txn = self.db.begin_read().map_err(|e| sink_error(WHAT, e))?;
        let rows = txn.open_table(ROWS).map_err(|e| sink_error(WHAT, e))?;
        // Keys sort by (table, key), so each table is one run and tables come out sorted.
        let mut digests = Vec::new();
        let mut current: Option<(String, DigestBuilder)> = None;
        for entry in rows.iter().map_err(|e| sink_error(WHAT, e))? {
            let (key, value) = entry.map_err(|e| sink_error(WHAT, e))?;
            let (table, row_key) = key.value();
            let row = decode_row(value.value()).map_err(|reason| SinkError::Fatal {
                reason: format!(
                    "row {table}/{row_key} in redb replica {} cannot be decoded: {reason}",
                    self.path.display()
                ),
            })?;
            match &mut current {
                Some((name, builder)) if name == table => builder.add(table, &row),
                _ => {
                    if let Some((name, builder)) = current.take() {
                        digests.push(builder.finish(&name));
                    }
                    let mut builder = DigestBuilder::default();
                    builder.add(table, &row);
                    current = Some((table.to_owned(), builder));
                }
            }
        }
        if let Some((name, builder)) = current {
            digests.push(builder.finish(&name));
        }
        Ok(digests)
    }
}

impl Sink for RedbSink {
    async fn fence(&mut self, group: &str) -> Result<Option<u64>, SinkError> {
        // This sink keeps a fence: "never applied" is Some(0), never None (see the trait).
        self.fence_blocking(group).map(|f| Some(f.unwrap_or(0)))
    }

    async fn is_empty(&mut self) -> Result<bool, SinkError> {
        self.is_empty_blocking()
    }

    fn sees_every_change(&self) -> bool {
        // The audit table counts every applied sequence: nothing may be coalesced away.
        self.audit
    }

    async fn apply(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        blocking(|| self.write_batch(group, changes, last_seq))
    }

    async fn replace_begin(&mut self, group: &str) -> Result<(), SinkError> {
        blocking(|| self.replace_begin_blocking(group))
    }

    async fn replace_chunk(&mut self, _group: &str, changes: &[Change]) -> Result<(), SinkError> {
        blocking(|| self.replace_chunk_blocking(changes))
    }

    async fn replace_commit(&mut self, group: &str, last_seq: u64) -> Result<(), SinkError> {
        blocking(|| self.replace_commit_blocking(group, last_seq))
    }

    async fn replace_abort(&mut self, _group: &str) {
        self.abort_replacement();
    }

    async fn idle(&mut self) -> Result<(), SinkError> {
        blocking(|| self.idle_blocking())
    }

    async fn set_fence(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        blocking(|| self.set_fence_blocking(group, seq))
    }

    async fn digest(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        blocking(|| self.digest_blocking())
    }
}
