//! Cluster: three instances apply a 3-replica stream of a 3-node cluster while the node that
//! leads the stream is SIGKILLed and restarted again and again during publishing. Publishers
//! retry with the same message id after a timeout or error, so an unknown outcome is neither
//! lost nor stored twice. At the end every acknowledged sequence is applied exactly once on
//! every instance (redb audit), the rows equal the reference and the digests are equal.
//!
//! `JETSYNC_E2E_SEED` replays the random choices (timing still varies).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use jetsync::{Row, Value, WriteOptions};
use jetsync_e2e::{
    assert_applied_exactly_once, assert_rows_equal, heavy, wait_until, Group, Instance, Reference,
    SinkKind,
};
use jetsync_testkit::Cluster;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::convergence::digest_of;
use crate::crash::{runtime, seed, stream_last_seq, CATCH_UP, FULL_HISTORY, STOP};

const STREAM: &str = "CLUSTER";
/// Events published in total, by `TASKS` concurrent publishers.
const EVENTS: usize = 10_000;
const TASKS: usize = 4;
/// Distinct keys (each publisher owns the keys `k % TASKS == task`, so a row's events come
/// from one sequential publisher and their order is the acknowledgement order).
const KEYS: usize = 400;
/// Stream-leader kills (each followed by a restart) during publishing.
const LEADER_KILLS: usize = 5;
/// One publish attempt waits at most this long before it is retried with the same id.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// A single event gives up after this long (well inside the 120 s duplicate window).
const EVENT_DEADLINE: Duration = Duration::from_secs(60);
/// Bound for a stream leader to be (re)elected.
const ELECTION: Duration = Duration::from_secs(30);
/// Bound for the whole publishing phase.
const PUBLISHING: Duration = Duration::from_secs(240);

/// What one publisher had acknowledged.
#[derive(Default)]
struct Acked {
    reference: Reference,
    seqs: Vec<u64>,
    retries: u64,
    duplicates: u64,
}

/// Publishes `n` events of task `task` one at a time, each retried with its message id until
/// acknowledged.
async fn publish_task(
    client: jetsync::Client,
    task: usize,
    n: usize,
    seed: u64,
    progress: Arc<AtomicU64>,
    allowed: Arc<AtomicU64>,
) -> Result<Acked> {
    let items = client.rows("items")?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acked = Acked::default();
    for i in 0..n {
        let key = format!("k{:04}", rng.gen_range(0..KEYS / TASKS) * TASKS + task);
        let row = (!rng.gen_bool(0.15)).then(|| {
            let mut row = Row::new();
            row.insert("id".into(), Value::Text(key.clone()));
            row.insert("n".into(), Value::I64(i as i64));
            row.insert("task".into(), Value::I64(task as i64));
            let len = rng.gen_range(0..12);
            let s: String = (0..len).map(|_| rng.gen_range('a'..='z')).collect();
            row.insert("s".into(), Value::Text(s));
            row
        });
        let msg_id = format!("cluster-{seed}-{task}-{i}");
        let paused = Instant::now();
        // Pace publishing to the leader kills: never run past the next kill's threshold before
        // that kill happened (bounded by the event deadline).
        while progress.load(Ordering::Relaxed) >= allowed.load(Ordering::Relaxed) {
            ensure!(
                paused.elapsed() < PUBLISHING,
                "publisher {task}: the kill loop did not release event {i} within {PUBLISHING:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let deadline = Instant::now() + EVENT_DEADLINE;
        let mut attempt = 0u64;
        let published = loop {
            attempt += 1;
            let options = WriteOptions {
                msg_id: Some(msg_id.clone()),
                ..WriteOptions::default()
            };
            let outcome = match &row {
                Some(row) => {
                    tokio::time::timeout(ATTEMPT_TIMEOUT, items.upsert_with(&key, row, options))
                        .await
                }
                None => {
                    tokio::time::timeout(ATTEMPT_TIMEOUT, items.delete_with(&key, options)).await
                }
            };
            let error = match outcome {
                Ok(Ok(p)) => break p,
                Ok(Err(e)) => format!("{e}"),
                Err(_) => format!("no acknowledgement within {ATTEMPT_TIMEOUT:?}"),
            };
            if Instant::now() >= deadline {
                bail!("publisher {task}: event {i} ({msg_id}) not acknowledged after {attempt} attempts in {EVENT_DEADLINE:?}; last error: {error}");
            }
            // Back off a little before retrying (an election is usually under way).
            tokio::time::sleep(Duration::from_millis(50 * attempt.min(10))).await;
        };
        if attempt > 1 {
            acked.retries += attempt - 1;
        }
        if published.duplicate {
            ensure!(attempt > 1, "publisher {task}: the first publish of {msg_id} was acknowledged as a duplicate (seq {})", published.seq);
            acked.duplicates += 1;
        }
        acked.reference.record(published.seq, "items", &key, row);
        acked.seqs.push(published.seq);
        progress.fetch_add(1, Ordering::Relaxed);
    }
    Ok(acked)
}

#[test]
fn cluster_stream_leader_kills() -> Result<()> {
    let _heavy = heavy();
    jetsync_e2e::applier_bin();
    let started = Instant::now();
    let seed = seed("cluster_stream_leader_kills");
    let rt = runtime()?;
    let mut cluster = Cluster::start(3)?;
    let root = tempfile::tempdir()?;
    let group = Group::new(cluster.url_list(), STREAM, "cluster");
    let mut instances = (1..=3)
        .map(|i| Instance::new(&group, root.path(), &format!("r{i}"), SinkKind::RedbAudit))
        .collect::<Result<Vec<_>>>()?;
    for instance in &instances {
        instance.set_stream_option("replicas", "3")?;
        instance.set_stream_option("history", &FULL_HISTORY.to_string())?;
    }
    instances[1].append_config("[apply]\nbatch_max = 50\n")?;
    let (code, _, err) = instances[0].cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    for instance in &mut instances {
        instance.start()?;
    }
    let stream_config = jetsync::StreamConfig {
        replicas: 3,
        history: FULL_HISTORY as i64,
        ..group.stream_config()
    };
    let client = rt.block_on(async {
        let nats = async_nats::connect(cluster.urls()).await?;
        anyhow::Ok(jetsync::Client::from_nats(
            nats,
            stream_config,
            "cluster-pub",
        )?)
    })?;

    let progress = Arc::new(AtomicU64::new(0));
    let allowed_after = |kills: usize| ((kills + 2) * EVENTS / (LEADER_KILLS + 2)) as u64;
    let allowed = Arc::new(AtomicU64::new(allowed_after(0)));
    let publishers: Vec<_> = (0..TASKS)
        .map(|t| {
            rt.spawn(publish_task(
                client.clone(),
                t,
                EVENTS / TASKS,
                seed.wrapping_add(t as u64),
                progress.clone(),
                allowed.clone(),
            ))
        })
        .collect();

    // Kill the stream leader whenever publishing has gone another 1/(LEADER_KILLS + 2) of the
    // way, so every kill lands while events are being published.
    let deadline = Instant::now() + PUBLISHING;
    let mut kills = Vec::new();
    while kills.len() < LEADER_KILLS {
        let threshold = ((kills.len() + 1) * EVENTS / (LEADER_KILLS + 2)) as u64;
        wait_until(
            "publishing progress before the next leader kill",
            deadline.saturating_duration_since(Instant::now()),
            || {
                (progress.load(Ordering::Relaxed) >= threshold
                    || publishers.iter().any(|p| p.is_finished()))
                .then_some(())
            },
        )?;
        if publishers.iter().any(|p| p.is_finished()) {
            break;
        }
        let leader = cluster
            .wait_stream_leader(STREAM, ELECTION)
            .with_context(|| format!("no leader for {STREAM} within {ELECTION:?}"))?;
        let at = progress.load(Ordering::Relaxed);
        cluster.kill(leader);
        let elected = Instant::now();
        let new_leader = cluster
            .wait_stream_leader(STREAM, ELECTION)
            .with_context(|| {
                format!(
                    "no new leader for {STREAM} within {ELECTION:?} after killing n{}",
                    leader + 1
                )
            })?;
        let election = elected.elapsed();
        cluster.restart(leader)?;
        eprintln!(
            "cluster: killed leader n{} at {at} acknowledged events; n{} elected after {election:?}; n{} restarted",
            leader + 1,
            new_leader + 1,
            leader + 1
        );
        kills.push(at);
        let next = if kills.len() == LEADER_KILLS {
            u64::MAX
        } else {
            allowed_after(kills.len())
        };
        allowed.store(next, Ordering::Relaxed);
    }
    allowed.store(u64::MAX, Ordering::Relaxed);
    let mut acked = Acked::default();
    for p in publishers {
        let a = rt.block_on(p).context("publisher task")??;
        acked.reference.merge(a.reference);
        acked.seqs.extend(a.seqs);
        acked.retries += a.retries;
        acked.duplicates += a.duplicates;
    }
    ensure!(
        kills.len() == LEADER_KILLS,
        "publishing ended after only {} leader kills",
        kills.len()
    );
    let last = rt.block_on(stream_last_seq(&client, STREAM))?;
    eprintln!(
        "cluster: {} events acknowledged ({} retries, {} acknowledged as duplicates of an earlier attempt), stream last seq {last}, after {:?}",
        acked.seqs.len(),
        acked.retries,
        acked.duplicates,
        started.elapsed()
    );
    acked.seqs.sort_unstable();
    let distinct = {
        let mut s = acked.seqs.clone();
        s.dedup();
        s.len()
    };
    ensure!(
        distinct == EVENTS,
        "{} acknowledgements share a sequence with another event",
        EVENTS - distinct
    );
    ensure!(
        acked.seqs == (1..=last).collect::<Vec<_>>(),
        "the stream holds {last} events for {EVENTS} acknowledged ones: a retried publish was stored twice or a sequence was skipped"
    );

    for instance in &mut instances {
        instance.wait_applied(STREAM, last, CATCH_UP)?;
    }
    eprintln!(
        "cluster: all instances applied seq {last} after {:?}",
        started.elapsed()
    );
    let mut digests = Vec::new();
    for instance in &mut instances {
        let code = instance.stop(STOP)?;
        ensure!(
            code == 0,
            "instance {} exited {code}:\n{}",
            instance.name,
            instance.log()
        );
        let what = format!("cluster instance {}", instance.name);
        assert_applied_exactly_once(&what, &instance.audit()?, 1..=last)?;
        assert_rows_equal(
            &what,
            &instance.redb_rows("items")?,
            &acked.reference,
            "items",
        )?;
        let (tables, seq) = digest_of(instance)?;
        ensure!(
            seq == last,
            "{what}: digest applied_seq {seq}, expected {last}"
        );
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
    eprintln!("cluster: passed after {:?}", started.elapsed());
    Ok(())
}
