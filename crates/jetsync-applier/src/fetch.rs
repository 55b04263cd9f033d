//! The receiving half of the apply pipeline: a task that pulls the durable consumer's
//! deliveries, checks them (consumer sequence, stream-sequence jumps), cuts them into batches
//! (stretched to the end of their last transaction) and hands each batch to the engine over a
//! channel of one slot, while the engine applies the batch before it.
//!
//! The fetcher never acknowledges, applies or records anything: the engine alone does, in
//! batch order, after the sink commit (see `engine.rs`). So at most two batches are in flight:
//! the one the engine applies, and the one the fetcher fills (it takes the channel's slot
//! before it hands a batch over, and keeps filling its batch while the slot is taken, up to the
//! batch limits). Anything the fetcher holds when the session ends is simply dropped,
//! unacknowledged: the next session starts again at applied + 1.
//!
//! What ends a session is passed along in order: a delivery anomaly (a consumer-sequence jump
//! or step back, a failed or ended pull, a reconnect) ends the batch in hand *before* the
//! anomalous delivery (and before an open transaction), which the fetcher hands over with the
//! reason; the engine applies it and then resets the consumer at applied + 1. Nothing past the
//! hole is ever applied or acknowledged.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use async_nats::{jetstream, Statistics};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;

use crate::{
    apply::{Predecoded, Rules},
    delivery::Delivery,
    txn,
};

/// How often the fetcher checks whether its NATS connection was re-established.
const CONNECTION_CHECK: Duration = Duration::from_millis(200);

/// The backlog (the server's pending count) above which batches grow to
/// [`FetchLimits::catch_up_events`]: the engine is catching up, and larger sink transactions
/// share pages and commits between more rows. Below it batches stay at `apply.batch_max`, for
/// low live latency.
pub(crate) const CATCH_UP_PENDING: u64 = 10_000;

/// How much larger than `apply.batch_max` a batch may grow while catching up (still bounded by
/// `apply.batch_max_bytes`).
pub(crate) const CATCH_UP_FACTOR: usize = 2;

/// The fewest bytes of event bodies a batch may hold while it is stretched to the end of a
/// transaction (beyond them the transaction is applied in parts, with a warning): four times
/// `apply.batch_max_bytes`, but never less than this, so that a smaller `batch_max_bytes`
/// (which bounds memory while nothing is open) does not split transactions it used to apply
/// whole.
const STRETCH_MIN_BYTES: usize = 64 * 1024 * 1024;

/// A delivered message (in its compact form, see `delivery.rs`) with its parsed delivery
/// metadata.
pub(crate) struct Pulled {
    pub(crate) message: Delivery,
    pub(crate) stream_seq: u64,
    pub(crate) pending: u64,
    /// The event decoded by the fetcher, while the engine applied the batch before.
    pub(crate) decoded: Predecoded,
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
            message: Delivery::of(message.message),
            stream_seq,
            pending,
            decoded: None,
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

/// One batch handed from the fetcher to the engine.
pub(crate) struct Fetched {
    /// The deliveries, in delivery order, ending at a transaction boundary (or before an open
    /// transaction when `end` is set).
    pub(crate) batch: Vec<Pulled>,
    /// The first delivery of this batch is a stream-sequence jump on a stream with limits (the
    /// batch before it ended right before the jump): before applying it the engine asks the
    /// server whether events after the applied sequence were removed (a gap).
    pub(crate) after_jump: bool,
    /// Why the session must end after this batch (a delivery anomaly); the fetcher stops.
    pub(crate) end: Option<String>,
}

/// The sizes of a batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FetchLimits {
    /// Most events of a batch while live (`apply.batch_max`).
    pub(crate) batch_max: usize,
    /// Most events of a batch while catching up (a backlog above [`CATCH_UP_PENDING`]).
    pub(crate) catch_up_events: usize,
    /// Most bytes of event bodies of a batch (`apply.batch_max_bytes`), before stretching.
    pub(crate) batch_max_bytes: usize,
    /// How long to wait for more events while more are known to be pending.
    pub(crate) batch_wait: Duration,
}

impl FetchLimits {
    /// The limits of `config`.
    pub(crate) fn of(config: &jetsync::Config) -> FetchLimits {
        let batch_max = config.apply.batch_max;
        FetchLimits {
            batch_max,
            catch_up_events: batch_max.saturating_mul(CATCH_UP_FACTOR),
            batch_max_bytes: config.apply.batch_max_bytes as usize,
            batch_wait: Duration::from_millis(config.apply.batch_wait_ms),
        }
    }

    /// Most events of a batch when the server reports `pending` more.
    fn events(&self, pending: u64) -> usize {
        if pending > CATCH_UP_PENDING {
            self.catch_up_events
        } else {
            self.batch_max
        }
    }
}

/// Whether the NATS connection was re-established since the session started.
#[derive(Clone)]
pub(crate) struct Reconnects {
    statistics: Arc<Statistics>,
    at_start: u64,
}

impl Reconnects {
    /// Watches the connection whose statistics are `statistics` from now on.
    pub(crate) fn watch(statistics: Arc<Statistics>) -> Reconnects {
        let at_start = statistics.connects.load(Ordering::Relaxed);
        Reconnects {
            statistics,
            at_start,
        }
    }

    /// True once the client connected again (deliveries may have been lost).
    pub(crate) fn happened(&self) -> bool {
        self.statistics.connects.load(Ordering::Relaxed) != self.at_start
    }
}

/// The reason a session ends after a reconnect.
pub(crate) const RECONNECTED: &str = "the NATS connection was lost and re-established";

/// The fetcher of one consumer session.
pub(crate) struct Fetcher {
    /// The pull stream of the durable consumer.
    pub(crate) messages: jetstream::consumer::pull::Stream,
    /// The consumer sequence the next delivery must carry.
    pub(crate) expected_cseq: u64,
    /// The highest stream sequence handed to the engine (the applied sequence at start).
    pub(crate) last_seen: u64,
    /// Whether the stream has limits (a stream-sequence jump may then be a gap).
    pub(crate) limits: bool,
    pub(crate) sizes: FetchLimits,
    pub(crate) reconnects: Reconnects,
    /// The per-event rules, to decode events ahead of the engine ([`Rules::predecode`]).
    pub(crate) rules: Rules,
}

/// How filling one batch ended.
enum Filled {
    /// Full, or nothing more at hand.
    Done,
    /// A delivery anomaly: the session ends after what is in hand.
    Anomaly(String),
}

impl Fetcher {
    /// Runs until the engine drops its receiver (the session ended) or a delivery anomaly was
    /// handed over.
    pub(crate) async fn run(mut self, tx: mpsc::Sender<Fetched>) {
        let mut check = tokio::time::interval(CONNECTION_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The message that completed the last batch's final transaction, which starts the next.
        let mut carry: Option<Pulled> = None;
        loop {
            let mut batch: Vec<Pulled> = Vec::new();
            let mut bytes = 0usize;
            let first = match carry.take() {
                Some(p) => Ok(p),
                None => self.first(&mut check).await,
            };
            let mut filled = match first {
                Ok(p) => {
                    bytes += p.message.payload.len();
                    batch.push(p);
                    self.fill(&mut batch, &mut bytes).await
                }
                Err(reason) => Filled::Anomaly(reason),
            };
            // While the engine still applies the batch before, keep filling this one up to its
            // limits: batches grow with the load, and the engine finds the next one ready.
            let permit = loop {
                if matches!(filled, Filled::Anomaly(_)) || self.full(&batch, bytes) {
                    break tx.reserve().await;
                }
                tokio::select! {
                    biased;
                    permit = tx.reserve() => break permit,
                    next = self.messages.next() => {
                        filled = match self.take(next, &mut batch, &mut bytes) {
                            Ok(()) => Filled::Done,
                            Err(reason) => Filled::Anomaly(reason),
                        };
                    }
                    _ = check.tick() => {
                        if self.reconnects.happened() {
                            filled = Filled::Anomaly(RECONNECTED.into());
                        }
                    }
                }
            };
            let Ok(permit) = permit else {
                return; // The session ended.
            };
            // A transaction is applied whole: a batch never ends inside one (see `txn.rs`).
            // What ends the stretch early (a delivery anomaly, a reconnect) leaves the open
            // transaction out of this batch; it is delivered again after applied + 1.
            let mut end = match filled {
                Filled::Done => self.stretch(&mut batch, &mut carry, &mut check).await,
                Filled::Anomaly(reason) => Some(reason),
            };
            if end.is_none() && self.reconnects.happened() {
                end = Some(RECONNECTED.into());
            }
            if end.is_some() {
                if let Some(open) = txn::open_tail(&txn::tags(batch.iter().map(|p| &p.message))) {
                    batch.truncate(open);
                }
            }
            // A stream-sequence jump on a stream with limits may be a gap (events removed by
            // the limits before this instance got them): the part before the jump is handed
            // over first, the rest after the engine asked the server where the stream starts.
            let mut after_jump = false;
            let mut permit = permit;
            if self.limits {
                while let Some(jump) = first_jump(&batch, self.last_seen) {
                    // Not inside a transaction: the part before its start goes first.
                    let cut = txn::start_of(&txn::tags(batch.iter().map(|p| &p.message)), jump);
                    if cut == 0 {
                        after_jump = true;
                        break;
                    }
                    let rest = batch.split_off(cut);
                    self.handed(&batch);
                    permit.send(Fetched {
                        batch,
                        after_jump,
                        end: None,
                    });
                    batch = rest;
                    permit = match tx.reserve().await {
                        Ok(permit) => permit,
                        Err(_) => return,
                    };
                }
            }
            self.handed(&batch);
            let ended = end.is_some();
            permit.send(Fetched {
                batch,
                after_jump,
                end,
            });
            if ended {
                return;
            }
        }
    }

    /// Checks a delivery ([`Pulled::check`]) and decodes its event ahead of the engine.
    fn check(&mut self, message: jetstream::Message) -> Result<Pulled, String> {
        let mut pulled = Pulled::check(message, &mut self.expected_cseq)?;
        let raw = pulled.message.raw(pulled.stream_seq);
        pulled.decoded = self.rules.predecode(raw);
        Ok(pulled)
    }

    /// Notes the highest stream sequence of `batch` as handed over.
    fn handed(&mut self, batch: &[Pulled]) {
        if let Some(max) = batch.iter().map(|p| p.stream_seq).max() {
            self.last_seen = self.last_seen.max(max);
        }
    }

    /// Whether `batch` reached its limits.
    fn full(&self, batch: &[Pulled], bytes: usize) -> bool {
        let pending = batch.last().map_or(0, |p| p.pending);
        batch.len() >= self.sizes.events(pending) || bytes >= self.sizes.batch_max_bytes
    }

    /// Waits for the first delivery of a batch.
    async fn first(&mut self, check: &mut tokio::time::Interval) -> Result<Pulled, String> {
        loop {
            let next = tokio::select! {
                biased;
                next = self.messages.next() => next,
                _ = check.tick() => {
                    if self.reconnects.happened() {
                        return Err(RECONNECTED.into());
                    }
                    continue;
                }
            };
            return match next {
                None => Err("the pull stream ended".into()),
                Some(Err(e)) => Err(format!("pull failed: {e}")),
                Some(Ok(m)) => self.check(m),
            };
        }
    }

    /// Adds one pulled item to `batch`, or says why the session must end.
    fn take(
        &mut self,
        next: Option<Result<jetstream::Message, jetstream::consumer::pull::MessagesError>>,
        batch: &mut Vec<Pulled>,
        bytes: &mut usize,
    ) -> Result<(), String> {
        match next {
            Some(Ok(m)) => {
                let p = self.check(m)?;
                *bytes += p.message.payload.len();
                batch.push(p);
                Ok(())
            }
            Some(Err(e)) => Err(format!("pull failed: {e}")),
            None => Err("the pull stream ended".into()),
        }
    }

    /// Fills the batch: takes what is already buffered without waiting; waits up to
    /// `batch_wait` only while the server says more events are pending. A batch also ends once
    /// its bodies reach `apply.batch_max_bytes`.
    async fn fill(&mut self, batch: &mut Vec<Pulled>, bytes: &mut usize) -> Filled {
        while !self.full(batch, *bytes) {
            let next = match self.messages.next().now_or_never() {
                Some(next) => next,
                None => {
                    let pending = batch.last().map(|p| p.pending).unwrap_or(0);
                    if pending == 0 || self.sizes.batch_wait.is_zero() {
                        break;
                    }
                    match tokio::time::timeout(self.sizes.batch_wait, self.messages.next()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    }
                }
            };
            if let Err(reason) = self.take(next, batch, bytes) {
                return Filled::Anomaly(reason);
            }
        }
        Filled::Done
    }

    /// Stretches `batch` to the end of the transaction its last message leaves open: pulls
    /// until the commit member arrives (added to the batch) or a message outside the
    /// transaction (kept in `carry` to start the next batch). Waits at most
    /// [`txn::OPEN_TIMEOUT`] for each message: a transaction still open then was never an
    /// atomic batch (see `txn.rs`) and is applied as stored. Beyond [`txn::MAX_STRETCH`]
    /// further events or four times `batch_max_bytes` (at least [`STRETCH_MIN_BYTES`]), the run
    /// is applied in parts, with a warning. Returns the reason of a delivery anomaly that ended
    /// it.
    async fn stretch(
        &mut self,
        batch: &mut Vec<Pulled>,
        carry: &mut Option<Pulled>,
        check: &mut tokio::time::Interval,
    ) -> Option<String> {
        let open = txn::open_tail(&txn::tags(batch.iter().map(|p| &p.message)))?;
        let id = batch[open]
            .message
            .batch_id()
            .unwrap_or_default()
            .to_owned();
        let first_seq = batch[open].stream_seq;
        let stretch_max_bytes = self
            .sizes
            .batch_max_bytes
            .saturating_mul(4)
            .max(STRETCH_MIN_BYTES);
        let mut bytes: usize = batch.iter().map(|p| p.message.payload.len()).sum();
        let mut added = 0usize;
        // The wait for the next member restarts when one arrives, not when the connection
        // check ticks.
        let mut deadline = tokio::time::Instant::now() + txn::OPEN_TIMEOUT;
        loop {
            if added >= txn::MAX_STRETCH || bytes >= stretch_max_bytes {
                tracing::warn!(
                    txn = %id,
                    first_seq,
                    events = batch.len() - open,
                    "transaction too large to apply in one sink transaction (more than {} events or {} bytes in hand); applying it in parts",
                    txn::MAX_STRETCH,
                    stretch_max_bytes
                );
                return None;
            }
            let next = tokio::select! {
                biased;
                next = tokio::time::timeout_at(deadline, self.messages.next()) => next,
                _ = check.tick() => {
                    if self.reconnects.happened() {
                        return Some(RECONNECTED.into());
                    }
                    continue;
                }
            };
            let message = match next {
                Err(_) => {
                    tracing::warn!(
                        txn = %id,
                        first_seq,
                        events = batch.len() - open,
                        "transaction without a commit and nothing after it for {:?}: applying its stored members (an atomic batch is stored whole at once; these batch headers were probably stored by a server without atomic publish)",
                        txn::OPEN_TIMEOUT
                    );
                    return None;
                }
                Ok(None) => return Some("the pull stream ended".into()),
                Ok(Some(Err(e))) => return Some(format!("pull failed: {e}")),
                Ok(Some(Ok(m))) => m,
            };
            let pulled = match self.check(message) {
                Ok(p) => p,
                Err(reason) => return Some(reason),
            };
            if pulled.message.batch_id() != Some(id.as_str()) {
                // Complete: a later message outside it arrived; it starts the next batch.
                *carry = Some(pulled);
                return None;
            }
            let commit = pulled.message.tag().is_some_and(|t| t.commit);
            bytes += pulled.message.payload.len();
            added += 1;
            deadline = tokio::time::Instant::now() + txn::OPEN_TIMEOUT;
            batch.push(pulled);
            if commit {
                return None;
            }
        }
    }
}

/// The index of the first delivery in `batch` whose stream sequence is not the one after its
/// predecessor (`after` for the first), ignoring deliveries at or below it.
fn first_jump(batch: &[Pulled], after: u64) -> Option<usize> {
    let mut prev = after;
    for (i, p) in batch.iter().enumerate() {
        if p.stream_seq <= prev {
            continue;
        }
        if p.stream_seq > prev + 1 {
            return Some(i);
        }
        prev = p.stream_seq;
    }
    None
}

/// Aborts the fetcher task when the session ends, however it ends.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
