//! Crash loops: the applier is SIGKILLed at random moments (mid-batch included) while events
//! stream in, restarted every time, and must end with exactly the reference state: nothing
//! lost, nothing applied twice (DESIGN section 8).
//!
//! The random choices (events, kill delays) come from a seed printed at the start; set
//! `JETSYNC_E2E_SEED` to replay a failing run's choices (timing still varies).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use jetsync::{Row, Table, Value};
use jetsync_e2e::{
    assert_applied_exactly_once, assert_rows_equal, assert_sqlite_matches, heavy, Group, Instance,
    Reference, SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Events published during a crash loop.
const EVENTS: usize = 20_000;
/// Distinct row keys they touch.
const KEYS: usize = 1_000;
/// Events per pipelined chunk.
const CHUNK: usize = 500;
/// The publisher sends the next chunk once the applier is fewer than this many events behind.
const BACKLOG: u64 = 1_500;
/// At least this many SIGKILLs.
const MIN_KILLS: usize = 20;
/// Upper bound on kill cycles (the loop also ends once publishing is done and MIN_KILLS hit).
const MAX_KILLS: usize = 80;
/// Kill delays after each (re)start, milliseconds.
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 50..=400;
/// Small batches so that kills often land between and inside batch commits.
const APPLY_TOML: &str = "[apply]\nbatch_max = 50\n";
/// `stream.history` for scenarios that audit every sequence: the stream keeps every event of a
/// row (up to 64), so every acknowledged sequence must show up in the audit. Test data keeps
/// every row below this many events (checked).
pub(crate) const FULL_HISTORY: usize = 64;
/// Generous bound for an applier to catch up.
pub(crate) const CATCH_UP: Duration = Duration::from_secs(120);
/// Bound for a SIGTERM stop.
pub(crate) const STOP: Duration = Duration::from_secs(30);

/// A 2-worker runtime (the machine has 2 cores); tests are plain `#[test]`s holding
/// [`heavy`] and blocking on their async body.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The seed of a scenario: `JETSYNC_E2E_SEED` if set, else random; printed either way.
pub(crate) fn seed(scenario: &str) -> u64 {
    let seed = std::env::var("JETSYNC_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{scenario}: seed {seed} (JETSYNC_E2E_SEED={seed} replays its random choices)");
    seed
}

/// One event: the key and the new row, or `None` for a delete.
pub(crate) type Event = (String, Option<Row>);

/// `n` random upserts (85 %) and deletes (15 %) over `keys` keys. Rows carry `id` (the key),
/// `n` (the event's index), `s` (text) and sometimes `b`.
pub(crate) fn random_events(rng: &mut StdRng, n: usize, keys: usize, tag: &str) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let key = format!("k{:04}", rng.gen_range(0..keys));
            if rng.gen_bool(0.15) {
                return (key, None);
            }
            let mut row = Row::new();
            row.insert("id".into(), Value::Text(key.clone()));
            row.insert("n".into(), Value::I64(i as i64));
            let len = rng.gen_range(0..12);
            let s: String = (0..len).map(|_| rng.gen_range('a'..='z')).collect();
            row.insert("s".into(), Value::Text(format!("{tag}-{s}")));
            if rng.gen_bool(0.5) {
                row.insert("b".into(), Value::Bool(rng.gen_bool(0.5)));
            }
            (key, Some(row))
        })
        .collect()
}

/// Fails unless no key gets more than `history` events in `events`, so a stream with that
/// history keeps every one of them.
pub(crate) fn ensure_fits_history(events: &[Event], history: usize) -> Result<()> {
    let mut per_key: BTreeMap<&str, usize> = BTreeMap::new();
    for (key, _) in events {
        *per_key.entry(key).or_default() += 1;
    }
    let max = per_key.values().copied().max().unwrap_or(0);
    ensure!(
        max <= history,
        "test data: a key gets {max} events, more than history {history}"
    );
    Ok(())
}

/// Acknowledged events: reference model, every acknowledged sequence, and the latest sequence
/// of every key (on a compacted stream, the events that are never removed).
#[derive(Debug, Default)]
pub(crate) struct Acked {
    pub reference: Reference,
    pub seqs: Vec<u64>,
    pub latest: BTreeMap<String, u64>,
}

impl Acked {
    pub(crate) fn record(&mut self, seq: u64, key: &str, row: Option<Row>) {
        self.reference.record(seq, "items", key, row);
        self.seqs.push(seq);
        let latest = self.latest.entry(key.to_owned()).or_default();
        *latest = (*latest).max(seq);
    }

    pub(crate) fn merge(&mut self, other: Acked) {
        self.reference.merge(other.reference);
        self.seqs.extend(other.seqs);
        for (key, seq) in other.latest {
            let latest = self.latest.entry(key).or_default();
            *latest = (*latest).max(seq);
        }
    }
}

/// Publishes `events` pipelined (one pipeline); returns what was acknowledged.
pub(crate) async fn publish_pipelined(items: &Table<Row>, events: Vec<Event>) -> Result<Acked> {
    let mut pipeline = items.pipeline();
    for (key, row) in &events {
        match row {
            Some(row) => pipeline.upsert(key, row).await?,
            None => pipeline.delete(key).await?,
        }
    }
    let published = pipeline.finish().await?;
    ensure!(published.len() == events.len(), "missing acknowledgements");
    let mut acked = Acked::default();
    for ((key, row), p) in events.into_iter().zip(published) {
        ensure!(!p.duplicate, "{key} acknowledged as a duplicate");
        acked.record(p.seq, &key, row);
    }
    Ok(acked)
}

/// The stream's last sequence.
pub(crate) async fn stream_last_seq(client: &jetsync::Client, stream: &str) -> Result<u64> {
    let mut stream = client.jetstream().get_stream(stream).await?;
    Ok(stream.info().await?.state.last_sequence)
}

/// What a crash loop leaves behind for its scenario's checks. Field order is drop order: the
/// instance (its process) goes before the server and the temp dir.
struct CrashRun {
    started: Instant,
    instance: Instance,
    client: jetsync::Client,
    acked: Acked,
    group: Group,
    root: tempfile::TempDir,
    _server: NatsServer,
}

/// Starts a server and one instance, publishes `EVENTS` events in pipelined chunks while
/// SIGKILLing and restarting the applier at random moments (at least `MIN_KILLS` times, and
/// until publishing is done), then lets it catch up (still running on return).
async fn crash_loop(
    scenario: &str,
    sink: SinkKind,
    stream: &str,
    full_history: bool,
) -> Result<CrashRun> {
    jetsync_e2e::applier_bin();
    let started = Instant::now();
    let seed = seed(scenario);
    let mut rng = StdRng::seed_from_u64(seed);
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let mut group = Group::new(server.url(), stream, &stream.to_lowercase());
    group.extra_toml = APPLY_TOML.into();
    let mut instance = Instance::new(&group, root.path(), "c1", sink)?;
    let events = random_events(&mut rng, EVENTS, KEYS, "crash");
    if full_history {
        instance.set_stream_option("history", &FULL_HISTORY.to_string())?;
        ensure_fits_history(&events, FULL_HISTORY)?;
    }
    let (code, _, err) = instance.cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    let client = group.client("crash-pub").await?;
    let items = client.rows("items")?;

    // The publisher: pipelined chunks, each as soon as the applier's backlog is below BACKLOG,
    // so the applier always has work while events stream in and most kills land mid-batch.
    let checkpoint = instance.checkpoint_path();
    let group_name = stream.to_owned();
    let publisher = tokio::spawn(async move {
        let mut acked = Acked::default();
        let deadline = Instant::now() + CATCH_UP;
        for chunk in events.chunks(CHUNK) {
            loop {
                // Unreadable while a killed run's file awaits repair: wait for the next run.
                let applied = jetsync_applier::read_checkpoint(&checkpoint, &group_name)
                    .map_or(0, |c| c.applied);
                if acked.reference.max_seq().saturating_sub(applied) < BACKLOG {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the applier stayed {BACKLOG}+ events behind for {CATCH_UP:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acked.merge(publish_pipelined(&items, chunk.to_vec()).await?);
        }
        anyhow::Ok(acked)
    });

    instance.start()?;
    let deadline = Instant::now() + CATCH_UP;
    // Kills that found the applier behind the stream (mid catch-up: usually mid-batch), and
    // those among them whose run had applied nothing yet (still starting up).
    let (mut kills, mut behind, mut starting) = (0, 0, 0);
    let mut applied_at_start = 0;
    while kills < MIN_KILLS || !publisher.is_finished() {
        ensure!(
            kills < MAX_KILLS,
            "{kills} kills and the publisher is still not done"
        );
        ensure!(
            Instant::now() < deadline,
            "crash loop still running after {CATCH_UP:?}"
        );
        let delay = Duration::from_millis(rng.gen_range(KILL_DELAY_MS));
        tokio::time::sleep(delay).await;
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
            if applied == applied_at_start {
                starting += 1;
            }
        }
        applied_at_start = applied;
        instance.start()?;
    }
    let acked = publisher.await.context("publisher task")??;
    let last = acked.reference.max_seq();
    ensure!(
        acked.seqs.len() == EVENTS,
        "publisher acknowledged {} events",
        acked.seqs.len()
    );
    eprintln!(
        "{scenario}: {kills} SIGKILLs, {behind} of them while the applier was behind the stream \
         ({starting} before it applied anything), last seq {last}, crash loop took {:?}",
        started.elapsed()
    );
    // Kills must not all land during start-up: most runs with work to do should apply some.
    ensure!(
        starting * 2 <= kills,
        "{starting} of {kills} runs applied nothing before their kill"
    );
    instance.wait_applied(stream, last, CATCH_UP)?;
    eprintln!("{scenario}: caught up after {:?}", started.elapsed());
    // Which crash windows the kills hit, as the restarted runs saw them (informational: the
    // kill moments are random).
    let logs: Vec<String> = (1..=kills + 1)
        .map(|n| {
            std::fs::read_to_string(instance.dir.join(format!("run-{n}.log"))).unwrap_or_default()
        })
        .collect();
    let count = |needle: &str| logs.iter().filter(|log| log.contains(needle)).count();
    eprintln!(
        "{scenario}: restarts that found the sink's fence ahead of the redb checkpoint (killed between the two commits): {}; \
         that found the durable not exactly at the applied seq (killed before the ack, or with deliveries in hand): {}",
        count("bringing the redb checkpoint to the sink's fence"),
        count("consumer state differs from the applied sequence"),
    );
    Ok(CrashRun {
        started,
        instance,
        client,
        acked,
        group,
        root,
        _server: server,
    })
}

#[test]
fn crash_loop_sqlite() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let stream = "CRASHSQL";
        let mut run = crash_loop("crash_loop_sqlite", SinkKind::Sqlite, stream, false).await?;
        let last = run.acked.reference.max_seq();
        assert_sqlite_matches(&run.instance, &run.acked.reference, "items", "id")?;

        // A fresh instance replays the whole stream and must end with the same digest.
        let mut fresh = Instance::new(&run.group, run.root.path(), "fresh", SinkKind::Sqlite)?;
        fresh.start()?;
        fresh.wait_applied(stream, last, CATCH_UP)?;
        let code = run.instance.stop(STOP)?;
        ensure!(
            code == 0,
            "crashed instance exited {code}:\n{}",
            run.instance.log()
        );
        let code = fresh.stop(STOP)?;
        ensure!(code == 0, "fresh instance exited {code}:\n{}", fresh.log());
        let (a, b) = (run.instance.digest()?, fresh.digest()?);
        ensure!(
            a["applied_seq"] == last && b["applied_seq"] == last,
            "digests at different seqs: {a} vs {b}"
        );
        ensure!(
            a["tables"] == b["tables"],
            "digests differ: crashed {a} vs fresh {b}"
        );
        eprintln!(
            "crash_loop_sqlite: passed after {:?}",
            run.started.elapsed()
        );
        Ok(())
    })
}

#[test]
fn crash_loop_redb_audit() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let stream = "CRASHREDB";
        let mut run =
            crash_loop("crash_loop_redb_audit", SinkKind::RedbAudit, stream, true).await?;
        let last = run.acked.reference.max_seq();
        ensure!(
            stream_last_seq(&run.client, stream).await? == last,
            "the stream holds events nobody acknowledged"
        );
        let code = run.instance.stop(STOP)?;
        ensure!(code == 0, "instance exited {code}:\n{}", run.instance.log());

        // Every sequence 1..=last carries an event (full history, no deletes or purges), and
        // every one of them was acknowledged to the publisher.
        let mut acked = run.acked.seqs.clone();
        acked.sort_unstable();
        ensure!(
            acked == (1..=last).collect::<Vec<_>>(),
            "acknowledged sequences are not 1..={last}"
        );
        assert_applied_exactly_once("crash_loop_redb_audit", &run.instance.audit()?, 1..=last)?;
        assert_rows_equal(
            "crash_loop_redb_audit replica",
            &run.instance.redb_rows("items")?,
            &run.acked.reference,
            "items",
        )?;
        eprintln!(
            "crash_loop_redb_audit: passed after {:?}",
            run.started.elapsed()
        );
        Ok(())
    })
}
