use clap::Parser;
use orchestrator::cli::{Cli, run};
use orchestrator::config::Config;

/// mimalloc instead of glibc's malloc: allocation was about a fifth of the
/// server's CPU under load (perf), spread over many threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let telemetry = match orchestrator::telemetry::init(config.log_format) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let code = match run(cli, config).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    telemetry.shutdown().await;
    std::process::exit(code);
}
