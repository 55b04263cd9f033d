//! Snapshots (issue #4): a new instance joins from the latest event of every row instead of the
//! whole history; an instance that fell behind a stream with limits is rebuilt from a snapshot
//! (`on_gap = "resync"`, or the `resync` command) or halts naming both sequences.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use jetsync::Row;
use jetsync_e2e::{
    assert_sqlite_matches_exactly, heavy, random_row, Group, Instance, Reference, SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, SeedableRng};

use crate::convergence::digest_of;

/// Publishes `events` (key, row or `None` for a delete) pipelined; returns the reference.
async fn publish(group: &Group, events: Vec<(String, Option<Row>)>) -> Result<Reference> {
    crate::downtime::publish_events(group.clone(), "snap-pub", events).await
}

fn applied_events(instance: &Instance) -> Result<u64> {
    let status = instance.status()?;
    status["groups"][0]["applied_events"]
        .as_u64()
        .with_context(|| format!("status without applied_events: {status}"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

const BOOT_KEYS: usize = 10_000;
const BOOT_ROUNDS: usize = 5;

/// History 5, 10,000 keys each written 5 times: the instance that ran all along applied 50,000
/// events; a new instance bootstraps from about 10,000 and ends identical.
#[test]
fn new_instance_bootstraps_from_rows_not_history() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let started = Instant::now();
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = Group::new(server.url(), "BOOT", "boot");
        let mut old = Instance::new(&group, root.path(), "b1", SinkKind::Sqlite)?;
        let mut new = Instance::new(&group, root.path(), "b2", SinkKind::Sqlite)?;
        for i in [&old, &new] {
            i.set_stream_option("history", "5")?;
        }
        let (code, _, err) = old.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        old.start()?;

        let mut rng = StdRng::seed_from_u64(rand::random());
        let mut events = Vec::with_capacity(BOOT_KEYS * BOOT_ROUNDS);
        for round in 0..BOOT_ROUNDS {
            for k in 0..BOOT_KEYS {
                let key = format!("k{k}");
                // A few rows end deleted: their tombstone is their latest event.
                let delete = round == BOOT_ROUNDS - 1 && k % 50 == 0;
                events.push((key.clone(), (!delete).then(|| random_row(&mut rng, &key))));
            }
        }
        let reference = publish(&group, events).await?;
        let last = reference.max_seq();
        ensure!(last == (BOOT_KEYS * BOOT_ROUNDS) as u64);
        old.wait_applied("BOOT", last, Duration::from_secs(300))?;
        ensure!(
            applied_events(&old)? == last,
            "the old instance replayed everything"
        );

        new.start()?;
        new.wait_applied("BOOT", last, Duration::from_secs(300))?;
        let bootstrap_events = applied_events(&new)?;
        eprintln!(
            "bootstrap: {bootstrap_events} events applied for {BOOT_KEYS} rows (history {last}), {:?} in all",
            started.elapsed()
        );
        ensure!(
            (BOOT_KEYS as u64..=BOOT_KEYS as u64 + 100).contains(&bootstrap_events),
            "the new instance applied {bootstrap_events} events, expected about {BOOT_KEYS}"
        );
        // The checkpoint is written just before the log line: wait for the line too.
        jetsync_e2e::wait_until("the bootstrap's log line", Duration::from_secs(10), || {
            new.log().contains("bootstrap complete").then_some(())
        })
        .with_context(|| format!("no bootstrap in the log:\n{}", new.log()))?;
        assert_sqlite_matches_exactly(&new, &reference, "items", "id")?;
        ensure!(
            digest_of(&old)? == digest_of(&new)?,
            "digests differ after the bootstrap"
        );

        // It continues with its durable consumer: later events arrive as usual.
        let more = publish(
            &group,
            vec![("k1".into(), None), ("fresh".into(), Some(random_row(&mut rng, "fresh")))],
        )
        .await?;
        for i in [&mut old, &mut new] {
            i.wait_applied("BOOT", more.max_seq(), Duration::from_secs(60))?;
        }
        ensure!(digest_of(&old)? == digest_of(&new)?, "digests differ after new events");

        // A third instance is SIGKILLed while it bootstraps, three times: each restart resumes
        // the snapshot after what the killed run applied, and it still ends identical, having
        // applied about one event per row.
        let mut crashed = Instance::new(&group, root.path(), "b3", SinkKind::Sqlite)?;
        crashed.set_stream_option("history", "5")?;
        let end = more.max_seq();
        let mut resumed = 0;
        for _ in 0..3 {
            crashed.start()?;
            jetsync_e2e::wait_until("the bootstrap to apply a first batch", Duration::from_secs(120), || {
                (crashed.applied("BOOT") > 0).then_some(())
            })?;
            crashed.kill();
            if crashed.applied("BOOT") < end {
                resumed += 1;
            }
        }
        crashed.start()?;
        crashed.wait_applied("BOOT", end, Duration::from_secs(300))?;
        let events = applied_events(&crashed)?;
        eprintln!("bootstrap with kills: {resumed} of 3 kills landed before the end; {events} events applied in all");
        ensure!(
            events <= BOOT_KEYS as u64 + 2 + 100,
            "{events} events applied: a resumed bootstrap must not replay the history"
        );
        ensure!(digest_of(&old)? == digest_of(&crashed)?, "digests differ after a bootstrap with kills");
        Ok(())
    })
}

const GAP_KEYS: usize = 600;

/// Phase 1 of the gap tests: every row written once (no event superseded, none removed yet).
fn every_row_once(rng: &mut StdRng) -> Vec<(String, Option<Row>)> {
    (0..GAP_KEYS)
        .map(|k| {
            let key = format!("k{k}");
            let row = random_row(rng, &key);
            (key, Some(row))
        })
        .collect()
}

/// The start of the gap tests: a warm-up event applied by every instance (so all are past their
/// empty bootstrap and consuming in a session), then phase 1 ([`every_row_once`]) applied by
/// every instance. Returns the reference of both.
async fn warm_up_then_every_row_once(
    group: &Group,
    rng: &mut StdRng,
    instances: &mut [&mut Instance],
) -> Result<Reference> {
    let mut reference = publish(group, vec![("k0".into(), Some(random_row(rng, "k0")))]).await?;
    for i in instances.iter_mut() {
        i.wait_applied(&group.stream, reference.max_seq(), Duration::from_secs(60))?;
    }
    reference.merge(publish(group, every_row_once(rng)).await?);
    for i in instances.iter_mut() {
        i.wait_applied(&group.stream, reference.max_seq(), Duration::from_secs(60))?;
    }
    Ok(reference)
}

/// Phase 2 of the gap tests: 5 more rounds over every row (3,000 events, so a 1,000-message
/// limit rolls far past phase 1); the last round deletes every tenth row.
fn five_rounds_with_deletes(rng: &mut StdRng) -> Vec<(String, Option<Row>)> {
    let mut events = Vec::new();
    for round in 0..5 {
        for k in 0..GAP_KEYS {
            let key = format!("k{k}");
            let delete = round == 4 && k % 10 == 0;
            events.push((key.clone(), (!delete).then(|| random_row(rng, &key))));
        }
    }
    events
}

/// History 5 and a limit of 1,000 messages in the instances' stream config: the limit, not
/// compaction, removes the older events once phase 2 runs (every row's latest event stays).
fn limit_to_1000_messages(instances: &[&Instance]) -> Result<()> {
    for i in instances {
        i.set_stream_option("max_msgs", "1000")?;
        i.set_stream_option("history", "5")?;
    }
    Ok(())
}

/// A stream with a message limit rolls past stopped instances: with `resync` one rebuilds (and
/// so does the `resync` command for another), with `halt` one exits 1 naming both sequences.
#[test]
fn gap_resyncs_or_halts() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = Group::new(server.url(), "GAP", "gap");
        let mut live = Instance::new(&group, root.path(), "live", SinkKind::Sqlite)?;
        let mut resync = Instance::new(&group, root.path(), "resync", SinkKind::Sqlite)?;
        let mut halt = Instance::new(&group, root.path(), "halt", SinkKind::Sqlite)?;
        let mut manual = Instance::new(&group, root.path(), "manual", SinkKind::Sqlite)?;
        limit_to_1000_messages(&[&live, &resync, &halt, &manual])?;
        halt.set_option("apply", "on_gap", "\"halt\"")?;
        manual.set_option("apply", "on_gap", "\"halt\"")?;
        let (code, _, err) = live.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        for i in [&mut live, &mut resync, &mut halt, &mut manual] {
            i.start()?;
        }
        // All four consume live before the events arrive. Phase 1 writes every row once: no
        // event is superseded, so none is removed before an instance gets it (on a stream with
        // limits an instance lagging by more than the rows held would count as a gap).
        let mut rng = StdRng::seed_from_u64(rand::random());
        let mut reference = warm_up_then_every_row_once(
            &group,
            &mut rng,
            &mut [&mut live, &mut resync, &mut halt, &mut manual],
        )
        .await?;
        let s = reference.max_seq();
        for i in [&mut resync, &mut halt, &mut manual] {
            ensure!(i.stop(Duration::from_secs(20))? == 0, "clean stop");
        }

        // 5 more rounds over every key (3,000 events, the stream keeps the last 1,000); the last
        // round deletes some rows.
        let phase2 = five_rounds_with_deletes(&mut rng);
        reference.merge(publish(&group, phase2).await?);
        let last = reference.max_seq();
        live.wait_applied("GAP", last, Duration::from_secs(60))?;
        let nats = async_nats::connect(server.url()).await?;
        let first = async_nats::jetstream::new(nats)
            .get_stream("GAP")
            .await?
            .info()
            .await?
            .state
            .first_sequence;
        ensure!(first > s + 1, "no gap: first seq {first}, applied {s}");

        // halt: exit 1 naming both sequences.
        halt.start()?;
        let code = halt.wait_exit(Duration::from_secs(60))?;
        let log = halt.log();
        ensure!(code == 1, "halt exited {code}:\n{log}");
        ensure!(
            log.contains(&format!("applied up to seq {s}"))
                && log.contains(&format!("first available seq is {first}")),
            "the halt message does not name {s} and {first}:\n{log}"
        );

        // resync: rebuilds and converges.
        resync.start()?;
        resync.wait_applied("GAP", last, Duration::from_secs(60))?;
        // The checkpoint is written just before the log line: wait for the line too.
        jetsync_e2e::wait_until("the resync's log line", Duration::from_secs(10), || {
            resync.log().contains("resync complete").then_some(())
        })
        .with_context(|| format!("no resync in the log:\n{}", resync.log()))?;
        assert_sqlite_matches_exactly(&resync, &reference, "items", "id")?;
        ensure!(
            digest_of(&live)? == digest_of(&resync)?,
            "resync: digests differ"
        );

        // The `resync` command rebuilds a stopped instance (which would halt by itself).
        let out = manual.cli_json(&["resync"])?;
        ensure!(
            out["applied_seq"].as_u64() == Some(last)
                && out["events"].as_u64() == Some(GAP_KEYS as u64),
            "resync output: {out}"
        );
        assert_sqlite_matches_exactly(&manual, &reference, "items", "id")?;
        ensure!(
            digest_of(&live)? == digest_of(&manual)?,
            "resync command: digests differ"
        );
        // And it runs on from there.
        manual.start()?;
        let more = publish(&group, vec![("k3".into(), None)]).await?;
        for i in [&mut live, &mut manual, &mut resync] {
            i.wait_applied("GAP", more.max_seq(), Duration::from_secs(60))?;
        }
        ensure!(
            digest_of(&live)? == digest_of(&manual)?,
            "after the resync command: digests differ"
        );
        Ok(())
    })
}

/// A running instance that stalls (SIGSTOP: a long pause, a frozen VM) while a stream with a
/// message limit rolls past its applied sequence notices the gap while running, from the jump in
/// the delivered stream sequences, without a restart: with `resync` it rebuilds and converges;
/// with `halt` it exits 1 naming the first available sequence.
#[test]
fn a_running_instance_notices_a_gap_while_running() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = Group::new(server.url(), "RGAP", "rgap");
        let mut live = Instance::new(&group, root.path(), "live", SinkKind::Sqlite)?;
        let mut resync = Instance::new(&group, root.path(), "resync", SinkKind::Sqlite)?;
        let mut halt = Instance::new(&group, root.path(), "halt", SinkKind::Sqlite)?;
        limit_to_1000_messages(&[&live, &resync, &halt])?;
        halt.set_option("apply", "on_gap", "\"halt\"")?;
        let (code, _, err) = live.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        for i in [&mut live, &mut resync, &mut halt] {
            i.start()?;
        }
        // A warm-up event first: once all three applied it they are past their (empty)
        // bootstrap and consuming in a session, so the pause below lands in a running session
        // (an instance still starting up would find the gap at start instead).
        let mut rng = StdRng::seed_from_u64(rand::random());
        let mut reference =
            warm_up_then_every_row_once(&group, &mut rng, &mut [&mut live, &mut resync, &mut halt])
                .await?;
        let s = reference.max_seq();

        // Two of them stall; 3,000 more events roll the 1,000-message limit far past s. The
        // pause lasts only as long as the publishing (well under the heartbeat and the server's
        // write deadline), so their sessions survive it.
        resync.signal("STOP")?;
        halt.signal("STOP")?;
        let stalled = Instant::now();
        let phase2 = five_rounds_with_deletes(&mut rng);
        let published = publish(&group, phase2).await;
        let nats = async_nats::connect(server.url()).await?;
        let first = async_nats::jetstream::new(nats)
            .get_stream("RGAP")
            .await?
            .info()
            .await?
            .state
            .first_sequence;
        resync.signal("CONT")?;
        halt.signal("CONT")?;
        eprintln!("runtime gap: stalled for {:?}", stalled.elapsed());
        reference.merge(published?);
        let last = reference.max_seq();
        ensure!(first > s + 1, "no gap: first seq {first}, applied {s}");

        // halt: the running process exits 1 naming the first available sequence.
        let code = halt.wait_exit(Duration::from_secs(60))?;
        let log = halt.log();
        ensure!(code == 1, "halt exited {code}:\n{log}");
        ensure!(
            log.contains("applied up to seq ")
                && log.contains(&format!("first available seq is {first}")),
            "the halt message does not name the applied seq and {first}:\n{log}"
        );

        // resync: the same process rebuilds from a snapshot and converges.
        live.wait_applied("RGAP", last, Duration::from_secs(60))?;
        resync.wait_applied("RGAP", last, Duration::from_secs(60))?;
        jetsync_e2e::wait_until("the resync's log line", Duration::from_secs(10), || {
            resync.log().contains("resync complete").then_some(())
        })
        .with_context(|| format!("no resync in the log:\n{}", resync.log()))?;
        let log = resync.log();
        ensure!(
            log.contains("gap found while running"),
            "the gap was not found by the running session:\n{log}"
        );
        ensure!(resync.is_running(), "the resync instance exited:\n{log}");
        assert_sqlite_matches_exactly(&resync, &reference, "items", "id")?;
        ensure!(
            digest_of(&live)? == digest_of(&resync)?,
            "runtime resync: digests differ"
        );
        Ok(())
    })
}
