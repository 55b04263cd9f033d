//! `Table<T>`: publishing row changes of one table, and reading the latest row from the stream.

use std::{collections::VecDeque, fmt, marker::PhantomData, sync::Arc};

use async_nats::{
    jetstream::{
        self,
        context::{GetStreamErrorKind, PublishAckFuture, PublishErrorKind},
        message::StreamMessage,
        stream::DirectGetErrorKind,
    },
    HeaderMap,
};
use bytes::Bytes;

use crate::{
    codec::{self, EventRef, FORMAT_HEADER},
    connect::{self, Violations},
    event::{Change, Event},
    record::RecordError,
    subject::{self, TableName},
    Client, Error, Row,
};

/// Pipelined writes keep at most this many publishes awaiting their acknowledgement.
pub const DEFAULT_PIPELINE_WINDOW: usize = 1024;

/// The outcome of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The event's stream sequence. Wait until the instance's replica has applied this sequence
    /// to read your own write.
    pub seq: u64,
    /// True when the server had already stored an event with the same message id (inside the
    /// stream's duplicate window) and this publish stored nothing new; `seq` is then the
    /// original's sequence.
    pub duplicate: bool,
}

/// The latest state of a row, read straight from the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Current<T> {
    /// The stream sequence of the event that wrote this state; pass it to `upsert_if` /
    /// `delete_if` for a compare-and-set.
    pub seq: u64,
    /// The row.
    pub row: T,
}

/// Per-write options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Idempotency key sent as `Nats-Msg-Id`: a retried publish with the same id inside the
    /// stream's duplicate window is stored once. Generated when `None`.
    pub msg_id: Option<String>,
    /// Compare-and-set: the write succeeds only if the row's last sequence is exactly this
    /// (0 = the row has never been written). `None` writes unconditionally.
    pub expected_seq: Option<u64>,
}

type ToRow<T> = fn(&T) -> Result<Row, RecordError>;
type FromRow<T> = fn(&Row) -> Result<T, RecordError>;

/// A handle on one table of a sync group. Obtain it with [`Client::table`] (typed) or
/// [`Client::rows`] (untyped [`Row`]s). Cheap to clone.
///
/// A write or read the NATS user has no permission for fails with
/// [`Error::PermissionDenied`] as soon as the server reports the violation, when the client was
/// made by [`Client::connect`] (or [`Client::from_nats`] with a connection from
/// [`crate::connect`]). The server drops a denied message and reports it only on the
/// connection, so on connections made elsewhere such a call ends in [`Error::Timeout`].
pub struct Table<T> {
    client: Client,
    name: TableName,
    to_row: ToRow<T>,
    from_row: FromRow<T>,
    /// The connection's permission violations, when `connect` made it.
    violations: Option<Arc<Violations>>,
    _marker: PhantomData<fn() -> T>,
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Table {
            client: self.client.clone(),
            name: self.name.clone(),
            to_row: self.to_row,
            from_row: self.from_row,
            violations: self.violations.clone(),
            _marker: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Table<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table").field("name", &self.name).finish()
    }
}

impl<T> Table<T> {
    pub(crate) fn new(
        client: Client,
        name: TableName,
        to_row: ToRow<T>,
        from_row: FromRow<T>,
    ) -> Self {
        let violations = connect::violations(&client.inner().nats);
        Table {
            client,
            name,
            to_row,
            from_row,
            violations,
            _marker: PhantomData,
        }
    }

    /// The table name.
    pub fn name(&self) -> &TableName {
        &self.name
    }

    /// The client this handle was made from.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// `value` as a row, the way this handle maps it.
    pub(crate) fn row_of(&self, value: &T) -> Result<Row, Error> {
        Ok((self.to_row)(value)?)
    }

    /// The subject that carries the events of row `key`.
    pub fn subject(&self, key: &str) -> Result<String, Error> {
        let prefix = &self.client.inner().stream.subject_prefix;
        Ok(subject::row_subject(prefix, &self.name, key)?)
    }

    /// Publishes the full new state of row `key` and waits for the stream's acknowledgement.
    pub async fn upsert(&self, key: &str, row: &T) -> Result<Published, Error> {
        self.upsert_with(key, row, WriteOptions::default()).await
    }

    /// [`Table::upsert`] with explicit options (message id, compare-and-set).
    pub async fn upsert_with(
        &self,
        key: &str,
        row: &T,
        options: WriteOptions,
    ) -> Result<Published, Error> {
        let change = Change::Upsert((self.to_row)(row)?);
        self.write(key, change, options).await
    }

    /// Publishes a tombstone for row `key` (deletes are events, never purges).
    pub async fn delete(&self, key: &str) -> Result<Published, Error> {
        self.delete_with(key, WriteOptions::default()).await
    }

    /// [`Table::delete`] with explicit options (message id, compare-and-set).
    pub async fn delete_with(&self, key: &str, options: WriteOptions) -> Result<Published, Error> {
        self.write(key, Change::Delete, options).await
    }

    /// Publishes one change and waits for its acknowledgement. A first write to a sync group
    /// whose stream does not exist yet provisions it when the configuration allows
    /// (`stream.provision = true`, the default, as `run` does) and is sent again with the same
    /// message id; with `stream.provision = false` it fails with [`Error::StreamNotFound`].
    async fn write(
        &self,
        key: &str,
        change: Change,
        mut options: WriteOptions,
    ) -> Result<Published, Error> {
        // One id for both attempts: nothing was stored by the first (no stream), but a retry
        // with the same id is harmless either way.
        let msg_id = options
            .msg_id
            .get_or_insert_with(|| nuid::next().to_string())
            .clone();
        match self
            .send(key, change.clone(), &options)
            .await?
            .resolve()
            .await
        {
            Err(Error::StreamNotFound { .. }) if self.client.inner().stream.provision => {
                tracing::info!(
                    stream = %self.client.inner().stream.name,
                    "stream not found: provisioning it (stream.provision = true)"
                );
                self.client.provision().await?;
                options.msg_id = Some(msg_id);
                self.send(key, change, &options).await?.resolve().await
            }
            other => other,
        }
    }

    /// Creates row `key` only if it has never been written; otherwise [`Error::Conflict`].
    ///
    /// A row whose latest event is a delete still counts as written: use
    /// [`Table::upsert_if`] with the tombstone's sequence to re-create it.
    pub async fn insert_new(&self, key: &str, row: &T) -> Result<Published, Error> {
        self.upsert_if(key, row, 0).await
    }

    /// Writes row `key` only if its last event is `expected_seq` (compare-and-set through
    /// `Nats-Expected-Last-Subject-Sequence`); otherwise [`Error::Conflict`] with the current
    /// sequence.
    pub async fn upsert_if(
        &self,
        key: &str,
        row: &T,
        expected_seq: u64,
    ) -> Result<Published, Error> {
        let options = WriteOptions {
            expected_seq: Some(expected_seq),
            ..WriteOptions::default()
        };
        self.upsert_with(key, row, options).await
    }

    /// Deletes row `key` only if its last event is `expected_seq`; otherwise
    /// [`Error::Conflict`].
    pub async fn delete_if(&self, key: &str, expected_seq: u64) -> Result<Published, Error> {
        let options = WriteOptions {
            expected_seq: Some(expected_seq),
            ..WriteOptions::default()
        };
        self.delete_with(key, options).await
    }

    /// The latest state of row `key` straight from the stream (a direct get; no local database
    /// needed). `None` when the row was never written or its latest event is a delete.
    ///
    /// Fails with [`Error::StreamNotFound`] when the stream is missing and with
    /// [`Error::StreamConflict`] when it has direct gets disabled (`allow_direct = false`).
    /// 2.9 servers answer neither case, so there it takes the timeout plus a stream info
    /// request to find out.
    pub async fn get(&self, key: &str) -> Result<Option<Current<T>>, Error> {
        let subject = self.subject(key)?;
        let read = last_message(&self.client, &subject);
        let message = match &self.violations {
            None => read.await?,
            Some(violations) => {
                // The direct get is a request to `$JS.API.DIRECT.GET.<stream>.<subject>`; when
                // the stream does not answer, `last_message` asks `$JS.API.STREAM.INFO.<stream>`.
                let stream = &self.client.inner().stream.name;
                let direct = format!(".DIRECT.GET.{stream}.{subject}");
                let info = format!(".STREAM.INFO.{stream}");
                let is_request = |s: &str| s.ends_with(&direct) || s.ends_with(&info);
                let mark = violations.mark();
                tokio::select! {
                    biased;
                    message = read => match message {
                        Err(Error::Timeout { .. }) if violations.since(mark, &is_request).is_some() => {
                            let denied = violations.since(mark, &is_request).expect("just found");
                            return Err(denied.into_error("get"));
                        }
                        other => other?,
                    },
                    denied = violations.wait(mark, &is_request) => return Err(denied.into_error("get")),
                }
            }
        };
        let Some(message) = message else {
            return Ok(None);
        };
        let format = message.headers.get(FORMAT_HEADER).map(|v| v.as_str());
        let event = codec::decode_message(format, &message.payload)?;
        match event.change {
            Change::Upsert(row) => Ok(Some(Current {
                seq: message.sequence,
                row: (self.from_row)(&row)?,
            })),
            Change::Delete => Ok(None),
        }
    }

    /// Starts a pipelined bulk write: publishes are sent without waiting for each
    /// acknowledgement, keeping up to `DEFAULT_PIPELINE_WINDOW` in flight.
    pub fn pipeline(&self) -> Pipeline<'_, T> {
        self.pipeline_with_window(DEFAULT_PIPELINE_WINDOW)
    }

    /// [`Table::pipeline`] with a custom in-flight window (at least 1).
    pub fn pipeline_with_window(&self, window: usize) -> Pipeline<'_, T> {
        Pipeline {
            table: self,
            window: window.max(1),
            in_flight: VecDeque::with_capacity(window.max(1)),
            published: Vec::new(),
        }
    }

    /// Upserts many rows pipelined; returns the outcomes in input order.
    pub async fn upsert_many<'a, K, I>(&self, rows: I) -> Result<Vec<Published>, Error>
    where
        K: AsRef<str> + 'a,
        T: 'a,
        I: IntoIterator<Item = (K, &'a T)>,
    {
        let mut pipeline = self.pipeline();
        for (key, row) in rows {
            pipeline.upsert(key.as_ref(), row).await?;
        }
        pipeline.finish().await
    }

    /// Encodes and sends one event, returning the pending acknowledgement.
    async fn send(
        &self,
        key: &str,
        change: Change,
        options: &WriteOptions,
    ) -> Result<Pending, Error> {
        let inner = self.client.inner();
        let subject = self.subject(key)?;
        let body = encode_body(inner, &change)?;
        let mut headers = HeaderMap::new();
        let msg_id = match &options.msg_id {
            Some(id) => id.clone(),
            None => nuid::next().to_string(),
        };
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        headers.insert(FORMAT_HEADER, inner.format.header_value());
        let mut publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(body))
            .headers(headers);
        if let Some(seq) = options.expected_seq {
            publish = publish.expected_last_subject_sequence(seq);
        }
        // Remembered before sending: only violations reported after it count for this publish.
        let guard = self.violations.as_ref().map(|v| (v.clone(), v.mark()));
        let future = inner
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| publish_error(e, inner, &subject))?;
        Ok(Pending {
            future,
            subject,
            client: self.client.clone(),
            guard,
        })
    }
}

/// The event body of `change` in the client's wire format, stamped with its origin and the
/// current time: what a single write and a transaction member both send.
pub(crate) fn encode_body(inner: &crate::client::Inner, change: &Change) -> Result<Vec<u8>, Error> {
    // Encoded straight from the row and the client's origin: no owned event is built.
    let event = EventRef {
        row: match change {
            Change::Upsert(row) => Some(row),
            Change::Delete => None,
        },
        origin: &inner.origin,
        ts_ms: now_ms(),
        schema: Event::DEFAULT_SCHEMA,
    };
    Ok(codec::encode_ref(event, inner.format)?)
}

/// The publisher's wall clock for an event's `ts_ms`, as [`Event::upsert`] stamps it.
fn now_ms() -> u64 {
    let since_epoch = std::time::UNIX_EPOCH.elapsed().unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The latest event on `subject` (a direct get), `None` when the subject has none.
pub(crate) async fn last_message(
    client: &Client,
    subject: &str,
) -> Result<Option<StreamMessage>, Error> {
    let inner = client.inner();
    let stream = inner
        .js
        .get_stream_no_info(&inner.stream.name)
        .await
        .map_err(|e| Error::nats("get stream", e))?;
    let connects = || {
        inner
            .nats
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = connects();
    let e = match stream.direct_get_last_for_subject(subject).await {
        Ok(message) => return Ok(Some(message)),
        Err(e) => e,
    };
    // The client library drops its connection on a reply it cannot parse (a stored message
    // with bad header bytes, see `raw_message.rs`), and the get then times out: read the
    // subject's last message through the JSON message-get API and say what is wrong with it.
    if connects() != before
        || inner.nats.connection_state() != async_nats::connection::State::Connected
    {
        let lookup = crate::raw_message::Lookup::LastFor(subject);
        let read = crate::raw_message::fetch(&inner.js, &inner.stream.name, lookup);
        if let Ok(Ok(Some(message))) = tokio::time::timeout(inner.timeout, read).await {
            if let Some(reason) =
                crate::raw_message::refusal(&message.subject, message.headers.as_deref())
            {
                return Err(Error::Malformed {
                    seq: message.seq,
                    reason,
                });
            }
        }
    }
    let timeout = Error::Timeout {
        operation: "get",
        after: Some(inner.timeout),
    };
    match e.kind() {
        DirectGetErrorKind::NotFound => Ok(None),
        // Disconnected: the server is not there to ask why.
        DirectGetErrorKind::TimedOut
            if inner.nats.connection_state() != async_nats::connection::State::Connected =>
        {
            Err(timeout)
        }
        // Nobody answers direct gets for the stream: 2.10+ servers reply "no responders",
        // 2.9 servers stay silent. Either the stream is missing or it has direct gets turned
        // off; ask the stream API which, so the caller gets an error it can act on instead of
        // a timeout to retry forever.
        DirectGetErrorKind::TimedOut => Err(why_no_direct_get(inner).await.unwrap_or(timeout)),
        DirectGetErrorKind::ErrorResponse(status, _) if status.as_u16() == 503 => {
            Err(why_no_direct_get(inner)
                .await
                .unwrap_or_else(|| Error::nats("get", e)))
        }
        _ => Err(Error::nats("get", e)),
    }
}

/// Why the stream does not answer direct gets, if the stream API can tell.
async fn why_no_direct_get(inner: &crate::client::Inner) -> Option<Error> {
    let name = &inner.stream.name;
    match inner.js.get_stream(name).await {
        Ok(stream) if !stream.cached_info().config.allow_direct => Some(Error::StreamConflict {
            stream: name.clone(),
            reason: "direct gets are disabled (allow_direct = false), so rows cannot be read; \
                     provision the stream to enable them"
                .to_owned(),
        }),
        Ok(_) => None,
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js_err)
                if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Some(Error::StreamNotFound {
                    stream: name.clone(),
                })
            }
            _ => None,
        },
    }
}

/// A publish whose acknowledgement has not arrived yet.
struct Pending {
    future: PublishAckFuture,
    subject: String,
    /// For the error path only: naming the stream, and reading the row's current sequence
    /// when the server's conflict error does not carry it.
    client: Client,
    /// The connection's permission violations and their generation before the send, when
    /// `connect` made the connection: a denied publish is never acknowledged, the server only
    /// reports the violation on the connection.
    guard: Option<(Arc<Violations>, u64)>,
}

impl Pending {
    async fn resolve(self) -> Result<Published, Error> {
        let Pending {
            future,
            subject,
            client,
            guard,
        } = self;
        let outcome = match &guard {
            None => future.await,
            Some((violations, mark)) => {
                let is_subject = |s: &str| s == subject;
                tokio::select! {
                    // An acknowledgement already there wins; the watch costs nothing then.
                    biased;
                    outcome = future => outcome,
                    denied = violations.wait(*mark, &is_subject) => {
                        return Err(denied.into_error("publish"));
                    }
                }
            }
        };
        let e = match outcome {
            Ok(ack) => {
                return Ok(Published {
                    seq: ack.sequence,
                    duplicate: ack.duplicate,
                })
            }
            Err(e) => e,
        };
        let inner = client.inner();
        if let Some((violations, mark)) = &guard {
            // The server's report may have been lost (async-nats drops events when its event
            // queue is full); a timeout after a recorded violation is still the violation.
            if let Some(denied) = violations.since(*mark, &|s: &str| s == subject) {
                return Err(denied.into_error("publish"));
            }
        }
        Err(match e.kind() {
            PublishErrorKind::WrongLastSequence => {
                let current_seq = match server_current_seq(&e) {
                    Some(seq) => seq,
                    // The number is part of the error text on 2.9 to 2.12; should a server
                    // word it otherwise, ask the stream. The row may have moved on since the
                    // rejection, which a compare-and-set retry handles like any other race.
                    None => last_message(&client, &subject)
                        .await?
                        .map_or(0, |message| message.sequence),
                };
                Error::Conflict { current_seq }
            }
            PublishErrorKind::TimedOut => Error::Timeout {
                operation: "publish",
                after: Some(inner.timeout),
            },
            PublishErrorKind::StreamNotFound => Error::StreamNotFound {
                stream: inner.stream.name.clone(),
            },
            _ => Error::nats("publish", e),
        })
    }
}

/// The row's current last sequence from the server's rejection of a compare-and-set publish.
fn server_current_seq(e: &jetstream::context::PublishError) -> Option<u64> {
    use std::error::Error as _;
    let js_error = e.source()?.downcast_ref::<jetstream::Error>()?;
    parse_current_seq(&js_error.to_string())
}

/// Reads N from the server's error description "wrong last sequence: N" (async-nats displays it
/// as "wrong last sequence: N (code 400, error code 10071)"). `None` unless the digits follow
/// the colon directly, so the status or error code is never mistaken for the sequence.
pub(crate) fn parse_current_seq(message: &str) -> Option<u64> {
    const MARKER: &str = "wrong last sequence: ";
    let tail = &message[message.find(MARKER)? + MARKER.len()..];
    let end = tail
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(tail.len());
    tail[..end].parse().ok()
}

fn publish_error(
    e: jetstream::context::PublishError,
    inner: &crate::client::Inner,
    subject: &str,
) -> Error {
    match e.kind() {
        // Checked against the server's max_payload before sending; not worth a retry.
        PublishErrorKind::MaxPayloadExceeded => Error::TooLarge {
            subject: subject.to_owned(),
            reason: std::error::Error::source(&e)
                .map_or_else(|| e.to_string(), ToString::to_string),
        },
        PublishErrorKind::TimedOut => Error::Timeout {
            operation: "publish",
            after: Some(inner.timeout),
        },
        PublishErrorKind::StreamNotFound => Error::StreamNotFound {
            stream: inner.stream.name.clone(),
        },
        _ => Error::nats("publish", e),
    }
}

/// A pipelined bulk writer (see [`Table::pipeline`]). Call [`Pipeline::finish`] to wait for
/// the outstanding acknowledgements; dropping it without finishing leaves their outcome unknown.
pub struct Pipeline<'t, T> {
    table: &'t Table<T>,
    window: usize,
    in_flight: VecDeque<Pending>,
    published: Vec<Published>,
}

impl<T> fmt::Debug for Pipeline<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("table", &self.table.name)
            .field("in_flight", &self.in_flight.len())
            .field("published", &self.published.len())
            .finish()
    }
}

impl<T> Pipeline<'_, T> {
    /// Queues an upsert of row `key`.
    pub async fn upsert(&mut self, key: &str, row: &T) -> Result<(), Error> {
        self.upsert_with(key, row, WriteOptions::default()).await
    }

    /// Queues an upsert with explicit options.
    pub async fn upsert_with(
        &mut self,
        key: &str,
        row: &T,
        options: WriteOptions,
    ) -> Result<(), Error> {
        let change = Change::Upsert((self.table.to_row)(row)?);
        self.push(key, change, options).await
    }

    /// Queues a delete of row `key`.
    pub async fn delete(&mut self, key: &str) -> Result<(), Error> {
        self.push(key, Change::Delete, WriteOptions::default())
            .await
    }

    async fn push(
        &mut self,
        key: &str,
        change: Change,
        options: WriteOptions,
    ) -> Result<(), Error> {
        if self.in_flight.len() >= self.window {
            self.settle_oldest().await?;
        }
        let pending = self.table.send(key, change, &options).await?;
        self.in_flight.push_back(pending);
        Ok(())
    }

    async fn settle_oldest(&mut self) -> Result<(), Error> {
        if let Some(pending) = self.in_flight.pop_front() {
            let published = pending.resolve().await?;
            self.published.push(published);
        }
        Ok(())
    }

    /// Waits for every outstanding acknowledgement; returns all outcomes in submission order.
    pub async fn finish(mut self) -> Result<Vec<Published>, Error> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(self.published)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_current_seq;

    /// Compile-time check: the calls stay `Send`, so services can spawn them.
    #[allow(dead_code)]
    fn calls_are_send(table: &super::Table<crate::Row>, row: &crate::Row) {
        fn is_send<T: Send>(_: T) {}
        is_send(table.upsert("k", row));
        is_send(table.delete("k"));
        is_send(table.get("k"));
        is_send(table.upsert_many([("k", row)]));
    }

    #[test]
    fn parses_current_seq_from_server_error() {
        // As nats-server 2.9.10 and 2.12.8 describe it, displayed by async-nats.
        assert_eq!(
            parse_current_seq("wrong last sequence: 42 (code 400, error code 10071)"),
            Some(42)
        );
        assert_eq!(parse_current_seq("wrong last sequence: 0"), Some(0));
        assert_eq!(parse_current_seq("publish failed"), None);
        // Without the number, neither the status nor the error code is taken for it.
        assert_eq!(
            parse_current_seq("wrong last sequence (code 400, error code 10071)"),
            None
        );
        assert_eq!(parse_current_seq("wrong last sequence: (code 400)"), None);
    }
}
