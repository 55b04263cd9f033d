//! Configuration of the Postgres sink, as `build_sink` fills it from `[sink]` and `[tables]`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use jetsync::UnknownColumns;

/// Configuration of the Postgres sink.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Connection URL, `postgres://user:password@host:5432/database` (any libpq-style URL or
    /// key/value string tokio-postgres accepts). TLS is not supported: `sslmode=require` fails.
    pub url: String,
    /// Schema of the synced tables and of `jetsync_offsets` (`sink.schema`). `None`: the
    /// connection's `current_schema()`, so a `search_path` set for the user or in the URL
    /// (`options=-csearch_path%3Dapp`) is honoured; resolved once, at connect.
    pub schema: Option<String>,
    /// The applier instance writing through this sink (`instance`). It is recorded with the
    /// fence, and a sink whose fence row belongs to another instance refuses to work: two
    /// instances must not share one schema and stream.
    pub instance: String,
    /// Key column per synced table (`tables.<name>.key`). These are the only tables the sink
    /// writes, clears on a resync, and looks at in [`crate::Sink::is_empty`] and
    /// [`crate::Sink::digest`]; a change for any other table is rejected ("not synced here").
    pub key_columns: BTreeMap<String, String>,
    /// Tables whose upserts set only the columns the event carries (`tables.<name>.merge =
    /// true`). Every other table's upserts replace the row's synced columns (see the module
    /// documentation for the caveat of merging).
    pub merge_tables: BTreeSet<String>,
    /// What to do with a column an event carries that the table lacks.
    pub unknown_columns: UnknownColumns,
}

impl PostgresOptions {
    /// Options for the database at `url`: the connection's current schema, no synced table
    /// yet, instance name empty, upserts replacing rows, unknown columns rejected.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresOptions {
            url: url.into(),
            schema: None,
            instance: String::new(),
            key_columns: BTreeMap::new(),
            merge_tables: BTreeSet::new(),
            unknown_columns: UnknownColumns::Error,
        }
    }

    /// The key column of `table`, or `None` when the table is not synced here.
    pub fn key_column(&self, table: &str) -> Option<&str> {
        self.key_columns.get(table).map(String::as_str)
    }

    /// Whether upserts of `table` merge the carried columns into the existing row.
    pub fn merges(&self, table: &str) -> bool {
        self.merge_tables.contains(table)
    }
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL usually carries a password.
        f.debug_struct("PostgresOptions")
            .field("url", &"<redacted>")
            .field("schema", &self.schema)
            .field("instance", &self.instance)
            .field("key_columns", &self.key_columns)
            .field("merge_tables", &self.merge_tables)
            .field("unknown_columns", &self.unknown_columns)
            .finish()
    }
}
