//! The body of a v1 event (DESIGN section 3): what happened to one row, who said so and when.
//!
//! The table and key are not part of the body: they come from the subject (see
//! [`crate::subject`]). How an [`Event`] is laid out on the wire is [`crate::codec`]'s business.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::value::Row;

/// The kind of change an event carries, as named on the wire (`"upsert"` / `"delete"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The row was inserted or replaced.
    Upsert,
    /// The row was deleted (a tombstone; the subject keeps it so late instances learn of it).
    Delete,
}

impl Op {
    /// The wire name: `"upsert"` or `"delete"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to the row.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The row now has exactly these columns.
    Upsert(Row),
    /// The row is gone.
    Delete,
}

/// One change to one row, as published on the row's subject.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// What happened to the row.
    pub change: Change,
    /// Id of the publishing instance.
    pub origin: String,
    /// The publisher's wall clock in milliseconds since the Unix epoch. Informational only: order
    /// comes from the stream sequence, never from clocks.
    pub ts_ms: u64,
    /// Per-table schema version of the row ([`Event::DEFAULT_SCHEMA`] unless the publisher says
    /// otherwise).
    pub schema: u32,
}

impl Event {
    /// Schema version used when a publisher does not give one.
    pub const DEFAULT_SCHEMA: u32 = 1;

    /// An upsert of `row`, stamped with the current time and schema version 1.
    pub fn upsert(row: Row, origin: impl Into<String>) -> Event {
        Event {
            change: Change::Upsert(row),
            origin: origin.into(),
            ts_ms: now_ms(),
            schema: Event::DEFAULT_SCHEMA,
        }
    }

    /// A delete (tombstone), stamped with the current time and schema version 1.
    pub fn delete(origin: impl Into<String>) -> Event {
        Event {
            change: Change::Delete,
            origin: origin.into(),
            ts_ms: now_ms(),
            schema: Event::DEFAULT_SCHEMA,
        }
    }

    /// The kind of change.
    pub fn op(&self) -> Op {
        match self.change {
            Change::Upsert(_) => Op::Upsert,
            Change::Delete => Op::Delete,
        }
    }

    /// The upserted row, or `None` for a delete.
    pub fn row(&self) -> Option<&Row> {
        match &self.change {
            Change::Upsert(row) => Some(row),
            Change::Delete => None,
        }
    }
}

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970 (the value is informational).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Value;

    #[test]
    fn constructors() {
        let mut row = Row::new();
        row.insert("sku".into(), Value::from("A-1"));
        let e = Event::upsert(row.clone(), "catalog-1");
        assert_eq!(e.op(), Op::Upsert);
        assert_eq!(e.row(), Some(&row));
        assert_eq!(e.origin, "catalog-1");
        assert_eq!(e.schema, 1);
        assert!(e.ts_ms > 1_700_000_000_000);
        let d = Event::delete(String::from("catalog-2"));
        assert_eq!(d.op(), Op::Delete);
        assert_eq!(d.row(), None);
        assert_eq!(Op::Delete.to_string(), "delete");
        assert_eq!(serde_json::to_string(&Op::Upsert).unwrap(), "\"upsert\"");
    }
}
