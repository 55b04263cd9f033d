//! Printing results as text or JSON.

use serde::Serialize;

/// Prints `value` as pretty JSON when `json`, else the text `render` produces.
/// `n` with its noun in the right number: `1 event`, `2 events`.
pub(crate) fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

pub(crate) fn emit<T: Serialize>(json: bool, value: &T, render: impl FnOnce(&T) -> String) {
    if json {
        match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot render JSON output: {e}"),
        }
    } else {
        println!("{}", render(value));
    }
}

/// Whether `c` must not reach a terminal as is: control characters (ANSI escape sequences
/// start with ESC or C1 CSI, `\r` rewrites the line, NUL) and invisible formatting characters
/// that reorder or hide text (bidirectional overrides, zero-width characters, BOM).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

fn push_escaped_char(out: &mut String, c: char) {
    if needs_escape(c) {
        let code = u32::from(c);
        if code < 0x80 {
            out.push_str(&format!("\\x{code:02x}"));
        } else {
            out.push_str(&format!("\\u{{{code:04x}}}"));
        }
    } else {
        out.push(c);
    }
}

/// `text` safe to print on a terminal: control and invisible formatting characters are shown
/// as `\xNN` / `\u{NNNN}`. For subjects, keys, payload previews and error reasons, which come
/// from events anyone with publish rights may have written.
pub(crate) fn escape_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        push_escaped_char(&mut out, c);
    }
    out
}

/// At most `max` characters of `bytes` safe to print: bytes that are not UTF-8 are shown as
/// `\xNN`, control characters as for [`escape_text`]; `…` marks a truncation.
pub(crate) fn escape_bytes(bytes: &[u8], max: usize) -> String {
    let mut out = String::new();
    let mut shown = 0;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if shown == max {
                out.push('…');
                return out;
            }
            push_escaped_char(&mut out, c);
            shown += 1;
        }
        for b in chunk.invalid() {
            if shown == max {
                out.push('…');
                return out;
            }
            out.push_str(&format!("\\x{b:02x}"));
            shown += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            escape_text("a\u{1b}[31mred\r\0b\u{9b}c\u{202e}d"),
            "a\\x1b[31mred\\x0d\\x00b\\u{009b}c\\u{202e}d"
        );
        assert_eq!(escape_text("plain é ✓"), "plain é ✓");
        assert_eq!(escape_text("tab\tnl\n"), "tab\\x09nl\\x0a");
    }

    #[test]
    fn bytes_show_invalid_utf8_as_hex() {
        assert_eq!(escape_bytes(b"ok\xff\xfe\x1b!", 100), "ok\\xff\\xfe\\x1b!");
        assert_eq!(escape_bytes(b"abcdef", 3), "abc…");
        assert_eq!(escape_bytes("é\u{7}".as_bytes(), 1), "é…");
    }
}

#[cfg(test)]
mod count_tests {
    #[test]
    fn plural_forms() {
        assert_eq!(super::count(1u64, "event", "events"), "1 event");
        assert_eq!(super::count(0u64, "event", "events"), "0 events");
        assert_eq!(super::count(2u64, "event", "events"), "2 events");
    }
}
