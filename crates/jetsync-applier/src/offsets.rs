//! The applier's checkpoint store: the last applied stream sequence per sync group, in redb.
//!
//! The file is `<data_dir>/<instance>.redb`. It is opened in redb's `SingleWriter` mode so that
//! `jetsync-applier status` can read it (read-only) while `run` holds it for writing, and a
//! second `run` for the same instance is refused instead of corrupting anything. (That mode
//! refuses `Durability::None`: a commit held only in this process's memory would be invisible to
//! `status`. So every commit here is durable, and the engine commits the checkpoint less often
//! instead, see [`Offsets::record`].)
//!
//! Crash windows: a commit is one redb write transaction with `Durability::Immediate`; a kill
//! before it returns leaves the previous checkpoint (redb's commit is atomic). The checkpoint
//! lags the sink's fence: the engine records a sequence here only after the sink committed it.
//! It can lead the fence only after a kill of a sink that defers its own durability (the redb
//! replica's non-durable commits, see `sinks/redb/`), whose fence then falls back to its last
//! durable commit. Either way, at start the engine brings this store to the sink's fence.
//! - With a sink that keeps a fence, the engine [`record`](Offsets::record)s each batch: the
//!   checkpoint is committed at once when the last commit is [`CHECKPOINT_EVERY`] old (or there
//!   was none yet), else kept in memory and committed by the next batch, by [`Offsets::flush`]
//!   (the engine calls it when idle once that much time has passed) or when the store is
//!   dropped (shutdown). A kill loses at most that much of the checkpoint, never data: the
//!   sink's fence is the truth at start. `status` (which reads the file) lags by as much.
//! - With a sink without a fence the checkpoint is the only truth: the engine
//!   [`commit`](Offsets::commit)s every batch at once.
//! - Parked events, the resync marker and the bootstrap marker are always committed at once:
//!   they must be durable before the sink's fence passes them (see `apply.rs`).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use redb::{
    Builder, ConcurrencyMode, Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable,
    TableDefinition,
};

use crate::{
    parked::{ParkedEvent, RowId},
    sinks::redb::blocking,
};

/// How old the last checkpoint commit may get before a recorded checkpoint is committed (see
/// [`Offsets::record`]).
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// group (stream name) → last applied stream sequence.
const APPLIED: TableDefinition<'_, &str, u64> = TableDefinition::new("applied");
/// group (stream name) → number of events applied over the instance's life (a counter for
/// status and metrics, not used for correctness).
const APPLIED_EVENTS: TableDefinition<'_, &str, u64> = TableDefinition::new("applied_events");
/// (group, stream sequence) → parked event (JSON, see `parked.rs`).
const PARKED: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("parked");
/// (group, stream sequence) → the row of the parked event (`table/key`, empty for an event
/// whose subject maps to no row): an index of [`PARKED`] without the bodies, so that the engine
/// rebuilds its set of blocked rows and `status` counts parked events without reading every
/// parked body. Kept in the same transaction as `PARKED`; built from it when a store written
/// before the index existed is opened.
const PARKED_ROWS: TableDefinition<'_, (&str, u64), &str> = TableDefinition::new("parked_rows");
/// group → 1 while a snapshot bootstrap is in progress (a restart resumes it).
const BOOTSTRAP: TableDefinition<'_, &str, u64> = TableDefinition::new("bootstrap");
/// group → target sequence while a snapshot resync is pending: the parked events already
/// describe the snapshot, the sink may not have been replaced yet, so a restart must redo it.
const RESYNC: TableDefinition<'_, &str, u64> = TableDefinition::new("resync");

/// Errors of the checkpoint store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OffsetsError {
    /// Another process holds the file for writing.
    #[error("{path} is in use by another process: is another applier running for this instance? stop it first")]
    InUse {
        /// The redb file.
        path: PathBuf,
    },
    /// The file does not exist (read-only open).
    #[error("{path} does not exist: this instance has never run (or data_dir is wrong)")]
    Missing {
        /// The redb file.
        path: PathBuf,
    },
    /// The store was just created (or holds nothing for the group) while the sink's fence says
    /// events were applied: `data_dir` was lost or points elsewhere, and with it the parked and
    /// held events. Starting would silently forget them.
    #[error("the checkpoint store {path} knows nothing of stream {group}, but the sink ({sink}) has applied up to seq {fence}: data_dir was lost or changed, and with it the parked and held events. Restore {path} from a backup (or fix data_dir), or rebuild this instance with `jetsync-applier resync` (which rebuilds the tables and the parked events from a snapshot), or start over with a new, empty sink")]
    Lost {
        /// The redb file.
        path: PathBuf,
        /// The sync group.
        group: String,
        /// The sink's fence.
        fence: u64,
        /// The sink (its file, or its kind).
        sink: String,
    },
    /// Any other redb failure.
    #[error("checkpoint store {path}: {reason}")]
    Storage {
        /// The redb file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// The writable checkpoint store of one instance.
#[derive(Debug)]
pub struct Offsets {
    db: Database,
    path: PathBuf,
    deferred: Mutex<Deferred>,
}

/// Checkpoints recorded but not committed yet.
#[derive(Debug, Default)]
struct Deferred {
    /// group → (applied sequence, events applied since the last commit, transactions applied
    /// since the last commit).
    groups: BTreeMap<String, (u64, u64, u64)>,
    /// When the checkpoint was last committed by this handle.
    committed_at: Option<Instant>,
}

fn builder() -> Builder {
    let mut b = Builder::new();
    b.set_concurrency_mode(ConcurrencyMode::SingleWriter);
    b
}

impl Offsets {
    /// Opens (creating if needed) the store at `path`. A new file is created readable and
    /// writable by its owner only (mode 0600 on Unix): parked events hold event payloads.
    pub fn open(path: &Path) -> Result<Offsets, OffsetsError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| storage(path, e))?;
        }
        create_private(path).map_err(|e| storage(path, e))?;
        let db = builder().create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => OffsetsError::InUse {
                path: path.to_owned(),
            },
            e => storage(path, e),
        })?;
        let offsets = Offsets {
            db,
            path: path.to_owned(),
            deferred: Mutex::new(Deferred::default()),
        };
        // A store written before the parked-rows index existed gets it built once, here.
        let has_index = {
            let tx = offsets.db.begin_read().map_err(|e| offsets.err(e))?;
            match tx.open_table(PARKED_ROWS) {
                Ok(_) => true,
                Err(redb::TableError::TableDoesNotExist(_)) => false,
                Err(e) => return Err(offsets.err(e)),
            }
        };
        // Create the tables so read-only opens find them.
        let tx = offsets.db.begin_write().map_err(|e| offsets.err(e))?;
        if !has_index {
            let parked = tx.open_table(PARKED).map_err(|e| offsets.err(e))?;
            let mut index = tx.open_table(PARKED_ROWS).map_err(|e| offsets.err(e))?;
            for entry in parked.iter().map_err(|e| offsets.err(e))? {
                let (key, value) = entry.map_err(|e| offsets.err(e))?;
                let (group, seq) = key.value();
                let event = ParkedEvent::from_bytes(value.value()).map_err(|e| offsets.err(e))?;
                index
                    .insert((group, seq), row_key(&event).as_str())
                    .map_err(|e| offsets.err(e))?;
            }
        }
        tx.open_table(PARKED_ROWS).map_err(|e| offsets.err(e))?;
        tx.open_table(APPLIED).map_err(|e| offsets.err(e))?;
        tx.open_table(APPLIED_EVENTS).map_err(|e| offsets.err(e))?;
        tx.open_table(PARKED).map_err(|e| offsets.err(e))?;
        tx.open_table(BOOTSTRAP).map_err(|e| offsets.err(e))?;
        tx.open_table(RESYNC).map_err(|e| offsets.err(e))?;
        tx.commit().map_err(|e| offsets.err(e))?;
        Ok(offsets)
    }

    /// Whether this store knows `group`: an applied sequence (even 0), a parked event or a
    /// pending bootstrap or resync. A store that does not, beside a sink whose fence is above 0,
    /// is a lost `data_dir` ([`OffsetsError::Lost`]). The engine records the applied sequence at
    /// start before the sink can commit anything, so a store that was used always knows it.
    pub fn knows(&self, group: &str) -> Result<bool, OffsetsError> {
        if self.deferred().groups.contains_key(group) {
            return Ok(true);
        }
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        for def in [APPLIED, BOOTSTRAP, RESYNC] {
            let table = tx.open_table(def).map_err(|e| self.err(e))?;
            if table.get(group).map_err(|e| self.err(e))?.is_some() {
                return Ok(true);
            }
        }
        let parked = tx.open_table(PARKED).map_err(|e| self.err(e))?;
        Ok(count_parked(&parked, group).map_err(|e| self.err(e))? > 0)
    }

    fn err(&self, e: impl std::fmt::Display) -> OffsetsError {
        storage(&self.path, e)
    }

    /// The last applied sequence of `group` (0 when nothing was ever applied), including a
    /// recorded checkpoint not committed yet.
    pub fn applied(&self, group: &str) -> Result<u64, OffsetsError> {
        if let Some(&(seq, _, _)) = self.deferred().groups.get(group) {
            return Ok(seq);
        }
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(APPLIED).map_err(|e| self.err(e))?;
        let value = table.get(group).map_err(|e| self.err(e))?;
        Ok(value.map(|v| v.value()).unwrap_or(0))
    }

    /// Events applied over the instance's life (including recorded, uncommitted ones).
    pub fn applied_events(&self, group: &str) -> Result<u64, OffsetsError> {
        let pending = self.deferred().groups.get(group).map_or(0, |&(_, n, _)| n);
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(APPLIED_EVENTS).map_err(|e| self.err(e))?;
        let value = table.get(group).map_err(|e| self.err(e))?;
        Ok(value.map(|v| v.value()).unwrap_or(0) + pending)
    }

    fn deferred(&self) -> std::sync::MutexGuard<'_, Deferred> {
        // The lock is never held across a panic that matters: the data is plain numbers.
        self.deferred.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Durably records that everything of `group` up to `seq` is applied, adding `events` to
    /// the applied-events counter (and committing what [`record`](Self::record) kept for
    /// `group`).
    pub fn commit(&self, group: &str, seq: u64, events: u64) -> Result<(), OffsetsError> {
        self.commit_counting(group, seq, events, 0)
    }

    /// [`commit`](Self::commit), also adding `txns` to the applied-transactions counter.
    pub fn commit_counting(
        &self,
        group: &str,
        seq: u64,
        events: u64,
        txns: u64,
    ) -> Result<(), OffsetsError> {
        let mut deferred = self.deferred();
        let mut batch = deferred.groups.clone();
        let entry = batch.entry(group.to_owned()).or_insert((seq, 0, 0));
        *entry = (seq, entry.1 + events, entry.2 + txns);
        blocking(|| self.write_checkpoints(&batch))?;
        deferred.groups.clear();
        deferred.committed_at = Some(Instant::now());
        Ok(())
    }

    /// Records that everything of `group` up to `seq` is applied (`events` more events), for a
    /// sink whose fence is the truth at start: committed at once when the last commit is
    /// `CHECKPOINT_EVERY` (200 ms) old or there was none yet (returns true), else kept until the next
    /// commit, [`flush`](Self::flush) or drop (returns false).
    pub fn record(&self, group: &str, seq: u64, events: u64) -> Result<bool, OffsetsError> {
        self.record_counting(group, seq, events, 0)
    }

    /// [`record`](Self::record), also adding `txns` to the applied-transactions counter.
    pub fn record_counting(
        &self,
        group: &str,
        seq: u64,
        events: u64,
        txns: u64,
    ) -> Result<bool, OffsetsError> {
        let due = {
            let mut deferred = self.deferred();
            let entry = deferred
                .groups
                .entry(group.to_owned())
                .or_insert((seq, 0, 0));
            entry.0 = seq;
            entry.1 += events;
            entry.2 += txns;
            deferred
                .committed_at
                .is_none_or(|at| at.elapsed() >= CHECKPOINT_EVERY)
        };
        if due {
            self.flush()?;
        }
        Ok(due)
    }

    /// When the recorded, uncommitted checkpoint should be committed (`None`: nothing waits).
    pub fn flush_due(&self) -> Option<Instant> {
        let deferred = self.deferred();
        if deferred.groups.is_empty() {
            return None;
        }
        Some(
            deferred
                .committed_at
                .map_or_else(Instant::now, |at| at + CHECKPOINT_EVERY),
        )
    }

    /// Commits the recorded checkpoints now (nothing to do when there are none).
    pub fn flush(&self) -> Result<(), OffsetsError> {
        self.flush_with(|write| blocking(write))
    }

    /// [`flush`](Self::flush), running the commit (which waits for an fsync) through `run`.
    fn flush_with(
        &self,
        run: impl FnOnce(&dyn Fn() -> Result<(), OffsetsError>) -> Result<(), OffsetsError>,
    ) -> Result<(), OffsetsError> {
        let mut deferred = self.deferred();
        if deferred.groups.is_empty() {
            return Ok(());
        }
        let batch = &deferred.groups;
        run(&|| self.write_checkpoints(batch))?;
        deferred.groups.clear();
        deferred.committed_at = Some(Instant::now());
        Ok(())
    }

    /// One durable transaction setting the applied sequence and adding to the counter of every
    /// group in `batch`.
    fn write_checkpoints(
        &self,
        batch: &BTreeMap<String, (u64, u64, u64)>,
    ) -> Result<(), OffsetsError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut applied = tx.open_table(APPLIED).map_err(|e| self.err(e))?;
            let mut counter = tx.open_table(APPLIED_EVENTS).map_err(|e| self.err(e))?;
            for (group, &(seq, events, txns)) in batch {
                applied
                    .insert(group.as_str(), seq)
                    .map_err(|e| self.err(e))?;
                // Stream names have no `/`: the transactions counter shares the table.
                let txns_key = transactions_key(group);
                for (key, add) in [(group.as_str(), events), (txns_key.as_str(), txns)] {
                    if add == 0 && key != group.as_str() {
                        continue;
                    }
                    let old = counter
                        .get(key)
                        .map_err(|e| self.err(e))?
                        .map(|v| v.value())
                        .unwrap_or(0);
                    counter.insert(key, old + add).map_err(|e| self.err(e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Sets the applied sequence of `group` to `seq` (used at start to follow the sink's fence,
    /// and by `reset --to-seq`).
    pub fn set(&self, group: &str, seq: u64) -> Result<(), OffsetsError> {
        self.commit(group, seq, 0)
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durably parks `events` of `group` (an event parked again under the same sequence is
    /// overwritten, so re-parking after a crash is harmless).
    pub fn park(&self, group: &str, events: &[ParkedEvent]) -> Result<(), OffsetsError> {
        if events.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut parked = tx.open_table(PARKED).map_err(|e| self.err(e))?;
            let mut index = tx.open_table(PARKED_ROWS).map_err(|e| self.err(e))?;
            for event in events {
                parked
                    .insert((group, event.seq), event.to_bytes().as_slice())
                    .map_err(|e| self.err(e))?;
                index
                    .insert((group, event.seq), row_key(event).as_str())
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// The rows of `group` with parked events → the sequence of each one's first parked
    /// event: the rows the engine holds. Read from the index, without the parked bodies.
    pub(crate) fn blocked_rows(&self, group: &str) -> Result<HashMap<RowId, u64>, OffsetsError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let index = tx.open_table(PARKED_ROWS).map_err(|e| self.err(e))?;
        let mut blocked = HashMap::new();
        for entry in index
            .range((group, 0)..=(group, u64::MAX))
            .map_err(|e| self.err(e))?
        {
            let (key, row) = entry.map_err(|e| self.err(e))?;
            if let Ok(row) = row.value().parse::<RowId>() {
                blocked.entry(row).or_insert(key.value().1);
            }
        }
        Ok(blocked)
    }

    /// The parked event of `group` at `seq`, if any.
    pub(crate) fn parked_event(
        &self,
        group: &str,
        seq: u64,
    ) -> Result<Option<ParkedEvent>, OffsetsError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(PARKED).map_err(|e| self.err(e))?;
        let value = table.get((group, seq)).map_err(|e| self.err(e))?;
        value
            .map(|v| ParkedEvent::from_bytes(v.value()).map_err(|e| self.err(e)))
            .transpose()
    }

    /// The parked events of `group`, in sequence order.
    pub fn parked(&self, group: &str) -> Result<Vec<ParkedEvent>, OffsetsError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(PARKED).map_err(|e| self.err(e))?;
        collect_parked(&table, group).map_err(|e| self.err(e))
    }

    /// How many events of `group` are parked (counted in the index, bodies not read).
    pub fn parked_count(&self, group: &str) -> Result<u64, OffsetsError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(PARKED_ROWS).map_err(|e| self.err(e))?;
        count_parked(&table, group).map_err(|e| self.err(e))
    }

    /// Removes the parked events of `group` with the given sequences.
    pub fn unpark(&self, group: &str, seqs: &[u64]) -> Result<(), OffsetsError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut parked = tx.open_table(PARKED).map_err(|e| self.err(e))?;
            let mut index = tx.open_table(PARKED_ROWS).map_err(|e| self.err(e))?;
            for &seq in seqs {
                parked.remove((group, seq)).map_err(|e| self.err(e))?;
                index.remove((group, seq)).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Starts a snapshot resync of `group` towards `target`: the parked events are replaced by
    /// `parks` (those of the snapshot) and the resync is marked pending, in one transaction.
    /// Until [`finish_resync`](Self::finish_resync) runs, a restart must redo the resync.
    pub fn begin_resync(
        &self,
        group: &str,
        target: u64,
        parks: &[ParkedEvent],
    ) -> Result<(), OffsetsError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut parked = tx.open_table(PARKED).map_err(|e| self.err(e))?;
            let mut index = tx.open_table(PARKED_ROWS).map_err(|e| self.err(e))?;
            let mut old: Vec<u64> = Vec::new();
            for entry in index
                .range((group, 0)..=(group, u64::MAX))
                .map_err(|e| self.err(e))?
            {
                old.push(entry.map_err(|e| self.err(e))?.0.value().1);
            }
            for seq in old {
                parked.remove((group, seq)).map_err(|e| self.err(e))?;
                index.remove((group, seq)).map_err(|e| self.err(e))?;
            }
            for event in parks {
                parked
                    .insert((group, event.seq), event.to_bytes().as_slice())
                    .map_err(|e| self.err(e))?;
                index
                    .insert((group, event.seq), row_key(event).as_str())
                    .map_err(|e| self.err(e))?;
            }
            let mut resync = tx.open_table(RESYNC).map_err(|e| self.err(e))?;
            resync.insert(group, target).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Starts (or starts over) a streamed snapshot resync of `group` towards about `target`:
    /// every parked event of `group` is removed (the snapshot's own are parked chunk by chunk
    /// with [`park`](Self::park) before the sink sees the chunk) and the resync is marked
    /// pending, in one transaction. Until [`finish_resync`](Self::finish_resync) runs, a restart
    /// must redo the resync: the parked events no longer describe the sink's contents.
    pub fn start_resync(&self, group: &str, target: u64) -> Result<(), OffsetsError> {
        self.begin_resync(group, target, &[])
    }

    /// Ends a resync: the sink was replaced up to `seq` (`events` applied). A bootstrap that
    /// was in progress is over too (the tables were rebuilt from a whole snapshot).
    pub fn finish_resync(&self, group: &str, seq: u64, events: u64) -> Result<(), OffsetsError> {
        self.finish_resync_counting(group, seq, events, 0)
    }

    /// [`finish_resync`](Self::finish_resync), also counting `txns` applied transactions.
    pub fn finish_resync_counting(
        &self,
        group: &str,
        seq: u64,
        events: u64,
        txns: u64,
    ) -> Result<(), OffsetsError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut resync = tx.open_table(RESYNC).map_err(|e| self.err(e))?;
            resync.remove(group).map_err(|e| self.err(e))?;
            let mut bootstrap = tx.open_table(BOOTSTRAP).map_err(|e| self.err(e))?;
            bootstrap.remove(group).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        self.commit_counting(group, seq, events, txns)
    }

    /// The target of a resync of `group` that was started but not finished, if any.
    pub fn resync_pending(&self, group: &str) -> Result<Option<u64>, OffsetsError> {
        self.marker(RESYNC, group)
    }

    /// Whether a snapshot bootstrap of `group` was started and not finished.
    pub fn bootstrapping(&self, group: &str) -> Result<bool, OffsetsError> {
        Ok(self.marker(BOOTSTRAP, group)?.is_some())
    }

    /// Marks a snapshot bootstrap of `group` as started (`true`) or finished (`false`).
    pub fn set_bootstrapping(&self, group: &str, on: bool) -> Result<(), OffsetsError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(BOOTSTRAP).map_err(|e| self.err(e))?;
            if on {
                table.insert(group, 1).map_err(|e| self.err(e))?;
            } else {
                table.remove(group).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn marker(
        &self,
        def: TableDefinition<'_, &str, u64>,
        group: &str,
    ) -> Result<Option<u64>, OffsetsError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(def).map_err(|e| self.err(e))?;
        let value = table.get(group).map_err(|e| self.err(e))?;
        Ok(value.map(|v| v.value()))
    }
}

impl Drop for Offsets {
    /// Commits a recorded checkpoint on the way out (shutdown, or an engine error), so that a
    /// stopped applier's file is exact.
    fn drop(&mut self) {
        // Inline: a drop may run where handing the thread over is not allowed.
        if let Err(e) = self.flush_with(|write| write()) {
            tracing::warn!(error = %e, "could not commit the last checkpoint on the way out; the sink's fence restores it at start");
        }
    }
}

/// The index value of a parked event's row: `table/key`, or empty without a row.
fn row_key(event: &ParkedEvent) -> String {
    event.row.as_ref().map(RowId::to_string).unwrap_or_default()
}

fn count_parked<V: redb::Value + 'static>(
    table: &impl ReadableTable<(&'static str, u64), V>,
    group: &str,
) -> Result<u64, String> {
    let range = table
        .range((group, 0)..=(group, u64::MAX))
        .map_err(|e| e.to_string())?;
    Ok(range.count() as u64)
}

fn collect_parked(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    group: &str,
) -> Result<Vec<ParkedEvent>, String> {
    let mut out = Vec::new();
    let range = table
        .range((group, 0)..=(group, u64::MAX))
        .map_err(|e| e.to_string())?;
    for entry in range {
        let (_, value) = entry.map_err(|e| e.to_string())?;
        out.push(ParkedEvent::from_bytes(value.value())?);
    }
    Ok(out)
}

/// What a read-only look at a checkpoint store shows (`status` while `run` is running).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Last applied sequence.
    pub applied: u64,
    /// Events applied over the instance's life.
    pub applied_events: u64,
    /// Events currently parked.
    pub parked: u64,
    /// Transactions (atomic batches) applied over the instance's life.
    pub transactions_applied: u64,
}

/// The key of a group's applied-transactions counter in the counters table.
fn transactions_key(group: &str) -> String {
    format!("{group}/transactions")
}

/// Reads the checkpoint of `group` without taking the write lock; works while an applier runs.
pub fn read_checkpoint(path: &Path, group: &str) -> Result<Checkpoint, OffsetsError> {
    if !path.exists() {
        return Err(OffsetsError::Missing {
            path: path.to_owned(),
        });
    }
    let db: ReadOnlyDatabase = builder()
        .open_read_only(path)
        .map_err(|e| storage(path, e))?;
    let tx = db.begin_read().map_err(|e| storage(path, e))?;
    let read = |def: TableDefinition<'_, &str, u64>| -> Result<u64, OffsetsError> {
        match tx.open_table(def) {
            Ok(table) => Ok(table
                .get(group)
                .map_err(|e| storage(path, e))?
                .map(|v| v.value())
                .unwrap_or(0)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(storage(path, e)),
        }
    };
    let parked = match tx.open_table(PARKED_ROWS) {
        Ok(table) => count_parked(&table, group).map_err(|e| storage(path, e))?,
        // A store written before the index existed (and not opened for writing since).
        Err(redb::TableError::TableDoesNotExist(_)) => match tx.open_table(PARKED) {
            Ok(table) => count_parked(&table, group).map_err(|e| storage(path, e))?,
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(storage(path, e)),
        },
        Err(e) => return Err(storage(path, e)),
    };
    Ok(Checkpoint {
        applied: read(APPLIED)?,
        applied_events: read(APPLIED_EVENTS)?,
        transactions_applied: {
            let key = transactions_key(group);
            match tx.open_table(APPLIED_EVENTS) {
                Ok(table) => table
                    .get(key.as_str())
                    .map_err(|e| storage(path, e))?
                    .map(|v| v.value())
                    .unwrap_or(0),
                Err(_) => 0,
            }
        },
        parked,
    })
}

/// Reads the parked events of `group` without taking the write lock (`parked list` while the
/// applier runs).
pub fn read_parked(path: &Path, group: &str) -> Result<Vec<ParkedEvent>, OffsetsError> {
    if !path.exists() {
        return Err(OffsetsError::Missing {
            path: path.to_owned(),
        });
    }
    let db: ReadOnlyDatabase = builder()
        .open_read_only(path)
        .map_err(|e| storage(path, e))?;
    let tx = db.begin_read().map_err(|e| storage(path, e))?;
    match tx.open_table(PARKED) {
        Ok(table) => collect_parked(&table, group).map_err(|e| storage(path, e)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
        Err(e) => Err(storage(path, e)),
    }
}

/// Creates `path` empty with mode 0600 (owner only) on Unix when it does not exist yet, so that
/// redb never creates it with the umask's wider default. An existing file is left alone.
pub(crate) fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn storage(path: &Path, e: impl std::fmt::Display) -> OffsetsError {
    OffsetsError::Storage {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_survives_reopen_and_is_readable_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.redb");
        let offsets = Offsets::open(&path).unwrap();
        assert_eq!(offsets.applied("G").unwrap(), 0);
        offsets.commit("G", 10, 7).unwrap();
        offsets.commit("G", 15, 3).unwrap();
        // A reader in another handle sees the committed checkpoint while the writer is open.
        let seen = read_checkpoint(&path, "G").unwrap();
        assert_eq!(
            seen,
            Checkpoint {
                applied: 15,
                applied_events: 10,
                parked: 0,
                transactions_applied: 0,
            }
        );
        // A second writer is refused with a clear error.
        assert!(matches!(
            Offsets::open(&path),
            Err(OffsetsError::InUse { .. })
        ));
        drop(offsets);
        let offsets = Offsets::open(&path).unwrap();
        assert_eq!(offsets.applied("G").unwrap(), 15);
        offsets.set("G", 4).unwrap();
        assert_eq!(offsets.applied("G").unwrap(), 4);
        assert_eq!(offsets.applied("other").unwrap(), 0);
    }

    #[test]
    fn recorded_checkpoints_are_committed_lazily_and_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.redb");
        let offsets = Offsets::open(&path).unwrap();
        // The first record commits at once (nothing committed by this handle yet) ...
        assert!(offsets.record("G", 10, 10).unwrap());
        assert_eq!(read_checkpoint(&path, "G").unwrap().applied, 10);
        // ... the next ones within CHECKPOINT_EVERY wait, but this handle sees them.
        assert!(!offsets.record("G", 20, 5).unwrap());
        assert!(!offsets.record("G", 25, 1).unwrap());
        assert_eq!(offsets.applied("G").unwrap(), 25);
        assert_eq!(offsets.applied_events("G").unwrap(), 16);
        assert_eq!(read_checkpoint(&path, "G").unwrap().applied, 10);
        assert!(offsets.flush_due().is_some());
        offsets.flush().unwrap();
        assert_eq!(offsets.flush_due(), None);
        let seen = read_checkpoint(&path, "G").unwrap();
        assert_eq!((seen.applied, seen.applied_events), (25, 16));
        // A durable commit takes what was recorded along; drop commits the rest.
        assert!(!offsets.record("G", 30, 4).unwrap());
        offsets.commit("G", 31, 1).unwrap();
        let seen = read_checkpoint(&path, "G").unwrap();
        assert_eq!((seen.applied, seen.applied_events), (31, 21));
        assert!(!offsets.record("G", 40, 9).unwrap());
        drop(offsets);
        let seen = read_checkpoint(&path, "G").unwrap();
        assert_eq!((seen.applied, seen.applied_events), (40, 30));
    }

    fn event(seq: u64, row: Option<&str>, held_behind: Option<u64>) -> ParkedEvent {
        ParkedEvent {
            seq,
            subject: format!("g.{}", row.unwrap_or("x").replace('/', ".")),
            row: row.map(|r| r.parse().unwrap()),
            format: None,
            msg_id: None,
            payload: vec![0; 1000],
            error: "e".into(),
            held_behind,
            parked_at_ms: 1,
            raw_headers: None,
            txn: None,
        }
    }

    #[test]
    fn blocked_rows_come_from_the_index_and_follow_park_and_unpark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.redb");
        let offsets = Offsets::open(&path).unwrap();
        offsets
            .park(
                "G",
                &[
                    event(5, Some("items/a"), None),
                    event(7, None, None),
                    event(9, Some("items/a"), Some(5)),
                    event(11, Some("items/b/c"), None),
                ],
            )
            .unwrap();
        offsets
            .park("H", &[event(1, Some("items/z"), None)])
            .unwrap();
        let blocked = offsets.blocked_rows("G").unwrap();
        let want: HashMap<RowId, u64> = [
            ("items/a".parse().unwrap(), 5),
            ("items/b/c".parse().unwrap(), 11),
        ]
        .into();
        assert_eq!(blocked, want);
        assert_eq!(offsets.parked_count("G").unwrap(), 4);
        assert_eq!(read_checkpoint(&path, "G").unwrap().parked, 4);
        assert_eq!(offsets.parked_event("G", 7).unwrap().unwrap().seq, 7);
        assert_eq!(offsets.parked_event("G", 8).unwrap(), None);
        // Re-parking under the same sequence overwrites; unparking the head moves the row's
        // first parked sequence to the next one.
        offsets
            .park("G", &[event(5, Some("items/a"), None)])
            .unwrap();
        assert_eq!(offsets.parked_count("G").unwrap(), 4);
        offsets.unpark("G", &[5, 11]).unwrap();
        let blocked = offsets.blocked_rows("G").unwrap();
        assert_eq!(blocked, [("items/a".parse().unwrap(), 9)].into());
        // A resync replaces the group's parked events and their index.
        offsets
            .begin_resync("G", 20, &[event(15, Some("items/q"), None)])
            .unwrap();
        assert_eq!(
            offsets.blocked_rows("G").unwrap(),
            [("items/q".parse().unwrap(), 15)].into()
        );
        assert_eq!(offsets.parked_count("G").unwrap(), 1);
        assert_eq!(offsets.parked_count("H").unwrap(), 1);
    }

    #[test]
    fn a_store_without_the_index_gets_it_built_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.redb");
        {
            // A store as written before the index existed: parked events only.
            let db = builder().create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut parked = tx.open_table(PARKED).unwrap();
                for e in [event(3, Some("items/a"), None), event(4, None, None)] {
                    parked
                        .insert(("G", e.seq), e.to_bytes().as_slice())
                        .unwrap();
                }
            }
            tx.commit().unwrap();
        }
        assert_eq!(read_checkpoint(&path, "G").unwrap().parked, 2);
        let offsets = Offsets::open(&path).unwrap();
        assert_eq!(
            offsets.blocked_rows("G").unwrap(),
            [("items/a".parse().unwrap(), 3)].into()
        );
        assert_eq!(offsets.parked_count("G").unwrap(), 2);
    }

    #[cfg(unix)]
    #[test]
    fn a_new_store_is_private_and_knows_no_group() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.redb");
        let offsets = Offsets::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(!offsets.knows("G").unwrap());
        offsets.set("G", 0).unwrap();
        assert!(offsets.knows("G").unwrap());
        assert!(!offsets.knows("H").unwrap());
        offsets.set_bootstrapping("H", true).unwrap();
        assert!(offsets.knows("H").unwrap());
        // finish_resync ends a bootstrap too.
        offsets.start_resync("H", 9).unwrap();
        assert_eq!(offsets.resync_pending("H").unwrap(), Some(9));
        offsets.finish_resync("H", 9, 1).unwrap();
        assert_eq!(offsets.resync_pending("H").unwrap(), None);
        assert!(!offsets.bootstrapping("H").unwrap());
        drop(offsets);
        // Reopening an existing file keeps it (and its mode).
        let offsets = Offsets::open(&path).unwrap();
        assert!(offsets.knows("G").unwrap());
    }

    #[test]
    fn missing_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_checkpoint(&dir.path().join("nope.redb"), "G"),
            Err(OffsetsError::Missing { .. })
        ));
    }
}
