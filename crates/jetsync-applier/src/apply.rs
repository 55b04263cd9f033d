//! Applying a run of stream events to the sink: decode, park what cannot be applied, apply the
//! rest in one sink transaction with the fence, checkpoint. Shared by the durable consumer's
//! batches, the snapshot bootstrap and the snapshot resync.
//!
//! Parking and crash windows (events up to sequence L, applied sequence S before):
//! 1. poison events (and the events of their rows held behind them) are written to redb FIRST,
//!    in their own transaction. A kill after that and before the sink commit leaves them parked
//!    while the sink is still at S: the restart delivers them again and parks them again under
//!    the same sequences (an overwrite), and the events of a row *before* its first parked
//!    sequence are not held (only later ones are), so nothing is applied out of order.
//! 2. the sink transaction (rows + fence L) is all-or-nothing.
//! 3. the redb checkpoint follows (see `engine.rs`): committed at once for a sink without a
//!    fence, at most every `CHECKPOINT_EVERY` for one with a fence (see `offsets.rs`), whose
//!    fence wins at start anyway.
//!
//! So a parked event is never lost (parked before the fence passes it) and never applied twice
//! by the engine (it is applied only by `parked retry`, which removes it).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, AckKind};
use jetsync::OnPoison;

use crate::{
    backoff::Backoff,
    decode::{decode, header, row_of, DecodeFailure, RawEvent},
    offsets::Offsets,
    parked::{now_ms, ParkedEvent, RowId},
    shutdown::Shutdown,
    Change, EngineError, Sink, SinkError, Stats,
};

/// How a run of events reaches the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Apply on top of what is there (`Sink::apply`); events at or below the applied sequence
    /// are skipped.
    Apply,
    /// Replace the synced tables with the result of these events (`Sink::replace`), a snapshot
    /// resync; the parked events are replaced by those of the snapshot.
    Replace,
}

/// The apply state of one instance and sync group.
pub(crate) struct Applier<S> {
    pub(crate) sink: S,
    pub(crate) offsets: Offsets,
    pub(crate) group: String,
    pub(crate) prefix: String,
    pub(crate) on_poison: OnPoison,
    pub(crate) max_backoff: Duration,
    ack_wait: Duration,
    /// The last applied sequence (S).
    pub(crate) applied: u64,
    /// Rows with a parked event → the sequence of their first parked event.
    pub(crate) blocked: HashMap<RowId, u64>,
    pub(crate) stats: Arc<Stats>,
    /// The sink keeps a fence, which is the truth at start: the redb checkpoint of applied
    /// batches may be committed lazily ([`Offsets::record`]). False (commit every batch at once)
    /// unless the engine says so.
    pub(crate) lazy_checkpoint: bool,
}

impl<S: Sink> Applier<S> {
    /// The applier of `config`'s sync group at applied sequence `applied`, loading the set of
    /// blocked rows from the parked events.
    pub(crate) fn new(
        config: &jetsync::Config,
        sink: S,
        offsets: Offsets,
        applied: u64,
        stats: Arc<Stats>,
    ) -> Result<Applier<S>, EngineError> {
        let group = config.stream.name.clone();
        let parked = offsets.parked(&group)?;
        let mut blocked = HashMap::new();
        for event in &parked {
            if let Some(row) = &event.row {
                blocked.entry(row.clone()).or_insert(event.seq);
            }
        }
        stats.set_parked(parked.len() as u64);
        Ok(Applier {
            sink,
            offsets,
            group,
            prefix: config.stream.subject_prefix.clone(),
            on_poison: config.apply.on_poison,
            max_backoff: Duration::from_millis(config.apply.retry_max_backoff_ms),
            ack_wait: Duration::from_millis(config.apply.ack_wait_ms),
            applied,
            blocked,
            stats,
            lazy_checkpoint: false,
        })
    }

    /// Applies `events` (ascending stream sequences), which cover the stream up to `through`
    /// (≥ every event's sequence; higher when the run ended with events that are gone). Returns
    /// false when shutdown interrupted a retry loop before anything was applied.
    ///
    /// `progress_acks`: keep the server from redelivering `events` while the sink is
    /// unavailable (durable consumer deliveries only).
    pub(crate) async fn apply(
        &mut self,
        events: &[(u64, &jetstream::Message)],
        through: u64,
        mode: Mode,
        progress_acks: bool,
        shutdown: &mut Shutdown,
    ) -> Result<bool, EngineError> {
        let floor = match mode {
            Mode::Apply => self.applied,
            Mode::Replace => 0,
        };
        if mode == Mode::Apply && through <= floor {
            return Ok(true);
        }
        // A row is blocked as soon as its event is classified as poison: the park below is
        // durable before the sink sees the batch, and a failed park ends the engine. A resync
        // starts from nothing and takes its set only once the replacement succeeded.
        let mut resync_blocked = HashMap::new();
        let blocked = match mode {
            Mode::Apply => &mut self.blocked,
            Mode::Replace => &mut resync_blocked,
        };
        let mut changes: Vec<Change> = Vec::with_capacity(events.len());
        let mut sources: Vec<usize> = Vec::with_capacity(events.len());
        let mut parks: Vec<ParkedEvent> = Vec::new();
        let mut last = floor;
        for (i, &(seq, message)) in events.iter().enumerate() {
            // Already applied (a redelivery, or a crash between commit and ack): skip; the
            // final ack still covers it.
            if seq <= last {
                continue;
            }
            last = seq;
            let raw = RawEvent::of_message(seq, message);
            match row_of(&self.prefix, raw.subject) {
                Err(reason) => parks.push(record(raw, message, None, reason, None)),
                Ok(row) => match blocked.get(&row) {
                    Some(&first) if seq > first => {
                        parks.push(held(raw, message, row, first));
                    }
                    _ => match decode(&self.prefix, raw) {
                        Ok(change) => {
                            changes.push(change);
                            sources.push(i);
                        }
                        Err(failure) => {
                            let reason = failure.reason().to_owned();
                            if let DecodeFailure::Body(row, _) = failure {
                                blocked.insert(row.clone(), seq);
                                parks.push(record(raw, message, Some(row), reason, None));
                            }
                        }
                    },
                },
            }
        }
        let through = through.max(last);
        if self.on_poison == OnPoison::Halt {
            if let Some(p) = parks.first() {
                return Err(EngineError::Poison {
                    seq: p.seq,
                    subject: p.subject.clone(),
                    reason: p.error.clone(),
                });
            }
        }
        // Crash window 1: parked before the sink's fence can pass them.
        match mode {
            Mode::Apply => self.offsets.park(&self.group, &parks)?,
            Mode::Replace => self.offsets.begin_resync(&self.group, through, &parks)?,
        }

        let started = Instant::now();
        let mut backoff = Backoff::new("applying to the sink", self.max_backoff);
        let mut last_progress_ack = Instant::now();
        loop {
            // Crash window 2: the sink transaction is all-or-nothing.
            let result = match mode {
                Mode::Apply => self.sink.apply(&self.group, &changes, through).await,
                Mode::Replace => self.sink.replace(&self.group, &changes, through).await,
            };
            match result {
                Ok(()) => break,
                Err(e @ SinkError::Unavailable { .. }) => {
                    if progress_acks && last_progress_ack.elapsed() >= self.ack_wait / 3 {
                        for &(_, message) in events {
                            let _ = message.ack_with(AckKind::Progress).await;
                        }
                        last_progress_ack = Instant::now();
                    }
                    // Shutdown does not abandon the batch in hand: keep retrying, but stop once
                    // asked to (nothing was applied, so nothing is lost).
                    if !backoff.fail(&e, shutdown).await {
                        return Ok(false);
                    }
                }
                Err(SinkError::Rejected {
                    index,
                    seq,
                    table,
                    key,
                    reason,
                }) if index < changes.len() => {
                    if self.on_poison == OnPoison::Halt {
                        return Err(EngineError::Poison {
                            seq,
                            subject: format!("{table}/{key}"),
                            reason,
                        });
                    }
                    // Park the refused change and hold the later changes of its row behind it;
                    // then apply the rest again.
                    let rejected = changes.remove(index);
                    let (rseq, message) = events[sources.remove(index)];
                    let row = RowId {
                        table: rejected.table,
                        key: rejected.key,
                    };
                    let raw = RawEvent::of_message(rseq, message);
                    let mut new_parks = vec![record(
                        raw,
                        message,
                        Some(row.clone()),
                        format!("rejected by the sink: {reason}"),
                        None,
                    )];
                    blocked.insert(row.clone(), rseq);
                    let mut i = index;
                    while i < changes.len() {
                        if changes[i].table == row.table && changes[i].key == row.key {
                            changes.remove(i);
                            let (s, m) = events[sources.remove(i)];
                            new_parks.push(held(RawEvent::of_message(s, m), m, row.clone(), rseq));
                        } else {
                            i += 1;
                        }
                    }
                    self.offsets.park(&self.group, &new_parks)?;
                    parks.extend(new_parks);
                }
                Err(e) => return Err(e.into()),
            }
        }
        backoff.succeed();
        // Crash window 3: the sink holds `through`, redb still says an older sequence (until the
        // checkpoint is committed, at once or within `CHECKPOINT_EVERY`); startup takes the
        // fence.
        match mode {
            Mode::Apply if self.lazy_checkpoint => {
                self.offsets
                    .record(&self.group, through, changes.len() as u64)?;
            }
            Mode::Apply => self
                .offsets
                .commit(&self.group, through, changes.len() as u64)?,
            Mode::Replace => {
                self.offsets
                    .finish_resync(&self.group, through, changes.len() as u64)?
            }
        }
        self.applied = through;
        if mode == Mode::Replace {
            self.blocked = resync_blocked;
        }
        if !parks.is_empty() || mode == Mode::Replace {
            self.stats
                .set_parked(self.offsets.parked_count(&self.group)?);
        }
        for p in parks.iter().filter(|p| p.held_behind.is_none()) {
            tracing::warn!(
                seq = p.seq,
                subject = %p.subject,
                error = %p.error,
                "poison event parked; later events of its row are held behind it (see `jetsync-applier parked list`)"
            );
        }
        // Counted before the sequence is published (see `Stats::snapshot`).
        self.stats.add_batch(&changes, started.elapsed());
        self.stats.set_applied(through);
        tracing::debug!(
            first_seq = changes.first().map(|c| c.seq).unwrap_or(through),
            last_seq = through,
            n = changes.len(),
            parked = parks.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "batch applied"
        );
        Ok(true)
    }

    /// Moves the fence to `through` without events (the stream holds nothing up to it).
    pub(crate) async fn advance(
        &mut self,
        through: u64,
        shutdown: &mut Shutdown,
    ) -> Result<bool, EngineError> {
        self.apply(&[], through, Mode::Apply, false, shutdown).await
    }
}

/// The parked record of a poison event.
pub(crate) fn record(
    raw: RawEvent<'_>,
    message: &jetstream::Message,
    row: Option<RowId>,
    error: String,
    held_behind: Option<u64>,
) -> ParkedEvent {
    ParkedEvent {
        seq: raw.seq,
        subject: raw.subject.to_owned(),
        row,
        format: raw.format.map(str::to_owned),
        msg_id: header(message.headers.as_ref(), "Nats-Msg-Id").map(str::to_owned),
        payload: raw.payload.to_vec(),
        error,
        held_behind,
        parked_at_ms: now_ms(),
    }
}

/// The parked record of an event held behind its row's parked event `first`.
pub(crate) fn held(
    raw: RawEvent<'_>,
    message: &jetstream::Message,
    row: RowId,
    first: u64,
) -> ParkedEvent {
    record(
        raw,
        message,
        Some(row),
        format!("held behind parked event {first} of the same row"),
        Some(first),
    )
}
