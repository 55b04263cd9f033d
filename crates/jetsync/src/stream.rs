//! Stream provisioning: the JetStream stream that backs one sync group.
//!
//! `provision()` is idempotent: it creates the stream when it is missing, updates the fields
//! jetsync manages when they drifted, and leaves a matching stream alone. A stream that exists
//! with a shape jetsync cannot use (other subjects, another storage type) is reported as
//! [`Error::StreamConflict`] rather than silently rewritten: it may belong to someone else.

use std::{fmt, time::Duration};

use async_nats::jetstream::{
    self,
    context::{CreateStreamErrorKind, GetStreamErrorKind},
    stream::{DiscardPolicy, RetentionPolicy, StorageType},
};

use crate::{
    config::{ConfigError, StreamConfig},
    subject,
    transaction::version,
    Error,
};

/// JetStream API error code: "stream not found".
const STREAM_NOT_FOUND: u64 = 10059;
/// JetStream API error code: "subjects overlap with an existing stream".
const SUBJECT_OVERLAP: u64 = 10065;
/// JetStream API error code: "stream name already in use with a different configuration".
const STREAM_NAME_IN_USE: u64 = 10058;

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
        // Transactions are atomic batches; a server before 2.12 would ignore the flag, which is
        // why `provision` refuses `transactions = true` there.
        allow_atomic_publish: cfg.transactions,
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

/// One reason a stream the applier did not provision (`stream.provision = false`) cannot back a
/// sync group (DESIGN §5 "Streams the applier did not provision").
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamProblem {
    /// Retention is not `limits`: interest or work-queue retention removes events once they are
    /// consumed, so a late or rebuilt instance would miss them.
    Retention(RetentionPolicy),
    /// `deny_purge` is false: a purge would remove rows' latest events, which instances that have
    /// not read them yet would never learn about.
    PurgeAllowed,
    /// `deny_delete` is false: deleting single events would silently drop row changes.
    DeleteAllowed,
    /// The stream's subjects do not capture every subject of the sync group.
    SubjectsDoNotCover {
        /// The stream's subjects.
        subjects: Vec<String>,
        /// The filter they must cover (`<subject_prefix>.>`).
        needed: String,
    },
    /// `stream.transactions = true`, but the stream does not allow atomic publish
    /// (`allow_atomic`), so every transaction would be refused.
    AtomicPublishDisabled,
}

impl fmt::Display for StreamProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamProblem::Retention(r) => write!(
                f,
                "its retention is {}, jetsync needs limits (events must stay after they are consumed)",
                match r {
                    RetentionPolicy::Limits => "limits",
                    RetentionPolicy::Interest => "interest",
                    RetentionPolicy::WorkQueue => "workqueue",
                }
            ),
            StreamProblem::PurgeAllowed => {
                f.write_str("it allows purges (set deny_purge: true on the stream)")
            }
            StreamProblem::DeleteAllowed => {
                f.write_str("it allows message deletes (set deny_delete: true on the stream)")
            }
            StreamProblem::SubjectsDoNotCover { subjects, needed } => write!(
                f,
                "its subjects {subjects:?} do not cover {needed} (add {needed:?} to the stream's subjects)"
            ),
            StreamProblem::AtomicPublishDisabled => f.write_str(
                "it does not allow atomic publish, which stream.transactions = true needs (set allow_atomic: true on the stream, on nats-server 2.12.1 or later)",
            ),
        }
    }
}

/// A stream the applier did not provision cannot back the sync group; lists every problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "stream {stream} (used as is because stream.provision = false) cannot back a sync group: {}; fix the stream, or set stream.provision = true to let jetsync create it",
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
)]
pub struct UnprovisionedStreamError {
    /// The stream name.
    pub stream: String,
    /// Every problem found (never empty).
    pub problems: Vec<StreamProblem>,
}

impl From<UnprovisionedStreamError> for ConfigError {
    fn from(e: UnprovisionedStreamError) -> Self {
        ConfigError::Invalid {
            key: "stream.provision".to_owned(),
            reason: format!(
                "false, but {}",
                e.to_string()
                    .replace(" (used as is because stream.provision = false)", "")
            ),
        }
    }
}

/// Whether the subject pattern `pattern` (a stream subject, possibly with `*` and `>`) matches
/// every subject the filter `filter` matches.
fn covers(pattern: &str, filter: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let filter: Vec<&str> = filter.split('.').collect();
    for (i, want) in filter.iter().enumerate() {
        let Some(have) = pattern.get(i) else {
            return false;
        };
        if *have == ">" {
            return true;
        }
        if *want == ">" {
            // The filter takes any number of further tokens; only `>` does as well.
            return false;
        }
        if *have != "*" && have != want {
            return false;
        }
    }
    pattern.len() == filter.len()
}

/// Checks an existing stream that jetsync is told not to provision: limits retention, purges
/// and deletes denied, subjects covering `<subject_prefix>.>`, and atomic publish allowed when
/// `stream.transactions = true`. Returns every problem found.
pub fn check_unprovisioned(
    cfg: &StreamConfig,
    have: &jetstream::stream::Config,
) -> Result<(), UnprovisionedStreamError> {
    let mut problems = Vec::new();
    if have.retention != RetentionPolicy::Limits {
        problems.push(StreamProblem::Retention(have.retention));
    }
    if !have.deny_purge {
        problems.push(StreamProblem::PurgeAllowed);
    }
    if !have.deny_delete {
        problems.push(StreamProblem::DeleteAllowed);
    }
    let needed = subject::group_filter(&cfg.subject_prefix);
    if !have.subjects.iter().any(|s| covers(s, &needed)) {
        problems.push(StreamProblem::SubjectsDoNotCover {
            subjects: have.subjects.clone(),
            needed,
        });
    }
    if cfg.transactions && !have.allow_atomic_publish {
        problems.push(StreamProblem::AtomicPublishDisabled);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(UnprovisionedStreamError {
            stream: cfg.name.clone(),
            problems,
        })
    }
}

/// Fetches the sync group's stream and runs [`check_unprovisioned`] on it: the check `run`,
/// `resync`, `tail` and `publish` do when `stream.provision = false`. A failed check is a
/// configuration error naming `stream.provision` ([`Error::Config`]); a missing stream is
/// [`Error::StreamNotFound`].
pub async fn check_existing_stream(
    js: &jetstream::Context,
    cfg: &StreamConfig,
) -> Result<(), Error> {
    let have = existing_config(js, &cfg.name)
        .await?
        .ok_or_else(|| Error::StreamNotFound {
            stream: cfg.name.clone(),
        })?;
    check_unprovisioned(cfg, &have).map_err(|e| Error::Config(e.into()))
}

/// The configuration of stream `name`, `None` when there is no such stream.
async fn existing_config(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<jetstream::stream::Config>, Error> {
    match js.get_stream(name).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|e| Error::nats("stream info", e))?;
            Ok(Some(info.config.clone()))
        }
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js_err) if js_err.error_code().0 == STREAM_NOT_FOUND => {
                Ok(None)
            }
            _ => Err(Error::nats("get stream", e)),
        },
    }
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
    // Only ever turned on: another publisher may rely on it (see `provision`).
    if want.allow_atomic_publish && !have.allow_atomic_publish {
        changed.push("transactions");
    }
    Ok(changed)
}

/// Creates or updates the sync group's stream (see [`Provisioned`]). `server_version` is the
/// version of the server the client is connected to: with `stream.transactions = true` a server
/// before 2.12.1 is refused before anything is created or updated (it would ignore
/// `allow_atomic` and store every transaction member as an ordinary message).
pub(crate) async fn provision(
    js: &jetstream::Context,
    cfg: &StreamConfig,
    server_version: &str,
) -> Result<Provisioned, Error> {
    if cfg.transactions && !version::supports_transactions(server_version) {
        return Err(Error::Unsupported {
            feature: "transactions",
            server_version: server_version.to_owned(),
            needed: version::NEEDED.to_owned(),
        });
    }
    let want = stream_definition(cfg);
    // Instances of a service start together and all provision the same stream: one creates it
    // between another's lookup and its create, which the server then refuses (name in use, or
    // subjects overlapping the stream just created). The loser looks again and goes through the
    // existing-stream path; a creation that fails with the stream still absent is a real error.
    let mut attempt = 1;
    loop {
        if let Some(have) = existing_config(js, &cfg.name).await? {
            return reconcile(js, cfg, want, &have).await;
        }
        match js.create_stream(&want).await {
            Ok(_) => {
                tracing::info!(stream = %cfg.name, subjects = ?want.subjects, "created stream");
                return Ok(Provisioned::Created);
            }
            Err(e) if attempt < CREATE_ATTEMPTS && lost_creation_race(&e) => {
                tracing::debug!(stream = %cfg.name, error = %e, "stream created concurrently; looking again");
                attempt += 1;
            }
            Err(e) => return Err(stream_error(cfg, "create stream", e)),
        }
    }
}

/// How often [`provision`] tries to create the stream when other instances race it.
const CREATE_ATTEMPTS: u32 = 3;

/// Whether a failed create may be another instance having created the stream first.
fn lost_creation_race(e: &async_nats::jetstream::context::CreateStreamError) -> bool {
    matches!(e.kind(), CreateStreamErrorKind::JetStream(js_err)
        if matches!(js_err.error_code().0, SUBJECT_OVERLAP | STREAM_NAME_IN_USE))
}

/// Brings an existing stream to `want` (see [`Provisioned`]), or refuses one that conflicts.
async fn reconcile(
    js: &jetstream::Context,
    cfg: &StreamConfig,
    mut want: jetstream::stream::Config,
    have: &jetstream::stream::Config,
) -> Result<Provisioned, Error> {
    let changed = drift(&want, have).map_err(|reason| Error::StreamConflict {
        stream: cfg.name.clone(),
        reason,
    })?;
    if changed.is_empty() {
        return Ok(Provisioned::Unchanged);
    }
    // Never turned off by provisioning: a stream that allows atomic publish keeps it.
    want.allow_atomic_publish |= have.allow_atomic_publish;
    tracing::info!(stream = %cfg.name, fields = ?changed, "updating stream configuration");
    js.update_stream(&want)
        .await
        .map_err(|e| stream_error(cfg, "update stream", e))?;
    Ok(Provisioned::Updated)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> StreamConfig {
        StreamConfig {
            name: "CATALOG".into(),
            subject_prefix: "catalog".into(),
            ..StreamConfig::default()
        }
    }

    #[test]
    fn what_jetsync_provisions_passes() {
        assert_eq!(
            check_unprovisioned(&cfg(), &stream_definition(&cfg())),
            Ok(())
        );
    }

    #[test]
    fn subject_coverage() {
        for (pattern, ok) in [
            ("catalog.>", true),
            (">", true),
            ("*.>", true),
            ("catalog.*", false),
            ("catalog.products.>", false),
            ("catalog", false),
            ("other.>", false),
            ("catalog.*.>", false),
        ] {
            assert_eq!(covers(pattern, "catalog.>"), ok, "{pattern}");
        }
        assert!(covers("a.*.>", "a.b.>"));
        assert!(!covers("a.*.*", "a.b.>"));
    }

    #[test]
    fn every_problem_is_listed() {
        let mut have = stream_definition(&cfg());
        have.retention = RetentionPolicy::Interest;
        have.deny_purge = false;
        have.deny_delete = false;
        have.subjects = vec!["catalog.products.>".into(), "other.>".into()];
        let err = check_unprovisioned(&cfg(), &have).unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err:?}");
        let config: ConfigError = err.into();
        assert_eq!(config.key(), Some("stream.provision"));
        let text = config.to_string();
        for want in [
            "stream.provision: false, but stream CATALOG cannot back a sync group",
            "retention is interest",
            "allows purges",
            "allows message deletes",
            "do not cover catalog.>",
        ] {
            assert!(text.contains(want), "{want:?} missing in {text}");
        }
        have.retention = RetentionPolicy::WorkQueue;
        let tx = StreamConfig {
            transactions: true,
            ..cfg()
        };
        let err = check_unprovisioned(&tx, &stream_definition(&cfg())).unwrap_err();
        assert_eq!(err.problems, vec![StreamProblem::AtomicPublishDisabled]);
        assert!(err.to_string().contains("allow_atomic"), "{err}");
        assert_eq!(check_unprovisioned(&tx, &stream_definition(&tx)), Ok(()));
        assert!(check_unprovisioned(&cfg(), &have)
            .unwrap_err()
            .to_string()
            .contains("retention is workqueue"));
    }
}
