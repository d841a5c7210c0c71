//! The agent loop's own overhead per step, and many concurrent conversations
//! against a slow simulated LLM (throughput against the ideal, memory per
//! conversation).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;
use shoal_shared::cost::Prices;
use shoal_shared::model::ModelProfile;
use shoal_shared::settings::Settings;
use shoal_shared::task::TaskId;
use shoal_tests::llm_sim::{LlmSim, Script, Turn};
use shoal_worker::agent::llm::{client_for, LlmClient, LlmError, LlmRequest, LlmResponse};
use shoal_worker::agent::secrets::Masker;
use shoal_worker::agent::sink::MemorySink;
use shoal_worker::agent::tools::Toolbox;
use shoal_worker::agent::{AgentConfig, Billing, Conversation};
use shoal_worker::sandbox::{
    ExecOutput, ExecRequest, FileEntry, LocalProvider, Sandbox, SandboxError, SandboxProvider,
    ShellOutput, ShellSession,
};
use tokio_util::sync::CancellationToken;

use crate::stats::quantile;
use crate::Args;

/// Steps of the overhead conversation.
const STEPS: usize = 300;
/// Concurrent conversations in the scale run.
const CONVERSATIONS: usize = 1000;
/// Simulated LLM latency in the scale run.
const SLOW: Duration = Duration::from_secs(2);

/// Time spent inside LLM calls and tool calls, by step.
#[derive(Default)]
struct Clock {
    llm_started: Vec<Instant>,
    llm: Vec<Duration>,
    tool: Vec<Duration>,
}

struct TimedLlm {
    inner: Arc<dyn LlmClient>,
    clock: Arc<Mutex<Clock>>,
}

#[async_trait]
impl LlmClient for TimedLlm {
    fn model(&self) -> &str {
        self.inner.model()
    }

    async fn complete(
        &self,
        request: &LlmRequest,
        cancel: &CancellationToken,
    ) -> Result<LlmResponse, LlmError> {
        let started = Instant::now();
        let result = self.inner.complete(request, cancel).await;
        if let Ok(mut clock) = self.clock.lock() {
            clock.llm_started.push(started);
            clock.llm.push(started.elapsed());
        }
        result
    }
}

struct TimedSandbox<'a> {
    inner: &'a dyn Sandbox,
    clock: Arc<Mutex<Clock>>,
}

struct TimedShell {
    inner: Box<dyn ShellSession>,
    clock: Arc<Mutex<Clock>>,
}

#[async_trait]
impl ShellSession for TimedShell {
    async fn run(
        &self,
        command: &str,
        timeout: Duration,
        quiet: Duration,
        cancel: &CancellationToken,
    ) -> Result<ShellOutput, SandboxError> {
        let started = Instant::now();
        let result = self.inner.run(command, timeout, quiet, cancel).await;
        if let Ok(mut clock) = self.clock.lock() {
            clock.tool.push(started.elapsed());
        }
        result
    }

    async fn send_input(&self, input: &str, quiet: Duration) -> Result<ShellOutput, SandboxError> {
        self.inner.send_input(input, quiet).await
    }
}

#[async_trait]
impl Sandbox for TimedSandbox<'_> {
    fn id(&self) -> &str {
        self.inner.id()
    }
    async fn exec(
        &self,
        request: &ExecRequest,
        cancel: &CancellationToken,
    ) -> Result<ExecOutput, SandboxError> {
        self.inner.exec(request, cancel).await
    }
    async fn shell(&self) -> Result<Box<dyn ShellSession>, SandboxError> {
        let started = Instant::now();
        let inner = self.inner.shell().await?;
        // Opening the shell is tool time of the first step.
        if let Ok(mut clock) = self.clock.lock() {
            clock.tool.push(started.elapsed());
        }
        Ok(Box::new(TimedShell {
            inner,
            clock: self.clock.clone(),
        }))
    }
    async fn write_file(&self, path: &str, content: &[u8]) -> Result<(), SandboxError> {
        self.inner.write_file(path, content).await
    }
    async fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError> {
        self.inner.read_file(path).await
    }
    async fn list_files(&self, path: &str) -> Result<Vec<FileEntry>, SandboxError> {
        self.inner.list_files(path).await
    }
    async fn git_clone(
        &self,
        url: &str,
        git_ref: Option<&str>,
        dest: &str,
    ) -> Result<(), SandboxError> {
        self.inner.git_clone(url, git_ref, dest).await
    }
    async fn health(&self) -> Result<(), SandboxError> {
        self.inner.health().await
    }
}

fn profile(url: &str) -> ModelProfile {
    let mut profile = ModelProfile::builtin().remove(1); // the OpenAI-format profile
    profile.name = shoal_shared::Name::from_static("sim");
    profile.base_url = url.to_owned();
    profile.model = "sim".into();
    profile.api_key_env = None;
    profile.max_retries = 0;
    profile.timeout = Duration::from_secs(120);
    profile
}

fn config(steps: u32) -> AgentConfig {
    AgentConfig {
        max_iterations: steps + 5,
        max_cost: None,
        timeout: Duration::from_secs(3600),
        no_output_timeout: Duration::from_secs(30),
        condense_chars: usize::MAX,
        nudge_plain_text: false,
        prices: Prices::default(),
        max_tokens: None,
        temperature: None,
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Issue 4: overhead per step and concurrency.
pub async fn section(_args: &Args, report: &mut String) -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("shoal-bench-agent-{}", std::process::id()));
    let settings = Settings::from_toml(&format!("sandbox.root = \"{}\"\n", root.display()))?;
    let provider = LocalProvider::new(settings.sandbox.clone(), "bench-agent").await?;
    let sandbox = provider
        .create(&settings.sandbox.templates["default"])
        .await?;

    // --- Overhead per step: a simulator answering at once, the tool is `true`.
    let counter = Arc::new(AtomicUsize::new(0));
    let script_counter = counter.clone();
    let (url, _sim) = LlmSim::start(Script::from_fn(move |_| {
        let n = script_counter.fetch_add(1, Ordering::Relaxed);
        Some(if n + 1 >= STEPS {
            Turn::tool_call("finish", json!({"message": "done"}))
        } else {
            // Distinct commands, so the stuck detector sees progress.
            Turn::tool_call("terminal", json!({"command": format!("true {n}")}))
        })
    }))
    .await;
    let clock = Arc::new(Mutex::new(Clock::default()));
    let llm = TimedLlm {
        inner: client_for(&profile(&url))?,
        clock: clock.clone(),
    };
    let timed = TimedSandbox {
        inner: &*sandbox,
        clock: clock.clone(),
    };
    let sink = MemorySink::default();
    let started = Instant::now();
    let result = Conversation {
        llm: &llm,
        sandbox: &timed,
        sink: &sink,
        toolbox: Toolbox::new(&[]).map_err(anyhow::Error::msg)?,
        masker: Masker::default(),
        env: Vec::new(),
        config: config(STEPS as u32),
        billing: Billing {
            task_id: TaskId::new(),
            tenant: "bench".into(),
        },
        cancel: CancellationToken::new(),
        tenant_budget: None,
    }
    .run("benchmark")
    .await;
    let total = started.elapsed();
    anyhow::ensure!(
        result.outcome == "finished",
        "overhead run ended {}",
        result.outcome
    );
    let clock = std::mem::take(
        &mut *clock
            .lock()
            .map_err(|_| anyhow::anyhow!("clock poisoned"))?,
    );
    // Per step: from one LLM call's start to the next, minus LLM and tool time.
    let mut overhead = Vec::new();
    let mut full = Vec::new();
    for i in 0..clock.llm_started.len().saturating_sub(1) {
        let step = clock.llm_started[i + 1] - clock.llm_started[i];
        let tool = clock.tool.get(i + 1).copied().unwrap_or_default()
            + if i == 0 {
                clock.tool[0]
            } else {
                Duration::ZERO
            };
        full.push(step.as_secs_f64());
        overhead.push(
            step.saturating_sub(clock.llm[i])
                .saturating_sub(tool)
                .as_secs_f64(),
        );
    }
    let llm_ms: Vec<f64> = clock.llm.iter().map(|d| d.as_secs_f64()).collect();
    let mut llm_ms = llm_ms;
    let (o50, o99) = (quantile(&mut overhead, 0.5), quantile(&mut overhead, 0.99));
    let (f50, f99) = (quantile(&mut full, 0.5), quantile(&mut full, 0.99));
    let l50 = quantile(&mut llm_ms, 0.5);

    // --- Scale: many conversations against a slow LLM in another process.
    let script_path = root.join("slow-sim.json");
    std::fs::create_dir_all(&root)?;
    std::fs::write(
        &script_path,
        json!({
            "latency_ms": SLOW.as_millis() as u64,
            "rules": [{"when": "no_tool_results", "then": {"kind": "reply", "tool_calls": [{"name": "think", "arguments": {"thought": "plan the work"}}]}}],
            "fallback": {"kind": "reply", "tool_calls": [{"name": "finish", "arguments": {"message": "done"}}]}
        })
        .to_string(),
    )?;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let sim_binary = std::env::current_exe()?.with_file_name("shoal-llm-sim");
    let mut sim_process = tokio::process::Command::new(&sim_binary)
        .arg("--script")
        .arg(&script_path)
        .arg("--port")
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "starting {}: {e} (build it with `cargo build --release -p shoal-tests --bins`)",
                sim_binary.display()
            )
        })?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slow_llm: Arc<dyn LlmClient> =
        client_for(&profile(&format!("http://127.0.0.1:{port}/v1")))?;
    let shared_sandbox: Arc<dyn Sandbox> = Arc::from(sandbox);
    let rss_before = rss_kib();
    let started = Instant::now();
    let mut handles = Vec::with_capacity(CONVERSATIONS);
    for i in 0..CONVERSATIONS {
        let llm = slow_llm.clone();
        let sandbox = shared_sandbox.clone();
        handles.push(tokio::spawn(async move {
            let sink = MemorySink::default();
            Conversation {
                llm: &*llm,
                sandbox: &*sandbox,
                sink: &sink,
                toolbox: Toolbox::new(&[]).expect("the default toolbox builds"),
                masker: Masker::default(),
                env: Vec::new(),
                config: config(5),
                billing: Billing {
                    task_id: TaskId::new(),
                    tenant: format!("t{i}"),
                },
                cancel: CancellationToken::new(),
                tenant_budget: None,
            }
            .run("think, then finish")
            .await
        }));
    }
    // Midway through the first (2 s) LLM call every conversation is idle, waiting.
    tokio::time::sleep(SLOW / 2).await;
    let rss_idle = rss_kib();
    let mut finished = 0;
    for handle in handles {
        if handle
            .await
            .map(|r| r.outcome == "finished")
            .unwrap_or(false)
        {
            finished += 1;
        }
    }
    let wall = started.elapsed();
    let _ = sim_process.kill().await;
    let calls = 2 * CONVERSATIONS;
    let ideal = CONVERSATIONS as f64 / SLOW.as_secs_f64();
    let achieved = calls as f64 / wall.as_secs_f64();
    let per_conversation_kib = rss_idle.saturating_sub(rss_before) as f64 / CONVERSATIONS as f64;
    let sandbox_id = shared_sandbox.id().to_owned();
    drop(shared_sandbox);
    provider.destroy(&sandbox_id).await?;
    let _ = std::fs::remove_dir_all(&root);

    let ms = |s: f64| s * 1000.0;
    writeln!(report, "## Agent loop (issue 4)\n")?;
    writeln!(report, "**Overhead per step** — one conversation of {STEPS} steps against the LLM simulator answering at once (OpenAI format over loopback HTTP), each step a `terminal` call of `true` in a real bubblewrap sandbox's persistent shell. Overhead = step wall time − time inside the LLM client call − time inside the tool's shell call: the loop's own work (request building, argument parsing, stuck detection, masking, events, history).\n")?;
    writeln!(report, "| measure | p50 | p99 |")?;
    writeln!(report, "|---|---:|---:|")?;
    writeln!(
        report,
        "| loop overhead per step | {:.3} ms | {:.3} ms |",
        ms(o50),
        ms(o99)
    )?;
    writeln!(
        report,
        "| whole step (LLM HTTP call + tool + overhead) | {:.2} ms | {:.2} ms |",
        ms(f50),
        ms(f99)
    )?;
    writeln!(
        report,
        "| LLM client call (HTTP + JSON, simulator at 0 ms) | {:.2} ms | |",
        ms(l50)
    )?;
    writeln!(
        report,
        "\nTarget under 1 ms p50: {}. Total for {STEPS} steps: {:.2} s.\n",
        if ms(o50) < 1.0 { "yes" } else { "no" },
        total.as_secs_f64()
    )?;
    writeln!(report, "**{CONVERSATIONS} concurrent conversations** against the simulator in a separate process answering every call after {} s; each conversation makes 2 LLM calls (`think`, then `finish`). Ideal throughput is {CONVERSATIONS} calls per {} s.\n", SLOW.as_secs(), SLOW.as_secs())?;
    writeln!(report, "| measure | value |")?;
    writeln!(report, "|---|---:|")?;
    writeln!(
        report,
        "| conversations finished | {finished} / {CONVERSATIONS} |"
    )?;
    writeln!(
        report,
        "| wall time (ideal {:.1} s) | {:.2} s |",
        2.0 * SLOW.as_secs_f64(),
        wall.as_secs_f64()
    )?;
    writeln!(
        report,
        "| LLM calls per second (ideal {ideal:.0}) | {achieved:.0} ({:.0}% of ideal) |",
        100.0 * achieved / ideal
    )?;
    writeln!(report, "| worker memory per idle conversation (RSS growth / {CONVERSATIONS}) | {per_conversation_kib:.0} KiB |")?;
    writeln!(report, "\nTargets: at least 90% of ideal throughput; under 256 KiB per idle conversation beyond its sandbox (one sandbox is shared here, since `think`/`finish` do not touch it). The RSS growth includes each conversation's HTTP connection.\n")?;
    Ok(())
}
