//! The files in `nats-config/` work as shipped:
//!
//! - every stream and consumer JSON definition deserializes into async-nats' config types with
//!   no field lost (a typo or a field async-nats does not know fails), creates on a real server
//!   both through async-nats and as raw JetStream API JSON (what `nats stream add --config` and
//!   `nats consumer add --config` send), and defines exactly what jetsync provisions and what
//!   the applier expects of its durable;
//! - nats-server starts with every `.conf` file (all three cluster nodes together, forming a
//!   JetStream cluster), with the ports rewritten to free ones and the relative store dirs
//!   inside a temp dir; the least-privilege users of `accounts.conf` can do their jobs.

use std::collections::BTreeSet;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    stream,
};
use futures::StreamExt;
use jetsync::{ConnectError, NatsConfig, Provisioned, Secret, StreamConfig};
use jetsync_testkit::{free_ports, nats_server_binary, Cluster, NatsServer};

/// Deadline for a server (or a cluster) started from a shipped config to become usable.
const READY: Duration = Duration::from_secs(30);

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats-config")
}

/// Files under `nats-config/<sub>` (recursively) whose name ends with `.<ext>`, relative to
/// `nats-config/`, sorted.
fn files(sub: &str, ext: &str) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, ext: &str, out: &mut Vec<String>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, ext, out)?;
            } else if path.extension().is_some_and(|e| e == ext) {
                let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
                out.push(rel);
            }
        }
        Ok(())
    }
    let root = config_dir();
    let mut out = Vec::new();
    walk(&root, &root.join(sub), ext, &mut out)?;
    out.sort();
    Ok(out)
}

fn read(rel: &str) -> Result<String> {
    let path = config_dir().join(rel);
    fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// JSON definitions
// ---------------------------------------------------------------------------------------------

/// Parses `rel` into `T` and checks that serializing `T` again keeps every field of the file
/// with the same value: a misspelt or unsupported field (which the server, and serde, would
/// silently ignore) fails here.
fn parse_exact<T>(rel: &str) -> Result<(T, serde_json::Value)>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let raw: serde_json::Value =
        serde_json::from_str(&read(rel)?).with_context(|| format!("{rel} is not JSON"))?;
    let typed: T = serde_json::from_value(raw.clone())
        .with_context(|| format!("{rel} does not deserialize into the async-nats config"))?;
    let again = serde_json::to_value(&typed)?;
    let fields = raw
        .as_object()
        .with_context(|| format!("{rel} is not an object"))?;
    for (key, value) in fields {
        match again.get(key) {
            Some(kept) if kept == value => {}
            Some(kept) => bail!("{rel}: field {key} = {value} came back as {kept}"),
            None => bail!("{rel}: field {key} is unknown to async-nats (built for server 2.9)"),
        }
    }
    Ok((typed, raw))
}

/// A consumer definition (the server's JSON) as async-nats' `pull::Config`, checked like
/// [`parse_exact`]. `pull::Config` names the server's `mem_storage` field `memory_storage` in
/// its own serde form (it is renamed on the wire), so that one field is mapped both ways.
fn parse_consumer(rel: &str) -> Result<(pull::Config, serde_json::Value)> {
    let raw: serde_json::Value =
        serde_json::from_str(&read(rel)?).with_context(|| format!("{rel} is not JSON"))?;
    let mut renamed = raw.clone();
    if let Some(fields) = renamed.as_object_mut() {
        if let Some(v) = fields.remove("mem_storage") {
            fields.insert("memory_storage".into(), v);
        }
    }
    let typed: pull::Config = serde_json::from_value(renamed.clone())
        .with_context(|| format!("{rel} does not deserialize into the async-nats config"))?;
    let again = serde_json::to_value(&typed)?;
    for (key, value) in renamed.as_object().context("not an object")? {
        match again.get(key) {
            Some(kept) if kept == value => {}
            Some(kept) => bail!("{rel}: field {key} = {value} came back as {kept}"),
            None => bail!("{rel}: field {key} is unknown to async-nats (built for server 2.9)"),
        }
    }
    Ok((typed, raw))
}

/// A jetsync stream configuration equivalent to a stream definition: `provision()` with it must
/// find the stream unchanged.
fn jetsync_stream(config: &stream::Config) -> Result<StreamConfig> {
    ensure!(
        config.subjects.len() == 1,
        "{}: a sync group has one subject",
        config.name
    );
    let prefix = config.subjects[0]
        .strip_suffix(".>")
        .with_context(|| format!("{}: subject must be <prefix>.>", config.name))?;
    Ok(StreamConfig {
        name: config.name.clone(),
        subject_prefix: prefix.to_owned(),
        history: config.max_messages_per_subject,
        replicas: config.num_replicas,
        ..StreamConfig::default()
    })
}

/// Checks a consumer definition against what the applier creates and reuses (DESIGN 5):
/// durable `jetsync_<instance>`, one filter `<prefix>.>`, AckPolicy All, unlimited deliveries,
/// `ack_wait` = `apply.ack_wait_ms` (30 s), `max_ack_pending` ≥ 4 × `apply.batch_max` + 2000 (room for two catch-up batches and a transaction), no
/// inactive threshold (2.9 deletes idle durables with one), pull (no deliver subject), one
/// replica and memory storage.
fn check_applier_consumer(rel: &str, config: &pull::Config, stream: &stream::Config) -> Result<()> {
    let durable = config.durable_name.as_deref().context("not durable")?;
    ensure!(durable.starts_with("jetsync_"), "{rel}: durable {durable}");
    ensure!(
        Path::new(rel).file_stem().and_then(|s| s.to_str()) == Some(durable),
        "{rel}: the file is named after the durable"
    );
    ensure!(
        stream.subjects.contains(&config.filter_subject),
        "{rel}: filter {} is not the stream's subject",
        config.filter_subject
    );
    ensure!(config.ack_policy == AckPolicy::All, "{rel}: ack policy");
    ensure!(config.max_deliver == -1, "{rel}: max_deliver");
    let defaults = jetsync::ApplyConfig::default();
    ensure!(
        config.ack_wait == Duration::from_millis(defaults.ack_wait_ms),
        "{rel}: ack_wait"
    );
    ensure!(
        config.max_ack_pending >= 4 * defaults.batch_max as i64 + 2000,
        "{rel}: max_ack_pending"
    );
    ensure!(
        config.inactive_threshold.is_zero(),
        "{rel}: inactive_threshold"
    );
    ensure!(
        config.deliver_policy == DeliverPolicy::All,
        "{rel}: deliver policy"
    );
    // apply.consumer_replicas = 1 and apply.consumer_storage = "memory" (the defaults): the
    // consumer needs no durable server-side state, on R1 and R3 streams alike.
    ensure!(
        config.num_replicas == defaults.consumer_replicas,
        "{rel}: num_replicas"
    );
    ensure!(config.memory_storage, "{rel}: mem_storage");
    Ok(())
}

struct Definitions {
    streams: Vec<(String, stream::Config, serde_json::Value)>,
    consumers: Vec<(String, pull::Config, serde_json::Value)>,
}

fn definitions() -> Result<Definitions> {
    let mut streams = Vec::new();
    for rel in files("streams", "json")? {
        let (config, raw) = parse_exact::<stream::Config>(&rel)?;
        streams.push((rel, config, raw));
    }
    let mut consumers = Vec::new();
    for rel in files("consumers", "json")? {
        let (config, raw) = parse_consumer(&rel)?;
        consumers.push((rel, config, raw));
    }
    ensure!(
        !streams.is_empty() && !consumers.is_empty(),
        "no JSON definitions found"
    );
    for (rel, consumer, _) in &consumers {
        let stream = streams
            .iter()
            .find(|(_, s, _)| s.subjects.contains(&consumer.filter_subject))
            .with_context(|| format!("{rel}: no stream definition carries its filter subject"))?;
        check_applier_consumer(rel, consumer, &stream.1)?;
    }
    Ok(Definitions { streams, consumers })
}

/// The stream definitions equal what jetsync provisions, field by field.
#[test]
fn stream_definitions_are_what_jetsync_provisions() -> Result<()> {
    let defs = definitions()?;
    for (rel, config, _) in &defs.streams {
        let mut want = jetsync::stream_definition(&jetsync_stream(config)?);
        // Unlimited is -1 in the files (as `nats stream info --json` shows it); jetsync leaves
        // them at 0, which the server turns into -1.
        want.max_consumers = -1;
        want.max_message_size = -1;
        assert_eq!(config, &want, "{rel}");
    }
    Ok(())
}

/// Creates the stream definitions and their consumers with async-nats on `js`, checks
/// `provision()` finds each stream unchanged, and returns the server's view of each (stream and
/// consumer configurations as raw JSON).
async fn create_typed(
    js: &jetstream::Context,
    nats: &async_nats::Client,
    defs: &Definitions,
    replicas: usize,
) -> Result<Vec<(String, serde_json::Value)>> {
    let mut created = Vec::new();
    for (rel, config, _) in defs
        .streams
        .iter()
        .filter(|(_, c, _)| c.num_replicas == replicas)
    {
        create_stream_when_placeable(js, config)
            .await
            .with_context(|| format!("creating {rel}"))?;
        let client = jetsync::Client::from_nats(nats.clone(), jetsync_stream(config)?, "test")?;
        assert_eq!(client.provision().await?, Provisioned::Unchanged, "{rel}");
        created.push((
            rel.clone(),
            api(nats, &format!("STREAM.INFO.{}", config.name), "").await?,
        ));
        for (crel, consumer, _) in &defs.consumers {
            if !config.subjects.contains(&consumer.filter_subject) {
                continue;
            }
            let stream = js.get_stream(&config.name).await?;
            stream
                .create_consumer(consumer.clone())
                .await
                .with_context(|| format!("creating {crel} on {rel}"))?;
            let name = consumer.durable_name.as_deref().unwrap_or_default();
            let info = api(nats, &format!("CONSUMER.INFO.{}.{name}", config.name), "").await?;
            created.push((format!("{crel} on {rel}"), info));
        }
    }
    ensure!(
        !created.is_empty(),
        "no stream definition with {replicas} replicas"
    );
    Ok(created)
}

/// JetStream API error code: "insufficient resources" / "no suitable peers for placement".
const NO_SUITABLE_PEERS: u64 = 10005;

/// Creates `config`'s stream, retrying for up to [`READY`] while the cluster reports no
/// suitable peers for its replicas: under load (seen on 2.12.8) the meta leader may count a
/// peer as current before its placement info is fresh, and refuse an R3 stream for a moment.
async fn create_stream_when_placeable(
    js: &jetstream::Context,
    config: &stream::Config,
) -> Result<()> {
    let deadline = Instant::now() + READY;
    loop {
        match js.create_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                let placeable_later = matches!(
                    e.kind(),
                    jetstream::context::CreateStreamErrorKind::JetStream(ref j)
                        if j.error_code().0 == NO_SUITABLE_PEERS
                );
                if !placeable_later || Instant::now() >= deadline {
                    return Err(e.into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A raw JetStream API request (`$JS.API.<what>`); fails on an error response.
async fn api(nats: &async_nats::Client, what: &str, body: &str) -> Result<serde_json::Value> {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        nats.request(format!("$JS.API.{what}"), body.to_owned().into()),
    )
    .await
    .with_context(|| format!("$JS.API.{what} timed out"))??;
    let value: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    if let Some(error) = value.get("error") {
        bail!("$JS.API.{what}: {error}");
    }
    Ok(value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_definitions_create_on_a_server() -> Result<()> {
    let defs = definitions()?;

    // Through async-nats, on one server.
    let typed_server = NatsServer::start()?;
    let nats = async_nats::connect(typed_server.url()).await?;
    let typed = create_typed(&jetstream::new(nats.clone()), &nats, &defs, 1).await?;

    // As the nats CLI sends them: the file's JSON as the request body, on another server.
    let raw_server = NatsServer::start()?;
    let raw_nats = async_nats::connect(raw_server.url()).await?;
    let mut raw = Vec::new();
    for (rel, config, _) in defs.streams.iter().filter(|(_, c, _)| c.num_replicas == 1) {
        api(
            &raw_nats,
            &format!("STREAM.CREATE.{}", config.name),
            &read(rel)?,
        )
        .await
        .with_context(|| format!("creating {rel} from its JSON"))?;
        raw.push((
            rel.clone(),
            api(&raw_nats, &format!("STREAM.INFO.{}", config.name), "").await?,
        ));
        for (crel, consumer, file) in &defs.consumers {
            if !config.subjects.contains(&consumer.filter_subject) {
                continue;
            }
            let name = consumer.durable_name.as_deref().unwrap_or_default();
            let body = serde_json::json!({ "stream_name": config.name, "config": file });
            // The durable-create subject: what older clients use, and exists on 2.9 to 2.12.
            api(
                &raw_nats,
                &format!("CONSUMER.DURABLE.CREATE.{}.{name}", config.name),
                &body.to_string(),
            )
            .await
            .with_context(|| format!("creating {crel} from its JSON"))?;
            let info = api(
                &raw_nats,
                &format!("CONSUMER.INFO.{}.{name}", config.name),
                "",
            )
            .await?;
            raw.push((format!("{crel} on {rel}"), info));
        }
    }
    // Both ways give the same configuration on the server.
    assert_eq!(typed.len(), raw.len());
    for ((what, typed), (_, raw)) in typed.iter().zip(&raw) {
        assert_eq!(typed["config"], raw["config"], "{what}");
    }

    // The replicated definitions on a 3-node cluster.
    let cluster = Cluster::start(3)?;
    // Every node must also report itself healthy before an R3 stream can be placed on it.
    for i in 0..cluster.len() {
        ensure!(
            cluster.wait_node_healthy(i, READY),
            "cluster node {i} not healthy within {READY:?}"
        );
    }
    let nats = async_nats::connect(cluster.urls()).await?;
    let js = jetstream::new(nats.clone());
    let replicated = create_typed(&js, &nats, &defs, 3).await?;
    for (what, info) in &replicated {
        if what.starts_with("streams/") {
            assert_eq!(info["config"]["num_replicas"], 3, "{what}");
            assert_eq!(
                info["cluster"]["replicas"].as_array().map(Vec::len),
                Some(2),
                "{what}"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// .conf files
// ---------------------------------------------------------------------------------------------

/// A nats-server started from a shipped config; killed and reaped when dropped.
struct Server {
    child: Child,
    output: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Spawns nats-server with `args` in `cwd` (where the configs' relative store dirs land).
    fn spawn(cwd: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Server> {
        let output = cwd.join(format!("{name}.out"));
        let out = fs::File::create(&output)?;
        let mut cmd = Command::new(nats_server_binary()?);
        cmd.args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("spawning nats-server")?;
        Ok(Server { child, output })
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Waits until the server says it is ready and its client port accepts connections.
    fn wait_ready(&mut self, port: u16, deadline: Instant) -> Result<()> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("nats-server exited ({status}):\n{}", self.output());
            }
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            if self.output().contains("Server is ready")
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("nats-server not ready on port {port}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Rewrites every `127.0.0.1:<port>` in `text` through `ports` (shipped port → free port),
/// failing on a port the map does not know, so a config change cannot silently bind a fixed
/// port in a test. Returns the text and the ports it found.
fn localize(text: &str, ports: &[(u16, u16)]) -> Result<(String, BTreeSet<u16>)> {
    const HOST: &str = "127.0.0.1:";
    let mut out = String::with_capacity(text.len());
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(HOST) {
        let after = &rest[at + HOST.len()..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let port: u16 = after[..digits]
            .parse()
            .with_context(|| format!("no port after {HOST}"))?;
        let (_, to) = ports
            .iter()
            .find(|(from, _)| *from == port)
            .with_context(|| format!("port {port} is not one of the expected {ports:?}"))?;
        found.insert(port);
        out.push_str(&rest[..at + HOST.len()]);
        out.push_str(&to.to_string());
        rest = &after[digits..];
    }
    out.push_str(rest);
    Ok((out, found))
}

/// Copies `rel` into `dir` with its ports rewritten; asserts it uses exactly `expect_ports`
/// and keeps its JetStream store under the working directory's `./data/`.
fn prepare(dir: &Path, rel: &str, ports: &[(u16, u16)], expect_ports: &[u16]) -> Result<PathBuf> {
    let text = read(rel)?;
    for line in text
        .lines()
        .filter(|l| l.trim_start().starts_with("store_dir"))
    {
        ensure!(
            line.contains("\"./data/"),
            "{rel}: the store dir must be relative, under ./data/: {line}"
        );
    }
    let (text, found) = localize(&text, ports)?;
    let want: BTreeSet<u16> = expect_ports.iter().copied().collect();
    ensure!(found == want, "{rel}: ports {found:?}, expected {want:?}");
    let path = dir.join(Path::new(rel).file_name().context("file name")?);
    fs::write(&path, text)?;
    Ok(path)
}

fn url(port: u16) -> String {
    format!("nats://127.0.0.1:{port}")
}

/// Every `.conf` file is covered by one of the tests below.
#[test]
fn every_conf_file_is_tested() -> Result<()> {
    let found = files(".", "conf")?;
    let found: Vec<String> = found
        .iter()
        .map(|f| f.trim_start_matches("./").to_owned())
        .collect();
    let tested = [
        "accounts.conf",
        "cluster/n1.conf",
        "cluster/n2.conf",
        "cluster/n3.conf",
        "secure.conf",
        "single.conf",
    ];
    assert_eq!(found, tested, "a new .conf file needs a start-up test here");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_conf_starts_with_jetstream() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let free = free_ports(2)?;
    let conf = prepare(
        dir.path(),
        "single.conf",
        &[(4222, free[0]), (8222, free[1])],
        &[4222, 8222],
    )?;
    let mut server = Server::spawn(dir.path(), "single", &["-c", conf.to_str().unwrap()], &[])?;
    server.wait_ready(free[0], Instant::now() + READY)?;

    let nats = async_nats::connect(url(free[0])).await?;
    let client = jetsync::Client::from_nats(nats, StreamConfig::default(), "test")?;
    assert_eq!(client.provision().await?, Provisioned::Created);
    let p = client
        .rows("items")?
        .upsert("k", &jetsync::Row::new())
        .await?;
    assert_eq!(p.seq, 1);
    assert!(
        dir.path().join("data/nats/jetstream").is_dir(),
        "store dir not under ./data/nats"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_confs_form_a_jetstream_cluster() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let shipped: Vec<u16> = (0..3)
        .flat_map(|i| [4222 + i, 6222 + i, 8222 + i])
        .collect();
    let free = free_ports(shipped.len())?;
    let ports: Vec<(u16, u16)> = shipped.iter().copied().zip(free.iter().copied()).collect();
    let client_port = |i: usize| free[3 * i];
    let mut nodes = Vec::new();
    for i in 0..3u16 {
        let rel = format!("cluster/n{}.conf", i + 1);
        // Its own client and monitoring port, the route ports of all nodes (its own listens,
        // the others are routes), and the cluster's client URLs in the comments.
        let expect = [4222, 4223, 4224, 8222 + i, 6222, 6223, 6224];
        let conf = prepare(dir.path(), &rel, &ports, &expect)?;
        nodes.push(Server::spawn(
            dir.path(),
            &format!("n{}", i + 1),
            &["-c", conf.to_str().unwrap()],
            &[],
        )?);
    }
    let deadline = Instant::now() + READY;
    for (i, node) in nodes.iter_mut().enumerate() {
        node.wait_ready(client_port(i), deadline)?;
    }

    // A replicated stream can be created once the nodes have elected a meta leader.
    let urls: Vec<String> = (0..3).map(|i| url(client_port(i))).collect();
    let nats = async_nats::connect(urls[0].as_str()).await?;
    let config = StreamConfig {
        replicas: 3,
        ..StreamConfig::default()
    };
    let client = jetsync::Client::from_nats(nats, config.clone(), "n1-client")?;
    let mut last_error = None;
    loop {
        match client.provision().await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("no replicated stream within {READY:?}: {e} (before: {last_error:?})"),
        }
    }
    let mut row = jetsync::Row::new();
    row.insert("id".into(), jetsync::Value::Text("k".into()));
    let p = client.rows("items")?.upsert("k", &row).await?;
    // Readable through another node.
    let other = async_nats::connect(urls[2].as_str()).await?;
    let reader = jetsync::Client::from_nats(other, config, "n3-client")?;
    let current = reader
        .rows("items")?
        .get("k")
        .await?
        .context("row readable on n3")?;
    assert_eq!(current.seq, p.seq);
    for i in 1..=3 {
        assert!(
            dir.path()
                .join(format!("data/nats-n{i}/jetstream"))
                .is_dir(),
            "node {i} keeps its store in ./data/nats-n{i}"
        );
    }
    Ok(())
}

const PASSWORDS: &[(&str, &str)] = &[
    ("JETSYNC_ADMIN_PASSWORD", "admin-secret-1"),
    ("CATALOG_PUB_PASSWORD", "pub-secret-2"),
    ("CATALOG_1_PASSWORD", "one-secret-3"),
    ("CATALOG_2_PASSWORD", "two-secret-4"),
];

fn password(var: &str) -> &'static str {
    PASSWORDS.iter().find(|(k, _)| *k == var).expect("known").1
}

fn user(port: u16, name: &str, var: &str, inbox: Option<&str>) -> NatsConfig {
    NatsConfig {
        url: url(port),
        user: Some(name.to_owned()),
        password: Some(Secret::new(password(var))),
        inbox_prefix: inbox.map(str::to_owned),
        request_timeout_ms: 3000,
        ..NatsConfig::default()
    }
}

/// The users of accounts.conf on a server started from secure.conf (which includes it): no
/// anonymous access, the admin provisions, the publisher publishes, the applier manages and
/// pulls from its own durable (created from the shipped JSON) and acknowledges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_conf_starts_with_the_accounts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let free = free_ports(2)?;
    let conf = prepare(
        dir.path(),
        "secure.conf",
        &[(4222, free[0]), (8222, free[1])],
        &[4222, 8222],
    )?;
    fs::write(dir.path().join("accounts.conf"), read("accounts.conf")?)?;
    let port = free[0];

    // Without the passwords in the environment it refuses to start.
    let mut unset = Server::spawn(dir.path(), "unset", &["-c", conf.to_str().unwrap()], &[])?;
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + READY;
        loop {
            if let Some(status) = unset.child.try_wait()? {
                return Ok::<_, anyhow::Error>((status, unset.output()));
            }
            if Instant::now() >= deadline {
                bail!("started without passwords:\n{}", unset.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await??;
    assert!(!status.0.success());
    assert!(status.1.contains("JETSYNC_ADMIN_PASSWORD"), "{}", status.1);

    let mut server = Server::spawn(
        dir.path(),
        "secure",
        &["-c", conf.to_str().unwrap()],
        PASSWORDS,
    )?;
    server.wait_ready(port, Instant::now() + READY)?;
    exercise_accounts(port).await?;
    assert!(dir.path().join("data/nats-secure/jetstream").is_dir());
    Ok(())
}

/// accounts.conf on its own is a valid config too (JetStream and the address from flags).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_conf_starts_on_its_own() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("accounts.conf");
    let text = read("accounts.conf")?;
    assert!(
        !text.contains("127.0.0.1:"),
        "accounts.conf is include-only: no listeners"
    );
    fs::write(&conf, text)?;
    let free = free_ports(2)?;
    let (port, http) = (free[0].to_string(), free[1].to_string());
    let store = dir.path().join("store");
    let args = [
        "-c",
        conf.to_str().unwrap(),
        "-a",
        "127.0.0.1",
        "-p",
        &port,
        "-m",
        &http,
        "-js",
        "-sd",
        store.to_str().unwrap(),
    ];
    let mut server = Server::spawn(dir.path(), "accounts", &args, PASSWORDS)?;
    server.wait_ready(free[0], Instant::now() + READY)?;
    exercise_accounts(free[0]).await
}

async fn exercise_accounts(port: u16) -> Result<()> {
    // No anonymous access.
    let err = jetsync::connect(
        &NatsConfig {
            url: url(port),
            ..NatsConfig::default()
        },
        "anonymous",
    )
    .await
    .expect_err("anonymous access must be refused");
    assert!(
        matches!(err, ConnectError::Authentication { .. }),
        "{err:?}"
    );

    // The admin provisions the stream the JSON file defines.
    let admin = jetsync::connect(
        &user(port, "admin", "JETSYNC_ADMIN_PASSWORD", None),
        "admin",
    )
    .await?;
    let (catalog, _) = parse_exact::<stream::Config>("streams/catalog.json")?;
    let admin_js = jetstream::new(admin.clone());
    admin_js.create_stream(catalog.clone()).await?;
    let admin_client =
        jetsync::Client::from_nats(admin.clone(), jetsync_stream(&catalog)?, "admin")?;
    assert_eq!(admin_client.provision().await?, Provisioned::Unchanged);
    // Account information (`$JS.API.INFO`, which the nats CLI asks for first).
    let account = api(&admin, "INFO", "").await?;
    assert!(account.get("limits").is_some(), "{account}");

    // The publisher publishes (the ack reaches its own inbox) and reads back.
    let publisher = jetsync::connect(
        &user(
            port,
            "catalog-pub",
            "CATALOG_PUB_PASSWORD",
            Some("_INBOX_catalog_pub"),
        ),
        "publisher",
    )
    .await?;
    let client = jetsync::Client::from_nats(publisher, jetsync_stream(&catalog)?, "svc")?;
    let items = client.rows("items")?;
    let mut row = jetsync::Row::new();
    row.insert("id".into(), jetsync::Value::Text("k1".into()));
    let first = items.upsert("k1", &row).await?;
    items.upsert("k2", &row).await?;
    assert_eq!(items.get("k1").await?.map(|c| c.seq), Some(first.seq));

    // The applier creates its durable from the shipped JSON, pulls and acknowledges.
    let applier = jetsync::connect(
        &user(
            port,
            "catalog-1",
            "CATALOG_1_PASSWORD",
            Some("_INBOX_catalog-1"),
        ),
        "catalog-1",
    )
    .await?;
    let js = jetstream::new(applier);
    let stream = js.get_stream("CATALOG").await?;
    let (consumer_config, _) = parse_consumer("consumers/jetsync_catalog-1.json")?;
    let consumer: jetstream::consumer::PullConsumer =
        stream.create_consumer(consumer_config.clone()).await?;
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(5))
        .messages()
        .await?;
    let mut last = None;
    while let Some(message) = batch.next().await {
        last = Some(message.map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    let last = last.context("no message pulled")?;
    assert_eq!(
        last.info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence,
        2
    );
    last.double_ack()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = stream.consumer_info("jetsync_catalog-1").await?;
    assert_eq!(info.ack_floor.stream_sequence, 2);
    // It may delete and recreate its own durable...
    stream.delete_consumer("jetsync_catalog-1").await?;
    stream.create_consumer(consumer_config).await?;
    // ...but not touch catalog-2's.
    let mut other = parse_consumer("consumers/jetsync_catalog-1.json")?.0;
    other.name = Some("jetsync_catalog-2".into());
    other.durable_name = other.name.clone();
    admin_js
        .get_stream("CATALOG")
        .await?
        .create_consumer(other)
        .await?;
    assert!(stream.consumer_info("jetsync_catalog-2").await.is_err());
    Ok(())
}
