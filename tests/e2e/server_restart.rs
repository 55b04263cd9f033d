//! Server restarts mid-stream: nats-server is SIGKILLed and restarted (same port, same store)
//! several times while a publisher publishes and the applier applies. The applier is never
//! restarted: it must resume on its own, losing nothing and applying nothing twice.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use jetsync::{Row, Table, WriteOptions};
use jetsync_e2e::{
    assert_applied_exactly_once, assert_rows_equal, heavy, Group, Instance, SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::crash::{
    ensure_fits_history, random_events, runtime, seed, stream_last_seq, Acked, Event, CATCH_UP,
    FULL_HISTORY, STOP,
};

const STREAM: &str = "SRVRESTART";
const COMPACTED_STREAM: &str = "SRVCOMPACT";
/// Events published, one at a time, each retried with its message id until acknowledged.
const EVENTS: usize = 6_000;
const KEYS: usize = 500;
/// Keys of the compacted variant: few, so rows are superseded within the server's outages.
const COMPACTED_KEYS: usize = 50;
/// Publishes in flight at once in the compacted variant: those still buffered when the server
/// dies reach it right after the restart and supersede rows then.
const COMPACTED_IN_FLIGHT: usize = 256;
/// Server kills (each followed by a restart) during the stream.
const RESTARTS: usize = 3;
/// How long one event may take to be acknowledged, retries included.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(60);
/// Timeout of a single publish attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Publishes `events` with up to `in_flight` publishes awaiting their acknowledgement (1:
/// strictly one after the other), each with message id `sr-<index>`, retrying a failed publish
/// with the same id (so the stream stores it once) until it is acknowledged or
/// `PUBLISH_DEADLINE` passes. `progress` counts acknowledged events, `max_acked` is the highest
/// acknowledged sequence. Returns what was
/// acknowledged and how many attempts failed.
async fn publish_with_retries(
    items: Table<Row>,
    events: Vec<Event>,
    in_flight: usize,
    progress: Arc<AtomicU64>,
    max_acked: Arc<AtomicU64>,
) -> Result<(Acked, u64)> {
    let items = &items;
    let mut outcomes = futures::stream::iter(events.into_iter().enumerate())
        .map(|(i, (key, row))| async move {
            let options = WriteOptions {
                msg_id: Some(format!("sr-{i}")),
                ..WriteOptions::default()
            };
            let deadline = Instant::now() + PUBLISH_DEADLINE;
            let mut failures = 0;
            loop {
                let attempt = match &row {
                    Some(row) => items.upsert_with(&key, row, options.clone()).await,
                    None => items.delete_with(&key, options.clone()).await,
                };
                match attempt {
                    Ok(published) => return anyhow::Ok((published.seq, key, row, failures)),
                    Err(e) => {
                        if Instant::now() >= deadline {
                            bail!("event {i} ({key}) not acknowledged within {PUBLISH_DEADLINE:?}: {e}");
                        }
                        failures += 1;
                        // Do not hammer a server that is down (the attempt itself already
                        // waited up to its timeout when the server did not answer).
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        })
        .buffer_unordered(in_flight);
    let mut acked = Acked::default();
    let mut retries = 0;
    while let Some(outcome) = outcomes.next().await {
        let (seq, key, row, failures) = outcome?;
        acked.record(seq, &key, row);
        retries += failures;
        max_acked.fetch_max(seq, Ordering::Relaxed);
        progress.fetch_add(1, Ordering::Relaxed);
    }
    Ok((acked, retries))
}

/// Runs the scenario on stream `stream` with `keys` keys and `stream.history = history`;
/// returns the stopped instance and what was acknowledged.
async fn server_restarts(
    scenario: &str,
    stream: &str,
    keys: usize,
    history: usize,
    in_flight: usize,
) -> Result<(Instance, Acked, tempfile::TempDir)> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed(scenario));
    let events = random_events(&mut rng, EVENTS, keys, "srv");
    if history == FULL_HISTORY {
        ensure_fits_history(&events, FULL_HISTORY)?;
    }
    let mut server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let prefix = stream.to_lowercase();
    let group = Group::new(server.url(), stream, &prefix);
    let mut instance = Instance::new(&group, root.path(), "sr1", SinkKind::RedbAudit)?;
    instance.set_stream_option("history", &history.to_string())?;
    let (code, _, err) = instance.cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    match std::env::var("JETSYNC_E2E_APPLIER_LOG") {
        Ok(filter) => instance.start_with_log(&filter)?,
        Err(_) => instance.start()?,
    }

    let nats = async_nats::ConnectOptions::new()
        .max_reconnects(None::<usize>)
        .connect(server.url())
        .await?;
    let stream_config = jetsync::StreamConfig {
        name: stream.into(),
        subject_prefix: prefix,
        ..jetsync::StreamConfig::default()
    };
    let client = jetsync::Client::builder(nats, stream_config, "srv-pub")
        .timeout(ATTEMPT_TIMEOUT)
        .build()?;
    let progress = Arc::new(AtomicU64::new(0));
    let max_acked = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn(publish_with_retries(
        client.rows("items")?,
        events,
        in_flight,
        progress.clone(),
        max_acked.clone(),
    ));

    let (mut applied_at_restart, mut published_at_restart) = (0, 0);
    for k in 1..=RESTARTS {
        // Kill at k/(RESTARTS+1) of the stream, once the publisher and the applier have both
        // resumed since the previous restart (the applier by itself: it is never restarted).
        let target = (EVENTS * k / (RESTARTS + 1)) as u64;
        let deadline = Instant::now() + CATCH_UP;
        let all_published = || progress.load(Ordering::Relaxed) == EVENTS as u64;
        let publisher_resumed = || {
            let published = progress.load(Ordering::Relaxed);
            published >= target && (published > published_at_restart || all_published())
        };
        // Once everything is published and applied, there is nothing left to resume.
        let applier_resumed = |applied: u64| {
            applied > applied_at_restart
                || (all_published() && applied >= max_acked.load(Ordering::Relaxed))
        };
        while !publisher_resumed() || !applier_resumed(instance.applied(stream)) {
            ensure!(
                instance.is_running(),
                "the applier exited:\n{}",
                instance.log()
            );
            ensure!(
                Instant::now() < deadline,
                "no progress: {} of {target} events published, applied {} (at the last restart: {applied_at_restart})",
                progress.load(Ordering::Relaxed),
                instance.applied(stream)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        applied_at_restart = instance.applied(stream);
        published_at_restart = progress.load(Ordering::Relaxed);
        server.kill();
        // A random outage; the applier and the publisher notice the disconnect meanwhile.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=500))).await;
        let restarted = Instant::now();
        server.restart()?;
        eprintln!(
            "{scenario}: restart {k} at {} published / {applied_at_restart} applied, server back after {:?}",
            progress.load(Ordering::Relaxed),
            restarted.elapsed()
        );
    }

    let (acked, retries) = publisher.await.context("publisher task")??;
    let last = acked.reference.max_seq();
    eprintln!(
        "{scenario}: {} events acknowledged ({retries} failed attempts retried), last seq {last}",
        acked.seqs.len()
    );
    instance.wait_applied(stream, last, CATCH_UP)?;
    ensure!(
        instance.is_running(),
        "the applier exited:\n{}",
        instance.log()
    );
    ensure!(
        stream_last_seq(&client, stream).await? == last,
        "the stream holds events nobody acknowledged"
    );
    let code = instance.stop(STOP)?;
    ensure!(code == 0, "instance exited {code}:\n{}", instance.log());
    eprintln!("{scenario}: done after {:?}", started.elapsed());
    if std::env::var_os("JETSYNC_E2E_SHOW_LOG").is_some() {
        eprintln!("{}", instance.log());
    }
    let mut seqs = acked.seqs.clone();
    seqs.sort_unstable();
    seqs.dedup();
    ensure!(
        seqs.len() == EVENTS,
        "{} distinct sequences for {EVENTS} events",
        seqs.len()
    );
    Ok((instance, acked, root))
}

#[test]
fn applier_rides_out_server_restarts() -> Result<()> {
    let _heavy = heavy();
    jetsync_e2e::applier_bin();
    runtime()?.block_on(async {
        let (instance, acked, _root) =
            server_restarts("server_restart", STREAM, KEYS, FULL_HISTORY, 1).await?;
        // Full history: every acknowledged sequence 1..=last is in the stream, so each must
        // have been applied exactly once.
        let last = acked.reference.max_seq();
        assert_applied_exactly_once("server restart", &instance.audit()?, 1..=last)
            .with_context(|| format!("applier log:\n{}", instance.log()))?;
        assert_rows_equal(
            "server restart replica",
            &instance.redb_rows("items")?,
            &acked.reference,
            "items",
        )
    })
}

/// The same on a compacted stream (the default `history = 1`) with few keys, so that events
/// disappear from the stream while the server is down and restarting: the applier may skip
/// superseded events it never saw, but never the latest event of a row, and never apply
/// anything twice.
#[test]
fn applier_rides_out_server_restarts_compacted() -> Result<()> {
    let _heavy = heavy();
    jetsync_e2e::applier_bin();
    runtime()?.block_on(async {
        let (instance, acked, _root) = server_restarts("server_restart_compacted", COMPACTED_STREAM, COMPACTED_KEYS, 1, COMPACTED_IN_FLIGHT).await?;
        let audit = instance.audit()?;
        let doubled: Vec<_> = audit.iter().filter(|(_, &n)| n != 1).take(10).collect();
        // Events stored but never acknowledged can exist (a publish stored just before a
        // restart whose retry the server, having lost the superseded original's message id
        // with the message, stores again): they are part of the stream and may be applied.
        let last = acked.reference.max_seq();
        let unexpected: Vec<_> = audit.keys().filter(|&&s| s > last).take(10).collect();
        let missing: Vec<_> = acked.latest.iter().filter(|(_, s)| !audit.contains_key(s)).take(10).collect();
        ensure!(
            doubled.is_empty() && unexpected.is_empty() && missing.is_empty(),
            "compacted: applied more than once {doubled:?}; beyond the stream's last seq {unexpected:?}; latest events never applied (key, seq) {missing:?}\napplier log:\n{}",
            instance.log()
        );
        eprintln!("server_restart_compacted: {} of {} events applied (the rest superseded before the applier read them)", audit.len(), acked.seqs.len());
        assert_rows_equal("server restart (compacted) replica", &instance.redb_rows("items")?, &acked.reference, "items")
    })
}
