//! `jetsync::connect` against real nats-server processes: each authentication method, and
//! that failures come back at once, typed, and classified as retryable or not.

use std::time::Duration;

use anyhow::Result;
use jetsync::{connect, ConnectError, NatsConfig, Secret};
use jetsync_testkit::NatsServer;

/// Upper bound for a connect that must fail fast. Only a hang guard: it is far above the
/// milliseconds a refused login takes, so a slow machine cannot make it flaky, but a client
/// stuck in a retry loop would hit it.
const FAIL_FAST: Duration = Duration::from_secs(20);

fn nats_config(url: String) -> NatsConfig {
    NatsConfig {
        url,
        ..NatsConfig::default()
    }
}

async fn connect_guarded(nats: &NatsConfig) -> Result<async_nats::Client, ConnectError> {
    tokio::time::timeout(FAIL_FAST, connect(nats, "jetsync-connect-test"))
        .await
        .expect("connect returned within the hang guard: the initial connect must not retry")
}

/// The connection works: a request round trip through the server succeeds.
async fn assert_usable(client: async_nats::Client) -> Result<()> {
    client.flush().await?;
    let mut sub = client.subscribe("jetsync.test.ping").await?;
    client.publish("jetsync.test.ping", "hi".into()).await?;
    client.flush().await?;
    let msg = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut sub))
        .await?
        .expect("subscription open");
    assert_eq!(&msg.payload[..], b"hi");
    Ok(())
}

fn user_password_server() -> Result<NatsServer> {
    Ok(NatsServer::builder()
        .extra_config("authorization { user: app, password: \"s3cret-pw\" }")
        .start()?)
}

#[tokio::test]
async fn user_and_password_connects() -> Result<()> {
    let server = user_password_server()?;
    let nats = NatsConfig {
        user: Some("app".into()),
        password: Some(Secret::new("s3cret-pw")),
        name: Some("connect-test".into()),
        ..nats_config(server.url())
    };
    let client = connect_guarded(&nats).await?;
    assert_usable(client).await
}

#[tokio::test]
async fn wrong_password_is_an_authentication_error() -> Result<()> {
    let server = user_password_server()?;
    let nats = NatsConfig {
        user: Some("app".into()),
        password: Some(Secret::new("wrong-pw")),
        ..nats_config(server.url())
    };
    let err = connect_guarded(&nats).await.unwrap_err();
    match &err {
        ConnectError::Authentication { server: s, method } => {
            assert_eq!(*method, "user/password");
            assert_eq!(s, &server.url());
        }
        other => panic!("expected Authentication, got {other:?}"),
    }
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(message.contains("nats.user/nats.password"), "{message}");
    assert!(!message.contains("wrong-pw"), "{message}");
    assert!(!format!("{err:?}").contains("wrong-pw"));
    Ok(())
}

#[tokio::test]
async fn missing_credentials_are_an_authentication_error() -> Result<()> {
    let server = user_password_server()?;
    let err = connect_guarded(&nats_config(server.url()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::Authentication { method: "none", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("requires authentication"), "{err}");
    Ok(())
}

#[tokio::test]
async fn token_auth() -> Result<()> {
    let server = NatsServer::builder()
        .extra_config("authorization { token: \"t0ken-value\" }")
        .start()?;
    let good = NatsConfig {
        token: Some(Secret::new("t0ken-value")),
        ..nats_config(server.url())
    };
    assert_usable(connect_guarded(&good).await?).await?;

    let bad = NatsConfig {
        token: Some(Secret::new("not-the-token")),
        ..nats_config(server.url())
    };
    let err = connect_guarded(&bad).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Authentication {
                method: "token",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.to_string().contains("not-the-token"));
    Ok(())
}

#[tokio::test]
async fn nkey_auth() -> Result<()> {
    let user = nkeys::KeyPair::new_user();
    let server = NatsServer::builder()
        .extra_config(format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
            user.public_key()
        ))
        .start()?;
    let dir = tempfile::tempdir()?;
    let seed_file = dir.path().join("user.nk");
    std::fs::write(&seed_file, format!("{}\n", user.seed()?))?;
    let good = NatsConfig {
        nkey_seed_file: Some(seed_file),
        ..nats_config(server.url())
    };
    assert_usable(connect_guarded(&good).await?).await?;

    let stranger = nkeys::KeyPair::new_user();
    let other_seed = dir.path().join("other.nk");
    std::fs::write(&other_seed, stranger.seed()?)?;
    let bad = NatsConfig {
        nkey_seed_file: Some(other_seed),
        ..nats_config(server.url())
    };
    let err = connect_guarded(&bad).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::Authentication { method: "nkey", .. }),
        "{err:?}"
    );

    let garbage_seed = dir.path().join("garbage.nk");
    std::fs::write(&garbage_seed, "not a seed")?;
    let garbage = NatsConfig {
        nkey_seed_file: Some(garbage_seed),
        ..nats_config(server.url())
    };
    let err = connect_guarded(&garbage).await.unwrap_err();
    assert!(!err.is_retryable(), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn unreachable_server_is_retryable() -> Result<()> {
    // A free port nothing listens on: the connection is refused at once.
    let port = jetsync_testkit::free_port()?;
    let url = format!("nats://127.0.0.1:{port}");
    let err = connect_guarded(&nats_config(url.clone()))
        .await
        .unwrap_err();
    match &err {
        ConnectError::Unreachable { server, .. } => assert_eq!(server, &url),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(err.is_retryable());
    assert!(err.to_string().contains(&url), "{err}");
    Ok(())
}

#[tokio::test]
async fn tls_required_against_plain_server_is_a_tls_error() -> Result<()> {
    let server = NatsServer::start()?;
    let mut nats = nats_config(server.url());
    nats.tls.required = true;
    let err = connect_guarded(&nats).await.unwrap_err();
    assert!(!err.is_retryable(), "{err:?}");
    assert!(matches!(err, ConnectError::Tls { .. }), "{err:?}");
    Ok(())
}
