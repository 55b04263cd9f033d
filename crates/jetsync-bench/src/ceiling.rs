//! Sink ceilings: the replay backlog's changes written straight into each sink, no NATS, the
//! same batch size as the engine's, decoded in advance (each batch is built before its clock
//! starts). The rate counts only the time inside the writes.
//!
//! Two kinds: through the sink's own [`Sink`] implementation (`Sink::apply`, exactly what the
//! engine calls), and, for SQLite, the plainest fast path (`plain_sqlite`: a prepared upsert,
//! one transaction per batch with the offset, the sink's settings). The SQLite ceiling the
//! targets use is the higher of the two: what the database absorbs, not what one
//! implementation of the sink manages.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use jetsync_applier::{Change, Sink};

use crate::{
    harness, plain_sqlite,
    workload::{self, Draws, TABLE},
};

/// The next `n` changes of `draws`, sequences `first..first + n`.
fn next_changes(draws: &mut Draws, first: u64, n: u64) -> Vec<Change> {
    (0..n)
        .zip(draws)
        .map(|(k, (i, version))| Change {
            seq: first + k,
            table: TABLE.to_owned(),
            key: workload::key(i),
            op: jetsync::Change::Upsert(workload::row(i, version)),
        })
        .collect()
}

/// A sink ceiling.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ceiling {
    /// Events per second of time inside `apply`.
    pub(crate) eps: f64,
    /// CPU time per event (µs) of this process for the writes, every thread of the sink (e.g.
    /// SQLite's checkpoint thread) included, building the changes excluded.
    pub(crate) cpu_us: Option<f64>,
}

/// Writes `events` changes of `draws` into `sink` as group `group`, `batch` per `apply`.
pub(crate) async fn through_sink<S: Sink>(
    sink: &mut S,
    group: &str,
    draws: Draws,
    events: u64,
    batch: usize,
) -> anyhow::Result<Ceiling> {
    // The CPU of building (and dropping) the changes alone, taken off below.
    let building = harness::CpuMark::own();
    let mut dry = draws.clone();
    let mut next = 1u64;
    while next <= events {
        let n = (batch as u64).min(events + 1 - next);
        drop(std::hint::black_box(next_changes(&mut dry, next, n)));
        next += n;
    }
    let building_us = building.us_per_event(events).unwrap_or(0.0);
    let cpu = harness::CpuMark::own();
    let eps = write_through(sink, group, draws, events, batch).await?;
    let cpu_us = cpu
        .us_per_event(events)
        .map(|us| (us - building_us).max(0.0));
    Ok(Ceiling { eps, cpu_us })
}

/// [`through_sink`]'s writes; returns events per second of time inside `apply`.
async fn write_through<S: Sink>(
    sink: &mut S,
    group: &str,
    mut draws: Draws,
    events: u64,
    batch: usize,
) -> anyhow::Result<f64> {
    let mut busy = Duration::ZERO;
    let mut next = 1u64;
    while next <= events {
        let n = (batch as u64).min(events + 1 - next);
        let changes = next_changes(&mut draws, next, n);
        next += n;
        let started = Instant::now();
        sink.apply(group, &changes, next - 1)
            .await
            .with_context(|| format!("Sink::apply up to seq {}", next - 1))?;
        busy += started.elapsed();
    }
    Ok(harness::eps(events, busy))
}

/// The SQLite fast path: `plain_sqlite` into a fresh file at `path`, `batch` rows per
/// transaction; returns events per second of time inside the transactions.
pub(crate) fn plain_sqlite(
    path: &std::path::Path,
    mut draws: Draws,
    events: u64,
    batch: usize,
) -> anyhow::Result<f64> {
    let mut conn = plain_sqlite::open(path)?;
    let mut busy = Duration::ZERO;
    let mut next = 1u64;
    while next <= events {
        let n = (batch as u64).min(events + 1 - next);
        let items = (0..n)
            .zip(&mut draws)
            .map(|(_, (i, version))| plain_sqlite::Item::from_row(&workload::row(i, version)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        next += n;
        let started = Instant::now();
        plain_sqlite::write_batch(&mut conn, &items, "ceiling", next - 1)?;
        busy += started.elapsed();
    }
    Ok(harness::eps(events, busy))
}
