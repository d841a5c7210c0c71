//! `shoal-llm-sim`: the LLM simulator as a server, for demos and benchmarks.
//! Speaks OpenAI chat completions and Anthropic Messages on one port and
//! answers from a JSON script:
//!
//! ```json
//! {
//!   "latency_ms": 50,
//!   "turns": [
//!     {"kind": "rate_limit", "retry_after": "1"},
//!     {"kind": "reply", "tool_calls": [{"name": "execute_bash", "arguments": {"command": "ls"}}]}
//!   ],
//!   "rules": [
//!     {"when": {"last_tool_result_contains": "README"},
//!      "then": {"kind": "reply", "text": "<function=finish>\n</function>"}}
//!   ],
//!   "fallback": {"kind": "reply", "text": "done"},
//!   "echo": false
//! }
//! ```
//!
//! Without `--script` it echoes. Ctrl-C stops it and prints what it saw.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use shoal_tests::llm_sim::{LlmSim, Script};

#[derive(Parser)]
#[command(about = "An LLM simulator speaking the OpenAI and Anthropic wire formats")]
struct Args {
    /// The script (JSON); echo mode without one.
    #[arg(long)]
    script: Option<PathBuf>,
    /// Port on the loopback interface (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Fixed latency of every answer, in milliseconds (overrides the script's).
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Require this API key (Bearer / x-api-key); 401 otherwise.
    #[arg(long)]
    api_key: Option<String>,
    /// Answer requests that break the API's rules instead of refusing them.
    #[arg(long)]
    lenient: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut script = match &args.script {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            serde_json::from_str::<Script>(&text)
                .with_context(|| format!("parse the script {}", path.display()))?
        }
        None => Script::echo(),
    };
    if let Some(ms) = args.latency_ms {
        script.latency_ms = Some(ms);
    }
    let mut builder = LlmSim::builder().bind(SocketAddr::from(([127, 0, 0, 1], args.port)));
    if let Some(key) = &args.api_key {
        builder = builder.api_key(key.clone());
    }
    if args.lenient {
        builder = builder.lenient();
    }
    let (base_url, sim) = builder.start(script).await.context("start the simulator")?;
    println!("shoal-llm-sim listening");
    println!("  OpenAI-compatible base_url: {base_url}   (POST {base_url}/chat/completions)");
    println!(
        "  Anthropic base_url:         {}   (POST {base_url}/messages)",
        sim.root_url()
    );
    tokio::signal::ctrl_c().await.context("wait for Ctrl-C")?;
    let requests = sim.requests();
    let violations = sim.violations();
    println!(
        "\n{} request(s), {} violation(s)",
        requests.len(),
        violations.len()
    );
    for v in &violations {
        println!("  {v}");
    }
    // Let the last answers drain.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}
