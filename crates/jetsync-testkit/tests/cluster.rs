//! Three-node cluster: R3 stream survives the loss and return of its leader.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use jetsync_testkit::Cluster;

const DEADLINE: Duration = Duration::from_secs(30);

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Publishes with a message id (so retries de-duplicate) until acked.
async fn publish_until_acked(
    js: &jetstream::Context,
    subject: &str,
    payload: &'static str,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let msg = PublishMessage::build()
            .payload(payload.into())
            .message_id(payload);
        let attempt = async { js.send_publish(subject.to_string(), msg).await?.await };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(ack)) => return Ok(ack.sequence),
            Ok(Err(e)) if Instant::now() < deadline => eprintln!("publish retry: {e}"),
            Err(_) if Instant::now() < deadline => eprintln!("publish retry: timed out"),
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages in `stream` as node `i` itself reports them on `/jsz`.
fn local_messages(cluster: &Cluster, i: usize, stream: &str) -> Option<u64> {
    let body = cluster.node(i).monitor_get("/jsz?streams=true").ok()?;
    let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
    jsz["account_details"]
        .as_array()?
        .iter()
        .filter_map(|a| a["stream_detail"].as_array())
        .flatten()
        .find(|s| s["name"] == stream)?["state"]["messages"]
        .as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_stream_survives_leader_kill_and_restart() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.2}s] {what}", t0.elapsed().as_secs_f64());
    let mut cluster = blocking(|| Cluster::start(3))?;
    phase("cluster ready");
    assert_eq!(cluster.len(), 3);
    assert!(!cluster.is_empty());
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    assert_eq!(cluster.url_list(), urls.join(","));
    for (i, node) in cluster.nodes().iter().enumerate() {
        assert_eq!(node.server_name(), Some(format!("n{}", i + 1).as_str()));
        assert_eq!(urls[i], node.url());
        assert_ne!(node.port(), 4222);
    }
    assert!(cluster.meta_leader().is_some());
    // An R3 stream can be placed only once every node reports itself healthy: knowing the meta
    // leader is not enough (under load the create can fail with "insufficient resources").
    for i in 0..cluster.len() {
        assert!(
            blocking(|| cluster.wait_node_healthy(i, DEADLINE)),
            "cluster node {i} not healthy within {DEADLINE:?}"
        );
    }

    let client = async_nats::connect(cluster.node(0).url()).await?;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "R3".into(),
        subjects: vec!["r3.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await?;
    assert_eq!(publish_until_acked(&js, "r3.a", "one").await?, 1);
    drop(js);
    drop(client);

    let leader =
        blocking(|| cluster.wait_stream_leader("R3", DEADLINE)).expect("an R3 stream has a leader");
    assert_eq!(cluster.stream_leader("R3"), Some(leader));
    assert_eq!(cluster.stream_leader("NO_SUCH_STREAM"), None);
    let old_pid = cluster.node(leader).pid().unwrap();
    phase(&format!("stream leader is node {leader}; killing it"));
    blocking(|| cluster.kill(leader));
    assert_eq!(cluster.node(leader).pid(), None);
    assert!(!std::path::Path::new(&format!("/proc/{old_pid}")).exists());

    let survivor = (leader + 1) % cluster.len();
    let client = async_nats::connect(cluster.node(survivor).url()).await?;
    let js = jetstream::new(client.clone());
    assert_eq!(publish_until_acked(&js, "r3.b", "two").await?, 2);
    phase("published through a survivor");
    let new_leader = blocking(|| cluster.wait_stream_leader("R3", DEADLINE))
        .expect("the survivors elect a new stream leader");
    assert_ne!(new_leader, leader);

    blocking(|| cluster.restart(leader))?;
    phase("old leader restarted and healthy");
    assert!(cluster.node_mut(leader).is_running());
    // The restarted node catches up on the message it missed.
    let deadline = Instant::now() + DEADLINE;
    while local_messages(&cluster, leader, "R3") != Some(2) {
        assert!(
            Instant::now() < deadline,
            "restarted node did not catch up: {:?}",
            local_messages(&cluster, leader, "R3")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    phase("old leader caught up");
    let rejoined = async_nats::connect(cluster.node(leader).url()).await?;
    let js = jetstream::new(rejoined);
    assert_eq!(publish_until_acked(&js, "r3.c", "three").await?, 3);
    let mut stream = js.get_stream("R3").await?;
    assert_eq!(stream.info().await?.state.messages, 3);
    phase("done");
    Ok(())
}

#[test]
fn zero_nodes_is_an_error() {
    let err = Cluster::start(0).expect_err("0 nodes");
    assert!(err.to_string().contains("at least one node"), "{err}");
}
