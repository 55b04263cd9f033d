//! Isolation (issue #11): only configured tables are written, created, or cleared by a resync
//! (DESIGN 5, "Only configured tables").
//!
//! A service keeps its own table `orders` (with rows) in the database the applier writes to,
//! Postgres schema or SQLite file; the sync group's config lists only `items`. An upsert naming
//! `orders`, a delete tombstone for it, an upsert naming a table that does not exist (`audit`),
//! and a `resync` leave `orders` exactly as it was and create no `audit`; those events are parked
//! with the reason "table not synced here" while `items` flows. Once a later config lists
//! `orders`, its parked events are applied at start (and `audit`'s stay parked).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use jetsync::{Row, Value};
use jetsync_e2e::{
    heavy, postgres_rows, postgres_url, Group, Instance, PgSchema, Reference, SinkKind,
};
use jetsync_testkit::NatsServer;

use crate::crash::{runtime, CATCH_UP, STOP};

/// The reason a parked event for an unconfigured table carries.
const NOT_SYNCED: &str = "table not synced here";

/// Where the instance writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The service's own rows of `orders`: id → total.
fn service_orders() -> BTreeMap<String, i64> {
    [("o1", 100), ("o2", 200), ("o3", 300)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// The Postgres schema: the synced `items` and the service's `orders` with its rows.
const PG_DDL: &str = "CREATE TABLE {schema}.items (id text PRIMARY KEY, n bigint); \
     CREATE TABLE {schema}.orders (id text PRIMARY KEY, total bigint NOT NULL); \
     INSERT INTO {schema}.orders VALUES ('o1', 100), ('o2', 200), ('o3', 300);";

/// The same for SQLite, created in the instance's file before the applier first opens it.
const SQLITE_DDL: &str = "CREATE TABLE orders (id TEXT PRIMARY KEY, total INTEGER NOT NULL); \
     INSERT INTO orders VALUES ('o1', 100), ('o2', 200), ('o3', 300);";

fn row(id: &str, column: &str, value: i64) -> Row {
    let mut row = Row::new();
    row.insert("id".into(), Value::Text(id.to_owned()));
    row.insert(column.into(), Value::I64(value));
    row
}

/// Publishes `events` (table, key, row or `None` for a delete) one by one, in order; returns
/// the reference.
async fn publish(group: &Group, events: Vec<(&str, &str, Option<Row>)>) -> Result<Reference> {
    let client = group.client("iso-pub").await?;
    let mut reference = Reference::default();
    for (table, key, row) in events {
        let t = client.rows(table)?;
        let published = match &row {
            Some(r) => t.upsert(key, r).await?,
            None => t.delete(key).await?,
        };
        reference.record(published.seq, table, key, row);
    }
    Ok(reference)
}

/// A unique Postgres schema name of this test process.
fn schema_name() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "tests_iso_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Reads `orders` as id → total.
async fn orders(
    backend: Backend,
    instance: &Instance,
    schema: Option<&PgSchema>,
) -> Result<BTreeMap<String, i64>> {
    let rows = match (backend, schema) {
        (Backend::Sqlite, _) => instance.sqlite_rows("orders", "id")?,
        (Backend::Postgres, Some(s)) => postgres_rows(&s.url, &s.name, "orders", "id").await?,
        (Backend::Postgres, None) => bail!("Postgres instance without a schema"),
    };
    rows.into_iter()
        .map(|(k, r)| match r.get("total") {
            Some(Value::I64(v)) => Ok((k, *v)),
            other => bail!("orders row {k}: total is {other:?}"),
        })
        .collect()
}

/// Whether table `table` exists where the instance writes.
async fn table_exists(
    backend: Backend,
    instance: &Instance,
    schema: Option<&PgSchema>,
    table: &str,
) -> Result<bool> {
    match (backend, schema) {
        (Backend::Sqlite, _) => {
            let conn = rusqlite::Connection::open_with_flags(
                instance.sqlite_path(),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )?;
            let n: i64 = conn.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )?;
            Ok(n > 0)
        }
        (Backend::Postgres, Some(s)) => {
            let (client, connection) =
                tokio_postgres::connect(&s.url, tokio_postgres::NoTls).await?;
            let conn = tokio::spawn(connection);
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = $2",
                    &[&s.name, &table],
                )
                .await?
                .get(0);
            drop(client);
            let _ = conn.await;
            Ok(n > 0)
        }
        (Backend::Postgres, None) => bail!("Postgres instance without a schema"),
    }
}

/// The `items` rows as id → n.
async fn items(
    backend: Backend,
    instance: &Instance,
    schema: Option<&PgSchema>,
) -> Result<BTreeMap<String, Option<i64>>> {
    let rows = match (backend, schema) {
        (Backend::Sqlite, _) => instance.sqlite_rows("items", "id")?,
        (Backend::Postgres, Some(s)) => postgres_rows(&s.url, &s.name, "items", "id").await?,
        (Backend::Postgres, None) => bail!("Postgres instance without a schema"),
    };
    Ok(rows
        .into_iter()
        .map(|(k, r)| {
            let n = match r.get("n") {
                Some(Value::I64(v)) => Some(*v),
                _ => None,
            };
            (k, n)
        })
        .collect())
}

/// Fails unless `parked` holds an event of row `row` (`table/key`) parked with
/// [`NOT_SYNCED`].
fn ensure_parked_not_synced(parked: &[serde_json::Value], row: &str, when: &str) -> Result<()> {
    let found = parked
        .iter()
        .filter(|p| p["row"].as_str() == Some(row))
        .collect::<Vec<_>>();
    ensure!(
        found
            .iter()
            .any(|p| p["error"].as_str().is_some_and(|e| e.contains(NOT_SYNCED))),
        "{when}: no event of {row} parked with {NOT_SYNCED:?}; parked list: {}",
        serde_json::Value::Array(parked.to_vec())
    );
    Ok(())
}

#[test]
fn service_table_survives_sqlite() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(isolation(Backend::Sqlite))
}

#[test]
fn service_table_survives_postgres() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(isolation(Backend::Postgres))
}

async fn isolation(backend: Backend) -> Result<()> {
    let what = format!("isolation_{backend:?}").to_lowercase();
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let stream = match backend {
        Backend::Sqlite => "ISO",
        Backend::Postgres => "ISOPG",
    };
    let group = Group::new(server.url(), stream, &stream.to_lowercase());
    let mut instance = Instance::new(&group, root.path(), "iso", SinkKind::Sqlite)?;
    let schema = match backend {
        Backend::Sqlite => {
            let conn = rusqlite::Connection::open(instance.sqlite_path())?;
            conn.execute_batch(SQLITE_DDL)?;
            None
        }
        Backend::Postgres => {
            let schema = PgSchema::create(&postgres_url(), &schema_name(), PG_DDL)?;
            instance.use_postgres(&schema.url, &schema.name)?;
            Some(schema)
        }
    };
    let schema = schema.as_ref();
    let (code, _, err) = instance.cli(&["provision"])?;
    ensure!(code == 0, "provision exited {code}: {err}");
    instance.start()?;

    let reference = publish(
        &group,
        vec![
            ("items", "k1", Some(row("k1", "n", 1))),
            ("orders", "o1", Some(row("o1", "total", 999))),
            ("orders", "o2", None),
            ("audit", "a1", Some(row("a1", "n", 7))),
            ("items", "k2", Some(row("k2", "n", 2))),
        ],
    )
    .await?;
    let last = reference.max_seq();
    instance.wait_applied(stream, last, CATCH_UP)?;
    let want_items: BTreeMap<String, Option<i64>> =
        [("k1".to_owned(), Some(1)), ("k2".to_owned(), Some(2))].into();

    // While running: items flows, orders is untouched, audit is not created, both tables'
    // events are parked as not synced here.
    let mut failures = Vec::new();
    let check = |failures: &mut Vec<String>, r: Result<()>| {
        if let Err(e) = r {
            failures.push(format!("{e:#}"));
        }
    };
    let items_now = items(backend, &instance, schema).await?;
    check(
        &mut failures,
        (|| {
            ensure!(
                items_now == want_items,
                "{what}: items {items_now:?}, expected {want_items:?}"
            );
            Ok(())
        })(),
    );
    let orders_now = orders(backend, &instance, schema).await?;
    check(
        &mut failures,
        (|| {
            ensure!(
            orders_now == service_orders(),
            "{what}: after events naming it, the service's orders is {orders_now:?}, expected {:?}",
            service_orders()
        );
            Ok(())
        })(),
    );
    let audit = table_exists(backend, &instance, schema, "audit").await?;
    check(
        &mut failures,
        (|| {
            ensure!(
                !audit,
                "{what}: an event created table audit, which no config lists"
            );
            Ok(())
        })(),
    );
    let parked = instance.parked()?;
    for row in ["orders/o1", "orders/o2", "audit/a1"] {
        check(
            &mut failures,
            ensure_parked_not_synced(&parked, row, &format!("{what} while running")),
        );
    }

    // A resync (of the stopped instance) replaces items and nothing else.
    ensure!(
        instance.stop(STOP)? == 0,
        "{what}: clean stop:\n{}",
        instance.log()
    );
    let (code, out, err) = instance.cli(&["resync", "--json"])?;
    check(
        &mut failures,
        (|| {
            ensure!(code == 0, "{what}: resync exited {code}: {out} {err}");
            Ok(())
        })(),
    );
    let orders_now = orders(backend, &instance, schema).await?;
    check(
        &mut failures,
        (|| {
            ensure!(
                orders_now == service_orders(),
                "{what}: after a resync, the service's orders is {orders_now:?}, expected {:?}",
                service_orders()
            );
            Ok(())
        })(),
    );
    let items_now = items(backend, &instance, schema).await?;
    check(
        &mut failures,
        (|| {
            ensure!(
                items_now == want_items,
                "{what}: after a resync, items {items_now:?}, expected {want_items:?}"
            );
            Ok(())
        })(),
    );
    let audit = table_exists(backend, &instance, schema, "audit").await?;
    check(
        &mut failures,
        (|| {
            ensure!(!audit, "{what}: the resync created table audit");
            Ok(())
        })(),
    );
    let parked = instance.parked()?;
    for row in ["orders/o1", "orders/o2", "audit/a1"] {
        check(
            &mut failures,
            ensure_parked_not_synced(&parked, row, &format!("{what} after a resync")),
        );
    }

    // A later config lists orders: its parked events are applied at start; audit's stay.
    instance.append_config("[tables.orders]\nkey = \"id\"\n")?;
    instance.start()?;
    let want_orders: BTreeMap<String, i64> =
        [("o1".to_owned(), 999), ("o3".to_owned(), 300)].into();
    // Each row's events are applied, then removed from the parked list: wait for both.
    let orders_parked = |parked: &[serde_json::Value]| {
        parked
            .iter()
            .any(|p| p["row"].as_str().is_some_and(|r| r.starts_with("orders/")))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let orders_now = loop {
        let now = orders(backend, &instance, schema).await?;
        let done = now == want_orders && !orders_parked(&instance.parked()?);
        if done || Instant::now() >= deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    check(
        &mut failures,
        (|| {
            ensure!(
            orders_now == want_orders,
            "{what}: once the config lists orders, orders is {orders_now:?} after 60 s, expected {want_orders:?} (its parked events applied); log:\n{}",
            instance.log()
        );
            Ok(())
        })(),
    );
    let parked = instance.parked()?;
    check(
        &mut failures,
        (|| {
            let left: Vec<_> = parked
                .iter()
                .filter(|p| p["row"].as_str().is_some_and(|r| r.starts_with("orders/")))
                .collect();
            ensure!(
                left.is_empty(),
                "{what}: orders' events still parked once listed: {left:?}"
            );
            Ok(())
        })(),
    );
    check(
        &mut failures,
        ensure_parked_not_synced(
            &parked,
            "audit/a1",
            &format!("{what} once orders is listed"),
        ),
    );
    let code = instance.stop(STOP)?;
    check(
        &mut failures,
        (|| {
            ensure!(code == 0, "{what}: exit code {code}:\n{}", instance.log());
            Ok(())
        })(),
    );
    ensure!(
        failures.is_empty(),
        "{what}: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
