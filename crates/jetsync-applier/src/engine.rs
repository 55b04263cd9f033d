//! The apply loop: durable consumer → receive, check and cut into batches (the fetcher task,
//! `fetch.rs`) → decode → sink transaction with fence → redb checkpoint → AckAll
//! acknowledgement (this task). The two halves overlap: while this task applies batch N (ending
//! at sequence L), the fetcher receives batch N+1 (ending at L₂ > L); at most these two batches
//! are in flight. Only this task writes, records and acknowledges, one batch at a time in
//! stream order, so the sink's fence, the checkpoint and the ack floor move in batch order.
//!
//! Crash windows (what survives a SIGKILL at each point), for batch N ending at sequence L after
//! the applied sequence S, with batch N+1 received (whole or in part) meanwhile:
//! 1. while pulling or decoding batch N (the fetcher filling it, the channel handing it over,
//!    this task classifying it): nothing was written; the restart resumes after S. Batch N+1 was
//!    never acknowledged either: the server redelivers both (startup reconciliation recreates
//!    the consumer at S + 1).
//! 2. during the sink transaction of batch N: the sink rolls back; nothing of the batch is
//!    visible and the fence is still S; the restart resumes after S. Batch N+1, held by the
//!    fetcher or waiting in the channel, was not written and not acknowledged: delivered again.
//! 3. after the sink commit, before the redb checkpoint is committed: rows and fence are at L,
//!    redb says S or any sequence in between. With a sink that keeps a fence the checkpoint is
//!    committed at most every `CHECKPOINT_EVERY` (200 ms; see `offsets.rs`), so this window
//!    spans several batches; at start the engine takes the sink's fence (L) and brings redb to
//!    it, so nothing is applied twice. A sink may itself make commits durable lazily, as the
//!    redb replica does: a kill then takes its rows and fence back together to an earlier L',
//!    and the engine resumes after L', whichever way redb and the server's ack floor differ
//!    from it. With a sink without a fence the checkpoint is committed right after every batch,
//!    so this window is just the gap between the two commits: a kill in it makes the restart
//!    apply the batch again (nothing can tell without a fence). Batch N+1 is still only in
//!    memory: the restart receives it again after L.
//! 4. after the checkpoint, before the ack reaches the server (the ack of L's message is sent
//!    without waiting for its confirmation): the server still thinks batch N is
//!    unacknowledged, so startup reconciliation recreates the consumer at L + 1 (and any
//!    redelivery with seq ≤ L is skipped). An ack lost in transit is covered by the next
//!    batch's AckAll. The AckAll of L acknowledges nothing of batch N+1 (all its sequences are
//!    above L), so a kill here loses nothing of it either.
//! 5. after the ack: everything up to L agrees; batch N+1 is in windows 1-2 (it becomes batch
//!    N of the next round).
//!
//! A delivery anomaly (a consumer sequence that jumps or steps back, a failed pull, a
//! reconnect) is found by the fetcher, which hands over what precedes it (never an open
//! transaction) with the reason and stops: nothing past the hole is applied or acknowledged,
//! and the session ends with a fresh consumer at applied + 1.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream;
use bytes::Bytes;
use jetsync::{Config, OnGap};
use tokio::sync::mpsc;

use crate::{
    apply::{Applier, Mode, NOT_SYNCED_HERE},
    backoff::Backoff,
    bootstrap::bootstrap,
    consumer::{self, ConsumerSpec},
    delivery::Delivery,
    fetch::{AbortOnDrop, FetchLimits, Fetched, Fetcher, Pulled, Reconnects, RECONNECTED},
    offsets::Offsets,
    ops, raw,
    resync::resync,
    shutdown::Shutdown,
    startup::{sink_description, sink_is_empty, start_point_and_fence, NewStore},
    EngineError, Sink, Stats,
};

/// How often a catching-up engine logs its progress.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long a stream may report a last sequence below the applied one (a new leader still
/// applying its log) before the engine stops with [`EngineError::AheadOfStream`].
const AHEAD_GRACE: Duration = Duration::from_secs(60);
/// Pull requests expire after this long (heartbeats keep idle pulls honest in between).
const PULL_EXPIRES: Duration = Duration::from_secs(30);

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
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), EngineError> {
        let mut shutdown = Shutdown::spawn(shutdown);
        let Engine {
            config,
            mut sink,
            stats,
        } = self;
        let group = config.stream.name.clone();
        let max_backoff = Duration::from_millis(config.apply.retry_max_backoff_ms);
        let offsets = Offsets::open(&config.redb_path())?;

        // A checkpoint store that knows nothing of the group beside a sink that applied events
        // (a lost data_dir) is refused: its parked and held events would be forgotten.
        let new_store = NewStore::Refuse(sink_description(&config));
        let Some((applied, has_fence)) = start_point_and_fence(
            &mut sink,
            &offsets,
            &group,
            max_backoff,
            &mut shutdown,
            new_store,
        )
        .await?
        else {
            return Ok(());
        };
        // S = 0 and an empty sink: join from a snapshot instead of replaying all history
        // (unless `apply.bootstrap = false`).
        if config.apply.bootstrap
            && applied == 0
            && !offsets.bootstrapping(&group)?
            && sink_is_empty(&mut sink, max_backoff, &mut shutdown).await? == Some(true)
        {
            offsets.set_bootstrapping(&group, true)?;
        }
        stats.set_applied(applied);
        tracing::info!(stream = %group, instance = %config.instance, applied, "applier starting");

        let Some(client) = connect(&config, &mut shutdown, max_backoff).await? else {
            return Ok(());
        };
        let mut applier = Applier::new(&config, sink, offsets, applied, stats.clone())?;
        // The sink's fence is the truth at start: the checkpoint may lag it (crash window 3).
        applier.lazy_checkpoint = has_fence;
        retry_newly_synced(&config, &mut applier).await?;
        let mut state = LoopState {
            applier,
            spec: ConsumerSpec {
                name: config.consumer_name(),
                filter: jetsync::group_filter(&config.stream.subject_prefix),
                batch_max: config.apply.batch_max,
                ack_wait: Duration::from_millis(config.apply.ack_wait_ms),
                replicas: config.apply.consumer_replicas,
                storage: config.apply.consumer_storage,
            },
            progress: Progress::new(applied),
            ahead_since: None,
        };
        let engine = Session {
            config: &config,
            stats: &stats,
        };
        let mut session_backoff = Backoff::new("consuming the stream", max_backoff);
        let mut stuck = Stuck::default();
        while !shutdown.is_requested() {
            let before = state.applier.applied;
            let ended = engine.session(&client, &mut state, &mut shutdown).await;
            let failed = match &ended {
                Ok(SessionEnd::Reset(_)) => true,
                Err(e) => e.is_retryable(),
                Ok(SessionEnd::Shutdown) => false,
            };
            match ended {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::Reset(reason)) => {
                    stats.add_consumer_reset();
                    tracing::info!(
                        reason,
                        applied = state.applier.applied,
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
            // Sessions dying again and again at the same applied sequence: maybe a message the
            // client library cannot parse (it drops the connection on delivery; see `raw.rs`).
            if !stuck.observe(failed, before, state.applier.applied) {
                continue;
            }
            match engine.unstick(&client, &mut state, &mut shutdown).await {
                Ok(true) => {
                    stuck = Stuck::default();
                    session_backoff.succeed();
                }
                Ok(false) => {
                    // Nothing to park: keep retrying, with backoff so that an unexplained
                    // failure does not spin.
                    let why = "consumer sessions keep ending at the same sequence";
                    if !session_backoff.fail(&why, &mut shutdown).await {
                        break;
                    }
                }
                Err(e) if e.is_retryable() => {
                    if !session_backoff.fail(&e, &mut shutdown).await {
                        break;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(applied = state.applier.applied, "applier stopped");
        Ok(())
    }
}

/// Applies the parked events of rows whose table the configuration now lists and which were
/// parked as "table not synced here", through `parked retry`'s path (in sequence order per
/// row, a failing one stays parked with the rest held behind it). A sink that is unavailable
/// just leaves them for the next start.
async fn retry_newly_synced<S: Sink>(
    config: &Config,
    applier: &mut Applier<S>,
) -> Result<(), EngineError> {
    let mut rows = Vec::new();
    for (row, &first) in applier.blocked() {
        if !applier.rules.syncs(&row.table) {
            continue;
        }
        let head = applier.offsets.parked_event(&applier.group, first)?;
        if head.is_some_and(|e| e.error == NOT_SYNCED_HERE) {
            rows.push(row.clone());
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    rows.sort();
    let fence = applier.applied;
    match ops::retry_rows(config, &mut applier.sink, &applier.offsets, fence, &rows).await {
        Ok(report) => tracing::info!(
            rows = rows.len(),
            applied = report.applied.len(),
            still_parked = report.still_parked.len(),
            "applied the parked events of tables the configuration now lists"
        ),
        Err(e) if e.is_retryable() => tracing::warn!(
            error = %e,
            "could not apply the parked events of tables the configuration now lists; the next start tries again"
        ),
        Err(e) => return Err(e),
    }
    applier.reload_blocked()
}

/// Connects (retrying while the server is unreachable) and provisions the stream if asked.
pub(crate) async fn connect(
    config: &Config,
    shutdown: &mut Shutdown,
    max_backoff: Duration,
) -> Result<Option<jetsync::Client>, EngineError> {
    let mut backoff = Backoff::new("connecting to NATS", max_backoff);
    loop {
        let attempt = async {
            let client = jetsync::Client::connect(config).await?;
            if config.stream.provision {
                client.provision().await?;
            } else {
                // A stream someone else provisioned must still be one jetsync can rely on
                // (DESIGN §5); a failed check is a configuration error naming stream.provision.
                jetsync::check_existing_stream(client.jetstream(), &config.stream).await?;
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

/// Looks up the sync group's stream, naming it when it is missing.
pub(crate) async fn get_stream(
    js: &jetstream::Context,
    stream_name: &str,
) -> Result<jetstream::stream::Stream, EngineError> {
    match js.get_stream(stream_name).await {
        Ok(s) => Ok(s),
        Err(e) => {
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j) if j.error_code().0 == 10059)
            {
                return Err(EngineError::StreamNotFound {
                    stream: stream_name.to_owned(),
                });
            }
            Err(EngineError::nats("get stream", e))
        }
    }
}

/// Consecutive consumer sessions that ended (a reset or a retryable error, not shutdown)
/// without moving the applied sequence.
#[derive(Debug, Default)]
struct Stuck {
    at: u64,
    failures: u32,
}

impl Stuck {
    /// Records a session that ran from applied sequence `before` to `after`; true when the
    /// engine should look at the next message raw (see `raw.rs`).
    fn observe(&mut self, failed: bool, before: u64, after: u64) -> bool {
        if !failed || after != before {
            *self = Stuck::default();
            return false;
        }
        if self.failures == 0 || self.at != after {
            *self = Stuck {
                at: after,
                failures: 0,
            };
        }
        self.failures += 1;
        self.failures >= raw::STUCK_AFTER
    }
}

/// The read-only parts one consumer session needs.
struct Session<'a> {
    config: &'a Config,
    stats: &'a Arc<Stats>,
}

impl Session<'_> {
    /// One consumer session: finish a pending resync or bootstrap, check for a gap, reconcile
    /// the durable at applied + 1, then apply batches until shutdown or an anomaly that calls
    /// for a fresh consumer.
    async fn session<S: Sink>(
        &self,
        client: &jetsync::Client,
        state: &mut LoopState<S>,
        shutdown: &mut Shutdown,
    ) -> Result<SessionEnd, EngineError> {
        let js = client.jetstream();
        let stream_name = &self.config.stream.name;
        let mut stream = get_stream(js, stream_name).await?;
        let info = stream
            .info()
            .await
            .map_err(|e| EngineError::nats("stream info", e))?
            .clone();
        let limits = jetsync::stream_has_limits(&info.config);
        let group = state.applier.group.clone();

        // A resync that was started and not finished (a crash, a shutdown) is redone first: the
        // parked events already describe its snapshot.
        if let Some(target) = state.applier.offsets.resync_pending(&group)? {
            return self
                .resync(
                    js,
                    state,
                    shutdown,
                    &format!("finishing the resync towards seq {target} that was interrupted"),
                )
                .await;
        }
        if state.applier.offsets.bootstrapping(&group)? {
            // A bootstrap resumed after its first batches has rows up to `applied`: events after
            // it that the limits removed meanwhile are a gap, as on a fresh start.
            let (first, applied) = (info.state.first_sequence, state.applier.applied);
            if applied > 0 && first > applied + 1 && limits {
                return self
                    .gap(js, state, shutdown, first, "resuming a bootstrap")
                    .await;
            }
            if !bootstrap(js, self.config, &mut state.applier, shutdown).await? {
                return Ok(SessionEnd::Shutdown);
            }
            state.progress = Progress::new(state.applier.applied);
            return Ok(SessionEnd::Reset("bootstrap complete".into()));
        }

        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let applied = state.applier.applied;
        if applied > last {
            // Right after a leader change the new leader can report a last sequence below what
            // it has committed while it still applies its log: retried for a while, fatal only
            // when it lasts (a recreated stream, or a data_dir of another stream).
            let since = *state.ahead_since.get_or_insert_with(Instant::now);
            if since.elapsed() < AHEAD_GRACE {
                tracing::warn!(
                    applied,
                    stream_last_seq = last,
                    "the stream reports a last sequence below the applied one (a leader change?); retrying"
                );
                return Err(EngineError::nats(
                    "stream info",
                    std::io::Error::other(format!(
                        "stream {stream_name} ends at seq {last}, below the applied seq {applied}"
                    )),
                ));
            }
            return Err(EngineError::AheadOfStream {
                stream: stream_name.clone(),
                applied,
                last,
            });
        }
        state.ahead_since = None;
        // Events may be missing only if the stream has limits; on a compacted stream without
        // limits every row's latest event is still there, so replaying from `first` is exact.
        if first > applied + 1 && limits {
            return self.gap(js, state, shutdown, first, "at start").await;
        }
        self.stats
            .observe_stream(last, last.saturating_sub(applied));

        let ready = consumer::reconcile(&stream, &state.spec, applied).await?;
        // Pulls are bounded in bytes as well as events, but never below the largest message
        // the server accepts (a pull smaller than one message would never deliver it).
        let nats = client.nats();
        let sizes = FetchLimits::of(self.config);
        let pull_bytes = sizes
            .batch_max_bytes
            .max(nats.server_info().max_payload + 64 * 1024);
        // A reconnect during the session (the client library drops its connection on a
        // message it cannot parse, see `raw.rs`) ends it: deliveries may have been lost, and
        // the engine must see the failure at once rather than after `ack_wait`.
        let reconnects = Reconnects::watch(nats.statistics());
        let messages = ready
            .consumer
            .stream()
            .max_messages_per_batch(consumer::pull_messages(&state.spec))
            .max_bytes_per_batch(pull_bytes)
            .heartbeat(Duration::from_millis(self.config.apply.heartbeat_ms))
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| EngineError::nats("start pulling", e))?;
        let _connected = self.stats.session_started(); // `connected` (readiness) until the session ends

        // The pipeline: the fetcher receives and checks the next batch while this task applies
        // the current one (see `fetch.rs`); a channel of one slot keeps two batches in flight
        // at most. Only this task applies, records and acknowledges, in batch order.
        let (tx, mut batches) = mpsc::channel(1);
        let fetcher = Fetcher {
            messages,
            expected_cseq: ready.next_consumer_seq,
            last_seen: applied,
            limits,
            sizes,
            reconnects: reconnects.clone(),
            rules: state.applier.rules.clone(),
        };
        let _fetcher = AbortOnDrop(tokio::spawn(fetcher.run(tx)));

        loop {
            // Wait for the next batch, or shutdown; commit a lazily recorded checkpoint once it
            // is due, so that an idle applier's file (`status`) is exact. After 50 ms with
            // nothing in hand, a sink that defers durability (the redb replica) makes its last
            // commits durable (`Sink::idle`).
            let mut idle_at = Some(Instant::now() + Duration::from_millis(50));
            let wait_started = Instant::now();
            let next = loop {
                let flush_at = state.applier.offsets.flush_due();
                tokio::select! {
                    biased;
                    _ = shutdown.requested() => return Ok(SessionEnd::Shutdown),
                    next = batches.recv() => break next,
                    _ = sleep_until(flush_at) => state.applier.offsets.flush()?,
                    _ = sleep_until(idle_at) => {
                        idle_at = None;
                        state.applier.sink.idle().await?;
                    }
                }
            };
            let Some(Fetched {
                batch,
                after_jump,
                end,
            }) = next
            else {
                // The fetcher stops only after handing over the reason; it did not.
                return Ok(SessionEnd::Reset("the fetcher stopped".into()));
            };
            if after_jump {
                // A stream-sequence jump on a stream with limits may be a gap (events removed
                // by the limits before this instance got them): everything before the jump is
                // applied; ask the server where the stream starts now.
                let before = state.applier.applied;
                let first = stream
                    .info()
                    .await
                    .map_err(|e| EngineError::nats("stream info", e))?
                    .state
                    .first_sequence;
                if first > before + 1 {
                    return self.gap(js, state, shutdown, first, "while running").await;
                }
            }
            // Shutdown finishes this batch (the one in hand); the fetcher's next one is
            // dropped unacknowledged.
            let apply_started = Instant::now();
            if !self.apply_batch(state, nats, batch, shutdown).await? {
                return Ok(SessionEnd::Shutdown);
            }
            let (waited, applied_in) = (apply_started - wait_started, apply_started.elapsed());
            tracing::trace!(
                waited_us = waited.as_micros() as u64,
                applied_us = applied_in.as_micros() as u64,
                applied = state.applier.applied,
                "batch done"
            );
            state.progress.spent(waited, applied_in);
            if let Some(reason) = end {
                return Ok(SessionEnd::Reset(reason));
            }
            if reconnects.happened() {
                return Ok(SessionEnd::Reset(RECONNECTED.into()));
            }
            if shutdown.is_requested() {
                return Ok(SessionEnd::Shutdown);
            }
        }
    }

    /// Fetches the next message after the applied sequence raw (not through the client's
    /// parser) and parks it if the client would refuse it. Returns true when it parked one.
    async fn unstick<S: Sink>(
        &self,
        client: &jetsync::Client,
        state: &mut LoopState<S>,
        shutdown: &mut Shutdown,
    ) -> Result<bool, EngineError> {
        let applied = state.applier.applied;
        let next = applied + 1;
        let lookup = raw::Lookup::NextAfter {
            seq: next,
            filter: &state.spec.filter,
        };
        let Some(message) =
            raw::fetch(client.jetstream(), &self.config.stream.name, lookup).await?
        else {
            tracing::info!(
                applied,
                "consumer sessions keep ending, and no stored message follows the applied sequence"
            );
            return Ok(false);
        };
        let seq = message.seq;
        match raw::refusal(&message.subject, message.headers.as_deref()) {
            None => {
                tracing::warn!(
                    applied,
                    seq,
                    "consumer sessions keep ending at the same sequence, but the next message looks valid (not parked); retrying"
                );
                Ok(false)
            }
            Some(reason) => {
                let event = raw::parked(message, &self.config.stream.subject_prefix, &reason);
                state.applier.park_unparseable(event, shutdown).await
            }
        }
    }

    /// A gap: events after the applied sequence are gone. `resync` rebuilds from a snapshot,
    /// `halt` stops naming both sequences; never continue silently. `when` ("at start", "while
    /// running") says which check found it, for the log.
    async fn gap<S: Sink>(
        &self,
        js: &jetstream::Context,
        state: &mut LoopState<S>,
        shutdown: &mut Shutdown,
        first_available: u64,
        when: &str,
    ) -> Result<SessionEnd, EngineError> {
        let applied = state.applier.applied;
        match self.config.apply.on_gap {
            OnGap::Halt => Err(EngineError::Gap {
                applied,
                first_available,
            }),
            OnGap::Resync => {
                self.resync(
                    js,
                    state,
                    shutdown,
                    &format!("gap found {when}: applied up to seq {applied}, but the stream's first available seq is {first_available}"),
                )
                .await
            }
        }
    }

    async fn resync<S: Sink>(
        &self,
        js: &jetstream::Context,
        state: &mut LoopState<S>,
        shutdown: &mut Shutdown,
        reason: &str,
    ) -> Result<SessionEnd, EngineError> {
        tracing::warn!(
            reason,
            "rebuilding the synced tables from a snapshot (resync)"
        );
        let outcome = resync(js, self.config, &mut state.applier, shutdown, &mut |p| {
            tracing::info!(
                loaded = p.loaded,
                rows = p.total,
                "resync: reading the snapshot"
            );
        })
        .await?;
        match outcome {
            None => Ok(SessionEnd::Shutdown),
            Some(done) => {
                self.stats.add_resync();
                state.progress = Progress::new(state.applier.applied);
                tracing::info!(
                    applied = done.applied_seq,
                    events = done.events,
                    "resync complete"
                );
                Ok(SessionEnd::Reset("resync complete".into()))
            }
        }
    }

    /// Applies and acknowledges one batch of the durable consumer (see the module's crash
    /// windows). Returns false when shutdown interrupted it before anything was applied.
    async fn apply_batch<S: Sink>(
        &self,
        state: &mut LoopState<S>,
        nats: &async_nats::Client,
        mut batch: Vec<Pulled>,
        shutdown: &mut Shutdown,
    ) -> Result<bool, EngineError> {
        let mut decoded: Vec<_> = batch.iter_mut().map(|p| p.decoded.take()).collect();
        let Some(last) = batch.last() else {
            return Ok(true);
        };
        let pending = last.pending;
        self.stats
            .observe_stream(last.stream_seq + pending, pending);
        let events: Vec<(u64, &Delivery)> =
            batch.iter().map(|p| (p.stream_seq, &p.message)).collect();
        if !state
            .applier
            .apply(
                &events,
                &mut decoded,
                last.stream_seq,
                Mode::Apply,
                Some(nats),
                shutdown,
            )
            .await?
        {
            return Ok(false);
        }
        // Crash window 4: applied (and checkpointed, or recorded), not yet acknowledged.
        // The ack is sent without waiting for the server's confirmation: correctness never
        // depends on it (an ack lost in transit is covered by the next batch's AckAll, and a
        // restart reconciles the consumer with the applied sequence), and the round trip would
        // delay every batch.
        if let Err(e) = last.message.acknowledge(nats, Bytes::new()).await {
            tracing::debug!(error = %e, seq = last.stream_seq, "acknowledgement not sent");
        }
        state.progress.maybe_log(state.applier.applied, pending);
        Ok(true)
    }
}

/// Sleeps until `at`, forever for `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Mutable state of the apply loop that outlives consumer sessions.
struct LoopState<S> {
    applier: Applier<S>,
    spec: ConsumerSpec,
    progress: Progress,
    /// Since when the stream has reported a last sequence below the applied one.
    ahead_since: Option<Instant>,
}

enum SessionEnd {
    Shutdown,
    /// Recreate the consumer at applied + 1 (a lost delivery, a broken pull stream).
    Reset(String),
}

/// Progress logs while catching up on a backlog.
struct Progress {
    last_log: Instant,
    last_applied: u64,
    /// Time this task spent waiting for the fetcher's next batch since the last log.
    waiting: Duration,
    /// Time this task spent applying batches (sink, checkpoint, ack) since the last log.
    applying: Duration,
}

impl Progress {
    fn new(applied: u64) -> Progress {
        Progress {
            last_log: Instant::now(),
            last_applied: applied,
            waiting: Duration::ZERO,
            applying: Duration::ZERO,
        }
    }

    /// Counts `waited` waiting for a batch and `applied_in` applying it.
    fn spent(&mut self, waited: Duration, applied_in: Duration) {
        self.waiting += waited;
        self.applying += applied_in;
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
            // Where the time went: a sink busy most of the time bounds the rate; an engine
            // waiting for batches most of the time is bound by receiving (the server, the
            // network, decoding).
            let share = |d: Duration| (d.as_secs_f64() / elapsed.as_secs_f64() * 100.0).round();
            tracing::info!(
                applied,
                remaining,
                events_per_s = rate.round() as u64,
                eta_s = eta_s.round(),
                applying_pct = share(self.applying),
                waiting_for_events_pct = share(self.waiting),
                "catching up"
            );
        }
        self.last_log = Instant::now();
        self.last_applied = applied;
        self.waiting = Duration::ZERO;
        self.applying = Duration::ZERO;
    }
}
