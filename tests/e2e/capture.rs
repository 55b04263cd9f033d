//! Capture (issue #14): services keep writing plain SQL to their own database, jetsync publishes
//! what they commit, and every instance applies it.
//!
//! - Acceptance on SQLite: three instances, each with its own SQLite file and its own "service"
//!   (`examples/capture/service.py`, a separate Python process using only `sqlite3`) writing
//!   5,000 random inserts, updates and deletes over 500 keys, a third of them in multi-row
//!   transactions. The appliers are SIGKILLed (and restarted) at least 10 times during it and
//!   one instance is stopped for a while. At the end all three databases are identical (rows
//!   and `digest`), every captured change was published exactly once, and no outbox row is
//!   left.
//! - The same on Postgres (three schemas), the service being `tests/bin/capture_pg_service.rs`,
//!   whose transactions sometimes commit out of outbox-id order (two connections).
//! - Out-of-order commits on Postgres, deterministically: T1 takes an outbox id, T2 a later one
//!   and commits first, and is seen on the other instance; T1 commits after; both are
//!   published.
//! - Bank (2.12 only): transfers in local transactions on every instance; a reader polling
//!   every instance's database sees the constant sum in every read.
//! - No echo: events applied on an instance (published by another instance's capture, or by
//!   `jetsync-applier publish`) create no outbox entries there; a write on A shows up in B.
//! - On 2.9.10, `run` with a captured table refuses to start unless `capture.atomic = false`,
//!   naming the server version.
//!
//! "Exactly once" is counted in the stream itself: every published outbox entry carries
//! `Nats-Msg-Id` = `<instance>-<outbox id>`, the stream keeps every event of a row (`history`
//! 64, checked), and the services report how many rows their committed transactions changed;
//! per instance, the number of distinct message ids must equal that count, and no message id
//! may be stored twice. An applied event captured again (an echo) would add ids; a lost or
//! skipped outbox entry would miss one; a republish after a kill that the server did not
//! deduplicate would store one twice.
//!
//! Atomic capture (one local transaction = one atomic batch) needs nats-server 2.12.1 or later:
//! on an older server these tests run with `capture.atomic = false` (per-row publishing) and
//! skip loudly what cannot hold there (the bank invariant). `JETSYNC_E2E_SEED` replays the random
//! choices (timing still varies).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt as _;
use jetsync::Row;
use jetsync_e2e::{
    assert_rows_typed_equal, heavy, http_get, postgres_rows, postgres_url, sqlite_rows,
    version_at_least, wait_http_up, wait_until, Group, Instance, PgSchema, SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::convergence::digest_of;
use crate::crash::{runtime, seed, CATCH_UP, STOP};

/// Events per row the stream keeps: every event of the scenarios' rows, so the stream can be
/// counted by message id (checked: no subject may reach it).
const HISTORY: usize = 64;
/// Writes of each instance's service in the acceptance scenarios.
const WRITES: usize = 5_000;
/// Keys the services write.
const KEYS: usize = 500;
/// Share of the writes made inside multi-row transactions.
const TX_FRACTION: f64 = 1.0 / 3.0;
/// Pace of each service, writes per second: slow enough that the kills land during the writes
/// (5,000 writes take about 12 s), fast enough to keep the test short.
const SERVICE_RATE: u32 = 400;
/// SIGKILLs of appliers during an acceptance scenario, at least.
const MIN_KILLS: usize = 10;
/// Upper bound on kills (the loop also ends once the services are done and MIN_KILLS hit).
const MAX_KILLS: usize = 30;
/// Delay between two kills, milliseconds.
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 200..=700;
/// The stopped instance goes down at this kill and comes back at `RESTART_AT_KILL`.
const STOP_AT_KILL: usize = 2;
/// See `STOP_AT_KILL`.
const RESTART_AT_KILL: usize = 6;
/// Bound on a service's whole run.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(240);
/// Share of the Postgres service's transactions that are out-of-order pairs.
const PG_INTERLEAVE: f64 = 0.05;

/// The outbox table capture installs (in the SQLite file; in the sink's Postgres schema).
const OUTBOX: &str = "jetsync_outbox";

// ---- The services (separate processes writing plain SQL). ----

/// The example service, `examples/capture/service.py`.
fn service_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/capture/service.py")
}

/// The Python interpreter: `JETSYNC_E2E_PYTHON`, else `python3` on PATH.
fn python() -> String {
    std::env::var("JETSYNC_E2E_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// What a service reported at its end.
#[derive(Debug, Clone, Copy, Default)]
struct Summary {
    /// Writes (bank: transfers) done.
    writes: u64,
    /// Rows changed by committed transactions: the changes capture must publish.
    changes: u64,
}

/// A running service process, killed (and reaped) when dropped. A thread reads its stdout:
/// `{"progress": n}` lines and the final `{"done": true, ...}` summary.
struct Service {
    name: String,
    child: Option<Child>,
    progress: Arc<AtomicU64>,
    summary: Arc<Mutex<Option<serde_json::Value>>>,
    stderr: PathBuf,
}

impl Service {
    /// Spawns `cmd` as service `name` (its stderr goes to `<scratch>/<name>.err`).
    fn spawn(name: &str, mut cmd: Command, scratch: &Path) -> Result<Service> {
        let stderr = scratch.join(format!("{name}.err"));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("spawning service {name}"))?;
        let stdout = child.stdout.take().context("service stdout")?;
        let progress = Arc::new(AtomicU64::new(0));
        let summary = Arc::new(Mutex::new(None));
        let (p, s) = (progress.clone(), summary.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Some(n) = value.get("progress").and_then(serde_json::Value::as_u64) {
                    p.store(n, Ordering::Relaxed);
                }
                if value.get("done").is_some() {
                    *s.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
                }
            }
        });
        Ok(Service {
            name: name.into(),
            child: Some(child),
            progress,
            summary,
            stderr,
        })
    }

    /// The Python example service on SQLite file `db` with `args`.
    fn python(name: &str, db: &Path, args: &[String], scratch: &Path) -> Result<Service> {
        let mut cmd = Command::new(python());
        cmd.arg(service_script()).arg(db).args(args);
        Service::spawn(name, cmd, scratch)
    }

    /// The Postgres service on `schema`.
    fn postgres(
        name: &str,
        url: &str,
        schema: &str,
        writes: usize,
        seed: u64,
        scratch: &Path,
    ) -> Result<Service> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capture-pg-service"));
        cmd.args([
            url,
            schema,
            &writes.to_string(),
            &KEYS.to_string(),
            &TX_FRACTION.to_string(),
            &seed.to_string(),
            &SERVICE_RATE.to_string(),
            &PG_INTERLEAVE.to_string(),
        ]);
        Service::spawn(name, cmd, scratch)
    }

    /// Writes reported so far.
    fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// `Ok(true)` once the process exited successfully; fails if it exited otherwise.
    fn finished(&mut self) -> Result<bool> {
        let Some(child) = self.child.as_mut() else {
            return Ok(true);
        };
        match child.try_wait()? {
            None => Ok(false),
            Some(status) if status.success() => Ok(true),
            Some(status) => bail!(
                "service {} exited with {status}:\n{}",
                self.name,
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            ),
        }
    }

    /// Waits for the process to exit successfully and returns its summary.
    fn wait(&mut self, timeout: Duration) -> Result<Summary> {
        let name = self.name.clone();
        wait_until(
            &format!("service {name} to finish"),
            timeout,
            || match self.finished() {
                Ok(true) => Some(Ok(())),
                Ok(false) => None,
                Err(e) => Some(Err(e)),
            },
        )??;
        // The reader thread sees the summary line before the pipe closes.
        let value = wait_until(
            &format!("the summary of service {name}"),
            Duration::from_secs(10),
            || {
                self.summary
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            },
        )?;
        let field = |f: &str| {
            value
                .get(f)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("service {name}: summary without {f}: {value}"))
        };
        Ok(Summary {
            writes: field("writes")?,
            changes: field("changes")?,
        })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the example service once to completion (e.g. `--init`), failing on a non-zero exit.
fn python_once(db: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(python())
        .arg(service_script())
        .arg(db)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} (python3 is needed)", python()))?;
    ensure!(
        out.status.success(),
        "service.py {args:?} exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

// ---- Instances with capture. ----

/// Where an instance's service writes: its SQLite file, or its Postgres schema.
#[derive(Debug, Clone)]
enum Db {
    Sqlite(PathBuf),
    Postgres { url: String, schema: String },
}

impl Db {
    /// Rows of `table`, keyed by `id`.
    async fn rows(&self, table: &str) -> Result<BTreeMap<String, Row>> {
        match self {
            Db::Sqlite(path) => sqlite_rows(path, table, "id"),
            Db::Postgres { url, schema } => postgres_rows(url, schema, table, "id").await,
        }
    }

    /// Rows left in the outbox.
    async fn outbox_len(&self) -> Result<u64> {
        match self {
            Db::Sqlite(path) => {
                let conn = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )?;
                conn.busy_timeout(Duration::from_secs(10))?;
                let n: i64 = conn
                    .query_row(&format!("SELECT count(*) FROM {OUTBOX}"), [], |r| r.get(0))
                    .with_context(|| format!("counting {OUTBOX} in {}", path.display()))?;
                Ok(n as u64)
            }
            Db::Postgres { url, schema } => {
                let (client, connection) =
                    tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                let conn = tokio::spawn(connection);
                let row = client
                    .query_one(&format!("SELECT count(*) FROM \"{schema}\".{OUTBOX}"), &[])
                    .await
                    .with_context(|| format!("counting {schema}.{OUTBOX}"))?;
                drop(client);
                let _ = conn.await;
                Ok(row.get::<_, i64>(0) as u64)
            }
        }
    }
}

/// Whether this server publishes captured transactions atomically (2.12.1+); otherwise the
/// instances run with `capture.atomic = false`.
fn atomic_server() -> bool {
    let version = jetsync_testkit::server_version().unwrap_or_default();
    version_at_least(&version, (2, 12, 1))
}

/// An instance of `group` (SQLite unless `postgres` is given) with capture on `table`, every
/// event of a row kept, and `capture.atomic = false` on servers without atomic batches.
fn capture_instance(
    group: &Group,
    root: &Path,
    name: &str,
    table: &str,
    postgres: Option<&PgSchema>,
) -> Result<(Instance, Db)> {
    let instance = Instance::new(group, root, name, SinkKind::Sqlite)?;
    instance.set_option(&format!("tables.{table}"), "capture", "true")?;
    instance.set_stream_option("history", &HISTORY.to_string())?;
    if !atomic_server() {
        instance.set_option("capture", "atomic", "false")?;
    }
    let db = match postgres {
        Some(schema) => {
            instance.use_postgres(&schema.url, &schema.name)?;
            Db::Postgres {
                url: schema.url.clone(),
                schema: schema.name.clone(),
            }
        }
        None => Db::Sqlite(instance.sqlite_path()),
    };
    Ok((instance, db))
}

/// `capture install`, twice (it is idempotent).
fn install(instance: &Instance) -> Result<()> {
    for round in 1..=2 {
        let (code, out, err) = instance.cli(&["capture", "install"])?;
        ensure!(
            code == 0,
            "{}: capture install (round {round}) exited {code}: {out}{err}",
            instance.name
        );
    }
    Ok(())
}

/// A group with one table, `table` keyed by `id`.
fn group_with(url: &str, stream: &str, table: &str) -> Group {
    let mut group = Group::new(url, stream, &stream.to_lowercase());
    group.tables.clear();
    group.tables.insert(table.into(), "id".into());
    group
}

/// Finds the first object under key `key` anywhere in `value` (the status JSON nests the
/// capture figures per sync group).
fn find_key<'a>(value: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|v| find_key(v, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|v| find_key(v, key)),
        _ => None,
    }
}

/// `capture.backlog` and `capture.published` of `status --json`.
fn capture_status(instance: &Instance) -> Result<(u64, u64)> {
    let status = instance.status()?;
    let capture = find_key(&status, "capture")
        .with_context(|| format!("{}: status --json without capture: {status}", instance.name))?;
    let number = |f: &str| {
        capture
            .get(f)
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("{}: status capture without {f}: {capture}", instance.name))
    };
    Ok((number("backlog")?, number("published")?))
}

// ---- Counting the stream by message id. ----

/// Every message of a stream, counted by `Nats-Msg-Id`.
#[derive(Debug, Default)]
struct Census {
    /// Message id → times stored.
    ids: BTreeMap<String, u64>,
    /// Messages without a message id.
    without_id: u64,
    /// Messages of the subject holding the most.
    max_per_subject: usize,
    /// Messages read.
    total: u64,
}

impl Census {
    /// Reads every message of `stream` through an ordered consumer.
    async fn read(url: &str, stream: &str) -> Result<Census> {
        use async_nats::jetstream::consumer::{pull, DeliverPolicy};
        let js = async_nats::jetstream::new(async_nats::connect(url).await?);
        let mut handle = js.get_stream(stream).await?;
        let state = handle.info().await?.state.clone();
        let mut census = Census::default();
        if state.messages == 0 {
            return Ok(census);
        }
        let consumer = handle
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let mut per_subject: BTreeMap<String, usize> = BTreeMap::new();
        while census.total < state.messages {
            let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .with_context(|| {
                    format!(
                        "reading {stream}: {} of {} messages within 30 s",
                        census.total, state.messages
                    )
                })?
                .context("the ordered consumer ended")?
                .map_err(|e| anyhow::anyhow!("reading {stream}: {e}"))?;
            let seq = message
                .info()
                .map_err(|e| anyhow::anyhow!("message info: {e}"))?
                .stream_sequence;
            census.total += 1;
            *per_subject.entry(message.subject.to_string()).or_default() += 1;
            match message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned())
            {
                Some(id) => *census.ids.entry(id).or_default() += 1,
                None => census.without_id += 1,
            }
            if seq >= state.last_sequence {
                break;
            }
        }
        census.max_per_subject = per_subject.values().copied().max().unwrap_or(0);
        Ok(census)
    }

    /// Outbox ids published by `instance` (ids `<instance>-<number>`), with their counts.
    fn of(&self, instance: &str) -> BTreeMap<u64, u64> {
        let prefix = format!("{instance}-");
        self.ids
            .iter()
            .filter_map(|(id, n)| {
                let rest = id.strip_prefix(&prefix)?;
                rest.parse::<u64>().ok().map(|outbox_id| (outbox_id, *n))
            })
            .collect()
    }

    /// Asserts exactly-once publication: the stream kept every event (no subject reached the
    /// history limit), no message id is stored twice, and each instance published exactly as
    /// many distinct outbox entries as its services' committed changes. `others` messages
    /// (published another way, e.g. `jetsync-applier publish`) may carry other ids.
    fn assert_exactly_once(&self, expected: &[(&str, u64)], others: u64) -> Result<()> {
        ensure!(
            self.max_per_subject < HISTORY,
            "test data: a subject holds {} messages, the stream keeps {HISTORY}: the count by message id would be incomplete",
            self.max_per_subject
        );
        let doubled: Vec<(&String, &u64)> = self.ids.iter().filter(|(_, n)| **n > 1).collect();
        ensure!(
            doubled.is_empty(),
            "{} message ids stored more than once, e.g. {:?}",
            doubled.len(),
            &doubled[..doubled.len().min(10)]
        );
        ensure!(
            self.without_id == 0,
            "{} messages without Nats-Msg-Id",
            self.without_id
        );
        let mut attributed = 0;
        for (instance, changes) in expected {
            let ids = self.of(instance);
            attributed += ids.len() as u64;
            ensure!(
                ids.len() as u64 == *changes,
                "instance {instance}: {} outbox entries published (ids {:?} .. {:?}), its service committed {changes} changes",
                ids.len(),
                ids.keys().next(),
                ids.keys().next_back(),
            );
        }
        ensure!(
            self.total == attributed + others,
            "the stream holds {} messages: {attributed} from the instances' outboxes, {others} published otherwise expected",
            self.total
        );
        Ok(())
    }
}

// ---- The acceptance scenario (SQLite and Postgres). ----

/// Waits until no outbox row is left on any instance, then until every instance applied the
/// stream's last sequence; returns it.
async fn drain(url: &str, stream: &str, instances: &mut [Instance], dbs: &[Db]) -> Result<u64> {
    let started = Instant::now();
    let deadline = started + CATCH_UP;
    let mut backlogs = Vec::new();
    for (instance, db) in instances.iter().zip(dbs) {
        backlogs.push((instance.name.clone(), db.outbox_len().await?));
    }
    for (instance, db) in instances.iter_mut().zip(dbs) {
        loop {
            ensure!(
                instance.is_running(),
                "{} exited:\n{}",
                instance.name,
                instance.log()
            );
            let left = db.outbox_len().await?;
            if left == 0 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{}: {left} outbox rows still left after {CATCH_UP:?}:\n{}",
                instance.name,
                instance.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let outboxes_empty = started.elapsed();
    let (_, last) = jetsync_e2e::stream_bounds(url, stream).await?;
    let mut behind = Vec::new();
    for instance in instances.iter() {
        behind.push((
            instance.name.clone(),
            last - instance.applied(stream).min(last),
        ));
    }
    for instance in instances.iter_mut() {
        instance.wait_applied(stream, last, CATCH_UP)?;
    }
    eprintln!(
        "{stream}: outbox backlogs {backlogs:?} published in {:.1} s; then behind the stream end {behind:?}, applied in {:.1} s",
        outboxes_empty.as_secs_f64(),
        (started.elapsed() - outboxes_empty).as_secs_f64()
    );
    Ok(last)
}

/// The sessions of the test database that are not idle, with what they wait for and which
/// sessions block them (for the message of a stalled scenario).
fn lock_report(url: &str) -> String {
    let url = url.to_owned();
    let report = std::thread::spawn(move || -> Result<String> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                let conn = tokio::spawn(connection);
                let rows = client
                    .query(
                        "SELECT pid, state, coalesce(wait_event_type || ':' || wait_event, ''), \
                                pg_blocking_pids(pid)::text, left(query, 160) \
                         FROM pg_stat_activity \
                         WHERE datname = current_database() AND pid <> pg_backend_pid() \
                           AND state IS DISTINCT FROM 'idle'",
                        &[],
                    )
                    .await?;
                drop(client);
                let _ = conn.await;
                let mut out = String::from("\nPostgres sessions not idle:");
                for r in rows {
                    out.push_str(&format!(
                        "\n  pid {} {:?} waits {:?} blocked by {} : {}",
                        r.get::<_, i32>(0),
                        r.get::<_, Option<String>>(1),
                        r.get::<_, String>(2),
                        r.get::<_, String>(3),
                        r.get::<_, Option<String>>(4).unwrap_or_default()
                    ));
                }
                Ok(out)
            })
    })
    .join();
    match report {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => format!("\n(no Postgres lock report: {e:#})"),
        Err(_) => "\n(no Postgres lock report: the query panicked)".into(),
    }
}

/// SIGKILLs (and restarts) random running instances every few hundred milliseconds until
/// every service finished and at least `MIN_KILLS` kills happened; instance `stopped` is
/// stopped (SIGTERM) at kill `STOP_AT_KILL` and started again at `RESTART_AT_KILL`. Returns
/// the kill count. With `postgres`, a timeout names the sessions still waiting there and who
/// blocks them.
fn chaos(
    rng: &mut StdRng,
    instances: &mut [Instance],
    services: &mut [Service],
    stopped: Option<usize>,
    postgres: Option<&str>,
) -> Result<usize> {
    let deadline = Instant::now() + SERVICE_TIMEOUT;
    let mut kills = 0;
    let mut down = false;
    loop {
        let mut all_done = true;
        for s in services.iter_mut() {
            all_done &= s.finished()?;
        }
        if all_done && (kills >= MIN_KILLS || kills >= MAX_KILLS) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "services still writing after {SERVICE_TIMEOUT:?}: progress {:?}{}",
            services
                .iter()
                .map(|s| (s.name.clone(), s.progress()))
                .collect::<Vec<_>>(),
            postgres.map(lock_report).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(rng.gen_range(KILL_DELAY_MS)));
        if kills >= MAX_KILLS {
            continue;
        }
        if let Some(i) = stopped {
            if kills == STOP_AT_KILL && !down {
                let code = instances[i].stop(STOP)?;
                ensure!(code == 0, "{} exited {code} on SIGTERM", instances[i].name);
                down = true;
            } else if kills == RESTART_AT_KILL && down {
                instances[i].start()?;
                down = false;
            }
        }
        let running: Vec<usize> = (0..instances.len())
            .filter(|i| !(down && Some(*i) == stopped))
            .collect();
        let i = running[rng.gen_range(0..running.len())];
        let instance = &mut instances[i];
        ensure!(
            instance.is_running(),
            "{} exited by itself:\n{}",
            instance.name,
            instance.log()
        );
        instance.kill();
        instance.start()?;
        kills += 1;
    }
    if down {
        if let Some(i) = stopped {
            instances[i].start()?;
        }
    }
    Ok(kills)
}

/// Stops every instance with SIGTERM; each must exit 0.
fn stop_all(instances: &mut [Instance]) -> Result<()> {
    for instance in instances.iter_mut() {
        let code = instance.stop(STOP)?;
        ensure!(code == 0, "{} exited {code} on SIGTERM", instance.name);
    }
    Ok(())
}

/// Asserts that every instance's `table` equals the first one's (typed, row by row), that the
/// digests are equal at `last`, and that no outbox row is left; returns the row count.
async fn assert_identical(
    instances: &[Instance],
    dbs: &[Db],
    table: &str,
    last: u64,
) -> Result<usize> {
    let want = dbs[0].rows(table).await?;
    for (instance, db) in instances.iter().zip(dbs).skip(1) {
        let have = db.rows(table).await?;
        assert_rows_typed_equal(
            &format!("{} vs {}", instance.name, instances[0].name),
            &have,
            &want,
        )?;
    }
    let first = digest_of(&instances[0])?;
    ensure!(
        first.1 == last,
        "{} digest at seq {}, the stream ends at {last}",
        instances[0].name,
        first.1
    );
    for instance in &instances[1..] {
        let d = digest_of(instance)?;
        ensure!(
            d == first,
            "digests differ: {} {first:?} vs {} {d:?}",
            instances[0].name,
            instance.name
        );
    }
    for (instance, db) in instances.iter().zip(dbs) {
        let left = db.outbox_len().await?;
        ensure!(left == 0, "{}: {left} outbox rows left", instance.name);
        let (backlog, _) = capture_status(instance)?;
        ensure!(
            backlog == 0,
            "{}: status reports capture.backlog {backlog}",
            instance.name
        );
    }
    Ok(want.len())
}

/// For a failure message: every key whose row differs between the instances, with each
/// instance's row and the key's events in the stream (sequence, message id, op, row), so that
/// a divergence can be traced to the event an instance applied or skipped.
async fn diverged_histories(
    url: &str,
    stream: &str,
    instances: &[Instance],
    dbs: &[Db],
) -> Result<String> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    let mut views = Vec::new();
    for db in dbs {
        views.push(db.rows("items").await?);
    }
    let keys: std::collections::BTreeSet<&String> = views.iter().flat_map(|v| v.keys()).collect();
    let diverged: Vec<&String> = keys
        .into_iter()
        .filter(|k| views.iter().any(|v| v.get(*k) != views[0].get(*k)))
        .take(5)
        .collect();
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let handle = js.get_stream(stream).await?;
    let prefix = stream.to_lowercase();
    let mut out = String::from("diverged rows:");
    for key in diverged {
        out.push_str(&format!("\n  key {key}:"));
        for (instance, view) in instances.iter().zip(&views) {
            out.push_str(&format!("\n    {}: {:?}", instance.name, view.get(key)));
        }
        let subject = format!("{prefix}.items.{}", jetsync::encode_key(key)?);
        let consumer = handle
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                filter_subject: subject.clone(),
                ..Default::default()
            })
            .await?;
        let pending = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await?;
        for _ in 0..pending {
            let Ok(Some(Ok(message))) =
                tokio::time::timeout(Duration::from_secs(10), messages.next()).await
            else {
                break;
            };
            let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            let header = |name: &str| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            let event = jetsync::codec::decode_message(
                Some(header("Jetsync-Format").as_str()).filter(|f| !f.is_empty()),
                &message.payload,
            );
            out.push_str(&format!(
                "\n    seq {seq} id {} batch {:?}: {:?}",
                header("Nats-Msg-Id"),
                header("Nats-Batch-Sequence"),
                event.map(|e| e.change).map_err(|e| e.to_string())
            ));
        }
    }
    Ok(out)
}

/// The Postgres DDL of the services' table.
const PG_ITEMS: &str =
    "CREATE TABLE {schema}.items (id text PRIMARY KEY, n bigint, s text, f double precision);";

/// A Postgres schema name for this test process (`capturetest_` prefix).
fn schema_name(what: &str) -> String {
    format!("capturetest_{}_{what}", std::process::id())
}

/// Three instances, a service each, kills and a stop, then the checks (module comment).
async fn acceptance(scenario: &str, postgres: bool) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed(scenario));
    let started = Instant::now();
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let stream = if postgres { "CAPPG" } else { "CAPSQL" };
    let group = group_with(&server.url(), stream, "items");
    let url = postgres_url();
    let schemas = if postgres {
        (1..=3)
            .map(|i| PgSchema::create(&url, &schema_name(&format!("acc{i}")), PG_ITEMS))
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let names = ["cap1", "cap2", "cap3"];
    let mut instances = Vec::new();
    let mut dbs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (instance, db) = capture_instance(&group, root.path(), name, "items", schemas.get(i))?;
        if let Db::Sqlite(path) = &db {
            python_once(path, &["--init"])?;
        }
        install(&instance)?;
        instances.push(instance);
        dbs.push(db);
    }
    for instance in &mut instances {
        instance.start()?;
    }

    let mut services = Vec::new();
    for (instance, db) in instances.iter().zip(&dbs) {
        let service_seed: u64 = rng.gen();
        services.push(match db {
            Db::Sqlite(path) => Service::python(
                &format!("service-{}", instance.name),
                path,
                &[
                    "--ops".into(),
                    WRITES.to_string(),
                    "--keys".into(),
                    KEYS.to_string(),
                    "--tx-fraction".into(),
                    TX_FRACTION.to_string(),
                    "--rate".into(),
                    SERVICE_RATE.to_string(),
                    "--seed".into(),
                    service_seed.to_string(),
                ],
                root.path(),
            )?,
            Db::Postgres { url, schema } => Service::postgres(
                &format!("service-{}", instance.name),
                url,
                schema,
                WRITES,
                service_seed,
                root.path(),
            )?,
        });
    }
    let pg = postgres.then_some(url.as_str());
    let kills = chaos(&mut rng, &mut instances, &mut services, Some(2), pg)?;
    ensure!(kills >= MIN_KILLS, "only {kills} kills");
    let mut summaries = Vec::new();
    for s in &mut services {
        summaries.push(s.wait(SERVICE_TIMEOUT)?);
    }
    let written = started.elapsed();

    let last = drain(&server.url(), stream, &mut instances, &dbs).await?;
    let drained = started.elapsed();
    stop_all(&mut instances)?;
    let stopped = started.elapsed();
    let rows = match assert_identical(&instances, &dbs, "items", last).await {
        Ok(rows) => rows,
        Err(e) => {
            let histories = diverged_histories(&server.url(), stream, &instances, &dbs)
                .await
                .unwrap_or_else(|h| format!("(histories unavailable: {h})"));
            bail!("{e:#}\n{histories}");
        }
    };
    ensure!(rows > 0, "no rows left at all: the test data is degenerate");
    let compared = started.elapsed();

    let census = Census::read(&server.url(), stream).await?;
    let expected: Vec<(&str, u64)> = names
        .iter()
        .zip(&summaries)
        .map(|(n, s)| (*n, s.changes))
        .collect();
    census.assert_exactly_once(&expected, 0)?;
    ensure!(
        summaries
            .iter()
            .all(|s| s.writes == WRITES as u64 && s.changes > 0),
        "services: {summaries:?}"
    );
    eprintln!(
        "{scenario}: {} changes captured ({summaries:?}), {kills} kills, stream last seq {last}, {rows} rows; writes {:.1} s, drained {:.1} s, stopped {:.1} s, compared {:.1} s, total {:.1} s",
        census.total,
        written.as_secs_f64(),
        drained.as_secs_f64(),
        stopped.as_secs_f64(),
        compared.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(instances);
    drop(schemas);
    Ok(())
}

#[test]
fn acceptance_sqlite() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(acceptance("capture acceptance_sqlite", false))
}

#[test]
fn acceptance_postgres() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(acceptance("capture acceptance_postgres", true))
}

// ---- Postgres: commits out of outbox-id order. ----

/// T1 writes first (the lower outbox id) and stays open; T2 writes later, commits, and is
/// applied on the other instance (a relay reading past a high-water mark would now skip T1);
/// then T1 commits and must show up too.
#[test]
fn postgres_commits_out_of_id_order() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let url = postgres_url();
        let schemas = [
            PgSchema::create(&url, &schema_name("ooo_a"), PG_ITEMS)?,
            PgSchema::create(&url, &schema_name("ooo_b"), PG_ITEMS)?,
        ];
        let group = group_with(&server.url(), "CAPOOO", "items");
        let (mut a, db_a) =
            capture_instance(&group, root.path(), "ooa", "items", Some(&schemas[0]))?;
        let (mut b, db_b) =
            capture_instance(&group, root.path(), "oob", "items", Some(&schemas[1]))?;
        install(&a)?;
        install(&b)?;
        a.start()?;
        b.start()?;

        let connect = || async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            anyhow::Ok(client)
        };
        let (t1, t2) = (connect().await?, connect().await?);
        let insert = format!(
            "INSERT INTO \"{}\".items (id, n, s) VALUES ($1, $2, 'ooo')",
            schemas[0].name
        );
        t1.batch_execute("BEGIN").await?;
        t1.execute(&insert, &[&"t1", &1_i64]).await?;
        t2.batch_execute("BEGIN").await?;
        t2.execute(&insert, &[&"t2", &2_i64]).await?;
        t2.batch_execute("COMMIT").await?;

        let seen = |db: Db, key: &'static str| async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if db.rows("items").await?.contains_key(key) {
                    return anyhow::Ok(());
                }
                ensure!(Instant::now() < deadline, "{key} not applied within 60 s");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        };
        seen(db_b.clone(), "t2")
            .await
            .context("T2 (the later outbox id, committed first)")?;
        // The relay has published past T1's id; T1 commits now.
        t1.batch_execute("COMMIT").await?;
        seen(db_b.clone(), "t1")
            .await
            .with_context(|| format!("T1 (the earlier outbox id, committed last):\n{}", a.log()))?;

        let mut instances = [a, b];
        let dbs = [db_a, db_b];
        let last = drain(&server.url(), "CAPOOO", &mut instances, &dbs).await?;
        stop_all(&mut instances)?;
        assert_identical(&instances, &dbs, "items", last).await?;
        let census = Census::read(&server.url(), "CAPOOO").await?;
        census.assert_exactly_once(&[("ooa", 2), ("oob", 0)], 0)?;
        drop(instances);
        drop(schemas);
        Ok(())
    })
}

// ---- No echo; a write on A shows up in B. ----

/// Waits until `db`'s `items` has row `key` with `n` (`None`: until the row is gone).
async fn wait_row(db: &Db, key: &str, n: Option<i64>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = db.rows("items").await?;
        let have = rows.get(key).map(|r| r.get("n").cloned());
        let done = match n {
            Some(n) => have == Some(Some(jetsync::Value::I64(n))),
            None => have.is_none(),
        };
        if done {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "row {key}: have {have:?}, want n = {n:?} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `sql` on SQLite file `db` in one transaction, like a service would.
fn sqlite_write(db: &Db, sql: &str) -> Result<()> {
    let Db::Sqlite(path) = db else {
        bail!("not a SQLite instance")
    };
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.execute_batch(&format!("BEGIN IMMEDIATE; {sql}; COMMIT;"))?;
    Ok(())
}

#[test]
fn no_echo_and_live_sync() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = group_with(&server.url(), "CAPECHO", "items");
        let (mut a, db_a) = capture_instance(&group, root.path(), "echoa", "items", None)?;
        let (mut b, db_b) = capture_instance(&group, root.path(), "echob", "items", None)?;
        let addr_b = b.enable_http("")?;
        for (instance, db) in [(&a, &db_a), (&b, &db_b)] {
            let Db::Sqlite(path) = db else { unreachable!() };
            python_once(path, &["--init"])?;
            install(instance)?;
        }
        a.start()?;
        b.start()?;
        wait_http_up(addr_b, Duration::from_secs(60))?;

        // An event published with the CLI (no outbox anywhere) is applied on both.
        let deadline = Instant::now() + Duration::from_secs(60);
        while jetsync_e2e::stream_bounds(&server.url(), "CAPECHO")
            .await
            .is_err()
        {
            ensure!(
                Instant::now() < deadline,
                "stream CAPECHO not provisioned within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let (code, out, err) = a.cli(&[
            "publish",
            "--table",
            "items",
            "--key",
            "cli1",
            "--json",
            r#"{"id":"cli1","n":1,"s":"from the CLI"}"#,
        ])?;
        ensure!(code == 0, "publish exited {code}: {out}{err}");
        wait_row(&db_a, "cli1", Some(1)).await?;
        wait_row(&db_b, "cli1", Some(1)).await?;

        // A's service writes: B gets it (and neither captures the applied event again).
        sqlite_write(
            &db_a,
            "INSERT INTO items (id, n, s, f) VALUES ('w1', 10, 'a', 0.5)",
        )?;
        wait_row(&db_b, "w1", Some(10)).await?;
        // B's service writes a multi-row transaction: A gets all of it.
        sqlite_write(
            &db_b,
            "INSERT INTO items (id, n, s) VALUES ('w2', 20, 'b'); \
             INSERT INTO items (id, n, s) VALUES ('w3', 30, 'b'); \
             UPDATE items SET n = 11 WHERE id = 'w1'",
        )?;
        wait_row(&db_a, "w2", Some(20)).await?;
        wait_row(&db_a, "w3", Some(30)).await?;
        wait_row(&db_a, "w1", Some(11)).await?;
        // A deletes a row B wrote, and one the CLI published.
        sqlite_write(&db_a, "DELETE FROM items WHERE id IN ('w2', 'cli1')")?;
        wait_row(&db_b, "w2", None).await?;
        wait_row(&db_b, "cli1", None).await?;

        let mut instances = [a, b];
        let dbs = [db_a, db_b];
        let last = drain(&server.url(), "CAPECHO", &mut instances, &dbs).await?;
        // Outboxes stay empty once everything is applied (nothing captured late).
        for db in &dbs {
            ensure!(db.outbox_len().await? == 0, "outbox not empty after apply");
        }
        let metrics = http_get(addr_b, "/metrics")?;
        for name in ["jetsync_capture_backlog", "jetsync_capture_published_total"] {
            ensure!(
                metrics.body.contains(name),
                "/metrics lacks {name}:\n{}",
                metrics.body
            );
        }
        let (_, published_b) = capture_status(&instances[1])?;
        ensure!(
            published_b == 3,
            "echob: status capture.published {published_b}, its service committed 3 changes"
        );
        let census = Census::read(&server.url(), "CAPECHO").await?;
        // A: insert w1, delete w2, delete cli1; B: w2, w3, update w1; 1 event from the CLI.
        census.assert_exactly_once(&[("echoa", 3), ("echob", 3)], 1)?;
        ensure!(
            census.total == last,
            "{} messages, last seq {last}",
            census.total
        );
        stop_all(&mut instances)?;
        assert_identical(&instances, &dbs, "items", last).await?;
        Ok(())
    })
}

// ---- Read-modify-write on the origin. ----

/// Increments of one counter row committed one by one on instance A.
const INCREMENTS: i64 = 300;

/// A service incrementing a counter (`UPDATE .. SET n = n + 1`, one transaction each) while its
/// applier applies the echoes of its earlier increments: no increment may be lost, on A or on
/// B. An echo that overwrote A's row with an older image of A's own write would make the next
/// increment build on a stale value, and the stream would carry the loss to every instance.
#[test]
fn origin_read_modify_write_loses_nothing() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = group_with(&server.url(), "CAPRMW", "items");
        let (mut a, db_a) = capture_instance(&group, root.path(), "rmwa", "items", None)?;
        let (mut b, db_b) = capture_instance(&group, root.path(), "rmwb", "items", None)?;
        for (instance, db) in [(&a, &db_a), (&b, &db_b)] {
            let Db::Sqlite(path) = db else { unreachable!() };
            python_once(path, &["--init"])?;
            install(instance)?;
        }
        // DEBUG for the engine: whether its batches waited for the relay (below).
        a.start_with_log("info,async_nats=warn,jetsync_applier::apply=debug")?;
        b.start()?;
        sqlite_write(&db_a, "INSERT INTO items (id, n) VALUES ('counter', 0)")?;
        wait_row(&db_b, "counter", Some(0)).await?;
        let Db::Sqlite(path) = &db_a else { unreachable!() };
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        // Paced like a service (a tight loop would hold the write lock and keep the applier
        // out until it ends): echoes of earlier increments arrive between later ones.
        for _ in 0..INCREMENTS {
            conn.execute_batch(
                "BEGIN IMMEDIATE; UPDATE items SET n = n + 1 WHERE id = 'counter'; COMMIT;",
            )?;
            std::thread::sleep(Duration::from_millis(3));
        }
        drop(conn);
        let mut instances = [a, b];
        let dbs = [db_a, db_b];
        let last = drain(&server.url(), "CAPRMW", &mut instances, &dbs).await?;
        stop_all(&mut instances)?;
        for (instance, db) in instances.iter().zip(&dbs) {
            let n = db.rows("items").await?.get("counter").and_then(|r| r.get("n").cloned());
            if n != Some(jetsync::Value::I64(INCREMENTS)) {
                // The published values of the counter, where they fail to go up by one: an
                // increment made on top of an older value that an echo put back.
                let (_, out, _) = instances[0].cli_timeout(
                    &["tail", "--all", "--count", &last.to_string(), "--json"],
                    Duration::from_secs(60),
                )?;
                let values: Vec<i64> = out
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter_map(|v| v["row"]["n"].as_i64())
                    .collect();
                let steps: Vec<String> = values
                    .windows(2)
                    .filter(|w| w[1] != w[0] + 1)
                    .take(10)
                    .map(|w| format!("{} -> {}", w[0], w[1]))
                    .collect();
                bail!(
                    "{}: counter is {n:?} after {INCREMENTS} increments on rmwa (stream last seq {last}): \
                     an echo of an earlier increment overwrote a later one on the origin, and the \
                     next increment built on it; published values that do not go up by one: {steps:?}",
                    instance.name
                );
            }
        }
        assert_identical(&instances, &dbs, "items", last).await?;
        // The echo of an increment often reaches rmwa's engine while its relay is still
        // recording where the server stored it: the batch waits for the relay (DEBUG), it does
        // not fail into the backoff (a WARN, and 100 ms without applies on the origin).
        let log = instances[0].log();
        let waits = log.matches("batch waits for the capture relay").count();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("WARN") && l.contains("applying to the sink failed"))
        {
            bail!(
                "rmwa backed off while its own change was being published ({waits} quick waits \
                 besides): {line}"
            );
        }
        eprintln!("rmwa: {waits} batches waited for the relay");
        Ok(())
    })
}

// ---- The bank over captured transactions (2.12 only). ----

/// Accounts of the bank: each instance moves money between its own third of them (capture is
/// last-writer-wins per row: two instances moving money out of one account concurrently would
/// both publish a full balance, and the later one would erase the other's debit).
const ACCOUNTS: usize = 99;
/// Initial balance of every account.
const INITIAL: i64 = 1_000;
/// Transfers per instance (each changes two rows; every account stays well under `HISTORY`
/// events).
const TRANSFERS: usize = 600;
/// Pace of each bank service, transfers per second.
const TRANSFER_RATE: u32 = 150;
/// SIGKILLs during the bank, at least.
const BANK_MIN_KILLS: usize = 5;

/// What one reader thread saw.
#[derive(Debug, Default)]
struct Reads {
    reads: AtomicU64,
    with_rows: AtomicU64,
    violations: AtomicU64,
    examples: Mutex<Vec<String>>,
}

impl Reads {
    fn violation(&self, what: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let mut examples = self.examples.lock().unwrap_or_else(|e| e.into_inner());
        if examples.len() < 10 {
            examples.push(what);
        }
    }
}

/// Polls `SELECT count(*), sum(balance) FROM accounts` on SQLite file `path` until `stop`:
/// a read that finds rows must find all accounts holding the initial total.
fn bank_reader(path: PathBuf, reads: Arc<Reads>, stop: Arc<AtomicBool>) {
    let conn = match rusqlite::Connection::open_with_flags(
        &path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) {
        Ok(c) => c,
        Err(e) => return reads.violation(format!("open: {e}")),
    };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    let total = ACCOUNTS as i64 * INITIAL;
    while !stop.load(Ordering::Relaxed) {
        match conn.query_row("SELECT count(*), sum(balance) FROM accounts", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?))
        }) {
            Ok((count, sum)) => {
                reads.reads.fetch_add(1, Ordering::Relaxed);
                if count > 0 {
                    reads.with_rows.fetch_add(1, Ordering::Relaxed);
                    if count != ACCOUNTS as i64 || sum != Some(total) {
                        reads.violation(format!("count {count}, sum {sum:?}"));
                    }
                }
            }
            Err(e) if e.to_string().contains("locked") || e.to_string().contains("busy") => {}
            Err(e) => reads.violation(format!("read error: {e}")),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn bank_over_captured_transactions() -> Result<()> {
    let _heavy = heavy();
    if !jetsync_e2e::server_at_least(
        "bank_over_captured_transactions",
        (2, 12, 1),
        "captured transactions are atomic only on nats-server >= 2.12.1",
    ) {
        return Ok(());
    }
    runtime()?.block_on(async {
        let mut rng = StdRng::seed_from_u64(seed("capture bank_over_captured_transactions"));
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = group_with(&server.url(), "CAPBANK", "accounts");
        let names = ["bank1", "bank2", "bank3"];
        let mut instances = Vec::new();
        let mut dbs = Vec::new();
        for name in names {
            let (instance, db) = capture_instance(&group, root.path(), name, "accounts", None)?;
            let Db::Sqlite(path) = &db else { unreachable!() };
            python_once(path, &["--init", "--mode", "bank"])?;
            install(&instance)?;
            instances.push(instance);
            dbs.push(db);
        }
        for instance in &mut instances {
            instance.start()?;
        }
        let paths: Vec<PathBuf> = dbs
            .iter()
            .map(|d| match d {
                Db::Sqlite(p) => p.clone(),
                Db::Postgres { .. } => unreachable!(),
            })
            .collect();

        // Readers from the start: before the accounts exist a read finds no rows.
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        let mut stats = Vec::new();
        for (name, path) in names.iter().zip(&paths) {
            let reads = Arc::new(Reads::default());
            let (p, r, s) = (path.clone(), reads.clone(), stop.clone());
            readers.push(std::thread::spawn(move || bank_reader(p, r, s)));
            stats.push((*name, reads));
        }
        let stop_readers = |readers: Vec<std::thread::JoinHandle<()>>| {
            stop.store(true, Ordering::Relaxed);
            readers.into_iter().all(|r| r.join().is_ok())
        };

        // The first instance's service opens the accounts in one local transaction.
        python_once(
            &paths[0],
            &[
                "--init",
                "--mode",
                "bank",
                "--create-accounts",
                "--accounts",
                &ACCOUNTS.to_string(),
                "--initial",
                &INITIAL.to_string(),
            ],
        )?;
        for db in &dbs {
            wait_until("every instance to hold the accounts", CATCH_UP, || {
                let rows = futures::executor::block_on(db.rows("accounts")).ok()?;
                (rows.len() == ACCOUNTS).then_some(())
            })?;
        }

        let per = ACCOUNTS / names.len();
        let mut services = Vec::new();
        for (i, (name, path)) in names.iter().zip(&paths).enumerate() {
            services.push(Service::python(
                &format!("bank-service-{name}"),
                path,
                &[
                    "--mode".into(),
                    "bank".into(),
                    "--accounts".into(),
                    ACCOUNTS.to_string(),
                    "--own".into(),
                    format!("{}:{}", i * per, i * per + per - 1),
                    "--ops".into(),
                    TRANSFERS.to_string(),
                    "--rate".into(),
                    TRANSFER_RATE.to_string(),
                    "--seed".into(),
                    rng.gen::<u64>().to_string(),
                ],
                root.path(),
            )?);
        }
        let outcome = async {
            let kills = chaos(&mut rng, &mut instances, &mut services, None, None)?;
            ensure!(kills >= BANK_MIN_KILLS, "only {kills} kills");
            let mut changes = ACCOUNTS as u64;
            for s in &mut services {
                changes += s.wait(SERVICE_TIMEOUT)?.changes;
            }
            let last = drain(&server.url(), "CAPBANK", &mut instances, &dbs).await?;
            anyhow::Ok((kills, changes, last))
        }
        .await;
        let joined = stop_readers(readers);
        let (kills, changes, last) = outcome?;
        ensure!(joined, "a reader panicked");
        let mut report = Vec::new();
        let mut broken = false;
        for (name, reads) in &stats {
            let violations = reads.violations.load(Ordering::Relaxed);
            let with_rows = reads.with_rows.load(Ordering::Relaxed);
            broken |= violations > 0 || with_rows < 50;
            report.push(format!(
                "{name}: {} reads, {with_rows} with rows, {violations} violations {:?}",
                reads.reads.load(Ordering::Relaxed),
                reads.examples.lock().unwrap_or_else(|e| e.into_inner())
            ));
        }
        // The end state first: a violation seen only during the run, with an exact end
        // state, is a different defect from a lost or doubled update.
        stop_all(&mut instances)?;
        assert_identical(&instances, &dbs, "accounts", last)
            .await
            .with_context(|| format!("reads: {}", report.join("; ")))?;
        for db in &dbs {
            let rows = db.rows("accounts").await?;
            let sum: i64 = rows
                .values()
                .map(|r| match r.get("balance") {
                    Some(jetsync::Value::I64(b)) => *b,
                    _ => 0,
                })
                .sum();
            ensure!(
                rows.len() == ACCOUNTS && sum == ACCOUNTS as i64 * INITIAL,
                "end state: {} accounts holding {sum}; reads: {}",
                rows.len(),
                report.join("; ")
            );
        }
        ensure!(
            !broken,
            "the bank invariant (end state exact and identical everywhere): {}",
            report.join("; ")
        );
        let census = Census::read(&server.url(), "CAPBANK").await?;
        let published: u64 = names.iter().map(|n| census.of(n).len() as u64).sum();
        ensure!(
            published == changes,
            "{published} captured changes published, the services committed {changes}"
        );
        eprintln!(
            "bank_over_captured_transactions: {changes} changes, {kills} kills, last seq {last}; {}",
            report.join("; ")
        );
        Ok(())
    })
}

// ---- Servers without atomic batches. ----

/// On a server without atomic batches, `run` with a captured table refuses to start unless
/// `capture.atomic = false` says per-row publishing is wanted, and names the server's version.
#[test]
fn run_refuses_atomic_capture_on_old_server() -> Result<()> {
    let _heavy = heavy();
    let version = jetsync_testkit::server_version().unwrap_or_default();
    if atomic_server() {
        let _ = writeln!(
            std::io::stderr().lock(),
            "run_refuses_atomic_capture_on_old_server: SKIPPED (needs a nats-server without atomic batches, e.g. 2.9.10; running {version})"
        );
        return Ok(());
    }
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let group = group_with(&server.url(), "CAPOLD", "items");
    let (mut instance, db) = capture_instance(&group, root.path(), "old1", "items", None)?;
    // capture_instance chose per-row publishing for this server; take it back.
    instance.set_option("capture", "atomic", "true")?;
    let Db::Sqlite(path) = &db else {
        unreachable!()
    };
    python_once(path, &["--init"])?;
    let (code, out, err) = instance.cli(&["capture", "install"])?;
    ensure!(code == 0, "capture install exited {code}: {out}{err}");
    instance.start()?;
    let code = instance.wait_exit(Duration::from_secs(60))?;
    let log = instance.log();
    ensure!(
        code != 0,
        "run started on {version} with atomic capture:\n{log}"
    );
    ensure!(
        log.contains(&version) && log.contains("capture.atomic"),
        "run exited {code} without naming the server version {version} and capture.atomic:\n{log}"
    );
    // With per-row publishing allowed explicitly, it runs and publishes.
    instance.set_option("capture", "atomic", "false")?;
    instance.start()?;
    sqlite_write(&db, "INSERT INTO items (id, n) VALUES ('old', 1)")?;
    runtime()?.block_on(async {
        let mut instances = [instance];
        let dbs = [db];
        let last = drain(&server.url(), "CAPOLD", &mut instances, &dbs).await?;
        ensure!(last == 1, "stream last seq {last}, one write expected");
        stop_all(&mut instances)
    })
}
