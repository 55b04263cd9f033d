//! Talking to the server's HTTP monitoring port with a hand-written
//! HTTP/1.0 client (no extra dependencies).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Status code and body of an HTTP response.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: String,
}

/// `GET http://127.0.0.1:<port><path>` over HTTP/1.0.
pub(crate) fn get(port: u16, path: &str) -> std::io::Result<Response> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP reply");
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(invalid)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(invalid)?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

/// `GET <path>` parsed as JSON, `None` on any failure.
pub(crate) fn get_json(port: u16, path: &str) -> Option<Value> {
    let resp = get(port, path).ok()?;
    if resp.status != 200 {
        return None;
    }
    serde_json::from_str(&resp.body).ok()
}

/// Whether `/healthz` answers 200 with `"status":"ok"`.
pub(crate) fn healthy(port: u16) -> bool {
    healthz_ok(port, "/healthz")
}

/// Whether `/healthz?js-server-only=true` answers ok: the server and its
/// JetStream subsystem are up, without waiting for every stream and
/// consumer replica on the node to be current (on 2.9 a restarted node's
/// consumer replica can stay "not current" for a long while).
pub(crate) fn server_healthy(port: u16) -> bool {
    healthz_ok(port, "/healthz?js-server-only=true")
}

fn healthz_ok(port: u16, path: &str) -> bool {
    get_json(port, path).is_some_and(|v| v.get("status").and_then(Value::as_str) == Some("ok"))
}

/// Whether this node leads `stream` and sees `size` replicas in total
/// (itself included), all of them current (from `/jsz?streams=true`).
pub(crate) fn stream_replicas_current(port: u16, stream: &str, size: usize) -> bool {
    get_json(port, "/jsz?streams=true")
        .is_some_and(|jsz| stream_replicas_current_of(&jsz, stream, size))
}

fn stream_replicas_current_of(jsz: &Value, stream: &str, size: usize) -> bool {
    stream_details(jsz, stream)
        .any(|detail| current_peers(detail.pointer("/cluster/replicas")) + 1 >= size)
}

/// The JetStream meta leader's server name as this node sees it (from
/// `/jsz`'s `meta_cluster.leader`).
pub(crate) fn meta_leader(port: u16) -> Option<String> {
    let jsz = get_json(port, "/jsz")?;
    meta_leader_of(&jsz)
}

/// Whether this node leads the JetStream meta group and sees `size` peers
/// in total (itself included), all of them current.
pub(crate) fn meta_group_complete(port: u16, size: usize) -> bool {
    get_json(port, "/jsz").is_some_and(|jsz| meta_group_complete_of(&jsz, size))
}

fn meta_group_complete_of(jsz: &Value, size: usize) -> bool {
    let Some(replicas) = jsz.pointer("/meta_cluster/replicas") else {
        // A one-node cluster lists no replicas.
        return size == 1 && meta_leader_of(jsz).is_some();
    };
    current_peers(Some(replicas)) + 1 >= size
}

/// How many peers of a `replicas` array are `"current": true`.
fn current_peers(replicas: Option<&Value>) -> usize {
    replicas.and_then(Value::as_array).map_or(0, |peers| {
        peers
            .iter()
            .filter(|p| p.get("current").and_then(Value::as_bool) == Some(true))
            .count()
    })
}

/// The `stream_detail` entries named `stream`, in any account.
fn stream_details<'a>(jsz: &'a Value, stream: &'a str) -> impl Iterator<Item = &'a Value> {
    jsz.get("account_details")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|account| account.get("stream_detail")?.as_array())
        .flatten()
        .filter(move |detail| detail.get("name").and_then(Value::as_str) == Some(stream))
}

fn meta_leader_of(jsz: &Value) -> Option<String> {
    non_empty(jsz.pointer("/meta_cluster/leader"))
}

/// The leader of `stream` as this node sees it (from `/jsz?streams=true`:
/// `account_details[].stream_detail[].cluster.leader`), in any account.
pub(crate) fn stream_leader(port: u16, stream: &str) -> Option<String> {
    let jsz = get_json(port, "/jsz?streams=true")?;
    stream_leader_of(&jsz, stream)
}

fn stream_leader_of(jsz: &Value, stream: &str) -> Option<String> {
    stream_details(jsz, stream).find_map(|detail| non_empty(detail.pointer("/cluster/leader")))
}

fn non_empty(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shapes as served by nats-server 2.9.10 (and 2.12).
    const JSZ: &str = r#"{
      "server_id": "X",
      "meta_cluster": {"name": "jetsync", "leader": "n1", "cluster_size": 3},
      "account_details": [
        {"name": "$G", "id": "$G", "stream_detail": [
          {"name": "OTHER", "cluster": {"name": "jetsync", "leader": "n3"}},
          {"name": "S1", "cluster": {"name": "jetsync", "leader": "n2",
            "replicas": [{"name": "n1", "current": true}]}}
        ]}
      ]
    }"#;

    #[test]
    fn finds_leaders() {
        let v: Value = serde_json::from_str(JSZ).unwrap();
        assert_eq!(meta_leader_of(&v).as_deref(), Some("n1"));
        assert_eq!(stream_leader_of(&v, "S1").as_deref(), Some("n2"));
        assert_eq!(stream_leader_of(&v, "OTHER").as_deref(), Some("n3"));
        assert_eq!(stream_leader_of(&v, "NOPE"), None);
    }

    #[test]
    fn meta_group_completeness() {
        let full: Value = serde_json::from_str(
            r#"{"meta_cluster": {"leader": "n1", "cluster_size": 3, "replicas": [
                {"name": "n2", "current": true}, {"name": "n3", "current": true}]}}"#,
        )
        .unwrap();
        assert!(meta_group_complete_of(&full, 3));
        let lagging: Value = serde_json::from_str(
            r#"{"meta_cluster": {"leader": "n1", "cluster_size": 3, "replicas": [
                {"name": "n2", "current": true}, {"name": "n3", "current": false}]}}"#,
        )
        .unwrap();
        assert!(!meta_group_complete_of(&lagging, 3));
        let single: Value =
            serde_json::from_str(r#"{"meta_cluster": {"leader": "n1", "cluster_size": 1}}"#)
                .unwrap();
        assert!(meta_group_complete_of(&single, 1));
        assert!(!meta_group_complete_of(&single, 3));
    }

    #[test]
    fn stream_replica_currency() {
        let v: Value = serde_json::from_str(JSZ).unwrap();
        assert!(stream_replicas_current_of(&v, "S1", 2));
        assert!(!stream_replicas_current_of(&v, "S1", 3));
        assert!(!stream_replicas_current_of(&v, "NOPE", 1));
        let stale: Value = serde_json::from_str(
            r#"{"account_details": [{"stream_detail": [{"name": "S1", "cluster": {"leader": "n1",
                "replicas": [{"name": "n2", "current": true}, {"name": "n3", "current": false}]}}]}]}"#,
        )
        .unwrap();
        assert!(!stream_replicas_current_of(&stale, "S1", 3));
    }

    #[test]
    fn standalone_has_no_meta_leader() {
        let v: Value = serde_json::from_str(r#"{"server_id":"X","streams":0}"#).unwrap();
        assert_eq!(meta_leader_of(&v), None);
        assert_eq!(stream_leader_of(&v, "S1"), None);
    }
}
