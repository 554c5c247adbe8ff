//! Which table a `--lease-table` names: the same one for every role and session in a database.
//! An unqualified name is `public.NAME`, never resolved through `search_path`: not to another
//! client's temporary table on a pooled server connection, not to a role's own schema. The
//! temporary schema is refused outright, and a table of the wrong shape is refused with the DDL
//! it should have. These tests try to make two holders run at once through each of those.

use std::path::Path;
use std::time::Duration;

use postgres::NoTls;

use crate::support::pgbouncer::PgBouncer;
use crate::support::procs::{self, lines};
use crate::support::{busy_wait, heimdall, login_role, new_dir, shared, unique_name};

const NS: &str = "lease-table";
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// A table name of this test's own: a plain identifier.
fn table_name(prefix: &str) -> String {
    unique_name(prefix).replace('-', "_")
}

/// The columns heimdall's DDL gives a lease table, for a test to vary.
const COLUMNS: [(&str, &str); 6] = [
    ("lock_key", "text PRIMARY KEY"),
    ("version", "bigint NOT NULL"),
    ("lock_name", "text NOT NULL"),
    ("holder", "text NOT NULL"),
    ("acquired_at", "timestamptz NOT NULL"),
    ("expires_at", "timestamptz NOT NULL"),
];

/// Columns whose type a test changes (or drops, with an empty type).
type Changes<'a> = &'a [(&'a str, &'a str)];

/// `CREATE {kind} TABLE table (...)` with heimdall's columns, each of `changes` replacing the
/// type of a column (or dropping it, when the type is empty).
fn create_table(kind: &str, table: &str, changes: Changes) -> String {
    let columns: Vec<String> = COLUMNS
        .iter()
        .filter_map(|(column, ty)| {
            let ty = changes
                .iter()
                .find(|(c, _)| c == column)
                .map_or(*ty, |(_, t)| t);
            (!ty.is_empty()).then(|| format!("{column} {ty}"))
        })
        .collect();
    format!("CREATE {kind} TABLE {table} ({})", columns.join(", "))
}

/// A run through `first` holds a lease in `table` for 5 s; meanwhile `meanwhile` gets the lock's
/// name, and then a run through `second` on the same lock and table must find it busy. Asserts
/// that the two commands never ran at once.
fn second_is_busy_while_first_holds(
    first: &str,
    second: &str,
    table: &str,
    meanwhile: impl FnOnce(&str),
) {
    let dir = new_dir();
    let name = unique_name("one-table");
    let flags = ["--lease-table", table];
    let mut a = procs::guarded(first, NS, dir.path(), &name, &flags, "5");
    assert!(
        busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1),
        "the first run never ran: {}",
        a.stderr()
    );
    meanwhile(&name);
    let mut b = procs::guarded(second, NS, dir.path(), &name, &flags, "0");
    b.expect_exit(75, RUN_LIMIT);
    a.expect_exit(0, RUN_LIMIT);
    assert_eq!(
        lines(dir.path(), "overlaps"),
        0,
        "both held the lease at once"
    );
}

/// A run (`touch ran` as its command), `status` and `list` on `table` (as given on the command
/// line) for the lock `NS/name`, each as its arguments.
fn every_command<'a>(url: &'a str, name: &'a str, table: &'a str) -> [Vec<&'a str>; 3] {
    let lock = ["--database", url, "--namespace", NS, "--name", name];
    [
        [&lock[..], &["--lease-table", table, "--", "touch", "ran"]].concat(),
        [&["status"], &lock[..], &["--lease-table", table]].concat(),
        vec!["list", "--database", url, "--lease-table", table],
    ]
}

/// Runs heimdall with `args` in `dir`, asserts that it exits `code` with nothing on stdout and
/// one line on stderr naming `named`, and returns that line.
fn refused(dir: &Path, args: &[&str], code: i32, named: &str) -> String {
    let out = heimdall().current_dir(dir).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(stderr.contains(named), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}");
    assert!(!dir.join("ran").exists(), "{args:?} ran the command");
    stderr
}

#[test]
fn another_clients_temp_table_on_a_pooled_server_connection_does_not_capture_the_lease() {
    let pg = shared();
    // One server connection: every client's statements run on it, and so see its temp tables.
    let bouncer = PgBouncer::start_with(pg, "transaction", "default_pool_size = 1\n");
    let table = table_name("captured");
    let mut other = bouncer
        .config()
        .user(pg.superuser())
        .connect(NoTls)
        .unwrap();
    other
        .batch_execute(&create_table("TEMP", &table, &[]))
        .unwrap();
    second_is_busy_while_first_holds(&bouncer.url(pg.superuser()), &pg.url(), &table, |_| ());
    let rows: i64 = other
        .query_one(&format!("SELECT count(*) FROM pg_temp.{table}"), &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the lease went into the other client's temp table");
}

#[test]
fn two_roles_with_schemas_of_their_own_share_one_unqualified_lease_table() {
    let pg = shared();
    let (alice, alice_url) = login_role(pg, "alice", &[]);
    let (bob, bob_url) = login_role(pg, "bob", &[]);
    // `"$user"` comes first in the default search_path: each role has a schema it could use.
    pg.client()
        .batch_execute(&format!(
            "CREATE SCHEMA {alice} AUTHORIZATION {alice}; CREATE SCHEMA {bob} AUTHORIZATION {bob};
             GRANT CREATE ON SCHEMA public TO {alice}, {bob};
             ALTER DEFAULT PRIVILEGES FOR ROLE {alice} IN SCHEMA public
                 GRANT SELECT, INSERT, UPDATE ON TABLES TO {bob};
             ALTER DEFAULT PRIVILEGES FOR ROLE {bob} IN SCHEMA public
                 GRANT SELECT, INSERT, UPDATE ON TABLES TO {alice};"
        ))
        .unwrap();
    let table = table_name("jobs_leases");
    second_is_busy_while_first_holds(&alice_url, &bob_url, &table, |name| {
        // bob's status sees alice's lease, in the same table.
        heimdall()
            .args(["status", "--database", &bob_url, "--namespace", NS])
            .args(["--name", name, "--lease-table", &table])
            .assert()
            .code(75);
    });
    let found: i64 = pg
        .client()
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n \
             ON n.oid = c.relnamespace WHERE c.relname = $1 AND n.nspname <> 'public'",
            &[&table],
        )
        .unwrap()
        .get(0);
    assert_eq!(found, 0, "a lease table outside public");
}

#[test]
fn the_temporary_schema_is_refused_as_a_lease_table_in_every_spelling() {
    let dir = new_dir();
    let url = shared().url();
    for spelling in [
        "pg_temp.leases",
        "PG_TEMP.leases",
        "Pg_Temp.Leases",
        "\"pg_temp\".leases",
        "pg_temp_3.leases",
        "pg_toast_temp_3.leases",
    ] {
        let mut runs = every_command(&url, "temp", spelling).to_vec();
        runs.push(vec!["lease-ddl", "--lease-table", spelling]);
        for args in runs {
            refused(dir.path(), &args, 2, "temporary");
        }
        // The environment twin too.
        let out = heimdall()
            .current_dir(dir.path())
            .env("HEIMDALL_LEASE_TABLE", spelling)
            .args(["--database", &url, "--namespace", NS, "--name", "temp"])
            .args(["--", "touch", "ran"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "HEIMDALL_LEASE_TABLE={spelling}"
        );
        assert!(
            !dir.path().join("ran").exists(),
            "{spelling} ran the command"
        );
    }
}

#[test]
fn a_lease_table_of_the_wrong_shape_is_refused_with_the_ddl_it_needs() {
    let pg = shared();
    let url = pg.url();
    let dir = new_dir();
    // Each a table kind, changes to heimdall's columns, and what the message must name.
    let variants: [(&str, Changes, &str); 5] = [
        // Holders in different TimeZone settings would read another expiry.
        (
            "",
            &[
                ("acquired_at", "timestamp NOT NULL"),
                ("expires_at", "timestamp NOT NULL"),
            ],
            "expires_at timestamp without time zone",
        ),
        // Rounded to the second: an expiry up to 0.5 s early.
        (
            "",
            &[("expires_at", "timestamptz(0) NOT NULL")],
            "expires_at timestamp(0) with time zone",
        ),
        ("", &[("version", "integer NOT NULL")], "version integer"),
        ("", &[("holder", "")], "holder"),
        // Emptied by a crash: every lease in it would be free at once.
        ("UNLOGGED", &[], "unlogged"),
    ];
    for (kind, changes, named) in variants {
        let table = table_name("misshapen");
        pg.client()
            .batch_execute(&create_table(kind, &table, changes))
            .unwrap();
        let name = unique_name("misshapen");
        for args in every_command(&url, &name, &table) {
            let stderr = refused(dir.path(), &args, 69, named);
            let ddl = format!("CREATE TABLE IF NOT EXISTS \"public\".\"{table}\"");
            assert!(stderr.contains(&ddl), "no DDL: {stderr}");
        }
    }
}

#[test]
fn lease_statements_mean_the_same_whatever_the_roles_search_path() {
    let pg = shared();
    let (role, url) = login_role(pg, "evilpath", &[]);
    // Types of the same names as PostgreSQL's, first in the role's search_path, that refuse
    // every value: any type heimdall names without pg_catalog. fails.
    let mut sql = format!(
        "CREATE SCHEMA {role} AUTHORIZATION {role}; GRANT CREATE ON SCHEMA public TO {role};
         ALTER ROLE {role} SET search_path = {role}, pg_catalog, public;"
    );
    for ty in ["text", "int8", "float8", "timestamptz", "int4", "interval"] {
        sql.push_str(&format!(
            " CREATE DOMAIN {role}.{ty} AS pg_catalog.{ty} CHECK (VALUE IS NULL);"
        ));
    }
    pg.client().batch_execute(&sql).unwrap();
    let dir = new_dir();
    let table = table_name("pathproof");
    let name = unique_name("pathproof");
    let run = ["--database", &url, "--namespace", NS, "--name", &name];
    let out = heimdall()
        .current_dir(dir.path())
        .args(run)
        .args(["--lease-table", &table, "--", "touch", "ran"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(dir.path().join("ran").exists());
    let types: String = pg
        .client()
        .query_one(
            "SELECT string_agg(format_type(atttypid, atttypmod), ',' ORDER BY attnum) \
             FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0",
            &[&format!("public.{table}")],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        types,
        "text,bigint,text,text,timestamp with time zone,timestamp with time zone"
    );
    heimdall()
        .args(["status"])
        .args(run)
        .args(["--lease-table", &table])
        .assert()
        .code(0);
    heimdall()
        .args(["list", "--database", &url, "--lease-table", &table])
        .assert()
        .code(0);
}

#[test]
fn an_unqualified_lease_table_is_in_public_for_lease_ddl_too() {
    let out = heimdall()
        .args(["lease-ddl", "--lease-table", "Leases"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let ddl = String::from_utf8_lossy(&out.stdout);
    assert!(
        ddl.starts_with("CREATE TABLE IF NOT EXISTS \"public\".\"leases\""),
        "{ddl}"
    );
}
