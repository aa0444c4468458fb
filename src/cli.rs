//! The `orchestrator` command line.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::app::{App, Role};
use crate::config::Config;
use crate::store::{NewPartner, Store};

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
    /// Check a pipeline directory; prints every error with file and line.
    Lint {
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
        /// Password for POST /auth/login.
        #[arg(long)]
        password: Option<String>,
        #[arg(long)]
        rate_per_minute: Option<u32>,
        #[arg(long)]
        burst: Option<u32>,
    },
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
        Command::Partner {
            command:
                PartnerCommand::Create {
                    id,
                    name,
                    key,
                    password,
                    rate_per_minute,
                    burst,
                },
        } => {
            let store = crate::app::connect_store(&config).await?;
            store.migrate().await?;
            if id.is_empty()
                || id.len() > 64
                || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                anyhow::bail!("partner id must be 1-64 characters of letters, digits, '-', '_' or '.'");
            }
            let password_hash = password
                .map(|p| crate::api::auth::hash_password(&p))
                .transpose()
                .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
            let created = store
                .create_partner(&NewPartner {
                    id: id.clone(),
                    name: name.unwrap_or_else(|| id.clone()),
                    password_hash,
                    rate_per_minute,
                    burst,
                })
                .await?;
            if !created {
                anyhow::bail!("partner {id:?} already exists");
            }
            let key = key.unwrap_or_else(crate::api::auth::generate_api_key);
            if key.len() < 16 {
                anyhow::bail!("an API key must have at least 16 characters");
            }
            store
                .add_api_key(
                    &id,
                    &crate::api::auth::hash_api_key(&key),
                    &key[..key.len().min(10)],
                )
                .await?;
            println!("partner {id} created");
            println!("API key (shown once, store it now): {key}");
            Ok(0)
        }
        Command::Lint { dir, schemas } => lint(&config, dir, schemas),
    }
}

fn lint(config: &Config, dir: Option<PathBuf>, schemas: Option<PathBuf>) -> anyhow::Result<i32> {
    let pipelines_dir = dir.clone().unwrap_or_else(|| config.pipelines_dir.clone());
    let schemas_dir = schemas.unwrap_or_else(|| {
        dir.as_ref()
            .and_then(|d| d.parent().map(|p| p.join("schemas")))
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| config.schemas_dir.clone())
    });
    let mut cfg = config.clone();
    cfg.pipelines_dir = pipelines_dir.clone();
    cfg.schemas_dir = schemas_dir;
    match crate::app::load_pipelines(&cfg, Arc::new(engine::NullSink)) {
        Ok(p) => {
            let set = p.current();
            for pl in set.pipelines() {
                println!(
                    "ok  {} ({}, version {})",
                    pl.event_type,
                    pl.source_file.display(),
                    pl.version
                );
            }
            println!("{}: {} pipelines, no errors", pipelines_dir.display(), set.len());
            Ok(0)
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("{}: {} errors", pipelines_dir.display(), errors.0.len());
            Ok(1)
        }
    }
}

async fn serve(config: Config, role: Role) -> anyhow::Result<()> {
    let addr = config.listen_addr;
    let app = App::start(config, role).await?;
    if let Some(key) = &app.demo_key {
        print_demo_banner(&app, key, addr);
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
    let pipelines = app.state.pipelines.clone();
    let workers = app.workers.clone();
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match pipelines.reload() {
                Ok(set) => {
                    tracing::info!(version = %set.version, "pipelines reloaded on SIGHUP");
                    if let Some(w) = &workers {
                        w.ensure(&pipelines);
                    }
                }
                Err(e) => {
                    tracing::warn!(errors = %e, "SIGHUP reload rejected; the previous set keeps serving")
                }
            }
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
