//! SQL text helpers shared by the SQL sinks (SQLite, Postgres).

/// `name` as an SQL identifier: in double quotes, inner quotes doubled. This is the only way a
/// schema, table or column name from the wire enters SQL text, so no name can inject SQL.
pub(crate) fn quote(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    push_quoted(&mut out, name);
    out
}

/// Appends `name` quoted as an SQL identifier (see [`quote`]).
pub(crate) fn push_quoted(out: &mut String, name: &str) {
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quotes_and_doubles_inner_quotes() {
        assert_eq!(quote("a"), "\"a\"");
        assert_eq!(quote("we\"ird name"), "\"we\"\"ird name\"");
    }
}
