//! `jetsync-applier fleet`: every instance of a sync group seen from one place (issue #15).
//!
//! Scatter-gather over NATS: one request on `$JETSYNC.<stream>.status` reaches every running
//! instance (each answers from its own queue group, see `service.rs`); replies are gathered
//! until every instance the report bucket knows has answered (then a short grace for unknown
//! ones) or the timeout passes. Instances in the bucket `jetsync_fleet_<stream>` that did not
//! answer are shown as missing from their last report, with their lag and gap margin computed
//! again from the stream's current state (the durable consumer's pending count where it still
//! sits at the reported applied sequence, else an upper bound), so a stopped instance's
//! margin is seen shrinking although it cannot report it.
//!
//! `--digest` waits (bounded) until every answering instance reached the stream's last
//! sequence, asks every instance for its digest on `$JETSYNC.<stream>.digest`, and compares
//! the digests taken at that sequence table by table: the value most instances share is the
//! reference, every other instance is named with the table (a tie names them all).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{
    gap::{oldest_unapplied_age, GapMargin, StreamLimits},
    service::{fleet_bucket, now_ms, service_subject},
    DigestReport, StatusReport,
};

/// Grace for replies of instances the bucket does not know yet, once all known ones answered.
const GRACE: Duration = Duration::from_millis(150);
/// How often `--digest` polls the instances while waiting for a common sequence.
const POLL: Duration = Duration::from_millis(250);

/// How `fleet` gathers.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Longest wait for status replies.
    pub timeout: Duration,
    /// Compare digests.
    pub digest: bool,
    /// Longest wait for the instances to reach a common applied sequence (`--digest`).
    pub digest_wait: Duration,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            timeout: Duration::from_secs(3),
            digest: false,
            digest_wait: Duration::from_secs(30),
        }
    }
}

/// Whether an instance answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// It answered now.
    Live,
    /// It did not answer; the row comes from its last report.
    Missing,
}

/// One instance in the fleet view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetRow {
    /// Instance id.
    pub instance: String,
    /// Live or missing.
    pub state: MemberState,
    /// When the report shown was made (Unix ms; the bucket's timestamp for a missing one).
    pub reported_at_ms: Option<u64>,
    /// Seconds since that report.
    pub last_seen_seconds_ago: Option<u64>,
    /// Applied sequence.
    pub applied_seq: u64,
    /// Events behind the stream (recomputed from the stream's state for a missing instance).
    pub lag: Option<u64>,
    /// Parked events.
    pub parked: u64,
    /// The durable consumer's state, `delivered/ack floor`, or `none`.
    pub consumer: String,
    /// Whether a consumer session was running at the report.
    pub connected: Option<bool>,
    /// Applier version.
    pub version: Option<String>,
    /// Sink kind.
    pub sink: Option<String>,
    /// Seconds up at the report.
    pub uptime_seconds: Option<u64>,
    /// The last warning or error the instance logged.
    pub last_error: Option<String>,
    /// Margin to a gap in events (`max_msgs`, `max_bytes` streams).
    pub gap_margin_events: Option<u64>,
    /// Margin to a gap in seconds (`max_age` streams).
    pub gap_margin_seconds: Option<u64>,
}

/// An instance whose table differs from the reference at the compared sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    /// Instance id.
    pub instance: String,
    /// Table.
    pub table: String,
    /// Its row count and hash (0 and empty when it lacks the table).
    pub rows: u64,
    /// Its hash.
    pub hash: String,
    /// The reference's row count (`None` on a tie).
    pub expected_rows: Option<u64>,
    /// The reference's hash (`None` on a tie).
    pub expected_hash: Option<String>,
}

/// An instance that could not take part in the digest comparison, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotCompared {
    /// Instance id.
    pub instance: String,
    /// Why (missing, not at the sequence, digest failed).
    pub reason: String,
}

/// The result of `fleet --digest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestComparison {
    /// The applied sequence the digests were compared at.
    pub applied_seq: u64,
    /// Instances compared.
    pub compared: Vec<String>,
    /// Instances and tables that differ from the reference.
    pub diverged: Vec<Divergence>,
    /// Instances that could not be compared.
    pub not_compared: Vec<NotCompared>,
}

impl DigestComparison {
    /// True when every instance was compared and none diverged.
    pub fn converged(&self) -> bool {
        self.diverged.is_empty() && self.not_compared.is_empty()
    }
}

/// What `fleet` prints (`--json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetReport {
    /// The sync group's stream.
    pub stream: String,
    /// The stream's first sequence.
    pub stream_first_seq: u64,
    /// The stream's last sequence.
    pub stream_last_seq: u64,
    /// One row per instance, sorted by instance id.
    pub instances: Vec<FleetRow>,
    /// Present with `--digest`.
    pub digest: Option<DigestComparison>,
}

impl FleetReport {
    /// Instances that did not answer.
    pub fn missing(&self) -> Vec<&str> {
        self.instances
            .iter()
            .filter(|r| r.state == MemberState::Missing)
            .map(|r| r.instance.as_str())
            .collect()
    }

    /// The human-readable table `fleet` prints.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "stream {}: seq {}..{}, {} instances ({} missing)\n",
            self.stream,
            self.stream_first_seq,
            self.stream_last_seq,
            self.instances.len(),
            self.missing().len()
        );
        let header = [
            "INSTANCE",
            "STATE",
            "APPLIED",
            "LAG",
            "PARKED",
            "CONSUMER",
            "GAP MARGIN",
            "VERSION",
            "UPTIME",
            "LAST ERROR",
        ];
        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
        for r in &self.instances {
            let state = match r.state {
                MemberState::Live => "live".to_owned(),
                MemberState::Missing => match r.last_seen_seconds_ago {
                    Some(ago) => format!("missing, last seen {}", ago_text(ago)),
                    None => "missing".to_owned(),
                },
            };
            let margin = match (r.gap_margin_events, r.gap_margin_seconds) {
                (None, None) => "-".to_owned(),
                (Some(e), None) => format!("{e} events"),
                (None, Some(s)) => format!("{s} s"),
                (Some(e), Some(s)) => format!("{e} events, {s} s"),
            };
            let mut error = r.last_error.clone().unwrap_or_else(|| "-".into());
            if error.chars().count() > 60 {
                error = error.chars().take(59).collect::<String>() + "…";
            }
            rows.push(vec![
                escape(&r.instance),
                state,
                r.applied_seq.to_string(),
                opt(r.lag),
                r.parked.to_string(),
                r.consumer.clone(),
                margin,
                r.version.clone().unwrap_or_else(|| "-".into()),
                r.uptime_seconds.map_or_else(|| "-".into(), ago_text_plain),
                escape(&error),
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out += line.join("  ").trim_end();
            out += "\n";
        }
        if let Some(d) = &self.digest {
            out += &format!(
                "digest at applied seq {}: {} compared, {}\n",
                d.applied_seq,
                d.compared.len(),
                if d.converged() {
                    "all equal (converged)".to_owned()
                } else if d.diverged.is_empty() {
                    "equal where compared, but not every instance could be compared".to_owned()
                } else {
                    format!(
                        "DIVERGED: {}",
                        d.diverged
                            .iter()
                            .map(|v| format!("{} table {}", v.instance, v.table))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            );
            for v in &d.diverged {
                out += &format!(
                    "  {} {}: {} rows {} (expected {})\n",
                    v.instance,
                    v.table,
                    v.rows,
                    if v.hash.is_empty() { "-" } else { &v.hash },
                    match (&v.expected_rows, &v.expected_hash) {
                        (Some(r), Some(h)) => format!("{r} rows {h}"),
                        _ => "no majority: instances disagree evenly".to_owned(),
                    }
                );
            }
            for n in &d.not_compared {
                out += &format!("  not compared: {}: {}\n", n.instance, n.reason);
            }
        }
        out.trim_end().to_owned()
    }
}

/// `text` with control characters shown as `?`, safe to print on a terminal (an error text
/// can quote event contents).
fn escape(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn ago_text(seconds: u64) -> String {
    format!("{} ago", ago_text_plain(seconds))
}

fn ago_text_plain(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Why `fleet` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The stream does not exist.
    #[error("stream {stream} does not exist")]
    StreamNotFound {
        /// Stream name.
        stream: String,
    },
    /// A NATS request failed.
    #[error("{operation}: {reason}")]
    Nats {
        /// What was being done.
        operation: &'static str,
        /// The error.
        reason: String,
    },
}

fn nats_error(operation: &'static str) -> impl Fn(String) -> FleetError {
    move |reason| FleetError::Nats { operation, reason }
}

/// A last report from the bucket and when it was written (the server's clock).
struct Stored {
    report: StatusReport,
    written_ms: u64,
}

/// Gathers the fleet view of `stream` (subject prefix `prefix`) over `client`.
pub async fn collect_fleet(
    client: &jetsync::Client,
    stream: &str,
    prefix: &str,
    options: &FleetOptions,
) -> Result<FleetReport, FleetError> {
    let js = client.jetstream();
    let limits = stream_limits(js, stream).await?;
    let stored = stored_reports(js, stream).await?;
    let live = gather_status(client.nats(), stream, stored.len(), options.timeout).await?;
    let mut instances: BTreeMap<String, FleetRow> = BTreeMap::new();
    for report in live.values() {
        let row = live_row(report);
        instances.insert(row.instance.clone(), row);
    }
    for (instance, stored) in &stored {
        if instances.contains_key(instance) {
            continue;
        }
        let row = missing_row(js, stream, prefix, &limits, stored).await;
        instances.insert(instance.clone(), row);
    }
    let mut report = FleetReport {
        stream: stream.to_owned(),
        stream_first_seq: limits.first_seq,
        stream_last_seq: limits.last_seq,
        instances: instances.into_values().collect(),
        digest: None,
    };
    if options.digest {
        report.digest = Some(compare_fleet(client, stream, &report, options).await?);
    }
    Ok(report)
}

async fn stream_limits(js: &jetstream::Context, stream: &str) -> Result<StreamLimits, FleetError> {
    let mut s = js.get_stream(stream).await.map_err(|e| {
        if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j) if j.error_code().0 == 10059)
        {
            FleetError::StreamNotFound {
                stream: stream.to_owned(),
            }
        } else {
            FleetError::Nats {
                operation: "stream info",
                reason: e.to_string(),
            }
        }
    })?;
    let info = s
        .info()
        .await
        .map_err(|e| nats_error("stream info")(e.to_string()))?;
    Ok(StreamLimits::of(info))
}

/// The last report of every instance in the bucket (none when the bucket does not exist).
async fn stored_reports(
    js: &jetstream::Context,
    stream: &str,
) -> Result<BTreeMap<String, Stored>, FleetError> {
    let mut out = BTreeMap::new();
    let Ok(bucket) = js.get_key_value(fleet_bucket(stream)).await else {
        return Ok(out);
    };
    let values = bucket
        .status()
        .await
        .map_err(|e| nats_error("report bucket status")(e.to_string()))?
        .values();
    if values == 0 {
        return Ok(out);
    }
    let mut watch = bucket
        .watch_with_history(">")
        .await
        .map_err(|e| nats_error("reading the report bucket")(e.to_string()))?;
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        let entry = tokio::select! {
            entry = watch.next() => entry,
            _ = &mut deadline => break,
        };
        let Some(Ok(entry)) = entry else { break };
        let done = entry.delta == 0;
        if entry.operation == kv::Operation::Put {
            if let Ok(report) = serde_json::from_slice::<StatusReport>(&entry.value) {
                let written_ms = (entry.created.unix_timestamp_nanos() / 1_000_000) as u64;
                out.insert(entry.key.clone(), Stored { report, written_ms });
            }
        } else {
            out.remove(&entry.key);
        }
        if done {
            break;
        }
    }
    Ok(out)
}

/// Sends one request on `subject` and gathers the replies: until `expected` replies came
/// (then a short grace for more) or `timeout` passed.
async fn scatter(
    nats: &async_nats::Client,
    subject: String,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<async_nats::Message>, FleetError> {
    let inbox = nats.new_inbox();
    let mut replies = nats
        .subscribe(inbox.clone())
        .await
        .map_err(|e| nats_error("subscribe to the reply inbox")(e.to_string()))?;
    nats.publish_with_reply(subject, inbox, Bytes::new())
        .await
        .map_err(|e| nats_error("scatter request")(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let until = if expected > 0 && out.len() >= expected {
            (Instant::now() + GRACE).min(deadline)
        } else {
            deadline
        };
        match tokio::time::timeout_at(until.into(), replies.next()).await {
            Ok(Some(message)) => out.push(message),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(out)
}

/// The `status` replies of the running instances, by instance id.
async fn gather_status(
    nats: &async_nats::Client,
    stream: &str,
    expected: usize,
    timeout: Duration,
) -> Result<BTreeMap<String, StatusReport>, FleetError> {
    let replies = scatter(nats, service_subject(stream, "status"), expected, timeout).await?;
    Ok(replies
        .iter()
        .filter_map(|m| serde_json::from_slice::<StatusReport>(&m.payload).ok())
        .map(|r| (r.instance.clone(), r))
        .collect())
}

fn consumer_text(group: &crate::GroupStatus) -> String {
    match &group.consumer {
        Some(c) => format!("{}/{}", c.delivered_seq, c.ack_floor_seq),
        None if group.nats_error.is_some() => "?".into(),
        None => "none".into(),
    }
}

fn live_row(report: &StatusReport) -> FleetRow {
    let group = report.groups.first();
    let run = report.run.as_ref();
    FleetRow {
        instance: report.instance.clone(),
        state: MemberState::Live,
        reported_at_ms: run.map(|r| r.reported_at_ms),
        last_seen_seconds_ago: Some(0),
        applied_seq: group.map_or(0, |g| g.applied_seq),
        lag: group.and_then(|g| g.lag),
        parked: group.map_or(0, |g| g.parked),
        consumer: group.map_or_else(|| "?".into(), consumer_text),
        connected: run.map(|r| r.connected),
        version: run.map(|r| r.version.clone()),
        sink: run.map(|r| r.sink.clone()),
        uptime_seconds: run.map(|r| r.uptime_seconds()),
        last_error: run
            .and_then(|r| r.last_error.clone())
            .or_else(|| group.and_then(|g| g.nats_error.clone())),
        gap_margin_events: group.and_then(|g| g.gap_margin_events),
        gap_margin_seconds: group.and_then(|g| g.gap_margin_seconds),
    }
}

/// The row of an instance that did not answer: its last report, with lag, consumer and gap
/// margin computed again from the stream's current state.
async fn missing_row(
    js: &jetstream::Context,
    stream: &str,
    prefix: &str,
    limits: &StreamLimits,
    stored: &Stored,
) -> FleetRow {
    let mut row = live_row(&stored.report);
    row.state = MemberState::Missing;
    row.reported_at_ms = Some(stored.written_ms);
    row.last_seen_seconds_ago = Some(now_ms().saturating_sub(stored.written_ms) / 1000);
    row.connected = Some(false);
    let applied = row.applied_seq;
    let consumer_name = stored
        .report
        .groups
        .first()
        .and_then(|g| g.consumer.as_ref().map(|c| c.name.clone()));
    // The durable may still be there (its server kept it): its pending count is exact while
    // it sits at the applied sequence.
    let mut lag = limits.unapplied_estimate(applied);
    row.consumer = "none".into();
    if let Some(name) = consumer_name {
        if let Ok(s) = js.get_stream(stream).await {
            if let Ok(info) = s.consumer_info(&name).await {
                let (d, a) = (
                    info.delivered.stream_sequence,
                    info.ack_floor.stream_sequence,
                );
                row.consumer = format!("{d}/{a}");
                if d == applied && a == applied {
                    lag = info.num_pending.min(lag);
                }
            }
        }
    }
    row.lag = Some(lag);
    if limits.limited() {
        let age = if !limits.max_age.is_zero() && lag > 0 {
            oldest_unapplied_age(js, stream, &jetsync::group_filter(prefix), applied)
                .await
                .unwrap_or_default()
        } else {
            None
        };
        let margin = GapMargin::compute(limits, applied, lag, age);
        row.gap_margin_events = margin.events;
        row.gap_margin_seconds = margin.seconds;
    } else {
        row.gap_margin_events = None;
        row.gap_margin_seconds = None;
    }
    row
}

/// `--digest`: waits for a common applied sequence, gathers the digests and compares them.
async fn compare_fleet(
    client: &jetsync::Client,
    stream: &str,
    report: &FleetReport,
    options: &FleetOptions,
) -> Result<DigestComparison, FleetError> {
    let js = client.jetstream();
    let nats = client.nats();
    let mut not_compared: Vec<NotCompared> = report
        .instances
        .iter()
        .filter(|r| r.state == MemberState::Missing)
        .map(|r| NotCompared {
            instance: r.instance.clone(),
            reason: format!(
                "missing (not answering; last report at applied seq {})",
                r.applied_seq
            ),
        })
        .collect();
    let live: BTreeSet<String> = report
        .instances
        .iter()
        .filter(|r| r.state == MemberState::Live)
        .map(|r| r.instance.clone())
        .collect();
    // Wait until every live instance applied the stream's last sequence (retargeting while
    // events are still being published), within the bound.
    let deadline = Instant::now() + options.digest_wait;
    let mut target = report.stream_last_seq;
    let positions = loop {
        let status = gather_status(nats, stream, live.len(), options.timeout).await?;
        let positions: BTreeMap<String, u64> = status
            .iter()
            .map(|(i, r)| (i.clone(), r.groups.first().map_or(0, |g| g.applied_seq)))
            .collect();
        target = stream_limits(js, stream).await?.last_seq.max(target);
        let at_target = live
            .iter()
            .all(|i| positions.get(i).copied() == Some(target));
        if at_target || Instant::now() >= deadline {
            break positions;
        }
        tokio::time::sleep(POLL).await;
    };
    let replies = scatter(
        nats,
        service_subject(stream, "digest"),
        live.len(),
        options.timeout.max(Duration::from_secs(10)),
    )
    .await?;
    let mut digests: BTreeMap<String, DigestReport> = BTreeMap::new();
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    for message in &replies {
        let error = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error").map(|v| v.as_str().to_owned()));
        match (
            error,
            serde_json::from_slice::<DigestReport>(&message.payload),
        ) {
            (None, Ok(d)) => {
                digests.insert(d.instance.clone(), d);
            }
            (Some(e), _) => {
                // The error reply does not name the instance: attribute it to a live one that
                // sent no digest, below.
                failed.insert(format!("#{}", failed.len()), e);
            }
            (None, Err(e)) => {
                failed.insert(
                    format!("#{}", failed.len()),
                    format!("bad digest reply: {e}"),
                );
            }
        }
    }
    let mut errors = failed.into_values();
    let mut compared = Vec::new();
    for instance in &live {
        match digests.get(instance) {
            Some(d) if d.applied_seq == target => compared.push(d.clone()),
            Some(d) => not_compared.push(NotCompared {
                instance: instance.clone(),
                reason: format!(
                    "at applied seq {} instead of {target} when the digest was taken",
                    d.applied_seq
                ),
            }),
            None => not_compared.push(NotCompared {
                instance: instance.clone(),
                reason: match errors.next() {
                    Some(e) => format!("digest failed: {e}"),
                    None => format!(
                        "no digest reply (at applied seq {} of {target})",
                        positions.get(instance).copied().unwrap_or(0)
                    ),
                },
            }),
        }
    }
    not_compared.sort_by(|a, b| a.instance.cmp(&b.instance));
    Ok(DigestComparison {
        applied_seq: target,
        compared: compared.iter().map(|d| d.instance.clone()).collect(),
        diverged: compare_digests(&compared),
        not_compared,
    })
}

/// Compares digests taken at one applied sequence, table by table: the (rows, hash) most
/// instances share is the reference and every other instance is named; when several values
/// tie for the most, every instance holding one of them is named (no reference). A table an
/// instance lacks counts as 0 rows.
pub fn compare_digests(digests: &[DigestReport]) -> Vec<Divergence> {
    let tables: BTreeSet<&str> = digests
        .iter()
        .flat_map(|d| d.tables.iter().map(|t| t.table.as_str()))
        .collect();
    let mut out = Vec::new();
    for table in tables {
        let values: Vec<(&str, (u64, String))> = digests
            .iter()
            .map(|d| {
                let value = d
                    .tables
                    .iter()
                    .find(|t| t.table == table)
                    .map_or((0, String::new()), |t| (t.rows, t.hash.clone()));
                (d.instance.as_str(), value)
            })
            .collect();
        let mut counts: BTreeMap<&(u64, String), usize> = BTreeMap::new();
        for (_, v) in &values {
            *counts.entry(v).or_default() += 1;
        }
        if counts.len() <= 1 {
            continue;
        }
        let most = counts.values().copied().max().unwrap_or(0);
        let leaders: Vec<&(u64, String)> = counts
            .iter()
            .filter(|(_, &n)| n == most)
            .map(|(v, _)| *v)
            .collect();
        let reference = (leaders.len() == 1).then(|| leaders[0].clone());
        for (instance, value) in &values {
            if reference.as_ref() == Some(value) {
                continue;
            }
            out.push(Divergence {
                instance: (*instance).to_owned(),
                table: table.to_owned(),
                rows: value.0,
                hash: value.1.clone(),
                expected_rows: reference.as_ref().map(|r| r.0),
                expected_hash: reference.as_ref().map(|r| r.1.clone()),
            });
        }
    }
    out.sort_by(|a, b| (&a.instance, &a.table).cmp(&(&b.instance, &b.table)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TableDigest;

    fn digest(instance: &str, tables: &[(&str, u64, &str)]) -> DigestReport {
        DigestReport {
            instance: instance.into(),
            applied_seq: 10,
            tables: tables
                .iter()
                .map(|(t, rows, hash)| TableDigest {
                    table: (*t).into(),
                    rows: *rows,
                    hash: (*hash).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_odd_one_out_is_named() {
        let all = [
            digest("a", &[("items", 3, "aa"), ("users", 1, "u")]),
            digest("b", &[("items", 3, "aa"), ("users", 1, "u")]),
            digest("c", &[("items", 3, "bb"), ("users", 1, "u")]),
        ];
        let d = compare_digests(&all);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            (d[0].instance.as_str(), d[0].table.as_str()),
            ("c", "items")
        );
        assert_eq!(d[0].expected_hash.as_deref(), Some("aa"));
        assert!(compare_digests(&all[..2]).is_empty());
    }

    #[test]
    fn a_missing_table_and_a_tie() {
        let all = [digest("a", &[("items", 3, "aa")]), digest("b", &[])];
        let d = compare_digests(&all);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().all(|v| v.expected_hash.is_none()));
    }

    #[test]
    fn text_table() {
        let report = FleetReport {
            stream: "S".into(),
            stream_first_seq: 1,
            stream_last_seq: 10,
            instances: vec![FleetRow {
                instance: "i1".into(),
                state: MemberState::Missing,
                reported_at_ms: Some(1),
                last_seen_seconds_ago: Some(12),
                applied_seq: 7,
                lag: Some(3),
                parked: 0,
                consumer: "7/7".into(),
                connected: Some(false),
                version: Some("0.1.0".into()),
                sink: Some("sqlite".into()),
                uptime_seconds: Some(30),
                last_error: None,
                gap_margin_events: Some(97),
                gap_margin_seconds: None,
            }],
            digest: None,
        };
        let text = report.to_text();
        assert!(text.contains("missing, last seen 12s ago"), "{text}");
        assert!(text.contains("97 events"), "{text}");
        assert_eq!(report.missing(), vec!["i1"]);
    }
}
