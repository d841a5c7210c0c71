//! `shoal-chaos`: the fleet chaos run of `make chaos` (ADR 0034). Runs the
//! plan against the services in `SHOAL__BROKER__URL` / `SHOAL__REDIS__URL`,
//! writes its figures and failures under the hand-written introduction of
//! `docs/RELIABILITY.md`, and exits 1 when any check failed.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use shoal_tests::chaos::{run, Plan};

/// The line that separates the hand-written introduction of the report
/// from the part this program writes.
const MARKER: &str =
    "<!-- Everything below is written by `make chaos` (tests/src/bin/shoal-chaos.rs). -->";

#[derive(Parser)]
#[command(
    about = "Fleet chaos: kill -9 workers, restart RabbitMQ and Redis, check nothing is lost, doubled or leaked"
)]
struct Args {
    /// Start from the small plan of `make test` instead of the full one.
    #[arg(long)]
    small: bool,
    #[arg(long)]
    workers: Option<usize>,
    #[arg(long)]
    slots: Option<usize>,
    /// Exec tasks.
    #[arg(long)]
    exec: Option<usize>,
    /// Agent tasks.
    #[arg(long)]
    agents: Option<usize>,
    /// Seconds between two worker kills.
    #[arg(long)]
    kill_every_s: Option<u64>,
    #[arg(long)]
    rabbitmq_restarts: Option<usize>,
    /// Redis restarts (the services must run Redis with AOF on).
    #[arg(long)]
    redis_restarts: Option<usize>,
    /// Submissions per second.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Where the report goes; nothing is written without it.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut plan = if args.small {
        Plan::small()
    } else {
        Plan::full()
    };
    plan.verbose = true;
    plan.workers = args.workers.unwrap_or(plan.workers);
    plan.slots = args.slots.unwrap_or(plan.slots);
    plan.exec_tasks = args.exec.unwrap_or(plan.exec_tasks);
    plan.agent_tasks = args.agents.unwrap_or(plan.agent_tasks);
    plan.kill_every = args
        .kill_every_s
        .map_or(plan.kill_every, Duration::from_secs);
    plan.rabbitmq_restarts = args.rabbitmq_restarts.unwrap_or(plan.rabbitmq_restarts);
    plan.redis_restarts = args.redis_restarts.unwrap_or(plan.redis_restarts);
    plan.submit_rate = args.rate.unwrap_or(plan.submit_rate);
    plan.seed = args.seed.unwrap_or(plan.seed);
    plan.services_script = std::env::var_os("SHOAL_SERVICES_SCRIPT").map(PathBuf::from);
    let outcome = run(&plan).await?;
    let markdown = outcome.markdown();
    println!("{markdown}");
    if let Some(path) = &args.report {
        // Without the marker the whole file is the introduction.
        let intro = match std::fs::read_to_string(path) {
            Ok(text) => match text.split_once(MARKER) {
                Some((intro, _)) => intro.to_owned(),
                None => format!("{}\n\n", text.trim_end()),
            },
            Err(_) => "# Reliability\n\n".to_owned(),
        };
        std::fs::write(path, format!("{intro}{MARKER}\n\n{markdown}"))?;
        eprintln!("wrote {}", path.display());
    }
    if !outcome.passed() {
        for line in outcome.failures().iter().take(50) {
            eprintln!("FAILED: {line}");
        }
        eprintln!("the fleet's logs are in {}", outcome.logs);
        std::process::exit(1);
    }
    Ok(())
}
