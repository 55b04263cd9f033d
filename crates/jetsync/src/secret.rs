//! A string that must never reach a log line, an error message or serialized output.
//!
//! Passwords, tokens and database URLs with embedded credentials are held in a [`Secret`].
//! It deserializes from a plain string, but its `Debug`, `Display` and `Serialize` forms are
//! all `<redacted>`, so printing or dumping a whole [`Config`](crate::config::Config) is safe.
//! The value is reachable only through [`Secret::expose`], which makes every place that hands
//! it on (to async-nats, to a Postgres driver) easy to find.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What every rendering of a [`Secret`] shows instead of the value.
const REDACTED: &str = "<redacted>";

/// A secret string (password, token, URL with credentials), redacted whenever rendered.
///
/// Serializing a `Secret` writes `"<redacted>"`: a serialized configuration is safe to show,
/// but cannot be read back to recover the secret.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value itself. Call it only where the value is handed to the party that needs
    /// it, never to build a message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_redacted_everywhere() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(format!("{secret:#?}"), "<redacted>");
        assert_eq!(secret.to_string(), "<redacted>");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"<redacted>\"");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn deserializes_from_a_string() {
        let secret: Secret = serde_json::from_str("\"s3cr3t\"").unwrap();
        assert_eq!(secret.expose(), "s3cr3t");
        assert_eq!(secret, Secret::from("s3cr3t"));
        assert!(serde_json::from_str::<Secret>("42").is_err());
    }

    #[test]
    fn nested_in_debug_output_stays_redacted() {
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            password: Option<Secret>,
        }
        let holder = Holder {
            password: Some(Secret::new("hunter2")),
        };
        let rendered = format!("{holder:?}");
        assert!(!rendered.contains("hunter2"), "{rendered}");
        assert!(rendered.contains("<redacted>"));
    }
}
