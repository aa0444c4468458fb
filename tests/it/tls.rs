//! TLS to PostgreSQL and Redis, against a private PostgreSQL cluster with
//! `ssl=on` and a private `redis-server --tls-port` that asks for a client
//! certificate, both with certificates this test makes (rcgen): the whole
//! lifecycle runs over `sslmode=verify-full` and `rediss://`, and a CA the
//! server's certificate does not chain to fails the start at once, saying
//! so.
//!
//! Needs `redis-server` and PostgreSQL's server binaries (`initdb`,
//! `postgres`; found under `/usr/lib/postgresql/*/bin` or
//! `ORCH_TEST_PG_BINDIR`): skipped without them, required with
//! `ORCH_REQUIRE_SERVICES=1`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::helpers::*;

/// The certificates: a CA, the servers' certificate (for `localhost` and
/// 127.0.0.1) and a client certificate signed by it, and a second CA that
/// signed nothing here.
struct Pki {
    ca: PathBuf,
    wrong_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("self-signed CA");
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(issuer: &Issuer<'static, KeyPair>, names: &[&str], cn: &str) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let mut params = CertificateParams::new(names).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("signed leaf");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn make(dir: &Path) -> Pki {
        let (ca, issuer) = new_ca("orchestrator test CA");
        let (wrong_ca, _) = new_ca("a CA that signed nothing here");
        let (server_cert, server_key) = leaf(&issuer, &["localhost", "127.0.0.1"], "localhost");
        let (client_cert, client_key) = leaf(&issuer, &[], "orchestrator");
        // Keys private to their owner: PostgreSQL refuses a key file others
        // may read.
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write PEM");
            let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .expect("chmod PEM");
            path
        };
        Pki {
            ca: write("ca.pem", &ca),
            wrong_ca: write("wrong-ca.pem", &wrong_ca),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
        }
    }
}

fn require(what: &str) {
    if std::env::var("ORCH_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("{what} is required (ORCH_REQUIRE_SERVICES=1)");
    }
    println!("skipped: {what} not found");
}

/// PostgreSQL's server binaries: `ORCH_TEST_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout).
fn pg_bindir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("ORCH_TEST_PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// A throwaway PostgreSQL cluster with `ssl=on`, on its own port; stopped
/// when dropped. As root (CI), it runs as the `postgres` user, which
/// PostgreSQL insists on.
struct PrivatePostgres {
    bindir: PathBuf,
    data: PathBuf,
    as_root: bool,
    port: u16,
}

impl PrivatePostgres {
    fn start(bindir: &Path, dir: &Path, pki: &Pki) -> PrivatePostgres {
        let as_root = std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        let data = dir.join("pgdata");
        if as_root {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster directory to postgres");
        }
        let pg = PrivatePostgres {
            bindir: bindir.to_owned(),
            data,
            as_root,
            port: free_port(),
        };
        let out = pg
            .run("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&pg.data)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let setting = |k: &str, v: &Path| format!("{k}={}", v.display());
        let options = [
            format!("-p {}", pg.port),
            "-c listen_addresses=127.0.0.1".to_owned(),
            format!("-c {}", setting("unix_socket_directories", dir)),
            "-c ssl=on -c fsync=off -c max_connections=60".to_owned(),
            format!("-c {}", setting("ssl_cert_file", &pki.server_cert)),
            format!("-c {}", setting("ssl_key_file", &pki.server_key)),
        ];
        let out = pg
            .run("pg_ctl")
            .arg("-D")
            .arg(&pg.data)
            .args(["-o", &options.join(" "), "-l"])
            .arg(dir.join("postgres.log"))
            .args(["-w", "start"])
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    /// A server binary, as the `postgres` user when this is root.
    fn run(&self, program: &str) -> Command {
        let program = self.bindir.join(program);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .run("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Waits until something accepts TCP connections on `port`.
async fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `orchestrator migrate` printed, with its exit code and how long
/// it took, for a start that must fail.
fn failed_start(vars: &[(String, String)], args: &[&str]) -> (String, Duration) {
    let started = Instant::now();
    let out = tempfile::NamedTempFile::new().expect("output file");
    let mut child = orchestrator_command(vars)
        .args(args)
        .env("LOG_FORMAT", "pretty")
        .env("RUST_LOG", "warn")
        .stdout(out.reopen().expect("stdout"))
        .stderr(out.reopen().expect("stderr"))
        .spawn()
        .expect("run orchestrator");
    // A start that does not fail must not hang the suite.
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} did not fail within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let text = std::fs::read_to_string(out.path()).expect("output");
    assert!(!status.success(), "{args:?} must fail; it printed: {text}");
    println!("{args:?} failed as it should, in {took:?}: {text}");
    (text, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_and_redis_runs_the_whole_lifecycle_and_refuses_a_wrong_ca() {
    let Some(bindir) = pg_bindir() else {
        return require("PostgreSQL's initdb");
    };
    // Readable by the `postgres` user: under the system's temp dir, not a
    // directory private to root.
    let dir = tempfile::Builder::new()
        .prefix("orch-tls-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .tempdir()
        .expect("tempdir");
    let pki = Pki::make(dir.path());
    let redis_port = free_port();
    let path = |p: &Path| p.display().to_string();
    let Some(_redis) = PrivateRedis::start(
        0,
        &[
            "--tls-port",
            &redis_port.to_string(),
            "--tls-cert-file",
            &path(&pki.server_cert),
            "--tls-key-file",
            &path(&pki.server_key),
            "--tls-ca-cert-file",
            &path(&pki.ca),
            "--tls-auth-clients",
            "yes",
        ],
    ) else {
        return;
    };
    let pg = PrivatePostgres::start(&bindir, dir.path(), &pki);
    wait_listening(redis_port, "redis-server --tls-port").await;

    let database_url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        path(&pki.ca)
    );
    let redis_url = format!("rediss://localhost:{redis_port}");
    let certs = vec![
        ("REDIS_CA_FILE".to_owned(), path(&pki.ca)),
        ("REDIS_CLIENT_CERT_FILE".to_owned(), path(&pki.client_cert)),
        ("REDIS_CLIENT_KEY_FILE".to_owned(), path(&pki.client_key)),
    ];

    // The connections really are encrypted: PostgreSQL says so of this
    // session, and the Redis port does not speak plain RESP.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(20))
        .connect(&database_url)
        .await
        .expect("verify-full connection to the private cluster");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "the session is encrypted");
    pool.close().await;
    let plain = redis::Client::open(format!("redis://127.0.0.1:{redis_port}")).expect("plain client");
    let plain = tokio::time::timeout(Duration::from_secs(3), async {
        let mut conn = plain.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    })
    .await;
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "plain RESP must not be answered on the TLS port"
    );

    let backend = Backend::Production {
        database_url: database_url.clone(),
        redis_url: redis_url.clone(),
        env: certs.clone(),
    };
    crate::lifecycle::seed_events_are_processed_end_to_end(backend.clone()).await;
    crate::lifecycle::transient_failures_retry_then_dead_letter_then_manual_retry(backend.clone()).await;
    crate::lifecycle::dead_letters_are_redriven_by_filter(backend).await;

    // The real binary over both: an event through to its webhook, then a
    // clean stop.
    let rx = Receiver::start().await;
    let dir = crate::traces::rastreio(&rx);
    let data = tempfile::tempdir().expect("data dir");
    let port = free_port();
    let mut vars = node_env(&dir);
    vars.extend([
        ("DATA_DIR".to_owned(), path(data.path())),
        ("LISTEN_ADDR".to_owned(), format!("127.0.0.1:{port}")),
        ("DATABASE_URL".to_owned(), database_url.clone()),
        ("REDIS_URL".to_owned(), redis_url.clone()),
    ]);
    vars.extend(certs.iter().cloned());
    const KEY: &str = "eo_tls_test_key_3e8a1c5b7d9f";
    create_partner(&vars, "acme", KEY);
    let mut server = spawn_orchestrator(&vars, &["serve"], &data.path().join("server.log"));
    let http = reqwest::Client::new();
    wait_healthy(&http, port).await;
    let resp = http
        .post(format!("http://127.0.0.1:{port}/events"))
        .header("x-api-key", KEY)
        .json(&serde_json::json!({"tipo": "RASTREIO", "dados": {"pedido": 1}}))
        .send()
        .await
        .expect("post");
    let id = accepted_id(resp).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rx.count_for("/hook", &id) == 0 {
        assert!(Instant::now() < deadline, "the webhook was not called");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stop = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill");
    assert!(stop.success());
    assert!(server.wait().expect("wait").success(), "clean exit");

    // A CA that did not sign the server's certificate: a clear error, at
    // once, not a hang or a retry loop.
    let wrong_pg = database_url.replace(&path(&pki.ca), &path(&pki.wrong_ca));
    let (text, took) = failed_start(&[("DATABASE_URL".to_owned(), wrong_pg)], &["migrate"]);
    assert!(
        text.contains("DATABASE_URL") && text.contains("certificate"),
        "names the setting and the certificate problem: {text}"
    );
    assert!(took < Duration::from_secs(10), "fails fast, took {took:?}");

    let data = tempfile::tempdir().expect("data dir");
    let base = vec![
        ("DATA_DIR".to_owned(), path(data.path())),
        ("DATABASE_URL".to_owned(), database_url.clone()),
        ("REDIS_URL".to_owned(), redis_url.clone()),
        ("LISTEN_ADDR".to_owned(), format!("127.0.0.1:{}", free_port())),
        ("PIPELINES_DIR".to_owned(), path(&repo_root().join("pipelines"))),
        ("SCHEMAS_DIR".to_owned(), path(&repo_root().join("schemas"))),
        ("WATCH_PIPELINES".to_owned(), "false".to_owned()),
    ];
    let with = |extra: &[(&str, &Path)]| {
        let mut vars = base.clone();
        vars.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), path(v))));
        vars
    };
    let client = [
        ("REDIS_CLIENT_CERT_FILE", pki.client_cert.as_path()),
        ("REDIS_CLIENT_KEY_FILE", pki.client_key.as_path()),
    ];
    let mut wrong_ca = vec![("REDIS_CA_FILE", pki.wrong_ca.as_path())];
    wrong_ca.extend(client);
    let (text, took) = failed_start(&with(&wrong_ca), &["serve"]);
    assert!(
        text.contains("Redis") && text.contains("certificate"),
        "names Redis and the certificate problem: {text}"
    );
    assert!(took < Duration::from_secs(10), "fails fast, took {took:?}");

    // Without the client certificate this server asks for, the start fails
    // too, and says it is Redis.
    let (text, took) = failed_start(&with(&[("REDIS_CA_FILE", pki.ca.as_path())]), &["serve"]);
    assert!(
        text.contains("Redis") && text.contains("Certificate"),
        "names Redis and the missing certificate: {text}"
    );
    assert!(took < Duration::from_secs(10), "fails fast, took {took:?}");

    // A certificate without its key is a configuration error.
    let (text, _) = failed_start(
        &with(&[
            ("REDIS_CA_FILE", pki.ca.as_path()),
            ("REDIS_CLIENT_CERT_FILE", pki.client_cert.as_path()),
        ]),
        &["serve"],
    );
    assert!(text.contains("REDIS_CLIENT_KEY_FILE"), "{text}");
}
