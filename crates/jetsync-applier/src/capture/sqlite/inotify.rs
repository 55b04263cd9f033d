//! Sleeping until a SQLite file is written to, instead of polling it (Linux `inotify`).
//!
//! A commit writes its pages to the `-wal` file (or, outside WAL mode, to the database file),
//! which the kernel reports to a watch on the file's directory as `IN_MODIFY`. The commit
//! watcher (`super::Watcher`) waits for such an event, with a timeout, before it compares
//! `PRAGMA data_version`: an idle instance costs nothing, and a commit is seen as soon as its
//! pages are written rather than at the next poll.
//!
//! The event comes with the write, a moment before the committer publishes the commit in the
//! WAL index; the watcher therefore looks again shortly after an event that showed no new
//! commit (see `super::Watcher`). Where inotify is not available (another OS, a file system
//! without it, the instance's watch limit reached) [`Inotify::new`] fails and the watcher polls.

use std::{io, mem::MaybeUninit, os::fd::OwnedFd, path::Path, time::Duration};

use rustix::{
    event::{poll, PollFd, PollFlags, Timespec},
    fs::inotify,
};

/// A watch for writes to the files of one directory.
#[derive(Debug)]
pub(super) struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    /// Watches `dir` (the directory of the SQLite file) for writes to any file in it.
    pub(super) fn new(dir: &Path) -> io::Result<Inotify> {
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)?;
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        inotify::add_watch(&fd, dir, inotify::WatchFlags::MODIFY)?;
        Ok(Inotify { fd })
    }

    /// Waits until a file of the directory was written to, or `timeout`; returns whether it
    /// was. Reads every queued event, so the next call waits for a new write.
    pub(super) fn wait(&self, timeout: Duration) -> bool {
        let timeout = Timespec {
            tv_sec: timeout.as_secs() as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(ready) if ready > 0 => {
                self.drain();
                true
            }
            _ => false,
        }
    }

    /// Reads (and discards) every queued event.
    fn drain(&self) {
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&self.fd, &mut buf);
        // Ends with `WOULDBLOCK` once the queue is empty (the descriptor is non-blocking); a
        // bound anyway, as every loop has one.
        for _ in 0..100_000 {
            if reader.next().is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_wakes_the_watch_and_silence_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let watch = Inotify::new(dir.path()).expect("inotify on a temporary directory");
        assert!(
            !watch.wait(Duration::from_millis(20)),
            "nothing written yet"
        );
        std::fs::write(dir.path().join("file-wal"), b"frame").unwrap();
        assert!(watch.wait(Duration::from_secs(5)), "the write was reported");
        // Every queued event was read: no write since, so the next wait times out.
        assert!(!watch.wait(Duration::from_millis(20)));
    }
}
