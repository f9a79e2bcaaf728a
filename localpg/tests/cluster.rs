//! Real initdb/pg_ctl: a cluster starts, serves a database, stops, starts again with its data, and
//! is gone after drop. Works whether the test runs as root or not.

use localpg::{LocalPg, Options, PgError};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

fn accepts_connections(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn starts_serves_stops_and_restarts_with_its_data() {
    let t0 = Instant::now();
    let mut pg = LocalPg::temporary().unwrap();
    eprintln!("cluster up in {:?}", t0.elapsed());
    let port = pg.port();
    assert!(pg.is_running());
    assert!(pg.pid().is_some(), "postmaster.pid names the server");
    assert_eq!(pg.url("sharddb"), format!("postgres://postgres@127.0.0.1:{port}/sharddb"));

    pg.create_database("sharddb").unwrap();
    pg.create_database("sharddb").unwrap(); // idempotent
    assert_eq!(pg.psql("sharddb", "select 1").unwrap(), "1");
    pg.psql("sharddb", "create table t (k bigint primary key, v text); insert into t values (1, 'one'), (2, 'two')")
        .unwrap();

    let pid = pg.pid().unwrap();
    pg.stop().unwrap();
    assert!(!pg.is_running());
    assert!(pg.pid().is_none(), "postmaster.pid removed on a clean stop");
    assert!(!accepts_connections(port), "nothing listens after stop");
    assert!(localpg::process_gone(pid), "postmaster exited");
    pg.stop().unwrap(); // stopping a stopped server is a no-op

    pg.start().unwrap();
    assert_eq!(pg.port(), port, "same port after a restart");
    assert_eq!(pg.psql("sharddb", "select v from t order by k").unwrap(), "one\ntwo", "data survives a restart");

    let data_dir = pg.data_dir().to_owned();
    let pid = pg.pid().unwrap();
    drop(pg);
    assert!(!accepts_connections(port), "drop stops the server");
    assert!(localpg::process_gone(pid), "postmaster exited");
    assert!(!data_dir.exists(), "a temporary cluster removes its directory");
}

#[test]
fn wipe_leaves_an_empty_cluster() {
    let mut pg = LocalPg::temporary().unwrap();
    pg.create_database("gone").unwrap();
    pg.wipe().unwrap();
    assert!(!pg.is_running());
    pg.start().unwrap();
    let err = pg.psql("gone", "select 1").unwrap_err().to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn a_cluster_in_a_chosen_directory_keeps_it() {
    let base = tempfile::Builder::new().permissions(std::fs::Permissions::from_mode(0o755)).tempdir().unwrap();
    let mut opts = Options::new(base.path().join("servers/Server0/pgdata"));
    opts.no_sync = true;
    opts.max_connections = 20;
    std::fs::create_dir_all(base.path().join("servers/Server0")).unwrap();
    let mut pg = LocalPg::new(opts.clone()).unwrap();
    assert!(!pg.is_running(), "new() prepares, start() starts");
    pg.start().unwrap();
    assert_eq!(pg.psql("postgres", "show max_connections").unwrap(), "20");
    assert_eq!(pg.log_file(), base.path().join("servers/Server0/pgdata.log"));
    drop(pg);
    assert!(base.path().join("servers/Server0/pgdata/PG_VERSION").exists(), "data kept after drop");

    // The same directory again: no initdb, the same cluster.
    opts.port = None;
    let mut again = LocalPg::new(opts).unwrap();
    again.start().unwrap();
    assert_eq!(again.psql("postgres", "select 1").unwrap(), "1");
}

#[test]
fn as_root_an_untraversable_ancestor_is_a_clear_error() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: PostgreSQL runs as this user, nothing to check");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = LocalPg::new(Options::new(base.path().join("pgdata"))).unwrap_err();
    assert!(matches!(&err, PgError::NotTraversable { dir } if dir == base.path()), "{err}");
    assert!(err.to_string().contains("cannot enter"), "{err}");
}

#[test]
fn a_cluster_can_start_as_a_copy_of_a_template() {
    let base = tempfile::Builder::new().permissions(std::fs::Permissions::from_mode(0o755)).tempdir().unwrap();
    let mut opts = Options::new(base.path().join("template"));
    opts.no_sync = true;
    let template = LocalPg::new(opts).unwrap();
    let template_dir = template.data_dir().to_owned();

    let mut copy_opts = Options::new(base.path().join("copy"));
    copy_opts.template = Some(template_dir.clone());
    let mut copy = LocalPg::new(copy_opts.clone()).unwrap();
    copy.start().unwrap();
    copy.create_database("sharddb").unwrap();
    assert_eq!(copy.psql("sharddb", "select 1").unwrap(), "1");

    // A running cluster is not a template.
    let mut running = LocalPg::new(Options::new(base.path().join("busy"))).unwrap();
    running.start().unwrap();
    copy_opts.data_dir = base.path().join("copy2");
    copy_opts.template = Some(running.data_dir().to_owned());
    let err = LocalPg::new(copy_opts.clone()).unwrap_err();
    assert!(matches!(err, PgError::BadTemplate { .. }), "{err}");
    copy_opts.template = Some(base.path().join("nothing"));
    assert!(LocalPg::new(copy_opts).unwrap_err().to_string().contains("holds no cluster"));
}

#[test]
fn a_cluster_with_a_password_refuses_connections_without_it() {
    let dir = tempfile::Builder::new()
        .prefix("localpg-pw-")
        .permissions(std::fs::Permissions::from_mode(0o755))
        .tempdir()
        .unwrap();
    let mut opts = Options::new(dir.path().join("pgdata"));
    opts.no_sync = true;
    opts.password = Some("s3cret-pw".into());
    let mut pg = LocalPg::new(opts).unwrap();
    assert!(!dir.path().join("pgdata.pwfile").exists(), "initdb's password file is removed");
    pg.start().unwrap();
    pg.create_database("sharddb").unwrap();
    assert_eq!(pg.psql("sharddb", "select 1").unwrap(), "1", "our own clients send the password");
    assert!(!pg.url("sharddb").contains("s3cret"), "the URL never holds the password");
    let hba = pg.psql("sharddb", "select distinct auth_method from pg_hba_file_rules").unwrap();
    assert_eq!(hba, "scram-sha-256");
    let psql = |password: Option<&str>| psql_as(&pg, password);
    let (ok, err) = psql(None);
    assert!(!ok && err.contains("password"), "no password: {err}");
    let (ok, err) = psql(Some("wrong"));
    assert!(!ok && err.contains("password authentication failed"), "wrong password: {err}");
    assert!(psql(Some("s3cret-pw")).0, "the right password");
}

/// `select 1` through `psql` over TCP as the superuser, with `password` or none at all: whether
/// it succeeded, and its stderr.
fn psql_as(pg: &LocalPg, password: Option<&str>) -> (bool, String) {
    let mut cmd = std::process::Command::new(pg.binaries().program("psql"));
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &pg.port().to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-w",
        "-c",
        "select 1",
    ]);
    cmd.env_remove("PGPASSWORD").env("PGPASSFILE", "/nonexistent");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_cluster_made_without_a_password_is_made_to_require_one_and_keeps_its_data() {
    let dir = tempfile::Builder::new()
        .prefix("localpg-adopt-")
        .permissions(std::fs::Permissions::from_mode(0o755))
        .tempdir()
        .unwrap();
    let mut opts = Options::new(dir.path().join("pgdata"));
    opts.no_sync = true;
    let mut open = LocalPg::new(opts.clone()).unwrap();
    open.start().unwrap();
    open.create_database("sharddb").unwrap();
    open.psql("sharddb", "create table t (k bigint primary key, v text); insert into t values (1, 'kept')").unwrap();
    assert!(psql_as(&open, None).0, "made with trust: anyone local gets in");
    assert!(!open.require_password().unwrap(), "no password to set: left alone");
    assert!(psql_as(&open, None).0, "still trusting");
    drop(open);

    // The same directory, now given a password (one needing SQL quoting).
    opts.port = None;
    opts.password = Some("it's-a-s3cret".into());
    let mut pg = LocalPg::new(opts).unwrap();
    pg.start().unwrap();
    assert!(pg.require_password().unwrap(), "trust rules found and replaced");
    let (ok, err) = psql_as(&pg, None);
    assert!(!ok && err.contains("password"), "no password: {err}");
    let (ok, err) = psql_as(&pg, Some("wrong"));
    assert!(!ok && err.contains("password authentication failed"), "wrong password: {err}");
    assert!(psql_as(&pg, Some("it's-a-s3cret")).0, "the password set");
    assert_eq!(pg.psql("sharddb", "select v from t").unwrap(), "kept", "the data is the same");
    let methods = pg.psql("postgres", "select distinct auth_method from pg_hba_file_rules").unwrap();
    assert_eq!(methods, "scram-sha-256");
    assert!(!dir.path().join("pgdata.password.sql").exists(), "the statement holding the password is removed");
    assert!(!pg.require_password().unwrap(), "a second run finds nothing to do");

    // And it stays so across a restart.
    pg.stop().unwrap();
    pg.start().unwrap();
    assert!(!psql_as(&pg, None).0, "no password after a restart");
    assert_eq!(pg.psql("sharddb", "select v from t").unwrap(), "kept");
}

#[test]
fn settings_reach_the_server_and_only_plain_words_are_accepted() {
    let base = tempfile::Builder::new().permissions(std::fs::Permissions::from_mode(0o755)).tempdir().unwrap();
    let mut opts = Options::new(base.path().join("pgdata"));
    opts.settings = vec![("work_mem".into(), "8MB".into()), ("shared_buffers".into(), "48MB".into())];
    let mut pg = LocalPg::new(opts).unwrap();
    pg.start().unwrap();
    assert_eq!(pg.psql("postgres", "show work_mem").unwrap(), "8MB");
    assert_eq!(pg.psql("postgres", "show shared_buffers").unwrap(), "48MB", "over localpg's own 32MB");
    pg.stop().unwrap();

    for bad in [("work_mem", "8MB -c fsync=off"), ("work_mem", "'8MB'"), ("a;b", "1"), ("work_mem", "")] {
        let mut opts = Options::new(base.path().join("other"));
        opts.settings = vec![(bad.0.into(), bad.1.into())];
        let err = LocalPg::new(opts).unwrap_err();
        assert!(matches!(err, PgError::BadSetting(_)), "{bad:?}: {err}");
    }
}

#[test]
fn a_cluster_may_also_listen_on_a_unix_socket_in_its_data_directory() {
    let base = tempfile::Builder::new().permissions(std::fs::Permissions::from_mode(0o755)).tempdir().unwrap();
    let mut opts = Options::new(base.path().join("pgdata"));
    opts.no_sync = true;
    let plain = LocalPg::new(opts.clone()).unwrap();
    assert_eq!(plain.socket_url("db"), None, "no socket unless asked for");
    drop(plain);
    opts.unix_socket = true;
    let mut pg = LocalPg::new(opts).unwrap();
    pg.start().unwrap();
    let socket = pg.data_dir().join(format!(".s.PGSQL.{}", pg.port()));
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok(), "{} accepts connections", socket.display());
    assert!(accepts_connections(pg.port()), "and 127.0.0.1 still does");
    assert_eq!(
        pg.socket_url("db").unwrap(),
        format!("postgres://postgres@localhost:{}/db?host={}", pg.port(), pg.data_dir().display())
    );
}
