//! [`NatsServer`]: one `nats-server` process in a temp dir.

use std::fs::{self, File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::binary::{nats_server_binary, version_of};
use crate::config::{ClusterConfig, ServerConfig};
use crate::{monitor, output, port, Error, ServerBuilder};

/// How often readiness conditions are polled.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How many times start-up picks new ports after "address already in use".
pub(crate) const PORT_ATTEMPTS: u32 = 3;

/// The log line nats-server writes once it accepts clients (2.9 and later).
const READY_LINE: &str = "Server is ready";

/// Pause before [`NatsServer::restart`] tries a taken port again.
const RESTART_BACKOFF: Duration = Duration::from_millis(200);

/// Time a restart attempt needs at least to report its outcome.
const RESTART_MIN_ATTEMPT: Duration = Duration::from_secs(1);

const TCP_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// A running `nats-server` process with its own temp dir, config file,
/// JetStream store and log file, listening on free loopback ports.
///
/// Dropping it kills the process (SIGKILL), reaps it and deletes the temp dir,
/// also while a test panics.
///
/// ```no_run
/// # fn main() -> Result<(), jetsync_testkit::Error> {
/// let mut server = jetsync_testkit::NatsServer::start()?;
/// println!("connect to {}", server.url());
/// server.kill();
/// server.restart()?; // same port, same store
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    binary: PathBuf,
    version: String,
    config: ServerConfig,
    config_path: PathBuf,
    console_path: PathBuf,
    startup_timeout: Duration,
    // Last, so the directory outlives everything that points into it.
    dir: TempDir,
}

/// Where one spawn's output starts, and how far its readiness check got.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Readiness {
    log_offset: u64,
    console_offset: u64,
    saw_ready_line: bool,
}

impl NatsServer {
    /// Starts a standalone server with JetStream enabled and default options,
    /// and waits until it is ready.
    ///
    /// Ready means: the log says "Server is ready", the client port accepts
    /// TCP connections and the monitoring endpoint `/healthz` reports ok.
    ///
    /// # Errors
    ///
    /// [`Error::BinaryNotFound`] when there is no nats-server,
    /// [`Error::Exited`] when it stops during start-up (e.g. a bad
    /// [`extra_config`](ServerBuilder::extra_config)), [`Error::PortInUse`]
    /// when three port selections all raced with another process,
    /// [`Error::NotReady`] after the deadline (20 s by default).
    pub fn start() -> Result<Self, Error> {
        Self::builder().start()
    }

    /// Options for starting a server.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    pub(crate) fn start_with(opts: &ServerBuilder) -> Result<Self, Error> {
        let binary = resolve_binary(opts)?;
        let version = version_of(&binary)?;
        let mut attempt = 1;
        loop {
            let ports = port::free_ports(2)?;
            let mut server = Self::prepare(opts, &binary, &version, ports[0], ports[1], None)?;
            let readiness = server.spawn()?;
            match server.wait_ready(readiness, Instant::now() + opts.startup_timeout) {
                Ok(()) => return Ok(server),
                Err(Error::PortInUse { output_tail, .. }) => {
                    if attempt == PORT_ATTEMPTS {
                        return Err(Error::PortInUse {
                            attempts: attempt,
                            output_tail,
                        });
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates the temp dir and config file; does not start the process.
    pub(crate) fn prepare(
        opts: &ServerBuilder,
        binary: &Path,
        version: &str,
        port: u16,
        monitor_port: u16,
        cluster: Option<ClusterConfig>,
    ) -> Result<Self, Error> {
        let dir = tempfile::Builder::new()
            .prefix("jetsync-nats-")
            .tempdir()
            .map_err(|e| Error::io("creating a temp dir for nats-server", e))?;
        let config = ServerConfig {
            port,
            monitor_port,
            server_name: opts.server_name.clone(),
            jetstream: opts.jetstream,
            store_dir: dir.path().join("store"),
            log_file: dir.path().join("nats-server.log"),
            cluster,
            extra: opts.extra.clone(),
        };
        let config_path = dir.path().join("nats-server.conf");
        fs::write(&config_path, config.render()).map_err(|e| {
            Error::io(
                format!("writing the config file {}", config_path.display()),
                e,
            )
        })?;
        Ok(NatsServer {
            child: None,
            binary: binary.to_path_buf(),
            version: version.to_string(),
            config,
            config_path,
            console_path: dir.path().join("console.log"),
            startup_timeout: opts.startup_timeout,
            dir,
        })
    }

    /// Starts the process (which must not be running) without waiting.
    pub(crate) fn spawn(&mut self) -> Result<Readiness, Error> {
        debug_assert!(self.child.is_none());
        let readiness = Readiness {
            log_offset: output::file_len(&self.config.log_file),
            console_offset: output::file_len(&self.console_path),
            saw_ready_line: false,
        };
        let console = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.console_path)
            .map_err(|e| Error::io(format!("opening {}", self.console_path.display()), e))?;
        let console_err = console
            .try_clone()
            .map_err(|e| Error::io("duplicating the console file handle", e))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .spawn()
            .map_err(|e| Error::io(format!("spawning {}", self.binary.display()), e))?;
        self.child = Some(child);
        Ok(readiness)
    }

    /// Polls until ready or `deadline`. On timeout the process is killed.
    pub(crate) fn wait_ready(
        &mut self,
        mut readiness: Readiness,
        deadline: Instant,
    ) -> Result<(), Error> {
        loop {
            let waiting_for = match self.poll_ready(&mut readiness)? {
                None => return Ok(()),
                Some(what) => what,
            };
            if Instant::now() >= deadline {
                return Err(self.not_ready(&readiness, waiting_for));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Kills the process and builds the [`Error::NotReady`] for it.
    pub(crate) fn not_ready(&mut self, readiness: &Readiness, waiting_for: &str) -> Error {
        self.kill();
        Error::NotReady {
            timeout: self.startup_timeout,
            waiting_for: format!("{waiting_for} on {}", self.url()),
            output_tail: self.output_tail(readiness),
        }
    }

    /// One readiness check: `Ok(None)` when ready, `Ok(Some(what))` while
    /// waiting for `what`, an error when the process has exited.
    pub(crate) fn poll_ready(
        &mut self,
        readiness: &mut Readiness,
    ) -> Result<Option<&'static str>, Error> {
        if let Some(status) = self.reap() {
            let output_tail = self.output_tail(readiness);
            return Err(if output_tail.contains("address already in use") {
                Error::PortInUse {
                    attempts: 1,
                    output_tail,
                }
            } else {
                Error::Exited {
                    status,
                    config: self.config_path.clone(),
                    output_tail,
                }
            });
        }
        if !readiness.saw_ready_line {
            let log = output::read_from(&self.config.log_file, readiness.log_offset);
            if !log.contains(READY_LINE) {
                return Ok(Some("\"Server is ready\" in the log file"));
            }
            readiness.saw_ready_line = true;
        }
        let client = SocketAddr::from((Ipv4Addr::LOCALHOST, self.config.port));
        if TcpStream::connect_timeout(&client, TCP_PROBE_TIMEOUT).is_err() {
            return Ok(Some("the client port to accept connections"));
        }
        if self.config.cluster.is_some() && self.config.jetstream {
            // A cluster node counts as ready once its JetStream server is up
            // and it knows the meta leader. Its stream and consumer replicas
            // catch up afterwards; a full `/healthz` would also wait for every
            // consumer replica, which on 2.9 can stay "not current" for
            // minutes after a kill (seen in CI). Tests that need a stream's
            // replicas current wait for that explicitly
            // (`Cluster::wait_stream_current`).
            if !monitor::server_healthy(self.config.monitor_port) {
                return Ok(Some(
                    "/healthz?js-server-only=true on the monitoring port to report ok",
                ));
            }
            if monitor::meta_leader(self.config.monitor_port).is_none() {
                return Ok(Some("a JetStream meta leader (/jsz meta_cluster.leader)"));
            }
        } else if !monitor::healthy(self.config.monitor_port) {
            return Ok(Some("/healthz on the monitoring port to report ok"));
        }
        Ok(None)
    }

    /// If the process has exited, reaps it and returns its exit status.
    fn reap(&mut self) -> Option<String> {
        let child = match self.child.as_mut() {
            None => return Some("not running".to_string()),
            Some(child) => child,
        };
        match child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => {
                self.child = None;
                Some(status.to_string())
            }
            Err(e) => {
                // Should not happen; treat as gone so we never hang on it.
                self.kill();
                Some(format!("could not query the process: {e}"))
            }
        }
    }

    fn output_tail(&self, readiness: &Readiness) -> String {
        output::tails(
            (&self.config.log_file, readiness.log_offset),
            (&self.console_path, readiness.console_offset),
        )
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.config.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.config.port
    }

    /// The HTTP monitoring URL, `http://127.0.0.1:PORT` (append `/varz`,
    /// `/jsz`, `/healthz`, ...).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.config.monitor_port)
    }

    /// The HTTP monitoring port.
    pub fn monitor_port(&self) -> u16 {
        self.config.monitor_port
    }

    /// `GET`s `path` (e.g. `"/jsz?streams=true"`) from the monitoring port
    /// and returns the response body, whatever the HTTP status (`/healthz`
    /// answers 503 with an explanation while unhealthy).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the request fails (e.g. the server is not running).
    pub fn monitor_get(&self, path: &str) -> Result<String, Error> {
        monitor::get(self.config.monitor_port, path)
            .map(|resp| resp.body)
            .map_err(|e| Error::io(format!("GET {}{path}", self.monitor_url()), e))
    }

    /// The configured JetStream `store_dir` (nats-server keeps its data in a
    /// `jetstream` subdirectory of it). Kept across [`restart`](Self::restart).
    pub fn store_dir(&self) -> &Path {
        &self.config.store_dir
    }

    /// The server's version, e.g. `"2.9.10"`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The server's log file. Restarts append to it.
    pub fn log_path(&self) -> &Path {
        &self.config.log_file
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The configured `server_name`, if any (cluster nodes are `n1`, `n2`, ...).
    pub fn server_name(&self) -> Option<&str> {
        self.config.server_name.as_deref()
    }

    /// The process id, or `None` after [`kill`](Self::kill) (or once
    /// [`is_running`](Self::is_running) has seen the process exit).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGKILL and waits until the process is reaped. Does nothing if
    /// it is not running. The temp dir, store and ports are kept for
    /// [`restart`](Self::restart).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` is SIGKILL on Unix; it fails only if the process
            // was already reaped, and `wait` then returns at once.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        self.reap().is_none()
    }

    /// Starts the server again with the same ports, config and store dir,
    /// killing it first if it is running, and waits until it is ready (for a
    /// cluster node: until its JetStream server is up and it knows the meta
    /// leader; its replicas may still be catching up).
    ///
    /// Only log output written by the new process counts for readiness.
    /// While the port is briefly taken by another socket, start-up is
    /// retried until the deadline.
    ///
    /// # Errors
    ///
    /// [`Error::Exited`], [`Error::PortInUse`] or [`Error::NotReady`]; the
    /// process is not running afterwards and `restart` may be called again.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        let deadline = Instant::now() + self.startup_timeout;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let readiness = self.spawn()?;
            match self.wait_ready(readiness, deadline) {
                Err(Error::PortInUse { output_tail, .. }) => {
                    // Leave the next attempt time to report its outcome.
                    if Instant::now() + RESTART_BACKOFF + RESTART_MIN_ATTEMPT >= deadline {
                        return Err(Error::PortInUse {
                            attempts,
                            output_tail,
                        });
                    }
                    thread::sleep(RESTART_BACKOFF);
                }
                other => return other,
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        // `dir` (TempDir) is dropped after this and removes everything.
    }
}

/// The builder's binary, or the one found by [`nats_server_binary`].
pub(crate) fn resolve_binary(opts: &ServerBuilder) -> Result<PathBuf, Error> {
    match &opts.binary {
        None => nats_server_binary(),
        Some(path) => match File::open(path) {
            Ok(_) => std::path::absolute(path)
                .map_err(|e| Error::io(format!("resolving {}", path.display()), e)),
            Err(e) => Err(Error::BinaryNotFound {
                detail: format!(
                    "the configured binary {} cannot be opened: {e}",
                    path.display()
                ),
            }),
        },
    }
}
