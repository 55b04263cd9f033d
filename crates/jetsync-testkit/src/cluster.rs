//! [`Cluster`]: several JetStream-enabled `nats-server`s routed together on
//! loopback.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crate::binary::version_of;
use crate::config::ClusterConfig;
use crate::server::{resolve_binary, POLL_INTERVAL, PORT_ATTEMPTS};
use crate::{monitor, port, Error, NatsServer, ServerBuilder};

/// Default deadline for a whole cluster (or one restarted node) to become
/// ready.
const DEFAULT_CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// The cluster name nodes are configured with by default.
pub const DEFAULT_CLUSTER_NAME: &str = "jetsync";

/// A cluster of JetStream-enabled `nats-server` nodes on 127.0.0.1.
///
/// Node `i` (0-based) has `server_name` `n{i+1}`, its own client, route and
/// monitoring ports, its own temp dir and store, and routes to every other
/// node. Dropping the cluster kills every node and removes their temp dirs.
///
/// ```no_run
/// # fn main() -> Result<(), jetsync_testkit::Error> {
/// let mut cluster = jetsync_testkit::Cluster::start(3)?;
/// let urls = cluster.urls(); // pass to async_nats::connect
/// if let Some(leader) = cluster.stream_leader("ORDERS") {
///     cluster.kill(leader);
///     cluster.restart(leader)?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<NatsServer>,
}

/// Options for starting a [`Cluster`]; get one from [`Cluster::builder`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    size: usize,
    name: String,
    node: ServerBuilder,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            size: 3,
            name: DEFAULT_CLUSTER_NAME.to_string(),
            node: ServerBuilder::default().startup_timeout(DEFAULT_CLUSTER_TIMEOUT),
        }
    }
}

impl ClusterBuilder {
    /// Number of nodes (default 3).
    pub fn size(mut self, n: usize) -> Self {
        self.size = n;
        self
    }

    /// The cluster name (default `"jetsync"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Appends `text` to every node's config file (see
    /// [`ServerBuilder::extra_config`]).
    pub fn extra_config(mut self, text: impl Into<String>) -> Self {
        self.node = self.node.extra_config(text);
        self
    }

    /// How long [`start`](Self::start) waits for the whole cluster, and
    /// [`Cluster::restart`] for one node (default 30 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.node = self.node.startup_timeout(timeout);
        self
    }

    /// Uses this `nats-server` executable instead of the one
    /// [`nats_server_binary`](crate::nats_server_binary) finds.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.node = self.node.binary(path);
        self
    }

    /// Starts all nodes and waits until every one is ready and knows the
    /// JetStream meta leader.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a size of 0; otherwise as
    /// [`NatsServer::start`], for whichever node failed.
    pub fn start(self) -> Result<Cluster, Error> {
        if self.size == 0 {
            return Err(Error::InvalidArgument(
                "a cluster needs at least one node; use Cluster::start(3)".to_string(),
            ));
        }
        let binary = resolve_binary(&self.node)?;
        let version = version_of(&binary)?;
        let mut attempt = 1;
        loop {
            match self.try_start(&binary, &version) {
                Ok(cluster) => return Ok(cluster),
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

    fn try_start(&self, binary: &std::path::Path, version: &str) -> Result<Cluster, Error> {
        let n = self.size;
        // Per node: client, monitoring and route port.
        let ports = port::free_ports(3 * n)?;
        let route_port = |i: usize| ports[3 * i + 2];
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let opts = self.node.clone().server_name(format!("n{}", i + 1));
            let cluster = ClusterConfig {
                name: self.name.clone(),
                port: route_port(i),
                routes: (0..n).filter(|&j| j != i).map(route_port).collect(),
            };
            nodes.push(NatsServer::prepare(
                &opts,
                binary,
                version,
                ports[3 * i],
                ports[3 * i + 1],
                Some(cluster),
            )?);
        }
        // Start every node before waiting: they need each other for quorum.
        let mut states = Vec::with_capacity(n);
        for node in nodes.iter_mut() {
            states.push(node.spawn()?);
        }
        // Poll all nodes together so an early exit of any node is noticed
        // at once (on error, dropping `nodes` kills the others).
        let mut ready = vec![false; n];
        let deadline = Instant::now() + self.node.startup_timeout;
        loop {
            let mut waiting = None;
            for i in 0..n {
                if ready[i] {
                    continue;
                }
                match nodes[i].poll_ready(&mut states[i])? {
                    None => ready[i] = true,
                    Some(what) => {
                        waiting.get_or_insert((i, what));
                    }
                }
            }
            let (i, what) = match waiting {
                Some(waiting) => waiting,
                // Every node knows the meta leader; also wait until the
                // leader sees every peer as current, so that streams with
                // n replicas can be placed right away.
                None => match self_claimed(&nodes, monitor::meta_leader) {
                    Some(leader)
                        if monitor::meta_group_complete(nodes[leader].monitor_port(), n) =>
                    {
                        return Ok(Cluster { nodes });
                    }
                    Some(leader) => (leader, "the meta leader to see every peer as current"),
                    None => (0, "a node that claims JetStream meta leadership"),
                },
            };
            if Instant::now() >= deadline {
                return Err(nodes[i].not_ready(&states[i], what));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Cluster {
    /// Starts an `n`-node cluster (3 is typical) with default options and
    /// waits until every node is ready and a JetStream meta leader is
    /// elected (deadline 30 s).
    ///
    /// # Errors
    ///
    /// See [`ClusterBuilder::start`].
    pub fn start(n: usize) -> Result<Self, Error> {
        Self::builder().size(n).start()
    }

    /// Options for starting a cluster.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// All nodes, in order (`n1`, `n2`, ...).
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// Node `i` (0-based; its server name is `n{i+1}`).
    ///
    /// # Panics
    ///
    /// If `i >= self.len()`.
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// Node `i`, mutably (e.g. to [`NatsServer::kill`] it).
    ///
    /// # Panics
    ///
    /// If `i >= self.len()`.
    pub fn node_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Kills node `i` with SIGKILL and reaps it; its ports and store are
    /// kept for [`restart`](Self::restart).
    ///
    /// # Panics
    ///
    /// If `i >= self.len()`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Restarts node `i` on the same ports with the same store (killing it
    /// first if running) and waits until it is ready and knows the meta
    /// leader, i.e. has rejoined. Its stream and consumer replicas may still
    /// be catching up after this returns; use
    /// [`wait_stream_current`](Self::wait_stream_current) when a test needs
    /// a stream fully replicated again.
    ///
    /// # Errors
    ///
    /// See [`NatsServer::restart`].
    ///
    /// # Panics
    ///
    /// If `i >= self.len()`.
    pub fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.nodes[i].restart()
    }

    /// The client URLs of all nodes (also of killed ones), e.g. to pass to
    /// `async_nats::connect` (which takes a `Vec<String>`, not a
    /// comma-separated string).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The client URLs joined by `,` (for tools and configs that take a
    /// comma-separated server list).
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// The index of the node that currently leads `stream`, asked over the
    /// monitoring port (`/jsz?streams=true`). Only a running node's claim
    /// that it leads the stream itself counts, so a killed leader is never
    /// reported. `None` when no node leads it (unknown stream, election in
    /// progress).
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        self_claimed(&self.nodes, |port| monitor::stream_leader(port, stream))
    }

    /// Polls [`stream_leader`](Self::stream_leader) every 20 ms until it
    /// returns a node or `timeout` passes.
    pub fn wait_stream_leader(&self, stream: &str, timeout: Duration) -> Option<usize> {
        poll_until(timeout, || self.stream_leader(stream))
    }

    /// Polls node `i`'s full `/healthz` (every stream and consumer replica on it current) every
    /// 20 ms until it reports ok or `timeout` passes. Returns whether it did.
    ///
    /// # Panics
    ///
    /// If `i >= self.len()`.
    pub fn wait_node_healthy(&self, i: usize, timeout: Duration) -> bool {
        let port = self.nodes[i].monitor_port();
        poll_until(timeout, || monitor::healthy(port).then_some(())).is_some()
    }

    /// Polls every 20 ms until a running node leads `stream` and sees all
    /// its replicas (`replicas` in total, the leader included) as current,
    /// or `timeout` passes. Returns whether that happened.
    pub fn wait_stream_current(&self, stream: &str, replicas: usize, timeout: Duration) -> bool {
        poll_until(timeout, || {
            self.nodes
                .iter()
                .any(|node| {
                    node.pid().is_some()
                        && monitor::stream_replicas_current(node.monitor_port(), stream, replicas)
                })
                .then_some(())
        })
        .is_some()
    }

    /// The index of the node that is the JetStream meta leader (from
    /// `/jsz`), if a running node claims it.
    pub fn meta_leader(&self) -> Option<usize> {
        self_claimed(&self.nodes, monitor::meta_leader)
    }
}

/// Calls `check` every [`POLL_INTERVAL`] until it returns `Some` or `timeout` passes.
fn poll_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// The first running node whose monitor endpoint names itself.
fn self_claimed(
    nodes: &[NatsServer],
    leader_seen_by: impl Fn(u16) -> Option<String>,
) -> Option<usize> {
    nodes.iter().position(|node| {
        node.pid().is_some()
            && node.server_name().is_some()
            && leader_seen_by(node.monitor_port()).as_deref() == node.server_name()
    })
}
