//! Configuration of the SQLite sink: the file, the synced tables and their key columns, and
//! whether tables nobody configured may be written.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Configuration of the SQLite sink.
///
/// The *synced tables* are the keys of [`key_columns`](Self::key_columns) (the binary fills it
/// from every `[tables.<name>]` entry) and, with [`any_table`](Self::any_table), every table the
/// sink itself created. Only synced tables are written, created, cleared by a resync,
/// digested and checked by [`crate::Sink::is_empty`]; a service's other tables in the same file
/// are never touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// The database file; created (with its parent directory, readable by the owner only on
    /// Unix) when missing.
    pub path: PathBuf,
    /// The configured tables and the key column of each (table name → column). A table listed
    /// here is synced even when its key column is [`default_key_column`](Self::default_key_column).
    pub key_columns: BTreeMap<String, String>,
    /// Key column of every table not listed in [`key_columns`](Self::key_columns), usually `id`
    /// (only used with [`any_table`](Self::any_table)).
    pub default_key_column: String,
    /// Whether a change for a table not listed in [`key_columns`](Self::key_columns) is applied
    /// (creating the table on its first upsert) instead of rejected with "table not synced
    /// here". The binary sets it only for `apply.other_tables = "create"`; [`Self::new`] sets it
    /// (an embedding service that lists no tables gets every table the stream names). The
    /// applier's own tables, SQLite's internal ones, views, virtual tables and their shadow
    /// tables are never written either way.
    pub any_table: bool,
}

impl SqliteOptions {
    /// Options for the file at `path`: no configured tables, [`any_table`](Self::any_table) on,
    /// key column `id` for every table.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteOptions {
            path: path.into(),
            key_columns: BTreeMap::new(),
            default_key_column: "id".to_owned(),
            any_table: true,
        }
    }

    /// The key column of `table`.
    pub fn key_column(&self, table: &str) -> &str {
        self.key_columns
            .get(table)
            .map_or(self.default_key_column.as_str(), String::as_str)
    }

    /// Whether `table` is a configured table (listed in [`key_columns`](Self::key_columns)).
    pub fn is_configured(&self, table: &str) -> bool {
        self.key_columns.contains_key(table)
    }

    /// Checks the key column names; the error names the setting.
    pub(super) fn validate(&self) -> Result<(), String> {
        validate_identifier(&self.default_key_column)
            .map_err(|e| format!("sqlite sink: invalid default key column: {e}"))?;
        for (table, column) in &self.key_columns {
            validate_identifier(column)
                .map_err(|e| format!("sqlite sink: invalid key column for table `{table}`: {e}"))?;
        }
        Ok(())
    }
}

/// Names SQLite cannot store as identifiers. Everything else is allowed (quoted).
pub(super) fn validate_identifier(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty name is not allowed".to_owned());
    }
    if name.contains('\0') {
        return Err(format!("name {name:?} contains a NUL character"));
    }
    Ok(())
}
