//! The engine's error type.

use crate::{offsets::OffsetsError, SinkError};

/// Why the engine stopped (or could not start).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Invalid configuration or connection settings that retrying cannot fix.
    #[error(transparent)]
    Client(#[from] jetsync::Error),
    /// The sync group's stream does not exist and `stream.provision` is false.
    #[error(
        "stream {stream} not found: run `jetsync-applier provision` or set stream.provision = true"
    )]
    StreamNotFound {
        /// The stream name.
        stream: String,
    },
    /// Events this instance never applied are gone from the stream (limits or expiry moved its
    /// first sequence past `applied + 1`).
    #[error("gap: this instance applied up to seq {applied} but the stream's first available seq is {first_available}; events in between are gone. Rebuild this instance (resync) or set apply.on_gap")]
    Gap {
        /// The last applied sequence.
        applied: u64,
        /// The stream's first sequence.
        first_available: u64,
    },
    /// The instance claims to have applied more than the stream holds: the stream was recreated
    /// or the instance's data belongs to another stream.
    #[error("this instance applied up to seq {applied} but stream {stream} ends at seq {last}: the stream was recreated or data_dir belongs to another stream; check, then run `jetsync-applier reset --to-seq 0`")]
    AheadOfStream {
        /// The stream name.
        stream: String,
        /// The last applied sequence.
        applied: u64,
        /// The stream's last sequence.
        last: u64,
    },
    /// An event that cannot be applied (undecodable, bad subject, rejected by the sink).
    #[error(
        "poison event at seq {seq} ({subject}): {reason}. Fix or remove the cause, then restart"
    )]
    Poison {
        /// Its stream sequence.
        seq: u64,
        /// Its subject.
        subject: String,
        /// Why it cannot be applied.
        reason: String,
    },
    /// The sink failed permanently.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The checkpoint store failed.
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
    /// A NATS operation failed in a way retrying did not fix.
    #[error("{operation} failed: {source}")]
    Nats {
        /// What was attempted.
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl EngineError {
    pub(crate) fn nats(
        operation: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        EngineError::Nats {
            operation,
            source: Box::new(source),
        }
    }

    /// Whether the engine's retry loop should try again (connection trouble, timeouts).
    pub fn is_retryable(&self) -> bool {
        match self {
            EngineError::Nats { .. } => true,
            EngineError::Client(e) => e.is_retryable(),
            EngineError::Sink(e) => e.is_retryable(),
            _ => false,
        }
    }
}
