//! Applying changes: one upsert or delete per change, inside the caller's transaction.
//!
//! An upsert replaces the whole row: `INSERT` of every writable column (NULL for each one the
//! event lacks, so a service's column `DEFAULT` never applies on one path and not on another)
//! `ON CONFLICT (key) DO UPDATE SET` every such column. Replaying history and bootstrapping from
//! the latest event of every row therefore end in the same row.
//!
//! **One row, one subject.** The key column holds the subject key as text in tables the sink
//! created. In a table whose key column converts numbers (INTEGER, NUMERIC or REAL affinity,
//! e.g. a service's `id INTEGER PRIMARY KEY`), only the canonical spelling of an integer is
//! accepted (`42`, `-7`), bound as an integer; `042`, `+42`, ` 42`, `4.2e1` or `42.0` would be
//! stored as 42 and merge two subjects into one row, so such a change is rejected.

use jetsync::{Row, Value};
use rusqlite::types::{ToSql, ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::Connection;

use super::errors::{sink_error, Error};
use super::options::{validate_identifier, SqliteOptions};
use super::schema::{self, KeyKind, SchemaCache, Shape, TableInfo};
use super::scope;
use crate::sinks::sql::push_quoted;
use crate::{Change, SinkError};

/// One bound parameter: a value of the event, or the subject key.
enum Param<'a> {
    Value(&'a Value),
    Text(&'a str),
    Integer(i64),
}

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Param::Text(key) => ToSqlOutput::Borrowed(ValueRef::Text(key.as_bytes())),
            Param::Integer(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            Param::Value(value) => match value {
                Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
                // Booleans are stored as the integers 0 and 1, always.
                Value::Bool(b) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*b))),
                Value::I64(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
                Value::F64(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
                Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
                Value::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
                // serde_json's map is sorted by key (no `preserve_order`): canonical text.
                Value::Json(j) => ToSqlOutput::Owned(SqlValue::Text(j.to_string())),
            },
        })
    }
}

/// `key` as an integer when it is the canonical spelling of one (what `i64::to_string` gives).
pub(super) fn canonical_integer(key: &str) -> Option<i64> {
    let value: i64 = key.parse().ok()?;
    (value.to_string() == key).then_some(value)
}

/// The subject key as the key column of `table` stores it.
fn key_param<'a>(info: &TableInfo, table: &str, key: &'a str) -> Result<Param<'a>, Error> {
    key_param_of(&info.key_kind, &info.columns[info.key].name, table, key)
}

/// The subject key as a key column `key_name` of kind `kind` stores it.
fn key_param_of<'a>(
    kind: &KeyKind,
    key_name: &str,
    table: &str,
    key: &'a str,
) -> Result<Param<'a>, Error> {
    match kind {
        KeyKind::Text => Ok(Param::Text(key)),
        KeyKind::Integer(declared) => canonical_integer(key).map(Param::Integer).ok_or_else(|| {
            Error::Reject(format!(
                "key `{key}` is not the canonical spelling of an integer (such as `42` or `-7`), \
                 but the key column `{key_name}` of table `{table}` is declared `{declared}`: \
                 SQLite would convert the key, so two different keys could write one row"
            ))
        }),
    }
}

/// The upsert of a row of `shape` (the checks that depend on the column names alone were done
/// when the shape was made); the key is checked for every row.
fn upsert_known_shape(
    conn: &Connection,
    shape: &Shape,
    table: &str,
    change: &Change,
    row: &Row,
) -> Result<(), Error> {
    let values: Vec<&Value> = row.values().collect();
    if let Some(position) = shape.key_position {
        check_key_value(values[position], &change.key, &shape.names[position])?;
    }
    let mut params = Vec::with_capacity(shape.order.len() + 1);
    params.push(key_param_of(
        &shape.key_kind,
        &shape.key_name,
        table,
        &change.key,
    )?);
    params.extend(
        shape
            .order
            .iter()
            .map(|&position| Param::Value(values[position])),
    );
    conn.prepare_cached(&shape.sql)?
        .execute(rusqlite::params_from_iter(params))?;
    Ok(())
}

/// Whether the row's own key column value is the subject key.
fn check_key_value(value: &Value, key: &str, column: &str) -> Result<(), Error> {
    let matches = match value {
        Value::I64(i) => i.to_string() == key,
        Value::Text(s) => s == key,
        other => {
            return Err(Error::Reject(format!(
                "key column `{column}` holds {other:?}; a key must be text or an integer"
            )))
        }
    };
    if matches {
        Ok(())
    } else {
        Err(Error::Reject(format!(
            "key column `{column}` holds {value:?}, which does not match the subject key `{key}`"
        )))
    }
}

/// Applies `changes` in order inside the caller's transaction (or savepoint), creating tables
/// and adding columns as needed. A failing change is attributed to its index (see
/// [`sink_error`]); the caller rolls back.
pub(super) fn apply_changes(
    conn: &Connection,
    schema: &mut SchemaCache,
    options: &SqliteOptions,
    changes: &[Change],
) -> Result<(), SinkError> {
    for (index, change) in changes.iter().enumerate() {
        let result = match &change.op {
            jetsync::Change::Upsert(row) => upsert(conn, schema, options, change, row),
            jetsync::Change::Delete => delete(conn, schema, options, change),
        };
        result.map_err(|e| {
            sink_error(&options.path, "apply a change to", e, Some((index, change)))
        })?;
    }
    Ok(())
}

fn upsert(
    conn: &Connection,
    schema: &mut SchemaCache,
    options: &SqliteOptions,
    change: &Change,
    row: &Row,
) -> Result<(), Error> {
    let table = change.table.as_str();
    if let Some(shape) = schema.shape(table).filter(|shape| shape.fits(row)) {
        return upsert_known_shape(conn, shape, table, change, row);
    }
    if !schema.knows(table) {
        // Known tables passed this check since the schema last changed.
        scope::check_allowed(conn, options, table)?;
    }
    for name in row.keys() {
        validate_identifier(name).map_err(|e| Error::Reject(format!("column name: {e}")))?;
    }
    if schema.lookup(conn, options, table)?.is_none() {
        let key_column = options.key_column(table);
        if let Some((name, value)) = row
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key_column))
        {
            check_key_value(value, &change.key, name)?;
        }
        schema::create_table(conn, table, key_column, row)?;
        schema.changed = true;
        schema.refresh(conn, options, table)?;
    }
    let info = schema
        .lookup(conn, options, table)?
        .ok_or_else(|| Error::Fatal(format!("table `{table}` vanished right after creation")))?;

    // Additive schema evolution: add the columns this event carries and the table lacks.
    let missing: Vec<&str> = row
        .keys()
        .filter(|name| info.find(name).is_none())
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        schema::check_distinct(missing.iter().copied())?;
        schema::add_columns(conn, table, info.strict, missing.into_iter())?;
        schema.changed = true;
        schema.refresh(conn, options, table)?;
    }
    let info = schema
        .lookup(conn, options, table)?
        .ok_or_else(|| Error::Fatal(format!("table `{table}` vanished while altering it")))?;

    let key = info.key;
    // A key the key column would convert is refused before anything else is looked at.
    key_param(info, table, &change.key)?;
    // The event's value of each column, by column index, and its position in the row.
    let mut values: Vec<Option<&Value>> = vec![None; info.columns.len()];
    let mut positions: Vec<usize> = vec![0; info.columns.len()];
    let mut key_position = None;
    for (position, (name, value)) in row.iter().enumerate() {
        let index = info
            .find(name)
            .ok_or_else(|| Error::Fatal(format!("column `{name}` of `{table}` vanished")))?;
        let column = &info.columns[index];
        if index == key {
            check_key_value(value, &change.key, name)?;
            key_position = Some(position);
            continue;
        }
        if values[index].is_some() {
            return Err(Error::Reject(format!(
                "columns `{name}` and `{}` are the same SQLite column (names ignore ASCII case)",
                column.name
            )));
        }
        if column.generated {
            return Err(Error::Reject(format!(
                "column `{}` of `{table}` is a generated column and cannot be written",
                column.name
            )));
        }
        values[index] = Some(value);
        positions[index] = position;
    }

    // INSERT … ON CONFLICT DO UPDATE: the event's row replaces the stored row entirely; every
    // column the event lacks is NULL on both paths.
    let key_name = &info.columns[key].name;
    let mut sql = String::with_capacity(64 + 48 * info.columns.len());
    let mut order = Vec::with_capacity(row.len());
    sql.push_str("INSERT INTO ");
    push_quoted(&mut sql, table);
    sql.push_str(" (");
    push_quoted(&mut sql, key_name);
    let writable = || {
        info.columns
            .iter()
            .enumerate()
            .filter(move |(index, column)| *index != key && !column.generated)
    };
    for (_, column) in writable() {
        sql.push_str(", ");
        push_quoted(&mut sql, &column.name);
    }
    sql.push_str(") VALUES (?");
    for (index, _) in writable() {
        match values[index] {
            Some(_) => {
                sql.push_str(", ?");
                order.push(positions[index]);
            }
            None => sql.push_str(", NULL"),
        }
    }
    sql.push_str(") ON CONFLICT (");
    push_quoted(&mut sql, key_name);
    sql.push_str(") DO ");
    let mut first = true;
    for (_, column) in writable() {
        sql.push_str(if first { "UPDATE SET " } else { ", " });
        first = false;
        push_quoted(&mut sql, &column.name);
        sql.push_str(" = excluded.");
        push_quoted(&mut sql, &column.name);
    }
    if first {
        // The table has nothing but its key: an existing row is already what the event says.
        sql.push_str("NOTHING");
    }
    let shape = Shape {
        names: row.keys().cloned().collect(),
        sql,
        order,
        key_position,
        key_name: key_name.clone(),
        key_kind: info.key_kind.clone(),
    };
    upsert_known_shape(conn, &shape, table, change, row)?;
    schema.remember(table, shape);
    Ok(())
}

fn delete(
    conn: &Connection,
    schema: &mut SchemaCache,
    options: &SqliteOptions,
    change: &Change,
) -> Result<(), Error> {
    let table = change.table.as_str();
    if !schema.knows(table) {
        // Known tables passed this check since the schema last changed.
        scope::check_allowed(conn, options, table)?;
    }
    let Some(info) = schema.lookup(conn, options, table)? else {
        return Ok(()); // Nothing was ever stored there: deleting is a no-op.
    };
    let key_param = key_param(info, table, &change.key)?;
    let mut sql = String::from("DELETE FROM ");
    push_quoted(&mut sql, table);
    sql.push_str(" WHERE ");
    push_quoted(&mut sql, &info.columns[info.key].name);
    sql.push_str(" = ?1");
    conn.prepare_cached(&sql)?.execute([key_param])?;
    Ok(())
}
