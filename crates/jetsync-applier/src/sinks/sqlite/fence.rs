//! The fence: per sync group, the highest stream sequence whose effects are in the file, in
//! table `jetsync_offsets (stream, seq)`.
//!
//! **A fence never decreases.** Every write in the apply path ([`crate::Sink::apply`],
//! [`crate::Sink::replace_commit`], [`crate::Sink::set_fence`]) keeps the larger of the stored
//! and the new value (`seq = max(seq, excluded.seq)`), so a late or repeated write (`parked
//! retry` applies lower sequences with the current fence) can never move it back and make the
//! engine apply events twice. Moving it back is an explicit operator action:
//! [`super::SqliteSink::rewind_fence`] (`reset --to-seq`).

use rusqlite::{Connection, OptionalExtension};

use super::errors::Error;
use crate::SinkError;

/// The stored fence of `group`, `None` when it never applied anything.
pub(super) fn read(conn: &Connection, group: &str) -> Result<Option<i64>, Error> {
    Ok(conn
        .prepare_cached("SELECT seq FROM jetsync_offsets WHERE stream = ?1")?
        .query_row([group], |row| row.get(0))
        .optional()?)
}

/// Raises the fence of `group` to `seq` (never lowers it).
pub(super) fn advance(conn: &Connection, group: &str, seq: i64) -> Result<(), Error> {
    conn.prepare_cached(
        "INSERT INTO jetsync_offsets (stream, seq) VALUES (?1, ?2) \
         ON CONFLICT (stream) DO UPDATE SET seq = max(seq, excluded.seq)",
    )
    .and_then(|mut stmt| stmt.execute((group, seq)))
    .map_err(|e| Error::own("write the fence", e))?;
    Ok(())
}

/// Sets the fence of `group` to exactly `seq`, lower or not (an operator's rewind).
pub(super) fn set_exactly(conn: &Connection, group: &str, seq: i64) -> Result<(), Error> {
    conn.prepare_cached(
        "INSERT INTO jetsync_offsets (stream, seq) VALUES (?1, ?2) \
         ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq",
    )
    .and_then(|mut stmt| stmt.execute((group, seq)))
    .map_err(|e| Error::own("write the fence", e))?;
    Ok(())
}

/// A stream sequence as SQLite's signed integer.
pub(super) fn to_sql(seq: u64) -> Result<i64, SinkError> {
    i64::try_from(seq).map_err(|_| SinkError::Fatal {
        reason: format!("stream sequence {seq} does not fit SQLite's signed 64-bit integers"),
    })
}
