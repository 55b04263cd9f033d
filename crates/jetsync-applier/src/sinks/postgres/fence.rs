//! The advisory lock and the fence (`jetsync_offsets`): which stream sequence the rows describe,
//! and which instance owns the stream in this schema.
//!
//! Crash windows and why the lock comes first: a killed applier (or a dropped connection) can
//! leave a COMMIT in the old backend's input that the server still executes after the client is
//! gone. The old backend holds the session-level advisory lock of (schema, stream) until the
//! server has finished with it (committed or rolled back, and ended). A session therefore takes
//! the lock *before* it reads the fence: the fence it reads then includes the old COMMIT if it
//! happened, and no other session writes it while the lock is held. The lock is tried, not
//! waited for: while another session holds it, writes are [`SinkError::Unavailable`] and the
//! engine retries with backoff (a reader, such as `digest` or `status` beside a running
//! applier, reads the fence without it).
//!
//! Batches write the fence as `GREATEST(current, last_seq)`, so it never moves back; only
//! `reset --to-seq` ([`crate::Sink::set_fence`]) and a resync (which rebuilds the rows it
//! describes) set it exactly.

use tokio_postgres::types::Type;

use super::errors::{describe, sqlstate};
use super::{PostgresSink, FENCE_TABLE};
use crate::sinks::sql::quote;
use crate::SinkError;

/// The advisory lock key of sync group `group` in `schema` (64-bit FNV-1a of both).
pub(super) fn advisory_key(schema: &str, group: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in "jetsync\0"
        .bytes()
        .chain(schema.bytes())
        .chain([0])
        .chain(group.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// How a fence write treats the stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FenceWrite {
    /// A batch: `GREATEST(stored, new)`, never backwards.
    Advance,
    /// `reset --to-seq` or a resync: exactly the new value.
    Set,
}

pub(super) fn seq_to_sql(seq: u64) -> Result<i64, SinkError> {
    i64::try_from(seq).map_err(|_| SinkError::Fatal {
        reason: format!("stream sequence {seq} does not fit Postgres' bigint"),
    })
}

impl PostgresSink {
    fn fence_table(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(FENCE_TABLE))
    }

    /// The statement writing the fence (`$1` stream, `$2` seq, `$3` instance). It only updates a
    /// row this instance owns (or an unowned one): zero rows written means another instance
    /// owns it.
    pub(super) fn fence_sql(&self, how: FenceWrite) -> String {
        let table = self.fence_table();
        let seq = match how {
            FenceWrite::Advance => format!("GREATEST({table}.seq, EXCLUDED.seq)"),
            FenceWrite::Set => "EXCLUDED.seq".to_owned(),
        };
        format!(
            "INSERT INTO {table} (stream, seq, instance) VALUES ($1, $2, $3) \
             ON CONFLICT (stream) DO UPDATE SET seq = {seq}, instance = EXCLUDED.instance \
             WHERE {table}.instance IS NULL OR {table}.instance = EXCLUDED.instance"
        )
    }

    /// The error for a fence row that another instance owns.
    pub(super) fn foreign_owner(&self, group: &str, owner: &str) -> SinkError {
        let me = &self.options.instance;
        let literal = me.replace('\'', "''");
        SinkError::Fatal {
            reason: format!(
                "{}: stream `{group}` in schema `{}` is synced by instance {owner:?}, and this is \
                 instance {me:?}: two instances must not share one schema and stream; give each \
                 instance its own schema (sink.schema). If instance {owner:?} was renamed to \
                 {me:?}, run UPDATE {} SET instance = '{literal}' WHERE stream = '{}'",
                self.target,
                self.schema,
                self.fence_table(),
                group.replace('\'', "''"),
            ),
        }
    }

    /// Creates the fence table when it is missing, and adds the `instance` column to a table
    /// of an older version.
    pub(super) async fn ensure_fence_table(&mut self) -> Result<(), SinkError> {
        let qualified = self.fence_table();
        self.statements_sent += 1;
        let client = self.client()?;
        let (exists, has_instance): (bool, bool) = client
            .query_typed_one(
                "SELECT to_regclass($1) IS NOT NULL, EXISTS (SELECT 1 FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attname = 'instance' AND NOT attisdropped)",
                &[(&qualified, Type::TEXT)],
            )
            .await
            .and_then(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .map_err(|e| self.op_error("look for the fence table in", &e))?;
        if exists && has_instance {
            return Ok(());
        }
        let sql = if exists {
            format!("ALTER TABLE {qualified} ADD COLUMN IF NOT EXISTS instance text")
        } else {
            format!(
                "CREATE TABLE IF NOT EXISTS {qualified} (stream text PRIMARY KEY, \
                 seq bigint NOT NULL, instance text)"
            )
        };
        self.statements_sent += 1;
        match self.client()?.batch_execute(&sql).await {
            Ok(()) => {
                tracing::info!(schema = %self.schema, "prepared table {FENCE_TABLE}");
                Ok(())
            }
            // Another applier created it at the same moment.
            Err(e) if matches!(sqlstate(&e), Some("42P07" | "23505" | "42701")) => Ok(()),
            Err(e) => Err(match sqlstate(&e) {
                Some("3F000") => SinkError::Fatal {
                    reason: format!(
                        "sink.schema: schema `{}` does not exist in {}: create it (CREATE SCHEMA \
                         {}) or set sink.schema to the schema of the service's tables",
                        self.schema,
                        self.target,
                        quote(&self.schema)
                    ),
                },
                Some("42501") => SinkError::Fatal {
                    reason: format!(
                        "the user of sink.url may not create or alter the fence table in schema \
                         `{}` of {} ({}): run `{sql}` once as an owner and grant the applier's \
                         user SELECT, INSERT, UPDATE on it",
                        self.schema,
                        self.target,
                        describe(&e)
                    ),
                },
                _ => self.op_error("create the fence table in", &e),
            }),
        }
    }

    /// Tries to take the session-level advisory lock of `group` unless this connection holds it
    /// already. When it is taken now, reads the fence under it (see the module documentation).
    /// Returns whether the lock is held.
    async fn try_lock(&mut self, group: &str) -> Result<bool, SinkError> {
        if self.groups.locked.contains(group) {
            return Ok(true);
        }
        let key = advisory_key(&self.schema, group);
        self.statements_sent += 1;
        let got: bool = self
            .client()?
            .query_typed_one("SELECT pg_try_advisory_lock($1)", &[(&key, Type::INT8)])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.op_error("take the applier's advisory lock on", &e))?;
        if !got {
            return Ok(false);
        }
        self.groups.locked.insert(group.to_owned());
        // Read under the lock: includes a COMMIT a previous session had in flight.
        let stored = self.read_fence(group).await?;
        self.groups.stored.insert(group.to_owned(), stored);
        if let Some(&told) = self.groups.told.get(group) {
            if stored > told {
                tracing::info!(
                    target_db = %self.target,
                    stream = group,
                    fence = stored,
                    known = told,
                    "a previous session committed up to the fence after all; events up to it are not applied again"
                );
            }
        }
        Ok(true)
    }

    /// Takes the lock of `group` for a write: [`SinkError::Unavailable`] while another session
    /// holds it. Returns the fence stored in the database.
    pub(super) async fn lock_group(&mut self, group: &str) -> Result<u64, SinkError> {
        if !self.try_lock(group).await? {
            return Err(SinkError::Unavailable {
                reason: format!(
                    "{}: another session holds the applier lock of stream `{group}` in schema \
                     `{}` (a previous run's last commit still finishing, or another applier \
                     writing to this schema)",
                    self.target, self.schema
                ),
            });
        }
        Ok(self.groups.stored.get(group).copied().unwrap_or(0))
    }

    /// [`crate::Sink::fence`]: takes the lock when no other session holds it and reads the
    /// fence under it; a reader beside a running applier reads it without the lock.
    pub(super) async fn current_fence(&mut self, group: &str) -> Result<u64, SinkError> {
        self.ensure_connected().await?;
        let fence = if self.try_lock(group).await? {
            // Held: re-read anyway, cheap, and exact for a sink that was idle a long time.
            let fence = self.read_fence(group).await?;
            self.groups.stored.insert(group.to_owned(), fence);
            fence
        } else {
            self.read_fence(group).await?
        };
        self.groups.told.insert(group.to_owned(), fence);
        Ok(fence)
    }

    /// The stored fence of `group` (0 without a row); Fatal when another instance owns it.
    async fn read_fence(&mut self, group: &str) -> Result<u64, SinkError> {
        let sql = format!(
            "SELECT seq, instance FROM {} WHERE stream = $1",
            self.fence_table()
        );
        self.statements_sent += 1;
        let row: Option<(i64, Option<String>)> = self
            .client()?
            .query_typed_opt(&sql, &[(&group, Type::TEXT)])
            .await
            .and_then(|row| {
                row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                    .transpose()
            })
            .map_err(|e| self.op_error("read the fence from", &e))?;
        let Some((seq, owner)) = row else {
            return Ok(0);
        };
        if let Some(owner) = owner.filter(|o| *o != self.options.instance) {
            return Err(self.foreign_owner(group, &owner));
        }
        u64::try_from(seq).map_err(|_| SinkError::Fatal {
            reason: format!(
                "{}: {FENCE_TABLE} holds the negative sequence {seq} for `{group}`; fix it with \
                 `jetsync-applier reset --to-seq`",
                self.target
            ),
        })
    }

    /// [`crate::Sink::set_fence`] (`reset --to-seq`): the explicit way to move the fence, back
    /// included, without touching rows.
    pub(super) async fn rewind_fence(&mut self, group: &str, seq: u64) -> Result<(), SinkError> {
        let sql_seq = seq_to_sql(seq)?;
        self.ensure_connected().await?;
        let before = self.lock_group(group).await?;
        let sql = self.fence_sql(FenceWrite::Set);
        self.statements_sent += 1;
        let written = self
            .client()?
            .execute_typed(
                &sql,
                &[
                    (&group, Type::TEXT),
                    (&sql_seq, Type::INT8),
                    (&self.options.instance, Type::TEXT),
                ],
            )
            .await
            .map_err(|e| self.op_error("set the fence in", &e))?;
        if written == 0 {
            // Another instance owns the row (read_fence under the lock would have said so).
            return Err(self.foreign_owner(group, "another instance"));
        }
        if seq < before {
            tracing::warn!(
                stream = group,
                from = before,
                to = seq,
                "fence moved back by request"
            );
        }
        self.groups.stored.insert(group.to_owned(), seq);
        self.groups.told.insert(group.to_owned(), seq);
        Ok(())
    }
}
