//! Issue #11 acceptance on Postgres, through the real binary: sink errors caused by one event's
//! content are poison, never fatal. A value too large for an index (SQLSTATE 54000), a table the
//! applier's role may not write (42501) and an integer key spelt `042` (which Postgres would
//! coerce into the row of `42`) are each parked with their reason within seconds, the later
//! events of their rows are held behind them, a later event of another row is applied, and the
//! applier never exits.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use jetsync::{Row, Value};
use jetsync_e2e::{heavy, postgres_exec, postgres_url, Group, Instance, PgSchema, SinkKind};
use jetsync_testkit::NatsServer;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::crash::{runtime, seed, CATCH_UP, FULL_HISTORY, STOP};

/// The instance's tables (`{schema}` is replaced by the schema name, `{role}` by the applier's
/// role): an indexed label, an integer-keyed table, and a table the role may not write.
const DDL: &str = r#"
CREATE TABLE {schema}.products (sku text PRIMARY KEY, label text, v bigint);
CREATE INDEX products_label ON {schema}.products (label);
CREATE TABLE {schema}.counters (id bigint PRIMARY KEY, c bigint);
CREATE TABLE {schema}.secrets (id text PRIMARY KEY, v bigint);
GRANT USAGE, CREATE ON SCHEMA {schema} TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.products, {schema}.counters TO {role};
"#;

/// A login role for the applier, dropped (with what it owns) when the test ends, after the
/// schema guard (declare it first).
struct Role {
    url: String,
    name: String,
}

impl Role {
    fn create(url: &str, name: &str) -> Result<Role> {
        let role = Role {
            url: url.to_owned(),
            name: name.to_owned(),
        };
        // The name carries the test process id, so no earlier run left a role of that name.
        postgres_exec(url, &format!("CREATE ROLE {name} LOGIN"))?;
        Ok(role)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let sql = format!("DROP OWNED BY {0}; DROP ROLE IF EXISTS {0}", self.name);
        if let Err(e) = postgres_exec(&self.url, &sql) {
            eprintln!("dropping role {}: {e:#}", self.name);
        }
    }
}

fn row(pairs: &[(&str, Value)]) -> Row {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

#[test]
fn postgres_content_errors_are_parked_and_never_fatal() -> Result<()> {
    let _heavy = heavy();
    runtime()?.block_on(async {
        jetsync_e2e::applier_bin();
        let mut rng = StdRng::seed_from_u64(seed("pg_content"));
        let admin_url = postgres_url();
        let suffix = std::process::id();
        let role_name = format!("jetsync_e2e_app_{suffix}");
        let _role = Role::create(&admin_url, &role_name)?;
        let schema = PgSchema::create(
            &admin_url,
            &format!("jetsync_e2e_content_{suffix}"),
            &DDL.replace("{role}", &role_name),
        )?;
        // The applier connects as the restricted role (trust authentication on this machine).
        let app_url = match admin_url.split_once("://postgres@") {
            Some((scheme, rest)) => format!("{scheme}://{role_name}@{rest}"),
            None => anyhow::bail!("JETSYNC_TEST_POSTGRES must use the user postgres: {admin_url}"),
        };

        let server = NatsServer::start()?;
        let root = tempfile::tempdir()?;
        let stream = "PGCONTENT";
        let mut group = Group::new(server.url(), stream, "pgcontent");
        group.tables.clear();
        group.tables.insert("products".into(), "sku".into());
        group.tables.insert("counters".into(), "id".into());
        group.tables.insert("secrets".into(), "id".into());
        let mut instance = Instance::new(&group, root.path(), "c1", SinkKind::Sqlite)?;
        instance.use_postgres(&app_url, &schema.name)?;
        // Keep every event of a row, so the held events stay in the stream; and hand the sink
        // every change: with coalescing a refused change and a valid later change of its row
        // arriving in one batch would be written as the later one alone, never refused
        // (README, "Coalescing"), and this test is about what is refused.
        instance.set_stream_option("history", &FULL_HISTORY.to_string())?;
        instance.set_option("apply", "coalesce", "false")?;
        let (code, _, err) = instance.cli(&["provision"])?;
        ensure!(code == 0, "provision: {err}");
        instance.start()?;

        let client = group.client("pgcontent-pub").await?;
        let products = client.rows("products")?;
        let counters = client.rows("counters")?;
        let secrets = client.rows("secrets")?;
        let warm = products
            .upsert("warm", &row(&[("label", "w".into()), ("v", Value::I64(0))]))
            .await?;
        instance.wait_applied(stream, warm.seq, CATCH_UP)?;

        // A label far over the btree entry limit (about 2.7 kB), random so that compression
        // cannot bring it under.
        let huge: String = (0..24_000)
            .map(|_| char::from(rng.gen_range(b'!'..=b'~')))
            .collect();
        let big = products
            .upsert("big", &row(&[("label", huge.into()), ("v", Value::I64(1))]))
            .await?;
        let aliased = counters
            .upsert("042", &row(&[("c", Value::I64(1))]))
            .await?;
        let denied = secrets.upsert("s1", &row(&[("v", Value::I64(1))])).await?;
        let big_later = products
            .upsert(
                "big",
                &row(&[("label", "fine".into()), ("v", Value::I64(2))]),
            )
            .await?;
        let aliased_later = counters
            .upsert("042", &row(&[("c", Value::I64(2))]))
            .await?;
        let denied_later = secrets.upsert("s1", &row(&[("v", Value::I64(2))])).await?;
        let other = products
            .upsert(
                "other",
                &row(&[("label", "ok".into()), ("v", Value::I64(3))]),
            )
            .await?;

        // Everything is accounted for within seconds: three heads with their reasons, three held
        // events, and the other row applied.
        let heads = [
            (big.seq, "products/big", vec!["index row", "54000"]),
            (aliased.seq, "counters/042", vec!["042"]),
            (denied.seq, "secrets/s1", vec!["permission denied", "42501"]),
        ];
        let held = [
            (big_later.seq, big.seq),
            (aliased_later.seq, aliased.seq),
            (denied_later.seq, denied.seq),
        ];
        let deadline = Instant::now() + Duration::from_secs(60);
        let parked = loop {
            let parked = instance.parked()?;
            let complete =
                parked.len() >= heads.len() + held.len() && instance.applied(stream) >= other.seq;
            if complete || Instant::now() >= deadline {
                break parked;
            }
            ensure!(
                instance.is_running(),
                "the applier exited; log:\n{}",
                instance.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let listed = serde_json::Value::Array(parked.clone());
        for (seq, row_id, words) in &heads {
            let entry = parked.iter().find(|p| p["seq"].as_u64() == Some(*seq));
            ensure!(
                entry.is_some_and(
                    |p| p["held_behind"].is_null() && p["row"].as_str() == Some(row_id)
                ),
                "seq {seq} ({row_id}) is not parked as its row's head; parked list: {listed}"
            );
            let error = entry
                .and_then(|p| p["error"].as_str())
                .unwrap_or_default()
                .to_lowercase();
            ensure!(
                words.iter().any(|w| error.contains(w)),
                "seq {seq} ({row_id}) parked with {error:?}, expected one of {words:?}"
            );
        }
        for (seq, head) in held {
            ensure!(
                parked
                    .iter()
                    .any(|p| p["seq"].as_u64() == Some(seq)
                        && p["held_behind"].as_u64() == Some(head)),
                "seq {seq} is not held behind {head}; parked list: {listed}"
            );
        }
        ensure!(
            instance.applied(stream) >= other.seq,
            "the later event of another row (seq {}) was not applied; log:\n{}",
            other.seq,
            instance.log()
        );
        let client_pg = postgres_rows_count(&admin_url, &schema.name).await?;
        ensure!(
            client_pg == (2, 0, 0),
            "rows (products, counters, secrets) = {client_pg:?}, expected warm and other only"
        );
        ensure!(
            instance.is_running(),
            "the applier exited; log:\n{}",
            instance.log()
        );
        let code = instance.stop(STOP)?;
        ensure!(code == 0, "run exited {code}; log:\n{}", instance.log());
        Ok(())
    })
}

/// Row counts of the three tables.
async fn postgres_rows_count(url: &str, schema: &str) -> Result<(i64, i64, i64)> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(connection);
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM \"{schema}\".products), \
                 (SELECT count(*) FROM \"{schema}\".counters), \
                 (SELECT count(*) FROM \"{schema}\".secrets)"
            ),
            &[],
        )
        .await?;
    drop(client);
    let _ = task.await;
    Ok((row.get(0), row.get(1), row.get(2)))
}
