//! Transactions in the stream: runs of messages that carry the same `Nats-Batch-Id` (an atomic
//! batch, see `jetsync::transaction`). The server stores a batch in contiguous sequences, so its
//! surviving members are adjacent in any ordered delivery (the durable consumer, a snapshot).
//!
//! A transaction is *complete* at its commit member (`Nats-Batch-Commit: 1`) or at the first
//! later message outside it: compaction can remove members, the commit included, and a snapshot
//! shows only the surviving ones. Until then it is *open*: a run of events handed to the sink
//! never ends inside one (the run is stretched to its end), so every instance applies a
//! transaction in one sink transaction.
//!
//! A batch the server stored is complete within moments (the server writes all members at once).
//! Messages with batch headers that never complete can only come from a server that does not
//! know atomic batches (2.9 stores such headers as plain messages): after [`OPEN_TIMEOUT`]
//! without a further message they are applied as they are, with a warning, so they never stall
//! the applier.

use std::time::Duration;

use crate::delivery::Delivery;

/// How long an open transaction at the end of what has arrived waits for its next member
/// before it is applied as stored (longer than the server's 10 s batch timeout).
pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// How many events beyond a batch's normal limit it may be stretched to finish a transaction
/// (a server batch holds at most 1,000). A longer run of one batch id is applied in parts, with
/// a warning.
pub(crate) const MAX_STRETCH: usize = 10_000;

/// A message's place in a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tag<'a> {
    /// Its batch id.
    pub(crate) id: &'a str,
    /// Whether it is the commit member.
    pub(crate) commit: bool,
}

/// The index where the open transaction at the end of `tags` starts, `None` when the last
/// message is outside any transaction or is its transaction's commit.
pub(crate) fn open_tail(tags: &[Option<Tag<'_>>]) -> Option<usize> {
    let last = (*tags.last()?)?;
    if last.commit {
        return None;
    }
    let same = tags[..tags.len() - 1]
        .iter()
        .rev()
        .take_while(|t| t.is_some_and(|t| t.id == last.id))
        .count();
    Some(tags.len() - 1 - same)
}

/// The index where the transaction containing `tags[at]` starts (`at` itself outside a
/// transaction).
pub(crate) fn start_of(tags: &[Option<Tag<'_>>], at: usize) -> usize {
    let Some(Some(this)) = tags.get(at) else {
        return at;
    };
    let mut start = at;
    while start > 0 && tags[start - 1].is_some_and(|t| t.id == this.id) {
        start -= 1;
    }
    start
}

/// The tags of a run of messages.
pub(crate) fn tags<'a>(messages: impl Iterator<Item = &'a Delivery>) -> Vec<Option<Tag<'a>>> {
    messages.map(Delivery::tag).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str, commit: bool) -> Option<Tag<'_>> {
        Some(Tag { id, commit })
    }

    #[test]
    fn open_tails_and_starts() {
        assert_eq!(open_tail(&[]), None);
        assert_eq!(open_tail(&[None]), None);
        assert_eq!(open_tail(&[None, t("a", false)]), Some(1));
        assert_eq!(open_tail(&[None, t("a", false), t("a", false)]), Some(1));
        assert_eq!(open_tail(&[t("a", false), t("a", true)]), None);
        // A later transaction right after another (completed by it).
        assert_eq!(open_tail(&[t("a", false), t("b", false)]), Some(1));
        assert_eq!(start_of(&[None, t("a", false), t("a", false)], 2), 1);
        assert_eq!(start_of(&[t("b", true), t("a", false), t("a", true)], 2), 1);
        assert_eq!(start_of(&[None, None], 1), 1);
    }
}
