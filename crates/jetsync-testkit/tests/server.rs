//! Single-server lifecycle against a real nats-server.

use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use jetsync_testkit::{server_version, Error, NatsServer};

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Blocking testkit calls inside the async tests run via `block_in_place`,
/// so the client's background tasks keep running on the other worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_kill_restart_keeps_store_and_drop_cleans_up() -> anyhow::Result<()> {
    let mut server = blocking(NatsServer::start)?;
    let port = server.port();
    assert_ne!(
        port, 4222,
        "must not reuse the machine's default server port"
    );
    assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
    assert!(server.monitor_url().starts_with("http://127.0.0.1:"));
    assert_eq!(server.version(), server_version()?);
    assert!(server.log_path().exists());
    let store = server.store_dir().to_path_buf();
    let temp_dir = server.config_path().parent().unwrap().to_path_buf();
    assert!(server.is_running());
    let healthz = server.monitor_get("/healthz")?;
    assert!(healthz.contains("ok"), "{healthz}");

    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "LIFE".into(),
        subjects: vec!["life.>".into()],
        ..Default::default()
    })
    .await?;
    let ack = js.publish("life.a", "hello".into()).await?.await?;
    assert_eq!(ack.sequence, 1);
    drop(js);
    drop(client);

    let pid = server.pid().expect("running server has a pid");
    blocking(|| server.kill());
    assert_eq!(server.pid(), None);
    assert!(!server.is_running());
    assert!(!process_exists(pid), "killed process {pid} must be reaped");
    assert!(!port_open(port), "port {port} must be closed after kill");
    let refused = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(server.url())
        .await;
    assert!(refused.is_err(), "connecting to a killed server must fail");
    blocking(|| server.kill()); // killing twice is harmless

    blocking(|| server.restart())?;
    assert_eq!(server.port(), port);
    assert_eq!(server.store_dir(), store);
    let new_pid = server.pid().expect("restarted server has a pid");
    assert_ne!(new_pid, pid);
    let log = std::fs::read_to_string(server.log_path())?;
    assert_eq!(
        log.matches("Server is ready").count(),
        2,
        "the log is appended to across restarts"
    );

    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream("LIFE").await?;
    assert_eq!(stream.info().await?.state.messages, 1);
    let msg = stream.get_raw_message(1).await?;
    assert_eq!(&msg.payload[..], b"hello");
    let ack = js.publish("life.b", "again".into()).await?.await?;
    assert_eq!(ack.sequence, 2);
    drop(js);
    drop(client);

    // Restarting a running server kills it first.
    blocking(|| server.restart())?;
    assert_ne!(server.pid(), Some(new_pid));
    assert!(!process_exists(new_pid));
    let last_pid = server.pid().unwrap();

    drop(server);
    assert!(!process_exists(last_pid), "drop must kill and reap");
    assert!(!temp_dir.exists(), "drop must remove the temp dir");
    assert!(!port_open(port));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_extra_config_and_no_jetstream() -> anyhow::Result<()> {
    let server = blocking(|| {
        NatsServer::builder()
            .jetstream(false)
            .extra_config("max_payload: 2048")
            .extra_config("max_connections: 50")
            .server_name("plain")
            .start()
    })?;
    let config = std::fs::read_to_string(server.config_path())?;
    assert!(!config.contains("jetstream"), "{config}");
    assert!(config.contains("max_connections: 50"), "{config}");
    assert_eq!(server.server_name(), Some("plain"));

    let client = async_nats::connect(server.url()).await?;
    assert_eq!(client.server_info().max_payload, 2048);
    assert_eq!(client.server_info().server_name, "plain");
    let jsz = server.monitor_get("/varz")?;
    assert!(jsz.contains("\"max_connections\": 50"), "{jsz}");
    Ok(())
}

#[test]
fn bad_config_reports_output() {
    let err = NatsServer::builder()
        .extra_config("this is { not valid")
        .start()
        .expect_err("a broken config must not start");
    let text = err.to_string();
    eprintln!("{text}");
    assert!(matches!(err, Error::Exited { .. }), "{text}");
    assert!(text.contains("output tail"), "{text}");
    assert!(text.contains("nats-server.conf"), "{text}");
}

#[test]
fn restart_on_a_taken_port_fails_then_recovers() {
    let mut server = NatsServer::builder()
        .startup_timeout(Duration::from_secs(3))
        .start()
        .unwrap();
    let port = server.port();
    server.kill();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let err = server.restart().expect_err("the port is taken");
    eprintln!("{err}");
    assert!(
        matches!(err, Error::PortInUse { .. }),
        "unexpected error: {err}"
    );
    assert!(err.to_string().contains("address already in use"), "{err}");
    assert_eq!(server.pid(), None);
    drop(squatter);
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    assert!(port_open(port));
}

#[test]
fn servers_run_side_by_side() {
    let a = NatsServer::start().unwrap();
    let b = NatsServer::start().unwrap();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.store_dir(), b.store_dir());
    assert!(port_open(a.port()) && port_open(b.port()));
}
