//! The runnable examples as a user runs them: two `inventory` service instances (real child
//! processes, each with its own SQLite database and embedded applier) against a real
//! nats-server, driven over HTTP; and the `embedded` example, which must exit 0.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use jetsync_e2e::{heavy, wait_until, HttpResponse};
use jetsync_testkit::NatsServer;
use serde_json::{json, Value};

/// Builds the example binaries once per test process and returns the path of `name`.
///
/// Like [`jetsync_e2e::applier_bin`]: the e2e package cannot depend on another package's
/// examples, so it asks cargo to build them (a no-op when they are fresh).
fn example_bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-q",
            "-p",
            "jetsync-examples",
            "--example",
            "inventory",
            "--example",
            "embedded",
        ])
        .arg("--manifest-path")
        .arg(&manifest);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for the examples");
        assert!(status.success(), "building the examples failed");
        // target/<profile>/deps/e2e-<hash> → target/<profile>/examples/
        let exe = std::env::current_exe().expect("current exe");
        exe.parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .join("examples")
    });
    let bin = dir.join(name);
    assert!(bin.exists(), "{} missing after build", bin.display());
    bin
}

/// A child process killed (and reaped) when dropped, panics included.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child already reaped")
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> Result<i32> {
        let child = self.child();
        let code = wait_until("the process to exit", timeout, || {
            child
                .try_wait()
                .ok()
                .flatten()
                .map(|s| s.code().unwrap_or(-1))
        })?;
        self.0 = None;
        Ok(code)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One running `inventory` instance.
struct Inventory {
    name: String,
    addr: SocketAddr,
    log_path: PathBuf,
    process: ChildGuard,
}

impl Inventory {
    /// Writes the instance's config under `root/<name>` and starts it on `port`.
    fn start(root: &Path, name: &str, nats_url: &str, port: u16) -> Result<Inventory> {
        let dir = root.join(name);
        fs::create_dir_all(&dir)?;
        let config = dir.join(format!("{name}.toml"));
        fs::write(
            &config,
            format!(
                "instance = {name:?}\ndata_dir = {dir:?}\n\n[nats]\nurl = {nats_url:?}\n\n\
                 [stream]\nname = \"INVENTORY\"\nsubject_prefix = \"inventory\"\n\n\
                 [tables.items]\nkey = \"sku\"\n"
            ),
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log_path = dir.join("inventory.log");
        let log = fs::File::create(&log_path)?;
        let child = Command::new(example_bin("inventory"))
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(addr.to_string())
            // Read-your-writes is what is tested, not the speed of a loaded test machine.
            .args(["--wait-timeout-ms", "30000"])
            .env("RUST_LOG", "info,async_nats=warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning the inventory example")?;
        Ok(Inventory {
            name: name.into(),
            addr,
            log_path,
            process: ChildGuard(Some(child)),
        })
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the HTTP server answers and the embedded applier is consuming.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let addr = self.addr;
        let name = self.name.clone();
        let child = self.process.child();
        let ready = wait_until(&format!("{name} to be ready"), timeout, || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(anyhow::anyhow!("{name} exited with {status}")));
            }
            let r = http(addr, "GET", "/healthz", None).ok()?;
            let body: Value = serde_json::from_str(&r.body).ok()?;
            (r.code == 200 && body["connected"] == json!(true)).then_some(Ok(()))
        });
        match ready.and_then(|r| r) {
            Ok(()) => Ok(()),
            Err(e) => bail!("{e:#}\n--- {} log ---\n{}", self.name, self.log()),
        }
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value)> {
        let r = http(self.addr, method, path, body)
            .with_context(|| format!("{method} {path} on {}", self.name))?;
        let json: Value = serde_json::from_str(&r.body).with_context(|| {
            format!(
                "{method} {path} on {}: the body is not JSON: {:?}",
                self.name, r.body
            )
        })?;
        ensure!(
            r.content_type
                .as_deref()
                .is_some_and(|t| t.starts_with("application/json")),
            "{method} {path} on {}: content type {:?}",
            self.name,
            r.content_type
        );
        Ok((r.code, json))
    }

    /// Sends SIGTERM; the exit code.
    fn terminate(&mut self, timeout: Duration) -> Result<i32> {
        let pid = self.process.child().id();
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()?;
        self.process.wait_exit(timeout)
    }
}

/// A minimal HTTP/1.1 request over a fresh connection (`Connection: close`), 15 s timeout.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Result<HttpResponse> {
    let body = body.unwrap_or("");
    let content_type = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let (code, headers, rest) = jetsync_e2e::http_exchange(
        addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{content_type}\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )?;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(&rest)?
    } else {
        rest
    };
    Ok(HttpResponse {
        code,
        content_type: header("content-type"),
        body,
    })
}

/// Decodes a chunked body.
fn dechunk(mut rest: &str) -> Result<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("truncated chunk size")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok(body);
        }
        ensure!(after.len() >= size + 2, "truncated chunk");
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

#[test]
fn inventory_instances_read_their_own_writes_and_converge() -> Result<()> {
    let _heavy = heavy();
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let ports = jetsync_testkit::free_ports(2)?;
    let mut one = Inventory::start(root.path(), "inventory-1", &server.url(), ports[0])?;
    let mut two = Inventory::start(root.path(), "inventory-2", &server.url(), ports[1])?;
    one.wait_ready(Duration::from_secs(120))?;
    two.wait_ready(Duration::from_secs(120))?;
    let logs = |what: &str| {
        format!(
            "{what}\n--- inventory-1 ---\n{}\n--- inventory-2 ---\n{}",
            one.log(),
            two.log()
        )
    };

    // PUT on instance 1 answers with the row read back from instance 1's own database.
    let chair = json!({"sku": "A-1", "name": "Chair", "qty": 12, "price": 12.5});
    let (code, put) = one.request(
        "PUT",
        "/items/A-1",
        Some(r#"{"name":"Chair","qty":12,"price":12.5}"#),
    )?;
    ensure!(code == 200, "{}", logs(&format!("PUT: {code} {put}")));
    let seq = put["seq"].as_u64().context("PUT answer has a seq")?;
    ensure!(seq > 0 && put["item"] == chair, "PUT answered {put}");
    ensure!(
        put["applied_seq"].as_u64() >= Some(seq),
        "PUT answered {put}"
    );

    // Read-your-writes: a GET on the same instance right after sees it.
    let (code, got) = one.request("GET", "/items/A-1", None)?;
    ensure!(code == 200 && got == chair, "GET on 1: {code} {got}");

    // Instance 2 applies it too, from its own database.
    wait_until("instance 2 to serve A-1", Duration::from_secs(60), || {
        two.request("GET", "/items/A-1", None)
            .ok()
            .filter(|(code, body)| *code == 200 && *body == chair)
    })
    .with_context(|| logs("A-1 never reached instance 2"))?;

    // Errors are JSON with the right status.
    let (code, err) = one.request("PUT", "/items/A-2", Some("{not json"))?;
    ensure!(
        code == 400 && err["error"].is_string(),
        "bad JSON: {code} {err}"
    );
    let (code, err) = one.request(
        "PUT",
        "/items/A-2",
        Some(r#"{"name":"x","qty":"many","price":1}"#),
    )?;
    ensure!(
        code == 400 && err["error"].is_string(),
        "bad qty: {code} {err}"
    );
    let (code, err) = one.request(
        "PUT",
        "/items/A-2",
        Some(r#"{"name":"x","qty":1,"price":1,"colour":"red"}"#),
    )?;
    ensure!(
        code == 400 && err["error"].is_string(),
        "unknown field: {code} {err}"
    );
    let (code, err) = one.request("GET", "/items/nope", None)?;
    ensure!(
        code == 404 && err["error"].is_string(),
        "missing sku: {code} {err}"
    );
    let (code, err) = two.request("DELETE", "/items/nope", None)?;
    ensure!(
        code == 404 && err["error"].is_string(),
        "DELETE missing sku: {code} {err}"
    );

    // DELETE on instance 2: gone from 2 at once (read-your-writes), from 1 eventually.
    let (code, del) = two.request("DELETE", "/items/A-1", None)?;
    ensure!(code == 200, "{}", logs(&format!("DELETE: {code} {del}")));
    ensure!(
        del["seq"].as_u64().is_some_and(|s| s > seq),
        "DELETE answered {del}"
    );
    let (code, _) = two.request("GET", "/items/A-1", None)?;
    ensure!(code == 404, "GET on 2 right after its DELETE: {code}");
    wait_until("instance 1 to lose A-1", Duration::from_secs(60), || {
        one.request("GET", "/items/A-1", None)
            .ok()
            .filter(|(code, _)| *code == 404)
    })
    .with_context(|| logs("the delete never reached instance 1"))?;
    let (code, _) = one.request("DELETE", "/items/A-1", None)?;
    ensure!(code == 404, "DELETE of a deleted sku: {code}");

    // ?wait=false answers 202 with the sequence; the row still arrives everywhere.
    let (code, accepted) = two.request(
        "PUT",
        "/items/B-7?wait=false",
        Some(r#"{"name":"Table","qty":3,"price":120}"#),
    )?;
    ensure!(
        code == 202 && accepted["seq"].as_u64().is_some(),
        "PUT ?wait=false: {code} {accepted}"
    );
    let table = json!({"sku": "B-7", "name": "Table", "qty": 3, "price": 120.0});
    for instance in [&one, &two] {
        wait_until(
            &format!("{} to serve B-7", instance.name),
            Duration::from_secs(60),
            || {
                instance
                    .request("GET", "/items/B-7", None)
                    .ok()
                    .filter(|(code, body)| *code == 200 && *body == table)
            },
        )
        .with_context(|| logs("B-7 did not arrive"))?;
    }

    // SIGTERM: both stop cleanly.
    for instance in [&mut one, &mut two] {
        let code = instance.terminate(Duration::from_secs(30))?;
        ensure!(
            code == 0,
            "{} exited {code}:\n{}",
            instance.name,
            instance.log()
        );
    }
    Ok(())
}

#[test]
fn embedded_example_reads_back_what_it_wrote() -> Result<()> {
    let _heavy = heavy();
    let dir = tempfile::tempdir()?;
    let log_path = dir.path().join("embedded.log");
    let log = fs::File::create(&log_path)?;
    // The example starts its own nats-server (NATS_SERVER_BIN is inherited).
    let mut process = ChildGuard(Some(
        Command::new(example_bin("embedded"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("spawning the embedded example")?,
    ));
    let code = process.wait_exit(Duration::from_secs(180));
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    let code = code.with_context(|| format!("the embedded example did not finish:\n{output}"))?;
    ensure!(code == 0, "the embedded example exited {code}:\n{output}");
    ensure!(
        output.contains("exactly what was written"),
        "unexpected output:\n{output}"
    );
    Ok(())
}
