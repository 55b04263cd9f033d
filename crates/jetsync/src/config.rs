//! The configuration shared by the client crate and the applier (DESIGN §6).
//!
//! One TOML file (e.g. `jetsync.toml`), overridden by `JETSYNC_` environment variables with `__`
//! as the nesting separator (`JETSYNC_NATS__URL`, `JETSYNC_APPLY__BATCH_MAX`,
//! `JETSYNC_TABLES__PRODUCTS__KEY`), then validated: [`Config::load`] returns either a
//! configuration that is safe to run with or a [`ConfigError`] naming the offending key.
//!
//! Every struct denies unknown keys, so a typo fails loudly instead of silently running with a
//! default. Environment variables are matched with one exception: a `JETSYNC_` variable whose
//! name has no `__` and is not a top-level key (`JETSYNC_TEST_POSTGRES`, `JETSYNC_CONFIG`) is
//! not configuration and is ignored, so tools may use the prefix for their own variables. A
//! variable with `__` is always configuration, so `JETSYNC_NAT__URL` is reported as an unknown
//! key rather than ignored.
//!
//! Environment values of string-typed keys (instance, passwords, tokens, paths, names) are taken
//! verbatim: figment would otherwise turn `JETSYNC_NATS__PASSWORD=007` into the number 7.
//! Relative paths are relative to the working directory, not to the configuration file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

use crate::secret::Secret;
use crate::subject::{validate_prefix, TableName};

/// Prefix of the environment variables that override the configuration file.
pub const ENV_PREFIX: &str = "JETSYNC_";

/// The top-level configuration keys. A `JETSYNC_` variable without `__` is configuration only
/// when its name is one of these.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "instance", "data_dir", "nats", "stream", "tables", "sink", "apply", "http", "log", "capture",
    "fleet",
];

/// Name of the figment provider that reads the environment; errors use it to name the variable.
const ENV_PROVIDER_NAME: &str = "environment variable";

/// The whole configuration of one jetsync instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Identity of this instance, stable across restarts: it names the durable consumer
    /// (`jetsync_<instance>`) and the applier's files. 1 to 64 of `A-Z a-z 0-9 _ -`. Required.
    pub instance: String,
    /// Directory for the applier's checkpoint store (`<instance>.redb`) and the default sink files.
    pub data_dir: PathBuf,
    /// How to reach and authenticate to NATS.
    pub nats: NatsConfig,
    /// The JetStream stream (sync group) holding the change events.
    pub stream: StreamConfig,
    /// The synced tables and their settings, keyed by table name (`[a-z][a-z0-9_]{0,62}`). Only
    /// listed tables are written; events of other tables follow `apply.other_tables` (parked by
    /// default, retried at start once the table is listed).
    pub tables: BTreeMap<String, TableConfig>,
    /// Where the applier writes the rows.
    pub sink: SinkConfig,
    /// How the applier consumes and applies events.
    pub apply: ApplyConfig,
    /// The applier's HTTP endpoint (metrics, health, status).
    pub http: HttpConfig,
    /// Logging.
    pub log: LogConfig,
    /// Change capture: the relay that publishes what services write straight into their SQL
    /// tables (`[tables.<name>] capture = true`).
    pub capture: CaptureConfig,
    /// Fleet reporting: the NATS service registration, the status reports `fleet` reads, and
    /// the periodic digest behind `jetsync_fleet_diverged_tables`.
    pub fleet: FleetConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            instance: String::new(),
            data_dir: PathBuf::from("./data"),
            nats: NatsConfig::default(),
            stream: StreamConfig::default(),
            tables: BTreeMap::new(),
            sink: SinkConfig::default(),
            apply: ApplyConfig::default(),
            http: HttpConfig::default(),
            log: LogConfig::default(),
            capture: CaptureConfig::default(),
            fleet: FleetConfig::default(),
        }
    }
}

/// Connection to NATS. Configure at most one authentication method: `user` + `password`,
/// `token`, `nkey_seed_file` or `creds_file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or a comma-separated list of them (`nats://` or `tls://`). Credentials do
    /// not belong in the URL: use `user`/`password` or `token`.
    pub url: String,
    /// User name for user/password authentication (requires `password`).
    pub user: Option<String>,
    /// Password for user/password authentication (requires `user`).
    pub password: Option<Secret>,
    /// Token for token authentication.
    pub token: Option<Secret>,
    /// File holding an nkey seed (`SU...`) for nkey authentication.
    pub nkey_seed_file: Option<PathBuf>,
    /// Credentials file (JWT + nkey seed, as written by `nsc`) for decentralized authentication.
    pub creds_file: Option<PathBuf>,
    /// TLS settings.
    pub tls: TlsConfig,
    /// Timeout for establishing a connection to one server, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Timeout for requests (JetStream API calls, publish acknowledgements), in milliseconds.
    pub request_timeout_ms: u64,
    /// Client connection name shown by the server (`nats server report connections`); defaults
    /// to a name derived from the program and instance.
    pub name: Option<String>,
    /// Prefix of this connection's reply subjects (inboxes), instead of `_INBOX`. Give each
    /// NATS user its own (e.g. `_INBOX_catalog-1` for an applier, `_INBOX_catalog_pub` for a
    /// publisher) so its permissions can allow subscribing to `<inbox_prefix>.>` only, instead
    /// of every user's replies under `_INBOX.>`. Subject tokens of `A-Z a-z 0-9 _ - $`,
    /// separated by `.`, no wildcards, at most 128 characters. Unset: `_INBOX`.
    pub inbox_prefix: Option<String>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_owned(),
            user: None,
            password: None,
            token: None,
            nkey_seed_file: None,
            creds_file: None,
            tls: TlsConfig::default(),
            connect_timeout_ms: 5000,
            request_timeout_ms: 5000,
            name: None,
            inbox_prefix: None,
        }
    }
}

/// TLS to the NATS server. Setting `ca_file` or `cert_file` implies TLS, as does a `tls://` URL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file of the CA certificate(s) that signed the server's certificate (instead of the
    /// system roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (requires `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate (requires `cert_file`).
    pub key_file: Option<PathBuf>,
    /// Refuse to connect without TLS, even if the server does not ask for it.
    pub required: bool,
}

/// The JetStream stream that carries one sync group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Stream name, 1 to 64 of `A-Z a-z 0-9 _ -`.
    pub name: String,
    /// Subject prefix: table `t`, key `k` is published on `<subject_prefix>.t.<k>`.
    pub subject_prefix: String,
    /// Events kept per row (`max_msgs_per_subject`), 1 to 64. 1 makes the stream a compacted
    /// changelog holding the latest event of every row.
    pub history: i64,
    /// Stream replicas, 1 to 5 (3 in a cluster).
    pub replicas: usize,
    /// Create the stream, or update its settings, at startup. When false a missing stream is
    /// an error.
    pub provision: bool,
    /// Window within which a retried publish with the same event id is stored once, in ms.
    pub duplicate_window_ms: u64,
    /// Maximum events in the stream, -1 for unlimited. A limit can drop events an offline
    /// instance has not seen (see `apply.on_gap`).
    pub max_msgs: i64,
    /// Maximum stream size in bytes, -1 for unlimited. Same caveat as `max_msgs`.
    pub max_bytes: i64,
    /// Maximum event age in ms, 0 for unlimited. Same caveat as `max_msgs`.
    pub max_age_ms: u64,
    /// Multi-row transactions: provisioning enables atomic batch publish (`allow_atomic`) on
    /// the stream. Needs nats-server 2.12.1 or later. Provisioning never turns it off again
    /// (another publisher may rely on it).
    pub transactions: bool,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            name: "JETSYNC".to_owned(),
            subject_prefix: "jetsync".to_owned(),
            history: 1,
            replicas: 1,
            provision: true,
            duplicate_window_ms: 120_000,
            max_msgs: -1,
            max_bytes: -1,
            max_age_ms: 0,
            transactions: false,
        }
    }
}

/// Settings of one synced table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableConfig {
    /// Name of the key column in the sink (the row key carried in the subject).
    pub key: String,
    /// Postgres only: an upsert sets only the columns the event carries and keeps the others
    /// (merge). Off by default, where an upsert replaces every synced column (columns the event
    /// lacks take their default). Caveat: with merge, a row's content depends on which earlier
    /// events an instance saw, so an instance that joined from a snapshot can differ from one
    /// that replayed the history.
    pub merge: bool,
    /// Change capture: `jetsync-applier capture install` puts triggers on this table that
    /// record every INSERT, UPDATE and DELETE the service makes into the outbox
    /// (`jetsync_outbox`), and `run` publishes them (SQLite and Postgres sinks).
    pub capture: bool,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            key: DEFAULT_KEY_COLUMN.to_owned(),
            merge: false,
            capture: false,
        }
    }
}

/// Change capture settings (`[capture]`), used when a table has `capture = true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Publish each local transaction as one atomic transaction (default). Needs nats-server
    /// 2.12.1 or later and implies `stream.transactions = true`. `false` explicitly allows
    /// publishing captured rows one by one (non-atomic) on servers without atomic batches.
    pub atomic: bool,
    /// Longest wait between the relay's looks at the outbox when no commit wakes it, in ms
    /// (1 to 60000); commits of captured changes wake it at once.
    pub poll_ms: u64,
    /// Most outbox rows the relay reads per cycle (100 to 100000).
    pub max_batch_rows: usize,
    /// `/readyz` fails while more than this many outbox rows wait to be published
    /// (0 disables the check).
    pub ready_max_backlog: u64,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            atomic: true,
            poll_ms: 10,
            max_batch_rows: 10_000,
            ready_max_backlog: 10_000,
        }
    }
}

impl CaptureConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=60_000).contains(&self.poll_ms) {
            return Err(ConfigError::invalid(
                "capture.poll_ms",
                format!(
                    "{} is out of range: use 1 to 60000 (default 10)",
                    self.poll_ms
                ),
            ));
        }
        if !(100..=100_000).contains(&self.max_batch_rows) {
            return Err(ConfigError::invalid(
                "capture.max_batch_rows",
                format!(
                    "{} is out of range: use 100 to 100000 (default 10000)",
                    self.max_batch_rows
                ),
            ));
        }
        Ok(())
    }
}

/// Key column of a table that has no `[tables.<name>]` entry.
pub const DEFAULT_KEY_COLUMN: &str = "id";

/// Where the applier writes rows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Sink type: `sqlite` (default), `postgres` or `redb`.
    pub kind: SinkKind,
    /// Database file for `sqlite` (default `<data_dir>/<instance>.db`) and `redb` (default
    /// `<data_dir>/<instance>.replica.redb`).
    pub path: Option<PathBuf>,
    /// Connection URL for `postgres` (`postgres://user:pass@host/db`); required for it.
    pub url: Option<Secret>,
    /// Postgres schema for the synced tables and `jetsync_offsets` (default: the connection's
    /// `current_schema()`, so a `search_path` given in the URL is honoured).
    pub schema: Option<String>,
    /// redb replica only: keep a per-sequence apply count, so tests can prove nothing was
    /// applied twice.
    pub audit: bool,
    /// What to do with a row column the sink table does not have and cannot add.
    pub unknown_columns: UnknownColumns,
}

/// Sink type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// One SQLite file per instance.
    #[default]
    Sqlite,
    /// The service's existing Postgres database.
    Postgres,
    /// An embedded redb replica, for services running the applier in-process.
    Redb,
}

/// Handling of row columns the sink table does not have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownColumns {
    /// Treat the event as poison (see `apply.on_poison`).
    #[default]
    Error,
    /// Drop the unknown columns and apply the rest.
    Ignore,
}

/// How the applier consumes and applies events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApplyConfig {
    /// Most events applied in one sink transaction, 1 to 100000.
    pub batch_max: usize,
    /// How long to wait for more events to fill a batch while more are known to be pending, ms.
    pub batch_wait_ms: u64,
    /// What to do when events this instance never applied are gone from the stream.
    pub on_gap: OnGap,
    /// What to do with an event that can never be applied.
    pub on_poison: OnPoison,
    /// Consumer `ack_wait` in ms: a delivery not acknowledged within it is redelivered. Keep it
    /// well above the slowest batch commit.
    pub ack_wait_ms: u64,
    /// Idle heartbeat of pull requests in ms, which detects a stalled server or consumer.
    pub heartbeat_ms: u64,
    /// Upper bound of the backoff between retries when NATS or the sink is unavailable, ms.
    pub retry_max_backoff_ms: u64,
    /// Whether an instance with nothing applied and an empty sink joins from a snapshot (the
    /// latest event of every row). `false` replays the whole history the stream holds instead,
    /// for databases whose side effects depend on seeing every stored event (audit triggers).
    pub bootstrap: bool,
    /// Events for a table without a `[tables.<name>]` entry: `park` (default; parked with the
    /// reason "table not synced here" and retried at start once a config lists the table),
    /// `skip` (counted and acknowledged: this instance deliberately syncs only some tables),
    /// or `create` (SQLite sink only: create and write any table the stream names; a publisher
    /// can then create tables in the instance's database).
    pub other_tables: OtherTables,
    /// Most bytes of event bodies in one pull and one sink transaction (besides `batch_max`).
    pub batch_max_bytes: u64,
    /// Largest event body in bytes; a larger event is parked without being decoded.
    pub max_event_bytes: u64,
    /// Most columns in one row; an event with more is parked.
    pub max_columns: usize,
    /// Replicas of the per-instance durable consumer, 1 to 5 and at most the stream's
    /// replicas. 1 (default) on single servers and replicated streams alike: the sink's fence is
    /// the truth, and a consumer lost with its node is recreated at the applied sequence + 1.
    pub consumer_replicas: usize,
    /// Storage of the per-instance durable consumer's state: `memory` (default; it vanishes
    /// when its server restarts and is recreated at the applied sequence + 1) or `file`.
    pub consumer_storage: ConsumerStorage,
    /// On a stream with `max_msgs` or `max_bytes`, warn in the log while fewer than this many
    /// more events can be published before the stream drops one this instance has not applied
    /// (`jetsync_gap_margin_events`). 0 (default): a tenth of the stream's `max_msgs`.
    pub gap_warn_events: u64,
    /// On a stream with `max_age`, warn in the log while the oldest event this instance has
    /// not applied expires in less than this many seconds (`jetsync_gap_margin_seconds`).
    /// 0 (default): a tenth of the stream's `max_age`.
    pub gap_warn_seconds: u64,
    /// Within one batch (one sink transaction), write a row changed several times once, with
    /// its last change (an upsert replaces the row, so the end state is the same). `false`
    /// hands the sink every change (databases whose triggers must see each one). Never applies
    /// to the redb replica's audit mode or to tables with `merge = true`.
    pub coalesce: bool,
}

/// Where a durable consumer keeps its state (delivered and acknowledged sequences).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsumerStorage {
    /// In memory: no disk writes, no replicated log; lost when its server restarts.
    #[default]
    Memory,
    /// On disk, as the stream.
    File,
}

/// Handling of events for tables that have no `[tables.<name>]` entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtherTables {
    /// Park them ("table not synced here"); they are retried at start once the table is listed.
    #[default]
    Park,
    /// Count and acknowledge them without applying them.
    Skip,
    /// SQLite sink only: create and write any table the stream names.
    Create,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            batch_max: 1000,
            batch_wait_ms: 5,
            on_gap: OnGap::default(),
            on_poison: OnPoison::default(),
            ack_wait_ms: 30_000,
            heartbeat_ms: 5000,
            retry_max_backoff_ms: 5000,
            bootstrap: true,
            other_tables: OtherTables::default(),
            // Two batches are in flight (one applied, one received) plus a pull, each holding
            // bodies and decoded rows: at 16 MiB a flood of 1 MiB events took the applier to
            // 175 MiB, at 4 MiB to 84 MiB, with the same throughput (DESIGN 9: < 128 MiB).
            batch_max_bytes: 4 * 1024 * 1024,
            max_event_bytes: 1024 * 1024,
            max_columns: 1000,
            consumer_replicas: 1,
            consumer_storage: ConsumerStorage::default(),
            gap_warn_events: 0,
            gap_warn_seconds: 0,
            coalesce: true,
        }
    }
}

/// Reaction to a gap between the last applied sequence and the stream's first sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnGap {
    /// Rebuild the synced tables from a snapshot of the stream.
    #[default]
    Resync,
    /// Stop with an error naming the applied and first available sequences.
    Halt,
}

/// Reaction to a poison event (undecodable, or permanently rejected by the sink).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPoison {
    /// Record it, hold later events of the same row behind it, keep applying other rows.
    #[default]
    Park,
    /// Stop with an error.
    Halt,
}

/// The applier's HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address, e.g. `127.0.0.1:9464`. Unset disables the endpoint.
    pub listen: Option<SocketAddr>,
    /// `/readyz` fails while the applier is more than this many events behind the stream.
    pub ready_max_lag: u64,
    /// A client must send a request's complete header within this many ms of starting it, or
    /// the connection is closed (slow or half-open clients cannot hold connections).
    pub header_timeout_ms: u64,
    /// A keep-alive connection with no request in flight is closed after this many ms.
    pub idle_timeout_ms: u64,
    /// Most connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            ready_max_lag: 1000,
            header_timeout_ms: 5000,
            idle_timeout_ms: 60_000,
            max_connections: 256,
        }
    }
}

impl HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.header_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "http.header_timeout_ms",
                "must be positive (default 5000)",
            ));
        }
        if self.idle_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "http.idle_timeout_ms",
                "must be positive (default 60000)",
            ));
        }
        if !(1..=65_536).contains(&self.max_connections) {
            return Err(ConfigError::invalid(
                "http.max_connections",
                format!(
                    "{} is out of range: use 1 to 65536 (default 256)",
                    self.max_connections
                ),
            ));
        }
        Ok(())
    }
}

/// Fleet reporting (`[fleet]`): every `run` answers the NATS service protocol as service
/// `jetsync` and writes its status to the JetStream key-value bucket `jetsync_fleet_<stream>`,
/// which `jetsync-applier fleet` reads for instances that stopped answering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Register with the NATS service protocol and write status reports (default true).
    pub enabled: bool,
    /// How often the status report (with the gap margin) is refreshed and written, ms.
    pub report_interval_ms: u64,
    /// At most this often, when it has caught up with the stream, the instance digests its
    /// tables and compares the digest with the one the first instance recorded at the same
    /// applied sequence (`jetsync_fleet_diverged_tables`), ms. 0 disables it.
    pub digest_interval_ms: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            enabled: true,
            report_interval_ms: 5000,
            digest_interval_ms: 60_000,
        }
    }
}

impl FleetConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.report_interval_ms < 100 {
            return Err(ConfigError::invalid(
                "fleet.report_interval_ms",
                format!(
                    "{} ms is too short: use at least 100 (default 5000)",
                    self.report_interval_ms
                ),
            ));
        }
        if self.digest_interval_ms != 0 && self.digest_interval_ms < 1000 {
            return Err(ConfigError::invalid(
                "fleet.digest_interval_ms",
                format!(
                    "{} ms is too short: use 0 (off) or at least 1000 (default 60000)",
                    self.digest_interval_ms
                ),
            ));
        }
        Ok(())
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Output format: `text` (default) or `json`.
    pub format: LogFormat,
    /// Level or filter directive (`info`, `jetsync=debug,async_nats=warn`); `RUST_LOG`, when
    /// set, takes precedence.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: "info".to_owned(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Why a configuration could not be loaded. Every variant names what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file given explicitly does not exist.
    #[error("configuration file {} does not exist: check the --config path", path.display())]
    FileNotFound {
        /// The path as given.
        path: PathBuf,
    },
    /// A source could not be read or a value has the wrong type, or a key is unknown.
    #[error("{}", match key { Some(key) => format!("{key}: {message}"), None => message.clone() })]
    Parse {
        /// Dotted key path (`apply.batch_max`), when known.
        key: Option<String>,
        /// What is wrong and where the value came from.
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted key path (`nats.url`, `tables.products`).
        key: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

impl ConfigError {
    /// The dotted key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::FileNotFound { .. } => None,
            ConfigError::Parse { key, .. } => key.as_deref(),
            ConfigError::Invalid { key, .. } => Some(key),
        }
    }

    pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn from_figment(error: figment::Error) -> Self {
        let mut path = error.path.clone();
        let message = match &error.kind {
            figment::error::Kind::UnknownField(field, expected) => {
                // figment usually reports the path including the unknown key; make sure.
                if path.last() != Some(field) {
                    path.push(field.clone());
                }
                format!("unknown key; valid keys here are: {}", expected.join(", "))
            }
            // The value itself is never repeated (it may be a secret given to the wrong key,
            // e.g. a password in `sink.kind`): the key and the choices say enough.
            figment::error::Kind::UnknownVariant(_, expected) => {
                format!("unknown value; expected one of: {}", expected.join(", "))
            }
            figment::error::Kind::InvalidType(actual, expected) => {
                format!(
                    "invalid type: found {}, expected {expected}",
                    kind_of(actual)
                )
            }
            figment::error::Kind::InvalidValue(actual, expected) => {
                format!(
                    "invalid value: found {}, expected {expected}",
                    kind_of(actual)
                )
            }
            figment::error::Kind::ISizeOutOfRange(_) | figment::error::Kind::USizeOutOfRange(_) => {
                "the number is out of range for this key".to_owned()
            }
            figment::error::Kind::Unsupported(actual) => {
                format!("unsupported value: {}", kind_of(actual))
            }
            figment::error::Kind::UnsupportedKey(actual, _) => {
                format!("unsupported key: {}", kind_of(actual))
            }
            figment::error::Kind::Message(message) => without_quoted_source(message),
            kind => kind.to_string().trim_end().to_owned(),
        };
        let origin = match &error.metadata {
            Some(md) if md.name == ENV_PROVIDER_NAME && !path.is_empty() => {
                let profile = error.profile.clone().unwrap_or_default();
                format!(
                    " (from environment variable {})",
                    md.interpolate(&profile, &path)
                )
            }
            Some(md) => match md.source.as_ref().and_then(|s| s.file_path()) {
                Some(file) => format!(" (in {})", file.display()),
                None => format!(" (from {})", md.name),
            },
            None => String::new(),
        };
        ConfigError::Parse {
            key: (!path.is_empty()).then(|| path.join(".")),
            message: format!("{message}{origin}"),
        }
    }
}

/// What kind of value `actual` is, without the value itself (which may be a secret).
fn kind_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a floating-point number",
        Actual::Char(_) => "a character",
        Actual::Str(_) | Actual::Other(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit | Actual::Option => "no value",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        _ => "another kind of value",
    }
}

/// A parse error message without the source text it quotes: a TOML syntax error shows the
/// offending line (which may hold a password, a token or a database URL) between `|` gutter
/// lines. Only the position (`TOML parse error at line 3, column 12`) and the description are
/// kept.
fn without_quoted_source(message: &str) -> String {
    let is_gutter = |line: &str| {
        let rest = line
            .trim_start()
            .trim_start_matches(|c: char| c.is_ascii_digit());
        rest.trim_start().starts_with('|')
    };
    let kept: Vec<&str> = message
        .lines()
        .filter(|line| !is_gutter(line) && !line.trim().is_empty())
        .map(str::trim)
        .collect();
    kept.join(": ")
}

impl Config {
    /// Loads the configuration: defaults, then the TOML file at `path` (if given; it must
    /// exist), then `JETSYNC_` environment variables, then [`Config::validate`].
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::from_figment(Config::figment(path)?)
    }

    /// The figment [`Config::load`] extracts from, for callers that merge more providers (for
    /// example command-line flags) before calling [`Config::from_figment`].
    ///
    /// Do not merge `Serialized::defaults(config)` of a loaded `Config` into it: secrets
    /// serialize as `<redacted>`, which would replace the real values.
    pub fn figment(path: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            // figment treats a missing file as an empty source; an explicit path must exist.
            if !path.exists() {
                return Err(ConfigError::FileNotFound {
                    path: path.to_owned(),
                });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        Ok(figment.merge(EnvProvider::new()))
    }

    /// The tables with `capture = true`, in name order.
    pub fn captured_tables(&self) -> impl Iterator<Item = &str> {
        self.tables
            .iter()
            .filter(|(_, t)| t.capture)
            .map(|(name, _)| name.as_str())
    }

    /// Whether some table is captured and captured transactions are published atomically
    /// (`capture.atomic`, the default): the stream then needs atomic batches
    /// (`stream.transactions`, which loading the configuration sets).
    pub fn capture_atomic(&self) -> bool {
        self.capture.atomic && self.captured_tables().next().is_some()
    }

    /// Extracts and validates a configuration. Keys the figment lacks take their defaults.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let mut config: Config = figment.extract().map_err(ConfigError::from_figment)?;
        config.validate()?;
        // Atomic capture publishes transactions: the stream must allow atomic batches.
        if config.capture_atomic() {
            config.stream.transactions = true;
        }
        Ok(config)
    }

    /// Checks everything that can be checked without connecting anywhere: formats, ranges,
    /// conflicting settings and that the named files exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.instance.is_empty() {
            return Err(ConfigError::invalid(
                "instance",
                "must be set: add `instance = \"<name>\"` to the configuration file or set \
                 JETSYNC_INSTANCE (a name stable across restarts, unique per instance)",
            ));
        }
        if !is_name(&self.instance, 64) {
            return Err(ConfigError::invalid(
                "instance",
                format!(
                    "`{}` is not a valid instance name: use 1 to 64 of A-Z a-z 0-9 _ -",
                    self.instance
                ),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "data_dir",
                "must not be empty: set a directory, e.g. \"./data\"",
            ));
        }
        self.nats.validate()?;
        self.stream.validate()?;
        if self.apply.other_tables == OtherTables::Create && self.sink.kind != SinkKind::Sqlite {
            return Err(ConfigError::invalid(
                "apply.other_tables",
                "\"create\" works with the SQLite sink only: use \"park\" (default) or \"skip\", \
                 and list every table to sync under [tables.<name>]",
            ));
        }
        for (name, table) in &self.tables {
            TableName::new(name)
                .map_err(|err| ConfigError::invalid(format!("tables.{name}"), err.to_string()))?;
            if !is_identifier(&table.key) {
                return Err(ConfigError::invalid(
                    format!("tables.{name}.key"),
                    format!(
                        "`{}` is not a column name: use 1 to 63 of a-z A-Z 0-9 _, not starting \
                         with a digit",
                        table.key
                    ),
                ));
            }
        }
        self.sink.validate()?;
        self.apply.validate()?;
        self.http.validate()?;
        self.capture.validate()?;
        if let Some(name) = self.captured_tables().next() {
            if self.sink.kind == SinkKind::Redb {
                return Err(ConfigError::invalid(
                    format!("tables.{name}.capture"),
                    "capture works with the sqlite and postgres sinks only (the redb replica \
                     has no SQL writers to capture)",
                ));
            }
        }
        self.fleet.validate()?;
        if self.log.level.trim().is_empty() {
            return Err(ConfigError::invalid(
                "log.level",
                "must not be empty: use e.g. \"info\" or \"jetsync=debug,info\"",
            ));
        }
        Ok(())
    }

    /// Name of this instance's durable consumer: `jetsync_<instance>`, with any character
    /// outside `A-Z a-z 0-9 _ -` replaced by `_`.
    pub fn consumer_name(&self) -> String {
        let sanitized: String = self
            .instance
            .chars()
            .map(|c| if is_name_char(c) { c } else { '_' })
            .collect();
        format!("jetsync_{sanitized}")
    }

    /// The applier's checkpoint store: `<data_dir>/<instance>.redb`.
    pub fn redb_path(&self) -> PathBuf {
        self.data_dir.join(format!("{}.redb", self.instance))
    }

    /// The sink's database file: `sink.path`, else `<data_dir>/<instance>.db` for sqlite and
    /// `<data_dir>/<instance>.replica.redb` for redb; `None` for postgres.
    pub fn sink_path(&self) -> Option<PathBuf> {
        match self.sink.kind {
            SinkKind::Postgres => None,
            SinkKind::Sqlite => Some(
                self.sink
                    .path
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join(format!("{}.db", self.instance))),
            ),
            SinkKind::Redb => Some(self.sink.path.clone().unwrap_or_else(|| {
                self.data_dir
                    .join(format!("{}.replica.redb", self.instance))
            })),
        }
    }

    /// The key column of `table`: its `tables.<table>.key`, else `id`.
    pub fn table_key(&self, table: &str) -> &str {
        self.tables
            .get(table)
            .map_or(DEFAULT_KEY_COLUMN, |t| t.key.as_str())
    }
}

impl NatsConfig {
    /// The servers in `url`, parsed. Empty entries (a trailing comma) are skipped.
    pub fn server_addrs(&self) -> Result<Vec<async_nats::ServerAddr>, ConfigError> {
        let mut servers = Vec::new();
        for entry in self.url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            servers.push(parse_server(entry)?);
        }
        if servers.is_empty() {
            return Err(ConfigError::invalid(
                "nats.url",
                "no server given: set e.g. \"nats://127.0.0.1:4222\" (or a comma-separated list)",
            ));
        }
        Ok(servers)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.server_addrs()?;
        let user_password = self.user.is_some() || self.password.is_some();
        let methods = [
            user_password.then_some("nats.user/nats.password"),
            self.token.is_some().then_some("nats.token"),
            self.nkey_seed_file
                .is_some()
                .then_some("nats.nkey_seed_file"),
            self.creds_file.is_some().then_some("nats.creds_file"),
        ];
        let methods: Vec<&str> = methods.into_iter().flatten().collect();
        if methods.len() > 1 {
            return Err(ConfigError::invalid(
                methods[1],
                format!(
                    "conflicts with {}: configure only one NATS authentication method",
                    methods[0]
                ),
            ));
        }
        match (&self.user, &self.password) {
            (Some(user), _) if user.is_empty() => {
                return Err(ConfigError::invalid("nats.user", "must not be empty"));
            }
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "nats.password",
                    "missing: nats.user is set, so set nats.password too (or \
                     JETSYNC_NATS__PASSWORD)",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "nats.user",
                    "missing: nats.password is set, so set nats.user too",
                ));
            }
            _ => {}
        }
        if self.token.as_ref().is_some_and(Secret::is_empty) {
            return Err(ConfigError::invalid(
                "nats.token",
                "must not be empty: remove it or set the token",
            ));
        }
        check_file("nats.nkey_seed_file", self.nkey_seed_file.as_deref())?;
        check_file("nats.creds_file", self.creds_file.as_deref())?;
        check_file("nats.tls.ca_file", self.tls.ca_file.as_deref())?;
        check_file("nats.tls.cert_file", self.tls.cert_file.as_deref())?;
        check_file("nats.tls.key_file", self.tls.key_file.as_deref())?;
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "nats.tls.key_file",
                    "missing: nats.tls.cert_file is set, so set the file of its private key",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "nats.tls.cert_file",
                    "missing: nats.tls.key_file is set, so set the client certificate file",
                ));
            }
            _ => {}
        }
        if self.connect_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "nats.connect_timeout_ms",
                "must be positive (default 5000)",
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "nats.request_timeout_ms",
                "must be positive (default 5000)",
            ));
        }
        if self.name.as_ref().is_some_and(|n| n.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "nats.name",
                "must not be empty: remove it to use the default",
            ));
        }
        if let Some(prefix) = &self.inbox_prefix {
            validate_inbox_prefix(prefix)
                .map_err(|reason| ConfigError::invalid("nats.inbox_prefix", reason))?;
        }
        Ok(())
    }

    /// Whether the connection must use TLS: `tls.required`, a CA or client certificate given,
    /// or a `tls://` server URL.
    pub fn tls_required(&self) -> bool {
        self.tls.required
            || self.tls.ca_file.is_some()
            || self.tls.cert_file.is_some()
            || self
                .url
                .split(',')
                .any(|s| s.trim().to_ascii_lowercase().starts_with("tls://"))
    }
}

/// Checks `nats.inbox_prefix`: a literal subject (no wildcards, no empty tokens) of at most 128
/// characters, so `<prefix>.<id>` is a valid reply subject and `<prefix>.>` a valid permission.
fn validate_inbox_prefix(prefix: &str) -> Result<(), String> {
    const HINT: &str = "use subject tokens of A-Z a-z 0-9 _ - $ separated by `.`, e.g. \
                        \"_INBOX_catalog-1\"";
    if prefix.is_empty() {
        return Err("must not be empty: remove it to use the default `_INBOX`".to_owned());
    }
    if prefix.len() > 128 {
        return Err(format!(
            "is {} characters long; at most 128 are allowed",
            prefix.len()
        ));
    }
    if prefix.split('.').any(|token| {
        token.is_empty()
            || !token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-$".contains(c))
    }) {
        return Err(format!("`{prefix}` is not a valid inbox prefix: {HINT}"));
    }
    Ok(())
}

/// Parses one server of `nats.url`. The error never repeats the URL when it carries
/// credentials.
fn parse_server(entry: &str) -> Result<async_nats::ServerAddr, ConfigError> {
    let invalid = |reason: String| ConfigError::invalid("nats.url", reason);
    let addr: async_nats::ServerAddr = entry.parse().map_err(|err: std::io::Error| {
        if entry.contains('@') {
            invalid(format!("a server URL is invalid: {err}"))
        } else {
            invalid(format!("`{entry}` is invalid: {err}"))
        }
    })?;
    if addr.has_user_pass() || addr.password().is_some() {
        // async-nats 0.51 ignores credentials in the URL; accepting them would silently connect
        // unauthenticated, and the URL would carry a secret into logs.
        return Err(invalid(
            "credentials in the URL are not supported: set nats.user and nats.password (or \
             nats.token) instead"
                .to_owned(),
        ));
    }
    if addr.is_websocket() {
        return Err(invalid(format!(
            "`{entry}`: websocket URLs are not supported; use nats:// or tls://"
        )));
    }
    if addr.host().is_empty() {
        return Err(invalid(format!(
            "`{entry}` has no host: use e.g. nats://127.0.0.1:4222"
        )));
    }
    let url = addr.clone().into_inner();
    if url.path() != "" && url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(format!(
            "`{entry}`: a server URL has only scheme, host and port, e.g. nats://127.0.0.1:4222"
        )));
    }
    Ok(addr)
}

impl StreamConfig {
    /// Checks the stream settings (also used by `ClientBuilder::build` for configs built in
    /// code), naming the offending `stream.*` key.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !is_name(&self.name, 64) {
            return Err(ConfigError::invalid(
                "stream.name",
                format!(
                    "`{}` is not a valid stream name: use 1 to 64 of A-Z a-z 0-9 _ -",
                    self.name
                ),
            ));
        }
        validate_prefix(&self.subject_prefix)
            .map_err(|err| ConfigError::invalid("stream.subject_prefix", err.to_string()))?;
        if !(1..=64).contains(&self.history) {
            return Err(ConfigError::invalid(
                "stream.history",
                format!(
                    "{} is out of range: events kept per row is 1 to 64",
                    self.history
                ),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(ConfigError::invalid(
                "stream.replicas",
                format!("{} is out of range: use 1 to 5", self.replicas),
            ));
        }
        for (key, value) in [
            ("stream.max_msgs", self.max_msgs),
            ("stream.max_bytes", self.max_bytes),
        ] {
            if value == 0 || value < -1 {
                return Err(ConfigError::invalid(
                    key,
                    format!("{value} is not a limit: use -1 for unlimited or a positive number"),
                ));
            }
        }
        // The server replaces 0 with its own default (so provisioning would "update" the stream
        // on every start) and refuses a window longer than the age limit.
        if self.duplicate_window_ms < 100 {
            return Err(ConfigError::invalid(
                "stream.duplicate_window_ms",
                format!(
                    "{} ms is too short: use at least 100 ms (default 120000)",
                    self.duplicate_window_ms
                ),
            ));
        }
        if self.max_age_ms > 0 && self.duplicate_window_ms > self.max_age_ms {
            return Err(ConfigError::invalid(
                "stream.duplicate_window_ms",
                format!(
                    "{} ms exceeds stream.max_age_ms ({} ms): the server refuses a duplicate window longer than the age limit",
                    self.duplicate_window_ms, self.max_age_ms
                ),
            ));
        }
        Ok(())
    }
}

impl SinkConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.kind == SinkKind::Postgres
            && self
                .url
                .as_ref()
                .is_none_or(|url| url.expose().trim().is_empty())
        {
            return Err(ConfigError::invalid(
                "sink.url",
                "required with kind = \"postgres\": set sink.url (or JETSYNC_SINK__URL) to \
                 postgres://user:password@host:5432/database",
            ));
        }
        if let Some(url) = &self.url {
            if self.kind == SinkKind::Postgres {
                check_postgres_url(url.expose())
                    .map_err(|reason| ConfigError::invalid("sink.url", reason))?;
            }
        }
        if self.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(ConfigError::invalid(
                "sink.path",
                "must not be empty: remove it to use the default file",
            ));
        }
        if let Some(schema) = &self.schema {
            if !is_identifier(schema) {
                return Err(ConfigError::invalid(
                    "sink.schema",
                    format!(
                        "`{schema}` is not a schema name: use 1 to 63 of a-z A-Z 0-9 _, not \
                         starting with a digit"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks the shape of a Postgres connection string without connecting: a
/// `postgres://`/`postgresql://` URL with a host part, or a libpq `key=value` list. The error
/// never repeats the string (it usually carries a password).
fn check_postgres_url(url: &str) -> Result<(), String> {
    let url = url.trim();
    match url.split_once("://") {
        Some((scheme, rest)) => {
            if !scheme.eq_ignore_ascii_case("postgres") && !scheme.eq_ignore_ascii_case("postgresql")
            {
                let shown = if scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                {
                    format!("`{scheme}://`")
                } else {
                    "the scheme".to_owned()
                };
                return Err(format!(
                    "{shown} is not a Postgres URL scheme: use postgres://user:password@host:5432/database"
                ));
            }
            if rest.chars().any(char::is_whitespace) {
                return Err(
                    "the URL contains whitespace: percent-encode it (%20), e.g. in the password"
                        .to_owned(),
                );
            }
            Ok(())
        }
        None if url.contains('=') => Ok(()),
        None => Err(
            "not a Postgres connection string: use postgres://user:password@host:5432/database              (or libpq key=value pairs)"
                .to_owned(),
        ),
    }
}

impl ApplyConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=100_000).contains(&self.batch_max) {
            return Err(ConfigError::invalid(
                "apply.batch_max",
                format!("{} is out of range: use 1 to 100000", self.batch_max),
            ));
        }
        if self.ack_wait_ms < 1000 {
            return Err(ConfigError::invalid(
                "apply.ack_wait_ms",
                format!(
                    "{} ms is too short: use at least 1000, well above the slowest batch commit",
                    self.ack_wait_ms
                ),
            ));
        }
        if self.heartbeat_ms == 0 {
            return Err(ConfigError::invalid(
                "apply.heartbeat_ms",
                "must be positive (default 5000): pulls without a heartbeat can stall silently",
            ));
        }
        if self.retry_max_backoff_ms == 0 {
            return Err(ConfigError::invalid(
                "apply.retry_max_backoff_ms",
                "must be positive (default 5000)",
            ));
        }
        if self.max_event_bytes < 1024 {
            return Err(ConfigError::invalid(
                "apply.max_event_bytes",
                format!(
                    "{} is too small: use at least 1024 (default 1048576)",
                    self.max_event_bytes
                ),
            ));
        }
        if self.batch_max_bytes < self.max_event_bytes {
            return Err(ConfigError::invalid(
                "apply.batch_max_bytes",
                format!(
                    "{} is below apply.max_event_bytes ({}): a batch must hold the largest event",
                    self.batch_max_bytes, self.max_event_bytes
                ),
            ));
        }
        if !(1..=5).contains(&self.consumer_replicas) {
            return Err(ConfigError::invalid(
                "apply.consumer_replicas",
                format!(
                    "{} is out of range: use 1 to 5 (default 1)",
                    self.consumer_replicas
                ),
            ));
        }
        if !(1..=100_000).contains(&self.max_columns) {
            return Err(ConfigError::invalid(
                "apply.max_columns",
                format!(
                    "{} is out of range: use 1 to 100000 (default 1000)",
                    self.max_columns
                ),
            ));
        }
        Ok(())
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// 1 to `max` characters of `A-Z a-z 0-9 _ -`.
fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(is_name_char)
}

/// An SQL identifier usable unquoted in SQLite and Postgres: `[A-Za-z_][A-Za-z0-9_]{0,62}`.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_file(key: &str, path: Option<&Path>) -> Result<(), ConfigError> {
    let Some(path) = path else { return Ok(()) };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::invalid(
            key,
            format!("{} is not a regular file", path.display()),
        )),
        Err(err) => Err(ConfigError::invalid(
            key,
            format!("cannot read {}: {err}", path.display()),
        )),
    }
}

/// The `JETSYNC_` environment as a figment provider.
///
/// Unlike figment's `Env`, it keeps the values of string-typed keys verbatim (figment parses
/// every value, so a password `007` would become the integer 7 and fail to load), ignores
/// flat variables that are not top-level keys (see the module docs), and names the variable
/// (`JETSYNC_APPLY__BATCH_MAX`) in errors.
struct EnvProvider {
    env: Env,
}

impl EnvProvider {
    fn new() -> Self {
        let env = Env::prefixed(ENV_PREFIX).split("__").filter(|key| {
            let key = key.as_str();
            key.contains('.') || TOP_LEVEL_KEYS.iter().any(|k| key.eq_ignore_ascii_case(k))
        });
        EnvProvider { env }
    }
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_PROVIDER_NAME).interpolater(|_: &Profile, keys: &[&str]| {
            format!("{ENV_PREFIX}{}", keys.join("__").to_ascii_uppercase())
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, raw) in self.env.iter() {
            let path: Vec<&str> = key.as_str().split('.').collect();
            let value = if is_string_key(&path) {
                Value::from(raw)
            } else {
                raw.parse().expect("parsing a figment value is infallible")
            };
            insert_nested(&mut dict, &path, value);
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Keys whose environment values are strings and must not be parsed as numbers, booleans or
/// arrays.
fn is_string_key(path: &[&str]) -> bool {
    matches!(
        path,
        ["instance" | "data_dir"]
            | [
                "nats",
                "url"
                    | "user"
                    | "password"
                    | "token"
                    | "nkey_seed_file"
                    | "creds_file"
                    | "name"
                    | "inbox_prefix"
            ]
            | ["nats", "tls", "ca_file" | "cert_file" | "key_file"]
            | ["stream", "name" | "subject_prefix"]
            | ["tables", _, "key"]
            | [
                "sink",
                "kind" | "path" | "url" | "schema" | "unknown_columns"
            ]
            | ["apply", "on_gap" | "on_poison"]
            | ["http", "listen"]
            | ["log", "format" | "level"]
    )
}

fn insert_nested(dict: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry((*first).to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
// figment::Jail closures must return figment::Result, whose error type is large.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn duplicate_window_is_checked_against_the_server_rules() {
        let mut c = Config {
            instance: "i-1".into(),
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        c.stream.duplicate_window_ms = 0;
        assert_eq!(
            c.validate().unwrap_err().key(),
            Some("stream.duplicate_window_ms")
        );
        c.stream.duplicate_window_ms = 120_000;
        c.stream.max_age_ms = 60_000;
        assert_eq!(
            c.validate().unwrap_err().key(),
            Some("stream.duplicate_window_ms")
        );
        c.stream.duplicate_window_ms = 30_000;
        assert!(c.validate().is_ok());
    }

    fn load_in_jail(jail: &mut Jail, toml: Option<&str>) -> Result<Config, ConfigError> {
        jail.clear_env();
        match toml {
            Some(contents) => {
                jail.create_file("jetsync.toml", contents)
                    .expect("write jetsync.toml");
                Config::load(Some(Path::new("jetsync.toml")))
            }
            None => Config::load(None),
        }
    }

    #[test]
    fn defaults() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("JETSYNC_INSTANCE", "catalog-1");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let expected = Config {
                instance: "catalog-1".to_owned(),
                ..Config::default()
            };
            assert_eq!(config, expected);
            assert_eq!(config.nats.url, "nats://127.0.0.1:4222");
            assert_eq!(config.stream.name, "JETSYNC");
            assert_eq!(config.stream.subject_prefix, "jetsync");
            assert_eq!(config.stream.history, 1);
            assert_eq!(config.stream.max_msgs, -1);
            assert_eq!(config.apply.batch_max, 1000);
            assert_eq!(config.apply.on_gap, OnGap::Resync);
            assert_eq!(config.apply.on_poison, OnPoison::Park);
            assert_eq!(config.sink.kind, SinkKind::Sqlite);
            assert_eq!(config.http.listen, None);
            assert_eq!(config.log.level, "info");
            assert_eq!(config.consumer_name(), "jetsync_catalog-1");
            assert_eq!(config.redb_path(), Path::new("./data/catalog-1.redb"));
            assert_eq!(
                config.sink_path(),
                Some(PathBuf::from("./data/catalog-1.db"))
            );
            assert_eq!(config.table_key("products"), "id");
            Ok(())
        });
    }

    #[test]
    fn instance_is_required() {
        Jail::expect_with(|jail| {
            let err = load_in_jail(jail, None).unwrap_err();
            assert_eq!(err.key(), Some("instance"));
            assert!(err.to_string().contains("JETSYNC_INSTANCE"), "{err}");
            Ok(())
        });
    }

    const FULL_TOML: &str = r#"
        instance = "catalog-1"
        data_dir = "/var/lib/jetsync"

        [nats]
        url = "nats://10.0.0.1:4222, nats://10.0.0.2:4222"
        user = "catalog"
        password = "hunter2"
        connect_timeout_ms = 2000
        name = "catalog applier"

        [stream]
        name = "CATALOG"
        subject_prefix = "catalog"
        history = 3
        replicas = 3
        provision = false

        [tables.products]
        key = "sku"

        [tables.orders]

        [sink]
        kind = "redb"
        audit = true

        [apply]
        batch_max = 500
        on_gap = "halt"
        on_poison = "halt"

        [http]
        listen = "127.0.0.1:9464"

        [log]
        format = "json"
        level = "debug"
    "#;

    #[test]
    fn toml_file() {
        Jail::expect_with(|jail| {
            let config = load_in_jail(jail, Some(FULL_TOML)).map_err(|e| e.to_string())?;
            assert_eq!(config.instance, "catalog-1");
            assert_eq!(
                config.nats.server_addrs().map_err(|e| e.to_string())?.len(),
                2
            );
            assert_eq!(config.nats.user.as_deref(), Some("catalog"));
            assert_eq!(
                config.nats.password.as_ref().map(Secret::expose),
                Some("hunter2")
            );
            assert_eq!(config.nats.connect_timeout_ms, 2000);
            assert_eq!(config.nats.request_timeout_ms, 5000);
            assert_eq!(config.stream.name, "CATALOG");
            assert_eq!(config.stream.history, 3);
            assert_eq!(config.stream.replicas, 3);
            assert!(!config.stream.provision);
            assert_eq!(config.table_key("products"), "sku");
            assert_eq!(config.table_key("orders"), "id");
            assert_eq!(config.table_key("other"), "id");
            assert_eq!(config.sink.kind, SinkKind::Redb);
            assert!(config.sink.audit);
            assert_eq!(
                config.sink_path(),
                Some(PathBuf::from("/var/lib/jetsync/catalog-1.replica.redb"))
            );
            assert_eq!(
                config.redb_path(),
                Path::new("/var/lib/jetsync/catalog-1.redb")
            );
            assert_eq!(config.apply.batch_max, 500);
            assert_eq!(config.apply.batch_wait_ms, 5);
            assert_eq!(config.apply.on_gap, OnGap::Halt);
            assert_eq!(config.apply.on_poison, OnPoison::Halt);
            assert_eq!(config.http.listen, Some("127.0.0.1:9464".parse().unwrap()));
            assert_eq!(config.log.format, LogFormat::Json);
            Ok(())
        });
    }

    #[test]
    fn env_overrides_with_double_underscore_nesting() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("jetsync.toml", FULL_TOML)?;
            jail.set_env("JETSYNC_INSTANCE", "catalog-2");
            jail.set_env("JETSYNC_NATS__URL", "nats://127.0.0.1:4333");
            jail.set_env("JETSYNC_NATS__PASSWORD", "007");
            jail.set_env("JETSYNC_APPLY__BATCH_MAX", "2000");
            jail.set_env("JETSYNC_APPLY__ON_GAP", "resync");
            jail.set_env("JETSYNC_STREAM__PROVISION", "true");
            jail.set_env("JETSYNC_TABLES__PRODUCTS__KEY", "code");
            jail.set_env("JETSYNC_TABLES__USERS__KEY", "user_id");
            jail.set_env("JETSYNC_NATS__TLS__REQUIRED", "true");
            let config =
                Config::load(Some(Path::new("jetsync.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.instance, "catalog-2");
            assert_eq!(config.nats.url, "nats://127.0.0.1:4333");
            assert_eq!(config.nats.user.as_deref(), Some("catalog"));
            // Kept verbatim, not parsed into the number 7.
            assert_eq!(
                config.nats.password.as_ref().map(Secret::expose),
                Some("007")
            );
            assert_eq!(config.apply.batch_max, 2000);
            assert_eq!(config.apply.on_gap, OnGap::Resync);
            assert_eq!(config.apply.on_poison, OnPoison::Halt);
            assert!(config.stream.provision);
            assert!(config.nats.tls.required);
            assert_eq!(config.table_key("products"), "code");
            assert_eq!(config.table_key("users"), "user_id");
            assert_eq!(config.consumer_name(), "jetsync_catalog-2");
            Ok(())
        });
    }

    #[test]
    fn numeric_instance_from_env_is_a_string() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("JETSYNC_INSTANCE", "1");
            jail.set_env("JETSYNC_NATS__TOKEN", "12345");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.instance, "1");
            assert_eq!(
                config.nats.token.as_ref().map(Secret::expose),
                Some("12345")
            );
            Ok(())
        });
    }

    #[test]
    fn unrelated_prefixed_env_vars_are_ignored() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("JETSYNC_INSTANCE", "a");
            jail.set_env(
                "JETSYNC_TEST_POSTGRES",
                "postgres://postgres@127.0.0.1:5432/test",
            );
            jail.set_env("JETSYNC_CONFIG", "/etc/jetsync.toml");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.instance, "a");
            Ok(())
        });
    }

    #[test]
    fn nested_env_var_with_unknown_key_is_rejected() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("JETSYNC_INSTANCE", "a");
            jail.set_env("JETSYNC_NAT__URL", "nats://x:4222");
            let err = Config::load(None).unwrap_err();
            assert_eq!(err.key(), Some("nat"), "{err}");
            let message = err.to_string();
            assert!(message.contains("JETSYNC_NAT"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn unknown_top_level_key_in_toml_is_rejected() {
        Jail::expect_with(|jail| {
            let err = load_in_jail(jail, Some("instance = \"a\"\nbatch_max = 5\n")).unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
            assert_eq!(err.key(), Some("batch_max"), "{err}");
            let message = err.to_string();
            assert!(message.contains("batch_max"), "{message}");
            assert!(message.contains("jetsync.toml"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn unknown_nested_key_is_rejected() {
        Jail::expect_with(|jail| {
            let toml = "instance = \"a\"\n[apply]\nbatch_maxx = 5\n";
            let err = load_in_jail(jail, Some(toml)).unwrap_err();
            assert_eq!(err.key(), Some("apply.batch_maxx"), "{err}");
            assert!(err.to_string().contains("batch_max"), "{err}");

            let toml = "instance = \"a\"\n[tables.products]\nkey = \"sku\"\ncolumn = \"x\"\n";
            let err = load_in_jail(jail, Some(toml)).unwrap_err();
            assert_eq!(err.key(), Some("tables.products.column"), "{err}");

            let toml = "instance = \"a\"\n[nats.tls]\nca = \"x\"\n";
            let err = load_in_jail(jail, Some(toml)).unwrap_err();
            assert_eq!(err.key(), Some("nats.tls.ca"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_nested_key_in_env_is_rejected() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("JETSYNC_INSTANCE", "a");
            jail.set_env("JETSYNC_APPLY__BATCH_MAXX", "5");
            let err = Config::load(None).unwrap_err();
            assert_eq!(err.key(), Some("apply.batch_maxx"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("JETSYNC_INSTANCE", "a");
            let err = Config::load(Some(Path::new("nope.toml"))).unwrap_err();
            match &err {
                ConfigError::FileNotFound { path } => assert_eq!(path, Path::new("nope.toml")),
                other => panic!("expected FileNotFound, got {other:?}"),
            }
            assert!(err.to_string().contains("nope.toml"));
            Ok(())
        });
    }

    #[test]
    fn bad_value_type_names_the_key_and_source() {
        Jail::expect_with(|jail| {
            let toml = "instance = \"a\"\n[apply]\nbatch_max = \"x\"\n";
            let err = load_in_jail(jail, Some(toml)).unwrap_err();
            assert_eq!(err.key(), Some("apply.batch_max"), "{err}");
            let message = err.to_string();
            assert!(
                message.starts_with("apply.batch_max: invalid type"),
                "{message}"
            );
            assert!(message.contains("jetsync.toml"), "{message}");

            jail.set_env("JETSYNC_INSTANCE", "a");
            jail.set_env("JETSYNC_APPLY__BATCH_MAX", "lots");
            let err = Config::load(None).unwrap_err();
            assert_eq!(err.key(), Some("apply.batch_max"), "{err}");
            assert!(
                err.to_string().contains("JETSYNC_APPLY__BATCH_MAX"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_enum_value_lists_the_choices() {
        Jail::expect_with(|jail| {
            let toml = "instance = \"a\"\n[sink]\nkind = \"mysql\"\n";
            let err = load_in_jail(jail, Some(toml)).unwrap_err();
            assert_eq!(err.key(), Some("sink.kind"), "{err}");
            let message = err.to_string();
            assert!(message.contains("sqlite, postgres, redb"), "{message}");
            Ok(())
        });
    }

    fn invalid_key(jail: &mut Jail, toml: &str) -> String {
        let err = load_in_jail(jail, Some(toml)).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
        err.key().unwrap_or_default().to_owned()
    }

    #[test]
    fn capture_keys() {
        Jail::expect_with(|jail| {
            let base = "instance = \"a\"\n[tables.items]\ncapture = true\n";
            let config = load_in_jail(jail, Some(base)).unwrap();
            assert!(config.tables["items"].capture);
            assert!(config.capture.atomic);
            assert!(config.capture_atomic());
            assert!(
                config.stream.transactions,
                "atomic capture needs atomic batches"
            );
            assert_eq!(config.captured_tables().collect::<Vec<_>>(), ["items"]);
            let per_row = format!("{base}[capture]\natomic = false\npoll_ms = 50\n");
            let config = load_in_jail(jail, Some(&per_row)).unwrap();
            assert!(!config.stream.transactions);
            assert_eq!(config.capture.poll_ms, 50);
            let plain = load_in_jail(jail, Some("instance = \"a\"\n")).unwrap();
            assert!(!plain.capture_atomic() && !plain.stream.transactions);
            for (extra, key) in [
                ("[capture]\npoll_ms = 0\n", "capture.poll_ms"),
                ("[capture]\nmax_batch_rows = 5\n", "capture.max_batch_rows"),
                ("[sink]\nkind = \"redb\"\n", "tables.items.capture"),
            ] {
                assert_eq!(invalid_key(jail, &format!("{base}{extra}")), key, "{extra}");
            }
            Ok(())
        });
    }

    #[test]
    fn malformed_nats_url_is_rejected() {
        Jail::expect_with(|jail| {
            for url in [
                "nats://:::bad",
                "ftp://x",
                "",
                " , ",
                "nats://",
                "nats://127.0.0.1:4222,ftp://x",
                "nats://127.0.0.1:99999",
                "ws://127.0.0.1:8080",
                "nats://127.0.0.1:4222/path",
            ] {
                let toml = format!("instance = \"a\"\n[nats]\nurl = \"{url}\"\n");
                assert_eq!(invalid_key(jail, &toml), "nats.url", "{url}");
            }
            for url in [
                "nats://127.0.0.1:4222",
                "127.0.0.1:4222",
                "localhost",
                "tls://nats.example.com:4222",
                "nats://[::1]:4222",
                "nats://a:4222, nats://b:4222,",
            ] {
                let toml = format!("instance = \"a\"\n[nats]\nurl = \"{url}\"\n");
                load_in_jail(jail, Some(&toml)).map_err(|e| format!("{url}: {e}"))?;
            }
            Ok(())
        });
    }

    #[test]
    fn credentials_in_nats_url_are_rejected_without_echoing_them() {
        Jail::expect_with(|jail| {
            let toml = "instance = \"a\"\n[nats]\nurl = \"nats://me:hunter2@127.0.0.1:4222\"\n";
            let err = load_in_jail(jail, Some(toml)).unwrap_err();
            assert_eq!(err.key(), Some("nats.url"));
            assert!(!err.to_string().contains("hunter2"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn validation_names_the_key() {
        Jail::expect_with(|jail| {
            let cases = [
                ("instance = \"a b\"", "instance"),
                ("instance = \"a\"\ndata_dir = \"\"", "data_dir"),
                ("instance = \"a\"\n[stream]\nname = \"A.B\"", "stream.name"),
                ("instance = \"a\"\n[stream]\nname = \"\"", "stream.name"),
                (
                    "instance = \"a\"\n[stream]\nsubject_prefix = \"a.>\"",
                    "stream.subject_prefix",
                ),
                ("instance = \"a\"\n[stream]\nhistory = 0", "stream.history"),
                ("instance = \"a\"\n[stream]\nhistory = 65", "stream.history"),
                (
                    "instance = \"a\"\n[stream]\nreplicas = 0",
                    "stream.replicas",
                ),
                (
                    "instance = \"a\"\n[stream]\nreplicas = 7",
                    "stream.replicas",
                ),
                (
                    "instance = \"a\"\n[stream]\nmax_msgs = 0",
                    "stream.max_msgs",
                ),
                (
                    "instance = \"a\"\n[stream]\nmax_bytes = -5",
                    "stream.max_bytes",
                ),
                (
                    "instance = \"a\"\n[apply]\nbatch_max = 0",
                    "apply.batch_max",
                ),
                (
                    "instance = \"a\"\n[apply]\nbatch_max = 100001",
                    "apply.batch_max",
                ),
                (
                    "instance = \"a\"\n[apply]\nack_wait_ms = 10",
                    "apply.ack_wait_ms",
                ),
                (
                    "instance = \"a\"\n[tables.Products]\nkey = \"sku\"",
                    "tables.Products",
                ),
                (
                    "instance = \"a\"\n[tables.products]\nkey = \"\"",
                    "tables.products.key",
                ),
                (
                    "instance = \"a\"\n[tables.products]\nkey = \"a-b\"",
                    "tables.products.key",
                ),
                ("instance = \"a\"\n[sink]\nkind = \"postgres\"", "sink.url"),
                ("instance = \"a\"\n[sink]\nschema = \"1x\"", "sink.schema"),
                ("instance = \"a\"\n[nats]\nuser = \"u\"", "nats.password"),
                ("instance = \"a\"\n[nats]\npassword = \"p\"", "nats.user"),
                (
                    "instance = \"a\"\n[nats]\nuser = \"u\"\npassword = \"p\"\ntoken = \"t\"",
                    "nats.token",
                ),
                (
                    "instance = \"a\"\n[nats]\ncreds_file = \"missing.creds\"",
                    "nats.creds_file",
                ),
                (
                    "instance = \"a\"\n[nats]\nnkey_seed_file = \"missing.nk\"",
                    "nats.nkey_seed_file",
                ),
                (
                    "instance = \"a\"\n[nats.tls]\nca_file = \"missing.pem\"",
                    "nats.tls.ca_file",
                ),
                (
                    "instance = \"a\"\n[nats.tls]\ncert_file = \".\"",
                    "nats.tls.cert_file",
                ),
                (
                    "instance = \"a\"\n[nats]\nconnect_timeout_ms = 0",
                    "nats.connect_timeout_ms",
                ),
                ("instance = \"a\"\n[log]\nlevel = \"\"", "log.level"),
            ];
            for (toml, key) in cases {
                assert_eq!(invalid_key(jail, toml), key, "{toml}");
            }
            Ok(())
        });
    }

    #[test]
    fn existing_credential_files_pass() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "seed.nk",
                "SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4",
            )?;
            jail.create_file("cert.pem", "")?;
            jail.create_file("key.pem", "")?;
            let toml = "instance = \"a\"\n[nats]\nnkey_seed_file = \"seed.nk\"\n\
                        [nats.tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n";
            let config = load_in_jail(jail, Some(toml)).map_err(|e| e.to_string())?;
            assert!(config.nats.tls_required());
            let toml = "instance = \"a\"\n[nats.tls]\ncert_file = \"cert.pem\"\n";
            assert_eq!(invalid_key(jail, toml), "nats.tls.key_file");
            Ok(())
        });
    }

    #[test]
    fn postgres_sink_with_url() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("JETSYNC_INSTANCE", "a");
            jail.set_env("JETSYNC_SINK__KIND", "postgres");
            jail.set_env("JETSYNC_SINK__URL", "postgres://app:pw@127.0.0.1:5432/app");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.sink.kind, SinkKind::Postgres);
            assert_eq!(config.sink_path(), None);
            assert_eq!(
                config.sink.url.as_ref().map(Secret::expose),
                Some("postgres://app:pw@127.0.0.1:5432/app")
            );
            Ok(())
        });
    }

    #[test]
    fn secrets_never_rendered() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("jetsync.toml", FULL_TOML)?;
            jail.set_env("JETSYNC_SINK__URL", "postgres://app:pgsecret@127.0.0.1/app");
            let config =
                Config::load(Some(Path::new("jetsync.toml"))).map_err(|e| e.to_string())?;
            let mut token_config = config.clone();
            token_config.nats.user = None;
            token_config.nats.password = None;
            token_config.nats.token = Some(Secret::new("tokensecret"));
            for config in [&config, &token_config] {
                let debug = format!("{config:?}");
                let pretty = format!("{config:#?}");
                let json = serde_json::to_string(config).map_err(|e| e.to_string())?;
                for rendered in [debug, pretty, json] {
                    for secret in ["hunter2", "pgsecret", "tokensecret"] {
                        assert!(!rendered.contains(secret), "{secret} leaked: {rendered}");
                    }
                    assert!(rendered.contains("<redacted>"), "{rendered}");
                }
            }
            Ok(())
        });
    }

    /// Every way a secret can reach a configuration error: a TOML syntax error on its line, a
    /// value of the wrong type, a value given to an enum key, through the file and the
    /// environment. The error still names the key (or the line) and the source.
    #[test]
    fn config_errors_never_echo_values() {
        const SECRET: &str = "SECRETVALUE";
        let cases: &[(&str, Option<&str>)] = &[
            // Syntax errors on the secret's line.
            ("instance = \"a\"\n[sink]\nurl = \"postgres://u:SECRETVALUE@h/db\n", Some("line 3")),
            ("instance = \"a\"\n[nats]\npassword = \"SECRETVALUE\" x\n", Some("line 3")),
            ("instance = \"a\"\n[nats]\ntoken = SECRETVALUE\n", Some("line 3")),
            // Wrong types.
            ("instance = \"a\"\nsink = \"postgres://u:SECRETVALUE@h/db\"\n", Some("sink")),
            ("instance = \"a\"\n[apply]\nbatch_max = \"SECRETVALUE\"\n", Some("apply.batch_max")),
            ("instance = \"a\"\n[nats]\ntoken = 123456789\n", Some("nats.token")),
            ("instance = \"a\"\n[sink]\nkind = \"SECRETVALUE\"\n", Some("sink.kind")),
            ("instance = \"a\"\n[sink]\nkind = \"postgres\"\nurl = \"mysql://u:SECRETVALUE@h/db\"\n", Some("sink.url")),
        ];
        Jail::expect_with(|jail| {
            for (toml, names) in cases {
                let err = load_in_jail(jail, Some(toml)).unwrap_err();
                let text = err.to_string();
                for secret in [SECRET, "123456789"] {
                    assert!(
                        !text.contains(secret),
                        "{secret} leaked for {toml:?}: {text}"
                    );
                }
                if let Some(name) = names {
                    assert!(text.contains(name), "{name} not named for {toml:?}: {text}");
                }
            }
            for (var, value) in [
                ("JETSYNC_APPLY__BATCH_MAX", "postgres://u:SECRETVALUE@h/db"),
                ("JETSYNC_SINK__KIND", "SECRETVALUE"),
                ("JETSYNC_NATS__PASSWORD__X", "SECRETVALUE"),
                ("JETSYNC_HTTP__LISTEN", "SECRETVALUE"),
            ] {
                jail.clear_env();
                jail.set_env("JETSYNC_INSTANCE", "a");
                jail.set_env(var, value);
                let text = Config::load(None).unwrap_err().to_string();
                assert!(!text.contains(SECRET), "{var} leaked: {text}");
                let named = var.trim_end_matches("__X");
                assert!(text.contains(named), "{named} not named: {text}");
            }
            Ok(())
        });
    }

    #[test]
    fn toml_syntax_errors_keep_position_and_description() {
        Jail::expect_with(|jail| {
            let err =
                load_in_jail(jail, Some("instance = \"a\"\n[nats]\npassword = \"x\n")).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("TOML parse error at line 3, column"),
                "{text}"
            );
            assert!(!text.contains('|'), "{text}");
            assert!(text.contains("jetsync.toml"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn postgres_url_shape_is_checked_up_front() {
        for (url, ok) in [
            ("postgres://u:p@h:5432/db", true),
            ("postgresql://h/db", true),
            ("host=h user=u password=p dbname=db", true),
            ("mysql://u:p@h/db", false),
            ("h:5432/db", false),
            ("postgres://u:p w@h/db", false),
        ] {
            assert_eq!(check_postgres_url(url).is_ok(), ok, "{url}");
            if let Err(e) = check_postgres_url(url) {
                assert!(!e.contains("u:p"), "{e}");
            }
        }
    }

    #[test]
    fn http_limits_are_validated() {
        let mut c = Config {
            instance: "i-1".into(),
            ..Config::default()
        };
        assert_eq!(c.http.header_timeout_ms, 5000);
        assert_eq!(c.http.idle_timeout_ms, 60_000);
        assert_eq!(c.http.max_connections, 256);
        c.http.max_connections = 0;
        assert_eq!(
            c.validate().unwrap_err().key(),
            Some("http.max_connections")
        );
        c.http.max_connections = 1;
        c.http.header_timeout_ms = 0;
        assert_eq!(
            c.validate().unwrap_err().key(),
            Some("http.header_timeout_ms")
        );
        c.http.header_timeout_ms = 1;
        c.http.idle_timeout_ms = 0;
        assert_eq!(
            c.validate().unwrap_err().key(),
            Some("http.idle_timeout_ms")
        );
    }

    #[test]
    fn inbox_prefix() {
        Jail::expect_with(|jail| {
            let config =
                load_in_jail(jail, Some("instance = \"a\"\n")).map_err(|e| e.to_string())?;
            assert_eq!(config.nats.inbox_prefix, None);
            for prefix in ["_INBOX_catalog-1", "_INBOX.catalog_pub", "$INBOX.a-b.c_9"] {
                let toml = format!("instance = \"a\"\n[nats]\ninbox_prefix = \"{prefix}\"\n");
                let config =
                    load_in_jail(jail, Some(&toml)).map_err(|e| format!("{prefix}: {e}"))?;
                assert_eq!(config.nats.inbox_prefix.as_deref(), Some(prefix));
            }
            let long = "x".repeat(129);
            for prefix in [
                "", "_INBOX.>", "_INBOX.*", "a..b", ".a", "a.", "a b", "a\\tb", &long,
            ] {
                let toml = format!("instance = \"a\"\n[nats]\ninbox_prefix = {prefix:?}\n");
                assert_eq!(invalid_key(jail, &toml), "nats.inbox_prefix", "{prefix:?}");
            }
            // From the environment, kept as a string.
            jail.set_env("JETSYNC_INSTANCE", "a");
            jail.set_env("JETSYNC_NATS__INBOX_PREFIX", "_INBOX_7");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.nats.inbox_prefix.as_deref(), Some("_INBOX_7"));
            Ok(())
        });
    }

    #[test]
    fn consumer_name_is_sanitised() {
        let config = Config {
            instance: "a.b c".to_owned(),
            ..Config::default()
        };
        assert_eq!(config.consumer_name(), "jetsync_a_b_c");
    }

    #[test]
    fn figment_accepts_more_providers() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("JETSYNC_INSTANCE", "from-env");
            let figment = Config::figment(None).map_err(|e| e.to_string())?.merge(
                figment::providers::Serialized::default("instance", "from-flag"),
            );
            let config = Config::from_figment(figment).map_err(|e| e.to_string())?;
            assert_eq!(config.instance, "from-flag");
            Ok(())
        });
    }
}
