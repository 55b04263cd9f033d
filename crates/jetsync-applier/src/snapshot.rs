//! Snapshots: the latest event of every row of a sync group, read through an ephemeral pull
//! consumer with `DeliverPolicy::LastPerSubject` and no acknowledgements.
//!
//! The consumer is named after the instance (`jetsync-snapshot_<instance>`, see
//! [`snapshot_name`]), so a
//! least-privilege applier user needs rights on that one extra name only (nats-config's
//! accounts.conf), and a leftover of an interrupted run is deleted before a new one is created
//! (reusing it would resume its delivery instead of starting the snapshot over). Any delivery
//! anomaly (a consumer-sequence jump, the pull stream failing) ends the snapshot with an error;
//! the caller starts a new one, which is safe for the reason below.
//!
//! The server delivers a last-per-subject consumer's events in ascending stream order: first the
//! latest event of every subject as of the consumer's creation, then anything published since.
//! Applying any *prefix* of that delivery up to sequence H and then every event after H gives
//! exactly the state of applying the whole stream: a row whose latest event is ≤ H was delivered
//! (its latest event is in the prefix), and a row with events after H gets them from the durable
//! consumer that continues at H + 1. So a snapshot may stop anywhere (a crash, a shutdown, the
//! consumer being recreated by the client) and still be correct; it ends when the server reports
//! nothing pending.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
};
use futures::{FutureExt, StreamExt};

use jetsync::Config;

use crate::{delivery::Delivery, shutdown::Shutdown, txn, EngineError};

/// How long a snapshot waits for the next event the server said is pending before giving up
/// (the caller retries the snapshot from the start or from where it got).
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle heartbeat of the snapshot's pulls.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// The server removes an abandoned snapshot consumer after this long without pulls.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(60);

/// Starts a snapshot of `config`'s sync group through its consumer [`snapshot_name`].
pub(crate) async fn start_snapshot(
    js: &jetstream::Context,
    config: &Config,
) -> Result<Snapshot, EngineError> {
    Snapshot::start(
        js,
        &config.stream.name,
        &jetsync::group_filter(&config.stream.subject_prefix),
        &snapshot_name(config),
    )
    .await
}

/// The snapshot consumer's name: `jetsync-snapshot_<instance>` (the instance sanitised as for
/// the durable). Every durable is `jetsync_<instance>` with `_` as its 8th character, so this
/// name (`-` there) can never be another instance's durable; `<durable>_snapshot` could
/// (instance `a`'s snapshot was instance `a_snapshot`'s durable).
pub(crate) fn snapshot_name(config: &Config) -> String {
    let durable = config.consumer_name();
    let instance = durable.strip_prefix("jetsync_").unwrap_or(&durable);
    format!("jetsync-snapshot_{instance}")
}

/// A snapshot being read.
pub(crate) struct Snapshot {
    stream: jetstream::stream::Stream,
    name: String,
    messages: Option<pull::Stream>,
    /// The consumer sequence the next delivery must carry.
    next_cseq: u64,
    /// Rows the server reported when the snapshot started (for progress displays).
    total: u64,
    delivered: u64,
    /// The highest sequence delivered so far, or the stream's last sequence for an empty stream.
    last_seq: u64,
    /// The stream's last sequence right after the consumer was created: every event of the
    /// snapshot's set is at or below it, so once delivery reaches it the snapshot is complete
    /// even if the server's pending count says otherwise (2.9 can overcount it for
    /// last-per-subject consumers while events arrive).
    stop_at: u64,
    done: bool,
    /// A delivery that completed the previous batch's last transaction and starts the next.
    carry: Option<(u64, Delivery, u64)>,
}

impl Snapshot {
    /// Starts a snapshot of stream `stream_name`, subjects `filter`, through a consumer named
    /// `name`.
    pub(crate) async fn start(
        js: &jetstream::Context,
        stream_name: &str,
        filter: &str,
        name: &str,
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
                stream,
                name: name.to_owned(),
                messages: None,
                next_cseq: 1,
                total: 0,
                delivered: 0,
                last_seq: info.state.last_sequence,
                stop_at: info.state.last_sequence,
                done: true,
                carry: None,
            });
        }
        // A leftover of an interrupted snapshot would resume where it stopped: remove it.
        let _ = stream.delete_consumer(name).await;
        let consumer = stream
            .create_consumer(pull::Config {
                name: Some(name.to_owned()),
                filter_subject: filter.to_owned(),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ack_policy: AckPolicy::None,
                max_deliver: 1,
                inactive_threshold: INACTIVE_THRESHOLD,
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| EngineError::nats("create the snapshot consumer", e))?;
        let total = consumer.cached_info().num_pending;
        let stop_at = stream
            .info()
            .await
            .map_err(|e| EngineError::nats("stream info (snapshot)", e))?
            .state
            .last_sequence;
        let messages = consumer
            .stream()
            .max_messages_per_batch(1000)
            .heartbeat(HEARTBEAT)
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| EngineError::nats("start the snapshot", e))?;
        Ok(Snapshot {
            stream,
            name: name.to_owned(),
            messages: Some(messages),
            next_cseq: 1,
            total,
            delivered: 0,
            last_seq: 0,
            stop_at,
            done: false,
            carry: None,
        })
    }

    /// The stream's last sequence when the snapshot started (where it ends at the latest).
    pub(crate) fn stop_at(&self) -> u64 {
        self.stop_at
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
    /// Returns an empty batch when `shutdown` was requested while waiting.
    pub(crate) async fn next_batch(
        &mut self,
        max: usize,
        shutdown: &mut Shutdown,
    ) -> Result<Option<Vec<(u64, Delivery)>>, EngineError> {
        if self.done {
            return Ok(None);
        }
        let Some(messages) = self.messages.as_mut() else {
            self.done = true;
            return Ok(None);
        };
        let mut batch = Vec::new();
        let last_before = self.last_seq;
        if let Some((seq, message, pending)) = self.carry.take() {
            self.last_seq = seq;
            self.delivered += 1;
            batch.push((seq, message));
            self.done = pending == 0 || seq >= self.stop_at;
        }
        while !self.done && batch.len() < max {
            let next = if batch.is_empty() {
                let next = tokio::select! {
                    _ = shutdown.requested() => return Ok(Some(batch)),
                    next = tokio::time::timeout(STALL_TIMEOUT, messages.next()) => next,
                };
                match next {
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
                // The server said more of the snapshot is pending: a batch is filled up to `max`
                // (or the snapshot's end) rather than cut at a pause in delivery, so a snapshot of
                // at most `max` rows is always applied in one sink transaction, never visible
                // in parts.
                match messages.next().now_or_never() {
                    Some(next) => next,
                    None => match tokio::time::timeout(STALL_TIMEOUT, messages.next()).await {
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
                    },
                }
            };
            let (message, seq, pending) = Snapshot::checked(&mut self.next_cseq, next)?;
            if seq <= self.last_seq {
                // Never expected (deliveries ascend); ignoring keeps the prefix rule intact.
                continue;
            }
            self.last_seq = seq;
            self.delivered += 1;
            batch.push((seq, message));
            // Complete once the server has nothing more pending, or once delivery reached the
            // stream's last sequence as of the consumer's creation (the whole set is delivered
            // then). Stopping before the whole set is delivered would be a valid prefix too, but
            // the events right after it may be superseded and removed by the time the durable
            // starts there, which a stream with limits cannot tell from a gap.
            if pending == 0 || seq >= self.stop_at {
                self.done = true;
                break;
            }
        }
        if !self.finish_transaction(&mut batch, shutdown).await? {
            // Shutdown: the open transaction is left out; the batch ends before it.
            self.last_seq = batch.last().map(|e| e.0).unwrap_or(last_before);
            return Ok(Some(batch));
        }
        if self.done && self.messages.take().is_some() {
            // Done with it; the inactive threshold would remove it too.
            let _ = self.stream.delete_consumer(&self.name).await;
        }
        Ok(Some(batch))
    }
}

impl Snapshot {
    /// A delivery of the snapshot consumer with its stream sequence and pending count, after
    /// checking that it carries the next consumer sequence (any anomaly ends the snapshot with
    /// an error; the caller starts a new one).
    fn checked(
        next_cseq: &mut u64,
        next: Option<Result<jetstream::Message, pull::MessagesError>>,
    ) -> Result<(Delivery, u64, u64), EngineError> {
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
        if info.consumer_sequence != *next_cseq {
            return Err(EngineError::nats(
                "read the snapshot",
                std::io::Error::other(format!(
                    "delivery {} of the snapshot went missing (got {}); starting over",
                    next_cseq, info.consumer_sequence
                )),
            ));
        }
        *next_cseq += 1;
        let (seq, pending) = (info.stream_sequence, info.pending);
        // The compact form (see `delivery.rs`): an ordered consumer is never acknowledged.
        let mut delivery = Delivery::of(message.message);
        delivery.reply = None;
        Ok((delivery, seq, pending))
    }

    /// Stretches `batch` to the end of the transaction its last event leaves open (a
    /// transaction is applied whole, see `txn.rs`), reading on past the snapshot's end if need
    /// be (the consumer keeps delivering what is published after it started: any prefix of its
    /// delivery is a valid snapshot). A message outside the open transaction completes it and
    /// starts the next batch (or, once the snapshot is done, is left to the durable consumer).
    /// Returns false on shutdown.
    async fn finish_transaction(
        &mut self,
        batch: &mut Vec<(u64, Delivery)>,
        shutdown: &mut Shutdown,
    ) -> Result<bool, EngineError> {
        let Some(open) = txn::open_tail(&txn::tags(batch.iter().map(|(_, m)| m))) else {
            return Ok(true);
        };
        let Some(messages) = self.messages.as_mut() else {
            return Ok(true);
        };
        let id = batch[open].1.batch_id().unwrap_or_default().to_owned();
        let mut added = 0usize;
        loop {
            if added >= txn::MAX_STRETCH {
                tracing::warn!(txn = %id, "transaction too large to apply in one sink transaction; applying it in parts");
                return Ok(true);
            }
            let next = tokio::select! {
                _ = shutdown.requested() => {
                    batch.truncate(open);
                    return Ok(false);
                }
                next = tokio::time::timeout(txn::OPEN_TIMEOUT, messages.next()) => next,
            };
            let next = match next {
                Err(_) => {
                    tracing::warn!(
                        txn = %id,
                        "transaction without a commit and nothing after it for {:?}: applying its stored members",
                        txn::OPEN_TIMEOUT
                    );
                    return Ok(true);
                }
                Ok(next) => next,
            };
            let (message, seq, pending) = Snapshot::checked(&mut self.next_cseq, next)?;
            if seq <= self.last_seq {
                continue;
            }
            if message.batch_id() != Some(id.as_str()) {
                if !self.done {
                    self.carry = Some((seq, message, pending));
                }
                return Ok(true);
            }
            let commit = message.tag().is_some_and(|t| t.commit);
            self.last_seq = seq;
            self.delivered += 1;
            added += 1;
            batch.push((seq, message));
            if commit {
                return Ok(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::snapshot_name;

    #[test]
    fn the_snapshot_name_is_never_a_durable() {
        let config = |instance: &str| jetsync::Config {
            instance: instance.to_owned(),
            ..jetsync::Config::default()
        };
        assert_eq!(snapshot_name(&config("a")), "jetsync-snapshot_a");
        // Instance `a`'s snapshot and instance `a_snapshot`'s durable used to be one name.
        assert_ne!(
            snapshot_name(&config("a")),
            config("a_snapshot").consumer_name()
        );
        for instance in ["a", "a_snapshot", "snapshot_a", "-snapshot_a", "x.y"] {
            let name = snapshot_name(&config(instance));
            assert!(!name.starts_with("jetsync_"), "{name}");
            assert!(config(instance).consumer_name().starts_with("jetsync_"));
        }
    }
}
