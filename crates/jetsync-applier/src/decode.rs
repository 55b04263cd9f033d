//! Turning one stream message into a [`Change`]: subject → table and key, header → format,
//! body → event. Anything that fails here is a poison event, never a crash.

use async_nats::jetstream;
use jetsync::codec::{self, FORMAT_HEADER};

use crate::Change;

/// Decodes `message` (stream sequence `seq`) of the sync group with `prefix`.
pub(crate) fn decode(
    prefix: &str,
    seq: u64,
    message: &jetstream::Message,
) -> Result<Change, String> {
    let subject = message.subject.as_str();
    let (table, key) = jetsync::parse_subject(prefix, subject).map_err(|e| e.to_string())?;
    let format = message
        .headers
        .as_ref()
        .and_then(|h| h.get(FORMAT_HEADER))
        .map(|v| v.as_str());
    let event = codec::decode_message(format, &message.payload).map_err(|e| e.to_string())?;
    Ok(Change {
        seq,
        table: table.as_str().to_owned(),
        key,
        op: event.change,
    })
}
