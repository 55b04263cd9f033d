//! Conversion between a service's own serde types and [`Row`]s.
//!
//! [`to_row`] turns a struct (or map) into a row, one column per field:
//!
//! | field serializes as                                  | column value                |
//! |------------------------------------------------------|-----------------------------|
//! | `None`, `()`, unit struct                            | [`Value::Null`]             |
//! | `bool`                                               | [`Value::Bool`]             |
//! | any integer within the `i64` range                   | [`Value::I64`]              |
//! | an integer outside it (`u64` above `i64::MAX`, …)    | [`RecordError::IntegerOutOfRange`] |
//! | `f32`, `f64` (NaN and infinities kept)               | [`Value::F64`]              |
//! | `str`, `char`, a unit enum variant (its name)        | [`Value::Text`]             |
//! | bytes (`serde_bytes`, `#[serde(with = …)]`)          | [`Value::Bytes`]            |
//! | anything nested: `Vec<T>` (incl. plain `Vec<u8>`), tuples, maps, structs, data-carrying enum variants | [`Value::Json`] (via `serde_json`) |
//!
//! `Some(x)` and newtypes are transparent. [`from_row`] is the inverse: `Json` values deserialize
//! as the nested type, `Bytes` as a sequence of byte values (so a plain `Vec<u8>` field reads
//! either form), `Text` as a string or a unit enum variant, `Null` as `None` or `()`.
//!
//! [`row_to_json`] and [`row_from_json`] convert a whole row to and from a JSON object with the
//! json/1 rules of [`crate::codec`] (bytes as `{"$bytes":"<base64url>"}`), e.g. for command-line
//! tools.

use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::ser::{self, Impossible, Serialize};

use crate::codec;
use crate::value::{Row, Value};

/// Why a value could not be converted to or from a [`Row`].
#[non_exhaustive]
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Only structs and maps become rows.
    #[error("a row is made from a struct or a map, not from {found}")]
    NotAStruct {
        /// What was given instead (e.g. "a sequence", "an integer").
        found: &'static str,
    },
    /// An integer field does not fit the `i64` column type.
    #[error(
        "column {column:?} holds an integer outside the i64 range; \
         store it as a float or a string instead"
    )]
    IntegerOutOfRange {
        /// The offending column.
        column: String,
    },
    /// A map key is not a string (or a number or char, which are written as strings).
    #[error(
        "map keys become column names, so they must be strings, numbers or chars; found {found}"
    )]
    KeyNotAString {
        /// What the key was.
        found: &'static str,
    },
    /// The same column was written twice (e.g. a `#[serde(flatten)]` field clashing with another).
    #[error("column {column:?} is written twice")]
    DuplicateColumn {
        /// The duplicated column.
        column: String,
    },
    /// A `{"$bytes": …}` value is not base64url (only from [`row_from_json`]).
    #[error("column {column:?}: {reason}")]
    InvalidBytes {
        /// The offending column.
        column: String,
        /// What is wrong.
        reason: String,
    },
    /// The value's `Serialize` implementation failed.
    #[error("could not serialize {}: {reason}", describe_column(.column))]
    Serialize {
        /// The column being written, if the error is tied to one.
        column: Option<String>,
        /// The serializer's message.
        reason: String,
    },
    /// The row does not fit the target type (missing column, wrong value kind, …).
    #[error("could not deserialize {}: {reason}", describe_column(.column))]
    Deserialize {
        /// The column being read, if the error is tied to one.
        column: Option<String>,
        /// The deserializer's message.
        reason: String,
    },
}

fn describe_column(column: &Option<String>) -> String {
    match column {
        Some(column) => format!("column {column:?}"),
        None => "the row".to_owned(),
    }
}

/// Converts a struct or map into a row (see the module docs for the rules).
pub fn to_row<T: Serialize + ?Sized>(value: &T) -> Result<Row, RecordError> {
    value.serialize(RowSerializer)
}

/// Converts a row into `T` (see the module docs for the rules).
pub fn from_row<T: DeserializeOwned>(row: &Row) -> Result<T, RecordError> {
    T::deserialize(RowDeserializer { row }).map_err(DeError::into_record_error)
}

/// The row as a JSON object, with json/1's value mapping ([`crate::codec`]). Lossy only where
/// JSON cannot carry a value: non-finite floats become `null`.
pub fn row_to_json(row: &Row) -> serde_json::Value {
    serde_json::Value::Object(
        row.iter()
            .map(|(column, value)| (column.clone(), codec::value_to_json(value)))
            .collect(),
    )
}

/// Reads a JSON object as a row, with json/1's value mapping ([`crate::codec`]).
pub fn row_from_json(json: serde_json::Value) -> Result<Row, RecordError> {
    let serde_json::Value::Object(map) = json else {
        return Err(RecordError::NotAStruct {
            found: json_kind(&json),
        });
    };
    map.into_iter()
        .map(|(column, json)| match codec::value_from_json(json) {
            Ok(value) => Ok((column, value)),
            Err(reason) => Err(RecordError::InvalidBytes { column, reason }),
        })
        .collect()
}

fn json_kind(json: &serde_json::Value) -> &'static str {
    match json {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------------
// to_row
// ---------------------------------------------------------------------------------------------

impl ser::Error for RecordError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        RecordError::Serialize {
            column: None,
            reason: msg.to_string(),
        }
    }
}

/// Accepts only a struct or a map at the top level.
struct RowSerializer;

fn not_a_struct<T>(found: &'static str) -> Result<T, RecordError> {
    Err(RecordError::NotAStruct { found })
}

impl ser::Serializer for RowSerializer {
    type Ok = Row;
    type Error = RecordError;
    type SerializeSeq = Impossible<Row, RecordError>;
    type SerializeTuple = Impossible<Row, RecordError>;
    type SerializeTupleStruct = Impossible<Row, RecordError>;
    type SerializeTupleVariant = Impossible<Row, RecordError>;
    type SerializeMap = RowMap;
    type SerializeStruct = RowMap;
    type SerializeStructVariant = Impossible<Row, RecordError>;

    fn serialize_bool(self, _: bool) -> Result<Row, RecordError> {
        not_a_struct("a boolean")
    }
    fn serialize_i8(self, _: i8) -> Result<Row, RecordError> {
        not_a_struct("an integer")
    }
    fn serialize_i16(self, _: i16) -> Result<Row, RecordError> {
        not_a_struct("an integer")
    }
    fn serialize_i32(self, _: i32) -> Result<Row, RecordError> {
        not_a_struct("an integer")
    }
    fn serialize_i64(self, _: i64) -> Result<Row, RecordError> {
        not_a_struct("an integer")
    }
    fn serialize_i128(self, _: i128) -> Result<Row, RecordError> {
        not_a_struct("an integer")
    }
    fn serialize_u8(self, _: u8) -> Result<Row, RecordError> {
        not_a_struct("an integer")
    }
    fn serialize_u16(self, _: u16) -> Result<Row, RecordError> {
        not_a_struct("an integer")
    }
    fn serialize_u32(self, _: u32) -> Result<Row, RecordError> {
        not_a_struct("an integer")
    }
    fn serialize_u64(self, _: u64) -> Result<Row, RecordError> {
        not_a_struct("an integer")
    }
    fn serialize_u128(self, _: u128) -> Result<Row, RecordError> {
        not_a_struct("an integer")
    }
    fn serialize_f32(self, _: f32) -> Result<Row, RecordError> {
        not_a_struct("a float")
    }
    fn serialize_f64(self, _: f64) -> Result<Row, RecordError> {
        not_a_struct("a float")
    }
    fn serialize_char(self, _: char) -> Result<Row, RecordError> {
        not_a_struct("a char")
    }
    fn serialize_str(self, _: &str) -> Result<Row, RecordError> {
        not_a_struct("a string")
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<Row, RecordError> {
        not_a_struct("bytes")
    }
    fn serialize_none(self) -> Result<Row, RecordError> {
        not_a_struct("None")
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Row, RecordError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Row, RecordError> {
        not_a_struct("()")
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Row, RecordError> {
        not_a_struct("a unit struct")
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<Row, RecordError> {
        not_a_struct("an enum variant")
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<Row, RecordError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<Row, RecordError> {
        not_a_struct("an enum variant")
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, RecordError> {
        not_a_struct("a sequence")
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, RecordError> {
        not_a_struct("a tuple")
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, RecordError> {
        not_a_struct("a tuple struct")
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, RecordError> {
        not_a_struct("an enum variant")
    }
    fn serialize_map(self, _: Option<usize>) -> Result<RowMap, RecordError> {
        Ok(RowMap::default())
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<RowMap, RecordError> {
        Ok(RowMap::default())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, RecordError> {
        not_a_struct("an enum variant")
    }
}

/// Collects the columns of a struct or map.
#[derive(Default)]
struct RowMap {
    row: Row,
    key: Option<String>,
}

impl RowMap {
    fn put<T: Serialize + ?Sized>(&mut self, column: String, value: &T) -> Result<(), RecordError> {
        if self.row.contains_key(&column) {
            return Err(RecordError::DuplicateColumn { column });
        }
        let value = column_value(&column, value)?;
        self.row.insert(column, value);
        Ok(())
    }
}

impl ser::SerializeStruct for RowMap {
    type Ok = Row;
    type Error = RecordError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), RecordError> {
        self.put(key.to_owned(), value)
    }

    fn end(self) -> Result<Row, RecordError> {
        Ok(self.row)
    }
}

impl ser::SerializeMap for RowMap {
    type Ok = Row;
    type Error = RecordError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), RecordError> {
        self.key = Some(key.serialize(KeySerializer)?);
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), RecordError> {
        match self.key.take() {
            Some(column) => self.put(column, value),
            None => Err(ser::Error::custom("map value serialized before its key")),
        }
    }

    fn end(self) -> Result<Row, RecordError> {
        Ok(self.row)
    }
}

/// The value of one column: scalars directly, anything nested as JSON.
fn column_value<T: Serialize + ?Sized>(column: &str, value: &T) -> Result<Value, RecordError> {
    match value.serialize(ScalarSerializer) {
        Ok(value) => Ok(value),
        Err(ScalarError::Nested) => {
            serde_json::to_value(value)
                .map(Value::Json)
                .map_err(|e| RecordError::Serialize {
                    column: Some(column.to_owned()),
                    reason: e.to_string(),
                })
        }
        Err(ScalarError::OutOfRange) => Err(RecordError::IntegerOutOfRange {
            column: column.to_owned(),
        }),
        Err(ScalarError::Custom(reason)) => Err(RecordError::Serialize {
            column: Some(column.to_owned()),
            reason,
        }),
    }
}

/// Outcome of trying to write a field as a scalar column value.
#[derive(Debug)]
enum ScalarError {
    /// The value is nested (sequence, map, struct, …): it becomes JSON instead.
    Nested,
    /// An integer outside the i64 range.
    OutOfRange,
    /// The value's own `Serialize` failed.
    Custom(String),
}

impl fmt::Display for ScalarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScalarError::Nested => f.write_str("nested value"),
            ScalarError::OutOfRange => f.write_str("integer out of range"),
            ScalarError::Custom(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for ScalarError {}

impl ser::Error for ScalarError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ScalarError::Custom(msg.to_string())
    }
}

/// Writes scalar values as a [`Value`]; stops with [`ScalarError::Nested`] at the first sign of
/// a nested value, before the value has written anything.
struct ScalarSerializer;

fn int<T: TryInto<i64>>(v: T) -> Result<Value, ScalarError> {
    v.try_into()
        .map(Value::I64)
        .map_err(|_| ScalarError::OutOfRange)
}

impl ser::Serializer for ScalarSerializer {
    type Ok = Value;
    type Error = ScalarError;
    type SerializeSeq = Impossible<Value, ScalarError>;
    type SerializeTuple = Impossible<Value, ScalarError>;
    type SerializeTupleStruct = Impossible<Value, ScalarError>;
    type SerializeTupleVariant = Impossible<Value, ScalarError>;
    type SerializeMap = Impossible<Value, ScalarError>;
    type SerializeStruct = Impossible<Value, ScalarError>;
    type SerializeStructVariant = Impossible<Value, ScalarError>;

    fn serialize_bool(self, v: bool) -> Result<Value, ScalarError> {
        Ok(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value, ScalarError> {
        int(v)
    }
    fn serialize_i16(self, v: i16) -> Result<Value, ScalarError> {
        int(v)
    }
    fn serialize_i32(self, v: i32) -> Result<Value, ScalarError> {
        int(v)
    }
    fn serialize_i64(self, v: i64) -> Result<Value, ScalarError> {
        int(v)
    }
    fn serialize_i128(self, v: i128) -> Result<Value, ScalarError> {
        int(v)
    }
    fn serialize_u8(self, v: u8) -> Result<Value, ScalarError> {
        int(v)
    }
    fn serialize_u16(self, v: u16) -> Result<Value, ScalarError> {
        int(v)
    }
    fn serialize_u32(self, v: u32) -> Result<Value, ScalarError> {
        int(v)
    }
    fn serialize_u64(self, v: u64) -> Result<Value, ScalarError> {
        int(v)
    }
    fn serialize_u128(self, v: u128) -> Result<Value, ScalarError> {
        int(v)
    }
    fn serialize_f32(self, v: f32) -> Result<Value, ScalarError> {
        Ok(Value::F64(v.into()))
    }
    fn serialize_f64(self, v: f64) -> Result<Value, ScalarError> {
        Ok(Value::F64(v))
    }
    fn serialize_char(self, v: char) -> Result<Value, ScalarError> {
        Ok(Value::Text(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, ScalarError> {
        Ok(Value::Text(v.to_owned()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, ScalarError> {
        Ok(Value::Bytes(v.to_vec()))
    }
    fn serialize_none(self) -> Result<Value, ScalarError> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, ScalarError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, ScalarError> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Value, ScalarError> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<Value, ScalarError> {
        Ok(Value::Text(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<Value, ScalarError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<Value, ScalarError> {
        Err(ScalarError::Nested)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, ScalarError> {
        Err(ScalarError::Nested)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, ScalarError> {
        Err(ScalarError::Nested)
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, ScalarError> {
        Err(ScalarError::Nested)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, ScalarError> {
        Err(ScalarError::Nested)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, ScalarError> {
        Err(ScalarError::Nested)
    }
    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, ScalarError> {
        Err(ScalarError::Nested)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, ScalarError> {
        Err(ScalarError::Nested)
    }
}

/// Writes a map key as a column name. Like `serde_json`, numbers and chars become strings.
struct KeySerializer;

fn bad_key<T>(found: &'static str) -> Result<T, RecordError> {
    Err(RecordError::KeyNotAString { found })
}

impl ser::Serializer for KeySerializer {
    type Ok = String;
    type Error = RecordError;
    type SerializeSeq = Impossible<String, RecordError>;
    type SerializeTuple = Impossible<String, RecordError>;
    type SerializeTupleStruct = Impossible<String, RecordError>;
    type SerializeTupleVariant = Impossible<String, RecordError>;
    type SerializeMap = Impossible<String, RecordError>;
    type SerializeStruct = Impossible<String, RecordError>;
    type SerializeStructVariant = Impossible<String, RecordError>;

    fn serialize_bool(self, _: bool) -> Result<String, RecordError> {
        bad_key("a boolean")
    }
    fn serialize_i8(self, v: i8) -> Result<String, RecordError> {
        Ok(v.to_string())
    }
    fn serialize_i16(self, v: i16) -> Result<String, RecordError> {
        Ok(v.to_string())
    }
    fn serialize_i32(self, v: i32) -> Result<String, RecordError> {
        Ok(v.to_string())
    }
    fn serialize_i64(self, v: i64) -> Result<String, RecordError> {
        Ok(v.to_string())
    }
    fn serialize_i128(self, v: i128) -> Result<String, RecordError> {
        Ok(v.to_string())
    }
    fn serialize_u8(self, v: u8) -> Result<String, RecordError> {
        Ok(v.to_string())
    }
    fn serialize_u16(self, v: u16) -> Result<String, RecordError> {
        Ok(v.to_string())
    }
    fn serialize_u32(self, v: u32) -> Result<String, RecordError> {
        Ok(v.to_string())
    }
    fn serialize_u64(self, v: u64) -> Result<String, RecordError> {
        Ok(v.to_string())
    }
    fn serialize_u128(self, v: u128) -> Result<String, RecordError> {
        Ok(v.to_string())
    }
    fn serialize_f32(self, _: f32) -> Result<String, RecordError> {
        bad_key("a float")
    }
    fn serialize_f64(self, _: f64) -> Result<String, RecordError> {
        bad_key("a float")
    }
    fn serialize_char(self, v: char) -> Result<String, RecordError> {
        Ok(v.to_string())
    }
    fn serialize_str(self, v: &str) -> Result<String, RecordError> {
        Ok(v.to_owned())
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<String, RecordError> {
        bad_key("bytes")
    }
    fn serialize_none(self) -> Result<String, RecordError> {
        bad_key("None")
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<String, RecordError> {
        bad_key("an Option")
    }
    fn serialize_unit(self) -> Result<String, RecordError> {
        bad_key("()")
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<String, RecordError> {
        bad_key("a unit struct")
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<String, RecordError> {
        Ok(variant.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<String, RecordError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<String, RecordError> {
        bad_key("an enum variant with data")
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, RecordError> {
        bad_key("a sequence")
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, RecordError> {
        bad_key("a tuple")
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, RecordError> {
        bad_key("a tuple struct")
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, RecordError> {
        bad_key("an enum variant with data")
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, RecordError> {
        bad_key("a map")
    }
    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, RecordError> {
        bad_key("a struct")
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, RecordError> {
        bad_key("an enum variant with data")
    }
}

// ---------------------------------------------------------------------------------------------
// from_row
// ---------------------------------------------------------------------------------------------

/// Deserialization error, remembering the column it arose in.
#[derive(Debug)]
struct DeError {
    column: Option<String>,
    reason: String,
}

impl DeError {
    fn in_column(mut self, column: &str) -> Self {
        if self.column.is_none() {
            self.column = Some(column.to_owned());
        }
        self
    }

    fn into_record_error(self) -> RecordError {
        RecordError::Deserialize {
            column: self.column,
            reason: self.reason,
        }
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            column: None,
            reason: msg.to_string(),
        }
    }
}

impl From<serde_json::Error> for DeError {
    fn from(e: serde_json::Error) -> Self {
        de::Error::custom(e)
    }
}

/// Presents a row as a map of column → value.
struct RowDeserializer<'a> {
    row: &'a Row,
}

impl<'de> de::Deserializer<'de> for RowDeserializer<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_map(RowAccess {
            columns: self.row.iter(),
            value: None,
        })
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

struct RowAccess<'de> {
    columns: std::collections::btree_map::Iter<'de, String, Value>,
    value: Option<(&'de str, &'de Value)>,
}

impl<'de> MapAccess<'de> for RowAccess<'de> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((column, value)) = self.columns.next() else {
            return Ok(None);
        };
        self.value = Some((column, value));
        let key = de::value::BorrowedStrDeserializer::<DeError>::new(column);
        seed.deserialize(key)
            .map(Some)
            .map_err(|e| e.in_column(column))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some((column, value)) = self.value.take() else {
            return Err(de::Error::custom("value requested before its column"));
        };
        seed.deserialize(ValueDeserializer(value))
            .map_err(|e| e.in_column(column))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.columns.len())
    }
}

/// Presents one column value to the target type.
struct ValueDeserializer<'de>(&'de Value);

/// For every hint without special handling: JSON values go to `serde_json` with the same hint,
/// everything else is self-describing.
macro_rules! forward_value_hints {
    ($($method:ident ( $($arg:ident : $ty:ty),* )),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, DeError> {
            match self.0 {
                Value::Json(json) => Ok(json.$method($($arg,)* visitor)?),
                _ => self.deserialize_any(visitor),
            }
        }
    )*};
}

impl<'de> de::Deserializer<'de> for ValueDeserializer<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::I64(i) => visitor.visit_i64(*i),
            Value::F64(f) => visitor.visit_f64(*f),
            Value::Text(s) => visitor.visit_borrowed_str(s),
            Value::Bytes(b) => {
                visitor.visit_seq(de::value::SeqDeserializer::new(b.iter().copied()))
            }
            Value::Json(json) => Ok(json.deserialize_any(visitor)?),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            Value::Json(json) => Ok(json.deserialize_option(visitor)?),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Json(json) => Ok(json.deserialize_newtype_struct(name, visitor)?),
            _ => visitor.visit_newtype_struct(self),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Bytes(b) => visitor.visit_borrowed_bytes(b),
            Value::Json(json) => Ok(json.deserialize_bytes(visitor)?),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Text(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            Value::Json(json) => Ok(json.deserialize_enum(name, variants, visitor)?),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    forward_value_hints! {
        deserialize_bool(), deserialize_i8(), deserialize_i16(), deserialize_i32(),
        deserialize_i64(), deserialize_i128(), deserialize_u8(), deserialize_u16(),
        deserialize_u32(), deserialize_u64(), deserialize_u128(), deserialize_f32(),
        deserialize_f64(), deserialize_char(), deserialize_str(), deserialize_string(),
        deserialize_unit(), deserialize_unit_struct(name: &'static str), deserialize_seq(),
        deserialize_tuple(len: usize),
        deserialize_tuple_struct(name: &'static str, len: usize), deserialize_map(),
        deserialize_struct(name: &'static str, fields: &'static [&'static str]),
        deserialize_identifier(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use serde_json::json;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Status {
        Active,
        Retired,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Dims {
        w: f64,
        tags: Vec<String>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Product {
        sku: String,
        qty: i64,
        small: u8,
        price: f64,
        ratio: f32,
        on_sale: bool,
        note: Option<String>,
        missing: Option<i64>,
        tags: Vec<String>,
        dims: Dims,
        raw: Vec<u8>,
        status: Status,
        initial: char,
        unit: (),
        attrs: BTreeMap<String, i64>,
        any: serde_json::Value,
    }

    fn product() -> Product {
        Product {
            sku: "A-1".into(),
            qty: -3,
            small: 200,
            price: 12.5,
            ratio: 0.1,
            on_sale: true,
            note: Some("n".into()),
            missing: None,
            tags: vec!["a".into(), "b".into()],
            dims: Dims {
                w: 1.5,
                tags: vec![],
            },
            raw: vec![0, 1, 255],
            status: Status::Retired,
            initial: 'é',
            unit: (),
            attrs: [("x".to_owned(), 1)].into(),
            any: json!({"deep": [1, {"x": null}]}),
        }
    }

    #[test]
    fn struct_to_row_and_back() {
        let p = product();
        let row = to_row(&p).unwrap();
        assert_eq!(row["sku"], Value::from("A-1"));
        assert_eq!(row["qty"], Value::I64(-3));
        assert_eq!(row["small"], Value::I64(200));
        assert_eq!(row["price"], Value::F64(12.5));
        assert_eq!(row["on_sale"], Value::Bool(true));
        assert_eq!(row["note"], Value::from("n"));
        assert_eq!(row["missing"], Value::Null);
        assert_eq!(row["tags"], Value::Json(json!(["a", "b"])));
        assert_eq!(row["dims"], Value::Json(json!({"w": 1.5, "tags": []})));
        assert_eq!(row["raw"], Value::Json(json!([0, 1, 255])));
        assert_eq!(row["status"], Value::from("Retired"));
        assert_eq!(row["initial"], Value::from("é"));
        assert_eq!(row["unit"], Value::Null);
        assert_eq!(row["attrs"], Value::Json(json!({"x": 1})));
        assert_eq!(row["any"], Value::Json(json!({"deep": [1, {"x": null}]})));
        assert_eq!(from_row::<Product>(&row).unwrap(), p);
    }

    #[test]
    fn bytes_columns_read_as_vec_u8() {
        let mut row = to_row(&product()).unwrap();
        row.insert("raw".into(), Value::Bytes(vec![9, 8]));
        assert_eq!(from_row::<Product>(&row).unwrap().raw, vec![9, 8]);
    }

    #[test]
    fn non_finite_floats_survive() {
        #[derive(Debug, Serialize, Deserialize)]
        struct F {
            f: f64,
        }
        let row = to_row(&F { f: f64::NAN }).unwrap();
        assert!(matches!(row["f"], Value::F64(f) if f.is_nan()));
        assert!(from_row::<F>(&row).unwrap().f.is_nan());
    }

    #[test]
    fn maps_and_flatten() {
        let mut m = BTreeMap::new();
        m.insert(1u32, "a");
        let row = to_row(&m).unwrap();
        assert_eq!(row["1"], Value::from("a"));

        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Outer {
            id: i64,
            #[serde(flatten)]
            rest: BTreeMap<String, serde_json::Value>,
        }
        let o = Outer {
            id: 1,
            rest: [("extra".to_owned(), json!([1]))].into(),
        };
        let row = to_row(&o).unwrap();
        assert_eq!(row["extra"], Value::Json(json!([1])));
        assert_eq!(from_row::<Outer>(&row).unwrap(), o);
    }

    #[test]
    fn errors_name_the_cause() {
        assert_eq!(
            to_row(&5),
            Err(RecordError::NotAStruct {
                found: "an integer"
            })
        );
        assert!(matches!(
            to_row(&vec![1]),
            Err(RecordError::NotAStruct { .. })
        ));
        #[derive(Serialize)]
        struct Big {
            n: u64,
        }
        assert_eq!(
            to_row(&Big { n: u64::MAX }),
            Err(RecordError::IntegerOutOfRange { column: "n".into() })
        );
        assert!(to_row(&Big { n: i64::MAX as u64 }).is_ok());
        let mut bad_keys = BTreeMap::new();
        bad_keys.insert(vec![1], 1);
        assert!(matches!(
            to_row(&bad_keys),
            Err(RecordError::KeyNotAString { .. })
        ));

        let mut row = to_row(&product()).unwrap();
        row.insert("qty".into(), Value::from("many"));
        let err = from_row::<Product>(&row).unwrap_err();
        assert!(
            matches!(&err, RecordError::Deserialize { column: Some(c), .. } if c == "qty"),
            "{err}"
        );
        assert!(err.to_string().contains("\"qty\""), "{err}");
        row.remove("qty");
        let err = from_row::<Product>(&row).unwrap_err();
        assert!(err.to_string().contains("qty"), "{err}");
        let mut row = to_row(&product()).unwrap();
        row.insert("dims".into(), Value::Json(json!({"w": "x", "tags": []})));
        let err = from_row::<Product>(&row).unwrap_err();
        assert!(
            matches!(&err, RecordError::Deserialize { column: Some(c), .. } if c == "dims"),
            "{err}"
        );
    }

    #[test]
    fn json_rows() {
        let row = row_from_json(json!({
            "a": 1, "b": 1.5, "c": "x", "d": null, "e": [1], "f": {"$bytes": "AAE"}
        }))
        .unwrap();
        assert_eq!(row["a"], Value::I64(1));
        assert_eq!(row["b"], Value::F64(1.5));
        assert_eq!(row["c"], Value::from("x"));
        assert_eq!(row["d"], Value::Null);
        assert_eq!(row["e"], Value::Json(json!([1])));
        assert_eq!(row["f"], Value::Bytes(vec![0, 1]));
        assert_eq!(
            row_to_json(&row),
            json!({"a": 1, "b": 1.5, "c": "x", "d": null, "e": [1], "f": {"$bytes": "AAE"}})
        );
        assert_eq!(row_from_json(row_to_json(&row)).unwrap(), row);
        assert!(matches!(
            row_from_json(json!([1])),
            Err(RecordError::NotAStruct { found: "an array" })
        ));
        assert!(matches!(
            row_from_json(json!({"f": {"$bytes": "*"}})),
            Err(RecordError::InvalidBytes { .. })
        ));
    }
}
