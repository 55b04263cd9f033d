//! Column values and rows: the data model every codec and every sink speaks.
//!
//! A [`Row`] is an ordered column → [`Value`] map. Columns are kept sorted by name (a `BTreeMap`)
//! so that two instances always see, hash and store a row the same way, whatever order the
//! publisher's struct declared its fields in.

use std::collections::BTreeMap;

/// One column value of a row.
///
/// These are the value kinds of wire format v1 (DESIGN section 3). Nested objects and arrays are
/// carried as [`Value::Json`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL / JSON null / `Option::None`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed 64-bit integer.
    I64(i64),
    /// A 64-bit float.
    F64(f64),
    /// UTF-8 text.
    Text(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// A nested JSON object or array (or any JSON value a publisher chose to keep nested).
    Json(serde_json::Value),
}

/// A row: column name → value, ordered by column name.
pub type Row = BTreeMap<String, Value>;

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::I64(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::I64(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::F64(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}
impl From<serde_json::Value> for Value {
    fn from(v: serde_json::Value) -> Self {
        Value::Json(v)
    }
}
