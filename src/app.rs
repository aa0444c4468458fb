//! Wires the parts together: store, queue, pipelines, workers, HTTP.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use engine::gate::DestinationGate;
use engine::{LoadOptions, ScriptHost, ScriptLimits};
use plugins::BuiltinFactory;
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{self, AppState};
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::pipelines::{OnInstall, Pipelines, Reloader};
use crate::queue::{Queue, RedisQueue, SqliteQueue};
use crate::store::{SqlStore, Store};
use crate::telemetry::Metrics;
use crate::worker::{Processor, Workers};

/// Which parts of the service a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Partner API only; never runs pipelines.
    Api,
    /// Pipelines only; serves just /health and /metrics.
    Worker,
    /// Both (the embedded default).
    All,
}

impl Role {
    pub fn runs_workers(self) -> bool {
        matches!(self, Role::Worker | Role::All)
    }
    pub fn serves_api(self) -> bool {
        matches!(self, Role::Api | Role::All)
    }
}

/// A running service.
pub struct App {
    pub state: AppState,
    /// The pipeline directory watcher, when `WATCH_PIPELINES` is on.
    watcher: Option<tokio::task::JoinHandle<()>>,
    pub workers: Option<Arc<Workers>>,
    pub role: Role,
    shutdown: watch::Sender<bool>,
    background: Vec<tokio::task::JoinHandle<()>>,
    /// The demo partner's API key when this start created it.
    pub demo_key: Option<String>,
}

pub async fn connect_store(config: &Config) -> anyhow::Result<Arc<SqlStore>> {
    let store = SqlStore::connect(config.database_url.expose_secret(), 16)
        .await
        .map_err(|e| {
            let hint = if e.to_string().contains("ertificate") {
                " (TLS: sslmode=verify-full checks the server's certificate against sslrootcert in DATABASE_URL)"
            } else {
                ""
            };
            anyhow::anyhow!("cannot open the database (DATABASE_URL): {e}{hint}")
        })?;
    Ok(Arc::new(store))
}

async fn connect_queue(config: &Config) -> anyhow::Result<Arc<dyn Queue>> {
    if let Some(url) = &config.redis_url {
        let client = crate::redis_conn::client(url.expose_secret(), &config.redis_tls)
            .context("cannot connect to Redis (REDIS_URL)")?;
        let q = RedisQueue::connect(&client, &config.redis_prefix)
            .await
            .context("cannot connect to Redis (REDIS_URL)")?;
        return Ok(Arc::new(q));
    }
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(&config.queue_database_url)
        .context("QUEUE_DATABASE_URL")?
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .pragma(
            "journal_size_limit",
            crate::store::sql::WAL_SIZE_LIMIT_BYTES.to_string(),
        );
    if let Some(dir) = opts.get_filename().parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await
        .context("cannot open the queue database")?;
    let q = SqliteQueue::new(pool)
        .await
        .context("cannot set up the SQLite queue")?;
    Ok(Arc::new(q))
}

/// Loads pipelines with the built-in plugins; their webhook calls go
/// through `gate`.
pub fn load_pipelines(
    config: &Config,
    gate: Arc<dyn DestinationGate>,
) -> Result<Pipelines, engine::LoadErrors> {
    let limits = ScriptLimits {
        max_operations: config.script_max_operations,
        max_wall_time: config.script_max_wall_time,
        ..ScriptLimits::default()
    };
    let factory = BuiltinFactory::new(BuiltinFactory::default_http_client(), gate);
    Pipelines::load(
        LoadOptions {
            pipelines_dir: config.pipelines_dir.clone(),
            schemas_dir: config.schemas_dir.clone(),
        },
        Arc::new(ScriptHost::new(limits)),
        Arc::new(factory),
    )
}

/// Reloads when files under `PIPELINES_DIR` or `SCHEMAS_DIR` change, once
/// they have been quiet for `debounce` (editors write in several steps).
fn watch_pipelines(
    pipelines: &Pipelines,
    reloader: Arc<Reloader>,
    debounce: std::time::Duration,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use notify_debouncer_mini::notify::RecursiveMode;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut debouncer = notify_debouncer_mini::new_debouncer(debounce, move |res| {
        let _ = tx.send(res);
    })?;
    for dir in pipelines.dirs() {
        debouncer
            .watcher()
            .watch(dir, RecursiveMode::Recursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
    }
    Ok(tokio::spawn(async move {
        let _watching = debouncer;
        while let Some(res) = rx.recv().await {
            let res: notify_debouncer_mini::DebounceEventResult = res;
            match res {
                Ok(events) if !events.is_empty() => {
                    // The outcome is counted and logged by the reloader.
                    let _ = reloader.reload_async("watch").await;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "pipeline directory watch error"),
            }
        }
    }))
}

/// The embedded first-run convenience for the console: with no
/// `ADMIN_API_KEY`, an embedded server that creates the demo partner makes
/// an admin key on its first start (when its SQLite store does not exist
/// yet) and keeps it in `DATA_DIR/admin-api-key.txt` (mode 0600, never
/// overwritten); later starts use that file while it is there. Returns the
/// file and whether this call made it. A server with an existing store and
/// no such file, or with `ADMIN_API_KEY` set, gets nothing from here.
pub fn local_admin_key(config: &mut Config) -> anyhow::Result<Option<(std::path::PathBuf, bool)>> {
    if config.admin_api_key.is_some() || !config.is_embedded() || !config.create_demo_partner {
        return Ok(None);
    }
    let path = config.data_dir.join("admin-api-key.txt");
    let (key, made) = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = text.trim().to_owned();
            anyhow::ensure!(
                key.len() >= 16,
                "{} holds no usable admin key (16 characters at least); fix or remove it",
                path.display()
            );
            (key, false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let store = sqlite_file(config.database_url.expose_secret());
            if store.is_none_or(|f| f.exists()) {
                return Ok(None);
            }
            let key = crate::credentials::generate_api_key();
            write_private(&config.data_dir, &path, &key)
                .with_context(|| format!("cannot write {}", path.display()))?;
            (key, true)
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    config.admin_api_key = Some(secrecy::SecretString::from(key));
    Ok(Some((path, made)))
}

/// The file of a `sqlite:` URL (none for an in-memory database).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.starts_with(':')).then(|| std::path::PathBuf::from(path))
}

/// Creates `path` holding `text`, readable by its owner only from the
/// start; fails if it exists.
fn write_private(dir: &std::path::Path, path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(format!("{text}\n").as_bytes())
}

/// Creates the `demo` partner on a store with no partners; returns its key.
pub async fn ensure_demo_partner(store: &dyn Store) -> anyhow::Result<Option<String>> {
    if store.count_partners().await? > 0 {
        return Ok(None);
    }
    let created = crate::partners::create(
        store,
        crate::partners::CreatePartner {
            id: "demo".into(),
            name: Some("Demo partner".into()),
            ..Default::default()
        },
    )
    .await;
    let key = match created {
        Ok((_, issued)) => issued.key,
        // Another process created it first.
        Err(crate::partners::PartnerError::Exists(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(Some(key))
}

impl App {
    /// Starts everything the role needs, except the HTTP listener.
    pub async fn start(config: Config, role: Role) -> anyhow::Result<App> {
        let config = Arc::new(config);
        let sql = connect_store(&config).await?;
        if config.migrate_on_start {
            sql.migrate().await.context("migrations failed")?;
        }
        let store: Arc<dyn Store> = sql.clone();
        // The first events' partitions (PostgreSQL); the purge keeps them ahead.
        if let Err(e) = store
            .prepare(
                chrono::Utc::now(),
                config.partition_period,
                config.purge_interval * 4,
            )
            .await
        {
            warn!(error = %e, "cannot create the event partitions ahead; events go to the default partition");
        }
        let gate = crate::destinations::connect_gate(&config).await?;
        let pipelines = Arc::new(
            load_pipelines(&config, gate.clone())
                .map_err(|errors| anyhow::anyhow!("the pipeline set is invalid:\n{errors}"))?,
        );
        info!(
            pipelines = pipelines.current().len(),
            version = %pipelines.current().version,
            "pipelines loaded"
        );
        pipelines
            .save_versions(store.as_ref())
            .await
            .context("cannot save the pipeline versions")?;
        let queue = connect_queue(&config).await?;
        let metrics = Arc::new(Metrics::new());
        metrics
            .registry
            .register(Box::new(sql.batch_size_metric()))
            .context("store_write_batch_size")?;
        metrics
            .registry
            .register(Box::new(sql.credential_lookup_metric()))
            .context("credential_lookups_total")?;
        metrics.reloads.with_label_values(&["startup", "ok"]).inc();
        metrics.init_types(&pipelines.current());
        let demo_key = if config.create_demo_partner {
            ensure_demo_partner(store.as_ref()).await?
        } else {
            None
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let dispatch = Dispatcher::new(store.clone(), queue.clone(), metrics.clone());
        let mut background = Vec::new();
        let mut workers = None;
        let mut watcher = None;
        if role.runs_workers() {
            if config.is_embedded() {
                // Only one process can own an embedded database: whatever it
                // had in flight when it stopped is free to run again now.
                let n = store.release_leases().await?;
                if n > 0 {
                    warn!(count = n, "events interrupted by the last stop will run again");
                }
            }
            let processor = Arc::new(Processor {
                store: store.clone(),
                dispatch: dispatch.clone(),
                pipelines: pipelines.clone(),
                metrics: metrics.clone(),
                lease: config.processing_lease,
                shutdown: shutdown_rx.clone(),
            });
            let w = Arc::new(Workers::new(queue.clone(), processor, shutdown_rx.clone()));
            w.ensure(&pipelines);
            workers = Some(w);
            background.push(tokio::spawn(crate::worker::sweeper(
                crate::worker::Sweeper {
                    store: store.clone(),
                    queue: queue.clone(),
                    dispatch: dispatch.clone(),
                    pipelines: pipelines.clone(),
                    metrics: metrics.clone(),
                    interval: config.sweep_interval,
                    requeue_after: config.requeue_after,
                },
                shutdown_rx.clone(),
            )));
            background.push(tokio::spawn(crate::destinations::waker(
                crate::destinations::Waker {
                    store: store.clone(),
                    dispatch: dispatch.clone(),
                    pipelines: pipelines.clone(),
                    gate: gate.clone(),
                    metrics: metrics.clone(),
                    interval: config.sweep_interval.min(Duration::from_millis(500)),
                },
                shutdown_rx.clone(),
            )));
            // Every worker process runs the loop; the store's lease lets one
            // at a time purge.
            background.push(tokio::spawn(crate::retention::purge_loop(
                crate::retention::Purger::new(store.clone(), metrics.clone(), &config),
                shutdown_rx.clone(),
            )));
        }
        let reloader = Arc::new(Reloader::new(
            pipelines.clone(),
            store.clone(),
            metrics.clone(),
            workers.clone().map(|w| w as Arc<dyn OnInstall>),
        ));
        if config.watch_pipelines {
            match watch_pipelines(&pipelines, reloader.clone(), config.watch_debounce) {
                Ok(h) => watcher = Some(h),
                Err(e) => {
                    warn!(error = %e, "not watching the pipeline directories; reload with SIGHUP or the admin API")
                }
            }
        }
        let state = AppState {
            login_limits: Arc::new(api::limits::LoginLimits::new(&config)),
            console_limits: Arc::new(api::limits::LoginLimits::new(&config)),
            config,
            store,
            queue,
            dispatch,
            pipelines,
            reloader,
            metrics,
            gate,
            partner_limits: Arc::default(),
        };
        Ok(App {
            state,
            watcher,
            workers,
            role,
            shutdown,
            background,
            demo_key,
        })
    }

    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// Reloads pipelines and starts workers for new event types.
    pub fn reload(&self) -> Result<(), engine::LoadErrors> {
        self.state.reloader.reload("admin").map(|_| ())
    }

    /// Stops workers (letting in-flight events finish) and background tasks.
    pub async fn shutdown(self) {
        if let Some(w) = &self.watcher {
            w.abort();
        }
        let _ = self.shutdown.send(true);
        if let Some(w) = &self.workers {
            w.join().await;
        }
        for h in self.background {
            let _ = h.await;
        }
    }
}
