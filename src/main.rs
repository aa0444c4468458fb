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
    orchestrator::telemetry::init_logging(config.log_format);
    match run(cli, config).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
