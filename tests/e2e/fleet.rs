//! Operating a fleet (issue #15): `jetsync-applier fleet` sees every instance of a sync group
//! from one place, the NATS service protocol lists them to any NATS client, `fleet --digest`
//! names a diverged instance and table, and the margin to a gap is reported (and warned about)
//! before a stopped instance behind a `max_msgs` stream loses events.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use jetsync::{Row, Value};
use jetsync_e2e::{heavy, wait_until, Group, Instance, SinkKind};
use jetsync_testkit::{Cluster, NatsServer};

use crate::crash::{runtime, stream_last_seq, CATCH_UP, STOP};

/// Bound for the fleet's answers to show what the test expects.
const SETTLE: Duration = Duration::from_secs(30);

fn row(key: &str, n: i64) -> Row {
    [
        ("id".to_owned(), Value::Text(key.to_owned())),
        ("n".to_owned(), Value::I64(n)),
    ]
    .into_iter()
    .collect()
}

/// Publishes `count` upserts of distinct new keys `<prefix><i>` (no compaction: every event
/// stays in the stream); returns the last sequence.
async fn publish(client: &jetsync::Client, prefix: &str, count: usize) -> Result<u64> {
    let items = client.rows("items")?;
    let mut last = 0;
    for i in 0..count {
        let key = format!("{prefix}{i}");
        last = items.upsert(&key, &row(&key, i as i64)).await?.seq;
    }
    Ok(last)
}

/// `text` without ANSI colour sequences (the log's field names and values are coloured).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `fleet` (with `args`) as JSON from `instance`'s configuration: (exit code, report).
fn fleet(instance: &Instance, args: &[&str]) -> Result<(i32, serde_json::Value)> {
    let mut all = vec!["fleet", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = instance.cli(&all)?;
    let report = serde_json::from_str(&out)
        .with_context(|| format!("fleet {args:?} exited {code}: {out}\n{err}"))?;
    Ok((code, report))
}

/// The row of `instance` in a fleet report.
fn row_of<'a>(report: &'a serde_json::Value, instance: &str) -> Option<&'a serde_json::Value> {
    report["instances"]
        .as_array()?
        .iter()
        .find(|r| r["instance"] == instance)
}

/// Instances answering a `$SRV.PING.jetsync` sent by a plain NATS client (no jetsync code),
/// by the `instance` metadata of their answers.
async fn ping(urls: Vec<String>, expect: usize) -> Result<BTreeSet<String>> {
    let nats = async_nats::connect(urls).await?;
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await?;
    nats.publish_with_reply("$SRV.PING.jetsync", inbox, "".into())
        .await?;
    let mut seen = BTreeSet::new();
    while seen.len() < expect {
        match tokio::time::timeout(Duration::from_secs(5), replies.next()).await {
            Ok(Some(m)) => {
                let pong: serde_json::Value = serde_json::from_slice(&m.payload)?;
                ensure!(pong["name"] == "jetsync", "{pong}");
                ensure!(pong["type"] == "io.nats.micro.v1.ping_response", "{pong}");
                seen.insert(
                    pong["metadata"]["instance"]
                        .as_str()
                        .context("no instance metadata")?
                        .to_owned(),
                );
            }
            _ => break,
        }
    }
    Ok(seen)
}

#[test]
fn fleet_sees_five_instances_on_a_cluster() -> Result<()> {
    let _heavy = heavy();
    jetsync_e2e::applier_bin();
    let rt = runtime()?;
    let cluster = Cluster::start(3)?;
    let root = tempfile::tempdir()?;
    let mut group = Group::new(cluster.url_list(), "FLEET", "fleet");
    group.extra_toml = "[fleet]\nreport_interval_ms = 300\ndigest_interval_ms = 0\n".into();
    let mut instances = (1..=5)
        .map(|i| Instance::new(&group, root.path(), &format!("f{i}"), SinkKind::Sqlite))
        .collect::<Result<Vec<_>>>()?;
    for instance in &instances {
        instance.set_stream_option("replicas", "3")?;
    }
    let (code, _, err) = instances[0].cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    ensure!(!err.contains("warning"), "provision: {err}");
    for instance in &mut instances {
        instance.start()?;
    }
    let client = rt.block_on(jetsync_e2e::cluster_client(
        &cluster,
        jetsync::StreamConfig {
            replicas: 3,
            ..group.stream_config()
        },
        "fleet-pub",
    ))?;
    let first = rt.block_on(publish(&client, "a", 40))?;
    for instance in &mut instances {
        instance.wait_applied("FLEET", first, CATCH_UP)?;
    }

    // Discovery from a plain NATS client: every instance answers.
    let answered = rt.block_on(ping(cluster.urls(), 5))?;
    if answered.len() != 5 {
        // Say whether the silent ones answer a second request (a late registration) or never
        // (a lost subscription), with their logs.
        let again = rt.block_on(ping(cluster.urls(), 5)).unwrap_or_default();
        let logs: String = instances
            .iter()
            .filter(|i| !answered.contains(&i.name))
            .map(|i| format!("\n{}'s log:\n{}", i.name, strip_ansi(&i.log())))
            .collect();
        bail!(
            "$SRV.PING.jetsync answered by {answered:?} only (a second request: {again:?}){logs}"
        );
    }

    // One instance stops; the others go on. `fleet` shows it missing, from its last report,
    // with the lag it has now.
    ensure!(instances[4].stop(STOP)? == 0, "{}", instances[4].log());
    let last = rt.block_on(publish(&client, "b", 25))?;
    for instance in &mut instances[..4] {
        instance.wait_applied("FLEET", last, CATCH_UP)?;
    }
    let report = wait_until("fleet to show f5 missing", SETTLE, || {
        let (code, report) = fleet(&instances[0], &[]).ok()?;
        let rows = report["instances"].as_array()?;
        let live_caught_up = rows
            .iter()
            .filter(|r| r["state"] == "live")
            .all(|r| r["lag"] == 0 && r["applied_seq"] == last);
        (code == 0 && rows.len() == 5 && live_caught_up).then_some(report)
    })?;
    let f5 = row_of(&report, "f5").context("f5 not listed")?;
    ensure!(f5["state"] == "missing", "{f5}");
    ensure!(
        f5["applied_seq"] == first,
        "{f5}\nf5's log:\n{}",
        strip_ansi(&instances[4].log())
    );
    ensure!(f5["lag"] == last - first, "f5's lag: {f5}");
    ensure!(f5["last_seen_seconds_ago"].is_u64(), "{f5}");
    ensure!(f5["version"] == env!("CARGO_PKG_VERSION"), "{f5}");
    for name in ["f1", "f2", "f3", "f4"] {
        let r = row_of(&report, name).with_context(|| format!("{name} not listed"))?;
        ensure!(r["state"] == "live" && r["parked"] == 0, "{r}");
        ensure!(r["sink"] == "sqlite", "{r}");
    }
    let (_, text, _) = instances[1].cli(&["fleet"])?;
    ensure!(
        text.contains("missing, last seen") && text.contains("INSTANCE"),
        "{text}"
    );
    // --digest cannot vouch for a missing instance.
    let (code, report) = fleet(&instances[0], &["--digest", "--wait-ms", "3000"])?;
    ensure!(
        code == 1,
        "fleet --digest with f5 missing exited {code}: {report}"
    );
    let not_compared = report["digest"]["not_compared"].to_string();
    ensure!(not_compared.contains("f5"), "{report}");

    // It comes back and catches up: all live, no lag, digests equal.
    instances[4].start()?;
    instances[4].wait_applied("FLEET", last, CATCH_UP)?;
    wait_until("fleet to show all five live and caught up", SETTLE, || {
        let (code, report) = fleet(&instances[2], &[]).ok()?;
        let rows = report["instances"].as_array()?;
        (code == 0
            && rows.len() == 5
            && rows
                .iter()
                .all(|r| r["state"] == "live" && r["lag"] == 0 && r["applied_seq"] == last))
        .then_some(())
    })?;
    let (code, report) = fleet(&instances[0], &["--digest"])?;
    ensure!(code == 0, "fleet --digest exited {code}: {report}");
    ensure!(report["digest"]["applied_seq"] == last, "{report}");
    ensure!(
        report["digest"]["compared"].as_array().map(Vec::len) == Some(5),
        "{report}"
    );

    // A hand edit of f3's SQLite file: `fleet --digest` names f3 and the table, exit 1.
    {
        let db = rusqlite::Connection::open(instances[2].sqlite_path())?;
        db.busy_timeout(Duration::from_secs(10))?;
        let changed = db.execute("UPDATE items SET n = n + 1000 WHERE id = 'a7'", [])?;
        ensure!(changed == 1, "edited {changed} rows");
    }
    let (code, out, err) = instances[0].cli(&["fleet", "--digest"])?;
    ensure!(
        code == 1,
        "fleet --digest after the edit exited {code}: {out}\n{err}"
    );
    ensure!(out.contains("DIVERGED: f3 table items"), "{out}");
    ensure!(err.contains("f3 (table items)"), "{err}");
    let (code, report) = fleet(&instances[0], &["--digest"])?;
    ensure!(code == 1);
    let diverged = report["digest"]["diverged"]
        .as_array()
        .context("no diverged list")?;
    ensure!(
        diverged.len() == 1 && diverged[0]["instance"] == "f3" && diverged[0]["table"] == "items",
        "{report}"
    );

    for instance in &mut instances {
        ensure!(instance.stop(STOP)? == 0, "{}", instance.log());
    }
    Ok(())
}

#[test]
fn gap_margin_shrinks_and_warns_before_a_gap() -> Result<()> {
    const MAX_MSGS: u64 = 100;
    let _heavy = heavy();
    jetsync_e2e::applier_bin();
    let rt = runtime()?;
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let mut group = Group::new(server.url(), "MARGIN", "margin");
    group.extra_toml = "[fleet]\nreport_interval_ms = 300\n".into();
    let mut a = Instance::new(&group, root.path(), "ma", SinkKind::Sqlite)?;
    let mut b = Instance::new(&group, root.path(), "mb", SinkKind::Sqlite)?;
    for instance in [&a, &b] {
        instance.set_stream_option("max_msgs", &MAX_MSGS.to_string())?;
        instance.set_option("apply", "on_gap", "\"halt\"")?;
    }
    b.set_option("apply", "gap_warn_events", "50")?;
    let metrics = a.enable_http("")?;
    let (code, _, err) = a.cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    a.start()?;
    b.start()?;
    let client = rt.block_on(group.client("margin-pub"))?;
    let applied = rt.block_on(publish(&client, "x", 20))?;
    a.wait_applied("MARGIN", applied, CATCH_UP)?;
    b.wait_applied("MARGIN", applied, CATCH_UP)?;

    // Caught up: the whole stream's room is the margin, in status, fleet and /metrics.
    let status = a.status()?;
    ensure!(
        status["groups"][0]["gap_margin_events"] == MAX_MSGS,
        "{status}"
    );
    jetsync_e2e::wait_http_up(metrics, Duration::from_secs(10))?;
    wait_until("jetsync_gap_margin_events in /metrics", SETTLE, || {
        let body = jetsync_e2e::http_get(metrics, "/metrics").ok()?.body;
        body.contains("jetsync_gap_margin_events{stream=\"MARGIN\",instance=\"ma\"} 100")
            .then_some(())
    })?;

    // mb stops; every event published from now on eats its margin, which `fleet` shows
    // shrinking although mb cannot report it.
    ensure!(b.stop(STOP)? == 0, "{}", b.log());
    let mut margins = Vec::new();
    let mut last = applied;
    for round in 0..2 {
        last = rt.block_on(publish(&client, &format!("y{round}-"), 30))?;
        a.wait_applied("MARGIN", last, CATCH_UP)?;
        let report = wait_until("fleet to show mb's margin", SETTLE, || {
            let (_, report) = fleet(&a, &[]).ok()?;
            let mb = row_of(&report, "mb")?;
            let ma = row_of(&report, "ma")?;
            (mb["state"] == "missing" && mb["lag"] == last - applied && ma["lag"] == 0)
                .then(|| report.clone())
        })?;
        let mb = row_of(&report, "mb").context("mb")?;
        margins.push(mb["gap_margin_events"].as_u64().context("no margin")?);
        let ma = row_of(&report, "ma").context("ma")?;
        ensure!(ma["gap_margin_events"] == MAX_MSGS, "{ma}");
    }
    ensure!(
        margins == [MAX_MSGS - 30, MAX_MSGS - 60],
        "mb's margin in fleet: {margins:?}"
    );
    let (_, text, _) = a.cli(&["fleet"])?;
    ensure!(text.contains("40 events"), "{text}");

    // Back at 40 events (< 50) from a gap: it warns before catching up, and no event was lost
    // (on_gap = "halt" would stop it).
    b.start()?;
    b.wait_applied("MARGIN", last, CATCH_UP)?;
    wait_until("mb's gap-margin warning", SETTLE, || {
        b.log().contains("close to a gap").then_some(())
    })?;
    let log = strip_ansi(&b.log());
    ensure!(
        !log.contains("gap found") && !log.contains("resync"),
        "mb lost events:\n{log}"
    );
    let warned = log.find("close to a gap").context("no warning")?;
    ensure!(
        log[warned..].contains("gap_margin_events=40"),
        "the warning does not name the margin:\n{log}"
    );
    let stream_last = rt.block_on(stream_last_seq(&client, "MARGIN"))?;
    ensure!(stream_last == last);
    wait_until("mb's margin back to the whole stream", SETTLE, || {
        let (_, report) = fleet(&a, &[]).ok()?;
        (row_of(&report, "mb")?["gap_margin_events"] == MAX_MSGS).then_some(())
    })?;
    for instance in [&mut a, &mut b] {
        ensure!(instance.stop(STOP)? == 0, "{}", instance.log());
    }
    Ok(())
}
