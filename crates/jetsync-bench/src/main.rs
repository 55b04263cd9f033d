//! `jetsync-bench`: jetsync against the raw JetStream ceiling, in one run on one private
//! nats-server (DESIGN 9).
//!
//! Phases: publish (client vs raw pipelined publish), replay (a 500k `json/1` backlog: the raw
//! pull-consume ceiling, per-sink ceilings, a hand-written consumer, `jetsync-applier run` into
//! SQLite, redb and Postgres, and a hot-key Zipf backlog), live (publish-to-applied latency with
//! three appliers beside raw publish-to-delivery latency at the same rates), bootstrap (a fresh
//! instance on a compacted stream), memory (peak RSS of the real `jetsync-applier` binary
//! replaying a backlog, applying a flood of 1 MiB events, and running `resync` over 1,000,000
//! rows), txn (transactions of 10 rows against single writes of the same rows; nats-server >=
//! 2.12.1, else skipped with a note) and fleet (N appliers as processes on one stream: latency,
//! server CPU and memory per instance). Writes `target/bench/report.json` and prints a table
//! with DESIGN 9's targets marked met or missed.
//!
//! ```text
//! just bench quick                      # < 2 min: smaller backlogs, 3 s per live rate
//! just bench                            # full: 500k replay, 1M memory backlog, 10 s per rate,
//!                                       #   200 x 1 MiB flood, 1M-row resync (quick: 50, 100k)
//! just bench quick --only live,replay   # some phases only
//! just bench quick --only txn           # transactions (needs nats-server >= 2.12.1)
//! just bench quick --only capture       # capture-to-applied latency, plain SQL at 1,000 writes/s
//! just bench --only fleet               # capacity: 10, 50, 100 appliers (quick: 10, 25)
//! just bench --only fleet --fleet-rate 100   # the fleet's total events/s (default 50)
//! just bench --no-build                 # use the existing target/release/jetsync-applier
//! just bench quick --batch-max 5000     # experiment: apply.batch_max of every engine
//! ```
//!
//! The server comes from `NATS_SERVER_BIN`, else `PATH`, else `/usr/sbin/nats-server`.

mod bootstrap;
mod capture;
mod catchup;
mod ceiling;
mod fleet;
mod flood;
mod handwritten;
mod harness;
mod live;
mod live_raw;
mod memory;
mod pg;
mod plain_sqlite;
mod probe;
mod publish;
mod replay;
mod report;
mod resync;
mod txn;
mod workload;

use std::{
    collections::BTreeMap,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use jetsync_testkit::NatsServer;

use crate::report::{Machine, Report, Server, Sizes};

const PHASES: [&str; 8] = [
    "publish",
    "replay",
    "live",
    "bootstrap",
    "memory",
    "txn",
    "capture",
    "fleet",
];

#[derive(Debug)]
struct Args {
    quick: bool,
    only: Vec<&'static str>,
    build: bool,
}

const USAGE: &str =
    "usage: jetsync-bench [quick|full] [--only publish,replay,live,bootstrap,memory,txn,capture,fleet] \
                     [--no-build] [--batch-max N (apply.batch_max of the engines; default 1000)] \
                     [--txn-in-flight N (transactions in flight in the txn phase; default 4)] \
                     [--fleet-rate N (total events/s of the fleet phase; default 50)]";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        quick: false,
        only: PHASES.to_vec(),
        build: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "quick" | "--quick" => args.quick = true,
            "full" | "--full" => args.quick = false,
            "--no-build" => args.build = false,
            "--batch-max" => {
                let n: usize = it
                    .next()
                    .context("--batch-max needs a number")?
                    .parse()
                    .context("--batch-max needs a number")?;
                let _ = harness::BATCH_MAX.set(n);
            }
            "--fleet-rate" => {
                let n: u64 = it
                    .next()
                    .context("--fleet-rate needs a number")?
                    .parse()
                    .context("--fleet-rate needs a number")?;
                let _ = FLEET_RATE.set(n);
            }
            "--txn-in-flight" => {
                let n: usize = it
                    .next()
                    .context("--txn-in-flight needs a number")?
                    .parse()
                    .context("--txn-in-flight needs a number")?;
                let _ = txn::IN_FLIGHT.set(n);
            }
            "--only" => {
                let list = it.next().context("--only needs a list of phases")?;
                args.only = list
                    .split(',')
                    .map(|name| {
                        PHASES
                            .iter()
                            .copied()
                            .find(|p| *p == name.trim())
                            .with_context(|| format!("unknown phase `{name}`; {USAGE}"))
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`; {USAGE}"),
        }
    }
    Ok(args)
}

/// `--fleet-rate N`: the fleet phase's total event rate.
static FLEET_RATE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn sizes(quick: bool) -> Sizes {
    if quick {
        Sizes {
            publish_per_run: 50_000,
            publish_rounds: 3,
            replay_backlog: 50_000,
            live_rates: vec![1_000, 5_000, 10_000],
            live_seconds_per_rate: 3.0,
            bootstrap_rows: 20_000,
            memory_backlog: 100_000,
            flood_events: 50,
            resync_rows: 100_000,
            txn_rows: 20_000,
            fleet_steps: vec![10, 25],
            fleet_rate: FLEET_RATE.get().copied().unwrap_or(fleet::DEFAULT_RATE),
            fleet_seconds_per_step: 3.0,
            key_space: workload::KEY_SPACE,
            engine_batch_max: harness::batch_max(),
        }
    } else {
        Sizes {
            publish_per_run: 200_000,
            publish_rounds: 3,
            replay_backlog: 500_000,
            live_rates: vec![1_000, 5_000, 10_000],
            live_seconds_per_rate: 10.0,
            bootstrap_rows: 100_000,
            memory_backlog: 1_000_000,
            flood_events: 200,
            resync_rows: 1_000_000,
            txn_rows: 100_000,
            fleet_steps: vec![10, 50, 100],
            fleet_rate: FLEET_RATE.get().copied().unwrap_or(fleet::DEFAULT_RATE),
            fleet_seconds_per_step: 10.0,
            key_space: workload::KEY_SPACE,
            engine_batch_max: harness::batch_max(),
        }
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the bench; `Ok(false)` when a phase failed (the report says which).
fn real_main() -> anyhow::Result<bool> {
    let args = parse_args()?;
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let started = Instant::now();
    let sizes = sizes(args.quick);
    let wants = |phase: &str| args.only.contains(&phase);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    // Build the applier binary before anything is measured.
    let mut errors: BTreeMap<&'static str, String> = BTreeMap::new();
    // The phases that run the real binary.
    let applier = if wants("memory") || wants("replay") || wants("fleet") || wants("capture") {
        let path = memory::target_dir().join("release").join("jetsync-applier");
        if args.build {
            eprintln!("building jetsync-applier (release) ...");
            let timeout = Duration::from_secs(if args.quick { 30 } else { 600 });
            match runtime.block_on(memory::build_applier(timeout)) {
                Ok(a) => Some(a),
                Err(e) if e.to_string().starts_with("interrupted") => return Err(e),
                Err(e) => {
                    errors.insert("applier-build", format!("{e:#}"));
                    None
                }
            }
        } else if path.exists() {
            Some(memory::Applier { path, fresh: false })
        } else {
            errors.insert(
                "applier-build",
                format!("--no-build, and there is no {}", path.display()),
            );
            None
        }
    } else {
        None
    };

    // Payloads up to 4 MiB: the memory phase floods the applier with events of about 1 MiB
    // (the default limit is exactly 1 MiB, headers included).
    let server = NatsServer::builder()
        .extra_config("max_payload: 4194304")
        .start()
        .context("starting nats-server")?;
    eprintln!("nats-server {} at {}", server.version(), server.url());
    harness::set_server_pid(server.pid());
    let mut report = Report {
        server: Server {
            version: server.version().to_owned(),
        },
        publish: None,
        replay: None,
        live: None,
        bootstrap: None,
        memory: None,
        txn: None,
        capture: None,
        fleet: None,
        mode: if args.quick { "quick" } else { "full" },
        events: sizes.clone(),
        machine: Machine::probe(),
        targets: Vec::new(),
        errors,
        elapsed_s: 0.0,
        phase_s: BTreeMap::new(),
    };

    let phases = async {
        let bench = harness::Bench::connect(&server.url()).await?;
        if wants("publish") {
            eprintln!(
                "publish: {} events x {} runs per side ...",
                sizes.publish_per_run, sizes.publish_rounds
            );
            let phase = Instant::now();
            let result = publish::run(&bench, sizes.publish_per_run, sizes.publish_rounds).await;
            report.publish = report.outcome("publish", phase, result);
        }
        if wants("replay") {
            eprintln!("replay: {} events backlog ...", sizes.replay_backlog);
            let phase = Instant::now();
            let result = replay::run(&bench, sizes.replay_backlog, applier.as_ref()).await;
            report.replay = report.outcome("replay", phase, result);
            if let Some(replay) = &report.replay {
                for (part, error) in &replay.failures {
                    report.errors.insert(part, error.clone());
                }
            }
        }
        if wants("live") {
            eprintln!(
                "live: {:?} events/s, {} s each ...",
                sizes.live_rates, sizes.live_seconds_per_rate
            );
            let duration = Duration::from_secs_f64(sizes.live_seconds_per_rate);
            let phase = Instant::now();
            let result = live::run(&bench, &sizes.live_rates, duration).await;
            if let Some((points, cut_short)) = report.outcome("live", phase, result) {
                report.live = Some(points);
                if let Some(e) = cut_short {
                    let _ = report.outcome::<()>("live", phase, Err(e));
                }
            }
        }
        if wants("bootstrap") {
            eprintln!("bootstrap: {} rows ...", sizes.bootstrap_rows);
            let phase = Instant::now();
            let result = bootstrap::run(&bench, sizes.bootstrap_rows).await;
            report.bootstrap = report.outcome("bootstrap", phase, result);
        }
        if wants("txn") {
            eprintln!(
                "txn: {} rows as transactions of {} vs single writes, {} runs per side ...",
                sizes.txn_rows,
                txn::TXN_ROWS,
                sizes.publish_rounds
            );
            let phase = Instant::now();
            let result = txn::run(
                &bench,
                &report.server.version,
                sizes.txn_rows,
                sizes.publish_rounds,
            )
            .await;
            report.txn = report.outcome("txn", phase, result);
        }
        if let (true, Some(applier)) = (wants("capture"), &applier) {
            eprintln!(
                "capture: plain SQL writes on A at {} writes/s for {} s, applied on B ...",
                capture::RATE,
                sizes.live_seconds_per_rate
            );
            let phase = Instant::now();
            let duration = Duration::from_secs_f64(sizes.live_seconds_per_rate);
            let result = capture::run(
                &bench,
                &report.server.version,
                applier,
                capture::RATE,
                duration,
            )
            .await;
            report.capture = report.outcome("capture", phase, result);
        }
        if let Some(applier) = applier.as_ref().filter(|_| wants("memory")) {
            let mut memory = memory::MemoryReport::default();
            eprintln!(
                "memory: jetsync-applier replaying {} events ...",
                sizes.memory_backlog
            );
            let phase = Instant::now();
            let result = memory::run(&bench, sizes.memory_backlog, applier).await;
            memory.backlog = report.outcome("memory", phase, result);
            eprintln!(
                "memory: jetsync-applier applying a flood of {} events of ~1 MiB ...",
                sizes.flood_events
            );
            let phase = Instant::now();
            let result = flood::run(&bench, sizes.flood_events, applier).await;
            if let Some(flood) = report.outcome("memory-flood", phase, result) {
                memory.set_flood(flood);
            }
            eprintln!(
                "memory: jetsync-applier resync of {} rows ...",
                sizes.resync_rows
            );
            let phase = Instant::now();
            let result = resync::run(&bench, sizes.resync_rows, applier).await;
            if let Some(resync) = report.outcome("memory-resync", phase, result) {
                memory.set_resync(resync);
            }
            report.memory = Some(memory);
        }
        if let Some(applier) = applier.as_ref().filter(|_| wants("fleet")) {
            eprintln!(
                "fleet: {:?} jetsync-applier processes at {} events/s, {} s per step ...",
                sizes.fleet_steps, sizes.fleet_rate, sizes.fleet_seconds_per_step
            );
            let phase = Instant::now();
            let duration = Duration::from_secs_f64(sizes.fleet_seconds_per_step);
            let result = fleet::run(applier, &sizes.fleet_steps, sizes.fleet_rate, duration).await;
            report.fleet = report.outcome("fleet", phase, result);
        }
        anyhow::Ok(())
    };
    // Ctrl-C drops the phase in hand: engines, connections and the applier process stop, and
    // the server is killed on the way out.
    runtime.block_on(async {
        tokio::select! {
            done = phases => done,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })?;
    // Engines and connections go before the server does.
    drop(runtime);
    drop(server);

    report.machine.loadavg_end = report::loadavg();
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.evaluate();
    let dir = memory::target_dir();
    let path = dir
        .canonicalize()
        .unwrap_or(dir)
        .join("bench")
        .join("report.json");
    report.write_json(&path)?;
    println!("{}", report.table());
    println!("report: {} ({:.0} s)", path.display(), report.elapsed_s);
    Ok(report.errors.is_empty())
}
