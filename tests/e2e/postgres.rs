//! Postgres: instances apply into existing tables of their own Postgres schema (a text-keyed
//! table and an integer-keyed one). Three instances converge under two concurrent publishers,
//! and one instance SIGKILLed at random moments ends with exactly the reference state.
//!
//! Postgres at `JETSYNC_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`);
//! every schema is created per test and dropped by a guard. `JETSYNC_E2E_SEED` replays the
//! random choices (timing still varies).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use jetsync::{Row, Value};
use jetsync_e2e::{
    assert_rows_equal, heavy, postgres_rows, postgres_url, Group, Instance, PgSchema, Reference,
    SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::convergence::digest_of;
use crate::crash::{runtime, seed, stream_last_seq, CATCH_UP, STOP};

/// Events per publisher in the convergence scenario (two publishers).
const CONVERGE_EVENTS_PER_PUBLISHER: usize = 3_000;
/// Events streamed during the Postgres crash loop.
const CRASH_EVENTS: usize = 5_000;
/// Keys per table.
const KEYS: usize = 300;
/// Events per pipelined chunk of the crash loop's publisher, and the chunk period.
const CHUNK: usize = 250;
const CHUNK_PERIOD: Duration = Duration::from_millis(300);
/// At least this many SIGKILLs, at most this many kill cycles.
const MIN_KILLS: usize = 10;
const MAX_KILLS: usize = 60;
/// Kill delays after each (re)start, milliseconds.
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 50..=400;

/// The tables every instance's schema holds (`{schema}` is replaced by the schema name).
const DDL: &str = "CREATE TABLE {schema}.items (id text PRIMARY KEY, n bigint, price double precision, label text);
CREATE TABLE {schema}.counters (id bigint PRIMARY KEY, v bigint);";

/// One event: table, key, new row (`None` = delete).
type Event = (&'static str, String, Option<Row>);

/// A unique schema name for instance `instance` of this test process.
fn schema_name(instance: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "jse2e_{}_{}_{instance}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A group with tables `items` (key `id`, text) and `counters` (key `id`, bigint).
fn group(url: &str, stream: &str) -> Group {
    let mut group = Group::new(url, stream, &stream.to_lowercase());
    group.tables.insert("counters".into(), "id".into());
    group
}

/// `n` random events over both tables: upserts (85 %) carrying every column, and deletes.
fn random_events(rng: &mut StdRng, n: usize, tag: &str) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let delete = rng.gen_bool(0.15);
            if rng.gen_bool(0.5) {
                let key = format!("k{:03}", rng.gen_range(0..KEYS));
                if delete {
                    return ("items", key, None);
                }
                let mut row = Row::new();
                row.insert("id".into(), Value::Text(key.clone()));
                row.insert(
                    "n".into(),
                    Value::I64(rng.gen_range(-1_000_000_000_i64..1_000_000_000)),
                );
                row.insert("price".into(), Value::F64(rng.gen_range(-1.0e6_f64..1.0e6)));
                let label = if rng.gen_bool(0.1) {
                    Value::Null
                } else {
                    let len = rng.gen_range(0..12);
                    let s: String = (0..len).map(|_| rng.gen_range('a'..='z')).collect();
                    Value::Text(format!("{tag}-{i}-{s}é"))
                };
                row.insert("label".into(), label);
                ("items", key, Some(row))
            } else {
                let id = rng.gen_range(1..=KEYS as i64);
                let key = id.to_string();
                if delete {
                    return ("counters", key, None);
                }
                let mut row = Row::new();
                row.insert("id".into(), Value::I64(id));
                row.insert("v".into(), Value::I64(rng.gen_range(i64::MIN..=i64::MAX)));
                ("counters", key, Some(row))
            }
        })
        .collect()
}

/// Publishes `events` pipelined (one pipeline per table); returns the reference built from the
/// acknowledgements and the acknowledged sequences.
async fn publish(client: &jetsync::Client, events: Vec<Event>) -> Result<(Reference, Vec<u64>)> {
    let mut reference = Reference::default();
    let mut seqs = Vec::with_capacity(events.len());
    for table in ["items", "counters"] {
        let handle = client.rows(table)?;
        let mine: Vec<&Event> = events.iter().filter(|e| e.0 == table).collect();
        let mut pipeline = handle.pipeline();
        for (_, key, row) in &mine {
            match row {
                Some(row) => pipeline.upsert(key, row).await?,
                None => pipeline.delete(key).await?,
            }
        }
        let published = pipeline.finish().await?;
        ensure!(
            published.len() == mine.len(),
            "{table}: {} acknowledgements for {} publishes",
            published.len(),
            mine.len()
        );
        for ((_, key, row), p) in mine.into_iter().zip(published) {
            ensure!(
                !p.duplicate,
                "{table} {key} acknowledged as a duplicate (seq {})",
                p.seq
            );
            reference.record(p.seq, table, key, row.clone());
            seqs.push(p.seq);
        }
    }
    Ok((reference, seqs))
}

/// Asserts that both tables of `schema` equal the reference.
async fn assert_pg_matches(what: &str, schema: &str, reference: &Reference) -> Result<()> {
    let url = postgres_url();
    for table in ["items", "counters"] {
        let rows = postgres_rows(&url, schema, table, "id").await?;
        assert_rows_equal(&format!("{what} {schema}.{table}"), &rows, reference, table)?;
    }
    Ok(())
}

#[test]
fn postgres_three_instances_converge() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(converge())
}

async fn converge() -> Result<()> {
    jetsync_e2e::applier_bin();
    let started = Instant::now();
    let seed = seed("postgres_converge");
    let url = postgres_url();
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let stream = "PGCONV";
    let group = group(&server.url(), stream);
    let mut schemas = Vec::new();
    let mut instances = Vec::new();
    for (i, apply) in [
        "",
        "[apply]\nbatch_max = 7\n",
        "[apply]\nbatch_max = 100\nbatch_wait_ms = 0\n",
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("i{}", i + 1);
        let schema = PgSchema::create(&url, &schema_name(&name), DDL)?;
        let instance = Instance::new(&group, root.path(), &name, SinkKind::Sqlite)?;
        instance.use_postgres(&url, &schema.name)?;
        if !apply.is_empty() {
            instance.append_config(apply)?;
        }
        schemas.push(schema);
        instances.push(instance);
    }
    let (code, _, err) = instances[0].cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    for instance in &mut instances {
        instance.start()?;
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let mut publishers = Vec::new();
    for p in 0..2 {
        let events = random_events(&mut rng, CONVERGE_EVENTS_PER_PUBLISHER, &format!("p{p}"));
        let client = group.client(&format!("pg-pub-{p}")).await?;
        publishers.push(tokio::spawn(async move { publish(&client, events).await }));
    }
    let mut reference = Reference::default();
    let mut seqs = Vec::new();
    for p in publishers {
        let (r, s) = p.await.context("publisher task")??;
        reference.merge(r);
        seqs.extend(s);
    }
    seqs.sort_unstable();
    let total = (2 * CONVERGE_EVENTS_PER_PUBLISHER) as u64;
    ensure!(
        seqs == (1..=total).collect::<Vec<_>>(),
        "acknowledged sequences are not 1..={total}"
    );
    eprintln!(
        "postgres_converge: published {total} events after {:?}",
        started.elapsed()
    );

    for instance in &mut instances {
        instance.wait_applied(stream, total, CATCH_UP)?;
    }
    eprintln!(
        "postgres_converge: all applied after {:?}",
        started.elapsed()
    );

    let mut digests = Vec::new();
    for (instance, schema) in instances.iter().zip(&schemas) {
        assert_pg_matches(&instance.name, &schema.name, &reference).await?;
        let (tables, seq) = digest_of(instance)?;
        ensure!(
            seq == total,
            "instance {} digest applied_seq {seq}, expected {total}",
            instance.name
        );
        for table in ["items", "counters"] {
            let digest = tables
                .as_array()
                .and_then(|t| t.iter().find(|t| t["table"] == table))
                .with_context(|| {
                    format!(
                        "instance {}: no digest of {table} in {tables}",
                        instance.name
                    )
                })?;
            let want = reference.rows(table).len() as u64;
            ensure!(
                digest["rows"].as_u64() == Some(want),
                "instance {} {table}: digest {digest}, expected {want} rows",
                instance.name
            );
        }
        digests.push((instance.name.clone(), tables));
    }
    for (name, tables) in &digests[1..] {
        ensure!(
            *tables == digests[0].1,
            "digest of {name} {tables} differs from {} {}",
            digests[0].0,
            digests[0].1
        );
    }
    for instance in &mut instances {
        let code = instance.stop(STOP)?;
        ensure!(
            code == 0,
            "instance {} exited {code}:\n{}",
            instance.name,
            instance.log()
        );
    }
    eprintln!("postgres_converge: passed after {:?}", started.elapsed());
    Ok(())
}

#[test]
fn postgres_crash_loop() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(crash_loop())
}

async fn crash_loop() -> Result<()> {
    jetsync_e2e::applier_bin();
    let started = Instant::now();
    let seed = seed("postgres_crash_loop");
    let mut rng = StdRng::seed_from_u64(seed);
    let url = postgres_url();
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let stream = "PGCRASH";
    let mut group = group(&server.url(), stream);
    group.extra_toml = "[apply]\nbatch_max = 100\n".into();
    let schema = PgSchema::create(&url, &schema_name("crash"), DDL)?;
    let mut instance = Instance::new(&group, root.path(), "c1", SinkKind::Sqlite)?;
    instance.use_postgres(&url, &schema.name)?;
    let (code, _, err) = instance.cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    let events = random_events(&mut rng, CRASH_EVENTS, "crash");
    let client = group.client("pg-crash-pub").await?;
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut reference = Reference::default();
            let mut seqs = Vec::new();
            let mut tick = tokio::time::interval(CHUNK_PERIOD);
            for chunk in events.chunks(CHUNK) {
                tick.tick().await;
                let (r, s) = publish(&client, chunk.to_vec()).await?;
                reference.merge(r);
                seqs.extend(s);
            }
            anyhow::Ok((reference, seqs))
        })
    };

    instance.start()?;
    let deadline = Instant::now() + CATCH_UP;
    let (mut kills, mut behind) = (0, 0);
    while kills < MIN_KILLS || !publisher.is_finished() {
        ensure!(
            kills < MAX_KILLS,
            "{kills} kills and the publisher is still not done"
        );
        ensure!(
            Instant::now() < deadline,
            "crash loop still running after {CATCH_UP:?}"
        );
        tokio::time::sleep(Duration::from_millis(rng.gen_range(KILL_DELAY_MS))).await;
        if !instance.is_running() {
            bail!(
                "the applier exited by itself during the crash loop:\n{}",
                instance.log()
            );
        }
        let applied = instance.applied(stream);
        let stored = stream_last_seq(&client, stream).await?;
        instance.kill();
        kills += 1;
        if applied < stored {
            behind += 1;
        }
        instance.start()?;
    }
    let (reference, mut seqs) = publisher.await.context("publisher task")??;
    seqs.sort_unstable();
    let last = reference.max_seq();
    ensure!(
        seqs == (1..=CRASH_EVENTS as u64).collect::<Vec<_>>(),
        "acknowledged sequences are not 1..={CRASH_EVENTS}"
    );
    eprintln!(
        "postgres_crash_loop: {kills} SIGKILLs ({behind} while behind the stream), last seq {last}, loop took {:?}",
        started.elapsed()
    );
    instance.wait_applied(stream, last, CATCH_UP)?;
    let code = instance.stop(STOP)?;
    ensure!(code == 0, "instance exited {code}:\n{}", instance.log());
    assert_pg_matches("crashed instance", &schema.name, &reference).await?;
    let (_, seq) = digest_of(&instance)?;
    ensure!(seq == last, "digest applied_seq {seq}, expected {last}");
    eprintln!("postgres_crash_loop: passed after {:?}", started.elapsed());
    Ok(())
}
