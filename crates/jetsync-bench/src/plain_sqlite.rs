//! The plain SQLite code a user would write by hand: one connection with the SQLite sink's
//! settings (WAL, `synchronous = NORMAL`, `wal_autocheckpoint = 10000`, a 16 MiB page cache;
//! see `jetsync-applier/src/sinks/sqlite/connection.rs`), the table the sink would create, and
//! one prepared upsert per row plus the offset, in one transaction per batch.
//!
//! Used by the SQLite fast path (the plainest sink ceiling) and by the hand-written consumer.

use std::path::Path;

use anyhow::Context as _;
use rusqlite::Connection;

use crate::workload::TABLE;

/// The columns of one workload row, in the order the statements bind them.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct Item {
    pub(crate) id: String,
    pub(crate) description: String,
    pub(crate) name: String,
    pub(crate) price: f64,
    pub(crate) qty: i64,
}

impl Item {
    /// The item of a workload row (the bench's own rows always carry all five columns).
    pub(crate) fn from_row(row: &jetsync::Row) -> anyhow::Result<Item> {
        use jetsync::Value;
        let text = |c: &str| match row.get(c) {
            Some(Value::Text(s)) => Ok(s.clone()),
            other => anyhow::bail!("column {c}: {other:?}"),
        };
        Ok(Item {
            id: text("id")?,
            description: text("description")?,
            name: text("name")?,
            price: match row.get("price") {
                Some(Value::F64(f)) => *f,
                other => anyhow::bail!("column price: {other:?}"),
            },
            qty: match row.get("qty") {
                Some(Value::I64(i)) => *i,
                other => anyhow::bail!("column qty: {other:?}"),
            },
        })
    }
}

/// Opens (creates) `path` with the sink's settings and creates the table and the offsets
/// table as the sink would (columns without declared types, the key `PRIMARY KEY NOT NULL`).
pub(crate) fn open(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    anyhow::ensure!(mode.eq_ignore_ascii_case("wal"), "journal_mode {mode}");
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    conn.pragma_update(None, "cache_size", -16_384)?;
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} \
           (id PRIMARY KEY NOT NULL, description, name, price, qty); \
         CREATE TABLE IF NOT EXISTS offsets (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL)"
    ))?;
    Ok(conn)
}

/// Writes `items` and the offset `seq` of `stream` in one transaction.
pub(crate) fn write_batch(
    conn: &mut Connection,
    items: &[Item],
    stream: &str,
    seq: u64,
) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut upsert = tx.prepare_cached(&format!(
            "INSERT INTO {TABLE} (id, description, name, price, qty) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (id) DO UPDATE SET description = excluded.description, \
             name = excluded.name, price = excluded.price, qty = excluded.qty"
        ))?;
        for item in items {
            upsert.execute((
                &item.id,
                &item.description,
                &item.name,
                item.price,
                item.qty,
            ))?;
        }
        tx.prepare_cached(
            "INSERT INTO offsets (stream, seq) VALUES (?1, ?2) \
             ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq",
        )?
        .execute((stream, seq as i64))?;
    }
    tx.commit()?;
    Ok(())
}
