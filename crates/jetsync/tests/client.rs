//! The client crate (`Client`, `Table<T>`) against real nats-server processes: round trips in
//! both wire formats, compare-and-set, deduplication, key encoding, provisioning, a server
//! killed under the client, and pipelined bulk writes.
//!
//! Every test starts its own server, so they run in parallel without sharing state. Run them
//! against each supported server version (`NATS_SERVER_BIN=... cargo test -p jetsync --test
//! client`).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use jetsync::codec::{Format, FORMAT_HEADER};
use jetsync::{
    parse_subject, Client, Config, Current, Error, Provisioned, Row, StreamConfig, SubjectError,
    TableName, Value, WriteOptions,
};
use jetsync_testkit::NatsServer;
use serde::{Deserialize, Serialize};
use serde_json::json;

const STREAM: &str = "CATALOG";
const PREFIX: &str = "catalog";

/// Hang guard for loops that wait for the system to recover (reconnects). Far above what a
/// healthy machine needs, so a slow one cannot make the tests flaky.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(30);

fn stream_config() -> StreamConfig {
    StreamConfig {
        name: STREAM.into(),
        subject_prefix: PREFIX.into(),
        ..StreamConfig::default()
    }
}

/// A server, a client connected to it, and the provisioned stream.
async fn setup() -> Result<(NatsServer, Client)> {
    setup_with(Format::default()).await
}

async fn setup_with(format: Format) -> Result<(NatsServer, Client)> {
    let server = NatsServer::start()?;
    let nats = async_nats::connect(server.url()).await?;
    let client = Client::builder(nats, stream_config(), "test-1")
        .format(format)
        .build()?;
    assert_eq!(client.provision().await?, Provisioned::Created);
    Ok((server, client))
}

/// The number of messages the stream holds, from the server's stream info.
async fn stream_messages(client: &Client) -> Result<u64> {
    let mut stream = client.jetstream().get_stream(STREAM).await?;
    Ok(stream.info().await?.state.messages)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Dimensions {
    width_cm: f64,
    height_cm: f64,
    tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    sku: String,
    stock: i64,
    price: f64,
    active: bool,
    note: Option<String>,
    labels: Vec<String>,
    dims: Dimensions,
}

fn product(sku: &str, stock: i64) -> Product {
    Product {
        sku: sku.into(),
        stock,
        price: 12.5,
        active: true,
        note: Some("fragile, \"handle\" with care ✓".into()),
        labels: vec!["chair".into(), "oak".into(), String::new()],
        dims: Dimensions {
            width_cm: 0.1,
            height_cm: -3.0e-7,
            tags: vec!["flat-pack".into()],
        },
    }
}

/// A row holding every value kind, with edge values where the formats could lose something.
fn every_kind() -> Row {
    let mut row = Row::new();
    row.insert("null".into(), Value::Null);
    row.insert("yes".into(), Value::Bool(true));
    row.insert("no".into(), Value::Bool(false));
    row.insert("small".into(), Value::I64(-7));
    row.insert("max".into(), Value::I64(i64::MAX));
    row.insert("min".into(), Value::I64(i64::MIN));
    row.insert("float".into(), Value::F64(12.5));
    row.insert("whole_float".into(), Value::F64(3.0));
    row.insert("tiny_float".into(), Value::F64(0.1 + 0.2));
    row.insert("text".into(), Value::Text("héllo \"wörld\" {}".into()));
    row.insert("empty_text".into(), Value::Text(String::new()));
    // Encodes to "-_-AAAE" in base64url: '-' and '_' are where standard base64 differs.
    row.insert("bytes".into(), Value::Bytes(vec![0xfb, 0xff, 0x80, 0, 1]));
    row.insert("empty_bytes".into(), Value::Bytes(Vec::new()));
    row.insert(
        "json".into(),
        Value::Json(json!({"a": [1, 2.5, "x", null, {"b": true}], "c": {}})),
    );
    row.insert("json_array".into(), Value::Json(json!([1, "two", [3]])));
    row
}

/// 1. Typed structs and untyped rows come back from `get` exactly as written, in both formats.
#[tokio::test]
async fn round_trip_in_both_formats() -> Result<()> {
    for format in [Format::Postcard1, Format::Json1] {
        let (_server, client) = setup_with(format).await?;

        let products = client.table::<Product>("products")?;
        let full = product("A-1", 42);
        let sparse = Product {
            note: None,
            labels: Vec::new(),
            stock: i64::MIN,
            price: -0.0,
            active: false,
            ..product("B-2", 0)
        };
        for p in [&full, &sparse] {
            let published = products.upsert(&p.sku, p).await?;
            let current = products.get(&p.sku).await?.context("row just written")?;
            assert_eq!(current.seq, published.seq, "{format}");
            assert_eq!(&current.row, p, "{format}");
        }

        let rows = client.rows("every_kind")?;
        let row = every_kind();
        let published = rows.upsert("k", &row).await?;
        let current = rows.get("k").await?.context("row just written")?;
        assert_eq!(
            current,
            Current {
                seq: published.seq,
                row: row.clone()
            },
            "{format}"
        );

        // The event on the wire is in the chosen format; in json/1 bytes use `{"$bytes": ...}`.
        let stream = client.jetstream().get_stream(STREAM).await?;
        let raw = stream
            .direct_get_last_for_subject("catalog.every_kind.k")
            .await?;
        let header = raw
            .headers
            .get(FORMAT_HEADER)
            .map(|v| v.as_str().to_owned());
        assert_eq!(header.as_deref(), Some(format.header_value()));
        if format == Format::Json1 {
            let body: serde_json::Value = serde_json::from_slice(&raw.payload)?;
            assert_eq!(body["op"], "upsert");
            assert_eq!(body["origin"], "test-1");
            assert_eq!(body["row"]["bytes"], json!({"$bytes": "-_-AAAE"}));
            assert_eq!(body["row"]["empty_bytes"], json!({"$bytes": ""}));
            assert_eq!(body["row"]["whole_float"], json!(3.0));
            assert!(body["row"]["whole_float"].is_f64());
        }
    }
    Ok(())
}

/// 2. `get` of a never-written and of a deleted row is `None`; `Current.seq` is the seq of the
/// row's last write, not the stream's.
#[tokio::test]
async fn get_sees_latest_write_and_deletes() -> Result<()> {
    let (_server, client) = setup().await?;
    let products = client.table::<Product>("products")?;
    assert_eq!(products.get("never").await?, None);

    let first = products.upsert("A-1", &product("A-1", 1)).await?;
    let other = products.upsert("B-2", &product("B-2", 2)).await?;
    let second = products.upsert("A-1", &product("A-1", 3)).await?;
    assert!(!first.duplicate && !second.duplicate);
    assert!(first.seq < other.seq && other.seq < second.seq);
    let current = products.get("A-1").await?.context("A-1 written")?;
    assert_eq!(current.seq, second.seq);
    assert_eq!(current.row.stock, 3);
    assert_eq!(products.get("B-2").await?.map(|c| c.seq), Some(other.seq));

    let deleted = products.delete("A-1").await?;
    assert!(deleted.seq > second.seq);
    assert_eq!(products.get("A-1").await?, None);
    // Deleting is per row: the other row is untouched.
    assert_eq!(products.get("B-2").await?.map(|c| c.row.stock), Some(2));

    // A row can come back after a delete.
    let again = products.upsert("A-1", &product("A-1", 4)).await?;
    assert_eq!(products.get("A-1").await?.map(|c| c.seq), Some(again.seq));
    Ok(())
}

/// 3. Compare-and-set: a stale seq is a `Conflict` carrying the row's actual current seq, the
/// current seq succeeds; for upserts and deletes.
#[tokio::test]
async fn compare_and_set_reports_the_current_seq() -> Result<()> {
    let (_server, client) = setup().await?;
    let products = client.table::<Product>("products")?;
    let v1 = products.upsert("A-1", &product("A-1", 1)).await?;
    // Another row's write in between, so the stream's last seq differs from the row's.
    let noise = products.upsert("B-2", &product("B-2", 1)).await?;
    let v2 = products.upsert("A-1", &product("A-1", 2)).await?;
    let _more_noise = products.upsert("B-2", &product("B-2", 2)).await?;

    for stale in [v1.seq, noise.seq, v2.seq + 100] {
        match products.upsert_if("A-1", &product("A-1", 99), stale).await {
            Err(Error::Conflict { current_seq }) => {
                assert_eq!(current_seq, v2.seq, "stale {stale}")
            }
            other => panic!("upsert_if with stale seq {stale}: expected Conflict, got {other:?}"),
        }
    }
    // The failed writes stored nothing.
    assert_eq!(products.get("A-1").await?.map(|c| c.row.stock), Some(2));
    assert_eq!(stream_messages(&client).await?, 2);

    let v3 = products
        .upsert_if("A-1", &product("A-1", 3), v2.seq)
        .await?;
    assert!(v3.seq > v2.seq && !v3.duplicate);
    assert_eq!(
        products.get("A-1").await?.map(|c| (c.seq, c.row.stock)),
        Some((v3.seq, 3))
    );

    // A never-written row's current seq is 0.
    match products.upsert_if("nobody", &product("nobody", 1), 5).await {
        Err(Error::Conflict { current_seq }) => assert_eq!(current_seq, 0),
        other => panic!("expected Conflict, got {other:?}"),
    }

    match products.delete_if("A-1", v2.seq).await {
        Err(Error::Conflict { current_seq }) => assert_eq!(current_seq, v3.seq),
        other => panic!("delete_if with stale seq: expected Conflict, got {other:?}"),
    }
    assert!(products.get("A-1").await?.is_some());
    let gone = products.delete_if("A-1", v3.seq).await?;
    assert_eq!(products.get("A-1").await?, None);

    // The tombstone is the row's current seq now.
    match products.upsert_if("A-1", &product("A-1", 5), v3.seq).await {
        Err(Error::Conflict { current_seq }) => assert_eq!(current_seq, gone.seq),
        other => panic!("expected Conflict, got {other:?}"),
    }
    let err = products.delete_if("A-1", v3.seq).await.unwrap_err();
    assert!(
        !err.is_retryable(),
        "a conflict needs a re-read, not a blind retry"
    );
    Ok(())
}

/// 4. `insert_new` fails with `Conflict` on an existing (or deleted) row and succeeds on a new one.
#[tokio::test]
async fn insert_new_only_creates() -> Result<()> {
    let (_server, client) = setup().await?;
    let products = client.table::<Product>("products")?;
    let created = products.insert_new("A-1", &product("A-1", 1)).await?;
    assert_eq!(products.get("A-1").await?.map(|c| c.seq), Some(created.seq));

    match products.insert_new("A-1", &product("A-1", 2)).await {
        Err(Error::Conflict { current_seq }) => assert_eq!(current_seq, created.seq),
        other => panic!("insert_new on an existing row: expected Conflict, got {other:?}"),
    }
    assert_eq!(products.get("A-1").await?.map(|c| c.row.stock), Some(1));

    let other = products.insert_new("B-2", &product("B-2", 7)).await?;
    assert!(other.seq > created.seq);
    assert_eq!(products.get("B-2").await?.map(|c| c.row.stock), Some(7));

    // A tombstone still counts as written (documented on `insert_new`).
    let tombstone = products.delete("B-2").await?;
    match products.insert_new("B-2", &product("B-2", 8)).await {
        Err(Error::Conflict { current_seq }) => assert_eq!(current_seq, tombstone.seq),
        other => panic!("insert_new on a deleted row: expected Conflict, got {other:?}"),
    }
    Ok(())
}

/// 5. The same `Nats-Msg-Id` twice is stored once; the second publish says `duplicate`.
#[tokio::test]
async fn repeated_msg_id_is_stored_once() -> Result<()> {
    let (_server, client) = setup().await?;
    let products = client.table::<Product>("products")?;
    let options = WriteOptions {
        msg_id: Some("order-17-update".into()),
        ..WriteOptions::default()
    };
    let first = products
        .upsert_with("A-1", &product("A-1", 1), options.clone())
        .await?;
    let second = products
        .upsert_with("A-1", &product("A-1", 1), options.clone())
        .await?;
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(second.seq, first.seq);
    assert_eq!(stream_messages(&client).await?, 1);

    // The id identifies the event: a retried delete with the same id is deduplicated too.
    let delete = WriteOptions {
        msg_id: Some("order-17-delete".into()),
        ..WriteOptions::default()
    };
    let d1 = products.delete_with("A-1", delete.clone()).await?;
    let d2 = products.delete_with("A-1", delete).await?;
    assert_eq!((d1.duplicate, d2.duplicate, d2.seq), (false, true, d1.seq));
    // Generated ids differ: the same row written twice without an id is stored twice.
    products.upsert("B-2", &product("B-2", 1)).await?;
    products.upsert("B-2", &product("B-2", 1)).await?;
    // history = 1 keeps one event per row: A-1 (the tombstone) and B-2.
    assert_eq!(stream_messages(&client).await?, 2);
    let mut stream = client.jetstream().get_stream(STREAM).await?;
    assert_eq!(stream.info().await?.state.last_sequence, 4);
    Ok(())
}

/// 6. Keys of any shape (up to 512 bytes) map to one valid subject token and round-trip; empty
/// and oversized keys and bad table names are rejected before anything is published.
#[tokio::test]
async fn unusual_keys_round_trip() -> Result<()> {
    let (_server, client) = setup().await?;
    let rows = client.rows("things")?;
    let keys = [
        "plain-key_1".to_owned(),
        "a.b.c".to_owned(),
        "with space".to_owned(),
        "*".to_owned(),
        ">".to_owned(),
        "a.*.>".to_owned(),
        "ünïcødé ✓ 日本".to_owned(),
        "=YS5i".to_owned(),
        "\t\n\0".to_owned(),
        "k".repeat(128),
        "k".repeat(129),
        "x".repeat(512),
        "é".repeat(256),
    ];
    for key in &keys {
        let subject = rows.subject(key)?;
        let tokens: Vec<&str> = subject.split('.').collect();
        assert_eq!(tokens.len(), 3, "{key:?} -> {subject}");
        assert_eq!(&tokens[..2], &[PREFIX, "things"]);
        let token = tokens[2];
        assert!(
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
            "{key:?} -> token {token:?}"
        );
        assert_eq!(
            parse_subject(PREFIX, &subject)?,
            (TableName::new("things")?, key.clone())
        );

        let mut row = Row::new();
        row.insert("key".into(), Value::Text(key.clone()));
        let published = rows.upsert(key, &row).await?;
        let current = rows
            .get(key)
            .await?
            .with_context(|| format!("{key:?} written"))?;
        assert_eq!(current.seq, published.seq, "{key:?}");
        assert_eq!(current.row["key"], Value::Text(key.clone()));

        // The event really is on that subject.
        let stream = client.jetstream().get_stream(STREAM).await?;
        let raw = stream.direct_get_last_for_subject(subject.clone()).await?;
        assert_eq!(raw.sequence, published.seq);
        assert_eq!(raw.subject.as_str(), subject);
    }
    // Distinct keys, distinct rows.
    assert_eq!(stream_messages(&client).await?, keys.len() as u64);

    let row = Row::from([("key".to_owned(), Value::Null)]);
    let too_long = "x".repeat(513);
    for (key, expect_empty) in [("", true), (too_long.as_str(), false)] {
        for result in [
            rows.upsert(key, &row).await,
            rows.delete(key).await,
            rows.insert_new(key, &row).await,
        ] {
            match result {
                Err(Error::Subject(SubjectError::EmptyKey)) if expect_empty => {}
                Err(Error::Subject(SubjectError::KeyTooLong { len: 513, max: 512 }))
                    if !expect_empty => {}
                other => panic!(
                    "key of {} bytes: expected a Subject error, got {other:?}",
                    key.len()
                ),
            }
        }
        assert!(matches!(rows.get(key).await, Err(Error::Subject(_))));
    }
    // A row beyond the server's max_payload (1 MiB by default) is refused before sending, and
    // retrying it cannot help.
    let huge = Row::from([("blob".to_owned(), Value::Bytes(vec![7; 2 << 20]))]);
    match rows.upsert("huge", &huge).await {
        Err(err @ Error::TooLarge { .. }) => assert!(!err.is_retryable(), "{err}"),
        other => panic!("2 MiB row: expected TooLarge, got {other:?}"),
    }
    assert_eq!(stream_messages(&client).await?, keys.len() as u64);

    for bad in [
        "",
        "Products",
        "1abc",
        "a.b",
        "a b",
        "a*",
        "a>",
        "ä",
        &"a".repeat(64),
    ] {
        assert!(
            matches!(
                client.rows(bad),
                Err(Error::Subject(SubjectError::InvalidTable { .. }))
            ),
            "table name {bad:?}"
        );
        assert!(
            matches!(client.table::<Product>(bad), Err(Error::Subject(_))),
            "{bad:?}"
        );
    }
    Ok(())
}

/// 7. `provision()` creates, leaves alone, updates, and refuses streams it must not touch; a
/// publish without any stream is `StreamNotFound`.
#[tokio::test]
async fn provision_is_idempotent_and_detects_conflicts() -> Result<()> {
    let server = NatsServer::start()?;
    let nats = async_nats::connect(server.url()).await?;
    let js = async_nats::jetstream::new(nats.clone());

    // A stream name the server would refuse is a configuration error, not a retryable one.
    for bad in ["", "A.B", "A B", "A*", "A>", &"S".repeat(65)] {
        let config = StreamConfig {
            name: bad.to_owned(),
            ..stream_config()
        };
        match Client::from_nats(nats.clone(), config, "test-1") {
            Err(err @ Error::Config(_)) => {
                assert!(!err.is_retryable());
                assert!(err.to_string().contains("stream.name"), "{err}");
            }
            other => panic!("stream name {bad:?}: expected a Config error, got {other:?}"),
        }
    }

    // No stream at all: the server has no responder for the subject. (2.9 servers do not
    // answer a direct get for a missing stream; the client then asks the stream API, after the
    // timeout, which is short here to keep the test fast.)
    // With `stream.provision = false` a write does not create it.
    let unprovisioned = StreamConfig {
        provision: false,
        ..stream_config()
    };
    let client = Client::builder(nats.clone(), unprovisioned, "test-1")
        .timeout(Duration::from_secs(2))
        .build()?;
    let products = client.table::<Product>("products")?;
    match products.upsert("A-1", &product("A-1", 1)).await {
        Err(e @ Error::StreamNotFound { .. }) => {
            assert!(matches!(&e, Error::StreamNotFound { stream } if stream == STREAM));
            assert!(e.to_string().contains("stream.provision = true"), "{e}");
        }
        other => panic!("publish without a stream: expected StreamNotFound, got {other:?}"),
    }
    match products.get("A-1").await {
        Err(Error::StreamNotFound { stream }) => assert_eq!(stream, STREAM),
        other => panic!("get without a stream: expected StreamNotFound, got {other:?}"),
    }

    assert_eq!(client.provision().await?, Provisioned::Created);
    assert_eq!(client.provision().await?, Provisioned::Unchanged);
    let config = js.get_stream(STREAM).await?.info().await?.config.clone();
    assert_eq!(config.subjects, vec!["catalog.>".to_owned()]);
    assert_eq!(config.max_messages_per_subject, 1);
    assert!(config.allow_direct && config.deny_delete && config.deny_purge);
    assert_eq!(config.duplicate_window, Duration::from_secs(120));
    assert_eq!(
        config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    let published = products.upsert("A-1", &product("A-1", 1)).await?;

    let history3 = StreamConfig {
        history: 3,
        ..stream_config()
    };
    let client3 = Client::from_nats(nats.clone(), history3, "test-1")?;
    assert_eq!(client3.provision().await?, Provisioned::Updated);
    let config = js.get_stream(STREAM).await?.info().await?.config.clone();
    assert_eq!(config.max_messages_per_subject, 3);
    assert_eq!(client3.provision().await?, Provisioned::Unchanged);
    // Updating kept the data.
    assert_eq!(
        products.get("A-1").await?.map(|c| c.seq),
        Some(published.seq)
    );

    // A stream with jetsync's name but other subjects belongs to someone else.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "FOREIGN".into(),
        subjects: vec!["foreign.>".into()],
        ..Default::default()
    })
    .await?;
    let foreign = StreamConfig {
        name: "FOREIGN".into(),
        subject_prefix: "shop".into(),
        ..StreamConfig::default()
    };
    match Client::from_nats(nats.clone(), foreign, "test-1")?
        .provision()
        .await
    {
        Err(Error::StreamConflict { stream, reason }) => {
            assert_eq!(stream, "FOREIGN");
            assert!(reason.contains("foreign.>"), "{reason}");
        }
        other => panic!("same name, other subjects: expected StreamConflict, got {other:?}"),
    }
    let info = js.get_stream("FOREIGN").await?.info().await?.config.clone();
    assert_eq!(
        info.subjects,
        vec!["foreign.>".to_owned()],
        "left untouched"
    );

    // Another stream already captures the subjects (exactly, or a part of them).
    for (other_subjects, prefix) in [("orders.>", "orders"), ("billing.invoices.*", "billing")] {
        let name = format!("OWNER_{}", prefix.to_uppercase());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![other_subjects.into()],
            ..Default::default()
        })
        .await?;
        let overlapping = StreamConfig {
            name: "MINE".into(),
            subject_prefix: prefix.into(),
            ..StreamConfig::default()
        };
        match Client::from_nats(nats.clone(), overlapping, "test-1")?
            .provision()
            .await
        {
            Err(Error::StreamConflict { stream, reason }) => {
                assert_eq!(stream, "MINE");
                assert!(reason.contains(prefix), "{reason}");
            }
            other => panic!("subjects overlapping {name}: expected StreamConflict, got {other:?}"),
        }
    }
    Ok(())
}

/// 7a. Instances of a service start together and provision the same stream at once: every
/// one succeeds, whoever creates it first (a lost creation race looks the stream up again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_provisioning_all_succeed() -> Result<()> {
    let server = NatsServer::start()?;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await?);
    for round in 0..10 {
        let config = StreamConfig {
            name: format!("RACE{round}"),
            subject_prefix: format!("race{round}"),
            ..StreamConfig::default()
        };
        let mut tasks = Vec::new();
        for instance in 0..6 {
            // Own connections, so the creates really reach the server side by side.
            let nats = async_nats::connect(server.url()).await?;
            let client = Client::from_nats(nats, config.clone(), format!("test-{instance}"))?;
            tasks.push(tokio::spawn(async move { client.provision().await }));
        }
        let mut created = 0;
        for task in tasks {
            match task.await? {
                Ok(Provisioned::Created) => created += 1,
                Ok(_) => {}
                Err(e) => panic!("round {round}: concurrent provisioning failed: {e}"),
            }
        }
        assert!(created >= 1, "round {round}: nobody created the stream");
        let info = js
            .get_stream(&config.name)
            .await?
            .info()
            .await?
            .config
            .clone();
        assert_eq!(info.subjects, vec![format!("race{round}.>")]);
    }
    Ok(())
}

/// 7b. A stream made outside jetsync without direct gets: reading rows says why, and
/// provisioning turns them on (a managed field, updated in place).
#[tokio::test]
async fn provision_enables_direct_gets() -> Result<()> {
    let server = NatsServer::start()?;
    let nats = async_nats::connect(server.url()).await?;
    let js = async_nats::jetstream::new(nats.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["catalog.>".into()],
        max_messages_per_subject: 1,
        ..Default::default()
    })
    .await?;
    let client = Client::builder(nats, stream_config(), "test-1")
        .timeout(Duration::from_secs(2))
        .build()?;
    let products = client.table::<Product>("products")?;
    let published = products.upsert("A-1", &product("A-1", 1)).await?;
    match products.get("A-1").await {
        Err(Error::StreamConflict { stream, reason }) => {
            assert_eq!(stream, STREAM);
            assert!(reason.contains("allow_direct"), "{reason}");
        }
        other => panic!("get without direct gets: expected StreamConflict, got {other:?}"),
    }
    assert_eq!(client.provision().await?, Provisioned::Updated);
    let config = js.get_stream(STREAM).await?.info().await?.config.clone();
    assert!(config.allow_direct && config.deny_delete && config.deny_purge);
    assert_eq!(config.duplicate_window, Duration::from_secs(120));
    let current = products.get("A-1").await?;
    assert_eq!(current.map(|c| c.seq), Some(published.seq));
    assert_eq!(client.provision().await?, Provisioned::Unchanged);
    Ok(())
}

/// 8. A publish to a dead server fails within the timeout with a retryable error; after the
/// restart the same client reconnects by itself and the retried write lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_server_restart() -> Result<()> {
    let mut server = NatsServer::start()?;
    let timeout = Duration::from_secs(2);
    let nats = async_nats::connect(server.url()).await?;
    let client = Client::builder(nats, stream_config(), "test-1")
        .timeout(timeout)
        .build()?;
    client.provision().await?;
    let products = client.table::<Product>("products")?;
    products.upsert("before", &product("before", 1)).await?;

    tokio::task::block_in_place(|| server.kill());
    let started = Instant::now();
    let err = products
        .upsert("A-1", &product("A-1", 1))
        .await
        .expect_err("publish to a killed server");
    let elapsed = started.elapsed();
    assert!(err.is_retryable(), "{err:?}");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(
        elapsed < timeout + Duration::from_secs(3),
        "took {elapsed:?}"
    );
    let started = Instant::now();
    let err = products
        .get("A-1")
        .await
        .expect_err("get from a killed server");
    assert!(err.is_retryable(), "{err:?}");
    assert!(started.elapsed() < timeout + Duration::from_secs(3));

    tokio::task::block_in_place(|| server.restart())?;
    // Retry with one message id, as the Timeout error advises: however many attempts reach the
    // server, the row is stored once.
    let options = WriteOptions {
        msg_id: Some("restart-retry".into()),
        ..WriteOptions::default()
    };
    let deadline = Instant::now() + RECOVERY_DEADLINE;
    let mut attempts = 0;
    let published = loop {
        attempts += 1;
        match products
            .upsert_with("A-1", &product("A-1", 2), options.clone())
            .await
        {
            Ok(published) => break published,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no recovery after {attempts} attempts: {e:?}"),
        }
    };
    let current = products
        .get("A-1")
        .await?
        .context("row written after the restart")?;
    assert_eq!(current.seq, published.seq);
    assert_eq!(current.row, product("A-1", 2));
    Ok(())
}

/// 9. Pipelined bulk writes: one `Published` per row, in order, with strictly increasing seqs.
#[tokio::test]
async fn pipelined_bulk_upsert() -> Result<()> {
    let (_server, client) = setup().await?;
    let rows = client.rows("bulk")?;
    const N: usize = 5_000;
    let data: Vec<(String, Row)> = (0..N)
        .map(|i| {
            let row = Row::from([
                ("n".to_owned(), Value::I64(i as i64)),
                ("label".to_owned(), Value::Text(format!("row {i}"))),
            ]);
            (format!("key-{i}"), row)
        })
        .collect();
    let published = rows
        .upsert_many(data.iter().map(|(key, row)| (key.as_str(), row)))
        .await?;
    assert_eq!(published.len(), N);
    assert!(published.iter().all(|p| !p.duplicate));
    assert!(
        published.windows(2).all(|w| w[0].seq < w[1].seq),
        "sequences must strictly increase in submission order"
    );
    assert_eq!(stream_messages(&client).await?, N as u64);
    for i in [0, 1, N / 2, N - 1] {
        let (key, row) = &data[i];
        let current = rows
            .get(key)
            .await?
            .with_context(|| format!("{key} written"))?;
        assert_eq!(
            current,
            Current {
                seq: published[i].seq,
                row: row.clone()
            }
        );
    }

    // The pipeline keeps deletes in order with upserts of the same row.
    let mut pipeline = rows.pipeline_with_window(8);
    for (key, row) in &data[..20] {
        pipeline.delete(key).await?;
        pipeline.upsert(key, row).await?;
    }
    for (key, _) in &data[..10] {
        pipeline.delete(key).await?;
    }
    let outcomes = pipeline.finish().await?;
    assert_eq!(outcomes.len(), 50);
    assert!(outcomes.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(rows.get(&data[0].0).await?, None);
    assert_eq!(
        rows.get(&data[15].0).await?.map(|c| c.seq),
        Some(outcomes[31].seq)
    );
    Ok(())
}

/// 10. `Client::connect` with a configuration file's settings.
#[tokio::test]
async fn connect_from_config() -> Result<()> {
    let server = NatsServer::start()?;
    let toml = format!(
        r#"
        instance = "catalog-7"
        [nats]
        url = "{}"
        request_timeout_ms = 3000
        [stream]
        name = "SHOP"
        subject_prefix = "shop.v1"
        history = 2
        "#,
        server.url()
    );
    let config = Config::from_figment(
        figment::Figment::new()
            .merge(<figment::providers::Toml as figment::providers::Format>::string(&toml)),
    )?;
    let client = Client::connect(&config).await?;
    assert_eq!(client.origin(), "catalog-7");
    assert_eq!(client.stream_config().name, "SHOP");
    assert_eq!(client.provision().await?, Provisioned::Created);
    let info = client
        .jetstream()
        .get_stream("SHOP")
        .await?
        .info()
        .await?
        .config
        .clone();
    assert_eq!(info.subjects, vec!["shop.v1.>".to_owned()]);
    assert_eq!(info.max_messages_per_subject, 2);

    let products = client.table::<Product>("products")?;
    let published = products.upsert("A-1", &product("A-1", 1)).await?;
    let stream = client.jetstream().get_stream("SHOP").await?;
    let raw = stream
        .direct_get_last_for_subject("shop.v1.products.A-1")
        .await?;
    assert_eq!(raw.sequence, published.seq);
    let event = jetsync::codec::decode_message(
        raw.headers.get(FORMAT_HEADER).map(|v| v.as_str()),
        &raw.payload,
    )?;
    assert_eq!(event.origin, "catalog-7");
    assert_eq!(
        products.get("A-1").await?.map(|c| c.row),
        Some(product("A-1", 1))
    );
    Ok(())
}

/// A stored row the NATS client library cannot parse (bad header bytes, published on the raw
/// protocol): `get` returns the typed `Malformed` error naming its sequence, other rows still
/// read, and a valid write replaces it.
#[tokio::test]
async fn get_of_a_malformed_stored_message_is_a_typed_error() -> Result<()> {
    use std::io::{BufRead, BufReader, Write};

    let server = NatsServer::start()?;
    let nats = async_nats::connect(server.url()).await?;
    let client = Client::builder(nats, stream_config(), "test-1")
        .timeout(Duration::from_secs(2))
        .build()?;
    client.provision().await?;
    let products = client.table::<Product>("products")?;
    let good = products.upsert("B-2", &product("B-2", 2)).await?;

    // HPUB on a plain TCP connection: the header holds bytes that are not UTF-8.
    let port = server.port();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
        let mut reader = BufReader::new(tcp.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let headers: &[u8] = b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n";
        let mut out = b"CONNECT {\"verbose\":false,\"headers\":true,\"protocol\":1}\r\n".to_vec();
        out.extend_from_slice(
            format!(
                "HPUB catalog.products.A-1 {} {}\r\n",
                headers.len(),
                headers.len() + 2
            )
            .as_bytes(),
        );
        out.extend_from_slice(headers);
        out.extend_from_slice(b"{}\r\nPING\r\n");
        tcp.write_all(&out)?;
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            anyhow::ensure!(!line.is_empty() && !line.starts_with("-ERR"), "{line}");
            if line.starts_with("PONG") {
                return Ok(());
            }
        }
    })
    .await??;
    let bad_seq = good.seq + 1;
    // PONG says the server read the publish, not that the stream stored it (2.12 queues
    // JetStream ingest): wait until it did.
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await?);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = js
            .get_stream(STREAM)
            .await?
            .info()
            .await?
            .state
            .last_sequence;
        if last >= bad_seq {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the raw publish was not stored within 10 s (last seq {last})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    match products.get("A-1").await {
        Err(Error::Malformed { seq, reason }) => {
            assert_eq!(seq, bad_seq);
            assert!(reason.contains("not valid UTF-8"), "{reason}");
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
    // The client reconnected: other rows read, and a valid write replaces the bad one.
    assert_eq!(products.get("B-2").await?.map(|c| c.seq), Some(good.seq));
    let fixed = products.upsert("A-1", &product("A-1", 1)).await?;
    assert_eq!(products.get("A-1").await?.map(|c| c.seq), Some(fixed.seq));
    Ok(())
}

/// A first write to a sync group whose stream does not exist yet creates it when
/// `stream.provision = true` (the default), as `run` does, and is stored once.
#[tokio::test]
async fn a_first_write_provisions_the_stream() -> Result<()> {
    let server = NatsServer::start()?;
    let nats = async_nats::connect(server.url()).await?;
    let client = Client::builder(nats.clone(), stream_config(), "test-1")
        .timeout(Duration::from_secs(2))
        .build()?;
    let products = client.table::<Product>("products")?;
    let published = products.upsert("A-1", &product("A-1", 1)).await?;
    assert_eq!(published.seq, 1);
    let js = async_nats::jetstream::new(nats);
    let info = js.get_stream(STREAM).await?.info().await?.clone();
    assert_eq!(info.state.messages, 1);
    assert_eq!(client.provision().await?, Provisioned::Unchanged);
    Ok(())
}
