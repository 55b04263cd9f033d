//! The applier's checkpoint store: the last applied stream sequence per sync group, in redb.
//!
//! The file is `<data_dir>/<instance>.redb`. It is opened in redb's `SingleWriter` mode so that
//! `jetsync-applier status` can read it (read-only) while `run` holds it for writing, and a
//! second `run` for the same instance is refused instead of corrupting anything.
//!
//! Crash windows: a commit is one redb write transaction with `Durability::Immediate`; a kill
//! before it returns leaves the previous checkpoint (redb's commit is atomic). The checkpoint may
//! therefore lag the sink's fence by one batch, never lead it: the engine commits here only after
//! the sink committed, and at start it brings this store to the sink's fence.

use std::path::{Path, PathBuf};

use redb::{
    Builder, ConcurrencyMode, Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable,
    TableDefinition,
};

/// group (stream name) → last applied stream sequence.
const APPLIED: TableDefinition<'_, &str, u64> = TableDefinition::new("applied");
/// group (stream name) → number of events applied over the instance's life (a counter for
/// status and metrics, not used for correctness).
const APPLIED_EVENTS: TableDefinition<'_, &str, u64> = TableDefinition::new("applied_events");

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
}

fn builder() -> Builder {
    let mut b = Builder::new();
    b.set_concurrency_mode(ConcurrencyMode::SingleWriter);
    b
}

impl Offsets {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Offsets, OffsetsError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| storage(path, e))?;
        }
        let db = builder().create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => OffsetsError::InUse {
                path: path.to_owned(),
            },
            e => storage(path, e),
        })?;
        let offsets = Offsets {
            db,
            path: path.to_owned(),
        };
        // Create the tables so read-only opens find them.
        let tx = offsets.db.begin_write().map_err(|e| offsets.err(e))?;
        tx.open_table(APPLIED).map_err(|e| offsets.err(e))?;
        tx.open_table(APPLIED_EVENTS).map_err(|e| offsets.err(e))?;
        tx.commit().map_err(|e| offsets.err(e))?;
        Ok(offsets)
    }

    fn err(&self, e: impl std::fmt::Display) -> OffsetsError {
        storage(&self.path, e)
    }

    /// The last applied sequence of `group` (0 when nothing was ever applied).
    pub fn applied(&self, group: &str) -> Result<u64, OffsetsError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(APPLIED).map_err(|e| self.err(e))?;
        let value = table.get(group).map_err(|e| self.err(e))?;
        Ok(value.map(|v| v.value()).unwrap_or(0))
    }

    /// Events applied over the instance's life.
    pub fn applied_events(&self, group: &str) -> Result<u64, OffsetsError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(APPLIED_EVENTS).map_err(|e| self.err(e))?;
        let value = table.get(group).map_err(|e| self.err(e))?;
        Ok(value.map(|v| v.value()).unwrap_or(0))
    }

    /// Durably records that everything of `group` up to `seq` is applied, adding `events` to
    /// the applied-events counter.
    pub fn commit(&self, group: &str, seq: u64, events: u64) -> Result<(), OffsetsError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut applied = tx.open_table(APPLIED).map_err(|e| self.err(e))?;
            applied.insert(group, seq).map_err(|e| self.err(e))?;
            let mut counter = tx.open_table(APPLIED_EVENTS).map_err(|e| self.err(e))?;
            let old = counter
                .get(group)
                .map_err(|e| self.err(e))?
                .map(|v| v.value())
                .unwrap_or(0);
            counter
                .insert(group, old + events)
                .map_err(|e| self.err(e))?;
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
}

/// What a read-only look at a checkpoint store shows (`status` while `run` is running).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Last applied sequence.
    pub applied: u64,
    /// Events applied over the instance's life.
    pub applied_events: u64,
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
    Ok(Checkpoint {
        applied: read(APPLIED)?,
        applied_events: read(APPLIED_EVENTS)?,
    })
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
                applied_events: 10
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
    fn missing_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_checkpoint(&dir.path().join("nope.redb"), "G"),
            Err(OffsetsError::Missing { .. })
        ));
    }
}
