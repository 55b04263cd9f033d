//! A small inventory HTTP service that runs as any number of instances, each with its own SQLite
//! database, kept in sync through NATS JetStream.
//!
//! - `GET /items/{sku}` reads the item from this instance's own SQLite file (read-only), which the
//!   applier embedded in this process keeps up to date.
//! - `PUT /items/{sku}` with `{"name":"Chair","qty":12,"price":12.5}` and `DELETE /items/{sku}`
//!   publish the change through the `jetsync` client; every instance (this one included) applies
//!   it to its own database. By default (`?wait=true`) the handler then waits, at most
//!   `--wait-timeout-ms` (5 s), until this instance's applier has applied the write's stream
//!   sequence, and answers with the row as read back from the local database
//!   (read-your-writes): `{"seq":7,"item":{...}}`. With `?wait=false` it answers `202` with the
//!   sequence at once. A wait that runs out is `504` naming the sequence (the write is stored and
//!   will appear).
//! - `GET /healthz`: the applier's applied sequence and whether it is consuming.
//!
//! Errors are JSON (`{"error":"..."}`): 400 for a malformed body or sku, 404 for a missing sku,
//! 503 when NATS does not answer, 504 for a read-your-writes wait that ran out.
//!
//! Configuration is the usual jetsync configuration (`--config FILE`, `JETSYNC_*` environment
//! variables, `--instance` overrides `instance`); the sink must be SQLite (the default), and the
//! `items` table is keyed by `sku` unless the file says otherwise. For example `inventory-1.toml`:
//!
//! ```toml
//! instance = "inventory-1"
//! data_dir = "./data"
//!
//! [nats]
//! url = "nats://127.0.0.1:4222"
//!
//! [stream]
//! name = "INVENTORY"
//! subject_prefix = "inventory"
//!
//! [tables.items]
//! key = "sku"
//! ```
//!
//! Run two instances (with a JetStream-enabled `nats-server -js` on the URL), then use them:
//!
//! ```sh
//! cargo run -p jetsync-examples --example inventory -- --config inventory-1.toml --listen 127.0.0.1:8081
//! cargo run -p jetsync-examples --example inventory -- --config inventory-2.toml --listen 127.0.0.1:8082
//! curl -X PUT localhost:8081/items/A-1 -d '{"name":"Chair","qty":12,"price":12.5}'
//! curl localhost:8082/items/A-1
//! curl -X DELETE localhost:8082/items/A-1
//! ```
//!
//! Exit codes: 0 after SIGINT/SIGTERM, 1 on a runtime failure (NATS unreachable at start, the
//! applier stopped), 2 for a configuration or usage error.

use std::{
    fmt,
    future::IntoFuture,
    net::SocketAddr,
    path::{Path as FsPath, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use axum::{
    body::Bytes,
    extract::{rejection::QueryRejection, Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use clap::Parser;
use jetsync::{Client, Config, SinkKind, Table, TableConfig};
use jetsync_applier::{Engine, Stats};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::{sync::oneshot, time::Instant};

/// The synced table.
const TABLE: &str = "items";
/// Its key column.
const KEY_COLUMN: &str = "sku";

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "A multi-instance inventory service kept in sync by jetsync")]
struct Args {
    /// jetsync configuration file; `JETSYNC_*` environment variables override it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Instance id (overrides `instance` of the configuration).
    #[arg(long)]
    instance: Option<String>,
    /// HTTP listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// How long PUT and DELETE wait for the local database to apply the write, in ms.
    #[arg(long, default_value_t = 5000)]
    wait_timeout_ms: u64,
}

/// An item as stored: the row published for key `sku` (the row carries its key column).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    sku: String,
    name: String,
    qty: i64,
    price: f64,
}

/// The body of `PUT /items/{sku}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemBody {
    name: String,
    qty: i64,
    price: f64,
}

/// `?wait=true|false` of PUT and DELETE.
#[derive(Debug, Deserialize)]
struct WaitParam {
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

/// What the handlers share.
struct App {
    items: Table<Item>,
    /// This instance's SQLite file, written by the applier, read here read-only.
    db_path: PathBuf,
    /// The embedded applier's counters: `applied_seq` is the read-your-writes watermark.
    stats: Arc<Stats>,
    wait_timeout: Duration,
    instance: String,
}

/// An error answer: a status and a JSON body `{"error": ..., ...}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: serde_json::Value,
}

impl ApiError {
    fn new(status: StatusCode, message: impl fmt::Display) -> Self {
        ApiError {
            status,
            body: json!({ "error": message.to_string() }),
        }
    }

    fn not_found(sku: &str) -> Self {
        let mut e = ApiError::new(StatusCode::NOT_FOUND, format!("item {sku:?} not found"));
        e.body["sku"] = json!(sku);
        e
    }

    fn internal(message: impl fmt::Display) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<jetsync::Error> for ApiError {
    fn from(e: jetsync::Error) -> Self {
        let status = match &e {
            jetsync::Error::Subject(_) => StatusCode::BAD_REQUEST,
            jetsync::Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e)
    }
}

fn wait_param(query: Result<Query<WaitParam>, QueryRejection>) -> Result<bool, ApiError> {
    query
        .map(|Query(q)| q.wait)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))
}

/// Reads item `sku` from the local SQLite file. A missing `items` table (nothing applied yet)
/// is a missing item.
///
/// One short-lived read-only connection per read keeps the example simple; a busy service would
/// keep a small pool. WAL mode lets it read while the applier writes, and it never sees a
/// half-applied batch.
fn read_item(db: &FsPath, sku: &str) -> rusqlite::Result<Option<Item>> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let sql = format!("SELECT {KEY_COLUMN}, name, qty, price FROM {TABLE} WHERE {KEY_COLUMN} = ?1");
    let mut stmt = match conn.prepare(&sql) {
        Ok(stmt) => stmt,
        Err(e) if e.to_string().contains("no such table") => return Ok(None),
        Err(e) => return Err(e),
    };
    stmt.query_row([sku], |r| {
        Ok(Item {
            sku: r.get(0)?,
            name: r.get(1)?,
            qty: r.get(2)?,
            price: r.get(3)?,
        })
    })
    .optional()
}

impl App {
    async fn read(&self, sku: &str) -> Result<Option<Item>, ApiError> {
        let (db, sku) = (self.db_path.clone(), sku.to_owned());
        tokio::task::spawn_blocking(move || read_item(&db, &sku))
            .await
            .map_err(ApiError::internal)?
            .map_err(|e| ApiError::internal(format!("reading the local database: {e}")))
    }

    /// Waits until the local applier has applied stream sequence `seq` (read-your-writes), at
    /// most `wait_timeout`; then 504 naming the sequence.
    async fn wait_applied(&self, seq: u64) -> Result<u64, ApiError> {
        let deadline = Instant::now() + self.wait_timeout;
        loop {
            let applied = self.stats.snapshot().applied_seq;
            if applied >= seq {
                return Ok(applied);
            }
            if Instant::now() >= deadline {
                let mut e = ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the write is stored at seq {seq}, but this instance's database had \
                         applied only up to seq {applied} after {:?}; it will appear there once \
                         the applier catches up",
                        self.wait_timeout
                    ),
                );
                e.body["seq"] = json!(seq);
                e.body["applied_seq"] = json!(applied);
                return Err(e);
            }
            // The engine's counters have no change notification; polling them is cheap.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn get_item(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
) -> Result<Json<Item>, ApiError> {
    app.read(&sku)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(&sku))
}

async fn put_item(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    query: Result<Query<WaitParam>, QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let wait = wait_param(query)?;
    let body: ItemBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid item JSON ({e}); expected {{\"name\":string,\"qty\":integer,\"price\":number}}"),
        )
    })?;
    let item = Item {
        sku: sku.clone(),
        name: body.name,
        qty: body.qty,
        price: body.price,
    };
    let published = app.items.upsert(&sku, &item).await?;
    if !wait {
        let body = json!({ "seq": published.seq, "duplicate": published.duplicate });
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    let applied = app.wait_applied(published.seq).await?;
    // The local database is at least at our write; a later write by any instance may already
    // have replaced (or deleted) the row, and that newer state is what we answer with.
    match app.read(&sku).await? {
        Some(row) => Ok(Json(json!({
            "seq": published.seq,
            "applied_seq": applied,
            "item": row,
        }))
        .into_response()),
        None => {
            let mut e = ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "item {sku:?} was written at seq {} and deleted by a later write",
                    published.seq
                ),
            );
            e.body["seq"] = json!(published.seq);
            Err(e)
        }
    }
}

async fn delete_item(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    query: Result<Query<WaitParam>, QueryRejection>,
) -> Result<Response, ApiError> {
    let wait = wait_param(query)?;
    // The stream is the authority on whether the item exists (this instance's database may
    // lag): its latest event for the row is an upsert, or a tombstone, or there is none.
    if app.items.get(&sku).await?.is_none() {
        return Err(ApiError::not_found(&sku));
    }
    let published = app.items.delete(&sku).await?;
    let body = json!({ "seq": published.seq, "sku": sku, "deleted": true });
    if !wait {
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    app.wait_applied(published.seq).await?;
    if app.read(&sku).await?.is_some() {
        let mut e = ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "item {sku:?} was deleted at seq {} and written again by a later write",
                published.seq
            ),
        );
        e.body["seq"] = json!(published.seq);
        return Err(e);
    }
    Ok(Json(body).into_response())
}

async fn healthz(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let s = app.stats.snapshot();
    Json(json!({
        "instance": app.instance,
        "applied_seq": s.applied_seq,
        "connected": s.connected,
        "lag": s.lag(),
    }))
}

async fn unknown_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route: use GET, PUT or DELETE /items/{sku}, or GET /healthz",
    )
}

/// Loads the configuration and checks it fits this service.
fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut figment = Config::figment(args.config.as_deref())?;
    if let Some(instance) = &args.instance {
        figment = figment.merge(figment::providers::Serialized::default(
            "instance", instance,
        ));
    }
    let mut config = Config::from_figment(figment)?;
    if config.sink.kind != SinkKind::Sqlite {
        bail!(
            "sink.kind: this example reads its own SQLite database, so the sink must be \
             \"sqlite\" (the default)"
        );
    }
    let table = config
        .tables
        .entry(TABLE.to_owned())
        .or_insert_with(|| TableConfig {
            key: KEY_COLUMN.to_owned(),
            ..Default::default()
        });
    if table.key != KEY_COLUMN {
        bail!(
            "tables.{TABLE}.key: this example keys items by `{KEY_COLUMN}`, not `{}`",
            table.key
        );
    }
    Ok(config)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

async fn run(args: Args, config: Config) -> anyhow::Result<()> {
    let client = Client::connect(&config)
        .await
        .context("connecting to NATS")?;
    if config.stream.provision {
        client
            .provision()
            .await
            .context("provisioning the stream")?;
    }
    let items = client.table::<Item>(TABLE)?;

    // The applier, in-process: it applies every event of the stream (this instance's own
    // writes included) to this instance's SQLite file, in stream order, exactly once.
    let sink = jetsync_applier::build_sink(&config)
        .await
        .context("opening the SQLite sink")?;
    let db_path = config.sink_path().context("the sqlite sink has a path")?;
    let engine = Engine::new(config.clone(), sink);
    let stats = engine.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let mut applier = tokio::spawn(engine.run(async {
        let _ = stopped.await;
    }));

    let app = Arc::new(App {
        items,
        db_path,
        stats,
        wait_timeout: Duration::from_millis(args.wait_timeout_ms),
        instance: config.instance.clone(),
    });
    let router = Router::new()
        .route(
            "/items/{sku}",
            get(get_item).put(put_item).delete(delete_item),
        )
        .route("/healthz", get(healthz))
        .fallback(unknown_route)
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!(
        "inventory {} listening on http://{} (database {})",
        config.instance,
        listener.local_addr()?,
        config.sink_path().unwrap_or_default().display()
    );
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .into_future();

    tokio::select! {
        served = server => served.context("serving HTTP")?,
        ended = &mut applier => {
            // The engine retries transient failures forever; it ends by itself only on a
            // permanent error, and an instance that no longer applies must not serve.
            return match ended {
                Ok(Ok(())) => bail!("the applier stopped unexpectedly"),
                Ok(Err(e)) => Err(e).context("the applier stopped"),
                Err(e) => Err(e).context("the applier task failed"),
            };
        }
    }
    // HTTP is drained; let the applier finish the batch in hand.
    let _ = stop.send(());
    applier
        .await
        .context("the applier task failed")?
        .context("the applier stopped")?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let config = match load_config(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("inventory: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(args, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inventory: {e:#}");
            ExitCode::FAILURE
        }
    }
}
