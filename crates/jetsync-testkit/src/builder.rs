//! [`ServerBuilder`]: options for a single [`NatsServer`].

use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, NatsServer};

/// Default deadline for a single server to become ready.
pub(crate) const DEFAULT_SERVER_TIMEOUT: Duration = Duration::from_secs(20);

/// Options for starting a single [`NatsServer`]; get one from
/// [`NatsServer::builder`].
///
/// ```no_run
/// # fn main() -> Result<(), jetsync_testkit::Error> {
/// let server = jetsync_testkit::NatsServer::builder()
///     .extra_config("max_payload: 2048")
///     .start()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    pub(crate) extra: Vec<String>,
    pub(crate) jetstream: bool,
    pub(crate) startup_timeout: Duration,
    pub(crate) server_name: Option<String>,
    pub(crate) binary: Option<PathBuf>,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder {
            extra: Vec::new(),
            jetstream: true,
            startup_timeout: DEFAULT_SERVER_TIMEOUT,
            server_name: None,
            binary: None,
        }
    }
}

impl ServerBuilder {
    /// Appends `text` verbatim to the generated config file, e.g. an
    /// `accounts { .. }` or `authorization { .. }` block. May be called
    /// several times; the pieces are appended in order, after the generated
    /// `listen`, `http`, `log_file` and `jetstream` settings.
    ///
    /// Readiness is checked over plain TCP and the monitoring port, so
    /// authorization settings do not get in the way of start-up.
    pub fn extra_config(mut self, text: impl Into<String>) -> Self {
        self.extra.push(text.into());
        self
    }

    /// Enables (the default) or disables JetStream.
    pub fn jetstream(mut self, on: bool) -> Self {
        self.jetstream = on;
        self
    }

    /// How long [`start`](Self::start) and [`NatsServer::restart`] wait for
    /// the server to become ready (default 20 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Sets the config's `server_name` (by default nats-server uses its
    /// generated server id).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Uses this `nats-server` executable instead of the one
    /// [`nats_server_binary`](crate::nats_server_binary) finds.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Starts the server and waits until it is ready (see
    /// [`NatsServer::start`]).
    ///
    /// # Errors
    ///
    /// See [`NatsServer::start`].
    pub fn start(self) -> Result<NatsServer, Error> {
        NatsServer::start_with(&self)
    }
}
