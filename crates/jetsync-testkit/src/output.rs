//! Reading what the server wrote: its log file and its console output.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How many lines of each file go into an error message.
const TAIL_LINES: usize = 30;

/// Current length of a file, 0 if it does not exist yet.
pub(crate) fn file_len(path: &Path) -> u64 {
    path.metadata().map(|m| m.len()).unwrap_or(0)
}

/// The file's text from byte `offset` on (empty if missing).
pub(crate) fn read_from(path: &Path, offset: u64) -> String {
    let mut text = Vec::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_end(&mut text);
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// The last lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Tails of the log file and the console output written since the given
/// offsets, labelled, for error messages.
pub(crate) fn tails(log: (&Path, u64), console: (&Path, u64)) -> String {
    let mut out = String::new();
    for (label, (path, offset)) in [("log file", log), ("stdout/stderr", console)] {
        let text = read_from(path, offset);
        let text = text.trim_end();
        if text.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "[{label} {}]\n{}\n",
            path.display(),
            tail(text, TAIL_LINES)
        ));
    }
    if out.is_empty() {
        out.push_str("(the server wrote nothing)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn tail_takes_last_lines() {
        assert_eq!(super::tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(super::tail("a", 5), "a");
        assert_eq!(super::tail("", 5), "");
    }
}
