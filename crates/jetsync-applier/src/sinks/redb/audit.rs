//! The exactly-once audit table (`jetsync_audit`), read by crash tests.

use super::*;

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

pub(super) fn read_audit_from(db: &Database) -> Result<BTreeMap<u64, u64>, SinkError> {
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
