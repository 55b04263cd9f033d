//! Convergence: three instances apply what two concurrent publishers write (20,000 random
//! upserts and deletes over 1,000 keys) and end with identical tables, equal to the reference
//! built from the publish acknowledgements, and identical digests.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use jetsync::Row;
use jetsync_e2e::{
    assert_sqlite_matches_exactly, heavy, random_row, Group, Instance, Reference, SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, Rng, SeedableRng};

const STREAM: &str = "CONV";
const EVENTS_PER_PUBLISHER: usize = 10_000;
const KEYS: usize = 1_000;
pub(crate) const UPSERT_SHARE: f64 = 0.85;

/// Publishes `n` random upserts/deletes of table `items` pipelined as `origin`; returns the
/// reference built from the acknowledgements and the acknowledged sequences.
pub(crate) async fn publish_random(
    group: Group,
    origin: &str,
    n: usize,
    keys: usize,
    seed: u64,
) -> Result<(Reference, Vec<u64>)> {
    let client = group.client(origin).await?;
    let items = client.rows("items")?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sent: Vec<(String, Option<Row>)> = Vec::with_capacity(n);
    let mut pipeline = items.pipeline();
    for _ in 0..n {
        let key = format!("k{}", rng.gen_range(0..keys));
        if rng.gen_bool(UPSERT_SHARE) {
            let row = random_row(&mut rng, &key);
            pipeline.upsert(&key, &row).await?;
            sent.push((key, Some(row)));
        } else {
            pipeline.delete(&key).await?;
            sent.push((key, None));
        }
    }
    let published = pipeline.finish().await?;
    ensure!(
        published.len() == sent.len(),
        "{origin}: {} acknowledgements for {} publishes",
        published.len(),
        sent.len()
    );
    let mut reference = Reference::default();
    let mut seqs = Vec::with_capacity(n);
    for ((key, row), p) in sent.into_iter().zip(published) {
        ensure!(
            !p.duplicate,
            "{origin}: publish of {key} acknowledged as a duplicate (seq {})",
            p.seq
        );
        reference.record(p.seq, "items", &key, row);
        seqs.push(p.seq);
    }
    Ok((reference, seqs))
}

/// The parts of `digest --json` that must be equal on converged instances.
pub(crate) fn digest_of(instance: &Instance) -> Result<(serde_json::Value, u64)> {
    let digest = instance.digest()?;
    let tables = digest
        .get("tables")
        .cloned()
        .context("digest without tables")?;
    let seq = digest
        .get("applied_seq")
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("digest without applied_seq: {digest}"))?;
    Ok((tables, seq))
}

#[test]
fn three_instances_converge_under_two_concurrent_publishers() -> Result<()> {
    let _heavy = heavy();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(converge())
}

async fn converge() -> Result<()> {
    let started = Instant::now();
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(server.url(), STREAM, "conv");
    let mut instances = (1..=3)
        .map(|i| Instance::new(&group, root.path(), &format!("c{i}"), SinkKind::Sqlite))
        .collect::<Result<Vec<_>>>()?;
    // Different batch sizes, so that the instances split the stream into different
    // transactions and still must end identical.
    for (instance, apply) in instances[1..].iter().zip([
        "[apply]\nbatch_max = 7\n",
        "[apply]\nbatch_max = 100\nbatch_wait_ms = 0\n",
    ]) {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&instance.config_path)?;
        std::io::Write::write_all(&mut file, apply.as_bytes())?;
    }
    let (code, _, err) = instances[0].cli(&["provision"])?;
    assert_eq!(code, 0, "provision: {err}");
    for instance in &mut instances {
        instance.start()?;
    }

    let seed: u64 = rand::random();
    eprintln!("convergence: seed {seed}");
    let p1 = tokio::spawn(publish_random(
        group.clone(),
        "pub-1",
        EVENTS_PER_PUBLISHER,
        KEYS,
        seed,
    ));
    let p2 = tokio::spawn(publish_random(
        group.clone(),
        "pub-2",
        EVENTS_PER_PUBLISHER,
        KEYS,
        seed.wrapping_add(1),
    ));
    let (mut reference, mut seqs) = p1.await??;
    let (other, other_seqs) = p2.await??;
    reference.merge(other);
    seqs.extend(other_seqs);
    seqs.sort_unstable();
    let total = (2 * EVENTS_PER_PUBLISHER) as u64;
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "acknowledged sequences are not 1..={total}"
    );
    assert_eq!(reference.max_seq(), total);
    eprintln!(
        "convergence: published {total} events in {:?}",
        started.elapsed()
    );

    for instance in &mut instances {
        instance.wait_applied(STREAM, total, Duration::from_secs(150))?;
    }
    eprintln!("convergence: all applied after {:?}", started.elapsed());

    let expected_rows = reference.rows("items").len() as u64;
    eprintln!("convergence: {expected_rows} live rows expected");
    let mut digests = Vec::new();
    for instance in &instances {
        assert_sqlite_matches_exactly(instance, &reference, "items", "id")?;
        let (tables, seq) = digest_of(instance)?;
        assert_eq!(seq, total, "instance {} digest applied_seq", instance.name);
        let items = tables
            .as_array()
            .and_then(|t| t.iter().find(|t| t["table"] == "items"))
            .with_context(|| {
                format!("instance {}: no digest of items in {tables}", instance.name)
            })?;
        assert_eq!(
            items["rows"].as_u64(),
            Some(expected_rows),
            "instance {} row count",
            instance.name
        );
        digests.push((instance.name.clone(), tables, seq));
    }
    for (name, tables, seq) in &digests[1..] {
        assert_eq!(
            (tables, seq),
            (&digests[0].1, &digests[0].2),
            "digest of {name} differs from {}",
            digests[0].0
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
    eprintln!("convergence: done in {:?}", started.elapsed());
    Ok(())
}
