//! `Transaction`: the rows of one multi-row write, encoded as they are added, committed as one
//! atomic batch by [`Transaction::commit`](super::commit).

use std::{
    fmt,
    sync::atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;

use crate::{event::Change, table::encode_body, Client, Error, Table};

/// The most rows one transaction may hold: the server's limit for one atomic batch.
pub const MAX_TRANSACTION_ROWS: usize = 1000;

/// A multi-row write: every row change added to it is stored all or nothing, in contiguous
/// stream sequences, when it is committed. Every applier applies it in one sink transaction.
///
/// Obtain it with [`Client::transaction`]; add changes with [`Transaction::upsert`],
/// [`Transaction::delete`] and their compare-and-set forms, then call
/// [`Transaction::commit`]. The changes may belong to any tables of the client's sync group
/// (typed or untyped handles); a row may appear more than once (the later change wins).
///
/// Transactions need nats-server 2.12.1 or later and the stream's atomic publish allowed
/// (`stream.transactions = true`, then provision): elsewhere `commit` fails with
/// [`Error::Unsupported`] and stores nothing. jetsync never falls back to single writes.
///
/// Each change is encoded when it is added, so encoding and key errors surface there. The
/// transaction id (and the `Nats-Msg-Id` of every member, `<id>-<n>`) stays the same across
/// calls to `commit`, which makes a retried commit idempotent: if an earlier attempt was stored,
/// the retry reports it as a duplicate instead of storing it again. Adding a change after
/// `commit` was called makes it another transaction with a new id.
pub struct Transaction {
    client: Client,
    id: String,
    members: Vec<Member>,
    /// Set by `commit`: a change added afterwards starts a new transaction id, so that the
    /// longer transaction is never taken for a duplicate of the stored shorter one.
    committed: AtomicBool,
}

/// One encoded row change of a transaction.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    /// The row's subject.
    pub(crate) subject: String,
    /// The event body, in the client's wire format.
    pub(crate) body: Bytes,
    /// Compare-and-set: the row's expected last sequence.
    pub(crate) expected_seq: Option<u64>,
    /// The member's own `Nats-Msg-Id`, instead of `<transaction id>-<n>`.
    pub(crate) msg_id: Option<String>,
}

impl Clone for Transaction {
    fn clone(&self) -> Self {
        Transaction {
            client: self.client.clone(),
            id: self.id.clone(),
            members: self.members.clone(),
            committed: AtomicBool::new(self.committed.load(Ordering::Acquire)),
        }
    }
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("id", &self.id)
            .field("stream", &self.client.stream_config().name)
            .field("rows", &self.members.len())
            .finish()
    }
}

impl Transaction {
    pub(crate) fn new(client: Client) -> Self {
        Transaction {
            client,
            id: nuid::next().to_string(),
            members: Vec::new(),
            committed: AtomicBool::new(false),
        }
    }

    /// The transaction id (a nuid). Member `n` (1-based) is published with the message id
    /// `<id>-<n>`; the id is stable across commit retries.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The number of row changes.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the transaction has no row changes (committing it sends nothing).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Adds the full new state of row `key` of `table`.
    pub fn upsert<T>(&mut self, table: &Table<T>, key: &str, row: &T) -> Result<&mut Self, Error> {
        let row = table.row_of(row)?;
        self.push(table, key, Change::Upsert(row), None)
    }

    /// Adds an upsert of row `key` that only happens if the row's last sequence is
    /// `expected_seq` (0: the row was never written) when the transaction is stored; otherwise
    /// the whole transaction fails with [`Error::Conflict`].
    ///
    /// The server checks it against the stream as it was before the transaction, so a row the
    /// same transaction already wrote cannot be compared again.
    pub fn upsert_if<T>(
        &mut self,
        table: &Table<T>,
        key: &str,
        row: &T,
        expected_seq: u64,
    ) -> Result<&mut Self, Error> {
        let row = table.row_of(row)?;
        self.push(table, key, Change::Upsert(row), Some(expected_seq))
    }

    /// Adds a delete (tombstone) of row `key` of `table`.
    pub fn delete<T>(&mut self, table: &Table<T>, key: &str) -> Result<&mut Self, Error> {
        self.push(table, key, Change::Delete, None)
    }

    /// Adds a delete of row `key` that only happens if the row's last sequence is
    /// `expected_seq`; otherwise the whole transaction fails with [`Error::Conflict`].
    pub fn delete_if<T>(
        &mut self,
        table: &Table<T>,
        key: &str,
        expected_seq: u64,
    ) -> Result<&mut Self, Error> {
        self.push(table, key, Change::Delete, Some(expected_seq))
    }

    /// Adds `change` of row `key` of `table`, published with its own message id `msg_id`
    /// (1 to 128 characters) instead of `<transaction id>-<n>`.
    ///
    /// For relays that republish the same changes after a crash (change capture): with the
    /// same message ids on every member, a second commit of the same changes in a new
    /// transaction is refused by the server as a duplicate and reported with
    /// `duplicate: true`, provided it comes within the stream's duplicate window.
    pub fn change_with_msg_id<T>(
        &mut self,
        table: &Table<T>,
        key: &str,
        change: Change,
        msg_id: impl Into<String>,
    ) -> Result<&mut Self, Error> {
        let msg_id = msg_id.into();
        if msg_id.is_empty() || msg_id.len() > 128 || msg_id.contains(['\r', '\n']) {
            return Err(Error::Config(crate::ConfigError::invalid(
                "msg_id",
                format!(
                    "`{msg_id}` is not a usable message id: use 1 to 128 characters on one line"
                ),
            )));
        }
        self.push(table, key, change, None)?;
        if let Some(member) = self.members.last_mut() {
            member.msg_id = Some(msg_id);
        }
        Ok(self)
    }

    fn push<T>(
        &mut self,
        table: &Table<T>,
        key: &str,
        change: Change,
        expected_seq: Option<u64>,
    ) -> Result<&mut Self, Error> {
        let ours = self.client.stream_config();
        let theirs = table.client().stream_config();
        if theirs.name != ours.name || theirs.subject_prefix != ours.subject_prefix {
            return Err(Error::OtherSyncGroup {
                table: table.name().to_string(),
                stream: theirs.name.clone(),
                transaction_stream: ours.name.clone(),
            });
        }
        let subject = table.subject(key)?;
        let body = encode_body(self.client.inner(), &change)?;
        if self.committed.swap(false, Ordering::AcqRel) {
            self.id = nuid::next().to_string();
        }
        self.members.push(Member {
            subject,
            body: Bytes::from(body),
            expected_seq,
            msg_id: None,
        });
        Ok(self)
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn members(&self) -> &[Member] {
        &self.members
    }

    /// Remembers that `commit` was called (see the field).
    pub(crate) fn mark_committed(&self) {
        self.committed.store(true, Ordering::Release);
    }
}
