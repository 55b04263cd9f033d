//! Finding the `nats-server` executable and asking its version.

use std::collections::HashMap;
use std::env;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use crate::Error;

/// Environment variable naming the `nats-server` executable to use.
pub const NATS_SERVER_BIN_ENV: &str = "NATS_SERVER_BIN";

/// Where Debian's `nats-server` package installs the binary.
const DEBIAN_PATH: &str = "/usr/sbin/nats-server";

/// Finds the `nats-server` executable.
///
/// Looks, in this order, at the `NATS_SERVER_BIN` environment variable (a
/// path, or a bare name looked up on `PATH`), `nats-server` on `PATH`, and
/// `/usr/sbin/nats-server`. If `NATS_SERVER_BIN` is set but does not name an
/// executable, that is an error rather than a silent fallback, so a test run
/// never uses a different server than the one asked for.
///
/// # Errors
///
/// [`Error::BinaryNotFound`] when none of the places has an executable.
pub fn nats_server_binary() -> Result<PathBuf, Error> {
    if let Some(value) = env::var_os(NATS_SERVER_BIN_ENV).filter(|v| !v.is_empty()) {
        let wanted = PathBuf::from(&value);
        let found = if wanted.components().count() == 1 && !wanted.is_absolute() {
            find_on_path(&wanted)
        } else if is_executable(&wanted) {
            std::path::absolute(&wanted).ok()
        } else {
            None
        };
        return found.ok_or_else(|| Error::BinaryNotFound {
            detail: format!(
                "{NATS_SERVER_BIN_ENV}={} is not an executable file",
                wanted.display()
            ),
        });
    }
    if let Some(found) = find_on_path(Path::new("nats-server")) {
        return Ok(found);
    }
    let debian = PathBuf::from(DEBIAN_PATH);
    if is_executable(&debian) {
        return Ok(debian);
    }
    Err(Error::BinaryNotFound {
        detail: format!(
            "{NATS_SERVER_BIN_ENV} is not set, `nats-server` is not on PATH and {DEBIAN_PATH} \
             does not exist"
        ),
    })
}

/// Returns the version of the `nats-server` that [`nats_server_binary`]
/// finds, e.g. `"2.9.10"` (without the leading `v`).
///
/// # Errors
///
/// [`Error::BinaryNotFound`] if there is no binary, [`Error::Version`] if
/// running `nats-server --version` fails or prints no version.
pub fn server_version() -> Result<String, Error> {
    version_of(&nats_server_binary()?)
}

/// Runs `<binary> --version` (once per binary per process) and parses output
/// like `nats-server: v2.9.10`.
pub(crate) fn version_of(binary: &Path) -> Result<String, Error> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = lock(cache).get(binary) {
        return Ok(v.clone());
    }
    let version_error = |detail: String| Error::Version {
        binary: binary.to_path_buf(),
        detail,
    };
    let output = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| version_error(format!("could not run it: {e}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let version = parse_version(&text).ok_or_else(|| {
        version_error(format!(
            "`--version` exited with {} and printed {:?}",
            output.status,
            text.trim()
        ))
    })?;
    lock(cache).insert(binary.to_path_buf(), version.clone());
    Ok(version)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Extracts `2.9.10` from `nats-server: v2.9.10`.
fn parse_version(text: &str) -> Option<String> {
    text.split_whitespace().find_map(|token| {
        let v = token.strip_prefix('v').unwrap_or(token);
        let ok = v.starts_with(|c: char| c.is_ascii_digit())
            && v.contains('.')
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c));
        ok.then(|| v.to_string())
    })
}

fn find_on_path(name: &Path) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .and_then(|p| std::path::absolute(p).ok())
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_version("nats-server: v2.9.10\n").as_deref(),
            Some("2.9.10")
        );
        assert_eq!(
            parse_version("nats-server: v2.12.8").as_deref(),
            Some("2.12.8")
        );
        assert_eq!(
            parse_version("nats-server: v2.11.0-RC.1").as_deref(),
            Some("2.11.0-RC.1")
        );
        assert_eq!(parse_version("nats-server: unknown"), None);
    }
}
