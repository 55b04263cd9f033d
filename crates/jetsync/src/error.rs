//! The client crate's error type.

use std::time::Duration;

use crate::{
    codec::{DecodeError, EncodeError},
    config::ConfigError,
    connect::ConnectError,
    record::RecordError,
    subject::SubjectError,
};

/// Everything a jetsync client call can fail with.
///
/// Variants are named for what the caller can do about them: retry ([`Error::is_retryable`]),
/// re-read and retry a compare-and-set ([`Error::Conflict`]), fix the input, or fix the setup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid or could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Connecting to NATS failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A table name, key or subject is not valid.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// A value could not be turned into a row, or a row into the requested type.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// An event could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A stored event could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A compare-and-set write found another last sequence for the row than expected.
    /// `current_seq` is the row's current last sequence (0 when the row never existed);
    /// re-read the row and retry with it.
    ///
    /// For a [`Transaction`](crate::Transaction) nothing of it was stored, and `current_seq`
    /// belongs to one of its compare-and-set rows (the server does not say which): re-read every
    /// row the transaction compares and build it again.
    #[error("conflict: the row's current last sequence is {current_seq}; re-read it and retry")]
    Conflict {
        /// The row subject's current last sequence in the stream.
        current_seq: u64,
    },
    /// The sync group's stream does not exist.
    #[error(
        "stream {stream} not found: run `jetsync-applier provision` or set stream.provision = true"
    )]
    StreamNotFound {
        /// The stream name.
        stream: String,
    },
    /// A stream exists under the sync group's name or subjects with a shape jetsync cannot use.
    #[error("stream {stream} conflicts with the jetsync configuration: {reason}")]
    StreamConflict {
        /// The stream name.
        stream: String,
        /// What differs.
        reason: String,
    },
    /// The server did not answer in time. For a publish the outcome is unknown: retry with the
    /// same message id (`WriteOptions::msg_id`) so it is stored at most once.
    #[error("{operation} timed out{}; the server may be down or unreachable", .after.map(|d| format!(" after {d:?}")).unwrap_or_default())]
    Timeout {
        /// What timed out.
        operation: &'static str,
        /// The timeout, when known.
        after: Option<Duration>,
    },
    /// The event is larger than the server accepts (its `max_payload`, 1 MiB by default).
    /// Retrying cannot help: keep large values outside the row and store a reference.
    #[error("the event for {subject} is too large to publish: {reason}")]
    TooLarge {
        /// The row's subject.
        subject: String,
        /// The sizes involved, as the client reports them.
        reason: String,
    },
    /// The NATS user lacks the permission for this operation: the server refused a publish
    /// (`operation` `"publish"` or `"get"`, with the row subject or the JetStream API subject the
    /// request went to) or the subscription to this connection's reply inbox (`operation`
    /// `"subscribe to replies"`; allow `<nats.inbox_prefix>.>`). Retrying cannot help; fix the
    /// user's permissions (see `nats-config/accounts.conf`). With `"subscribe to replies"` the
    /// request itself was allowed and may have been carried out (a publish stored) although no
    /// acknowledgement could arrive: after fixing the permissions, retry with the same message
    /// id.
    ///
    /// Detected on connections made by [`Client::connect`](crate::Client::connect) or
    /// [`connect`](crate::connect), as soon as the server reports the violation. The server
    /// drops a denied message and reports it only on the connection, so a connection made
    /// elsewhere (passed to [`Client::from_nats`](crate::Client::from_nats)) gets
    /// [`Error::Timeout`] instead.
    #[error("permission denied for {operation} on {subject}: check this user's NATS permissions")]
    PermissionDenied {
        /// What was attempted.
        operation: &'static str,
        /// The subject involved.
        subject: String,
    },
    /// The stored message at `seq` is one the NATS client library cannot parse (`reason`;
    /// written by a publisher speaking the NATS protocol directly), so the row cannot be read
    /// until a valid event overwrites it. The client's connection was dropped and re-established
    /// once while reading it.
    #[error("the stored message at seq {seq} is malformed ({reason}): the NATS client cannot parse it; write the row again (upsert or delete) to replace it")]
    Malformed {
        /// Its stream sequence.
        seq: u64,
        /// What the client refuses in it.
        reason: String,
    },
    /// A transaction has more members than one atomic batch may hold. Nothing was sent; split
    /// it (each part is atomic on its own) or write fewer rows.
    #[error("a transaction of {rows} rows is larger than the {max} rows one atomic batch may hold; nothing was sent")]
    TransactionTooLarge {
        /// The transaction's members.
        rows: usize,
        /// The most one transaction may hold ([`MAX_TRANSACTION_ROWS`](crate::MAX_TRANSACTION_ROWS),
        /// or the server's lower `max_batch_size` when it says so).
        max: usize,
    },
    /// The server or the stream cannot do what was asked (transactions need nats-server 2.12.1
    /// or later and a stream with atomic publish allowed). Nothing was stored; jetsync never
    /// falls back to a weaker behaviour. Fix the setup as `needed` says.
    #[error("{feature} unavailable with nats-server {server_version}: {needed}")]
    Unsupported {
        /// The feature (`"transactions"`).
        feature: &'static str,
        /// The version of the server the client is connected to.
        server_version: String,
        /// What the feature needs.
        needed: String,
    },
    /// A table handle of another sync group (stream) was added to a transaction: one
    /// transaction is one atomic batch in one stream.
    #[error("table {table} belongs to stream {stream}, the transaction to stream {transaction_stream}: one transaction writes one sync group")]
    OtherSyncGroup {
        /// The table.
        table: String,
        /// The table handle's stream.
        stream: String,
        /// The transaction's stream.
        transaction_stream: String,
    },
    /// Any other NATS failure.
    #[error("{operation} failed: {source}")]
    Nats {
        /// What was attempted.
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    pub(crate) fn nats(
        operation: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Nats {
            operation,
            source: Box::new(source),
        }
    }

    /// Whether the same call may succeed when retried (timeouts, connection trouble). For a
    /// publish, retry with the same message id.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::Nats { .. } => true,
            Error::Connect(e) => e.is_retryable(),
            _ => false,
        }
    }
}
