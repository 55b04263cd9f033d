//! Row images as the SQLite triggers write them, turned into jetsync rows.
//!
//! SQLite's JSON cannot hold a BLOB (`json_object` raises an error, which would fail the
//! service's own write) and prints a REAL with 15 significant digits, which does not always
//! round-trip. So the triggers write a BLOB as `{"$hex": "<HEX>"}` and a REAL as
//! `{"$real": "<17 significant digits>"}`; INTEGER, TEXT and NULL are plain JSON values. Every
//! value keeps its SQLite storage class on every instance (the convergence rule).

use jetsync::{Row, Value};

/// The marker of an encoded BLOB.
pub(super) const HEX: &str = "$hex";
/// The marker of an encoded REAL.
pub(super) const REAL: &str = "$real";

/// SQL turning column `column` of `NEW`/`OLD` (`prefix`) into its JSON image value.
pub(super) fn sqlite_value_sql(prefix: &str, quoted_column: &str) -> String {
    let v = format!("{prefix}.{quoted_column}");
    format!(
        "CASE typeof({v}) WHEN 'blob' THEN json_object('{HEX}', hex({v})) \
         WHEN 'real' THEN json_object('{REAL}', printf('%!.17g', {v})) ELSE {v} END"
    )
}

/// Decodes a row image written by the SQLite triggers.
pub(super) fn decode_sqlite_row(text: &str) -> Result<Row, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("row image is not JSON: {e}"))?;
    let serde_json::Value::Object(map) = json else {
        return Err("row image is not a JSON object".into());
    };
    let mut row = Row::new();
    for (column, value) in map {
        let value = decode_sqlite_value(&value)
            .ok_or_else(|| format!("column `{column}`: unexpected image value {value}"))?;
        row.insert(column, value);
    }
    Ok(row)
}

fn decode_sqlite_value(value: &serde_json::Value) -> Option<Value> {
    Some(match value {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::String(s) => Value::Text(s.clone()),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::I64(i),
            None => Value::F64(n.as_f64()?),
        },
        serde_json::Value::Object(map) if map.len() == 1 => {
            let (marker, inner) = map.iter().next()?;
            let inner = inner.as_str()?;
            match marker.as_str() {
                HEX => Value::Bytes(decode_hex(inner)?),
                REAL => Value::F64(parse_real(inner)?),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// A REAL as SQLite's printf spells it (`1.5`, `-2.0000000000000000e-05`, `Inf`, `-Inf`).
fn parse_real(s: &str) -> Option<f64> {
    let s = s.trim();
    match s {
        "Inf" | "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// Bytes from upper- or lower-case hex (SQLite's `hex()`, Postgres' `\x...` without the prefix).
pub(super) fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The subject key of a key column value: text as it is, an integer in its canonical spelling.
pub(super) fn key_of(value: rusqlite::types::ValueRef<'_>) -> Result<String, String> {
    use rusqlite::types::ValueRef;
    match value {
        ValueRef::Integer(i) => Ok(i.to_string()),
        ValueRef::Text(t) => {
            String::from_utf8(t.to_vec()).map_err(|_| "the key is not valid UTF-8 text".to_owned())
        }
        ValueRef::Null => Err("the key is NULL".into()),
        ValueRef::Real(r) => Err(format!(
            "the key is the REAL {r}: a key must be text or an integer"
        )),
        ValueRef::Blob(_) => Err("the key is a BLOB: a key must be text or an integer".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_storage_class() {
        let row = decode_sqlite_row(
            r#"{"a":1,"b":"x","c":null,"d":{"$hex":"00FF10"},"e":{"$real":"0.10000000000000001"},"f":{"$real":"-Inf"},"g":"{\"$hex\":\"00\"}"}"#,
        )
        .unwrap();
        assert_eq!(row["a"], Value::I64(1));
        assert_eq!(row["b"], Value::Text("x".into()));
        assert_eq!(row["c"], Value::Null);
        assert_eq!(row["d"], Value::Bytes(vec![0, 255, 16]));
        assert_eq!(row["e"], Value::F64(0.1));
        assert_eq!(row["f"], Value::F64(f64::NEG_INFINITY));
        // Text that looks like an encoded blob stays text.
        assert_eq!(row["g"], Value::Text(r#"{"$hex":"00"}"#.into()));
        assert!(decode_sqlite_row(r#"{"a":{"x":1}}"#).is_err());
        assert!(decode_sqlite_row("[1]").is_err());
    }

    #[test]
    fn hex() {
        assert_eq!(decode_hex("0aFf"), Some(vec![10, 255]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
