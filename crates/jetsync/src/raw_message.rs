//! Stored messages read without the NATS client's message parser, and the rules that parser
//! applies (DESIGN 5, apply loop).
//!
//! async-nats parses every message on its connection task: one whose subject or header block it
//! refuses (bytes that are not UTF-8, a header line without `:`, a header name with other than
//! printable ASCII, a version line other than `NATS/1.0 [status]`) drops the whole connection
//! instead of reaching the caller. A publisher speaking the NATS protocol directly can store
//! such a message. [`fetch`] reads a stored message through the stream's message-get API, whose
//! JSON reply carries the header block and body in base64, and [`refusal`] says whether the
//! client would refuse it: the applier parks such messages, and [`Table::get`](crate::Table::get)
//! reports them as [`Error::Malformed`].

use async_nats::jetstream::{self, response::Response};
use base64::Engine as _;
use serde::Deserialize;

use crate::Error;

/// The JetStream error code of "no message found".
const NO_MESSAGE_FOUND: u64 = 10037;

/// Why the client library would refuse a message with `subject` (as the message-get API
/// reports it: bytes that are not UTF-8 come back as U+FFFD) and header block `headers`, or
/// `None` when it would parse it.
pub fn refusal(subject: &str, headers: Option<&[u8]>) -> Option<String> {
    check_subject(subject)
        .and_then(|()| headers.map_or(Ok(()), check_headers))
        .err()
}

/// The subject rules of the client's `MSG`/`HMSG` line parser: the line must be UTF-8 and is
/// split on whitespace, so a subject with whitespace shifts every later argument.
pub fn check_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() {
        return Err("subject is empty".into());
    }
    if subject.contains(char::REPLACEMENT_CHARACTER) {
        return Err(format!(
            "subject is not valid UTF-8 (shown as {subject:?}, U+FFFD marking the invalid bytes)"
        ));
    }
    if let Some(c) = subject.chars().find(|c| c.is_whitespace()) {
        return Err(format!("subject {subject:?} contains whitespace ({c:?})"));
    }
    Ok(())
}

/// The header-block rules of async-nats 0.51's `HMSG` parser (`connection.rs`), and the
/// status rule of its pull stream: UTF-8; a first line `NATS/1.0`, optionally followed by a
/// status that must be three digits (a stored event carrying any status but 200 is taken for
/// a server status and swallowed, so it is refused too); every other non-empty line
/// `name:value` (or a continuation line starting with whitespace), the name printable ASCII
/// without `:`; a value (continuations joined, trimmed) without a carriage return (the client
/// asserts that and its connection task panics).
pub fn check_headers(block: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(block).map_err(|e| {
        format!(
            "header block is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    let mut lines = text.lines().peekable();
    let version = lines
        .next()
        .ok_or_else(|| "header block has no version line".to_owned())?;
    let suffix = version
        .strip_prefix("NATS/1.0")
        .ok_or_else(|| format!("header version line {version:?} does not begin with NATS/1.0"))?
        .trim();
    let status = suffix
        .split_once(' ')
        .map_or(suffix, |(status, _)| status.trim());
    if !status.is_empty() {
        let b = status.as_bytes();
        let digits =
            b.len() == 3 && (b'1'..=b'9').contains(&b[0]) && b[1..].iter().all(u8::is_ascii_digit);
        if !digits {
            return Err(format!(
                "header status {status:?} is not a three-digit status code"
            ));
        }
        if status != "200" {
            return Err(format!(
                "header carries status {status}, which the client takes for a server status rather than an event"
            ));
        }
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line {line:?} has no ':'"))?;
        if name.contains(|c: char| !c.is_ascii_graphic() || c == ':') {
            return Err(format!(
                "header name {name:?} holds characters other than printable ASCII"
            ));
        }
        let mut value = value.trim_start().to_owned();
        while let Some(more) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            value.push_str(more);
        }
        if value.trim_end().contains(['\r', '\n']) {
            return Err(format!(
                "header {name:?} has a carriage return in its value"
            ));
        }
    }
    Ok(())
}

/// A stored message as the message-get API returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its stream sequence.
    pub seq: u64,
    /// Its subject (bytes that are not UTF-8 come back as U+FFFD).
    pub subject: String,
    /// Its raw header block (`NATS/1.0\r\n…`), if it has one.
    pub headers: Option<Vec<u8>>,
    /// Its body.
    pub payload: Vec<u8>,
}

/// Which stored message to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The first message at or after `seq` whose subject matches `filter` (wildcards allowed).
    NextAfter {
        /// The first sequence to consider.
        seq: u64,
        /// The subject filter.
        filter: &'a str,
    },
    /// The last message on `subject`.
    LastFor(&'a str),
}

#[derive(Deserialize)]
struct GetReply {
    message: Stored,
}

#[derive(Deserialize)]
struct Stored {
    subject: String,
    seq: u64,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

/// The stored message of `stream` that `lookup` names, read through
/// `$JS.API.STREAM.MSG.GET.<stream>` (a JSON reply with the header block and body in base64,
/// never through the client's message parser, which drops the connection on a message it
/// refuses); `None` when there is none.
pub async fn fetch(
    js: &jetstream::Context,
    stream: &str,
    lookup: Lookup<'_>,
) -> Result<Option<StoredMessage>, Error> {
    let request = match lookup {
        Lookup::NextAfter { seq, filter } => {
            serde_json::json!({ "seq": seq, "next_by_subj": filter })
        }
        Lookup::LastFor(subject) => serde_json::json!({ "last_by_subj": subject }),
    };
    let reply: Response<GetReply> = js
        .request(format!("STREAM.MSG.GET.{stream}"), &request)
        .await
        .map_err(|e| Error::nats("stream message get", e))?;
    let stored = match reply {
        Response::Ok(reply) => reply.message,
        Response::Err { error } if error.error_code().0 == NO_MESSAGE_FOUND => return Ok(None),
        Response::Err { error } => return Err(Error::nats("stream message get", error)),
    };
    let b64 = |field: &str, text: Option<String>| -> Result<Option<Vec<u8>>, Error> {
        text.map(|t| base64::engine::general_purpose::STANDARD.decode(t))
            .transpose()
            .map_err(|e| Error::nats("stream message get", BadReply(format!("{field}: {e}"))))
    };
    Ok(Some(StoredMessage {
        seq: stored.seq,
        subject: stored.subject,
        headers: b64("hdrs", stored.hdrs)?.filter(|h| !h.is_empty()),
        payload: b64("data", stored.data)?.unwrap_or_default(),
    }))
}

/// A message-get reply that is not what the API documents.
#[derive(Debug, thiserror::Error)]
#[error("unexpected message-get reply: {0}")]
struct BadReply(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_blocks_the_client_refuses() {
        for (block, want) in [
            (
                &b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n"[..],
                "not valid UTF-8",
            ),
            (b"NATS/1.0\r\nno colon here\r\n\r\n", "has no ':'"),
            (b"NATS/1.0\r\nBad Name: v\r\n\r\n", "printable ASCII"),
            (b"NATS/1.0\r\nBad\x01: v\r\n\r\n", "printable ASCII"),
            (b"NATS/2.0\r\n\r\n", "does not begin with NATS/1.0"),
            (b"", "no version line"),
            (b"NATS/1.0 4x4 Nope\r\n\r\n", "not a three-digit"),
            (b"NATS/1.0 0123\r\n\r\n", "not a three-digit"),
            (b"NATS/1.0 404 No Messages\r\n\r\n", "status 404"),
            (b"NATS/1.0\r\nX: a\rb\r\n\r\n", "carriage return"),
        ] {
            let err = check_headers(block).unwrap_err();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(block)
            );
        }
    }

    #[test]
    fn header_blocks_the_client_accepts() {
        for block in [
            &b"NATS/1.0\r\n\r\n"[..],
            b"NATS/1.0\r\nJetsync-Format: postcard/1\r\nNats-Msg-Id: a:b\r\n\r\n",
            b"NATS/1.0 200\r\nX: 1\r\n\r\n",
            b"NATS/1.0\r\nX: folded\r\n  continued\r\n\r\n",
            b"NATS/1.0\r\nX:\r\n\r\n",
            b"NATS/1.0\r\nX: trailing\r\r\n\r\n",
            "NATS/1.0\r\nX: ünïcödé value\r\n\r\n".as_bytes(),
        ] {
            assert_eq!(
                check_headers(block),
                Ok(()),
                "{:?}",
                String::from_utf8_lossy(block)
            );
        }
    }

    /// The validator agrees with the client library's own header parsing: whatever it accepts,
    /// async-nats builds a header map from without panicking.
    #[test]
    fn accepted_headers_parse_in_the_client() {
        let header = async_nats::HeaderMap::new();
        assert!(header.is_empty());
        for name in ["Jetsync-Format", "X-Y_z.1", "!#$%&'*+-.^_`|~"] {
            assert!(name.parse::<async_nats::HeaderName>().is_ok(), "{name}");
            let block = format!("NATS/1.0\r\n{name}: v\r\n\r\n");
            assert_eq!(check_headers(block.as_bytes()), Ok(()));
        }
        for name in ["Bad Name", "Bad\u{7f}", "Ünï"] {
            assert!(name.parse::<async_nats::HeaderName>().is_err(), "{name}");
            let block = format!("NATS/1.0\r\n{name}: v\r\n\r\n");
            assert!(check_headers(block.as_bytes()).is_err(), "{name}");
        }
    }

    #[test]
    fn subjects_the_client_refuses() {
        assert_eq!(check_subject("g.items.a"), Ok(()));
        assert_eq!(check_subject("g.items.ünï"), Ok(()));
        assert!(check_subject("g.items.\u{FFFD}")
            .unwrap_err()
            .contains("not valid UTF-8"));
        assert!(check_subject("g.items.a\u{a0}b")
            .unwrap_err()
            .contains("whitespace"));
        assert!(check_subject("").is_err());
        assert_eq!(refusal("g.items.a", None), None);
        assert!(refusal("g.items.a", Some(b"NATS/1.0\r\nX\r\n\r\n")).is_some());
    }
}
