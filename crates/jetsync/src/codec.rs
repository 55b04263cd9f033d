//! Event bodies on the wire: `postcard/1` and `json/1` (DESIGN section 3).
//!
//! This is the only module that knows how an [`Event`] is laid out in bytes, so changing the
//! binary codec stays a one-file change. The format travels in the [`FORMAT_HEADER`] header.
//!
//! # `postcard/1`
//!
//! The Rust client's default: a [postcard] encoding of a private wire struct
//! `(op, row: Option<[(column, value)]>, origin, ts_ms, schema)`. Nested JSON values are carried
//! as JSON text because postcard cannot carry `serde_json::Value` (it is self-describing).
//! Anything after the struct is an error, as is an upsert without a row, a delete with one, or a
//! column that appears twice.
//!
//! # `json/1`
//!
//! For publishers in other languages:
//!
//! ```json
//! {"op":"upsert","row":{"sku":"A-1","name":"Chair","price":12.5},"origin":"catalog-2","ts_ms":1764000000000,"schema":1}
//! ```
//!
//! `op` is required; `row` is required for an upsert and must be absent (or `null`) for a delete;
//! `origin`, `ts_ms` and `schema` may be absent or `null` and then default to `""`, 0 and 1. A
//! field given twice, or a column given twice within `row`, is an error. Unknown top-level fields
//! are ignored, so a newer publisher may add fields older readers skip (forward compatibility).
//! Writing, the row's columns come out in column-name order.
//!
//! Column values map to and from JSON as follows:
//!
//! | [`Value`]            | JSON                                             |
//! |----------------------|--------------------------------------------------|
//! | `Null`               | `null`                                           |
//! | `Bool`               | `true` / `false`                                 |
//! | `I64`                | a number without fraction or exponent            |
//! | `F64`                | a number (always written with a fraction or exponent); must be finite |
//! | `Text`               | a string                                         |
//! | `Bytes`              | `{"$bytes":"<base64url>"}`                        |
//! | `Json`               | the JSON value itself                            |
//!
//! Reading, a number that fits an `i64` becomes `I64` and any other number (fractions, exponents,
//! integers beyond the `i64` range) becomes `F64`; strings become `Text`; objects and arrays become
//! `Json`. JSON has no bytes, so a column value that is an object with the single key `"$bytes"`
//! and a string value is read as base64url (padding optional) and becomes `Bytes`; writing uses
//! unpadded base64url. Only a whole column value has this meaning, never a value nested deeper.
//!
//! Consequences: a `Json` value holding a scalar (`Json(5)`, `Json("x")`, `Json(null)`) is read
//! back as the matching scalar variant; a `Json` column value of exactly the `$bytes` shape cannot
//! be written ([`EncodeError::ReservedBytesShape`]), nor can a non-finite float
//! ([`EncodeError::NonFiniteFloat`]); `postcard/1` carries both.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::event::{Change, Event, Op};
use crate::value::{Row, Value};

/// Name of the NATS header that says how the body is encoded.
pub const FORMAT_HEADER: &str = "Jetsync-Format";

/// The key of json/1's bytes wrapper object, `{"$bytes":"<base64url>"}`.
pub(crate) const BYTES_KEY: &str = "$bytes";

/// Base64url for `$bytes` values: writes unpadded, reads with or without padding (other
/// languages' standard libraries often pad).
const BYTES_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// An event body encoding, named by the [`FORMAT_HEADER`] header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Format {
    /// `postcard/1`: compact binary, the Rust client's default.
    #[default]
    #[serde(rename = "postcard/1")]
    Postcard1,
    /// `json/1`: JSON text, for publishers in other languages.
    #[serde(rename = "json/1")]
    Json1,
}

impl Format {
    /// The header value naming this format: `"postcard/1"` or `"json/1"`.
    pub fn header_value(self) -> &'static str {
        match self {
            Format::Postcard1 => "postcard/1",
            Format::Json1 => "json/1",
        }
    }

    /// Reads a [`FORMAT_HEADER`] value (exact, case-sensitive).
    pub fn parse(value: &str) -> Result<Format, DecodeError> {
        match value {
            "postcard/1" => Ok(Format::Postcard1),
            "json/1" => Ok(Format::Json1),
            _ => Err(DecodeError::UnknownFormat {
                value: value.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.header_value())
    }
}

impl FromStr for Format {
    type Err = DecodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::parse(s)
    }
}

/// Why an event body could not be read. Every variant makes the event a poison event.
#[non_exhaustive]
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The message has no [`FORMAT_HEADER`] header.
    #[error("message has no Jetsync-Format header; expected \"postcard/1\" or \"json/1\"")]
    MissingFormat,
    /// The [`FORMAT_HEADER`] header names a format this version does not know.
    #[error("unknown Jetsync-Format {value:?}; this version reads \"postcard/1\" and \"json/1\"")]
    UnknownFormat {
        /// The header value.
        value: String,
    },
    /// The row has more columns than the reader's [`DecodeLimits::max_columns`]; the row was
    /// not built.
    #[error("row has {columns} columns, more than the limit of {max}")]
    TooManyColumns {
        /// How many columns the body holds.
        columns: u64,
        /// The limit.
        max: usize,
    },
    /// The body is not a valid event in the named format.
    #[error("malformed {format} event body: {reason}")]
    Malformed {
        /// The format the body was read as.
        format: Format,
        /// What is wrong.
        reason: String,
    },
}

/// Why an event could not be encoded.
#[non_exhaustive]
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// json/1 cannot carry NaN or infinities; use postcard/1 or store null.
    #[error(
        "column {column:?} holds a non-finite float, which json/1 cannot carry; \
         use postcard/1 or store null instead"
    )]
    NonFiniteFloat {
        /// The offending column.
        column: String,
    },
    /// A json column value of the shape `{"$bytes": "<string>"}`, which json/1 reserves for bytes
    /// values and would read back as bytes.
    #[error(
        "column {column:?} holds a JSON object whose only key is \"$bytes\" with a string value; \
         json/1 reserves that shape for bytes values, so rename the key or use postcard/1"
    )]
    ReservedBytesShape {
        /// The offending column.
        column: String,
    },
    /// The serializer failed (not expected for well-formed values).
    #[error("could not encode event as {format}: {reason}")]
    Failed {
        /// The format being written.
        format: Format,
        /// The serializer's message.
        reason: String,
    },
}

/// Encodes `event` in `format`.
pub fn encode(event: &Event, format: Format) -> Result<Vec<u8>, EncodeError> {
    encode_ref(EventRef::of(event), format)
}

/// An event by reference: the same fields as [`Event`], borrowed, so that a publisher (or a sink
/// storing rows in the wire encoding) can encode a row it does not own without copying it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventRef<'a> {
    /// The new row of an upsert; `None` for a delete.
    pub row: Option<&'a Row>,
    /// Id of the publishing instance.
    pub origin: &'a str,
    /// The publisher's wall clock in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Per-table schema version of the row.
    pub schema: u32,
}

impl<'a> EventRef<'a> {
    /// A view of `event`.
    pub fn of(event: &'a Event) -> EventRef<'a> {
        EventRef {
            row: event.row(),
            origin: &event.origin,
            ts_ms: event.ts_ms,
            schema: event.schema,
        }
    }

    fn op(&self) -> Op {
        if self.row.is_some() {
            Op::Upsert
        } else {
            Op::Delete
        }
    }
}

/// Encodes the event `event` borrows in `format`: the same bytes [`encode`] writes for the
/// equal [`Event`].
pub fn encode_ref(event: EventRef<'_>, format: Format) -> Result<Vec<u8>, EncodeError> {
    let failed = |reason: String| EncodeError::Failed { format, reason };
    match format {
        Format::Postcard1 => {
            let wire = WireEventRef {
                op: WireOp::from(event.op()),
                row: event.row.map(WireRowRef),
                origin: event.origin,
                ts_ms: event.ts_ms,
                schema: event.schema,
            };
            postcard::to_allocvec(&wire).map_err(|e| failed(e.to_string()))
        }
        Format::Json1 => {
            if let Some(row) = event.row {
                check_json_row(row)?;
            }
            serde_json::to_vec(&JsonEventRef(event)).map_err(|e| failed(e.to_string()))
        }
    }
}

/// How deeply JSON values (a json/1 body, a json value inside a postcard/1 body) may nest. It is
/// serde_json's own recursion limit, which both decoders rely on: a body nested deeper is
/// [`DecodeError::Malformed`], never a stack overflow (pinned by the `deep_nesting_*` tests).
pub const MAX_JSON_DEPTH: usize = 128;

/// Bounds a reader of untrusted bodies sets on what a decoder builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// The most columns a row may have; a body with more is refused with
    /// [`DecodeError::TooManyColumns`] before its row is built (postcard/1 reads the count
    /// from the row's length prefix; json/1 counts the remaining keys without keeping them).
    pub max_columns: usize,
}

impl Default for DecodeLimits {
    /// No column limit.
    fn default() -> Self {
        DecodeLimits {
            max_columns: usize::MAX,
        }
    }
}

/// Decodes a body in `format`.
pub fn decode(body: &[u8], format: Format) -> Result<Event, DecodeError> {
    decode_with(body, format, DecodeLimits::default())
}

/// Decodes a body in `format` within `limits`.
pub fn decode_with(
    body: &[u8],
    format: Format,
    limits: DecodeLimits,
) -> Result<Event, DecodeError> {
    match format {
        Format::Postcard1 => decode_postcard(body, limits),
        Format::Json1 => decode_json(body, limits),
    }
}

/// Decodes a message body given the value of its [`FORMAT_HEADER`] header, if any.
pub fn decode_message(format_header: Option<&str>, body: &[u8]) -> Result<Event, DecodeError> {
    decode_message_with(format_header, body, DecodeLimits::default())
}

/// [`decode_message`] within `limits`.
pub fn decode_message_with(
    format_header: Option<&str>,
    body: &[u8],
    limits: DecodeLimits,
) -> Result<Event, DecodeError> {
    let format = Format::parse(format_header.ok_or(DecodeError::MissingFormat)?)?;
    decode_with(body, format, limits)
}

fn malformed(format: Format, reason: impl fmt::Display) -> DecodeError {
    DecodeError::Malformed {
        format,
        reason: reason.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// postcard/1
//
// postcard writes structs as their fields in declaration order and enums as a varint variant
// index, so the field order and the variant order of the wire types below ARE the wire format:
// never reorder or remove fields or variants. New value kinds may only be appended as new
// variants (old readers then reject such events as malformed, which parks them, not crashes).
// The `*Ref` types (encoding, borrowing) and the owned types (decoding) must stay identical in
// shape; the `wire_shapes_match` and `postcard_golden` tests pin that.
// ---------------------------------------------------------------------------------------------

/// The kind of change. Variants may only be appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum WireOp {
    Upsert,
    Delete,
}

impl From<Op> for WireOp {
    fn from(op: Op) -> Self {
        match op {
            Op::Upsert => WireOp::Upsert,
            Op::Delete => WireOp::Delete,
        }
    }
}

/// The event as written. Fields may never be reordered.
#[derive(Serialize)]
struct WireEventRef<'a> {
    op: WireOp,
    row: Option<WireRowRef<'a>>,
    origin: &'a str,
    ts_ms: u64,
    schema: u32,
}

/// The event as read; same shape as [`WireEventRef`].
#[derive(Deserialize)]
struct WireEvent<'a> {
    op: WireOp,
    #[serde(borrow)]
    row: Option<Vec<(String, WireValue<'a>)>>,
    origin: String,
    ts_ms: u64,
    schema: u32,
}

/// A row, written as a sequence of `(column, value)` pairs in column order.
struct WireRowRef<'a>(&'a Row);

impl Serialize for WireRowRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.0
                .iter()
                .map(|(column, value)| (column.as_str(), WireValueRef::from(value))),
        )
    }
}

/// A column value as written. Variants may only be appended.
#[derive(Serialize)]
enum WireValueRef<'a> {
    Null,
    Bool(bool),
    I64(i64),
    F64(f64),
    Text(&'a str),
    Bytes(#[serde(serialize_with = "serialize_bytes")] &'a [u8]),
    /// JSON text.
    Json(#[serde(serialize_with = "serialize_json_text")] &'a serde_json::Value),
}

/// A column value as read; same shape as [`WireValueRef`].
#[derive(Deserialize)]
enum WireValue<'a> {
    Null,
    Bool(bool),
    I64(i64),
    F64(f64),
    Text(String),
    Bytes(#[serde(deserialize_with = "deserialize_bytes")] Vec<u8>),
    /// JSON text.
    Json(&'a str),
}

impl<'a> From<&'a Value> for WireValueRef<'a> {
    fn from(value: &'a Value) -> Self {
        match value {
            Value::Null => WireValueRef::Null,
            Value::Bool(b) => WireValueRef::Bool(*b),
            Value::I64(i) => WireValueRef::I64(*i),
            Value::F64(f) => WireValueRef::F64(*f),
            Value::Text(s) => WireValueRef::Text(s),
            Value::Bytes(b) => WireValueRef::Bytes(b),
            Value::Json(j) => WireValueRef::Json(j),
        }
    }
}

fn serialize_bytes<S: Serializer>(bytes: &&[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes)
}

fn serialize_json_text<S: Serializer>(
    json: &&serde_json::Value,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let text = serde_json::to_string(json).map_err(serde::ser::Error::custom)?;
    serializer.serialize_str(&text)
}

fn deserialize_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }

    deserializer.deserialize_byte_buf(BytesVisitor)
}

/// The column count a postcard/1 upsert body announces (the length prefix of its row), read
/// before anything is built. `None` for anything else (a delete, a body too short or malformed:
/// the decoder reports those).
fn postcard_row_len(body: &[u8]) -> Option<u64> {
    // op = Upsert (varint 0), row = Some (1), then the row's length as a varint.
    let rest = body.strip_prefix(&[0, 1])?;
    let mut n: u64 = 0;
    for (i, &byte) in rest.iter().take(10).enumerate() {
        n |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

fn decode_postcard(body: &[u8], limits: DecodeLimits) -> Result<Event, DecodeError> {
    const F: Format = Format::Postcard1;
    if let Some(columns) = postcard_row_len(body) {
        if columns > limits.max_columns as u64 {
            return Err(DecodeError::TooManyColumns {
                columns,
                max: limits.max_columns,
            });
        }
    }
    let (wire, rest): (WireEvent<'_>, &[u8]) =
        postcard::take_from_bytes(body).map_err(|e| malformed(F, e))?;
    if !rest.is_empty() {
        return Err(malformed(
            F,
            format_args!("{} trailing bytes after the event", rest.len()),
        ));
    }
    let change = match (wire.op, wire.row) {
        (WireOp::Upsert, Some(columns)) => {
            let mut row = Row::new();
            for (column, value) in columns {
                let value = match value {
                    WireValue::Null => Value::Null,
                    WireValue::Bool(b) => Value::Bool(b),
                    WireValue::I64(i) => Value::I64(i),
                    WireValue::F64(f) => Value::F64(f),
                    WireValue::Text(s) => Value::Text(s),
                    WireValue::Bytes(b) => Value::Bytes(b),
                    WireValue::Json(text) => {
                        Value::Json(serde_json::from_str(text).map_err(|e| {
                            malformed(F, format_args!("column {column:?}: invalid JSON text: {e}"))
                        })?)
                    }
                };
                if let Some(column) = insert_new(&mut row, column, value) {
                    return Err(malformed(
                        F,
                        format_args!("column {column:?} appears twice"),
                    ));
                }
            }
            Change::Upsert(row)
        }
        (WireOp::Upsert, None) => return Err(malformed(F, "an upsert event has no row")),
        (WireOp::Delete, None) => Change::Delete,
        (WireOp::Delete, Some(_)) => return Err(malformed(F, "a delete event carries a row")),
    };
    Ok(Event {
        change,
        origin: wire.origin,
        ts_ms: wire.ts_ms,
        schema: wire.schema,
    })
}

/// Inserts a column that must not exist yet; returns the column name if it did.
fn insert_new(row: &mut Row, column: String, value: Value) -> Option<String> {
    use std::collections::btree_map::Entry;
    match row.entry(column) {
        Entry::Vacant(slot) => {
            slot.insert(value);
            None
        }
        Entry::Occupied(slot) => Some(slot.key().clone()),
    }
}

// ---------------------------------------------------------------------------------------------
// json/1
// ---------------------------------------------------------------------------------------------

/// Writes `{"op":…,"row":…,"origin":…,"ts_ms":…,"schema":…}` straight from the event.
struct JsonEventRef<'a>(EventRef<'a>);

impl Serialize for JsonEventRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let event = &self.0;
        let row = event.row;
        let mut map = serializer.serialize_map(Some(if row.is_some() { 5 } else { 4 }))?;
        map.serialize_entry("op", &event.op())?;
        if let Some(row) = row {
            map.serialize_entry("row", &JsonRowRef(row))?;
        }
        map.serialize_entry("origin", event.origin)?;
        map.serialize_entry("ts_ms", &event.ts_ms)?;
        map.serialize_entry("schema", &event.schema)?;
        map.end()
    }
}

/// A row as a JSON object.
struct JsonRowRef<'a>(&'a Row);

impl Serialize for JsonRowRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, JsonValueRef(v))))
    }
}

/// One column value in its json/1 form (see the module docs). This is the single definition of
/// the value → JSON mapping; [`value_to_json`] goes through it too.
struct JsonValueRef<'a>(&'a Value);

impl Serialize for JsonValueRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::I64(i) => serializer.serialize_i64(*i),
            // serde_json writes non-finite floats as null; `encode` rejects them before.
            Value::F64(f) => serializer.serialize_f64(*f),
            Value::Text(s) => serializer.serialize_str(s),
            Value::Bytes(b) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(BYTES_KEY, &BYTES_B64.encode(b))?;
                map.end()
            }
            Value::Json(j) => j.serialize(serializer),
        }
    }
}

/// The json/1 form of one column value. Lossy where json/1 cannot carry the value: non-finite
/// floats become `null`, and a `Json` value of the `$bytes` shape is written unchanged (it would
/// be read back as bytes). [`encode`] rejects both instead.
pub(crate) fn value_to_json(value: &Value) -> serde_json::Value {
    // Cannot fail: every map written has string keys.
    serde_json::to_value(JsonValueRef(value)).unwrap_or(serde_json::Value::Null)
}

/// The string of a `{"$bytes": "<string>"}` object, if `map` has exactly that shape.
fn bytes_shape(map: &serde_json::Map<String, serde_json::Value>) -> Option<&str> {
    match map.get(BYTES_KEY) {
        Some(serde_json::Value::String(s)) if map.len() == 1 => Some(s),
        _ => None,
    }
}

/// Reads one json/1 column value (see the module docs). The error is the reason a `$bytes`
/// wrapper could not be decoded.
pub(crate) fn value_from_json(json: serde_json::Value) -> Result<Value, String> {
    Ok(match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::I64(i),
            (None, Some(f)) => Value::F64(f),
            (None, None) => Value::Json(serde_json::Value::Number(n)),
        },
        serde_json::Value::String(s) => Value::Text(s),
        serde_json::Value::Object(map) => match bytes_shape(&map) {
            Some(b64) => Value::Bytes(
                BYTES_B64
                    .decode(b64)
                    .map_err(|e| format!("\"{BYTES_KEY}\" value is not base64url: {e}"))?,
            ),
            None => Value::Json(serde_json::Value::Object(map)),
        },
        array @ serde_json::Value::Array(_) => Value::Json(array),
    })
}

/// Rejects values json/1 cannot carry faithfully.
fn check_json_row(row: &Row) -> Result<(), EncodeError> {
    for (column, value) in row {
        match value {
            Value::F64(f) if !f.is_finite() => {
                return Err(EncodeError::NonFiniteFloat {
                    column: column.clone(),
                })
            }
            Value::Json(serde_json::Value::Object(map)) if bytes_shape(map).is_some() => {
                return Err(EncodeError::ReservedBytesShape {
                    column: column.clone(),
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// The event as read. Unknown fields are ignored on purpose (forward compatibility: a newer
/// publisher may add fields older readers can skip). Duplicate fields are an error.
#[derive(Deserialize)]
struct JsonEvent {
    op: Op,
    #[serde(default)]
    row: Option<JsonRow>,
    #[serde(default)]
    origin: Option<String>,
    #[serde(default)]
    ts_ms: Option<u64>,
    #[serde(default)]
    schema: Option<u32>,
}

/// A json/1 row object read straight into a [`Row`], rejecting duplicate columns (which a JSON
/// object may syntactically have, and which would otherwise silently keep the last).
struct JsonRow(Row);

impl<'de> Deserialize<'de> for JsonRow {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RowVisitor;

        impl<'de> Visitor<'de> for RowVisitor {
            type Value = JsonRow;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a row object (column name → value)")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<JsonRow, A::Error> {
                let max = MAX_COLUMNS.with(Cell::get);
                let mut row = Row::new();
                while let Some(column) = access.next_key::<String>()? {
                    if row.len() == max {
                        // Over the limit: count the rest without keeping anything.
                        let mut columns = row.len() as u64 + 1;
                        access.next_value::<de::IgnoredAny>()?;
                        while access.next_key::<de::IgnoredAny>()?.is_some() {
                            access.next_value::<de::IgnoredAny>()?;
                            columns += 1;
                        }
                        TOO_MANY_COLUMNS.with(|c| c.set(Some(columns)));
                        return Err(de::Error::custom("too many columns"));
                    }
                    let json: serde_json::Value = access.next_value()?;
                    let value = value_from_json(json).map_err(|reason| {
                        de::Error::custom(format_args!("column {column:?}: {reason}"))
                    })?;
                    if let Some(column) = insert_new(&mut row, column, value) {
                        return Err(de::Error::custom(format_args!(
                            "column {column:?} appears twice"
                        )));
                    }
                }
                Ok(JsonRow(row))
            }
        }

        deserializer.deserialize_map(RowVisitor)
    }
}

thread_local! {
    /// The column limit of the json/1 decode running on this thread: serde's derived
    /// `Deserialize` cannot carry state down to [`JsonRow`], so [`decode_json`] sets it here.
    static MAX_COLUMNS: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Set by [`JsonRow`] when it refused a row for its column count (the count).
    static TOO_MANY_COLUMNS: Cell<Option<u64>> = const { Cell::new(None) };
}

fn decode_json(body: &[u8], limits: DecodeLimits) -> Result<Event, DecodeError> {
    const F: Format = Format::Json1;
    let previous = MAX_COLUMNS.with(|m| m.replace(limits.max_columns));
    TOO_MANY_COLUMNS.with(|c| c.set(None));
    let parsed = serde_json::from_slice::<JsonEvent>(body);
    MAX_COLUMNS.with(|m| m.set(previous));
    let event = match parsed {
        Ok(event) => event,
        Err(e) => {
            return Err(match TOO_MANY_COLUMNS.with(Cell::take) {
                Some(columns) => DecodeError::TooManyColumns {
                    columns,
                    max: limits.max_columns,
                },
                None => malformed(F, e),
            })
        }
    };
    let change = match (event.op, event.row) {
        (Op::Upsert, Some(JsonRow(row))) => Change::Upsert(row),
        (Op::Upsert, None) => return Err(malformed(F, "an upsert event has no \"row\"")),
        (Op::Delete, None) => Change::Delete,
        (Op::Delete, Some(_)) => return Err(malformed(F, "a delete event carries a \"row\"")),
    };
    Ok(Event {
        change,
        origin: event.origin.unwrap_or_default(),
        ts_ms: event.ts_ms.unwrap_or(0),
        schema: event.schema.unwrap_or(Event::DEFAULT_SCHEMA),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample_row() -> Row {
        let mut row = Row::new();
        row.insert("sku".into(), Value::from("A-1"));
        row.insert("name".into(), Value::from("Chair"));
        row.insert("price".into(), Value::F64(12.5));
        row
    }

    fn sample_event() -> Event {
        Event {
            change: Change::Upsert(sample_row()),
            origin: "catalog-2".into(),
            ts_ms: 1_764_000_000_000,
            schema: 1,
        }
    }

    fn all_kinds_row() -> Row {
        let mut row = Row::new();
        row.insert("n".into(), Value::Null);
        row.insert("b".into(), Value::Bool(true));
        row.insert("i".into(), Value::I64(-7));
        row.insert("f".into(), Value::F64(0.25));
        row.insert("t".into(), Value::from("héllo"));
        row.insert("y".into(), Value::Bytes(vec![0, 1, 2, 255]));
        row.insert("j".into(), Value::Json(json!({"a": [1, 2.5, null, "x"]})));
        row
    }

    #[test]
    fn encode_ref_writes_the_bytes_of_encode() {
        let delete = Event {
            change: Change::Delete,
            origin: "o".into(),
            ts_ms: 3,
            schema: 2,
        };
        let all = Event {
            change: Change::Upsert(all_kinds_row()),
            ..sample_event()
        };
        for event in [sample_event(), delete, all] {
            for format in [Format::Postcard1, Format::Json1] {
                let borrowed = EventRef {
                    row: event.row(),
                    origin: &event.origin,
                    ts_ms: event.ts_ms,
                    schema: event.schema,
                };
                assert_eq!(
                    encode_ref(borrowed, format).unwrap(),
                    encode(&event, format).unwrap(),
                    "{format}"
                );
            }
        }
    }

    #[test]
    fn format_header_values() {
        assert_eq!(Format::default(), Format::Postcard1);
        for f in [Format::Postcard1, Format::Json1] {
            assert_eq!(Format::parse(f.header_value()), Ok(f));
            assert_eq!(f.to_string().parse::<Format>(), Ok(f));
        }
        assert_eq!(
            Format::parse("bincode/1"),
            Err(DecodeError::UnknownFormat {
                value: "bincode/1".into()
            })
        );
        assert_eq!(serde_json::to_string(&Format::Json1).unwrap(), "\"json/1\"");
    }

    #[test]
    fn design_example_decodes() {
        let body = br#"{"op":"upsert","row":{"sku":"A-1","name":"Chair","price":12.5},"origin":"catalog-2","ts_ms":1764000000000,"schema":1}"#;
        assert_eq!(decode(body, Format::Json1).unwrap(), sample_event());
        assert_eq!(
            decode_message(Some("json/1"), body).unwrap(),
            sample_event()
        );
    }

    #[test]
    fn json_encoding_is_the_documented_shape() {
        let text = String::from_utf8(encode(&sample_event(), Format::Json1).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"op":"upsert","row":{"name":"Chair","price":12.5,"sku":"A-1"},"origin":"catalog-2","ts_ms":1764000000000,"schema":1}"#
        );
        let del = Event {
            change: Change::Delete,
            origin: "o".into(),
            ts_ms: 5,
            schema: 2,
        };
        let text = String::from_utf8(encode(&del, Format::Json1).unwrap()).unwrap();
        assert_eq!(text, r#"{"op":"delete","origin":"o","ts_ms":5,"schema":2}"#);
    }

    #[test]
    fn json_defaults_and_unknown_fields() {
        let e = decode(br#"{"op":"delete","future":{"x":1}}"#, Format::Json1).unwrap();
        assert_eq!(
            e,
            Event {
                change: Change::Delete,
                origin: String::new(),
                ts_ms: 0,
                schema: 1
            }
        );
        let e = decode(
            br#"{"op":"delete","row":null,"origin":null}"#,
            Format::Json1,
        )
        .unwrap();
        assert_eq!(e.op(), Op::Delete);
    }

    #[test]
    fn json_rejections() {
        for body in [
            &br#"{"op":"upsert"}"#[..],
            br#"{"op":"upsert","row":null}"#,
            br#"{"op":"upsert","row":[1]}"#,
            br#"{"op":"delete","row":{}}"#,
            br#"{"op":"truncate"}"#,
            br#"{"row":{}}"#,
            br#"{"op":"upsert","row":{"a":1,"a":2}}"#,
            br#"{"op":"upsert","op":"delete","row":{}}"#,
            br#"{"op":"upsert","row":{"a":{"$bytes":"!!"}}}"#,
            br#"{"op":"upsert","row":{},"ts_ms":-1}"#,
            br#"{"op":"upsert","row":{},"schema":4294967296}"#,
            br#"{"op":"upsert","row":{}} x"#,
            b"",
            b"\xff",
            b"[]",
        ] {
            let err = decode(body, Format::Json1).unwrap_err();
            assert!(
                matches!(
                    err,
                    DecodeError::Malformed {
                        format: Format::Json1,
                        ..
                    }
                ),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn json_value_mapping() {
        let body = br#"{"op":"upsert","row":{"i":-3,"big":18446744073709551615,"f":1.0,"e":1e3,
            "s":"x","n":null,"b":false,"o":{"k":1},"a":[1],"y":{"$bytes":"AAH_"},
            "yp":{"$bytes":"AA=="},"notbytes":{"$bytes":1},"two":{"$bytes":"","x":1}}}"#;
        let row = decode(body, Format::Json1).unwrap().row().cloned().unwrap();
        assert_eq!(row["i"], Value::I64(-3));
        assert_eq!(row["big"], Value::F64(18_446_744_073_709_551_615.0));
        assert_eq!(row["f"], Value::F64(1.0));
        assert_eq!(row["e"], Value::F64(1000.0));
        assert_eq!(row["s"], Value::from("x"));
        assert_eq!(row["n"], Value::Null);
        assert_eq!(row["b"], Value::Bool(false));
        assert_eq!(row["o"], Value::Json(json!({"k": 1})));
        assert_eq!(row["a"], Value::Json(json!([1])));
        assert_eq!(row["y"], Value::Bytes(vec![0, 1, 0xff]));
        assert_eq!(row["yp"], Value::Bytes(vec![0]));
        assert_eq!(row["notbytes"], Value::Json(json!({"$bytes": 1})));
        assert_eq!(row["two"], Value::Json(json!({"$bytes": "", "x": 1})));
    }

    #[test]
    fn json_scalars_in_json_values_normalise() {
        let mut row = Row::new();
        row.insert("a".into(), Value::Json(json!(5)));
        row.insert("b".into(), Value::Json(json!("x")));
        row.insert("c".into(), Value::Json(json!(null)));
        let body = encode(&Event::upsert(row, "o"), Format::Json1).unwrap();
        let back = decode(&body, Format::Json1)
            .unwrap()
            .row()
            .cloned()
            .unwrap();
        assert_eq!(back["a"], Value::I64(5));
        assert_eq!(back["b"], Value::from("x"));
        assert_eq!(back["c"], Value::Null);
    }

    #[test]
    fn json_encode_rejections() {
        let mut row = Row::new();
        row.insert("f".into(), Value::F64(f64::NAN));
        assert_eq!(
            encode(&Event::upsert(row.clone(), "o"), Format::Json1),
            Err(EncodeError::NonFiniteFloat { column: "f".into() })
        );
        // postcard carries it.
        let body = encode(&Event::upsert(row, "o"), Format::Postcard1).unwrap();
        let back = decode(&body, Format::Postcard1).unwrap();
        assert!(matches!(back.row().unwrap()["f"], Value::F64(f) if f.is_nan()));

        let mut row = Row::new();
        row.insert("j".into(), Value::Json(json!({"$bytes": "AA"})));
        assert_eq!(
            encode(&Event::upsert(row.clone(), "o"), Format::Json1),
            Err(EncodeError::ReservedBytesShape { column: "j".into() })
        );
        let body = encode(&Event::upsert(row.clone(), "o"), Format::Postcard1).unwrap();
        assert_eq!(decode(&body, Format::Postcard1).unwrap().row(), Some(&row));
        // Nested deeper it is just JSON.
        let mut row = Row::new();
        row.insert("j".into(), Value::Json(json!([{"$bytes": "AA"}])));
        let body = encode(&Event::upsert(row.clone(), "o"), Format::Json1).unwrap();
        assert_eq!(decode(&body, Format::Json1).unwrap().row(), Some(&row));
    }

    #[test]
    fn round_trips_all_kinds() {
        for format in [Format::Postcard1, Format::Json1] {
            let e = Event {
                change: Change::Upsert(all_kinds_row()),
                origin: "x".into(),
                ts_ms: u64::MAX,
                schema: u32::MAX,
            };
            assert_eq!(decode(&encode(&e, format).unwrap(), format).unwrap(), e);
            let d = Event::delete("y");
            assert_eq!(decode(&encode(&d, format).unwrap(), format).unwrap(), d);
        }
    }

    /// Pins the postcard/1 bytes: if this changes, the wire format changed.
    #[test]
    fn postcard_golden() {
        let mut row = Row::new();
        row.insert("a".into(), Value::I64(1));
        row.insert("b".into(), Value::Bytes(vec![7]));
        row.insert("c".into(), Value::Json(json!([true])));
        row.insert("d".into(), Value::Null);
        let e = Event {
            change: Change::Upsert(row),
            origin: "o".into(),
            ts_ms: 300,
            schema: 1,
        };
        let body = encode(&e, Format::Postcard1).unwrap();
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0,                          // op: upsert
            1, 4,                       // row: Some, 4 columns
            1, b'a', 2, 2,              // "a": I64 (zigzag 1 = 2)
            1, b'b', 5, 1, 7,           // "b": Bytes [7]
            1, b'c', 6, 6, b'[', b't', b'r', b'u', b'e', b']', // "c": Json "[true]"
            1, b'd', 0,                 // "d": Null
            1, b'o',                    // origin
            0xac, 0x02,                 // ts_ms 300
            1,                          // schema
        ];
        assert_eq!(body, expected);
        let del = Event {
            change: Change::Delete,
            origin: String::new(),
            ts_ms: 0,
            schema: 1,
        };
        assert_eq!(encode(&del, Format::Postcard1).unwrap(), [1, 0, 0, 0, 1]);
    }

    #[test]
    fn wire_shapes_match() {
        // Every value variant written by WireValueRef is read back as the same variant.
        let e = Event {
            change: Change::Upsert(all_kinds_row()),
            origin: "o".into(),
            ts_ms: 1,
            schema: 1,
        };
        let body = encode(&e, Format::Postcard1).unwrap();
        assert_eq!(decode(&body, Format::Postcard1).unwrap(), e);
    }

    #[test]
    fn postcard_rejections() {
        let body = encode(&sample_event(), Format::Postcard1).unwrap();
        let mut trailing = body.clone();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing, Format::Postcard1),
            Err(DecodeError::Malformed { format: Format::Postcard1, ref reason }) if reason.contains("trailing")
        ));
        for n in 0..body.len() {
            assert!(decode(&body[..n], Format::Postcard1).is_err(), "prefix {n}");
        }
        // upsert without a row / delete with one
        assert!(decode(&[0, 0, 0, 0, 1], Format::Postcard1).is_err());
        assert!(decode(&[1, 1, 0, 0, 0, 1], Format::Postcard1).is_err());
        // duplicate column
        assert!(decode(
            &[0, 1, 2, 1, b'a', 0, 1, b'a', 0, 0, 0, 1],
            Format::Postcard1
        )
        .is_err());
        // unknown op / value variant
        assert!(decode(&[2, 0, 0, 0, 1], Format::Postcard1).is_err());
        assert!(decode(&[0, 1, 1, 1, b'a', 7, 0, 0, 1], Format::Postcard1).is_err());
        // invalid JSON text
        assert!(decode(&[0, 1, 1, 1, b'a', 6, 1, b'{', 0, 0, 1], Format::Postcard1).is_err());
        // valid again for comparison
        assert!(decode(&[0, 1, 1, 1, b'a', 0, 0, 0, 1], Format::Postcard1).is_ok());
    }

    #[test]
    fn decode_message_headers() {
        let body = encode(&sample_event(), Format::Postcard1).unwrap();
        assert_eq!(decode_message(None, &body), Err(DecodeError::MissingFormat));
        assert!(matches!(
            decode_message(Some("postcard/2"), &body),
            Err(DecodeError::UnknownFormat { .. })
        ));
        assert_eq!(
            decode_message(Some("postcard/1"), &body).unwrap(),
            sample_event()
        );
        // The wrong format is a typed error, not a crash.
        assert!(decode_message(Some("json/1"), &body).is_err());
    }

    fn wide_row(columns: usize) -> Event {
        let mut row = Row::new();
        for i in 0..columns {
            row.insert(format!("c{i}"), Value::Null);
        }
        Event {
            change: Change::Upsert(row),
            origin: "o".into(),
            ts_ms: 1,
            schema: 1,
        }
    }

    #[test]
    fn column_limit_is_enforced_by_both_decoders() {
        let limits = DecodeLimits { max_columns: 1000 };
        for format in [Format::Postcard1, Format::Json1] {
            let at = encode(&wide_row(1000), format).unwrap();
            assert!(decode_with(&at, format, limits).unwrap() == wide_row(1000));
            let over = encode(&wide_row(2001), format).unwrap();
            assert_eq!(
                decode_with(&over, format, limits),
                Err(DecodeError::TooManyColumns {
                    columns: 2001,
                    max: 1000
                }),
                "{format}"
            );
            // Without limits the same body decodes, and a delete has no row to count.
            assert!(decode(&over, format).is_ok());
            let del = encode(&Event::delete("o"), format).unwrap();
            assert!(decode_with(&del, format, DecodeLimits { max_columns: 1 }).is_ok());
        }
        // The limit is per call: a later unlimited json/1 decode on this thread is unaffected.
        let over = encode(&wide_row(5), Format::Json1).unwrap();
        assert!(decode_with(&over, Format::Json1, DecodeLimits { max_columns: 2 }).is_err());
        assert!(decode(&over, Format::Json1).is_ok());
    }

    #[test]
    fn a_megabyte_of_null_columns_is_refused_from_its_length_prefix() {
        // postcard/1 announces 200,000 columns up front: refused without reading them (the
        // body is even truncated here, which the prefix check never looks at).
        let body = encode(&wide_row(200_000), Format::Postcard1).unwrap();
        assert!(body.len() > 1_000_000);
        let limits = DecodeLimits { max_columns: 1000 };
        assert_eq!(
            decode_with(&body[..100], Format::Postcard1, limits),
            Err(DecodeError::TooManyColumns {
                columns: 200_000,
                max: 1000
            })
        );
        let json = encode(&wide_row(200_000), Format::Json1).unwrap();
        assert!(matches!(
            decode_with(&json, Format::Json1, limits),
            Err(DecodeError::TooManyColumns {
                columns: 200_000,
                ..
            })
        ));
    }

    #[test]
    fn deep_nesting_is_malformed_not_a_stack_overflow() {
        let depth = 100_000;
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        // json/1: a deeply nested column value.
        let body = format!(r#"{{"op":"upsert","row":{{"a":{nested}}}}}"#);
        let err = decode(body.as_bytes(), Format::Json1).unwrap_err();
        assert!(
            matches!(err, DecodeError::Malformed { ref reason, .. } if reason.contains("recursion limit")),
            "{err}"
        );
        // postcard/1: the same JSON as the text of a json value.
        let mut body = vec![0, 1, 1, 1, b'a', 6];
        let mut len = nested.len();
        while len >= 0x80 {
            body.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        body.push(len as u8);
        body.extend_from_slice(nested.as_bytes());
        body.extend_from_slice(&[0, 0, 1]);
        let err = decode(&body, Format::Postcard1).unwrap_err();
        assert!(
            matches!(err, DecodeError::Malformed { ref reason, .. } if reason.contains("recursion limit")),
            "{err}"
        );
        // Just within the limit still decodes.
        let ok = MAX_JSON_DEPTH - 3;
        let nested = format!("{}{}", "[".repeat(ok), "]".repeat(ok));
        let body = format!(r#"{{"op":"upsert","row":{{"a":{nested}}}}}"#);
        assert!(decode(body.as_bytes(), Format::Json1).is_ok());
    }

    #[test]
    fn value_json_mapping_helpers() {
        assert_eq!(
            value_to_json(&Value::Bytes(vec![0xfb, 0xff])),
            json!({"$bytes": "-_8"})
        );
        assert_eq!(value_to_json(&Value::F64(f64::INFINITY)), json!(null));
        assert_eq!(
            value_from_json(json!({"$bytes": "-_8"})),
            Ok(Value::Bytes(vec![0xfb, 0xff]))
        );
        assert!(value_from_json(json!({"$bytes": "+/8"})).is_err());
    }
}
