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
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::AckKind;
use bytes::Bytes;
use jetsync::{codec::DecodeLimits, OnPoison, OtherTables};

use crate::{
    backoff::Backoff,
    coalesce,
    decode::{decode, row_of, DecodeFailure, RawEvent},
    delivery::Delivery,
    offsets::Offsets,
    parked::{now_ms, ParkedEvent, RowId},
    shutdown::Shutdown,
    Change, EngineError, Sink, SinkError, Stats,
};

/// How long a batch waits for the capture relay ([`SinkError::InFlight`]) with quick retries
/// before falling back to the backoff (and its warning): the relay records a sequence within
/// milliseconds of the server's acknowledgement unless it cannot publish at all.
const IN_FLIGHT_PATIENCE: Duration = Duration::from_secs(5);
/// Longest wait between those quick retries when no recording wakes the engine (a relay in
/// another process, or one whose cycle failed).
const IN_FLIGHT_RECHECK: Duration = Duration::from_millis(20);

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
    /// The per-event rules (table filter, limits, decoding).
    pub(crate) rules: Rules,
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
    /// Whether batches are coalesced (`apply.coalesce`, and the sink does not need to see every
    /// change; see `coalesce.rs`).
    coalesce: bool,
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
        // From the parked-rows index: the parked bodies are not read.
        let blocked = offsets.blocked_rows(&group)?;
        stats.set_parked(offsets.parked_count(&group)?);
        let coalesce = config.apply.coalesce && !sink.sees_every_change();
        Ok(Applier {
            sink,
            offsets,
            group,
            rules: Rules::of(config),
            on_poison: config.apply.on_poison,
            max_backoff: Duration::from_millis(config.apply.retry_max_backoff_ms),
            ack_wait: Duration::from_millis(config.apply.ack_wait_ms),
            applied,
            blocked,
            stats,
            lazy_checkpoint: false,
            coalesce,
        })
    }

    /// Applies `events` (ascending stream sequences), which cover the stream up to `through`
    /// (≥ every event's sequence; higher when the run ended with events that are gone). Returns
    /// false when shutdown interrupted a retry loop before anything was applied.
    ///
    /// `decoded`: the events already decoded by [`Rules::predecode`] (by index into `events`;
    /// shorter, or `None` entries, for events not decoded yet).
    ///
    /// `progress_acks`: keep the server from redelivering `events` while the sink is
    /// unavailable (durable consumer deliveries only).
    pub(crate) async fn apply(
        &mut self,
        events: &[(u64, &Delivery)],
        decoded: &mut [Predecoded],
        through: u64,
        mode: Mode,
        progress_acks: Option<&async_nats::Client>,
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
        let Classified {
            mut changes,
            mut sources,
            mut parks,
            skipped,
            last,
        } = self.rules.classify_run(events, decoded, floor, blocked);
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

        // A row changed several times is written once, with its last change (see
        // `coalesce.rs`); a rejection puts every change back before it is handled.
        let mut folded = match mode {
            Mode::Apply if self.coalesce => {
                coalesce::fold(&mut changes, &mut sources, &self.rules.merge)
            }
            _ => None,
        };
        let started = Instant::now();
        let mut backoff = Backoff::new("applying to the sink", self.max_backoff);
        let mut last_progress_ack = Instant::now();
        let mut in_flight_since: Option<Instant> = None;
        loop {
            // Taken before the attempt, so that the relay recording a sequence during it is
            // not missed (see `SinkError::InFlight` below).
            let recordings = crate::capture::pending::recordings();
            // Crash window 2: the sink transaction is all-or-nothing.
            let result = match mode {
                Mode::Apply => self.sink.apply(&self.group, &changes, through).await,
                Mode::Replace => self.sink.replace(&self.group, &changes, through).await,
            };
            match result {
                Ok(()) => break,
                // The instance's own captured change of a row in the batch is being published:
                // its relay records where the server stored it within milliseconds, so retry
                // as soon as it does (not after the backoff's 100 ms, which stalled every
                // origin's applies under a steady captured write load). A relay that cannot
                // publish (NATS down) is waited for with the usual backoff after 5 s.
                Err(SinkError::InFlight { reason })
                    if in_flight_since.get_or_insert_with(Instant::now).elapsed()
                        < IN_FLIGHT_PATIENCE =>
                {
                    tracing::debug!(%reason, "batch waits for the capture relay");
                    if let Some(client) = progress_acks {
                        progress_ack(client, events, &mut last_progress_ack, self.ack_wait).await;
                    }
                    tokio::select! {
                        _ = crate::capture::pending::wait_recorded(recordings, IN_FLIGHT_RECHECK) => {}
                        _ = shutdown.requested() => return Ok(false),
                    }
                }
                Err(e @ (SinkError::Unavailable { .. } | SinkError::InFlight { .. })) => {
                    if let Some(client) = progress_acks {
                        progress_ack(client, events, &mut last_progress_ack, self.ack_wait).await;
                    }
                    // Shutdown does not abandon the batch in hand: keep retrying, but stop once
                    // asked to (nothing was applied, so nothing is lost).
                    if !backoff.fail(&e, shutdown).await {
                        return Ok(false);
                    }
                }
                Err(SinkError::Rejected { .. }) if folded.is_some() => {
                    // Which change the sink refuses, and what it holds behind it, is decided on
                    // the full list, as without coalescing.
                    if let Some(folded) = folded.take() {
                        folded.restore(&mut changes, &mut sources);
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
                    let new_parks =
                        take_rejected(&mut changes, &mut sources, events, index, &reason, blocked);
                    self.offsets.park(&self.group, &new_parks)?;
                    parks.extend(new_parks);
                }
                Err(e) => return Err(e.into()),
            }
        }
        backoff.succeed();
        let coalesced = folded.map_or(0, |folded| {
            let n = folded.len() as u64;
            folded.restore(&mut changes, &mut sources);
            n
        });
        // Crash window 3: the sink holds `through`, redb still says an older sequence (until the
        // checkpoint is committed, at once or within `CHECKPOINT_EVERY`); startup takes the
        // fence.
        let (n, txns) = (changes.len() as u64, transactions_in(events, &sources));
        match mode {
            Mode::Apply if self.lazy_checkpoint => {
                self.offsets
                    .record_counting(&self.group, through, n, txns)?;
            }
            Mode::Apply => self
                .offsets
                .commit_counting(&self.group, through, n, txns)?,
            Mode::Replace => self
                .offsets
                .finish_resync_counting(&self.group, through, n, txns)?,
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
        self.stats.add_skipped(skipped);
        self.stats.add_transactions(txns);
        self.stats.add_batch(&changes, started.elapsed());
        self.stats.add_coalesced(coalesced);
        self.stats.set_applied(through);
        tracing::debug!(
            first_seq = changes.first().map(|c| c.seq).unwrap_or(through),
            last_seq = through,
            n = changes.len(),
            parked = parks.len(),
            coalesced,
            elapsed_us = started.elapsed().as_micros() as u64,
            "batch applied"
        );
        Ok(true)
    }

    /// Parks `event`, a message the NATS client library cannot parse (see `raw.rs`), and moves
    /// the fence through it. Returns false when shutdown interrupted the fence move (the event
    /// stays parked; the restart finds it again and parks it again under the same sequence).
    ///
    /// Crash windows: as for any parked event, the park is committed first (window 1 of this
    /// module), then an empty sink transaction moves the fence to its sequence (window 2), then
    /// the checkpoint follows (window 3). Its row, if its subject names one, is blocked.
    pub(crate) async fn park_unparseable(
        &mut self,
        event: ParkedEvent,
        shutdown: &mut Shutdown,
    ) -> Result<bool, EngineError> {
        if self.on_poison == OnPoison::Halt {
            return Err(EngineError::Poison {
                seq: event.seq,
                subject: event.subject.clone(),
                reason: event.error.clone(),
            });
        }
        if event.seq <= self.applied {
            return Ok(true);
        }
        self.offsets
            .park(&self.group, std::slice::from_ref(&event))?;
        if let Some(row) = &event.row {
            self.blocked.entry(row.clone()).or_insert(event.seq);
        }
        tracing::warn!(
            seq = event.seq,
            subject = %event.subject,
            error = %event.error,
            "message the NATS client cannot parse parked; later events of its row are held behind it (see `jetsync-applier parked list`)"
        );
        let advanced = self.advance(event.seq, shutdown).await?;
        self.stats
            .set_parked(self.offsets.parked_count(&self.group)?);
        Ok(advanced)
    }

    /// Reads the set of blocked rows again (after parked events were applied or dropped
    /// outside the apply path).
    pub(crate) fn reload_blocked(&mut self) -> Result<(), EngineError> {
        self.blocked = self.offsets.blocked_rows(&self.group)?;
        self.stats
            .set_parked(self.offsets.parked_count(&self.group)?);
        Ok(())
    }

    /// The rows held behind a parked event → the sequence of that first parked event.
    pub(crate) fn blocked(&self) -> &HashMap<RowId, u64> {
        &self.blocked
    }

    /// Moves the fence to `through` without events (the stream holds nothing up to it).
    pub(crate) async fn advance(
        &mut self,
        through: u64,
        shutdown: &mut Shutdown,
    ) -> Result<bool, EngineError> {
        self.apply(&[], &mut [], through, Mode::Apply, None, shutdown)
            .await
    }
}

/// What the apply path does with one event.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Hand it to the sink.
    Apply(Change),
    /// Park it (poison, or held behind its row's parked event).
    Park(ParkedEvent),
    /// Acknowledge it without applying it (a table this instance skips, `apply.other_tables =
    /// "skip"`); counted in [`Stats`].
    Skip,
}

/// The per-event rules of one instance and sync group: which subjects map to rows, which
/// tables are synced here, how large an event may be. What an event contains can only make it
/// parked or skipped, never stop the engine.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    prefix: String,
    /// The tables listed in the configuration (`[tables.<name>]`).
    tables: BTreeSet<String>,
    other_tables: OtherTables,
    max_event_bytes: u64,
    limits: DecodeLimits,
    /// Tables with `merge = true`, whose changes are never coalesced.
    pub(crate) merge: BTreeSet<String>,
}

/// The reason an event of an unconfigured table is parked (`apply.other_tables = "park"`).
pub(crate) const NOT_SYNCED_HERE: &str = "table not synced here";

impl Rules {
    /// The rules of `config`.
    pub(crate) fn of(config: &jetsync::Config) -> Rules {
        Rules {
            prefix: config.stream.subject_prefix.clone(),
            tables: config.tables.keys().cloned().collect(),
            other_tables: config.apply.other_tables,
            max_event_bytes: config.apply.max_event_bytes,
            limits: DecodeLimits {
                max_columns: config.apply.max_columns,
            },
            merge: config
                .tables
                .iter()
                .filter(|(_, t)| t.merge)
                .map(|(name, _)| name.clone())
                .collect(),
        }
    }

    /// Whether `table` is synced here (listed, or any table with `other_tables = "create"`).
    pub(crate) fn syncs(&self, table: &str) -> bool {
        self.other_tables == OtherTables::Create || self.tables.contains(table)
    }

    /// Classifies one event (`msg_id`: its `Nats-Msg-Id` header), in this order:
    /// 1. a subject that maps to no row → parked, blocking nothing;
    /// 2. a table not synced here with `other_tables = "skip"` → skipped;
    /// 3. a row in `blocked` with an earlier parked event → parked, held behind it;
    /// 4. a table not synced here (`"park"`) → parked "table not synced here";
    /// 5. a body over `apply.max_event_bytes` → parked undecoded;
    /// 6. a body that does not decode (format, syntax, `apply.max_columns`, nesting) → parked;
    /// 7. otherwise → applied.
    ///
    /// An event parked at 4–6 blocks its row: it is added to `blocked`, so the later events of
    /// the row are held behind it.
    pub(crate) fn classify(
        &self,
        raw: RawEvent<'_>,
        msg_id: Option<&str>,
        decoded: Predecoded,
        blocked: &mut HashMap<RowId, u64>,
    ) -> Verdict {
        let seq = raw.seq;
        let row = match row_of(&self.prefix, raw.subject) {
            Ok(row) => row,
            Err(reason) => return Verdict::Park(record(raw, msg_id, None, reason, None)),
        };
        let synced = self.syncs(&row.table);
        if !synced && self.other_tables == OtherTables::Skip {
            return Verdict::Skip;
        }
        if let Some(&first) = blocked.get(&row) {
            if seq > first {
                return Verdict::Park(held(raw, msg_id, row, first));
            }
        }
        let refused = if !synced {
            Some(NOT_SYNCED_HERE.to_owned())
        } else if raw.payload.len() as u64 > self.max_event_bytes {
            Some(format!(
                "event body of {} bytes exceeds apply.max_event_bytes ({})",
                raw.payload.len(),
                self.max_event_bytes
            ))
        } else {
            None
        };
        let reason = match refused {
            Some(reason) => reason,
            None => match decoded.unwrap_or_else(|| decode(&self.prefix, raw, self.limits)) {
                Ok(change) => return Verdict::Apply(change),
                Err(failure) => failure.reason().to_owned(),
            },
        };
        blocked.insert(row.clone(), seq);
        Verdict::Park(record(raw, msg_id, Some(row), reason, None))
    }
}

/// An event decoded ahead of its classification ([`Rules::predecode`]), `None` when not.
pub(crate) type Predecoded = Option<Result<Change, DecodeFailure>>;

impl Rules {
    /// Decodes `raw` ahead of time (the fetcher does this while the sink commits the batch
    /// before), when [`Rules::classify`] would decode it unless its row is blocked: its subject
    /// maps to a row of a synced table and its body is within `apply.max_event_bytes`. The
    /// result is what `classify` would get from decoding it (a pure function of the event), so
    /// handing it over changes nothing of the verdict.
    pub(crate) fn predecode(&self, raw: RawEvent<'_>) -> Predecoded {
        let row = row_of(&self.prefix, raw.subject).ok()?;
        if !self.syncs(&row.table) || raw.payload.len() as u64 > self.max_event_bytes {
            return None;
        }
        Some(decode(&self.prefix, raw, self.limits))
    }
}

/// A run of events sorted out by [`Rules::classify_run`].
#[derive(Debug, Default)]
pub(crate) struct Classified {
    /// What the sink gets, in order.
    pub(crate) changes: Vec<Change>,
    /// For each change, its index in the run.
    pub(crate) sources: Vec<usize>,
    /// What is parked (poison, held, or part of a transaction with a parked member).
    pub(crate) parks: Vec<ParkedEvent>,
    /// Events of tables this instance skips.
    pub(crate) skipped: u64,
    /// The highest sequence looked at (`floor` when none was above it).
    pub(crate) last: u64,
}

impl Rules {
    /// Classifies the events of `events` above `floor` (ascending; lower ones are redeliveries
    /// and left out) with [`Rules::classify`], a transaction at a time: when any member of a
    /// transaction is parked (poison, or held behind an earlier parked event of its row), every
    /// member is parked, each with the transaction's id, and every row it touches is blocked,
    /// so the later events of those rows are held behind it. A transaction is thus applied
    /// whole or not at all.
    pub(crate) fn classify_run(
        &self,
        events: &[(u64, &Delivery)],
        decoded: &mut [Predecoded],
        floor: u64,
        blocked: &mut HashMap<RowId, u64>,
    ) -> Classified {
        let mut out = Classified {
            changes: Vec::with_capacity(events.len()),
            sources: Vec::with_capacity(events.len()),
            last: floor,
            ..Classified::default()
        };
        let mut i = 0;
        while i < events.len() {
            let id = events[i].1.batch_id();
            let mut end = i + 1;
            if let Some(id) = id {
                while end < events.len() && events[end].1.batch_id() == Some(id) {
                    end += 1;
                }
            }
            let mut verdicts = Vec::with_capacity(end - i);
            for (k, &(seq, message)) in events.iter().enumerate().take(end).skip(i) {
                // Already applied (a redelivery, or a crash between commit and ack): skip; the
                // final ack still covers it.
                if seq <= out.last {
                    continue;
                }
                out.last = seq;
                let pre = decoded.get_mut(k).and_then(Option::take);
                let verdict = match applied_as_decoded(pre, blocked) {
                    Ok(verdict) => verdict,
                    Err(pre) => {
                        let raw = message.raw(seq);
                        self.classify(raw, message.msg_id(), pre, blocked)
                    }
                };
                verdicts.push((k, verdict));
            }
            if let Some(id) = id {
                park_whole_transaction(id, events, &mut verdicts, blocked);
            }
            for (k, verdict) in verdicts {
                match verdict {
                    Verdict::Apply(change) => {
                        out.changes.push(change);
                        out.sources.push(k);
                    }
                    Verdict::Park(parked) => out.parks.push(parked),
                    Verdict::Skip => out.skipped += 1,
                }
            }
            i = end;
        }
        out
    }
}

/// The verdict of an event the fetcher decoded without error, when its row is not blocked:
/// applied as decoded. Such an event's subject maps to a row of a synced table and its body is
/// within `apply.max_event_bytes` (see [`Rules::predecode`]), so [`Rules::classify`] would
/// reach the same verdict; this skips deriving the row and reading the headers again. Anything
/// else is handed back for `classify`.
fn applied_as_decoded(
    pre: Predecoded,
    blocked: &HashMap<RowId, u64>,
) -> Result<Verdict, Predecoded> {
    match pre {
        Some(Ok(change)) if parked_before(blocked, &change).is_none() => Ok(Verdict::Apply(change)),
        pre => Err(pre),
    }
}

/// The row `change` writes.
fn row_id(change: &Change) -> RowId {
    RowId {
        table: change.table.clone(),
        key: change.key.clone(),
    }
}

/// The sequence of the first parked event of `change`'s row when it comes before `change`
/// (which must then be held behind it).
fn parked_before(blocked: &HashMap<RowId, u64>, change: &Change) -> Option<u64> {
    if blocked.is_empty() {
        return None;
    }
    blocked
        .get(&row_id(change))
        .copied()
        .filter(|&first| first < change.seq)
}

/// When a member of transaction `id` is parked, parks the others too (blocking their rows) and
/// tags every parked member with the transaction.
fn park_whole_transaction(
    id: &str,
    events: &[(u64, &Delivery)],
    verdicts: &mut [(usize, Verdict)],
    blocked: &mut HashMap<RowId, u64>,
) {
    let Some(cause) = verdicts.iter().find_map(|(_, v)| match v {
        Verdict::Park(p) => Some(p.seq),
        _ => None,
    }) else {
        return;
    };
    for (k, verdict) in verdicts.iter_mut() {
        if let Verdict::Apply(change) = verdict {
            let (seq, message) = events[*k];
            let row = row_id(change);
            blocked.entry(row.clone()).or_insert(seq);
            *verdict = Verdict::Park(record(
                message.raw(seq),
                message.msg_id(),
                Some(row),
                format!("part of transaction {id}, whose member at seq {cause} is parked"),
                None,
            ));
        }
        if let Verdict::Park(parked) = verdict {
            parked.txn = Some(id.to_owned());
        }
    }
}

/// Tells the server the batch in hand is still being worked on (a progress ack per event) when
/// a third of `ack_wait` passed since `last`, so that it does not redeliver it meanwhile.
async fn progress_ack(
    client: &async_nats::Client,
    events: &[(u64, &Delivery)],
    last: &mut Instant,
    ack_wait: Duration,
) {
    if last.elapsed() >= ack_wait / 3 {
        for &(_, message) in events {
            let _ = message
                .acknowledge(client, Bytes::from(AckKind::Progress))
                .await;
        }
        *last = Instant::now();
    }
}

/// How many transactions the changes at `sources` (indexes into `events`) belong to.
fn transactions_in(events: &[(u64, &Delivery)], sources: &[usize]) -> u64 {
    let mut n = 0;
    let mut previous: Option<&str> = None;
    for &k in sources {
        let id = events[k].1.batch_id();
        if id.is_some() && id != previous {
            n += 1;
        }
        previous = id;
    }
    n
}

/// Removes the change at `index` that the sink refused for good from `changes` (and its entry of
/// `sources`, the positions in `events`) and returns the parked records of everything that must
/// wait with it: the refused change with `reason` and the other members of its transaction (a
/// transaction is parked whole), then every later change of a row so blocked (held behind its
/// first parked event), each together with the rest of its own transaction. The rows are
/// recorded in `blocked`. Shared by the durable consumer's batches and the resync.
pub(crate) fn take_rejected(
    changes: &mut Vec<Change>,
    sources: &mut Vec<usize>,
    events: &[(u64, &Delivery)],
    index: usize,
    reason: &str,
    blocked: &mut HashMap<RowId, u64>,
) -> Vec<ParkedEvent> {
    let rseq = changes[index].seq;
    let (lo, hi) = group_around(sources, events, index);
    let id = events[sources[index]].1.batch_id();
    let mut parks = Vec::new();
    for k in lo..hi {
        let why = if k == index {
            format!("rejected by the sink: {reason}")
        } else {
            format!(
                "part of transaction {}, whose member at seq {rseq} was rejected by the sink",
                id.unwrap_or_default()
            )
        };
        parks.push(park_change(
            &changes[k],
            events[sources[k]],
            why,
            None,
            blocked,
        ));
    }
    changes.drain(lo..hi);
    sources.drain(lo..hi);
    // The later changes of the rows blocked now wait behind them, with their transactions.
    let mut i = lo;
    while i < changes.len() {
        let (_, end) = group_around(sources, events, i);
        let held_at = (i..end).find(|&k| parked_before(blocked, &changes[k]).is_some());
        let Some(held_at) = held_at else {
            i = end;
            continue;
        };
        let id = events[sources[i]].1.batch_id().unwrap_or_default();
        for k in i..end {
            let (why, behind) = match parked_before(blocked, &changes[k]) {
                Some(first) => (
                    format!("held behind parked event {first} of the same row"),
                    Some(first),
                ),
                None => (
                    format!(
                        "part of transaction {id}, whose member at seq {} is held",
                        changes[held_at].seq
                    ),
                    None,
                ),
            };
            parks.push(park_change(
                &changes[k],
                events[sources[k]],
                why,
                behind,
                blocked,
            ));
        }
        changes.drain(i..end);
        sources.drain(i..end);
    }
    parks
}

/// The range of `changes` indexes (through `sources`) of the transaction containing change
/// `at`, or just `at` outside a transaction.
fn group_around(sources: &[usize], events: &[(u64, &Delivery)], at: usize) -> (usize, usize) {
    let Some(id) = events[sources[at]].1.batch_id() else {
        return (at, at + 1);
    };
    let same = |k: usize| events[sources[k]].1.batch_id() == Some(id);
    let mut lo = at;
    while lo > 0 && same(lo - 1) {
        lo -= 1;
    }
    let mut hi = at + 1;
    while hi < sources.len() && same(hi) {
        hi += 1;
    }
    (lo, hi)
}

/// The parked record of `change` (delivered as `event`), blocking its row.
fn park_change(
    change: &Change,
    (seq, message): (u64, &Delivery),
    why: String,
    held_behind: Option<u64>,
    blocked: &mut HashMap<RowId, u64>,
) -> ParkedEvent {
    let row = row_id(change);
    blocked.entry(row.clone()).or_insert(seq);
    let mut parked = record(
        message.raw(seq),
        message.msg_id(),
        Some(row),
        why,
        held_behind,
    );
    parked.txn = message.batch_id().map(str::to_owned);
    parked
}

/// The parked record of a poison event.
pub(crate) fn record(
    raw: RawEvent<'_>,
    msg_id: Option<&str>,
    row: Option<RowId>,
    error: String,
    held_behind: Option<u64>,
) -> ParkedEvent {
    ParkedEvent {
        seq: raw.seq,
        subject: raw.subject.to_owned(),
        row,
        format: raw.format.map(str::to_owned),
        msg_id: msg_id.map(str::to_owned),
        payload: raw.payload.to_vec(),
        error,
        held_behind,
        parked_at_ms: now_ms(),
        raw_headers: None,
        txn: None,
    }
}

/// The parked record of an event held behind its row's parked event `first`.
pub(crate) fn held(raw: RawEvent<'_>, msg_id: Option<&str>, row: RowId, first: u64) -> ParkedEvent {
    record(
        raw,
        msg_id,
        Some(row),
        format!("held behind parked event {first} of the same row"),
        Some(first),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetsync::{codec, Event, Row, TableConfig, Value};

    fn config(other: OtherTables) -> jetsync::Config {
        let mut config = jetsync::Config::default();
        config.stream.subject_prefix = "g".into();
        config.tables.insert("items".into(), TableConfig::default());
        config.apply.other_tables = other;
        config.apply.max_event_bytes = 2048;
        config.apply.max_columns = 3;
        config
    }

    fn body(columns: usize) -> Vec<u8> {
        let mut row = Row::new();
        for i in 0..columns {
            row.insert(format!("c{i}"), Value::I64(i as i64));
        }
        codec::encode(&Event::upsert(row, "o"), codec::Format::Postcard1).unwrap()
    }

    fn classify(
        rules: &Rules,
        seq: u64,
        subject: &str,
        payload: &[u8],
        blocked: &mut HashMap<RowId, u64>,
    ) -> Verdict {
        let raw = RawEvent {
            seq,
            subject,
            format: Some("postcard/1"),
            payload,
        };
        let verdict = rules.classify(raw, Some("id"), None, &mut blocked.clone());
        // A pre-decoded event gets the same verdict (parked at its own moment: the clock may
        // tick between the two calls, so the time a record was made is not compared).
        let pre = rules.predecode(raw);
        let timeless = |mut v: Verdict| {
            if let Verdict::Park(p) = &mut v {
                p.parked_at_ms = 0;
            }
            v
        };
        // So does the engine's shortcut for decoded events whose row is not blocked.
        if let Ok(shortcut) = applied_as_decoded(pre.clone(), blocked) {
            assert_eq!(shortcut, verdict);
        }
        assert_eq!(
            timeless(rules.classify(raw, Some("id"), pre, &mut blocked.clone())),
            timeless(verdict)
        );
        rules.classify(raw, Some("id"), None, blocked)
    }

    fn reason(verdict: &Verdict) -> (&str, Option<u64>) {
        match verdict {
            Verdict::Park(p) => (p.error.as_str(), p.held_behind),
            other => panic!("not parked: {other:?}"),
        }
    }

    #[test]
    fn events_are_classified_in_order_of_the_rules() {
        let rules = Rules::of(&config(OtherTables::Park));
        let mut blocked = HashMap::new();
        let ok = body(2);
        assert!(matches!(
            classify(&rules, 1, "g.items.a", &ok, &mut blocked),
            Verdict::Apply(Change { seq: 1, .. })
        ));
        // A subject that maps to no row blocks nothing.
        let v = classify(&rules, 2, "g.items", &ok, &mut blocked);
        assert!(matches!(&v, Verdict::Park(p) if p.row.is_none()));
        assert!(blocked.is_empty());
        // Limits: a body too large (undecoded), a row too wide; each blocks its row.
        let big = vec![0u8; 2049];
        assert_eq!(
            reason(&classify(&rules, 3, "g.items.b", &big, &mut blocked)).0,
            "event body of 2049 bytes exceeds apply.max_event_bytes (2048)"
        );
        assert_eq!(
            reason(&classify(&rules, 4, "g.items.c", &body(4), &mut blocked)).0,
            "row has 4 columns, more than apply.max_columns (3)"
        );
        // An unconfigured table is parked and its row held.
        assert_eq!(
            reason(&classify(&rules, 5, "g.other.d", &ok, &mut blocked)).0,
            NOT_SYNCED_HERE
        );
        for (row, first) in [("items/b", 3), ("items/c", 4), ("other/d", 5)] {
            let id: RowId = row.parse().unwrap();
            assert_eq!(blocked.get(&id), Some(&first), "{row}");
            let subject = format!("g.{}", row.replace('/', "."));
            let v = classify(&rules, 10 + first, &subject, &ok, &mut blocked);
            assert_eq!(
                reason(&v),
                (
                    format!("held behind parked event {first} of the same row").as_str(),
                    Some(first)
                )
            );
            // An event at or before the row's first parked sequence (a redelivery after a
            // crash) is classified afresh, not held behind itself.
            let again = classify(&rules, first, &subject, &ok, &mut blocked);
            assert!(!matches!(again, Verdict::Park(p) if p.held_behind.is_some()));
        }
        // Other rows still flow.
        assert!(matches!(
            classify(&rules, 20, "g.items.e", &ok, &mut blocked),
            Verdict::Apply(_)
        ));
    }

    #[test]
    fn other_tables_skip_and_create() {
        let skip = Rules::of(&config(OtherTables::Skip));
        let mut blocked = HashMap::new();
        let ok = body(1);
        assert_eq!(
            classify(&skip, 1, "g.other.a", &ok, &mut blocked),
            Verdict::Skip
        );
        assert!(blocked.is_empty());
        assert!(matches!(
            classify(&skip, 2, "g.items.a", &ok, &mut blocked),
            Verdict::Apply(_)
        ));
        let create = Rules::of(&config(OtherTables::Create));
        assert!(matches!(
            classify(&create, 3, "g.other.a", &ok, &mut blocked),
            Verdict::Apply(Change { ref table, .. }) if table == "other"
        ));
        // Limits hold for every table.
        assert!(matches!(
            classify(&create, 4, "g.other.b", &body(4), &mut blocked),
            Verdict::Park(_)
        ));
    }
}
