//! The HTTP endpoint of `jetsync-applier run` (`[http] listen`): `/metrics` parses as
//! Prometheus (OpenMetrics) text and follows a backlog down to lag 0, `/readyz` is 503 while a
//! large backlog is pending and 200 after, `/status` equals `status --json`, and JSON logs are
//! JSON.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use jetsync::{Row, Value};
use jetsync_e2e::{heavy, http_get, wait_http_up, wait_until, Group, Instance, SinkKind};
use jetsync_testkit::NatsServer;

/// Events of the backlog scenario (distinct keys, so the compacted stream keeps them all).
const BACKLOG_EVENTS: u64 = 200_000;

// ---- A small Prometheus / OpenMetrics text parser. ----

/// One sample line.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: metric family → type, and the samples in order.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The family a sample name belongs to, given the declared types.
fn family_of<'a>(types: &'a BTreeMap<String, String>, name: &str) -> Option<(&'a str, &'a str)> {
    if let Some((family, kind)) = types.get_key_value(name) {
        return Some((family, kind));
    }
    for (suffix, kinds) in [
        ("_total", &["counter"][..]),
        ("_created", &["counter", "histogram", "summary"][..]),
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            if let Some((family, kind)) = types.get_key_value(base) {
                if kinds.contains(&kind.as_str()) {
                    return Some((family, kind));
                }
            }
        }
    }
    None
}

fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (key, after) = rest.split_once("=\"").context("label without =\"")?;
        ensure!(valid_name(key), "bad label name {key:?}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => bail!("bad escape {other:?} in label {key}"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated value of label {key}"),
            }
        };
        ensure!(
            labels.insert(key.to_owned(), value).is_none(),
            "label {key} repeated"
        );
        rest = &after[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else {
            ensure!(rest.starts_with('}'), "expected , or }} after label {key}");
        }
    }
}

fn parse_value(text: &str) -> Result<f64> {
    Ok(match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        t => t
            .parse()
            .with_context(|| format!("bad sample value {t:?}"))?,
    })
}

/// Parses the text format: `# HELP`/`# TYPE`/`# UNIT` lines, samples `name{labels} value`
/// belonging to a declared family, the `# EOF` terminator; checks histograms are cumulative.
fn parse_exposition(text: &str) -> Result<Exposition> {
    let mut out = Exposition::default();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        ensure!(!eof, "content after # EOF at {}", at());
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (keyword, name, rest) = (parts.next(), parts.next(), parts.next());
            let name = name.with_context(at)?;
            ensure!(valid_name(name), "bad metric name at {}", at());
            match keyword {
                Some("TYPE") => {
                    let kind = rest.with_context(at)?;
                    ensure!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "untyped",
                            "unknown",
                            "info",
                            "stateset",
                            "gaugehistogram"
                        ]
                        .contains(&kind),
                        "unknown type at {}",
                        at()
                    );
                    ensure!(
                        out.types.insert(name.to_owned(), kind.to_owned()).is_none(),
                        "family declared twice at {}",
                        at()
                    );
                }
                Some("HELP") | Some("UNIT") => {}
                _ => bail!("unknown comment at {}", at()),
            }
            continue;
        }
        ensure!(!line.is_empty(), "empty line at {}", at());
        let name_end = line
            .find(['{', ' '])
            .with_context(|| format!("no value at {}", at()))?;
        let name = &line[..name_end];
        ensure!(valid_name(name), "bad sample name at {}", at());
        ensure!(
            family_of(&out.types, name).is_some(),
            "sample of an undeclared family at {}",
            at()
        );
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(after) => parse_labels(after).with_context(at)?,
            None => (BTreeMap::new(), &line[name_end..]),
        };
        let rest = rest
            .strip_prefix(' ')
            .with_context(|| format!("no space before the value at {}", at()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or_default()).with_context(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<f64>()
                .with_context(|| format!("bad timestamp at {}", at()))?;
        }
        ensure!(fields.next().is_none(), "trailing text at {}", at());
        out.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    ensure!(eof, "no # EOF terminator");
    // Histograms: cumulative buckets, ending with +Inf equal to _count.
    for (family, kind) in &out.types {
        if kind != "histogram" {
            continue;
        }
        let buckets: Vec<&Sample> = out
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
            .collect();
        ensure!(!buckets.is_empty(), "histogram {family} without buckets");
        ensure!(
            buckets.windows(2).all(|w| w[0].value <= w[1].value),
            "histogram {family}: buckets not cumulative"
        );
        let last = buckets[buckets.len() - 1];
        ensure!(
            last.labels.get("le").map(String::as_str) == Some("+Inf"),
            "histogram {family}: last bucket is not +Inf"
        );
        let count = out
            .samples
            .iter()
            .find(|s| s.name == format!("{family}_count"))
            .with_context(|| format!("histogram {family} without _count"))?;
        ensure!(
            count.value == last.value,
            "histogram {family}: +Inf bucket {} != count {}",
            last.value,
            count.value
        );
    }
    Ok(out)
}

impl Exposition {
    /// The value of the sample `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.value(name, labels)
            .with_context(|| format!("no sample {name}{labels:?}"))
    }
}

fn scrape(addr: SocketAddr) -> Result<Exposition> {
    let r = http_get(addr, "/metrics")?;
    ensure!(r.code == 200, "/metrics answered {}: {}", r.code, r.body);
    let content_type = r.content_type.unwrap_or_default();
    ensure!(
        content_type.starts_with("application/openmetrics-text")
            || content_type.starts_with("text/plain"),
        "/metrics content type {content_type:?}"
    );
    parse_exposition(&r.body).with_context(|| format!("parsing /metrics:\n{}", r.body))
}

#[test]
fn exposition_parser_rejects_garbage() {
    let good = "# HELP a_b x.\n# TYPE a_b counter\na_b_total{l=\"v\\\"\"} 1\n# TYPE h histogram\nh_sum 0.5\nh_count 2\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n# EOF\n";
    let parsed = parse_exposition(good).unwrap();
    assert_eq!(parsed.get("a_b_total", &[("l", "v\"")]).unwrap(), 1.0);
    for bad in [
        "a 1\n# EOF\n",                                                    // undeclared
        "# TYPE a gauge\na 1\n",                                           // no EOF
        "# TYPE a gauge\na{l=\"x} 1\n# EOF\n",                             // unterminated label
        "# TYPE a gauge\na one\n# EOF\n",                                  // bad value
        "# TYPE a gauge\na_total 1\n# EOF\n",                              // suffix of a gauge
        "# TYPE h histogram\nh_count 2\nh_bucket{le=\"+Inf\"} 1\n# EOF\n", // count mismatch
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

// ---- Scenarios. ----

/// Publishes `n` upserts with distinct keys to table `items`, pipelined; returns the last seq.
async fn publish_backlog(group: &Group, n: u64) -> Result<u64> {
    let client = group.client("backlog").await?;
    let items = client.rows("items")?;
    let mut pipeline = items.pipeline();
    for i in 0..n {
        let key = format!("k{i}");
        let mut row = Row::new();
        row.insert("id".into(), Value::Text(key.clone()));
        row.insert("n".into(), Value::I64(i as i64));
        pipeline.upsert(&key, &row).await?;
    }
    let published = pipeline.finish().await?;
    ensure!(published.len() as u64 == n, "missing acknowledgements");
    Ok(published.iter().map(|p| p.seq).max().unwrap_or(0))
}

/// `/readyz` is 503 (lag above `ready_max_lag`) while a 200k-event backlog is applied in
/// batches of 100, then 200; `/metrics` parses, shows the lag falling to 0, and counts every
/// event by table and op.
#[test]
fn readyz_and_metrics_follow_a_backlog() -> Result<()> {
    let _heavy = heavy();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(backlog())
}

async fn backlog() -> Result<()> {
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let mut group = Group::new(server.url(), "HTTPB", "httpb");
    group.extra_toml = "[apply]\nbatch_max = 100\n".into();
    let mut instance = Instance::new(&group, root.path(), "h1", SinkKind::Sqlite)?;
    // This scenario is about replaying a backlog, not joining from a snapshot.
    instance.set_option("apply", "bootstrap", "false")?;
    let addr = instance.enable_http("")?;
    let (code, _, err) = instance.cli(&["provision"])?;
    assert_eq!(code, 0, "provision: {err}");

    let started = Instant::now();
    let last = publish_backlog(&group, BACKLOG_EVENTS).await?;
    eprintln!(
        "published {BACKLOG_EVENTS} events up to seq {last} in {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    instance.start()?;
    wait_http_up(addr, Duration::from_secs(30))?;
    assert_eq!(http_get(addr, "/healthz")?.code, 200);

    // Poll /readyz (and /metrics) right away: a 503 for the lag must show up.
    let mut lag_503 = None;
    let mut max_lag_seen = 0.0_f64;
    let ready_at = wait_until("/readyz to answer 200", Duration::from_secs(600), || {
        let r = http_get(addr, "/readyz").ok()?;
        if let Ok(m) = scrape(addr) {
            max_lag_seen = max_lag_seen.max(m.value("jetsync_lag_events", &[]).unwrap_or(0.0));
        }
        match r.code {
            200 => Some(started.elapsed()),
            503 => {
                if lag_503.is_none() && r.body.contains("lag") {
                    lag_503 = Some((started.elapsed(), r.body));
                }
                None
            }
            other => panic!("/readyz answered {other}: {}", r.body),
        }
    })
    .with_context(|| instance.log())?;
    let (seen_at, body) = lag_503.context("never saw /readyz 503 for the lag")?;
    eprintln!(
        "/readyz: 503 at {seen_at:?} ({}), 200 at {ready_at:?}",
        body.trim()
    );
    assert!(body.starts_with("not ready: lag "), "{body}");
    assert!(
        max_lag_seen > 1000.0,
        "lag gauge never showed the backlog (max {max_lag_seen})"
    );

    // The lag gauge falls to 0 once everything is applied.
    let labels: &[(&str, &str)] = &[("stream", "HTTPB"), ("instance", "h1")];
    let metrics = wait_until("lag 0 at the last seq", Duration::from_secs(300), || {
        let m = scrape(addr).ok()?;
        (m.value("jetsync_lag_events", labels)? == 0.0
            && m.value("jetsync_applied_seq", labels)? == last as f64)
            .then_some(m)
    })
    .with_context(|| instance.log())?;
    eprintln!("caught up after {:?}", started.elapsed());
    let n = BACKLOG_EVENTS as f64;
    assert_eq!(metrics.get("jetsync_stream_last_seq", labels)?, last as f64);
    assert_eq!(metrics.get("jetsync_connected", labels)?, 1.0);
    assert_eq!(metrics.get("jetsync_parked_events", labels)?, 0.0);
    assert_eq!(metrics.get("jetsync_resyncs_total", labels)?, 0.0);
    // A consumer reset is the engine's recovery from a delivery anomaly (a reconnect under
    // load, a lost delivery): not expected here, but legitimate; the counter must match the
    // resets the log reports, each with its reason.
    let log = instance.log();
    let resets: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("restarting consumption at applied + 1"))
        .collect();
    if !resets.is_empty() {
        eprintln!("consumer resets during the backlog:\n{}", resets.join("\n"));
    }
    assert_eq!(
        metrics.get("jetsync_consumer_resets_total", labels)?,
        resets.len() as f64
    );
    assert_eq!(
        metrics.get(
            "jetsync_events_applied_total",
            &[("table", "items"), ("op", "upsert")]
        )?,
        n
    );
    assert!(metrics
        .value("jetsync_events_applied_total", &[("op", "delete")])
        .is_none());
    let batches = metrics.get("jetsync_batches_applied_total", labels)?;
    // Catch-up batches grow to 2 × batch_max (`fetch.rs`) while the backlog is large.
    assert!(
        batches >= n / 200.0,
        "{batches} batches for {n} events of at most 2 × 100"
    );
    assert_eq!(
        metrics.get("jetsync_batch_apply_duration_seconds_count", labels)?,
        batches
    );
    assert!(metrics.get("jetsync_batch_apply_duration_seconds_sum", labels)? > 0.0);
    for s in &metrics.samples {
        assert_eq!(
            s.labels.get("stream").map(String::as_str),
            Some("HTTPB"),
            "{s:?}"
        );
        assert_eq!(
            s.labels.get("instance").map(String::as_str),
            Some("h1"),
            "{s:?}"
        );
    }
    let ready = http_get(addr, "/readyz")?;
    assert_eq!((ready.code, ready.body.as_str()), (200, "ready\n"));

    assert_eq!(
        instance.stop(Duration::from_secs(30))?,
        0,
        "{}",
        instance.log()
    );
    Ok(())
}

/// Waits until `status --json` shows the instance idle at `seq`: applied, delivered and
/// acknowledged, nothing pending.
fn wait_idle(instance: &Instance, seq: u64) -> Result<serde_json::Value> {
    wait_until("the applier to be idle", Duration::from_secs(60), || {
        let s = instance.status().ok()?;
        let g = &s["groups"][0];
        let c = &g["consumer"];
        (g["applied_seq"] == seq
            && g["lag"] == 0
            && c["delivered_seq"] == seq
            && c["ack_floor_seq"] == seq
            && c["num_pending"] == 0
            && c["num_ack_pending"] == 0)
            .then_some(s)
    })
}

/// `/status` serves exactly what `status --json` prints; with `log.format = "json"` every log
/// line of `run` is a JSON object.
#[test]
fn status_endpoint_equals_cli_and_logs_are_json() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(status_and_logs())
}

async fn status_and_logs() -> Result<()> {
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(server.url(), "HTTPS", "https");
    let mut instance = Instance::new(&group, root.path(), "s1", SinkKind::Sqlite)?;
    // This scenario is about replaying a backlog, not joining from a snapshot.
    instance.set_option("apply", "bootstrap", "false")?;
    instance.append_config("[log]\nformat = \"json\"\n")?;
    let addr = instance.enable_http("")?;
    let (code, _, err) = instance.cli(&["provision"])?;
    assert_eq!(code, 0, "provision: {err}");
    let last = publish_backlog(&group, 50).await?;

    instance.start()?;
    wait_http_up(addr, Duration::from_secs(30))?;
    instance.wait_applied("HTTPS", last, Duration::from_secs(60))?;
    let idle = wait_idle(&instance, last)?;

    let http = http_get(addr, "/status")?;
    let (code, cli, err) = instance.cli(&["status", "--json"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(http.code, 200, "{}", http.body);
    assert_eq!(http.content_type.as_deref(), Some("application/json"));
    // Byte for byte, and as JSON.
    assert_eq!(http.body, cli);
    let parsed: serde_json::Value = serde_json::from_str(&http.body)?;
    assert_eq!(parsed, idle);
    assert_eq!(parsed["instance"], "s1");
    assert_eq!(parsed["groups"][0]["applied_events"], 50);
    assert!(parsed["groups"][0]["nats_error"].is_null());

    assert_eq!(
        instance.stop(Duration::from_secs(20))?,
        0,
        "{}",
        instance.log()
    );
    let log = instance.log();
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("log line is not JSON: {line:?}\n{log}"))?;
        ensure!(value.is_object(), "log line is not a JSON object: {line}");
        ensure!(value["level"].is_string(), "log line without level: {line}");
        ensure!(
            value["timestamp"].is_string(),
            "log line without timestamp: {line}"
        );
        messages.push(value["message"].as_str().unwrap_or_default().to_owned());
    }
    for want in ["applier starting", "applier stopped"] {
        ensure!(
            messages.iter().any(|m| m == want),
            "no {want:?} message in the JSON log:\n{log}"
        );
    }
    ensure!(
        messages
            .iter()
            .any(|m| m.starts_with("HTTP endpoint listening")),
        "no HTTP endpoint message in the JSON log:\n{log}"
    );
    Ok(())
}

/// Without a reachable NATS server the process is healthy but not ready, and `/status` answers
/// 503 with the same report `status --json` prints before exiting 1.
#[test]
fn unreachable_nats_is_healthy_not_ready() -> Result<()> {
    let port = jetsync_testkit::free_port()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(format!("nats://127.0.0.1:{port}"), "HTTPN", "httpn");
    let mut instance = Instance::new(&group, root.path(), "n1", SinkKind::Sqlite)?;
    let addr = instance.enable_http("")?;
    instance.start()?;
    wait_http_up(addr, Duration::from_secs(30)).with_context(|| instance.log())?;

    let ready = http_get(addr, "/readyz")?;
    assert_eq!(ready.code, 503, "{}", ready.body);
    assert!(
        ready.body.starts_with("not ready: not consuming"),
        "{}",
        ready.body
    );

    let status = http_get(addr, "/status")?;
    assert_eq!(status.code, 503, "{}", status.body);
    let (code, cli, _) = instance.cli(&["status", "--json"])?;
    assert_eq!(code, 1);
    let http_json: serde_json::Value = serde_json::from_str(&status.body)?;
    let cli_json: serde_json::Value = serde_json::from_str(&cli)?;
    assert_eq!(http_json, cli_json);
    assert!(
        http_json["groups"][0]["nats_error"].is_string(),
        "{http_json}"
    );

    let m = scrape(addr)?;
    assert_eq!(m.get("jetsync_connected", &[("instance", "n1")])?, 0.0);
    assert!(instance.is_running(), "{}", instance.log());
    assert_eq!(
        instance.stop(Duration::from_secs(20))?,
        0,
        "{}",
        instance.log()
    );
    Ok(())
}

// ---- The endpoint under abuse. ----

/// The nats-server's current client connection count (`/varz`).
fn nats_connections(server: &NatsServer) -> Result<u64> {
    let varz: serde_json::Value = serde_json::from_str(&server.monitor_get("/varz")?)?;
    varz["connections"]
        .as_u64()
        .with_context(|| format!("no connections in /varz: {varz}"))
}

/// One `GET path` over a fresh connection (HTTP/1.0: the server closes it after the answer);
/// the status code.
async fn get_code(addr: SocketAddr, path: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    text.get(9..12)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad response to {path}: {text:?}"))
}

/// 2,000 parallel `/status` requests and 200 half-open connections (a partial request line,
/// never finished): `/healthz` keeps answering within a second, the flood opens no NATS
/// connection (the server's connection count stays within a handful), every `/status` is
/// answered, and the half-open connections are closed by the header timeout.
#[test]
fn status_flood_and_half_open_connections() -> Result<()> {
    let _heavy = heavy();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(flood())
}

async fn flood() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const STATUS_REQUESTS: usize = 2000;
    const HALF_OPEN: usize = 200;
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(server.url(), "FLOOD", "flood");
    let mut instance = Instance::new(&group, root.path(), "f1", SinkKind::Sqlite)?;
    let addr = instance.enable_http("header_timeout_ms = 2000\n")?;
    let (code, _, err) = instance.cli(&["provision"])?;
    assert_eq!(code, 0, "provision: {err}");
    let last = publish_backlog(&group, 20).await?;
    instance.start()?;
    wait_http_up(addr, Duration::from_secs(30))?;
    instance.wait_applied("FLOOD", last, Duration::from_secs(60))?;
    // The endpoint's own NATS connection is made by the first /status.
    assert_eq!(get_code(addr, "/status").await?, 200);
    let before = nats_connections(&server)?;

    let mut half_open = Vec::with_capacity(HALF_OPEN);
    for _ in 0..HALF_OPEN {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
            .await?;
        half_open.push(tcp);
    }
    let opened = Instant::now();
    let requests: Vec<_> = (0..STATUS_REQUESTS)
        .map(|_| tokio::spawn(get_code(addr, "/status")))
        .collect();

    // While the flood runs: /healthz within a second, the NATS connection count flat.
    let mut most = before;
    let mut probes = 0;
    while probes < 5 || requests.iter().any(|r| !r.is_finished()) {
        let started = Instant::now();
        let code = tokio::time::timeout(Duration::from_secs(5), get_code(addr, "/healthz"))
            .await
            .context("/healthz did not answer within 5 s")??;
        let took = started.elapsed();
        ensure!(code == 200, "/healthz answered {code}");
        ensure!(
            took < Duration::from_secs(1),
            "/healthz took {took:?} during the flood"
        );
        most = most.max(tokio::task::block_in_place(|| nats_connections(&server))?);
        probes += 1;
        if probes > 2000 {
            bail!("the /status flood did not finish");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut codes = BTreeMap::new();
    for request in requests {
        *codes.entry(request.await??).or_insert(0) += 1;
    }
    assert_eq!(codes, BTreeMap::from([(200, STATUS_REQUESTS)]), "{codes:?}");
    ensure!(
        most <= before + 3,
        "the NATS connection count grew from {before} to {most} during the flood"
    );

    // The header timeout (2 s) closes every half-open connection.
    for mut tcp in half_open {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut buf)).await;
        ensure!(
            read.is_ok(),
            "a half-open connection was still open {:?} after it started",
            opened.elapsed()
        );
    }
    ensure!(
        opened.elapsed() >= Duration::from_millis(1500),
        "half-open connections closed before the header timeout"
    );
    assert_eq!(get_code(addr, "/healthz").await?, 200);
    assert_eq!(
        instance.stop(Duration::from_secs(20))?,
        0,
        "{}",
        instance.log()
    );
    Ok(())
}
