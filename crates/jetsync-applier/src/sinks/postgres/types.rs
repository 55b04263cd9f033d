//! Type mapping: how a [`Value`] is converted to a column's type before it is sent, how a
//! subject key must be spelled for its key column, and how column values are read back for
//! the digest.

use bytes::BytesMut;
use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use jetsync::Value;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

/// Seconds from the Unix epoch to Postgres' epoch, 2000-01-01.
const PG_EPOCH_SECS: i64 = 946_684_800;

/// How values of a column are converted and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Bool,
    Text,
    Bytea,
    Json,
    Jsonb,
    Timestamp,
    Timestamptz,
    Date,
    Uuid,
    Other,
}

impl Kind {
    /// The kind of a column whose (domain-resolved) type has `oid`.
    pub(super) fn from_oid(oid: u32) -> Kind {
        let Some(ty) = Type::from_oid(oid) else {
            return Kind::Other;
        };
        let kinds = [
            (Type::INT2, Kind::Int2),
            (Type::INT4, Kind::Int4),
            (Type::INT8, Kind::Int8),
            (Type::FLOAT4, Kind::Float4),
            (Type::FLOAT8, Kind::Float8),
            (Type::NUMERIC, Kind::Numeric),
            (Type::BOOL, Kind::Bool),
            (Type::TEXT, Kind::Text),
            (Type::VARCHAR, Kind::Text),
            (Type::BPCHAR, Kind::Text),
            (Type::NAME, Kind::Text),
            (Type::BYTEA, Kind::Bytea),
            (Type::JSON, Kind::Json),
            (Type::JSONB, Kind::Jsonb),
            (Type::TIMESTAMP, Kind::Timestamp),
            (Type::TIMESTAMPTZ, Kind::Timestamptz),
            (Type::DATE, Kind::Date),
            (Type::UUID, Kind::Uuid),
        ];
        kinds
            .into_iter()
            .find(|(t, _)| *t == ty)
            .map_or(Kind::Other, |(_, kind)| kind)
    }

    /// The type of the array parameter that carries a column of this kind.
    pub(super) fn param_type(self) -> Type {
        match self {
            Kind::Int2 => Type::INT2_ARRAY,
            Kind::Int4 => Type::INT4_ARRAY,
            Kind::Int8 => Type::INT8_ARRAY,
            Kind::Float4 => Type::FLOAT4_ARRAY,
            Kind::Float8 => Type::FLOAT8_ARRAY,
            Kind::Bool => Type::BOOL_ARRAY,
            Kind::Bytea => Type::BYTEA_ARRAY,
            Kind::Json => Type::JSON_ARRAY,
            Kind::Jsonb => Type::JSONB_ARRAY,
            Kind::Uuid => Type::UUID_ARRAY,
            Kind::Numeric
            | Kind::Text
            | Kind::Timestamp
            | Kind::Timestamptz
            | Kind::Date
            | Kind::Other => Type::TEXT_ARRAY,
        }
    }

    /// Whether values travel as text and need an explicit cast to the column's type (text
    /// columns take text by assignment, which keeps `varchar(n)` length checks strict).
    pub(super) fn needs_cast(self) -> bool {
        matches!(
            self,
            Kind::Numeric | Kind::Timestamp | Kind::Timestamptz | Kind::Date | Kind::Other
        )
    }

    /// The type a column is read as, for [`ReadValue`].
    pub(super) fn read_cast(self) -> &'static str {
        match self {
            Kind::Int2 | Kind::Int4 | Kind::Int8 => "int8",
            Kind::Float4 | Kind::Float8 => "float8",
            Kind::Bool => "bool",
            Kind::Bytea => "bytea",
            Kind::Json => "json",
            Kind::Jsonb => "jsonb",
            Kind::Timestamp => "timestamp",
            Kind::Timestamptz => "timestamptz",
            Kind::Date => "date",
            Kind::Uuid => "uuid",
            Kind::Numeric | Kind::Text | Kind::Other => "text",
        }
    }
}

/// One value converted to its column's type, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cell {
    Null,
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
    Json(serde_json::Value),
    Uuid(uuid::Uuid),
}

impl ToSql for Cell {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        fn checked<T: ToSql>(
            value: &T,
            ty: &Type,
            out: &mut BytesMut,
        ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
            value.to_sql_checked(ty, out)
        }
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::I16(v) => checked(v, ty, out),
            Cell::I32(v) => checked(v, ty, out),
            Cell::I64(v) => checked(v, ty, out),
            Cell::F32(v) => checked(v, ty, out),
            Cell::F64(v) => checked(v, ty, out),
            Cell::Bool(v) => checked(v, ty, out),
            Cell::Text(v) => checked(v, ty, out),
            Cell::Bytes(v) => checked(v, ty, out),
            Cell::Json(v) => checked(v, ty, out),
            Cell::Uuid(v) => checked(v, ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Each cell checks its own type in `to_sql`.
        true
    }

    to_sql_checked!();
}

/// Converts `value` for a column of `kind`; the error says why it does not fit.
pub(super) fn convert(kind: Kind, value: &Value) -> Result<Cell, String> {
    if matches!(value, Value::Null) {
        return Ok(Cell::Null);
    }
    match kind {
        Kind::Int2 => {
            let i = integer(value)?;
            i16::try_from(i)
                .map(Cell::I16)
                .map_err(|_| format!("{i} is out of range for smallint"))
        }
        Kind::Int4 => {
            let i = integer(value)?;
            i32::try_from(i)
                .map(Cell::I32)
                .map_err(|_| format!("{i} is out of range for integer"))
        }
        Kind::Int8 => integer(value).map(Cell::I64),
        Kind::Float4 => {
            let f = float(value)?;
            #[allow(clippy::cast_possible_truncation)]
            let narrow = f as f32;
            if f.is_finite() && !narrow.is_finite() {
                Err(format!("{f} is out of range for real"))
            } else {
                Ok(Cell::F32(narrow))
            }
        }
        Kind::Float8 => float(value).map(Cell::F64),
        Kind::Numeric => match value {
            Value::I64(i) => Ok(Cell::Text(i.to_string())),
            Value::F64(f) if f.is_nan() => Ok(Cell::Text("NaN".to_owned())),
            Value::F64(f) if f.is_infinite() => Ok(Cell::Text(
                if *f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned(),
            )),
            Value::F64(f) => Ok(Cell::Text(f.to_string())),
            Value::Text(s) if s.trim().parse::<f64>().is_ok() => {
                Ok(Cell::Text(s.trim().to_owned()))
            }
            Value::Text(s) => Err(format!("{s:?} is not a number")),
            other => Err(format!(
                "{} cannot be stored as numeric",
                describe_value(other)
            )),
        },
        Kind::Bool => match value {
            Value::Bool(b) => Ok(Cell::Bool(*b)),
            Value::I64(0) => Ok(Cell::Bool(false)),
            Value::I64(1) => Ok(Cell::Bool(true)),
            Value::Text(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "t" | "1" => Ok(Cell::Bool(true)),
                "false" | "f" | "0" => Ok(Cell::Bool(false)),
                _ => Err(format!("{s:?} is not a boolean")),
            },
            other => Err(format!("{} is not a boolean", describe_value(other))),
        },
        Kind::Text | Kind::Other => text(value).map(Cell::Text),
        Kind::Bytea => match value {
            Value::Bytes(b) => Ok(Cell::Bytes(b.clone())),
            other => Err(format!(
                "{} cannot be stored as bytea",
                describe_value(other)
            )),
        },
        Kind::Json | Kind::Jsonb => {
            let json = match value {
                Value::Json(j) => j.clone(),
                Value::Text(s) => {
                    serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.clone()))
                }
                Value::I64(i) => serde_json::Value::from(*i),
                Value::F64(f) => serde_json::Number::from_f64(*f)
                    .map(serde_json::Value::Number)
                    .ok_or_else(|| format!("{f} has no JSON form"))?,
                Value::Bool(b) => serde_json::Value::Bool(*b),
                other => {
                    return Err(format!("{} has no JSON form", describe_value(other)));
                }
            };
            if kind == Kind::Jsonb && json_has_nul(&json) {
                return Err("jsonb cannot hold the character U+0000".to_owned());
            }
            Ok(Cell::Json(json))
        }
        Kind::Timestamptz => timestamp(value, true).map(Cell::Text),
        Kind::Timestamp => timestamp(value, false).map(Cell::Text),
        Kind::Date => date(value).map(Cell::Text),
        Kind::Uuid => match value {
            Value::Text(s) => uuid::Uuid::parse_str(s.trim())
                .map(Cell::Uuid)
                .map_err(|e| format!("{s:?} is not a UUID: {e}")),
            Value::Bytes(b) => uuid::Uuid::from_slice(b)
                .map(Cell::Uuid)
                .map_err(|_| format!("{} bytes are not a UUID (16 bytes)", b.len())),
            other => Err(format!("{} is not a UUID", describe_value(other))),
        },
    }
}

/// Converts subject key `key` for a key column of `kind` (declared type `type_name`), accepting
/// only the key's canonical spelling: the text the column's value prints as. Postgres would
/// coerce other spellings (`042`, `+42`, ` 42` into an integer, an upper-case uuid, `1.50` into
/// a numeric) onto the same row, so two subjects would write one row; those are refused.
pub(super) fn key_cell(kind: Kind, type_name: &str, key: &str) -> Result<Cell, String> {
    let not_canonical = |canonical: &str| {
        format!(
            "{key:?} is not the canonical spelling of its value in a {type_name} key column \
             (that is {canonical:?}): two spellings would write one row"
        )
    };
    match kind {
        Kind::Int2 | Kind::Int4 | Kind::Int8 => {
            let i: i64 = key
                .parse()
                .map_err(|_| format!("{key:?} is not an integer"))?;
            let canonical = i.to_string();
            if canonical != key {
                return Err(not_canonical(&canonical));
            }
            convert(kind, &Value::I64(i))
        }
        Kind::Uuid => {
            let uuid =
                uuid::Uuid::parse_str(key).map_err(|e| format!("{key:?} is not a UUID: {e}"))?;
            let canonical = uuid.hyphenated().to_string();
            if canonical != key {
                return Err(not_canonical(&canonical));
            }
            Ok(Cell::Uuid(uuid))
        }
        Kind::Bool => match key {
            "true" => Ok(Cell::Bool(true)),
            "false" => Ok(Cell::Bool(false)),
            _ => Err(format!(
                "{key:?} is not a boolean key (a boolean key is spelled `true` or `false`)"
            )),
        },
        Kind::Date => {
            if key == "infinity" || key == "-infinity" {
                return Ok(Cell::Text(key.to_owned()));
            }
            let day = NaiveDate::parse_from_str(key, "%Y-%m-%d")
                .map_err(|_| format!("{key:?} is not a date (like 2024-05-01)"))?;
            let canonical = day.format("%Y-%m-%d").to_string();
            if canonical != key {
                return Err(not_canonical(&canonical));
            }
            Ok(Cell::Text(canonical))
        }
        Kind::Numeric => canonical_decimal(key, numeric_scale(type_name))
            .map(|()| Cell::Text(key.to_owned()))
            .map_err(|why| format!("{key:?} is not a canonical numeric key: {why}")),
        Kind::Text => {
            // char(n) and varchar(n) drop trailing spaces (varchar only past its length), and
            // `name` truncates to 63 bytes: such keys could meet another key's row.
            if type_name != "text" && key.ends_with(' ') {
                return Err(format!(
                    "{key:?} ends with a space, which a {type_name} key column may drop"
                ));
            }
            if type_name == "name" && key.len() > 63 {
                return Err(format!(
                    "{key:?} is longer than the 63 bytes a `name` key column keeps"
                ));
            }
            convert(Kind::Text, &Value::Text(key.to_owned()))
        }
        _ => Err(format!(
            "a key column of type {type_name} has no canonical text form this sink can check, \
             so two spellings of one key could write one row; use a text, integer, uuid, \
             numeric, boolean or date key column"
        )),
    }
}

/// The scale of a `numeric(p,s)` type, `None` for an unconstrained `numeric`.
fn numeric_scale(type_name: &str) -> Option<usize> {
    let inner = type_name.split_once('(')?.1.strip_suffix(')')?;
    let scale = inner.split_once(',').map_or("0", |(_, s)| s);
    scale.trim().parse().ok()
}

/// Whether `key` is a decimal in canonical form: an optional `-`, no leading zeros, no `+`,
/// no exponent, no trailing zeros after the point, not `-0`, and no more fraction digits than
/// the column's scale keeps (a rounded key would meet another key's row).
fn canonical_decimal(key: &str, scale: Option<usize>) -> Result<(), &'static str> {
    let digits = key.strip_prefix('-').unwrap_or(key);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !all_digits(int) || !all_digits(frac) {
        return Err("a decimal number has only digits, an optional `-` and one `.`");
    }
    if int.len() > 1 && int.starts_with('0') {
        return Err("leading zeros");
    }
    if digits.contains('.') && (frac.is_empty() || frac.ends_with('0')) {
        return Err("trailing zeros or a trailing point");
    }
    if key.starts_with('-') && int == "0" && frac.is_empty() {
        return Err("`-0` is 0");
    }
    if scale.is_some_and(|scale| frac.len() > scale) {
        return Err("more fraction digits than the column keeps");
    }
    Ok(())
}

pub(super) fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "NULL".to_owned(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::I64(i) => format!("the integer {i}"),
        Value::F64(f) => format!("the float {f}"),
        Value::Text(s) => format!("the text {s:?}"),
        Value::Bytes(b) => format!("{} bytes", b.len()),
        Value::Json(j) => format!("the JSON {j}"),
    }
}

fn integer(value: &Value) -> Result<i64, String> {
    match value {
        Value::I64(i) => Ok(*i),
        Value::Text(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("{s:?} is not an integer")),
        #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
        Value::F64(f) if f.fract() == 0.0 && *f >= i64::MIN as f64 && *f < i64::MAX as f64 => {
            Ok(*f as i64)
        }
        other => Err(format!("{} is not an integer", describe_value(other))),
    }
}

fn float(value: &Value) -> Result<f64, String> {
    match value {
        Value::F64(f) => Ok(*f),
        #[allow(clippy::cast_precision_loss)]
        Value::I64(i) => Ok(*i as f64),
        Value::Text(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("{s:?} is not a number")),
        other => Err(format!("{} is not a number", describe_value(other))),
    }
}

fn text(value: &Value) -> Result<String, String> {
    let s = match value {
        Value::Text(s) => s.clone(),
        Value::I64(i) => i.to_string(),
        Value::F64(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Json(j) => j.to_string(),
        other => {
            return Err(format!(
                "{} cannot be stored as text",
                describe_value(other)
            ))
        }
    };
    if s.contains('\0') {
        return Err("Postgres text cannot hold the character U+0000".to_owned());
    }
    Ok(s)
}

fn json_has_nul(json: &serde_json::Value) -> bool {
    match json {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(json_has_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v))
        }
        _ => false,
    }
}

/// Special timestamp and date values Postgres accepts as text.
fn special(s: &str) -> Option<&'static str> {
    match s.trim().to_ascii_lowercase().as_str() {
        "infinity" | "+infinity" => Some("infinity"),
        "-infinity" => Some("-infinity"),
        _ => None,
    }
}

/// A point in time: RFC 3339 (or Postgres' `2024-01-02 03:04:05+00` output form).
fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%#z"))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A wall-clock time without offset (`2024-01-02T03:04:05.5`, `2024-01-02 03:04:05`,
/// `2024-01-02`).
fn parse_naive(s: &str) -> Option<NaiveDateTime> {
    let s = s.trim();
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
        .ok()
        .or_else(|| {
            NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })
}

fn epoch_millis(ms: i64) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| format!("{ms} ms since the Unix epoch is out of range"))
}

/// Text for a `timestamptz` (`with_zone`) or `timestamp` column.
fn timestamp(value: &Value, with_zone: bool) -> Result<String, String> {
    let utc = match value {
        Value::Text(s) => {
            if let Some(special) = special(s) {
                return Ok(special.to_owned());
            }
            if let Some(instant) = parse_instant(s) {
                instant
            } else if let Some(naive) = parse_naive(s) {
                naive.and_utc()
            } else {
                return Err(format!(
                    "{s:?} is not an RFC 3339 timestamp (like 2024-05-01T12:00:00Z)"
                ));
            }
        }
        Value::I64(ms) => epoch_millis(*ms)?,
        other => {
            return Err(format!(
                "{} is not a timestamp (use RFC 3339 text or milliseconds since the Unix epoch)",
                describe_value(other)
            ))
        }
    };
    Ok(if with_zone {
        utc.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    } else {
        utc.naive_utc().format("%Y-%m-%dT%H:%M:%S%.f").to_string()
    })
}

/// Text for a `date` column.
fn date(value: &Value) -> Result<String, String> {
    let day = match value {
        Value::Text(s) => {
            if let Some(special) = special(s) {
                return Ok(special.to_owned());
            }
            if let Some(instant) = parse_instant(s) {
                instant.date_naive()
            } else if let Some(naive) = parse_naive(s) {
                naive.date()
            } else {
                return Err(format!("{s:?} is not a date (like 2024-05-01)"));
            }
        }
        Value::I64(ms) => epoch_millis(*ms)?.date_naive(),
        other => {
            return Err(format!(
                "{} is not a date (use YYYY-MM-DD text or milliseconds since the Unix epoch)",
                describe_value(other)
            ))
        }
    };
    Ok(day.format("%Y-%m-%d").to_string())
}

/// A column value read back from the database, as the digest sees it. Columns are selected cast
/// to one of the types of [`Kind::read_cast`], so only those arrive here.
pub(super) struct ReadValue(pub(super) Value);

impl<'a> FromSql<'a> for ReadValue {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let value = if *ty == Type::INT8 {
            Value::I64(i64::from_sql(ty, raw)?)
        } else if *ty == Type::FLOAT8 {
            Value::F64(f64::from_sql(ty, raw)?)
        } else if *ty == Type::BOOL {
            Value::Bool(bool::from_sql(ty, raw)?)
        } else if *ty == Type::BYTEA {
            Value::Bytes(raw.to_vec())
        } else if *ty == Type::JSON || *ty == Type::JSONB {
            Value::Json(serde_json::Value::from_sql(ty, raw)?)
        } else if *ty == Type::TIMESTAMPTZ {
            Value::Text(timestamp_text(raw, true)?)
        } else if *ty == Type::TIMESTAMP {
            Value::Text(timestamp_text(raw, false)?)
        } else if *ty == Type::DATE {
            Value::Text(date_text(raw)?)
        } else if *ty == Type::UUID {
            Value::Text(uuid::Uuid::from_sql(ty, raw)?.to_string())
        } else {
            Value::Text(String::from_utf8(raw.to_vec())?)
        };
        Ok(ReadValue(value))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(ReadValue(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A binary `timestamp`/`timestamptz` (microseconds since 2000-01-01) as text.
pub(super) fn timestamp_text(
    raw: &[u8],
    with_zone: bool,
) -> Result<String, Box<dyn std::error::Error + Sync + Send>> {
    let micros = i64::from_be_bytes(raw.try_into()?);
    match micros {
        i64::MAX => return Ok("infinity".to_owned()),
        i64::MIN => return Ok("-infinity".to_owned()),
        _ => {}
    }
    let Some(utc) = micros
        .checked_add(PG_EPOCH_SECS * 1_000_000)
        .and_then(DateTime::from_timestamp_micros)
    else {
        return Ok(format!("{micros} microseconds since 2000-01-01"));
    };
    Ok(if with_zone {
        utc.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    } else {
        utc.naive_utc().format("%Y-%m-%dT%H:%M:%S%.f").to_string()
    })
}

/// A binary `date` (days since 2000-01-01) as text.
pub(super) fn date_text(raw: &[u8]) -> Result<String, Box<dyn std::error::Error + Sync + Send>> {
    let days = i32::from_be_bytes(raw.try_into()?);
    match days {
        i32::MAX => return Ok("infinity".to_owned()),
        i32::MIN => return Ok("-infinity".to_owned()),
        _ => {}
    }
    // 2000-01-01 is day 730120 of the common era (0001-01-01 is day 1).
    Ok(days
        .checked_add(730_120)
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .map_or_else(
            || format!("{days} days since 2000-01-01"),
            |d| d.format("%Y-%m-%d").to_string(),
        ))
}
