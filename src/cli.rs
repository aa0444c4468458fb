//! The `orchestrator` command line.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::app::{App, Role};
use crate::config::Config;
use crate::store::Store;

#[derive(Debug, Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "B2B event orchestrator: REST in, YAML pipelines, webhooks out"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default command).
    Serve {
        /// Which parts to run in this process.
        #[arg(long, value_enum, default_value = "all")]
        role: Role,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Manage partners.
    Partner {
        #[command(subcommand)]
        command: PartnerCommand,
    },
    /// Manage the console's operator accounts.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Remove the events past their retention now (RETENTION_PROCESSED,
    /// RETENTION_DEAD_LETTERED), or only say what would go.
    Purge {
        /// Count what would go; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check a pipeline directory; prints every error with file and line.
    Lint {
        /// Pipelines directory (default: PIPELINES_DIR).
        dir: Option<PathBuf>,
        /// Schemas directory (default: DIR/../schemas if it exists, else SCHEMAS_DIR).
        #[arg(long)]
        schemas: Option<PathBuf>,
    },
    /// Run the pipeline fixtures in DIR/tests/*.yaml as dry runs; non-zero exit on any failure.
    Test {
        /// Pipelines directory (default: PIPELINES_DIR).
        dir: Option<PathBuf>,
        /// Schemas directory (default: DIR/../schemas if it exists, else SCHEMAS_DIR).
        #[arg(long)]
        schemas: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PartnerCommand {
    /// Create a partner and print its API key (shown once).
    Create {
        id: String,
        /// Display name (default: the id).
        #[arg(long)]
        name: Option<String>,
        /// Use this API key instead of a generated one.
        #[arg(long)]
        key: Option<String>,
        /// Password for POST /auth/login (at least 8 characters).
        #[arg(long)]
        password: Option<String>,
        /// Requests per minute (default: RATE_LIMIT_PARTNER_PER_MINUTE).
        #[arg(long)]
        rate_per_minute: Option<u32>,
        /// Burst size (default: RATE_LIMIT_PARTNER_BURST).
        #[arg(long)]
        burst: Option<u32>,
        /// Share of each type's workers when several partners have work
        /// waiting, 1 (default) to 1000.
        #[arg(long)]
        weight: Option<u32>,
    },
    /// List partners and their keys (ids and prefixes; never the keys).
    List {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change a partner's name, password or limits.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, conflicts_with = "no_password")]
        password: Option<String>,
        /// Remove the password: POST /auth/login stops working for this partner.
        #[arg(long)]
        no_password: bool,
        #[arg(long, conflicts_with = "default_limits")]
        rate_per_minute: Option<u32>,
        #[arg(long, conflicts_with = "default_limits")]
        burst: Option<u32>,
        /// Go back to the server's default limits.
        #[arg(long)]
        default_limits: bool,
        /// Fair-sharing weight, 1 to 1000.
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Refuse every request of this partner (keys and tokens) until enabled.
    Disable { id: String },
    /// Undo `disable`.
    Enable { id: String },
    /// Issue a new API key (shown once); old keys keep working unless --revoke-others.
    RotateKey {
        id: String,
        /// Use this key instead of a generated one.
        #[arg(long)]
        key: Option<String>,
        /// Revoke every other active key of the partner.
        #[arg(long)]
        revoke_others: bool,
    },
    /// Revoke one API key by the id `partner list` shows.
    RevokeKey { id: String, key_id: String },
}

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Create an operator who signs in to /console/ with this name and password.
    Create {
        name: String,
        /// At least 12 characters.
        #[arg(long, env = "OPERATOR_PASSWORD", hide_env_values = true)]
        password: String,
    },
    /// Set an operator's password; its console sessions end.
    SetPassword {
        name: String,
        #[arg(long, env = "OPERATOR_PASSWORD", hide_env_values = true)]
        password: String,
    },
    /// List the operators.
    List,
    /// Remove an operator; its console sessions end.
    Delete { name: String },
}

pub async fn run(cli: Cli, config: Config) -> anyhow::Result<i32> {
    match cli.command.unwrap_or(Command::Serve { role: Role::All }) {
        Command::Serve { role } => serve(config, role).await.map(|_| 0),
        Command::Migrate => {
            let store = crate::app::connect_store(&config).await?;
            store.migrate().await?;
            println!("migrations applied");
            Ok(0)
        }
        Command::Partner { command } => {
            let store = crate::app::connect_store(&config).await?;
            store.migrate().await?;
            partner(store.as_ref(), command).await
        }
        Command::Operator { command } => {
            let store = crate::app::connect_store(&config).await?;
            store.migrate().await?;
            operator(store.as_ref(), command).await
        }
        Command::Purge { dry_run } => purge(config, dry_run).await,
        Command::Lint { dir, schemas } => lint(&config, dir, schemas),
        Command::Test { dir, schemas } => test(&config, dir, schemas).await,
    }
}

/// `orchestrator purge [--dry-run]`: one pass now, waiting (up to a minute)
/// for a pass another process is running.
async fn purge(config: Config, dry_run: bool) -> anyhow::Result<i32> {
    use crate::retention::{PurgeError, Purger};
    let store = crate::app::connect_store(&config).await?;
    store.migrate().await?;
    let purger = Purger::new(
        store,
        std::sync::Arc::new(crate::telemetry::Metrics::new()),
        &config,
    );
    let describe = |what: &str, p: crate::store::Purged| {
        println!(
            "{what} {} processed events (older than {}) and {} dead letters (older than {})",
            p.processed,
            humantime::format_duration(config.retention.processed),
            p.dead_lettered,
            humantime::format_duration(config.retention.dead_lettered),
        );
    };
    if dry_run {
        describe("would remove", purger.dry_run().await?);
        return Ok(0);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match purger.run_once().await {
            Ok(report) => {
                describe("removed", report.removed);
                return Ok(match report.error {
                    Some(e) => {
                        eprintln!("the purge stopped early: {e}");
                        1
                    }
                    None => 0,
                });
            }
            Err(PurgeError::Busy { holder, until }) if std::time::Instant::now() < deadline => {
                eprintln!("waiting for the purge {holder} is running (lease until {until})");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn operator(store: &dyn Store, command: OperatorCommand) -> anyhow::Result<i32> {
    use crate::operators;
    match command {
        OperatorCommand::Create { name, password } => {
            operators::create(store, &name, &password).await?;
            println!("operator {name} created; sign in at /console/");
        }
        OperatorCommand::SetPassword { name, password } => {
            operators::set_password(store, &name, &password).await?;
            println!("password of operator {name} changed; its sessions ended");
        }
        OperatorCommand::List => {
            for (name, created) in store.operators().await? {
                println!("{name}\tcreated {}", created.format("%Y-%m-%d %H:%M:%S UTC"));
            }
        }
        OperatorCommand::Delete { name } => {
            operators::delete(store, &name).await?;
            println!("operator {name} removed; its sessions ended");
        }
    }
    Ok(0)
}

async fn partner(store: &dyn Store, command: PartnerCommand) -> anyhow::Result<i32> {
    use crate::partners::{self, ChangePartner, CreatePartner};
    let changed = |info: crate::store::PartnerInfo, what: &str| {
        println!("partner {} {what}", info.id);
        Ok(0)
    };
    match command {
        PartnerCommand::Create {
            id,
            name,
            key,
            password,
            rate_per_minute,
            burst,
            weight,
        } => {
            let (info, issued) = partners::create(
                store,
                CreatePartner {
                    id,
                    name,
                    key,
                    password,
                    rate_per_minute,
                    burst,
                    weight,
                },
            )
            .await?;
            println!("partner {} created", info.id);
            println!("key id: {}", issued.key_id);
            println!("API key (shown once, store it now): {}", issued.key);
            Ok(0)
        }
        PartnerCommand::List { json } => {
            let all = partners::list(store).await?;
            if json {
                let shown: Vec<_> = all.into_iter().map(crate::api::views::PartnerOut::from).collect();
                println!("{}", serde_json::to_string_pretty(&shown)?);
                return Ok(0);
            }
            println!(
                "{:<24} {:<9} {:>9} {:>6} {:>6}  KEYS (id prefix)",
                "PARTNER", "STATE", "RATE/MIN", "BURST", "WEIGHT"
            );
            for p in all {
                let limit = |v: Option<u32>| v.map_or_else(|| "default".to_owned(), |v| v.to_string());
                let keys: Vec<String> = p
                    .keys
                    .iter()
                    .filter(|k| k.revoked_at.is_none())
                    .map(|k| format!("{} {}…", k.id, k.prefix))
                    .collect();
                println!(
                    "{:<24} {:<9} {:>9} {:>6} {:>6}  {}",
                    p.id,
                    if p.disabled { "disabled" } else { "active" },
                    limit(p.rate_per_minute),
                    limit(p.burst),
                    p.weight,
                    if keys.is_empty() {
                        "(no active key)".to_owned()
                    } else {
                        keys.join(", ")
                    }
                );
            }
            Ok(0)
        }
        PartnerCommand::Update {
            id,
            name,
            password,
            no_password,
            rate_per_minute,
            burst,
            default_limits,
            weight,
        } => {
            let change = ChangePartner {
                name,
                password: if no_password {
                    Some(None)
                } else {
                    password.map(Some)
                },
                rate_per_minute: if default_limits {
                    Some(None)
                } else {
                    rate_per_minute.map(Some)
                },
                burst: if default_limits {
                    Some(None)
                } else {
                    burst.map(Some)
                },
                weight,
                disabled: None,
            };
            changed(partners::change(store, &id, change).await?, "updated")
        }
        PartnerCommand::Disable { id } => {
            changed(partners::set_disabled(store, &id, true).await?, "disabled")
        }
        PartnerCommand::Enable { id } => changed(partners::set_disabled(store, &id, false).await?, "enabled"),
        PartnerCommand::RotateKey {
            id,
            key,
            revoke_others,
        } => {
            let (issued, revoked) = partners::rotate_key(store, &id, key, revoke_others).await?;
            println!("new key for partner {id}; key id: {}", issued.key_id);
            println!("API key (shown once, store it now): {}", issued.key);
            if revoke_others {
                println!("{revoked} other key(s) revoked");
            } else {
                println!(
                    "older keys stay active until revoked: orchestrator partner revoke-key {id} <key id>"
                );
            }
            Ok(0)
        }
        PartnerCommand::RevokeKey { id, key_id } => {
            partners::revoke_key(store, &id, &key_id).await?;
            println!("key {key_id} of partner {id} revoked");
            Ok(0)
        }
    }
}

/// The config with `dir` (and its schemas) in place of the configured directories.
fn with_dirs(config: &Config, dir: Option<PathBuf>, schemas: Option<PathBuf>) -> Config {
    let pipelines_dir = dir.clone().unwrap_or_else(|| config.pipelines_dir.clone());
    let schemas_dir = schemas.unwrap_or_else(|| {
        dir.as_ref()
            .and_then(|d| d.parent().map(|p| p.join("schemas")))
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| config.schemas_dir.clone())
    });
    let mut cfg = config.clone();
    cfg.pipelines_dir = pipelines_dir;
    cfg.schemas_dir = schemas_dir;
    cfg
}

/// Loads the set as the server would, printing every error on failure.
fn load_or_report(cfg: &Config) -> Option<crate::pipelines::Pipelines> {
    // Lint and pipeline tests make no calls: a gate of their own.
    match crate::app::load_pipelines(cfg, Arc::new(engine::gate::LocalGate::default())) {
        Ok(p) => Some(p),
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("{}: {} errors", cfg.pipelines_dir.display(), errors.0.len());
            None
        }
    }
}

fn lint(config: &Config, dir: Option<PathBuf>, schemas: Option<PathBuf>) -> anyhow::Result<i32> {
    let cfg = with_dirs(config, dir, schemas);
    let Some(p) = load_or_report(&cfg) else {
        return Ok(1);
    };
    let set = p.current();
    for pl in set.pipelines() {
        println!(
            "ok  {} ({}, version {})",
            pl.event_type,
            pl.source_file.display(),
            pl.version
        );
    }
    println!(
        "{}: {} pipelines, no errors",
        cfg.pipelines_dir.display(),
        set.len()
    );
    Ok(0)
}

async fn test(config: &Config, dir: Option<PathBuf>, schemas: Option<PathBuf>) -> anyhow::Result<i32> {
    let cfg = with_dirs(config, dir, schemas);
    let Some(p) = load_or_report(&cfg) else {
        return Ok(1);
    };
    let files = engine::fixtures::fixture_files(&cfg.pipelines_dir)
        .with_context(|| format!("cannot read {}/tests", cfg.pipelines_dir.display()))?;
    if files.is_empty() {
        eprintln!(
            "no fixture files in {}/tests (*.yaml); see README \"Testing pipelines\"",
            cfg.pipelines_dir.display()
        );
        return Ok(1);
    }
    let (results, errors) = engine::fixtures::run(&p.current(), &files).await;
    for r in &results {
        if r.passed() {
            println!("ok    {}: {}", r.event_type, r.name);
        } else {
            println!("FAIL  {}: {} ({})", r.event_type, r.name, r.file.display());
            for f in &r.failures {
                println!("        {f}");
            }
        }
    }
    for e in &errors {
        println!("ERROR {e}");
    }
    let failed = results.iter().filter(|r| !r.passed()).count();
    println!(
        "{} cases: {} passed, {failed} failed; {} files, {} could not run",
        results.len(),
        results.len() - failed,
        files.len(),
        errors.len()
    );
    Ok(i32::from(failed > 0 || !errors.is_empty() || results.is_empty()))
}

async fn serve(mut config: Config, role: Role) -> anyhow::Result<()> {
    let addr = config.listen_addr;
    let admin_key_file = crate::app::local_admin_key(&mut config)?;
    let app = App::start(config, role).await?;
    if let Some(key) = &app.demo_key {
        print_demo_banner(&app, key, addr);
    }
    if let Some((path, made)) = admin_key_file {
        let what = if made { "made" } else { "kept" };
        eprintln!(
            "  Console: http://localhost:{}/console/ — sign in with the admin key {what} in {} (set ADMIN_API_KEY to choose your own).",
            addr.port(),
            path.display()
        );
        eprintln!();
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let router = if role.serves_api() {
        app.router()
    } else {
        crate::api::ops_router(app.state.clone())
    };
    tracing::info!(%addr, ?role, "listening");
    let reloader = app.state.reloader.clone();
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            // The outcome is counted and logged by the reloader.
            let _ = reloader.reload_async("sighup").await;
        }
    });
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await?;
    tracing::info!("shutting down: finishing in-flight events");
    app.shutdown().await;
    Ok(())
}

fn print_demo_banner(app: &App, key: &str, addr: std::net::SocketAddr) {
    let path = app.state.config.data_dir.join("demo-api-key.txt");
    let saved = std::fs::create_dir_all(&app.state.config.data_dir)
        .and_then(|_| std::fs::write(&path, format!("{key}\n")))
        .is_ok();
    #[cfg(unix)]
    if saved {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    let port = addr.port();
    eprintln!();
    eprintln!("  First start: created partner \"demo\". Its API key is shown only this once:");
    eprintln!();
    eprintln!("    {key}");
    if saved {
        eprintln!("  (also saved to {} for the README examples)", path.display());
    }
    eprintln!();
    eprintln!("  Try it:");
    eprintln!(
        "    curl -s -X POST http://localhost:{port}/events -H 'Content-Type: application/json' \\\n      -H 'X-API-Key: {key}' \\\n      -d '{{\"tipo\":\"VENDA\",\"dados\":{{\"produto_id\":\"P-1\",\"quantidade\":2,\"valor\":59.9}}}}'"
    );
    eprintln!();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
