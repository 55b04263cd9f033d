//! Poison events (issue #4): garbage is parked without stalling anything; a row the sink
//! refuses is parked with its later events held behind it while other rows advance, and
//! `parked retry` applies them in order once the cause is fixed; `on_poison = "halt"` stops;
//! json/1 events from a publisher without the jetsync client are applied like any other.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use async_nats::{jetstream, HeaderMap};
use jetsync::{Row, Value};
use jetsync_e2e::{
    assert_sqlite_matches_exactly, heavy, random_row, Group, Instance, Reference, SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::convergence::digest_of;

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Publishes a raw message (no jetsync client) and returns its stream sequence.
async fn raw_publish(
    js: &jetstream::Context,
    subject: String,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<u64> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.insert(*k, *v);
    }
    let ack = js
        .publish_with_headers(subject, map, body.into())
        .await?
        .await?;
    Ok(ack.sequence)
}

/// One garbage message of kind `n % 6` for garbage row `g{n}`.
fn garbage(prefix: &str, n: usize) -> (String, Vec<(&'static str, &'static str)>, Vec<u8>) {
    let row = format!("{prefix}.items.g{n}");
    match n % 6 {
        0 => (
            row,
            vec![("Jetsync-Format", "postcard/1")],
            vec![0xff, 0x13, 0x37, 0x00, 0x42],
        ),
        1 => (row, vec![], br#"{"op":"upsert","row":{"id":"x"}}"#.to_vec()),
        2 => (row, vec![("Jetsync-Format", "xml/9")], b"<row/>".to_vec()),
        3 => (
            row,
            vec![("Jetsync-Format", "json/1")],
            b"{not json".to_vec(),
        ),
        4 => (
            format!("{prefix}.Items!.g{n}"),
            vec![("Jetsync-Format", "json/1")],
            br#"{"op":"delete"}"#.to_vec(),
        ),
        _ => (
            format!("{prefix}.items.g{n}.extra"),
            vec![("Jetsync-Format", "json/1")],
            br#"{"op":"delete"}"#.to_vec(),
        ),
    }
}

const VALID: usize = 10_000;
const GARBAGE: usize = 1_000;

/// 1,000 garbage messages interleaved with 10,000 valid events: every valid event applied,
/// every garbage one parked, nothing stalls. An instance with `on_poison = "halt"` stops at the
/// first one instead, naming it.
#[test]
fn garbage_is_parked_and_valid_events_flow() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = Group::new(server.url(), "POI", "poi");
        let mut park = Instance::new(&group, root.path(), "park", SinkKind::Sqlite)?;
        let mut halt = Instance::new(&group, root.path(), "halt", SinkKind::Sqlite)?;
        halt.set_option("apply", "on_poison", "\"halt\"")?;
        let (code, _, err) = park.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        park.start()?;
        halt.start()?;

        let client = group.client("poi-pub").await?;
        let items = client.rows("items")?;
        let js = jetstream::new(async_nats::connect(server.url()).await?);
        let mut rng = StdRng::seed_from_u64(rand::random());
        let mut reference = Reference::default();
        let mut garbage_seqs = BTreeSet::new();
        let per_chunk = VALID / GARBAGE;
        for chunk in 0..GARBAGE {
            let mut pipeline = items.pipeline();
            let mut sent = Vec::new();
            for _ in 0..per_chunk {
                let key = format!("k{}", rng.gen_range(0..2_000));
                if rng.gen_bool(0.9) {
                    let row = random_row(&mut rng, &key);
                    pipeline.upsert(&key, &row).await?;
                    sent.push((key, Some(row)));
                } else {
                    pipeline.delete(&key).await?;
                    sent.push((key, None));
                }
            }
            for ((key, row), p) in sent.into_iter().zip(pipeline.finish().await?) {
                reference.record(p.seq, "items", &key, row);
            }
            let (subject, headers, body) = garbage("poi", chunk);
            garbage_seqs.insert(raw_publish(&js, subject, &headers, body).await?);
        }
        let last = reference.max_seq().max(*garbage_seqs.last().unwrap());
        ensure!(last == (VALID + GARBAGE) as u64, "stream ends at {last}");

        park.wait_applied("POI", last, Duration::from_secs(180))?;
        let parked = park.cli_json(&["parked", "list"])?;
        let parked = parked.as_array().context("parked list is an array")?;
        let parked_seqs: BTreeSet<u64> = parked.iter().filter_map(|p| p["seq"].as_u64()).collect();
        ensure!(
            parked_seqs == garbage_seqs,
            "parked {} events, expected the {} garbage ones (first parked {:?}, first garbage {:?})",
            parked_seqs.len(),
            garbage_seqs.len(),
            parked_seqs.iter().next(),
            garbage_seqs.iter().next()
        );
        ensure!(
            parked.iter().all(|p| p["held_behind"].is_null() && p["error"].as_str().is_some_and(|e| !e.is_empty())),
            "garbage rows are distinct, so nothing is held, and every one has its error"
        );
        // Raw bodies are kept.
        let first = &parked[0];
        ensure!(first["payload_base64"].as_str() == Some("/xM3AEI="), "payload kept: {first}");
        assert_sqlite_matches_exactly(&park, &reference, "items", "id")?;
        let status = park.status()?;
        ensure!(status["groups"][0]["parked"] == GARBAGE, "status parked: {status}");

        // halt: stops at the first garbage event, naming it.
        let code = halt.wait_exit(Duration::from_secs(60))?;
        let log = halt.log();
        let first_garbage = garbage_seqs.iter().next().unwrap();
        ensure!(code == 1, "halt exited {code}:\n{log}");
        ensure!(log.contains(&format!("poison event at seq {first_garbage}")), "halt log:\n{log}");
        Ok(())
    })
}

/// A row the sink refuses is parked with its later events held behind it while other rows
/// advance; after the cause is fixed, `parked retry` applies them in order and the instance
/// converges with one that never had the problem.
#[test]
fn refused_row_is_parked_then_retried_in_order() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = Group::new(server.url(), "REJ", "rej");
        let mut bad = Instance::new(&group, root.path(), "bad", SinkKind::Sqlite)?;
        let mut good = Instance::new(&group, root.path(), "good", SinkKind::Sqlite)?;
        // The service's own table, with a trigger that refuses row k7.
        let db = rusqlite::Connection::open(bad.sqlite_path())?;
        db.execute_batch(
            "CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER, f REAL, s TEXT, b INTEGER);
             CREATE TRIGGER refuse_k7_insert BEFORE INSERT ON items WHEN NEW.id = 'k7'
               BEGIN SELECT RAISE(ABORT, 'k7 is refused by the service'); END;
             CREATE TRIGGER refuse_k7_update BEFORE UPDATE ON items WHEN NEW.id = 'k7'
               BEGIN SELECT RAISE(ABORT, 'k7 is refused by the service'); END;",
        )?;
        drop(db);
        // Keep every event of a row (history 64), so k7's events all reach the instances; and
        // hand the sink every change: with coalescing, k7's refused upserts that a delete of
        // k7 later in the same batch supersedes are never offered to the sink, so what is
        // parked would depend on how the backlog was cut into batches (README, "Coalescing").
        for i in [&bad, &good] {
            i.set_stream_option("history", "64")?;
            i.set_option("apply", "coalesce", "false")?;
        }
        let (code, _, err) = bad.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        bad.start()?;
        good.start()?;
        // Both are past their (empty) bootstrap and consuming before the events arrive.
        let client = group.client("rej-pub").await?;
        let items = client.rows("items")?;
        let warm = items
            .upsert("warm", &random_row(&mut StdRng::seed_from_u64(1), "warm"))
            .await?;
        for i in [&mut bad, &mut good] {
            i.wait_applied("REJ", warm.seq, Duration::from_secs(60))?;
        }

        let mut rng = StdRng::seed_from_u64(rand::random());
        let mut events: Vec<(String, Option<Row>)> = (0..2_000)
            .map(|_| {
                let key = format!("k{}", rng.gen_range(0..100));
                let row = rng.gen_bool(0.9).then(|| random_row(&mut rng, &key));
                (key, row)
            })
            .collect();
        // Make sure k7 is upserted early and written again afterwards.
        events.insert(10, ("k7".into(), Some(random_row(&mut rng, "k7"))));
        events.push(("k7".into(), Some(random_row(&mut rng, "k7"))));
        let mut pipeline = items.pipeline();
        for (key, row) in &events {
            match row {
                Some(row) => pipeline.upsert(key, row).await?,
                None => pipeline.delete(key).await?,
            }
        }
        let mut reference = Reference::default();
        reference.record(
            warm.seq,
            "items",
            "warm",
            Some(random_row(&mut StdRng::seed_from_u64(1), "warm")),
        );
        let mut k7_seqs = Vec::new();
        for ((key, row), p) in events.iter().zip(pipeline.finish().await?) {
            reference.record(p.seq, "items", key, row.clone());
            if key == "k7" {
                k7_seqs.push((p.seq, row.is_some()));
            }
        }
        let last = reference.max_seq();
        good.wait_applied("REJ", last, Duration::from_secs(120))?;
        bad.wait_applied("REJ", last, Duration::from_secs(120))?;
        ensure!(bad.is_running(), "the instance keeps running");

        // Parked: k7's first refused upsert, and every later k7 event held behind it.
        let first_upsert = k7_seqs.iter().find(|(_, upsert)| *upsert).unwrap().0;
        let want: Vec<u64> = k7_seqs
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| *s >= first_upsert)
            .collect();
        let parked = bad.cli_json(&["parked", "list"])?;
        let parked = parked.as_array().context("array")?;
        let got: Vec<u64> = parked.iter().filter_map(|p| p["seq"].as_u64()).collect();
        ensure!(got == want, "parked {got:?}, expected k7's events {want:?}");
        ensure!(
            parked[0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("k7 is refused")),
            "the first carries the sink's error: {}",
            parked[0]
        );
        ensure!(
            parked[1..]
                .iter()
                .all(|p| p["held_behind"].as_u64() == Some(first_upsert)),
            "later k7 events are held behind {first_upsert}: {parked:?}"
        );
        // Every other row advanced: equal to the instance without the problem, which holds
        // exactly the reference.
        assert_sqlite_matches_exactly(&good, &reference, "items", "id")?;
        let mut others = good.sqlite_rows("items", "id")?;
        others.remove("k7");
        let mut have = bad.sqlite_rows("items", "id")?;
        have.remove("k7");
        ensure!(
            have == others,
            "rows other than k7 differ: {} vs {} rows",
            have.len(),
            others.len()
        );

        // While the cause is still there, a retry keeps them parked (exit 1).
        ensure!(bad.stop(Duration::from_secs(20))? == 0, "clean stop");
        let (code, _, _) = bad.cli(&["parked", "retry"])?;
        ensure!(
            code == 1,
            "retry with the trigger still there exits 1, got {code}"
        );
        ensure!(bad.cli_json(&["parked", "list"])?.as_array().map(Vec::len) == Some(want.len()));

        // Fix the cause, retry: all of k7's events applied in order, nothing parked.
        rusqlite::Connection::open(bad.sqlite_path())?
            .execute_batch("DROP TRIGGER refuse_k7_insert; DROP TRIGGER refuse_k7_update;")?;
        let retried = bad.cli_json(&["parked", "retry", "--row", "items/k7"])?;
        let applied: Vec<u64> = retried["applied"]
            .as_array()
            .context("applied")?
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        ensure!(
            applied == want,
            "retry applied {applied:?}, expected {want:?}"
        );
        ensure!(bad.cli_json(&["parked", "list"])?.as_array().map(Vec::len) == Some(0));
        ensure!(
            bad.status()?["groups"][0]["parked"] == 0,
            "status shows nothing parked"
        );

        // Restarted, it goes on and converges with the instance that never had the problem.
        bad.start()?;
        let mut more = items.pipeline();
        more.upsert("k7", &random_row(&mut rng, "k7")).await?;
        more.delete("k8").await?;
        let _end = more
            .finish()
            .await?
            .last()
            .map(|p| p.seq)
            .context("two acknowledgements")?;
        let end = last + 2;
        bad.wait_applied("REJ", end, Duration::from_secs(60))?;
        good.wait_applied("REJ", end, Duration::from_secs(60))?;
        ensure!(
            digest_of(&bad)? == digest_of(&good)?,
            "digests differ after retry"
        );
        Ok(())
    })
}

/// json/1 events published with plain async-nats (headers and JSON body of DESIGN 3, no
/// jetsync client) are applied like the Rust client's.
#[test]
fn polyglot_json_events_are_applied() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let mut group = Group::new(server.url(), "POLY", "poly");
        group.tables.insert("products".into(), "sku".into());
        let mut inst = Instance::new(&group, root.path(), "poly", SinkKind::Sqlite)?;
        let (code, _, err) = inst.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        inst.start()?;
        let js = jetstream::new(async_nats::connect(server.url()).await?);
        let json = [("Jetsync-Format", "json/1")];
        let body = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
        raw_publish(&js, "poly.products.A-1".into(), &[("Jetsync-Format", "json/1"), ("Nats-Msg-Id", "py-1")], body(serde_json::json!({
            "op": "upsert",
            "row": {"sku": "A-1", "name": "Chair", "price": 12.5, "stock": 3, "active": true, "tags": ["a", {"b": 1}], "note": null},
            "origin": "catalog-py", "ts_ms": 1764000000000u64, "schema": 1
        }))).await?;
        raw_publish(&js, "poly.products.B-2".into(), &json, body(serde_json::json!({
            "op": "upsert", "row": {"sku": "B-2", "name": "Desk", "price": 99.0, "stock": 1},
            "origin": "catalog-js", "ts_ms": 1764000000001u64
        }))).await?;
        // A key that is not a plain token travels as `=` + base64url.
        let key = "shelf 3/β";
        let token = format!("={}", base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, key));
        raw_publish(&js, format!("poly.products.{token}"), &json, body(serde_json::json!({
            "op": "upsert", "row": {"sku": key, "name": "Shelf", "price": 5.25},
            "origin": "catalog-go", "ts_ms": 1764000000002u64, "schema": 1
        }))).await?;
        let last = raw_publish(&js, "poly.products.B-2".into(), &json, body(serde_json::json!({
            "op": "delete", "origin": "catalog-js", "ts_ms": 1764000000003u64, "schema": 1
        }))).await?;
        inst.wait_applied("POLY", last, Duration::from_secs(60))?;
        let rows = inst.sqlite_rows("products", "sku")?;
        ensure!(rows.len() == 2, "two rows remain: {rows:?}");
        let a = &rows["A-1"];
        ensure!(a["name"] == Value::Text("Chair".into()), "{a:?}");
        ensure!(a["price"] == Value::F64(12.5), "{a:?}");
        ensure!(a["stock"] == Value::I64(3), "{a:?}");
        ensure!(a["note"] == Value::Null, "{a:?}");
        ensure!(matches!(&a["active"], Value::I64(1) | Value::Bool(true)), "{a:?}");
        let tags = match &a["tags"] {
            Value::Text(t) => serde_json::from_str::<serde_json::Value>(t)?,
            Value::Json(j) => j.clone(),
            other => anyhow::bail!("tags stored as {other:?}"),
        };
        ensure!(tags == serde_json::json!(["a", {"b": 1}]), "tags {tags}");
        ensure!(rows[key]["price"] == Value::F64(5.25), "{rows:?}");
        ensure!(inst.cli_json(&["parked", "list"])?.as_array().map(Vec::len) == Some(0), "nothing parked");
        Ok(())
    })
}
