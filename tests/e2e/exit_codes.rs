//! Exit codes and operator commands of the real binary: configuration and usage errors exit 2
//! naming the culprit, `run` survives an absent server and stops cleanly, `status` works
//! beside a running `run`, and `publish` / `tail` round-trip an event.

use std::{
    net::TcpStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use jetsync::{Row, Value};
use jetsync_e2e::{applier_cli, wait_until, Group, Instance, SinkKind};
use jetsync_testkit::NatsServer;

/// Writes a configuration file `name` with `body` under `dir`; returns its path as a string.
fn config_file(dir: &Path, name: &str, body: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, body)?;
    Ok(path.to_str().context("non-UTF-8 temp path")?.to_owned())
}

#[test]
fn unknown_config_key_exits_2_naming_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = config_file(
        dir.path(),
        "typo.toml",
        "instance = \"x\"\n\n[apply]\nbatch_maxx = 3\n",
    )?;
    let (code, out, err) = applier_cli(["--config", &path, "status"])?;
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("batch_maxx"),
        "stderr does not name the key: {err}"
    );
    assert!(
        err.contains("apply.batch_maxx"),
        "stderr does not name the key's section: {err}"
    );
    // Machine-readable form: the error as JSON on stderr, with the exit code.
    let (code, _, err) = applier_cli(["--config", &path, "status", "--json"])?;
    assert_eq!(code, 2, "{err}");
    let body: serde_json::Value =
        serde_json::from_str(err.trim()).with_context(|| format!("stderr is not JSON: {err}"))?;
    assert_eq!(body["exit_code"], 2, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("apply.batch_maxx"),
        "{body}"
    );
    Ok(())
}

#[test]
fn missing_config_file_exits_2_naming_it() -> Result<()> {
    let (code, out, err) = applier_cli(["--config", "/nonexistent.toml", "status"])?;
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("/nonexistent.toml"),
        "stderr does not name the path: {err}"
    );
    Ok(())
}

#[test]
fn malformed_nats_url_exits_2_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (i, url) in ["nats://:::bad", "ftp://x"].into_iter().enumerate() {
        let body = format!(
            "instance = \"x\"\ndata_dir = {:?}\n\n[nats]\nurl = {url:?}\n",
            dir.path()
        );
        let path = config_file(dir.path(), &format!("url{i}.toml"), &body)?;
        for command in ["status", "run", "publish"] {
            let args: Vec<&str> = match command {
                "publish" => vec![
                    "--config", &path, "publish", "--table", "items", "--key", "k", "--delete",
                ],
                c => vec!["--config", &path, c],
            };
            // `run` must fail at once with a bad URL, not retry: bound it anyway.
            let (code, out, err) = jetsync_e2e::run_with_timeout(
                {
                    let mut cmd = std::process::Command::new(jetsync_e2e::applier_bin());
                    cmd.args(&args)
                        .env_remove("RUST_LOG")
                        .env_remove("JETSYNC_CONFIG");
                    cmd
                },
                dir.path(),
                Duration::from_secs(30),
            )?;
            assert_eq!(
                code,
                Some(2),
                "{url} {command}: stdout: {out}\nstderr: {err}"
            );
            assert!(
                err.contains("nats.url"),
                "{url} {command}: stderr does not name nats.url: {err}"
            );
        }
    }
    Ok(())
}

#[test]
fn usage_errors_exit_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = config_file(
        dir.path(),
        "ok.toml",
        &format!("instance = \"x\"\ndata_dir = {:?}\n", dir.path()),
    )?;
    let cases: &[&[&str]] = &[
        &["frobnicate"],
        &["--config", &path, "frobnicate"],
        &["--config", &path, "status", "--frob"],
        &["--frob", "status"],
        &["--config", &path, "reset"],
        &["--config", &path, "reset", "--to-seq", "minus-one"],
        &[
            "--config", &path, "publish", "--table", "items", "--key", "k",
        ],
        &[
            "--config", &path, "publish", "--table", "items", "--key", "k", "--delete", "--json",
            "{}",
        ],
        &[],
    ];
    for args in cases {
        let (code, out, err) = applier_cli(*args)?;
        assert_eq!(code, 2, "{args:?}: stdout: {out}\nstderr: {err}");
        assert!(!err.trim().is_empty(), "{args:?}: no message on stderr");
    }
    Ok(())
}

/// Waits until nothing accepts connections on `addr` (host:port).
fn wait_port_closed(addr: &str) -> Result<()> {
    wait_until(
        &format!("{addr} to refuse connections"),
        Duration::from_secs(10),
        || {
            TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(200))
                .is_err()
                .then_some(())
        },
    )
}

#[test]
fn run_without_server_keeps_retrying_and_stops_cleanly() -> Result<()> {
    let mut server = NatsServer::start()?;
    let url = server.url();
    let addr = format!("127.0.0.1:{}", server.port());
    // Nothing listens on the port until the server is restarted below.
    server.kill();
    wait_port_closed(&addr)?;

    let root = tempfile::tempdir()?;
    let mut group = Group::new(url, "NOSRV", "nosrv");
    group.extra_toml = "[apply]\nretry_max_backoff_ms = 300\n".into();
    let mut instance = Instance::new(&group, root.path(), "n1", SinkKind::Sqlite)?;
    let retrying = |instance: &mut Instance| {
        wait_until(
            "the applier to report it is retrying the connection",
            Duration::from_secs(30),
            || {
                let log = instance.log();
                (log.contains("connecting to NATS") && log.contains("retrying")).then_some(())
            },
        )
        .with_context(|| instance.log())
    };

    // 1. SIGTERM while it retries: a clean exit 0.
    instance.start()?;
    retrying(&mut instance)?;
    assert!(
        instance.is_running(),
        "the applier exited instead of retrying:\n{}",
        instance.log()
    );
    let code = instance.stop(Duration::from_secs(20))?;
    assert_eq!(code, 0, "log:\n{}", instance.log());

    // 2. It keeps retrying until the server comes up, then applies, then exits 0.
    instance.start()?;
    retrying(&mut instance)?;
    server.restart()?;
    let (code, _, err) = instance.cli(&["provision"])?;
    assert_eq!(code, 0, "provision: {err}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let seq = runtime.block_on(async {
        let client = group.client("pub").await?;
        let mut row = Row::new();
        row.insert("id".into(), Value::from("a"));
        anyhow::Ok(client.rows("items")?.upsert("a", &row).await?.seq)
    })?;
    instance.wait_applied("NOSRV", seq, Duration::from_secs(60))?;
    let code = instance.stop(Duration::from_secs(20))?;
    assert_eq!(code, 0, "log:\n{}", instance.log());
    Ok(())
}

#[test]
fn status_works_while_run_is_running() -> Result<()> {
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(server.url(), "STAT", "stat");
    let mut instance = Instance::new(&group, root.path(), "st1", SinkKind::Sqlite)?;
    // This scenario is about replaying a backlog, not joining from a snapshot.
    instance.set_option("apply", "bootstrap", "false")?;
    let (code, _, err) = instance.cli(&["provision"])?;
    assert_eq!(code, 0, "provision: {err}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let last = runtime.block_on(async {
        let client = group.client("pub").await?;
        let items = client.rows("items")?;
        let mut pipeline = items.pipeline();
        for i in 0..100 {
            let key = format!("k{}", i % 40);
            let mut row = Row::new();
            row.insert("id".into(), Value::Text(key.clone()));
            row.insert("n".into(), Value::I64(i));
            pipeline.upsert(&key, &row).await?;
        }
        let published = pipeline.finish().await?;
        anyhow::Ok(published.iter().map(|p| p.seq).max().unwrap_or(0))
    })?;
    assert_eq!(last, 100);

    instance.start()?;
    instance.wait_applied("STAT", last, Duration::from_secs(60))?;
    // The checkpoint is committed before the batch is acknowledged: wait for the ack to land.
    let status = wait_until(
        "the consumer's ack floor to reach the applied seq",
        Duration::from_secs(30),
        || {
            let status = instance.status().ok()?;
            (status["groups"][0]["consumer"]["ack_floor_seq"].as_u64() == Some(last))
                .then_some(status)
        },
    )
    .with_context(|| format!("last status: {:?}", instance.status()))?;
    let g = &status["groups"][0];
    assert_eq!(status["instance"], "st1", "{status}");
    assert_eq!(g["stream"], "STAT", "{status}");
    assert_eq!(g["applied_seq"].as_u64(), Some(last), "{status}");
    assert_eq!(g["stream_last_seq"].as_u64(), Some(last), "{status}");
    assert_eq!(g["lag"].as_u64(), Some(0), "{status}");
    assert_eq!(g["parked"].as_u64(), Some(0), "{status}");
    assert!(g["nats_error"].is_null(), "{status}");
    assert_eq!(
        g["consumer"]["delivered_seq"].as_u64(),
        Some(last),
        "{status}"
    );
    assert_eq!(
        g["consumer"]["num_ack_pending"].as_u64(),
        Some(0),
        "{status}"
    );
    // Human-readable form too.
    let (code, out, err) = instance.cli(&["status"])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("applied seq {last}")), "{out}");
    // `status` neither stopped nor disturbed the running applier.
    assert!(instance.is_running(), "run exited:\n{}", instance.log());
    let code = instance.stop(Duration::from_secs(20))?;
    assert_eq!(code, 0, "log:\n{}", instance.log());
    Ok(())
}

#[test]
fn publish_then_tail_round_trips_and_bad_json_exits_2() -> Result<()> {
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(server.url(), "PUBT", "pubt");
    let instance = Instance::new(&group, root.path(), "p1", SinkKind::Sqlite)?;
    let (code, _, err) = instance.cli(&["provision"])?;
    assert_eq!(code, 0, "provision: {err}");

    let (code, out, err) = instance.cli(&[
        "publish",
        "--table",
        "items",
        "--key",
        "k",
        "--json",
        r#"{"id":"k","n":1}"#,
        "--json-output",
    ])?;
    assert_eq!(code, 0, "publish: {err}");
    let published: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    assert_eq!(published["seq"], 1, "{published}");
    assert_eq!(published["duplicate"], false, "{published}");

    let started = Instant::now();
    let (code, out, err) = instance.cli_timeout(
        &["tail", "--all", "--count", "1", "--json"],
        Duration::from_secs(30),
    )?;
    assert_eq!(
        code,
        Some(0),
        "tail did not end after one event ({:?}): {out}\n{err}",
        started.elapsed()
    );
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{out}");
    let event: serde_json::Value = serde_json::from_str(lines[0]).with_context(|| out.clone())?;
    assert_eq!(event["seq"], 1, "{event}");
    assert_eq!(event["table"], "items", "{event}");
    assert_eq!(event["key"], "k", "{event}");
    assert_eq!(event["op"], "upsert", "{event}");
    assert_eq!(
        event["row"],
        serde_json::json!({"id": "k", "n": 1}),
        "{event}"
    );
    assert_eq!(event["origin"], "p1", "{event}");

    // A delete (of another row: the stream keeps one event per row) shows up after it.
    let (code, _, err) =
        instance.cli(&["publish", "--table", "items", "--key", "gone", "--delete"])?;
    assert_eq!(code, 0, "publish --delete: {err}");
    let (code, out, err) = instance.cli_timeout(
        &["tail", "--all", "--count", "2", "--json"],
        Duration::from_secs(30),
    )?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| out.clone())?;
    assert_eq!(events.len(), 2, "{out}");
    assert_eq!(events[1]["seq"], 2, "{out}");
    assert_eq!(events[1]["key"], "gone", "{out}");
    assert_eq!(events[1]["op"], "delete", "{out}");
    assert!(events[1]["row"].is_null(), "{out}");

    // Invalid input is a usage error and publishes nothing.
    for bad in [r#"{"id":"#, "not json", "[1, 2]", "42"] {
        let (code, out, err) =
            instance.cli(&["publish", "--table", "items", "--key", "k", "--json", bad])?;
        assert_eq!(code, 2, "--json {bad:?}: stdout: {out}\nstderr: {err}");
        assert!(err.starts_with("error:"), "--json {bad:?}: {err}");
    }
    let (code, _, err) =
        instance.cli(&["publish", "--table", "Bad Table", "--key", "k", "--delete"])?;
    assert_eq!(code, 2, "bad table name: {err}");
    let status = instance.status()?;
    assert_eq!(
        status["groups"][0]["stream_last_seq"].as_u64(),
        Some(2),
        "{status}"
    );
    Ok(())
}

/// Every subcommand (with a configuration that is read before anything else), as argument
/// lists after `--config FILE`.
const EVERY_COMMAND: &[&[&str]] = &[
    &["run"],
    &["status"],
    &["provision"],
    &["digest"],
    &["reset", "--to-seq", "0"],
    &["resync"],
    &["parked", "list"],
    &["parked", "retry"],
    &["parked", "drop", "--all"],
    &["publish", "--table", "items", "--key", "k", "--delete"],
    &["tail", "--count", "1"],
];

/// Runs `args` (plus `--json` / `--json-output` when `json`) with `env`, bounded in time.
fn cli_env(
    dir: &Path,
    args: &[&str],
    json: bool,
    env: &[(&str, &str)],
) -> Result<(Option<i32>, String, String)> {
    let mut cmd = std::process::Command::new(jetsync_e2e::applier_bin());
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("JETSYNC_CONFIG");
    if json {
        cmd.arg(if args.contains(&"publish") {
            "--json-output"
        } else {
            "--json"
        });
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    jetsync_e2e::run_with_timeout(cmd, dir, Duration::from_secs(30))
}

/// Secrets in a TOML syntax error, a type error or an invalid value, in the file or the
/// environment, never reach stderr or stdout of any subcommand, text or `--json`; every case
/// exits 2 and names the key or the line.
#[test]
fn configuration_errors_never_show_secrets() -> Result<()> {
    const SECRET: &str = "S3CRETpw";
    let dir = tempfile::tempdir()?;
    let data = format!("data_dir = {:?}\n", dir.path().join("data"));
    // (file body, environment, what the error must name)
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        // Syntax errors on the secret's line.
        (
            format!("instance = \"x\"\n{data}[sink]\nkind = \"postgres\"\nurl = \"postgres://u:{SECRET}@h/db\n"),
            vec![],
            "line 5",
        ),
        (
            format!("instance = \"x\"\n{data}[nats]\nuser = \"u\"\npassword = \"{SECRET}\" oops\n"),
            vec![],
            "line 5",
        ),
        (
            format!("instance = \"x\"\n{data}[nats]\ntoken = {SECRET}\n"),
            vec![],
            "line 4",
        ),
        // Type errors and invalid values.
        (
            format!("instance = \"x\"\n{data}sink = \"postgres://u:{SECRET}@h/db\"\n"),
            vec![],
            "sink",
        ),
        (
            format!("instance = \"x\"\n{data}[nats]\ntoken = [\"{SECRET}\"]\n"),
            vec![],
            "nats.token",
        ),
        (
            format!("instance = \"x\"\n{data}[nats]\npassword = {{ v = \"{SECRET}\" }}\n"),
            vec![],
            "nats.password",
        ),
        (
            format!("instance = \"x\"\n{data}[sink]\nkind = \"{SECRET}\"\n"),
            vec![],
            "sink.kind",
        ),
        // Through the environment.
        (
            format!("instance = \"x\"\n{data}"),
            vec![("JETSYNC_APPLY__BATCH_MAX", "postgres://u:S3CRETpw@h/db")],
            "JETSYNC_APPLY__BATCH_MAX",
        ),
        (
            format!("instance = \"x\"\n{data}"),
            vec![
                ("JETSYNC_SINK__KIND", "postgres"),
                ("JETSYNC_SINK__URL", "mysql://u:S3CRETpw@h/db"),
            ],
            "sink.url",
        ),
        (
            format!("instance = \"x\"\n{data}"),
            vec![
                ("JETSYNC_NATS__USER", "u"),
                ("JETSYNC_NATS__PASSWORD", "S3CRETpw"),
                ("JETSYNC_NATS__TOKEN", "S3CRETpw"),
            ],
            "nats.token",
        ),
    ];
    for (i, (body, env, names)) in cases.iter().enumerate() {
        let path = config_file(dir.path(), &format!("secret{i}.toml"), body)?;
        for command in EVERY_COMMAND {
            for json in [false, true] {
                let mut args = vec!["--config", path.as_str()];
                args.extend_from_slice(command);
                let (code, out, err) = cli_env(dir.path(), &args, json, env)?;
                let what = format!("case {i} {command:?} json={json}");
                assert!(
                    !out.contains(SECRET) && !err.contains(SECRET),
                    "{what}: the secret leaked"
                );
                assert_eq!(code, Some(2), "{what}: stdout: {out}\nstderr: {err}");
                assert!(err.contains(names), "{what}: {names} not named: {err}");
                if json {
                    let body: serde_json::Value = serde_json::from_str(err.trim())
                        .with_context(|| format!("{what}: stderr is not JSON: {err}"))?;
                    assert_eq!(body["exit_code"], 2, "{what}: {body}");
                }
            }
        }
    }
    Ok(())
}

/// A sink setting that cannot work exits 2 naming the key, before connecting anywhere.
#[test]
fn bad_sink_settings_exit_2_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "x")?;
    let data = format!("data_dir = {:?}\n", dir.path().join("data"));
    let cases = [
        (
            "[sink]\nkind = \"postgres\"\nurl = \"mysql://u:S3CRETpw@h/db\"\n".to_owned(),
            "sink.url",
        ),
        (
            "[sink]\nkind = \"postgres\"\nurl = \"postgres://u:S3CRETpw@h:notaport/db\"\n"
                .to_owned(),
            "sink.url",
        ),
        (
            "[sink]\nkind = \"postgres\"\nurl = \"h:5432/db\"\n".to_owned(),
            "sink.url",
        ),
        (
            format!("[sink]\npath = {:?}\n", not_a_dir.join("sub").join("x.db")),
            "sink.path",
        ),
        (
            format!(
                "[sink]\nkind = \"redb\"\npath = {:?}\n",
                not_a_dir.join("x.redb")
            ),
            "sink.path",
        ),
        (format!("[sink]\npath = {:?}\n", dir.path()), "sink.path"),
        (
            "[sink]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\nschema = \"no such\"\n"
                .to_owned(),
            "sink.schema",
        ),
    ];
    for (i, (sink, key)) in cases.iter().enumerate() {
        let body = format!("instance = \"x\"\n{data}\n{sink}");
        let path = config_file(dir.path(), &format!("sink{i}.toml"), &body)?;
        for command in ["run", "digest", "status"] {
            let (code, out, err) = cli_env(dir.path(), &["--config", &path, command], false, &[])?;
            assert_eq!(
                code,
                Some(2),
                "case {i} {command}: stdout: {out}\nstderr: {err}"
            );
            assert!(
                err.contains(key),
                "case {i} {command}: {key} not named: {err}"
            );
            assert!(
                !err.contains("S3CRETpw"),
                "case {i} {command}: secret leaked"
            );
        }
    }
    Ok(())
}

/// With `stream.provision = false`, a stream that cannot back a sync group (interest
/// retention, purges or deletes allowed, subjects not covering the prefix) stops `run`,
/// `resync`, `tail` and `publish` with exit 2, naming `stream.provision` and every reason.
#[test]
fn unprovisioned_stream_that_does_not_fit_exits_2() -> Result<()> {
    use async_nats::jetstream::stream::{Config as StreamDef, RetentionPolicy};
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    let js = rt.block_on(async {
        let nats = async_nats::connect(server.url()).await?;
        Ok::<_, anyhow::Error>(async_nats::jetstream::new(nats))
    })?;
    let cases: [(&str, &str, StreamDef, &[&str]); 3] = [
        (
            "INTEREST",
            "interest",
            StreamDef {
                retention: RetentionPolicy::Interest,
                deny_purge: true,
                deny_delete: true,
                ..Default::default()
            },
            &["retention is interest"],
        ),
        (
            "PURGEABLE",
            "purgeable",
            StreamDef {
                deny_purge: false,
                deny_delete: true,
                ..Default::default()
            },
            &["allows purges"],
        ),
        (
            "LOOSE",
            "loose",
            StreamDef {
                retention: RetentionPolicy::WorkQueue,
                subjects: vec!["loose.items.>".into()],
                ..Default::default()
            },
            &[
                "retention is workqueue",
                "allows purges",
                "allows message deletes",
                "do not cover loose.>",
            ],
        ),
    ];
    for (stream, prefix, mut def, reasons) in cases {
        def.name = stream.into();
        if def.subjects.is_empty() {
            def.subjects = vec![format!("{prefix}.>")];
        }
        rt.block_on(js.create_stream(def))
            .with_context(|| format!("creating {stream}"))?;
        let group = Group::new(server.url(), stream, prefix);
        let instance = Instance::new(
            &group,
            root.path(),
            &stream.to_lowercase(),
            SinkKind::Sqlite,
        )?;
        instance.set_option("stream", "provision", "false")?;
        for args in [
            &["run"][..],
            &["resync"],
            &["tail", "--count", "1"],
            &["publish", "--table", "items", "--key", "k", "--delete"],
        ] {
            let (code, out, err) = instance.cli_timeout(args, Duration::from_secs(60))?;
            let what = format!("{stream} {args:?}");
            assert_eq!(code, Some(2), "{what}: stdout: {out}\nstderr: {err}");
            assert!(err.contains("stream.provision"), "{what}: {err}");
            for reason in reasons {
                assert!(err.contains(reason), "{what}: {reason:?} missing: {err}");
            }
        }
    }
    // A stream that fits is used as is.
    let group = Group::new(server.url(), "FITS", "fits");
    rt.block_on(js.create_stream(jetsync::stream_definition(&group.stream_config())))?;
    let instance = Instance::new(&group, root.path(), "fits", SinkKind::Sqlite)?;
    instance.set_option("stream", "provision", "false")?;
    let (code, _, err) =
        instance.cli(&["publish", "--table", "items", "--key", "k", "--delete"])?;
    assert_eq!(code, 0, "{err}");
    Ok(())
}

/// Text output of `tail` and `parked list` shows control characters, ANSI escapes and bytes
/// that are not UTF-8 escaped, never raw.
#[test]
fn text_output_escapes_control_characters() -> Result<()> {
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(server.url(), "ESC", "esc");
    let mut instance = Instance::new(&group, root.path(), "e1", SinkKind::Sqlite)?;
    let (code, _, err) = instance.cli(&["provision"])?;
    assert_eq!(code, 0, "provision: {err}");
    let nasty_key = "k\u{1b}[2J\r\0z";
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = group.client("e1").await?;
        let mut row = Row::new();
        row.insert(
            "s".into(),
            Value::Text("\u{1b}]0;title\u{7}\u{9b}31m".into()),
        );
        client.rows("items")?.upsert(nasty_key, &row).await?;
        let nats = async_nats::connect(server.url()).await?;
        let js = async_nats::jetstream::new(nats);
        js.publish("esc.items.bad", b"\x1b[31mred\r\0\xff\xfe"[..].into())
            .await?
            .await?;
        Ok::<_, anyhow::Error>(())
    })?;
    let raw = |text: &str| text.contains(['\u{1b}', '\r', '\0', '\u{9b}', '\u{7}', '\u{fffd}']);

    let (code, out, err) =
        instance.cli_timeout(&["tail", "--all", "--count", "2"], Duration::from_secs(30))?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(!raw(&out), "tail printed raw control characters: {out:?}");
    assert!(out.contains("\\x1b[2J\\x0d\\x00z"), "{out:?}");
    assert!(out.contains("POISON"), "{out:?}");

    instance.start()?;
    let parked = wait_until(
        "the bad event to be parked",
        Duration::from_secs(60),
        || {
            let list = instance.cli_json(&["parked", "list"]).ok()?;
            list.as_array()?
                .iter()
                .any(|e| e["subject"] == "esc.items.bad")
                .then_some(list)
        },
    )?;
    let (code, out, err) = instance.cli(&["parked", "list"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        !raw(&out),
        "parked list printed raw control characters: {out:?}\n{parked}"
    );
    assert!(out.contains("\\x1b[31mred\\x0d\\x00\\xff\\xfe"), "{out:?}");
    instance.stop(Duration::from_secs(30))?;
    Ok(())
}
