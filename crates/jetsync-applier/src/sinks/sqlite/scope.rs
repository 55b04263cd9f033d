//! Which tables the sink may touch.
//!
//! The sink writes, creates and clears only *synced tables*: the configured ones and, with
//! [`SqliteOptions::any_table`], the ones it created itself (recorded in `jetsync_tables` in
//! the same transaction as their `CREATE TABLE`, so a rolled-back creation is forgotten too).
//! Never: the applier's own tables (`jetsync_*`), SQLite's (`sqlite_*`, a legal jetsync table
//! name such as `sqlite_stat1` included), views, virtual tables (FTS, R-tree) and their shadow
//! tables (`<vtab>_content`, `<vtab>_data`, …), which a write would corrupt.

use std::collections::BTreeSet;

use rusqlite::{Connection, OptionalExtension};

use super::errors::Error;
use super::options::{validate_identifier, SqliteOptions};
use crate::sinks::sql::push_quoted;

/// The tables the sink created (the synced tables of `any_table` mode).
pub(super) const CREATED_TABLE: &str = "jetsync_tables";
/// Prefixes of table names that never hold synced rows: ours, and SQLite's own.
const RESERVED_PREFIXES: [&str; 2] = ["jetsync_", "sqlite_"];
/// Suffixes of the shadow tables FTS3/4, FTS5 and R-tree keep beside a virtual table.
const SHADOW_SUFFIXES: [&str; 11] = [
    "_content",
    "_data",
    "_idx",
    "_docsize",
    "_config",
    "_segments",
    "_segdir",
    "_stat",
    "_node",
    "_parent",
    "_rowid",
];

/// The statement that creates the sink's own tables (at open; idempotent).
pub(super) const CREATE_OWN_TABLES: &str = "CREATE TABLE IF NOT EXISTS jetsync_offsets \
     (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL); \
     CREATE TABLE IF NOT EXISTS jetsync_tables (name TEXT PRIMARY KEY); \
     CREATE TABLE IF NOT EXISTS jetsync_capture_applying (flag INTEGER)";

/// Whether `table` is one of ours or SQLite's (compared as SQLite does, ignoring ASCII case).
pub(super) fn is_reserved(table: &str) -> bool {
    let lower = table.to_ascii_lowercase();
    RESERVED_PREFIXES.iter().any(|p| lower.starts_with(p))
}

/// What a name of the main schema is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// An ordinary table.
    Table,
    /// A view.
    View,
    /// A virtual table (FTS, R-tree, …).
    Virtual,
    /// A table that belongs to a virtual table.
    Shadow,
}

/// An existing object of the main schema, as SQLite spells it.
#[derive(Debug)]
pub(super) struct Object {
    /// The name as stored (SQLite matches names ignoring ASCII case).
    pub(super) name: String,
    pub(super) kind: Kind,
    /// A `STRICT` table.
    pub(super) strict: bool,
}

/// Looks up `table` in the main schema; `None` when no table or view of that name exists.
pub(super) fn object(conn: &Connection, table: &str) -> Result<Option<Object>, Error> {
    let found = conn
        .prepare_cached(
            "SELECT name, type, strict FROM pragma_table_list \
             WHERE schema = 'main' AND name = ?1 COLLATE NOCASE",
        )?
        .query_row([table], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, bool>(2)?,
            ))
        })
        .optional()?;
    let Some((name, kind, strict)) = found else {
        return Ok(None);
    };
    let kind = match kind.as_str() {
        "view" => Kind::View,
        "virtual" => Kind::Virtual,
        "shadow" => Kind::Shadow,
        _ if shadow_of(conn, &name)?.is_some() => Kind::Shadow,
        _ => Kind::Table,
    };
    Ok(Some(Object { name, kind, strict }))
}

/// The virtual table `table` belongs to by its name (`<vtab>_<suffix>`), whether or not
/// `table` exists yet.
pub(super) fn shadow_of(conn: &Connection, table: &str) -> Result<Option<String>, Error> {
    let lower = table.to_ascii_lowercase();
    for suffix in SHADOW_SUFFIXES {
        let Some(vtab) = lower.strip_suffix(suffix) else {
            continue;
        };
        if vtab.is_empty() {
            continue;
        }
        let virtual_table: Option<String> = conn
            .prepare_cached(
                "SELECT name FROM pragma_table_list \
                 WHERE schema = 'main' AND type = 'virtual' AND name = ?1 COLLATE NOCASE",
            )?
            .query_row([&table[..vtab.len()]], |row| row.get(0))
            .optional()?;
        if virtual_table.is_some() {
            return Ok(virtual_table);
        }
    }
    Ok(None)
}

/// Whether a change for `table` may be applied at all, before looking at the table itself:
/// a reserved name, a table nobody configured (without `any_table`), a name SQLite cannot
/// store or a virtual table's shadow table is a rejection of the change.
pub(super) fn check_allowed(
    conn: &Connection,
    options: &SqliteOptions,
    table: &str,
) -> Result<(), Error> {
    if is_reserved(table) {
        return Err(Error::Reject(format!(
            "table name `{table}` is reserved: the applier never writes jetsync_* and sqlite_* \
             tables; rename the table"
        )));
    }
    if !options.any_table && !options.is_configured(table) {
        return Err(Error::Reject(format!(
            "table not synced here: `{table}` has no [tables.{table}] entry in this instance's \
             configuration"
        )));
    }
    validate_identifier(table).map_err(|e| Error::Reject(format!("table name: {e}")))?;
    if let Some(vtab) = shadow_of(conn, table)? {
        return Err(Error::Reject(format!(
            "table `{table}` belongs to the virtual table `{vtab}` and is never written"
        )));
    }
    Ok(())
}

/// Records that the sink created `table` (inside the creating transaction).
pub(super) fn record_created(conn: &Connection, table: &str) -> Result<(), Error> {
    conn.prepare_cached("INSERT OR IGNORE INTO jetsync_tables (name) VALUES (?1)")
        .and_then(|mut stmt| stmt.execute([table]))
        .map_err(|e| {
            Error::own(
                &format!("record the creation of table `{table}` in {CREATED_TABLE}"),
                e,
            )
        })?;
    Ok(())
}

/// The synced tables that exist as ordinary tables, sorted by name: the configured ones, plus
/// with `any_table` the ones the sink created.
pub(super) fn synced_tables(
    conn: &Connection,
    options: &SqliteOptions,
) -> Result<Vec<String>, Error> {
    let mut names: BTreeSet<String> = options.key_columns.keys().cloned().collect();
    if options.any_table {
        let created: Vec<String> = conn
            .prepare_cached("SELECT name FROM jetsync_tables")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        names.extend(created);
    }
    let mut tables = Vec::with_capacity(names.len());
    // Two spellings of one name are one SQLite table: list it once.
    let mut seen = BTreeSet::new();
    for name in names {
        if is_reserved(&name) {
            continue;
        }
        if let Some(Object {
            name: stored,
            kind: Kind::Table,
            ..
        }) = object(conn, &name)?
        {
            if seen.insert(stored.to_ascii_lowercase()) {
                tables.push(name);
            }
        }
    }
    Ok(tables)
}

/// `DELETE FROM` every synced table (a resync starts from empty tables). `DELETE`, not `DROP`:
/// the service's schema, indexes and triggers stay.
pub(super) fn clear_synced(conn: &Connection, options: &SqliteOptions) -> Result<(), Error> {
    for table in synced_tables(conn, options)? {
        let mut sql = String::from("DELETE FROM ");
        push_quoted(&mut sql, &table);
        conn.execute(&sql, [])
            .map_err(|e| Error::own(&format!("clear table `{table}`"), e))?;
    }
    Ok(())
}
