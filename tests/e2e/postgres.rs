//! Postgres (issue #5): instances apply into existing tables of their own Postgres schema, one
//! keyed by text (`items`) and one by bigint (`counters`).
//!
//! - Convergence: three instances (one schema each) apply what two concurrent publishers write,
//!   20,000 events over 1,000 keys, and end equal to the reference with identical digests.
//! - SIGKILL loop: three instances (one schema each) apply 20,000 events while every one of
//!   them is SIGKILLed at random moments at least 20 times.
//! - Killed COMMIT (issue #12.3): an applier SIGKILLed while the server holds its COMMIT open,
//!   restarted with a smaller `apply.batch_max`, applies nothing twice and never moves the fence
//!   back.
//! - Poison: a CHECK constraint violation, a value too long for its `varchar` and a value out of
//!   range for its `smallint` are parked with their rows' later events held behind them while
//!   every other row advances; once the cause is fixed, `parked retry` applies them in order.
//!
//! Exactly-once is checked through the database itself, so that it can fail: every schema
//! carries an audit trigger that records each row the applier writes (`U`, with the unique
//! event number `v` every upsert carries) or deletes (`D`, with the `v` of the row it removes)
//! into `apply_audit`. With the stream keeping every event (`history` 64) and every instance
//! past its (empty) bootstrap before publishing starts, the audit of an instance must be
//! exactly the one computed from the acknowledged events in stream order: an event applied
//! twice shows up as a doubled entry, a lost one as a missing entry. Besides, the rows equal the
//! reference and the fence (`jetsync_offsets`) equals the last sequence.
//!
//! Postgres at `JETSYNC_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`);
//! every schema is created per test and dropped by a guard. `JETSYNC_E2E_SEED` replays the
//! random choices (timing still varies).

use std::{
    collections::{BTreeMap, HashMap},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use jetsync::{Row, Value};
use jetsync_e2e::{
    assert_rows_equal, heavy, postgres_exec, postgres_rows, postgres_url, Group, Instance,
    PgSchema, Reference, SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::convergence::digest_of;
use crate::crash::{runtime, seed, stream_last_seq, CATCH_UP, FULL_HISTORY, STOP};

/// Events of the convergence and SIGKILL scenarios (the convergence splits them between two
/// publishers), not counting the warm-up event.
const EVENTS: usize = 20_000;
/// Keys per table: 1,000 keys in all.
const KEYS_PER_TABLE: usize = 500;
/// Events per pipelined chunk of the SIGKILL loop's publisher.
const CHUNK: usize = 500;
/// The SIGKILL loop's publisher sends the next chunk once every instance is fewer than this
/// many events behind, so the appliers always have work while events stream in.
const BACKLOG: u64 = 1_500;
/// SIGKILLs of every instance in the SIGKILL loop, at least.
const MIN_KILLS_EACH: usize = 20;
/// Upper bound on kill cycles (all instances together).
const MAX_KILLS: usize = 240;
/// Kill delays (between two kills of any instance), milliseconds.
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 30..=250;
/// Bound for the whole SIGKILL loop.
const CRASH_LOOP: Duration = Duration::from_secs(240);

/// The tables every instance's schema holds (`{schema}` is replaced by the schema name), with
/// the audit trigger on both synced tables.
const DDL: &str = r#"
CREATE TABLE {schema}.items (id text PRIMARY KEY, n bigint, price double precision, label text, v bigint NOT NULL);
CREATE TABLE {schema}.counters (id bigint PRIMARY KEY, c bigint, v bigint NOT NULL);
CREATE TABLE {schema}.apply_audit (tbl text NOT NULL, k text NOT NULL, v bigint NOT NULL, op text NOT NULL,
  xid bigint NOT NULL DEFAULT txid_current(), pid integer NOT NULL DEFAULT pg_backend_pid());
CREATE FUNCTION {schema}.audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO {schema}.apply_audit (tbl, k, v, op) VALUES (TG_TABLE_NAME, OLD.id::text, OLD.v, 'D');
    RETURN OLD;
  END IF;
  INSERT INTO {schema}.apply_audit (tbl, k, v, op) VALUES (TG_TABLE_NAME, NEW.id::text, NEW.v, 'U');
  RETURN NEW;
END $$;
CREATE TRIGGER items_audit AFTER INSERT OR UPDATE OR DELETE ON {schema}.items
  FOR EACH ROW EXECUTE FUNCTION {schema}.audit_row();
CREATE TRIGGER counters_audit AFTER INSERT OR UPDATE OR DELETE ON {schema}.counters
  FOR EACH ROW EXECUTE FUNCTION {schema}.audit_row();
"#;

/// Apply settings of the three instances: different batch sizes, so that they split the stream
/// into different transactions and still must end identical.
const APPLY: [&[(&str, &str)]; 3] = [
    &[("batch_max", "50")],
    &[("batch_max", "7")],
    &[("batch_max", "100"), ("batch_wait_ms", "0")],
];

/// One event: table, key, new row (`None` = delete) and its unique number `v` (the row's `v`
/// column for an upsert).
#[derive(Debug, Clone)]
struct Event {
    table: &'static str,
    key: String,
    row: Option<Row>,
    v: i64,
}

/// One audit entry: (table, key as text, `v`, `U` or `D`).
type AuditEntry = (String, String, i64, String);

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

/// Three instances `i1`..`i3`, each in its own schema (created with [`DDL`]), each with its
/// [`APPLY`] settings and a stream keeping every event; the stream is provisioned.
fn three_instances(
    group: &Group,
    root: &std::path::Path,
) -> Result<(Vec<PgSchema>, Vec<Instance>)> {
    let url = postgres_url();
    let mut schemas = Vec::new();
    let mut instances = Vec::new();
    for (i, apply) in APPLY.into_iter().enumerate() {
        let name = format!("i{}", i + 1);
        let schema = PgSchema::create(&url, &schema_name(&name), DDL)?;
        let instance = Instance::new(group, root, &name, SinkKind::Sqlite)?;
        instance.use_postgres(&url, &schema.name)?;
        instance.set_stream_option("history", &FULL_HISTORY.to_string())?;
        for (key, value) in apply {
            instance.set_option("apply", key, value)?;
        }
        // The audit trigger must see every change: coalescing (on by default) would write a row
        // changed several times in one batch once.
        instance.set_option("apply", "coalesce", "false")?;
        schemas.push(schema);
        instances.push(instance);
    }
    let (code, _, err) = instances[0].cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    Ok((schemas, instances))
}

/// An `items` row.
fn item_row(key: &str, n: i64, price: f64, label: Value, v: i64) -> Row {
    let mut row = Row::new();
    row.insert("id".into(), Value::Text(key.to_owned()));
    row.insert("n".into(), Value::I64(n));
    row.insert("price".into(), Value::F64(price));
    row.insert("label".into(), label);
    row.insert("v".into(), Value::I64(v));
    row
}

/// `n` random events over both tables, numbered `first_v..`: upserts (85 %) carrying every
/// column, and deletes.
fn random_events(rng: &mut StdRng, n: usize, first_v: i64) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let v = first_v + i as i64;
            let delete = rng.gen_bool(0.15);
            if rng.gen_bool(0.5) {
                let key = format!("k{:03}", rng.gen_range(0..KEYS_PER_TABLE));
                let row = (!delete).then(|| {
                    let label = if rng.gen_bool(0.1) {
                        Value::Null
                    } else {
                        let len = rng.gen_range(0..12);
                        let s: String = (0..len).map(|_| rng.gen_range('a'..='z')).collect();
                        Value::Text(format!("{v}-{s}é'\""))
                    };
                    item_row(
                        &key,
                        rng.gen_range(-1_000_000_000_i64..1_000_000_000),
                        rng.gen_range(-1.0e6_f64..1.0e6),
                        label,
                        v,
                    )
                });
                Event {
                    table: "items",
                    key,
                    row,
                    v,
                }
            } else {
                let id = rng.gen_range(1..=KEYS_PER_TABLE as i64);
                let row = (!delete).then(|| {
                    let mut row = Row::new();
                    row.insert("id".into(), Value::I64(id));
                    row.insert("c".into(), Value::I64(rng.gen_range(i64::MIN..=i64::MAX)));
                    row.insert("v".into(), Value::I64(v));
                    row
                });
                Event {
                    table: "counters",
                    key: id.to_string(),
                    row,
                    v,
                }
            }
        })
        .collect()
}

/// Fails unless no row gets more than `history` events in `events`, so a stream with that
/// history keeps every one of them.
fn ensure_fits_history(events: &[Event], history: usize) -> Result<()> {
    let mut per_row: HashMap<(&str, &str), usize> = HashMap::new();
    for e in events {
        *per_row.entry((e.table, &e.key)).or_default() += 1;
    }
    let max = per_row.values().copied().max().unwrap_or(0);
    ensure!(
        max <= history,
        "test data: a row gets {max} events, more than history {history}"
    );
    Ok(())
}

/// Publishes `events` pipelined (one pipeline per table, interleaved in the events' order);
/// returns them with their acknowledged sequences.
async fn publish(client: &jetsync::Client, events: Vec<Event>) -> Result<Vec<(u64, Event)>> {
    let items = client.rows("items")?;
    let counters = client.rows("counters")?;
    let mut item_pipeline = items.pipeline();
    let mut counter_pipeline = counters.pipeline();
    for e in &events {
        let pipeline = if e.table == "items" {
            &mut item_pipeline
        } else {
            &mut counter_pipeline
        };
        match &e.row {
            Some(row) => pipeline.upsert(&e.key, row).await?,
            None => pipeline.delete(&e.key).await?,
        }
    }
    let mut item_acks = item_pipeline.finish().await?.into_iter();
    let mut counter_acks = counter_pipeline.finish().await?.into_iter();
    let mut acked = Vec::with_capacity(events.len());
    for e in events {
        let acks = if e.table == "items" {
            &mut item_acks
        } else {
            &mut counter_acks
        };
        let p = acks
            .next()
            .with_context(|| format!("no acknowledgement for {} {}", e.table, e.key))?;
        ensure!(
            !p.duplicate,
            "{} {} acknowledged as a duplicate (seq {})",
            e.table,
            e.key,
            p.seq
        );
        acked.push((p.seq, e));
    }
    ensure!(
        item_acks.next().is_none() && counter_acks.next().is_none(),
        "more acknowledgements than publishes"
    );
    Ok(acked)
}

/// Publishes the warm-up event (`items` row `warm`, `v` 0) and waits until every instance
/// applied it: from then on no instance bootstraps from a snapshot (S > 0, sink not empty), so
/// every later event reaches every instance through its durable consumer.
async fn warm_up(
    client: &jetsync::Client,
    instances: &mut [Instance],
    stream: &str,
) -> Result<(u64, Event)> {
    let event = Event {
        table: "items",
        key: "warm".into(),
        row: Some(item_row("warm", 0, 0.0, Value::Text("warm".into()), 0)),
        v: 0,
    };
    let acked = publish(client, vec![event]).await?.remove(0);
    for instance in instances {
        instance.wait_applied(stream, acked.0, CATCH_UP)?;
    }
    Ok(acked)
}

/// The reference built from acknowledged events.
fn reference_of(acked: &[(u64, Event)]) -> Reference {
    let mut reference = Reference::default();
    for (seq, e) in acked {
        reference.record(*seq, e.table, &e.key, e.row.clone());
    }
    reference
}

/// The audit an instance that applied `acked` exactly once each, in stream order, starting
/// from empty tables, holds: `U` for every upsert, `D` for every delete of a live row (with the
/// removed row's `v`; deleting a missing row changes nothing).
fn expected_audit(acked: &[(u64, Event)]) -> BTreeMap<AuditEntry, u64> {
    let mut ordered: Vec<&(u64, Event)> = acked.iter().collect();
    ordered.sort_by_key(|(seq, _)| *seq);
    let mut live: HashMap<(&str, &str), i64> = HashMap::new();
    let mut audit = BTreeMap::new();
    for (_, e) in ordered {
        let row = (e.table, e.key.as_str());
        let entry = match &e.row {
            Some(_) => {
                live.insert(row, e.v);
                Some((e.v, "U"))
            }
            None => live.remove(&row).map(|v| (v, "D")),
        };
        if let Some((v, op)) = entry {
            *audit
                .entry((e.table.to_owned(), e.key.clone(), v, op.to_owned()))
                .or_default() += 1;
        }
    }
    audit
}

/// Runs `sql` on the test database and returns its rows.
async fn pg_query(sql: &str) -> Result<Vec<tokio_postgres::Row>> {
    let url = postgres_url();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to Postgres at {url}"))?;
    let connection = tokio::spawn(connection);
    let rows = client
        .query(sql, &[])
        .await
        .with_context(|| format!("running {sql}"))?;
    drop(client);
    let _ = connection.await;
    Ok(rows)
}

/// The audit recorded in `schema`: entry → the (transaction id, backend pid) of every time it
/// was recorded.
async fn audit_of(schema: &str) -> Result<BTreeMap<AuditEntry, Vec<(i64, i32)>>> {
    let mut audit: BTreeMap<AuditEntry, Vec<(i64, i32)>> = BTreeMap::new();
    for row in pg_query(&format!(
        "SELECT tbl, k, v, op, xid, pid FROM \"{schema}\".apply_audit"
    ))
    .await?
    {
        audit
            .entry((row.get(0), row.get(1), row.get(2), row.get(3)))
            .or_default()
            .push((row.get(4), row.get(5)));
    }
    Ok(audit)
}

/// The fence of `stream` in `schema` (`jetsync_offsets`).
async fn fence_of(schema: &str, stream: &str) -> Result<Option<i64>> {
    let rows = pg_query(&format!(
        "SELECT seq FROM \"{schema}\".jetsync_offsets WHERE stream = '{stream}'"
    ))
    .await?;
    Ok(rows.first().map(|r| r.get(0)))
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

/// Asserts that the instance whose schema is `schema` holds exactly the reference, its fence
/// is `last`, and its audit is exactly `want` (every event applied once, nothing twice).
async fn assert_exactly_once(
    what: &str,
    schema: &str,
    stream: &str,
    reference: &Reference,
    want: &BTreeMap<AuditEntry, u64>,
    last: u64,
) -> Result<()> {
    assert_pg_matches(what, schema, reference).await?;
    let fence = fence_of(schema, stream).await?;
    ensure!(
        fence == Some(last as i64),
        "{what}: fence {fence:?} in {schema}.jetsync_offsets, expected {last}"
    );
    let have = audit_of(schema).await?;
    let missing: Vec<_> = want
        .iter()
        .filter(|(e, n)| have.get(*e).map_or(0, Vec::len) < **n as usize)
        .map(|(e, _)| e)
        .collect();
    let extra: Vec<_> = have
        .iter()
        .filter(|(e, times)| want.get(*e).copied().unwrap_or(0) < times.len() as u64)
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        bail!(
            "{what}: audit of {schema} holds {} entries, expected {}: {} never applied (e.g. {:?}), {} applied more often than once or unexpected (entry, [(transaction id, backend pid)] of each time, e.g. {:?})",
            have.values().map(Vec::len).sum::<usize>(),
            want.values().sum::<u64>(),
            missing.len(),
            &missing[..missing.len().min(5)],
            extra.len(),
            &extra[..extra.len().min(5)],
        );
    }
    Ok(())
}

/// Checks every instance (stopped) against the acknowledged events and compares the digests.
async fn check_instances(
    scenario: &str,
    instances: &[Instance],
    schemas: &[PgSchema],
    stream: &str,
    acked: &[(u64, Event)],
) -> Result<()> {
    let reference = reference_of(acked);
    let want = expected_audit(acked);
    let last = reference.max_seq();
    let mut digests = Vec::new();
    for (instance, schema) in instances.iter().zip(schemas) {
        let what = format!("{scenario} instance {}", instance.name);
        assert_exactly_once(&what, &schema.name, stream, &reference, &want, last).await?;
        let (tables, seq) = digest_of(instance)?;
        ensure!(
            seq == last,
            "{what}: digest applied_seq {seq}, expected {last}"
        );
        for table in ["items", "counters"] {
            let digest = tables
                .as_array()
                .and_then(|t| t.iter().find(|t| t["table"] == table))
                .with_context(|| format!("{what}: no digest of {table} in {tables}"))?;
            let rows = reference.rows(table).len() as u64;
            ensure!(
                digest["rows"].as_u64() == Some(rows),
                "{what} {table}: digest {digest}, expected {rows} rows"
            );
        }
        digests.push((instance.name.clone(), tables));
    }
    for (name, tables) in &digests[1..] {
        ensure!(
            *tables == digests[0].1,
            "{scenario}: digest of {name} {tables} differs from {} {}",
            digests[0].0,
            digests[0].1
        );
    }
    eprintln!(
        "{scenario}: {} instances equal the reference ({} items, {} counters rows), fence {last}, audit exact ({} entries each), digests equal",
        instances.len(),
        reference.rows("items").len(),
        reference.rows("counters").len(),
        want.values().sum::<u64>()
    );
    Ok(())
}

/// Stops every instance, requiring exit code 0.
fn stop_all(instances: &mut [Instance]) -> Result<()> {
    for instance in instances {
        let code = instance.stop(STOP)?;
        ensure!(
            code == 0,
            "instance {} exited {code}:\n{}",
            instance.name,
            instance.log()
        );
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
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let stream = "PGCONV";
    let group = group(&server.url(), stream);
    let (schemas, mut instances) = three_instances(&group, root.path())?;
    for instance in &mut instances {
        instance.start()?;
    }
    let client = group.client("pg-warm").await?;
    let mut acked = vec![warm_up(&client, &mut instances, stream).await?];

    let mut rng = StdRng::seed_from_u64(seed);
    let events = random_events(&mut rng, EVENTS, 1);
    ensure_fits_history(&events, FULL_HISTORY)?;
    let published = Instant::now();
    let mut publishers = Vec::new();
    for (p, share) in events.chunks(EVENTS / 2).enumerate() {
        let client = group.client(&format!("pg-pub-{p}")).await?;
        let share = share.to_vec();
        publishers.push(tokio::spawn(async move { publish(&client, share).await }));
    }
    for p in publishers {
        acked.extend(p.await.context("publisher task")??);
    }
    let mut seqs: Vec<u64> = acked.iter().map(|(seq, _)| *seq).collect();
    seqs.sort_unstable();
    let last = (EVENTS + 1) as u64;
    ensure!(
        seqs == (1..=last).collect::<Vec<_>>(),
        "acknowledged sequences are not 1..={last}"
    );
    eprintln!(
        "postgres_converge: two publishers acknowledged {EVENTS} events (+1 warm-up) in {:?}",
        published.elapsed()
    );

    for instance in &mut instances {
        instance.wait_applied(stream, last, CATCH_UP)?;
    }
    eprintln!(
        "postgres_converge: all three applied seq {last} {:?} after publishing started",
        published.elapsed()
    );
    stop_all(&mut instances)?;
    check_instances("postgres_converge", &instances, &schemas, stream, &acked).await?;
    eprintln!("postgres_converge: passed after {:?}", started.elapsed());
    Ok(())
}

/// Per-instance counters of the SIGKILL loop.
#[derive(Debug, Default, Clone, Copy)]
struct Kills {
    /// SIGKILLs.
    total: usize,
    /// Of which found the instance behind the stream (mid catch-up: usually mid-batch).
    behind: usize,
    /// Of which found it behind but with nothing applied since its restart (still starting).
    starting: usize,
    /// Applied sequence at its last (re)start.
    applied_at_start: u64,
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
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let stream = "PGCRASH";
    let group = group(&server.url(), stream);
    let (schemas, mut instances) = three_instances(&group, root.path())?;
    for instance in &mut instances {
        instance.start()?;
    }
    let client = group.client("pg-crash-pub").await?;
    let warm = warm_up(&client, &mut instances, stream).await?;
    let events = random_events(&mut rng, EVENTS, 1);
    ensure_fits_history(&events, FULL_HISTORY)?;

    // The publisher: pipelined chunks, each as soon as every instance is fewer than BACKLOG
    // events behind, so that the appliers always have work and most kills land mid-batch.
    let checkpoints: Vec<_> = instances.iter().map(Instance::checkpoint_path).collect();
    let publisher = {
        let client = client.clone();
        let stream = stream.to_owned();
        tokio::spawn(async move {
            let mut acked = Vec::with_capacity(EVENTS);
            let mut max_seq = warm.0;
            let deadline = Instant::now() + CRASH_LOOP;
            for chunk in events.chunks(CHUNK) {
                loop {
                    // Unreadable while a killed run's file awaits repair: count it as behind.
                    let slowest = checkpoints
                        .iter()
                        .map(|path| {
                            jetsync_applier::read_checkpoint(path, &stream).map_or(0, |c| c.applied)
                        })
                        .min()
                        .unwrap_or(0);
                    if max_seq.saturating_sub(slowest) < BACKLOG {
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "an applier stayed {BACKLOG}+ events behind for {CRASH_LOOP:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                for (seq, e) in publish(&client, chunk.to_vec()).await? {
                    max_seq = max_seq.max(seq);
                    acked.push((seq, e));
                }
            }
            anyhow::Ok(acked)
        })
    };

    // Kill the instances in turn, one every KILL_DELAY_MS, until every one was killed
    // MIN_KILLS_EACH times and publishing is done; each is restarted right away.
    let deadline = Instant::now() + CRASH_LOOP;
    let mut kills = vec![
        Kills {
            applied_at_start: warm.0,
            ..Kills::default()
        };
        instances.len()
    ];
    let mut cycle = 0;
    while kills.iter().any(|k| k.total < MIN_KILLS_EACH) || !publisher.is_finished() {
        ensure!(
            cycle < MAX_KILLS,
            "{cycle} kills and the publisher is still not done"
        );
        ensure!(
            Instant::now() < deadline,
            "SIGKILL loop still running after {CRASH_LOOP:?}"
        );
        tokio::time::sleep(Duration::from_millis(rng.gen_range(KILL_DELAY_MS))).await;
        for instance in &mut instances {
            if !instance.is_running() {
                bail!(
                    "instance {} exited by itself during the SIGKILL loop:\n{}",
                    instance.name,
                    instance.log()
                );
            }
        }
        let i = cycle % instances.len();
        cycle += 1;
        let instance = &mut instances[i];
        let applied = instance.applied(stream);
        let stored = stream_last_seq(&client, stream).await?;
        instance.kill();
        let k = &mut kills[i];
        k.total += 1;
        if applied < stored {
            k.behind += 1;
            if applied == k.applied_at_start {
                k.starting += 1;
            }
        }
        k.applied_at_start = applied;
        instance.start()?;
    }
    let events_acked = publisher.await.context("publisher task")??;
    ensure!(
        events_acked.len() == EVENTS,
        "the publisher acknowledged {} events",
        events_acked.len()
    );
    let mut acked = vec![warm];
    acked.extend(events_acked);
    let mut seqs: Vec<u64> = acked.iter().map(|(seq, _)| *seq).collect();
    seqs.sort_unstable();
    let last = (EVENTS + 1) as u64;
    ensure!(
        seqs == (1..=last).collect::<Vec<_>>(),
        "acknowledged sequences are not 1..={last}"
    );
    let total: usize = kills.iter().map(|k| k.total).sum();
    eprintln!(
        "postgres_crash_loop: {total} SIGKILLs in {:?}; per instance (kills, behind the stream, of which before applying anything): {:?}",
        started.elapsed(),
        kills
            .iter()
            .map(|k| (k.total, k.behind, k.starting))
            .collect::<Vec<_>>()
    );
    for (instance, k) in instances.iter().zip(&kills) {
        ensure!(
            k.total >= MIN_KILLS_EACH,
            "instance {} killed only {} times",
            instance.name,
            k.total
        );
        // Kills must not all land during start-up: most runs with work to do apply some.
        ensure!(
            k.starting * 2 <= k.total,
            "instance {}: {} of {} runs applied nothing before their kill",
            instance.name,
            k.starting,
            k.total
        );
    }
    for instance in &mut instances {
        instance.wait_applied(stream, last, CATCH_UP)?;
    }
    eprintln!(
        "postgres_crash_loop: all caught up after {:?}",
        started.elapsed()
    );
    // Which crash windows the kills hit, as the restarted runs saw them (informational).
    for instance in &instances {
        let logs = instance.run_logs();
        let count = |needle: &str| logs.iter().filter(|(_, log)| log.contains(needle)).count();
        eprintln!(
            "postgres_crash_loop: instance {}: {} runs; restarts that found the fence ahead of the redb checkpoint: {}; that found the durable not at the applied seq: {}",
            instance.name,
            logs.len(),
            count("bringing the redb checkpoint to the sink's fence"),
            count("consumer state differs from the applied sequence"),
        );
    }
    stop_all(&mut instances)?;
    check_instances("postgres_crash_loop", &instances, &schemas, stream, &acked).await?;
    eprintln!("postgres_crash_loop: passed after {:?}", started.elapsed());
    Ok(())
}

/// The poison scenario's table (`{schema}` is replaced by the schema name): a CHECK constraint
/// on `price`, a `varchar(8)` label and a `smallint` quantity.
const POISON_DDL: &str = "CREATE TABLE {schema}.products (
  sku text PRIMARY KEY,
  price double precision CONSTRAINT price_not_negative CHECK (price >= 0),
  label varchar(8),
  qty smallint,
  v bigint NOT NULL);";
/// The same table as it is once the causes are fixed (and as the instance without the problem
/// has it from the start).
const FIXED_DDL: &str = "CREATE TABLE {schema}.products (
  sku text PRIMARY KEY,
  price double precision,
  label text,
  qty integer,
  v bigint NOT NULL);";
/// Removes the causes of the poison scenario's refusals.
const FIX: &str = "ALTER TABLE {schema}.products DROP CONSTRAINT price_not_negative;
ALTER TABLE {schema}.products ALTER COLUMN label TYPE text;
ALTER TABLE {schema}.products ALTER COLUMN qty TYPE integer;";

/// A `products` row.
fn product(sku: &str, price: f64, label: &str, qty: i64, v: i64) -> Row {
    let mut row = Row::new();
    row.insert("sku".into(), Value::Text(sku.to_owned()));
    row.insert("price".into(), Value::F64(price));
    row.insert("label".into(), Value::Text(label.to_owned()));
    row.insert("qty".into(), Value::I64(qty));
    row.insert("v".into(), Value::I64(v));
    row
}

/// All rows of `products` in `schema`.
async fn products(schema: &str) -> Result<BTreeMap<String, Row>> {
    postgres_rows(&postgres_url(), schema, "products", "sku").await
}

/// A row the database refuses (a CHECK constraint, a value too long for `varchar(8)`) or that
/// does not fit its column (out of range for `smallint`) is parked with an error naming the
/// cause, its row's later events are held behind it, every other row advances and the applier
/// keeps running; after the cause is fixed, `parked retry` applies them in order and the
/// instance converges with one that never had the problem.
#[test]
fn postgres_refused_rows_are_parked_then_retried() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        jetsync_e2e::applier_bin();
        let started = Instant::now();
        let seed = seed("postgres_poison");
        let mut rng = StdRng::seed_from_u64(seed);
        let url = postgres_url();
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let stream = "PGPOISON";
        let mut group = Group::new(server.url(), stream, "pgpoison");
        group.tables.clear();
        group.tables.insert("products".into(), "sku".into());
        let bad_schema = PgSchema::create(&url, &schema_name("bad"), POISON_DDL)?;
        let good_schema = PgSchema::create(&url, &schema_name("good"), FIXED_DDL)?;
        let mut bad = Instance::new(&group, root.path(), "bad", SinkKind::Sqlite)?;
        let mut good = Instance::new(&group, root.path(), "good", SinkKind::Sqlite)?;
        bad.use_postgres(&url, &bad_schema.name)?;
        good.use_postgres(&url, &good_schema.name)?;
        // Keep every event of a row, so the refused rows' events all reach the instances; and
        // hand the sink every change: with coalescing a refused change that a later change of
        // its row in the same batch supersedes is never offered to the sink, so whether it is
        // parked would depend on how the backlog was cut into batches (README, "Coalescing").
        for i in [&bad, &good] {
            i.set_stream_option("history", &FULL_HISTORY.to_string())?;
            i.set_option("apply", "coalesce", "false")?;
        }
        let (code, _, err) = bad.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        bad.start()?;
        good.start()?;
        // Both are past their (empty) bootstrap and consuming before the events arrive.
        let client = group.client("pgpoison-pub").await?;
        let table = client.rows("products")?;
        let warm_row = product("warm", 0.0, "warm", 0, 0);
        let warm = table.upsert("warm", &warm_row).await?;
        for i in [&mut bad, &mut good] {
            i.wait_applied(stream, warm.seq, CATCH_UP)?;
        }

        // 2,000 valid events over 100 rows, and the refused rows' events at fixed positions:
        // each refused row is first written validly, then refused, then written again (and
        // deleted) while it is parked.
        let mut events: Vec<(String, Option<Row>)> = (0..2_000)
            .map(|i| {
                let key = format!("p{:02}", rng.gen_range(0..100));
                let row = rng.gen_bool(0.9).then(|| {
                    let label: String = (0..rng.gen_range(0..8))
                        .map(|_| rng.gen_range('a'..='z'))
                        .collect();
                    product(
                        &key,
                        rng.gen_range(0.0..1.0e4),
                        &label,
                        rng.gen_range(0..30_000),
                        i + 1,
                    )
                });
                (key, row)
            })
            .collect();
        let refused: [(&str, Row, &str); 3] = [
            (
                "bad-check",
                product("bad-check", -5.0, "neg", 1, 100_001),
                "price_not_negative",
            ),
            (
                "bad-length",
                product("bad-length", 1.0, "far too long a label", 1, 100_002),
                "character varying(8)",
            ),
            (
                "bad-range",
                product("bad-range", 1.0, "big", 100_000, 100_003),
                "out of range for smallint",
            ),
        ];
        let mut specials: Vec<(usize, String, Option<Row>)> = Vec::new();
        for (n, (key, row, _)) in refused.iter().enumerate() {
            let key = (*key).to_owned();
            let v = 200_000 + 10 * n as i64;
            specials.push((5 + n, key.clone(), Some(product(&key, 1.0, "before", 7, v))));
            specials.push((20 + n, key.clone(), Some(row.clone())));
            specials.push((600 + n, key.clone(), Some(product(&key, 2.0, "held", 8, v + 1))));
            specials.push((1_200 + n, key.clone(), None));
            specials.push((1_900 + n, key.clone(), Some(product(&key, 3.0, "after", 9, v + 2))));
        }
        specials.sort_by_key(|(at, _, _)| *at);
        for (at, key, row) in specials {
            events.insert(at, (key, row));
        }
        let mut pipeline = table.pipeline();
        for (key, row) in &events {
            match row {
                Some(row) => pipeline.upsert(key, row).await?,
                None => pipeline.delete(key).await?,
            }
        }
        let mut reference = Reference::default();
        reference.record(warm.seq, "products", "warm", Some(warm_row));
        // Per refused row: the state before the refusal, and the sequences from it on.
        let mut before: BTreeMap<String, Row> = BTreeMap::new();
        let mut parked_want: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for ((key, row), p) in events.iter().zip(pipeline.finish().await?) {
            ensure!(!p.duplicate, "{key} acknowledged as a duplicate");
            reference.record(p.seq, "products", key, row.clone());
            if let Some((_, refused_row, _)) = refused.iter().find(|(k, _, _)| *k == key.as_str()) {
                let seqs = parked_want.entry(key.clone()).or_default();
                if !seqs.is_empty() || row.as_ref() == Some(refused_row) {
                    seqs.push(p.seq);
                } else if let Some(row) = row {
                    before.insert(key.clone(), row.clone());
                }
            }
        }
        let last = reference.max_seq();
        ensure!(last == warm.seq + events.len() as u64, "stream ends at {last}");
        good.wait_applied(stream, last, CATCH_UP)?;
        bad.wait_applied(stream, last, CATCH_UP)?;
        ensure!(bad.is_running(), "the instance keeps running:\n{}", bad.log());
        eprintln!(
            "postgres_poison: {} events applied by both instances after {:?}",
            events.len() + 1,
            started.elapsed()
        );

        // Parked: each refused event with the database's (or the conversion's) reason, and its
        // row's later events held behind it.
        let parked = bad.cli_json(&["parked", "list"])?;
        let parked = parked.as_array().context("parked list is an array")?;
        let mut all_want: Vec<u64> = parked_want.values().flatten().copied().collect();
        all_want.sort_unstable();
        let mut got: Vec<u64> = parked.iter().filter_map(|p| p["seq"].as_u64()).collect();
        got.sort_unstable();
        ensure!(
            got == all_want,
            "parked {got:?}, expected the refused rows' events {parked_want:?}"
        );
        for (key, _, cause) in &refused {
            let seqs = &parked_want[*key];
            let head = parked
                .iter()
                .find(|p| p["seq"].as_u64() == Some(seqs[0]))
                .context("parked head")?;
            ensure!(
                head["held_behind"].is_null()
                    && head["error"].as_str().is_some_and(|e| e.contains(cause)),
                "{key}: the refused event carries an error naming {cause:?}: {head}"
            );
            for seq in &seqs[1..] {
                let held = parked
                    .iter()
                    .find(|p| p["seq"].as_u64() == Some(*seq))
                    .context("held event")?;
                ensure!(
                    held["held_behind"].as_u64() == Some(seqs[0]),
                    "{key}: event {seq} is held behind {}: {held}",
                    seqs[0]
                );
            }
        }
        eprintln!(
            "postgres_poison: parked {} events ({} refused, the others held behind them); errors: {:?}",
            got.len(),
            refused.len(),
            parked
                .iter()
                .filter(|p| p["held_behind"].is_null())
                .map(|p| p["error"].as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        );
        let status = bad.status()?;
        ensure!(
            status["groups"][0]["parked"] == got.len(),
            "status parked: {status}"
        );
        // Every other row advanced: the instance without the problem holds the reference, the
        // other one too except for the refused rows, which keep their state from before.
        assert_rows_equal(
            "instance without the problem",
            &products(&good_schema.name).await?,
            &reference,
            "products",
        )?;
        let mut want_bad = reference.rows("products");
        for (key, _, _) in &refused {
            want_bad.remove(*key);
        }
        want_bad.extend(before.clone());
        let have_bad = products(&bad_schema.name).await?;
        ensure!(
            have_bad == want_bad,
            "instance with the refusals: {} rows, expected {} (the reference with the refused rows as before their refusal {before:?})",
            have_bad.len(),
            want_bad.len()
        );
        ensure!(
            fence_of(&bad_schema.name, stream).await? == Some(last as i64),
            "the fence moved past the parked events"
        );

        // While the causes are still there, a retry keeps everything parked (exit 1).
        ensure!(bad.stop(STOP)? == 0, "clean stop:\n{}", bad.log());
        let (code, _, err) = bad.cli(&["parked", "retry"])?;
        ensure!(code == 1, "retry with the causes still there exits 1, got {code}: {err}");
        ensure!(
            bad.cli_json(&["parked", "list"])?.as_array().map(Vec::len) == Some(got.len()),
            "still parked after the failed retry"
        );

        // Fix the causes, retry: every parked event applied in order, nothing parked.
        postgres_exec(&url, &FIX.replace("{schema}", &format!("\"{}\"", bad_schema.name)))?;
        let retried = bad.cli_json(&["parked", "retry"])?;
        let mut applied: Vec<u64> = retried["applied"]
            .as_array()
            .context("applied")?
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .collect();
        applied.sort_unstable();
        ensure!(
            applied == all_want,
            "retry applied {applied:?}, expected {all_want:?}"
        );
        ensure!(
            bad.cli_json(&["parked", "list"])?.as_array().map(Vec::len) == Some(0),
            "nothing parked after the retry"
        );
        assert_rows_equal(
            "instance after the retry",
            &products(&bad_schema.name).await?,
            &reference,
            "products",
        )?;
        ensure!(
            fence_of(&bad_schema.name, stream).await? == Some(last as i64),
            "the retry keeps the fence"
        );
        ensure!(
            digest_of(&bad)? == digest_of(&good)?,
            "digests differ after the retry"
        );

        // Restarted, it goes on: the refused rows are written again like any other.
        bad.start()?;
        let mut more = table.pipeline();
        let fixed = product("bad-check", -1.0, "negative", 70_000, 300_000);
        more.upsert("bad-check", &fixed).await?;
        more.delete("bad-range").await?;
        let acks = more.finish().await?;
        reference.record(acks[0].seq, "products", "bad-check", Some(fixed));
        reference.record(acks[1].seq, "products", "bad-range", None);
        let end = reference.max_seq();
        bad.wait_applied(stream, end, CATCH_UP)?;
        good.wait_applied(stream, end, CATCH_UP)?;
        for (instance, schema) in [(&bad, &bad_schema), (&good, &good_schema)] {
            assert_rows_equal(
                &format!("instance {} at the end", instance.name),
                &products(&schema.name).await?,
                &reference,
                "products",
            )?;
        }
        ensure!(
            digest_of(&bad)? == digest_of(&good)?,
            "digests differ at the end"
        );
        for i in [&mut bad, &mut good] {
            ensure!(i.stop(STOP)? == 0, "instance {} clean stop:\n{}", i.name, i.log());
        }
        eprintln!("postgres_poison: passed after {:?}", started.elapsed());
        Ok(())
    })
}

/// The slow COMMIT of the killed-commit scenario: a deferred constraint trigger that sleeps
/// when the batch wrote row `marker`, so the COMMIT of that batch hangs after the process that
/// sent it is gone, then lands.
const SLOW_COMMIT_DDL: &str = r#"
CREATE FUNCTION {schema}.slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.id = 'marker' THEN
    PERFORM pg_sleep(6);
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER items_slow_commit AFTER INSERT OR UPDATE ON {schema}.items
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.slow_commit();
"#;

/// The pid of the backend of `application` sleeping in the slow COMMIT, if any.
async fn sleeping_commit(application: &str) -> Result<Option<i32>> {
    let rows = pg_query(&format!(
        "SELECT pid FROM pg_stat_activity WHERE application_name = '{application}' \
         AND wait_event = 'PgSleep' AND query = 'COMMIT'"
    ))
    .await?;
    Ok(rows.first().map(|r| r.get(0)))
}

/// Whether backend `pid` still exists.
async fn backend_alive(pid: i32) -> Result<bool> {
    let rows = pg_query(&format!("SELECT 1 FROM pg_stat_activity WHERE pid = {pid}")).await?;
    Ok(!rows.is_empty())
}

/// Issue #12.3: an applier SIGKILLed while its COMMIT is held open by the server (the COMMIT
/// lands after the kill), restarted at once with a smaller `apply.batch_max` whose batches end
/// below the fence that COMMIT reached: no event is applied twice (the audit trigger counts
/// every apply per key and version), the fence never moves back, the rows equal the reference.
#[test]
fn postgres_killed_commit_lands_and_nothing_is_applied_twice() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(killed_commit())
}

async fn killed_commit() -> Result<()> {
    jetsync_e2e::applier_bin();
    let started = Instant::now();
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let stream = "PGKILLC";
    let group = group(&server.url(), stream);
    let url = postgres_url();
    let schema = PgSchema::create(&url, &schema_name("kc"), &format!("{DDL}{SLOW_COMMIT_DDL}"))?;
    let application = format!("jse2e_kc_{}", std::process::id());
    let separator = if url.contains('?') { '&' } else { '?' };
    let mut instance = Instance::new(&group, root.path(), "kc", SinkKind::Sqlite)?;
    instance.use_postgres(
        &format!("{url}{separator}application_name={application}"),
        &schema.name,
    )?;
    instance.set_stream_option("history", &FULL_HISTORY.to_string())?;
    instance.set_option("apply", "batch_max", "50")?;
    // The audit trigger must see every change (no coalescing).
    instance.set_option("apply", "coalesce", "false")?;
    let (code, _, err) = instance.cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    instance.start()?;
    let client = group.client("pg-kc").await?;
    let mut acked = vec![warm_up(&client, std::slice::from_mut(&mut instance), stream).await?];
    // Published while the instance is stopped, so that it pulls full batches of 50 on restart:
    // the marker (event 60) is in the second one, which ends 40 events after it.
    ensure!(instance.stop(STOP)? == 0, "{}", instance.log());
    let mut rng = StdRng::seed_from_u64(seed("postgres_killed_commit"));
    let mut events = random_events(&mut rng, 120, 1);
    events[59] = Event {
        table: "items",
        key: "marker".into(),
        row: Some(item_row("marker", 60, 0.5, Value::Null, 60)),
        v: 60,
    };
    ensure_fits_history(&events, FULL_HISTORY)?;
    acked.extend(publish(&client, events).await?);
    let last = acked.iter().map(|(seq, _)| *seq).max().unwrap_or(0);
    instance.start()?;

    // The batch with the marker sits in its COMMIT; kill the process that sent it.
    let deadline = Instant::now() + CATCH_UP;
    let sleeper = loop {
        if let Some(pid) = sleeping_commit(&application).await? {
            break pid;
        }
        ensure!(
            Instant::now() < deadline && instance.is_running(),
            "the batch with the marker never reached its slow COMMIT:\n{}",
            instance.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let fence_at_kill = fence_of(&schema.name, stream).await?.unwrap_or(0);
    eprintln!(
        "postgres_killed_commit: slow COMMIT after {:?}",
        started.elapsed()
    );
    instance.kill();
    instance.set_option("apply", "batch_max", "3")?;
    instance.start()?;
    ensure!(
        backend_alive(sleeper).await?,
        "the killed session's COMMIT finished before the restart: the scenario was not exercised"
    );

    instance.wait_applied(stream, last, CATCH_UP)?;
    eprintln!(
        "postgres_killed_commit: caught up after {:?}",
        started.elapsed()
    );
    ensure!(instance.stop(STOP)? == 0, "{}", instance.log());
    // The killed session's COMMIT did land (its backend wrote the marker).
    let audit = audit_of(&schema.name).await?;
    let marker = audit
        .iter()
        .find(|((table, key, _, op), _)| table == "items" && key == "marker" && op == "U")
        .map(|(_, times)| times.clone())
        .context("the marker was never applied")?;
    ensure!(
        marker.iter().any(|(_, pid)| *pid == sleeper),
        "the marker was not written by the killed session's backend {sleeper}: {marker:?}"
    );
    let fence_after = fence_of(&schema.name, stream).await?.unwrap_or(0);
    ensure!(fence_after >= fence_at_kill, "fence moved back");
    let reference = reference_of(&acked);
    assert_exactly_once(
        "postgres_killed_commit",
        &schema.name,
        stream,
        &reference,
        &expected_audit(&acked),
        last,
    )
    .await?;
    eprintln!(
        "postgres_killed_commit: COMMIT of backend {sleeper} landed after the kill (fence {fence_at_kill} before it), restart with batch_max 3 applied nothing twice, fence {last}"
    );
    Ok(())
}
