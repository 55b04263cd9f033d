//! Table and column creation and introspection.
//!
//! Tables and columns the sink creates have **no declared type**, hence no type affinity:
//! SQLite stores every value with the type it has in the event (`typeof()` is `integer`,
//! `real`, `text`, `blob` or `null`), whatever values earlier events carried. A column typed
//! after the first value it saw would store `'5'` as text on an instance that first saw a text
//! value and as integer 5 on one that joined later, so the tables would depend on history.
//! (`ANY` is no substitute: outside `STRICT` tables it means NUMERIC affinity, which coerces.)
//! In a service's `STRICT` table a new column is added as `ANY`, its affinity-free type.

use std::collections::HashMap;

use jetsync::Row;
use rusqlite::Connection;

use super::errors::Error;
use super::options::SqliteOptions;
use super::scope::{self, Kind};
use crate::sinks::sql::push_quoted;

/// One column of a table, as `PRAGMA table_xinfo` reports it.
#[derive(Debug)]
pub(super) struct Column {
    pub(super) name: String,
    /// Generated (or otherwise hidden) columns cannot be written.
    pub(super) generated: bool,
}

/// How the key column stores a subject key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeyKind {
    /// TEXT, BLOB or no affinity: the key is stored as text, exactly as in the subject.
    Text,
    /// INTEGER, NUMERIC or REAL affinity (a table the service created, or an older jetsync
    /// created after an integer key): SQLite would turn `042` and `42` into the same integer, so
    /// only the canonical spelling of an integer is accepted. Holds the declared type.
    Integer(String),
}

/// What the sink knows about one existing table it may write.
#[derive(Debug)]
pub(super) struct TableInfo {
    pub(super) columns: Vec<Column>,
    /// Column name → index. SQLite matches identifiers ASCII-case-insensitively, so this is keyed
    /// by the ASCII-lowercased name; `exact` spares the lowercasing in the common case.
    exact: HashMap<String, usize>,
    folded: HashMap<String, usize>,
    /// Index of the key column.
    pub(super) key: usize,
    pub(super) key_kind: KeyKind,
    /// A `STRICT` table (new columns need a declared type there).
    pub(super) strict: bool,
}

impl TableInfo {
    /// The index of column `name` (ignoring ASCII case, as SQLite does).
    pub(super) fn find(&self, name: &str) -> Option<usize> {
        self.exact
            .get(name)
            .or_else(|| self.folded.get(&name.to_ascii_lowercase()))
            .copied()
    }
}

/// A column as `pragma_table_xinfo` reports it: name, declared type, primary key position,
/// hidden flag.
type RawColumn = (String, String, i64, i64);

/// The columns of `table` (empty when it does not exist).
pub(super) fn raw_columns(conn: &Connection, table: &str) -> Result<Vec<RawColumn>, Error> {
    let mut stmt =
        conn.prepare_cached("SELECT name, type, pk, hidden FROM pragma_table_xinfo(?1)")?;
    let rows = stmt.query_map([table], |row| {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Whether a column declared `declared` converts text that looks like a number into a number
/// (SQLite's affinity rules, "Determination Of Column Affinity").
fn converts_numbers(declared: &str, strict: bool) -> bool {
    let t = declared.to_ascii_uppercase();
    if strict && t == "ANY" {
        return false;
    }
    if t.contains("INT") {
        return true;
    }
    if t.is_empty()
        || ["CHAR", "CLOB", "TEXT", "BLOB"]
            .iter()
            .any(|s| t.contains(s))
    {
        return false;
    }
    true // REAL, FLOA, DOUB, NUMERIC and anything else
}

/// Reads `table` for writing: `None` when it does not exist. A table the sink cannot write
/// rows into by key (a view, a virtual or shadow table, a table without the key column or
/// whose key column is not unique, a table named with other capitalisation by an unconfigured
/// name) is a rejection of the change.
pub(super) fn discover(
    conn: &Connection,
    options: &SqliteOptions,
    table: &str,
) -> Result<Option<TableInfo>, Error> {
    let Some(object) = scope::object(conn, table)? else {
        return Ok(None);
    };
    match object.kind {
        Kind::Table => {}
        Kind::View => {
            return Err(Error::Reject(format!(
                "`{table}` is a view, which the applier cannot write rows into"
            )))
        }
        Kind::Virtual => {
            return Err(Error::Reject(format!(
                "`{table}` is a virtual table, which the applier never writes"
            )))
        }
        Kind::Shadow => {
            return Err(Error::Reject(format!(
                "`{table}` belongs to a virtual table and is never written"
            )))
        }
    }
    if object.name != table && !options.is_configured(table) {
        // Two subjects (`T/a`, `t/a`) must never write one row.
        return Err(Error::Reject(format!(
            "table `{table}` is the existing table `{}` (SQLite table names ignore ASCII case); \
             publish under one spelling",
            object.name
        )));
    }
    let key_column = options.key_column(table);
    let mut columns = Vec::new();
    let mut pks = Vec::new();
    let mut declared = Vec::new();
    for (name, ty, pk, hidden) in raw_columns(conn, table)? {
        if pk > 0 {
            pks.push(columns.len());
        }
        declared.push(ty);
        columns.push(Column {
            name,
            generated: hidden != 0,
        });
    }
    let exact: HashMap<String, usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.clone(), i))
        .collect();
    let folded: HashMap<String, usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.to_ascii_lowercase(), i))
        .collect();
    let mut info = TableInfo {
        columns,
        exact,
        folded,
        key: 0,
        key_kind: KeyKind::Text,
        strict: object.strict,
    };
    let Some(key) = info.find(key_column) else {
        return Err(Error::Reject(format!(
            "table `{table}` has no key column `{key_column}`; add that column, or set \
             [tables.{table}] key to its key column"
        )));
    };
    if !(pks == [key] || has_unique_index(conn, table, &info.columns[key].name)?) {
        return Err(Error::Reject(format!(
            "the key column `{key_column}` of table `{table}` is neither its only PRIMARY KEY \
             column nor covered by a UNIQUE index, so rows cannot be replaced by key; add \
             `CREATE UNIQUE INDEX ... ON {table} ({key_column})` or set [tables.{table}] key"
        )));
    }
    info.key = key;
    if converts_numbers(&declared[key], object.strict) {
        info.key_kind = KeyKind::Integer(declared[key].clone());
    }
    Ok(Some(info))
}

/// Whether a full (non-partial) unique index on exactly `column` exists, which `ON CONFLICT`
/// needs.
fn has_unique_index(conn: &Connection, table: &str, column: &str) -> Result<bool, Error> {
    let indexes: Vec<String> = conn
        .prepare_cached(
            "SELECT name FROM pragma_index_list(?1) WHERE \"unique\" = 1 AND partial = 0",
        )?
        .query_map([table], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    for index in indexes {
        let columns: Vec<Option<String>> = conn
            .prepare_cached("SELECT name FROM pragma_index_info(?1)")?
            .query_map([&index], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        if let [Some(name)] = columns.as_slice() {
            if name.eq_ignore_ascii_case(column) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Rejects rows with two columns SQLite would treat as the same column.
pub(super) fn check_distinct<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), Error> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(Error::Reject(format!(
                "column `{name}` appears twice (SQLite column names ignore ASCII case)"
            )));
        }
    }
    Ok(())
}

/// Creates `table` for the first row it receives: the key column (a text key, PRIMARY KEY)
/// and the row's other columns, none with a declared type; records it as created by the sink.
pub(super) fn create_table(
    conn: &Connection,
    table: &str,
    key_column: &str,
    row: &Row,
) -> Result<(), Error> {
    check_distinct(row.keys().map(String::as_str))?;
    let mut sql = String::from("CREATE TABLE ");
    push_quoted(&mut sql, table);
    sql.push_str(" (");
    push_quoted(&mut sql, key_column);
    sql.push_str(" PRIMARY KEY NOT NULL");
    for name in row.keys() {
        if name.eq_ignore_ascii_case(key_column) {
            continue;
        }
        sql.push_str(", ");
        push_quoted(&mut sql, name);
    }
    sql.push(')');
    conn.execute_batch(&sql)?;
    scope::record_created(conn, table)?;
    tracing::info!(table, key_column, "created table for synced rows");
    Ok(())
}

/// Adds `names` to `table` (additive schema evolution): no declared type (`ANY` in a `STRICT`
/// table, where a type is required and `ANY` converts nothing).
pub(super) fn add_columns<'a>(
    conn: &Connection,
    table: &str,
    strict: bool,
    names: impl Iterator<Item = &'a str>,
) -> Result<(), Error> {
    for name in names {
        let mut sql = String::from("ALTER TABLE ");
        push_quoted(&mut sql, table);
        sql.push_str(" ADD COLUMN ");
        push_quoted(&mut sql, name);
        if strict {
            sql.push_str(" ANY");
        }
        conn.execute_batch(&sql)?;
        tracing::info!(table, column = %name, "added column for synced rows");
    }
    Ok(())
}

/// The columns of the tables the sink has written to, so that a batch does not query the
/// schema per event. Validated against `PRAGMA schema_version` at the start of every
/// transaction, so a column the service added meanwhile is seen (and set to NULL by upserts
/// that lack it).
#[derive(Debug, Default)]
pub(super) struct SchemaCache {
    /// Table → its columns; `None` for a table known not to exist.
    tables: HashMap<String, Option<TableInfo>>,
    /// The `schema_version` the cache describes.
    version: Option<i64>,
    /// This transaction created or altered a table.
    pub(super) changed: bool,
    /// Per table, the upsert of the last row shape written there (see [`Shape`]). Dropped with
    /// the table's entry, so a schema change never reuses one.
    shapes: HashMap<String, Shape>,
}

/// An upsert statement prepared for one shape of row (the same column names in the same
/// order) of one table, so that the next row of that shape skips the column checks, the
/// lookups and building the SQL. Consecutive events of a table nearly always share a shape.
#[derive(Debug)]
pub(super) struct Shape {
    /// The row's column names, in the row's order.
    pub(super) names: Vec<String>,
    /// The `INSERT … ON CONFLICT` statement.
    pub(super) sql: String,
    /// For each parameter after the key, the position of its value in the row.
    pub(super) order: Vec<usize>,
    /// The position of the key column in the row, when the row carries it.
    pub(super) key_position: Option<usize>,
    /// The key column's name and how it stores the key.
    pub(super) key_name: String,
    pub(super) key_kind: KeyKind,
}

impl Shape {
    /// Whether `row` has exactly this shape's column names, in order.
    pub(super) fn fits(&self, row: &jetsync::Row) -> bool {
        self.names.len() == row.len() && self.names.iter().zip(row.keys()).all(|(a, b)| a == b)
    }
}

impl SchemaCache {
    /// Forgets everything (after a rollback, which may have undone our own DDL).
    pub(super) fn clear(&mut self) {
        self.tables.clear();
        self.shapes.clear();
        self.version = None;
        self.changed = false;
    }

    /// At the start of a transaction: keeps the cache only if nobody changed the schema.
    pub(super) fn revalidate(&mut self, conn: &Connection) -> Result<(), Error> {
        let version = schema_version(conn)?;
        if self.version != Some(version) {
            self.tables.clear();
            self.shapes.clear();
            self.version = Some(version);
        }
        self.changed = false;
        Ok(())
    }

    /// Records the schema version our own DDL produced, so the next batch keeps the cache.
    pub(super) fn after_ddl(&mut self, conn: &Connection) -> Result<(), Error> {
        if self.changed {
            self.version = Some(schema_version(conn)?);
            self.changed = false;
        }
        Ok(())
    }

    /// The last upsert shape of `table`, when its schema did not change since.
    pub(super) fn shape(&self, table: &str) -> Option<&Shape> {
        self.shapes.get(table)
    }

    /// Remembers the upsert shape of `table` (a table looked up since the schema changed).
    pub(super) fn remember(&mut self, table: &str, shape: Shape) {
        if self.tables.contains_key(table) {
            self.shapes.insert(table.to_owned(), shape);
        }
    }

    /// Whether `table` was looked up (and allowed) since the schema last changed.
    pub(super) fn knows(&self, table: &str) -> bool {
        self.tables.contains_key(table)
    }

    /// The writable table `table`, `None` when it does not exist (see [`discover`]).
    pub(super) fn lookup(
        &mut self,
        conn: &Connection,
        options: &SqliteOptions,
        table: &str,
    ) -> Result<Option<&TableInfo>, Error> {
        if !self.tables.contains_key(table) {
            self.refresh(conn, options, table)?;
        }
        Ok(self.tables.get(table).and_then(Option::as_ref))
    }

    /// Reads `table` again (after our own DDL).
    pub(super) fn refresh(
        &mut self,
        conn: &Connection,
        options: &SqliteOptions,
        table: &str,
    ) -> Result<(), Error> {
        self.tables.remove(table);
        self.shapes.remove(table);
        let info = discover(conn, options, table)?;
        self.tables.insert(table.to_owned(), info);
        Ok(())
    }
}

fn schema_version(conn: &Connection) -> Result<i64, Error> {
    Ok(conn
        .prepare_cached("PRAGMA schema_version")?
        .query_row([], |row| row.get(0))?)
}
