//! Postgres for the bench: a fresh schema per measurement (`bench_<pid>_<name>`) on
//! `JETSYNC_BENCH_PG` (default `postgres://postgres@127.0.0.1:5432/test`), holding the
//! workload's table as a service would have created it; dropped afterwards.

use anyhow::Context as _;
use tokio_postgres::NoTls;

use crate::workload::TABLE;

/// The database URL.
pub(crate) fn url() -> String {
    std::env::var("JETSYNC_BENCH_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema the bench created; [`Schema::drop`] removes it.
#[derive(Debug)]
pub(crate) struct Schema {
    pub(crate) name: String,
    client: tokio_postgres::Client,
}

impl Schema {
    /// Creates schema `bench_<pid>_<name>` (replacing a leftover of that name) with table
    /// `items (id text primary key, description text, name text, price double precision,
    /// qty bigint)`.
    pub(crate) async fn create(name: &str) -> anyhow::Result<Schema> {
        let url = url();
        let (client, connection) = tokio_postgres::connect(&url, NoTls)
            .await
            .with_context(|| format!("connecting to Postgres at {url}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let name = format!("bench_{}_{name}", std::process::id());
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}; \
                 CREATE TABLE {name}.{TABLE} (id text PRIMARY KEY, description text, \
                 name text, price double precision, qty bigint)"
            ))
            .await
            .with_context(|| format!("creating schema {name}"))?;
        Ok(Schema { name, client })
    }

    /// Rows in the table (a check that the writes landed).
    pub(crate) async fn rows(&self) -> anyhow::Result<i64> {
        let row = self
            .client
            .query_one(&format!("SELECT count(*) FROM {}.{TABLE}", self.name), &[])
            .await?;
        Ok(row.get(0))
    }

    /// Drops the schema (best effort).
    pub(crate) async fn drop(self) {
        let _ = self
            .client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
            .await;
    }
}
