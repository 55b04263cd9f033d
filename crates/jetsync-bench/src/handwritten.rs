//! The careful hand-written consumer a user would write instead of jetsync (issue #16): an
//! async-nats durable pull consumer with AckAll, batches of 1,000, `json/1` bodies decoded into
//! a typed struct with serde_json, one rusqlite transaction per batch that also writes the
//! offset (the sink's settings: `plain_sqlite`), then one acknowledgement of the batch's last
//! message. It checks nothing jetsync checks (formats, gaps, redeliveries, poison events), so
//! it is a fair lower bar for speed, not an equal in function.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use futures::StreamExt;
use jetsync::StreamConfig;

use crate::{
    harness::{self, Bench},
    plain_sqlite::{self, Item},
};

/// A `json/1` upsert body, as the user's struct.
#[derive(serde::Deserialize)]
struct Body {
    op: String,
    row: Option<Item>,
}

/// How long the consumer waits for more messages before writing a short batch.
const BATCH_WAIT: Duration = Duration::from_millis(20);

/// Consumes `events` events of `stream` into a fresh SQLite file at `path`, `batch` per
/// transaction; returns events/s from the consumer's creation to the last commit.
pub(crate) async fn run(
    bench: &Bench,
    stream: &StreamConfig,
    path: &std::path::Path,
    events: u64,
    batch: usize,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let js = bench.fresh_context().await?;
    let mut conn = plain_sqlite::open(path)?;
    let started = Instant::now();
    let durable = "bench_handwritten";
    let consumer = harness::ack_all_consumer(&js, stream, durable, batch).await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .messages()
        .await
        .context("starting the pull")?;
    let mut applied = 0u64;
    let consume = async {
        let mut items = Vec::with_capacity(batch);
        while applied < events {
            items.clear();
            let mut last = None;
            while items.len() < batch {
                let next = if items.is_empty() {
                    messages.next().await
                } else {
                    match tokio::time::timeout(BATCH_WAIT, messages.next()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    }
                };
                let message = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => bail!("pull failed after {applied} events: {e}"),
                    None => bail!("pull ended after {applied} events"),
                };
                let body: Body =
                    serde_json::from_slice(&message.payload).context("decoding a json/1 body")?;
                ensure!(body.op == "upsert", "unexpected op {}", body.op);
                items.push(body.row.context("an upsert without a row")?);
                last = Some(message);
            }
            let last = last.context("an empty batch")?;
            let seq = last
                .info()
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .stream_sequence;
            tokio::task::block_in_place(|| {
                plain_sqlite::write_batch(&mut conn, &items, &stream.name, seq)
            })?;
            last.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
            applied += items.len() as u64;
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(timeout, consume).await {
        Ok(result) => result?,
        Err(_) => {
            bail!("the hand-written consumer applied {applied} of {events} within {timeout:?}")
        }
    }
    let rate = harness::eps(events, started.elapsed());
    drop(messages);
    let _ = js.delete_consumer_from_stream(durable, &stream.name).await;
    Ok(rate)
}
