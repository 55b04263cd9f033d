//! Reading the synced tables back: emptiness, the digest (one snapshot for all tables) and
//! [`PostgresSink::read_table`].

use futures::TryStreamExt;
use jetsync::Row;
use tokio_postgres::types::{ToSql, Type};

use super::plan::TableInfo;
use super::types::ReadValue;
use super::{PostgresSink, FENCE_TABLE};
use crate::sinks::sql::{push_quoted, quote};
use crate::{DigestBuilder, SinkError, TableDigest};

impl PostgresSink {
    pub(super) async fn check_empty(&mut self) -> Result<bool, SinkError> {
        self.ensure_connected().await?;
        let names: Vec<String> = self.options.key_columns.keys().cloned().collect();
        self.load_tables(&names).await?;
        let mut sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {}.{})",
            quote(&self.schema),
            quote(FENCE_TABLE)
        );
        for name in &names {
            // A table this role may not read holds nothing it synced (its events are parked
            // with "permission denied"); asking would fail the whole check.
            if self.tables.contains_key(name) && self.may_select(name).await? {
                sql.push_str(&format!(
                    " OR EXISTS (SELECT 1 FROM {}.{})",
                    quote(&self.schema),
                    quote(name)
                ));
            }
        }
        self.statements_sent += 1;
        let client = self.client()?;
        let any: bool = client
            .query_typed_one(&sql, &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.op_error("check for rows in", &e))?;
        Ok(!any)
    }

    /// Whether the connection's role may read `name` in the sink's schema.
    async fn may_select(&mut self, name: &str) -> Result<bool, SinkError> {
        let qualified = format!("{}.{}", quote(&self.schema), quote(name));
        self.statements_sent += 1;
        let client = self.client()?;
        client
            .query_typed_one(
                "SELECT has_table_privilege($1, 'SELECT')",
                &[(&qualified, Type::TEXT)],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.op_error("check privileges in", &e))
    }

    pub(super) async fn compute_digest(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        self.ensure_connected().await?;
        // One snapshot for all tables, even while the service writes.
        self.in_transaction = true;
        self.statements_sent += 1;
        self.client()?
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(|e| self.op_error("begin a transaction on", &e))?;
        let result = self.digest_in_transaction().await;
        let end = self.finish_transaction("COMMIT").await;
        let digests = result?;
        end.map_err(|e| self.op_error("compute the digest of", &e))?;
        Ok(digests)
    }

    async fn digest_in_transaction(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        let names: Vec<String> = self.options.key_columns.keys().cloned().collect();
        self.load_tables(&names).await?;
        let mut digests = Vec::new();
        for name in &names {
            let Some(info) = self.tables.get(name).cloned() else {
                continue;
            };
            let mut builder = DigestBuilder::default();
            self.scan(&info, false, |row| builder.add(name, &row))
                .await?;
            digests.push(builder.finish(name));
        }
        Ok(digests)
    }

    /// Calls `f` with every row of the table, mapped back to [`Value`]s.
    pub(super) async fn scan(
        &mut self,
        info: &TableInfo,
        ordered: bool,
        mut f: impl FnMut(Row) + Send,
    ) -> Result<(), SinkError> {
        let mut sql = String::from("SELECT ");
        for (index, column) in info.columns.iter().enumerate() {
            if index > 0 {
                sql.push_str(", ");
            }
            push_quoted(&mut sql, &column.name);
            sql.push_str("::");
            sql.push_str(column.kind.read_cast());
        }
        sql.push_str(" FROM ");
        push_quoted(&mut sql, &self.schema);
        sql.push('.');
        push_quoted(&mut sql, &info.name);
        if let (true, Some(key)) = (ordered, info.key) {
            sql.push_str(" ORDER BY ");
            push_quoted(&mut sql, &info.columns[key].name);
        }
        let what = format!("read table `{}` of", info.name);
        self.statements_sent += 1;
        let client = self.client()?;
        let read = async {
            let stream = client
                .query_typed_raw(&sql, std::iter::empty::<(&(dyn ToSql + Sync), Type)>())
                .await?;
            futures::pin_mut!(stream);
            while let Some(row) = stream.try_next().await? {
                let mut out = Row::new();
                for (index, column) in info.columns.iter().enumerate() {
                    let ReadValue(value) = row.try_get(index)?;
                    out.insert(column.name.clone(), value);
                }
                f(out);
            }
            Ok::<(), tokio_postgres::Error>(())
        };
        read.await.map_err(|e| self.op_error(&what, &e))
    }
}
