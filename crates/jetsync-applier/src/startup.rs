//! The start-up part of a run: where the engine resumes (the sink's fence, or the redb
//! checkpoint for a sink without one) and whether the sink is empty (a snapshot bootstrap).

use std::time::Duration;

use crate::{backoff::Backoff, offsets::Offsets, shutdown::Shutdown, EngineError, Sink};

/// The sequence to resume after: the sink's fence where it keeps one (it describes the data
/// actually there, so it wins over redb, which is brought to it), else the redb checkpoint.
/// `None` when shutdown interrupted the wait for the sink.
pub(crate) async fn start_point<S: Sink>(
    sink: &mut S,
    offsets: &Offsets,
    group: &str,
    max_backoff: Duration,
    shutdown: &mut Shutdown,
) -> Result<Option<u64>, EngineError> {
    Ok(
        start_point_and_fence(sink, offsets, group, max_backoff, shutdown)
            .await?
            .map(|(applied, _)| applied),
    )
}

/// [`start_point`], and whether the sink keeps a fence.
pub(crate) async fn start_point_and_fence<S: Sink>(
    sink: &mut S,
    offsets: &Offsets,
    group: &str,
    max_backoff: Duration,
    shutdown: &mut Shutdown,
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
    Ok(Some(match fence {
        Some(fence) => {
            if fence != checkpoint {
                tracing::info!(
                    fence,
                    checkpoint,
                    "bringing the redb checkpoint to the sink's fence"
                );
                offsets.set(group, fence)?;
            }
            (fence, true)
        }
        None => (checkpoint, false),
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
