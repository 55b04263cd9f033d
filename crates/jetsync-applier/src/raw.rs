//! Messages the NATS client library cannot parse (DESIGN 5, apply loop).
//!
//! async-nats parses every delivery on its connection task: a message whose subject or header
//! block it refuses (bytes that are not UTF-8, a header line without `:`, a header name with
//! other than printable ASCII, a version line other than `NATS/1.0 [status]`) drops the whole
//! connection instead of reaching the engine. The client reconnects, the engine recreates its
//! consumer at the applied sequence + 1 and gets the same message again: without this module
//! the applier would loop there forever.
//!
//! So the engine counts consumer sessions that end without progress at the same applied
//! sequence S, and after [`STUCK_AFTER`] of them fetches the next stored message at or after
//! S + 1 WITHOUT the client's parser, through the stream's message-get API
//! (`$JS.API.STREAM.MSG.GET.<stream>`, whose reply is JSON with the header block and body in
//! base64; never direct get, which returns the raw message and breaks the parser again). If
//! [`refusal`] says the client would refuse it, it is parked with its raw header bytes and
//! body and the fence moves through it (see `Applier::park_unparseable` for the crash window);
//! a message that looks valid is left alone (the engine keeps retrying with backoff and logs
//! why).

use jetsync::raw_message::StoredMessage;

use crate::{
    decode::row_of,
    parked::{now_ms, ParkedEvent},
};

pub(crate) use jetsync::raw_message::{fetch, refusal, Lookup};

/// Consumer sessions ending without progress at the same applied sequence before the next
/// message is fetched raw and checked.
pub(crate) const STUCK_AFTER: u32 = 2;

/// The parked record of a message the client refuses (`reason`, from [`refusal`]), in the sync
/// group with subject `prefix`. Its row is the one its subject names, unless the subject is
/// not valid UTF-8 (whose true bytes the API does not return).
pub(crate) fn parked(message: StoredMessage, prefix: &str, reason: &str) -> ParkedEvent {
    let row = if message.subject.contains(char::REPLACEMENT_CHARACTER) {
        None
    } else {
        row_of(prefix, &message.subject).ok()
    };
    ParkedEvent {
        seq: message.seq,
        subject: message.subject,
        row,
        format: None,
        msg_id: None,
        payload: message.payload,
        error: format!("malformed message: {reason}"),
        held_behind: None,
        parked_at_ms: now_ms(),
        raw_headers: message.headers,
        txn: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_records_keep_the_raw_parts() {
        let m = StoredMessage {
            seq: 9,
            subject: "g.items.a".into(),
            headers: Some(b"NATS/1.0\r\nX-Bad: \xff\r\n\r\n".to_vec()),
            payload: b"body".to_vec(),
        };
        let p = parked(m.clone(), "g", "header block is not valid UTF-8");
        assert_eq!(p.seq, 9);
        assert_eq!(p.row, Some("items/a".parse().unwrap()));
        assert_eq!(p.raw_headers, m.headers);
        assert_eq!(p.payload, b"body");
        assert_eq!(
            p.error,
            "malformed message: header block is not valid UTF-8"
        );
        let bad = StoredMessage {
            subject: "g.items.\u{FFFD}".into(),
            ..m
        };
        assert_eq!(parked(bad, "g", "x").row, None);
    }
}
