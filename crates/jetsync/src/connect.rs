//! Building an [`async_nats::Client`] from [`NatsConfig`].
//!
//! [`connect`] applies the one configured authentication method, TLS and timeouts, logs
//! connection state changes through `tracing`, and reconnects forever once connected. It does
//! *not* retry the initial connection: the caller learns at once whether the failure is worth
//! retrying ([`ConnectError::is_retryable`]) and runs its own capped backoff, so a wrong password
//! fails fast instead of hiding in a retry loop.
//!
//! It also watches the connection for the server's permission violations (`-ERR 'Permissions
//! Violation for Publish to "…"'`), which NATS reports on the connection instead of answering the
//! request: a denied publish or JetStream request would otherwise just time out. Publishes and
//! gets through [`crate::Table`] on such a connection fail with [`crate::Error::PermissionDenied`]
//! as soon as the server's error arrives; [`permission_error`] lets other callers ask.

use std::collections::VecDeque;
use std::error::Error as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_nats::{ConnectErrorKind, ConnectOptions, Event, ServerError};

use crate::config::NatsConfig;

/// Why [`connect`] failed. Messages name the server and the configuration keys to check, never a
/// secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No server could be reached (refused, timed out, DNS failure, connection dropped during
    /// the handshake, or the server turned the connection away for now). Worth retrying.
    #[error(
        "cannot reach NATS at {server}: {source}; check nats.url and that the server is running"
    )]
    Unreachable {
        /// The configured server(s).
        server: String,
        /// What async-nats reported.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The server rejected the credentials, or none were configured and the server requires
    /// them, or the configured nkey or credentials could not sign the server's challenge.
    #[error("{}", authentication_message(server, method))]
    Authentication {
        /// The configured server(s).
        server: String,
        /// The authentication method used: see [`auth_method`].
        method: &'static str,
    },
    /// The server knows the user but refuses it (its user or account authentication expired or
    /// was revoked).
    #[error(
        "NATS at {server} refused the connection: {message}; renew or fix the credentials in \
         nats.creds_file"
    )]
    Authorization {
        /// The configured server(s).
        server: String,
        /// The server's error message.
        message: String,
    },
    /// The TLS handshake or TLS setup failed (unknown CA, bad certificate or key file, server
    /// without TLS while `nats.tls.required` is set).
    #[error("TLS with NATS at {server} failed: {reason}; check nats.tls.* and the URL scheme")]
    Tls {
        /// The configured server(s).
        server: String,
        /// What failed.
        reason: String,
    },
    /// `nats.url` is not a valid server URL or list of them.
    #[error("nats.url is invalid: {reason}")]
    InvalidUrl {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configured file (nkey seed, credentials) could not be read or parsed.
    #[error("cannot use {key} {}: {source}", path.display())]
    Io {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it could not be used.
        #[source]
        source: std::io::Error,
    },
    /// Any other failure reported by async-nats.
    #[error("connecting to NATS at {server} failed: {source}")]
    Other {
        /// The configured server(s).
        server: String,
        /// What async-nats reported.
        #[source]
        source: async_nats::ConnectError,
    },
}

fn authentication_message(server: &str, method: &str) -> String {
    let keys = match method {
        "user/password" => "check nats.user/nats.password",
        "token" => "check nats.token",
        "nkey" => "check nats.nkey_seed_file (it must hold a user seed, SU...)",
        "creds" => "check nats.creds_file",
        _ => {
            return format!(
                "NATS at {server} requires authentication: set nats.user/nats.password, \
                 nats.token, nats.nkey_seed_file or nats.creds_file"
            )
        }
    };
    format!("authentication failed at {server} using {method}: {keys}")
}

impl ConnectError {
    /// Whether trying again later may succeed without changing the configuration.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnectError::Unreachable { .. } | ConnectError::Other { .. } => true,
            ConnectError::Authentication { .. }
            | ConnectError::Authorization { .. }
            | ConnectError::Tls { .. }
            | ConnectError::InvalidUrl { .. }
            | ConnectError::Io { .. } => false,
        }
    }
}

/// The authentication method `nats` configures: `"user/password"`, `"token"`, `"nkey"`,
/// `"creds"` or `"none"`.
pub fn auth_method(nats: &NatsConfig) -> &'static str {
    if nats.creds_file.is_some() {
        "creds"
    } else if nats.nkey_seed_file.is_some() {
        "nkey"
    } else if nats.token.is_some() {
        "token"
    } else if nats.user.is_some() || nats.password.is_some() {
        "user/password"
    } else {
        "none"
    }
}

/// Connects to NATS as configured. `name` is the client connection name unless `nats.name` is
/// set.
///
/// Returns once connected, or with the first failure: the initial connection is not retried
/// (see the module docs). After that, the client reconnects forever, and each state change is
/// logged once (`Disconnected` at WARN, `Connected` at INFO).
pub async fn connect(nats: &NatsConfig, name: &str) -> Result<async_nats::Client, ConnectError> {
    let server = server_label(nats);
    let servers = nats
        .server_addrs()
        .map_err(|err| ConnectError::InvalidUrl {
            url: server.clone(),
            reason: match err {
                crate::config::ConfigError::Invalid { reason, .. } => reason,
                other => other.to_string(),
            },
        })?;
    let method = auth_method(nats);
    let name = nats.name.clone().unwrap_or_else(|| name.to_owned());
    let violations = Arc::new(Violations::new(
        nats.inbox_prefix.as_deref().unwrap_or(DEFAULT_INBOX_PREFIX),
    ));
    let options = options(nats, &name, &server, violations.clone()).await?;
    tracing::debug!(server = %server, auth = method, client = %name, "connecting to NATS");
    let client = options
        .connect(servers)
        .await
        .map_err(|err| classify(err, server, method))?;
    register(&client, violations);
    Ok(client)
}

/// The configured server list, for messages and logs. Validation rejects credentials in
/// `nats.url`, but a `NatsConfig` built in code skips it, so any user info is redacted here.
fn server_label(nats: &NatsConfig) -> String {
    let servers: Vec<String> = nats
        .url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| match entry.rsplit_once('@') {
            Some((userinfo, host)) => {
                let scheme = userinfo.split_once("://").map_or("", |(scheme, _)| scheme);
                if scheme.is_empty() {
                    format!("<redacted>@{host}")
                } else {
                    format!("{scheme}://<redacted>@{host}")
                }
            }
            None => entry.to_owned(),
        })
        .collect();
    servers.join(",")
}

async fn options(
    nats: &NatsConfig,
    name: &str,
    server: &str,
    violations: Arc<Violations>,
) -> Result<ConnectOptions, ConnectError> {
    let mut options = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_millis(nats.connect_timeout_ms))
        .request_timeout(Some(Duration::from_millis(nats.request_timeout_ms)))
        .max_reconnects(None::<usize>)
        .event_callback(event_logger(server.to_owned(), name.to_owned(), violations));
    if let Some(prefix) = &nats.inbox_prefix {
        // Replies (publish acks, JetStream API responses, pulled messages) arrive under this
        // prefix, so the user's permissions can allow subscribing to `<prefix>.>` only.
        options = options.custom_inbox_prefix(prefix);
    }

    if let Some(path) = &nats.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|source| ConnectError::Io {
                key: "nats.creds_file",
                path: path.clone(),
                source,
            })?;
    } else if let Some(path) = &nats.nkey_seed_file {
        let seed = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| ConnectError::Io {
                key: "nats.nkey_seed_file",
                path: path.clone(),
                source,
            })?;
        // nsc writes the seed alone on a line; tolerate surrounding blank lines.
        let seed = seed.trim();
        if seed.is_empty() {
            return Err(ConnectError::Io {
                key: "nats.nkey_seed_file",
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
            });
        }
        options = options.nkey(seed.to_owned());
    } else if let Some(token) = &nats.token {
        options = options.token(token.expose().to_owned());
    } else if let (Some(user), Some(password)) = (&nats.user, &nats.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }

    if let Some(ca) = &nats.tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&nats.tls.cert_file, &nats.tls.key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    // A CA or client certificate only makes sense over TLS; insisting on it (as nats.go does
    // for RootCAs) keeps a server without TLS from silently downgrading the connection.
    if nats.tls_required() {
        options = options.require_tls(true);
    }
    Ok(options)
}

/// Logs each connection state change once, and records permission violations in
/// `violations`. async-nats passes events, never credentials.
fn event_logger(
    server: String,
    client: String,
    violations: Arc<Violations>,
) -> impl Fn(Event) -> std::future::Ready<()> + Send + Sync + 'static {
    move |event| {
        let (server, client) = (server.as_str(), client.as_str());
        match &event {
            Event::Disconnected => {
                tracing::warn!(server, client, "disconnected from NATS; reconnecting");
            }
            Event::Connected => {
                // A new connection subscribes again; an earlier refusal may not hold any more.
                violations.connected();
                tracing::info!(server, client, "connected to NATS");
            }
            Event::ServerError(ServerError::Other(message)) => match parse_violation(message) {
                Some(denied) => {
                    tracing::warn!(
                        server,
                        client,
                        operation = denied.operation(),
                        subject = %denied.subject,
                        "NATS denied the operation: the user lacks the permission"
                    );
                    violations.record(denied);
                }
                None => {
                    tracing::warn!(server, client, error = %message, "NATS server reported an error")
                }
            },
            Event::LameDuckMode => tracing::warn!(
                server,
                client,
                "NATS server entered lame duck mode and will close the connection soon"
            ),
            Event::SlowConsumer(sid) => tracing::warn!(
                server,
                client,
                sid = *sid,
                "NATS slow consumer: the client dropped messages of a subscription"
            ),
            Event::ServerError(error) => {
                tracing::warn!(server, client, %error, "NATS server reported an error");
            }
            other => tracing::debug!(server, client, event = %other, "NATS connection event"),
        }
        std::future::ready(())
    }
}

/// The inbox prefix async-nats uses unless `nats.inbox_prefix` sets another.
const DEFAULT_INBOX_PREFIX: &str = "_INBOX";

/// How many violations a connection remembers (the newest).
const VIOLATIONS_KEPT: usize = 256;

/// How long [`permission_error`] counts a reported violation as the reason of a failure.
const VIOLATION_RECENT: Duration = Duration::from_secs(60);

/// One permission violation the server reported on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Denied {
    /// What was refused.
    pub(crate) kind: DeniedKind,
    /// The subject, as the server quoted it.
    pub(crate) subject: String,
}

/// What the server refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeniedKind {
    /// A publish (including a JetStream API request or an ack) to the subject.
    Publish,
    /// A subscription to the subject.
    Subscribe,
}

impl Denied {
    /// The operation as [`crate::Error::PermissionDenied`] names it.
    pub(crate) fn operation(&self) -> &'static str {
        match self.kind {
            DeniedKind::Publish => "publish",
            DeniedKind::Subscribe => "subscribe",
        }
    }

    /// The typed error for `operation` (what the caller attempted) refused by this violation.
    pub(crate) fn into_error(self, operation: &'static str) -> crate::Error {
        crate::Error::PermissionDenied {
            operation: match self.kind {
                DeniedKind::Publish => operation,
                // The request itself may be allowed, but its reply could never arrive.
                DeniedKind::Subscribe => "subscribe to replies",
            },
            subject: self.subject,
        }
    }
}

/// Parses the server's `Permissions Violation for Publish to "x"` and `Permissions Violation
/// for Subscription to "x"` (optionally followed by ` using queue "q"` or `, too many tokens`),
/// as nats-server 2.9 to 2.12 word them. async-nats strips the surrounding `'`.
pub(crate) fn parse_violation(message: &str) -> Option<Denied> {
    const PUBLISH: &str = "Permissions Violation for Publish to ";
    const SUBSCRIBE: &str = "Permissions Violation for Subscription to ";
    let message = message.trim().trim_matches('\'');
    let (kind, rest) = if let Some(rest) = message.strip_prefix(PUBLISH) {
        (DeniedKind::Publish, rest)
    } else if let Some(rest) = message.strip_prefix(SUBSCRIBE) {
        (DeniedKind::Subscribe, rest)
    } else {
        return None;
    };
    let quoted = rest.strip_prefix('"')?;
    let subject = &quoted[..quoted.find('"')?];
    (!subject.is_empty()).then(|| Denied {
        kind,
        subject: subject.to_owned(),
    })
}

/// The permission violations reported on one connection made by [`connect`], for the calls
/// waiting on it. A denied publish or request is dropped by the server, which says so only in
/// this out-of-band error; these records let the waiting call fail with a typed error instead of
/// a timeout.
#[derive(Debug)]
pub(crate) struct Violations {
    /// `nats.inbox_prefix` or `_INBOX`: a refused subscription under it means no reply (ack,
    /// API response) can reach this connection.
    inbox_prefix: String,
    /// Bumped by every recorded violation; a call remembers it before sending and counts only
    /// violations recorded after that.
    generation: AtomicU64,
    /// Whether `state.inbox_denied` is set, readable without the lock (the common case, no
    /// violation at all, must stay cheap for pipelined publishes).
    inbox_refused: AtomicBool,
    state: Mutex<ViolationState>,
    /// Wakes calls waiting in [`Violations::wait`].
    changed: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct ViolationState {
    /// (generation, when, violation), oldest first.
    recent: VecDeque<(u64, Instant, Denied)>,
    /// The refused subscription to the inbox, until the next (re)connect.
    inbox_denied: Option<Denied>,
}

impl Violations {
    fn new(inbox_prefix: &str) -> Self {
        Violations {
            inbox_prefix: inbox_prefix.to_owned(),
            generation: AtomicU64::new(0),
            inbox_refused: AtomicBool::new(false),
            state: Mutex::new(ViolationState::default()),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ViolationState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, denied: Denied) {
        let generation = {
            let mut state = self.lock();
            let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            let inbox = denied.kind == DeniedKind::Subscribe
                && denied
                    .subject
                    .strip_prefix(self.inbox_prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('.'));
            if inbox {
                state.inbox_denied = Some(denied.clone());
                self.inbox_refused.store(true, Ordering::Release);
            }
            if state.recent.len() == VIOLATIONS_KEPT {
                state.recent.pop_front();
            }
            state.recent.push_back((generation, Instant::now(), denied));
            generation
        };
        self.changed.send_replace(generation);
    }

    fn connected(&self) {
        let mut state = self.lock();
        state.inbox_denied = None;
        self.inbox_refused.store(false, Ordering::Release);
    }

    /// The current generation: remember it before sending, pass it to [`Violations::since`].
    pub(crate) fn mark(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The violation that dooms a call sent at `mark` on `subject` (matched by `is_subject`): a
    /// refused publish to it recorded after `mark`, or a refused subscription to the inbox.
    pub(crate) fn since(
        &self,
        mark: u64,
        is_subject: &(dyn Fn(&str) -> bool + Sync),
    ) -> Option<Denied> {
        if self.generation.load(Ordering::Acquire) == mark
            && !self.inbox_refused.load(Ordering::Acquire)
        {
            // Nothing reported since the call was sent: no lock taken.
            return None;
        }
        let state = self.lock();
        if let Some(denied) = &state.inbox_denied {
            return Some(denied.clone());
        }
        state
            .recent
            .iter()
            .rev()
            .take_while(|(generation, _, _)| *generation > mark)
            .find(|(_, _, d)| d.kind == DeniedKind::Publish && is_subject(&d.subject))
            .map(|(_, _, d)| d.clone())
    }

    /// Waits until [`Violations::since`] finds a violation for the call; pending forever
    /// otherwise (race it against the call's own outcome).
    pub(crate) async fn wait(
        &self,
        mark: u64,
        is_subject: &(dyn Fn(&str) -> bool + Sync),
    ) -> Denied {
        let mut changed = self.changed.subscribe();
        loop {
            if let Some(denied) = self.since(mark, is_subject) {
                return denied;
            }
            if changed.changed().await.is_err() {
                // The sender lives as long as `self`; never reached.
                std::future::pending::<()>().await;
            }
        }
    }

    /// A recent refused publish to `subject` or the inbox refusal, regardless of when the call
    /// was sent.
    fn recent(&self, subject: &str) -> Option<Denied> {
        let state = self.lock();
        if let Some(denied) = &state.inbox_denied {
            return Some(denied.clone());
        }
        state
            .recent
            .iter()
            .rev()
            .take_while(|(_, at, _)| at.elapsed() <= VIOLATION_RECENT)
            .find(|(_, _, d)| d.kind == DeniedKind::Publish && d.subject == subject)
            .map(|(_, _, d)| d.clone())
    }
}

/// Connections made by [`connect`] and their violation records, keyed by the identity of the
/// connection's shared statistics (the same `Arc` in every clone of an `async_nats::Client`).
type Registry = Vec<(Weak<async_nats::Statistics>, Arc<Violations>)>;

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    static REGISTRY: Mutex<Registry> = Mutex::new(Vec::new());
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn register(client: &async_nats::Client, violations: Arc<Violations>) {
    let mut registry = registry();
    registry.retain(|(stats, _)| stats.strong_count() > 0);
    registry.push((Arc::downgrade(&client.statistics()), violations));
}

/// The violation records of `client` when [`connect`] made it (`None` for connections made
/// elsewhere, e.g. passed to `Client::from_nats`).
pub(crate) fn violations(client: &async_nats::Client) -> Option<Arc<Violations>> {
    let stats = client.statistics();
    registry()
        .iter()
        .find(|(known, _)| std::ptr::eq(known.as_ptr(), Arc::as_ptr(&stats)))
        .map(|(_, violations)| violations.clone())
}

/// Whether the server refused `client` a publish to `subject` within the last minute (or the
/// subscription to its reply inbox, until it reconnects): then a call on `subject` that timed
/// out failed for lack of permission, and this returns the
/// [`PermissionDenied`](crate::Error::PermissionDenied) error for `operation` to report instead
/// of the timeout. `None` otherwise, and always for connections not made by [`connect`].
///
/// For JetStream API calls, `subject` is the request subject, e.g.
/// `$JS.API.CONSUMER.INFO.CATALOG.jetsync_catalog-1`.
pub fn permission_error(
    client: &async_nats::Client,
    operation: &'static str,
    subject: &str,
) -> Option<crate::Error> {
    violations(client)?
        .recent(subject)
        .map(|denied| denied.into_error(operation))
}

/// Maps an async-nats connect failure to what the caller can act on.
fn classify(err: async_nats::ConnectError, server: String, method: &'static str) -> ConnectError {
    match err.kind() {
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            ConnectError::Authentication { server, method }
        }
        ConnectErrorKind::Tls => ConnectError::Tls {
            reason: err
                .source()
                .map_or_else(|| err.to_string(), ToString::to_string),
            server,
        },
        ConnectErrorKind::ServerParse => ConnectError::InvalidUrl {
            reason: err.to_string(),
            url: server,
        },
        ConnectErrorKind::Io => {
            if let Some(tls) = find_in_chain::<async_nats::rustls::Error>(&err) {
                return ConnectError::Tls {
                    reason: tls.to_string(),
                    server,
                };
            }
            if let Some(ServerError::Other(message)) = find_in_chain::<ServerError>(&err) {
                let lower = message.to_ascii_lowercase();
                if lower.contains("expired") || lower.contains("revoked") {
                    return ConnectError::Authorization {
                        message: message.clone(),
                        server,
                    };
                }
                if lower.contains("tls required") || lower.contains("secure connection") {
                    return ConnectError::Tls {
                        reason: message.clone(),
                        server,
                    };
                }
            }
            // Refused, reset, closed during the handshake, or turned away for now (e.g.
            // "maximum connections exceeded"): all may clear up.
            ConnectError::Unreachable {
                server,
                source: err,
            }
        }
        ConnectErrorKind::Dns | ConnectErrorKind::TimedOut | ConnectErrorKind::MaxReconnects => {
            ConnectError::Unreachable {
                server,
                source: err,
            }
        }
        #[allow(unreachable_patterns)]
        _ => ConnectError::Other {
            server,
            source: err,
        },
    }
}

/// The first error of type `T` in `err`'s source chain, looking through `io::Error` wrappers.
fn find_in_chain<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(found) = inner.downcast_ref::<T>() {
                    return Some(found);
                }
            }
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn auth_methods() {
        let mut nats = NatsConfig::default();
        assert_eq!(auth_method(&nats), "none");
        nats.user = Some("u".into());
        nats.password = Some(Secret::new("p"));
        assert_eq!(auth_method(&nats), "user/password");
        nats.user = None;
        nats.password = None;
        nats.token = Some(Secret::new("t"));
        assert_eq!(auth_method(&nats), "token");
        nats.token = None;
        nats.nkey_seed_file = Some("seed.nk".into());
        assert_eq!(auth_method(&nats), "nkey");
        nats.nkey_seed_file = None;
        nats.creds_file = Some("user.creds".into());
        assert_eq!(auth_method(&nats), "creds");
    }

    #[test]
    fn classification_and_retryability() {
        let server = "nats://127.0.0.1:4333".to_owned();
        let auth = classify(
            async_nats::ConnectError::new(ConnectErrorKind::AuthorizationViolation),
            server.clone(),
            "user/password",
        );
        assert!(matches!(
            auth,
            ConnectError::Authentication {
                method: "user/password",
                ..
            }
        ));
        assert!(!auth.is_retryable());
        assert_eq!(
            auth.to_string(),
            "authentication failed at nats://127.0.0.1:4333 using user/password: check \
             nats.user/nats.password"
        );

        let none = classify(
            async_nats::ConnectError::new(ConnectErrorKind::AuthorizationViolation),
            server.clone(),
            "none",
        );
        assert!(
            none.to_string().contains("requires authentication"),
            "{none}"
        );

        let refused = classify(
            async_nats::ConnectError::from(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )),
            server.clone(),
            "none",
        );
        assert!(matches!(refused, ConnectError::Unreachable { .. }));
        assert!(refused.is_retryable());

        let timed_out = classify(
            async_nats::ConnectError::new(ConnectErrorKind::TimedOut),
            server.clone(),
            "none",
        );
        assert!(timed_out.is_retryable());

        let expired = classify(
            async_nats::ConnectError::with_source(
                ConnectErrorKind::Io,
                ServerError::Other("User Authentication Expired".into()),
            ),
            server.clone(),
            "creds",
        );
        assert!(
            matches!(expired, ConnectError::Authorization { .. }),
            "{expired:?}"
        );
        assert!(!expired.is_retryable());

        let busy = classify(
            async_nats::ConnectError::with_source(
                ConnectErrorKind::Io,
                ServerError::Other("maximum connections exceeded".into()),
            ),
            server.clone(),
            "none",
        );
        assert!(busy.is_retryable(), "{busy:?}");

        let tls = classify(
            async_nats::ConnectError::with_source(ConnectErrorKind::Tls, "bad certificate"),
            server,
            "none",
        );
        assert!(matches!(tls, ConnectError::Tls { .. }));
        assert!(!tls.is_retryable());
    }

    #[test]
    fn server_label_redacts_user_info() {
        let nats = NatsConfig {
            url: "nats://me:pw@a:4222, b:4222,tls://tok@c".into(),
            ..NatsConfig::default()
        };
        assert_eq!(
            server_label(&nats),
            "nats://<redacted>@a:4222,b:4222,tls://<redacted>@c"
        );
    }

    #[test]
    fn parses_permission_violations() {
        // As nats-server 2.9.10 and 2.12.8 word them (async-nats strips the quotes around).
        let publish = parse_violation(r#"Permissions Violation for Publish to "orders.items.k1""#);
        assert_eq!(
            publish,
            Some(Denied {
                kind: DeniedKind::Publish,
                subject: "orders.items.k1".into()
            })
        );
        let api = parse_violation(
            r#"'Permissions Violation for Publish to "$JS.API.CONSUMER.INFO.CATALOG.jetsync_catalog-1"'"#,
        )
        .unwrap();
        assert_eq!(
            api.subject,
            "$JS.API.CONSUMER.INFO.CATALOG.jetsync_catalog-1"
        );
        for text in [
            r#"Permissions Violation for Subscription to "_INBOX.abc.*""#,
            r#"Permissions Violation for Subscription to "_INBOX.abc.*" using queue "q""#,
            r#"Permissions Violation for Subscription to "_INBOX.abc.*", too many tokens"#,
        ] {
            let denied = parse_violation(text).unwrap();
            assert_eq!(denied.kind, DeniedKind::Subscribe, "{text}");
            assert_eq!(denied.subject, "_INBOX.abc.*", "{text}");
        }
        for other in [
            "Authorization Violation",
            "Permissions Violation for Publish to ",
            r#"Permissions Violation for Publish to """#,
            "Slow Consumer",
        ] {
            assert_eq!(parse_violation(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn violations_count_only_after_the_mark() {
        let v = Arc::new(Violations::new("_INBOX_me"));
        let is_x = |s: &str| s == "x.1";
        let before = v.mark();
        v.record(Denied {
            kind: DeniedKind::Publish,
            subject: "x.1".into(),
        });
        let after = v.mark();
        assert!(after > before);
        assert_eq!(
            v.since(before, &is_x).map(|d| d.subject),
            Some("x.1".into())
        );
        // A later call on the same subject is not blamed on an earlier refusal...
        assert_eq!(v.since(after, &is_x), None);
        // ...nor is a call on another subject.
        assert_eq!(v.since(before, &|s: &str| s == "y.1"), None);
        assert!(v.recent("x.1").is_some());
        assert!(v.recent("y.1").is_none());

        // `wait` wakes up when the violation arrives.
        let waiter = {
            let v = v.clone();
            tokio::spawn(async move { v.wait(after, &|s: &str| s == "x.2").await })
        };
        tokio::task::yield_now().await;
        v.record(Denied {
            kind: DeniedKind::Publish,
            subject: "x.2".into(),
        });
        let denied = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(denied.subject, "x.2");
        assert!(matches!(
            denied.into_error("publish"),
            crate::Error::PermissionDenied { operation: "publish", ref subject } if subject == "x.2"
        ));
    }

    #[test]
    fn refused_inbox_dooms_every_call_until_reconnect() {
        let v = Violations::new("_INBOX_me");
        // A subscription under a longer prefix is not the inbox.
        v.record(Denied {
            kind: DeniedKind::Subscribe,
            subject: "_INBOX_meX.1".into(),
        });
        let mark = v.mark();
        assert_eq!(v.since(mark, &|_: &str| true), None);
        v.record(Denied {
            kind: DeniedKind::Subscribe,
            subject: "_INBOX_me.abc.*".into(),
        });
        let mark = v.mark();
        let denied = v
            .since(mark, &|_: &str| false)
            .expect("standing inbox refusal");
        let error = denied.into_error("publish");
        assert!(
            matches!(&error, crate::Error::PermissionDenied { operation: "subscribe to replies", subject } if subject == "_INBOX_me.abc.*"),
            "{error:?}"
        );
        assert!(v.recent("anything").is_some());
        v.connected();
        assert_eq!(v.since(mark, &|_: &str| true), None);
    }

    #[tokio::test]
    async fn credentials_in_url_are_not_echoed() {
        let nats = NatsConfig {
            url: "nats://me:hunter2@127.0.0.1:4222".into(),
            ..NatsConfig::default()
        };
        let err = connect(&nats, "test").await.unwrap_err();
        assert!(matches!(err, ConnectError::InvalidUrl { .. }), "{err:?}");
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
    }

    #[tokio::test]
    async fn invalid_url_is_reported_before_connecting() {
        let nats = NatsConfig {
            url: "ftp://x".into(),
            ..NatsConfig::default()
        };
        let err = connect(&nats, "test").await.unwrap_err();
        assert!(matches!(err, ConnectError::InvalidUrl { .. }), "{err:?}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn missing_seed_file_names_the_key() {
        let nats = NatsConfig {
            nkey_seed_file: Some("/nonexistent/seed.nk".into()),
            ..NatsConfig::default()
        };
        let err = connect(&nats, "test").await.unwrap_err();
        assert!(
            matches!(
                err,
                ConnectError::Io {
                    key: "nats.nkey_seed_file",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("nats.nkey_seed_file"), "{err}");
    }
}
