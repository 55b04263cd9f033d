//! Statement planning: a batch of changes becomes a few multi-row statements.
//!
//! Consecutive changes of the same table, operation and set of carried columns become one
//! statement (`INSERT … SELECT … FROM unnest($1, $2, …) ON CONFLICT …`, `DELETE … WHERE key IN
//! (SELECT … FROM unnest($1))`), with one array parameter per column typed to the column. A
//! group is split where the same key comes again (`ON CONFLICT` cannot touch one row twice in a
//! statement, and every change is still executed, so what is rejected does not depend on how
//! the stream was split into batches) and where the column set changes.
//!
//! An upsert replaces the row's *synced columns* (every column except the key, generated
//! columns, which the database computes, and identity columns the event does not carry, whose
//! value is the database's to draw): the columns the event carries take its values and every
//! other synced column takes its default, on insert and on update alike, so a row is a function
//! of its last event only. A table configured with `merge = true` updates only the carried
//! columns instead.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;

use jetsync::UnknownColumns;
use tokio_postgres::types::Type;

use super::super::sql::{push_quoted, quote};
use super::types::{convert, describe_value, key_cell, Cell, Kind};
use super::{is_reserved_table, PostgresOptions};
use crate::Change;

/// One column of a table.
#[derive(Debug, Clone)]
pub(super) struct ColumnInfo {
    pub(super) name: String,
    pub(super) kind: Kind,
    /// `format_type(atttypid, atttypmod)`: the cast target for values sent as text.
    pub(super) type_name: String,
    /// `GENERATED ALWAYS AS (…) STORED`: computed by the database, never written.
    pub(super) generated: bool,
    /// An identity column (`GENERATED … AS IDENTITY`): written when an event carries it, never
    /// reset to its default (that would draw a new value from its sequence).
    pub(super) identity: bool,
}

/// What the sink knows about one existing table.
#[derive(Debug)]
pub(super) struct TableInfo {
    pub(super) name: String,
    pub(super) columns: Vec<ColumnInfo>,
    pub(super) exact: HashMap<String, usize>,
    /// ASCII-lowercased name → the one column with that folded name (`None`: ambiguous).
    pub(super) folded: HashMap<String, Option<usize>>,
    /// The key column, when the table has it.
    pub(super) key: Option<usize>,
    /// Whether a unique index covers exactly the key column.
    pub(super) key_unique: bool,
    /// The batch during which this description was read.
    pub(super) generation: u64,
}

impl TableInfo {
    pub(super) fn new(
        name: &str,
        key_column: &str,
        columns: Vec<(ColumnInfo, bool)>,
        generation: u64,
    ) -> TableInfo {
        let exact = columns
            .iter()
            .enumerate()
            .map(|(i, (c, _))| (c.name.clone(), i))
            .collect();
        let mut folded: HashMap<String, Option<usize>> = HashMap::new();
        for (i, (c, _)) in columns.iter().enumerate() {
            folded
                .entry(c.name.to_ascii_lowercase())
                .and_modify(|slot| *slot = None)
                .or_insert(Some(i));
        }
        let mut info = TableInfo {
            name: name.to_owned(),
            columns: Vec::new(),
            exact,
            folded,
            key: None,
            key_unique: false,
            generation,
        };
        info.key = info.find(key_column);
        info.key_unique = info.key.is_some_and(|k| columns[k].1);
        info.columns = columns.into_iter().map(|(c, _)| c).collect();
        info
    }

    pub(super) fn find(&self, name: &str) -> Option<usize> {
        self.exact.get(name).copied().or_else(|| {
            self.folded
                .get(&name.to_ascii_lowercase())
                .copied()
                .flatten()
        })
    }
}

/// What a statement does: upsert these columns (key first), or delete by key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    Upsert(Vec<usize>),
    Delete,
}

/// One multi-row statement of a batch.
#[derive(Debug)]
pub(super) struct Statement {
    pub(super) sql: String,
    /// One array parameter per column.
    pub(super) columns: Vec<Vec<Cell>>,
    pub(super) types: Vec<Type>,
    /// Index of its first change in the batch.
    pub(super) first: usize,
    /// How many changes it carries.
    pub(super) changes: usize,
}

/// A change the sink refuses before sending it.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) index: usize,
    pub(super) reason: String,
}

/// The statements of a batch: all of it, or the changes before the refused one.
#[derive(Debug)]
pub(super) struct Planned {
    pub(super) statements: Vec<Statement>,
    pub(super) refusal: Option<Refusal>,
}

/// One change, converted.
struct Prepared {
    shape: Shape,
    /// Values in shape order.
    cells: Vec<Cell>,
    key: Cell,
}

/// Why a change is refused before it is sent.
struct Problem(String);

/// A statement being filled.
struct Open {
    table: Arc<TableInfo>,
    /// `tables.<name>.merge`: update only the carried columns.
    merge: bool,
    shape: Shape,
    first: usize,
    count: usize,
    columns: Vec<Vec<Cell>>,
    keys: HashSet<String>,
}

impl Open {
    fn accepts(&self, table: &str, prepared: &Prepared, key_id: &str) -> bool {
        self.table.name == table
            && self.shape == prepared.shape
            && (self.shape == Shape::Delete || !self.keys.contains(key_id))
    }

    fn finish(self, schema: &str) -> Statement {
        let (sql, kinds): (String, Vec<Kind>) = match &self.shape {
            Shape::Upsert(columns) => (
                upsert_sql(schema, &self.table, columns, self.merge),
                columns
                    .iter()
                    .map(|&c| self.table.columns[c].kind)
                    .collect(),
            ),
            Shape::Delete => {
                let key = self.table.key.expect("planned deletes have a key column");
                (
                    delete_sql(schema, &self.table),
                    vec![self.table.columns[key].kind],
                )
            }
        };
        Statement {
            sql,
            columns: self.columns,
            types: kinds.into_iter().map(Kind::param_type).collect(),
            first: self.first,
            changes: self.count,
        }
    }
}

/// `u.cN`, cast to the column's type when the value travels as text.
fn push_select_expr(sql: &mut String, position: usize, column: &ColumnInfo) {
    sql.push_str(&format!("u.c{position}"));
    if column.kind.needs_cast() {
        sql.push_str("::");
        sql.push_str(&column.type_name);
    }
}

/// The upsert of `columns` (key first, then the carried columns in table order). Without
/// `merge`, the update sets every synced column: the carried ones to the event's values, the
/// others to `DEFAULT`, exactly as an insert would leave them.
pub(super) fn upsert_sql(
    schema: &str,
    table: &TableInfo,
    columns: &[usize],
    merge: bool,
) -> String {
    let mut sql = String::with_capacity(128 + 48 * columns.len());
    sql.push_str("INSERT INTO ");
    push_quoted(&mut sql, schema);
    sql.push('.');
    push_quoted(&mut sql, &table.name);
    sql.push_str(" (");
    for (i, &c) in columns.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        push_quoted(&mut sql, &table.columns[c].name);
    }
    sql.push_str(") OVERRIDING SYSTEM VALUE SELECT ");
    for (i, &c) in columns.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        push_select_expr(&mut sql, i, &table.columns[c]);
    }
    sql.push_str(" FROM unnest(");
    for i in 0..columns.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("${}", i + 1));
    }
    sql.push_str(") AS u(");
    for i in 0..columns.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("c{i}"));
    }
    sql.push_str(") ON CONFLICT (");
    push_quoted(&mut sql, &table.columns[columns[0]].name);
    sql.push_str(") DO ");
    let carried = |c: usize| columns[1..].contains(&c);
    let set: Vec<(usize, bool)> = if merge {
        columns[1..].iter().map(|&c| (c, true)).collect()
    } else {
        (0..table.columns.len())
            .filter(|&c| Some(c) != table.key && !table.columns[c].generated)
            .filter(|&c| carried(c) || !table.columns[c].identity)
            .map(|c| (c, carried(c)))
            .collect()
    };
    if set.is_empty() {
        // Nothing but the key: an existing row already is what the event says.
        sql.push_str("NOTHING");
        return sql;
    }
    sql.push_str("UPDATE SET ");
    for (i, (c, from_event)) in set.into_iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        let name = &table.columns[c].name;
        push_quoted(&mut sql, name);
        if from_event {
            sql.push_str(" = EXCLUDED.");
            push_quoted(&mut sql, name);
        } else {
            sql.push_str(" = DEFAULT");
        }
    }
    sql
}

pub(super) fn delete_sql(schema: &str, table: &TableInfo) -> String {
    let key = &table.columns[table.key.expect("planned deletes have a key column")];
    let mut sql = String::from("DELETE FROM ");
    push_quoted(&mut sql, schema);
    sql.push('.');
    push_quoted(&mut sql, &table.name);
    sql.push_str(" WHERE ");
    push_quoted(&mut sql, &key.name);
    sql.push_str(" IN (SELECT ");
    push_select_expr(&mut sql, 0, key);
    sql.push_str(" FROM unnest($1) AS u(c0))");
    sql
}

/// Converts one change for its table.
fn prepare(
    change: &Change,
    info: Option<&TableInfo>,
    options: &PostgresOptions,
    schema: &str,
) -> Result<Prepared, Problem> {
    let table = change.table.as_str();
    if is_reserved_table(table) {
        return Err(Problem(format!(
            "table name `{table}` is reserved (jetsync_* and pg_* tables are never written by \
             the applier)"
        )));
    }
    let Some(key_column) = options.key_column(table) else {
        return Err(Problem(format!(
            "table `{table}` is not synced here: it is not listed under [tables] of this \
             instance's configuration (add [tables.{table}] to sync it, then `parked retry`)"
        )));
    };
    let Some(info) = info else {
        return Err(Problem(format!(
            "table `{schema}.{table}` does not exist (or is not a table); the postgres sink \
             applies into the service's existing tables and never creates one: create it, or \
             stop publishing `{table}`"
        )));
    };
    let Some(key) = info.key else {
        return Err(Problem(format!(
            "table `{schema}.{table}` has no key column `{key_column}`; set tables.{table}.key \
             to its key column, or add that column"
        )));
    };
    let key_info = &info.columns[key];
    if !info.key_unique {
        return Err(Problem(format!(
            "the key column `{}` of `{schema}.{table}` has no PRIMARY KEY, UNIQUE constraint or \
             full unique index on it alone, which upserts need; add one (ALTER TABLE \
             {}.{} ADD UNIQUE ({})) or set tables.{table}.key",
            key_info.name,
            quote(schema),
            quote(table),
            quote(&key_info.name)
        )));
    }
    let key_cell = key_cell(key_info.kind, &key_info.type_name, &change.key).map_err(|e| {
        Problem(format!(
            "the subject key {:?} does not fit key column `{}` ({}): {e}",
            change.key, key_info.name, key_info.type_name
        ))
    })?;
    let row = match &change.op {
        jetsync::Change::Delete => {
            return Ok(Prepared {
                shape: Shape::Delete,
                cells: vec![key_cell.clone()],
                key: key_cell,
            })
        }
        jetsync::Change::Upsert(row) => row,
    };
    let mut key_named: Option<&str> = None;
    let mut chosen: Vec<(usize, &str, Cell)> = Vec::with_capacity(row.len());
    for (name, value) in row {
        let Some(index) = info.find(name) else {
            match options.unknown_columns {
                UnknownColumns::Ignore => continue,
                UnknownColumns::Error => {
                    return Err(Problem(format!(
                        "column `{name}` does not exist in table `{schema}.{table}` (with \
                         sink.unknown_columns = \"ignore\" such columns are dropped)"
                    )))
                }
            }
        };
        let column = &info.columns[index];
        let clash = |other: &str| {
            Problem(format!(
                "columns `{other}` and `{name}` both name column `{}` of `{schema}.{table}`",
                column.name
            ))
        };
        if index == key {
            if let Some(other) = key_named {
                return Err(clash(other));
            }
            key_named = Some(name);
            let cell = convert(column.kind, value)
                .map_err(|e| Problem(format!("key column `{name}` ({}): {e}", column.type_name)))?;
            if cell != key_cell {
                return Err(Problem(format!(
                    "key column `{name}` holds {}, which does not match the subject key {:?}",
                    describe_value(value),
                    change.key
                )));
            }
            continue;
        }
        if column.generated {
            continue; // Computed by the database from the other columns.
        }
        if let Some((_, other, _)) = chosen.iter().find(|(i, _, _)| *i == index) {
            return Err(clash(other));
        }
        let cell = convert(column.kind, value)
            .map_err(|e| Problem(format!("column `{name}` ({}): {e}", column.type_name)))?;
        chosen.push((index, name, cell));
    }
    chosen.sort_by_key(|(index, _, _)| *index);
    let mut columns = Vec::with_capacity(chosen.len() + 1);
    let mut cells = Vec::with_capacity(chosen.len() + 1);
    columns.push(key);
    cells.push(key_cell.clone());
    for (index, _, cell) in chosen {
        columns.push(index);
        cells.push(cell);
    }
    Ok(Prepared {
        shape: Shape::Upsert(columns),
        cells,
        key: key_cell,
    })
}

/// Turns a batch into statements: consecutive changes of one table, operation and column set
/// share a statement (when `grouped`), split where a key repeats. Stops at the first change the
/// sink refuses, planning the changes before it.
pub(super) fn plan(
    changes: &[Change],
    tables: &HashMap<String, Arc<TableInfo>>,
    options: &PostgresOptions,
    schema: &str,
    grouped: bool,
) -> Planned {
    let mut statements = Vec::new();
    let mut open: Option<Open> = None;
    let mut refusal = None;
    for (index, change) in changes.iter().enumerate() {
        let info = tables.get(&change.table);
        let prepared = match prepare(change, info.map(|t| &**t), options, schema) {
            Ok(prepared) => prepared,
            Err(Problem(reason)) => {
                refusal = Some(Refusal { index, reason });
                break;
            }
        };
        let Some(info) = info else {
            unreachable!("prepare refuses changes of missing tables");
        };
        let key_id = format!("{:?}", prepared.key);
        let fits = grouped
            && open
                .as_ref()
                .is_some_and(|g| g.accepts(&change.table, &prepared, &key_id));
        if !fits {
            if let Some(done) = open.take() {
                statements.push(done.finish(schema));
            }
            open = Some(Open {
                table: Arc::clone(info),
                merge: options.merges(&change.table),
                columns: vec![Vec::new(); prepared.cells.len()],
                shape: prepared.shape.clone(),
                first: index,
                count: 0,
                keys: HashSet::new(),
            });
        }
        let group = open.as_mut().expect("a statement is open");
        for (column, cell) in group.columns.iter_mut().zip(prepared.cells) {
            column.push(cell);
        }
        group.count += 1;
        if group.shape != Shape::Delete {
            group.keys.insert(key_id);
        }
    }
    if let Some(done) = open.take() {
        statements.push(done.finish(schema));
    }
    Planned {
        statements,
        refusal,
    }
}
