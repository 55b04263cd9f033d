//! `Client`: the handle a service keeps to publish row changes of one sync group.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream;
use serde::{de::DeserializeOwned, Serialize};

use crate::{
    codec::Format,
    config::{Config, StreamConfig},
    connect, record,
    stream::{self, Provisioned},
    subject::TableName,
    transaction::Transaction,
    Error, Row, Table,
};

/// Default timeout for JetStream requests and publish acknowledgements.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to one sync group (one JetStream stream).
///
/// Cheap to clone; clones share the NATS connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) nats: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) stream: StreamConfig,
    pub(crate) origin: String,
    pub(crate) format: Format,
    pub(crate) timeout: Duration,
}

impl Client {
    /// Connects with the NATS settings of `config`; the instance id becomes the events' origin.
    pub async fn connect(config: &Config) -> Result<Client, Error> {
        let nats = connect::connect(&config.nats, &config.instance).await?;
        let timeout = Duration::from_millis(config.nats.request_timeout_ms);
        Client::builder(nats, config.stream.clone(), &config.instance)
            .timeout(timeout)
            .build()
    }

    /// Wraps an existing NATS connection. `origin` identifies this instance in the events it
    /// publishes (informational; order comes from the stream).
    pub fn from_nats(
        nats: async_nats::Client,
        stream: StreamConfig,
        origin: impl Into<String>,
    ) -> Result<Client, Error> {
        Client::builder(nats, stream, origin).build()
    }

    /// A builder for less common settings (wire format, timeout).
    pub fn builder(
        nats: async_nats::Client,
        stream: StreamConfig,
        origin: impl Into<String>,
    ) -> ClientBuilder {
        ClientBuilder {
            nats,
            stream,
            origin: origin.into(),
            format: Format::default(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Creates or updates the sync group's stream with DESIGN's defaults; a no-op when it
    /// already matches. Errors with [`Error::StreamConflict`] when an existing stream cannot be
    /// used, and with [`Error::Unsupported`] (before touching anything) when
    /// `stream.transactions = true` and the server is older than 2.12.1.
    ///
    /// A request that timed out because this user may not receive its replies (the server
    /// refused the subscription to `nats.inbox_prefix`) or may not use the stream API fails with
    /// [`Error::PermissionDenied`] naming it, on connections made by [`Client::connect`].
    pub async fn provision(&self) -> Result<Provisioned, Error> {
        let server_version = self.inner.nats.server_info().version;
        match stream::provision(&self.inner.js, &self.inner.stream, &server_version).await {
            Err(e) if e.is_retryable() => {
                let subject = format!("$JS.API.STREAM.INFO.{}", self.inner.stream.name);
                Err(connect::permission_error(&self.inner.nats, "provision", &subject).unwrap_or(e))
            }
            other => other,
        }
    }

    /// A typed table handle: rows are `T`'s serde fields (flat fields → columns, nested values
    /// → JSON columns).
    pub fn table<T>(&self, name: &str) -> Result<Table<T>, Error>
    where
        T: Serialize + DeserializeOwned,
    {
        Ok(Table::new(
            self.clone(),
            TableName::new(name)?,
            |value: &T| record::to_row(value),
            |row: &Row| record::from_row(row),
        ))
    }

    /// An untyped table handle working directly on [`Row`]s.
    pub fn rows(&self, name: &str) -> Result<Table<Row>, Error> {
        Ok(Table::new(
            self.clone(),
            TableName::new(name)?,
            |row: &Row| Ok(row.clone()),
            |row: &Row| Ok(row.clone()),
        ))
    }

    /// A new, empty multi-row transaction on this sync group (see [`Transaction`]).
    pub fn transaction(&self) -> Transaction {
        Transaction::new(self.clone())
    }

    /// The underlying NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

    /// The JetStream context used for publishing.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The sync group's stream settings.
    pub fn stream_config(&self) -> &StreamConfig {
        &self.inner.stream
    }

    /// The origin (instance id) written into published events.
    pub fn origin(&self) -> &str {
        &self.inner.origin
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }
}

/// Builder returned by [`Client::builder`].
#[derive(Debug)]
pub struct ClientBuilder {
    nats: async_nats::Client,
    stream: StreamConfig,
    origin: String,
    format: Format,
    timeout: Duration,
}

impl ClientBuilder {
    /// The wire format of published events (default `postcard/1`).
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Timeout for JetStream requests and publish acknowledgements (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Validates the settings and builds the client.
    pub fn build(self) -> Result<Client, Error> {
        // `Config::load` checks this too, but a stream config built in code arrives here
        // unchecked, and async-nats would reject a bad name on every call with an error that
        // looks retryable.
        self.stream.validate()?;
        let js = jetstream::ContextBuilder::new()
            .timeout(self.timeout)
            // Pipelined writers wait for a free slot instead of failing at the in-flight limit.
            .backpressure_on_inflight(true)
            .build(self.nats.clone());
        Ok(Client {
            inner: Arc::new(Inner {
                nats: self.nats,
                js,
                stream: self.stream,
                origin: self.origin,
                format: self.format,
                timeout: self.timeout,
            }),
        })
    }
}
