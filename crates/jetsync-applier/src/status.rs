//! Status collection (DESIGN §7 `status`), shared by `jetsync-applier status` and the HTTP
//! endpoint's `/status`, so that both report the same JSON by construction.
//!
//! It reads the redb checkpoint read-only (which works while `run` holds it for writing, in
//! another process or in the same one) and asks NATS for the stream's and the durable
//! consumer's state over a connection of its own (the CLI) or a connection it is given (the
//! HTTP endpoint, which keeps one).

use std::time::Duration;

use anyhow::anyhow;
use async_nats::jetstream;
use jetsync::Config;
use serde::{Deserialize, Serialize};

use crate::{read_checkpoint, Checkpoint, OffsetsError};

/// How long the NATS half of a status may take before it is reported as unavailable.
pub const STATUS_NATS_TIMEOUT: Duration = Duration::from_secs(10);

/// The durable consumer's state as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    /// Consumer (durable) name.
    pub name: String,
    /// Stream sequence of the last delivery.
    pub delivered_seq: u64,
    /// Stream sequence up to which everything is acknowledged.
    pub ack_floor_seq: u64,
    /// Events matching the filter not yet delivered.
    pub num_pending: u64,
    /// Deliveries awaiting acknowledgement.
    pub num_ack_pending: usize,
}

/// The status of one sync group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Stream name (the sync group).
    pub stream: String,
    /// Last applied stream sequence (redb checkpoint).
    pub applied_seq: u64,
    /// Events applied over the instance's life.
    pub applied_events: u64,
    /// The stream's first sequence (`None` when NATS is unavailable).
    pub stream_first_seq: Option<u64>,
    /// The stream's last sequence (`None` when NATS is unavailable).
    pub stream_last_seq: Option<u64>,
    /// Events this instance is behind (`None` when NATS is unavailable): the consumer's pending
    /// count when its state matches the checkpoint exactly, else last seq − applied seq.
    pub lag: Option<u64>,
    /// The durable consumer, `None` when it does not exist (yet) or NATS is unavailable.
    pub consumer: Option<ConsumerStatus>,
    /// Parked events.
    pub parked: u64,
    /// Transactions (atomic batches) applied over the instance's life.
    pub transactions_applied: u64,
    /// Transactions parked whole (one of their members could not be applied).
    pub parked_transactions: u64,
    /// Why the NATS half is missing, when it is.
    pub nats_error: Option<String>,
}

/// What `jetsync-applier status --json` prints and `/status` serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Instance id.
    pub instance: String,
    /// One entry per sync group.
    pub groups: Vec<GroupStatus>,
    /// Change capture (absent when no table has `capture = true`): the outbox backlog now and
    /// the entries published over the instance's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<crate::capture::CaptureStatus>,
}

impl StatusReport {
    /// Whether every group's NATS half could be read (the CLI exits 1 otherwise).
    pub fn nats_available(&self) -> bool {
        self.groups.iter().all(|g| g.nats_error.is_none())
    }

    /// The JSON text both the CLI (`--json`) and `/status` emit: pretty-printed, no trailing
    /// newline.
    pub fn to_json_pretty(&self) -> String {
        // Serialising plain structs of strings and integers cannot fail.
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }

    /// The human-readable rendering of `jetsync-applier status`.
    pub fn to_text(&self) -> String {
        let opt = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
        let mut out = format!("instance {}\n", self.instance);
        for g in &self.groups {
            out += &format!(
                "stream {}: applied seq {} ({} applied), stream seq {}..{}, lag {}, parked {}\n",
                g.stream,
                g.applied_seq,
                if g.applied_events == 1 {
                    "1 event".to_owned()
                } else {
                    format!("{} events", g.applied_events)
                },
                opt(g.stream_first_seq),
                opt(g.stream_last_seq),
                opt(g.lag),
                g.parked
            );
            if g.transactions_applied > 0 || g.parked_transactions > 0 {
                out += &format!(
                    "  transactions: {} applied, {} parked whole\n",
                    g.transactions_applied, g.parked_transactions
                );
            }
            match &g.consumer {
                Some(c) => {
                    out += &format!(
                        "  consumer {}: delivered {}, ack floor {}, pending {}, awaiting ack {}\n",
                        c.name, c.delivered_seq, c.ack_floor_seq, c.num_pending, c.num_ack_pending
                    )
                }
                None if g.nats_error.is_none() => {
                    out += "  consumer: none (created at the next run)\n"
                }
                None => {}
            }
            if let Some(e) = &g.nats_error {
                out += &format!("  NATS: {e}\n");
            }
        }
        if let Some(c) = &self.capture {
            out += &format!(
                "capture ({}): {} waiting in the outbox, {} published over the instance's life\n",
                c.tables.join(", "),
                c.backlog,
                c.published
            );
            if let Some(e) = &c.error {
                out += &format!("  outbox: {e}\n");
            }
        }
        out.trim_end().to_owned()
    }
}

/// Collects the status of `config`'s instance: the checkpoint (an instance that never ran
/// reports 0) and, within [`STATUS_NATS_TIMEOUT`], the stream and consumer state. NATS problems
/// are reported in `nats_error`, not as an error; only an unreadable checkpoint store fails.
pub async fn collect_status(config: &Config) -> Result<StatusReport, OffsetsError> {
    collect(config, Remote::Connect).await
}

/// Where the NATS half of a status comes from.
pub(crate) enum Remote<'a> {
    /// A connection of its own (the CLI).
    Connect,
    /// An existing connection (the HTTP endpoint).
    Use(&'a jetsync::Client),
    /// Unavailable for this reason: only the checkpoint half is reported.
    Unavailable(String),
}

/// [`collect_status`] over an existing connection `client` instead of a connection of its
/// own: what the HTTP endpoint's `/status` uses, so that requests open no NATS connection.
pub(crate) async fn collect_status_with(
    config: &Config,
    remote: Remote<'_>,
) -> Result<StatusReport, OffsetsError> {
    collect(config, remote).await
}

async fn collect(config: &Config, remote: Remote<'_>) -> Result<StatusReport, OffsetsError> {
    let group = config.stream.name.clone();
    let redb_path = config.redb_path();
    let checkpoint = {
        let group = group.clone();
        // redb reads are blocking file I/O.
        tokio::task::spawn_blocking(move || read_checkpoint(&redb_path, &group))
            .await
            .unwrap_or_else(|e| {
                Err(OffsetsError::Storage {
                    path: config.redb_path(),
                    reason: format!("reading the checkpoint panicked: {e}"),
                })
            })
    };
    let checkpoint = match checkpoint {
        Ok(c) => c,
        Err(OffsetsError::Missing { .. }) => Checkpoint {
            applied: 0,
            applied_events: 0,
            parked: 0,
            transactions_applied: 0,
        },
        Err(e) => return Err(e),
    };
    let mut g = GroupStatus {
        stream: group.clone(),
        applied_seq: checkpoint.applied,
        applied_events: checkpoint.applied_events,
        stream_first_seq: None,
        stream_last_seq: None,
        lag: None,
        consumer: None,
        parked: checkpoint.parked,
        transactions_applied: checkpoint.transactions_applied,
        parked_transactions: 0,
        nats_error: None,
    };
    if checkpoint.parked > 0 {
        // Only read when something is parked: the transaction ids are in the parked bodies.
        let (path, name) = (config.redb_path(), group.clone());
        let parked = tokio::task::spawn_blocking(move || crate::read_parked(&path, &name)).await;
        if let Ok(Ok(events)) = parked {
            let txns: std::collections::BTreeSet<String> =
                events.into_iter().filter_map(|e| e.txn).collect();
            g.parked_transactions = txns.len() as u64;
        }
    }
    let client = match remote {
        Remote::Connect => None,
        Remote::Use(client) => Some(client.clone()),
        Remote::Unavailable(reason) => {
            g.nats_error = Some(reason);
            return Ok(StatusReport {
                instance: config.instance.clone(),
                groups: vec![g],
                capture: crate::capture::status(config).await,
            });
        }
    };
    let remote = async {
        let client = match client {
            Some(client) => client,
            None => jetsync::Client::connect(config).await?,
        };
        let js = client.jetstream();
        let mut stream = js
            .get_stream(&group)
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(j) if j.error_code().0 == 10059 => {
                    if config.stream.provision {
                        anyhow!("stream {group} does not exist yet: the first `run`, `publish`, `tail` or `provision` creates it (stream.provision = true)")
                    } else {
                        anyhow!("stream {group} does not exist: create it, or set stream.provision = true to let jetsync create it")
                    }
                }
                _ => anyhow!("stream {group}: {e}"),
            })?;
        let info = stream.info().await?.clone();
        let consumer = match stream.consumer_info(config.consumer_name()).await {
            Ok(c) => Some(c),
            Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => None,
            Err(e) => return Err(anyhow!("consumer info: {e}")),
        };
        Ok::<_, anyhow::Error>((info, consumer))
    };
    match tokio::time::timeout(STATUS_NATS_TIMEOUT, remote).await {
        Ok(Ok((info, consumer))) => {
            g.stream_first_seq = Some(info.state.first_sequence);
            g.stream_last_seq = Some(info.state.last_sequence);
            let mut lag = info.state.last_sequence.saturating_sub(checkpoint.applied);
            if let Some(c) = consumer {
                if c.delivered.stream_sequence == checkpoint.applied
                    && c.ack_floor.stream_sequence == checkpoint.applied
                {
                    // Exact: the consumer counts pending events, compaction included.
                    lag = c.num_pending;
                }
                g.consumer = Some(ConsumerStatus {
                    name: c.name,
                    delivered_seq: c.delivered.stream_sequence,
                    ack_floor_seq: c.ack_floor.stream_sequence,
                    num_pending: c.num_pending,
                    num_ack_pending: c.num_ack_pending,
                });
            }
            g.lag = Some(lag);
        }
        Ok(Err(e)) => g.nats_error = Some(format!("{e:#}")),
        Err(_) => {
            g.nats_error = Some(format!(
                "timed out after {} s",
                STATUS_NATS_TIMEOUT.as_secs()
            ))
        }
    }
    Ok(StatusReport {
        instance: config.instance.clone(),
        groups: vec![g],
        capture: crate::capture::status(config).await,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(nats_error: Option<&str>) -> StatusReport {
        StatusReport {
            capture: None,
            instance: "i1".into(),
            groups: vec![GroupStatus {
                stream: "S".into(),
                applied_seq: 7,
                applied_events: 9,
                stream_first_seq: Some(1),
                stream_last_seq: Some(10),
                lag: Some(3),
                consumer: Some(ConsumerStatus {
                    name: "jetsync_i1".into(),
                    delivered_seq: 7,
                    ack_floor_seq: 7,
                    num_pending: 3,
                    num_ack_pending: 0,
                }),
                parked: 0,
                transactions_applied: 2,
                parked_transactions: 0,
                nats_error: nats_error.map(str::to_owned),
            }],
        }
    }

    /// The JSON shape is an interface (scripts parse `status --json`): keep it stable.
    #[test]
    fn json_shape_is_stable() {
        let value: serde_json::Value =
            serde_json::from_str(&report(None).to_json_pretty()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "instance": "i1",
                "groups": [{
                    "stream": "S",
                    "applied_seq": 7,
                    "applied_events": 9,
                    "stream_first_seq": 1,
                    "stream_last_seq": 10,
                    "lag": 3,
                    "consumer": {
                        "name": "jetsync_i1",
                        "delivered_seq": 7,
                        "ack_floor_seq": 7,
                        "num_pending": 3,
                        "num_ack_pending": 0
                    },
                    "parked": 0,
                    "transactions_applied": 2,
                    "parked_transactions": 0,
                    "nats_error": null
                }]
            })
        );
        assert!(report(None).nats_available());
        assert!(!report(Some("down")).nats_available());
    }

    #[test]
    fn text_rendering() {
        assert_eq!(
            report(None).to_text(),
            "instance i1\nstream S: applied seq 7 (9 events applied), stream seq 1..10, lag 3, parked 0\n  transactions: 2 applied, 0 parked whole\n  consumer jetsync_i1: delivered 7, ack floor 7, pending 3, awaiting ack 0"
        );
        let mut down = report(Some("connection refused"));
        down.groups[0].consumer = None;
        assert!(
            down.to_text()
                .ends_with("parked whole\n  NATS: connection refused"),
            "{}",
            down.to_text()
        );
    }

    #[tokio::test]
    async fn never_ran_and_nats_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let port = jetsync_testkit::free_port().unwrap();
        let mut config = Config {
            instance: "nobody".into(),
            data_dir: dir.path().into(),
            ..Config::default()
        };
        config.nats.url = format!("nats://127.0.0.1:{port}");
        config.nats.connect_timeout_ms = 500;
        let report = collect_status(&config).await.unwrap();
        assert_eq!(report.instance, "nobody");
        let g = &report.groups[0];
        assert_eq!((g.applied_seq, g.applied_events, g.lag), (0, 0, None));
        assert!(g.nats_error.is_some(), "{report:?}");
        assert!(!report.nats_available());
    }
}
