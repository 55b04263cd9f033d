//! The subcommands.

use anyhow::{anyhow, Context};
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use jetsync::{codec, Config, LogFormat};
use jetsync_applier::{
    build_sink, collect_status, AnySink, Engine, EngineError, HttpEndpoint, Offsets, Sink,
    SinkError, StatusReport,
};

use super::{
    output::{count, emit, escape_bytes, escape_text},
    CaptureAction, Cli, Command, Failure, ParkedAction,
};

/// Loads the configuration; any problem is a configuration error (exit 2).
fn load_config(cli: &Cli) -> Result<Config, Failure> {
    let config = Config::load(cli.global.config.as_deref()).map_err(Failure::usage)?;
    check_sink_setup(&config)?;
    Ok(config)
}

/// The sink settings that can be checked without connecting, beyond [`Config::validate`]: the
/// Postgres URL parses as tokio-postgres reads it, and a `sink.path` lies in a directory that
/// exists or can be created. A problem is a configuration error (exit 2) naming the key; the
/// URL itself is never shown.
fn check_sink_setup(config: &Config) -> Result<(), Failure> {
    use std::str::FromStr;
    match config.sink.kind {
        jetsync::SinkKind::Postgres => {
            if let Some(url) = &config.sink.url {
                tokio_postgres::Config::from_str(url.expose()).map_err(|e| {
                    Failure::usage(anyhow!(
                        "sink.url: not a valid Postgres connection string ({e}): use \
                         postgres://user:password@host:5432/database"
                    ))
                })?;
            }
        }
        jetsync::SinkKind::Sqlite | jetsync::SinkKind::Redb => {
            if let Some(path) = &config.sink.path {
                check_sink_path(path).map_err(|reason| {
                    Failure::usage(anyhow!("sink.path: {}: {reason}", path.display()))
                })?;
            }
        }
    }
    Ok(())
}

/// Whether the sink can create or open its file at `path`: the file, if it exists, is a
/// regular file; the nearest existing ancestor directory is a directory the process may
/// write to (missing directories below it are created by the sink).
fn check_sink_path(path: &std::path::Path) -> Result<(), String> {
    if let Ok(meta) = std::fs::metadata(path) {
        return if meta.is_dir() {
            Err("is a directory; give the database file's path".into())
        } else {
            Ok(())
        };
    }
    let mut dir = path.parent();
    while let Some(d) = dir {
        let d = if d.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            d
        };
        match std::fs::metadata(d) {
            Ok(meta) if meta.is_dir() => {
                // Probe with a file of our own: permission bits alone miss read-only mounts,
                // ACLs and root's privileges.
                let probe = d.join(format!(".jetsync-write-check-{}", std::process::id()));
                return match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&probe)
                {
                    Ok(_) => {
                        let _ = std::fs::remove_file(&probe);
                        Ok(())
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                    Err(e) => Err(format!("directory {} is not writable: {e}", d.display())),
                };
            }
            Ok(_) => {
                return Err(format!(
                    "{} is not a directory, so the file cannot be created below it",
                    d.display()
                ))
            }
            Err(_) if d == std::path::Path::new(".") => break,
            Err(_) => dir = d.parent(),
        }
    }
    Err("no existing directory above it".into())
}

/// A sink that cannot start: configuration problems (the sink names the key: `sink.url: ...`)
/// exit 2, everything else 1.
fn sink_failure(e: SinkError) -> Failure {
    match &e {
        SinkError::Fatal { reason } if names_sink_key(reason) => Failure::usage(e),
        _ => Failure::runtime(e),
    }
}

fn names_sink_key(reason: &str) -> bool {
    [
        "sink.url:",
        "sink.path:",
        "sink.schema:",
        "sink.kind:",
        "tables.",
    ]
    .iter()
    .any(|key| reason.starts_with(key))
}

/// An engine failure: configuration problems found on the way (a stream that does not suit
/// `stream.provision = false`, a sink setting the sink refused) exit 2, everything else 1.
fn engine_failure(e: EngineError) -> Failure {
    match &e {
        EngineError::Client(jetsync::Error::Config(_)) => Failure::usage(e),
        EngineError::Sink(SinkError::Fatal { reason }) if names_sink_key(reason) => {
            Failure::usage(e)
        }
        _ => Failure::runtime(e),
    }
}

async fn open_sink(config: &Config) -> Result<AnySink, Failure> {
    build_sink(config).await.map_err(sink_failure)
}

fn init_logging(config: &Config, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let level = if default_level == "config" {
            config.log.level.as_str()
        } else {
            default_level
        };
        tracing_subscriber::EnvFilter::new(level)
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        _ => builder.try_init(),
    };
}

pub(crate) async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let config = load_config(&cli)?;
    let json = cli.command.json();
    match cli.command {
        Command::Run { .. } => {
            init_logging(&config, "config");
            run(config).await
        }
        Command::Status { .. } => {
            init_logging(&config, "warn");
            status(&config, json).await
        }
        Command::Provision { .. } => {
            init_logging(&config, "warn");
            provision(&config, json).await
        }
        Command::Digest { .. } => {
            init_logging(&config, "warn");
            digest(&config, json).await
        }
        Command::Reset { to_seq, .. } => {
            init_logging(&config, "warn");
            reset(&config, to_seq, json).await
        }
        Command::Publish {
            table,
            key,
            json: row,
            delete,
            msg_id,
            ..
        } => {
            init_logging(&config, "warn");
            publish(&config, &table, &key, row.as_deref(), delete, msg_id, json).await
        }
        Command::Resync { .. } => {
            init_logging(&config, "warn");
            resync(&config, json).await
        }
        Command::Parked { action } => {
            init_logging(&config, "warn");
            match action {
                ParkedAction::List { .. } => parked_list(&config, json),
                ParkedAction::Retry { rows, .. } => parked_retry(&config, &rows, json).await,
                ParkedAction::Drop { rows, all, .. } => parked_drop(&config, &rows, all, json),
            }
        }
        Command::Capture { action } => {
            init_logging(&config, "warn");
            capture(&config, action, json).await
        }
        Command::Tail {
            table, all, count, ..
        } => {
            init_logging(&config, "warn");
            tail(&config, table.as_deref(), all, count, json).await
        }
    }
}

/// A future that completes on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives while the applier is
/// still starting up is not lost to the default action (which would kill the process).
fn termination() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = int.recv() => tracing::info!("SIGINT received; finishing the batch in hand"),
                _ = term.recv() => tracing::info!("SIGTERM received; finishing the batch in hand"),
            },
            (term, int) => {
                let error = term
                    .err()
                    .or(int.err())
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                tracing::warn!(
                    error,
                    "cannot listen for SIGTERM/SIGINT; stop the applier with SIGKILL"
                );
                std::future::pending::<()>().await;
            }
        }
    }
}

async fn run(config: Config) -> Result<(), Failure> {
    // First, so that SIGTERM during start-up still means "stop cleanly".
    let stop = termination();
    // Capture on a server without atomic batches: refuse unless capture.atomic = false.
    jetsync_applier::capture::check_server(&config)
        .await
        .map_err(capture_failure)?;
    let sink = open_sink(&config).await?;
    let engine = Engine::new(config.clone(), sink);
    // The capture relay runs beside the engine while any table has capture = true.
    let relay = jetsync_applier::capture::Relay::start(config.clone(), engine.stats());
    // Serves until the engine stops (dropping the endpoint stops it).
    let _http = match config.http.listen {
        Some(listen) => Some(
            HttpEndpoint::start(listen, config.clone(), engine.stats())
                .await
                .with_context(|| format!("http.listen: cannot listen on {listen}"))
                .map_err(Failure::runtime)?,
        ),
        None => None,
    };
    let result = engine.run(stop).await.map_err(engine_failure);
    if let Some(relay) = relay {
        relay.stop().await;
    }
    result
}

/// A capture failure: configuration problems (the message starts with the key) exit 2.
fn capture_failure(e: jetsync_applier::capture::CaptureError) -> Failure {
    match e {
        jetsync_applier::capture::CaptureError::Config { .. } => Failure::usage(e),
        e => Failure::runtime(e),
    }
}

/// `capture install` / `capture remove`.
async fn capture(config: &Config, action: CaptureAction, json: bool) -> Result<(), Failure> {
    use jetsync_applier::capture;
    let report = match action {
        CaptureAction::Install { backfill, .. } => capture::install_with(config, backfill).await,
        CaptureAction::Remove { .. } => capture::remove(config).await,
    }
    .map_err(capture_failure)?;
    emit(json, &report, capture::CaptureReport::to_text);
    Ok(())
}

async fn connect(config: &Config) -> Result<jetsync::Client, Failure> {
    jetsync::Client::connect(config)
        .await
        .with_context(|| format!("connecting to {}", config.nats.url))
        .map_err(Failure::runtime)
}

/// Connects and makes sure the stream is there, as `run` does: with `stream.provision = true`
/// (the default) it is created or updated, so that `publish` or `tail` work as a first
/// command; with `false` the existing stream is checked (exit 2 naming `stream.provision` when
/// it cannot back the sync group). For the commands that read or write the stream.
async fn connect_checked(config: &Config) -> Result<jetsync::Client, Failure> {
    let client = connect(config).await?;
    if config.stream.provision {
        client.provision().await.map_err(|e| match e {
            jetsync::Error::Config(_) => Failure::usage(e),
            e => Failure::runtime(e),
        })?;
    } else {
        check_stream(&client, config).await?;
    }
    Ok(client)
}

async fn check_stream(client: &jetsync::Client, config: &Config) -> Result<(), Failure> {
    jetsync::check_existing_stream(client.jetstream(), &config.stream)
        .await
        .map_err(|e| match e {
            jetsync::Error::Config(_) => Failure::usage(e),
            e => Failure::runtime(e),
        })
}

/// `status`: the report [`collect_status`] builds (the same one `/status` serves); exit 1 after
/// printing it when NATS is unavailable.
async fn status(config: &Config, json: bool) -> Result<(), Failure> {
    let report = collect_status(config).await.map_err(Failure::runtime)?;
    emit(json, &report, StatusReport::to_text);
    if !report.nats_available() {
        return Err(Failure::runtime(anyhow!("NATS status unavailable")));
    }
    Ok(())
}

async fn provision(config: &Config, json: bool) -> Result<(), Failure> {
    let client = connect(config).await?;
    let outcome = client.provision().await.map_err(Failure::runtime)?;
    let result = serde_json::json!({
        "stream": config.stream.name,
        "subjects": [jetsync::group_filter(&config.stream.subject_prefix)],
        "outcome": format!("{outcome:?}").to_lowercase(),
    });
    emit(json, &result, |_| {
        format!(
            "stream {} ({}.>): {}",
            config.stream.name,
            config.stream.subject_prefix,
            format!("{outcome:?}").to_lowercase()
        )
    });
    Ok(())
}

async fn digest(config: &Config, json: bool) -> Result<(), Failure> {
    let mut sink = open_sink(config).await?;
    // The digest is taken at one applied sequence: `run` may commit batches meanwhile, so the
    // fence is read before and after the tables, and the digest is taken again until both
    // reads agree (bounded; a busy applier commits every few milliseconds at most).
    let group = &config.stream.name;
    let mut attempts = 0;
    let (applied, tables) = loop {
        let before = sink
            .fence(group)
            .await
            .map_err(Failure::runtime)?
            .unwrap_or(0);
        let tables = sink.digest().await.map_err(Failure::runtime)?;
        let after = sink
            .fence(group)
            .await
            .map_err(Failure::runtime)?
            .unwrap_or(0);
        attempts += 1;
        if before == after {
            break (after, tables);
        }
        if attempts >= 50 {
            return Err(Failure::runtime(anyhow::anyhow!(
                "the applier kept committing while the digest was taken ({attempts} attempts, \
                 applied seq moved from {before} to {after}): stop `run` or retry when it is idle"
            )));
        }
    };
    let result = serde_json::json!({
        "instance": config.instance,
        "applied_seq": applied,
        "tables": tables,
    });
    emit(json, &result, |_| {
        let mut out = format!("instance {} applied seq {}\n", config.instance, applied);
        for t in &tables {
            out += &format!("{:<24} {:>10} rows  {}\n", t.table, t.rows, t.hash);
        }
        out.trim_end().to_owned()
    });
    Ok(())
}

async fn reset(config: &Config, to_seq: u64, json: bool) -> Result<(), Failure> {
    let group = &config.stream.name;
    // Opening the checkpoint store for writing fails while `run` holds it.
    let offsets = Offsets::open(&config.redb_path()).map_err(Failure::runtime)?;
    let mut sink = open_sink(config).await?;
    let before = offsets.applied(group).map_err(Failure::runtime)?;
    sink.set_fence(group, to_seq)
        .await
        .map_err(Failure::runtime)?;
    offsets.set(group, to_seq).map_err(Failure::runtime)?;
    let result = serde_json::json!({
        "stream": group,
        "applied_seq_before": before,
        "applied_seq": to_seq,
    });
    emit(json, &result, |_| {
        format!(
            "stream {group}: applied seq {before} -> {to_seq}; the next run resumes at {}",
            to_seq + 1
        )
    });
    Ok(())
}

async fn publish(
    config: &Config,
    table: &str,
    key: &str,
    row: Option<&str>,
    delete: bool,
    msg_id: Option<String>,
    json: bool,
) -> Result<(), Failure> {
    // Validate the input before connecting, so that bad input is a usage error.
    let rows_row = match (row, delete) {
        (Some(text), false) => {
            let value: serde_json::Value = serde_json::from_str(text)
                .context("--json is not valid JSON")
                .map_err(Failure::usage)?;
            Some(jetsync::row_from_json(value).map_err(Failure::usage)?)
        }
        (None, true) => None,
        _ => {
            return Err(Failure::usage(anyhow!(
                "give either --json ROW or --delete"
            )))
        }
    };
    jetsync::TableName::new(table).map_err(Failure::usage)?;
    jetsync::encode_key(key).map_err(Failure::usage)?;
    let client = connect_checked(config).await?;
    let handle = client.rows(table).map_err(Failure::usage)?;
    let options = jetsync::WriteOptions {
        msg_id,
        expected_seq: None,
    };
    let published = match rows_row {
        Some(r) => handle.upsert_with(key, &r, options).await,
        None => handle.delete_with(key, options).await,
    }
    .map_err(Failure::runtime)?;
    let result = serde_json::json!({"seq": published.seq, "duplicate": published.duplicate});
    emit(json, &result, |_| {
        if published.duplicate {
            format!("duplicate of seq {}", published.seq)
        } else {
            format!("published seq {}", published.seq)
        }
    });
    Ok(())
}

async fn tail(
    config: &Config,
    table: Option<&str>,
    all: bool,
    count: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    let prefix = &config.stream.subject_prefix;
    let filter = match table {
        Some(t) => {
            jetsync::table_filter(prefix, &jetsync::TableName::new(t).map_err(Failure::usage)?)
        }
        None => jetsync::group_filter(prefix),
    };
    let client = connect_checked(config).await?;
    let stream = client
        .jetstream()
        .get_stream(&config.stream.name)
        .await
        .map_err(|e| Failure::runtime(anyhow!("stream {}: {e}", config.stream.name)))?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: if all {
                DeliverPolicy::All
            } else {
                DeliverPolicy::New
            },
            ..Default::default()
        })
        .await
        .map_err(|e| Failure::runtime(anyhow!("creating the tail consumer: {e}")))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Failure::runtime(anyhow!("tail: {e}")))?;
    let mut seen = 0u64;
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    while count.is_none_or(|c| seen < c) {
        let next = tokio::select! {
            _ = &mut stop => break,
            next = messages.next() => next,
        };
        let Some(message) = next else { break };
        let message = message.map_err(|e| Failure::runtime(anyhow!("tail: {e}")))?;
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let subject = message.subject.to_string();
        let format = message
            .headers
            .as_ref()
            .and_then(|h| h.get(codec::FORMAT_HEADER))
            .map(|v| v.as_str().to_owned());
        let decoded = jetsync::parse_subject(prefix, &subject)
            .map_err(|e| e.to_string())
            .and_then(|(t, k)| {
                codec::decode_message(format.as_deref(), &message.payload)
                    .map(|ev| (t, k, ev))
                    .map_err(|e| e.to_string())
            });
        // A member of a transaction (an atomic batch) says so.
        let member = jetsync::transaction::Membership::of(message.headers.as_ref());
        let txn = member.as_ref().map(
            |m| serde_json::json!({"id": m.batch_id, "sequence": m.sequence, "commit": m.commit}),
        );
        let txn_text = member
            .as_ref()
            .map(|m| {
                format!(
                    "  txn {} #{}{}",
                    escape_text(&m.batch_id),
                    m.sequence,
                    if m.commit { " commit" } else { "" }
                )
            })
            .unwrap_or_default();
        let line = match &decoded {
            Ok((t, k, ev)) => serde_json::json!({
                "seq": seq,
                "table": t.as_str(),
                "key": k,
                "op": match ev.op() { jetsync::Op::Upsert => "upsert", jetsync::Op::Delete => "delete" },
                "row": ev.row().map(jetsync::row_to_json),
                "origin": ev.origin,
                "txn": txn,
            }),
            Err(e) => serde_json::json!({"seq": seq, "subject": subject, "error": e, "txn": txn}),
        };
        if json {
            println!("{line}");
        } else {
            match decoded {
                // Everything but the sequence comes from the event: escaped for the terminal.
                Ok((t, k, ev)) => println!(
                    "{seq:>8} {:<6} {}/{} {}{txn_text}",
                    match ev.op() {
                        jetsync::Op::Upsert => "upsert",
                        jetsync::Op::Delete => "delete",
                    },
                    t,
                    escape_text(&k),
                    escape_text(
                        &ev.row()
                            .map(|r| jetsync::row_to_json(r).to_string())
                            .unwrap_or_default()
                    )
                ),
                Err(e) => println!(
                    "{seq:>8} POISON {}: {}{txn_text}",
                    escape_text(&subject),
                    escape_text(&e)
                ),
            }
        }
        seen += 1;
    }
    Ok(())
}

/// `resync`: rebuild from a snapshot, with a progress bar on a terminal (a line per second
/// otherwise, on stderr).
async fn resync(config: &Config, json: bool) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let stop = termination();
    if !config.stream.provision {
        check_stream(&connect(config).await?, config).await?;
    }
    let sink = open_sink(config).await?;
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "reading snapshot {bar:40} {pos}/{len} rows ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let started = std::time::Instant::now();
    let mut last_line = std::time::Instant::now();
    let progress = |p: jetsync_applier::SnapshotProgress| match &bar {
        Some(bar) => {
            bar.set_length(p.total.max(p.loaded));
            bar.set_position(p.loaded);
        }
        None => {
            if !json && last_line.elapsed() >= std::time::Duration::from_secs(1) {
                eprintln!("resync: read {} of {} rows", p.loaded, p.total);
                last_line = std::time::Instant::now();
            }
        }
    };
    let done = jetsync_applier::resync_instance(config, sink, progress, stop)
        .await
        .map_err(engine_failure)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let Some(done) = done else {
        return Err(Failure::runtime(anyhow!(
            "interrupted: nothing was replaced (or the next `run` finishes the resync)"
        )));
    };
    let report = serde_json::json!({
        "stream": config.stream.name,
        "applied_seq": done.applied_seq,
        "events": done.events,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    });
    emit(json, &report, |_| {
        format!(
            "resync of {}: tables rebuilt from {}, applied seq {} ({:.1} s)",
            config.stream.name,
            count(done.events, "event", "events"),
            done.applied_seq,
            started.elapsed().as_secs_f64()
        )
    });
    Ok(())
}

/// One parked event for `--json` output.
fn parked_json(e: &jetsync_applier::ParkedEvent) -> serde_json::Value {
    serde_json::json!({
        "seq": e.seq,
        "subject": e.subject,
        "row": e.row.as_ref().map(|r| r.to_string()),
        "format": e.format,
        "msg_id": e.msg_id,
        "error": e.error,
        "held_behind": e.held_behind,
        "txn": e.txn,
        "parked_at_ms": e.parked_at_ms,
        "payload_base64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &e.payload),
    })
}

fn parked_text(events: &[jetsync_applier::ParkedEvent]) -> String {
    if events.is_empty() {
        return "no parked events".to_owned();
    }
    let mut out = String::new();
    // Subjects, keys, bodies and reasons come from events: escaped for the terminal.
    for e in events {
        let row = e
            .row
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_else(|| format!("(no row) {}", e.subject));
        let txn = e
            .txn
            .as_ref()
            .map(|t| format!("  [txn {}]", escape_text(t)))
            .unwrap_or_default();
        out.push_str(&format!(
            "{:>10}  {}  {}{txn}\n",
            e.seq,
            escape_text(&row),
            escape_text(&e.error)
        ));
        if e.held_behind.is_none() {
            out.push_str(&format!(
                "{:>10}  body: {}\n",
                "",
                escape_bytes(&e.payload, 120)
            ));
        }
    }
    let held = events.iter().filter(|e| e.held_behind.is_some()).count();
    let txns: std::collections::BTreeSet<&str> =
        events.iter().filter_map(|e| e.txn.as_deref()).collect();
    out.push_str(&format!(
        "{} parked ({} poison, {held} held behind them)",
        events.len(),
        events.len() - held
    ));
    if !txns.is_empty() {
        out.push_str(&format!(
            "; {} {} parked whole",
            txns.len(),
            if txns.len() == 1 {
                "transaction"
            } else {
                "transactions"
            }
        ));
    }
    out
}

/// `parked list`: reads the checkpoint store read-only, so it works while `run` runs.
fn parked_list(config: &Config, json: bool) -> Result<(), Failure> {
    let events = match jetsync_applier::read_parked(&config.redb_path(), &config.stream.name) {
        Ok(events) => events,
        Err(jetsync_applier::OffsetsError::Missing { .. }) => Vec::new(),
        Err(e) => return Err(Failure::runtime(e)),
    };
    let list: Vec<serde_json::Value> = events.iter().map(parked_json).collect();
    emit(json, &list, |_| parked_text(&events));
    Ok(())
}

/// `parked retry`.
async fn parked_retry(
    config: &Config,
    rows: &[jetsync_applier::RowId],
    json: bool,
) -> Result<(), Failure> {
    let sink = open_sink(config).await?;
    let report = jetsync_applier::retry_parked(config, sink, rows)
        .await
        .map_err(engine_failure)?;
    let value = serde_json::json!({
        "applied": report.applied,
        "still_parked": report.still_parked.iter().map(parked_json).collect::<Vec<_>>(),
        "fence": report.fence,
    });
    emit(json, &value, |_| {
        let mut text = format!(
            "applied {}",
            count(report.applied.len() as u64, "parked event", "parked events")
        );
        if !report.still_parked.is_empty() {
            text.push_str(&format!(
                "; still parked:\n{}",
                parked_text(&report.still_parked)
            ));
        }
        text
    });
    if report.still_parked.is_empty() {
        Ok(())
    } else {
        Err(Failure::runtime(anyhow!(
            "{} still parked (see above)",
            count(report.still_parked.len() as u64, "event is", "events are")
        )))
    }
}

/// `parked drop`.
fn parked_drop(
    config: &Config,
    rows: &[jetsync_applier::RowId],
    all: bool,
    json: bool,
) -> Result<(), Failure> {
    let dropped = jetsync_applier::drop_parked(config, rows, all).map_err(Failure::runtime)?;
    let list: Vec<serde_json::Value> = dropped.iter().map(parked_json).collect();
    emit(json, &list, |_| {
        format!(
            "dropped {}",
            count(dropped.len() as u64, "parked event", "parked events")
        )
    });
    Ok(())
}
