//! Printing results as text or JSON.

use serde::Serialize;

/// Prints `value` as pretty JSON when `json`, else the text `render` produces.
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
