//! Order-independent digests of table contents.
//!
//! Two instances converged exactly when every table has the same row count and the same digest
//! at the same applied sequence. Each row is hashed canonically (columns in name order, values
//! with a type tag) with 64-bit FNV-1a, and row hashes are summed with wrapping addition, so the
//! digest does not depend on the order rows are read in, yet a duplicated row changes it (XOR
//! would cancel pairs out). FNV is used because it is stable across Rust releases and platforms,
//! unlike `std`'s `DefaultHasher`.

use jetsync::{Row, Value};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(FNV_OFFSET)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }
    /// Length-prefixed write, so that ("ab","c") and ("a","bc") hash differently.
    fn write_field(&mut self, bytes: &[u8]) {
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }
}

/// Canonical hash of one row of `table`.
///
/// A NULL column is skipped, exactly as if the row did not have the column: a column that only
/// older events carried (still present, all NULL, on an instance that saw them) must not make
/// two instances with the same rows differ.
pub fn row_hash(table: &str, row: &Row) -> u64 {
    let mut h = Fnv::new();
    h.write_field(table.as_bytes());
    for (column, value) in row {
        if matches!(value, Value::Null) {
            continue;
        }
        h.write_field(column.as_bytes());
        match value {
            Value::Null => unreachable!("NULL columns are skipped above"),
            Value::Bool(b) => h.write(&[1, u8::from(*b)]),
            Value::I64(i) => {
                h.write(&[2]);
                h.write(&i.to_le_bytes());
            }
            Value::F64(f) => {
                h.write(&[3]);
                h.write(&f.to_bits().to_le_bytes());
            }
            Value::Text(s) => {
                h.write(&[4]);
                h.write_field(s.as_bytes());
            }
            Value::Bytes(b) => {
                h.write(&[5]);
                h.write_field(b);
            }
            Value::Json(j) => {
                // serde_json's map is sorted by key (no `preserve_order`), so this is canonical.
                h.write(&[6]);
                h.write_field(j.to_string().as_bytes());
            }
        }
    }
    h.0
}

/// Accumulates row hashes of one table into a [`crate::TableDigest`].
#[derive(Debug, Default, Clone)]
pub struct DigestBuilder {
    rows: u64,
    sum: u64,
}

impl DigestBuilder {
    /// Adds one row.
    pub fn add(&mut self, table: &str, row: &Row) {
        self.rows += 1;
        self.sum = self.sum.wrapping_add(row_hash(table, row));
    }

    /// The finished digest of `table`.
    pub fn finish(&self, table: &str) -> crate::TableDigest {
        crate::TableDigest {
            table: table.to_owned(),
            rows: self.rows,
            hash: format!("{:016x}", self.sum),
        }
    }
}

/// How often [`consistent_digest`] reads the tables before giving up on a busy applier.
const DIGEST_ATTEMPTS: u32 = 50;

/// The digest of an instance's tables and the applied sequence they describe: what
/// `jetsync-applier digest --json` prints and the `digest` endpoint of the NATS service
/// answers. Equal digests at an equal `applied_seq` prove two instances converged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DigestReport {
    /// Instance id.
    pub instance: String,
    /// The applied sequence (the sink's fence) the digest was taken at.
    pub applied_seq: u64,
    /// Per-table digests, sorted by table name.
    pub tables: Vec<crate::TableDigest>,
}

/// Why [`consistent_digest`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// The sink could not be read.
    #[error(transparent)]
    Sink(#[from] crate::SinkError),
    /// The applier committed batches during every attempt: retry when it is idle.
    #[error(
        "the applier kept committing while the digest was taken ({attempts} attempts, applied \
         seq moved from {before} to {after}): stop `run` or retry when it is idle"
    )]
    Busy {
        /// Attempts made.
        attempts: u32,
        /// Fence before the last attempt.
        before: u64,
        /// Fence after it.
        after: u64,
    },
}

/// Digests `sink`'s synced tables at one applied sequence of `group`. A running applier may
/// commit batches meanwhile (it is another connection: readers never block it), so the fence
/// is read before and after the tables and the digest is taken again until both agree.
pub async fn consistent_digest<S: crate::Sink>(
    sink: &mut S,
    group: &str,
) -> Result<(u64, Vec<crate::TableDigest>), DigestError> {
    let mut attempts = 0;
    loop {
        let before = sink.fence(group).await?.unwrap_or(0);
        let tables = sink.digest().await?;
        let after = sink.fence(group).await?.unwrap_or(0);
        attempts += 1;
        if before == after {
            return Ok((after, tables));
        }
        if attempts >= DIGEST_ATTEMPTS {
            return Err(DigestError::Busy {
                attempts,
                before,
                after,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, Value)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn order_independent_but_duplicate_sensitive() {
        let a = row(&[("id", Value::I64(1)), ("name", Value::from("a"))]);
        let b = row(&[("id", Value::I64(2)), ("name", Value::from("b"))]);
        let mut x = DigestBuilder::default();
        x.add("t", &a);
        x.add("t", &b);
        let mut y = DigestBuilder::default();
        y.add("t", &b);
        y.add("t", &a);
        assert_eq!(x.finish("t"), y.finish("t"));
        let mut z = DigestBuilder::default();
        z.add("t", &a);
        z.add("t", &a);
        assert_ne!(x.finish("t").hash, z.finish("t").hash);
    }

    #[test]
    fn value_kinds_are_distinguished() {
        let a = row(&[("v", Value::I64(1))]);
        let b = row(&[("v", Value::Bool(true))]);
        let c = row(&[("v", Value::from("1"))]);
        assert_ne!(row_hash("t", &a), row_hash("t", &b));
        assert_ne!(row_hash("t", &a), row_hash("t", &c));
        assert_ne!(row_hash("t", &a), row_hash("u", &a));
    }

    #[test]
    fn a_null_column_hashes_like_an_absent_one() {
        let with_null = row(&[("id", Value::from("a")), ("old", Value::Null)]);
        let without = row(&[("id", Value::from("a"))]);
        assert_eq!(row_hash("t", &with_null), row_hash("t", &without));
        let with_value = row(&[("id", Value::from("a")), ("old", Value::I64(0))]);
        assert_ne!(row_hash("t", &with_value), row_hash("t", &without));
    }
}
