//! The start-up part of a run: where the engine resumes (the sink's fence, or the redb
//! checkpoint for a sink without one) and whether the sink is empty (a snapshot bootstrap).

use std::time::Duration;

use crate::{
    backoff::Backoff,
    offsets::{Offsets, OffsetsError},
    shutdown::Shutdown,
    EngineError, Sink,
};

/// What to do with a checkpoint store that knows nothing of the group while the sink's fence is
/// above 0 (a lost `data_dir`: the parked and held events are gone with it).
#[derive(Debug, Clone)]
pub(crate) enum NewStore {
    /// Refuse to start ([`OffsetsError::Lost`]), naming the sink (its file or kind): `run` and
    /// `parked retry`.
    Refuse(String),
    /// Accept it: `resync` rebuilds the tables and the parked events from a snapshot.
    Adopt,
}

/// How a sink is named in messages: its file, else its kind.
pub(crate) fn sink_description(config: &jetsync::Config) -> String {
    match config.sink_path() {
        Some(path) => path.display().to_string(),
        None => format!("{:?} sink", config.sink.kind).to_lowercase(),
    }
}

/// The sequence to resume after: the sink's fence where it keeps one (it describes the data
/// actually there, so it wins over redb, which is brought to it), else the redb checkpoint.
/// `None` when shutdown interrupted the wait for the sink.
pub(crate) async fn start_point<S: Sink>(
    sink: &mut S,
    offsets: &Offsets,
    group: &str,
    max_backoff: Duration,
    shutdown: &mut Shutdown,
    new_store: NewStore,
) -> Result<Option<u64>, EngineError> {
    Ok(
        start_point_and_fence(sink, offsets, group, max_backoff, shutdown, new_store)
            .await?
            .map(|(applied, _)| applied),
    )
}

/// [`start_point`], and whether the sink keeps a fence.
///
/// The store is made to know the group (its applied sequence is committed, 0 on a first start)
/// before anything can be applied, so that a store without it beside a sink whose fence is above
/// 0 can only be a lost or replaced `data_dir` (see [`NewStore`]).
pub(crate) async fn start_point_and_fence<S: Sink>(
    sink: &mut S,
    offsets: &Offsets,
    group: &str,
    max_backoff: Duration,
    shutdown: &mut Shutdown,
    new_store: NewStore,
) -> Result<Option<(u64, bool)>, EngineError> {
    let mut backoff = Backoff::new("reading the sink's fence", max_backoff);
    let fence = loop {
        match sink.fence(group).await {
            Ok(f) => break f,
            Err(e) if e.is_retryable() => {
                if !backoff.fail(&e, shutdown).await {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    backoff.succeed();
    let checkpoint = offsets.applied(group)?;
    let known = offsets.knows(group)?;
    if let (false, Some(fence @ 1..), NewStore::Refuse(sink)) = (known, fence, &new_store) {
        return Err(OffsetsError::Lost {
            path: offsets.path().to_owned(),
            group: group.to_owned(),
            fence,
            sink: sink.clone(),
        }
        .into());
    }
    Ok(Some(match fence {
        Some(fence) => {
            if fence != checkpoint || !known {
                tracing::info!(
                    fence,
                    checkpoint,
                    "bringing the redb checkpoint to the sink's fence"
                );
                offsets.set(group, fence)?;
            }
            (fence, true)
        }
        None => {
            if !known {
                offsets.set(group, checkpoint)?;
            }
            (checkpoint, false)
        }
    }))
}

pub(crate) async fn sink_is_empty<S: Sink>(
    sink: &mut S,
    max_backoff: Duration,
    shutdown: &mut Shutdown,
) -> Result<Option<bool>, EngineError> {
    let mut backoff = Backoff::new("inspecting the sink", max_backoff);
    loop {
        match sink.is_empty().await {
            Ok(empty) => return Ok(Some(empty)),
            Err(e) if e.is_retryable() => {
                if !backoff.fail(&e, shutdown).await {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RedbOptions, RedbSink};

    /// A lost data_dir (a new checkpoint store beside a sink that applied events) is refused,
    /// naming both; `resync` adopts it; a store that was used is never refused.
    #[tokio::test]
    async fn a_new_store_beside_an_applied_sink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = RedbSink::open(RedbOptions::new(dir.path().join("r.redb"))).unwrap();
        let mut shutdown = Shutdown::spawn(std::future::pending());
        let max = Duration::from_millis(100);
        let refuse = || NewStore::Refuse("r.redb".into());

        // First start: fence 0, new store → accepted, and the store learns the group.
        let offsets = Offsets::open(&dir.path().join("a.redb")).unwrap();
        let start = start_point_and_fence(&mut sink, &offsets, "G", max, &mut shutdown, refuse())
            .await
            .unwrap();
        assert_eq!(start, Some((0, true)));
        assert!(offsets.knows("G").unwrap());
        sink.apply("G", &[], 9).await.unwrap();
        let start = start_point_and_fence(&mut sink, &offsets, "G", max, &mut shutdown, refuse())
            .await
            .unwrap();
        assert_eq!(start, Some((9, true)));

        // data_dir lost: a new store beside fence 9.
        let lost = Offsets::open(&dir.path().join("b.redb")).unwrap();
        let err = start_point_and_fence(&mut sink, &lost, "G", max, &mut shutdown, refuse())
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("b.redb") && message.contains("r.redb"),
            "{message}"
        );
        assert!(message.contains("resync"), "{message}");
        assert!(!lost.knows("G").unwrap(), "a refusal records nothing");
        // `resync` adopts it.
        let start =
            start_point_and_fence(&mut sink, &lost, "G", max, &mut shutdown, NewStore::Adopt)
                .await
                .unwrap();
        assert_eq!(start, Some((9, true)));
        assert!(lost.knows("G").unwrap());
    }
}
