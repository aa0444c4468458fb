//! Test harness: the real service on a random port with a fresh SQLite store
//! and queue per test, and a real webhook receiver on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use orchestrator::app::{App, Role};
use orchestrator::config::Config;
use serde_json::{Value, json};

pub const ADMIN_KEY: &str = "admin-key-for-tests-0123456789";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A pipeline directory made for one test.
pub struct PipelineDir {
    pub dir: tempfile::TempDir,
}

impl PipelineDir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("pipelines/scripts")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("schemas")).expect("mkdir");
        Self { dir }
    }

    /// The shipped `pipelines/` and `schemas/`.
    pub fn shipped() -> Self {
        let me = Self::new();
        copy_dir(&repo_root().join("pipelines"), &me.pipelines());
        copy_dir(&repo_root().join("schemas"), &me.schemas());
        me
    }

    pub fn pipelines(&self) -> PathBuf {
        self.dir.path().join("pipelines")
    }

    pub fn schemas(&self) -> PathBuf {
        self.dir.path().join("schemas")
    }

    pub fn write(&self, rel: &str, text: &str) -> &Self {
        let path = self.dir.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(path, text).expect("write");
        self
    }

    /// A permissive schema named `any.schema.json`.
    pub fn any_schema(&self) -> &Self {
        self.write("schemas/any.schema.json", r#"{"type": "object"}"#)
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    /// The `demo` partner's key.
    pub key: String,
    pub app: Option<App>,
    server: tokio::task::JoinHandle<()>,
    /// Kept so the store and queue files live as long as the app.
    pub _data: tempfile::TempDir,
    pub pipelines: PipelineDir,
    isolation: Option<Isolation>,
    /// The configuration it started with (for [`TestApp::restart`]).
    values: HashMap<String, String>,
}

pub fn base_config(data: &Path, pipelines: &PipelineDir) -> HashMap<String, String> {
    let mut m = HashMap::new();
    m.insert("DATA_DIR".into(), data.display().to_string());
    m.insert(
        "PIPELINES_DIR".into(),
        pipelines.pipelines().display().to_string(),
    );
    m.insert("SCHEMAS_DIR".into(), pipelines.schemas().display().to_string());
    m.insert("ADMIN_API_KEY".into(), ADMIN_KEY.into());
    m.insert("SWEEP_INTERVAL".into(), "200ms".into());
    m.insert("REQUEUE_AFTER".into(), "5s".into());
    m.insert("PROCESSING_LEASE".into(), "30s".into());
    m.insert("SCRIPT_MAX_WALL_TIME".into(), "200ms".into());
    // Tests send bursts from one address and one key; the limits have their own test.
    m.insert("RATE_LIMIT_IP_PER_MINUTE".into(), "10000000".into());
    m.insert("RATE_LIMIT_PARTNER_PER_MINUTE".into(), "10000000".into());
    m.insert("RATE_LIMIT_PARTNER_BURST".into(), "100000".into());
    m
}

/// Where a test runs: the embedded default, or PostgreSQL + Redis.
#[derive(Debug, Clone)]
pub enum Backend {
    Embedded,
    /// `env`: further variables a server on it needs (the TLS tests'
    /// certificate files).
    Production {
        database_url: String,
        redis_url: String,
        env: Vec<(String, String)>,
    },
}

const SKIP: &str = "skipped: PostgreSQL/Redis not reachable; production-path test not run \
                    (set ORCH_REQUIRE_SERVICES=1 to require them)";

impl Backend {
    /// PostgreSQL + Redis when they answer (`ORCH_TEST_DATABASE_URL`,
    /// `ORCH_TEST_REDIS_URL`, defaults on 127.0.0.1). Otherwise `None` after
    /// printing a skip line, or a panic when `ORCH_REQUIRE_SERVICES=1`.
    pub async fn production() -> Option<Backend> {
        let database_url = std::env::var("ORCH_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let redis_url =
            std::env::var("ORCH_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let pg = async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .acquire_timeout(Duration::from_secs(3))
                .max_connections(1)
                .connect(&database_url)
                .await
                .map_err(|e| e.to_string())?;
            sqlx::query("SELECT 1")
                .execute(&pool)
                .await
                .map_err(|e| e.to_string())?;
            pool.close().await;
            Ok::<_, String>(())
        };
        let rd = async {
            let client = redis::Client::open(redis_url.as_str()).map_err(|e| e.to_string())?;
            let mut conn =
                tokio::time::timeout(Duration::from_secs(3), client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| "timeout".to_string())?
                    .map_err(|e| e.to_string())?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        match (pg.await, rd.await) {
            (Ok(()), Ok(())) => Some(Backend::Production {
                database_url,
                redis_url,
                env: Vec::new(),
            }),
            (a, b) => {
                let why = format!("PostgreSQL: {:?}, Redis: {:?}", a.err(), b.err());
                if std::env::var("ORCH_REQUIRE_SERVICES").as_deref() == Ok("1") {
                    panic!("PostgreSQL and Redis are required (ORCH_REQUIRE_SERVICES=1): {why}");
                }
                // Straight to stderr (libtest captures print!), once per run.
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "{SKIP} ({why})");
                });
                None
            }
        }
    }
}

/// What a production-path test created and must remove.
pub struct Isolation {
    admin_url: String,
    database: String,
    redis_url: String,
    pub prefix: String,
}

impl Isolation {
    /// A fresh database and Redis prefix; returns the database URL.
    pub async fn create(database_url: &str, redis_url: &str) -> (Isolation, String) {
        let name = format!("orch_test_{}", ulid::Ulid::new().to_string().to_lowercase());
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(database_url)
            .await
            .expect("connect PostgreSQL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("create test database");
        pool.close().await;
        let (path, query) = database_url.split_once('?').unwrap_or((database_url, ""));
        let (base, _) = path.rsplit_once('/').expect("database url has a path");
        let url = match query {
            "" => format!("{base}/{name}"),
            q => format!("{base}/{name}?{q}"),
        };
        let iso = Isolation {
            admin_url: database_url.to_owned(),
            database: name.clone(),
            redis_url: redis_url.to_owned(),
            prefix: format!("orch-test-{name}"),
        };
        (iso, url)
    }

    /// For a production backend: a fresh database and Redis prefix, and
    /// the `DATABASE_URL`, `REDIS_URL` and `REDIS_PREFIX` that use them.
    pub async fn for_backend(backend: &Backend) -> Option<(Isolation, Vec<(String, String)>)> {
        let Backend::Production {
            database_url,
            redis_url,
            env,
        } = backend
        else {
            return None;
        };
        let (iso, url) = Isolation::create(database_url, redis_url).await;
        let mut vars = vec![
            ("DATABASE_URL".to_owned(), url),
            ("REDIS_URL".to_owned(), redis_url.clone()),
            ("REDIS_PREFIX".to_owned(), iso.prefix.clone()),
        ];
        vars.extend(env.iter().cloned());
        Some((iso, vars))
    }

    pub async fn remove(&self) {
        if let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.admin_url)
            .await
        {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database);
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
            pool.close().await;
        }
        let Ok(client) = redis::Client::open(self.redis_url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return;
        };
        let mut cursor: u64 = 0;
        loop {
            let scanned: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await;
            let Ok((next, keys)) = scanned else { break };
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}

pub async fn spawn_app(pipelines: PipelineDir) -> TestApp {
    spawn_app_on(Backend::Embedded, pipelines).await
}

pub async fn spawn_app_on(backend: Backend, pipelines: PipelineDir) -> TestApp {
    spawn_app_with(backend, pipelines, |_| {}).await
}

pub async fn spawn_app_with(
    backend: Backend,
    pipelines: PipelineDir,
    tweak: impl FnOnce(&mut HashMap<String, String>),
) -> TestApp {
    let data = tempfile::tempdir().expect("tempdir");
    let mut values = base_config(data.path(), &pipelines);
    let mut isolation = None;
    if let Some((iso, vars)) = Isolation::for_backend(&backend).await {
        values.extend(vars);
        isolation = Some(iso);
    }
    tweak(&mut values);
    crate::logcap::secret(ADMIN_KEY);
    for name in ["JWT_SECRET", "ADMIN_API_KEY"] {
        if let Some(v) = values.get(name) {
            crate::logcap::secret(v);
        }
    }
    if let Some(url) = values.get("DATABASE_URL")
        && let Some(password) = url_password(url)
    {
        crate::logcap::secret(&password);
    }
    let (app, addr, server) = start_and_serve(&values).await;
    let key = app.demo_key.clone().expect("demo partner created on first start");
    crate::logcap::secret(&key);
    TestApp {
        addr,
        http: reqwest::Client::new(),
        key,
        app: Some(app),
        server,
        _data: data,
        pipelines,
        isolation,
        values,
    }
}

async fn start_and_serve(values: &HashMap<String, String>) -> (App, SocketAddr, tokio::task::JoinHandle<()>) {
    let config = Config::from_map(values).expect("config");
    let app = App::start(config, Role::All).await.expect("app starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = app.router();
    let server = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    (app, addr, server)
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post_event(&self, tipo: &str, dados: Value) -> reqwest::Response {
        self.post_event_as(&self.key, tipo, dados, None).await
    }

    pub async fn post_event_as(
        &self,
        key: &str,
        tipo: &str,
        dados: Value,
        idem: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(self.url("/events"))
            .header("x-api-key", key)
            .json(&json!({"tipo": tipo, "dados": dados}));
        if let Some(k) = idem {
            req = req.header("idempotency-key", k);
        }
        req.send().await.expect("request")
    }

    /// A route's body as text, without credentials.
    async fn get_text(&self, path: &str) -> String {
        let resp = self.http.get(self.url(path)).send().await.expect("send");
        resp.text().await.expect("text")
    }

    /// The OpenAPI document the service serves.
    pub async fn openapi(&self) -> Value {
        serde_json::from_str(&self.get_text("/api/openapi.json").await).expect("json")
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        self.get_text("/metrics").await
    }

    pub async fn get_json(&self, path: &str, key: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(self.url(path))
            .header("x-api-key", key)
            .send()
            .await
            .expect("request");
        let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Creates another partner with a known key.
    pub async fn add_partner(&self, id: &str) -> String {
        let store = &self.app.as_ref().expect("running").state.store;
        store
            .create_partner(&orchestrator::store::NewPartner {
                id: id.into(),
                name: id.into(),
                password_hash: None,
                rate_per_minute: None,
                burst: None,
                weight: 1,
            })
            .await
            .expect("partner");
        let key = orchestrator::credentials::generate_api_key();
        crate::logcap::secret(&key);
        store
            .add_api_key(id, &orchestrator::credentials::hash_api_key(&key), "test")
            .await
            .expect("key");
        key
    }

    /// Polls `/events/{id}/status` until `pred` holds or `timeout` passes.
    pub async fn wait_status(&self, id: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, body) = self.get_json(&format!("/events/{id}/status"), ADMIN_KEY).await;
            if pred(&body) {
                return body;
            }
            if Instant::now() > deadline {
                panic!("event {id} did not reach the expected state in {timeout:?}; last: {body:#}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn wait_for(&self, id: &str, status: &str, timeout: Duration) -> Value {
        self.wait_status(id, timeout, |b| b["status"] == status).await
    }

    /// Stops the service and starts a new one on the same store, queue and
    /// directories (what a process restart does; the port changes).
    pub async fn restart(mut self) -> TestApp {
        self.server.abort();
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
        let (app, addr, server) = start_and_serve(&self.values).await;
        self.app = Some(app);
        self.addr = addr;
        self.server = server;
        self
    }

    /// The Redis key prefix of a production-path app.
    pub fn redis_prefix(&self) -> Option<&str> {
        self.values.get("REDIS_PREFIX").map(String::as_str)
    }

    /// The Redis URL a production-path app uses.
    pub fn redis_url(&self) -> Option<&str> {
        self.values.get("REDIS_URL").map(String::as_str)
    }

    /// The PostgreSQL URL of a production-path app's own database.
    pub fn database_url(&self) -> Option<&str> {
        self.values.get("DATABASE_URL").map(String::as_str)
    }

    /// Runs `orchestrator ARGS` on this app's store: whether it succeeded,
    /// and what it printed.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        use secrecy::ExposeSecret;
        let config = &self.app.as_ref().expect("running").state.config;
        let url = config.database_url.expose_secret().to_owned();
        let mut command = orchestrator_command(&[("DATABASE_URL".to_owned(), url)]);
        command.args(args);
        let (code, text) = run_to_end(command);
        (code == 0, text)
    }

    pub async fn stop(mut self) {
        self.server.abort();
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
        if let Some(iso) = self.isolation.take() {
            iso.remove().await;
        }
        crate::logcap::assert_clean();
    }
}

/// The password of a `scheme://user:password@host/…` URL.
pub fn url_password(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let userinfo = rest.split('/').next()?.rsplit_once('@')?.0;
    let (_, password) = userinfo.split_once(':')?;
    (password.len() >= 8).then(|| password.to_owned())
}

pub async fn accepted_id(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body: Value = resp.json().await.expect("json");
    assert_eq!(status, 202, "expected 202, got {status}: {body}");
    body["id"].as_str().expect("id").to_owned()
}

/// A request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
    /// When it arrived.
    pub at: std::time::Instant,
    /// The same, by the wall clock (to compare with HTTP dates).
    pub wall: std::time::SystemTime,
    /// The status it was answered with (200 for `Hang`).
    pub status: u16,
}

/// What the receiver answers, per path.
#[derive(Debug, Clone)]
pub enum Behaviour {
    Status(u16),
    /// Sleep, then 200.
    Hang(Duration),
    /// This status with this `Retry-After` header value.
    RetryAfter(u16, String),
    /// 500 for this percentage of the calls, chosen at random (a seeded
    /// sequence, so a run can be repeated), else 200.
    Flaky(u64),
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    behaviour: HashMap<String, Behaviour>,
    /// The state of the `Flaky` sequence (splitmix64).
    draws: u64,
}

impl ReceiverState {
    /// A pseudo-random number in 0..100.
    fn draw(&mut self) -> u64 {
        self.draws = self.draws.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.draws;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % 100
    }
}

/// A real HTTP webhook receiver on loopback.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let app = axum::Router::new().fallback(receive).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set(&self, path: &str, b: Behaviour) {
        self.state.lock().expect("lock").behaviour.insert(path.into(), b);
    }

    pub fn received(&self, path: &str) -> Vec<Received> {
        self.state
            .lock()
            .expect("lock")
            .received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    pub fn count_for(&self, path: &str, event_id: &str) -> usize {
        self.received(path)
            .iter()
            .filter(|r| r.body["id"] == event_id)
            .count()
    }
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = uri.path().to_owned();
    let (behaviour, status) = {
        let mut s = state.lock().expect("lock");
        let behaviour = s.behaviour.get(&path).cloned().unwrap_or(Behaviour::Status(200));
        let status = match &behaviour {
            Behaviour::Status(code) | Behaviour::RetryAfter(code, _) => *code,
            Behaviour::Hang(_) => 200,
            Behaviour::Flaky(percent) => {
                if s.draw() < *percent {
                    500
                } else {
                    200
                }
            }
        };
        s.received.push(Received {
            path: path.clone(),
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            at: std::time::Instant::now(),
            wall: std::time::SystemTime::now(),
            status,
        });
        (behaviour, status)
    };
    match behaviour {
        Behaviour::Status(code) => StatusCode::from_u16(code).expect("status").into_response(),
        Behaviour::Flaky(_) => StatusCode::from_u16(status).expect("status").into_response(),
        Behaviour::Hang(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
        Behaviour::RetryAfter(code, value) => (
            StatusCode::from_u16(code).expect("status"),
            [(axum::http::header::RETRY_AFTER, value)],
        )
            .into_response(),
    }
}

/// A free TCP port on loopback (for processes that need a fixed address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Settings every test process shares: fast polling and sweeping, no demo partner.
pub fn node_env(dir: &PipelineDir) -> Vec<(String, String)> {
    [
        ("PIPELINES_DIR", dir.pipelines().display().to_string()),
        ("SCHEMAS_DIR", dir.schemas().display().to_string()),
        ("ADMIN_API_KEY", ADMIN_KEY.to_owned()),
        ("CREATE_DEMO_PARTNER", "false".to_owned()),
        ("SWEEP_INTERVAL", "300ms".to_owned()),
        ("REQUEUE_AFTER", "3s".to_owned()),
        ("RATE_LIMIT_IP_PER_MINUTE", "10000000".to_owned()),
        ("RATE_LIMIT_PARTNER_PER_MINUTE", "10000000".to_owned()),
        ("RATE_LIMIT_PARTNER_BURST", "100000".to_owned()),
        ("RUST_LOG", "info,sqlx=warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// `orchestrator <command> DIR --schemas DIR`: exit code and everything printed.
pub fn run_on_dir(command: &str, dir: &PipelineDir) -> (i32, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    c.arg(command)
        .arg(dir.pipelines())
        .arg("--schemas")
        .arg(dir.schemas());
    run_to_end(c)
}

/// Runs a command of the binary to its end with warnings only, in the
/// pretty layout: its exit code and everything it printed.
pub fn run_to_end(mut command: std::process::Command) -> (i32, String) {
    let out = command
        .env("LOG_FORMAT", "pretty")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run orchestrator");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `orchestrator partner create ID --key KEY` with these variables.
pub fn create_partner(vars: &[(String, String)], id: &str, key: &str) {
    let mut c = orchestrator_command(vars);
    c.args(["partner", "create", id, "--key", key]);
    let (code, text) = run_to_end(c);
    assert_eq!(code, 0, "partner create {id}: {text}");
}

/// The real binary with exactly these environment variables (and PATH).
pub fn orchestrator_command(vars: &[(String, String)]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

/// Starts the binary with `args`, appending stdout and stderr to `log`.
pub fn spawn_orchestrator(vars: &[(String, String)], args: &[&str], log: &Path) -> std::process::Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let err = out.try_clone().expect("clone");
    orchestrator_command(vars)
        .args(args)
        .stdout(std::process::Stdio::from(out))
        .stderr(std::process::Stdio::from(err))
        .spawn()
        .expect("spawn orchestrator")
}

/// Waits until `/health` on `port` answers 200.
pub async fn wait_healthy(http: &reqwest::Client, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/health")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process on port {port} did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/events/stats` of the process on `port`, as the admin.
pub async fn admin_stats(http: &reqwest::Client, port: u16) -> Value {
    http.get(format!("http://127.0.0.1:{port}/events/stats"))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json")
}

/// A fresh database of the backend's kind, empty: a SQLite file in the
/// returned directory, or a new PostgreSQL database (remove the isolation
/// when done).
pub async fn test_database(backend: &Backend) -> (String, Option<Isolation>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, iso) = match backend {
        Backend::Embedded => (format!("sqlite://{}/s.db?mode=rwc", dir.path().display()), None),
        Backend::Production {
            database_url,
            redis_url,
            ..
        } => {
            let (iso, url) = Isolation::create(database_url, redis_url).await;
            (url, Some(iso))
        }
    };
    (url, iso, dir)
}

/// A store of the backend's kind for store-level tests, migrated, on a
/// [`test_database`].
pub async fn test_store(
    backend: &Backend,
) -> (
    orchestrator::store::SqlStore,
    Option<Isolation>,
    tempfile::TempDir,
) {
    let (url, iso, dir) = test_database(backend).await;
    use orchestrator::store::Store;
    let store = orchestrator::store::SqlStore::connect(&url, 4)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    (store, iso, dir)
}

/// An event of type `T` from partner `p`, without idempotency key, to
/// insert straight into a store; change fields with `..new_event(id)`.
pub fn new_event(id: &str) -> orchestrator::store::NewEvent {
    orchestrator::store::NewEvent {
        id: id.into(),
        partner_id: "p".into(),
        tipo: "T".into(),
        dados: json!({}),
        pipeline_version: "v".into(),
        received_at: chrono::Utc::now(),
        idempotency_key: None,
        request_hash: "h".into(),
        request_id: None,
        trace: None,
        order_key: None,
        order_block: false,
    }
}

/// A JWT with exactly these claims, signed with `secret` by `alg`.
pub fn signed_token(secret: &str, claims: Value, alg: jsonwebtoken::Algorithm) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).expect("key");
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &key).expect("encode")
}

/// An HS256 JWT for `sub`, issued 10 s ago, expiring at `exp` (epoch seconds).
pub fn jwt(secret: &str, sub: &str, exp: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    signed_token(
        secret,
        json!({"sub": sub, "iat": now - 10, "exp": exp}),
        jsonwebtoken::Algorithm::HS256,
    )
}

/// An unsigned (`alg: none`) token for `sub`, valid for ten minutes if it were accepted.
pub fn alg_none(sub: &str) -> String {
    use base64::Engine;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let exp = chrono::Utc::now().timestamp() + 600;
    format!(
        "{}.{}.",
        e.encode(br#"{"alg":"none","typ":"JWT"}"#),
        e.encode(json!({"sub": sub, "exp": exp}).to_string())
    )
}

/// The outcome of one attempt ending in `status` (a due retry, an error
/// unless processed), for store-level tests.
pub fn finish(status: orchestrator::store::Status) -> orchestrator::store::AttemptFinish {
    use orchestrator::store::{AttemptFinish, LastError, Status};
    AttemptFinish {
        status,
        next_attempt_at: (status == Status::Retrying)
            .then(|| chrono::Utc::now() - chrono::Duration::seconds(1)),
        last_error: (status != Status::Processed).then(|| LastError {
            category: "test".into(),
            message: "failed".into(),
            transient: status == Status::Retrying,
            stage: None,
        }),
        trace: Vec::new(),
        deliveries: Vec::new(),
        result: None,
        wait: None,
        claim_next: None,
    }
}

/// Claims `id` and records `status` as the attempt's outcome.
pub async fn run(store: &orchestrator::store::SqlStore, id: &str, status: orchestrator::store::Status) {
    use orchestrator::store::EventStore;
    let now = chrono::Utc::now();
    let ev = store
        .claim(id, now, now + chrono::Duration::seconds(30))
        .await
        .expect("claim")
        .expect("claimable");
    assert!(
        store
            .finish_attempt(id, ev.attempts, &finish(status))
            .await
            .expect("finish")
            .recorded
    );
}

/// [`new_event`] of this type, partner, time and key.
pub fn at(
    id: &str,
    tipo: &str,
    partner: &str,
    received_at: chrono::DateTime<chrono::Utc>,
    key: Option<&str>,
) -> orchestrator::store::NewEvent {
    use orchestrator::store::NewEvent;
    NewEvent {
        tipo: tipo.into(),
        partner_id: partner.into(),
        received_at,
        idempotency_key: key.map(str::to_owned),
        ..new_event(id)
    }
}

/// A private `redis-server` on its own port (so the shared one is never
/// stopped), with `extra` arguments (TLS); killed when dropped. `None`
/// (test skipped) without the binary, a panic when `ORCH_REQUIRE_SERVICES=1`.
pub struct PrivateRedis {
    child: std::process::Child,
}

impl PrivateRedis {
    pub fn start(port: u16, extra: &[&str]) -> Option<PrivateRedis> {
        let port = port.to_string();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(child) => Some(PrivateRedis { child }),
            Err(e) => {
                if std::env::var("ORCH_REQUIRE_SERVICES").as_deref() == Ok("1") {
                    panic!("redis-server is required: {e}");
                }
                println!("skipped: no redis-server binary ({e})");
                None
            }
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `credential_lookups_total{source="cache"}` of the server at `base`
/// (`http://host:port`).
pub async fn cache_hits(http: &reqwest::Client, base: &str) -> f64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix("credential_lookups_total{source=\"cache\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no credential_lookups_total{{source=\"cache\"}} in {text}"))
}

/// Sends `post` (true when accepted) until the server at `base` answers it
/// from its credentials cache (its cache hits move across the request),
/// within 3 s: its first version read must be in before it keeps anything.
pub async fn until_cached<F, Fut>(http: &reqwest::Client, base: &str, mut post: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let since = Instant::now();
    loop {
        let before = cache_hits(http, base).await;
        assert!(
            post().await,
            "{base}: the key was refused while warming the cache"
        );
        if cache_hits(http, base).await > before {
            return;
        }
        assert!(
            since.elapsed() < Duration::from_secs(3),
            "{base} never answered the key from its cache"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `probe` (one request, sent now: `Ok` when its answer is the new
/// one, else what it got) until it passes, every 20 ms; the send time of
/// the first that passed, counted from the change at `since`. A request
/// counts by when it was sent, so a slow answer on a loaded machine is not
/// a stale one; fails when one sent 1 s or more after the change still
/// gets the old answer.
pub async fn within_a_second<F, Fut>(since: Instant, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    loop {
        let sent = since.elapsed();
        match probe().await {
            Ok(()) => return sent,
            Err(got) => assert!(
                sent < Duration::from_secs(1),
                "a request sent {sent:?} after the change {got}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
