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
    format: Format,
}

impl Encoder {
    /// An encoder writing `postcard/1`, the client's default.
    pub(crate) fn new(prefix: &str) -> anyhow::Result<Encoder> {
        Encoder::with_format(prefix, Format::Postcard1)
    }

    /// An encoder writing `format` (the replay phase's workload is `json/1`, as in issue #16).
    pub(crate) fn with_format(prefix: &str, format: Format) -> anyhow::Result<Encoder> {
        Ok(Encoder {
            prefix: prefix.to_owned(),
            table: TableName::new(TABLE)?,
            format,
        })
    }

    /// The body format this encoder writes.
    pub(crate) fn format(&self) -> Format {
        self.format
    }

    pub(crate) fn subject(&self, key: &str) -> anyhow::Result<String> {
        Ok(jetsync::row_subject(&self.prefix, &self.table, key)?)
    }

    /// The event body the client sends for an upsert of `row` (in this encoder's format).
    pub(crate) fn body(&self, row: Row) -> anyhow::Result<Bytes> {
        let event = Event::upsert(row, ORIGIN);
        let body = codec::encode(&event, self.format).context("encoding an event")?;
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

/// How the workload draws its keys from the key space.
#[derive(Debug, Clone)]
pub(crate) enum Keys {
    /// Every key equally likely.
    Uniform,
    /// Zipf-distributed: the key of rank `r` (1-based) drawn with probability proportional to
    /// `r^-s`; ranks are scattered over the key space by a fixed permutation, so hot keys are
    /// not neighbours in the table.
    Zipf(Zipf),
}

impl Keys {
    /// The next key index.
    pub(crate) fn draw(&self, rng: &mut Rng) -> u64 {
        match self {
            Keys::Uniform => rng.below(KEY_SPACE),
            Keys::Zipf(zipf) => zipf.draw(rng),
        }
    }

    /// A name for the report.
    pub(crate) fn describe(&self) -> String {
        match self {
            Keys::Uniform => format!("uniform over {KEY_SPACE} keys"),
            Keys::Zipf(z) => format!("zipf s = {} over {KEY_SPACE} keys", z.s),
        }
    }
}

/// A Zipf distribution over the key space, sampled by inverting its cumulative distribution.
#[derive(Debug, Clone)]
pub(crate) struct Zipf {
    /// The exponent.
    pub(crate) s: f64,
    /// `cdf[r]`: probability of a rank <= r + 1.
    cdf: Vec<f64>,
}

/// Multiplier of the rank-to-key permutation: odd and coprime to the key space (100,000 =
/// 2^5 * 5^5), so `rank * P mod KEY_SPACE` visits every key once.
const SCATTER: u64 = 7_919;

impl Zipf {
    pub(crate) fn new(s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(KEY_SPACE as usize);
        let mut sum = 0.0;
        for rank in 1..=KEY_SPACE {
            sum += (rank as f64).powf(-s);
            cdf.push(sum);
        }
        for p in &mut cdf {
            *p /= sum;
        }
        Zipf { s, cdf }
    }

    fn draw(&self, rng: &mut Rng) -> u64 {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let rank = self.cdf.partition_point(|p| *p < u).min(self.cdf.len() - 1) as u64;
        (rank * SCATTER) % KEY_SPACE
    }

    /// Share of all events that go to the hottest key.
    pub(crate) fn top_share(&self) -> f64 {
        self.cdf[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_covers_ranks() {
        let zipf = Zipf::new(1.1);
        let mut rng = Rng::new(1);
        let mut hits = std::collections::HashMap::new();
        for _ in 0..100_000 {
            *hits.entry(zipf.draw(&mut rng)).or_insert(0u64) += 1;
        }
        let top = hits.values().copied().max().unwrap_or(0) as f64 / 100_000.0;
        assert!((top - zipf.top_share()).abs() < 0.01, "top {top}");
        assert!(hits.len() > 5_000 && hits.len() < 60_000, "{}", hits.len());
        assert!(hits.keys().all(|k| *k < KEY_SPACE));
    }
}

/// A reproducible sequence of workload writes: key index and write number of every event.
#[derive(Debug, Clone)]
pub(crate) struct Draws {
    rng: Rng,
    keys: Keys,
    n: u64,
}

impl Draws {
    pub(crate) fn new(seed: u64, keys: Keys) -> Draws {
        Draws {
            rng: Rng::new(seed),
            keys,
            n: 0,
        }
    }
}

impl Iterator for Draws {
    /// `(key index, write number)`.
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let i = self.keys.draw(&mut self.rng);
        let n = self.n;
        self.n += 1;
        Some((i, n))
    }
}
