//! The applier's HTTP endpoint (DESIGN §6 `[http]`), started by `run` when `http.listen` is set:
//!
//! - `GET /metrics`: Prometheus metrics in the OpenMetrics text format (which Prometheus
//!   scrapes natively), from the engine's live [`Stats`]; see [`METRIC_NAMES`].
//! - `GET /healthz`: `200 ok` while the process runs.
//! - `GET /readyz`: `200 ready` once a consumer session is running and the lag is at most
//!   `http.ready_max_lag`; else `503` with a one-line reason.
//! - `GET /status`: exactly what `jetsync-applier status --json` prints (same collection
//!   code, [`collect_status`](crate::collect_status)); `503` with the same body when NATS is unavailable.
//!
//! Metrics carry the constant labels `stream` and `instance`. Counters count since the process
//! started (Prometheus handles the reset at a restart).
//!
//! Abuse bounds (`[http]`): a request header must arrive within `header_timeout_ms` (hyper's
//! header read timeout; it also bounds how long a keep-alive connection may wait before its
//! next request), a connection on which nothing is read or written for `idle_timeout_ms` is
//! closed (a client that stops reading its response), and at most `max_connections` are
//! served at once (further clients wait in the listen backlog). `/status` is served from a
//! report cached for [`STATUS_CACHE_TTL`] and refreshed by one request at a time over one
//! long-lived NATS connection of the endpoint, so a flood of `/status` requests opens no NATS
//! connection and sends the server at most one round of requests per TTL.

use std::{
    borrow::Cow,
    fmt, io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use jetsync::Config;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::{Registry, Unit},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{Mutex, OnceCell, Semaphore},
};

use crate::{
    stats::BATCH_SECONDS_BUCKETS,
    status::{collect_status_with, Remote},
    Stats, StatsSnapshot, StatusReport,
};

/// How long `/status` serves a report before one request refreshes it.
pub const STATUS_CACHE_TTL: Duration = Duration::from_millis(500);

/// Listen backlog: clients beyond `http.max_connections` wait here rather than being refused.
const LISTEN_BACKLOG: u32 = 4096;

/// Content type of `/metrics`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prefix of every metric name.
const PREFIX: &str = "jetsync";

/// The metric families `/metrics` exposes (full names; counters get the `_total` suffix on
/// their samples, the histogram `_bucket`, `_sum` and `_count`).
pub const METRIC_NAMES: &[&str] = &[
    "jetsync_applied_seq",
    "jetsync_stream_last_seq",
    "jetsync_lag_events",
    "jetsync_connected",
    "jetsync_parked_events",
    "jetsync_events_applied",
    "jetsync_batches_applied",
    "jetsync_batch_apply_duration_seconds",
    "jetsync_consumer_resets",
    "jetsync_resyncs",
    "jetsync_events_skipped",
    "jetsync_transactions_applied",
    "jetsync_capture_backlog",
    "jetsync_capture_published",
    "jetsync_gap_margin_events",
    "jetsync_gap_margin_seconds",
    "jetsync_fleet_digest_seq",
    "jetsync_fleet_diverged_tables",
    "jetsync_events_coalesced",
];

/// Whether an engine with these counters is ready: connected, and at most `max_lag` events
/// behind. The error is the reason `/readyz` gives.
pub fn readiness(snapshot: &StatsSnapshot, max_lag: u64) -> Result<(), String> {
    if !snapshot.connected {
        return Err(
            "not consuming the stream yet (connecting to NATS or reconciling the consumer)".into(),
        );
    }
    let lag = snapshot.lag();
    if lag > max_lag {
        return Err(format!(
            "lag {lag} events > http.ready_max_lag {max_lag} (applied seq {}, stream last seq {})",
            snapshot.applied_seq, snapshot.stream_last_seq
        ));
    }
    Ok(())
}

/// Whether the capture relay keeps up: at most `capture.ready_max_backlog` rows in the outbox
/// (0 disables the check). Always ready when no table is captured.
pub fn capture_readiness(
    snapshot: &crate::capture::CaptureSnapshot,
    config: &Config,
) -> Result<(), String> {
    let max = config.capture.ready_max_backlog;
    if snapshot.enabled && max > 0 && snapshot.backlog > max {
        return Err(format!(
            "capture backlog {} outbox rows > capture.ready_max_backlog {max}{}",
            snapshot.backlog,
            snapshot
                .error
                .as_deref()
                .map(|e| format!(" (relay: {e})"))
                .unwrap_or_default()
        ));
    }
    Ok(())
}

/// Renders the metrics of `stats` for the instance and stream of `config`, as `/metrics`
/// serves them.
pub fn render_metrics(config: &Config, stats: Arc<Stats>) -> String {
    let registry = registry(config, stats);
    encode(&registry).unwrap_or_default()
}

fn registry(config: &Config, stats: Arc<Stats>) -> Registry {
    let labels = [
        (
            Cow::Borrowed("stream"),
            Cow::Owned(config.stream.name.clone()),
        ),
        (
            Cow::Borrowed("instance"),
            Cow::Owned(config.instance.clone()),
        ),
    ];
    let mut registry = Registry::with_prefix_and_labels(PREFIX, labels.into_iter());
    registry.register_collector(Box::new(StatsCollector(stats)));
    registry
}

fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry)?;
    Ok(body)
}

/// Encodes the engine's [`Stats`] at each scrape.
#[derive(Debug)]
struct StatsCollector(Arc<Stats>);

impl StatsCollector {
    fn gauge(
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        value: u64,
    ) -> fmt::Result {
        let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(value).encode(m)
    }

    fn counter(
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        value: u64,
    ) -> fmt::Result {
        let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(value).encode(m)
    }
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let s = self.0.snapshot();
        let e = &mut encoder;
        Self::gauge(
            e,
            "applied_seq",
            "Last applied stream sequence",
            s.applied_seq,
        )?;
        Self::gauge(
            e,
            "stream_last_seq",
            "Highest stream sequence known to the applier",
            s.stream_last_seq,
        )?;
        Self::gauge(
            e,
            "lag_events",
            "Events waiting to be applied (the consumer's pending count)",
            s.lag(),
        )?;
        Self::gauge(
            e,
            "connected",
            "1 while a consumer session is running, else 0",
            u64::from(s.connected),
        )?;
        Self::gauge(
            e,
            "parked_events",
            "Events parked (poison events and those held behind them)",
            s.parked,
        )?;

        let mut m = e.encode_descriptor(
            "events_applied",
            "Events applied since the process started, by table and operation",
            None,
            MetricType::Counter,
        )?;
        for c in self.0.events_by_table_op() {
            let labels = [("table", c.table.as_str()), ("op", c.op.as_str())];
            ConstCounter::new(c.events).encode(m.encode_family(&labels)?)?;
        }
        Self::counter(
            e,
            "batches_applied",
            "Batches committed since the process started",
            s.batches,
        )?;

        let h = self.0.batch_durations();
        let buckets: Vec<(f64, u64)> = BATCH_SECONDS_BUCKETS
            .iter()
            .copied()
            // The encoder writes f64::MAX as le="+Inf".
            .chain(std::iter::once(f64::MAX))
            .zip(h.buckets)
            .collect();
        let mut m = e.encode_descriptor(
            "batch_apply_duration",
            "Time to apply one batch: sink transaction (with retries) and checkpoint commit",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        m.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &buckets, None)?;

        Self::counter(
            e,
            "consumer_resets",
            "Times the durable consumer was recreated (reconnects, lost deliveries)",
            s.consumer_resets,
        )?;
        Self::counter(e, "resyncs", "Snapshot resyncs", s.resyncs)?;
        Self::counter(
            e,
            "events_skipped",
            "Events acknowledged without being applied (tables not synced here, apply.other_tables = \"skip\")",
            s.events_skipped,
        )?;
        Self::counter(
            e,
            "transactions_applied",
            "Transactions (atomic batches) applied, each in one sink transaction",
            s.transactions_applied,
        )?;
        let c = self.0.capture().snapshot();
        Self::gauge(
            e,
            "capture_backlog",
            "Captured changes waiting in the outbox (0 when no table is captured)",
            c.backlog,
        )?;
        Self::counter(
            e,
            "capture_published",
            "Captured changes (outbox entries) published by this run",
            c.published,
        )?;
        // Fleet gauges (`service.rs`): the family is always described, a sample is present
        // only where the value is known (no sample: no stream limit, no digest taken yet).
        let f = self.0.fleet_gauges();
        for (name, help, value) in [
            (
                "gap_margin_events",
                "Events that may still be published before the stream (max_msgs, max_bytes) drops one this instance has not applied",
                f.gap_margin_events,
            ),
            (
                "gap_margin_seconds",
                "Seconds before the oldest event this instance has not applied expires (stream max_age)",
                f.gap_margin_seconds,
            ),
            (
                "fleet_digest_seq",
                "Applied sequence of this instance's last periodic digest (fleet.digest_interval_ms)",
                f.digest_seq,
            ),
            (
                "fleet_diverged_tables",
                "Tables whose digest differs from the one first recorded by an instance at the same applied sequence (alert when > 0)",
                f.diverged_tables,
            ),
        ] {
            let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            if let Some(value) = value {
                ConstGauge::new(value).encode(m)?;
            }
        }
        Self::counter(
            e,
            "events_coalesced",
            "Applied events whose write a later change of the same row in the same batch replaced (apply.coalesce); also counted in events_applied",
            s.events_coalesced,
        )?;
        Ok(())
    }
}

struct Shared {
    config: Config,
    stats: Arc<Stats>,
    registry: Registry,
    status: StatusCache,
}

/// The `/status` report, refreshed at most every [`STATUS_CACHE_TTL`] by one request at a
/// time (the others wait for it and share its result), over one NATS connection made at the
/// first refresh and kept.
struct StatusCache {
    client: OnceCell<jetsync::Client>,
    last: Mutex<Option<(Instant, Result<StatusReport, String>)>>,
}

impl StatusCache {
    fn new() -> StatusCache {
        StatusCache {
            client: OnceCell::new(),
            last: Mutex::new(None),
        }
    }

    async fn report(&self, config: &Config) -> Result<StatusReport, String> {
        // Holding the lock across the refresh makes concurrent requests wait for it instead
        // of refreshing too.
        let mut last = self.last.lock().await;
        if let Some((at, report)) = last.as_ref() {
            if at.elapsed() < STATUS_CACHE_TTL {
                return report.clone();
            }
        }
        let report = self.refresh(config).await;
        *last = Some((Instant::now(), report.clone()));
        report
    }

    async fn refresh(&self, config: &Config) -> Result<StatusReport, String> {
        let connected = tokio::time::timeout(
            crate::STATUS_NATS_TIMEOUT,
            self.client
                .get_or_try_init(|| async { jetsync::Client::connect(config).await }),
        )
        .await;
        // Without a connection: the same report `status` prints when it cannot connect (the
        // checkpoint half, the reason in `nats_error`); the next refresh connects again.
        let remote = match connected {
            Ok(Ok(client)) => Remote::Use(client),
            Ok(Err(e)) => Remote::Unavailable(format!("{:#}", anyhow::Error::from(e))),
            Err(_) => Remote::Unavailable(format!(
                "timed out after {} s",
                crate::STATUS_NATS_TIMEOUT.as_secs()
            )),
        };
        collect_status_with(config, remote)
            .await
            .map_err(|e| e.to_string())
    }
}

/// The endpoint's routes, for `config`'s instance and the engine counters `stats`
/// ([`crate::Engine::stats`]). Services embedding the engine can mount this in their own server.
pub fn router(config: Config, stats: Arc<Stats>) -> Router {
    let registry = registry(&config, stats.clone());
    let shared = Arc::new(Shared {
        config,
        stats,
        registry,
        status: StatusCache::new(),
    });
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    match encode(&shared.registry) {
        Ok(body) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n",
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    let ready = readiness(&shared.stats.snapshot(), shared.config.http.ready_max_lag)
        .and_then(|()| capture_readiness(&shared.stats.capture().snapshot(), &shared.config));
    match ready {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    match shared.status.report(&shared.config).await {
        Ok(report) => {
            let code = if report.nats_available() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            // The same bytes `status --json` prints (pretty JSON and a newline).
            let body = report.to_json_pretty() + "\n";
            (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// A running HTTP endpoint; dropping it stops serving.
#[derive(Debug)]
pub struct HttpEndpoint {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HttpEndpoint {
    /// Binds `listen` and serves [`router`] on it in a background task, within the limits of
    /// `config.http` (see the module docs).
    pub async fn start(
        listen: SocketAddr,
        config: Config,
        stats: Arc<Stats>,
    ) -> io::Result<HttpEndpoint> {
        let socket = if listen.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(listen)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        let local_addr = listener.local_addr()?;
        let limits = Limits {
            header_timeout: Duration::from_millis(config.http.header_timeout_ms),
            idle_timeout: Duration::from_millis(config.http.idle_timeout_ms),
            max_connections: config.http.max_connections,
        };
        let app = router(config, stats);
        let task = tokio::spawn(serve(listener, app, limits));
        tracing::info!(%local_addr, "HTTP endpoint listening (/metrics, /healthz, /readyz, /status)");
        Ok(HttpEndpoint { local_addr, task })
    }

    /// The address it listens on (the real port when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for HttpEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `[http]` bounds on connections.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header_timeout: Duration,
    idle_timeout: Duration,
    max_connections: usize,
}

/// Accepts connections while fewer than `max_connections` are open and serves each in a task
/// of its own. Aborting this task leaves running connections to finish on their own (each is
/// bounded by the timeouts).
async fn serve(listener: tokio::net::TcpListener, app: Router, limits: Limits) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return; // never closed
        };
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "HTTP endpoint: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            serve_connection(tcp, app, limits).await;
            drop(permit);
        });
    }
}

/// Serves one connection until the client closes it, it breaks the header timeout, or nothing
/// moves on it for the idle timeout.
async fn serve_connection(tcp: TcpStream, app: Router, limits: Limits) {
    let activity = Activity::new();
    let io = hyper_util::rt::TokioIo::new(Tracked {
        inner: tcp,
        activity: activity.clone(),
    });
    let service = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    loop {
        let deadline = activity.last() + limits.idle_timeout;
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                if activity.last() + limits.idle_timeout <= Instant::now() {
                    tracing::debug!("closing an idle HTTP connection");
                    return; // dropping the connection closes the socket
                }
            }
        }
    }
}

/// When a connection last read or wrote something.
#[derive(Clone)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A TCP stream that records its read and write activity.
struct Tracked {
    inner: TcpStream,
    activity: Activity,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Change;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn config() -> Config {
        Config {
            instance: "i-1".into(),
            ..Config::default()
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
        (code, body)
    }

    #[test]
    fn readiness_needs_a_session_and_a_small_lag() {
        let mut s = StatsSnapshot::default();
        assert!(readiness(&s, 10).unwrap_err().contains("not consuming"));
        s.connected = true;
        s.pending = 11;
        assert!(readiness(&s, 10)
            .unwrap_err()
            .contains("lag 11 events > http.ready_max_lag 10"));
        s.pending = 10;
        assert!(readiness(&s, 10).is_ok());
    }

    #[test]
    fn metrics_text() {
        let stats = Arc::new(Stats::default());
        stats.set_applied(5);
        stats.observe_stream(9, 4);
        let change = |seq, op| Change {
            seq,
            table: "items".into(),
            key: "k".into(),
            op,
        };
        stats.add_batch(
            &[
                change(4, jetsync::Change::Upsert(jetsync::Row::new())),
                change(5, jetsync::Change::Delete),
            ],
            Duration::from_millis(2),
        );
        let text = render_metrics(&config(), stats);
        let l = r#"stream="JETSYNC",instance="i-1""#;
        for want in [
            format!("# TYPE jetsync_applied_seq gauge\njetsync_applied_seq{{{l}}} 5\n"),
            format!("jetsync_stream_last_seq{{{l}}} 9\n"),
            format!("jetsync_lag_events{{{l}}} 4\n"),
            format!("jetsync_connected{{{l}}} 0\n"),
            format!("jetsync_parked_events{{{l}}} 0\n"),
            "# TYPE jetsync_events_applied counter\n".to_owned(),
            format!("jetsync_events_applied_total{{{l},table=\"items\",op=\"upsert\"}} 1\n"),
            format!("jetsync_events_applied_total{{{l},table=\"items\",op=\"delete\"}} 1\n"),
            format!("jetsync_batches_applied_total{{{l}}} 1\n"),
            "# TYPE jetsync_batch_apply_duration_seconds histogram\n".to_owned(),
            format!("jetsync_batch_apply_duration_seconds_count{{{l}}} 1\n"),
            format!("jetsync_batch_apply_duration_seconds_bucket{{{l},le=\"0.001\"}} 0\n"),
            format!("jetsync_batch_apply_duration_seconds_bucket{{{l},le=\"0.0025\"}} 1\n"),
            format!("jetsync_batch_apply_duration_seconds_bucket{{{l},le=\"+Inf\"}} 1\n"),
            format!("jetsync_consumer_resets_total{{{l}}} 0\n"),
            format!("jetsync_resyncs_total{{{l}}} 0\n"),
            format!("jetsync_events_skipped_total{{{l}}} 0\n"),
            format!("jetsync_transactions_applied_total{{{l}}} 0\n"),
            format!("jetsync_events_coalesced_total{{{l}}} 0\n"),
        ] {
            assert!(text.contains(&want), "missing {want:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        for name in METRIC_NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing in\n{text}"
            );
        }
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let stats = Arc::new(Stats::default());
        let mut config = config();
        config.http.ready_max_lag = 0;
        let endpoint = HttpEndpoint::start("127.0.0.1:0".parse().unwrap(), config, stats.clone())
            .await
            .unwrap();
        let addr = endpoint.local_addr();
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503, "{body}");
        let session = stats.session_started();
        stats.observe_stream(3, 1);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("lag 1 events"), "{body}");
        stats.set_applied(3);
        stats.observe_stream(3, 0);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            body.contains("jetsync_connected{stream=\"JETSYNC\",instance=\"i-1\"} 1\n"),
            "{body}"
        );
        drop(session);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        assert_eq!(get(addr, "/nope").await.0, 404);
    }
}
