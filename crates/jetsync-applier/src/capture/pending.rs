//! Pending local changes: the origin never goes back to an older value of a row it changed.
//!
//! Table `jetsync_capture_pending (tbl, key, outbox_id, seq)`, primary key `(tbl, key)`, beside
//! the outbox:
//! - the capture triggers (and `capture install --backfill`) write the row's entry on every
//!   captured change: `outbox_id` = the change's outbox id, `seq` = NULL (not yet published);
//! - the relay, before publishing, sets `seq` = [`IN_FLIGHT`] on the entries of the batches'
//!   outbox ids (a change of such a row arriving meanwhile may be ordered before or after ours:
//!   the sink returns a retryable error and the engine retries the batch shortly);
//! - the relay, in the transaction that deletes an acknowledged batch, sets `seq` to the stream
//!   sequence the server acknowledged, on the entries whose `outbox_id` is in that batch (only a
//!   row's latest local change qualifies: a newer one replaced the entry);
//! - the sinks' apply transaction ([`Pending::keep`]): a change at stream sequence `s` of a row
//!   with an entry is applied only when the entry's `seq` is known and `s >= seq` (the stream
//!   reached our latest local change of the row); otherwise it is skipped: our newer local
//!   change is already in the row and comes later in the stream (or it is its own echo racing
//!   the relay's bookkeeping). At the end of the transaction the entries with `seq` at or below
//!   the batch's fence are deleted ([`settle_sqlite`], [`settle_postgres`]).
//!
//! No echo is counted, so compaction, duplicates and events the instance published through the
//! client change nothing. A remote change that arrives while a local change of the row is pending
//! is ordered before that local change in the stream, so skipping it still ends in the stream's
//! last write.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
};

use rusqlite::OptionalExtension;

use crate::sink::Change;

/// The pending table.
pub const PENDING_TABLE: &str = "jetsync_capture_pending";

/// How many times the relays of this process recorded acknowledged sequences; with
/// [`RECORDED`], what an engine waiting on [`SinkError::InFlight`](crate::SinkError::InFlight)
/// watches.
static RECORDINGS: AtomicU64 = AtomicU64::new(0);
/// Woken at every recording.
static RECORDED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Where the relays' recordings stand: taken before an apply attempt (an atomic load, nothing
/// more on the hot path), then given to [`wait_recorded`] if the attempt returned
/// [`SinkError::InFlight`](crate::SinkError::InFlight).
pub fn recordings() -> u64 {
    RECORDINGS.load(Ordering::Acquire)
}

/// Waits until a relay of this process recorded acknowledged sequences after `since` (a
/// [`recordings`] value), or `at_most`.
pub async fn wait_recorded(since: u64, at_most: std::time::Duration) {
    let notified = RECORDED.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    if recordings() != since {
        return;
    }
    let _ = tokio::time::timeout(at_most, notified).await;
}

/// Called by the relays after they recorded acknowledged sequences.
pub(crate) fn fire_recorded() {
    RECORDINGS.fetch_add(1, Ordering::AcqRel);
    RECORDED.notify_waiters();
}

/// Changes skipped because a newer local change of their row was pending, over the process life.
static SKIPPED: AtomicU64 = AtomicU64::new(0);

/// Changes the sinks skipped because a newer local change of their row was pending (over the
/// process's life).
pub fn skipped_total() -> u64 {
    SKIPPED.load(Ordering::Relaxed)
}

/// The pending entries of one apply transaction: `(table, key)` → acknowledged sequence.
#[derive(Debug, Default)]
pub struct Pending {
    entries: HashMap<(String, String), State>,
    /// Only the batch's rows were read (the table was too large to read whole): other entries
    /// may be there to settle.
    partial: bool,
}

/// Up to this many entries (or the batch's length, if larger) are read whole; a larger table
/// (a backlog of local changes not yet published, e.g. while NATS was unreachable) is looked
/// up for the batch's rows only, so that a catch-up does not read it all for every batch.
const READ_WHOLE: usize = 256;

/// Where a row's latest local change is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not published yet (`seq` NULL): every change arriving now is ordered before it.
    Unpublished,
    /// Being published (`seq` = [`IN_FLIGHT`]): the server may have stored it already, so a
    /// change arriving now may be ordered before or after it; the batch waits.
    InFlight,
    /// Stored at this stream sequence.
    Stored(u64),
}

/// The `seq` the relay writes on the entries of the batches it is about to publish.
pub const IN_FLIGHT: i64 = -1;

/// The changes a batch keeps once the pending rule was applied.
#[derive(Debug)]
pub struct Kept {
    /// The changes to apply, in order.
    pub changes: Vec<Change>,
    /// For each kept change, its position in the original batch.
    pub positions: Vec<usize>,
}

impl Kept {
    /// The original position of the kept change at `index`.
    pub fn original(&self, index: usize) -> usize {
        self.positions.get(index).copied().unwrap_or(index)
    }
}

impl Pending {
    /// Whether there is no pending entry at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The number of entries to read at most before switching to per-row lookups for a batch
    /// of `batch` changes (one more than are read whole).
    fn read_limit(batch: usize) -> usize {
        batch.max(READ_WHOLE) + 1
    }

    /// An empty set for a lookup of the batch's rows only.
    fn partial() -> Pending {
        Pending {
            partial: true,
            ..Pending::default()
        }
    }

    /// Whether the batch's transaction deletes the settled entries (`settle_*`).
    fn settles(&self) -> bool {
        self.partial || !self.entries.is_empty()
    }

    fn insert(&mut self, table: String, key: String, seq: Option<i64>) {
        let state = match seq {
            None => State::Unpublished,
            Some(s) if s < 0 => State::InFlight,
            Some(s) => State::Stored(s as u64),
        };
        self.entries.insert((table, key), state);
    }

    fn state(&self, change: &Change) -> Option<State> {
        self.entries
            .get(&(change.table.clone(), change.key.clone()))
            .copied()
    }

    /// Whether `change` is to be applied.
    fn applies(&self, change: &Change) -> bool {
        match self.state(change) {
            None => true,
            Some(State::Stored(seq)) => change.seq >= seq,
            Some(State::Unpublished | State::InFlight) => false,
        }
    }

    /// The changes to apply, `Ok(None)` when every change applies (the common case: no copy).
    /// A change of a row whose latest local change is being published cannot be placed yet:
    /// [`SinkError::InFlight`](crate::SinkError::InFlight), the engine retries the batch as
    /// soon as the relay records the sequence, right after the server's acknowledgement
    /// ([`wait_recorded`]).
    pub fn keep(&self, changes: &[Change]) -> Result<Option<Kept>, crate::SinkError> {
        if self.entries.is_empty() || changes.iter().all(|c| self.applies(c)) {
            return Ok(None);
        }
        if let Some(c) = changes
            .iter()
            .find(|c| self.state(c) == Some(State::InFlight))
        {
            return Err(crate::SinkError::InFlight {
                reason: format!(
                    "the local change of {}/{} is being published; the change at seq {} waits \
                     for its stream sequence",
                    c.table, c.key, c.seq
                ),
            });
        }
        let mut kept = Kept {
            changes: Vec::with_capacity(changes.len()),
            positions: Vec::with_capacity(changes.len()),
        };
        let mut skipped = 0u64;
        for (position, change) in changes.iter().enumerate() {
            if self.applies(change) {
                kept.changes.push(change.clone());
                kept.positions.push(position);
            } else {
                skipped += 1;
                tracing::debug!(
                    table = %change.table,
                    key = %change.key,
                    seq = change.seq,
                    "change skipped: a newer local change of the row is pending"
                );
            }
        }
        SKIPPED.fetch_add(skipped, Ordering::Relaxed);
        Ok(Some(kept))
    }
}

/// Maps the position of a rejected change back to the original batch.
pub fn reposition(
    mut error: crate::sink::SinkError,
    kept: Option<&Kept>,
) -> crate::sink::SinkError {
    if let (crate::sink::SinkError::Rejected { index, .. }, Some(kept)) = (&mut error, kept) {
        *index = kept.original(*index);
    }
    error
}

/// SQLite: the pending entries that matter to `changes`, read inside the caller's write
/// transaction (none when the table does not exist: capture was never installed in the file).
/// A small table is read whole; a large one is looked up for the batch's rows.
pub fn load_sqlite(conn: &rusqlite::Connection, changes: &[Change]) -> rusqlite::Result<Pending> {
    let exists: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' \
             AND name = 'jetsync_capture_pending')",
        )?
        .query_row([], |r| r.get(0))?;
    let mut pending = Pending::default();
    if !exists {
        return Ok(pending);
    }
    let limit = Pending::read_limit(changes.len());
    let mut read = 0usize;
    {
        let mut stmt =
            conn.prepare_cached("SELECT tbl, key, seq FROM jetsync_capture_pending LIMIT ?1")?;
        let mut rows = stmt.query([limit as i64])?;
        while let Some(r) = rows.next()? {
            pending.insert(r.get(0)?, r.get(1)?, r.get(2)?);
            read += 1;
        }
    }
    if read < limit {
        return Ok(pending);
    }
    let mut pending = Pending::partial();
    let mut stmt =
        conn.prepare_cached("SELECT seq FROM jetsync_capture_pending WHERE tbl = ?1 AND key = ?2")?;
    let rows: std::collections::HashSet<(&str, &str)> = changes
        .iter()
        .map(|c| (c.table.as_str(), c.key.as_str()))
        .collect();
    for (table, key) in rows {
        let seq: Option<Option<i64>> = stmt.query_row([table, key], |r| r.get(0)).optional()?;
        if let Some(seq) = seq {
            pending.insert(table.to_owned(), key.to_owned(), seq);
        }
    }
    Ok(pending)
}

/// SQLite: deletes the entries settled by the batch (sequence at or below `fence`), inside the
/// caller's write transaction.
pub fn settle_sqlite(
    conn: &rusqlite::Connection,
    pending: &Pending,
    fence: i64,
) -> rusqlite::Result<()> {
    if !pending.settles() {
        return Ok(());
    }
    conn.prepare_cached("DELETE FROM jetsync_capture_pending WHERE seq >= 0 AND seq <= ?1")?
        .execute([fence])?;
    Ok(())
}

/// Postgres: the pending entries of schema `schema` (quoted) that matter to `changes`, none
/// when the table does not exist (capture never installed there, or the schema is not created
/// yet). A small table is read whole (one round trip, which also tells whether the table
/// exists); a large one is then looked up for the batch's rows. It runs outside the sink's
/// transaction, so its failure aborts nothing.
pub async fn load_postgres(
    client: &tokio_postgres::Client,
    schema: &str,
    changes: &[Change],
) -> Result<Pending, tokio_postgres::Error> {
    let mut pending = Pending::default();
    let limit = Pending::read_limit(changes.len());
    let rows = match client
        .query(
            &format!("SELECT tbl, key, seq FROM {schema}.{PENDING_TABLE} LIMIT {limit}"),
            &[],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e)
            if e.code().is_some_and(|c| {
                *c == tokio_postgres::error::SqlState::UNDEFINED_TABLE
                    || *c == tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME
            }) =>
        {
            return Ok(pending)
        }
        Err(e) => return Err(e),
    };
    if rows.len() < limit {
        for row in rows {
            pending.insert(row.get(0), row.get(1), row.get(2));
        }
        return Ok(pending);
    }
    let (tables, keys): (Vec<&str>, Vec<&str>) = changes
        .iter()
        .map(|c| (c.table.as_str(), c.key.as_str()))
        .unzip();
    let rows = client
        .query(
            &format!(
                "SELECT p.tbl, p.key, p.seq FROM {schema}.{PENDING_TABLE} p \
                 JOIN unnest($1::text[], $2::text[]) AS b (tbl, key) \
                 ON p.tbl = b.tbl AND p.key = b.key"
            ),
            &[&tables, &keys],
        )
        .await?;
    let mut pending = Pending::partial();
    for row in rows {
        pending.insert(row.get(0), row.get(1), row.get(2));
    }
    Ok(pending)
}

/// Postgres: deletes the entries settled by a committed batch (sequence at or below `fence`).
/// Entries locked by a service transaction still open are skipped, not waited for: that
/// transaction is changing them to a newer local change (sequence unknown), which a delete
/// would not match anyway, and a settled entry left behind blocks nothing (every later change
/// of its row is after its sequence); a later batch deletes it.
pub async fn settle_postgres(
    client: &tokio_postgres::Client,
    schema: &str,
    pending: &Pending,
    fence: i64,
) -> Result<(), tokio_postgres::Error> {
    if !pending.settles() {
        return Ok(());
    }
    client
        .execute(
            &format!(
                "DELETE FROM {schema}.{PENDING_TABLE} WHERE ctid IN (SELECT ctid FROM \
                 {schema}.{PENDING_TABLE} WHERE seq >= 0 AND seq <= $1 FOR UPDATE SKIP LOCKED)"
            ),
            &[&fence],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn change(seq: u64, key: &str) -> Change {
        Change {
            seq,
            table: "items".into(),
            key: key.into(),
            op: jetsync::Change::Delete,
        }
    }

    #[test]
    fn the_pending_rule_per_state() {
        let mut pending = Pending::default();
        assert!(pending.keep(&[change(1, "a")]).unwrap().is_none());
        pending.insert("items".into(), "new".into(), None);
        pending.insert("items".into(), "stored".into(), Some(10));
        let batch = [
            change(8, "free"),
            change(9, "new"),
            change(9, "stored"),
            change(10, "stored"),
        ];
        let kept = pending.keep(&batch).unwrap().expect("some changes skipped");
        // Not yet published: ordered before our change; stored at 10: older ones are skipped.
        assert_eq!(kept.positions, vec![0, 3]);
        assert_eq!(kept.original(1), 3);

        // Being published: where it lands is not known yet, so the batch waits (retryable,
        // and not the generic `Unavailable` the engine backs off from).
        pending.insert("items".into(), "flying".into(), Some(IN_FLIGHT));
        let err = pending
            .keep(&[change(11, "free"), change(12, "flying")])
            .unwrap_err();
        assert!(
            matches!(&err, crate::SinkError::InFlight { reason } if reason.contains("items/flying")),
            "{err:?}"
        );
        assert!(err.is_retryable());
        // A batch without that row is not held up by it.
        assert!(pending.keep(&[change(11, "free")]).unwrap().is_none());
    }

    /// A file with `n` pending entries `k0..k{n-1}` of table `items`: even ones stored at
    /// sequence 100 + i, odd ones not published yet.
    fn file_with_entries(n: usize) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE jetsync_capture_pending (tbl TEXT NOT NULL, key TEXT NOT NULL, \
             outbox_id INTEGER NOT NULL, seq INTEGER, PRIMARY KEY (tbl, key))",
        )
        .unwrap();
        for i in 0..n {
            let seq = (i % 2 == 0).then_some(100 + i as i64);
            conn.execute(
                "INSERT INTO jetsync_capture_pending VALUES ('items', ?1, ?2, ?3)",
                rusqlite::params![format!("k{i}"), i as i64, seq],
            )
            .unwrap();
        }
        conn
    }

    /// A batch over entries `k{i}` (even ones stored at 100 + i, odd ones unpublished): `k0`
    /// before its stored change, `k1` unpublished, `k200` before and after its stored change,
    /// and a row without an entry. Against a large table, positions 3 and 4 apply.
    pub(crate) fn batch_over_entries() -> [Change; 5] {
        [
            change(50, "k0"),
            change(150, "k1"),
            change(250, "k200"),
            change(350, "k200"),
            change(60, "free"),
        ]
    }

    #[test]
    fn a_large_table_is_looked_up_for_the_batch_rows_only() {
        let batch = batch_over_entries();
        for n in [10, READ_WHOLE + 50] {
            let conn = file_with_entries(n);
            let pending = load_sqlite(&conn, &batch).unwrap();
            let large = n > READ_WHOLE;
            if large {
                assert_eq!(pending.entries.len(), 3, "only the batch's rows were read");
            } else {
                assert_eq!(pending.entries.len(), n, "a small table is read whole");
            }
            assert!(pending.settles());
            let kept = pending.keep(&batch).unwrap().expect("some skipped");
            // k0 at 50 < 100: skipped; k1 unpublished: skipped; k200 (in the large table only,
            // stored at 300): 250 skipped, 350 applied; without an entry both apply; `free`
            // applied.
            let want = if large { vec![3, 4] } else { vec![2, 3, 4] };
            assert_eq!(kept.positions, want, "n = {n}");
            settle_sqlite(&conn, &pending, 200).unwrap();
            let left: i64 = conn
                .query_row("SELECT count(*) FROM jetsync_capture_pending", [], |r| {
                    r.get(0)
                })
                .unwrap();
            // Stored at or below 200: the even keys below 100.
            let settled = (0..n).filter(|i| i % 2 == 0 && 100 + i <= 200).count();
            assert_eq!(left as usize, n - settled, "n = {n}");
        }
        // No table at all: nothing pending, nothing to settle.
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let pending = load_sqlite(&conn, &batch).unwrap();
        assert!(pending.is_empty() && !pending.settles());
    }

    #[tokio::test]
    async fn a_recording_wakes_a_waiter_armed_before_it() {
        // A recording between the mark and the wait ends the wait at once.
        let mark = recordings();
        fire_recorded();
        let started = std::time::Instant::now();
        wait_recorded(mark, std::time::Duration::from_secs(30)).await;
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        // A recording during the wait wakes it.
        let mark = recordings();
        let waiter = tokio::spawn(wait_recorded(mark, std::time::Duration::from_secs(30)));
        while !waiter.is_finished() && started.elapsed() < std::time::Duration::from_secs(20) {
            fire_recorded();
            tokio::task::yield_now().await;
        }
        assert!(waiter.is_finished(), "the waiter was woken");
    }
}
