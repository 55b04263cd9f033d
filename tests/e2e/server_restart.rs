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
/// Events published, one at a time, each retried with its message id until acknowledged.
const EVENTS: usize = 6_000;
const KEYS: usize = 500;
/// Server kills (each followed by a restart) during the stream.
const RESTARTS: usize = 3;
/// How long one event may take to be acknowledged, retries included.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(60);
/// Timeout of a single publish attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Publishes `events` in order, each with message id `sr-<index>`, retrying a failed publish
/// with the same id (so the stream stores it once) until it is acknowledged or
/// `PUBLISH_DEADLINE` passes. `progress` counts acknowledged events.
async fn publish_with_retries(items: Table<Row>, events: Vec<Event>, progress: Arc<AtomicU64>) -> Result<(Acked, u64)> {
    let mut acked = Acked::default();
    let mut retries = 0;
    for (i, (key, row)) in events.into_iter().enumerate() {
        let options = WriteOptions {
            msg_id: Some(format!("sr-{i}")),
            ..WriteOptions::default()
        };
        let deadline = Instant::now() + PUBLISH_DEADLINE;
        let published = loop {
            let attempt = match &row {
                Some(row) => items.upsert_with(&key, row, options.clone()).await,
                None => items.delete_with(&key, options.clone()).await,
            };
            match attempt {
                Ok(p) => break p,
                Err(e) => {
                    if Instant::now() >= deadline {
                        bail!("event {i} ({key}) not acknowledged within {PUBLISH_DEADLINE:?}: {e}");
                    }
                    retries += 1;
                    // Back off a little so a down server is not hammered (bounded by the
                    // deadline above; the attempt itself already waited up to its timeout).
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        acked.record(published.seq, &key, row);
        progress.store(i as u64 + 1, Ordering::Relaxed);
    }
    Ok((acked, retries))
}

#[test]
fn applier_rides_out_server_restarts() -> Result<()> {
    let _heavy = heavy();
    jetsync_e2e::applier_bin();
    runtime()?.block_on(async {
        let started = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed("server_restart"));
        let events = random_events(&mut rng, EVENTS, KEYS, "srv");
        ensure_fits_history(&events, FULL_HISTORY)?;
        let mut server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = Group::new(server.url(), STREAM, "srvrestart");
        let mut instance = Instance::new(&group, root.path(), "sr1", SinkKind::RedbAudit)?;
        instance.set_stream_option("history", &FULL_HISTORY.to_string())?;
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
        let mut stream_config = jetsync::StreamConfig::default();
        stream_config.name = STREAM.into();
        stream_config.subject_prefix = "srvrestart".into();
        let client = jetsync::Client::builder(nats, stream_config, "srv-pub")
            .timeout(ATTEMPT_TIMEOUT)
            .build()?;
        let progress = Arc::new(AtomicU64::new(0));
        let publisher = tokio::spawn(publish_with_retries(client.rows("items")?, events, progress.clone()));

        for k in 1..=RESTARTS {
            // Kill at k/(RESTARTS+1) of the stream, once the applier is applying live.
            let target = (EVENTS * k / (RESTARTS + 1)) as u64;
            let deadline = Instant::now() + CATCH_UP;
            while progress.load(Ordering::Relaxed) < target || instance.applied(STREAM) == 0 {
                if publisher.is_finished() {
                    bail!("the publisher stopped early: {:?}", publisher.await);
                }
                ensure!(instance.is_running(), "the applier exited:\n{}", instance.log());
                ensure!(Instant::now() < deadline, "publisher stuck at {} of {target} events", progress.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let applied = instance.applied(STREAM);
            server.kill();
            // A random outage; the applier and publisher notice the disconnect meanwhile.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=500))).await;
            let restarted = Instant::now();
            server.restart()?;
            eprintln!(
                "server_restart: restart {k} at {} published / {applied} applied, server back after {:?}",
                progress.load(Ordering::Relaxed),
                restarted.elapsed()
            );
        }

        let (acked, retries) = publisher.await.context("publisher task")??;
        let last = acked.reference.max_seq();
        eprintln!("server_restart: {} events acknowledged ({retries} retries), last seq {last}", acked.seqs.len());
        instance.wait_applied(STREAM, last, CATCH_UP)?;
        ensure!(instance.is_running(), "the applier exited:\n{}", instance.log());
        ensure!(stream_last_seq(&client, STREAM).await? == last, "the stream holds events nobody acknowledged");
        let code = instance.stop(STOP)?;
        ensure!(code == 0, "instance exited {code}:\n{}", instance.log());
        eprintln!("server_restart: done after {:?}", started.elapsed());

        let mut seqs = acked.seqs.clone();
        seqs.sort_unstable();
        seqs.dedup();
        ensure!(seqs.len() == EVENTS, "{} distinct sequences for {EVENTS} events", seqs.len());
        let log = instance.log();
        if std::env::var_os("JETSYNC_E2E_SHOW_LOG").is_some() {
            eprintln!("{log}");
        }
        assert_applied_exactly_once("server restart", &instance.audit()?, 1..=last)
            .with_context(|| format!("applier log:\n{log}"))?;
        assert_rows_equal("server restart replica", &instance.redb_rows("items")?, &acked.reference, "items")
    })
}
