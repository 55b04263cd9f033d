//! Error classification: what a database error means for the batch (retry it, reject one
//! change, or stop), and messages that say what to fix without ever showing the password.
//!
//! The rule (DESIGN §5, Failures): an error caused by one event's content is
//! [`SinkError::Rejected`] (poison: parked, the rest flows on); a failure of the whole sink
//! (connection, server shutting down, out of disk, memory or connections, a serialization
//! failure or deadlock, a read-only standby) is [`SinkError::Unavailable`] and retried; only
//! problems an operator must fix outside any event (the fence table, the schema, the URL) are
//! [`SinkError::Fatal`]. What an event contains never yields `Fatal`.

use tokio_postgres::config::Host;

use super::FENCE_TABLE;
use crate::SinkError;

/// How a database error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// The whole sink is unavailable for now: retry the batch later.
    Unavailable,
    /// Caused by a change's content: reject that change.
    Rejected,
    /// The table may have changed under the cached description (undefined column or table,
    /// datatype mismatch, no usable unique index): look again, then reject the change.
    Schema,
    /// Needs an operator (when it is not a change's own statement that failed).
    Fatal,
}

pub(super) fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|code| code.code())
}

pub(super) fn classify(e: &tokio_postgres::Error) -> Class {
    match sqlstate(e) {
        Some(code) => classify_code(code),
        None if e.is_closed() => Class::Unavailable,
        None => {
            // I/O errors and timeouts (the connection is gone or going); anything else without
            // a SQLSTATE is a driver-side problem nobody can retry away.
            let io = std::iter::successors(std::error::Error::source(e), |cause| cause.source())
                .any(|cause| cause.is::<std::io::Error>());
            if io || e.to_string().starts_with("timeout") {
                Class::Unavailable
            } else {
                Class::Fatal
            }
        }
    }
}

/// The class of SQLSTATE `code`.
pub(super) fn classify_code(code: &str) -> Class {
    let class = code.get(..2).unwrap_or("");
    match (class, code) {
        // The database was dropped under the applier.
        (_, "57P04") => Class::Fatal,
        // Connection exceptions (08), transaction rollbacks: serialization failure 40001,
        // deadlock 40P01 (40), insufficient resources: disk full 53100, out of memory 53200,
        // too many connections 53300 (53), operator intervention: admin/crash shutdown 57P01/
        // 57P02, cannot connect now 57P03, query canceled 57014 (57), system and internal
        // errors, I/O and corruption (58, XX).
        ("08" | "40" | "53" | "57" | "58" | "XX", _) => Class::Unavailable,
        // Read-only transaction (a hot standby after a failover), lock not available, object
        // in use.
        (_, "25006" | "55P03" | "55006") => Class::Unavailable,
        // The table changed since it was described: undefined table 42P01, undefined column
        // 42703, datatype mismatch 42804, no unique index for ON CONFLICT 42P10, missing
        // operator or cast 42883/42846, wrong object type (a view) 42809, feature not
        // supported (a view or a foreign table) 0A000.
        (_, "42P01" | "42703" | "42804" | "42P10" | "42883" | "42846" | "42809" | "0A000") => {
            Class::Schema
        }
        // Data exceptions (22: invalid text representation, numeric out of range, string too
        // long), integrity constraint violations (23), program limits (54: index row too big
        // 54000, too many columns 54011), a row touched twice by ON CONFLICT 21000, permission
        // denied on one table 42501, exceptions raised by the service's triggers (P0, 38, 39,
        // 2F), an ambiguous parameter 42P18.
        ("22" | "23" | "54" | "P0" | "38" | "39" | "2F", _) => Class::Rejected,
        (_, "21000" | "42501" | "42P18") => Class::Rejected,
        _ => Class::Fatal,
    }
}

/// The error with its causes on one line (tokio-postgres' `Display` leaves the cause out). A
/// database error reads `ERROR: message; DETAIL: …; HINT: … (SQLSTATE code)`.
pub(super) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(db) = e
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::as_db_error)
    {
        let mut out = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            out.push_str("; DETAIL: ");
            out.push_str(detail);
        }
        if let Some(hint) = db.hint() {
            out.push_str("; HINT: ");
            out.push_str(hint);
        }
        out.push_str(&format!(" (SQLSTATE {})", db.code().code()));
        return out.replace('\n', " ");
    }
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// What an operator should do about a fatal error.
fn advice(code: Option<&str>, schema: &str) -> String {
    match code {
        Some("42501") => format!(
            "grant the user of sink.url SELECT, INSERT, UPDATE, DELETE on the synced tables and \
             on {schema}.{FENCE_TABLE}"
        ),
        Some("3F000") => format!("schema `{schema}` does not exist: create it or fix sink.schema"),
        Some("57P04") => "the database was dropped: recreate it and restart the applier".to_owned(),
        _ => "check the database and the synced tables, then restart the applier".to_owned(),
    }
}

/// The sink error for an operation that is not one change's statement (connecting, the fence,
/// BEGIN, COMMIT, reading the catalog): transient errors are Unavailable, anything else needs an
/// operator.
pub(super) fn op_error(
    target: &str,
    schema: &str,
    what: &str,
    e: &tokio_postgres::Error,
) -> SinkError {
    match classify(e) {
        Class::Unavailable => SinkError::Unavailable {
            reason: format!("cannot {what} Postgres at {target}: {}", describe(e)),
        },
        Class::Rejected | Class::Schema | Class::Fatal => SinkError::Fatal {
            reason: format!(
                "cannot {what} Postgres at {target}: {}; {}",
                describe(e),
                advice(sqlstate(e), schema)
            ),
        },
    }
}

/// The configuration error of an unparseable `sink.url`: starts with `sink.url: ` (the CLI maps
/// that prefix to exit code 2) and never contains the password, even when the driver's message
/// quotes part of the URL.
pub(super) fn url_error(url: &str, e: &tokio_postgres::Error) -> SinkError {
    let mut reason = describe(e);
    if let Some(password) = url_password(url) {
        reason = reason.replace(password, "<redacted>");
    }
    SinkError::Fatal {
        reason: format!(
            "sink.url: not a valid Postgres connection URL ({reason}); expected \
             postgres://user:password@host:5432/database"
        ),
    }
}

/// The password of a `scheme://user:password@host` URL or a `password=...` key/value string,
/// as written, when one can be found without parsing the rest.
fn url_password(url: &str) -> Option<&str> {
    if let Some((_, rest)) = url.split_once("://") {
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let userinfo = authority.rsplit_once('@')?.0;
        return userinfo
            .split_once(':')
            .map(|(_, p)| p)
            .filter(|p| !p.is_empty());
    }
    let start = url.find("password=")? + "password=".len();
    let value = url[start..].split_whitespace().next()?;
    Some(value.trim_matches('\'')).filter(|p| !p.is_empty())
}

/// The sink error for a failed connection attempt.
pub(super) fn connect_error(
    target: &str,
    config: &tokio_postgres::Config,
    e: &tokio_postgres::Error,
) -> SinkError {
    let user = config.get_user().unwrap_or("(default user)");
    let database = config.get_dbname().unwrap_or(user);
    let fatal = |reason: String| SinkError::Fatal { reason };
    match sqlstate(e) {
        Some("28P01" | "28000") => fatal(format!(
            "Postgres at {target} refused user `{user}`: {}; fix the user and password in \
             sink.url (JETSYNC_SINK__URL) or the server's pg_hba.conf",
            describe(e)
        )),
        Some("3D000") => fatal(format!(
            "database `{database}` does not exist on the Postgres server at {target}: create \
             it or fix the database name in sink.url (JETSYNC_SINK__URL)"
        )),
        Some(code) if classify_code(code) == Class::Unavailable => SinkError::Unavailable {
            reason: format!("cannot connect to Postgres at {target}: {}", describe(e)),
        },
        Some(_) => fatal(format!(
            "cannot connect to Postgres at {target}: {}; check sink.url",
            describe(e)
        )),
        None => match classify(e) {
            Class::Unavailable => SinkError::Unavailable {
                reason: format!("cannot connect to Postgres at {target}: {}", describe(e)),
            },
            _ => fatal(format!(
                "cannot connect to Postgres at {target}: {}; check sink.url (a password the \
                 server asks for, TLS, which this sink does not support)",
                describe(e)
            )),
        },
    }
}

/// `user@host:port/database` of a connection configuration, without the password.
pub(super) fn describe_target(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(index, host)| {
            let host = match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            let port = config
                .get_ports()
                .get(index)
                .or_else(|| config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost:5432".to_owned()
    } else {
        hosts.join(",")
    };
    let user = config.get_user().unwrap_or("");
    let database = config.get_dbname().unwrap_or(user);
    if user.is_empty() {
        format!("{hosts}/{database}")
    } else {
        format!("{user}@{hosts}/{database}")
    }
}
