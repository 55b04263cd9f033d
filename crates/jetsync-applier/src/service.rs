//! The fleet member: what a running applier does so that the fleet can be seen from one place
//! (DESIGN §5 "Fleet", issue #15). Started by `run` beside the engine; it never touches the
//! engine's state, only reads what `status` and `digest` read, so it cannot slow the apply loop
//! beyond a shared CPU.
//!
//! - **NATS service protocol.** It registers as service [`SERVICE_NAME`] (metadata: instance,
//!   stream, version, sink), so `$SRV.PING|INFO|STATS` (and `.jetsync`) list every instance,
//!   with two endpoints on subjects shared by the sync group and a queue group per instance,
//!   so that one request reaches every instance of the group (scatter-gather):
//!   `$JETSYNC.<stream>.status` answers the `status --json` document with a `run` section
//!   (version, start, last error), `$JETSYNC.<stream>.digest` the [`DigestReport`] taken at
//!   one applied sequence, from a connection of its own to the sink (SQLite readers never block
//!   the applier's writer).
//! - **Reports.** Every `fleet.report_interval_ms` it refreshes the report (stream info and
//!   consumer info: two requests) and writes it to the key-value bucket
//!   `jetsync_fleet_<stream>` under the instance id, so `fleet` can show an instance that
//!   stopped answering from its last report. With the gap margin (see `gap.rs`) it updates the
//!   `/metrics` gauges and warns in the log below `apply.gap_warn_events|seconds`.
//! - **Convergence.** At most every `fleet.digest_interval_ms`, once it has caught up with the
//!   stream at a new applied sequence, it digests its tables and records the digest in the
//!   bucket `jetsync_digests_<stream>` under that sequence unless an instance already did
//!   (first writer wins, entries expire after a day); a different recorded digest sets
//!   `jetsync_fleet_diverged_tables`. Each instance writes and reads one key per digest: the
//!   cost does not grow with the number of instances.
//!
//! A user without the rights to create the buckets (the least-privilege applier of
//! `nats-config/accounts.conf`) uses them once `provision` created them; until then it logs
//! one warning and answers the service requests only.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::{
    jetstream::{self, kv},
    service::{self, ServiceExt},
};
use bytes::Bytes;
use futures::StreamExt;
use jetsync::{Config, SinkKind};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::{
    build_sink, consistent_digest,
    gap::{GapMargin, GapThresholds, StreamLimits},
    status::{collect_status_with, Remote, RunInfo},
    DigestReport, LastError, Stats, StatusReport,
};

/// The service name every applier registers under.
pub const SERVICE_NAME: &str = "jetsync";

/// How long `run` waits for the first report before starting the engine: a gap-margin warning
/// is logged before the applier catches up, and a server that is down delays nothing more.
const FIRST_CONTACT: Duration = Duration::from_secs(3);
/// How long a `status` request that arrives before the first report waits for it.
const FIRST_REPORT_WAIT: Duration = Duration::from_secs(2);
/// How often the stream's limits are read again for the warning thresholds.
const LIMITS_EVERY: Duration = Duration::from_secs(60);
/// How often a low margin is logged again while it stays low.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// After this long the engine has certainly opened its checkpoint store.
const ENGINE_OPEN_GRACE: Duration = Duration::from_secs(5);
/// How long digest references are kept.
const DIGEST_REFERENCE_AGE: Duration = Duration::from_secs(24 * 3600);
/// Delay before trying again to open the buckets after a failure.
const BUCKET_RETRY: Duration = Duration::from_secs(30);

/// `$JETSYNC.<stream>.<endpoint>`: the subject of a service endpoint of sync group `stream`.
pub fn service_subject(stream: &str, endpoint: &str) -> String {
    format!("$JETSYNC.{stream}.{endpoint}")
}

/// The key-value bucket holding the last report of every instance of `stream`.
pub fn fleet_bucket(stream: &str) -> String {
    format!("jetsync_fleet_{stream}")
}

/// The key-value bucket holding the first digest recorded at each applied sequence.
pub fn digest_bucket(stream: &str) -> String {
    format!("jetsync_digests_{stream}")
}

/// The sink kind's configuration name.
pub(crate) fn sink_name(kind: SinkKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{kind:?}").to_lowercase())
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Opens the bucket `name`, creating it (history 1, the stream's replicas, file storage) when
/// it is missing and the user may.
pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    // The bucket's stream is created by hand with the settings of a key-value bucket (last
    // value per key, rollups, no deletes of messages, direct gets) and only fields 2.9 knows:
    // async-nats' own `create_key_value` cannot read nats-server 2.9.10's reply.
    let stream = jetstream::stream::Config {
        name: format!("KV_{name}"),
        description: Some("jetsync fleet reports (jetsync-applier fleet)".to_owned()),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        duplicate_window: if max_age.is_zero() {
            Duration::from_secs(120)
        } else {
            max_age.min(Duration::from_secs(120))
        },
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: replicas.max(1),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let created = js.get_or_create_stream(stream).await;
    if let Err(e) = created {
        return Err(format!(
            "cannot open or create the key-value bucket {name}: {e}"
        ));
    }
    js.get_key_value(name)
        .await
        .map_err(|e| format!("cannot open the key-value bucket {name}: {e}"))
}

/// Creates the fleet buckets of `config`'s sync group (for `provision`, run by a user that may
/// create streams).
pub async fn provision_fleet_buckets(
    js: &jetstream::Context,
    config: &Config,
) -> Result<(), String> {
    let replicas = config.stream.replicas;
    open_bucket(
        js,
        &fleet_bucket(&config.stream.name),
        replicas,
        Duration::ZERO,
    )
    .await?;
    open_bucket(
        js,
        &digest_bucket(&config.stream.name),
        replicas,
        DIGEST_REFERENCE_AGE,
    )
    .await?;
    Ok(())
}

/// The fleet member of a running applier; dropping it deregisters the service (without the
/// final report [`FleetMember::stop`] writes).
#[derive(Debug)]
pub struct FleetMember {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FleetMember {
    /// Starts the fleet member of `config`'s instance, reading the engine's counters `stats`
    /// and the log's `last_error`. Waits for its first report (bounded by a few seconds, so a
    /// server that is down delays nothing): a low gap margin is then logged before the engine
    /// starts catching up. With `fleet.enabled = false` it does nothing.
    pub async fn start(config: Config, stats: Arc<Stats>, last_error: LastError) -> FleetMember {
        if !config.fleet.enabled {
            return FleetMember {
                stop: None,
                task: None,
            };
        }
        let (stop, stopped) = oneshot::channel();
        let mut member = Member::new(config, stats, last_error);
        let _ = tokio::time::timeout(FIRST_CONTACT, member.first_contact()).await;
        let task = tokio::spawn(member.run(stopped));
        FleetMember {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Writes a last report (the applied sequence the engine stopped at, which `fleet` then
    /// shows for this instance) and deregisters the service; bounded by a few seconds. Call it
    /// after the engine stopped.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(FIRST_CONTACT, task).await;
        }
    }
}

impl Drop for FleetMember {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What the background task of a [`FleetMember`] keeps.
struct Member {
    /// The configuration, the engine's counters and the last report, shared with the answer
    /// task of each registration.
    live: Live,
    client: Option<jetsync::Client>,
    service: Option<Registered>,
    /// The last report, for the answer task ([`Live`]).
    reports: watch::Sender<Option<StatusReport>>,
    fleet_bucket: Option<kv::Store>,
    digest_bucket: Option<kv::Store>,
    bucket_retry_at: Option<Instant>,
    bucket_warned: bool,
    /// Warning thresholds and when the stream's limits were read for them.
    thresholds: Option<(Instant, GapThresholds)>,
    last_warning: Option<Instant>,
    /// One digest at a time (requests and the periodic one), on a connection of its own.
    digesting: Arc<Semaphore>,
    /// The applied sequence of the last periodic digest, and when it was taken.
    periodic: Option<(u64, Instant)>,
    /// Results of periodic digests, sent back from their tasks.
    digests: (
        mpsc::UnboundedSender<DigestReport>,
        mpsc::UnboundedReceiver<DigestReport>,
    ),
}

/// The service registration and the task answering its two endpoints.
struct Registered {
    service: service::Service,
    /// Answers `status` and `digest` requests; it ends when an endpoint's subscription ended
    /// (the member then registers again).
    answers: tokio::task::JoinHandle<()>,
}

impl Registered {
    async fn stop(self) {
        self.answers.abort();
        let _ = self.service.stop().await;
    }
}

/// What answering a `status` request needs, shared by the member and its answer task: the
/// last report and the engine's live counters. Requests are answered by a task of their own,
/// never behind a report round (stream and consumer info, bucket writes), which can take
/// seconds on a busy cluster while `fleet` waits 3 s for answers.
#[derive(Clone)]
struct Live {
    config: Config,
    stats: Arc<Stats>,
    last_error: LastError,
    started_at_ms: u64,
    reports: watch::Receiver<Option<StatusReport>>,
}

impl Member {
    fn new(config: Config, stats: Arc<Stats>, last_error: LastError) -> Member {
        let (reports, receiver) = watch::channel(None);
        Member {
            live: Live {
                config,
                stats,
                last_error,
                started_at_ms: now_ms(),
                reports: receiver,
            },
            client: None,
            service: None,
            reports,
            fleet_bucket: None,
            digest_bucket: None,
            bucket_retry_at: None,
            bucket_warned: false,
            thresholds: None,
            last_warning: None,
            digesting: Arc::new(Semaphore::new(1)),
            periodic: None,
            digests: mpsc::unbounded_channel(),
        }
    }

    /// Connects, registers and makes the first report.
    async fn first_contact(&mut self) {
        if self.ensure_connected().await {
            self.report_round().await;
        }
    }

    async fn run(mut self, mut stopped: oneshot::Receiver<()>) {
        let every = Duration::from_millis(self.live.config.fleet.report_interval_ms);
        // The first report was made before the engine started; the next ones read the
        // checkpoint store only once the engine has opened it (see `engine_opened`).
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stopped => {
                    // The last report: what `fleet` shows once this instance stops answering.
                    if self.client.is_some() {
                        self.report_round().await;
                    }
                    break;
                }
                Some(digest) = self.digests.1.recv() => self.check_convergence(digest).await,
                _ = tick.tick() => {
                    if !self.engine_opened() {
                        continue;
                    }
                    if self.ensure_connected().await {
                        self.report_round().await;
                    }
                }
            }
        }
        if let Some(registered) = self.service.take() {
            registered.stop().await;
        }
    }

    /// Whether the engine has (very likely) opened its checkpoint store, which it does first
    /// thing: a read-only open of the store by a report at that very moment would make the
    /// engine's exclusive open fail as if a second `run` held it. Connected, something applied,
    /// or a few seconds after the start.
    fn engine_opened(&self) -> bool {
        let s = self.live.stats.snapshot();
        s.connected
            || s.applied_seq > 0
            || now_ms().saturating_sub(self.live.started_at_ms)
                > ENGINE_OPEN_GRACE.as_millis() as u64
    }

    /// Connects and registers the service unless done; false while NATS is unreachable (the
    /// next tick tries again).
    async fn ensure_connected(&mut self) -> bool {
        if self.client.is_none() {
            match jetsync::Client::connect(&self.live.config).await {
                Ok(client) => self.client = Some(client),
                Err(e) => {
                    tracing::debug!(error = %e, "fleet: cannot connect to NATS yet");
                    return false;
                }
            }
        }
        // An endpoint's subscription ended: register again.
        if let Some(old) = self.service.take_if(|r| r.answers.is_finished()) {
            old.stop().await;
        }
        if self.service.is_none() {
            match self.register().await {
                Ok(registered) => {
                    tracing::info!(
                        service = SERVICE_NAME,
                        subject = %service_subject(&self.live.config.stream.name, "status"),
                        "registered with the NATS service protocol"
                    );
                    self.service = Some(registered);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fleet: cannot register the NATS service; retrying");
                    return false;
                }
            }
        }
        true
    }

    async fn register(&self) -> Result<Registered, async_nats::Error> {
        let client = self.client.as_ref().expect("connected").nats().clone();
        let config = &self.live.config;
        let metadata: HashMap<String, String> = [
            ("instance", config.instance.clone()),
            ("stream", config.stream.name.clone()),
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("sink", sink_name(config.sink.kind)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let stats = self.live.stats.clone();
        let service = client
            .service_builder()
            .description(format!(
                "jetsync applier of instance {} (stream {})",
                config.instance, config.stream.name
            ))
            .metadata(metadata)
            .stats_handler(move |_endpoint, _stats| {
                let s = stats.snapshot();
                serde_json::json!({
                    "applied_seq": s.applied_seq,
                    "lag": s.lag(),
                    "parked": s.parked,
                    "connected": s.connected,
                })
            })
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await?;
        // A queue group per instance: a request on the shared subject reaches every instance.
        let queue = config.consumer_name();
        let status = service
            .endpoint_builder()
            .name("status")
            .queue_group(&queue)
            .add(service_subject(&config.stream.name, "status"))
            .await?;
        let digest = service
            .endpoint_builder()
            .name("digest")
            .queue_group(&queue)
            .add(service_subject(&config.stream.name, "digest"))
            .await?;
        let answers = tokio::spawn(answer(
            status,
            digest,
            self.live.clone(),
            self.digesting.clone(),
        ));
        Ok(Registered { service, answers })
    }

    /// A fresh status report with the `run` section.
    async fn collect(&mut self) -> StatusReport {
        let remote = match &self.client {
            Some(client) => Remote::Use(client),
            None => Remote::Unavailable("not connected to NATS yet".into()),
        };
        let report = match collect_status_with(&self.live.config, remote).await {
            Ok(report) => report,
            Err(e) => StatusReport {
                instance: self.live.config.instance.clone(),
                groups: Vec::new(),
                capture: None,
                run: None,
            }
            .with_error(e.to_string()),
        };
        let report = self.live.with_live_counters(report);
        self.reports.send_replace(Some(report.clone()));
        report
    }

    /// One report round: refresh, gauges and warning, write to the bucket, maybe a digest.
    async fn report_round(&mut self) {
        let report = self.collect().await;
        let Some(group) = report.groups.first().cloned() else {
            return;
        };
        if group.nats_error.is_none() {
            self.live.stats.update_fleet_gauges(|g| {
                g.gap_margin_events = group.gap_margin_events;
                g.gap_margin_seconds = group.gap_margin_seconds;
            });
            self.warn_if_low(&group).await;
        }
        self.open_buckets().await;
        if let Some(bucket) = &self.fleet_bucket {
            match serde_json::to_vec(&report) {
                Ok(body) => {
                    if let Err(e) = bucket.put(&self.live.config.instance, body.into()).await {
                        tracing::debug!(error = %e, "fleet: writing the status report failed");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "fleet: cannot serialise the report"),
            }
        }
        self.maybe_digest(&group);
    }

    /// Logs a warning while the margin to a gap is below the thresholds (again every
    /// [`WARN_EVERY`] while it stays there), and once when it recovers.
    async fn warn_if_low(&mut self, group: &crate::GroupStatus) {
        let margin = GapMargin {
            events: group.gap_margin_events,
            seconds: group.gap_margin_seconds,
        };
        if !margin.is_limited() {
            return;
        }
        let stale = self
            .thresholds
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= LIMITS_EVERY);
        if stale {
            if let Some(client) = &self.client {
                let js = client.jetstream();
                if let Ok(mut stream) = js.get_stream(&self.live.config.stream.name).await {
                    if let Ok(info) = stream.info().await {
                        let limits = StreamLimits::of(info);
                        self.thresholds = Some((
                            Instant::now(),
                            GapThresholds::new(&self.live.config.apply, &limits),
                        ));
                    }
                }
            }
        }
        let Some((_, thresholds)) = &self.thresholds else {
            return;
        };
        match thresholds.breached(&margin) {
            Some(why) => {
                if self
                    .last_warning
                    .is_none_or(|at| at.elapsed() >= WARN_EVERY)
                {
                    self.last_warning = Some(Instant::now());
                    tracing::warn!(
                        stream = %group.stream,
                        applied = group.applied_seq,
                        lag = group.lag,
                        gap_margin_events = group.gap_margin_events,
                        gap_margin_seconds = group.gap_margin_seconds,
                        "close to a gap: the stream's limits will drop events this instance has not applied after {why}; catch up, or raise the stream's limits (apply.gap_warn_events|seconds set the threshold)"
                    );
                }
            }
            None => {
                if self.last_warning.take().is_some() {
                    tracing::info!(
                        gap_margin_events = group.gap_margin_events,
                        gap_margin_seconds = group.gap_margin_seconds,
                        "the margin to a gap is back above the warning threshold"
                    );
                }
            }
        }
    }

    async fn open_buckets(&mut self) {
        if self.fleet_bucket.is_some() && self.digest_bucket.is_some() {
            return;
        }
        if self.bucket_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let Some(client) = &self.client else { return };
        let js = client.jetstream();
        let replicas = self.live.config.stream.replicas;
        let stream = &self.live.config.stream.name;
        let opened = async {
            let fleet = open_bucket(js, &fleet_bucket(stream), replicas, Duration::ZERO).await?;
            let digests =
                open_bucket(js, &digest_bucket(stream), replicas, DIGEST_REFERENCE_AGE).await?;
            Ok::<_, String>((fleet, digests))
        };
        match opened.await {
            Ok((fleet, digests)) => {
                self.fleet_bucket = Some(fleet);
                self.digest_bucket = Some(digests);
                if self.bucket_warned {
                    tracing::info!("fleet: the report buckets are available now");
                }
                self.bucket_warned = false;
            }
            Err(e) => {
                self.bucket_retry_at = Some(Instant::now() + BUCKET_RETRY);
                if !self.bucket_warned {
                    self.bucket_warned = true;
                    tracing::warn!(
                        error = %e,
                        "fleet: no status reports are written (`fleet` then shows this instance only while it answers); run `jetsync-applier provision` as a user that may create streams"
                    );
                }
            }
        }
    }

    /// Starts a periodic digest when due: caught up, at a new applied sequence, and
    /// `fleet.digest_interval_ms` after the last one.
    fn maybe_digest(&mut self, group: &crate::GroupStatus) {
        let every = self.live.config.fleet.digest_interval_ms;
        if every == 0
            || self.live.config.sink.kind == SinkKind::Redb
            || self.digest_bucket.is_none()
        {
            return;
        }
        if group.nats_error.is_some() || group.lag != Some(0) || !self.engine_opened() {
            return;
        }
        if let Some((seq, at)) = self.periodic {
            if seq == group.applied_seq || at.elapsed() < Duration::from_millis(every) {
                return;
            }
        }
        let Ok(permit) = self.digesting.clone().try_acquire_owned() else {
            return;
        };
        self.periodic = Some((group.applied_seq, Instant::now()));
        let config = self.live.config.clone();
        let results = self.digests.0.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match take_digest(&config).await {
                Ok(report) => {
                    let _ = results.send(report);
                }
                Err(e) => tracing::debug!(error = %e, "fleet: periodic digest failed"),
            }
        });
    }

    /// Records `digest` as the reference at its applied sequence unless an instance already
    /// did, and counts the tables that differ from the reference.
    async fn check_convergence(&mut self, digest: DigestReport) {
        let Some(bucket) = &self.digest_bucket else {
            return;
        };
        let key = digest.applied_seq.to_string();
        let mine: BTreeMap<&str, &crate::TableDigest> = digest
            .tables
            .iter()
            .map(|t| (t.table.as_str(), t))
            .collect();
        let body = match serde_json::to_vec(&digest) {
            Ok(body) => Bytes::from(body),
            Err(_) => return,
        };
        let reference = match bucket.create(&key, body).await {
            Ok(_) => None,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match bucket.get(&key).await {
                    Ok(Some(value)) => serde_json::from_slice::<DigestReport>(&value).ok(),
                    _ => return,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "fleet: recording the digest reference failed");
                return;
            }
        };
        let diverged = match &reference {
            None => 0,
            Some(reference) => {
                let theirs: BTreeMap<&str, &crate::TableDigest> = reference
                    .tables
                    .iter()
                    .map(|t| (t.table.as_str(), t))
                    .collect();
                let names: std::collections::BTreeSet<&str> =
                    mine.keys().chain(theirs.keys()).copied().collect();
                let differ: Vec<&str> = names
                    .into_iter()
                    .filter(|t| mine.get(t) != theirs.get(t))
                    .collect();
                if !differ.is_empty() {
                    tracing::warn!(
                        applied = digest.applied_seq,
                        reference = %reference.instance,
                        tables = ?differ,
                        "digest differs from the one {} recorded at the same applied sequence: the instances diverged (run `jetsync-applier fleet --digest`)",
                        reference.instance
                    );
                }
                differ.len() as u64
            }
        };
        self.live.stats.update_fleet_gauges(|g| {
            g.digest_seq = Some(digest.applied_seq);
            g.diverged_tables = Some(diverged);
        });
    }
}

impl Live {
    /// `report` brought up to the engine's live counters (no I/O): the applied sequence (the
    /// checkpoint `status` reads may trail the engine by one lazy commit; a sink with a fence
    /// commits it every 200 ms), the lag, and the `run` section.
    fn with_live_counters(&self, mut report: StatusReport) -> StatusReport {
        let live = self.stats.snapshot();
        for g in &mut report.groups {
            if live.applied_seq > g.applied_seq {
                let moved = live.applied_seq - g.applied_seq;
                g.applied_seq = live.applied_seq;
                if let Some(lag) = g.lag {
                    let fewer = lag.min(moved);
                    g.lag = Some(lag - fewer);
                    g.gap_margin_events = g.gap_margin_events.map(|m| m.saturating_add(fewer));
                }
            }
            if live.connected && live.stream_last_seq >= g.stream_last_seq.unwrap_or(0) {
                g.stream_last_seq = Some(live.stream_last_seq);
                g.lag = Some(live.lag());
            }
        }
        report.run = Some(RunInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            sink: sink_name(self.config.sink.kind),
            started_at_ms: self.started_at_ms,
            reported_at_ms: now_ms(),
            connected: live.connected,
            last_error: self.last_error.get(),
        });
        report
    }
}

/// Answers the `status` and `digest` requests of one registration until an endpoint's
/// subscription ends.
async fn answer(
    mut status: service::endpoint::Endpoint,
    mut digest: service::endpoint::Endpoint,
    mut live: Live,
    digesting: Arc<Semaphore>,
) {
    loop {
        tokio::select! {
            request = status.next() => match request {
                Some(request) => answer_status(&mut live, request).await,
                None => break,
            },
            request = digest.next() => match request {
                Some(request) => answer_digest(&live.config, &digesting, request),
                None => break,
            },
        }
    }
}

/// Answers from the last report brought up to the engine's live counters, without I/O, so a
/// request is answered at once even on a busy machine. Before the first report it waits for it
/// (bounded), then answers with what the counters say.
async fn answer_status(live: &mut Live, request: service::Request) {
    if live.reports.borrow().is_none() {
        let _ =
            tokio::time::timeout(FIRST_REPORT_WAIT, live.reports.wait_for(Option::is_some)).await;
    }
    let last = live.reports.borrow().clone();
    let report = last.unwrap_or_else(|| {
        StatusReport {
            instance: live.config.instance.clone(),
            groups: Vec::new(),
            capture: None,
            run: None,
        }
        .with_error("no status report made yet (starting)".to_owned())
    });
    let report = live.with_live_counters(report);
    let body = serde_json::to_vec(&report).unwrap_or_default();
    if let Err(e) = request.respond(Ok(body.into())).await {
        tracing::debug!(error = %e, "fleet: answering a status request failed");
    }
}

/// Takes the digest on a task of its own (one at a time) and answers with it.
fn answer_digest(config: &Config, digesting: &Arc<Semaphore>, request: service::Request) {
    let config = config.clone();
    let digesting = digesting.clone();
    tokio::spawn(async move {
        let answer = match digesting.acquire_owned().await {
            Ok(_permit) => take_digest(&config).await,
            Err(_) => Err("shutting down".to_owned()),
        };
        let response = match answer {
            Ok(report) => Ok(serde_json::to_vec(&report).unwrap_or_default().into()),
            Err(status) => Err(service::error::Error { status, code: 500 }),
        };
        if let Err(e) = request.respond(response).await {
            tracing::debug!(error = %e, "fleet: answering a digest request failed");
        }
    });
}

/// [`digest_blocking_work`] on a blocking thread: opening and reading the sink are synchronous
/// calls (SQLite waits for a lock the engine holds), which must never occupy the runtime's
/// workers the engine and the service requests run on.
pub(crate) async fn take_digest(config: &Config) -> Result<DigestReport, String> {
    let config = config.clone();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(digest_blocking_work(&config)))
        .await
        .map_err(|e| format!("digest task failed: {e}"))?
}

/// The digest of `config`'s sink at one applied sequence, over a sink connection of its own.
async fn digest_blocking_work(config: &Config) -> Result<DigestReport, String> {
    if config.sink.kind == SinkKind::Redb {
        return Err(
            "the redb sink cannot be read by another handle while `run` holds it: digest it \
             through the embedding service's Replica, or stop `run` and use `digest`"
                .to_owned(),
        );
    }
    let mut sink = build_sink(config).await.map_err(|e| e.to_string())?;
    let (applied_seq, tables) = consistent_digest(&mut sink, &config.stream.name)
        .await
        .map_err(|e| e.to_string())?;
    Ok(DigestReport {
        instance: config.instance.clone(),
        applied_seq,
        tables,
    })
}

impl StatusReport {
    /// A report that only says why it could not be made.
    fn with_error(mut self, error: String) -> StatusReport {
        self.groups.push(crate::GroupStatus {
            stream: String::new(),
            applied_seq: 0,
            applied_events: 0,
            stream_first_seq: None,
            stream_last_seq: None,
            lag: None,
            consumer: None,
            parked: 0,
            transactions_applied: 0,
            parked_transactions: 0,
            nats_error: Some(error),
            gap_margin_events: None,
            gap_margin_seconds: None,
        });
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            service_subject("CATALOG", "status"),
            "$JETSYNC.CATALOG.status"
        );
        assert_eq!(fleet_bucket("CATALOG"), "jetsync_fleet_CATALOG");
        assert_eq!(digest_bucket("CATALOG"), "jetsync_digests_CATALOG");
        assert_eq!(sink_name(SinkKind::Sqlite), "sqlite");
        assert_eq!(sink_name(SinkKind::Postgres), "postgres");
    }
}
