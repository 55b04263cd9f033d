//! How to open a [`RedbSink`].

use super::*;

/// How to open a [`RedbSink`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedbOptions {
    /// The redb file; its parent directory is created if missing.
    pub path: PathBuf,
    /// Count how many times every stream sequence was applied (table `jetsync_audit`), in the
    /// same transaction as the rows. For crash tests; costs one extra table write per change.
    #[serde(default)]
    pub audit: bool,
}

impl RedbOptions {
    /// Options for the file at `path`, without the audit table.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RedbOptions {
            path: path.into(),
            audit: false,
        }
    }
}
