//! Schema discovery: the columns, types and key index of the synced tables, read from the
//! catalog and cached per table.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_postgres::types::Type;

use super::plan::{ColumnInfo, TableInfo};
use super::types::Kind;
use super::PostgresSink;
use crate::SinkError;

impl PostgresSink {
    /// Looks `names` up in the database: present tables are (re)cached, tables that do not exist
    /// are forgotten.
    pub(super) async fn load_tables(&mut self, names: &[String]) -> Result<(), SinkError> {
        if names.is_empty() {
            return Ok(());
        }
        const DISCOVER: &str = "\
            SELECT c.relname::text, a.attname::text, \
                   COALESCE(NULLIF(t.typbasetype, 0), a.atttypid), \
                   format_type(a.atttypid, a.atttypmod), \
                   a.attgenerated <> '', a.attidentity <> '', \
                   EXISTS (SELECT 1 FROM pg_index i \
                           WHERE i.indrelid = c.oid AND i.indisunique \
                             AND i.indpred IS NULL AND i.indexprs IS NULL \
                             AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum) \
            FROM pg_class c \
            JOIN pg_namespace n ON n.oid = c.relnamespace \
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
            JOIN pg_type t ON t.oid = a.atttypid \
            WHERE n.nspname = $1 AND c.relname = ANY($2) AND c.relkind IN ('r', 'p') \
            ORDER BY c.relname, a.attnum";
        self.statements_sent += 1;
        let client = self.client()?;
        let rows = client
            .query_typed(
                DISCOVER,
                &[(&self.schema, Type::TEXT), (&names, Type::TEXT_ARRAY)],
            )
            .await
            .map_err(|e| self.op_error("read the columns of the synced tables in", &e))?;
        let mut found: BTreeMap<String, Vec<(ColumnInfo, bool)>> = BTreeMap::new();
        for row in rows {
            let parse = || -> Result<(String, ColumnInfo, bool), tokio_postgres::Error> {
                let oid: u32 = row.try_get(2)?;
                Ok((
                    row.try_get(0)?,
                    ColumnInfo {
                        name: row.try_get(1)?,
                        kind: Kind::from_oid(oid),
                        type_name: row.try_get(3)?,
                        generated: row.try_get(4)?,
                        identity: row.try_get(5)?,
                    },
                    row.try_get(6)?,
                ))
            };
            let (table, column, unique) = parse()
                .map_err(|e| self.op_error("read the columns of the synced tables in", &e))?;
            found.entry(table).or_default().push((column, unique));
        }
        for name in names {
            match found.remove(name) {
                Some(columns) => {
                    let info = TableInfo::new(
                        name,
                        self.options.key_column(name).unwrap_or(""),
                        columns,
                        self.generation,
                    );
                    self.tables.insert(name.clone(), Arc::new(info));
                }
                None => {
                    self.tables.remove(name);
                }
            }
        }
        Ok(())
    }
}
