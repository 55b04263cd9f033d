//! The relay: a task of `run` beside the engine that publishes the outbox.
//!
//! One cycle (when the service commits captured changes, which wakes the relay, else every
//! `capture.poll_ms` while the outbox is empty; back to back while it is not): follow the
//! captured tables' schema (SQLite), assign new outbox rows to batches (SQLite), read the
//! pending batches, publish each (one atomic transaction, a plain message for a batch of one
//! change, or row by row with `capture.atomic = false`; message id `<instance>-<outbox id>` on
//! every entry), and delete a batch only once the server acknowledged it. Crash windows:
//! - killed before the publish: the batch is still in the outbox and is published next run.
//! - killed after the server stored the batch, before the delete: the next run publishes the
//!   same batch with the same message ids; the server refuses it as a duplicate (within the
//!   stream's duplicate window, `stream.duplicate_window_ms`), and the relay deletes it.
//! - killed after the delete: nothing left to do.
//!
//! Failures (NATS unreachable, the database busy) are retried with capped backoff, forever; the
//! service's writes never wait for the relay beyond its short write transactions.

use std::{collections::HashMap, sync::Arc, time::Duration};

use jetsync::{Change, Client, Config, Row, SinkKind, Table, WriteOptions};
use tokio::sync::{watch, Notify};

use super::{postgres, sqlite, Ack, Batch, CaptureError, Entry};
use crate::{backoff::Backoff, shutdown::Shutdown, Stats};

/// Longest wait between retries of a failing cycle.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long the relay waits before looking again after [`CaptureError::Busy`].
const BUSY_RETRY: Duration = Duration::from_millis(5);
/// How long `stop` waits for the cycle in hand.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running relay. Dropping it without [`Relay::stop`] asks it to stop after the cycle in
/// hand without waiting (nothing is lost: the outbox keeps every row not yet acknowledged).
///
/// The relay runs on a thread of its own, with a single-threaded runtime: its database work
/// is blocking (SQLite) and sequential, and on the engine's runtime every such call had to hand
/// the worker's place over to another thread (`block_in_place`), four times per cycle; in the
/// capture bench thread switches were the largest part of the origin's CPU.
#[derive(Debug)]
pub struct Relay {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts the relay when some table has `capture = true` (`None` otherwise). Its counters
    /// are `stats.capture()`.
    pub fn start(config: Config, stats: Arc<Stats>) -> Option<Relay> {
        config.captured_tables().next()?;
        stats.capture().set_enabled();
        let (stop, rx) = watch::channel(false);
        let shutdown = Shutdown::from_receiver(rx);
        let spawned = std::thread::Builder::new()
            .name("jetsync-capture-relay".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(run(config, stats, shutdown)),
                    Err(e) => {
                        tracing::error!(error = %e, "capture relay cannot start its runtime");
                        stats
                            .capture()
                            .set_error(Some(format!("the relay's runtime did not start: {e}")));
                    }
                }
            });
        let thread = match spawned {
            Ok(thread) => Some(thread),
            Err(e) => {
                tracing::error!(error = %e, "capture relay cannot start its thread");
                None
            }
        };
        Some(Relay { stop, thread })
    }

    /// Asks the relay to stop after the batch in hand and waits for it (at most 15 s).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(STOP_TIMEOUT, joined).await.is_err() {
                tracing::warn!(
                    "capture relay did not stop within {} s; leaving it",
                    STOP_TIMEOUT.as_secs()
                );
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Checks, before `run` starts, that the server can take what the relay will publish: with
/// `capture.atomic = true` (the default) the server must store atomic batches (nats-server
/// 2.12.1+) and, with `stream.provision = false`, the stream must allow them. A
/// [`CaptureError::Config`] naming `capture.atomic` otherwise. NATS unreachable is not an error
/// here (the relay keeps trying, as the engine does).
pub async fn check_server(config: &Config) -> Result<(), CaptureError> {
    if !config.capture_atomic() {
        return Ok(());
    }
    let client = match Client::connect(config).await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "capture: cannot check the server's atomic batch support now; the relay retries");
            return Ok(());
        }
    };
    let version = client.nats().server_info().version;
    if !jetsync::transaction::supports_transactions(&version) {
        return Err(CaptureError::Config {
            key: "capture.atomic".into(),
            reason: format!(
                "captured local transactions are published as atomic batches, which need \
                 nats-server 2.12.1 or later, but the server is {}: upgrade it, or set \
                 capture.atomic = false to publish captured rows one by one (a local \
                 transaction is then not atomic on the other instances)",
                if version.is_empty() {
                    "(unknown version)"
                } else {
                    &version
                }
            ),
        });
    }
    if !config.stream.provision {
        if let Ok(mut stream) = client.jetstream().get_stream(&config.stream.name).await {
            if let Ok(info) = stream.info().await {
                if !info.config.allow_atomic_publish {
                    return Err(CaptureError::Config {
                        key: "capture.atomic".into(),
                        reason: format!(
                            "stream {} does not allow atomic publish and stream.provision = \
                             false: set allow_atomic on the stream (server {version}), or set \
                             capture.atomic = false to publish captured rows one by one",
                            config.stream.name
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The outbox, whichever database holds it.
enum Store {
    Sqlite(Box<sqlite::Store>),
    Postgres(Box<postgres::Store>),
}

/// Runs blocking SQLite work from the relay's task without stalling the runtime.
fn blocking<R>(work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

impl Store {
    /// Opens the outbox; commits of captured changes wake `wake` (SQLite: a watcher of the
    /// file's data version; Postgres: a notification the triggers send).
    async fn open(config: &Config, wake: Arc<Notify>) -> Result<Store, CaptureError> {
        let tables = super::captured(config);
        match config.sink.kind {
            SinkKind::Postgres => Ok(Store::Postgres(Box::new(
                postgres::Store::open(config, Some(wake)).await?,
            ))),
            _ => {
                let path = sqlite::sink_path(config);
                blocking(|| sqlite::Store::open(&path, tables, Some(wake)))
                    .map(|s| Store::Sqlite(Box::new(s)))
            }
        }
    }

    fn usable(&self) -> bool {
        match self {
            Store::Sqlite(_) => true,
            Store::Postgres(s) => !s.is_closed(),
        }
    }

    async fn pending(&mut self, max_rows: usize) -> Result<Vec<Batch>, CaptureError> {
        match self {
            Store::Sqlite(s) => blocking(|| {
                s.check_schema()?;
                s.assign(max_rows)?;
                s.pending(max_rows)
            }),
            Store::Postgres(s) => s.pending(max_rows).await,
        }
    }

    async fn delete(&mut self, batches: &[&Batch], acks: &[Ack]) -> Result<(), CaptureError> {
        if batches.is_empty() {
            return Ok(());
        }
        match self {
            Store::Sqlite(s) => blocking(|| s.delete_many(batches, acks)),
            Store::Postgres(s) => s.delete_many(batches, acks).await,
        }
    }

    /// Marks the pending entries (`pending.rs`) of these outbox ids as being published.
    async fn mark_in_flight(&mut self, ids: &[i64]) -> Result<(), CaptureError> {
        match self {
            Store::Sqlite(s) => blocking(|| s.mark_in_flight(ids)),
            Store::Postgres(s) => s.mark_in_flight(ids).await,
        }
    }

    async fn backlog(&mut self) -> Result<u64, CaptureError> {
        match self {
            Store::Sqlite(s) => blocking(|| s.counts()).map(|c| c.0),
            Store::Postgres(s) => s.counts().await.map(|c| c.0),
        }
    }
}

/// The relay's state across cycles.
struct Relayer {
    config: Config,
    stats: Arc<Stats>,
    store: Option<Store>,
    client: Option<Client>,
    tables: HashMap<String, Table<Row>>,
    /// Woken when the service commits captured changes.
    wake: Arc<Notify>,
}

async fn run(config: Config, stats: Arc<Stats>, mut shutdown: Shutdown) {
    let poll = Duration::from_millis(config.capture.poll_ms);
    let mut relayer = Relayer {
        config,
        stats,
        store: None,
        client: None,
        tables: HashMap::new(),
        wake: Arc::new(Notify::new()),
    };
    let mut backoff = Backoff::new("capture relay", MAX_BACKOFF);
    tracing::info!(
        tables = ?relayer.config.captured_tables().collect::<Vec<_>>(),
        atomic = relayer.config.capture.atomic,
        "capture relay started"
    );
    while !shutdown.is_requested() {
        match relayer.cycle().await {
            Ok(worked) => {
                backoff.succeed();
                relayer.stats.capture().set_error(None);
                if !worked {
                    // A commit wakes the relay at once; `poll_ms` bounds the wait when no
                    // wake-up comes (triggers installed by an older version, a watcher error).
                    let wake = relayer.wake.clone();
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(poll) => {}
                        _ = shutdown.requested() => {}
                    }
                }
            }
            Err(CaptureError::Busy(reason)) => {
                // Not a failure: a service transaction holds a row the relay must update. The
                // relay's own transaction was rolled back; look again at the next cycle.
                tracing::debug!(%reason, "capture relay waits for a service transaction");
                tokio::select! {
                    _ = tokio::time::sleep(BUSY_RETRY) => {}
                    _ = shutdown.requested() => {}
                }
            }
            Err(e) => {
                relayer.stats.capture().set_error(Some(e.to_string()));
                // Keep the backlog current while publishing fails (NATS down): /readyz and
                // /metrics show the outbox growing.
                if let Some(store) = relayer.store.as_mut() {
                    if let Ok(backlog) = store.backlog().await {
                        relayer.stats.capture().set_backlog(backlog);
                    }
                }
                if matches!(e, CaptureError::Database(_)) {
                    relayer.store = None;
                }
                if let CaptureError::Publish(pe) = &e {
                    // At the first start the engine may not have provisioned the stream yet.
                    let provisioning = relayer.config.stream.provision
                        && matches!(pe, jetsync::Error::StreamNotFound { .. });
                    if !pe.is_retryable() && !provisioning {
                        tracing::error!(error = %e, "capture relay cannot publish; retrying");
                    }
                }
                if matches!(e, CaptureError::Schema(_)) {
                    tracing::error!(error = %e, "capture relay stopped publishing");
                }
                if !backoff.fail(&e, &mut shutdown).await {
                    break;
                }
            }
        }
    }
    tracing::info!("capture relay stopped");
}

impl Relayer {
    /// One cycle; `Ok(true)` when it published something (look again at once).
    async fn cycle(&mut self) -> Result<bool, CaptureError> {
        if !self.store.as_ref().is_some_and(Store::usable) {
            self.store = Some(Store::open(&self.config, self.wake.clone()).await?);
        }
        let store = self.store.as_mut().expect("opened above");
        let started = std::time::Instant::now();
        let batches = store.pending(self.config.capture.max_batch_rows).await?;
        let read = started.elapsed();
        if batches.is_empty() {
            // Nothing committed waits (rows of open transactions are not visible yet).
            self.stats.capture().set_backlog(0);
            return Ok(false);
        }
        if self.client.is_none() {
            self.client = Some(Client::connect(&self.config).await?);
            self.tables.clear();
        }
        // The batches are published in order, each acknowledged before the next; the
        // acknowledged ones are deleted together, in one transaction, at the end of the cycle
        // (or before returning a publish error), never before the server acknowledged them.
        let ids: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.entries.iter().map(|e| e.id))
            .collect();
        self.store
            .as_mut()
            .expect("opened above")
            .mark_in_flight(&ids)
            .await?;
        let mut done: Vec<&Batch> = Vec::new();
        let mut acks: Vec<Ack> = Vec::new();
        let mut failure = None;
        let mut publishes = 0u64;
        for batch in &batches {
            for (id, reason) in &batch.unpublishable {
                tracing::error!(
                    outbox_id = id,
                    %reason,
                    "captured change cannot be published; it is dropped from the outbox"
                );
            }
            match self.publish(batch).await {
                Ok((batch_publishes, batch_acks)) => {
                    done.push(batch);
                    acks.extend(batch_acks);
                    publishes += batch_publishes;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let published = started.elapsed();
        let store = self.store.as_mut().expect("opened above");
        store.delete(&done, &acks).await?;
        // An engine of this process may be waiting for these sequences (`SinkError::InFlight`).
        super::pending::fire_recorded();
        tracing::trace!(
            batches = done.len(),
            first_id = ids.first().copied().unwrap_or_default(),
            last_id = ids.last().copied().unwrap_or_default(),
            read_us = read.as_micros() as u64,
            publish_us = (published - read).as_micros() as u64,
            delete_us = (started.elapsed() - published).as_micros() as u64,
            "relay cycle"
        );
        let capture = self.stats.capture();
        for batch in &done {
            capture.add_unpublishable(batch.unpublishable.len() as u64);
        }
        let entries: usize = done.iter().map(|b| b.entries.len()).sum();
        capture.add_published(entries as u64, publishes);
        if let Some(e) = failure {
            return Err(e);
        }
        let store = self.store.as_mut().expect("opened above");
        let backlog = store.backlog().await?;
        self.stats.capture().set_backlog(backlog);
        Ok(true)
    }

    fn table(&mut self, name: &str) -> Result<Table<Row>, CaptureError> {
        if let Some(table) = self.tables.get(name) {
            return Ok(table.clone());
        }
        let client = self.client.as_ref().expect("connected by the caller");
        let table = client.rows(name)?;
        self.tables.insert(name.to_owned(), table.clone());
        Ok(table)
    }

    /// Publishes one batch; returns the number of publishes it took and what the server
    /// acknowledged for every outbox id of the batch (`None` for the ones not published).
    async fn publish(&mut self, batch: &Batch) -> Result<(u64, Vec<Ack>), CaptureError> {
        let mut acks: Vec<Ack> = batch
            .unpublishable
            .iter()
            .map(|(id, _)| Ack { id: *id, seq: None })
            .collect();
        if batch.entries.is_empty() {
            return Ok((0, acks));
        }
        let instance = self.config.instance.clone();
        let msg_id = |id: i64| format!("{instance}-{id}");
        // Every batch is one atomic batch, except a batch of one change: that one is a plain
        // message with the same id (see below).
        if self.config.capture.atomic {
            let client = self
                .client
                .as_ref()
                .expect("connected by the caller")
                .clone();
            let mut tx = client.transaction();
            let mut added_ids = Vec::with_capacity(batch.entries.len());
            for entry in &batch.entries {
                let table = self.table(&entry.table)?;
                let added = tx.change_with_msg_id(
                    &table,
                    &entry.key,
                    entry.change.clone(),
                    msg_id(entry.id),
                );
                if added.is_ok() {
                    added_ids.push(entry.id);
                }
                if let Err(e) = added {
                    // What the entry itself holds (a key no subject can carry, a value the
                    // codec refuses): it can never be published.
                    tracing::error!(
                        outbox_id = entry.id,
                        table = %entry.table,
                        error = %e,
                        "captured change cannot be published; it is dropped from the outbox"
                    );
                    self.stats.capture().add_unpublishable(1);
                    acks.push(Ack {
                        id: entry.id,
                        seq: None,
                    });
                }
            }
            if tx.is_empty() {
                return Ok((0, acks));
            }
            // One message is stored whole or not at all, so a plain publish is just as atomic.
            // It is also much faster: nats-server (2.12) stages every atomic batch of an R1 file
            // stream in a file store of its own, created and deleted per batch; in the capture
            // bench a one-message batch took 1.4 ms (p50) where a plain publish took 0.25 ms.
            if let [id] = added_ids[..] {
                let entry = batch
                    .entries
                    .iter()
                    .find(|e| e.id == id)
                    .expect("added above");
                acks.push(self.publish_one(entry, msg_id(id)).await?);
                return Ok((1, acks));
            }
            let committed = tx.commit().await?;
            // The members are stored contiguously, in the order they were added: member i is
            // at `first_seq + i`. Each pending entry gets its change's exact sequence: with
            // the commit member's sequence for every member, the origin skipped the echo of
            // its own earlier member as "older than the pending change", and a remote value
            // that had slipped in (the Postgres window in `pending.rs`) was never repaired. A
            // duplicate whose sequences the server no longer tells (`first_seq` 0) is unknown.
            let exact = committed.first_seq > 0 && committed.count == added_ids.len() as u64;
            acks.extend(added_ids.into_iter().enumerate().map(|(i, id)| Ack {
                id,
                seq: exact.then_some(committed.first_seq + i as u64),
            }));
            tracing::debug!(
                batch = batch.id,
                entries = batch.entries.len(),
                seq = committed.seq,
                duplicate = committed.duplicate,
                "published captured transaction"
            );
            return Ok((1, acks));
        }
        for entry in &batch.entries {
            acks.push(self.publish_one(entry, msg_id(entry.id)).await?);
        }
        Ok((batch.entries.len() as u64, acks))
    }

    /// Publishes one change as a plain message with the id `msg_id`; what the server
    /// acknowledged for it.
    async fn publish_one(&mut self, entry: &Entry, msg_id: String) -> Result<Ack, CaptureError> {
        let table = self.table(&entry.table)?;
        let options = WriteOptions {
            msg_id: Some(msg_id),
            expected_seq: None,
        };
        let published = match &entry.change {
            Change::Upsert(row) => table.upsert_with(&entry.key, row, options).await?,
            Change::Delete => table.delete_with(&entry.key, options).await?,
        };
        Ok(Ack {
            id: entry.id,
            seq: Some(published.seq).filter(|s| *s > 0),
        })
    }
}
