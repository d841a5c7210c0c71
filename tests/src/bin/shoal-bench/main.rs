//! `shoal-bench`: benchmarks run side by side in one process against the real
//! local services and sandboxes, writing `docs/BENCHMARKS.md`. A report, not a
//! test: it prints numbers and ratios, it asserts nothing about speed.

mod agent;
mod idle;
mod pool;
mod stats;
mod submit;

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Shoal benchmarks; writes a markdown report")]
pub struct Args {
    /// Tasks per measured run.
    #[arg(long, default_value_t = 20_000)]
    pub tasks: usize,
    /// Tasks per batch (per HTTP request, and per raw confirm round).
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Measured rounds of each side (alternating); medians are reported.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Where the report goes.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub out: PathBuf,
    /// Run only these sections (`submit`, `pool`, `agent`, `idle`); all when empty.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// `idle`: a directory with the `shoal-worker` and `shoal-scheduler` of
    /// the design to compare with ("before"); only this build when absent.
    #[arg(long)]
    pub idle_before: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The subscriber the binaries install (default filter `info`, text lines
    // on stderr; traces only with an OTLP endpoint): spans are measured as
    // they cost in the real processes, not as no-ops.
    let defaults = shoal_shared::settings::Settings::from_toml("")?;
    let _telemetry = shoal_shared::telemetry::init(&defaults.telemetry, "shoal-bench");
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let mut report = String::new();
    writeln!(report, "# Benchmarks\n")?;
    writeln!(report, "Written by `make bench` (`tests/src/bin/shoal-bench/`). Medians come from rounds measured side by side in one run; the machines are shared and noisy, so read the **ratios**, which compare runs made in the same process against the same services.\n")?;
    writeln!(
        report,
        "- date: {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    )?;
    writeln!(report, "- machine: {}", machine())?;
    writeln!(report, "- services: {}\n", services())?;
    if wanted("submit") {
        submit::section(&args, &mut report).await?;
    }
    if wanted("pool") {
        pool::section(&args, &mut report).await?;
    }
    if wanted("agent") {
        agent::section(&args, &mut report).await?;
    }
    if wanted("idle") {
        idle::section(&args, &mut report).await?;
    }
    // Same-run A/B measurements of single changes (`benches/ab.sh`, two
    // builds side by side) are recorded by hand in docs/ab-measurements.md
    // and carried into the report.
    if let Ok(ab) = std::fs::read_to_string("docs/ab-measurements.md") {
        writeln!(report, "{ab}")?;
    }
    // Demo trials are run by hand with the real local model (minutes each);
    // their record is kept in docs/demo-trials.md and carried into the report.
    if let Ok(trials) = std::fs::read_to_string("docs/demo-trials.md") {
        writeln!(report, "{trials}")?;
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, report)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!(
        "{cores} cores ({cpu}), {mem_gib:.0} GiB RAM, {}",
        std::env::consts::OS
    )
}

fn services() -> String {
    let version = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    let rabbit = version("dpkg-query", &["-W", "-f", "${Version}", "rabbitmq-server"]);
    let redis = version("redis-server", &["--version"]);
    format!("RabbitMQ {rabbit} (Debian package), {redis}")
}
