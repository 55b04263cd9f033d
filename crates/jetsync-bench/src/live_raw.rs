//! The JetStream latency ceiling of the live phase: three raw pull consumers that write
//! nothing (no acknowledgements: `AckPolicy::None`, each on its own connection), logging the
//! stream sequence and arrival time of every message they are delivered.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use futures::StreamExt;
use jetsync::StreamConfig;
use tokio::task::JoinHandle;

use crate::harness::Bench;

/// Deliveries of one consumer: `(stream sequence, arrival)`, in stream order.
pub(crate) type DeliveryLog = Vec<(u64, Instant)>;

/// One running raw consumer.
pub(crate) struct RawConsumer {
    /// Highest sequence delivered so far.
    seen: Arc<AtomicU64>,
    task: JoinHandle<anyhow::Result<DeliveryLog>>,
}

impl RawConsumer {
    /// Starts consumer `name` on `stream` from its next new message.
    pub(crate) async fn start(
        bench: &Bench,
        stream: &StreamConfig,
        name: &str,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<RawConsumer> {
        let js = bench.fresh_context().await?;
        let consumer: PullConsumer = js
            .get_stream(&stream.name)
            .await?
            .create_consumer(pull::Config {
                durable_name: Some(name.to_owned()),
                deliver_policy: DeliverPolicy::New,
                ack_policy: AckPolicy::None,
                filter_subject: jetsync::group_filter(&stream.subject_prefix),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating raw consumer {name}"))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(1000)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .context("starting the raw pull")?;
        let seen = Arc::new(AtomicU64::new(0));
        let seen_by_task = seen.clone();
        let task = tokio::spawn(async move {
            let mut log = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                let next =
                    match tokio::time::timeout(Duration::from_millis(50), messages.next()).await {
                        Ok(next) => next,
                        Err(_) => continue,
                    };
                let at = Instant::now();
                let message = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => bail!("raw pull failed: {e}"),
                    None => bail!("raw pull ended"),
                };
                let seq = message
                    .info()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .stream_sequence;
                log.push((seq, at));
                seen_by_task.store(seq, Ordering::Relaxed);
            }
            Ok(log)
        });
        Ok(RawConsumer { seen, task })
    }

    /// Waits until this consumer was delivered `seq`.
    pub(crate) async fn wait_for(&self, seq: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.seen.load(Ordering::Relaxed) < seq {
            if self.task.is_finished() || Instant::now() >= deadline {
                bail!(
                    "raw consumer got seq {} of {seq}",
                    self.seen.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Its log (after the shared stop flag was set).
    pub(crate) async fn finish(self) -> anyhow::Result<DeliveryLog> {
        self.task.await.context("raw consumer task")?
    }
}
