//! The server's replies to the members of an atomic batch, and what each means for a commit.
//!
//! The first member is a request: an empty reply means the batch was started, a JSON error
//! that it was refused. The commit (last) member's reply is a publish acknowledgement
//! `{"stream":..,"seq":<last seq>,"batch":"<id>","count":N}` or an error
//! `{"error":{"code":..,"err_code":..,"description":..}}`. A one-member transaction's single
//! request is both first and commit.

use std::fmt;

use serde::Deserialize;

/// Atomic publish is not allowed on the stream (`allow_atomic` is false).
pub(crate) const ATOMIC_DISABLED: u64 = 10174;
/// A member's `Nats-Batch-Sequence` is missing.
pub(crate) const MISSING_SEQ: u64 = 10175;
/// The batch has a gap or was abandoned (idle for 10 s, or a leader change).
pub(crate) const INCOMPLETE: u64 = 10176;
/// The server does not know the batch id (it was dropped, e.g. after a leader change).
pub(crate) const INVALID_ID: u64 = 10179;
/// The batch is larger than the server's `max_batch_size`.
pub(crate) const TOO_LARGE: u64 = 10199;
/// The commit was not valid (the batch it closes is not the one the server has).
pub(crate) const INVALID_COMMIT: u64 = 10200;
/// A member's `Nats-Msg-Id` is already stored: the whole batch was refused.
pub(crate) const DUPLICATE: u64 = 10201;
/// Too many batches in flight on the stream (50 by default); try again shortly.
pub(crate) const TOO_MANY_INFLIGHT: u64 = 10210;
/// A compare-and-set (`Nats-Expected-Last-Subject-Sequence`) failed.
pub(crate) const WRONG_LAST_SEQUENCE: u64 = 10071;
/// The stream does not exist.
pub(crate) const STREAM_NOT_FOUND: u64 = 10059;

/// A reply to a member of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Empty: the batch goes on (the reply to a first member that is not the commit).
    Started,
    /// The batch was stored: `seq` is the commit member's sequence, `count` the members.
    Stored {
        /// The commit (last) member's stream sequence.
        seq: u64,
        /// The members stored.
        count: u64,
    },
    /// The server refused the batch.
    Refused(ApiError),
}

/// An error the server answered with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct ApiError {
    /// HTTP-like status.
    #[serde(default)]
    pub(crate) code: u16,
    /// JetStream error code (`10071`, ...).
    #[serde(default)]
    pub(crate) err_code: u64,
    /// The server's description.
    #[serde(default)]
    pub(crate) description: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (code {}, error code {})",
            self.description, self.code, self.err_code
        )
    }
}

impl std::error::Error for ApiError {}

/// A reply the client could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable reply to a transaction member: {0}")]
pub(crate) struct BadReply(pub(crate) String);

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    count: Option<u64>,
}

/// Reads a reply's payload.
pub(crate) fn parse(payload: &[u8]) -> Result<Reply, BadReply> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Reply::Started);
    }
    let wire: Wire = serde_json::from_slice(payload).map_err(|e| {
        BadReply(format!(
            "{e}: {}",
            String::from_utf8_lossy(&payload[..payload.len().min(200)])
        ))
    })?;
    if let Some(error) = wire.error {
        return Ok(Reply::Refused(error));
    }
    match (wire.seq, wire.count) {
        (Some(seq), Some(count)) => Ok(Reply::Stored { seq, count }),
        // A plain acknowledgement without a count: a server that did not treat the message as
        // part of a batch. The version check keeps such servers out; never report it as stored.
        _ => Err(BadReply(format!(
            "an acknowledgement without a batch count: {}",
            String::from_utf8_lossy(&payload[..payload.len().min(200)])
        ))),
    }
}

/// The largest batch the server says it allows, from "atomic publish batch is too large: N".
pub(crate) fn too_large_limit(description: &str) -> Option<usize> {
    let digits: String = description
        .rsplit(':')
        .next()?
        .trim()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(parse(b""), Ok(Reply::Started));
        assert_eq!(
            parse(br#"{"stream":"CATALOG","seq":12,"batch":"abc","count":3}"#),
            Ok(Reply::Stored { seq: 12, count: 3 })
        );
        assert_eq!(
            parse(
                br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 5"},"stream":"CATALOG","seq":0}"#
            ),
            Ok(Reply::Refused(ApiError {
                code: 400,
                err_code: WRONG_LAST_SEQUENCE,
                description: "wrong last sequence: 5".into()
            }))
        );
        assert!(parse(br#"{"stream":"CATALOG","seq":12}"#).is_err());
        assert!(parse(b"nonsense").is_err());
    }

    #[test]
    fn too_large() {
        assert_eq!(
            too_large_limit("atomic publish batch is too large: 1000"),
            Some(1000)
        );
        assert_eq!(too_large_limit("atomic publish batch is too large"), None);
    }
}
