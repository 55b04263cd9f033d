//! Multi-row transactions: the members of one transaction are one JetStream atomic batch
//! (ADR-50, nats-server 2.12.1 or later, stream flag `allow_atomic`), stored all or nothing in
//! contiguous stream sequences.
//!
//! On the wire a member is an ordinary event (section 3 of DESIGN: body, `Jetsync-Format`,
//! `Nats-Msg-Id`) with three more headers:
//! - `Nats-Batch-Id`: the transaction's batch id (1 to 64 characters), the same on every member;
//! - `Nats-Batch-Sequence`: 1, 2, … without gaps;
//! - `Nats-Batch-Commit: 1` on the last member only.
//!
//! The server keeps these headers on the stored messages, which is how appliers recognise a
//! transaction: its members are applied in one sink transaction, complete at the commit member
//! or at the first later message outside it (compaction can remove members, the commit
//! included).

mod builder;
mod commit;
mod reply;
pub(crate) mod version;

pub use builder::{Transaction, MAX_TRANSACTION_ROWS};
pub use commit::Committed;
pub use version::supports_transactions;

/// Header naming the atomic batch (transaction) a message belongs to.
pub const BATCH_ID_HEADER: &str = "Nats-Batch-Id";
/// Header carrying a member's position in its batch: 1, 2, … without gaps.
pub const BATCH_SEQUENCE_HEADER: &str = "Nats-Batch-Sequence";
/// Header marking the last member of a batch (value `1`): the server stores the batch then.
pub const BATCH_COMMIT_HEADER: &str = "Nats-Batch-Commit";
/// Longest batch id the server accepts.
pub const MAX_BATCH_ID_LEN: usize = 64;

/// What a stored message's headers say about the transaction it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The batch id (`Nats-Batch-Id`).
    pub batch_id: String,
    /// The member's position (`Nats-Batch-Sequence`), 0 when the header is missing or not a
    /// number.
    pub sequence: u64,
    /// Whether it is the commit (last) member (`Nats-Batch-Commit: 1`).
    pub commit: bool,
}

impl Membership {
    /// The transaction membership of a message with these headers, `None` for a message
    /// outside any transaction (no or an empty `Nats-Batch-Id`).
    pub fn of(headers: Option<&async_nats::HeaderMap>) -> Option<Membership> {
        let headers = headers?;
        let batch_id = headers.get(BATCH_ID_HEADER)?.as_str();
        if batch_id.is_empty() {
            return None;
        }
        let sequence = headers
            .get(BATCH_SEQUENCE_HEADER)
            .and_then(|v| v.as_str().trim().parse().ok())
            .unwrap_or(0);
        let commit = headers
            .get(BATCH_COMMIT_HEADER)
            .is_some_and(|v| v.as_str().trim() == "1");
        Some(Membership {
            batch_id: batch_id.to_owned(),
            sequence,
            commit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_from_headers() {
        assert_eq!(Membership::of(None), None);
        let mut h = async_nats::HeaderMap::new();
        h.insert("Jetsync-Format", "json/1");
        assert_eq!(Membership::of(Some(&h)), None);
        h.insert(BATCH_ID_HEADER, "tx1");
        h.insert(BATCH_SEQUENCE_HEADER, "3");
        assert_eq!(
            Membership::of(Some(&h)),
            Some(Membership {
                batch_id: "tx1".into(),
                sequence: 3,
                commit: false
            })
        );
        h.insert(BATCH_COMMIT_HEADER, "1");
        assert!(Membership::of(Some(&h)).unwrap().commit);
    }
}
