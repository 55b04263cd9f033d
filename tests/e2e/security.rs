//! Least-privilege operation (nats-config/accounts.conf): restricted appliers and a restricted
//! publisher work end to end; a publisher writing another service's subjects gets a typed
//! `PermissionDenied` at once, not a timeout; an applier cannot touch another instance's
//! consumer; a wrong password fails fast with a message naming the server and the method; and
//! no log or command output carries a secret.
//!
//! Every server here runs the users of `nats-config/accounts.conf` itself (its `accounts`
//! block through the testkit's `extra_config`, passwords defined as config variables).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use jetsync::{Error, NatsConfig, Row, Secret, Value};
use jetsync_e2e::{
    accounts_extra_config, assert_no_secrets, assert_sqlite_matches, heavy, nats_config_file,
    wait_until, Group, Instance, Reference, SinkKind,
};
use jetsync_testkit::NatsServer;

const ADMIN_PASSWORD: &str = "adm-Qx7!pw-3141";
const PUB_PASSWORD: &str = "pub-Zr2#pw-2718";
const APPLIER_1_PASSWORD: &str = "app1-Lm5%pw-1618";
const APPLIER_2_PASSWORD: &str = "app2-Vt8&pw-1414";
const WRONG_PASSWORD: &str = "wrong-Hk4*pw-0577";
const ALL_SECRETS: &[&str] = &[
    ADMIN_PASSWORD,
    PUB_PASSWORD,
    APPLIER_1_PASSWORD,
    APPLIER_2_PASSWORD,
    WRONG_PASSWORD,
];

/// Upper bound for a call that must fail at once with a typed error. The request timeouts in
/// these tests are 30 s, so returning within this proves the error did not come from a timeout.
const PROMPT: Duration = Duration::from_secs(10);

/// A server with the users of nats-config/accounts.conf.
fn secured_server() -> Result<NatsServer> {
    let extra = accounts_extra_config(&[
        ("JETSYNC_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ("CATALOG_PUB_PASSWORD", PUB_PASSWORD),
        ("CATALOG_1_PASSWORD", APPLIER_1_PASSWORD),
        ("CATALOG_2_PASSWORD", APPLIER_2_PASSWORD),
    ])?;
    Ok(NatsServer::builder().extra_config(extra).start()?)
}

fn nats_user(url: &str, user: &str, password: &str, inbox_prefix: Option<&str>) -> NatsConfig {
    NatsConfig {
        url: url.to_owned(),
        user: Some(user.to_owned()),
        password: Some(Secret::new(password)),
        inbox_prefix: inbox_prefix.map(str::to_owned),
        request_timeout_ms: 30_000,
        ..NatsConfig::default()
    }
}

/// The admin's JetStream context (default `_INBOX` prefix, as the nats CLI uses).
async fn admin(url: &str) -> Result<jetstream::Context> {
    let nats = jetsync::connect(&nats_user(url, "admin", ADMIN_PASSWORD, None), "admin").await?;
    Ok(jetstream::new(nats))
}

/// A jetsync client configuration for user `user` of sync group `stream`/`prefix`.
fn client_config(
    url: &str,
    stream: &str,
    prefix: &str,
    user: &str,
    password: &str,
    inbox_prefix: &str,
) -> jetsync::Config {
    let group = Group::new(url, stream, prefix);
    let mut config = group.config("catalog-svc-1", std::path::Path::new("."));
    config.nats = nats_user(url, user, password, Some(inbox_prefix));
    config.stream.provision = false;
    config
}

/// The durable consumer definition of nats-config/consumers/jetsync_catalog-1.json.
fn catalog_1_consumer() -> Result<pull::Config> {
    let path = nats_config_file("consumers/jetsync_catalog-1.json");
    let text = std::fs::read_to_string(&path)?;
    // The server's `mem_storage` is `memory_storage` in async-nats' own serde form.
    let mut value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if let Some(fields) = value.as_object_mut() {
        if let Some(v) = fields.remove("mem_storage") {
            fields.insert("memory_storage".into(), v);
        }
    }
    serde_json::from_value(value).with_context(|| format!("parsing {}", path.display()))
}

/// Makes `instance` log in as `user` with the given inbox prefix, without provisioning.
fn restrict(instance: &Instance, user: &str, inbox_prefix: &str) -> Result<()> {
    instance.set_option("nats", "user", &format!("{user:?}"))?;
    instance.set_option("nats", "inbox_prefix", &format!("{inbox_prefix:?}"))?;
    instance.set_option("nats", "request_timeout_ms", "30000")?;
    instance.set_stream_option("provision", "false")
}

fn row(key: &str, n: i64) -> Row {
    let mut row = Row::new();
    row.insert("id".into(), Value::Text(key.to_owned()));
    row.insert("n".into(), Value::I64(n));
    row
}

#[test]
fn restricted_users_work_end_to_end_and_cannot_overreach() -> Result<()> {
    // Two appliers and a server: serialised with the other heavy scenarios.
    let _heavy = heavy();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(restricted_users_scenario())
}

async fn restricted_users_scenario() -> Result<()> {
    let server = secured_server()?;
    let url = server.url();
    let root = tempfile::tempdir()?;
    let mut outputs: Vec<(String, String)> = Vec::new();

    // The admin provisions the sync groups and creates catalog-1's durable from the JSON file
    // the README tells operators to use.
    let admin_config = {
        let mut c = client_config(
            &url,
            "CATALOG",
            "catalog",
            "admin",
            ADMIN_PASSWORD,
            "_INBOX",
        );
        c.stream.provision = true;
        c
    };
    let admin_client = jetsync::Client::connect(&admin_config).await?;
    admin_client.provision().await?;
    // The fleet's report buckets (what `jetsync-applier provision` creates beside the stream).
    jetsync_applier::provision_fleet_buckets(admin_client.jetstream(), &admin_config)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut orders = admin_config.clone();
    orders.stream.name = "ORDERS".into();
    orders.stream.subject_prefix = "orders".into();
    jetsync::Client::connect(&orders).await?.provision().await?;
    let admin_js = admin(&url).await?;
    let catalog = admin_js.get_stream("CATALOG").await?;
    let created = catalog.create_consumer(catalog_1_consumer()?).await?;
    let created_at = created.cached_info().created;

    // The publisher writes its own service's rows and reads them back.
    let publisher = jetsync::Client::connect(&client_config(
        &url,
        "CATALOG",
        "catalog",
        "catalog-pub",
        PUB_PASSWORD,
        "_INBOX_catalog_pub",
    ))
    .await?;
    let items = publisher.rows("items")?;
    let mut reference = Reference::default();
    for i in 0..40 {
        let key = format!("k{}", i % 12);
        let r = row(&key, i);
        let p = items.upsert(&key, &r).await?;
        reference.record(p.seq, "items", &key, Some(r));
    }
    let p = items.delete("k5").await?;
    reference.record(p.seq, "items", "k5", None);
    let current = items.get("k3").await?.context("k3 was written")?;
    assert_eq!(reference.rows("items").get("k3"), Some(&current.row));
    assert!(items.get("k5").await?.is_none());

    // Two restricted appliers: catalog-1 reuses the admin's durable, catalog-2 creates its own.
    // catalog-1 keeps its password in the config file, catalog-2 gets it from the environment.
    let group = Group::new(url.clone(), "CATALOG", "catalog");
    let mut one = Instance::new(&group, root.path(), "catalog-1", SinkKind::Sqlite)?;
    restrict(&one, "catalog-1", "_INBOX_catalog-1")?;
    one.set_option("nats", "password", &format!("{APPLIER_1_PASSWORD:?}"))?;
    // catalog-1 replays from the admin's durable (reusing it needs applied = 0 = its position);
    // catalog-2 joins from a snapshot, through its own `jetsync-snapshot_<instance>` consumer.
    one.set_option("apply", "bootstrap", "false")?;
    let mut two = Instance::new(&group, root.path(), "catalog-2", SinkKind::Sqlite)?;
    restrict(&two, "catalog-2", "_INBOX_catalog-2")?;
    let two_env = [("JETSYNC_NATS__PASSWORD", APPLIER_2_PASSWORD)];
    one.start()?;
    two.start_with_env(&two_env)?;
    one.wait_applied("CATALOG", reference.max_seq(), Duration::from_secs(60))?;
    two.wait_applied("CATALOG", reference.max_seq(), Duration::from_secs(60))?;
    assert_sqlite_matches(&one, &reference, "items", "id")?;
    assert_sqlite_matches(&two, &reference, "items", "id")?;
    let info = catalog.consumer_info("jetsync_catalog-1").await?;
    assert_eq!(
        info.created,
        created_at,
        "catalog-1 recreated the admin's consumer instead of reusing it:\n{}",
        one.log()
    );
    assert!(catalog.consumer_info("jetsync_catalog-2").await.is_ok());
    // catalog-2 joined from a snapshot under its restricted user (the log line follows the
    // checkpoint, so wait for it).
    let joined = jetsync_e2e::wait_until(
        "catalog-2's bootstrap log line",
        Duration::from_secs(10),
        || two.log().contains("bootstrap complete").then_some(()),
    );
    assert!(
        joined.is_ok(),
        "no bootstrap in catalog-2's log:\n{}",
        two.log()
    );

    // `status` works under the restricted user, beside the running applier.
    let (code, out, err) = one.cli(&["status", "--json"])?;
    outputs.push(("catalog-1 status --json stdout".into(), out.clone()));
    outputs.push(("catalog-1 status --json stderr".into(), err.clone()));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("CATALOG"), "{out}");
    let status = two.command(&["status"]).envs(two_env).output()?;
    assert!(status.status.success(), "{status:?}");
    outputs.push((
        "catalog-2 status stdout".into(),
        String::from_utf8_lossy(&status.stdout).into_owned(),
    ));

    // Fleet under least privilege: the appliers registered the NATS service and write their
    // reports; the admin discovers them (`$SRV.PING.jetsync`) and runs `fleet`.
    let admin_nats =
        async_nats::ConnectOptions::with_user_and_password("admin".into(), ADMIN_PASSWORD.into())
            .connect(url.as_str())
            .await?;
    let inbox = admin_nats.new_inbox();
    let mut pongs = admin_nats.subscribe(inbox.clone()).await?;
    admin_nats
        .publish_with_reply("$SRV.PING.jetsync", inbox, "".into())
        .await?;
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < 2 {
        match tokio::time::timeout(PROMPT, pongs.next()).await {
            Ok(Some(m)) => {
                let pong: serde_json::Value = serde_json::from_slice(&m.payload)?;
                answered.insert(
                    pong["metadata"]["instance"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                );
            }
            _ => bail!("only {answered:?} answered $SRV.PING.jetsync"),
        }
    }
    let admin_env = [
        ("JETSYNC_NATS__USER", "admin"),
        ("JETSYNC_NATS__PASSWORD", ADMIN_PASSWORD),
        ("JETSYNC_NATS__INBOX_PREFIX", "_INBOX"),
    ];
    let fleet = jetsync_e2e::wait_until(
        "both reports in the fleet bucket",
        Duration::from_secs(30),
        || {
            let out = one
                .command(&["fleet", "--json"])
                .envs(admin_env)
                .output()
                .ok()?;
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let rows = report["instances"].as_array()?;
            (out.status.success() && rows.len() == 2 && rows.iter().all(|r| r["state"] == "live"))
                .then_some(report)
        },
    )?;
    outputs.push(("admin fleet --json".into(), fleet.to_string()));
    for instance in [&one, &two] {
        let log = instance.log();
        assert!(
            !log.contains("fleet:"),
            "{}: the fleet member was refused something:\n{log}",
            instance.name
        );
    }

    // The applier manages its own durable: after a reset behind the consumer's ack floor it
    // deletes the durable and creates it again at the applied sequence + 1.
    assert_eq!(one.stop(Duration::from_secs(20))?, 0, "{}", one.log());
    let (code, out, err) = one.cli(&["reset", "--to-seq", "10", "--json"])?;
    outputs.push(("catalog-1 reset --json stdout".into(), out));
    outputs.push(("catalog-1 reset --json stderr".into(), err.clone()));
    assert_eq!(code, 0, "{err}");
    for i in 0..10 {
        let key = format!("late{i}");
        let r = row(&key, i);
        let p = items.upsert(&key, &r).await?;
        reference.record(p.seq, "items", &key, Some(r));
    }
    one.start()?;
    one.wait_applied("CATALOG", reference.max_seq(), Duration::from_secs(60))?;
    two.wait_applied("CATALOG", reference.max_seq(), Duration::from_secs(60))?;
    assert_sqlite_matches(&one, &reference, "items", "id")?;
    assert_sqlite_matches(&two, &reference, "items", "id")?;
    let info = catalog.consumer_info("jetsync_catalog-1").await?;
    assert_ne!(
        info.created,
        created_at,
        "the durable was not recreated:\n{}",
        one.log()
    );

    // Writing another service's subjects is refused with a typed error, at once.
    let intruder = jetsync::Client::connect(&client_config(
        &url,
        "ORDERS",
        "orders",
        "catalog-pub",
        PUB_PASSWORD,
        "_INBOX_catalog_pub",
    ))
    .await?;
    let their_items = intruder.rows("items")?;
    let started = Instant::now();
    let err = their_items
        .upsert("k1", &row("k1", 1))
        .await
        .expect_err("publishing to orders.> must be denied");
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    match &err {
        Error::PermissionDenied { operation, subject } => {
            assert_eq!(*operation, "publish");
            assert_eq!(subject, "orders.items.k1");
        }
        other => bail!("expected PermissionDenied, got {other:?}"),
    }
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(
        message.contains("orders.items.k1") && message.contains("permission"),
        "{message}"
    );
    outputs.push(("publish error".into(), format!("{err} {err:?}")));
    // Pipelined writes fail the same way.
    let started = Instant::now();
    let mut pipeline = their_items.pipeline();
    for i in 0..5 {
        pipeline.upsert(&format!("p{i}"), &row("p", i)).await?;
    }
    let err = pipeline.finish().await.expect_err("denied");
    assert!(
        matches!(
            err,
            Error::PermissionDenied {
                operation: "publish",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    // Reading their rows too.
    let started = Instant::now();
    let err = their_items
        .get("k1")
        .await
        .expect_err("direct get on ORDERS must be denied");
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    match &err {
        Error::PermissionDenied { operation, subject } => {
            assert_eq!(*operation, "get");
            assert!(
                subject.starts_with("$JS.API.DIRECT.GET.ORDERS."),
                "{subject}"
            );
        }
        other => bail!("expected PermissionDenied, got {other:?}"),
    }
    // The publisher's own writes still work afterwards on the same connection.
    let p = items.upsert("after", &row("after", 1)).await?;
    reference.record(p.seq, "items", "after", Some(row("after", 1)));

    // A connection made outside jetsync (`Client::from_nats`) cannot see the server's report:
    // the denied publish ends in the documented timeout.
    let raw = async_nats::ConnectOptions::with_user_and_password(
        "catalog-pub".into(),
        PUB_PASSWORD.into(),
    )
    .custom_inbox_prefix("_INBOX_catalog_pub")
    .connect(url.as_str())
    .await?;
    let foreign = jetsync::Client::builder(raw, intruder.stream_config().clone(), "raw")
        .timeout(Duration::from_secs(1))
        .build()?;
    let err = foreign
        .rows("items")?
        .upsert("k1", &row("k1", 1))
        .await
        .expect_err("denied");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");

    one.wait_applied("CATALOG", reference.max_seq(), Duration::from_secs(60))?;
    assert_eq!(one.stop(Duration::from_secs(20))?, 0, "{}", one.log());
    assert_eq!(two.stop(Duration::from_secs(20))?, 0, "{}", two.log());
    assert_sqlite_matches(&one, &reference, "items", "id")?;
    outputs.extend(one.run_logs());
    outputs.extend(two.run_logs());
    // The permission sets are sufficient: the appliers never hit a refusal (jetsync logs each
    // one the server reports as "NATS denied the operation").
    for (name, log) in one.run_logs().iter().chain(&two.run_logs()) {
        assert!(!log.contains("NATS denied"), "{name}:\n{log}");
    }
    assert_no_secrets(&outputs, ALL_SECRETS)?;
    Ok(())
}

/// Subscribes through a connection whose server errors are collected, for checks that have no
/// reply to wait for.
async fn watched(
    url: &str,
    user: &str,
    password: &str,
    inbox_prefix: &str,
) -> Result<(
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(inbox_prefix)
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(url)
        .await?;
    Ok((client, rx))
}

async fn expect_server_error(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    wanted: &str,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) if e.contains(wanted) => return Ok(()),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => bail!("no server error containing {wanted:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applier_cannot_touch_another_instances_consumer() -> Result<()> {
    let server = secured_server()?;
    let url = server.url();
    let admin_config = {
        let mut c = client_config(
            &url,
            "CATALOG",
            "catalog",
            "admin",
            ADMIN_PASSWORD,
            "_INBOX",
        );
        c.stream.provision = true;
        c
    };
    jetsync::Client::connect(&admin_config)
        .await?
        .provision()
        .await?;
    let admin_js = admin(&url).await?;
    let catalog = admin_js.get_stream("CATALOG").await?;
    let created_at = catalog
        .create_consumer(catalog_1_consumer()?)
        .await?
        .cached_info()
        .created;

    // catalog-2's applier user, through jetsync's connect (which records violations).
    let nats = jetsync::connect(
        &nats_user(
            &url,
            "catalog-2",
            APPLIER_2_PASSWORD,
            Some("_INBOX_catalog-2"),
        ),
        "catalog-2",
    )
    .await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(nats.clone());
    // Its own durable and the stream are fine...
    let stream = js.get_stream("CATALOG").await?;
    let mut own = catalog_1_consumer()?;
    own.name = Some("jetsync_catalog-2".into());
    own.durable_name = own.name.clone();
    stream.create_consumer(own).await?;
    stream.consumer_info("jetsync_catalog-2").await?;

    // ...catalog-1's is not: no info, no delete, no (re)create, no pulls.
    let denied = |subject: &str| {
        jetsync::permission_error(&nats, "consumer", subject)
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(stream.consumer_info("jetsync_catalog-1").await.is_err());
    let subject = "$JS.API.CONSUMER.INFO.CATALOG.jetsync_catalog-1";
    wait_until("the info request's violation", PROMPT, || {
        Some(()).filter(|_| denied(subject).contains(subject))
    })?;
    assert!(stream.delete_consumer("jetsync_catalog-1").await.is_err());
    let subject = "$JS.API.CONSUMER.DELETE.CATALOG.jetsync_catalog-1";
    assert!(
        denied(subject).contains("permission denied"),
        "{}",
        denied(subject)
    );
    assert!(stream.create_consumer(catalog_1_consumer()?).await.is_err());
    let subject = "$JS.API.CONSUMER.CREATE.CATALOG.jetsync_catalog-1.catalog.>";
    assert!(
        denied(subject).contains("permission denied"),
        "{}",
        denied(subject)
    );
    let mut other = catalog_1_consumer()?;
    other.name = Some("spy".into());
    other.durable_name = other.name.clone();
    assert!(stream.create_consumer(other).await.is_err());
    assert!(!denied("$JS.API.CONSUMER.CREATE.CATALOG.spy.catalog.>").is_empty());
    let ephemeral = pull::Config {
        filter_subject: "catalog.>".into(),
        ..Default::default()
    };
    assert!(stream.create_consumer(ephemeral).await.is_err());

    // Raw attempts whose refusals come back only as server errors.
    let (raw, mut errors) =
        watched(&url, "catalog-2", APPLIER_2_PASSWORD, "_INBOX_catalog-2").await?;
    raw.publish(
        "$JS.API.CONSUMER.MSG.NEXT.CATALOG.jetsync_catalog-1",
        "1".into(),
    )
    .await?;
    expect_server_error(
        &mut errors,
        "Publish to \"$JS.API.CONSUMER.MSG.NEXT.CATALOG.jetsync_catalog-1\"",
    )
    .await?;
    raw.publish("$JS.ACK.CATALOG.jetsync_catalog-1.1.1.1.0.0", "+ACK".into())
        .await?;
    expect_server_error(
        &mut errors,
        "Publish to \"$JS.ACK.CATALOG.jetsync_catalog-1.",
    )
    .await?;
    let _spy = raw.subscribe("_INBOX_catalog-1.>").await?;
    expect_server_error(&mut errors, "Subscription to \"_INBOX_catalog-1.>\"").await?;
    raw.publish("catalog.items.k1", "{}".into()).await?;
    expect_server_error(&mut errors, "Publish to \"catalog.items.k1\"").await?;

    // catalog-1's durable is untouched.
    let info = catalog.consumer_info("jetsync_catalog-1").await?;
    assert_eq!(info.created, created_at);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_without_its_inbox_prefix_gets_a_typed_error() -> Result<()> {
    let server = secured_server()?;
    let url = server.url();
    let mut admin_config = client_config(
        &url,
        "CATALOG",
        "catalog",
        "admin",
        ADMIN_PASSWORD,
        "_INBOX",
    );
    admin_config.stream.provision = true;
    jetsync::Client::connect(&admin_config)
        .await?
        .provision()
        .await?;

    // nats.inbox_prefix forgotten: replies would come to `_INBOX.…`, which the publisher may
    // not subscribe to, so no acknowledgement can ever arrive.
    let mut config = client_config(
        &url,
        "CATALOG",
        "catalog",
        "catalog-pub",
        PUB_PASSWORD,
        "_INBOX_catalog_pub",
    );
    config.nats.inbox_prefix = None;
    let publisher = jetsync::Client::connect(&config).await?;
    let items = publisher.rows("items")?;
    for attempt in 0..2 {
        let started = Instant::now();
        let err = items
            .upsert("k1", &row("k1", attempt))
            .await
            .expect_err("no ack can arrive");
        assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
        match &err {
            Error::PermissionDenied { operation, subject } => {
                assert_eq!(*operation, "subscribe to replies");
                assert!(subject.starts_with("_INBOX."), "{subject}");
            }
            other => bail!("attempt {attempt}: expected PermissionDenied, got {other:?}"),
        }
    }

    // An admin config copied from an applier's, with the applier's inbox prefix the admin may
    // not subscribe to: provisioning names the permission instead of timing out.
    let mut copied = admin_config.clone();
    copied.nats.inbox_prefix = Some("_INBOX_catalog-1".into());
    match jetsync::Client::connect(&copied).await?.provision().await {
        Err(Error::PermissionDenied { operation, subject }) => {
            assert_eq!(operation, "subscribe to replies");
            assert!(subject.starts_with("_INBOX_catalog-1"), "{subject}");
        }
        other => bail!("provision with a denied inbox: expected PermissionDenied, got {other:?}"),
    }
    Ok(())
}

#[test]
fn wrong_password_fails_fast_naming_server_and_method() -> Result<()> {
    let server = secured_server()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(server.url(), "CATALOG", "catalog");
    let mut outputs = Vec::new();

    let mut instance = Instance::new(&group, root.path(), "catalog-1", SinkKind::Sqlite)?;
    restrict(&instance, "catalog-1", "_INBOX_catalog-1")?;
    instance.set_option("nats", "password", &format!("{WRONG_PASSWORD:?}"))?;
    // Build the binary first: only the run itself is timed.
    jetsync_e2e::applier_bin();
    let started = Instant::now();
    instance.start()?;
    let code = instance.wait_exit(Duration::from_secs(30))?;
    let took = started.elapsed();
    let log = instance.log();
    assert_eq!(code, 1, "{log}");
    assert!(took < PROMPT, "exiting took {took:?}:\n{log}");
    let wanted = format!(
        "authentication failed at {} using user/password: check nats.user/nats.password",
        server.url()
    );
    assert!(log.contains(&wanted), "{log}");
    // One attempt, no retry storm.
    assert!(!log.contains("retrying"), "{log}");

    // The operator commands say the same, in text and JSON (`status` reports the NATS half of
    // the status as unavailable, with the reason).
    let (code, out, err) = instance.cli(&["status"])?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(format!("{out}{err}").contains(&wanted), "{out}{err}");
    outputs.push(("status stdout".to_owned(), out));
    outputs.push(("status stderr".to_owned(), err));
    let (code, out, err) = instance.cli(&["status", "--json"])?;
    assert_eq!(code, 1, "{out}{err}");
    let body: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("stdout is not JSON: {out}"))?;
    assert!(
        body["groups"][0]["nats_error"]
            .as_str()
            .unwrap_or_default()
            .contains(&wanted),
        "{body}"
    );
    let failure: serde_json::Value =
        serde_json::from_str(err.lines().last().unwrap_or_default())
            .with_context(|| format!("the last line of stderr is not JSON: {err}"))?;
    assert_eq!(failure["exit_code"], 1, "{failure}");
    outputs.push(("status --json stdout".to_owned(), out));
    outputs.push(("status --json stderr".to_owned(), err));

    // A real user's password given to another user fails the same way.
    instance.set_option("nats", "password", &format!("{APPLIER_2_PASSWORD:?}"))?;
    let (code, out, err) = instance.cli(&["status", "--json"])?;
    assert_eq!(code, 1, "{out}{err}");
    outputs.push(("status (other's password) stdout".to_owned(), out));
    outputs.push(("status (other's password) stderr".to_owned(), err));

    outputs.extend(instance.run_logs());
    assert_no_secrets(&outputs, ALL_SECRETS)?;
    Ok(())
}

/// What a consumer-create request by restricted applier `catalog-1` answered, raw.
async fn create_as_applier(
    applier: &async_nats::Client,
    subject: &str,
    config: serde_json::Value,
) -> Result<serde_json::Value> {
    let body = serde_json::json!({ "stream_name": "CATALOG", "config": config });
    let reply = tokio::time::timeout(
        PROMPT,
        applier.request(subject.to_owned(), body.to_string().into()),
    )
    .await
    .context("consumer create timed out")??;
    Ok(serde_json::from_slice(&reply.payload)?)
}

const ORDERS_PASSWORD: &str = "ord-Wp3$pw-1732";

/// A server with the users of nats-config/accounts.conf plus another service's account,
/// `ORDERS`, whose user `orders-svc` may subscribe to anything in it.
fn secured_server_with_orders() -> Result<NatsServer> {
    let extra = accounts_extra_config(&[
        ("JETSYNC_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ("CATALOG_PUB_PASSWORD", PUB_PASSWORD),
        ("CATALOG_1_PASSWORD", APPLIER_1_PASSWORD),
        ("CATALOG_2_PASSWORD", APPLIER_2_PASSWORD),
    ])?;
    // Add the ORDERS account to the `accounts` block (its last closing brace).
    let end = extra
        .rfind('}')
        .context("no accounts block in accounts.conf")?;
    let orders = format!(
        "  ORDERS: {{\n    users: [ {{ user: orders-svc, password: {ORDERS_PASSWORD:?} }} ]\n  }}\n"
    );
    let extra = format!("{}{orders}{}", &extra[..end], &extra[end..]);
    Ok(NatsServer::builder().extra_config(extra).start()?)
}

/// The push-consumer attack (#11.8): a restricted applier may create its durable, and a
/// consumer config with a `deliver_subject` makes the server push the stream's events to that
/// subject, which the server does not check against the creator's publish permissions. On
/// 2.9.10 and 2.12.8 the server accepts such a config on every create subject the applier is
/// allowed (so no permission layout on the API subjects can stop it); what stops it is the
/// account boundary of `accounts.conf`: one account per service, so the deliveries stay in the
/// sync group's own account and never reach another service's subscribers. A deliver subject
/// inside the stream's own subjects is refused by the server (a cycle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_consumer_cannot_deliver_into_another_services_subjects() -> Result<()> {
    let server = secured_server_with_orders()?;
    let url = server.url();
    let mut admin_config = client_config(
        &url,
        "CATALOG",
        "catalog",
        "admin",
        ADMIN_PASSWORD,
        "_INBOX",
    );
    admin_config.stream.provision = true;
    jetsync::Client::connect(&admin_config)
        .await?
        .provision()
        .await?;
    let publisher = jetsync::Client::connect(&client_config(
        &url,
        "CATALOG",
        "catalog",
        "catalog-pub",
        PUB_PASSWORD,
        "_INBOX_catalog_pub",
    ))
    .await?;
    publisher.rows("items")?.upsert("a", &row("a", 1)).await?;

    // The other service listens on a fixed subject of its own.
    let orders = async_nats::ConnectOptions::with_user_and_password(
        "orders-svc".into(),
        ORDERS_PASSWORD.into(),
    )
    .connect(url.as_str())
    .await?;
    let mut victim = orders.subscribe("orders.created").await?;
    orders.flush().await?;

    let applier = jetsync::connect(
        &nats_user(
            &url,
            "catalog-1",
            APPLIER_1_PASSWORD,
            Some("_INBOX_catalog-1"),
        ),
        "catalog-1",
    )
    .await?;
    let delete = || async {
        applier
            .request(
                "$JS.API.CONSUMER.DELETE.CATALOG.jetsync_catalog-1".to_owned(),
                "".into(),
            )
            .await
    };
    let push = |deliver: &str, subject: &str| {
        let mut config = serde_json::json!({
            "durable_name": "jetsync_catalog-1",
            "deliver_subject": deliver,
            "deliver_policy": "all",
            "ack_policy": "none",
        });
        if subject.ends_with(".catalog.>") {
            config["filter_subject"] = "catalog.>".into();
        }
        config
    };
    for subject in [
        "$JS.API.CONSUMER.CREATE.CATALOG.jetsync_catalog-1",
        "$JS.API.CONSUMER.CREATE.CATALOG.jetsync_catalog-1.catalog.>",
        "$JS.API.CONSUMER.DURABLE.CREATE.CATALOG.jetsync_catalog-1",
    ] {
        // The server takes the push config from the restricted user...
        let answer = create_as_applier(&applier, subject, push("orders.created", subject)).await?;
        assert!(
            answer.get("error").is_none(),
            "{subject}: the server refused the push consumer (the layout may be simplified): {answer}"
        );
        assert_eq!(
            answer["config"]["deliver_subject"], "orders.created",
            "{answer}"
        );
        // ... but nothing reaches the other service's subscriber.
        let leaked = tokio::time::timeout(Duration::from_secs(2), victim.next()).await;
        assert!(
            leaked.is_err(),
            "{subject}: an event reached the ORDERS account: {:?}",
            leaked.ok().flatten().map(|m| m.subject)
        );
        delete().await?;
    }

    // Control: inside the catalog account a push consumer does deliver where someone listens
    // (here the applier's own inbox, which it may read anyway), so the silence above is the
    // account boundary, not a consumer that never delivers.
    let mut own = applier.subscribe("_INBOX_catalog-1.push").await?;
    applier.flush().await?;
    let subject = "$JS.API.CONSUMER.CREATE.CATALOG.jetsync_catalog-1";
    let answer =
        create_as_applier(&applier, subject, push("_INBOX_catalog-1.push", subject)).await?;
    assert!(answer.get("error").is_none(), "{answer}");
    let delivered = tokio::time::timeout(PROMPT, own.next())
        .await
        .context("the control push consumer delivered nothing")?
        .context("subscription closed")?;
    // A push delivery keeps the event's own subject.
    assert_eq!(delivered.subject.as_str(), "catalog.items.a");
    delete().await?;

    // Into the stream's own subjects (which would write events): refused as a cycle.
    let answer =
        create_as_applier(&applier, subject, push("catalog.items.forged", subject)).await?;
    assert_eq!(answer["error"]["err_code"], 10081, "{answer}");
    let last = admin(&url)
        .await?
        .get_stream("CATALOG")
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    assert_eq!(last, 1, "the CATALOG stream holds only the published event");
    Ok(())
}
