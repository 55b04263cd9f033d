//! Turning one stream message into a [`Change`]: subject → table and key, header → format,
//! body → event. Anything that fails here is a poison event, never a crash.

use jetsync::codec::{self, DecodeLimits};

use crate::{parked::RowId, Change};

/// Why an event cannot be decoded.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum DecodeFailure {
    /// The subject maps to no table and key: the event belongs to no row.
    Subject(String),
    /// The subject names a row but the event itself (format header, body) is unusable.
    Body(RowId, String),
}

impl DecodeFailure {
    /// The reason, for logs and the parked record.
    pub(crate) fn reason(&self) -> &str {
        match self {
            DecodeFailure::Subject(r) | DecodeFailure::Body(_, r) => r,
        }
    }
}

/// The raw parts of an event: what a stream message and a parked event both carry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawEvent<'a> {
    pub seq: u64,
    pub subject: &'a str,
    pub format: Option<&'a str>,
    pub payload: &'a [u8],
}

/// The row a subject of the sync group with `prefix` maps to.
pub(crate) fn row_of(prefix: &str, subject: &str) -> Result<RowId, String> {
    let (table, key) = jetsync::parse_subject(prefix, subject).map_err(|e| e.to_string())?;
    Ok(RowId {
        table: table.as_str().to_owned(),
        key,
    })
}

/// Decodes `event` of the sync group with `prefix` within `limits`.
pub(crate) fn decode(
    prefix: &str,
    event: RawEvent<'_>,
    limits: DecodeLimits,
) -> Result<Change, DecodeFailure> {
    let row = row_of(prefix, event.subject).map_err(DecodeFailure::Subject)?;
    match codec::decode_message_with(event.format, event.payload, limits) {
        Ok(decoded) => Ok(Change {
            seq: event.seq,
            table: row.table,
            key: row.key,
            op: decoded.change,
        }),
        Err(codec::DecodeError::TooManyColumns { columns, max }) => Err(DecodeFailure::Body(
            row,
            format!("row has {columns} columns, more than apply.max_columns ({max})"),
        )),
        Err(e) => Err(DecodeFailure::Body(row, e.to_string())),
    }
}
