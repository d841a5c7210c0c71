//! `shoal-worker`: reads configuration, sets up telemetry, runs until SIGTERM.
//! With `--check-config` it only loads and validates the configuration, prints
//! a one-line summary and exits: nothing is connected to or started.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use shoal_shared::template::ProviderKind;
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
    /// Load and validate the configuration (file and SHOAL__* overrides, as at
    /// startup), print a summary and exit: 0 if valid, 1 with the error (naming
    /// the key) on stderr if not. Connects to nothing.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if args.check_config {
        return Ok(check_config(&args));
    }
    let settings = Settings::load(args.config.as_deref())?;
    let _telemetry = telemetry::init(&settings.telemetry, "shoal-worker");
    let shutdown = CancellationToken::new();
    tokio::spawn(shoal_shared::signal::cancel_on_signal(shutdown.clone()));
    shoal_worker::run(settings, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// `--check-config`: the same loader as startup, then a summary or the error.
fn check_config(args: &Args) -> ExitCode {
    match Settings::load(args.config.as_deref()) {
        Ok(settings) => {
            let daytona = settings
                .sandbox
                .templates
                .values()
                .filter(|t| t.provider == ProviderKind::Daytona)
                .count();
            let metrics = settings
                .worker
                .metrics_listen
                .map_or_else(|| "off".to_string(), |addr| addr.to_string());
            println!(
                "config ok: namespace={}, {} templates ({} daytona), {} models, worker {} with {} slots, drain_timeout={}s, metrics={}",
                settings.namespace,
                settings.sandbox.templates.len(),
                daytona,
                settings.models.len(),
                settings.worker.id,
                settings.worker.slots,
                settings.worker.drain_timeout.as_secs(),
                metrics,
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("config error: {error}");
            ExitCode::FAILURE
        }
    }
}
