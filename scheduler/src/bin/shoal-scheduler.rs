//! `shoal-scheduler`: reads configuration, sets up telemetry, serves the API
//! until SIGTERM. With `--check-config` it only loads and validates the
//! configuration, prints a one-line summary and exits: nothing is bound or
//! connected to.

use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Load and validate the configuration (file and SHOAL__* overrides, as at
    /// startup), print a summary and exit: 0 if valid, 1 with the error (naming
    /// the key) on stderr if not. Binds and connects to nothing; the
    /// `scheduler.tokens_file` it names is not read.
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
    let _telemetry = telemetry::init(&settings.telemetry, "shoal-scheduler");
    let listener = tokio::net::TcpListener::bind(settings.scheduler.listen)
        .await
        .with_context(|| format!("binding {}", settings.scheduler.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shoal_shared::signal::cancel_on_signal(shutdown.clone()));
    shoal_scheduler::run(settings, listener, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// `--check-config`: the same loader as startup, then a summary or the error.
fn check_config(args: &Args) -> ExitCode {
    match Settings::load(args.config.as_deref()) {
        Ok(settings) => {
            let tokens_file = settings
                .scheduler
                .tokens_file
                .as_ref()
                .map_or_else(|| "none".to_string(), |p| p.display().to_string());
            println!(
                "config ok: namespace={}, {} templates, {} models, listen={}, {} inline tokens, tokens_file={}",
                settings.namespace,
                settings.sandbox.templates.len(),
                settings.models.len(),
                settings.scheduler.listen,
                settings.scheduler.tokens.len(),
                tokens_file,
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("config error: {error}");
            ExitCode::FAILURE
        }
    }
}
