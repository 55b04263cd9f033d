//! Classifying redb errors for the engine (retry, or an operator must act).

use super::*;

pub(super) fn open_error(path: &Path, err: DatabaseError) -> SinkError {
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
pub(super) fn sink_error(what: &str, err: impl Into<redb::Error>) -> SinkError {
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
