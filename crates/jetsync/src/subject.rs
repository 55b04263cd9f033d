//! Table names, key tokens and subjects (DESIGN section 2).
//!
//! Every row of a synced table lives on its own subject, `<subject_prefix>.<table>.<key-token>`,
//! so JetStream gives per-row last-value, compare-and-set and compaction for free. This module is
//! the only place that builds or takes apart those subjects.
//!
//! Key tokens: a key matching `[A-Za-z0-9_-]{1,128}` is its own token; any other key of up to
//! 512 bytes becomes `=` followed by its unpadded base64url encoding. Plain tokens never contain
//! `=` and encoded tokens always start with it, and only the canonical form of each is accepted
//! back, so the mapping is injective and [`decode_key`] is its exact inverse.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// Longest key, in bytes, that [`encode_key`] accepts.
pub const MAX_KEY_LEN: usize = 512;

/// Longest key, in bytes, that is used as its own subject token (when its characters allow).
pub const MAX_PLAIN_KEY_LEN: usize = 128;

/// Longest table name, in bytes.
pub const MAX_TABLE_LEN: usize = 63;

/// Longest single token of a subject prefix, in bytes.
pub const MAX_PREFIX_TOKEN_LEN: usize = 64;

/// First character of a base64url-encoded key token.
const ENCODED_MARK: char = '=';

/// Length of the unpadded base64url encoding of a [`MAX_KEY_LEN`]-byte key.
const MAX_ENCODED_LEN: usize = (MAX_KEY_LEN * 4).div_ceil(3);

/// Why a table name, prefix, key or subject was rejected.
#[non_exhaustive]
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum SubjectError {
    /// The table name is not `[a-z][a-z0-9_]{0,62}`.
    #[error(
        "invalid table name {name:?}: {reason}; a table name is a lowercase ASCII letter \
         followed by up to 62 lowercase letters, digits or underscores"
    )]
    InvalidTable {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The subject prefix is not one or more dot-separated `[A-Za-z0-9_-]{1,64}` tokens.
    #[error(
        "invalid subject prefix {prefix:?}: {reason}; a prefix is one or more dot-separated \
         tokens of 1 to 64 ASCII letters, digits, '_' or '-' (no wildcards, no '$')"
    )]
    InvalidPrefix {
        /// The rejected prefix.
        prefix: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A row key must not be empty.
    #[error("row key is empty; a key is 1 to 512 bytes of UTF-8")]
    EmptyKey,
    /// The row key is longer than the wire format allows.
    #[error("row key is {len} bytes long; a key is at most {max} bytes")]
    KeyTooLong {
        /// Length of the rejected key in bytes.
        len: usize,
        /// The limit ([`MAX_KEY_LEN`]).
        max: usize,
    },
    /// A subject token is not a valid key token (it was not produced by [`encode_key`]).
    #[error(
        "invalid key token {token:?}: {reason}; a key token is 1 to 128 of [A-Za-z0-9_-], or '=' \
         followed by the unpadded base64url encoding of a key that is not itself such a token"
    )]
    InvalidKeyToken {
        /// The rejected token.
        token: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The subject does not start with the sync group's prefix.
    #[error("subject {subject:?} is not in the sync group with prefix {prefix:?}")]
    NotInGroup {
        /// The rejected subject.
        subject: String,
        /// The sync group's prefix.
        prefix: String,
    },
    /// The subject starts with the prefix but is not `<prefix>.<table>.<key-token>`.
    #[error(
        "subject {subject:?} is not a row subject: {reason}; expected <prefix>.<table>.<key-token>"
    )]
    InvalidSubject {
        /// The rejected subject.
        subject: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A validated table name: `[a-z][a-z0-9_]{0,62}`.
///
/// Table names appear as one subject token and as SQL identifiers in the sinks, hence the narrow
/// alphabet.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct TableName(String);

impl TableName {
    /// Validates `name` and wraps it.
    pub fn new(name: &str) -> Result<TableName, SubjectError> {
        check_table(name)?;
        Ok(TableName(name.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

fn check_table(name: &str) -> Result<(), SubjectError> {
    let invalid = |reason| {
        Err(SubjectError::InvalidTable {
            name: name.to_owned(),
            reason,
        })
    };
    let bytes = name.as_bytes();
    match bytes.first() {
        None => return invalid("it is empty"),
        Some(b) if !b.is_ascii_lowercase() => return invalid("it does not start with a-z"),
        Some(_) => {}
    }
    if bytes.len() > MAX_TABLE_LEN {
        return invalid("it is longer than 63 bytes");
    }
    if !bytes
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return invalid("it contains a character other than a-z, 0-9 or '_'");
    }
    Ok(())
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TableName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for TableName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for TableName {
    type Err = SubjectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TableName::new(s)
    }
}

impl TryFrom<String> for TableName {
    type Error = SubjectError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        check_table(&s)?;
        Ok(TableName(s))
    }
}

impl TryFrom<&str> for TableName {
    type Error = SubjectError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        TableName::new(s)
    }
}

impl From<TableName> for String {
    fn from(t: TableName) -> Self {
        t.0
    }
}

impl PartialEq<str> for TableName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for TableName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// `[A-Za-z0-9_-]`: the characters of plain key tokens and prefix tokens.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Whether `key` is used as its own subject token.
fn is_plain_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_PLAIN_KEY_LEN && key.bytes().all(is_token_byte)
}

/// Checks a sync group's `subject_prefix`: one or more dot-separated tokens, each 1 to 64 of
/// `[A-Za-z0-9_-]` (so no wildcards, no `$` system prefix, no empty tokens).
pub fn validate_prefix(prefix: &str) -> Result<(), SubjectError> {
    let invalid = |reason| {
        Err(SubjectError::InvalidPrefix {
            prefix: prefix.to_owned(),
            reason,
        })
    };
    if prefix.is_empty() {
        return invalid("it is empty");
    }
    for token in prefix.split('.') {
        if token.is_empty() {
            return invalid("it has an empty token (leading, trailing or double dot)");
        }
        if token.len() > MAX_PREFIX_TOKEN_LEN {
            return invalid("a token is longer than 64 bytes");
        }
        if token == "*" || token == ">" {
            return invalid("it contains a wildcard");
        }
        if !token.bytes().all(is_token_byte) {
            return invalid("a token contains a character other than A-Z, a-z, 0-9, '_' or '-'");
        }
    }
    Ok(())
}

/// Encodes a row key as one subject token (see the module docs for the rules).
pub fn encode_key(key: &str) -> Result<String, SubjectError> {
    if key.is_empty() {
        return Err(SubjectError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(SubjectError::KeyTooLong {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    if is_plain_key(key) {
        return Ok(key.to_owned());
    }
    let mut token = String::with_capacity(1 + MAX_ENCODED_LEN.min(key.len() * 4 / 3 + 4));
    token.push(ENCODED_MARK);
    URL_SAFE_NO_PAD.encode_string(key.as_bytes(), &mut token);
    Ok(token)
}

/// Decodes a key token produced by [`encode_key`] back into the key.
///
/// Only canonical tokens are accepted: a plain token must be 1 to 128 of `[A-Za-z0-9_-]`, and an
/// encoded token must be canonical unpadded base64url of a 1 to 512 byte UTF-8 key that would not
/// have been used as a plain token.
pub fn decode_key(token: &str) -> Result<String, SubjectError> {
    let invalid = |reason| {
        Err(SubjectError::InvalidKeyToken {
            token: token.to_owned(),
            reason,
        })
    };
    let Some(encoded) = token.strip_prefix(ENCODED_MARK) else {
        if token.is_empty() {
            return invalid("it is empty");
        }
        if !token.bytes().all(is_token_byte) {
            return invalid("it contains a character other than A-Z, a-z, 0-9, '_' or '-'");
        }
        if token.len() > MAX_PLAIN_KEY_LEN {
            return invalid("a plain token is longer than 128 bytes");
        }
        return Ok(token.to_owned());
    };
    if encoded.is_empty() {
        return invalid("nothing follows '='");
    }
    if encoded.len() > MAX_ENCODED_LEN {
        return invalid("the encoded key would be longer than 512 bytes");
    }
    // URL_SAFE_NO_PAD rejects padding and non-zero trailing bits, so every key has exactly one
    // accepted encoding.
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(encoded) else {
        return invalid("it is not canonical unpadded base64url");
    };
    if bytes.len() > MAX_KEY_LEN {
        return invalid("the encoded key is longer than 512 bytes");
    }
    let Ok(key) = String::from_utf8(bytes) else {
        return invalid("the encoded key is not UTF-8");
    };
    if is_plain_key(&key) {
        return invalid("the encoded key must be written as a plain token");
    }
    Ok(key)
}

/// The subject of one row: `<prefix>.<table>.<key-token>`.
///
/// `prefix` is taken as given; it must have passed [`validate_prefix`] (configuration loading
/// does that). Fails only for keys [`encode_key`] rejects.
pub fn row_subject(prefix: &str, table: &TableName, key: &str) -> Result<String, SubjectError> {
    let token = encode_key(key)?;
    let mut subject = String::with_capacity(prefix.len() + table.0.len() + token.len() + 2);
    subject.push_str(prefix);
    subject.push('.');
    subject.push_str(&table.0);
    subject.push('.');
    subject.push_str(&token);
    Ok(subject)
}

/// The filter matching every row of one table: `<prefix>.<table>.*`.
///
/// `prefix` must have passed [`validate_prefix`].
pub fn table_filter(prefix: &str, table: &TableName) -> String {
    format!("{prefix}.{table}.*")
}

/// The filter matching every row of every table of a sync group: `<prefix>.>`.
///
/// `prefix` must have passed [`validate_prefix`].
pub fn group_filter(prefix: &str) -> String {
    format!("{prefix}.>")
}

/// Splits a row subject into its table and decoded key.
///
/// Errors: [`SubjectError::NotInGroup`] when the subject does not start with `<prefix>.`,
/// [`SubjectError::InvalidSubject`] when the rest is not exactly two tokens,
/// [`SubjectError::InvalidTable`] / [`SubjectError::InvalidKeyToken`] for a bad table or key token.
pub fn parse_subject(prefix: &str, subject: &str) -> Result<(TableName, String), SubjectError> {
    let rest = subject
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .filter(|_| !prefix.is_empty());
    let Some(rest) = rest else {
        return Err(SubjectError::NotInGroup {
            subject: subject.to_owned(),
            prefix: prefix.to_owned(),
        });
    };
    let invalid = |reason| {
        Err(SubjectError::InvalidSubject {
            subject: subject.to_owned(),
            reason,
        })
    };
    let Some((table, token)) = rest.split_once('.') else {
        return invalid("it has no key token");
    };
    if token.contains('.') {
        return invalid("it has more than one token after the table");
    }
    let table = TableName::new(table)?;
    let key = decode_key(token)?;
    Ok((table, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        for ok in ["a", "products", "a_1", "x9", &"a".repeat(63)] {
            assert_eq!(TableName::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "1a",
            "_a",
            "A",
            "aB",
            "a-b",
            "a.b",
            "a b",
            "ä",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(TableName::new(bad), Err(SubjectError::InvalidTable { .. })),
                "{bad:?}"
            );
        }
        let t: TableName = "products".parse().unwrap();
        assert_eq!(t.to_string(), "products");
        assert_eq!(t, "products");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"products\"");
        assert_eq!(serde_json::from_str::<TableName>(&json).unwrap(), t);
        assert!(serde_json::from_str::<TableName>("\"Bad\"").is_err());
    }

    #[test]
    fn prefixes() {
        for ok in ["catalog", "a.b.c", "A-b_9", &"x".repeat(64), "svc.v1"] {
            validate_prefix(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "*",
            ">",
            "a.*",
            "a.>",
            "$JS",
            "a b",
            "ä",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(
                    validate_prefix(bad),
                    Err(SubjectError::InvalidPrefix { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn key_tokens() {
        assert_eq!(encode_key("A-1_b").unwrap(), "A-1_b");
        assert_eq!(encode_key("a.b").unwrap(), "=YS5i");
        assert_eq!(decode_key("=YS5i").unwrap(), "a.b");
        assert_eq!(encode_key(""), Err(SubjectError::EmptyKey));
        let long = "x".repeat(513);
        assert_eq!(
            encode_key(&long),
            Err(SubjectError::KeyTooLong { len: 513, max: 512 })
        );
        // 129 plain characters are too long for a plain token, so they are encoded.
        let k129 = "k".repeat(129);
        let t = encode_key(&k129).unwrap();
        assert!(t.starts_with('='));
        assert_eq!(decode_key(&t).unwrap(), k129);
        assert!(decode_key(&k129).is_err());
        // Non-canonical: a plain key written encoded.
        assert!(decode_key("=YWJj").is_err()); // "abc"
        assert!(decode_key("=").is_err());
        assert!(decode_key("").is_err());
        assert!(decode_key("=YS5i=").is_err()); // padding
        assert_eq!(decode_key("=YS4").unwrap(), "a.");
        assert!(decode_key("=YS5").is_err()); // non-zero trailing bits
        assert!(decode_key("=_w").is_err()); // 0xff: not UTF-8
        assert!(decode_key("a.b").is_err());
        assert!(decode_key("a*").is_err());
    }

    #[test]
    fn subjects() {
        let t = TableName::new("products").unwrap();
        assert_eq!(
            row_subject("catalog", &t, "A-1").unwrap(),
            "catalog.products.A-1"
        );
        assert_eq!(table_filter("catalog", &t), "catalog.products.*");
        assert_eq!(group_filter("catalog"), "catalog.>");
        let s = row_subject("svc.v1", &t, "a b.c").unwrap();
        assert_eq!(
            parse_subject("svc.v1", &s).unwrap(),
            (t.clone(), "a b.c".to_owned())
        );
        assert_eq!(
            parse_subject("catalog", "catalog.products.A-1").unwrap(),
            (t, "A-1".to_owned())
        );
        assert!(matches!(
            parse_subject("catalog", "other.products.A-1"),
            Err(SubjectError::NotInGroup { .. })
        ));
        assert!(matches!(
            parse_subject("catalog", "catalogx.products.A-1"),
            Err(SubjectError::NotInGroup { .. })
        ));
        assert!(matches!(
            parse_subject("catalog", "catalog"),
            Err(SubjectError::NotInGroup { .. })
        ));
        assert!(matches!(
            parse_subject("", ".products.A-1"),
            Err(SubjectError::NotInGroup { .. })
        ));
        assert!(matches!(
            parse_subject("catalog", "catalog.products"),
            Err(SubjectError::InvalidSubject { .. })
        ));
        assert!(matches!(
            parse_subject("catalog", "catalog.products.a.b"),
            Err(SubjectError::InvalidSubject { .. })
        ));
        assert!(matches!(
            parse_subject("catalog", "catalog.products."),
            Err(SubjectError::InvalidKeyToken { .. })
        ));
        assert!(matches!(
            parse_subject("catalog", "catalog.Products.a"),
            Err(SubjectError::InvalidTable { .. })
        ));
        assert!(matches!(
            parse_subject("catalog", "catalog.products.*"),
            Err(SubjectError::InvalidKeyToken { .. })
        ));
    }

    #[test]
    fn error_messages_say_what_is_allowed() {
        let msg = encode_key("").unwrap_err().to_string();
        assert!(msg.contains("1 to 512 bytes"), "{msg}");
        let msg = TableName::new("Bad").unwrap_err().to_string();
        assert!(msg.contains("lowercase"), "{msg}");
    }
}
