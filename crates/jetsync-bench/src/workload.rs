//! The synthetic workload: rows of five columns over a 100k key space, encoded exactly as the
//! client encodes them, so raw publishes and client publishes carry the same bytes.

use anyhow::Context as _;
use bytes::Bytes;
use jetsync::{
    codec::{self, Format},
    Event, Row, TableName, Value,
};

/// Size of the key space every phase draws its keys from.
pub(crate) const KEY_SPACE: u64 = 100_000;

/// The table every phase writes.
pub(crate) const TABLE: &str = "items";

/// The origin written into events.
pub(crate) const ORIGIN: &str = "bench-publisher";

/// Words for the free-text columns (so rows are not all alike, and sizes vary a little).
const WORDS: &[&str] = &[
    "oak", "walnut", "steel", "linen", "chair", "table", "lamp", "shelf", "desk", "sofa",
    "compact", "deluxe", "outdoor", "classic", "nordic", "modular", "vintage", "large",
];

/// A small deterministic generator (splitmix64): the same seed gives the same workload in
/// every phase and every run, without a dependency.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (the modulo bias is irrelevant at these sizes).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The key of key index `i`: `sku-0001234`, a plain subject token (no base64).
pub(crate) fn key(i: u64) -> String {
    format!("sku-{i:07}")
}

/// The row written for key index `i` at write number `version` (~5 columns, ~110–150 bytes
/// encoded with the event envelope).
pub(crate) fn row(i: u64, version: u64) -> Row {
    let mut rng = Rng::new(i.wrapping_mul(31).wrapping_add(version));
    let word = |rng: &mut Rng| WORDS[rng.below(WORDS.len() as u64) as usize];
    let name = format!("{} {} {}", word(&mut rng), word(&mut rng), i);
    let description = format!(
        "{} {} {} {} {} {} {}",
        word(&mut rng),
        word(&mut rng),
        word(&mut rng),
        word(&mut rng),
        word(&mut rng),
        word(&mut rng),
        word(&mut rng)
    );
    let mut row = Row::new();
    row.insert("id".into(), Value::Text(key(i)));
    row.insert("name".into(), Value::Text(name));
    row.insert(
        "price".into(),
        Value::F64((rng.below(100_000) as f64) / 100.0),
    );
    row.insert("qty".into(), Value::I64(version as i64));
    row.insert("description".into(), Value::Text(description));
    row
}

/// One event of the workload, in both forms: the row (what the client is given) and the exact
/// subject and body the client would send (what the raw publisher is given).
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(crate) key: String,
    pub(crate) row: Row,
    pub(crate) subject: String,
    pub(crate) body: Bytes,
}

/// Subjects and bodies of one sync group's `items` table.
#[derive(Debug, Clone)]
pub(crate) struct Encoder {
    prefix: String,
    table: TableName,
}

impl Encoder {
    pub(crate) fn new(prefix: &str) -> anyhow::Result<Encoder> {
        Ok(Encoder {
            prefix: prefix.to_owned(),
            table: TableName::new(TABLE)?,
        })
    }

    pub(crate) fn subject(&self, key: &str) -> anyhow::Result<String> {
        Ok(jetsync::row_subject(&self.prefix, &self.table, key)?)
    }

    /// The event body the client sends for an upsert of `row` (postcard/1).
    pub(crate) fn body(&self, row: Row) -> anyhow::Result<Bytes> {
        let event = Event::upsert(row, ORIGIN);
        let body = codec::encode(&event, Format::Postcard1).context("encoding an event")?;
        Ok(Bytes::from(body))
    }

    /// Event number `n` of the workload with `seed`: a uniformly drawn key, written for the
    /// n-th time overall.
    pub(crate) fn prepare(&self, rng: &mut Rng, n: u64) -> anyhow::Result<Prepared> {
        let i = rng.below(KEY_SPACE);
        self.prepare_key(i, n)
    }

    /// Event for key index `i`, version `version`.
    pub(crate) fn prepare_key(&self, i: u64, version: u64) -> anyhow::Result<Prepared> {
        let key = key(i);
        let row = row(i, version);
        let subject = self.subject(&key)?;
        let body = self.body(row.clone())?;
        Ok(Prepared {
            key,
            row,
            subject,
            body,
        })
    }
}
