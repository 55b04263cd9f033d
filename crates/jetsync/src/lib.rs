//! jetsync keeps tables in sync across every running instance of a microservice, each with its
//! own database, through NATS JetStream.
//!
//! This is the thin client crate services link: it maps tables and keys to subjects, encodes
//! events (wire format v1), publishes them with deduplication and compare-and-set, reads the
//! latest row straight from the stream, and provisions the stream. The applier
//! (`jetsync-applier`) applies the events to each instance's database.
//!
//! ```no_run
//! # async fn demo() -> Result<(), jetsync::Error> {
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Product { sku: String, name: String, price: f64 }
//!
//! let config = jetsync::Config::load(Some("jetsync.toml".as_ref()))?;
//! let client = jetsync::Client::connect(&config).await?;
//! client.provision().await?;
//! let products = client.table::<Product>("products")?;
//! let chair = Product { sku: "A-1".into(), name: "Chair".into(), price: 12.5 };
//! let published = products.upsert("A-1", &chair).await?;
//! // Compare-and-set against the sequence we just wrote:
//! products.upsert_if("A-1", &chair, published.seq).await?;
//! let current = products.get("A-1").await?.expect("just written");
//! assert_eq!(current.row.name, "Chair");
//! # Ok(()) }
//! ```

mod client;
pub mod codec;
mod config;
mod connect;
mod error;
mod event;
pub mod raw_message;
mod record;
mod secret;
mod stream;
mod subject;
mod table;
pub mod transaction;
mod value;

pub use client::{Client, ClientBuilder};
pub use config::*;
pub use connect::{auth_method, connect, permission_error, ConnectError};
pub use error::Error;
pub use event::{Change, Event, Op};
pub use record::{from_row, row_from_json, row_to_json, to_row, RecordError};
pub use secret::Secret;
pub use stream::{
    check_existing_stream, check_unprovisioned, has_limits as stream_has_limits, stream_definition,
    Provisioned, StreamProblem, UnprovisionedStreamError,
};
pub use subject::{
    decode_key, encode_key, group_filter, parse_subject, row_subject, table_filter,
    validate_prefix, SubjectError, TableName, MAX_KEY_LEN, MAX_PLAIN_KEY_LEN,
};
pub use table::{Current, Pipeline, Published, Table, WriteOptions, DEFAULT_PIPELINE_WINDOW};
pub use transaction::{Committed, Transaction, MAX_TRANSACTION_ROWS};
pub use value::{Row, Value};
