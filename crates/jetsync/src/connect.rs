//! Building an [`async_nats::Client`] from [`NatsConfig`].
//!
//! [`connect`] applies the one configured authentication method, TLS and timeouts, logs
//! connection state changes through `tracing`, and reconnects forever once connected. It does
//! *not* retry the initial connection: the caller learns at once whether the failure is worth
//! retrying ([`ConnectError::is_retryable`]) and runs its own capped backoff, so a wrong password
//! fails fast instead of hiding in a retry loop.

use std::error::Error as _;
use std::path::PathBuf;
use std::time::Duration;

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
    let options = options(nats, &name, &server).await?;
    tracing::debug!(server = %server, auth = method, client = %name, "connecting to NATS");
    options
        .connect(servers)
        .await
        .map_err(|err| classify(err, server, method))
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
) -> Result<ConnectOptions, ConnectError> {
    let mut options = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_millis(nats.connect_timeout_ms))
        .request_timeout(Some(Duration::from_millis(nats.request_timeout_ms)))
        .max_reconnects(None::<usize>)
        .event_callback(event_logger(server.to_owned(), name.to_owned()));

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

/// Logs each connection state change once. async-nats passes events, never credentials.
fn event_logger(
    server: String,
    client: String,
) -> impl Fn(Event) -> std::future::Ready<()> + Send + Sync + 'static {
    move |event| {
        let (server, client) = (server.as_str(), client.as_str());
        match &event {
            Event::Disconnected => {
                tracing::warn!(server, client, "disconnected from NATS; reconnecting");
            }
            Event::Connected => tracing::info!(server, client, "connected to NATS"),
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
