//! Snapshots: the latest event of every row of a sync group, read through an ordered consumer
//! with `DeliverPolicy::LastPerSubject`.
//!
//! The server delivers a last-per-subject consumer's events in ascending stream order: first the
//! latest event of every subject as of the consumer's creation, then anything published since.
//! Applying any *prefix* of that delivery up to sequence H and then every event after H gives
//! exactly the state of applying the whole stream: a row whose latest event is ≤ H was delivered
//! (its latest event is in the prefix), and a row with events after H gets them from the durable
//! consumer that continues at H + 1. So a snapshot may stop anywhere (a crash, a shutdown, the
//! consumer being recreated by the client) and still be correct; it ends when the server reports
//! nothing pending.

use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    consumer::{pull::OrderedConfig, DeliverPolicy},
};
use futures::{FutureExt, StreamExt};

use crate::EngineError;

/// How long a snapshot waits for the next event the server said is pending before giving up
/// (the caller retries the snapshot from the start or from where it got).
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A snapshot being read.
pub(crate) struct Snapshot {
    messages: Option<jetstream::consumer::pull::Ordered>,
    /// Rows the server reported when the snapshot started (for progress displays).
    total: u64,
    delivered: u64,
    /// The highest sequence delivered so far, or the stream's last sequence for an empty stream.
    last_seq: u64,
    /// The stream's last sequence when the snapshot started: once delivery reaches it the
    /// snapshot is complete even if publishers keep the server's pending count above zero.
    stop_at: u64,
    done: bool,
}

impl Snapshot {
    /// Starts a snapshot of stream `stream_name`, subjects `filter`.
    pub(crate) async fn start(
        js: &jetstream::Context,
        stream_name: &str,
        filter: &str,
    ) -> Result<Snapshot, EngineError> {
        let mut stream = js
            .get_stream(stream_name)
            .await
            .map_err(|e| EngineError::nats("get stream (snapshot)", e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| EngineError::nats("stream info (snapshot)", e))?
            .clone();
        if info.state.messages == 0 {
            // Nothing stored: every event up to the stream's last sequence is gone, for every
            // instance alike; the snapshot is empty and ends there. Anything published from now
            // on comes after that sequence.
            return Ok(Snapshot {
                messages: None,
                total: 0,
                delivered: 0,
                last_seq: info.state.last_sequence,
                stop_at: info.state.last_sequence,
                done: true,
            });
        }
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| EngineError::nats("create the snapshot consumer", e))?;
        let total = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| EngineError::nats("start the snapshot", e))?;
        Ok(Snapshot {
            messages: Some(messages),
            total,
            delivered: 0,
            last_seq: 0,
            stop_at: info.state.last_sequence,
            done: false,
        })
    }

    /// Rows the server reported at the start.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Events delivered so far.
    pub(crate) fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The sequence the snapshot covers so far: applying what was delivered and then every
    /// event after this sequence gives the stream's state.
    pub(crate) fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The next batch of at most `max` events, ascending; `None` once the snapshot is complete.
    pub(crate) async fn next_batch(
        &mut self,
        max: usize,
    ) -> Result<Option<Vec<(u64, jetstream::Message)>>, EngineError> {
        if self.done {
            return Ok(None);
        }
        let Some(messages) = self.messages.as_mut() else {
            self.done = true;
            return Ok(None);
        };
        let mut batch = Vec::new();
        let started = Instant::now();
        while batch.len() < max {
            let next = if batch.is_empty() {
                match tokio::time::timeout(STALL_TIMEOUT, messages.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        return Err(EngineError::nats(
                            "read the snapshot",
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!(
                                    "no event within {STALL_TIMEOUT:?} although the server reported more (after {} of {} rows)",
                                    self.delivered, self.total
                                ),
                            ),
                        ))
                    }
                }
            } else {
                match messages.next().now_or_never() {
                    Some(next) => next,
                    None if started.elapsed() < Duration::from_millis(50) => {
                        match tokio::time::timeout(Duration::from_millis(5), messages.next()).await
                        {
                            Ok(next) => next,
                            Err(_) => break,
                        }
                    }
                    None => break,
                }
            };
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(EngineError::nats("read the snapshot", e)),
                None => {
                    return Err(EngineError::nats(
                        "read the snapshot",
                        std::io::Error::other("the snapshot consumer ended"),
                    ))
                }
            };
            let info = message.info().map_err(|e| {
                EngineError::nats(
                    "read the snapshot's delivery metadata",
                    std::io::Error::other(e.to_string()),
                )
            })?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq <= self.last_seq {
                // Never expected (deliveries ascend); ignoring keeps the prefix rule intact.
                continue;
            }
            self.last_seq = seq;
            self.delivered += 1;
            batch.push((seq, message));
            if pending == 0 || seq >= self.stop_at {
                self.done = true;
                break;
            }
        }
        if self.done {
            // Dropping the ordered consumer's stream lets the server remove it (inactive
            // threshold); nothing else holds it.
            self.messages = None;
        }
        Ok(Some(batch))
    }
}
