//! `shoal-scheduler`: reads configuration, sets up telemetry, serves the API
//! until SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use shoal_shared::{telemetry, Settings};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Shoal scheduler: the task submission API")]
struct Args {
    /// TOML configuration file (else $SHOAL_CONFIG; SHOAL__SECTION__KEY overrides).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(args.config.as_deref())?;
    telemetry::init(&settings.telemetry);
    let listener = tokio::net::TcpListener::bind(settings.scheduler.listen)
        .await
        .with_context(|| format!("binding {}", settings.scheduler.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shoal_shared::signal::cancel_on_signal(shutdown.clone()));
    shoal_scheduler::run(settings, listener, shutdown).await
}
