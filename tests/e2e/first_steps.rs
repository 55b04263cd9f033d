//! A new user's first command, whatever it is, on a fresh server: `publish`, `tail`, `status`
//! and the client's `upsert` either work (provisioning the stream, as `run` does, with the
//! default `stream.provision = true`) or print advice that works when followed literally.

use anyhow::{ensure, Result};
use jetsync::{Row, Value};
use jetsync_e2e::{Group, Instance, SinkKind};
use jetsync_testkit::NatsServer;

/// The stream's stored message count, `None` when it does not exist.
async fn stored(url: &str, stream: &str) -> Result<Option<u64>> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    match js.get_stream(stream).await {
        Ok(mut s) => Ok(Some(s.info().await?.state.messages)),
        Err(_) => Ok(None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_first_command_works_on_a_fresh_server() -> Result<()> {
    for first in ["publish", "tail", "status", "client upsert"] {
        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let group = Group::new(server.url(), "CATALOG", "catalog");
        let instance = Instance::new(&group, root.path(), "catalog-1", SinkKind::Sqlite)?;
        ensure!(stored(&server.url(), "CATALOG").await?.is_none());
        match first {
            "publish" => {
                let (code, out, err) = instance.cli(&[
                    "publish",
                    "--table",
                    "items",
                    "--key",
                    "A-9",
                    "--json",
                    r#"{"id":"A-9","name":"Lamp"}"#,
                ])?;
                ensure!(code == 0, "first publish: exit {code}\n{out}\n{err}");
                ensure!(stored(&server.url(), "CATALOG").await? == Some(1));
            }
            "tail" => {
                let (code, out, err) = instance.cli(&["tail", "--all", "--count", "0"])?;
                ensure!(code == 0, "first tail: exit {code}\n{out}\n{err}");
                ensure!(stored(&server.url(), "CATALOG").await? == Some(0));
            }
            "status" => {
                // Nothing to report yet: it says so, and how the stream comes to exist.
                let (code, out, err) = instance.cli(&["status"])?;
                let text = format!("{out}{err}");
                ensure!(code == 1, "first status: exit {code}\n{text}");
                ensure!(
                    text.contains("does not exist yet") && text.contains("provision"),
                    "first status gives no advice:\n{text}"
                );
                // Followed literally.
                let (code, out, err) = instance.cli(&["provision"])?;
                ensure!(code == 0, "provision: exit {code}\n{out}\n{err}");
                let (code, out, err) = instance.cli(&["status"])?;
                ensure!(
                    code == 0,
                    "status after provision: exit {code}\n{out}\n{err}"
                );
            }
            _ => {
                let client = group.client("catalog-1").await?;
                let mut row = Row::new();
                row.insert("id".into(), Value::Text("A-9".into()));
                let published = client.rows("items")?.upsert("A-9", &row).await?;
                ensure!(published.seq == 1, "{published:?}");
                ensure!(stored(&server.url(), "CATALOG").await? == Some(1));
            }
        }
    }
    Ok(())
}
