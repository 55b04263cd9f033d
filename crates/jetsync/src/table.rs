//! `Table<T>`: publishing row changes of one table, and reading the latest row from the stream.

use std::{collections::VecDeque, fmt, marker::PhantomData};

use async_nats::{
    jetstream::{
        self,
        context::{PublishAckFuture, PublishErrorKind},
        stream::DirectGetErrorKind,
    },
    HeaderMap,
};
use bytes::Bytes;

use crate::{
    codec::{self, FORMAT_HEADER},
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
pub struct Table<T> {
    client: Client,
    name: TableName,
    to_row: ToRow<T>,
    from_row: FromRow<T>,
    _marker: PhantomData<fn() -> T>,
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Table {
            client: self.client.clone(),
            name: self.name.clone(),
            to_row: self.to_row,
            from_row: self.from_row,
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
    pub(crate) fn new(client: Client, name: TableName, to_row: ToRow<T>, from_row: FromRow<T>) -> Self {
        Table {
            client,
            name,
            to_row,
            from_row,
            _marker: PhantomData,
        }
    }

    /// The table name.
    pub fn name(&self) -> &TableName {
        &self.name
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
    pub async fn upsert_with(&self, key: &str, row: &T, options: WriteOptions) -> Result<Published, Error> {
        let change = Change::Upsert((self.to_row)(row)?);
        self.send(key, change, &options).await?.resolve().await
    }

    /// Publishes a tombstone for row `key` (deletes are events, never purges).
    pub async fn delete(&self, key: &str) -> Result<Published, Error> {
        self.delete_with(key, WriteOptions::default()).await
    }

    /// [`Table::delete`] with explicit options (message id, compare-and-set).
    pub async fn delete_with(&self, key: &str, options: WriteOptions) -> Result<Published, Error> {
        self.send(key, Change::Delete, &options).await?.resolve().await
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
    pub async fn upsert_if(&self, key: &str, row: &T, expected_seq: u64) -> Result<Published, Error> {
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
    pub async fn get(&self, key: &str) -> Result<Option<Current<T>>, Error> {
        let subject = self.subject(key)?;
        let inner = self.client.inner();
        let stream = inner.js.get_stream_no_info(&inner.stream.name).await.map_err(|e| Error::nats("get stream", e))?;
        let message = match stream.direct_get_last_for_subject(subject).await {
            Ok(message) => message,
            Err(e) => {
                return match e.kind() {
                    DirectGetErrorKind::NotFound => Ok(None),
                    DirectGetErrorKind::TimedOut => Err(Error::Timeout {
                        operation: "get",
                        after: Some(inner.timeout),
                    }),
                    DirectGetErrorKind::ErrorResponse(status, _) if status.as_u16() == 503 => {
                        Err(Error::StreamNotFound {
                            stream: inner.stream.name.clone(),
                        })
                    }
                    _ => Err(Error::nats("get", e)),
                };
            }
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
    async fn send(&self, key: &str, change: Change, options: &WriteOptions) -> Result<Pending, Error> {
        let inner = self.client.inner();
        let subject = self.subject(key)?;
        let event = match change {
            Change::Upsert(row) => Event::upsert(row, inner.origin.clone()),
            Change::Delete => Event::delete(inner.origin.clone()),
        };
        let body = codec::encode(&event, inner.format)?;
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
        let future = inner
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| publish_error(e, inner))?;
        Ok(Pending { future, subject })
    }
}

/// A publish whose acknowledgement has not arrived yet.
struct Pending {
    future: PublishAckFuture,
    subject: String,
}

impl Pending {
    async fn resolve(self) -> Result<Published, Error> {
        match self.future.await {
            Ok(ack) => Ok(Published {
                seq: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(e) => Err(match e.kind() {
                PublishErrorKind::WrongLastSequence => Error::Conflict {
                    current_seq: parse_current_seq(&e.to_string()).unwrap_or_default(),
                },
                PublishErrorKind::TimedOut => Error::Timeout {
                    operation: "publish",
                    after: None,
                },
                PublishErrorKind::StreamNotFound => Error::StreamNotFound {
                    stream: format!("for subject {}", self.subject),
                },
                _ => Error::nats("publish", e),
            }),
        }
    }
}

/// The server's "wrong last sequence: N" error carries the row's current last sequence.
fn parse_current_seq(message: &str) -> Option<u64> {
    let tail = &message[message.rfind("wrong last sequence")?..];
    let digits: String = tail
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn publish_error(e: jetstream::context::PublishError, inner: &crate::client::Inner) -> Error {
    match e.kind() {
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
    pub async fn upsert_with(&mut self, key: &str, row: &T, options: WriteOptions) -> Result<(), Error> {
        let change = Change::Upsert((self.table.to_row)(row)?);
        self.push(key, change, options).await
    }

    /// Queues a delete of row `key`.
    pub async fn delete(&mut self, key: &str) -> Result<(), Error> {
        self.push(key, Change::Delete, WriteOptions::default()).await
    }

    async fn push(&mut self, key: &str, change: Change, options: WriteOptions) -> Result<(), Error> {
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

    #[test]
    fn parses_current_seq_from_server_error() {
        assert_eq!(
            parse_current_seq("wrong last sequence: wrong last sequence: 42 (10071)"),
            Some(42)
        );
        assert_eq!(parse_current_seq("publish failed"), None);
    }
}
