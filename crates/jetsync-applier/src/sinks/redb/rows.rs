//! Rows on disk: encoding, the checks that refuse a row before anything is written, and writing a batch or chunk.

use super::*;

/// Applies `changes` to the rows table of an open write transaction: the per-change step shared
/// by [`Sink::apply`] and [`Sink::replace`]. A row that cannot be stored for good is
/// [`SinkError::Rejected`] with its index; the caller then drops (aborts) the transaction.
///
/// The changes are written in key order (a stable sort, so the changes of one row keep their
/// stream order): the transaction's result is the same as in stream order, since rows are
/// independent and this table has no constraints between them, but the B-tree is walked
/// sequentially instead of jumping between leaves, which roughly halves the cost per change of a
/// big catch-up batch. Of several rejected rows, the first in key order is reported.
pub(super) fn apply_changes(
    rows: &mut redb::Table<'_, (&'static str, &'static str), &'static [u8]>,
    changes: &[Change],
) -> Result<(), SinkError> {
    let encoded = encode_changes(changes)?;
    write_encoded(rows, changes, &encoded)
}

/// The largest row this sink stores: redb's value size limit (3 GiB), checked before writing so
/// that a refused row leaves nothing of its batch or chunk behind.
pub(super) const MAX_ROW_BYTES: usize = 3 * 1024 * 1024 * 1024;

/// Encodes every upsert of `changes` (`None` for a delete), refusing a row that cannot be
/// encoded or stored with [`SinkError::Rejected`] before anything is written.
pub(super) fn encode_changes(changes: &[Change]) -> Result<Vec<Option<Vec<u8>>>, SinkError> {
    changes
        .iter()
        .enumerate()
        .map(|(index, change)| match &change.op {
            jetsync::Change::Upsert(row) => {
                let encoded = encode_row(row).map_err(|reason| rejected(index, change, reason))?;
                if encoded.len() > MAX_ROW_BYTES {
                    return Err(rejected(
                        index,
                        change,
                        format!(
                            "the encoded row ({} bytes) exceeds redb's value size limit",
                            encoded.len()
                        ),
                    ));
                }
                Ok(Some(encoded))
            }
            jetsync::Change::Delete => Ok(None),
        })
        .collect()
}

/// Writes `changes` (encoded by [`encode_changes`]) to the rows table, in key order.
pub(super) fn write_encoded(
    rows: &mut redb::Table<'_, (&'static str, &'static str), &'static [u8]>,
    changes: &[Change],
    encoded: &[Option<Vec<u8>>],
) -> Result<(), SinkError> {
    const WHAT: &str = "apply a batch";
    let mut order: Vec<usize> = (0..changes.len()).collect();
    order.sort_by_key(|&i| (changes[i].table.as_str(), changes[i].key.as_str()));
    for index in order {
        let change = &changes[index];
        let key = (change.table.as_str(), change.key.as_str());
        let written = match &encoded[index] {
            Some(bytes) => rows.insert(key, bytes.as_slice()).map(drop),
            None => rows.remove(key).map(drop),
        };
        written.map_err(|e| match e {
            StorageError::ValueTooLarge(len) => rejected(
                index,
                change,
                format!("the encoded row ({len} bytes) exceeds redb's value size limit"),
            ),
            other => sink_error(WHAT, other),
        })?;
    }
    Ok(())
}

/// Adds one to the audit count of every change's sequence (see [`RedbOptions::audit`]).
pub(super) fn count_applied(txn: &WriteTransaction, changes: &[Change]) -> Result<(), SinkError> {
    const WHAT: &str = "count applied sequences";
    let mut audit = txn.open_table(AUDIT).map_err(|e| sink_error(WHAT, e))?;
    for change in changes {
        let count = audit
            .get(change.seq)
            .map_err(|e| sink_error(WHAT, e))?
            .map_or(0, |c| c.value());
        audit
            .insert(change.seq, count + 1)
            .map_err(|e| sink_error(WHAT, e))?;
    }
    Ok(())
}

/// Encodes `row` with jetsync's postcard codec, as the body of an upsert event
/// (origin "", ts 0, schema 1), so the project has one row encoding, not two. Encoded by
/// reference: the row is not copied.
pub(super) fn encode_row(row: &Row) -> Result<Vec<u8>, String> {
    let event = codec::EventRef {
        row: Some(row),
        origin: "",
        ts_ms: 0,
        schema: Event::DEFAULT_SCHEMA,
    };
    codec::encode_ref(event, Format::Postcard1).map_err(|e| e.to_string())
}

/// Decodes a row written by [`encode_row`].
pub(super) fn decode_row(bytes: &[u8]) -> Result<Row, String> {
    match codec::decode(bytes, Format::Postcard1) {
        Ok(Event {
            change: jetsync::Change::Upsert(row),
            ..
        }) => Ok(row),
        Ok(_) => Err("the stored value is a delete, not a row".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

pub(super) fn rejected(index: usize, change: &Change, reason: String) -> SinkError {
    SinkError::Rejected {
        index,
        seq: change.seq,
        table: change.table.clone(),
        key: change.key.clone(),
        reason,
    }
}
