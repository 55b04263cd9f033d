//! History (issue #12): whatever way an instance came to the stream's end — replaying from the
//! start, bootstrapping halfway, SIGKILLed ten times, restored from an early copy of its files,
//! or rebuilt after a message limit rolled past it — it holds the same rows, values and value
//! types, and the same digest at the same applied sequence (DESIGN 5, convergence rule).
//!
//! The workload: 20,000 events over 1,000 keys in which values change type (text, integer,
//! float, bool, bytes, null; in the SQLite run one column may carry any of them, numeric-looking
//! text included, so a column that coerced values by the first value's type shows), columns
//! appear (`late`, only in the last quarter) and disappear (`early`, only in the first quarter;
//! every other column is left out of an upsert now and then), and rows are deleted and
//! re-created. Its last 1,000 events touch every key once, so that the message-limited stream
//! still holds every row's latest event at the end.
//!
//! One publisher writes every chunk of events twice, in the same order: to stream A (history 1,
//! no limits) and to stream B (history 5, `max_msgs` 1,500), so both streams assign the same
//! sequences and end with the same rows. On A run
//! - `replay` (`apply.bootstrap = false`, running from the start),
//! - `boot` (started after half of the events: joins from a snapshot),
//! - `killed` (SIGKILLed at a random moment after each of ten chunks, restarted each time),
//! - `restored` (its data files copied while stopped after 3,000 events; stopped again after
//!   15,000, the copy put back, started: it resumes from the old copy's fence);
//!
//! on B runs `gap` (stopped after the first 1,000 events, started at the end: the limit rolled
//! past it, so it resyncs). At the end all five hold exactly the reference rows (the last event
//! of every row; a row's content is exactly its last upsert) and all five digests (`digest
//! --json`: tables and applied sequence) are identical.
//!
//! The Postgres run does the same with one schema per instance and tables created by the test;
//! Postgres columns are typed, so there every column keeps one type (text, bigint, double,
//! boolean, bytea, jsonb) while values still come and go as NULL or absent.
//! `JETSYNC_E2E_SEED` replays the random choices (timing still varies).

use std::{
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use jetsync::{Row, Value};
use jetsync_e2e::{
    assert_rows_typed_equal, heavy, postgres_backup_schema, postgres_restore_schema, postgres_rows,
    postgres_url, sqlite_expected_row, stream_bounds, wait_until, Group, Instance, PgSchema,
    Reference, SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

use crate::crash::{publish_pipelined, runtime, seed, Event, CATCH_UP, STOP};

/// Events in all (the last `KEYS` of them touch every key once).
const EVENTS: usize = 20_000;
/// Distinct row keys.
const KEYS: usize = 1_000;
/// Events per published chunk; the scenario's steps happen between chunks.
const CHUNK: usize = 1_000;
/// Stream B's message limit: at least `KEYS`, so the final round (one event per key) stays.
const MAX_MSGS: u64 = 1_500;
/// Stream B's per-row history: above 1, so the message limit, not compaction, removes events.
const HISTORY_B: u64 = 5;
/// SIGKILLs of the `killed` instance (one after each of chunks 1..=KILLS).
const KILLS: usize = 10;
/// Delay between a chunk's acknowledgement and the kill, milliseconds: the instance is
/// usually applying that chunk then.
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 0..=150;
/// Chunk after which `gap` is stopped (it applied everything up to there).
const GAP_STOP_CHUNK: usize = 0;
/// Chunk after which `restored`'s files are copied.
const BACKUP_CHUNK: usize = 2;
/// Chunk after which `boot` starts (half of the events published).
const BOOT_CHUNK: usize = EVENTS / CHUNK / 2 - 1;
/// Chunk after which `restored` is stopped and its old copy put back.
const RESTORE_CHUNK: usize = 14;

/// Where the instances write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Non-key columns of the SQLite workload: any of them takes any value type.
const SQLITE_COLUMNS: [&str; 5] = ["a", "b", "c", "d", "e"];

/// Tables of every Postgres instance's schema: every column keeps one type.
const PG_DDL: &str = "CREATE TABLE {schema}.items (id text PRIMARY KEY, t text, i bigint, \
     f double precision, b boolean, y bytea, j jsonb, early text, late bigint);";

/// A value of any type, with the cases that type-coercing storage would change: text that
/// looks like a number, integral floats, integers beyond a double's precision.
fn any_value(rng: &mut StdRng) -> Value {
    match rng.gen_range(0..6) {
        0 => Value::Text(text(rng)),
        1 => Value::I64(integer(rng)),
        2 => Value::F64(float(rng)),
        3 => Value::Bool(rng.gen_bool(0.5)),
        4 => Value::Bytes(bytes(rng)),
        _ => Value::Null,
    }
}

fn text(rng: &mut StdRng) -> String {
    const LOOKS_NUMERIC: [&str; 8] = [
        "42",
        "-7",
        "3.25",
        "1e3",
        "0",
        "007",
        " 5",
        "9007199254740993",
    ];
    if rng.gen_bool(0.3) {
        return LOOKS_NUMERIC[rng.gen_range(0..LOOKS_NUMERIC.len())].to_owned();
    }
    const ALPHABET: &[char] = &['a', 'Z', '0', ' ', '\'', '"', 'é', '€', '漢', '🦀'];
    let len = rng.gen_range(0..16);
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
        .collect()
}

fn integer(rng: &mut StdRng) -> i64 {
    match rng.gen_range(0..10) {
        0 => i64::MIN,
        1 => i64::MAX,
        2 => 9_007_199_254_740_993, // 2^53 + 1: not exact as a double
        3 => rng.gen_range(0..3),
        _ => rng.gen_range(-1_000_000_000_i64..1_000_000_000),
    }
}

fn float(rng: &mut StdRng) -> f64 {
    match rng.gen_range(0..4) {
        0 => f64::from(rng.gen_range(-100_i32..100)), // integral: 2.0 must stay a float
        1 => 1.0e300,
        _ => rng.gen_range(-1.0e9_f64..1.0e9),
    }
}

fn bytes(rng: &mut StdRng) -> Vec<u8> {
    if rng.gen_bool(0.2) {
        return b"42".to_vec(); // bytes that read as a number when taken for text
    }
    let len = rng.gen_range(0..24);
    (0..len).map(|_| rng.gen()).collect()
}

/// A value of Postgres column `column`'s type, or NULL now and then.
fn pg_value(rng: &mut StdRng, column: &str) -> Value {
    if rng.gen_bool(0.1) {
        return Value::Null;
    }
    match column {
        "t" | "early" => Value::Text(text(rng)),
        "i" | "late" => Value::I64(integer(rng)),
        "f" => Value::F64(float(rng)),
        "b" => Value::Bool(rng.gen_bool(0.5)),
        "y" => Value::Bytes(bytes(rng)),
        "j" => Value::Json(serde_json::json!({
            "n": rng.gen_range(-1000_i64..1000),
            "s": text(rng),
            "l": [rng.gen_bool(0.5), null],
        })),
        other => unreachable!("no Postgres column {other}"),
    }
}

/// One upsert of `key` as the `i`-th event: every regular column present with probability
/// 0.7; `early` only in the first quarter, `late` only in the last.
fn upsert(rng: &mut StdRng, backend: Backend, key: &str, i: usize) -> Row {
    let mut row = Row::new();
    row.insert("id".into(), Value::Text(key.to_owned()));
    let regular: &[&str] = match backend {
        Backend::Sqlite => &SQLITE_COLUMNS,
        Backend::Postgres => &["t", "i", "f", "b", "y", "j"],
    };
    let value = |rng: &mut StdRng, column: &str| match backend {
        Backend::Sqlite => any_value(rng),
        Backend::Postgres => pg_value(rng, column),
    };
    for column in regular {
        if rng.gen_bool(0.7) {
            let v = value(rng, column);
            row.insert((*column).into(), v);
        }
    }
    if i < EVENTS / 4 && rng.gen_bool(0.5) {
        let v = value(rng, "early");
        row.insert("early".into(), v);
    }
    if i >= EVENTS * 3 / 4 && rng.gen_bool(0.5) {
        let v = value(rng, "late");
        row.insert("late".into(), v);
    }
    row
}

/// The workload: `EVENTS - KEYS` random events (12 % deletes), then one event per key in a
/// random order.
fn workload(rng: &mut StdRng, backend: Backend) -> Vec<Event> {
    let mut keys: Vec<usize> = (0..EVENTS - KEYS).map(|_| rng.gen_range(0..KEYS)).collect();
    let mut last_round: Vec<usize> = (0..KEYS).collect();
    last_round.shuffle(rng);
    keys.extend(last_round);
    keys.into_iter()
        .enumerate()
        .map(|(i, k)| {
            let key = format!("k{k:04}");
            if rng.gen_bool(0.12) {
                (key, None)
            } else {
                let row = upsert(rng, backend, &key, i);
                (key, Some(row))
            }
        })
        .collect()
}

/// A unique Postgres schema name for `instance` of this test process.
fn schema_name(instance: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "tests_hist_{}_{}_{instance}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Indices of the five instances in [`Five::instances`].
const REPLAY: usize = 0;
const BOOT: usize = 1;
const KILLED: usize = 2;
const RESTORED: usize = 3;
const GAP: usize = 4;

/// The five instances and their Postgres schemas. Field order is drop order: the processes go
/// before their schemas.
struct Five {
    /// `replay`, `boot`, `killed`, `restored`, `gap` (see the indices above).
    instances: Vec<Instance>,
    /// Postgres only: the schema of every instance, in the same order.
    schemas: Vec<PgSchema>,
}

/// Builds the five instances (`gap` on `group_b`, the others on `group_a`) and provisions both
/// streams.
fn five(backend: Backend, group_a: &Group, group_b: &Group, root: &Path) -> Result<Five> {
    let mut instances = Vec::new();
    for (name, group) in [
        ("replay", group_a),
        ("boot", group_a),
        ("killed", group_a),
        ("restored", group_a),
        ("gap", group_b),
    ] {
        instances.push(Instance::new(group, root, name, SinkKind::Sqlite)?);
    }
    instances[REPLAY].set_option("apply", "bootstrap", "false")?;
    // Small batches, so that kills land between and inside batch commits.
    instances[KILLED].set_option("apply", "batch_max", "50")?;
    instances[GAP].set_stream_option("max_msgs", &MAX_MSGS.to_string())?;
    instances[GAP].set_stream_option("history", &HISTORY_B.to_string())?;
    let mut schemas = Vec::new();
    if backend == Backend::Postgres {
        let url = postgres_url();
        for instance in &instances {
            let schema = PgSchema::create(&url, &schema_name(&instance.name), PG_DDL)?;
            instance.use_postgres(&url, &schema.name)?;
            schemas.push(schema);
        }
    }
    for instance in [&instances[REPLAY], &instances[GAP]] {
        let (code, _, err) = instance.cli(&["provision"])?;
        ensure!(
            code == 0,
            "provision for {} exited {code}: {err}",
            instance.name
        );
    }
    Ok(Five { instances, schemas })
}

/// Rows of `instance`'s `items` as stored, with their types (SQLite storage classes, or the
/// Postgres column types).
async fn stored_rows(
    backend: Backend,
    instance: &Instance,
    schema: Option<&PgSchema>,
) -> Result<std::collections::BTreeMap<String, Row>> {
    match backend {
        Backend::Sqlite => instance.sqlite_rows("items", "id"),
        Backend::Postgres => {
            let schema = schema.context("Postgres instance without a schema")?;
            postgres_rows(&schema.url, &schema.name, "items", "id").await
        }
    }
}

/// What an instance must hold: the reference rows as the backend stores them.
fn expected_rows(
    backend: Backend,
    reference: &Reference,
) -> std::collections::BTreeMap<String, Row> {
    let rows = reference.rows("items");
    match backend {
        Backend::Sqlite => rows
            .into_iter()
            .map(|(k, row)| (k, sqlite_expected_row(&row)))
            .collect(),
        Backend::Postgres => rows,
    }
}

#[test]
fn five_histories_converge_sqlite() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(history(Backend::Sqlite))
}

#[test]
fn five_histories_converge_postgres() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(history(Backend::Postgres))
}

async fn history(backend: Backend) -> Result<()> {
    jetsync_e2e::applier_bin();
    let scenario = format!("history_{backend:?}").to_lowercase();
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed(&scenario));
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let (stream_a, stream_b) = match backend {
        Backend::Sqlite => ("HIST_A", "HIST_B"),
        Backend::Postgres => ("HISTPG_A", "HISTPG_B"),
    };
    let group_a = Group::new(server.url(), stream_a, &stream_a.to_lowercase());
    let group_b = Group::new(server.url(), stream_b, &stream_b.to_lowercase());
    let mut five = five(backend, &group_a, &group_b, root.path())?;
    let client_a = group_a.client("hist-pub").await?;
    let client_b = group_b.client("hist-pub").await?;
    let (items_a, items_b) = (client_a.rows("items")?, client_b.rows("items")?);

    let stream_of = |i: usize| if i == GAP { stream_b } else { stream_a };
    for i in [REPLAY, KILLED, RESTORED, GAP] {
        five.instances[i].start()?;
    }
    let events = workload(&mut rng, backend);
    let backup = root.path().join("restored-backup");
    let backup_schema = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(PgSchema::create(
            &postgres_url(),
            &schema_name("backup"),
            "",
        )?),
    };
    let mut reference = Reference::default();
    let mut gap_stopped_at = 0;
    let mut kills = 0;
    for (n, chunk) in events.chunks(CHUNK).enumerate() {
        // The same events in the same order to both streams: the same sequences.
        let a = publish_pipelined(&items_a, chunk.to_vec()).await?;
        let b = publish_pipelined(&items_b, chunk.to_vec()).await?;
        ensure!(
            a.seqs == b.seqs,
            "streams A and B assigned different sequences to chunk {n}"
        );
        reference.merge(a.reference);
        let last = reference.max_seq();

        if n == GAP_STOP_CHUNK {
            let gap = &mut five.instances[GAP];
            gap.wait_applied(stream_b, last, CATCH_UP)?;
            ensure!(gap.stop(STOP)? == 0, "gap: clean stop:\n{}", gap.log());
            gap_stopped_at = gap.applied(stream_b);
        }
        if n == BACKUP_CHUNK {
            let restored = &mut five.instances[RESTORED];
            restored.wait_applied(stream_a, last, CATCH_UP)?;
            ensure!(
                restored.stop(STOP)? == 0,
                "restored: clean stop:\n{}",
                restored.log()
            );
            restored.backup_files(&backup)?;
            if let Some(bk) = &backup_schema {
                postgres_backup_schema(&bk.url, &five.schemas[RESTORED].name, &bk.name)?;
            }
            restored.start()?;
        }
        if n == BOOT_CHUNK {
            five.instances[BOOT].start()?;
        }
        if n == RESTORE_CHUNK {
            let restored = &mut five.instances[RESTORED];
            ensure!(
                restored.stop(STOP)? == 0,
                "restored: clean stop:\n{}",
                restored.log()
            );
            let before = restored.applied(stream_a);
            restored.restore_files(&backup)?;
            if let Some(bk) = &backup_schema {
                postgres_restore_schema(&bk.url, &bk.name, &five.schemas[RESTORED].name)?;
            }
            let after = restored.applied(stream_a);
            ensure!(
                after < before,
                "restored: the old copy's checkpoint ({after}) is not behind the stopped one ({before})"
            );
            restored.start()?;
        }
        if (1..=KILLS).contains(&n) {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(KILL_DELAY_MS))).await;
            let killed = &mut five.instances[KILLED];
            ensure!(
                killed.is_running(),
                "killed: exited by itself:\n{}",
                killed.log()
            );
            killed.kill();
            kills += 1;
            killed.start()?;
        }
    }
    let last = reference.max_seq();
    ensure!(last == EVENTS as u64, "last seq {last}, expected {EVENTS}");
    eprintln!(
        "{scenario}: published {EVENTS} events to two streams, {kills} kills, after {:?}",
        started.elapsed()
    );

    // The limit rolled past `gap`: events after its applied sequence are gone.
    let (first_b, last_b) = stream_bounds(&server.url(), stream_b).await?;
    ensure!(
        last_b == last && first_b > gap_stopped_at + 1,
        "stream B holds {first_b}..={last_b}: no gap after {gap_stopped_at}"
    );
    five.instances[GAP].start()?;
    for (i, instance) in five.instances.iter_mut().enumerate() {
        instance.wait_applied(stream_of(i), last, CATCH_UP)?;
    }
    eprintln!(
        "{scenario}: all five applied seq {last} after {:?}",
        started.elapsed()
    );
    // The checkpoint is written just before these log lines: wait for the lines too.
    for (i, line) in [(BOOT, "bootstrap complete"), (GAP, "resync complete")] {
        let instance = &five.instances[i];
        wait_until(
            &format!("{}'s log line {line:?}", instance.name),
            Duration::from_secs(10),
            || {
                instance
                    .run_logs()
                    .iter()
                    .any(|(_, log)| log.contains(line))
                    .then_some(())
            },
        )?;
    }

    // Rows, value by value with their types: every instance against the reference, and
    // against `replay`. Every failure is collected before the test fails, so one run shows
    // which histories diverge.
    let want = expected_rows(backend, &reference);
    eprintln!("{scenario}: {} live rows expected", want.len());
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for (i, instance) in five.instances.iter().enumerate() {
        let have = stored_rows(backend, instance, five.schemas.get(i)).await?;
        if let Err(e) = assert_rows_typed_equal(
            &format!("{} against the reference", instance.name),
            &have,
            &want,
        ) {
            failures.push(format!("{e:#}"));
        }
        rows.push(have);
    }
    for (i, instance) in five.instances.iter().enumerate().skip(1) {
        if let Err(e) = assert_rows_typed_equal(
            &format!("{} against replay", instance.name),
            &rows[i],
            &rows[REPLAY],
        ) {
            failures.push(format!("{e:#}"));
        }
    }
    // Digests: tables and applied sequence, identical on all five.
    let mut digests = Vec::new();
    for instance in &five.instances {
        let digest = instance.digest()?;
        let seq = digest["applied_seq"].as_u64();
        if seq != Some(last) {
            failures.push(format!(
                "{}: digest applied_seq {seq:?}, expected {last}",
                instance.name
            ));
        }
        digests.push(digest);
    }
    for (i, instance) in five.instances.iter().enumerate().skip(1) {
        if digests[i]["tables"] != digests[REPLAY]["tables"] {
            failures.push(format!(
                "{}: digest {} differs from replay's {}",
                instance.name, digests[i]["tables"], digests[REPLAY]["tables"]
            ));
        }
    }
    for instance in &mut five.instances {
        let code = instance.stop(STOP)?;
        if code != 0 {
            failures.push(format!(
                "{} exited {code}:\n{}",
                instance.name,
                instance.log()
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "{scenario} (seed printed above): {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{scenario}: passed after {:?}", started.elapsed());
    Ok(())
}
