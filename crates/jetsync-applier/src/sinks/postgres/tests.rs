//! Unit tests of planning, conversions and error classes, and tests against a real server
//! (`JETSYNC_TEST_POSTGRES`).

use std::collections::HashMap;
use std::sync::Arc;

use jetsync::{Row, UnknownColumns, Value};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls};

use super::errors::{classify_code, describe_target, Class};
use super::plan::{plan, upsert_sql, ColumnInfo, Planned, TableInfo};
use super::types::{convert, date_text, key_cell, timestamp_text, Cell, Kind};
use super::*;
use crate::sinks::sql::quote;
use crate::TableDigest;

fn column(name: &str, kind: Kind, type_name: &str) -> (ColumnInfo, bool) {
    (
        ColumnInfo {
            name: name.to_owned(),
            kind,
            type_name: type_name.to_owned(),
            generated: false,
            identity: false,
        },
        false,
    )
}

fn table(name: &str, key_kind: Kind, generation: u64) -> TableInfo {
    let key_type = if key_kind == Kind::Int8 {
        "bigint"
    } else {
        "text"
    };
    let mut columns = vec![
        (column("id", key_kind, key_type).0, true),
        column("name", Kind::Text, "text"),
        column("price", Kind::Numeric, "numeric(10,2)"),
        column("qty", Kind::Int4, "integer"),
        column("Mixed", Kind::Bool, "boolean"),
    ];
    let mut total = column("total", Kind::Int8, "bigint");
    total.0.generated = true;
    columns.push(total);
    TableInfo::new(name, "id", columns, generation)
}

fn tables() -> HashMap<String, Arc<TableInfo>> {
    [
        ("nums".to_owned(), Arc::new(table("nums", Kind::Int8, 1))),
        ("texts".to_owned(), Arc::new(table("texts", Kind::Text, 1))),
    ]
    .into_iter()
    .collect()
}

fn options() -> PostgresOptions {
    let mut options = PostgresOptions::new("postgres://u:secret@localhost/db");
    for table in ["nums", "texts", "loose", "keyless"] {
        options
            .key_columns
            .insert(table.to_owned(), "id".to_owned());
    }
    options
}

/// [`plan`] in schema `public`.
fn plan_public(
    changes: &[Change],
    tables: &HashMap<String, Arc<TableInfo>>,
    options: &PostgresOptions,
    grouped: bool,
) -> Planned {
    plan(changes, tables, options, "public", grouped)
}

fn up(seq: u64, table: &str, key: &str, pairs: &[(&str, Value)]) -> Change {
    Change {
        seq,
        table: table.to_owned(),
        key: key.to_owned(),
        op: jetsync::Change::Upsert(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        ),
    }
}

fn del(seq: u64, table: &str, key: &str) -> Change {
    Change {
        seq,
        table: table.to_owned(),
        key: key.to_owned(),
        op: jetsync::Change::Delete,
    }
}

fn shapes(planned: &Planned) -> Vec<(usize, usize)> {
    planned
        .statements
        .iter()
        .map(|s| (s.first, s.changes))
        .collect()
}

#[test]
fn options_debug_hides_the_url() {
    let text = format!("{:?}", options());
    assert!(!text.contains("secret"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
}

#[test]
fn consecutive_changes_of_one_shape_share_a_statement() {
    let changes: Vec<Change> = (0..1000u64)
        .map(|i| {
            up(
                i + 1,
                "nums",
                &(i % 800).to_string(),
                &[("name", Value::from("x")), ("qty", Value::I64(i as i64))],
            )
        })
        .collect();
    let planned = plan_public(&changes, &tables(), &options(), true);
    assert!(planned.refusal.is_none());
    // Split only where key 0 comes again.
    assert_eq!(shapes(&planned), [(0, 800), (800, 200)]);
    let statement = &planned.statements[0];
    assert_eq!(statement.columns.len(), 3);
    assert_eq!(
        statement.types,
        [Type::INT8_ARRAY, Type::TEXT_ARRAY, Type::INT4_ARRAY]
    );
    // Every synced column is set: the carried ones from the event, the others to their
    // default; the generated column is left to the database.
    assert_eq!(
        statement.sql,
        "INSERT INTO \"public\".\"nums\" (\"id\", \"name\", \"qty\") OVERRIDING SYSTEM VALUE \
         SELECT u.c0, u.c1, u.c2 FROM unnest($1, $2, $3) AS u(c0, c1, c2) \
         ON CONFLICT (\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \
         \"price\" = DEFAULT, \"qty\" = EXCLUDED.\"qty\", \"Mixed\" = DEFAULT"
    );
    // A merging table sets only the carried columns.
    let mut merging = options();
    merging.merge_tables.insert("nums".to_owned());
    let merged = plan_public(&changes, &tables(), &merging, true);
    assert_eq!(
        merged.statements[0].sql,
        "INSERT INTO \"public\".\"nums\" (\"id\", \"name\", \"qty\") OVERRIDING SYSTEM VALUE \
         SELECT u.c0, u.c1, u.c2 FROM unnest($1, $2, $3) AS u(c0, c1, c2) \
         ON CONFLICT (\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \
         \"qty\" = EXCLUDED.\"qty\""
    );
    let ungrouped = plan_public(&changes, &tables(), &options(), false);
    assert_eq!(ungrouped.statements.len(), 1000);
}

#[test]
fn groups_split_at_table_op_and_column_set_changes() {
    let changes = vec![
        up(1, "nums", "1", &[("name", Value::from("a"))]),
        up(2, "nums", "2", &[("name", Value::from("b"))]),
        up(3, "nums", "3", &[("qty", Value::I64(1))]), // other columns
        up(4, "texts", "3", &[("qty", Value::I64(1))]), // other table
        del(5, "texts", "a"),
        del(6, "texts", "a"), // deletes may repeat a key
        del(7, "nums", "4"),
        up(8, "nums", "4", &[("qty", Value::I64(2))]),
        up(9, "nums", "4", &[("qty", Value::I64(3))]), // same key again
        up(
            10,
            "nums",
            "5",
            &[("total", Value::I64(9)), ("qty", Value::I64(3))],
        ),
    ];
    let planned = plan_public(&changes, &tables(), &options(), true);
    assert_eq!(
        shapes(&planned),
        [(0, 2), (2, 1), (3, 1), (4, 2), (6, 1), (7, 1), (8, 2)]
    );
    // The generated column is not written.
    assert_eq!(planned.statements[6].columns.len(), 2);
    let delete = &planned.statements[3];
    assert_eq!(
        delete.sql,
        "DELETE FROM \"public\".\"texts\" WHERE \"id\" IN (SELECT u.c0 FROM unnest($1) AS u(c0))"
    );
}

#[test]
fn text_sent_values_are_cast_to_the_column_type() {
    let changes = vec![up(1, "texts", "k", &[("price", Value::F64(1.5))])];
    let planned = plan_public(&changes, &tables(), &options(), true);
    assert!(
        planned.statements[0]
            .sql
            .contains("SELECT u.c0, u.c1::numeric(10,2) FROM"),
        "{}",
        planned.statements[0].sql
    );
    assert_eq!(
        planned.statements[0].columns[1],
        [Cell::Text("1.5".to_owned())]
    );
}

#[test]
fn refusals_stop_planning_with_the_index() {
    let mut options = options();
    let changes = vec![
        up(1, "nums", "1", &[("name", Value::from("a"))]),
        up(2, "nums", "2", &[("nope", Value::from("b"))]),
        up(3, "nums", "3", &[("name", Value::from("c"))]),
    ];
    let planned = plan_public(&changes, &tables(), &options, true);
    let refusal = planned.refusal.as_ref().unwrap();
    assert_eq!(refusal.index, 1);
    assert!(refusal.reason.contains("`nope`"), "{}", refusal.reason);
    assert_eq!(shapes(&planned), [(0, 1)]);

    options.unknown_columns = UnknownColumns::Ignore;
    let planned = plan_public(&changes, &tables(), &options, true);
    assert!(planned.refusal.is_none());
    assert_eq!(shapes(&planned), [(0, 1), (1, 1), (2, 1)]);
}

#[test]
fn bad_changes_are_refused() {
    let cases = [
        (up(1, "loose", "1", &[]), "does not exist"),
        (up(1, "missing", "1", &[]), "not synced here"),
        (up(1, "jetsync_offsets", "1", &[]), "reserved"),
        (up(1, "nums", "x", &[]), "subject key"),
        (del(1, "nums", "x"), "subject key"),
        (
            up(1, "nums", "1", &[("id", Value::I64(2))]),
            "does not match",
        ),
        (
            up(1, "texts", "a", &[("id", Value::from("b"))]),
            "does not match",
        ),
        (
            up(1, "nums", "1", &[("qty", Value::I64(1 << 40))]),
            "out of range",
        ),
        (
            up(1, "nums", "1", &[("qty", Value::from("1.5"))]),
            "not an integer",
        ),
        (
            up(1, "nums", "1", &[("price", Value::from("abc"))]),
            "not a number",
        ),
        (
            up(1, "nums", "1", &[("name", Value::from("a\0b"))]),
            "U+0000",
        ),
        (
            up(
                1,
                "nums",
                "1",
                &[("mixed", Value::Bool(true)), ("MIXED", Value::Bool(true))],
            ),
            "both name",
        ),
    ];
    for (change, expected) in cases {
        let planned = plan_public(std::slice::from_ref(&change), &tables(), &options(), true);
        let reason = &planned.refusal.as_ref().expect("refused").reason;
        assert!(reason.contains(expected), "{change:?}: {reason}");
    }
    // Keys that match once converted are fine; columns match case-insensitively when unique.
    let ok = [
        up(
            1,
            "nums",
            "7",
            &[("id", Value::I64(7)), ("mixed", Value::Bool(true))],
        ),
        up(1, "nums", "7", &[("id", Value::from("7"))]),
        up(1, "texts", "7", &[("ID", Value::I64(7))]),
    ];
    for change in ok {
        let planned = plan_public(std::slice::from_ref(&change), &tables(), &options(), true);
        assert!(
            planned.refusal.is_none(),
            "{change:?}: {:?}",
            planned.refusal
        );
    }
}

#[test]
fn tables_without_a_usable_key_reject_their_changes() {
    let mut tables = tables();
    let columns = vec![
        column("id", Kind::Int8, "bigint"),
        column("v", Kind::Text, "text"),
    ];
    tables.insert(
        "loose".to_owned(),
        Arc::new(TableInfo::new("loose", "id", columns.clone(), 1)),
    );
    tables.insert(
        "keyless".to_owned(),
        Arc::new(TableInfo::new("keyless", "code", columns, 1)),
    );
    let planned = plan_public(&[del(1, "loose", "1")], &tables, &options(), true);
    let refusal = planned.refusal.expect("refused");
    assert_eq!(refusal.index, 0);
    assert!(refusal.reason.contains("UNIQUE"), "{}", refusal.reason);
    let mut options = options();
    options
        .key_columns
        .insert("keyless".to_owned(), "code".to_owned());
    let planned = plan_public(&[del(1, "keyless", "1")], &tables, &options, true);
    let reason = planned.refusal.expect("refused").reason;
    assert!(reason.contains("no key column `code`"), "{reason}");
}

#[test]
fn only_configured_tables_are_written() {
    let mut tables = tables();
    tables.insert(
        "service_only".to_owned(),
        Arc::new(table("service_only", Kind::Int8, 1)),
    );
    for (change, needle) in [
        (up(1, "service_only", "1", &[]), "not synced here"),
        (del(1, "service_only", "1"), "not synced here"),
        (up(1, "jetsync_offsets", "CATALOG", &[]), "reserved"),
        (up(1, "pg_class", "1", &[]), "reserved"),
        (up(1, "Jetsync_x", "1", &[]), "reserved"),
    ] {
        let planned = plan_public(std::slice::from_ref(&change), &tables, &options(), true);
        let reason = planned.refusal.expect("refused").reason;
        assert!(reason.contains(needle), "{change:?}: {reason}");
    }
}

#[test]
fn keys_are_accepted_only_in_canonical_spelling() {
    use Kind as K;
    let ok = [
        (K::Int8, "bigint", "42", Cell::I64(42)),
        (K::Int8, "bigint", "-7", Cell::I64(-7)),
        (K::Int8, "bigint", "0", Cell::I64(0)),
        (K::Int4, "integer", "2147483647", Cell::I32(i32::MAX)),
        (
            K::Uuid,
            "uuid",
            "67e55044-10b1-426f-9247-bb680e5fe0c8",
            Cell::Uuid(uuid::Uuid::parse_str("67e55044-10b1-426f-9247-bb680e5fe0c8").unwrap()),
        ),
        (K::Numeric, "numeric", "12.5", Cell::Text("12.5".into())),
        (K::Numeric, "numeric", "-0.25", Cell::Text("-0.25".into())),
        (K::Numeric, "numeric(10,2)", "3", Cell::Text("3".into())),
        (K::Bool, "boolean", "true", Cell::Bool(true)),
        (K::Bool, "boolean", "false", Cell::Bool(false)),
        (
            K::Date,
            "date",
            "2024-02-29",
            Cell::Text("2024-02-29".into()),
        ),
        (K::Text, "text", " spaced ", Cell::Text(" spaced ".into())),
        (
            K::Text,
            "character varying(10)",
            "a",
            Cell::Text("a".into()),
        ),
    ];
    for (kind, type_name, key, cell) in ok {
        assert_eq!(
            key_cell(kind, type_name, key),
            Ok(cell),
            "{type_name} {key:?}"
        );
    }
    let bad = [
        (K::Int8, "bigint", "042"),
        (K::Int8, "bigint", "+42"),
        (K::Int8, "bigint", " 42"),
        (K::Int8, "bigint", "42 "),
        (K::Int8, "bigint", "4.2e1"),
        (K::Int8, "bigint", "-0"),
        (K::Int4, "integer", "4294967296"),
        (K::Uuid, "uuid", "67E55044-10B1-426F-9247-BB680E5FE0C8"),
        (K::Uuid, "uuid", "{67e55044-10b1-426f-9247-bb680e5fe0c8}"),
        (K::Uuid, "uuid", "67e5504410b1426f9247bb680e5fe0c8"),
        (K::Numeric, "numeric", "012.5"),
        (K::Numeric, "numeric", "12.50"),
        (K::Numeric, "numeric", "+12.5"),
        (K::Numeric, "numeric", "1e3"),
        (K::Numeric, "numeric", "12."),
        (K::Numeric, "numeric", "-0"),
        (K::Numeric, "numeric", "NaN"),
        (K::Numeric, "numeric(10,2)", "1.234"),
        (K::Bool, "boolean", "t"),
        (K::Bool, "boolean", "TRUE"),
        (K::Bool, "boolean", "1"),
        (K::Date, "date", "2024-2-29"),
        (K::Date, "date", "2024-02-29T00:00:00Z"),
        (K::Text, "character(5)", "a "),
        (K::Text, "character varying(3)", "ab "),
        (K::Text, "name", &"x".repeat(64)),
        (K::Float8, "double precision", "1.5"),
        (
            K::Timestamptz,
            "timestamp with time zone",
            "2024-01-01T00:00:00Z",
        ),
        (K::Other, "citext", "abc"),
    ];
    for (kind, type_name, key) in bad {
        assert!(
            key_cell(kind, type_name, key).is_err(),
            "{type_name} {key:?} accepted"
        );
    }
    // Through planning: the change is refused, naming the canonical spelling.
    let planned = plan_public(&[up(1, "nums", "042", &[])], &tables(), &options(), true);
    let reason = planned.refusal.expect("refused").reason;
    assert!(reason.contains("\"42\""), "{reason}");
}

#[test]
fn conversions() {
    use Kind as K;
    let ok = [
        (K::Int2, Value::I64(-32768), Cell::I16(-32768)),
        (K::Int4, Value::from(" 42 "), Cell::I32(42)),
        (K::Int8, Value::F64(3.0), Cell::I64(3)),
        (K::Int8, Value::Null, Cell::Null),
        (K::Float4, Value::F64(0.5), Cell::F32(0.5)),
        (K::Float8, Value::I64(2), Cell::F64(2.0)),
        (K::Float8, Value::from("1e3"), Cell::F64(1000.0)),
        (K::Numeric, Value::I64(12), Cell::Text("12".into())),
        (K::Numeric, Value::F64(0.1), Cell::Text("0.1".into())),
        (
            K::Numeric,
            Value::from("123.4500"),
            Cell::Text("123.4500".into()),
        ),
        (K::Numeric, Value::F64(f64::NAN), Cell::Text("NaN".into())),
        (K::Bool, Value::Bool(true), Cell::Bool(true)),
        (K::Bool, Value::I64(0), Cell::Bool(false)),
        (K::Bool, Value::from("t"), Cell::Bool(true)),
        (K::Text, Value::from("x"), Cell::Text("x".into())),
        (K::Text, Value::I64(5), Cell::Text("5".into())),
        (K::Bytea, Value::Bytes(vec![0, 1]), Cell::Bytes(vec![0, 1])),
        (
            K::Jsonb,
            Value::Json(serde_json::json!({"a": 1})),
            Cell::Json(serde_json::json!({"a": 1})),
        ),
        (
            K::Json,
            Value::from("[1,2]"),
            Cell::Json(serde_json::json!([1, 2])),
        ),
        (
            K::Json,
            Value::from("plain"),
            Cell::Json(serde_json::json!("plain")),
        ),
        (K::Jsonb, Value::I64(3), Cell::Json(serde_json::json!(3))),
        (
            K::Timestamptz,
            Value::from("2024-05-01T14:00:00.250+02:00"),
            Cell::Text("2024-05-01T12:00:00.250Z".into()),
        ),
        (
            K::Timestamptz,
            Value::from("2024-05-01 12:00:00"),
            Cell::Text("2024-05-01T12:00:00Z".into()),
        ),
        (
            K::Timestamptz,
            Value::I64(1_714_564_800_123),
            Cell::Text("2024-05-01T12:00:00.123Z".into()),
        ),
        (
            K::Timestamptz,
            Value::from("Infinity"),
            Cell::Text("infinity".into()),
        ),
        (
            K::Timestamp,
            Value::from("2024-05-01T14:00:00+02:00"),
            Cell::Text("2024-05-01T12:00:00".into()),
        ),
        (
            K::Timestamp,
            Value::from("2024-05-01T12:00:00.5"),
            Cell::Text("2024-05-01T12:00:00.500".into()),
        ),
        (
            K::Date,
            Value::from("2024-05-01"),
            Cell::Text("2024-05-01".into()),
        ),
        (
            K::Date,
            Value::I64(1_714_564_800_123),
            Cell::Text("2024-05-01".into()),
        ),
        (
            K::Date,
            Value::from("2024-05-01T23:30:00-02:00"),
            Cell::Text("2024-05-02".into()),
        ),
        (
            K::Uuid,
            Value::from("67E55044-10B1-426F-9247-BB680E5FE0C8"),
            Cell::Uuid(uuid::Uuid::parse_str("67e55044-10b1-426f-9247-bb680e5fe0c8").unwrap()),
        ),
        (K::Other, Value::from("{1,2}"), Cell::Text("{1,2}".into())),
    ];
    for (kind, value, expected) in ok {
        assert_eq!(convert(kind, &value), Ok(expected), "{kind:?} {value:?}");
    }
    let bad = [
        (K::Int2, Value::I64(40_000)),
        (K::Int4, Value::from("12a")),
        (K::Int8, Value::F64(1.5)),
        (K::Int8, Value::Bool(true)),
        (K::Float4, Value::F64(1e300)),
        (K::Float8, Value::Bytes(vec![])),
        (K::Numeric, Value::Bool(true)),
        (K::Bool, Value::I64(2)),
        (K::Bool, Value::from("yes please")),
        (K::Text, Value::Bytes(vec![1])),
        (K::Bytea, Value::from("x")),
        (K::Json, Value::Bytes(vec![1])),
        (K::Jsonb, Value::F64(f64::INFINITY)),
        (K::Jsonb, Value::from("\"a\\u0000b\"")),
        (K::Timestamptz, Value::from("yesterday")),
        (K::Timestamp, Value::Bool(true)),
        (K::Date, Value::from("05/01/2024")),
        (K::Uuid, Value::from("not-a-uuid")),
        (K::Uuid, Value::I64(1)),
    ];
    for (kind, value) in bad {
        assert!(
            convert(kind, &value).is_err(),
            "{kind:?} {value:?} converted"
        );
    }
}

#[test]
fn read_back_of_binary_times() {
    // 2024-05-01T12:00:00.5Z is 767_880_000.5 s after 2000-01-01.
    let micros: i64 = 767_880_000_500_000;
    assert_eq!(
        timestamp_text(&micros.to_be_bytes(), true).unwrap(),
        "2024-05-01T12:00:00.500Z"
    );
    assert_eq!(
        timestamp_text(&micros.to_be_bytes(), false).unwrap(),
        "2024-05-01T12:00:00.500"
    );
    assert_eq!(
        timestamp_text(&i64::MAX.to_be_bytes(), true).unwrap(),
        "infinity"
    );
    assert_eq!(date_text(&0i32.to_be_bytes()).unwrap(), "2000-01-01");
    assert_eq!(date_text(&(-1i32).to_be_bytes()).unwrap(), "1999-12-31");
    assert_eq!(date_text(&i32::MIN.to_be_bytes()).unwrap(), "-infinity");
}

/// Whether an error of SQLSTATE `code` in a change's own statement ends as a Rejected change
/// (Schema errors are looked at again, then rejected).
fn rejects(code: &str) -> bool {
    matches!(classify_code(code), Class::Rejected | Class::Schema)
}

#[test]
fn content_errors_reject_the_change() {
    for code in [
        "54000", // program_limit_exceeded: index row size too big
        "54011", // too many columns
        "54001", // statement too complex
        "22P02", // invalid text representation
        "22003", // numeric value out of range
        "22001", // string data right truncation (too long)
        "22007", // invalid datetime format
        "22021", // character not in repertoire
        "23505", // unique violation
        "23503", // foreign key violation
        "23502", // not null violation
        "23514", // check violation
        "23P01", // exclusion violation
        "42501", // insufficient privilege on one table
        "42P01", // undefined table
        "42703", // undefined column
        "42809", // wrong object type (a view)
        "42P10", // no unique index matching ON CONFLICT (no usable key)
        "0A000", // feature not supported (a view)
        "42804", // datatype mismatch
        "21000", // a row touched twice by ON CONFLICT
        "P0001", // raise_exception in a trigger
        "38001", // external routine exception
    ] {
        assert!(rejects(code), "{code} is not a content error");
    }
    assert_eq!(
        classify_code("42P01"),
        Class::Schema,
        "looked at again first"
    );
    assert_eq!(classify_code("54000"), Class::Rejected);
}

#[test]
fn whole_sink_failures_are_retried() {
    for code in [
        "08000", "08003", "08006", "08001", "08P01", // connection exceptions
        "57P01", // admin shutdown
        "57P02", // crash shutdown
        "57P03", // cannot connect now
        "57014", // query canceled (statement_timeout)
        "53000", "53100", // disk full
        "53200", // out of memory
        "53300", // too many connections
        "40001", // serialization failure
        "40P01", // deadlock detected
        "25006", // read-only transaction (hot standby)
        "55P03", // lock not available
        "58030", // I/O error
        "XX001", // data corrupted
    ] {
        assert_eq!(classify_code(code), Class::Unavailable, "{code}");
    }
}

#[test]
fn operator_errors_are_fatal_outside_statements() {
    for code in ["57P04", "42601", "3F000", "28P01"] {
        assert_eq!(classify_code(code), Class::Fatal, "{code}");
    }
}

#[test]
fn url_errors_name_the_key_and_hide_the_password() {
    for url in [
        "postgres://app:hunter2@db:notaport/shop",
        "postgres://app:hunter2@db/shop?sslmode=bogus",
        "host=db password=hunter2 port=x",
    ] {
        let e: tokio_postgres::Error = url.parse::<tokio_postgres::Config>().unwrap_err();
        let SinkError::Fatal { reason } = errors::url_error(url, &e) else {
            panic!("not fatal");
        };
        assert!(reason.starts_with("sink.url: "), "{reason}");
        assert!(!reason.contains("hunter2"), "{reason}");
    }
}

#[test]
fn names_are_quoted() {
    assert_eq!(quote(r#"we"ird"#), r#""we""ird""#);
    let mut info = table("t\"x", Kind::Text, 1);
    info.columns[1].name = "a\"; DROP TABLE x; --".to_owned();
    let sql = upsert_sql("s\"", &info, &[0, 1], false);
    assert!(
        sql.starts_with(r#"INSERT INTO "s"""."t""x" ("id", "a""; DROP TABLE x; --")"#),
        "{sql}"
    );
}

// ---- against a real server ------------------------------------------------------------
//
// `JETSYNC_TEST_POSTGRES`, by default `postgres://postgres@127.0.0.1:5432/test`. Every test
// works in a schema of its own, `jsu_<pid>_<n>`, dropped by a guard at the end of the test
// (also when it fails); schemas of test processes that died are dropped by the next run.

const PG_DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const G: &str = "CATALOG";

static NEXT_SCHEMA: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn pg_url() -> String {
    std::env::var("JETSYNC_TEST_POSTGRES").unwrap_or_else(|_| PG_DEFAULT_URL.to_owned())
}

async fn pg_client() -> Client {
    let (client, connection) = tokio_postgres::connect(&pg_url(), NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("cannot connect to the test Postgres (set JETSYNC_TEST_POSTGRES): {e:?}")
        });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A schema of the test's own, dropped when the guard goes out of scope.
struct PgSchema {
    name: String,
}

impl PgSchema {
    /// A fresh schema with `ddl` run in it; the client's search_path points at it.
    async fn new(ddl: &str) -> (PgSchema, Client) {
        let client = pg_client().await;
        let leftovers = client
            .query(
                "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'jsu\\_%'",
                &[],
            )
            .await
            .unwrap();
        for row in leftovers {
            let name: String = row.get(0);
            let pid = name.split('_').nth(1).and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != std::process::id()
                    && !std::path::Path::new(&format!("/proc/{pid}")).exists()
                {
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(&name)))
                        .await;
                }
            }
        }
        let name = format!(
            "jsu_{}_{}",
            std::process::id(),
            NEXT_SCHEMA.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {0}; SET search_path TO {0}; {ddl}",
                quote(&name)
            ))
            .await
            .expect("test DDL");
        (PgSchema { name }, client)
    }

    /// A sink on this schema whose configured tables are `tables` (`(table, key column)`).
    async fn sink(&self, tables: &[(&str, &str)]) -> PostgresSink {
        self.sink_of("test-instance", tables).await
    }

    /// [`Self::sink`] for instance `instance`.
    async fn sink_of(&self, instance: &str, tables: &[(&str, &str)]) -> PostgresSink {
        let mut options = PostgresOptions::new(pg_url());
        options.schema = Some(self.name.clone());
        options.instance = instance.to_owned();
        options.key_columns = tables
            .iter()
            .map(|(t, k)| ((*t).to_owned(), (*k).to_owned()))
            .collect();
        PostgresSink::connect(options).await.expect("connect sink")
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // From a thread of its own: usable inside and outside a runtime.
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(&self.name));
        let url = pg_url();
        let worker = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Ok((client, connection)) = tokio_postgres::connect(&url, NoTls).await {
                    tokio::spawn(connection);
                    if let Err(e) = client.batch_execute(&sql).await {
                        eprintln!("cleanup failed: {e:?}");
                    }
                }
            });
        });
        let _ = worker.join();
    }
}

fn text(s: &str) -> Value {
    Value::from(s)
}

fn pg_row(pairs: &[(&str, Value)]) -> Row {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

async fn count(client: &Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {}", quote(table)), &[])
        .await
        .unwrap()
        .get(0)
}

const REPLACE_DDL: &str = "\
    CREATE TABLE items (id text PRIMARY KEY, v bigint); \
    CREATE INDEX items_v ON items (v); \
    CREATE TABLE other (id bigint PRIMARY KEY, item text REFERENCES items (id)); \
    CREATE TABLE extra (id text PRIMARY KEY, w text); \
    CREATE TABLE local (id text PRIMARY KEY);";
const REPLACE_TABLES: &[(&str, &str)] = &[("items", "id"), ("other", "id")];

fn replacement() -> Vec<Change> {
    vec![
        up(2, "items", "a", &[("v", Value::I64(20))]),
        up(5, "items", "d", &[("v", Value::I64(5))]),
        del(6, "items", "d"),
        up(7, "other", "2", &[("item", text("a"))]),
        up(9, "items", "e", &[("v", Value::I64(9))]),
        del(10, "items", "never"),
        up(11, "items", "e", &[("v", Value::I64(11))]),
    ]
}

#[tokio::test]
async fn replace_swaps_the_contents_and_sets_the_fence() {
    let (schema, client) = PgSchema::new(REPLACE_DDL).await;
    client
        .batch_execute("INSERT INTO local VALUES ('keep')")
        .await
        .unwrap();
    let mut sink = schema.sink(REPLACE_TABLES).await;
    sink.apply(
        G,
        &[
            up(1, "items", "a", &[("v", Value::I64(1))]),
            up(2, "items", "b", &[("v", Value::I64(2))]),
            up(3, "items", "c", &[("v", Value::I64(3))]),
            up(4, "other", "1", &[("item", text("b"))]),
        ],
        10,
    )
    .await
    .unwrap();

    // A reader in a transaction that started before keeps seeing the old rows, whole, and
    // does not block the replace.
    let reader = pg_client().await;
    reader
        .batch_execute(&format!(
            "SET search_path TO {}; BEGIN ISOLATION LEVEL REPEATABLE READ",
            quote(&schema.name)
        ))
        .await
        .unwrap();
    assert_eq!(count(&reader, "items").await, 3);

    let changes = replacement();
    sink.replace(G, &changes, 12).await.unwrap();

    assert_eq!(count(&reader, "items").await, 3);
    assert_eq!(count(&reader, "other").await, 1);
    reader.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count(&reader, "items").await, 2);

    assert_eq!(sink.fence(G).await.unwrap(), Some(12));
    assert_eq!(
        sink.read_table("items").await.unwrap(),
        vec![
            pg_row(&[("id", text("a")), ("v", Value::I64(20))]),
            pg_row(&[("id", text("e")), ("v", Value::I64(11))]),
        ]
    );
    assert_eq!(
        sink.read_table("other").await.unwrap(),
        vec![pg_row(&[("id", Value::I64(2)), ("item", text("a"))])]
    );
    // A table that is not configured is not touched; indexes stay.
    assert_eq!(count(&client, "local").await, 1);
    let index: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND indexname = 'items_v'",
            &[&schema.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(index, 1);

    // Same contents as a fresh sink that applied the same changes.
    let (fresh_schema, _fresh_client) = PgSchema::new(REPLACE_DDL).await;
    let mut fresh = fresh_schema.sink(REPLACE_TABLES).await;
    fresh.apply(G, &changes, 12).await.unwrap();
    let digest = sink.digest().await.unwrap();
    assert_eq!(digest, fresh.digest().await.unwrap());
    assert_eq!(
        digest
            .iter()
            .map(|d| (d.table.as_str(), d.rows))
            .collect::<Vec<_>>(),
        [("items", 2), ("other", 1)]
    );

    // Replacing with nothing empties the configured tables and sets the fence.
    sink.replace(G, &[], 3).await.unwrap();

    assert_eq!(sink.fence(G).await.unwrap(), Some(3));
    assert_eq!(count(&client, "items").await, 0);
    assert_eq!(count(&client, "other").await, 0);
}

/// The fence is still `fence` and the contents still digest to `digest`.
async fn assert_untouched(sink: &mut PostgresSink, fence: u64, digest: &[TableDigest]) {
    assert_eq!(sink.fence(G).await.unwrap(), Some(fence));
    assert_eq!(sink.digest().await.unwrap(), digest);
}

#[tokio::test]
async fn replace_with_a_rejected_change_keeps_the_old_contents_and_fence() {
    let (schema, _client) =
        PgSchema::new("CREATE TABLE items (id text PRIMARY KEY, v bigint CHECK (v >= 0));").await;
    let mut sink = schema.sink(&[("items", "id")]).await;
    let old = [
        up(1, "items", "a", &[("v", Value::I64(1))]),
        up(2, "items", "b", &[("v", Value::I64(2))]),
        up(3, "items", "c", &[("v", Value::I64(3))]),
    ];
    sink.apply(G, &old, 10).await.unwrap();
    let before = sink.digest().await.unwrap();

    // The database refuses a row (one multi-row statement fails; the slow path finds it).
    let mut changes = vec![
        up(20, "items", "a", &[("v", Value::I64(100))]),
        up(21, "items", "bad", &[("v", Value::I64(-1))]),
        up(22, "items", "c", &[("v", Value::I64(300))]),
    ];
    let err = sink.replace(G, &changes, 12).await.unwrap_err();
    match &err {
        SinkError::Rejected {
            index,
            seq,
            table,
            key,
            reason,
        } => {
            assert_eq!((*index, *seq), (1, 21));
            assert_eq!((table.as_str(), key.as_str()), ("items", "bad"));
            assert!(reason.contains("23514"), "{reason}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_untouched(&mut sink, 10, &before).await;

    // The sink refuses a change (no such table) before sending it.
    let err = sink
        .replace(
            G,
            &[
                up(30, "items", "a", &[("v", Value::I64(5))]),
                up(31, "missing", "k", &[]),
            ],
            12,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SinkError::Rejected {
                index: 1,
                seq: 31,
                ..
            }
        ),
        "{err:?}"
    );
    assert_untouched(&mut sink, 10, &before).await;

    // A change naming the fence table is refused, and the fence table is never cleared.
    let err = sink
        .replace(
            G,
            &[up(40, "jetsync_offsets", G, &[("seq", Value::I64(1))])],
            12,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, SinkError::Rejected { index: 0, .. }),
        "{err:?}"
    );
    assert_untouched(&mut sink, 10, &before).await;

    // The engine parks the refused change and replaces again without it.
    changes.remove(1);
    sink.replace(G, &changes, 12).await.unwrap();
    assert_eq!(sink.fence(G).await.unwrap(), Some(12));
    assert_eq!(
        sink.read_table("items").await.unwrap(),
        vec![
            pg_row(&[("id", text("a")), ("v", Value::I64(100))]),
            pg_row(&[("id", text("c")), ("v", Value::I64(300))]),
        ]
    );
}

#[tokio::test]
async fn apply_of_lower_sequences_at_the_fence_keeps_the_fence() {
    let (schema, _client) =
        PgSchema::new("CREATE TABLE items (id text PRIMARY KEY, v bigint CHECK (v >= 0));").await;
    let mut sink = schema.sink(&[("items", "id")]).await;
    sink.apply(
        G,
        &[
            up(1, "items", "a", &[("v", Value::I64(1))]),
            up(2, "items", "b", &[("v", Value::I64(2))]),
        ],
        10,
    )
    .await
    .unwrap();
    // `parked retry`: events parked earlier (seqs below the fence), applied with the current
    // fence as last_seq.
    sink.apply(
        G,
        &[
            up(4, "items", "p", &[("v", Value::I64(4))]),
            del(5, "items", "a"),
            up(6, "items", "b", &[("v", Value::I64(6))]),
        ],
        10,
    )
    .await
    .unwrap();
    assert_eq!(sink.fence(G).await.unwrap(), Some(10));
    assert_eq!(
        sink.read_table("items").await.unwrap(),
        vec![
            pg_row(&[("id", text("b")), ("v", Value::I64(6))]),
            pg_row(&[("id", text("p")), ("v", Value::I64(4))]),
        ]
    );
    // A retry the database refuses leaves rows and fence alone.
    let err = sink
        .apply(G, &[up(3, "items", "q", &[("v", Value::I64(-3))])], 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SinkError::Rejected { index: 0, .. }),
        "{err:?}"
    );
    assert_eq!(sink.fence(G).await.unwrap(), Some(10));
    assert_eq!(sink.read_table("items").await.unwrap().len(), 2);
    // Later batches move it on as usual.
    sink.apply(G, &[up(11, "items", "q", &[("v", Value::I64(11))])], 11)
        .await
        .unwrap();
    assert_eq!(sink.fence(G).await.unwrap(), Some(11));
}

#[test]
fn target_description_has_no_password() {
    let config: tokio_postgres::Config = "postgres://app:hunter2@db.internal:6543/shop"
        .parse()
        .unwrap();
    assert_eq!(describe_target(&config), "app@db.internal:6543/shop");
}

const SERVICE_DDL: &str = "\
    CREATE TABLE items (id text PRIMARY KEY, v bigint); \
    CREATE TABLE local (id text PRIMARY KEY, note text); \
    INSERT INTO local VALUES ('a', 'service row'), ('b', 'another');";

fn expect_not_synced(err: SinkError, index: usize) {
    match err {
        SinkError::Rejected {
            index: got, reason, ..
        } => {
            assert_eq!(got, index, "{reason}");
            assert!(reason.contains("not synced here"), "{reason}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

/// A service table in the schema that the group does not configure survives an event naming it,
/// a delete tombstone for it, and a resync (streamed in chunks).
#[tokio::test]
async fn a_service_table_survives_events_tombstones_and_a_resync() {
    let (schema, client) = PgSchema::new(SERVICE_DDL).await;
    let mut sink = schema.sink(&[("items", "id")]).await;
    let err = sink
        .apply(
            G,
            &[
                up(1, "items", "x", &[("v", Value::I64(1))]),
                up(2, "local", "a", &[("note", text("overwritten"))]),
            ],
            2,
        )
        .await
        .unwrap_err();
    expect_not_synced(err, 1);
    let err = sink.apply(G, &[del(3, "local", "b")], 3).await.unwrap_err();
    expect_not_synced(err, 0);
    assert_eq!(
        sink.fence(G).await.unwrap(),
        Some(0),
        "nothing of a rejected batch"
    );
    sink.apply(G, &[up(1, "items", "x", &[("v", Value::I64(1))])], 3)
        .await
        .unwrap();

    // A streamed resync: a chunk naming the service table is rejected alone, the replacement
    // stays open, the engine sends the chunk again without it.
    sink.replace_begin(G).await.unwrap();
    sink.replace_chunk(G, &[up(5, "items", "y", &[("v", Value::I64(5))])])
        .await
        .unwrap();
    let chunk = [
        up(6, "items", "z", &[("v", Value::I64(6))]),
        del(7, "local", "a"),
    ];
    let err = sink.replace_chunk(G, &chunk).await.unwrap_err();
    expect_not_synced(err, 1);
    sink.replace_chunk(G, &chunk[..1]).await.unwrap();
    sink.replace_commit(G, 9).await.unwrap();
    assert_eq!(sink.fence(G).await.unwrap(), Some(9));
    let keys: Vec<Value> = sink
        .read_table("items")
        .await
        .unwrap()
        .into_iter()
        .map(|row| row["id"].clone())
        .collect();
    assert_eq!(
        keys,
        [text("y"), text("z")],
        "x cleared, both chunks applied"
    );
    let local: Vec<(String, String)> = client
        .query("SELECT id, note FROM local ORDER BY id", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        local,
        [
            ("a".to_owned(), "service row".to_owned()),
            ("b".to_owned(), "another".to_owned())
        ]
    );
    let digest = sink.digest().await.unwrap();
    assert_eq!(
        digest.iter().map(|d| d.table.as_str()).collect::<Vec<_>>(),
        ["items"]
    );
}

/// A replacement aborted half-way leaves the old rows and fence; a database error in a chunk
/// rejects only that chunk.
#[tokio::test]
async fn an_aborted_replacement_leaves_everything_as_it_was() {
    let (schema, _client) =
        PgSchema::new("CREATE TABLE items (id text PRIMARY KEY, v bigint CHECK (v >= 0));").await;
    let mut sink = schema.sink(&[("items", "id")]).await;
    sink.apply(G, &[up(1, "items", "a", &[("v", Value::I64(1))])], 4)
        .await
        .unwrap();
    let before = sink.digest().await.unwrap();
    sink.replace_begin(G).await.unwrap();
    sink.replace_chunk(G, &[up(5, "items", "b", &[("v", Value::I64(5))])])
        .await
        .unwrap();
    let bad = [
        up(6, "items", "c", &[("v", Value::I64(6))]),
        up(7, "items", "d", &[("v", Value::I64(-1))]),
        up(8, "items", "e", &[("v", Value::I64(8))]),
    ];
    let err = sink.replace_chunk(G, &bad).await.unwrap_err();
    assert!(
        matches!(&err, SinkError::Rejected { index: 1, seq: 7, reason, .. } if reason.contains("23514")),
        "{err:?}"
    );
    sink.replace_abort(G).await;
    assert_untouched(&mut sink, 4, &before).await;
    // And a complete one after it.
    sink.replace(G, &[up(9, "items", "f", &[("v", Value::I64(9))])], 9)
        .await
        .unwrap();
    assert_eq!(sink.fence(G).await.unwrap(), Some(9));
    assert_eq!(sink.read_table("items").await.unwrap().len(), 1);
}

/// An upsert replaces the synced columns: a column the event lacks takes its default, so the
/// row does not depend on earlier events; a merging table keeps them.
#[tokio::test]
async fn upserts_replace_synced_columns_unless_the_table_merges() {
    let (schema, _client) = PgSchema::new(
        "CREATE TABLE r (id text PRIMARY KEY, a bigint, b bigint, c text DEFAULT 'dflt', \
                         d bigint GENERATED ALWAYS AS (a * 2) STORED); \
         CREATE TABLE m (id text PRIMARY KEY, a bigint, b bigint);",
    )
    .await;
    let mut options = PostgresOptions::new(pg_url());
    options.schema = Some(schema.name.clone());
    options.key_columns = [("r", "id"), ("m", "id")]
        .iter()
        .map(|(t, k)| ((*t).to_owned(), (*k).to_owned()))
        .collect();
    options.merge_tables.insert("m".to_owned());
    let mut sink = PostgresSink::connect(options).await.unwrap();
    let both = [("a", Value::I64(1)), ("b", Value::I64(1)), ("c", text("x"))];
    sink.apply(G, &[up(1, "r", "k", &both), up(2, "m", "k", &both[..2])], 2)
        .await
        .unwrap();
    sink.apply(
        G,
        &[
            up(3, "r", "k", &[("a", Value::I64(2))]),
            up(4, "m", "k", &[("a", Value::I64(2))]),
        ],
        4,
    )
    .await
    .unwrap();
    assert_eq!(
        sink.read_table("r").await.unwrap(),
        vec![pg_row(&[
            ("id", text("k")),
            ("a", Value::I64(2)),
            ("b", Value::Null),
            ("c", text("dflt")),
            ("d", Value::I64(4)),
        ])]
    );
    assert_eq!(
        sink.read_table("m").await.unwrap(),
        vec![pg_row(&[
            ("id", text("k")),
            ("a", Value::I64(2)),
            ("b", Value::I64(1)),
        ])]
    );
}

/// Batches never move the fence back, even when a batch ends below it; only `set_fence`
/// (`reset --to-seq`) does.
#[tokio::test]
async fn batches_never_move_the_fence_back() {
    let (schema, _client) =
        PgSchema::new("CREATE TABLE items (id text PRIMARY KEY, v bigint);").await;
    let mut sink = schema.sink(&[("items", "id")]).await;
    sink.apply(G, &[up(1, "items", "a", &[("v", Value::I64(1))])], 10)
        .await
        .unwrap();
    // The engine thinks it is at 3 (a killed session committed up to 10 meanwhile).
    let mut other = schema.sink(&[("items", "id")]).await;
    drop(sink);
    assert!(
        matches!(other.fence(G).await.unwrap(), Some(3..=10)),
        "fence read"
    );
    other.groups.told.insert(G.to_owned(), 3);
    let retry_lock =
        |e: &SinkError| matches!(e, SinkError::Unavailable { reason } if reason.contains("lock"));
    let batch = [up(4, "items", "a", &[("v", Value::I64(4))])];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match other.apply(G, &batch, 5).await {
            Err(e) if retry_lock(&e) && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => break other.unwrap(),
        }
    }
    assert_eq!(other.fence(G).await.unwrap(), Some(10), "not moved back");
    assert_eq!(
        other.read_table("items").await.unwrap()[0]["v"],
        Value::I64(1),
        "event 4 is at or below the fence: not applied again"
    );
    other.set_fence(G, 2).await.unwrap();
    assert_eq!(other.fence(G).await.unwrap(), Some(2), "explicit rewind");
}

/// The fence row records its instance: a second instance on the same schema and stream is
/// refused, naming both.
#[tokio::test]
async fn a_second_instance_on_the_same_schema_is_refused() {
    let (schema, client) =
        PgSchema::new("CREATE TABLE items (id text PRIMARY KEY, v bigint);").await;
    let mut first = schema.sink_of("cat-1", &[("items", "id")]).await;
    first
        .apply(G, &[up(1, "items", "a", &[("v", Value::I64(1))])], 1)
        .await
        .unwrap();
    drop(first);
    let mut second = schema.sink_of("cat-2", &[("items", "id")]).await;
    let err = second.fence(G).await.unwrap_err();
    match &err {
        SinkError::Fatal { reason } => {
            assert!(
                reason.contains("\"cat-1\"") && reason.contains("\"cat-2\""),
                "{reason}"
            );
            assert!(reason.contains("own schema"), "{reason}");
        }
        other => panic!("expected Fatal, got {other:?}"),
    }
    // A fence table of an older version (no instance column) gets one and is adopted.
    client
        .batch_execute(
            "ALTER TABLE jetsync_offsets DROP COLUMN instance; DELETE FROM jetsync_offsets",
        )
        .await
        .unwrap();
    let mut third = schema.sink_of("cat-3", &[("items", "id")]).await;
    assert_eq!(third.fence(G).await.unwrap(), Some(0));
    let owner: Option<String> = client
        .query_one("SELECT count(*)::text FROM jetsync_offsets", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner.as_deref(), Some("0"));
}

/// With no schema configured, the connection's current schema (its search_path) is used.
#[tokio::test]
async fn an_unset_schema_is_the_connections_current_schema() {
    let (schema, _client) =
        PgSchema::new("CREATE TABLE items (id text PRIMARY KEY, v bigint);").await;
    let separator = if pg_url().contains('?') { '&' } else { '?' };
    let mut options = PostgresOptions::new(format!(
        "{}{separator}options=-csearch_path%3D{}",
        pg_url(),
        schema.name
    ));
    options
        .key_columns
        .insert("items".to_owned(), "id".to_owned());
    let mut sink = PostgresSink::connect(options).await.unwrap();
    assert_eq!(sink.schema(), schema.name);
    sink.apply(G, &[up(1, "items", "a", &[("v", Value::I64(1))])], 1)
        .await
        .unwrap();
    assert_eq!(sink.read_table("items").await.unwrap().len(), 1);
}
