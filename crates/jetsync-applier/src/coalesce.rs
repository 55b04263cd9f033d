//! Coalescing (`apply.coalesce`): within one batch, a row changed several times is handed to the
//! sink once, with its last change.
//!
//! A batch is one sink transaction, and an upsert replaces the whole row (a delete removes it),
//! so the batch's end state is the same whether the sink writes every change of a row or only
//! its last one; readers never see the states in between anyway. What stays as it was:
//! - the fence still lands at the batch's last sequence (the caller passes it unchanged);
//! - transactions keep their atomicity: a stream transaction is never split over two batches
//!   (see `txn.rs`), so the changes dropped here and the one kept are in the same sink
//!   transaction;
//! - parked and held rows: an event held behind its row's parked event is parked before this
//!   runs (`Rules::classify_run`), so it is never among the changes and no change is coalesced
//!   past a parked event of its row;
//! - a change the sink rejects: the caller restores the full list ([`Folded::restore`]) and
//!   applies it change by change, so the rejected change, and what it holds, are exactly what
//!   they would be without coalescing;
//! - counters count events: the dropped changes are restored before the batch is counted, and
//!   counted once more as `events_coalesced`.
//!
//! Not coalesced: tables with `merge = true` (an upsert there keeps the columns the event does
//! not carry, so each change matters), and nothing at all when `apply.coalesce = false` or the
//! sink must see every change ([`crate::Sink::sees_every_change`], the redb audit mode).
//!
//! One difference remains, the same one a snapshot bootstrap has: a change that a later change
//! of its row in the same batch replaces is not offered to the sink, so if the sink would have
//! refused it (a constraint, say), it is not parked; the row ends at its last change, as on an
//! instance that joined from a snapshot.

use std::collections::{BTreeSet, HashMap};

use crate::Change;

/// The changes of a batch that [`fold`] took out, with their positions, so that the full list
/// can be put back together.
#[derive(Debug)]
pub(crate) struct Folded {
    /// (position in the full list, change, its source index), ascending by position.
    dropped: Vec<(usize, Change, usize)>,
}

impl Folded {
    /// How many changes were taken out.
    pub(crate) fn len(&self) -> usize {
        self.dropped.len()
    }

    /// Puts the dropped changes (and their `sources` entries) back in their places.
    pub(crate) fn restore(self, changes: &mut Vec<Change>, sources: &mut Vec<usize>) {
        let total = changes.len() + self.dropped.len();
        let mut kept = std::mem::take(changes)
            .into_iter()
            .zip(std::mem::take(sources));
        let mut dropped = self.dropped.into_iter().peekable();
        changes.reserve(total);
        sources.reserve(total);
        for position in 0..total {
            let (change, source) = match dropped.peek() {
                Some((at, _, _)) if *at == position => {
                    let (_, change, source) = dropped.next().expect("peeked");
                    (change, source)
                }
                _ => kept
                    .next()
                    .expect("kept and dropped add up to the full list"),
            };
            changes.push(change);
            sources.push(source);
        }
    }
}

/// Takes out of `changes` (and the parallel `sources`) every change that a later change of the
/// same row replaces, except in `merge` tables. `None` when every change stays.
pub(crate) fn fold(
    changes: &mut Vec<Change>,
    sources: &mut Vec<usize>,
    merge: &BTreeSet<String>,
) -> Option<Folded> {
    let mut last: HashMap<(&str, &str), usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(changes.len(), Default::default());
    let mut keep = vec![true; changes.len()];
    let mut any = false;
    for (i, change) in changes.iter().enumerate() {
        if merge.contains(&change.table) {
            continue;
        }
        if let Some(before) = last.insert((change.table.as_str(), change.key.as_str()), i) {
            keep[before] = false;
            any = true;
        }
    }
    if !any {
        return None;
    }
    let mut dropped = Vec::new();
    let all = std::mem::take(changes)
        .into_iter()
        .zip(std::mem::take(sources))
        .enumerate();
    for (i, (change, source)) in all {
        if keep[i] {
            changes.push(change);
            sources.push(source);
        } else {
            dropped.push((i, change, source));
        }
    }
    Some(Folded { dropped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetsync::{Row, Value};

    fn up(seq: u64, table: &str, key: &str) -> Change {
        let mut row = Row::new();
        row.insert("v".into(), Value::I64(seq as i64));
        Change {
            seq,
            table: table.into(),
            key: key.into(),
            op: jetsync::Change::Upsert(row),
        }
    }

    fn del(seq: u64, table: &str, key: &str) -> Change {
        Change {
            seq,
            table: table.into(),
            key: key.into(),
            op: jetsync::Change::Delete,
        }
    }

    fn seqs(changes: &[Change]) -> Vec<u64> {
        changes.iter().map(|c| c.seq).collect()
    }

    #[test]
    fn the_last_change_of_each_row_is_kept_in_place_and_restore_undoes_it() {
        let original = vec![
            up(1, "t", "a"),
            up(2, "t", "b"),
            up(3, "t", "a"),
            del(4, "t", "b"),
            up(5, "u", "a"),
            up(6, "t", "a"),
            up(7, "t", "c"),
        ];
        let mut changes = original.clone();
        let mut sources: Vec<usize> = (10..17).collect();
        let folded = fold(&mut changes, &mut sources, &BTreeSet::new()).expect("folded");
        // Row t/a ends at 6, t/b at its delete (4); u/a is another table, t/c changed once.
        assert_eq!(seqs(&changes), vec![4, 5, 6, 7]);
        assert_eq!(sources, vec![13, 14, 15, 16]);
        assert_eq!(folded.len(), 3);
        folded.restore(&mut changes, &mut sources);
        assert_eq!(changes, original);
        assert_eq!(sources, (10..17).collect::<Vec<_>>());
    }

    #[test]
    fn nothing_to_fold_and_merge_tables() {
        let mut changes = vec![up(1, "t", "a"), up(2, "t", "b")];
        let mut sources = vec![0, 1];
        assert!(fold(&mut changes, &mut sources, &BTreeSet::new()).is_none());
        assert_eq!(seqs(&changes), vec![1, 2]);
        // A merge table keeps every change: each one may set different columns.
        let mut changes = vec![
            up(1, "m", "a"),
            up(2, "m", "a"),
            up(3, "t", "a"),
            up(4, "t", "a"),
        ];
        let mut sources = vec![0, 1, 2, 3];
        let merge = BTreeSet::from(["m".to_owned()]);
        let folded = fold(&mut changes, &mut sources, &merge).expect("t/a folded");
        assert_eq!(seqs(&changes), vec![1, 2, 4]);
        assert_eq!(folded.len(), 1);
    }
}
