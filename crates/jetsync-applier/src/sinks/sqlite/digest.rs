//! Reading rows back: [`super::SqliteSink::read_table`], [`crate::Sink::digest`] and
//! [`crate::Sink::is_empty`].
//!
//! A stored value maps back by its storage class alone (INTEGER → `I64`, REAL → `F64`, TEXT →
//! `Text`, BLOB → `Bytes`, NULL → `Null`), never by the column's declared type, so two files
//! holding the same values read back the same rows. Booleans were stored as 0/1 and JSON as
//! its canonical text, and read back as such. The digest covers the synced tables that hold
//! rows (a table that exists but is empty counts as absent, as in the redb sink, so an instance
//! that created a table and deleted its rows equals one that never saw them), and a NULL column
//! hashes like an absent one (see `crate::digest`).

use jetsync::{Row, Value};
use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::errors::Error;
use super::options::SqliteOptions;
use super::scope;
use crate::sinks::sql::{push_quoted, quote};
use crate::{DigestBuilder, TableDigest};

fn from_sql(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::I64(i),
        ValueRef::Real(f) => Value::F64(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
    }
}

/// Calls `f` with every row of `table`, optionally ordered by a column.
pub(super) fn for_each_row(
    conn: &Connection,
    table: &str,
    order_by: Option<&str>,
    mut f: impl FnMut(Row),
) -> Result<(), Error> {
    let mut sql = String::from("SELECT * FROM ");
    push_quoted(&mut sql, table);
    if let Some(column) = order_by {
        sql.push_str(" ORDER BY ");
        push_quoted(&mut sql, column);
    }
    // Not `prepare_cached`: SQLite re-expands `*` only when it re-prepares a statement at its
    // first step, so a cached statement would report the column names from before an
    // `ALTER TABLE`.
    let mut stmt = conn.prepare(&sql)?;
    let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let mut out = Row::new();
        for (index, name) in names.iter().enumerate() {
            out.insert(name.clone(), from_sql(row.get_ref(index)?));
        }
        f(out);
    }
    Ok(())
}

/// Digests of the synced tables that hold rows, sorted by table name.
pub(super) fn digest(
    conn: &Connection,
    options: &SqliteOptions,
) -> Result<Vec<TableDigest>, Error> {
    let mut digests = Vec::new();
    for table in scope::synced_tables(conn, options)? {
        let mut builder = DigestBuilder::default();
        for_each_row(conn, &table, None, |row| builder.add(&table, &row))?;
        let digest = builder.finish(&table);
        if digest.rows > 0 {
            digests.push(digest);
        }
    }
    Ok(digests)
}

/// Whether no synced table holds a row.
pub(super) fn is_empty(conn: &Connection, options: &SqliteOptions) -> Result<bool, Error> {
    for table in scope::synced_tables(conn, options)? {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {})", quote(&table));
        let any: bool = conn.prepare_cached(&sql)?.query_row([], |r| r.get(0))?;
        if any {
            return Ok(false);
        }
    }
    Ok(true)
}
