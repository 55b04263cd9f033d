//! Parked events: poison events (undecodable, unknown format, a subject that maps to no row, a
//! row the sink refuses for good) and the later events of the same row held behind them.
//!
//! They are kept in the instance's redb checkpoint store (see `offsets.rs`) with the error and
//! the raw event, so nothing is lost on bad input and `jetsync-applier parked retry` can apply
//! them once the cause is fixed. A parked event of a row *blocks* that row: every later event of
//! the row is parked behind it (`held_behind`), in stream order, while all other rows keep
//! flowing. An event whose subject maps to no row blocks nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A table and key: the identity of one synced row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RowId {
    /// The table.
    pub table: String,
    /// The decoded key.
    pub key: String,
}

impl std::fmt::Display for RowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.table, self.key)
    }
}

impl std::str::FromStr for RowId {
    type Err = String;

    /// Parses `table/key` (the key may contain further slashes).
    fn from_str(s: &str) -> Result<RowId, String> {
        match s.split_once('/') {
            Some((table, key)) if !table.is_empty() && !key.is_empty() => Ok(RowId {
                table: table.to_owned(),
                key: key.to_owned(),
            }),
            _ => Err(format!("{s:?} is not a row: write it as TABLE/KEY")),
        }
    }
}

/// One parked event, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParkedEvent {
    /// Its stream sequence.
    pub seq: u64,
    /// Its subject.
    pub subject: String,
    /// The row it belongs to, when its subject maps to one.
    pub row: Option<RowId>,
    /// Its `Jetsync-Format` header, if any.
    pub format: Option<String>,
    /// Its `Nats-Msg-Id` header, if any.
    pub msg_id: Option<String>,
    /// The raw body, base64 (standard alphabet) in storage and in `--json` output.
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
    /// Why it was parked (for an event held behind another: the reason it is held).
    pub error: String,
    /// The sequence of the parked event of the same row this one is held behind, if it is
    /// held rather than poison itself.
    pub held_behind: Option<u64>,
    /// When it was parked (milliseconds since the Unix epoch).
    pub parked_at_ms: u64,
    /// The raw header block (`NATS/1.0\r\n…`) of a message the NATS client library could not
    /// parse, fetched through the stream's message-get API; base64 like `payload`. `None` for
    /// every other event (whose headers the other fields carry), and in records written before
    /// this field existed.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub raw_headers: Option<Vec<u8>>,
    /// The transaction (its `Nats-Batch-Id`) the event belongs to, if any. A transaction is
    /// parked whole when any member is, and `parked retry` applies it whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<String>,
}

impl ParkedEvent {
    /// Serialises for storage.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a parked event always serialises")
    }

    /// Reads a stored event.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<ParkedEvent, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable parked event: {e}"))
    }

    /// A short, printable view of the body (lossy UTF-8, at most `max` characters).
    pub fn payload_preview(&self, max: usize) -> String {
        let text = String::from_utf8_lossy(&self.payload);
        let mut out: String = text.chars().take(max).collect();
        if text.chars().count() > max {
            out.push('…');
        }
        out
    }
}

/// Parked events grouped by row, in sequence order; events without a row come under `None`.
pub fn group_by_row(events: &[ParkedEvent]) -> BTreeMap<Option<RowId>, Vec<&ParkedEvent>> {
    let mut rows: BTreeMap<Option<RowId>, Vec<&ParkedEvent>> = BTreeMap::new();
    for e in events {
        rows.entry(e.row.clone()).or_default().push(e);
    }
    for list in rows.values_mut() {
        list.sort_by_key(|e| e.seq);
    }
    rows
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(bytes) => super::b64::serialize(bytes, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_ids_parse_and_print() {
        let row: RowId = "items/a/b".parse().unwrap();
        assert_eq!(row.table, "items");
        assert_eq!(row.key, "a/b");
        assert_eq!(row.to_string(), "items/a/b");
        assert!("items".parse::<RowId>().is_err());
        assert!("/k".parse::<RowId>().is_err());
    }

    #[test]
    fn parked_events_round_trip_with_binary_bodies() {
        let e = ParkedEvent {
            seq: 7,
            subject: "g.items.A".into(),
            row: Some(RowId {
                table: "items".into(),
                key: "A".into(),
            }),
            format: None,
            msg_id: Some("m".into()),
            payload: vec![0, 159, 146, 150, 255],
            error: "missing Jetsync-Format".into(),
            held_behind: None,
            parked_at_ms: 1,
            raw_headers: None,
            txn: None,
        };
        assert_eq!(ParkedEvent::from_bytes(&e.to_bytes()).unwrap(), e);
        assert!(ParkedEvent::from_bytes(b"nope").is_err());
        // Raw header bytes round-trip, and a record without the field reads as None.
        let raw = ParkedEvent {
            raw_headers: Some(b"NATS/1.0\r\nX-Bad: \xff\r\n\r\n".to_vec()),
            ..e.clone()
        };
        assert_eq!(ParkedEvent::from_bytes(&raw.to_bytes()).unwrap(), raw);
        let old = br#"{"seq":7,"subject":"g.items.A","row":{"table":"items","key":"A"},"format":null,"msg_id":"m","payload":"AJ+Slv8=","error":"missing Jetsync-Format","held_behind":null,"parked_at_ms":1}"#;
        assert_eq!(ParkedEvent::from_bytes(old).unwrap(), e);
    }
}
