//! Helpers for jetsync's end-to-end tests: run the real `jetsync-applier` binary as child
//! processes against real `nats-server`s (from `jetsync-testkit`), publish through the real
//! client, and compare instances with a reference model.
//!
//! Everything waits for conditions with deadlines, never fixed sleeps, and every child process
//! is killed when its handle is dropped (panics included).

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use jetsync::{Row, Value};

/// Builds the applier binary once per test process and returns its path.
///
/// The e2e package cannot depend on another package's binary, so it asks cargo (which is
/// already there: tests run under `cargo test`) to build it; this is a no-op when it is fresh.
pub fn applier_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-q",
            "-p",
            "jetsync-applier",
            "--bin",
            "jetsync-applier",
        ])
        .arg("--manifest-path")
        .arg(&manifest);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for jetsync-applier");
        assert!(status.success(), "building jetsync-applier failed");
        // target/<profile>/deps/e2e-<hash> → target/<profile>/jetsync-applier
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps");
        let bin = profile_dir.join("jetsync-applier");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
}

/// Serialises heavy scenarios inside one test binary: on a 2-core machine, two of them at
/// once (each with several appliers and a server) would only make both slow and flaky.
/// Hold the guard for the whole test.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls `check` every 25 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The sink an instance uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// One SQLite file.
    Sqlite,
    /// The redb replica, with the per-sequence audit table.
    RedbAudit,
}

/// Settings shared by the instances of one test.
#[derive(Debug, Clone)]
pub struct Group {
    /// NATS URL(s), comma-separated.
    pub url: String,
    /// Stream name.
    pub stream: String,
    /// Subject prefix.
    pub prefix: String,
    /// Table → key column.
    pub tables: BTreeMap<String, String>,
    /// Extra TOML appended to every instance's config (e.g. `[apply]` settings).
    pub extra_toml: String,
}

impl Group {
    /// A group named `stream` with prefix `prefix` on `url`, one table `items` keyed by `id`.
    pub fn new(url: impl Into<String>, stream: &str, prefix: &str) -> Group {
        let mut tables = BTreeMap::new();
        tables.insert("items".to_owned(), "id".to_owned());
        Group {
            url: url.into(),
            stream: stream.into(),
            prefix: prefix.into(),
            tables,
            extra_toml: String::new(),
        }
    }

    /// The client configuration (for publishers) of instance `name`.
    pub fn config(&self, name: &str, data_dir: &Path) -> jetsync::Config {
        let mut c = jetsync::Config {
            instance: name.into(),
            data_dir: data_dir.into(),
            ..jetsync::Config::default()
        };
        c.nats.url = self.url.clone();
        c.stream = self.stream_config();
        c
    }

    /// A connected client publishing as `origin`.
    pub async fn client(&self, origin: &str) -> Result<jetsync::Client> {
        let nats = async_nats::connect(self.url.as_str()).await?;
        Ok(jetsync::Client::from_nats(
            nats,
            self.stream_config(),
            origin,
        )?)
    }

    /// The stream settings of this group.
    pub fn stream_config(&self) -> jetsync::StreamConfig {
        jetsync::StreamConfig {
            name: self.stream.clone(),
            subject_prefix: self.prefix.clone(),
            ..jetsync::StreamConfig::default()
        }
    }
}

/// One applier instance: its data dir, config file and (when running) its process.
pub struct Instance {
    /// Instance id.
    pub name: String,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its config file.
    pub config_path: PathBuf,
    /// Its sink.
    pub sink: SinkKind,
    child: Option<Child>,
    runs: u32,
}

impl Instance {
    /// Writes the config of instance `name` under `root` (not started yet).
    pub fn new(group: &Group, root: &Path, name: &str, sink: SinkKind) -> Result<Instance> {
        let dir = root.join(name);
        fs::create_dir_all(&dir)?;
        let mut toml = format!(
            "instance = {name:?}\ndata_dir = {dir:?}\n\n[nats]\nurl = {url:?}\n\n[stream]\nname = {stream:?}\nsubject_prefix = {prefix:?}\n\n",
            url = group.url,
            stream = group.stream,
            prefix = group.prefix,
        );
        for (table, key) in &group.tables {
            toml += &format!("[tables.{table}]\nkey = {key:?}\n\n");
        }
        match sink {
            SinkKind::Sqlite => toml += "[sink]\nkind = \"sqlite\"\n\n",
            SinkKind::RedbAudit => toml += "[sink]\nkind = \"redb\"\naudit = true\n\n",
        }
        toml += &group.extra_toml;
        let config_path = dir.join("jetsync.toml");
        fs::write(&config_path, toml)?;
        let instance = Instance {
            name: name.into(),
            dir,
            config_path,
            sink,
            child: None,
            runs: 0,
        };
        if sink == SinkKind::RedbAudit {
            // The audit proves "every stream sequence applied exactly once", which needs the
            // whole history replayed: no snapshot bootstrap (that path has its own tests).
            instance.set_option("apply", "bootstrap", "false")?;
        }
        Ok(instance)
    }

    /// A command for the applier binary with this instance's config.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(applier_bin());
        cmd.arg("--config").arg(&self.config_path).args(args);
        cmd.env_remove("RUST_LOG");
        cmd
    }

    /// Runs a one-shot subcommand; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let out = self
            .command(args)
            .output()
            .context("running jetsync-applier")?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Runs a subcommand that prints JSON and parses it (fails on a non-zero exit).
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let (code, out, err) = self.cli(&all)?;
        if code != 0 {
            bail!("jetsync-applier {args:?} exited {code}: {err}");
        }
        serde_json::from_str(&out).with_context(|| format!("parsing output of {args:?}: {out}"))
    }

    /// Starts `jetsync-applier run` in the background (logs to `run-N.log` in its dir).
    pub fn start(&mut self) -> Result<()> {
        assert!(
            self.child.is_none(),
            "instance {} already running",
            self.name
        );
        self.runs += 1;
        let log = fs::File::create(self.dir.join(format!("run-{}.log", self.runs)))?;
        let child = self
            .command(&["run"])
            .env("RUST_LOG", "info,async_nats=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning jetsync-applier run")?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether the `run` process is alive.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `signal` (a name `kill -s` knows: `STOP`, `CONT`, ...) to the `run` process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let child = self.child.as_ref().context("instance not running")?;
        let status = Command::new("kill")
            .args(["-s", signal, &child.id().to_string()])
            .status()
            .context("running kill")?;
        ensure!(
            status.success(),
            "kill -s {signal} {} failed: {status}",
            child.id()
        );
        Ok(())
    }

    /// SIGKILLs the `run` process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit code.
    pub fn stop(&mut self, timeout: Duration) -> Result<i32> {
        let Some(mut child) = self.child.take() else {
            bail!("instance {} is not running", self.name);
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("instance {} did not stop within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the `run` process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32> {
        let child = self.child.as_mut().context("not running")?;
        let code = wait_until("the applier to exit", timeout, || {
            child
                .try_wait()
                .ok()
                .flatten()
                .map(|s| s.code().unwrap_or(-1))
        })?;
        self.child = None;
        Ok(code)
    }

    /// The last run's log text.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join(format!("run-{}.log", self.runs))).unwrap_or_default()
    }

    /// The SQLite file of a SQLite instance.
    pub fn sqlite_path(&self) -> PathBuf {
        self.dir.join(format!("{}.db", self.name))
    }

    /// The redb replica file of a redb instance.
    pub fn replica_path(&self) -> PathBuf {
        self.dir.join(format!("{}.replica.redb", self.name))
    }

    /// The redb checkpoint file.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.dir.join(format!("{}.redb", self.name))
    }

    /// The applied sequence as the redb checkpoint shows it (readable while running).
    pub fn applied(&self, stream: &str) -> u64 {
        jetsync_applier::read_checkpoint(&self.checkpoint_path(), stream)
            .map(|c| c.applied)
            .unwrap_or(0)
    }

    /// Waits until the checkpoint reaches `seq`; fails early if the process died.
    pub fn wait_applied(&mut self, stream: &str, seq: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let applied = self.applied(stream);
            if applied >= seq {
                return Ok(());
            }
            if self.child.is_some() && !self.is_running() {
                bail!(
                    "instance {} exited while waiting for seq {seq} (at {applied}):\n{}",
                    self.name,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "instance {} reached only seq {applied} of {seq} within {timeout:?}:\n{}",
                    self.name,
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `digest --json` of this instance.
    pub fn digest(&self) -> Result<serde_json::Value> {
        self.cli_json(&["digest"])
    }

    /// All rows of `table` in the SQLite file, keyed by the key column's text.
    pub fn sqlite_rows(&self, table: &str, key_column: &str) -> Result<BTreeMap<String, Row>> {
        sqlite_rows(&self.sqlite_path(), table, key_column)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Reads all rows of `table` from a SQLite file (read-only), keyed by `key_column` as text.
pub fn sqlite_rows(path: &Path, table: &str, key_column: &str) -> Result<BTreeMap<String, Row>> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let exists: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [table],
        |r| r.get(0),
    )?;
    let mut out = BTreeMap::new();
    if exists == 0 {
        return Ok(out);
    }
    let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\""))?;
    let names: Vec<String> = stmt.column_names().map(|s| s.to_string()).collect();
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let mut row = Row::new();
        for (i, name) in names.iter().enumerate() {
            let v = match r.get_ref(i)? {
                rusqlite::types::ValueRef::Null => Value::Null,
                rusqlite::types::ValueRef::Integer(i) => Value::I64(i),
                rusqlite::types::ValueRef::Real(f) => Value::F64(f),
                rusqlite::types::ValueRef::Text(t) => {
                    Value::Text(String::from_utf8_lossy(t).into_owned())
                }
                rusqlite::types::ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
            };
            row.insert(name.clone(), v);
        }
        let key = match row.get(key_column) {
            Some(Value::Text(t)) => t.clone(),
            Some(Value::I64(i)) => i.to_string(),
            other => bail!("row without a usable key column {key_column}: {other:?}"),
        };
        out.insert(key, row);
    }
    Ok(out)
}

/// The expected end state: the last acknowledged event per (table, key), by stream sequence.
#[derive(Debug, Default, Clone)]
pub struct Reference {
    events: BTreeMap<(String, String), (u64, Option<Row>)>,
    max_seq: u64,
}

impl Reference {
    /// Records an acknowledged event (`row = None` for a delete).
    pub fn record(&mut self, seq: u64, table: &str, key: &str, row: Option<Row>) {
        self.max_seq = self.max_seq.max(seq);
        let slot = self
            .events
            .entry((table.to_owned(), key.to_owned()))
            .or_insert((0, None));
        if seq >= slot.0 {
            *slot = (seq, row);
        }
    }

    /// Merges another publisher's reference.
    pub fn merge(&mut self, other: Reference) {
        for ((t, k), (seq, row)) in other.events {
            self.record(seq, &t, &k, row);
        }
    }

    /// The highest acknowledged sequence.
    pub fn max_seq(&self) -> u64 {
        self.max_seq
    }

    /// Expected live rows of `table`: key → row.
    pub fn rows(&self, table: &str) -> BTreeMap<String, Row> {
        self.events
            .iter()
            .filter(|((t, _), _)| t == table)
            .filter_map(|((_, k), (_, row))| row.clone().map(|r| (k.clone(), r)))
            .collect()
    }
}

/// Asserts that an instance's SQLite rows of `table` equal the reference (columns the
/// reference rows carry; the key column filled in when the event lacked it).
pub fn assert_sqlite_matches(
    instance: &Instance,
    reference: &Reference,
    table: &str,
    key_column: &str,
) -> Result<()> {
    let have = instance.sqlite_rows(table, key_column)?;
    let want = reference.rows(table);
    check_same_keys(&format!("instance {}", instance.name), &have, &want)?;
    for (key, want_row) in &want {
        let have_row = &have[key];
        for (col, v) in want_row {
            let got = have_row.get(col).unwrap_or(&Value::Null);
            if !same_value(v, got) {
                bail!(
                    "instance {} row {key}: column {col} is {got:?}, expected {v:?}",
                    instance.name
                );
            }
        }
    }
    Ok(())
}

/// Fails naming up to five missing and five unexpected keys when `have` and `want` differ in
/// their key sets.
fn check_same_keys(
    what: &str,
    have: &BTreeMap<String, Row>,
    want: &BTreeMap<String, Row>,
) -> Result<()> {
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !have.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = have
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        bail!(
            "{what}: {} rows, expected {}; missing e.g. {missing:?}, unexpected e.g. {extra:?}",
            have.len(),
            want.len()
        );
    }
    Ok(())
}

/// Value equality across SQLite's storage classes (bools are integers there).
fn same_value(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::Bool(b), Value::I64(i)) => i64::from(*b) == *i,
        (Value::Json(j), Value::Text(t)) => {
            serde_json::from_str::<serde_json::Value>(t).ok().as_ref() == Some(j)
        }
        (a, b) => a == b,
    }
}

// ---- Helpers for the convergence, downtime and exit-code scenarios. ----

impl Instance {
    /// `status --json` of this instance (works while `run` is running).
    pub fn status(&self) -> Result<serde_json::Value> {
        self.cli_json(&["status"])
    }

    /// The redb checkpoint of `stream`: applied sequence and the lifetime applied-events
    /// counter (readable while `run` is running).
    pub fn checkpoint(&self, stream: &str) -> Result<jetsync_applier::Checkpoint> {
        Ok(jetsync_applier::read_checkpoint(
            &self.checkpoint_path(),
            stream,
        )?)
    }

    /// Runs a subcommand that may not end by itself (e.g. `tail`), killing it after `timeout`.
    /// Returns (exit code, `None` when it had to be killed; stdout; stderr).
    pub fn cli_timeout(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<(Option<i32>, String, String)> {
        run_with_timeout(self.command(args), &self.dir, timeout)
    }
}

/// Runs the applier binary with exactly `args` (no `--config` added); returns (exit code,
/// stdout, stderr). For usage and configuration error checks.
pub fn applier_cli<I, S>(args: I) -> Result<(i32, String, String)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(applier_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("JETSYNC_CONFIG")
        .stdin(Stdio::null())
        .output()
        .context("running jetsync-applier")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `cmd` with its output captured in files under `scratch`, killing it after `timeout`.
/// Returns (exit code, `None` when it had to be killed; stdout; stderr).
pub fn run_with_timeout(
    mut cmd: Command,
    scratch: &Path,
    timeout: Duration,
) -> Result<(Option<i32>, String, String)> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_path = scratch.join(format!("cmd-{}-{n}.out", std::process::id()));
    let err_path = scratch.join(format!("cmd-{}-{n}.err", std::process::id()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?)
        .spawn()
        .context("spawning a command")?;
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status.code().unwrap_or(-1));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = fs::read_to_string(&out_path).unwrap_or_default();
    let err = fs::read_to_string(&err_path).unwrap_or_default();
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    Ok((code, out, err))
}

/// A random row for key `key`: `id` (the key), `n` (i64), `f` (f64), `s` (text, sometimes
/// non-ASCII) and, half of the time, `b` (bool), so that a later upsert without `b` must
/// leave that column NULL.
pub fn random_row(rng: &mut impl rand::Rng, key: &str) -> Row {
    const ALPHABET: &[char] = &[
        'a', 'b', 'z', 'Q', '0', '9', ' ', '\'', '"', 'é', 'ß', '€', '漢', '🦀',
    ];
    let mut row = Row::new();
    row.insert("id".into(), Value::Text(key.to_owned()));
    let n = match rng.gen_range(0..20) {
        0 => i64::MIN,
        1 => i64::MAX,
        _ => rng.gen_range(-1_000_000_000_i64..1_000_000_000),
    };
    row.insert("n".into(), Value::I64(n));
    row.insert("f".into(), Value::F64(rng.gen_range(-1.0e9_f64..1.0e9)));
    let len = rng.gen_range(0..24);
    let s: String = (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
        .collect();
    row.insert("s".into(), Value::Text(s));
    if rng.gen_bool(0.5) {
        row.insert("b".into(), Value::Bool(rng.gen_bool(0.5)));
    }
    row
}

/// [`assert_sqlite_matches`], and also every column of a stored row that its reference row
/// lacks (other than `key_column`) must be NULL: an upsert carries the row's full new state.
pub fn assert_sqlite_matches_exactly(
    instance: &Instance,
    reference: &Reference,
    table: &str,
    key_column: &str,
) -> Result<()> {
    assert_sqlite_matches(instance, reference, table, key_column)?;
    let have = instance.sqlite_rows(table, key_column)?;
    for (key, want_row) in reference.rows(table) {
        for (col, got) in &have[&key] {
            if col != key_column && !want_row.contains_key(col) && *got != Value::Null {
                bail!("instance {} row {key}: column {col} is {got:?}, expected NULL (absent from the last upsert)", instance.name);
            }
        }
    }
    Ok(())
}

// ---- Helpers for the crash, consumer-state and server-restart scenarios. ----

impl Instance {
    /// [`Instance::start`] with the run's `RUST_LOG` set to `filter` (e.g.
    /// `"debug,async_nats=debug"`) instead of the default `info,async_nats=warn`.
    pub fn start_with_log(&mut self, filter: &str) -> Result<()> {
        assert!(
            self.child.is_none(),
            "instance {} already running",
            self.name
        );
        self.runs += 1;
        let log = fs::File::create(self.dir.join(format!("run-{}.log", self.runs)))?;
        let child = self
            .command(&["run"])
            .env("RUST_LOG", filter)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning jetsync-applier run")?;
        self.child = Some(child);
        Ok(())
    }

    /// Sets `key = value` (`value` is a TOML literal, e.g. `"64"`) in the `[stream]` section of
    /// this instance's config file; it takes effect at the next start or subcommand.
    pub fn set_stream_option(&self, key: &str, value: &str) -> Result<()> {
        let text = fs::read_to_string(&self.config_path)?;
        let Some(at) = text.find("[stream]\n") else {
            bail!("{} has no [stream] section", self.config_path.display());
        };
        let at = at + "[stream]\n".len();
        let updated = format!("{}{key} = {value}\n{}", &text[..at], &text[at..]);
        fs::write(&self.config_path, updated)?;
        Ok(())
    }

    /// All rows of `table` in the redb replica of a stopped redb instance, keyed by key.
    pub fn redb_rows(&self, table: &str) -> Result<BTreeMap<String, Row>> {
        let sink = jetsync_applier::RedbSink::open(jetsync_applier::RedbOptions::new(
            self.replica_path(),
        ))?;
        let rows = sink.replica().scan(table)?;
        Ok(rows.into_iter().collect())
    }

    /// The exactly-once audit of a stopped redb instance (`seq → times applied`).
    pub fn audit(&self) -> Result<BTreeMap<u64, u64>> {
        Ok(jetsync_applier::read_audit(&self.replica_path())?)
    }
}

/// Asserts that `rows` (key → row, e.g. from [`Instance::redb_rows`]) equal the reference rows of
/// `table` exactly: same keys, and every row identical.
pub fn assert_rows_equal(
    what: &str,
    rows: &BTreeMap<String, Row>,
    reference: &Reference,
    table: &str,
) -> Result<()> {
    let want = reference.rows(table);
    check_same_keys(what, rows, &want)?;
    for (key, want_row) in &want {
        if rows[key] != *want_row {
            bail!(
                "{what}: row {key} is {:?}, expected {want_row:?}",
                rows[key]
            );
        }
    }
    Ok(())
}

/// Asserts that the audit counts are exactly "every sequence of `seqs` applied once": no gap (a
/// sequence missing), no double (a count above 1), nothing unexpected.
pub fn assert_applied_exactly_once(
    what: &str,
    audit: &BTreeMap<u64, u64>,
    seqs: impl IntoIterator<Item = u64>,
) -> Result<()> {
    let want: std::collections::BTreeSet<u64> = seqs.into_iter().collect();
    let missing: Vec<u64> = want
        .iter()
        .copied()
        .filter(|s| !audit.contains_key(s))
        .collect();
    let doubled: Vec<(u64, u64)> = audit
        .iter()
        .filter(|(_, &n)| n != 1)
        .map(|(&s, &n)| (s, n))
        .collect();
    let unexpected: Vec<u64> = audit
        .keys()
        .copied()
        .filter(|s| !want.contains(s))
        .collect();
    if !missing.is_empty() || !doubled.is_empty() || !unexpected.is_empty() {
        bail!(
            "{what}: {} sequences expected, audit holds {}; {} missing (e.g. {:?}), {} applied more than once (seq, count, e.g. {:?}), {} unexpected (e.g. {:?})",
            want.len(),
            audit.len(),
            missing.len(),
            &missing[..missing.len().min(10)],
            doubled.len(),
            &doubled[..doubled.len().min(10)],
            unexpected.len(),
            &unexpected[..unexpected.len().min(10)],
        );
    }
    Ok(())
}

// ---- Helpers for the HTTP endpoint scenarios. ----

impl Instance {
    /// Appends `toml` (whole sections, e.g. `"[log]\nformat = \"json\"\n"`) to this instance's
    /// config file; it takes effect at the next start or subcommand.
    pub fn append_config(&self, toml: &str) -> Result<()> {
        let mut text = fs::read_to_string(&self.config_path)?;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push('\n');
        text.push_str(toml);
        fs::write(&self.config_path, text)?;
        Ok(())
    }

    /// Enables the HTTP endpoint on a free loopback port (appending an `[http]` section with
    /// `listen` and the given extra lines, e.g. `"ready_max_lag = 10\n"`); returns its address.
    pub fn enable_http(&self, extra: &str) -> Result<std::net::SocketAddr> {
        let port = jetsync_testkit::free_port()?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        self.append_config(&format!("[http]\nlisten = \"{addr}\"\n{extra}"))?;
        Ok(addr)
    }
}

/// A response of [`http_get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub code: u16,
    /// The `Content-Type` header, when there is one.
    pub content_type: Option<String>,
    /// The body as text.
    pub body: String,
}

/// Response headers, names in lowercase.
pub type Headers = Vec<(String, String)>;

/// Sends `request` (a whole HTTP/1.x request, asking the server to close the connection) over
/// a fresh TCP connection with a 15 s timeout; returns the status code, the headers (names in
/// lowercase) and the raw body.
pub fn http_exchange(addr: std::net::SocketAddr, request: &str) -> Result<(u16, Headers, String)> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(15);
    let what = request.lines().next().unwrap_or_default().to_owned();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the response to {what}"))?;
    let text = String::from_utf8(raw).context("the response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in the response to {what}: {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((code, headers, body.to_owned()))
}

/// A minimal HTTP/1.0 `GET` over a plain TCP connection (the server closes it after the
/// response), with a 15 s timeout.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<HttpResponse> {
    let (code, headers, body) = http_exchange(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )?;
    let content_type = headers
        .into_iter()
        .find_map(|(name, value)| (name == "content-type").then_some(value));
    Ok(HttpResponse {
        code,
        content_type,
        body,
    })
}

/// Waits until the HTTP endpoint at `addr` answers `/healthz` with 200.
pub fn wait_http_up(addr: std::net::SocketAddr, timeout: Duration) -> Result<()> {
    wait_until("the HTTP endpoint to answer /healthz", timeout, || {
        http_get(addr, "/healthz").ok().filter(|r| r.code == 200)
    })
    .map(|_| ())
}

// ---- Helpers for the security scenarios (least-privilege users of nats-config/). ----

/// A file of the repository's `nats-config/` directory, e.g. `"accounts.conf"` or
/// `"consumers/jetsync_catalog-1.json"`.
pub fn nats_config_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../nats-config")
        .join(relative)
}

/// `nats-config/accounts.conf` as a testkit `extra_config`: its `accounts` block, preceded by
/// definitions of the password variables it references (`NAME: "value"`; nats-server resolves a
/// `$NAME` from such a definition before looking at the environment). Use it with
/// `NatsServer::builder().extra_config(..)`.
pub fn accounts_extra_config(passwords: &[(&str, &str)]) -> Result<String> {
    let path = nats_config_file("accounts.conf");
    let accounts =
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut text = String::new();
    for (name, value) in passwords {
        text += &format!("{name}: {value:?}\n");
    }
    text += &accounts;
    Ok(text)
}

/// Fails when any of `secrets` occurs in any of `outputs` (name, text), naming the output and
/// the secret's position but never printing the secret.
pub fn assert_no_secrets(outputs: &[(String, String)], secrets: &[&str]) -> Result<()> {
    for (name, text) in outputs {
        for (i, secret) in secrets.iter().enumerate() {
            assert!(!secret.is_empty(), "empty secret #{i}");
            if let Some(at) = text.find(secret) {
                bail!("secret #{i} leaked into {name} at byte {at}");
            }
        }
    }
    Ok(())
}

impl Instance {
    /// Sets `key = value` (`value` is a TOML literal, e.g. `"\"catalog-1\""`) in the `[section]`
    /// of this instance's config file, replacing an earlier value of `key` there and adding the
    /// section when it is missing; it takes effect at the next start or subcommand.
    pub fn set_option(&self, section: &str, key: &str, value: &str) -> Result<()> {
        let text = fs::read_to_string(&self.config_path)?;
        let header = format!("[{section}]");
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let setting = format!("{key} = {value}");
        match lines.iter().position(|l| l.trim() == header) {
            Some(start) => {
                let end = lines[start + 1..]
                    .iter()
                    .position(|l| l.trim_start().starts_with('['))
                    .map_or(lines.len(), |i| start + 1 + i);
                let existing = lines[start + 1..end]
                    .iter()
                    .position(|l| l.split_once('=').is_some_and(|(k, _)| k.trim() == key));
                match existing {
                    Some(i) => lines[start + 1 + i] = setting,
                    None => lines.insert(start + 1, setting),
                }
            }
            None => {
                lines.push(String::new());
                lines.push(header);
                lines.push(setting);
            }
        }
        fs::write(&self.config_path, lines.join("\n") + "\n")?;
        Ok(())
    }

    /// [`Instance::start`] with extra environment variables for the `run` process (e.g.
    /// `JETSYNC_NATS__PASSWORD`).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        assert!(
            self.child.is_none(),
            "instance {} already running",
            self.name
        );
        self.runs += 1;
        let log = fs::File::create(self.dir.join(format!("run-{}.log", self.runs)))?;
        let mut cmd = self.command(&["run"]);
        cmd.env("RUST_LOG", "info,async_nats=warn");
        for (name, value) in env {
            cmd.env(name, value);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning jetsync-applier run")?;
        self.child = Some(child);
        Ok(())
    }

    /// Every run log of this instance so far (`run-1.log`, `run-2.log`, ...), as (file name,
    /// text).
    pub fn run_logs(&self) -> Vec<(String, String)> {
        (1..=self.runs)
            .map(|run| {
                let name = format!("run-{run}.log");
                let text = fs::read_to_string(self.dir.join(&name)).unwrap_or_default();
                (format!("{} {name}", self.name), text)
            })
            .collect()
    }
}

// ---- Helpers for the Postgres scenarios. ----

/// The Postgres test database: `JETSYNC_TEST_POSTGRES`, default
/// `postgres://postgres@127.0.0.1:5432/test`.
pub fn postgres_url() -> String {
    std::env::var("JETSYNC_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Runs `sql` (one or more statements) on `url` from a fresh thread with its own runtime, so it
/// works inside and outside of an async context (and from `Drop`).
pub fn postgres_exec(url: &str, sql: &str) -> Result<()> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (client, connection) =
                tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .with_context(|| format!("connecting to Postgres at {url}"))?;
            let conn = tokio::spawn(connection);
            client
                .batch_execute(&sql)
                .await
                .with_context(|| format!("running {sql}"))?;
            drop(client);
            let _ = conn.await;
            Ok(())
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the Postgres thread panicked"))?
}

/// A Postgres schema created for one test and dropped (`CASCADE`) when the guard is dropped,
/// panics included.
pub struct PgSchema {
    /// Connection URL.
    pub url: String,
    /// Schema name.
    pub name: String,
}

impl PgSchema {
    /// Creates schema `name` (dropping a leftover one first) and runs `ddl` in it (`{schema}`
    /// in `ddl` is replaced by the quoted schema name).
    pub fn create(url: &str, name: &str, ddl: &str) -> Result<PgSchema> {
        let guard = PgSchema {
            url: url.to_owned(),
            name: name.to_owned(),
        };
        let quoted = format!("\"{name}\"");
        postgres_exec(
            url,
            &format!(
                "DROP SCHEMA IF EXISTS {quoted} CASCADE; CREATE SCHEMA {quoted}; {}",
                ddl.replace("{schema}", &quoted)
            ),
        )?;
        Ok(guard)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Err(e) = postgres_exec(
            &self.url,
            &format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name),
        ) {
            eprintln!("dropping Postgres schema {}: {e:#}", self.name);
        }
    }
}

impl Instance {
    /// Switches this instance's sink to Postgres at `url`, schema `schema` (rewrites the
    /// `[sink]` section; takes effect at the next start or subcommand).
    pub fn use_postgres(&self, url: &str, schema: &str) -> Result<()> {
        self.set_option("sink", "kind", "\"postgres\"")?;
        self.set_option("sink", "url", &format!("{url:?}"))?;
        self.set_option("sink", "schema", &format!("{schema:?}"))
    }
}

/// All rows of `schema.table` in Postgres, keyed by `key_column` as text (integers as their
/// decimal text), read the way the Postgres sink's digest reads them.
pub async fn postgres_rows(
    url: &str,
    schema: &str,
    table: &str,
    key_column: &str,
) -> Result<BTreeMap<String, Row>> {
    let mut options = jetsync_applier::PostgresOptions::new(url);
    options.schema = Some(schema.to_owned());
    options
        .key_columns
        .insert(table.to_owned(), key_column.to_owned());
    let mut sink = jetsync_applier::PostgresSink::connect(options).await?;
    let mut out = BTreeMap::new();
    for row in sink.read_table(table).await? {
        let key = match row.get(key_column) {
            Some(Value::Text(t)) => t.clone(),
            Some(Value::I64(i)) => i.to_string(),
            other => {
                bail!("{schema}.{table}: row without a usable key column {key_column}: {other:?}")
            }
        };
        out.insert(key, row);
    }
    Ok(out)
}

// ---- Helpers for the history (type changes, restores) and isolation scenarios. ----

/// `row` without its NULL columns: a NULL column and an absent one mean the same (a column only
/// older events carried stays NULL on an instance that saw them, and is absent on one that did
/// not).
pub fn without_nulls(row: &Row) -> Row {
    row.iter()
        .filter(|(_, v)| !matches!(v, Value::Null))
        .map(|(c, v)| (c.clone(), v.clone()))
        .collect()
}

/// The row SQLite must hold for a published row, value by value with its storage class
/// (`typeof()`): integer, real, text and blob stay what they are, a bool is the integer 0 or 1
/// (SQLite has no boolean class), json is its text; NULL columns are left out (see
/// [`without_nulls`]).
pub fn sqlite_expected_row(row: &Row) -> Row {
    row.iter()
        .filter_map(|(c, v)| {
            let v = match v {
                Value::Null => return None,
                Value::Bool(b) => Value::I64(i64::from(*b)),
                Value::Json(j) => Value::Text(j.to_string()),
                other => other.clone(),
            };
            Some((c.clone(), v))
        })
        .collect()
}

/// Asserts that two sets of rows (key → row) are equal value by value, types included (an
/// integer 1, a real 1.0 and a text "1" all differ), NULL columns counting as absent. `have`
/// is what an instance holds, `want` the expectation; the message names up to five differing
/// rows.
pub fn assert_rows_typed_equal(
    what: &str,
    have: &BTreeMap<String, Row>,
    want: &BTreeMap<String, Row>,
) -> Result<()> {
    check_same_keys(what, have, want)?;
    let mut diffs = Vec::new();
    let mut count = 0;
    for (key, want_row) in want {
        let (h, w) = (without_nulls(&have[key]), without_nulls(want_row));
        if h != w {
            count += 1;
            if diffs.len() < 5 {
                let columns: Vec<String> = h
                    .keys()
                    .chain(w.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .filter(|c| h.get(*c) != w.get(*c))
                    .map(|c| format!("{c}: have {:?}, want {:?}", h.get(c), w.get(c)))
                    .collect();
                diffs.push(format!("row {key}: {}", columns.join("; ")));
            }
        }
    }
    if count > 0 {
        bail!(
            "{what}: {count} of {} rows differ, e.g.\n  {}",
            want.len(),
            diffs.join("\n  ")
        );
    }
    Ok(())
}

impl Instance {
    /// The instance's data files in its directory: every file named `<instance>.*` (the redb
    /// checkpoint store, the SQLite file with its `-wal`/`-shm`, the redb replica); not the
    /// config or the run logs.
    pub fn data_files(&self) -> Result<Vec<PathBuf>> {
        let prefix = format!("{}.", self.name);
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file()
                && entry.file_name().to_string_lossy().starts_with(&prefix)
            {
                files.push(entry.path());
            }
        }
        files.sort();
        Ok(files)
    }

    /// Copies the data files of this (stopped) instance into `backup` (created; emptied
    /// first), as an operator's file-level backup would.
    pub fn backup_files(&self, backup: &Path) -> Result<()> {
        ensure!(
            self.child.is_none(),
            "instance {} must be stopped for a file backup",
            self.name
        );
        if backup.exists() {
            fs::remove_dir_all(backup)?;
        }
        fs::create_dir_all(backup)?;
        for file in self.data_files()? {
            let name = file.file_name().context("data file without a name")?;
            fs::copy(&file, backup.join(name))
                .with_context(|| format!("copying {}", file.display()))?;
        }
        Ok(())
    }

    /// Puts a backup taken with [`Instance::backup_files`] back in place of this (stopped)
    /// instance's data files: every current data file is removed (a newer `-wal` must not
    /// survive next to an older database), then the copies are restored.
    pub fn restore_files(&self, backup: &Path) -> Result<()> {
        ensure!(
            self.child.is_none(),
            "instance {} must be stopped for a file restore",
            self.name
        );
        for file in self.data_files()? {
            fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        }
        for entry in fs::read_dir(backup)? {
            let entry = entry?;
            fs::copy(entry.path(), self.dir.join(entry.file_name()))
                .with_context(|| format!("restoring {}", entry.path().display()))?;
        }
        Ok(())
    }

    /// `parked list --json` of this instance (works while `run` is running).
    pub fn parked(&self) -> Result<Vec<serde_json::Value>> {
        let list = self.cli_json(&["parked", "list"])?;
        list.as_array()
            .cloned()
            .with_context(|| format!("parked list --json is not an array: {list}"))
    }
}

/// Copies every table of Postgres schema `from` into schema `to` (which must exist and be
/// empty) with `CREATE TABLE .. AS TABLE ..`: a backup of an instance's database, fence
/// (`jetsync_offsets`) included.
pub fn postgres_backup_schema(url: &str, from: &str, to: &str) -> Result<()> {
    postgres_exec(
        url,
        &format!(
            "DO $$ DECLARE t text; BEGIN \
               FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = '{from}' LOOP \
                 EXECUTE format('CREATE TABLE %I.%I AS TABLE %I.%I', '{to}', t, '{from}', t); \
               END LOOP; \
             END $$;"
        ),
    )
}

/// Restores a backup taken with [`postgres_backup_schema`]: empties every table of schema
/// `into`, then copies every table of `backup` back into it, in one transaction.
pub fn postgres_restore_schema(url: &str, backup: &str, into: &str) -> Result<()> {
    postgres_exec(
        url,
        &format!(
            "DO $$ DECLARE t text; BEGIN \
               FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = '{into}' LOOP \
                 EXECUTE format('DELETE FROM %I.%I', '{into}', t); \
               END LOOP; \
               FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = '{backup}' LOOP \
                 EXECUTE format('INSERT INTO %I.%I SELECT * FROM %I.%I', '{into}', t, '{backup}', t); \
               END LOOP; \
             END $$;"
        ),
    )
}

/// The first and last sequence a stream holds.
pub async fn stream_bounds(url: &str, stream: &str) -> Result<(u64, u64)> {
    let nats = async_nats::connect(url).await?;
    let state = async_nats::jetstream::new(nats)
        .get_stream(stream)
        .await?
        .info()
        .await?
        .state
        .clone();
    Ok((state.first_sequence, state.last_sequence))
}

/// A publishing client of `stream` connected to every node of `cluster` (so that a node kill
/// moves it to another), with `origin` as its instance id.
pub async fn cluster_client(
    cluster: &jetsync_testkit::Cluster,
    stream: jetsync::StreamConfig,
    origin: &str,
) -> Result<jetsync::Client> {
    let nats = async_nats::connect(cluster.urls()).await?;
    Ok(jetsync::Client::from_nats(nats, stream, origin)?)
}

// ---- Helpers for the transaction scenarios (issue #13). ----

/// Whether the `nats-server` the tests run supports atomic batches (transactions): 2.12.1 or
/// later. On an older one it prints the loud `SKIPPED` line for `test` and returns `false`.
pub fn transactions_supported(test: &str) -> bool {
    server_at_least(test, (2, 12, 1), "needs nats-server >= 2.12.1")
}

/// Whether the `nats-server` the tests run is at least `min`. On an older one it prints the
/// loud line `<test>: SKIPPED (<why>, running <version>)` and returns `false`.
pub fn server_at_least(test: &str, min: (u64, u64, u64), why: &str) -> bool {
    let version = jetsync_testkit::server_version().unwrap_or_else(|e| format!("unknown ({e})"));
    if version_at_least(&version, min) {
        return true;
    }
    // Written to the process's stderr directly: the test harness captures `eprintln!` of a
    // passing test, and a skip must be seen in the suite's output.
    let _ = writeln!(
        std::io::stderr().lock(),
        "{test}: SKIPPED ({why}, running {version})"
    );
    false
}

/// Whether a version text like `2.12.8` (or `2.12.8-beta`) is at least `min`.
pub fn version_at_least(version: &str, min: (u64, u64, u64)) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let have = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    have >= min
}

/// One member of a transaction written with plain async-nats, the way a publisher in another
/// language writes one (DESIGN section 3): a json/1 event on the row's subject, plus the batch
/// headers [`raw_transaction`] adds.
#[derive(Debug, Clone)]
pub struct RawMember {
    /// The row's subject, `<prefix>.<table>.<key-token>`.
    pub subject: String,
    /// The json/1 body.
    pub body: Vec<u8>,
    /// `Nats-Msg-Id`, when set.
    pub msg_id: Option<String>,
    /// `Nats-Expected-Last-Subject-Sequence` (compare-and-set), when set.
    pub expected_last_subject_seq: Option<u64>,
}

impl RawMember {
    /// A json/1 upsert of `row` (a JSON object) on `subject`, with message id `msg_id`.
    pub fn upsert(subject: impl Into<String>, row: serde_json::Value, msg_id: &str) -> RawMember {
        let body = serde_json::json!({
            "op": "upsert", "row": row, "origin": "raw-publisher", "ts_ms": 1_764_000_000_000u64, "schema": 1
        });
        RawMember {
            subject: subject.into(),
            body: serde_json::to_vec(&body).expect("a JSON value serializes"),
            msg_id: Some(msg_id.to_owned()),
            expected_last_subject_seq: None,
        }
    }

    /// A json/1 delete on `subject`, with message id `msg_id`.
    pub fn delete(subject: impl Into<String>, msg_id: &str) -> RawMember {
        let body = serde_json::json!({"op": "delete", "origin": "raw-publisher", "ts_ms": 1_764_000_000_000u64});
        RawMember {
            subject: subject.into(),
            body: serde_json::to_vec(&body).expect("a JSON value serializes"),
            msg_id: Some(msg_id.to_owned()),
            expected_last_subject_seq: None,
        }
    }

    /// The headers of this member as member `n` (1-based) of batch `batch_id`.
    pub fn headers(&self, batch_id: &str, n: usize, commit: bool) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(jetsync::codec::FORMAT_HEADER, "json/1");
        if let Some(id) = &self.msg_id {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        if let Some(seq) = self.expected_last_subject_seq {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                seq.to_string().as_str(),
            );
        }
        headers.insert(jetsync::transaction::BATCH_ID_HEADER, batch_id);
        headers.insert(
            jetsync::transaction::BATCH_SEQUENCE_HEADER,
            n.to_string().as_str(),
        );
        if commit {
            headers.insert(jetsync::transaction::BATCH_COMMIT_HEADER, "1");
        }
        headers
    }
}

/// The server's answer to a raw transaction's commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawCommit {
    /// Stored: the commit member's sequence and the member count.
    Stored {
        /// Stream sequence of the last (commit) member.
        seq: u64,
        /// Members stored.
        count: u64,
    },
    /// Refused as a whole: the JetStream error code and description.
    Refused {
        /// `err_code` of the JetStream API error.
        err_code: u64,
        /// Its description.
        description: String,
    },
}

/// Writes `members` as one atomic batch `batch_id` with plain async-nats: the first member as a
/// request (the server answers it with an empty message, or an error), the middle ones as plain
/// publishes, the last one with `Nats-Batch-Commit: 1` as a request answered by the PubAck.
/// With `commit = false` the last member is sent without the commit header and nothing is
/// awaited after the connection is flushed (an open batch); `None` is returned then.
pub async fn raw_transaction(
    nats: &async_nats::Client,
    batch_id: &str,
    members: &[RawMember],
    commit: bool,
) -> Result<Option<RawCommit>> {
    ensure!(!members.is_empty(), "a transaction needs a member");
    let timeout = Duration::from_secs(10);
    let last = members.len();
    for (i, member) in members.iter().enumerate() {
        let n = i + 1;
        let is_commit = commit && n == last;
        let headers = member.headers(batch_id, n, is_commit);
        if n == 1 || is_commit {
            let request = async_nats::Request::new()
                .headers(headers)
                .payload(member.body.clone().into())
                .timeout(Some(timeout));
            let reply = nats
                .send_request(member.subject.clone(), request)
                .await
                .with_context(|| format!("batch {batch_id} member {n}"))?;
            if let Some(refused) = parse_refusal(&reply.payload)? {
                return Ok(Some(refused));
            }
            if is_commit {
                let ack: serde_json::Value = serde_json::from_slice(&reply.payload)
                    .with_context(|| format!("commit ack {:?}", reply.payload))?;
                let seq = ack["seq"].as_u64().with_context(|| format!("ack {ack}"))?;
                let count = ack["count"]
                    .as_u64()
                    .or_else(|| ack["batch_size"].as_u64())
                    .with_context(|| format!("ack without a count: {ack}"))?;
                return Ok(Some(RawCommit::Stored { seq, count }));
            }
        } else {
            nats.publish_with_headers(member.subject.clone(), headers, member.body.clone().into())
                .await?;
        }
    }
    nats.flush().await?;
    Ok(None)
}

/// The JetStream error in a reply, if it is one (an empty reply is a plain "received").
fn parse_refusal(payload: &[u8]) -> Result<Option<RawCommit>> {
    if payload.is_empty() {
        return Ok(None);
    }
    let reply: serde_json::Value = serde_json::from_slice(payload)
        .with_context(|| format!("reply {:?}", String::from_utf8_lossy(payload)))?;
    Ok(reply.get("error").map(|e| RawCommit::Refused {
        err_code: e["err_code"].as_u64().unwrap_or(0),
        description: e["description"].as_str().unwrap_or_default().to_owned(),
    }))
}

/// Turns on atomic batch publish (`allow_atomic`) on `stream` unless it is on already; returns
/// whether it had to (provisioning with `stream.transactions = true` should have done it).
pub async fn ensure_allow_atomic(url: &str, stream: &str) -> Result<bool> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let mut handle = js.get_stream(stream).await?;
    let mut config = handle.info().await?.config.clone();
    if config.allow_atomic_publish {
        return Ok(false);
    }
    config.allow_atomic_publish = true;
    js.update_stream(&config).await?;
    Ok(true)
}

/// Every message `stream` holds, in sequence order, as (seq, subject, headers), read with
/// direct gets from its first to its last sequence (gaps skipped).
pub async fn stream_messages(
    url: &str,
    stream: &str,
) -> Result<Vec<(u64, String, Option<async_nats::HeaderMap>)>> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let handle = js.get_stream(stream).await?;
    let (first, last) = stream_bounds(url, stream).await?;
    let mut out = Vec::new();
    if last == 0 {
        return Ok(out);
    }
    for seq in first..=last {
        match handle.direct_get(seq).await {
            Ok(message) => out.push((seq, message.subject.to_string(), Some(message.headers))),
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                continue
            }
            Err(e) => return Err(e).with_context(|| format!("direct get {stream} seq {seq}")),
        }
    }
    Ok(out)
}
