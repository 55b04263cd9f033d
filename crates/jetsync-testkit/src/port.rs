//! Picking free loopback ports.

use std::net::{Ipv4Addr, TcpListener};

use crate::Error;

/// Returns a TCP port on 127.0.0.1 that is free right now.
///
/// The port is found by binding `127.0.0.1:0` and dropping the listener, so
/// another process may take it before the server binds it; the server
/// start-up retries with new ports when that happens.
///
/// # Errors
///
/// [`Error::Io`] if binding a loopback socket fails.
pub fn free_port() -> Result<u16, Error> {
    Ok(free_ports(1)?[0])
}

/// Returns `n` distinct TCP ports on 127.0.0.1 that are free right now.
///
/// All listeners are held until every port is picked, so the ports differ
/// from one another. The same race as for [`free_port`] applies.
///
/// # Errors
///
/// [`Error::Io`] if binding a loopback socket fails.
pub fn free_ports(n: usize) -> Result<Vec<u16>, Error> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::io("binding 127.0.0.1:0 to pick a free port", e))?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| Error::io("reading the address of a loopback listener", e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_distinct_and_nonzero() {
        let ports = super::free_ports(5).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 5);
        assert!(ports.iter().all(|&p| p != 0));
    }
}
