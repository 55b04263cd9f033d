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
//! at most [`DURABLE_UP_TO`] (an applier keeping up with live traffic: few dirty pages, a short
//! fsync, so every commit is durable and the fsync never grows into a stall), when the last
//! durable commit is [`DURABLE_EVERY`] old, or when there was none since the file was opened.
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
//!   [`DURABLE_EVERY`] of progress older), and the engine replays
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

/// How to open a [`RedbSink`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedbOptions {
    /// The redb file; its parent directory is created if missing.
    pub path: PathBuf,
    /// Count how many times every stream sequence was applied (table `jetsync_audit`), in the
    /// same transaction as the rows. For crash tests; costs one extra table write per change.
    #[serde(default)]
    pub audit: bool,
}

impl RedbOptions {
    /// Options for the file at `path`, without the audit table.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RedbOptions {
            path: path.into(),
            audit: false,
        }
    }
}

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
        let db = Database::create(&path).map_err(|e| open_error(&path, e))?;

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

/// Read access to the rows of a [`RedbSink`], for the service that embeds the applier.
///
/// Cheap to clone (an `Arc` and a watch receiver); every read is its own redb read transaction,
/// so it sees the state of the last committed batch and never a half-applied one.
#[derive(Clone)]
pub struct Replica {
    db: Arc<Database>,
    applied: watch::Receiver<u64>,
}

impl fmt::Debug for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("applied_seq", &self.applied_seq())
            .finish_non_exhaustive()
    }
}

/// Why a [`Replica`] read or wait failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// redb could not be read (I/O error, corrupted file).
    #[error("cannot read the redb replica: {reason}")]
    Storage {
        /// What went wrong.
        reason: String,
    },
    /// A stored row cannot be decoded (the file was written by an incompatible version).
    #[error("row {table}/{key} in the redb replica cannot be decoded: {reason}")]
    Decode {
        /// The row's table.
        table: String,
        /// The row's key.
        key: String,
        /// Why decoding failed.
        reason: String,
    },
    /// A row does not deserialize into the requested type ([`Replica::get_as`]).
    #[error("row {table}/{key} does not fit the requested type: {reason}")]
    Deserialize {
        /// The row's table.
        table: String,
        /// The row's key.
        key: String,
        /// Why deserializing failed.
        reason: String,
    },
    /// [`Replica::wait_for`] gave up: the replica had applied only up to `applied`.
    #[error(
        "timed out waiting for the replica to apply seq {seq} (applied so far: {applied}); \
         is the applier running and keeping up?"
    )]
    Timeout {
        /// The sequence waited for.
        seq: u64,
        /// The applied fence when the wait gave up.
        applied: u64,
    },
    /// The sink was dropped (the applier stopped) before it applied `seq`.
    #[error("the applier stopped before the replica applied seq {seq} (applied: {applied})")]
    Closed {
        /// The sequence waited for.
        seq: u64,
        /// The last applied fence.
        applied: u64,
    },
}

impl Replica {
    /// The row `table`/`key`, or `None` if it does not exist (never written, or deleted).
    pub fn get(&self, table: &str, key: &str) -> Result<Option<Row>, ReplicaError> {
        let txn = self.db.begin_read().map_err(replica_error)?;
        let rows = txn.open_table(ROWS).map_err(replica_error)?;
        let Some(value) = rows.get((table, key)).map_err(replica_error)? else {
            return Ok(None);
        };
        decode_row(value.value())
            .map(Some)
            .map_err(|reason| ReplicaError::Decode {
                table: table.to_owned(),
                key: key.to_owned(),
                reason,
            })
    }

    /// The row `table`/`key` deserialized into `T` (the same mapping the client uses to
    /// publish typed rows), or `None` if it does not exist.
    pub fn get_as<T: DeserializeOwned>(
        &self,
        table: &str,
        key: &str,
    ) -> Result<Option<T>, ReplicaError> {
        let Some(row) = self.get(table, key)? else {
            return Ok(None);
        };
        jetsync::from_row(&row)
            .map(Some)
            .map_err(|e| ReplicaError::Deserialize {
                table: table.to_owned(),
                key: key.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Every row of `table` with its key, in key order (byte order of the keys).
    pub fn scan(&self, table: &str) -> Result<Vec<(String, Row)>, ReplicaError> {
        let txn = self.db.begin_read().map_err(replica_error)?;
        let rows = txn.open_table(ROWS).map_err(replica_error)?;
        let mut out = Vec::new();
        // "" is the smallest key, so the table's rows start at (table, "") and run until the
        // first key of another table.
        for entry in rows.range((table, "")..).map_err(replica_error)? {
            let (stored, value) = entry.map_err(replica_error)?;
            let (t, key) = stored.value();
            if t != table {
                break;
            }
            let row = decode_row(value.value()).map_err(|reason| ReplicaError::Decode {
                table: table.to_owned(),
                key: key.to_owned(),
                reason,
            })?;
            out.push((key.to_owned(), row));
        }
        Ok(out)
    }

    /// The highest stream sequence whose effects are readable through this replica.
    pub fn applied_seq(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Resolves once the replica has applied stream sequence `seq` (read-your-writes: publish,
    /// take `Published.seq`, wait for it, then read), or fails with
    /// [`ReplicaError::Timeout`] after `timeout`.
    pub async fn wait_for(&self, seq: u64, timeout: Duration) -> Result<(), ReplicaError> {
        let mut applied = self.applied.clone();
        let waited = tokio::time::timeout(timeout, async {
            // Checks the current value first, so an already applied seq resolves at once.
            applied.wait_for(|fence| *fence >= seq).await.map(drop)
        })
        .await;
        let fence = *applied.borrow();
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_closed)) => Err(ReplicaError::Closed {
                seq,
                applied: fence,
            }),
            Err(_elapsed) => Err(ReplicaError::Timeout {
                seq,
                applied: fence,
            }),
        }
    }
}

/// Reads the audit counts (`seq → times applied`) of the redb file at `path`, for tests.
///
/// Opens the file itself, so it fails while a sink (or replica) still holds it; a file left by
/// a killed process is repaired on open. Empty if the file was never opened with `audit`.
pub fn read_audit(path: &Path) -> Result<BTreeMap<u64, u64>, SinkError> {
    if !path.exists() {
        return Err(SinkError::Fatal {
            reason: format!("no redb replica at {}", path.display()),
        });
    }
    let db = Database::open(path).map_err(|e| open_error(path, e))?;
    read_audit_from(&db)
}

fn read_audit_from(db: &Database) -> Result<BTreeMap<u64, u64>, SinkError> {
    const WHAT: &str = "read the audit table";
    let txn = db.begin_read().map_err(|e| sink_error(WHAT, e))?;
    let audit = match txn.open_table(AUDIT) {
        Ok(table) => table,
        Err(TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
        Err(e) => return Err(sink_error(WHAT, e)),
    };
    let mut counts = BTreeMap::new();
    for entry in audit.iter().map_err(|e| sink_error(WHAT, e))? {
        let (seq, count) = entry.map_err(|e| sink_error(WHAT, e))?;
        counts.insert(seq.value(), count.value());
    }
    Ok(counts)
}

/// Whether a commit that moves a fence forward is made durable, with `since_durable` changes
/// committed since the last durable commit (this one's included) and that commit made at
/// `durable_at` (see the module's crash windows).
fn durable_now(since_durable: usize, durable_at: Option<Instant>) -> bool {
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

/// Applies `changes` to the rows table of an open write transaction: the per-change step shared
/// by [`Sink::apply`] and [`Sink::replace`]. A row that cannot be stored for good is
/// [`SinkError::Rejected`] with its index; the caller then drops (aborts) the transaction.
///
/// The changes are written in key order (a stable sort, so the changes of one row keep their
/// stream order): the transaction's result is the same as in stream order, since rows are
/// independent and this table has no constraints between them, but the B-tree is walked
/// sequentially instead of jumping between leaves, which roughly halves the cost per change of a
/// big catch-up batch. Of several rejected rows, the first in key order is reported.
fn apply_changes(
    rows: &mut redb::Table<'_, (&'static str, &'static str), &'static [u8]>,
    changes: &[Change],
) -> Result<(), SinkError> {
    let encoded = encode_changes(changes)?;
    write_encoded(rows, changes, &encoded)
}

/// The largest row this sink stores: redb's value size limit (3 GiB), checked before writing so
/// that a refused row leaves nothing of its batch or chunk behind.
const MAX_ROW_BYTES: usize = 3 * 1024 * 1024 * 1024;

/// Encodes every upsert of `changes` (`None` for a delete), refusing a row that cannot be
/// encoded or stored with [`SinkError::Rejected`] before anything is written.
fn encode_changes(changes: &[Change]) -> Result<Vec<Option<Vec<u8>>>, SinkError> {
    changes
        .iter()
        .enumerate()
        .map(|(index, change)| match &change.op {
            jetsync::Change::Upsert(row) => {
                let encoded = encode_row(row).map_err(|reason| rejected(index, change, reason))?;
                if encoded.len() > MAX_ROW_BYTES {
                    return Err(rejected(
                        index,
                        change,
                        format!(
                            "the encoded row ({} bytes) exceeds redb's value size limit",
                            encoded.len()
                        ),
                    ));
                }
                Ok(Some(encoded))
            }
            jetsync::Change::Delete => Ok(None),
        })
        .collect()
}

/// Writes `changes` (encoded by [`encode_changes`]) to the rows table, in key order.
fn write_encoded(
    rows: &mut redb::Table<'_, (&'static str, &'static str), &'static [u8]>,
    changes: &[Change],
    encoded: &[Option<Vec<u8>>],
) -> Result<(), SinkError> {
    const WHAT: &str = "apply a batch";
    let mut order: Vec<usize> = (0..changes.len()).collect();
    order.sort_by_key(|&i| (changes[i].table.as_str(), changes[i].key.as_str()));
    for index in order {
        let change = &changes[index];
        let key = (change.table.as_str(), change.key.as_str());
        let written = match &encoded[index] {
            Some(bytes) => rows.insert(key, bytes.as_slice()).map(drop),
            None => rows.remove(key).map(drop),
        };
        written.map_err(|e| match e {
            StorageError::ValueTooLarge(len) => rejected(
                index,
                change,
                format!("the encoded row ({len} bytes) exceeds redb's value size limit"),
            ),
            other => sink_error(WHAT, other),
        })?;
    }
    Ok(())
}

/// Adds one to the audit count of every change's sequence (see [`RedbOptions::audit`]).
fn count_applied(txn: &WriteTransaction, changes: &[Change]) -> Result<(), SinkError> {
    const WHAT: &str = "count applied sequences";
    let mut audit = txn.open_table(AUDIT).map_err(|e| sink_error(WHAT, e))?;
    for change in changes {
        let count = audit
            .get(change.seq)
            .map_err(|e| sink_error(WHAT, e))?
            .map_or(0, |c| c.value());
        audit
            .insert(change.seq, count + 1)
            .map_err(|e| sink_error(WHAT, e))?;
    }
    Ok(())
}

/// Encodes `row` with jetsync's postcard codec, as the body of an upsert event
/// (origin "", ts 0, schema 1), so the project has one row encoding, not two. Encoded by
/// reference: the row is not copied.
fn encode_row(row: &Row) -> Result<Vec<u8>, String> {
    let event = codec::EventRef {
        row: Some(row),
        origin: "",
        ts_ms: 0,
        schema: Event::DEFAULT_SCHEMA,
    };
    codec::encode_ref(event, Format::Postcard1).map_err(|e| e.to_string())
}

/// Decodes a row written by [`encode_row`].
fn decode_row(bytes: &[u8]) -> Result<Row, String> {
    match codec::decode(bytes, Format::Postcard1) {
        Ok(Event {
            change: jetsync::Change::Upsert(row),
            ..
        }) => Ok(row),
        Ok(_) => Err("the stored value is a delete, not a row".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

fn open_error(path: &Path, err: DatabaseError) -> SinkError {
    let reason = match err {
        DatabaseError::DatabaseAlreadyOpen => format!(
            "cannot open redb replica {}: the file is locked by another process or handle \
             (is another applier running for this instance?)",
            path.display()
        ),
        DatabaseError::UpgradeRequired(version) => format!(
            "cannot open redb replica {}: it uses redb file format {version}, which this build \
             cannot read; upgrade the file or resync into a new one",
            path.display()
        ),
        other => format!("cannot open redb replica {}: {other}", path.display()),
    };
    SinkError::Fatal { reason }
}

/// Classifies a redb error met while doing `what`: I/O errors are worth a retry, everything
/// else (corruption, a file of another shape, an earlier I/O error that poisoned the handle)
/// needs an operator.
fn sink_error(what: &str, err: impl Into<redb::Error>) -> SinkError {
    match err.into() {
        redb::Error::Io(e) => SinkError::Unavailable {
            reason: format!("redb replica: cannot {what}: {e}"),
        },
        redb::Error::PreviousIo => SinkError::Fatal {
            reason: format!(
                "redb replica: cannot {what}: an earlier I/O error left the file handle \
                 unusable; restart the applier to reopen it"
            ),
        },
        other => SinkError::Fatal {
            reason: format!("redb replica: cannot {what}: {other}"),
        },
    }
}

fn rejected(index: usize, change: &Change, reason: String) -> SinkError {
    SinkError::Rejected {
        index,
        seq: change.seq,
        table: change.table.clone(),
        key: change.key.clone(),
        reason,
    }
}

fn replica_error(err: impl Into<redb::Error>) -> ReplicaError {
    ReplicaError::Storage {
        reason: err.into().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use jetsync::Value;
    use proptest::prelude::*;

    use super::*;

    const GROUP: &str = "main";

    fn row(pairs: &[(&str, Value)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn upsert(seq: u64, table: &str, key: &str, row: Row) -> Change {
        Change {
            seq,
            table: table.to_owned(),
            key: key.to_owned(),
            op: jetsync::Change::Upsert(row),
        }
    }

    fn delete(seq: u64, table: &str, key: &str) -> Change {
        Change {
            seq,
            table: table.to_owned(),
            key: key.to_owned(),
            op: jetsync::Change::Delete,
        }
    }

    fn product(name: &str, price: f64) -> Row {
        row(&[
            ("name", Value::from(name)),
            ("price", Value::F64(price)),
            ("tags", Value::Json(serde_json::json!(["a", {"b": 1}]))),
            ("blob", Value::Bytes(vec![0, 1, 255])),
            ("gone", Value::Null),
        ])
    }

    fn open(dir: &tempfile::TempDir, audit: bool) -> RedbSink {
        RedbSink::open(RedbOptions {
            path: dir.path().join("nested/dir/instance.redb"),
            audit,
        })
        .expect("open")
    }

    #[tokio::test]
    async fn upsert_get_delete_scan() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(&dir, false);
        let replica = sink.replica();
        assert!(sink.is_empty().await.unwrap());
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(0));
        assert_eq!(replica.get("products", "A-1").unwrap(), None);
        assert_eq!(replica.scan("products").unwrap(), vec![]);

        let batch = [
            upsert(1, "products", "B-2", product("Table", 99.0)),
            upsert(2, "products", "A-1", product("Chair", 12.5)),
            upsert(3, "orders", "1", row(&[("qty", Value::I64(3))])),
            upsert(
                4,
                "products",
                "",
                row(&[("name", Value::from("empty key"))]),
            ),
            upsert(5, "productsX", "A-0", row(&[])),
            upsert(6, "products", "A-1", product("Armchair", 15.0)),
        ];
        sink.apply(GROUP, &batch, 6).await.unwrap();
        assert!(!sink.is_empty().await.unwrap());
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(6));
        assert_eq!(replica.applied_seq(), 6);
        assert_eq!(
            replica.get("products", "A-1").unwrap(),
            Some(product("Armchair", 15.0))
        );
        let keys: Vec<String> = replica
            .scan("products")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["", "A-1", "B-2"]);
        assert_eq!(replica.scan("orders").unwrap().len(), 1);
        assert_eq!(replica.scan("order").unwrap(), vec![]);

        // Deletes remove the key; deleting an absent row is a no-op.
        let batch = [
            delete(7, "products", "A-1"),
            delete(8, "products", "nope"),
            delete(9, "orders", "1"),
        ];
        sink.apply(GROUP, &batch, 10).await.unwrap();
        assert_eq!(replica.get("products", "A-1").unwrap(), None);
        assert_eq!(replica.scan("orders").unwrap(), vec![]);
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(10));
        assert_eq!(replica.applied_seq(), 10);

        // A batch of only skipped events still moves the fence.
        sink.apply(GROUP, &[], 12).await.unwrap();
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(12));
        assert_eq!(sink.fence("other").await.unwrap(), Some(0));
    }

    #[tokio::test]
    async fn get_as_deserializes_rows() {
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Item {
            name: String,
            qty: i64,
        }
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(&dir, false);
        let r = row(&[("name", Value::from("x")), ("qty", Value::I64(2))]);
        sink.apply(GROUP, &[upsert(1, "items", "k", r)], 1)
            .await
            .unwrap();
        let replica = sink.replica();
        let item: Option<Item> = replica.get_as("items", "k").unwrap();
        assert_eq!(
            item,
            Some(Item {
                name: "x".into(),
                qty: 2
            })
        );
        assert!(replica.get_as::<Item>("items", "absent").unwrap().is_none());
        let err = replica.get_as::<u64>("items", "k").unwrap_err();
        assert!(matches!(err, ReplicaError::Deserialize { .. }), "{err}");
    }

    #[tokio::test]
    async fn fence_and_rows_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let mut sink = open(&dir, false);
            sink.apply(GROUP, &[upsert(41, "t", "k", row(&[]))], 42)
                .await
                .unwrap();
            sink.set_fence("second", 7).await.unwrap();
            sink.path().to_owned()
        };
        let mut sink = open(&dir, false);
        assert_eq!(sink.path(), path);
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(42));
        assert_eq!(sink.fence("second").await.unwrap(), Some(7));
        assert_eq!(sink.replica().applied_seq(), 42);
        assert_eq!(sink.replica().get("t", "k").unwrap(), Some(row(&[])));

        // set_fence moves the fence either way without touching rows.
        sink.set_fence(GROUP, 40).await.unwrap();
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(40));
        assert_eq!(sink.replica().applied_seq(), 40);
        assert!(!sink.is_empty().await.unwrap());
    }

    #[tokio::test]
    async fn audit_counts_every_applied_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let mut sink = open(&dir, true);
            let batch = [
                upsert(1, "t", "a", row(&[])),
                upsert(2, "t", "b", row(&[])),
                delete(3, "t", "a"),
            ];
            sink.apply(GROUP, &batch, 3).await.unwrap();
            sink.apply(GROUP, &[upsert(4, "t", "c", row(&[]))], 5)
                .await
                .unwrap();
            let expected: BTreeMap<u64, u64> = [(1, 1), (2, 1), (3, 1), (4, 1)].into();
            assert_eq!(sink.audit_counts().unwrap(), expected);
            // A replayed change (what a broken fence would cause) shows up as a count of 2.
            sink.apply(GROUP, &[upsert(4, "t", "c", row(&[]))], 5)
                .await
                .unwrap();
            assert_eq!(sink.audit_counts().unwrap()[&4], 2);
            // While the sink holds the file, read_audit cannot open it.
            let err = read_audit(sink.path()).unwrap_err();
            assert!(err.to_string().contains("another applier"), "{err}");
            sink.path().to_owned()
        };
        let counts = read_audit(&path).unwrap();
        assert_eq!(counts, [(1, 1), (2, 1), (3, 1), (4, 2)].into());

        // Without audit nothing is counted.
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(&dir, false);
        sink.apply(GROUP, &[upsert(1, "t", "a", row(&[]))], 1)
            .await
            .unwrap();
        assert!(sink.audit_counts().unwrap().is_empty());
        let path = sink.path().to_owned();
        drop(sink);
        assert!(read_audit(&path).unwrap().is_empty());
        assert!(read_audit(&dir.path().join("missing.redb")).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wait_for_resolves_after_apply_from_another_task() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(&dir, false);
        sink.apply(GROUP, &[upsert(1, "t", "a", row(&[]))], 1)
            .await
            .unwrap();
        let replica = sink.replica();
        // Already applied: resolves at once.
        replica.wait_for(1, Duration::ZERO).await.unwrap();

        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let v = row(&[("v", Value::I64(5))]);
            sink.apply(GROUP, &[upsert(5, "t", "b", v)], 5)
                .await
                .unwrap();
            sink
        });
        let r = replica.clone();
        r.wait_for(5, Duration::from_secs(10)).await.unwrap();
        // Read-your-writes: once the wait resolved, the row is there.
        assert_eq!(r.get("t", "b").unwrap(), Some(row(&[("v", Value::I64(5))])));

        let sink = writer.await.unwrap();
        let err = replica
            .wait_for(6, Duration::from_millis(30))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReplicaError::Timeout { seq: 6, applied: 5 }),
            "{err}"
        );

        // The applier stopping ends waits instead of letting them run into the timeout.
        drop(sink);
        let err = replica
            .wait_for(6, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReplicaError::Closed { seq: 6, applied: 5 }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn wait_for_on_current_thread_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(&dir, false);
        let replica = sink.replica();
        let waiter =
            tokio::spawn(async move { replica.wait_for(3, Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        sink.apply(GROUP, &[upsert(3, "t", "a", row(&[]))], 3)
            .await
            .unwrap();
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn digest_is_independent_of_batch_splits() {
        let changes: Vec<Change> = (1..=60u64)
            .map(|seq| {
                let table = ["a", "b", "c"][(seq % 3) as usize];
                let key = format!("k{}", seq % 7);
                if seq.is_multiple_of(5) {
                    delete(seq, table, &key)
                } else {
                    upsert(seq, table, &key, row(&[("v", Value::I64(seq as i64))]))
                }
            })
            .collect();
        let dir1 = tempfile::tempdir().unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let mut one = open(&dir1, false);
        let mut two = open(&dir2, false);
        one.apply(GROUP, &changes, 60).await.unwrap();
        for chunk in changes.chunks(7) {
            two.apply(GROUP, chunk, chunk.last().unwrap().seq)
                .await
                .unwrap();
        }
        let d1 = one.digest().await.unwrap();
        let d2 = two.digest().await.unwrap();
        assert_eq!(d1, d2);
        let tables: Vec<&str> = d1.iter().map(|d| d.table.as_str()).collect();
        assert_eq!(tables, ["a", "b", "c"]);
        for d in &d1 {
            assert_eq!(d.rows, one.replica().scan(&d.table).unwrap().len() as u64);
        }

        // A different content gives a different digest.
        two.apply(GROUP, &[upsert(61, "a", "k0", row(&[]))], 61)
            .await
            .unwrap();
        assert_ne!(one.digest().await.unwrap(), two.digest().await.unwrap());
        let dir3 = tempfile::tempdir().unwrap();
        assert!(open(&dir3, false).digest().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn replace_swaps_the_rows_sets_the_fence_and_audits() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(&dir, true);
        let replica = sink.replica();
        let v = |v: i64| row(&[("v", Value::I64(v))]);
        let before = [
            upsert(1, "a", "k1", v(1)),
            upsert(2, "a", "k2", v(2)),
            upsert(3, "b", "k1", v(3)),
            upsert(4, "c", "k1", v(4)),
        ];
        sink.apply(GROUP, &before, 5).await.unwrap();

        let changes = [
            upsert(2, "a", "k2", v(20)),
            upsert(3, "d", "k", v(3)),
            delete(4, "d", "k"),
            upsert(6, "a", "k9", v(6)),
            delete(7, "c", "absent"),
            upsert(8, "e", "k", v(8)),
            upsert(9, "a", "k9", v(9)),
        ];
        sink.replace(GROUP, &changes, 10).await.unwrap();
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(10));
        assert_eq!(replica.applied_seq(), 10);
        assert_eq!(
            replica.scan("a").unwrap(),
            vec![("k2".to_owned(), v(20)), ("k9".to_owned(), v(9))]
        );
        // Rows absent from the changes are gone, in every table.
        assert_eq!(replica.get("a", "k1").unwrap(), None);
        assert!(replica.scan("b").unwrap().is_empty());
        assert!(replica.scan("c").unwrap().is_empty());
        assert!(replica.scan("d").unwrap().is_empty());
        assert_eq!(replica.scan("e").unwrap().len(), 1);

        // The same state as a fresh sink that applied the same changes.
        let fresh_dir = tempfile::tempdir().unwrap();
        let mut fresh = open(&fresh_dir, false);
        fresh.apply(GROUP, &changes, 10).await.unwrap();
        let digest = sink.digest().await.unwrap();
        assert_eq!(digest, fresh.digest().await.unwrap());
        assert_eq!(
            digest.iter().map(|d| d.table.as_str()).collect::<Vec<_>>(),
            ["a", "e"]
        );

        // The audit counts what the replace applied, like apply does.
        let counts = sink.audit_counts().unwrap();
        let expected: BTreeMap<u64, u64> = [
            (1, 1),
            (2, 2),
            (3, 2),
            (4, 2),
            (6, 1),
            (7, 1),
            (8, 1),
            (9, 1),
        ]
        .into();
        assert_eq!(counts, expected);

        // Survives a reopen; replacing with nothing empties everything and sets the fence.
        drop(replica);
        drop(sink);
        let mut sink = open(&dir, true);
        assert_eq!(sink.digest().await.unwrap(), digest);
        sink.replace(GROUP, &[], 11).await.unwrap();
        assert!(sink.is_empty().await.unwrap());
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(11));
        assert_eq!(sink.replica().applied_seq(), 11);
    }

    #[tokio::test]
    async fn apply_of_lower_sequences_at_the_fence_keeps_the_fence() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(&dir, true);
        let replica = sink.replica();
        sink.apply(GROUP, &[upsert(1, "t", "a", row(&[]))], 10)
            .await
            .unwrap();
        // `parked retry`: events parked earlier (seqs below the fence), applied with the current
        // fence as last_seq.
        let retried = [
            upsert(4, "t", "p", row(&[("v", Value::I64(4))])),
            delete(5, "t", "a"),
        ];
        sink.apply(GROUP, &retried, 10).await.unwrap();
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(10));
        assert_eq!(replica.applied_seq(), 10);
        assert_eq!(replica.get("t", "a").unwrap(), None);
        assert_eq!(
            replica.get("t", "p").unwrap(),
            Some(row(&[("v", Value::I64(4))]))
        );
        assert_eq!(
            sink.audit_counts().unwrap(),
            [(1, 1), (4, 1), (5, 1)].into()
        );
        sink.apply(GROUP, &[upsert(11, "t", "q", row(&[]))], 11)
            .await
            .unwrap();
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(11));
    }

    /// The rows of `changes`, keys k0..kn of table t, sequences from `first`.
    fn many(first: u64, n: usize) -> Vec<Change> {
        (0..n)
            .map(|i| {
                upsert(
                    first + i as u64,
                    "t",
                    &format!("k{i}"),
                    row(&[("v", Value::I64(i as i64))]),
                )
            })
            .collect()
    }

    /// The fence of a copy of the file taken now: what a kill at this moment would leave (the
    /// copy reopens at the last durable commit).
    fn fence_after_a_crash_now(path: &Path) -> u64 {
        let copy_dir = tempfile::tempdir().unwrap();
        let copy = copy_dir.path().join("copy.redb");
        std::fs::copy(path, &copy).unwrap();
        let db = Database::create(&copy).unwrap();
        let txn = db.begin_read().unwrap();
        let offsets = txn.open_table(OFFSETS).unwrap();
        let fence = offsets.get(GROUP).unwrap().map_or(0, |v| v.value());
        fence
    }

    #[tokio::test]
    async fn idle_makes_a_deferred_catch_up_commit_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(&dir, false);
        let path = sink.path().to_owned();
        // The first commit is durable; the next big one within DURABLE_EVERY is deferred.
        sink.apply(GROUP, &many(1, 300), 300).await.unwrap();
        sink.apply(GROUP, &many(301, 300), 600).await.unwrap();
        if !sink.is_durable() {
            assert_eq!(fence_after_a_crash_now(&path), 300);
        }
        sink.idle().await.unwrap();
        assert!(sink.is_durable());
        assert_eq!(fence_after_a_crash_now(&path), 600);
        // Idle with nothing deferred is a no-op.
        sink.idle().await.unwrap();
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(600));
    }

    #[tokio::test]
    async fn streamed_replace_keeps_old_rows_until_commit_and_never_lowers_the_fence() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(&dir, false);
        let replica = sink.replica();
        let v = |v: i64| row(&[("v", Value::I64(v))]);
        sink.apply(GROUP, &[upsert(1, "old", "k", v(1))], 5)
            .await
            .unwrap();
        sink.replace_begin(GROUP).await.unwrap();
        sink.replace_chunk(GROUP, &[upsert(2, "a", "k1", v(2))])
            .await
            .unwrap();
        // Readers still see the old rows while the replacement is open.
        assert_eq!(replica.get("old", "k").unwrap(), Some(v(1)));
        assert_eq!(replica.get("a", "k1").unwrap(), None);
        sink.replace_chunk(
            GROUP,
            &[upsert(3, "a", "k2", v(3)), upsert(4, "a", "k3", v(4))],
        )
        .await
        .unwrap();
        // A commit below the fence keeps the fence (it never decreases).
        sink.replace_commit(GROUP, 4).await.unwrap();
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(5));
        assert_eq!(replica.get("old", "k").unwrap(), None);
        assert_eq!(replica.scan("a").unwrap().len(), 3);
        assert!(sink.is_durable());

        // An abort leaves everything as it was; the sink stays usable.
        sink.replace_begin(GROUP).await.unwrap();
        sink.replace_chunk(GROUP, &[upsert(9, "z", "k", v(9))])
            .await
            .unwrap();
        sink.replace_abort(GROUP).await;
        assert_eq!(replica.scan("a").unwrap().len(), 3);
        assert!(replica.scan("z").unwrap().is_empty());
        sink.apply(GROUP, &[upsert(10, "z", "k", v(10))], 10)
            .await
            .unwrap();
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(10));
        // apply below the fence keeps it; only set_fence (reset --to-seq) rewinds it.
        sink.apply(GROUP, &[upsert(3, "z", "k", v(3))], 3)
            .await
            .unwrap();
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(10));
        sink.set_fence(GROUP, 2).await.unwrap();
        assert_eq!(sink.fence(GROUP).await.unwrap(), Some(2));
    }

    #[cfg(unix)]
    #[test]
    fn a_new_replica_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sink = open(&dir, false);
        let mode = std::fs::metadata(sink.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    #[test]
    fn small_commits_are_durable_big_ones_deferred_for_a_while() {
        let just_now = Some(Instant::now());
        // Keeping up: few changes since the last durable commit → durable at once.
        assert!(durable_now(1, just_now));
        assert!(durable_now(DURABLE_UP_TO, just_now));
        // Catching up: many changes, last durable commit recent → deferred.
        assert!(!durable_now(DURABLE_UP_TO + 1, just_now));
        assert!(!durable_now(10_000, just_now));
        // ... but never for longer than DURABLE_EVERY, and never before a first durable commit.
        let long_ago = Instant::now().checked_sub(DURABLE_EVERY * 2);
        assert!(long_ago.is_some());
        assert!(durable_now(10_000, long_ago));
        assert!(durable_now(10_000, None));
    }

    #[test]
    fn second_open_is_a_clear_fatal_error() {
        let dir = tempfile::tempdir().unwrap();
        let sink = open(&dir, false);
        let err = RedbSink::open(RedbOptions::new(sink.path())).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, SinkError::Fatal { .. }), "{message}");
        assert!(!err.is_retryable());
        assert!(message.contains("instance.redb"), "{message}");
        assert!(
            message.contains("is another applier running for this instance?"),
            "{message}"
        );
        // A replica keeps the file open after the sink is gone.
        let replica = sink.replica();
        drop(sink);
        assert!(RedbSink::open(RedbOptions::new(
            dir.path().join("nested/dir/instance.redb")
        ))
        .is_err());
        drop(replica);
        RedbSink::open(RedbOptions::new(
            dir.path().join("nested/dir/instance.redb"),
        ))
        .unwrap();
    }

    #[test]
    fn unusable_path_is_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"not a directory").unwrap();
        let err = RedbSink::open(RedbOptions::new(file.join("x.redb"))).unwrap_err();
        assert!(matches!(err, SinkError::Fatal { .. }), "{err}");
        assert!(err.to_string().contains("plain-file"), "{err}");

        let garbage = dir.path().join("garbage.redb");
        std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
        let err = RedbSink::open(RedbOptions::new(&garbage)).unwrap_err();
        assert!(matches!(err, SinkError::Fatal { .. }), "{err}");
        assert!(err.to_string().contains("garbage.redb"), "{err}");
    }

    /// One generated operation: `(table, key, Some(value))` upserts, `None` deletes.
    type Op = (u8, u8, Option<i64>);

    fn op_strategy() -> impl Strategy<Value = Op> {
        (
            0u8..3,
            0u8..6,
            proptest::option::weighted(0.7, any::<i64>()),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Random upserts and deletes, applied in random batch splits, end equal to a model where
        /// the last event per key wins.
        #[test]
        fn matches_btreemap_model(
            ops in proptest::collection::vec(op_strategy(), 0..80),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mut sink = open(&dir, true);
            let replica = sink.replica();

            let changes: Vec<Change> = ops
                .iter()
                .enumerate()
                .map(|(i, (t, k, v))| {
                    let seq = i as u64 + 1;
                    let table = format!("t{t}");
                    let key = format!("k{k}");
                    match v {
                        Some(v) => upsert(seq, &table, &key, row(&[("v", Value::I64(*v))])),
                        None => delete(seq, &table, &key),
                    }
                })
                .collect();
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(changes.len() + 1)).collect();
            bounds.push(0);
            bounds.push(changes.len());
            bounds.sort_unstable();
            bounds.dedup();

            let mut model: BTreeMap<(String, String), Row> = BTreeMap::new();
            runtime.block_on(async {
                for pair in bounds.windows(2) {
                    let batch = &changes[pair[0]..pair[1]];
                    sink.apply(GROUP, batch, pair[1] as u64).await.unwrap();
                }
            });
            for change in &changes {
                let id = (change.table.clone(), change.key.clone());
                match &change.op {
                    jetsync::Change::Upsert(r) => { model.insert(id, r.clone()); }
                    jetsync::Change::Delete => { model.remove(&id); }
                }
            }

            for t in 0..3 {
                let table = format!("t{t}");
                let expected: Vec<(String, Row)> = model
                    .iter()
                    .filter(|((mt, _), _)| *mt == table)
                    .map(|((_, k), r)| (k.clone(), r.clone()))
                    .collect();
                prop_assert_eq!(replica.scan(&table).unwrap(), expected);
                for k in 0..6 {
                    let key = format!("k{k}");
                    prop_assert_eq!(
                        replica.get(&table, &key).unwrap(),
                        model.get(&(table.clone(), key.clone())).cloned()
                    );
                }
            }
            let fence = runtime.block_on(sink.fence(GROUP)).unwrap();
            prop_assert_eq!(fence, Some(changes.len() as u64));
            prop_assert_eq!(runtime.block_on(sink.is_empty()).unwrap(), model.is_empty());
            let counts = sink.audit_counts().unwrap();
            prop_assert_eq!(counts.len(), changes.len());
            prop_assert!(counts.values().all(|c| *c == 1));
        }
    }
}
