//! Multi-row transactions (issue #13): the members of one transaction are one JetStream atomic
//! batch, and every instance applies them in one sink transaction.
//!
//! - Bank (SQLite and Postgres): 100 accounts created in one transaction, then transfers, each
//!   a transaction debiting one account and crediting another with compare-and-set on both,
//!   from two concurrent publishers, while the appliers are SIGKILLed at random, one is stopped
//!   and restarted, and a new one bootstraps mid-run. Reader threads poll every instance's
//!   database (plain SQLite connections; Postgres in REPEATABLE READ) and an in-process redb
//!   replica: every read that finds rows finds all 100 accounts holding the initial total.
//! - A publisher process SIGKILLed mid-transaction leaves nothing behind, anywhere.
//! - A poison member parks its whole transaction and holds its rows; `parked retry` applies it
//!   whole once the cause is fixed.
//! - A transaction written with plain async-nats (json/1, batch headers) is applied like the
//!   client's; `tail` shows both as transactions.
//! - Compaction removing members (the commit included) still converges, and a replaying
//!   instance completes the transaction at the next message.
//! - On 2.9.10, messages with batch headers and no commit (stored as plain messages) never
//!   stall an applier.
//!
//! Why the bank keeps 64 events per row and bounds every instance's lag: on a compacted stream
//! an instance catching up misses events superseded since, so a read in the middle of its
//! catch-up may combine an old balance with a newer one. The claim tested here is that an
//! instance never shows half of a transaction it applies; keeping each instance within
//! [`BACKLOG`] events of the stream head (about 20 events per account, under the 64 kept) means
//! no event is removed before every instance has applied it.
//!
//! Transactions need nats-server 2.12.1 or later: on an older server these tests print a loud
//! `SKIPPED` line and return (except the 2.9-only one, which does the opposite).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::BufRead,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use jetsync::{Row, Value};
use jetsync_e2e::{
    ensure_allow_atomic, heavy, postgres_rows, postgres_url, raw_transaction, stream_messages,
    transactions_supported, version_at_least, wait_until, Group, Instance, PgSchema, RawCommit,
    RawMember, SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::convergence::digest_of;
use crate::crash::{runtime, seed, CATCH_UP, STOP};

// ---- Transactions through the client (the test's one entry point to the client API). ----

/// One change of a transaction: the new row (`None` = delete) of `table`/`key`, optionally
/// compare-and-set against the row's last sequence.
#[derive(Debug, Clone)]
struct TxChange {
    table: String,
    key: String,
    row: Option<Row>,
    expected_seq: Option<u64>,
}

impl TxChange {
    fn upsert(table: &str, key: &str, row: Row, expected_seq: Option<u64>) -> TxChange {
        TxChange {
            table: table.into(),
            key: key.into(),
            row: Some(row),
            expected_seq,
        }
    }
}

/// A stored transaction: the commit member's sequence, the first member's, the member count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TxCommitted {
    seq: u64,
    first_seq: u64,
    count: u64,
}

/// What a commit returned: stored, or refused as a whole by a compare-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxOutcome {
    Committed(TxCommitted),
    Conflict { current_seq: u64 },
}

/// Commits `changes` as one transaction of `client` (untyped rows), through the client's
/// transaction API.
async fn commit_tx(client: &jetsync::Client, changes: &[TxChange]) -> Result<TxOutcome> {
    let mut tx = client.transaction();
    for c in changes {
        let table = client.rows(&c.table)?;
        match (&c.row, c.expected_seq) {
            (Some(row), Some(seq)) => tx.upsert_if(&table, &c.key, row, seq)?,
            (Some(row), None) => tx.upsert(&table, &c.key, row)?,
            (None, Some(seq)) => tx.delete_if(&table, &c.key, seq)?,
            (None, None) => tx.delete(&table, &c.key)?,
        };
    }
    outcome(tx.commit().await)
}

/// A commit's result as a [`TxOutcome`]; a duplicate is an error here (nothing is retried).
fn outcome(result: Result<jetsync::Committed, jetsync::Error>) -> Result<TxOutcome> {
    match result {
        Ok(c) => {
            ensure!(
                !c.duplicate,
                "a first commit reported as a duplicate: {c:?}"
            );
            ensure!(
                c.first_seq + c.count - 1 == c.seq,
                "members are not contiguous: {c:?}"
            );
            Ok(TxOutcome::Committed(TxCommitted {
                seq: c.seq,
                first_seq: c.first_seq,
                count: c.count,
            }))
        }
        Err(jetsync::Error::Conflict { current_seq }) => Ok(TxOutcome::Conflict { current_seq }),
        Err(e) => Err(e.into()),
    }
}

/// [`commit_tx`] that must store the transaction.
async fn commit_ok(client: &jetsync::Client, changes: &[TxChange]) -> Result<TxCommitted> {
    match commit_tx(client, changes).await? {
        TxOutcome::Committed(c) => {
            ensure!(
                c.count == changes.len() as u64,
                "{} members stored, {} sent",
                c.count,
                changes.len()
            );
            Ok(c)
        }
        TxOutcome::Conflict { current_seq } => {
            bail!("unexpected conflict (current seq {current_seq})")
        }
    }
}

// ---- Shared setup. ----

/// Fails when the stream lacks `allow_atomic` after provisioning with `stream.transactions`.
async fn check_allow_atomic(url: &str, stream: &str) -> Result<()> {
    ensure!(
        !ensure_allow_atomic(url, stream).await?,
        "provisioning {stream} with stream.transactions = true did not set allow_atomic"
    );
    Ok(())
}

/// Provisions the group's stream through `instance` (`stream.transactions = true` is in its
/// config) and checks `allow_atomic`.
async fn provision(instance: &Instance, url: &str, stream: &str) -> Result<()> {
    let (code, _, err) = instance.cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    check_allow_atomic(url, stream).await
}

/// A group on `url` with one table, `table` keyed by `id`.
fn group_with(url: &str, stream: &str, table: &str) -> Group {
    let mut group = Group::new(url, stream, &stream.to_lowercase());
    group.tables.clear();
    group.tables.insert(table.into(), "id".into());
    group
}

/// An instance with transactions enabled in its stream config and `history` events per row.
fn tx_instance(group: &Group, root: &Path, name: &str, history: u32) -> Result<Instance> {
    let instance = Instance::new(group, root, name, SinkKind::Sqlite)?;
    instance.set_stream_option("transactions", "true")?;
    instance.set_stream_option("history", &history.to_string())?;
    Ok(instance)
}

/// A row of text and integer columns.
fn row(columns: &[(&str, Value)]) -> Row {
    columns
        .iter()
        .map(|(c, v)| ((*c).to_owned(), v.clone()))
        .collect()
}

/// An `items` row `id`, `n`, `s`.
fn item(key: &str, n: i64) -> Row {
    row(&[
        ("id", Value::Text(key.into())),
        ("n", Value::I64(n)),
        ("s", Value::Text(format!("{key}-{n}"))),
    ])
}

/// Publishes one single (non-transaction) upsert of `items`/`key`; returns its sequence.
async fn single(client: &jetsync::Client, key: &str, n: i64) -> Result<u64> {
    Ok(client.rows("items")?.upsert(key, &item(key, n)).await?.seq)
}

/// `tail --all --count n --json` of `instance`, parsed.
fn tail_json(instance: &Instance, n: usize) -> Result<Vec<serde_json::Value>> {
    let (code, out, err) = instance.cli_timeout(
        &["tail", "--all", "--count", &n.to_string(), "--json"],
        Duration::from_secs(30),
    )?;
    ensure!(code == Some(0), "tail exited {code:?}: {out}\n{err}");
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("tail line {l}")))
        .collect()
}

/// `tail --all --count n` (text) of `instance`.
fn tail_text(instance: &Instance, n: usize) -> Result<String> {
    let (code, out, err) = instance.cli_timeout(
        &["tail", "--all", "--count", &n.to_string()],
        Duration::from_secs(30),
    )?;
    ensure!(code == Some(0), "tail exited {code:?}: {out}\n{err}");
    Ok(out)
}

/// A status field of the instance's first group, as a number.
fn status_number(instance: &Instance, field: &str) -> Result<u64> {
    let status = instance.status()?;
    status["groups"][0][field]
        .as_u64()
        .with_context(|| format!("status without groups[0].{field}: {status}"))
}

/// Stops every instance (SIGTERM, exit 0 expected).
fn stop_all(instances: &mut [&mut Instance]) -> Result<()> {
    for i in instances.iter_mut() {
        if i.is_running() {
            let code = i.stop(STOP)?;
            ensure!(code == 0, "instance {} exited {code}:\n{}", i.name, i.log());
        }
    }
    Ok(())
}

/// Fails unless every instance's digest equals the first one's, at `seq`.
fn assert_same_digests(instances: &[&Instance], seq: u64) -> Result<()> {
    let first = digest_of(instances[0])?;
    ensure!(
        first.1 == seq,
        "{} digest at seq {}, expected {seq}",
        instances[0].name,
        first.1
    );
    for i in &instances[1..] {
        let d = digest_of(i)?;
        ensure!(
            d == first,
            "digests differ: {} {:?} vs {} {:?}",
            instances[0].name,
            first,
            i.name,
            d
        );
    }
    Ok(())
}

// ---- The bank. ----

/// Accounts of the bank.
const ACCOUNTS: usize = 100;
/// Initial balance of every account.
const INITIAL: i64 = 1_000;
/// Events per row the bank's stream keeps (the most `stream.history` allows).
const BANK_HISTORY: u32 = 64;
/// Publishers pause while any instance is this many events behind the stream head (see the
/// module comment: compaction must not remove an event an instance has yet to apply).
const BACKLOG: u64 = 2_000;
/// The stopped instance is restarted once it is this many events behind.
const RESTART_LAG: u64 = 1_200;
/// Kill delays, milliseconds.
const BANK_KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 200..=1_500;

/// An account row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Account {
    id: String,
    balance: i64,
}

fn account_key(i: usize) -> String {
    format!("a{i:03}")
}

fn account_row(key: &str, balance: i64) -> Row {
    row(&[
        ("id", Value::Text(key.into())),
        ("balance", Value::I64(balance)),
    ])
}

/// The bank scenario's size.
#[derive(Debug, Clone, Copy)]
struct BankPlan {
    scenario: &'static str,
    stream: &'static str,
    postgres: bool,
    transfers: usize,
    min_kills: usize,
    max_kills: usize,
    /// Reads that found rows, at least, on each of the three instances and the replica (the new
    /// instance joins late: a quarter of this).
    min_reads: u64,
}

/// One committed transfer as its publisher logged it.
#[derive(Debug, Clone)]
struct Transfer {
    from: String,
    to: String,
    amount: i64,
    first_seq: u64,
}

/// What the publishers and the chaos loop share.
#[derive(Debug, Default)]
struct Progress {
    /// Highest committed sequence.
    last_seq: AtomicU64,
    /// Lowest applied sequence over the instances that count (see the monitor thread).
    min_applied: AtomicU64,
    /// Transfers committed so far.
    transfers: AtomicU64,
    /// Set once the publishers are done (or failed): the monitor and readers stop after.
    stop: AtomicBool,
    /// Set by a publisher that failed.
    failed: AtomicBool,
}

/// What one reader thread saw.
#[derive(Debug, Default)]
struct ReadStats {
    reads: AtomicU64,
    with_rows: AtomicU64,
    violations: AtomicU64,
    examples: Mutex<Vec<String>>,
}

impl ReadStats {
    fn record(&self, count: i64, sum: Option<i64>) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if count == 0 {
            return;
        }
        self.with_rows.fetch_add(1, Ordering::Relaxed);
        let total = ACCOUNTS as i64 * INITIAL;
        if count != ACCOUNTS as i64 || sum != Some(total) {
            self.violations.fetch_add(1, Ordering::Relaxed);
            let mut examples = self.examples.lock().unwrap_or_else(|p| p.into_inner());
            if examples.len() < 10 {
                examples.push(format!("count {count}, sum {sum:?}"));
            }
        }
    }

    fn error(&self, what: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let mut examples = self.examples.lock().unwrap_or_else(|p| p.into_inner());
        if examples.len() < 10 {
            examples.push(what);
        }
    }
}

/// Polls the SQLite file at `path` with a plain connection (no create: it waits for the
/// applier to make the file) until `stop`.
fn sqlite_reader(path: PathBuf, stats: Arc<ReadStats>, stop: Arc<AtomicBool>) {
    let mut conn = None;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            if !path.exists() {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            match rusqlite::Connection::open_with_flags(
                &path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            ) {
                Ok(c) => {
                    let _ = c.busy_timeout(Duration::from_secs(2));
                    conn = Some(c);
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let c = conn.as_ref().expect("opened above");
        match c.query_row("SELECT count(*), sum(balance) FROM accounts", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?))
        }) {
            Ok((count, sum)) => stats.record(count, sum),
            // Before the applier created the table.
            Err(e) if e.to_string().contains("no such table") => {
                stats.reads.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.to_string().contains("locked") || e.to_string().contains("busy") => {}
            Err(e) => stats.error(format!("read error: {e}")),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls `schema.accounts` in Postgres in REPEATABLE READ transactions until `stop`.
fn postgres_reader(url: String, schema: String, stats: Arc<ReadStats>, stop: Arc<AtomicBool>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return stats.error(format!("reader runtime: {e}")),
    };
    rt.block_on(async move {
        let (mut client, connection) =
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok(c) => c,
                Err(e) => return stats.error(format!("reader connect: {e}")),
            };
        let conn = tokio::spawn(connection);
        let sql = format!("SELECT count(*), sum(balance)::bigint FROM \"{schema}\".accounts");
        while !stop.load(Ordering::Relaxed) {
            let read = async {
                let tx = client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await?;
                let r = tx.query_one(sql.as_str(), &[]).await?;
                let out: (i64, Option<i64>) = (r.get(0), r.get(1));
                tx.commit().await?;
                Ok::<_, tokio_postgres::Error>(out)
            };
            match read.await {
                Ok((count, sum)) => stats.record(count, sum),
                Err(e) => stats.error(format!("read error: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(client);
        let _ = conn.await;
    });
}

/// Polls the in-process redb replica until `stop`: one `scan` is one read transaction.
fn redb_reader(replica: jetsync_applier::Replica, stats: Arc<ReadStats>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match replica.scan("accounts") {
            Ok(rows) => {
                let sum = rows
                    .iter()
                    .map(|(_, r)| match r.get("balance") {
                        Some(Value::I64(b)) => Some(*b),
                        _ => None,
                    })
                    .sum::<Option<i64>>();
                stats.record(rows.len() as i64, sum);
            }
            Err(e) => stats.error(format!("replica read error: {e}")),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One publisher: `n` transfers between random accounts, each one transaction with
/// compare-and-set on both rows; on a conflict it re-reads both rows and retries. Waits while
/// any instance is [`BACKLOG`] or more events behind. Returns the transfers it committed and
/// the conflicts it met.
async fn publisher(
    group: Group,
    origin: String,
    n: usize,
    seed: u64,
    start: HashMap<String, (i64, u64)>,
    progress: Arc<Progress>,
) -> Result<(Vec<Transfer>, u64)> {
    let client = group.client(&origin).await?;
    let accounts = client.table::<Account>("accounts")?;
    let mut rng = StdRng::seed_from_u64(seed);
    // What this publisher believes each account holds: (balance, last sequence).
    let mut known = start;
    let mut log = Vec::with_capacity(n);
    let mut conflicts = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    for _ in 0..n {
        loop {
            let lag = progress
                .last_seq
                .load(Ordering::Relaxed)
                .saturating_sub(progress.min_applied.load(Ordering::Relaxed));
            if lag < BACKLOG {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{origin}: the instances stayed {BACKLOG}+ events behind"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let from = account_key(rng.gen_range(0..ACCOUNTS));
        let to = loop {
            let k = account_key(rng.gen_range(0..ACCOUNTS));
            if k != from {
                break k;
            }
        };
        let amount = rng.gen_range(1..=50);
        let mut attempts = 0;
        loop {
            attempts += 1;
            ensure!(
                attempts <= 1_000,
                "{origin}: {from}→{to} conflicted 1000 times"
            );
            let (fb, fs) = known[&from];
            let (tb, ts) = known[&to];
            let debit = Account {
                id: from.clone(),
                balance: fb - amount,
            };
            let credit = Account {
                id: to.clone(),
                balance: tb + amount,
            };
            let mut tx = client.transaction();
            tx.upsert_if(&accounts, &from, &debit, fs)?
                .upsert_if(&accounts, &to, &credit, ts)?;
            match outcome(tx.commit().await)? {
                TxOutcome::Committed(c) => {
                    ensure!(c.count == 2, "{origin}: {} members stored", c.count);
                    known.insert(from.clone(), (fb - amount, c.first_seq));
                    known.insert(to.clone(), (tb + amount, c.first_seq + 1));
                    progress.last_seq.fetch_max(c.seq, Ordering::Relaxed);
                    progress.transfers.fetch_add(1, Ordering::Relaxed);
                    log.push(Transfer {
                        from: from.clone(),
                        to: to.clone(),
                        amount,
                        first_seq: c.first_seq,
                    });
                    break;
                }
                TxOutcome::Conflict { .. } => {
                    conflicts += 1;
                    for key in [&from, &to] {
                        let current = accounts
                            .get(key)
                            .await?
                            .with_context(|| format!("account {key} missing"))?;
                        known.insert(key.clone(), (current.row.balance, current.seq));
                    }
                }
            }
        }
    }
    Ok((log, conflicts))
}

/// The in-process redb replica of the bank: the engine task and the handle readers use.
struct RedbReplica {
    replica: jetsync_applier::Replica,
    path: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), jetsync_applier::EngineError>>>,
}

impl RedbReplica {
    /// Starts an engine applying `group` into a redb replica with the per-sequence audit, from
    /// the first event on (no bootstrap, so every applied sequence is audited).
    fn start(group: &Group, root: &Path) -> Result<RedbReplica> {
        let dir = root.join("replica");
        std::fs::create_dir_all(&dir)?;
        let mut config = group.config("replica", &dir);
        config.stream.history = i64::from(BANK_HISTORY);
        config.stream.transactions = true;
        config.stream.provision = false;
        for (table, key) in &group.tables {
            config.tables.insert(
                table.clone(),
                jetsync::TableConfig {
                    key: key.clone(),
                    ..jetsync::TableConfig::default()
                },
            );
        }
        config.sink.kind = jetsync::SinkKind::Redb;
        config.sink.audit = true;
        config.apply.bootstrap = false;
        let path = dir.join("replica.replica.redb");
        let sink = jetsync_applier::RedbSink::open(jetsync_applier::RedbOptions {
            path: path.clone(),
            audit: true,
        })?;
        let replica = sink.replica();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(jetsync_applier::Engine::new(config, sink).run(async move {
            let _ = rx.await;
        }));
        Ok(RedbReplica {
            replica,
            path,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Stops the engine and waits for it (the replica file is closed afterwards once the last
    /// `Replica` handle is dropped).
    async fn stop(&mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .context("the redb engine did not stop")?
                .context("the redb engine panicked")??;
        }
        Ok(())
    }
}

impl Drop for RedbReplica {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The bank scenario (see the module comment), with SQLite or Postgres sinks.
async fn bank(plan: BankPlan) -> Result<()> {
    let scenario = plan.scenario;
    jetsync_e2e::applier_bin();
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed(scenario));
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let stream = plan.stream;
    let group = group_with(&server.url(), stream, "accounts");
    let pg_url = postgres_url();

    // Three instances from the start and a fourth that joins mid-run, with different batch
    // sizes (a sink transaction must never end inside a transaction, whatever the batch size).
    let names = ["b1", "b2", "b3", "b4"];
    let batch_max = ["7", "50", "1000", "13"];
    let mut schemas = Vec::new();
    let mut instances = Vec::new();
    for (name, batch) in names.iter().zip(batch_max) {
        let instance = tx_instance(&group, root.path(), name, BANK_HISTORY)?;
        instance.set_option("apply", "batch_max", batch)?;
        if plan.postgres {
            let schema = PgSchema::create(
                &pg_url,
                &format!("jse2e_{}_{stream}_{name}", std::process::id()).to_lowercase(),
                "CREATE TABLE {schema}.accounts (id text PRIMARY KEY, balance bigint NOT NULL);",
            )?;
            instance.use_postgres(&pg_url, &schema.name)?;
            schemas.push(schema);
        }
        instances.push(instance);
    }
    provision(&instances[0], &server.url(), stream).await?;
    let mut replica = RedbReplica::start(&group, root.path())?;
    for i in &mut instances[..3] {
        i.start()?;
    }

    // Readers, from before the first row exists.
    let stop_readers = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    let mut reader_stats = Vec::new();
    for (n, instance) in instances.iter().enumerate() {
        let stats = Arc::new(ReadStats::default());
        let stop = stop_readers.clone();
        let s = stats.clone();
        readers.push(if plan.postgres {
            let (url, schema) = (pg_url.clone(), schemas[n].name.clone());
            std::thread::spawn(move || postgres_reader(url, schema, s, stop))
        } else {
            let path = instance.sqlite_path();
            std::thread::spawn(move || sqlite_reader(path, s, stop))
        });
        reader_stats.push((instance.name.clone(), stats));
    }
    {
        let stats = Arc::new(ReadStats::default());
        let (r, s, stop) = (replica.replica.clone(), stats.clone(), stop_readers.clone());
        readers.push(std::thread::spawn(move || redb_reader(r, s, stop)));
        reader_stats.push(("redb replica".into(), stats));
    }

    // 100 accounts in one transaction.
    let client = group.client("bank-setup").await?;
    let creation: Vec<TxChange> = (0..ACCOUNTS)
        .map(|i| {
            let key = account_key(i);
            TxChange::upsert("accounts", &key, account_row(&key, INITIAL), Some(0))
        })
        .collect();
    let created = commit_ok(&client, &creation).await?;
    let start: HashMap<String, (i64, u64)> = (0..ACCOUNTS)
        .map(|i| (account_key(i), (INITIAL, created.first_seq + i as u64)))
        .collect();
    let progress = Arc::new(Progress::default());
    progress.last_seq.store(created.seq, Ordering::Relaxed);
    // The three first instances apply the accounts before the chaos starts, so that the stopped
    // one replays when it comes back; the fourth is the one that joins from a snapshot.
    for i in &mut instances[..3] {
        i.wait_applied(stream, created.seq, CATCH_UP)?;
    }

    // The monitor: the lowest applied sequence over the instances that count (the three
    // first, the stopped one included, the fourth once started) and the replica.
    let counting: Arc<Mutex<Vec<PathBuf>>> = Arc::new(Mutex::new(
        instances[..3]
            .iter()
            .map(Instance::checkpoint_path)
            .collect(),
    ));
    let monitor = {
        let (progress, counting, replica) =
            (progress.clone(), counting.clone(), replica.replica.clone());
        let stream = stream.to_owned();
        std::thread::spawn(move || {
            let mut last: HashMap<PathBuf, u64> = HashMap::new();
            while !progress.stop.load(Ordering::Relaxed) {
                let paths = counting.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let mut min = replica.applied_seq();
                for path in paths {
                    // Unreadable while a killed run's file awaits repair: keep the last value.
                    if let Ok(c) = jetsync_applier::read_checkpoint(&path, &stream) {
                        last.insert(path.clone(), c.applied);
                    }
                    min = min.min(last.get(&path).copied().unwrap_or(0));
                }
                progress.min_applied.store(min, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Two publishers.
    let per_publisher = plan.transfers / 2;
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let progress = progress.clone();
            let run = publisher(
                group.clone(),
                format!("bank-pub-{p}"),
                per_publisher,
                rng.gen(),
                start.clone(),
                progress.clone(),
            );
            tokio::spawn(async move {
                let result = run.await;
                if result.is_err() {
                    progress.failed.store(true, Ordering::Relaxed);
                }
                result
            })
        })
        .collect();

    // Chaos: SIGKILL a random running instance every 100–700 ms; stop b3 (SIGTERM) early and
    // restart it once it is RESTART_LAG behind; start b4 at 40 % of the transfers.
    let deadline = Instant::now() + Duration::from_secs(400);
    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    let mut total_kills = 0;
    let (mut stopped_at, mut restarted, mut b4_started) = (None, false, false);
    let mut next_report = Instant::now() + Duration::from_secs(10);
    let chaos = async {
        while total_kills < plan.min_kills || publishers.iter().any(|p| !p.is_finished()) {
            ensure!(
                total_kills < plan.max_kills,
                "{total_kills} kills and the publishers are still not done"
            );
            ensure!(Instant::now() < deadline, "the bank still runs after 400 s");
            tokio::time::sleep(Duration::from_millis(rng.gen_range(BANK_KILL_DELAY_MS))).await;
            if progress.failed.load(Ordering::Relaxed) {
                // A publisher failed: stop and report it below.
                break;
            }
            for i in instances.iter_mut() {
                if i.is_running() {
                    continue;
                }
                let stopped_on_purpose = i.name == "b3" && stopped_at.is_some() && !restarted;
                let not_started = i.name == "b4" && !b4_started;
                ensure!(
                    stopped_on_purpose || not_started,
                    "instance {} exited by itself:\n{}",
                    i.name,
                    i.log()
                );
            }
            let done = progress.transfers.load(Ordering::Relaxed);
            if Instant::now() >= next_report {
                next_report += Duration::from_secs(10);
                eprintln!(
                    "{scenario}: {:?}: {done} transfers, last seq {}, lowest applied {}, {total_kills} kills",
                    started.elapsed(),
                    progress.last_seq.load(Ordering::Relaxed),
                    progress.min_applied.load(Ordering::Relaxed)
                );
            }
            if !b4_started && done * 10 >= plan.transfers as u64 * 4 {
                instances[3].start()?;
                counting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(instances[3].checkpoint_path());
                b4_started = true;
                eprintln!("{scenario}: b4 started after {done} transfers");
            }
            if stopped_at.is_none() && total_kills == 3 {
                let code = instances[2].stop(STOP)?;
                ensure!(
                    code == 0,
                    "b3 exited {code} on SIGTERM:\n{}",
                    instances[2].log()
                );
                stopped_at = Some(progress.last_seq.load(Ordering::Relaxed));
                eprintln!("{scenario}: b3 stopped (SIGTERM) after {done} transfers");
            }
            if let (Some(_), false) = (stopped_at, restarted) {
                let lag = progress
                    .last_seq
                    .load(Ordering::Relaxed)
                    .saturating_sub(instances[2].applied(stream));
                if lag >= RESTART_LAG || publishers.iter().all(|p| p.is_finished()) {
                    instances[2].start()?;
                    restarted = true;
                    eprintln!("{scenario}: b3 restarted {lag} events behind");
                }
            }
            let running: Vec<usize> = (0..instances.len())
                .filter(|&n| instances[n].is_running())
                .collect();
            if running.is_empty() {
                continue;
            }
            let victim = running[rng.gen_range(0..running.len())];
            instances[victim].kill();
            instances[victim].start()?;
            total_kills += 1;
            *kills.entry(instances[victim].name.clone()).or_default() += 1;
        }
        anyhow::Ok(())
    };
    let chaos_result = chaos.await;
    let mut transfers = Vec::new();
    let mut conflicts = 0;
    let mut publish_error = None;
    for p in publishers {
        match p.await.context("publisher task")? {
            Ok((log, c)) => {
                transfers.extend(log);
                conflicts += c;
            }
            Err(e) => publish_error = Some(e),
        }
    }
    chaos_result?;
    if let Some(e) = publish_error {
        return Err(e.context("a publisher failed"));
    }
    ensure!(
        total_kills >= plan.min_kills,
        "only {total_kills} SIGKILLs, want {}",
        plan.min_kills
    );
    if !restarted {
        instances[2].start()?;
    }
    ensure!(b4_started, "b4 never started");
    let last = progress.last_seq.load(Ordering::Relaxed);
    eprintln!(
        "{scenario}: {} transfers committed ({conflicts} conflicts retried), last seq {last}, \
         {total_kills} SIGKILLs {kills:?}, after {:?}",
        transfers.len(),
        started.elapsed()
    );
    ensure!(transfers.len() == per_publisher * 2, "transfers missing");

    // Everyone catches up; then the readers stop.
    for i in instances.iter_mut() {
        i.wait_applied(stream, last, CATCH_UP)?;
    }
    replica
        .replica
        .wait_for(last, CATCH_UP)
        .await
        .context("the redb replica did not catch up")?;
    progress.stop.store(true, Ordering::Relaxed);
    stop_readers.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().map_err(|_| anyhow::anyhow!("a reader panicked"))?;
    }
    monitor
        .join()
        .map_err(|_| anyhow::anyhow!("the monitor panicked"))?;
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (name, stats) in &reader_stats {
        let (reads, with_rows, bad) = (
            stats.reads.load(Ordering::Relaxed),
            stats.with_rows.load(Ordering::Relaxed),
            stats.violations.load(Ordering::Relaxed),
        );
        report.push(format!(
            "{name}: {with_rows} of {reads} reads with rows, {bad} bad"
        ));
        let min = if name == "b4" {
            plan.min_reads / 4
        } else {
            plan.min_reads
        };
        if bad > 0 {
            failures.push(format!(
                "{name}: {bad} reads saw a broken total, e.g. {:?}",
                stats.examples.lock().unwrap_or_else(|p| p.into_inner())
            ));
        }
        if with_rows < min {
            failures.push(format!(
                "{name}: only {with_rows} reads with rows (want {min})"
            ));
        }
    }
    eprintln!("{scenario}: reads: {}", report.join("; "));
    ensure!(failures.is_empty(), "{}", failures.join("\n"));

    // Expected balances: the initial ones plus every committed transfer once.
    let mut expected: BTreeMap<String, i64> =
        (0..ACCOUNTS).map(|i| (account_key(i), INITIAL)).collect();
    for t in &transfers {
        *expected.get_mut(&t.from).context("from")? -= t.amount;
        *expected.get_mut(&t.to).context("to")? += t.amount;
    }
    ensure!(
        expected.values().sum::<i64>() == ACCOUNTS as i64 * INITIAL,
        "the publishers' log breaks the total"
    );
    let accounts = client.table::<Account>("accounts")?;
    for (key, balance) in &expected {
        let current = accounts.get(key).await?.context("account gone")?;
        ensure!(
            current.row.balance == *balance,
            "stream: {key} holds {}, the committed transfers give {balance}",
            current.row.balance
        );
    }
    let balances_of = |rows: BTreeMap<String, Row>| -> Result<BTreeMap<String, i64>> {
        rows.into_iter()
            .map(|(k, r)| match r.get("balance") {
                Some(Value::I64(b)) => Ok((k, *b)),
                other => bail!("{k}: balance {other:?}"),
            })
            .collect()
    };
    stop_all(&mut instances.iter_mut().collect::<Vec<_>>())?;
    for (n, i) in instances.iter().enumerate() {
        let rows = if plan.postgres {
            postgres_rows(&pg_url, &schemas[n].name, "accounts", "id").await?
        } else {
            i.sqlite_rows("accounts", "id")?
        };
        ensure!(
            balances_of(rows)? == expected,
            "instance {}: balances differ from the committed transfers",
            i.name
        );
    }
    let replica_rows: BTreeMap<String, Row> =
        replica.replica.scan("accounts")?.into_iter().collect();
    ensure!(
        balances_of(replica_rows)? == expected,
        "redb replica: balances differ from the committed transfers"
    );
    assert_same_digests(&instances.iter().collect::<Vec<_>>(), last)?;
    for i in &instances {
        ensure!(
            status_number(i, "transactions_applied")? > 0,
            "{}: status counts no transactions",
            i.name
        );
    }

    // b4 joined from a snapshot, not from the whole history.
    let b4 = &instances[3];
    ensure!(
        b4.run_logs()
            .iter()
            .any(|(_, log)| log.contains("bootstrap")),
        "b4 did not bootstrap from a snapshot"
    );
    let b4_events = status_number(b4, "applied_events")?;
    ensure!(
        b4_events < last,
        "b4 applied {b4_events} events: a bootstrap must not replay the {last} events"
    );

    // Exactly once on the replica: nothing applied twice, nothing that is not a committed
    // member, and the latest event of every account applied.
    replica.stop().await?;
    let replica_path = replica.path.clone();
    drop(replica);
    let audit = jetsync_applier::read_audit(&replica_path)?;
    let mut committed: BTreeSet<u64> = (created.first_seq..=created.seq).collect();
    let mut latest: BTreeMap<&str, u64> = BTreeMap::new();
    for i in 0..ACCOUNTS as u64 {
        latest.insert(&creation[i as usize].key, created.first_seq + i);
    }
    for t in &transfers {
        committed.insert(t.first_seq);
        committed.insert(t.first_seq + 1);
        latest.insert(&t.from, t.first_seq);
        latest.insert(&t.to, t.first_seq + 1);
    }
    let doubled: Vec<_> = audit.iter().filter(|(_, &n)| n != 1).take(10).collect();
    ensure!(
        doubled.is_empty(),
        "replica applied sequences more than once: {doubled:?}"
    );
    let unexpected: Vec<_> = audit
        .keys()
        .filter(|s| !committed.contains(s))
        .take(10)
        .collect();
    ensure!(
        unexpected.is_empty(),
        "replica applied unknown sequences: {unexpected:?}"
    );
    let missing: Vec<_> = latest
        .values()
        .filter(|s| !audit.contains_key(s))
        .take(10)
        .collect();
    ensure!(
        missing.is_empty(),
        "replica never applied latest events {missing:?}"
    );
    eprintln!(
        "{scenario}: passed after {:?}; the replica applied {} of {} committed events",
        started.elapsed(),
        audit.len(),
        committed.len()
    );
    drop(schemas);
    Ok(())
}

#[test]
fn bank_sqlite() -> Result<()> {
    let _heavy = heavy();
    if !transactions_supported("bank_sqlite") {
        return Ok(());
    }
    runtime()?.block_on(bank(BankPlan {
        scenario: "bank_sqlite",
        stream: "BANKSQL",
        postgres: false,
        transfers: 20_000,
        min_kills: 20,
        max_kills: 400,
        min_reads: 500,
    }))
}

#[test]
fn bank_postgres() -> Result<()> {
    let _heavy = heavy();
    if !transactions_supported("bank_postgres") {
        return Ok(());
    }
    runtime()?.block_on(bank(BankPlan {
        scenario: "bank_postgres",
        stream: "BANKPG",
        postgres: true,
        transfers: 10_000,
        min_kills: 20,
        max_kills: 400,
        min_reads: 300,
    }))
}

// ---- A publisher killed mid-transaction. ----

/// Members the killed publisher process sends before it is killed (of a larger transaction).
const KILLED_MEMBERS: usize = 3;

/// A publisher process sends the first members of a transaction and is SIGKILLed before the
/// commit; other transactions commit afterwards. Nothing of the killed one is ever stored or
/// applied, also after the server's 10 s abandon window.
#[test]
fn publisher_killed_mid_transaction() -> Result<()> {
    let _heavy = heavy();
    if !transactions_supported("publisher_killed_mid_transaction") {
        return Ok(());
    }
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = group_with(&server.url(), "KILLPUB", "items");
        let mut a = tx_instance(&group, root.path(), "k1", 1)?;
        let mut b = tx_instance(&group, root.path(), "k2", 1)?;
        provision(&a, &server.url(), "KILLPUB").await?;
        a.start()?;
        b.start()?;
        let client = group.client("killpub").await?;
        let warm = single(&client, "warm", 0).await?;
        for i in [&mut a, &mut b] {
            i.wait_applied("KILLPUB", warm, CATCH_UP)?;
        }

        // The publisher process: sends members 1..=3 of batch `killed`, says so, then waits.
        let batch_id = "killed-publisher-tx";
        let mut child = ChildGuard(
            Command::new(env!("CARGO_BIN_EXE_tx-publisher"))
                .args([&server.url(), "killpub", batch_id, &KILLED_MEMBERS.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("spawning tx-publisher")?,
        );
        let stdout = child.0.stdout.take().context("child stdout")?;
        let (line_tx, line_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = line_rx
            .recv_timeout(Duration::from_secs(30))
            .context("the publisher process never reported its members sent")?;
        ensure!(line == format!("sent {KILLED_MEMBERS}"), "publisher said {line:?}");
        child.0.kill()?;
        child.0.wait()?;
        let killed_at = Instant::now();

        // Other transactions commit, touching one of the killed transaction's rows too.
        let mut last = 0;
        for t in 0..3 {
            let changes = [
                TxChange::upsert("items", &format!("ok{t}a"), item(&format!("ok{t}a"), t), None),
                TxChange::upsert("items", &format!("ok{t}b"), item(&format!("ok{t}b"), t), None),
            ];
            last = commit_ok(&client, &changes).await?.seq;
        }
        last = last.max(single(&client, "x3", 1).await?);
        for i in [&mut a, &mut b] {
            i.wait_applied("KILLPUB", last, CATCH_UP)?;
        }

        // Throughout the abandon window (and a margin), nothing of it shows up anywhere.
        let killed_keys: Vec<String> = (1..=KILLED_MEMBERS).map(|n| format!("x{n}")).collect();
        let check = |a: &Instance, b: &Instance| -> Result<()> {
            for i in [a, b] {
                let rows = i.sqlite_rows("items", "id")?;
                for key in &killed_keys[..2] {
                    ensure!(!rows.contains_key(key), "{}: {key} of the killed transaction applied", i.name);
                }
                ensure!(
                    !matches!(rows.get("x3").and_then(|r| r.get("n")), Some(Value::I64(n)) if *n != 1),
                    "{}: x3 holds the killed transaction's value",
                    i.name
                );
            }
            Ok(())
        };
        while killed_at.elapsed() < Duration::from_secs(12) {
            check(&a, &b)?;
            let messages = stream_messages(&server.url(), "KILLPUB").await?;
            ensure!(
                !messages.iter().any(|(_, _, h)| jetsync::transaction::Membership::of(h.as_ref())
                    .is_some_and(|m| m.batch_id == batch_id)),
                "the stream holds a member of the killed transaction"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // The server abandoned it: its commit now finds no batch to complete.
        let commit = RawMember::upsert("killpub.items.x9", serde_json::json!({"id": "x9", "n": 9}), "killed-late");
        let late = raw_transaction_member(&server.url(), batch_id, KILLED_MEMBERS + 1, &commit).await?;
        ensure!(
            matches!(&late, RawCommit::Refused { err_code: 10176, .. }),
            "the killed transaction's late commit was answered {late:?}"
        );
        let end = single(&client, "end", 1).await?;
        for i in [&mut a, &mut b] {
            i.wait_applied("KILLPUB", end, CATCH_UP)?;
        }
        check(&a, &b)?;
        for i in [&a, &b] {
            let rows = i.sqlite_rows("items", "id")?;
            ensure!(!rows.contains_key("x9"), "{}: the late commit applied", i.name);
            let parked = i.parked()?;
            ensure!(parked.is_empty(), "{}: parked {parked:?}", i.name);
        }
        let messages = stream_messages(&server.url(), "KILLPUB").await?;
        ensure!(
            !messages.iter().any(|(_, _, h)| jetsync::transaction::Membership::of(h.as_ref())
                .is_some_and(|m| m.batch_id == batch_id)),
            "the stream holds a member of the killed transaction"
        );
        let tail = tail_json(&a, messages.len())?;
        ensure!(
            !tail.iter().any(|e| e["txn"]["id"] == batch_id),
            "tail shows the killed transaction"
        );
        stop_all(&mut [&mut a, &mut b])?;
        assert_same_digests(&[&a, &b], end)
    })
}

/// Kills the child process when dropped (panics included).
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `member` alone as member `n` of batch `batch_id` with `Nats-Batch-Commit: 1`, as a
/// request; returns the server's answer.
async fn raw_transaction_member(
    url: &str,
    batch_id: &str,
    n: usize,
    member: &RawMember,
) -> Result<RawCommit> {
    let nats = async_nats::connect(url).await?;
    let reply = nats
        .request_with_headers(
            member.subject.clone(),
            member.headers(batch_id, n, true),
            member.body.clone().into(),
        )
        .await?;
    let value: serde_json::Value = serde_json::from_slice(&reply.payload)
        .with_context(|| format!("reply {:?}", String::from_utf8_lossy(&reply.payload)))?;
    Ok(match value.get("error") {
        Some(e) => RawCommit::Refused {
            err_code: e["err_code"].as_u64().unwrap_or(0),
            description: e["description"].as_str().unwrap_or_default().to_owned(),
        },
        None => RawCommit::Stored {
            seq: value["seq"].as_u64().unwrap_or(0),
            count: value["count"].as_u64().unwrap_or(0),
        },
    })
}

// ---- A poison member. ----

/// A transaction with one member the applier refuses (more columns than `apply.max_columns`):
/// the whole transaction is parked and its rows held, other rows flow; raising the limit and
/// `parked retry` apply it whole, ending equal to an instance that had the higher limit all
/// along.
#[test]
fn poison_member_parks_whole_transaction() -> Result<()> {
    let _heavy = heavy();
    if !transactions_supported("poison_member_parks_whole_transaction") {
        return Ok(());
    }
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = group_with(&server.url(), "TXPOI", "items");
        let mut low = tx_instance(&group, root.path(), "low", 64)?;
        let mut high = tx_instance(&group, root.path(), "high", 64)?;
        low.set_option("apply", "max_columns", "5")?;
        provision(&low, &server.url(), "TXPOI").await?;
        low.start()?;
        high.start()?;
        let client = group.client("txpoi").await?;
        let warm = single(&client, "warm", 0).await?;
        for i in [&mut low, &mut high] {
            i.wait_applied("TXPOI", warm, CATCH_UP)?;
        }

        single(&client, "o1", 1).await?;
        let mut wide = item("t2", 2);
        for c in 0..10 {
            wide.insert(format!("extra{c}"), Value::I64(c));
        }
        let tx = commit_ok(
            &client,
            &[
                TxChange::upsert("items", "t1", item("t1", 1), None),
                TxChange::upsert("items", "t2", wide.clone(), None),
                TxChange::upsert("items", "t3", item("t3", 3), None),
            ],
        )
        .await?;
        // A later single write to a row of the transaction, and one to another row.
        let held = single(&client, "t1", 100).await?;
        let other = single(&client, "o2", 2).await?;
        for i in [&mut low, &mut high] {
            i.wait_applied("TXPOI", other, CATCH_UP)?;
        }
        ensure!(
            low.is_running(),
            "the instance keeps running:\n{}",
            low.log()
        );

        let members: Vec<u64> = (tx.first_seq..=tx.seq).collect();
        let parked = low.parked()?;
        let seqs: Vec<u64> = parked.iter().filter_map(|p| p["seq"].as_u64()).collect();
        let mut want = members.clone();
        want.push(held);
        ensure!(
            seqs == want,
            "parked {seqs:?}, expected the members {members:?} and {held}: {parked:?}"
        );
        let txn_of = |seq: u64| {
            parked
                .iter()
                .find(|p| p["seq"] == seq)
                .map(|p| p["txn"].clone())
        };
        let batch_id = txn_of(tx.first_seq)
            .and_then(|t| t.as_str().map(str::to_owned))
            .with_context(|| format!("parked member without a txn: {parked:?}"))?;
        for s in &members {
            ensure!(
                txn_of(*s) == Some(serde_json::Value::String(batch_id.clone())),
                "member {s} parked without txn {batch_id}: {parked:?}"
            );
        }
        ensure!(
            parked
                .iter()
                .find(|p| p["seq"] == held)
                .is_some_and(|p| !p["held_behind"].is_null()),
            "the later write of t1 is held behind the transaction: {parked:?}"
        );
        let (code, text, err) = low.cli(&["parked", "list"])?;
        ensure!(
            code == 0 && text.contains(&format!("txn {batch_id}")),
            "parked list text:\n{text}{err}"
        );
        ensure!(
            status_number(&low, "parked_transactions")? == 1,
            "status: {}",
            low.status()?
        );
        let rows = low.sqlite_rows("items", "id")?;
        for key in ["t1", "t2", "t3"] {
            ensure!(
                !rows.contains_key(key),
                "low: {key} applied although its transaction is parked"
            );
        }
        for key in ["o1", "o2", "warm"] {
            ensure!(rows.contains_key(key), "low: {key} did not flow");
        }

        // Fix the cause and retry: the whole transaction, then the held write.
        ensure!(low.stop(STOP)? == 0, "clean stop");
        low.set_option("apply", "max_columns", "50")?;
        let (code, out, err) = low.cli(&["parked", "retry"])?;
        ensure!(code == 0, "parked retry exited {code}: {out}{err}");
        ensure!(
            low.parked()?.is_empty(),
            "still parked: {:?}",
            low.parked()?
        );
        let rows = low.sqlite_rows("items", "id")?;
        ensure!(
            rows.contains_key("t2") && rows.contains_key("t3"),
            "retry applied {rows:?}"
        );
        ensure!(
            rows["t1"]["n"] == Value::I64(100),
            "t1 holds the later write after the retry: {:?}",
            rows["t1"]
        );
        ensure!(
            rows["t2"]["extra9"] == Value::I64(9),
            "t2: {:?}",
            rows["t2"]
        );

        low.start()?;
        let end = single(&client, "end", 1).await?;
        for i in [&mut low, &mut high] {
            i.wait_applied("TXPOI", end, CATCH_UP)?;
        }
        stop_all(&mut [&mut low, &mut high])?;
        assert_same_digests(&[&low, &high], end)
    })
}

// ---- Polyglot. ----

/// A transaction written with plain async-nats (json/1 bodies, batch headers) and one from the
/// jetsync client are applied by every instance, and `tail` shows both as transactions.
#[test]
fn polyglot_transaction() -> Result<()> {
    let _heavy = heavy();
    if !transactions_supported("polyglot_transaction") {
        return Ok(());
    }
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let mut group = group_with(&server.url(), "TXPOLY", "orders");
        group.tables.insert("lines".into(), "id".into());
        let mut a = tx_instance(&group, root.path(), "p1", 1)?;
        let mut b = tx_instance(&group, root.path(), "p2", 1)?;
        b.set_option("apply", "batch_max", "1")?;
        provision(&a, &server.url(), "TXPOLY").await?;
        a.start()?;
        b.start()?;

        // Plain async-nats: an order and its two lines, the exact headers DESIGN documents.
        let nats = async_nats::connect(server.url()).await?;
        let raw_id = "order-o1-from-python";
        let members = [
            RawMember::upsert(
                "txpoly.orders.o1",
                serde_json::json!({"id": "o1", "customer": "c7", "total": 30.5}),
                "py-o1",
            ),
            RawMember::upsert(
                "txpoly.lines.o1-1",
                serde_json::json!({"id": "o1-1", "order": "o1", "qty": 2}),
                "py-o1-1",
            ),
            RawMember::upsert(
                "txpoly.lines.o1-2",
                serde_json::json!({"id": "o1-2", "order": "o1", "qty": 1}),
                "py-o1-2",
            ),
        ];
        let raw = raw_transaction(&nats, raw_id, &members, true).await?;
        let Some(RawCommit::Stored {
            seq: raw_seq,
            count: 3,
        }) = raw
        else {
            bail!("the raw transaction was answered {raw:?}");
        };
        // A single write between, outside any transaction.
        let client = group.client("poly-rust").await?;
        let single_seq = client
            .rows("orders")?
            .upsert(
                "o0",
                &row(&[("id", Value::Text("o0".into())), ("total", Value::F64(1.0))]),
            )
            .await?
            .seq;
        // The jetsync client: an order and one line.
        let tx = commit_ok(
            &client,
            &[
                TxChange::upsert(
                    "orders",
                    "o2",
                    row(&[
                        ("id", Value::Text("o2".into())),
                        ("customer", Value::Text("c8".into())),
                        ("total", Value::F64(12.0)),
                    ]),
                    None,
                ),
                TxChange::upsert(
                    "lines",
                    "o2-1",
                    row(&[
                        ("id", Value::Text("o2-1".into())),
                        ("order", Value::Text("o2".into())),
                        ("qty", Value::I64(4)),
                    ]),
                    None,
                ),
            ],
        )
        .await?;
        for i in [&mut a, &mut b] {
            i.wait_applied("TXPOLY", tx.seq, CATCH_UP)?;
        }
        for i in [&a, &b] {
            let orders = i.sqlite_rows("orders", "id")?;
            let lines = i.sqlite_rows("lines", "id")?;
            ensure!(
                orders.len() == 3 && lines.len() == 3,
                "{}: orders {orders:?}, lines {lines:?}",
                i.name
            );
            ensure!(
                orders["o1"]["total"] == Value::F64(30.5),
                "{}: {:?}",
                i.name,
                orders["o1"]
            );
            ensure!(
                lines["o1-2"]["qty"] == Value::I64(1),
                "{}: {:?}",
                i.name,
                lines["o1-2"]
            );
            ensure!(
                i.parked()?.is_empty(),
                "{}: parked {:?}",
                i.name,
                i.parked()?
            );
            ensure!(
                status_number(i, "transactions_applied")? == 2,
                "{}: status {}",
                i.name,
                i.status()?
            );
        }

        // tail --json: the raw members with their batch, the single write without, the
        // client's members under one id.
        let events = tail_json(&a, 6)?;
        ensure!(events.len() == 6, "tail: {events:?}");
        for (n, e) in events[..3].iter().enumerate() {
            ensure!(e["seq"] == raw_seq - 2 + n as u64, "tail order: {e}");
            ensure!(
                e["txn"] == serde_json::json!({"id": raw_id, "sequence": n + 1, "commit": n == 2}),
                "raw member {n}: {e}"
            );
        }
        ensure!(
            events[3]["seq"] == single_seq && events[3]["txn"].is_null(),
            "single write: {}",
            events[3]
        );
        let client_id = events[4]["txn"]["id"]
            .as_str()
            .context("client transaction id")?
            .to_owned();
        ensure!(
            events[4]["txn"]
                == serde_json::json!({"id": client_id, "sequence": 1, "commit": false})
                && events[5]["txn"]
                    == serde_json::json!({"id": client_id, "sequence": 2, "commit": true}),
            "client members: {} {}",
            events[4],
            events[5]
        );
        let text = tail_text(&a, 6)?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        ensure!(lines.len() == 6, "tail text:\n{text}");
        ensure!(
            lines[0].ends_with(&format!("txn {raw_id} #1"))
                && lines[2].ends_with(&format!("txn {raw_id} #3 commit"))
                && !lines[3].contains(" txn ")
                && lines[5].ends_with(&format!("txn {client_id} #2 commit")),
            "tail text:\n{text}"
        );
        stop_all(&mut [&mut a, &mut b])?;
        assert_same_digests(&[&a, &b], tx.seq)
    })
}

// ---- Compacted members. ----

/// History 1: a transaction whose commit member's row and another member's row are
/// overwritten by later single writes (the server removes those members). A fresh instance
/// bootstrapping afterwards, an instance that replays from before the transaction and one that
/// applied it live all converge; the replaying one completes the transaction at the next
/// message instead of waiting for the commit it never gets.
#[test]
fn compacted_transaction_members() -> Result<()> {
    let _heavy = heavy();
    if !transactions_supported("compacted_transaction_members") {
        return Ok(());
    }
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = group_with(&server.url(), "TXCOMP", "items");
        let mut live = tx_instance(&group, root.path(), "live", 1)?;
        let mut replay = tx_instance(&group, root.path(), "replay", 1)?;
        provision(&live, &server.url(), "TXCOMP").await?;
        live.start()?;
        replay.start()?;
        let client = group.client("txcomp").await?;
        let warm = single(&client, "warm", 0).await?;
        for i in [&mut live, &mut replay] {
            i.wait_applied("TXCOMP", warm, CATCH_UP)?;
        }
        ensure!(replay.stop(STOP)? == 0, "clean stop");

        let tx = commit_ok(
            &client,
            &[
                TxChange::upsert("items", "m1", item("m1", 1), None),
                TxChange::upsert("items", "m2", item("m2", 2), None),
                TxChange::upsert("items", "m3", item("m3", 3), None),
            ],
        )
        .await?;
        // Overwrite the commit member's row (m3) and the first member's (m1).
        single(&client, "m3", 30).await?;
        let last = single(&client, "m1", 10).await?;
        live.wait_applied("TXCOMP", last, CATCH_UP)?;
        let stored: Vec<u64> = stream_messages(&server.url(), "TXCOMP")
            .await?
            .iter()
            .map(|(s, _, _)| *s)
            .collect();
        ensure!(
            stored == vec![warm, tx.first_seq + 1, last - 1, last],
            "the stream holds {stored:?}: expected only member 2 of the transaction to survive"
        );

        // The replaying instance: member 2 alone, then a message outside the transaction.
        let replay_started = Instant::now();
        replay.start()?;
        replay.wait_applied("TXCOMP", last, Duration::from_secs(10))?;
        eprintln!(
            "compacted_transaction_members: the replaying instance caught up in {:?}",
            replay_started.elapsed()
        );
        ensure!(
            !replay.log().contains("without a commit"),
            "the replaying instance waited for a commit instead of completing the transaction at the next message:\n{}",
            replay.log()
        );
        let mut fresh = tx_instance(&group, root.path(), "fresh", 1)?;
        fresh.start()?;
        fresh.wait_applied("TXCOMP", last, CATCH_UP)?;
        let rows = replay.sqlite_rows("items", "id")?;
        ensure!(
            rows["m1"]["n"] == Value::I64(10)
                && rows["m2"]["n"] == Value::I64(2)
                && rows["m3"]["n"] == Value::I64(30),
            "replay rows: {rows:?}"
        );
        let tail = tail_json(&live, 4)?;
        ensure!(
            tail[1]["txn"]["sequence"] == 2 && tail[1]["txn"]["commit"] == false,
            "the surviving member in tail: {}",
            tail[1]
        );
        stop_all(&mut [&mut live, &mut replay, &mut fresh])?;
        for i in [&live, &replay, &fresh] {
            ensure!(i.parked()?.is_empty(), "{}: parked", i.name);
        }
        assert_same_digests(&[&live, &replay, &fresh], last)
    })
}

// ---- Open batches on 2.9. ----

/// On 2.9.10 messages with batch headers and no commit are stored as plain messages (the server
/// does not know atomic batches): the applier applies them after its open-transaction timeout,
/// and at once when a later message outside them follows. Nothing stalls.
#[test]
fn open_batch_headers_on_old_server() -> Result<()> {
    let _heavy = heavy();
    let version = jetsync_testkit::server_version()?;
    if version_at_least(&version, (2, 12, 0)) {
        eprintln!(
            "open_batch_headers_on_old_server: SKIPPED (runs on servers without atomic batches, \
             e.g. 2.9.10; running {version}, which never stores an uncommitted batch)"
        );
        return Ok(());
    }
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = group_with(&server.url(), "OPENB", "items");
        // No `stream.transactions`: this server has no atomic batches.
        let mut inst = Instance::new(&group, root.path(), "o1", SinkKind::Sqlite)?;
        let (code, _, err) = inst.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        inst.start()?;
        let client = group.client("openb").await?;
        let warm = single(&client, "warm", 0).await?;
        inst.wait_applied("OPENB", warm, CATCH_UP)?;

        let js = async_nats::jetstream::new(async_nats::connect(server.url()).await?);
        let publish = |batch: &'static str, keys: &'static [&'static str]| {
            let js = js.clone();
            async move {
                let mut last = 0;
                for (n, key) in keys.iter().enumerate() {
                    let member = RawMember::upsert(format!("openb.items.{key}"), serde_json::json!({"id": key, "n": n}), &format!("{batch}-{n}"));
                    last = js
                        .publish_with_headers(member.subject.clone(), member.headers(batch, n + 1, false), member.body.clone().into())
                        .await?
                        .await?
                        .sequence;
                }
                anyhow::Ok(last)
            }
        };
        // An open batch and nothing after it: applied within the timeout, not never.
        let open_started = Instant::now();
        let open_last = publish("open-1", &["p1", "p2"]).await?;
        inst.wait_applied("OPENB", open_last, Duration::from_secs(30))?;
        let rows = inst.sqlite_rows("items", "id")?;
        ensure!(rows.contains_key("p1") && rows.contains_key("p2"), "rows {rows:?}");
        eprintln!(
            "open_batch_headers_on_old_server: the open batch was applied after {:?}",
            open_started.elapsed()
        );
        wait_until("a warning about the open transaction", Duration::from_secs(10), || {
            inst.log()
                .lines()
                .any(|l| l.contains("WARN") && l.contains("open-1"))
                .then_some(())
        })
        .with_context(|| inst.log())?;

        // An open batch followed by a plain message: applied at once.
        let started = Instant::now();
        publish("open-2", &["q1", "q2"]).await?;
        let after = single(&client, "r1", 1).await?;
        inst.wait_applied("OPENB", after, Duration::from_secs(8))?;
        eprintln!(
            "open_batch_headers_on_old_server: the open batch followed by a message was applied after {:?}",
            started.elapsed()
        );
        let rows = inst.sqlite_rows("items", "id")?;
        for key in ["q1", "q2", "r1"] {
            ensure!(rows.contains_key(key), "{key} missing: {rows:?}");
        }
        ensure!(inst.parked()?.is_empty(), "parked {:?}", inst.parked()?);
        ensure!(inst.is_running(), "the applier exited:\n{}", inst.log());
        let code = inst.stop(STOP)?;
        ensure!(code == 0, "exit {code}");
        Ok(())
    })
}
