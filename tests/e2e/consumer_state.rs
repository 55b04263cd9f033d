//! The server's consumer state is a cache, never the truth (DESIGN section 5, startup
//! reconciliation): a durable deleted behind the applier's back, or instance data restored from
//! an older copy while the server's consumer is ahead, must both end with every event applied
//! exactly once.

use std::{fs, path::Path};

use anyhow::{ensure, Context, Result};
use async_nats::jetstream::{
    consumer::{self, DeliverPolicy},
    context::ConsumerInfoErrorKind,
    stream::Stream,
};
use jetsync_e2e::{
    assert_applied_exactly_once, assert_rows_equal, heavy, Group, Instance, SinkKind,
};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, SeedableRng};

use crate::crash::{
    ensure_fits_history, publish_pipelined, random_events, runtime, seed, stream_last_seq, Acked,
    CATCH_UP, FULL_HISTORY, STOP,
};

/// Events per phase.
const PHASE: usize = 2_000;
/// Keys they touch.
const KEYS: usize = 400;

/// A server, a redb-audit instance with full history on stream `stream`, and a publisher.
struct Setup {
    instance: Instance,
    client: jetsync::Client,
    root: tempfile::TempDir,
    _server: NatsServer,
}

async fn setup(stream: &str, name: &str) -> Result<Setup> {
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(server.url(), stream, &stream.to_lowercase());
    let instance = Instance::new(&group, root.path(), name, SinkKind::RedbAudit)?;
    instance.set_stream_option("history", &FULL_HISTORY.to_string())?;
    let (code, _, err) = instance.cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    let client = group.client("consumer-state-pub").await?;
    Ok(Setup {
        instance,
        client,
        root,
        _server: server,
    })
}

/// Publishes `events` and records them in `acked`.
async fn publish(
    client: &jetsync::Client,
    acked: &mut Acked,
    events: Vec<crate::crash::Event>,
) -> Result<()> {
    let items = client.rows("items")?;
    acked.merge(publish_pipelined(&items, events).await?);
    Ok(())
}

/// Starts the instance, waits until it applied `seq`, stops it with SIGTERM (exit 0 expected).
fn run_until(instance: &mut Instance, stream: &str, seq: u64) -> Result<()> {
    instance.start()?;
    instance.wait_applied(stream, seq, CATCH_UP)?;
    let code = instance.stop(STOP)?;
    ensure!(code == 0, "instance exited {code}:\n{}", instance.log());
    Ok(())
}

async fn consumer_info(stream: &Stream, name: &str) -> Result<Option<consumer::Info>> {
    match stream.consumer_info(name).await {
        Ok(info) => Ok(Some(info.clone())),
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn start_sequence(info: &consumer::Info) -> Option<u64> {
    match info.config.deliver_policy {
        DeliverPolicy::ByStartSequence { start_sequence } => Some(start_sequence),
        _ => None,
    }
}

/// The final checks: every sequence of the stream applied exactly once, rows as the reference.
async fn check_exactly_once(what: &str, setup: &Setup, stream: &str, acked: &Acked) -> Result<()> {
    let last = acked.reference.max_seq();
    ensure!(
        stream_last_seq(&setup.client, stream).await? == last,
        "the stream holds events nobody acknowledged"
    );
    assert_applied_exactly_once(what, &setup.instance.audit()?, 1..=last)
        .with_context(|| format!("logs of the last run:\n{}", setup.instance.log()))?;
    assert_rows_equal(
        what,
        &setup.instance.redb_rows("items")?,
        &acked.reference,
        "items",
    )
}

#[test]
fn deleted_durable_is_recreated_at_applied_plus_one() -> Result<()> {
    let _heavy = heavy();
    jetsync_e2e::applier_bin();
    let started = std::time::Instant::now();
    runtime()?.block_on(async {
        const STREAM: &str = "CSDELETE";
        let mut rng = StdRng::seed_from_u64(seed("deleted_durable"));
        let events = random_events(&mut rng, 2 * PHASE, KEYS, "del");
        ensure_fits_history(&events, FULL_HISTORY)?;
        let (phase1, phase2) = events.split_at(PHASE);
        let mut setup = setup(STREAM, "cs1").await?;
        let mut acked = Acked::default();

        publish(&setup.client, &mut acked, phase1.to_vec()).await?;
        let applied = acked.reference.max_seq();
        run_until(&mut setup.instance, STREAM, applied)?;

        // While the applier is down, delete its durable through the NATS API.
        let name = "jetsync_cs1";
        let stream = setup.client.jetstream().get_stream(STREAM).await?;
        ensure!(
            consumer_info(&stream, name).await?.is_some(),
            "the applier's durable {name} does not exist"
        );
        ensure!(
            stream.delete_consumer(name).await?.success,
            "deleting {name} failed"
        );
        ensure!(
            consumer_info(&stream, name).await?.is_none(),
            "{name} still exists after the delete"
        );

        publish(&setup.client, &mut acked, phase2.to_vec()).await?;
        let last = acked.reference.max_seq();
        run_until(&mut setup.instance, STREAM, last)?;

        let info = consumer_info(&stream, name)
            .await?
            .context("the durable was not recreated")?;
        ensure!(
            start_sequence(&info) == Some(applied + 1),
            "the durable was recreated with {:?}, expected start at {}",
            info.config.deliver_policy,
            applied + 1
        );
        check_exactly_once("deleted durable", &setup, STREAM, &acked).await?;
        eprintln!("deleted_durable: passed after {:?}", started.elapsed());
        Ok(())
    })
}

#[test]
fn restored_older_copy_replays_from_its_own_checkpoint() -> Result<()> {
    let _heavy = heavy();
    jetsync_e2e::applier_bin();
    let started = std::time::Instant::now();
    runtime()?.block_on(async {
        const STREAM: &str = "CSRESTORE";
        let mut rng = StdRng::seed_from_u64(seed("restored_copy"));
        let events = random_events(&mut rng, 3 * PHASE, KEYS, "restore");
        ensure_fits_history(&events, FULL_HISTORY)?;
        let mut phases = events.chunks(PHASE).map(<[_]>::to_vec);
        let mut setup = setup(STREAM, "cs2").await?;
        let name = "jetsync_cs2";
        let mut acked = Acked::default();

        // Phase 1, applied; then an offline copy of the instance's data (sink + checkpoint).
        publish(&setup.client, &mut acked, phases.next().context("phase 1")?).await?;
        let restored = acked.reference.max_seq();
        run_until(&mut setup.instance, STREAM, restored)?;
        let backup = setup.root.path().join("backup");
        let files = [
            setup.instance.replica_path(),
            setup.instance.checkpoint_path(),
        ];
        copy_files(&files, &setup.instance.dir, &backup)?;

        // Phase 2, applied by the original lineage, which moves the server's durable ahead.
        publish(&setup.client, &mut acked, phases.next().context("phase 2")?).await?;
        let discarded = acked.reference.max_seq();
        run_until(&mut setup.instance, STREAM, discarded)?;
        let stream = setup.client.jetstream().get_stream(STREAM).await?;
        let ahead = consumer_info(&stream, name)
            .await?
            .context("durable missing")?;
        ensure!(
            ahead.ack_floor.stream_sequence > restored,
            "the server's durable should be ahead of the restored copy ({restored}): {:?}",
            ahead.ack_floor
        );

        // Restore the older copy of BOTH files; more events arrive meanwhile.
        copy_files(&files, &backup, &setup.instance.dir)?;
        ensure!(
            setup.instance.applied(STREAM) == restored,
            "the restored checkpoint is not at {restored}"
        );
        let audit = setup.instance.audit()?;
        assert_applied_exactly_once("restored audit", &audit, 1..=restored)?;
        publish(&setup.client, &mut acked, phases.next().context("phase 3")?).await?;
        let last = acked.reference.max_seq();

        // It must replay from restored + 1, although the server's durable is at `discarded`.
        run_until(&mut setup.instance, STREAM, last)?;
        let info = consumer_info(&stream, name)
            .await?
            .context("durable missing")?;
        ensure!(
            start_sequence(&info) == Some(restored + 1),
            "the durable restarts with {:?}, expected start at {}",
            info.config.deliver_policy,
            restored + 1
        );
        // The restored lineage: 1..=restored from the copy, then every later event exactly once.
        check_exactly_once("restored copy", &setup, STREAM, &acked).await?;
        eprintln!("restored_copy: passed after {:?}", started.elapsed());
        Ok(())
    })
}

/// Copies the files named like `files` from `from` to `to` (creating `to`).
fn copy_files(files: &[std::path::PathBuf], from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for file in files {
        let name = file.file_name().context("file name")?;
        fs::copy(from.join(name), to.join(name))
            .with_context(|| format!("copying {name:?} from {}", from.display()))?;
    }
    Ok(())
}
