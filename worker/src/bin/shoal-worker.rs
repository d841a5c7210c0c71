//! `shoal-worker`: reads configuration, sets up telemetry, runs until SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use shoal_shared::{telemetry, Settings};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Shoal worker: runs tasks from the queue in sandboxes"
)]
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
    let shutdown = CancellationToken::new();
    tokio::spawn(shoal_shared::signal::cancel_on_signal(shutdown.clone()));
    shoal_worker::run(settings, shutdown).await
}
