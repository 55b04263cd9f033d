//! The jetsync applier: applies one sync group (a JetStream stream) to this instance's own
//! database, every event exactly once, in stream order, resuming after crashes and downtime.
//!
//! Embed it in a service with any [`Sink`] (the built-in [`SqliteSink`] and [`RedbSink`], or
//! your own), or run the `jetsync-applier` binary.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use jetsync_applier::{Engine, RedbOptions, RedbSink};
//!
//! let config = jetsync::Config::load(Some("jetsync.toml".as_ref()))?;
//! let sink = RedbSink::open(RedbOptions { path: "data/replica.redb".into(), audit: false })?;
//! let replica = sink.replica();
//! let engine = Engine::new(config, sink);
//! tokio::spawn(engine.run(async { let _ = tokio::signal::ctrl_c().await; }));
//! let row = replica.get("products", "A-1")?;
//! # let _ = row; Ok(()) }
//! ```

mod apply;
mod backoff;
mod bootstrap;
pub mod capture;
mod coalesce;
mod consumer;
mod decode;
mod delivery;
mod digest;
mod engine;
mod error;
mod fetch;
mod fleet;
mod gap;
mod http;
mod last_error;
mod offsets;
mod ops;
mod parked;
mod raw;
mod resync;
mod service;
mod shutdown;
mod sink;
mod sinks;
mod snapshot;
mod startup;
mod stats;
mod status;
mod txn;

pub use digest::{consistent_digest, row_hash, DigestBuilder, DigestError, DigestReport};
pub use engine::{run, Engine};
pub use error::EngineError;
pub use fleet::{
    collect_fleet, compare_digests, DigestComparison, Divergence, FleetError, FleetOptions,
    FleetReport, FleetRow, MemberState, NotCompared,
};
pub use gap::{GapMargin, GapThresholds, StreamLimits};
pub use http::{
    capture_readiness, readiness, render_metrics, router, HttpEndpoint, METRICS_CONTENT_TYPE,
    METRIC_NAMES,
};
pub use last_error::{LastError, LastErrorLayer};
pub use offsets::{read_checkpoint, read_parked, Checkpoint, Offsets, OffsetsError};
pub use ops::{drop_parked, resync_instance, retry_parked, RetryReport};
pub use parked::{group_by_row, ParkedEvent, RowId};
pub use resync::{ResyncDone, SnapshotProgress};
pub use service::{
    digest_bucket, fleet_bucket, provision_fleet_buckets, service_subject, FleetMember,
    SERVICE_NAME,
};
pub use sink::{Change, Sink, SinkError, TableDigest};
pub use sinks::postgres::{PostgresOptions, PostgresSink};
pub use sinks::redb::{read_audit, RedbOptions, RedbSink, Replica, ReplicaError};
pub use sinks::sqlite::{SqliteOptions, SqliteSink};
pub use sinks::{build_sink, AnySink};
pub use stats::{
    BatchDurations, FleetGauges, OpKind, Stats, StatsSnapshot, TableOpCount, BATCH_SECONDS_BUCKETS,
};
pub use status::{
    collect_status, ConsumerStatus, GroupStatus, RunInfo, StatusReport, STATUS_NATS_TIMEOUT,
};

/// The engine must be spawnable on a multi-threaded runtime with any built-in sink.
#[cfg(test)]
mod send_check {
    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn engine_future_is_send() {
        let config = jetsync::Config::default();
        let dir = tempfile::tempdir().unwrap();
        let sink =
            crate::SqliteSink::open(crate::SqliteOptions::new(dir.path().join("x.db"))).unwrap();
        let future = crate::Engine::new(config, sink).run(async {});
        assert_send(&future);
    }
}
