//! The README's configuration reference and the code agree.
//!
//! The key list is derived from the code, not written down here: `Config` (with one
//! `[tables.<name>]` entry) is serialized with serde and walked to dotted keys (`nats.url`,
//! `apply.batch_max`, `tables.<name>.key`, ...). Then:
//!
//! - every key of the code is a row of the README's `## Configuration` table;
//! - every key the table names exists in the code (no stale rows);
//! - every `JETSYNC_...` environment variable the section mentions is the environment form
//!   (`JETSYNC_` + upper-case key with `__` for `.`) of a key of the code, or one of the few
//!   variables that are documented as not being configuration keys.

use std::{collections::BTreeSet, path::PathBuf};

use jetsync::{Config, TableConfig, ENV_PREFIX, TOP_LEVEL_KEYS};

/// Placeholder the README uses for a table name.
const TABLE_PLACEHOLDER: &str = "<name>";

/// `JETSYNC_` variables the configuration section may mention that are not configuration keys.
const NOT_CONFIG_KEYS: &[(&str, &str)] = &[(
    "JETSYNC_CONFIG",
    "the applier's --config flag (names the file)",
)];

fn readme() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The text of the README's `## Configuration` section, up to the next `## ` heading.
fn configuration_section(readme: &str) -> &str {
    let start = readme
        .find("\n## Configuration\n")
        .expect("README.md has a `## Configuration` section");
    let body = &readme[start + 1..];
    let end = body[3..].find("\n## ").map_or(body.len(), |i| i + 3);
    &body[..end]
}

/// Every configuration key of the code, dotted, derived by serializing a `Config` that has one
/// table named [`TABLE_PLACEHOLDER`] and collecting the paths of its leaves.
fn code_keys() -> BTreeSet<String> {
    let mut config = Config::default();
    config
        .tables
        .insert(TABLE_PLACEHOLDER.to_owned(), TableConfig::default());
    let value = serde_json::to_value(&config).expect("Config serializes");
    let mut keys = BTreeSet::new();
    walk(&value, String::new(), &mut keys);
    keys
}

fn walk(value: &serde_json::Value, path: String, keys: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (name, child) in map {
                let child_path = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                walk(child, child_path, keys);
            }
        }
        // Scalars, `null` for unset options, and empty maps or lists are leaves.
        _ => {
            keys.insert(path);
        }
    }
}

/// The keys named in the first column of the section's table rows (`| \`a\`, \`b\` | ...`).
fn readme_table_keys(section: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for line in section.lines() {
        let Some(row) = line.trim().strip_prefix('|') else {
            continue;
        };
        let first = row.split('|').next().unwrap_or_default();
        // Every other piece between backticks is code.
        for (i, piece) in first.split('`').enumerate() {
            if i % 2 == 1 && !piece.is_empty() {
                keys.insert(piece.to_owned());
            }
        }
    }
    keys
}

/// The environment variable of a dotted key: `nats.tls.ca_file` → `JETSYNC_NATS__TLS__CA_FILE`.
fn env_form(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_uppercase().replace('.', "__"))
}

/// Whether `key` (from an environment variable, so a concrete table name) is `pattern`, where
/// a [`TABLE_PLACEHOLDER`] segment of the pattern matches any one segment.
fn matches_pattern(key: &str, pattern: &str) -> bool {
    let (key, pattern): (Vec<&str>, Vec<&str>) =
        (key.split('.').collect(), pattern.split('.').collect());
    key.len() == pattern.len()
        && key
            .iter()
            .zip(&pattern)
            .all(|(k, p)| *p == TABLE_PLACEHOLDER || k == p)
}

/// The `JETSYNC_...` variable names in `text` (`JETSYNC_<SECTION>__<KEY>` templates skipped).
fn env_vars(text: &str) -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(ENV_PREFIX) {
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..len];
        if name.len() > ENV_PREFIX.len() {
            vars.insert(name.to_owned());
        }
        rest = &tail[len.max(1)..];
    }
    vars
}

#[test]
fn the_key_walk_sees_the_whole_config() {
    let keys = code_keys();
    // Sanity of the derivation itself: nested sections, options and the table entry all show.
    for key in [
        "instance",
        "nats.url",
        "nats.password",
        "nats.tls.ca_file",
        "apply.batch_max",
        "tables.<name>.key",
        "http.listen",
    ] {
        assert!(keys.contains(key), "{key} missing from {keys:?}");
    }
    let top: BTreeSet<&str> = keys
        .iter()
        .map(|k| k.split('.').next().unwrap_or_default())
        .collect();
    let declared: BTreeSet<&str> = TOP_LEVEL_KEYS.iter().copied().collect();
    assert_eq!(
        top, declared,
        "TOP_LEVEL_KEYS (which decides which JETSYNC_ variables without `__` are configuration) \
         differs from the top-level keys of Config"
    );
}

#[test]
fn every_config_key_is_in_the_readme_table() {
    let readme = readme();
    let section = configuration_section(&readme);
    let documented = readme_table_keys(section);
    let missing: Vec<String> = code_keys()
        .into_iter()
        .filter(|k| !documented.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "configuration keys missing from the README's configuration table (add a row \
         `| \\`key\\` | default | meaning |` for each): {}",
        missing.join(", ")
    );
}

#[test]
fn every_readme_table_key_exists_in_the_code() {
    let readme = readme();
    let section = configuration_section(&readme);
    let code = code_keys();
    let stale: Vec<String> = readme_table_keys(section)
        .into_iter()
        .filter(|k| !code.contains(k))
        .collect();
    assert!(
        stale.is_empty(),
        "the README's configuration table names keys the code does not have: {}",
        stale.join(", ")
    );
}

#[test]
fn every_readme_environment_variable_is_a_config_key() {
    let readme = readme();
    let section = configuration_section(&readme);
    let code = code_keys();
    let vars = env_vars(section);
    assert!(
        vars.contains(&env_form("nats.url")),
        "the configuration section should show the environment form of a key, e.g. {}",
        env_form("nats.url")
    );
    let mut unknown = Vec::new();
    for var in &vars {
        if NOT_CONFIG_KEYS.iter().any(|(name, _)| name == var) {
            continue;
        }
        let key = var[ENV_PREFIX.len()..].to_lowercase().replace("__", ".");
        let known = code
            .iter()
            .any(|pattern| matches_pattern(&key, pattern) && env_form(&key) == *var);
        if !known {
            unknown.push(format!("{var} (would be key `{key}`)"));
        }
    }
    assert!(
        unknown.is_empty(),
        "the README's configuration section names environment variables that match no \
         configuration key: {}; known non-key variables: {:?}",
        unknown.join(", "),
        NOT_CONFIG_KEYS
    );
}

#[test]
fn helpers() {
    assert_eq!(env_form("nats.tls.ca_file"), "JETSYNC_NATS__TLS__CA_FILE");
    assert!(matches_pattern("tables.products.key", "tables.<name>.key"));
    assert!(!matches_pattern("tables.products", "tables.<name>.key"));
    assert_eq!(
        env_vars("`JETSYNC_<SECTION>__<KEY>` (`JETSYNC_NATS__URL`, JETSYNC_DATA_DIR)"),
        ["JETSYNC_DATA_DIR", "JETSYNC_NATS__URL"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    let table = "| key | default |\n|---|---|\n| `a.b`, `a.c` | `1` |\n";
    assert_eq!(
        readme_table_keys(table),
        ["a.b", "a.c"].into_iter().map(String::from).collect()
    );
}
