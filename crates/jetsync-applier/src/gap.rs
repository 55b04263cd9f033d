//! The margin to a gap (issue #15): on a stream with `max_msgs`, `max_bytes` or `max_age`, how
//! many more events may be published (and how much time may pass) before the stream drops an
//! event this instance has not applied yet. Below the margin lies a gap (DESIGN §5, step 2),
//! which costs a resync or a halt; reporting the margin lets an operator act before.
//!
//! The arithmetic, for applied sequence S and `lag` = the stored events after S:
//! - `max_msgs` M: the stream holds `messages` events; a publish first fills the free room
//!   (M − messages), then drops the oldest event. The `messages − lag` events at or below S go
//!   first, so `(M − messages) + (messages − lag) = M − lag` publishes are safe. Compaction
//!   (`max_msgs_per_subject`) only frees room, so this is a lower bound.
//! - `max_bytes` B: the same in bytes, counted in events of the stream's average size.
//! - `max_age` A: the oldest unapplied event is dropped A after it was stored; with nothing
//!   unapplied the margin is A itself.
//!
//! A stopped instance cannot report its own margin, so `fleet` computes it with the same
//! function from the stream's state and the instance's last report.

use std::time::Duration;

use async_nats::jetstream::{self, response::Response};
use serde::{Deserialize, Serialize};

/// The stream's limits and state that the margin depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamLimits {
    /// `max_msgs`, ≤ 0 when unlimited.
    pub max_msgs: i64,
    /// `max_bytes`, ≤ 0 when unlimited.
    pub max_bytes: i64,
    /// `max_age`, zero when unlimited.
    pub max_age: Duration,
    /// Events stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// First stored sequence.
    pub first_seq: u64,
    /// Last stored sequence.
    pub last_seq: u64,
}

impl StreamLimits {
    /// The limits and state of a stream as the server reports them.
    pub fn of(info: &jetstream::stream::Info) -> StreamLimits {
        StreamLimits {
            max_msgs: info.config.max_messages,
            max_bytes: info.config.max_bytes,
            max_age: info.config.max_age,
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
        }
    }

    /// Whether any limit can drop events an instance has not applied.
    pub fn limited(&self) -> bool {
        self.max_msgs > 0 || self.max_bytes > 0 || !self.max_age.is_zero()
    }

    /// Events the stream can hold at most (by `max_msgs`, and by `max_bytes` at the average
    /// stored event size), `None` without a count or size limit.
    fn capacity_events(&self) -> Option<u64> {
        let by_msgs = (self.max_msgs > 0).then_some(self.max_msgs as u64);
        let by_bytes = (self.max_bytes > 0 && self.messages > 0 && self.bytes > 0)
            .then(|| self.max_bytes as u64 / self.average_size());
        match (by_msgs, by_bytes) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn average_size(&self) -> u64 {
        (self.bytes / self.messages.max(1)).max(1)
    }

    /// An upper bound of the events stored after `applied` when no consumer counted them:
    /// everything from the first stored sequence on is unapplied when `applied` is below it;
    /// else at most `last − applied` (fewer on a compacted stream, whose sequences have holes).
    pub fn unapplied_estimate(&self, applied: u64) -> u64 {
        if applied < self.first_seq {
            self.messages
        } else {
            self.last_seq.saturating_sub(applied).min(self.messages)
        }
    }

    /// Whether events after `applied` are already gone (a gap).
    pub fn gap(&self, applied: u64) -> bool {
        self.limited() && self.messages > 0 && self.first_seq > applied + 1
    }
}

/// How far an instance is from a gap; each field `None` when the stream has no such limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GapMargin {
    /// Events that may still be published before the stream drops one this instance has not
    /// applied (`max_msgs`, `max_bytes`); 0 when one is already gone.
    pub events: Option<u64>,
    /// Seconds before the oldest event this instance has not applied expires (`max_age`);
    /// 0 when one is already gone.
    pub seconds: Option<u64>,
}

impl GapMargin {
    /// The margin of an instance at `applied` with `lag` events stored after it, on a stream
    /// with `limits`; `oldest_unapplied_age` is how long ago the first of them was stored
    /// (`None` when `lag` is 0 or unknown: the full `max_age` is then the margin).
    pub fn compute(
        limits: &StreamLimits,
        applied: u64,
        lag: u64,
        oldest_unapplied_age: Option<Duration>,
    ) -> GapMargin {
        let gone = limits.gap(applied);
        let events = limits.capacity_events().map(|capacity| {
            if gone {
                0
            } else {
                capacity.saturating_sub(lag)
            }
        });
        let seconds = (!limits.max_age.is_zero()).then(|| {
            if gone {
                return 0;
            }
            let age = if lag == 0 {
                Duration::ZERO
            } else {
                oldest_unapplied_age.unwrap_or_default()
            };
            limits.max_age.saturating_sub(age).as_secs()
        });
        GapMargin { events, seconds }
    }

    /// Whether there is any margin to report (the stream has a limit).
    pub fn is_limited(&self) -> bool {
        self.events.is_some() || self.seconds.is_some()
    }
}

/// Thresholds below which the applier warns (`apply.gap_warn_events`,
/// `apply.gap_warn_seconds`; 0 means a tenth of the stream's limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapThresholds {
    /// Warn while the events margin is below this.
    pub events: Option<u64>,
    /// Warn while the seconds margin is below this.
    pub seconds: Option<u64>,
}

impl GapThresholds {
    /// The thresholds of `config` on a stream with `limits`.
    pub fn new(config: &jetsync::ApplyConfig, limits: &StreamLimits) -> GapThresholds {
        let events = limits.capacity_events().map(|capacity| {
            if config.gap_warn_events > 0 {
                config.gap_warn_events
            } else {
                capacity / 10
            }
        });
        let seconds = (!limits.max_age.is_zero()).then_some(if config.gap_warn_seconds > 0 {
            config.gap_warn_seconds
        } else {
            limits.max_age.as_secs() / 10
        });
        GapThresholds { events, seconds }
    }

    /// Why `margin` is too small, if it is.
    pub fn breached(&self, margin: &GapMargin) -> Option<String> {
        let mut why = Vec::new();
        if let (Some(m), Some(t)) = (margin.events, self.events) {
            if m < t {
                why.push(format!("{m} events (warning below {t})"));
            }
        }
        if let (Some(m), Some(t)) = (margin.seconds, self.seconds) {
            if m < t {
                why.push(format!("{m} s (warning below {t} s)"));
            }
        }
        (!why.is_empty()).then(|| why.join(" and "))
    }
}

#[derive(Deserialize)]
struct GetReply {
    message: StoredTime,
}

#[derive(Deserialize)]
struct StoredTime {
    time: String,
}

/// How long ago the first event after `applied` matching `filter` was stored (`None` when
/// there is none). One `STREAM.MSG.GET` request (the same one the applier's user may already
/// send to park unparseable messages); the body comes along but is not looked at.
pub(crate) async fn oldest_unapplied_age(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    applied: u64,
) -> Result<Option<Duration>, String> {
    let request = serde_json::json!({ "seq": applied + 1, "next_by_subj": filter });
    let reply: Response<GetReply> = js
        .request(format!("STREAM.MSG.GET.{stream}"), &request)
        .await
        .map_err(|e| format!("stream message get: {e}"))?;
    let stored = match reply {
        Response::Ok(reply) => reply.message,
        Response::Err { error } if error.error_code().0 == 10037 => return Ok(None),
        Response::Err { error } => return Err(format!("stream message get: {error}")),
    };
    let at = chrono::DateTime::parse_from_rfc3339(&stored.time)
        .map_err(|e| format!("stream message get: bad time {:?}: {e}", stored.time))?;
    let age = chrono::Utc::now().signed_duration_since(at);
    Ok(Some(age.to_std().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_msgs: i64, messages: u64, first: u64, last: u64) -> StreamLimits {
        StreamLimits {
            max_msgs,
            max_bytes: -1,
            max_age: Duration::ZERO,
            messages,
            bytes: messages * 100,
            first_seq: first,
            last_seq: last,
        }
    }

    #[test]
    fn events_margin_is_capacity_minus_lag() {
        // 100 max, 60 stored (1..=60), applied 50: 10 unapplied, 90 more publishes are safe.
        let l = limits(100, 60, 1, 60);
        assert_eq!(GapMargin::compute(&l, 50, 10, None).events, Some(90));
        // Full stream (101..=200), applied 150: 50 unapplied, 50 publishes drop 101..=150 only.
        let l = limits(100, 100, 101, 200);
        assert_eq!(GapMargin::compute(&l, 150, 50, None).events, Some(50));
        // Applied 100, first stored 101: nothing lost yet, but the next publish drops 101.
        assert_eq!(GapMargin::compute(&l, 100, 100, None).events, Some(0));
        // Applied 99 with first 101: a gap already.
        assert_eq!(GapMargin::compute(&l, 99, 100, None).events, Some(0));
        assert!(l.gap(99) && !l.gap(100));
    }

    #[test]
    fn no_limits_no_margin() {
        let l = limits(-1, 10, 1, 10);
        let m = GapMargin::compute(&l, 5, 5, None);
        assert!(!m.is_limited(), "{m:?}");
        assert!(!l.gap(0));
    }

    #[test]
    fn bytes_limit_counts_average_events() {
        let l = StreamLimits {
            max_bytes: 10_000,
            ..limits(-1, 50, 1, 50)
        };
        // 100 bytes per event: capacity 100, 20 unapplied.
        assert_eq!(GapMargin::compute(&l, 30, 20, None).events, Some(80));
    }

    #[test]
    fn age_margin() {
        let l = StreamLimits {
            max_age: Duration::from_secs(600),
            ..limits(-1, 50, 1, 50)
        };
        let m = GapMargin::compute(&l, 40, 10, Some(Duration::from_secs(100)));
        assert_eq!((m.events, m.seconds), (None, Some(500)));
        assert_eq!(GapMargin::compute(&l, 50, 0, None).seconds, Some(600));
    }

    #[test]
    fn thresholds_default_to_a_tenth() {
        let l = limits(1000, 10, 1, 10);
        let t = GapThresholds::new(&jetsync::ApplyConfig::default(), &l);
        assert_eq!(t.events, Some(100));
        assert_eq!(t.seconds, None);
        let m = GapMargin {
            events: Some(99),
            seconds: None,
        };
        assert!(t.breached(&m).unwrap().contains("99 events"));
        let config = jetsync::ApplyConfig {
            gap_warn_events: 5,
            ..Default::default()
        };
        assert_eq!(GapThresholds::new(&config, &l).breached(&m), None);
    }

    #[test]
    fn unapplied_estimate_is_bounded() {
        let l = limits(100, 100, 101, 200);
        assert_eq!(l.unapplied_estimate(50), 100);
        assert_eq!(l.unapplied_estimate(150), 50);
        assert_eq!(l.unapplied_estimate(200), 0);
    }
}
