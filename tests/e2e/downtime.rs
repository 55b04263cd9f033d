//! Downtime: an instance stopped while 5,000 events are published applies exactly those 5,000
//! when it comes back, and ends identical to the instances that kept running.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use jetsync::Row;
use jetsync_e2e::{
    assert_sqlite_matches_exactly, heavy, random_row, Group, Instance, Reference, SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

use crate::convergence::{digest_of, publish_random, UPSERT_SHARE};

const STREAM: &str = "DOWN";
const PHASE1_EVENTS: usize = 1_000;
const PHASE1_KEYS: usize = 400;
const PHASE2_EVENTS: usize = 5_000;

/// Publishes one event per given key (an upsert, or a delete when the row is `None`),
/// pipelined, as `origin`; returns the reference built from the acknowledgements.
pub(crate) async fn publish_events(
    group: Group,
    origin: &str,
    events: Vec<(String, Option<Row>)>,
) -> Result<Reference> {
    let client = group.client(origin).await?;
    let items = client.rows("items")?;
    let mut pipeline = items.pipeline();
    for (key, row) in &events {
        match row {
            Some(row) => pipeline.upsert(key, row).await?,
            None => pipeline.delete(key).await?,
        }
    }
    let published = pipeline.finish().await?;
    ensure!(
        published.len() == events.len(),
        "{origin}: missing acknowledgements"
    );
    let mut reference = Reference::default();
    for ((key, row), p) in events.into_iter().zip(published) {
        ensure!(!p.duplicate, "{origin}: {key} acknowledged as a duplicate");
        reference.record(p.seq, "items", &key, row);
    }
    Ok(reference)
}

fn applied_events(status: &serde_json::Value) -> Result<u64> {
    status["groups"][0]["applied_events"]
        .as_u64()
        .with_context(|| format!("status without groups[0].applied_events: {status}"))
}

#[test]
fn stopped_instance_catches_up_exactly() -> Result<()> {
    let _heavy = heavy();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(downtime())
}

async fn downtime() -> Result<()> {
    let started = Instant::now();
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(server.url(), STREAM, "down");
    let mut instances = (1..=3)
        .map(|i| Instance::new(&group, root.path(), &format!("d{i}"), SinkKind::Sqlite))
        .collect::<Result<Vec<_>>>()?;
    let (code, _, err) = instances[0].cli(&["provision"])?;
    assert_eq!(code, 0, "provision: {err}");
    for instance in &mut instances {
        instance.start()?;
    }
    let seed: u64 = rand::random();
    eprintln!("downtime: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    // Phase 1: random upserts and deletes while all three run.
    let (mut reference, _) =
        publish_random(group.clone(), "i1", PHASE1_EVENTS, PHASE1_KEYS, rng.gen()).await?;
    let phase1_seq = reference.max_seq();
    assert_eq!(phase1_seq, PHASE1_EVENTS as u64);
    for instance in &mut instances {
        instance.wait_applied(STREAM, phase1_seq, Duration::from_secs(60))?;
    }

    // Stop instance 3 cleanly and note its lifetime applied-events counter.
    let code = instances[2].stop(Duration::from_secs(20))?;
    assert_eq!(
        code,
        0,
        "instance d3 exit code; log:\n{}",
        instances[2].log()
    );
    let before = instances[2].checkpoint(STREAM)?;
    assert_eq!(before.applied, phase1_seq);
    assert_eq!(
        applied_events(&instances[2].status()?)?,
        before.applied_events
    );

    // Phase 2: 5,000 events while instance 3 is down, each on a different row: the stream
    // keeps one event per row (history = 1), so an event on a row written again later would
    // be gone by the time instance 3 returns and it could not apply all 5,000. The phase 1
    // rows get updates and deletes, the rest are new rows (and a few deletes of rows that
    // never existed, which are events all the same).
    let mut events: Vec<(String, Option<Row>)> = Vec::with_capacity(PHASE2_EVENTS);
    for k in 0..PHASE2_EVENTS {
        let key = format!("k{k}");
        let delete_share = if k < PHASE1_KEYS { 0.2 } else { 0.05 };
        let row = (!rng.gen_bool(delete_share)).then(|| random_row(&mut rng, &key));
        events.push((key, row));
    }
    events.shuffle(&mut rng);
    let second_half = events.split_off(PHASE2_EVENTS / 2);
    let p1 = tokio::spawn(publish_events(group.clone(), "i1", events));
    let p2 = tokio::spawn(publish_events(group.clone(), "i2", second_half));
    reference.merge(p1.await??);
    reference.merge(p2.await??);
    let last = reference.max_seq();
    assert_eq!(last, phase1_seq + PHASE2_EVENTS as u64);

    // While it is down, `status` shows the 5,000 events waiting for it.
    let status = instances[2].status()?;
    assert_eq!(
        status["groups"][0]["applied_seq"].as_u64(),
        Some(phase1_seq),
        "{status}"
    );
    assert_eq!(
        status["groups"][0]["stream_last_seq"].as_u64(),
        Some(last),
        "{status}"
    );
    assert_eq!(
        status["groups"][0]["lag"].as_u64(),
        Some(PHASE2_EVENTS as u64),
        "{status}"
    );

    // Restart it and let it catch up.
    instances[2].start()?;
    for instance in &mut instances {
        instance.wait_applied(STREAM, last, Duration::from_secs(120))?;
    }
    eprintln!("downtime: caught up after {:?}", started.elapsed());
    let after = instances[2].checkpoint(STREAM)?;
    assert_eq!(after.applied, last);
    assert_eq!(
        after.applied_events - before.applied_events,
        PHASE2_EVENTS as u64,
        "instance d3 should have applied exactly the {PHASE2_EVENTS} events it missed (before {before:?}, after {after:?}); log:\n{}",
        instances[2].log()
    );
    assert_eq!(
        applied_events(&instances[2].status()?)?,
        after.applied_events
    );

    for instance in &instances {
        assert_sqlite_matches_exactly(instance, &reference, "items", "id")?;
    }
    let first = digest_of(&instances[0])?;
    assert_eq!(first.1, last);
    for instance in &instances[1..] {
        assert_eq!(
            digest_of(instance)?,
            first,
            "digest of {} differs from d1",
            instance.name
        );
    }

    for instance in &mut instances {
        let code = instance.stop(Duration::from_secs(20))?;
        assert_eq!(
            code,
            0,
            "instance {} exit code; log:\n{}",
            instance.name,
            instance.log()
        );
    }
    eprintln!("downtime: done in {:?}", started.elapsed());
    Ok(())
}

#[test]
fn stopped_instance_catches_up_over_compacted_history() -> Result<()> {
    let _heavy = heavy();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(compacted())
}

/// While an instance is down its rows are rewritten many times; the stream keeps only the
/// latest event per row (history = 1), so its first sequence moves past the instance's
/// applied sequence + 1. That is no gap (the stream has no limits): the instance applies
/// exactly the surviving events and ends identical.
async fn compacted() -> Result<()> {
    const STREAM: &str = "DOWNC";
    const KEYS: usize = 300;
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(server.url(), STREAM, "downc");
    let mut instances = (1..=2)
        .map(|i| Instance::new(&group, root.path(), &format!("e{i}"), SinkKind::Sqlite))
        .collect::<Result<Vec<_>>>()?;
    let (code, _, err) = instances[0].cli(&["provision"])?;
    assert_eq!(code, 0, "provision: {err}");
    for instance in &mut instances {
        instance.start()?;
    }
    let seed: u64 = rand::random();
    eprintln!("downtime (compacted): seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let (mut reference, _) = publish_random(group.clone(), "e1", 1_000, KEYS, rng.gen()).await?;
    let phase1_seq = reference.max_seq();
    for instance in &mut instances {
        instance.wait_applied(STREAM, phase1_seq, Duration::from_secs(60))?;
    }
    let code = instances[1].stop(Duration::from_secs(20))?;
    assert_eq!(
        code,
        0,
        "instance e2 exit code; log:\n{}",
        instances[1].log()
    );
    let before = instances[1].checkpoint(STREAM)?;

    // 3,000 events rewriting every row several times (each row once first, then at random,
    // and finally the row of the first of them again): only the last event of each row
    // survives, and the stream's first sequence moves past the instance's applied seq + 1.
    let mut keys: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
    keys.shuffle(&mut rng);
    keys.extend((keys.len()..2_999).map(|_| format!("k{}", rng.gen_range(0..KEYS))));
    keys.push(keys[0].clone());
    let events: Vec<(String, Option<Row>)> = keys
        .into_iter()
        .map(|key| {
            let row = rng
                .gen_bool(UPSERT_SHARE)
                .then(|| random_row(&mut rng, &key));
            (key, row)
        })
        .collect();
    let surviving = KEYS as u64;
    reference.merge(publish_events(group.clone(), "e1", events).await?);
    let last = reference.max_seq();
    assert_eq!(last, phase1_seq + 3_000);
    let status = instances[1].status()?;
    let first = status["groups"][0]["stream_first_seq"]
        .as_u64()
        .with_context(|| format!("{status}"))?;
    assert!(
        first > phase1_seq + 1,
        "the stream should have been compacted past seq {}: {status}",
        phase1_seq + 1
    );

    instances[1].start()?;
    for instance in &mut instances {
        instance.wait_applied(STREAM, last, Duration::from_secs(60))?;
    }
    let after = instances[1].checkpoint(STREAM)?;
    assert_eq!(
        after.applied_events - before.applied_events,
        surviving,
        "instance e2 should have applied exactly the {surviving} surviving events; log:\n{}",
        instances[1].log()
    );
    for instance in &instances {
        assert_sqlite_matches_exactly(instance, &reference, "items", "id")?;
    }
    assert_eq!(digest_of(&instances[1])?, digest_of(&instances[0])?);
    for instance in &mut instances {
        let code = instance.stop(Duration::from_secs(20))?;
        assert_eq!(
            code,
            0,
            "instance {} exit code; log:\n{}",
            instance.name,
            instance.log()
        );
    }
    Ok(())
}
