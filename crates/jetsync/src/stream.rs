//! Stream provisioning: the JetStream stream that backs one sync group.
//!
//! `provision()` is idempotent: it creates the stream when it is missing, updates the fields
//! jetsync manages when they drifted, and leaves a matching stream alone. A stream that exists
//! with a shape jetsync cannot use (other subjects, another storage type) is reported as
//! [`Error::StreamConflict`] rather than silently rewritten: it may belong to someone else.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    context::{CreateStreamErrorKind, GetStreamErrorKind},
    stream::{DiscardPolicy, RetentionPolicy, StorageType},
};

use crate::{config::StreamConfig, subject, Error};

/// JetStream API error code: "stream not found".
const STREAM_NOT_FOUND: u64 = 10059;
/// JetStream API error code: "subjects overlap with an existing stream".
const SUBJECT_OVERLAP: u64 = 10065;

/// What `provision()` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Provisioned {
    /// The stream did not exist and was created.
    Created,
    /// The stream existed and some managed field was updated.
    Updated,
    /// The stream existed with the expected configuration; nothing was changed.
    Unchanged,
}

/// The JetStream stream configuration DESIGN section 2 prescribes for a sync group.
pub fn stream_definition(cfg: &StreamConfig) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: cfg.name.clone(),
        subjects: vec![subject::group_filter(&cfg.subject_prefix)],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        // One subject per row: `history` events per row make the stream a compacted changelog.
        max_messages_per_subject: cfg.history,
        max_messages: cfg.max_msgs,
        max_bytes: cfg.max_bytes,
        max_age: Duration::from_millis(cfg.max_age_ms),
        discard: DiscardPolicy::Old,
        num_replicas: cfg.replicas,
        duplicate_window: Duration::from_millis(cfg.duplicate_window_ms),
        allow_direct: true,
        // Deletes are tombstones, never purges: a late instance must still learn about them.
        deny_delete: true,
        deny_purge: true,
        description: Some(format!(
            "jetsync sync group (subjects {}.<table>.<key>)",
            cfg.subject_prefix
        )),
        ..Default::default()
    }
}

/// Whether the stream has any age, count or size limit, i.e. whether events an instance has not
/// seen yet can disappear before it reads them (gap detection only matters then).
pub fn has_limits(info: &jetstream::stream::Config) -> bool {
    info.max_messages > 0 || info.max_bytes > 0 || !info.max_age.is_zero()
}

/// Differences between the wanted definition and an existing stream that provisioning may fix
/// in place, or an error for differences it must not touch.
fn drift(
    want: &jetstream::stream::Config,
    have: &jetstream::stream::Config,
) -> Result<Vec<&'static str>, String> {
    if have.subjects != want.subjects {
        return Err(format!(
            "it has subjects {:?}, jetsync needs exactly {:?}",
            have.subjects, want.subjects
        ));
    }
    if have.storage != want.storage {
        return Err(format!(
            "it uses {:?} storage, jetsync needs file storage",
            have.storage
        ));
    }
    if have.retention != want.retention {
        return Err(format!(
            "it uses {:?} retention, jetsync needs limits retention",
            have.retention
        ));
    }
    let mut changed = Vec::new();
    if have.max_messages_per_subject != want.max_messages_per_subject {
        changed.push("history");
    }
    if have.max_messages != want.max_messages {
        changed.push("max_msgs");
    }
    if have.max_bytes != want.max_bytes {
        changed.push("max_bytes");
    }
    if have.max_age != want.max_age {
        changed.push("max_age");
    }
    if have.num_replicas != want.num_replicas {
        changed.push("replicas");
    }
    if have.duplicate_window != want.duplicate_window {
        changed.push("duplicate_window");
    }
    if !have.allow_direct || !have.deny_delete || !have.deny_purge {
        changed.push("allow_direct/deny_delete/deny_purge");
    }
    Ok(changed)
}

/// Creates or updates the sync group's stream (see [`Provisioned`]).
pub(crate) async fn provision(
    js: &jetstream::Context,
    cfg: &StreamConfig,
) -> Result<Provisioned, Error> {
    let want = stream_definition(cfg);
    match js.get_stream(&cfg.name).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|e| Error::nats("stream info", e))?;
            let changed = drift(&want, &info.config).map_err(|reason| Error::StreamConflict {
                stream: cfg.name.clone(),
                reason,
            })?;
            if changed.is_empty() {
                return Ok(Provisioned::Unchanged);
            }
            tracing::info!(stream = %cfg.name, fields = ?changed, "updating stream configuration");
            js.update_stream(&want)
                .await
                .map_err(|e| stream_error(cfg, "update stream", e))?;
            Ok(Provisioned::Updated)
        }
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js_err) if js_err.error_code().0 == STREAM_NOT_FOUND => {
                js.create_stream(&want)
                    .await
                    .map_err(|e| stream_error(cfg, "create stream", e))?;
                tracing::info!(stream = %cfg.name, subjects = ?want.subjects, "created stream");
                Ok(Provisioned::Created)
            }
            _ => Err(Error::nats("get stream", e)),
        },
    }
}

fn stream_error(
    cfg: &StreamConfig,
    operation: &'static str,
    e: async_nats::jetstream::context::CreateStreamError,
) -> Error {
    if let CreateStreamErrorKind::JetStream(js_err) = e.kind() {
        if js_err.error_code().0 == SUBJECT_OVERLAP {
            return Error::StreamConflict {
                stream: cfg.name.clone(),
                reason: format!(
                    "another stream already captures subjects {}.>: {js_err}",
                    cfg.subject_prefix
                ),
            };
        }
    }
    if matches!(e.kind(), CreateStreamErrorKind::TimedOut) {
        return Error::Timeout {
            operation,
            after: None,
        };
    }
    Error::nats(operation, e)
}
