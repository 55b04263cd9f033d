//! Smoke: one instance applies what a publisher wrote, and stops cleanly on SIGTERM.

use std::time::Duration;

use jetsync::{Row, Value};
use jetsync_e2e::{assert_sqlite_matches, Group, Instance, Reference, SinkKind};
use jetsync_testkit::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_applies_and_stops_cleanly() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let group = Group::new(server.url(), "SMOKE", "smoke");
    let mut instance = Instance::new(&group, root.path(), "s1", SinkKind::Sqlite)?;
    let (code, _, err) = instance.cli(&["provision"])?;
    assert_eq!(code, 0, "{err}");

    let client = group.client("pub").await?;
    let items = client.rows("items")?;
    let mut reference = Reference::default();
    for i in 0..50 {
        let key = format!("k{}", i % 10);
        let mut row = Row::new();
        row.insert("id".into(), Value::Text(key.clone()));
        row.insert("n".into(), Value::I64(i));
        let p = items.upsert(&key, &row).await?;
        reference.record(p.seq, "items", &key, Some(row));
    }
    let p = items.delete("k3").await?;
    reference.record(p.seq, "items", "k3", None);

    instance.start()?;
    instance.wait_applied("SMOKE", reference.max_seq(), Duration::from_secs(60))?;
    assert_sqlite_matches(&instance, &reference, "items", "id")?;
    assert_eq!(
        instance.stop(Duration::from_secs(20))?,
        0,
        "{}",
        instance.log()
    );
    Ok(())
}
