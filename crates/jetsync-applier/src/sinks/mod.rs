//! The built-in sinks, and building the configured one (config → build → run).

pub mod postgres;
pub mod redb;
pub(crate) mod sql;
pub mod sqlite;

use jetsync::{Config, SinkKind};

use crate::{
    Change, PostgresOptions, PostgresSink, RedbOptions, RedbSink, Sink, SinkError, SqliteOptions,
    SqliteSink, TableDigest,
};

/// The sink the binary builds from `[sink]`: one of the built-in kinds.
#[derive(Debug)]
#[non_exhaustive]
pub enum AnySink {
    /// `kind = "sqlite"`.
    Sqlite(SqliteSink),
    /// `kind = "redb"`.
    Redb(RedbSink),
    /// `kind = "postgres"`.
    Postgres(PostgresSink),
}

/// Builds the sink `config.sink` describes (for Postgres: connects, see
/// [`PostgresSink::connect`] for its errors).
pub async fn build_sink(config: &Config) -> Result<AnySink, SinkError> {
    let path = config.sink_path();
    match config.sink.kind {
        SinkKind::Sqlite => {
            let mut options = SqliteOptions::new(path.expect("sqlite sink always has a path"));
            options.default_key_column = jetsync::DEFAULT_KEY_COLUMN.to_owned();
            options.key_columns = config
                .tables
                .iter()
                .map(|(table, t)| (table.clone(), t.key.clone()))
                .collect();
            options.any_table = config.apply.other_tables == jetsync::OtherTables::Create;
            Ok(AnySink::Sqlite(SqliteSink::open(options)?))
        }
        SinkKind::Redb => Ok(AnySink::Redb(RedbSink::open(RedbOptions {
            path: path.expect("redb sink always has a path"),
            audit: config.sink.audit,
        })?)),
        SinkKind::Postgres => {
            let url = config
                .sink
                .url
                .as_ref()
                .filter(|url| !url.expose().trim().is_empty())
                .ok_or_else(|| SinkError::Fatal {
                    reason: "sink.url: required with kind = \"postgres\"".into(),
                })?;
            let mut options = PostgresOptions::new(url.expose());
            options.schema = config.sink.schema.clone();
            options.instance = config.instance.clone();
            options.key_columns = config
                .tables
                .iter()
                .map(|(table, t)| (table.clone(), t.key.clone()))
                .collect();
            options.merge_tables = config
                .tables
                .iter()
                .filter(|(_, t)| t.merge)
                .map(|(table, _)| table.clone())
                .collect();
            options.unknown_columns = config.sink.unknown_columns;
            Ok(AnySink::Postgres(PostgresSink::connect(options).await?))
        }
    }
}

impl Sink for AnySink {
    async fn fence(&mut self, group: &str) -> Result<Option<u64>, SinkError> {
        match self {
            AnySink::Sqlite(s) => s.fence(group).await,
            AnySink::Redb(s) => s.fence(group).await,
            AnySink::Postgres(s) => s.fence(group).await,
        }
    }

    fn sees_every_change(&self) -> bool {
        match self {
            AnySink::Sqlite(s) => s.sees_every_change(),
            AnySink::Redb(s) => s.sees_every_change(),
            AnySink::Postgres(s) => s.sees_every_change(),
        }
    }

    async fn is_empty(&mut self) -> Result<bool, SinkError> {
        match self {
            AnySink::Sqlite(s) => s.is_empty().await,
            AnySink::Redb(s) => s.is_empty().await,
            AnySink::Postgres(s) => s.is_empty().await,
        }
    }

    async fn apply(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        match self {
            AnySink::Sqlite(s) => s.apply(group, changes, last_seq).await,
            AnySink::Redb(s) => s.apply(group, changes, last_seq).await,
            AnySink::Postgres(s) => s.apply(group, changes, last_seq).await,
        }
    }

    async fn replace(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        match self {
            AnySink::Sqlite(s) => s.replace(group, changes, last_seq).await,
            AnySink::Redb(s) => s.replace(group, changes, last_seq).await,
            AnySink::Postgres(s) => s.replace(group, changes, last_seq).await,
        }
    }

    async fn replace_begin(&mut self, group: &str) -> Result<(), SinkError> {
        match self {
            AnySink::Sqlite(s) => s.replace_begin(group).await,
            AnySink::Redb(s) => s.replace_begin(group).await,
            AnySink::Postgres(s) => s.replace_begin(group).await,
        }
    }

    async fn replace_chunk(&mut self, group: &str, changes: &[Change]) -> Result<(), SinkError> {
        match self {
            AnySink::Sqlite(s) => s.replace_chunk(group, changes).await,
            AnySink::Redb(s) => s.replace_chunk(group, changes).await,
            AnySink::Postgres(s) => s.replace_chunk(group, changes).await,
        }
    }

    async fn replace_commit(&mut self, group: &str, last_seq: u64) -> Result<(), SinkError> {
        match self {
            AnySink::Sqlite(s) => s.replace_commit(group, last_seq).await,
            AnySink::Redb(s) => s.replace_commit(group, last_seq).await,
            AnySink::Postgres(s) => s.replace_commit(group, last_seq).await,
        }
    }

    async fn replace_abort(&mut self, group: &str) {
        match self {
            AnySink::Sqlite(s) => s.replace_abort(group).await,
            AnySink::Redb(s) => s.replace_abort(group).await,
            AnySink::Postgres(s) => s.replace_abort(group).await,
        }
    }

    async fn idle(&mut self) -> Result<(), SinkError> {
        match self {
            AnySink::Sqlite(s) => s.idle().await,
            AnySink::Redb(s) => s.idle().await,
            AnySink::Postgres(s) => s.idle().await,
        }
    }

    async fn set_fence(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        match self {
            AnySink::Sqlite(s) => s.set_fence(group, seq).await,
            AnySink::Redb(s) => s.set_fence(group, seq).await,
            AnySink::Postgres(s) => s.set_fence(group, seq).await,
        }
    }

    async fn digest(&mut self) -> Result<Vec<TableDigest>, SinkError> {
        match self {
            AnySink::Sqlite(s) => s.digest().await,
            AnySink::Redb(s) => s.digest().await,
            AnySink::Postgres(s) => s.digest().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(seq: u64, table: &str, key: &str) -> Change {
        Change {
            seq,
            table: table.to_owned(),
            key: key.to_owned(),
            op: jetsync::Change::Upsert(jetsync::Row::new()),
        }
    }

    #[tokio::test]
    async fn any_sink_forwards_replace() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteSink::open(SqliteOptions::new(dir.path().join("r.sqlite"))).unwrap();
        let redb = RedbSink::open(RedbOptions::new(dir.path().join("r.redb"))).unwrap();
        for mut sink in [AnySink::Sqlite(sqlite), AnySink::Redb(redb)] {
            sink.apply("G", &[up(1, "t", "a"), up(2, "t", "b")], 2)
                .await
                .unwrap();
            sink.replace("G", &[up(3, "t", "c")], 5).await.unwrap();
            assert_eq!(sink.fence("G").await.unwrap(), Some(5));
            let digest = sink.digest().await.unwrap();
            assert_eq!(digest.len(), 1, "{sink:?}");
            assert_eq!(digest[0].rows, 1, "{sink:?}");
        }
    }
}
