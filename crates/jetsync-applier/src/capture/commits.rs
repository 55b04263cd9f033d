//! Commit boundaries of a SQLite outbox, and how the relay groups outbox rows into publish
//! batches with them.
//!
//! SQLite triggers cannot tell one local transaction from the next, but the outbox ids can:
//! writers are serialised and the ids come from AUTOINCREMENT, so at any moment the highest id
//! handed out by committed transactions (`sqlite_sequence`) ends a transaction. The relay's
//! commit watcher reads it after every commit it notices and records it here, and the relay
//! splits the rows it assigns at those boundaries. Two commits closer together than the
//! watcher's interval share a boundary: their rows stay together, which is always safe (a batch
//! of whole transactions is published atomically).
//!
//! Why it matters: a batch of one change goes out as a plain message, but a batch of several is
//! one atomic batch, which nats-server 2.12 stages in a file store of its own (about 1.4 ms
//! against 0.25 ms for a plain publish). Without boundaries, a service writing a row every
//! millisecond left two to four rows between two relay cycles, each cycle paid for an atomic
//! batch, and the next one found as many rows again.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

/// Commits waiting at most this many are published one batch each (a single change as a plain
/// message); more are merged into batches of up to [`jetsync::MAX_TRANSACTION_ROWS`] rows,
/// which catches up faster than one publish per commit.
const SEPARATE_UP_TO: usize = 4;

/// Boundaries kept at most; the oldest are dropped beyond it (their commits are then merged,
/// which is safe), so a relay that cannot publish does not grow the list without bound.
const MAX_BOUNDARIES: usize = 65_536;

/// Commit boundaries the watcher saw, in increasing order, shared with the relay.
#[derive(Debug, Clone, Default)]
pub(super) struct Boundaries {
    inner: Arc<Mutex<VecDeque<i64>>>,
}

impl Boundaries {
    /// Records that every outbox id up to `id` belongs to committed transactions (and no
    /// transaction has ids on both sides of it).
    pub(super) fn record(&self, id: i64) {
        let mut list = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if list.back().is_some_and(|last| *last >= id) {
            return;
        }
        if list.len() >= MAX_BOUNDARIES {
            list.pop_front();
        }
        list.push_back(id);
    }

    /// The recorded boundaries that matter for rows up to `last_id`: those below it and the
    /// first at or above it, in increasing order.
    pub(super) fn up_to(&self, last_id: i64) -> Vec<i64> {
        let list = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = list.partition_point(|b| *b < last_id);
        list.iter().take(n + 1).copied().collect()
    }

    /// Forgets the boundaries at or below `id` (its rows were assigned to batches).
    pub(super) fn forget_through(&self, id: i64) {
        let mut list = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = list.partition_point(|b| *b <= id);
        list.drain(..n);
    }
}

/// How [`group`] split the rows.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Grouping {
    /// Publish batches, each `(first id, last id)`, in id order.
    pub(super) batches: Vec<(i64, i64)>,
    /// Rows at the end left for the next cycle (a transaction the row limit cut).
    pub(super) held_back: usize,
    /// Groups of rows that no boundary split and that had to be cut to fit a batch, each
    /// `(first id, last id, rows)`: a local transaction among them is split.
    pub(super) cut: Vec<(i64, i64, usize)>,
}

/// Groups the unassigned outbox rows `ids` (increasing) into publish batches of at most
/// `max_rows` rows, using the commit `boundaries` (increasing; a boundary `b` means no
/// transaction has rows on both sides of `b`). The last id is a boundary unless `truncated`
/// (the read stopped at a row limit, so the last transaction may go on beyond it).
pub(super) fn group(ids: &[i64], boundaries: &[i64], truncated: bool, max_rows: usize) -> Grouping {
    // Whole commits (one or several transactions each), as index ranges into `ids`.
    let mut commits: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    let mut next_boundary = boundaries.iter().peekable();
    for (i, id) in ids.iter().enumerate() {
        while next_boundary.peek().is_some_and(|b| **b < *id) {
            next_boundary.next();
        }
        // The next boundary is at or above this id: the commit ends here when it is below
        // the next id (or there is no next id).
        let ends_here = match (next_boundary.peek(), ids.get(i + 1)) {
            (Some(b), Some(next)) => **b < *next,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if ends_here {
            commits.push((start, i + 1));
            start = i + 1;
        }
    }
    let mut held_back = 0;
    if start < ids.len() {
        if truncated && !commits.is_empty() {
            // The last transaction may continue past the read: publish it whole next time.
            held_back = ids.len() - start;
        } else {
            commits.push((start, ids.len()));
        }
    }
    // Commits published together: each on its own while few wait, else merged.
    let runs = if commits.len() <= SEPARATE_UP_TO {
        commits
    } else {
        merge(&commits, max_rows)
    };
    let mut batches = Vec::new();
    let mut cut = Vec::new();
    for (from, to) in runs {
        if to - from > max_rows {
            cut.push((ids[from], ids[to - 1], to - from));
        }
        batches.extend(
            ids[from..to]
                .chunks(max_rows)
                .map(|chunk| (chunk[0], chunk[chunk.len() - 1])),
        );
    }
    Grouping {
        batches,
        held_back,
        cut,
    }
}

/// Merges consecutive whole commits into runs of up to `max_rows` rows; a commit larger than
/// that stays a run of its own (and is cut by the caller).
fn merge(commits: &[(usize, usize)], max_rows: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &(from, to) in commits {
        match runs.last_mut() {
            Some(run) if to - run.0 <= max_rows => run.1 = to,
            _ => runs.push((from, to)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batches(ids: &[i64], boundaries: &[i64], truncated: bool, max: usize) -> Vec<(i64, i64)> {
        group(ids, boundaries, truncated, max).batches
    }

    #[test]
    fn a_few_commits_are_published_one_batch_each() {
        // Commits of ids 1, 2..=3, 4 (boundaries 1, 3; the last id ends the read).
        assert_eq!(
            batches(&[1, 2, 3, 4], &[1, 3], false, 1000),
            vec![(1, 1), (2, 3), (4, 4)]
        );
        // Boundaries between ids (rows deleted, or ids of rolled-back writes) still split.
        assert_eq!(
            batches(&[10, 20, 30], &[5, 12, 25], false, 1000),
            vec![(10, 10), (20, 20), (30, 30)]
        );
        // No boundary: everything read is one batch.
        assert_eq!(batches(&[7, 8, 9], &[], false, 1000), vec![(7, 9)]);
    }

    #[test]
    fn many_commits_are_merged_without_cutting_one() {
        let ids: Vec<i64> = (1..=10).collect();
        // Ten one-row commits, more than SEPARATE_UP_TO: merged up to 4 rows.
        let every: Vec<i64> = ids.clone();
        assert_eq!(
            batches(&ids, &every, false, 4),
            vec![(1, 4), (5, 8), (9, 10)]
        );
        // Commits 1..=3, 4..=6, 7..=9, 10, 11, 12 merged up to 7 rows: never cut.
        let ids: Vec<i64> = (1..=12).collect();
        assert_eq!(
            batches(&ids, &[3, 6, 9, 10, 11], false, 7),
            vec![(1, 6), (7, 12)]
        );
    }

    #[test]
    fn a_commit_larger_than_a_batch_is_cut_and_reported() {
        let ids: Vec<i64> = (1..=5).collect();
        let grouping = group(&ids, &[], false, 2);
        assert_eq!(grouping.batches, vec![(1, 2), (3, 4), (5, 5)]);
        assert_eq!(grouping.cut, vec![(1, 5, 5)]);
        assert_eq!(group(&ids, &[2], false, 3).cut, Vec::new());
    }

    #[test]
    fn a_read_cut_by_the_row_limit_holds_the_last_commit_back() {
        // The read stopped at 5 rows: the rows after the last boundary wait.
        let grouping = group(&[1, 2, 3, 4, 5], &[2], true, 1000);
        assert_eq!(grouping.batches, vec![(1, 2)]);
        assert_eq!(grouping.held_back, 3);
        // Unless nothing before it ended: then it is published (and cut) as it is.
        let grouping = group(&[1, 2, 3], &[], true, 1000);
        assert_eq!(grouping.batches, vec![(1, 3)]);
        assert_eq!(grouping.held_back, 0);
    }

    #[test]
    fn boundaries_are_kept_in_order_bounded_and_forgotten_once_used() {
        let b = Boundaries::default();
        for id in [3, 3, 1, 5, 9] {
            b.record(id);
        }
        assert_eq!(b.up_to(4), vec![3, 5]);
        assert_eq!(b.up_to(100), vec![3, 5, 9]);
        b.forget_through(5);
        assert_eq!(b.up_to(100), vec![9]);
        for id in 0..(MAX_BOUNDARIES as i64 + 10) {
            b.record(id + 100);
        }
        let kept = b.up_to(i64::MAX);
        assert_eq!(kept.len(), MAX_BOUNDARIES);
        assert_eq!(kept[0], 110);
    }

    #[test]
    fn a_boundary_at_or_after_the_last_id_ends_its_commit() {
        // Boundary 9 is past the last row read (its later rows were deleted already).
        let grouping = group(&[1, 2, 3], &[1, 9], true, 1000);
        assert_eq!(grouping.batches, vec![(1, 1), (2, 3)]);
        assert_eq!(grouping.held_back, 0);
    }
}
