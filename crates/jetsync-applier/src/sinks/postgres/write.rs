//! Applying: a batch in one transaction with the fence, and a resync as one transaction of
//! chunks (each in a savepoint).
//!
//! Crash windows of a batch (what survives each):
//! - before `COMMIT` reaches the server: nothing of the batch, the fence unchanged; the engine
//!   replays the batch after the fence.
//! - after `COMMIT` completed: rows and fence together; the engine resumes after the fence.
//! - while `COMMIT` is in flight (process killed, connection lost): the outcome is unknown to
//!   this session; the old backend holds the advisory lock until it has finished, and the next
//!   session reads the fence under that lock and skips what is at or below it (`fence.rs`).
//!
//! A replacement (resync) is one transaction from `replace_begin` to `replace_commit`: killed
//! before its `COMMIT`, nothing of it remains and the old rows and fence stand; its `COMMIT` in
//! flight is covered by the same lock.

use std::collections::{BTreeSet, HashSet};
use std::pin::Pin;

use futures::future::{maybe_done, BoxFuture, FutureExt};
use tokio_postgres::types::{ToSql, Type};

use super::errors::{classify, describe, Class};
use super::fence::{seq_to_sql, FenceWrite};
use super::plan::{plan, Planned, Refusal, Statement};
use super::{is_reserved_table, PostgresSink};
use crate::sinks::sql::push_quoted;
use crate::{Change, SinkError};

/// The savepoint of a replacement chunk.
const CHUNK_SAVEPOINT: &str = "jetsync_chunk";

/// How a batch is planned.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Consecutive changes of one shape share a multi-row statement.
    Grouped,
    /// One statement per change (the slow path); `immediate` checks deferred constraints per
    /// statement.
    Single { immediate: bool },
}

/// Why an attempt did not commit.
#[derive(Debug)]
enum Failure {
    /// The sink refused change `index` before sending it (changes before it ran fine).
    Refused { index: usize, reason: String },
    /// The statement starting at change `index` failed; `single` when it held only that change.
    Statement {
        index: usize,
        single: bool,
        error: tokio_postgres::Error,
    },
    /// BEGIN, a savepoint, the fence or COMMIT failed.
    Other {
        what: &'static str,
        error: tokio_postgres::Error,
    },
    /// Already a sink error (connecting, discovering tables, a foreign fence owner).
    Sink(SinkError),
}

fn rejected(changes: &[Change], index: usize, reason: String) -> SinkError {
    let change = &changes[index];
    SinkError::Rejected {
        index,
        seq: change.seq,
        table: change.table.clone(),
        key: change.key.clone(),
        reason,
    }
}

/// Shifts the index of a Rejected error by `offset` (the changes skipped before the slice).
fn shift(mut e: SinkError, offset: usize) -> SinkError {
    if let SinkError::Rejected { index, .. } = &mut e {
        *index += offset;
    }
    e
}

/// The fence written with the statements.
#[derive(Debug, Clone, Copy)]
struct FenceArgs<'a> {
    group: &'a str,
    seq: i64,
    how: FenceWrite,
}

impl PostgresSink {
    // ---- batches ------------------------------------------------------------------------------

    /// [`crate::Sink::apply`].
    pub(super) async fn apply_batch(
        &mut self,
        group: &str,
        changes: &[Change],
        last_seq: u64,
    ) -> Result<(), SinkError> {
        let fence = seq_to_sql(last_seq)?;
        self.ensure_connected().await?;
        let stored = self.lock_group(group).await?;
        let told = *self.groups.told.entry(group.to_owned()).or_insert(stored);
        // A batch moving forward (past the fence the engine knows) skips its changes at or
        // below the stored fence: a previous session's COMMIT landed after all and they are in
        // the database already. A batch ending at or below the known fence is `parked retry`
        // of events that were never applied: applied whole, the fence stays.
        let offset = if last_seq > told {
            changes.iter().take_while(|c| c.seq <= stored).count()
        } else {
            0
        };
        if offset == changes.len() && last_seq <= stored {
            // Everything is in the database already and the fence would not move.
            self.groups.told.insert(group.to_owned(), last_seq);
            return Ok(());
        }
        let args = FenceArgs {
            group,
            seq: fence,
            how: FenceWrite::Advance,
        };
        // Capture: skip the changes of rows whose newer local change is still pending.
        let schema = crate::sinks::sql::quote(&self.schema);
        let pending =
            crate::capture::pending::load_postgres(self.client()?, &schema, &changes[offset..])
                .await
                .map_err(|e| self.op_error("read the pending local changes of", &e))?;
        let kept = pending.keep(&changes[offset..])?;
        let applied = kept
            .as_ref()
            .map_or(&changes[offset..], |k| k.changes.as_slice());
        self.write_slice(args, applied).await.map_err(|e| {
            shift(
                crate::capture::pending::reposition(e, kept.as_ref()),
                offset,
            )
        })?;
        if let Err(e) =
            crate::capture::pending::settle_postgres(self.client()?, &schema, &pending, fence).await
        {
            tracing::warn!(error = %e, "capture: cannot delete settled pending local changes (retried with the next batch)");
        }
        self.groups
            .stored
            .insert(group.to_owned(), stored.max(last_seq));
        self.groups.told.insert(group.to_owned(), last_seq);
        Ok(())
    }

    /// Plans `changes`, first looking up configured tables never seen, and looking a cached
    /// table up again (once per batch) before refusing a change because of it: the service may
    /// have altered the table since it was cached.
    async fn plan_fresh(&mut self, changes: &[Change], grouped: bool) -> Result<Planned, Failure> {
        let mut unknown: Vec<String> = changes
            .iter()
            .map(|c| c.table.as_str())
            .filter(|t| {
                !is_reserved_table(t)
                    && self.options.key_column(t).is_some()
                    && !self.tables.contains_key(*t)
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .map(str::to_owned)
            .collect();
        unknown.sort();
        self.load_tables(&unknown).await.map_err(Failure::Sink)?;
        loop {
            let planned = plan(changes, &self.tables, &self.options, &self.schema, grouped);
            if let Some(Refusal { index, .. }) = &planned.refusal {
                let table = &changes[*index].table;
                if self
                    .tables
                    .get(table)
                    .is_some_and(|t| t.generation != self.generation)
                {
                    let table = table.clone();
                    self.load_tables(&[table]).await.map_err(Failure::Sink)?;
                    continue;
                }
            }
            return Ok(planned);
        }
    }

    /// One batch in one transaction with the fence: the grouped attempt, and the slow path
    /// when a multi-row statement failed.
    async fn write_slice(
        &mut self,
        fence: FenceArgs<'_>,
        changes: &[Change],
    ) -> Result<(), SinkError> {
        self.generation += 1;
        let outcome = self.attempt(fence, changes, Mode::Grouped).await;
        match outcome {
            Ok(()) => return Ok(()),
            Err(Failure::Sink(e)) => return Err(e),
            Err(Failure::Refused { index, reason }) => {
                return Err(rejected(changes, index, reason))
            }
            Err(Failure::Statement {
                index,
                single,
                error,
            }) => match classify(&error) {
                Class::Unavailable => return Err(self.op_error("apply a batch to", &error)),
                Class::Schema => {
                    // Whatever we knew about the tables may be out of date: look again.
                    self.tables.clear();
                }
                _ if single => return Err(rejected(changes, index, describe(&error))),
                Class::Rejected | Class::Fatal => {}
            },
            Err(Failure::Other { what, error }) => match classify(&error) {
                // A deferred constraint failed at COMMIT: find the change.
                Class::Rejected | Class::Schema if what == "commit" => {}
                _ => return Err(self.op_error(what, &error)),
            },
        }
        self.apply_one_by_one(fence, changes).await
    }

    /// The slow path after a multi-row statement failed: the batch again, one change per
    /// statement, in a fresh transaction; the first failing statement names the change. First
    /// with the service's constraint timing; if only COMMIT fails (a deferred constraint), once
    /// more with all constraints checked immediately, which points at the statement.
    async fn apply_one_by_one(
        &mut self,
        fence: FenceArgs<'_>,
        changes: &[Change],
    ) -> Result<(), SinkError> {
        tracing::debug!(
            changes = changes.len(),
            "a multi-row statement failed; applying the batch one change at a time"
        );
        for immediate in [false, true] {
            let outcome = self
                .attempt(fence, changes, Mode::Single { immediate })
                .await;
            match outcome {
                Ok(()) => return Ok(()),
                Err(Failure::Sink(e)) => return Err(e),
                Err(Failure::Refused { index, reason }) => {
                    return Err(rejected(changes, index, reason))
                }
                Err(Failure::Statement { index, error, .. }) => {
                    return Err(match classify(&error) {
                        Class::Unavailable => self.op_error("apply a batch to", &error),
                        _ => rejected(changes, index, describe(&error)),
                    })
                }
                Err(Failure::Other { what, error }) => {
                    let content = matches!(classify(&error), Class::Rejected | Class::Schema);
                    if what == "commit" && !immediate && content {
                        continue;
                    }
                    return Err(self.op_error(what, &error));
                }
            }
        }
        // Not an event's fault as far as the sink can tell, and not worth stopping for: retried.
        Err(SinkError::Unavailable {
            reason: format!(
                "{}: COMMIT keeps failing on a deferred constraint that no single change of the \
                 batch violates on its own; inspect the service's deferred constraints",
                self.target
            ),
        })
    }

    /// Plans `changes` and runs them in one transaction with the fence, committing only when
    /// every change could be planned and every statement succeeded. When a change is refused
    /// while planning, the changes before it are still executed (and rolled back), so that a
    /// change the database refuses earlier in the batch is reported first.
    async fn attempt(
        &mut self,
        fence: FenceArgs<'_>,
        changes: &[Change],
        mode: Mode,
    ) -> Result<(), Failure> {
        let planned = self
            .plan_fresh(changes, matches!(mode, Mode::Grouped))
            .await?;
        let complete = planned.refusal.is_none();
        if complete || !planned.statements.is_empty() {
            let begin = if matches!(mode, Mode::Single { immediate: true }) {
                "BEGIN; SET CONSTRAINTS ALL IMMEDIATE"
            } else {
                "BEGIN"
            };
            self.in_transaction = true;
            let sent = self
                .send(begin, &planned.statements, complete.then_some(fence))
                .await;
            if sent.is_err() || !complete {
                // Best effort: a dead connection rolled back by itself and is reconnected later.
                let _ = self.finish_transaction("ROLLBACK").await;
                sent?;
            } else {
                // Crash window: see the module documentation (COMMIT in flight).
                self.finish_transaction("COMMIT")
                    .await
                    .map_err(|error| Failure::Other {
                        what: "commit",
                        error,
                    })?;
            }
        }
        match planned.refusal {
            Some(Refusal { index, reason }) => Err(Failure::Refused { index, reason }),
            None => Ok(()),
        }
    }

    /// Sends `open` (BEGIN or a savepoint), `statements` and the fence write (when given),
    /// pipelined; returns the first failure by position. Does not end the transaction.
    async fn send(
        &mut self,
        open: &str,
        statements: &[Statement],
        fence: Option<FenceArgs<'_>>,
    ) -> Result<(), Failure> {
        self.statements_sent += statements.len() as u64 + 1 + u64::from(fence.is_some());
        let fence_sql = fence.map(|f| self.fence_sql(f.how));
        let client = self.client().map_err(Failure::Sink)?;
        let params: Vec<Vec<(&(dyn ToSql + Sync), Type)>> = statements
            .iter()
            .map(|s| {
                s.columns
                    .iter()
                    .zip(&s.types)
                    .map(|(column, ty)| (column as &(dyn ToSql + Sync), ty.clone()))
                    .collect()
            })
            .collect();
        let fence_params: Option<[(&(dyn ToSql + Sync), Type); 3]> = fence.as_ref().map(|f| {
            [
                (&f.group as _, Type::TEXT),
                (&f.seq as _, Type::INT8),
                (&self.options.instance as _, Type::TEXT),
            ]
        });
        let mut requests: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> =
            Vec::with_capacity(statements.len() + 2);
        requests.push(client.batch_execute(open).map(|r| r.map(|()| 0)).boxed());
        for (statement, params) in statements.iter().zip(&params) {
            requests.push(client.execute_typed(&statement.sql, params).boxed());
        }
        if let (Some(sql), Some(params)) = (&fence_sql, &fence_params) {
            requests.push(client.execute_typed(sql, params).boxed());
        }
        let results = pipeline(requests).await;
        let fence_position = 1 + statements.len();
        for (position, result) in results.into_iter().enumerate() {
            let error = match result {
                // The fence row belongs to another instance (it took it over since the lock).
                Ok(0) if fence.is_some() && position == fence_position => {
                    let group = fence.map_or("", |f| f.group);
                    return Err(Failure::Sink(self.foreign_owner(group, "another instance")));
                }
                Ok(_) => continue,
                Err(error) => error,
            };
            return Err(if position == 0 {
                Failure::Other {
                    what: "begin a transaction on",
                    error,
                }
            } else if let Some(statement) = statements.get(position - 1) {
                Failure::Statement {
                    index: statement.first,
                    single: statement.changes == 1,
                    error,
                }
            } else {
                Failure::Other {
                    what: "write the fence to",
                    error,
                }
            });
        }
        Ok(())
    }

    // ---- replacement (resync) -----------------------------------------------------------------

    /// [`crate::Sink::replace_begin`]: takes the lock, opens the transaction and empties the
    /// configured tables in it.
    pub(super) async fn begin_replacement(&mut self, group: &str) -> Result<(), SinkError> {
        self.ensure_connected().await?;
        self.lock_group(group).await?;
        self.generation += 1;
        let clear = self.clear_sql().await?;
        self.in_transaction = true;
        self.statements_sent += 1 + u64::from(clear.is_some());
        let client = self.client()?;
        let mut requests: Vec<BoxFuture<'_, Result<(), tokio_postgres::Error>>> =
            vec![client.batch_execute("BEGIN").boxed()];
        if let Some(clear) = &clear {
            requests.push(client.batch_execute(clear).boxed());
        }
        let results = pipeline(requests).await;
        if let Some((position, error)) = results
            .into_iter()
            .enumerate()
            .find_map(|(i, r)| r.err().map(|e| (i, e)))
        {
            let _ = self.finish_transaction("ROLLBACK").await;
            let what = if position == 0 {
                "begin a transaction on"
            } else {
                "clear the synced tables in"
            };
            return Err(self.op_error(what, &error));
        }
        self.groups.replacing = Some(group.to_owned());
        self.groups.replace_interrupted = false;
        Ok(())
    }

    /// The statement that empties the configured tables for a replacement, or `None` when none
    /// of them exists. Only the configured tables (those `digest` and `is_empty` look at), never
    /// a table an event names, a `jetsync_*` or a `pg_*` table.
    ///
    /// One `DELETE` per table, all in one statement (data-modifying `WITH` clauses), so that
    /// foreign keys between synced tables are checked once at its end, whatever the order of
    /// the tables. `DELETE`, not `TRUNCATE`: `TRUNCATE` takes an ACCESS EXCLUSIVE lock, which
    /// would block the service's readers until COMMIT, while they should keep seeing the old
    /// rows. Triggers and `ON DELETE` actions of the service's foreign keys run as for any
    /// delete.
    async fn clear_sql(&mut self) -> Result<Option<String>, SinkError> {
        let names: BTreeSet<String> = self
            .options
            .key_columns
            .keys()
            .filter(|t| !is_reserved_table(t))
            .cloned()
            .collect();
        let names: Vec<String> = names.into_iter().collect();
        self.load_tables(&names).await?;
        let present: Vec<&String> = names
            .iter()
            .filter(|name| self.tables.contains_key(*name))
            .collect();
        let Some((last, rest)) = present.split_last() else {
            return Ok(None);
        };
        let mut sql = String::new();
        for (index, table) in rest.iter().enumerate() {
            sql.push_str(if index == 0 { "WITH " } else { ", " });
            sql.push_str(&format!("d{index} AS (DELETE FROM "));
            push_quoted(&mut sql, &self.schema);
            sql.push('.');
            push_quoted(&mut sql, table);
            sql.push(')');
        }
        if !rest.is_empty() {
            sql.push(' ');
        }
        sql.push_str("DELETE FROM ");
        push_quoted(&mut sql, &self.schema);
        sql.push('.');
        push_quoted(&mut sql, last);
        Ok(Some(sql))
    }

    /// Checks that the replacement of `group` is open on a live connection and was not left
    /// half-way by a cancelled call; otherwise ends it (the engine starts over).
    async fn check_replacement(&mut self, group: &str) -> Result<(), SinkError> {
        let open = self.groups.replacing.as_deref() == Some(group)
            && self.client.as_ref().is_some_and(|c| !c.is_closed())
            && !self.groups.replace_interrupted;
        if open {
            return Ok(());
        }
        self.abort_replacement(group).await;
        Err(SinkError::Unavailable {
            reason: format!(
                "{}: the replacement of stream `{group}` was lost (connection lost or a call \
                 interrupted); it starts over",
                self.target
            ),
        })
    }

    /// [`crate::Sink::replace_chunk`]: the chunk inside a savepoint. A Rejected change rolls back
    /// to the savepoint only; any other failure ends the replacement.
    pub(super) async fn replacement_chunk(
        &mut self,
        group: &str,
        changes: &[Change],
    ) -> Result<(), SinkError> {
        self.check_replacement(group).await?;
        self.groups.replace_interrupted = true;
        self.generation += 1;
        let result = match self.chunk_attempt(changes, Mode::Grouped).await {
            Err(Failure::Statement {
                single: false,
                error,
                ..
            }) if classify(&error) != Class::Unavailable => {
                if classify(&error) == Class::Schema {
                    self.tables.clear();
                }
                self.chunk_attempt(changes, Mode::Single { immediate: false })
                    .await
            }
            other => other,
        };
        let result = match result {
            Ok(()) => Ok(()),
            Err(Failure::Refused { index, reason }) => Err(rejected(changes, index, reason)),
            Err(Failure::Statement { index, error, .. })
                if classify(&error) != Class::Unavailable =>
            {
                Err(rejected(changes, index, describe(&error)))
            }
            Err(Failure::Statement { error, .. } | Failure::Other { error, .. }) => {
                Err(self.op_error("apply a snapshot chunk to", &error))
            }
            Err(Failure::Sink(e)) => Err(e),
        };
        match &result {
            Ok(()) | Err(SinkError::Rejected { .. }) => self.groups.replace_interrupted = false,
            Err(_) => self.abort_replacement(group).await,
        }
        result
    }

    /// Runs one planned chunk inside the savepoint: released when every change went in, rolled
    /// back to when one was refused or failed.
    async fn chunk_attempt(&mut self, changes: &[Change], mode: Mode) -> Result<(), Failure> {
        let planned = self
            .plan_fresh(changes, matches!(mode, Mode::Grouped))
            .await?;
        if !planned.statements.is_empty() {
            let open = format!("SAVEPOINT {CHUNK_SAVEPOINT}");
            let sent = self.send(&open, &planned.statements, None).await;
            let end = if sent.is_err() || planned.refusal.is_some() {
                format!("ROLLBACK TO SAVEPOINT {CHUNK_SAVEPOINT}")
            } else {
                format!("RELEASE SAVEPOINT {CHUNK_SAVEPOINT}")
            };
            self.statements_sent += 1;
            let ended = self
                .client()
                .map_err(Failure::Sink)?
                .batch_execute(&end)
                .await;
            sent?;
            ended.map_err(|error| Failure::Other {
                what: "end a savepoint on",
                error,
            })?;
        }
        match planned.refusal {
            Some(Refusal { index, reason }) => Err(Failure::Refused { index, reason }),
            None => Ok(()),
        }
    }

    /// [`crate::Sink::replace_commit`]: sets the fence to `last_seq` exactly (the rows were
    /// rebuilt from the snapshot through it) and commits.
    pub(super) async fn commit_replacement(
        &mut self,
        group: &str,
        last_seq: u64,
    ) -> Result<(), SinkError> {
        let seq = seq_to_sql(last_seq)?;
        self.check_replacement(group).await?;
        let fence = FenceArgs {
            group,
            seq,
            how: FenceWrite::Set,
        };
        // The fence write alone, after a no-op opener (the transaction is open already).
        let sent = self.send("SELECT 1", &[], Some(fence)).await;
        let result = match sent {
            Ok(()) => {
                // Crash window: COMMIT in flight is covered by the advisory lock (fence.rs).
                self.finish_transaction("COMMIT")
                    .await
                    .map_err(|error| match classify(&error) {
                        Class::Rejected | Class::Schema => SinkError::Unavailable {
                            reason: format!(
                                "{}: the snapshot violates a deferred constraint at COMMIT ({}); \
                                 no single change can be named, so the resync is retried: fix \
                                 the constraint or the rows it needs",
                                self.target,
                                describe(&error)
                            ),
                        },
                        _ => self.op_error("commit a resync to", &error),
                    })
            }
            Err(Failure::Sink(e)) => Err(e),
            Err(Failure::Other { error, .. } | Failure::Statement { error, .. }) => {
                Err(self.op_error("write the fence to", &error))
            }
            Err(Failure::Refused { reason, .. }) => Err(SinkError::Fatal { reason }),
        };
        self.groups.replacing = None;
        if result.is_err() {
            let _ = self.finish_transaction("ROLLBACK").await;
            return result;
        }
        self.groups.stored.insert(group.to_owned(), last_seq);
        self.groups.told.insert(group.to_owned(), last_seq);
        Ok(())
    }

    /// [`crate::Sink::replace_abort`]: rolls the replacement back; a no-op when none is open.
    pub(super) async fn abort_replacement(&mut self, group: &str) {
        if self.groups.replacing.as_deref() != Some(group) {
            return;
        }
        self.groups.replacing = None;
        self.groups.replace_interrupted = false;
        let _ = self.finish_transaction("ROLLBACK").await;
    }
}

/// Runs the requests pipelined and returns their results in order.
///
/// tokio-postgres writes a request into the connection's queue at the first poll of its future
/// (when the statement needs no preparing, as with `execute_typed` and `batch_execute`). Polling
/// every future once, in order, before waiting for any answer makes the server receive, and so
/// execute, the statements in batch order, while the answers of all of them are awaited
/// together: one round trip for the lot.
async fn pipeline<'a, T: Send + 'a>(
    requests: Vec<BoxFuture<'a, Result<T, tokio_postgres::Error>>>,
) -> Vec<Result<T, tokio_postgres::Error>> {
    let mut requests: Vec<_> = requests.into_iter().map(maybe_done).collect();
    for request in &mut requests {
        let _ = futures::poll!(Pin::new(request));
    }
    for request in &mut requests {
        Pin::new(request).await;
    }
    requests
        .into_iter()
        .map(|mut request| {
            Pin::new(&mut request)
                .take_output()
                .expect("every request was awaited to completion")
        })
        .collect()
}
