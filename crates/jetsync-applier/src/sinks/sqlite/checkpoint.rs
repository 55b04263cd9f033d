//! WAL checkpoints on a thread of their own.
//!
//! In WAL mode every commit appends the pages it changed to the `-wal` file; a *checkpoint*
//! copies them back into the database file and fsyncs both, after which the next writer
//! starts the WAL over. SQLite's automatic checkpoint runs inside the COMMIT that crosses the
//! threshold, on the writer's thread: while catching up, the applier's thread spent about a
//! fifth of its time blocked in those fsyncs (off-CPU profile of a 500,000-event replay), and
//! no event was applied meanwhile.
//!
//! Here the sink's connection has no automatic checkpoint. Its WAL hook (called after every
//! commit with the WAL's size in pages) asks this thread, which has its own connection to the
//! file, for a `PASSIVE` checkpoint once the WAL holds [`SOON`] pages; the writer goes on
//! writing meanwhile (a passive checkpoint never blocks it, nor the service's readers). A
//! passive checkpoint running beside a writer never catches up with the frames appended while
//! it ran, and SQLite starts the WAL over only when it is fully copied back, so once the WAL
//! reaches [`LIMIT`] pages the hook checkpoints on the writer's thread as SQLite would (by then
//! most of it was copied and synced already, so this is short): the WAL file stays bounded.
//!
//! Checkpoints change nothing that a reader or a crash could see: a killed process leaves a WAL
//! that SQLite replays or ignores on the next open, exactly as with automatic checkpoints.

use std::{
    ffi::c_int,
    path::Path,
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use rusqlite::{hooks::Wal, wal::CheckpointMode, Connection};

/// WAL size (pages) at which the thread is asked for a checkpoint: the automatic threshold the
/// sink used before (40 MiB of 4 KiB pages).
pub(super) const SOON: c_int = 10_000;

/// WAL size (pages) at which the writer checkpoints itself, so that the WAL starts over.
pub(super) const LIMIT: c_int = 4 * SOON;

/// What the writer and the thread share.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    requested: bool,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for a checkpoint (a no-op when one is already asked for).
    fn request(&self) {
        let mut state = self.lock();
        if !state.requested {
            state.requested = true;
            self.wake.notify_one();
        }
    }
}

/// The checkpoint thread of one sink connection; stopped when dropped.
pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").finish_non_exhaustive()
    }
}

impl Checkpointer {
    /// Opens a second connection to the WAL-mode database at `path`, starts the thread and
    /// installs the WAL hook on `conn` (which replaces SQLite's automatic checkpoint). `None`
    /// (and `conn` keeps automatic checkpoints) when the thread or its connection cannot be
    /// had: checkpoints then simply stay on the writer's thread.
    pub(super) fn start(path: &Path, conn: &mut Connection) -> Option<Checkpointer> {
        Checkpointer::start_with(path, conn, SOON, LIMIT)
    }

    /// [`Checkpointer::start`] with other thresholds (pages), for tests.
    fn start_with(
        path: &Path,
        conn: &mut Connection,
        soon: c_int,
        limit: c_int,
    ) -> Option<Checkpointer> {
        let own = match Connection::open(path) {
            Ok(own) => own,
            Err(e) => {
                tracing::debug!(error = %e, "no second SQLite connection for checkpoints; checkpointing on the writer's thread");
                return None;
            }
        };
        // A checkpoint that finds the database busy (another checkpoint, e.g. the service's
        // own automatic one) is simply tried again at the next request.
        let _ = own.busy_timeout(Duration::ZERO);
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("jetsync-sqlite-checkpoint".into())
                .spawn(move || run(own, &shared))
        };
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                tracing::debug!(error = %e, "no thread for SQLite checkpoints; checkpointing on the writer's thread");
                return None;
            }
        };
        let hook_shared = shared.clone();
        let installed = conn.wal_hook(Some(move |wal: &mut Wal, pages: c_int| {
            if pages >= limit {
                // The commit already happened: an error here must not reach the caller as a
                // failed commit, so it is only logged (the next commit tries again).
                if let Err(e) = wal.checkpoint_v2(CheckpointMode::PASSIVE) {
                    tracing::debug!(error = %e, pages, "checkpoint on the writer's thread failed; retried after the next commit");
                }
            } else if pages >= soon {
                hook_shared.request();
            }
            Ok(())
        }));
        let checkpointer = Checkpointer {
            shared,
            thread: Some(thread),
        };
        match installed {
            Ok(()) => Some(checkpointer),
            Err(e) => {
                tracing::debug!(error = %e, "cannot hook SQLite's WAL; checkpointing on the writer's thread");
                None // dropping it stops the thread
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread: one passive checkpoint per request, until stopped.
fn run(conn: Connection, shared: &Shared) {
    loop {
        {
            let mut state = shared.lock();
            while !state.requested && !state.stop {
                state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            if state.stop {
                return;
            }
            state.requested = false;
        }
        match conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
            Ok((log, done)) => tracing::trace!(log, done, "SQLite checkpoint"),
            Err(e) => {
                tracing::debug!(error = %e, "SQLite checkpoint failed; retried at the next request")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commits `n` transactions of `rows` new rows of 1 KiB each.
    fn write(conn: &Connection, n: usize, rows: usize) {
        for _ in 0..n {
            conn.execute_batch("BEGIN").unwrap();
            for _ in 0..rows {
                conn.execute("INSERT INTO t (v) VALUES (randomblob(1024))", [])
                    .unwrap();
            }
            conn.execute_batch("COMMIT").unwrap();
        }
    }

    #[test]
    fn the_wal_is_checkpointed_off_the_writer_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        let (soon, limit) = (20, 80);
        let checkpointer = Checkpointer::start_with(&path, &mut conn, soon, limit).unwrap();
        // 300 commits of 4 pages each: without checkpoints the WAL would hold 1,200 pages.
        write(&conn, 300, 4);
        let page = 4096 + 24; // a WAL frame: page plus frame header
        let wal = std::fs::metadata(dir.path().join("c.db-wal"))
            .unwrap()
            .len();
        assert!(
            wal <= (limit as u64 + 8) * page + 32,
            "the WAL grew to {wal} bytes, past {limit} pages"
        );
        drop(checkpointer);
        // The pages were copied back into the database file (SQLite's own automatic
        // checkpoint is off: the hook replaced it), and every row is there.
        let db = std::fs::metadata(&path).unwrap().len();
        assert!(db > 1_000 * 1024, "database file only {db} bytes");
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1_200);
    }
}
