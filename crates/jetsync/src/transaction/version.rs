//! Which servers can store transactions.
//!
//! Atomic batch publish arrived in nats-server 2.12.0, which refuses `Nats-Msg-Id` inside a
//! batch; jetsync's idempotent commit needs it, so 2.12.1 is the floor. Older servers do not
//! know the batch headers and would store every member as an ordinary, non-atomic message: a
//! transaction must never be sent to them.

use crate::Error;

/// The oldest server version that stores jetsync transactions.
pub(crate) const MIN_VERSION: (u64, u64, u64) = (2, 12, 1);

/// What transactions need, as the errors say it.
pub(crate) const NEEDED: &str =
    "transactions need nats-server 2.12.1 or later with stream.transactions = true";

/// Whether a server reporting `version` (`2.12.8`, `v2.12.8`, `2.12.1-beta`) stores
/// transactions. An unreadable version counts as too old.
pub fn supports_transactions(version: &str) -> bool {
    parse(version).is_some_and(|v| v >= MIN_VERSION)
}

/// `major.minor.patch` from the leading digits of each part.
fn parse(version: &str) -> Option<(u64, u64, u64)> {
    let version = version.trim().trim_start_matches('v');
    let mut parts = version.splitn(3, '.').map(|part| {
        let end = part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(part.len());
        part[..end].parse::<u64>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// [`Error::Unsupported`] unless the server `nats` is connected to stores transactions.
pub(crate) fn check(nats: &async_nats::Client) -> Result<(), Error> {
    let version = nats.server_info().version;
    if supports_transactions(&version) {
        Ok(())
    } else {
        Err(Error::Unsupported {
            feature: "transactions",
            server_version: if version.is_empty() {
                "(unknown version)".to_owned()
            } else {
                version
            },
            needed: NEEDED.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for (version, ok) in [
            ("2.9.10", false),
            ("2.10.22", false),
            ("2.11.9", false),
            ("2.12.0", false),
            ("2.12.1", true),
            ("2.12.8", true),
            ("v2.12.8", true),
            ("2.13.0-dev", true),
            ("3.0", true),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(supports_transactions(version), ok, "{version}");
        }
    }
}
