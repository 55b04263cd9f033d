//! The read handle a service uses on the redb replica: [`Replica`].

use super::*;

/// Read access to the rows of a [`RedbSink`], for the service that embeds the applier.
///
/// Cheap to clone (an `Arc` and a watch receiver); every read is its own redb read transaction,
/// so it sees the state of the last committed batch and never a half-applied one.
#[derive(Clone)]
pub struct Replica {
    pub(super) db: Arc<Database>,
    pub(super) applied: watch::Receiver<u64>,
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

pub(super) fn replica_error(err: impl Into<redb::Error>) -> ReplicaError {
    ReplicaError::Storage {
        reason: err.into().to_string(),
    }
}
