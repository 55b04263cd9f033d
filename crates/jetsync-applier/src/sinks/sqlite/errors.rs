//! Classifying SQLite failures by their cause.
//!
//! A failure of the whole sink (the file is busy, locked, unwritable, full, damaged, or memory
//! ran out) is [`SinkError::Unavailable`]: nothing was applied, and the engine retries the same
//! batch with backoff until an operator fixes the file. Any other failure while applying one
//! change is caused by that change's content (a constraint or type violation, a value too big,
//! too many columns, a table without a usable key, a view) and is [`SinkError::Rejected`] with
//! the change's index: the engine parks that event and applies the rest. What an event contains
//! therefore never stops the applier; [`SinkError::Fatal`] is kept for failures outside any
//! change (opening the file, the fence table).

use std::path::Path;

use rusqlite::ffi::ErrorCode;

use crate::{Change, SinkError};

/// What went wrong inside the sink, before it is attributed to a change or an operation.
#[derive(Debug)]
pub(super) enum Error {
    /// SQLite failed; classified by its result code.
    Sql(rusqlite::Error),
    /// The change itself is unacceptable (bad key, bad column name, a table it may not write).
    Reject(String),
    /// The database cannot be used as it is; an operator must act.
    Fatal(String),
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Sql(e)
    }
}

impl Error {
    /// An error of the sink's own bookkeeping (fence, table registry) met while applying a
    /// change: a failure of the whole sink stays retryable, anything else is not the change's
    /// fault and must not park it, so it is fatal.
    pub(super) fn own(what: &str, e: rusqlite::Error) -> Error {
        if is_sink_failure(&e) {
            Error::Sql(e)
        } else {
            Error::Fatal(format!("cannot {what}: {e}"))
        }
    }
}

/// Whether `e` is a failure of the whole database rather than of one statement's data.
pub(super) fn is_sink_failure(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
                | ErrorCode::PermissionDenied
                | ErrorCode::DatabaseCorrupt
                | ErrorCode::NotADatabase
                | ErrorCode::OutOfMemory
                | ErrorCode::FileLockingProtocolFailed
                | ErrorCode::NoLargeFileSupport
                | ErrorCode::SchemaChanged
                | ErrorCode::OperationInterrupted
                | ErrorCode::OperationAborted
        )
    )
}

/// What an operator should do about a failure of the whole database.
fn advice(e: &rusqlite::Error) -> &'static str {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            "another connection holds the database; the applier retries"
        }
        Some(ErrorCode::DiskFull) => "free disk space; the applier retries",
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            "the file is damaged or not an SQLite database: stop the applier, move the file \
             away and restart it so that it rebuilds the file from a snapshot"
        }
        Some(
            ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied
            | ErrorCode::CannotOpen
            | ErrorCode::NoLargeFileSupport,
        ) => {
            "make the file, its -wal/-shm files and its directory writable by the applier \
             (and no `PRAGMA query_only`); the applier retries"
        }
        Some(ErrorCode::SystemIoFailure | ErrorCode::FileLockingProtocolFailed) => {
            "check the disk and the file system; the applier retries"
        }
        _ => "the applier retries",
    }
}

/// Turns an internal error into the trait's error. `what` says what the sink was doing;
/// `change` is the change being applied (and its index in the batch), if any.
pub(super) fn sink_error(
    path: &Path,
    what: &str,
    e: Error,
    change: Option<(usize, &Change)>,
) -> SinkError {
    let rejected = |index: usize, change: &Change, reason: String| SinkError::Rejected {
        index,
        seq: change.seq,
        table: change.table.clone(),
        key: change.key.clone(),
        reason,
    };
    match (e, change) {
        (Error::Sql(e), _) if is_sink_failure(&e) => SinkError::Unavailable {
            reason: format!("cannot {what} {}: {e}; {}", path.display(), advice(&e)),
        },
        (Error::Sql(e), Some((index, change))) => rejected(index, change, e.to_string()),
        (Error::Reject(reason), Some((index, change))) => rejected(index, change, reason),
        (Error::Sql(e), None) => SinkError::Fatal {
            reason: format!(
                "cannot {what} {}: {e}; inspect the file with the sqlite3 shell and fix it, \
                 then restart the applier",
                path.display()
            ),
        },
        (Error::Reject(reason) | Error::Fatal(reason), _) => SinkError::Fatal {
            reason: format!("cannot {what} {}: {reason}", path.display()),
        },
    }
}
