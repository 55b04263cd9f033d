//! A panicking test still kills its servers and removes their temp dirs.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use jetsync_testkit::{Cluster, NatsServer};

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn panic_kills_server_and_removes_temp_dir() {
    let (tx, rx) = mpsc::channel::<(u32, PathBuf)>();
    let handle = thread::spawn(move || {
        let server = NatsServer::start().unwrap();
        let dir = server.config_path().parent().unwrap().to_path_buf();
        tx.send((server.pid().unwrap(), dir)).unwrap();
        panic!("deliberate panic with a running server");
    });
    assert!(handle.join().is_err(), "the thread must have panicked");
    let (pid, dir) = rx.recv().unwrap();
    assert!(!process_exists(pid), "server {pid} leaked");
    assert!(!dir.exists(), "temp dir {} leaked", dir.display());
}

#[test]
fn panic_kills_whole_cluster() {
    let (tx, rx) = mpsc::channel::<Vec<(u32, PathBuf)>>();
    let handle = thread::spawn(move || {
        let cluster = Cluster::start(3).unwrap();
        let nodes = cluster
            .nodes()
            .iter()
            .map(|n| {
                let dir = n.config_path().parent().unwrap().to_path_buf();
                (n.pid().unwrap(), dir)
            })
            .collect();
        tx.send(nodes).unwrap();
        panic!("deliberate panic with a running cluster");
    });
    assert!(handle.join().is_err());
    let nodes = rx.recv().unwrap();
    assert_eq!(nodes.len(), 3);
    for (pid, dir) in nodes {
        assert!(!process_exists(pid), "node {pid} leaked");
        assert!(!dir.exists(), "temp dir {} leaked", dir.display());
    }
}
