//! Whatever arrives on the stream, the applier keeps running (issue #11): messages the NATS
//! client library cannot parse (bad header bytes, a non-UTF-8 subject), rows over the column
//! limit, bodies over the size limit, deeply nested JSON and events of tables this instance does
//! not sync are parked within seconds with a specific reason, their rows' later events held,
//! while other rows keep flowing; `other_tables = "skip"` skips instead, and a table listed
//! later gets its parked events applied at the next start.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use async_nats::{jetstream, HeaderMap};
use jetsync::codec::{encode, Format};
use jetsync::{Event, Row, Value};
use jetsync_e2e::{heavy, http_get, wait_until, Group, Instance, SinkKind};
use jetsync_testkit::NatsServer;

/// How quickly a bad event must be parked once it is in the stream.
const PARK_WITHIN: Duration = Duration::from_secs(30);

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Publishes raw protocol bytes on a plain TCP connection (no client library), waiting for
/// the server's PONG so that the message was processed.
fn raw_protocol(port: u16, publish: &[u8]) -> Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    ensure!(line.starts_with("INFO "), "expected INFO, got {line:?}");
    stream.write_all(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\n",
    )?;
    stream.write_all(publish)?;
    stream.write_all(b"PING\r\n")?;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        ensure!(!line.starts_with("-ERR"), "server refused: {line}");
        if line.starts_with("PONG") {
            return Ok(());
        }
        ensure!(!line.is_empty(), "connection closed before PONG");
    }
}

/// `HPUB subject hdr_len total_len` with raw header and body bytes.
fn hpub(subject: &[u8], headers: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = b"HPUB ".to_vec();
    out.extend_from_slice(subject);
    out.extend_from_slice(
        format!(" {} {}\r\n", headers.len(), headers.len() + body.len()).as_bytes(),
    );
    out.extend_from_slice(headers);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
    out
}

/// The stream's last sequence.
async fn last_seq(js: &jetstream::Context, stream: &str) -> Result<u64> {
    Ok(js
        .get_stream(stream)
        .await?
        .info()
        .await?
        .state
        .last_sequence)
}

/// Waits until the stream holds more than `after` messages' worth of sequences; returns the
/// new last sequence (the message just published raw).
async fn stored_after(js: &jetstream::Context, stream: &str, after: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = last_seq(js, stream).await?;
        if last > after {
            return Ok(last);
        }
        ensure!(
            Instant::now() < deadline,
            "the raw message was not stored (last seq {last})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes a body with the given format header through a client connection.
async fn publish(
    js: &jetstream::Context,
    subject: &str,
    format: &str,
    body: Vec<u8>,
) -> Result<u64> {
    let mut headers = HeaderMap::new();
    headers.insert("Jetsync-Format", format);
    Ok(js
        .publish_with_headers(subject.to_owned(), headers, body.into())
        .await?
        .await?
        .sequence)
}

fn upsert(columns: usize, value: Value) -> Event {
    let mut row = Row::new();
    for i in 0..columns {
        row.insert(format!("c{i}"), value.clone());
    }
    Event::upsert(row, "raw")
}

fn valid(format: Format) -> Result<Vec<u8>> {
    let mut row = Row::new();
    row.insert("n".into(), Value::I64(1));
    Ok(encode(&Event::upsert(row, "raw"), format)?)
}

/// The parked events as `parked list --json` shows them, by sequence.
fn parked(i: &Instance) -> Result<Vec<serde_json::Value>> {
    let list = i.cli_json(&["parked", "list"])?;
    Ok(list.as_array().context("parked list is an array")?.clone())
}

/// Waits until the parked event at `seq` is listed (the applier running all along); returns it.
fn wait_parked(i: &mut Instance, seq: u64) -> Result<serde_json::Value> {
    let deadline = Instant::now() + PARK_WITHIN;
    loop {
        ensure!(i.is_running(), "the applier exited:\n{}", i.log());
        if let Some(p) = parked(i)?
            .into_iter()
            .find(|p| p["seq"].as_u64() == Some(seq))
        {
            return Ok(p);
        }
        ensure!(
            Instant::now() < deadline,
            "seq {seq} not parked within {PARK_WITHIN:?}:\n{}",
            i.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn error_of(p: &serde_json::Value) -> &str {
    p["error"].as_str().unwrap_or_default()
}

/// A message whose header holds bytes that are not UTF-8, and one whose subject is not UTF-8:
/// the client library would drop its connection on each; the applier parks them (with the raw
/// header bytes), holds the bad row's later events, applies other rows, and never exits.
#[test]
fn messages_the_client_cannot_parse_are_parked() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = Group::new(server.url(), "MAL", "mal");
        let mut i = Instance::new(&group, root.path(), "i", SinkKind::Sqlite)?;
        // Keep every event of a row: a later event must not supersede the parked one.
        i.set_stream_option("history", "64")?;
        let (code, _, err) = i.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        i.start()?;
        let js = jetstream::new(async_nats::connect(server.url()).await?);
        let warm = publish(
            &js,
            "mal.items.warm",
            "postcard/1",
            valid(Format::Postcard1)?,
        )
        .await?;
        i.wait_applied("MAL", warm, Duration::from_secs(60))?;

        // Bad header bytes on row items/bad, then a valid event of the same row (held) and
        // one of another row (applied).
        let headers = b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n";
        raw_protocol(server.port(), &hpub(b"mal.items.bad", headers, b"body"))?;
        let bad = stored_after(&js, "MAL", warm).await?;
        let later = publish(
            &js,
            "mal.items.bad",
            "postcard/1",
            valid(Format::Postcard1)?,
        )
        .await?;
        let ok = publish(&js, "mal.items.ok", "postcard/1", valid(Format::Postcard1)?).await?;
        let p = wait_parked(&mut i, bad)?;
        i.wait_applied("MAL", ok, PARK_WITHIN)?;
        ensure!(
            error_of(&p).starts_with("malformed message: header block is not valid UTF-8"),
            "{p}"
        );
        ensure!(p["row"] == "items/bad", "{p}");
        let held = wait_parked(&mut i, later)?;
        ensure!(held["held_behind"].as_u64() == Some(bad), "{held}");
        let rows = i.sqlite_rows("items", "id")?;
        ensure!(
            rows.contains_key("ok") && !rows.contains_key("bad"),
            "{rows:?}"
        );

        // A subject that is not UTF-8.
        raw_protocol(
            server.port(),
            &hpub(b"mal.items.\xff", b"NATS/1.0\r\n\r\n", b"body"),
        )?;
        let bad_subject = stored_after(&js, "MAL", ok).await?;
        let ok2 = publish(
            &js,
            "mal.items.ok2",
            "postcard/1",
            valid(Format::Postcard1)?,
        )
        .await?;
        let p = wait_parked(&mut i, bad_subject)?;
        i.wait_applied("MAL", ok2, PARK_WITHIN)?;
        ensure!(
            error_of(&p).starts_with("malformed message: subject is not valid UTF-8"),
            "{p}"
        );
        ensure!(i.is_running(), "the applier keeps running:\n{}", i.log());

        // `parked drop` removes them (the applier must be stopped for it).
        ensure!(
            i.stop(Duration::from_secs(30))? == 0,
            "clean stop:\n{}",
            i.log()
        );
        let dropped = i.cli_json(&["parked", "drop", "--row", "items/bad"])?;
        ensure!(dropped.as_array().map(Vec::len) == Some(2), "{dropped}");
        let rest: Vec<u64> = parked(&i)?
            .iter()
            .filter_map(|p| p["seq"].as_u64())
            .collect();
        ensure!(rest == [bad_subject], "{rest:?}");
        i.start()?;
        let ok3 = publish(
            &js,
            "mal.items.bad",
            "postcard/1",
            valid(Format::Postcard1)?,
        )
        .await?;
        i.wait_applied("MAL", ok3, PARK_WITHIN)?;
        ensure!(i.sqlite_rows("items", "id")?.contains_key("bad"));
        ensure!(i.is_running());
        Ok(())
    })
}

/// Limits: 2,001 columns, a megabyte of 200,000 null columns (postcard/1 and json/1), a body
/// over `apply.max_event_bytes` and 100,000 nested JSON arrays are parked with their reasons.
#[test]
fn events_over_the_limits_are_parked() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        // Bodies of several megabytes need a larger max_payload than the default 1 MiB.
        let server = NatsServer::builder()
            .extra_config("max_payload: 8388608")
            .start()?;
        let root = tempfile::tempdir()?;
        let mut group = Group::new(server.url(), "LIM", "lim");
        group.extra_toml = "[apply]\nmax_event_bytes = 4194304\n".into();
        let mut i = Instance::new(&group, root.path(), "i", SinkKind::Sqlite)?;
        // Keep every event of a row: a later event must not supersede the parked one.
        i.set_stream_option("history", "64")?;
        let (code, _, err) = i.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        i.start()?;
        let js = jetstream::new(async_nats::connect(server.url()).await?);

        let wide = encode(&upsert(2_001, Value::I64(1)), Format::Postcard1)?;
        let nulls_pc = encode(&upsert(200_000, Value::Null), Format::Postcard1)?;
        let nulls_json = encode(&upsert(200_000, Value::Null), Format::Json1)?;
        ensure!(nulls_pc.len() > 1 << 20 && nulls_json.len() < 4 << 20);
        let depth = 100_000;
        let deep = format!(
            r#"{{"op":"upsert","row":{{"a":{}{}}}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let huge = vec![0u8; 5 << 20];
        let cases: Vec<(&str, &str, Vec<u8>, String)> = vec![
            (
                "wide",
                "postcard/1",
                wide,
                "row has 2001 columns, more than apply.max_columns (1000)".into(),
            ),
            (
                "nulls_pc",
                "postcard/1",
                nulls_pc,
                "row has 200000 columns, more than apply.max_columns (1000)".into(),
            ),
            (
                "nulls_json",
                "json/1",
                nulls_json,
                "row has 200000 columns, more than apply.max_columns (1000)".into(),
            ),
            (
                "deep",
                "json/1",
                deep.into_bytes(),
                "recursion limit".into(),
            ),
            (
                "huge",
                "postcard/1",
                huge,
                format!(
                    "event body of {} bytes exceeds apply.max_event_bytes (4194304)",
                    5 << 20
                ),
            ),
        ];
        let mut seqs = Vec::new();
        for (key, format, body, _) in &cases {
            let seq = publish(&js, &format!("lim.items.{key}"), format, body.clone()).await?;
            seqs.push(seq);
        }
        // A later event of a parked row is held; another row is applied.
        let held = publish(&js, "lim.items.wide", "json/1", valid(Format::Json1)?).await?;
        let ok = publish(&js, "lim.items.ok", "json/1", valid(Format::Json1)?).await?;
        i.wait_applied("LIM", ok, PARK_WITHIN)?;
        for ((key, _, _, reason), seq) in cases.iter().zip(&seqs) {
            let p = wait_parked(&mut i, *seq)?;
            ensure!(
                error_of(&p).contains(reason.as_str()),
                "{key}: {}",
                error_of(&p)
            );
        }
        let p = wait_parked(&mut i, held)?;
        ensure!(p["held_behind"].as_u64() == Some(seqs[0]), "{p}");
        let rows = i.sqlite_rows("items", "id")?;
        ensure!(
            rows.len() == 1 && rows.contains_key("ok"),
            "{:?}",
            rows.keys()
        );
        ensure!(i.is_running(), "the applier keeps running:\n{}", i.log());
        Ok(())
    })
}

/// Events of a table without a `[tables.<name>]` entry: parked "table not synced here" (their
/// row held, nothing created), applied at the next start once the table is listed; with
/// `other_tables = "skip"` they are skipped instead.
#[test]
fn tables_not_synced_here() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = Group::new(server.url(), "OTH", "oth");
        let mut park = Instance::new(&group, root.path(), "park", SinkKind::Sqlite)?;
        let mut skip = Instance::new(&group, root.path(), "skip", SinkKind::Sqlite)?;
        skip.set_option("apply", "other_tables", "\"skip\"")?;
        for i in [&park, &skip] {
            i.set_stream_option("history", "64")?;
        }
        let (code, _, err) = park.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        let metrics = skip.enable_http("")?;
        park.start()?;
        skip.start()?;
        let js = jetstream::new(async_nats::connect(server.url()).await?);
        // Both consume the durable (past their bootstrap) before the events arrive.
        let warm = publish(&js, "oth.items.warm", "json/1", valid(Format::Json1)?).await?;
        for i in [&mut park, &mut skip] {
            i.wait_applied("OTH", warm, PARK_WITHIN)?;
        }

        let first = publish(&js, "oth.other.a", "json/1", valid(Format::Json1)?).await?;
        let second = publish(&js, "oth.other.a", "json/1", valid(Format::Json1)?).await?;
        let ok = publish(&js, "oth.items.ok", "json/1", valid(Format::Json1)?).await?;
        for i in [&mut park, &mut skip] {
            i.wait_applied("OTH", ok, PARK_WITHIN)?;
        }
        let p = wait_parked(&mut park, first)?;
        ensure!(error_of(&p) == "table not synced here", "{p}");
        let p = wait_parked(&mut park, second)?;
        ensure!(p["held_behind"].as_u64() == Some(first), "{p}");
        ensure!(parked(&skip)?.is_empty(), "skip parks nothing");
        // Skipped events are counted.
        let text = http_get(metrics, "/metrics")?.body;
        ensure!(
            text.lines()
                .any(|l| l.starts_with("jetsync_events_skipped_total{") && l.ends_with(" 2")),
            "{text}"
        );
        let tables = |i: &Instance| -> Result<Vec<String>> {
            let db = rusqlite::Connection::open(i.sqlite_path())?;
            let mut stmt = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?;
            let names = stmt
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(names)
        };
        for i in [&park, &skip] {
            let names = tables(i)?;
            ensure!(!names.iter().any(|n| n == "other"), "{names:?}");
        }
        ensure!(park.is_running() && skip.is_running());

        // The table is listed now: the next start applies its parked events in order.
        ensure!(park.stop(Duration::from_secs(30))? == 0);
        park.append_config("[tables.other]\nkey = \"id\"\n")?;
        park.start()?;
        wait_until("the parked events applied", PARK_WITHIN, || {
            parked(&park).ok().filter(|l| l.is_empty()).map(|_| ())
        })
        .with_context(|| park.log())?;
        let rows = park.sqlite_rows("other", "id")?;
        ensure!(rows.contains_key("a"), "{rows:?}");
        let after = publish(&js, "oth.other.a", "json/1", valid(Format::Json1)?).await?;
        park.wait_applied("OTH", after, PARK_WITHIN)?;
        ensure!(parked(&park)?.is_empty());
        ensure!(park.is_running() && skip.is_running());
        Ok(())
    })
}
