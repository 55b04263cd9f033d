//! The apply loop: durable consumer → decode → sink transaction with fence → redb checkpoint →
//! AckAll acknowledgement. One batch in flight at a time.
//!
//! Crash windows (what survives a SIGKILL at each point), for a batch ending at sequence L after
//! the applied sequence S:
//! 1. while pulling or decoding: nothing was written; the restart resumes after S.
//! 2. during the sink transaction: the sink rolls back; nothing of the batch is visible and the
//!    fence is still S; the restart resumes after S.
//! 3. after the sink commit, before the redb commit: rows and fence are at L, redb says S. At
//!    start the engine takes the sink's fence (L) and brings redb to it, so nothing is applied
//!    twice.
//! 4. after the redb commit, before the ack: both say L; the server still thinks the batch is
//!    unacknowledged, so startup reconciliation recreates the consumer at L + 1 (and any
//!    redelivery with seq ≤ L is skipped).
//! 5. after the ack: everything agrees.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use jetsync::Config;

use crate::{
    backoff::Backoff,
    consumer::{self, ConsumerSpec},
    decode::decode,
    offsets::Offsets,
    shutdown::Shutdown,
    Change, EngineError, Sink, SinkError, Stats,
};

/// How often a catching-up engine logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Pull requests expire after this long (heartbeats keep idle pulls honest in between).
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// How long a batch's acknowledgement waits for the server's confirmation before the loop goes
/// on. On a healthy connection it takes well under a millisecond; an ack sent as the connection
/// drops is never answered, and waiting out the whole request timeout (5 s by default) stalled
/// applying after every server restart.
const ACK_CONFIRM_WAIT: Duration = Duration::from_secs(1);

/// The applier engine of one instance and one sync group.
#[derive(Debug)]
pub struct Engine<S> {
    config: Config,
    sink: S,
    stats: Arc<Stats>,
}

/// Runs the engine until `shutdown` completes (finishing the batch in hand) or a permanent
/// error stops it.
pub async fn run<S: Sink>(
    config: Config,
    sink: S,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), EngineError> {
    Engine::new(config, sink).run(shutdown).await
}

impl<S: Sink> Engine<S> {
    /// An engine applying the sync group of `config` into `sink`.
    pub fn new(config: Config, sink: S) -> Engine<S> {
        Engine {
            config,
            sink,
            stats: Arc::new(Stats::default()),
        }
    }

    /// Live counters of this engine (applied sequence, lag, events applied, ...).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` completes or a permanent error occurs. Transient failures (NATS
    /// unreachable or restarting, sink busy) are retried with capped backoff, forever.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), EngineError> {
        let mut shutdown = Shutdown::spawn(shutdown);
        let group = self.config.stream.name.clone();
        let max_backoff = Duration::from_millis(self.config.apply.retry_max_backoff_ms);
        let offsets = Offsets::open(&self.config.redb_path())?;

        // The sink's fence describes the data actually there, so it wins over redb.
        let mut backoff = Backoff::new("reading the sink's fence", max_backoff);
        let fence = loop {
            match self.sink.fence(&group).await {
                Ok(f) => break f,
                Err(e) if e.is_retryable() => {
                    if !backoff.fail(&e, &mut shutdown).await {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        backoff.succeed();
        let checkpoint = offsets.applied(&group)?;
        let applied = match fence {
            Some(fence) => {
                if fence != checkpoint {
                    tracing::info!(
                        fence,
                        checkpoint,
                        "bringing the redb checkpoint to the sink's fence"
                    );
                    offsets.set(&group, fence)?;
                }
                fence
            }
            None => checkpoint,
        };
        self.stats.set_applied(applied);
        tracing::info!(stream = %group, instance = %self.config.instance, applied, "applier starting");

        let Some(client) = self.connect(&mut shutdown, max_backoff).await? else {
            return Ok(());
        };
        let mut state = LoopState {
            offsets,
            applied,
            group,
            spec: ConsumerSpec {
                name: self.config.consumer_name(),
                filter: jetsync::group_filter(&self.config.stream.subject_prefix),
                batch_max: self.config.apply.batch_max,
                ack_wait: Duration::from_millis(self.config.apply.ack_wait_ms),
            },
            progress: Progress::new(applied),
        };
        let mut session_backoff = Backoff::new("consuming the stream", max_backoff);
        while !shutdown.is_requested() {
            match self.session(&client, &mut state, &mut shutdown).await {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::Reset(reason)) => {
                    self.stats.add_consumer_reset();
                    tracing::info!(
                        reason,
                        applied = state.applied,
                        "restarting consumption at applied + 1"
                    );
                    session_backoff.succeed();
                }
                Err(e) if e.is_retryable() => {
                    if !session_backoff.fail(&e, &mut shutdown).await {
                        break;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(applied = state.applied, "applier stopped");
        Ok(())
    }

    /// Connects (retrying while the server is unreachable) and provisions the stream if asked.
    async fn connect(
        &mut self,
        shutdown: &mut Shutdown,
        max_backoff: Duration,
    ) -> Result<Option<jetsync::Client>, EngineError> {
        let mut backoff = Backoff::new("connecting to NATS", max_backoff);
        loop {
            let attempt = async {
                let client = jetsync::Client::connect(&self.config).await?;
                if self.config.stream.provision {
                    client.provision().await?;
                }
                Ok::<_, jetsync::Error>(client)
            };
            match attempt.await {
                Ok(client) => {
                    backoff.succeed();
                    return Ok(Some(client));
                }
                Err(e) if e.is_retryable() => {
                    if !backoff.fail(&e, shutdown).await {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One consumer session: reconcile the durable at applied + 1, then apply batches until
    /// shutdown or an anomaly that calls for a fresh consumer.
    async fn session(
        &mut self,
        client: &jetsync::Client,
        state: &mut LoopState,
        shutdown: &mut Shutdown,
    ) -> Result<SessionEnd, EngineError> {
        let js = client.jetstream();
        let stream_name = &self.config.stream.name;
        let mut stream = match js.get_stream(stream_name).await {
            Ok(s) => s,
            Err(e) => {
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j) if j.error_code().0 == 10059)
                {
                    return Err(EngineError::StreamNotFound {
                        stream: stream_name.clone(),
                    });
                }
                return Err(EngineError::nats("get stream", e));
            }
        };
        let info = stream
            .info()
            .await
            .map_err(|e| EngineError::nats("stream info", e))?
            .clone();
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        if state.applied > last {
            return Err(EngineError::AheadOfStream {
                stream: stream_name.clone(),
                applied: state.applied,
                last,
            });
        }
        // Events may be missing only if the stream has limits; on a compacted stream without
        // limits every row's latest event is still there, so replaying from `first` is exact.
        if first > state.applied + 1 && jetsync::stream_has_limits(&info.config) {
            return Err(EngineError::Gap {
                applied: state.applied,
                first_available: first,
            });
        }
        self.stats
            .observe_stream(last, last.saturating_sub(state.applied));

        let ready = consumer::reconcile(&stream, &state.spec, state.applied).await?;
        let mut expected_cseq = ready.next_consumer_seq;
        let mut messages = ready
            .consumer
            .stream()
            .max_messages_per_batch(state.spec.batch_max)
            .heartbeat(Duration::from_millis(self.config.apply.heartbeat_ms))
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| EngineError::nats("start pulling", e))?;
        let _connected = self.stats.session_started(); // `connected` (readiness) until the session ends
        let batch_wait = Duration::from_millis(self.config.apply.batch_wait_ms);
        let batch_max = state.spec.batch_max;

        loop {
            // Wait for the first message of a batch, or shutdown.
            let first = tokio::select! {
                biased;
                _ = shutdown.requested() => return Ok(SessionEnd::Shutdown),
                next = messages.next() => next,
            };
            let mut batch: Vec<Pulled> = Vec::new();
            let mut anomaly: Option<String> = None;
            match first {
                None => return Ok(SessionEnd::Reset("the pull stream ended".into())),
                Some(Err(e)) => return Ok(SessionEnd::Reset(format!("pull failed: {e}"))),
                Some(Ok(m)) => match Pulled::check(m, &mut expected_cseq) {
                    Ok(p) => batch.push(p),
                    Err(reason) => return Ok(SessionEnd::Reset(reason)),
                },
            }
            // Fill the batch: take what is already buffered without waiting; wait up to
            // `batch_wait` only while the server says more events are pending.
            while batch.len() < batch_max {
                let next = match messages.next().now_or_never() {
                    Some(next) => next,
                    None => {
                        let pending = batch.last().map(|p| p.pending).unwrap_or(0);
                        if pending == 0 || batch_wait.is_zero() {
                            break;
                        }
                        match tokio::time::timeout(batch_wait, messages.next()).await {
                            Ok(next) => next,
                            Err(_) => break,
                        }
                    }
                };
                match next {
                    Some(Ok(m)) => match Pulled::check(m, &mut expected_cseq) {
                        Ok(p) => batch.push(p),
                        Err(reason) => {
                            anomaly = Some(reason);
                            break;
                        }
                    },
                    Some(Err(e)) => {
                        anomaly = Some(format!("pull failed: {e}"));
                        break;
                    }
                    None => {
                        anomaly = Some("the pull stream ended".into());
                        break;
                    }
                }
            }
            self.apply_batch(state, batch, shutdown).await?;
            if let Some(reason) = anomaly {
                return Ok(SessionEnd::Reset(reason));
            }
            if shutdown.is_requested() {
                return Ok(SessionEnd::Shutdown);
            }
        }
    }

    /// Decodes, applies, checkpoints and acknowledges one batch (see the module's crash windows).
    async fn apply_batch(
        &mut self,
        state: &mut LoopState,
        batch: Vec<Pulled>,
        shutdown: &mut Shutdown,
    ) -> Result<(), EngineError> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        let prefix = &self.config.stream.subject_prefix;
        let mut changes: Vec<Change> = Vec::with_capacity(batch.len());
        let mut last_seq = state.applied;
        for p in &batch {
            // Already applied (a redelivery, or a crash between commit and ack): skip, but the
            // final ack still covers it.
            if p.stream_seq <= last_seq {
                continue;
            }
            match decode(prefix, p.stream_seq, &p.message) {
                Ok(change) => changes.push(change),
                Err(reason) => {
                    return Err(EngineError::Poison {
                        seq: p.stream_seq,
                        subject: p.message.subject.to_string(),
                        reason,
                    })
                }
            }
            last_seq = p.stream_seq;
        }
        let pending = last.pending;
        self.stats
            .observe_stream(last.stream_seq + pending, pending);

        if last_seq > state.applied {
            // Crash window 2: the sink transaction is all-or-nothing.
            let started = Instant::now();
            let mut backoff = Backoff::new(
                "applying to the sink",
                Duration::from_millis(self.config.apply.retry_max_backoff_ms),
            );
            let mut last_progress_ack = Instant::now();
            loop {
                match self.sink.apply(&state.group, &changes, last_seq).await {
                    Ok(()) => break,
                    Err(e @ SinkError::Unavailable { .. }) => {
                        // Keep the server from redelivering the batch while the sink is away.
                        if last_progress_ack.elapsed()
                            >= Duration::from_millis(self.config.apply.ack_wait_ms / 3)
                        {
                            for p in &batch {
                                let _ = p.message.ack_with(AckKind::Progress).await;
                            }
                            last_progress_ack = Instant::now();
                        }
                        // Shutdown does not abandon the batch in hand: keep retrying, but stop
                        // once asked to (nothing was applied, so nothing is lost).
                        if !backoff.fail(&e, shutdown).await {
                            return Ok(());
                        }
                    }
                    Err(SinkError::Rejected {
                        seq,
                        table,
                        key,
                        reason,
                        ..
                    }) => {
                        return Err(EngineError::Poison {
                            seq,
                            subject: format!("{table}/{key}"),
                            reason,
                        })
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            backoff.succeed();
            // Crash window 3: the sink holds L, redb still says S; startup takes the fence.
            state
                .offsets
                .commit(&state.group, last_seq, changes.len() as u64)?;
            state.applied = last_seq;
            self.stats.set_applied(last_seq);
            self.stats.add_batch(&changes, started.elapsed());
            tracing::debug!(
                first_seq = changes.first().map(|c| c.seq).unwrap_or(last_seq),
                last_seq,
                n = changes.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "batch applied"
            );
        }
        // Crash window 4: applied and checkpointed, not yet acknowledged.
        // An unconfirmed ack is harmless: the next batch's AckAll covers this one, and a restart
        // recreates the consumer anyway. So the wait for the confirmation is bounded.
        match tokio::time::timeout(ACK_CONFIRM_WAIT, last.message.double_ack()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, seq = last.stream_seq, "acknowledgement not confirmed")
            }
            Err(_) => tracing::debug!(
                seq = last.stream_seq,
                "acknowledgement not confirmed within {ACK_CONFIRM_WAIT:?}; going on"
            ),
        }
        state.progress.maybe_log(state.applied, pending);
        Ok(())
    }
}

/// Mutable state of the apply loop that outlives consumer sessions.
struct LoopState {
    offsets: Offsets,
    applied: u64,
    group: String,
    spec: ConsumerSpec,
    progress: Progress,
}

enum SessionEnd {
    Shutdown,
    /// Recreate the consumer at applied + 1 (a lost delivery, a broken pull stream).
    Reset(String),
}

/// A delivered message with its parsed delivery metadata.
struct Pulled {
    message: jetstream::Message,
    stream_seq: u64,
    pending: u64,
}

impl Pulled {
    /// Checks the delivery's consumer sequence against the expected one. The server numbers
    /// every delivery of a consumer, redeliveries included, with the next consumer sequence, so
    /// anything but `expected` means its view of this consumer and ours diverged, and nothing
    /// past that point may be applied or acknowledged (the session ends and the consumer is
    /// recreated at applied + 1):
    /// - a jump: a delivery was lost in transit (reconnect, server restart); the next AckAll
    ///   would acknowledge it although it was never applied.
    /// - a step back: the server lost the tail of its consumer state and delivers again under
    ///   sequences we already saw. A kill -9 of the server does this: its file store writes
    ///   consumer state at most every 100 ms. The same consumer sequence then need not carry
    ///   the same event as before (on a compacted stream the events in between were superseded
    ///   and removed meanwhile), so skipping "already seen" sequences would skip new events
    ///   for good; and a consumer that delivers fewer events than before never reaches the
    ///   expected sequence again, so waiting for it would stall the applier forever.
    fn check(message: jetstream::Message, expected_cseq: &mut u64) -> Result<Pulled, String> {
        let info = message
            .info()
            .map_err(|e| format!("unparseable delivery metadata: {e}"))?;
        let (cseq, stream_seq, pending) =
            (info.consumer_sequence, info.stream_sequence, info.pending);
        check_consumer_seq(cseq, stream_seq, *expected_cseq)?;
        *expected_cseq += 1;
        Ok(Pulled {
            message,
            stream_seq,
            pending,
        })
    }
}

/// The consumer-sequence rule of [`Pulled::check`]: a delivery must carry exactly `expected`.
fn check_consumer_seq(cseq: u64, stream_seq: u64, expected: u64) -> Result<(), String> {
    if cseq > expected {
        return Err(format!(
            "delivery {expected} of the consumer went missing (got {cseq}, stream seq {stream_seq})"
        ));
    }
    if cseq < expected {
        return Err(format!(
            "the server delivered consumer sequence {cseq} (stream seq {stream_seq}) again, expecting {expected}: it lost part of the consumer's state (restarted?)"
        ));
    }
    Ok(())
}

/// Progress logs while catching up on a backlog.
struct Progress {
    last_log: Instant,
    last_applied: u64,
}

impl Progress {
    fn new(applied: u64) -> Progress {
        Progress {
            last_log: Instant::now(),
            last_applied: applied,
        }
    }

    fn maybe_log(&mut self, applied: u64, remaining: u64) {
        let elapsed = self.last_log.elapsed();
        if elapsed < PROGRESS_EVERY {
            return;
        }
        let rate = (applied - self.last_applied) as f64 / elapsed.as_secs_f64();
        if remaining > 0 {
            let eta_s = if rate > 0.0 {
                remaining as f64 / rate
            } else {
                f64::INFINITY
            };
            tracing::info!(
                applied,
                remaining,
                events_per_s = rate.round() as u64,
                eta_s = eta_s.round(),
                "catching up"
            );
        }
        self.last_log = Instant::now();
        self.last_applied = applied;
    }
}

#[cfg(test)]
mod tests {
    use super::check_consumer_seq;

    #[test]
    fn only_the_expected_consumer_sequence_is_accepted() {
        assert!(check_consumer_seq(7, 40, 7).is_ok());
        // A jump: delivery 7 was lost in transit.
        let hole = check_consumer_seq(8, 41, 7).unwrap_err();
        assert!(
            hole.contains("delivery 7 of the consumer went missing"),
            "{hole}"
        );
        // A step back: the server lost consumer state; consumer sequence 5 may now carry an
        // event never seen before (stream seq 41 here), so it must not be skipped as stale.
        let back = check_consumer_seq(5, 41, 7).unwrap_err();
        assert!(back.contains("lost part of the consumer's state"), "{back}");
    }
}
