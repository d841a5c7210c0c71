//! `shoal`: the command line for Shoal. Talks to the scheduler over HTTP.

mod dead;
mod fleet;
mod ls;
mod token;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use shoal_scheduler::client::{Client, CostQuery};
use shoal_shared::task::{
    AgentSpec, ExecSpec, Language, Priority, TaskId, TaskKind, TaskRecord, TaskResult, TaskSpec,
};

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Submit, inspect and manage Shoal tasks"
)]
struct Cli {
    /// Scheduler base URL.
    #[arg(
        long,
        global = true,
        env = "SHOAL_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// Bearer token (when the scheduler requires one).
    #[arg(long, global = true, env = "SHOAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// How to print results.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Readable text (`table` is the same).
    #[value(alias = "table")]
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a task: an agent prompt, a command (--exec), code (--code), or a
    /// JSON-lines file of task specs (-f).
    Submit(Box<SubmitArgs>),
    /// Follow a task's events live until it finishes (Server-Sent Events,
    /// reconnecting where it left off); exits 2 unless it succeeded.
    /// `-o json`: one event per line.
    Watch {
        /// The task id.
        id: TaskId,
        /// Give up when a lost stream cannot be reopened for this long.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        give_up_after: u64,
    },
    /// Print a task's event log as it stands, finished or not, without
    /// following it. `-o json`: one event per line.
    Logs {
        /// The task id.
        id: TaskId,
    },
    /// List tasks, newest first, by state, tenant, kind and labels.
    /// `-o json`: the page(s) as JSON, with `next_cursor` when more match.
    Ls(ls::LsArgs),
    /// Show a task.
    Status {
        /// The task id.
        id: TaskId,
    },
    /// Cancel a task: at once if it has not started, else its worker stops it
    /// within about a second.
    Cancel {
        /// The task id.
        id: TaskId,
        /// Wait until the task has stopped and show it.
        #[arg(long)]
        wait: bool,
    },
    /// Sum LLM costs by tenant, model and day (or task) from the cost stream.
    Cost(CostArgs),
    /// List the live workers: slots busy/total, running tasks, version, last
    /// heartbeat. `-o json`: the API's answer.
    Workers,
    /// A refreshing fleet summary: workers, slots, queue depths, finished
    /// tasks and LLM spend per minute. q or Ctrl-C quits; `--once` prints one
    /// frame; `-o json`: one JSON object per refresh.
    Top(fleet::TopArgs),
    /// Dead letters: tasks that ran out of attempts and messages no worker
    /// could read. ls | show ID | replay ID | replay --all --reason X |
    /// purge ID | purge --all --reason X.
    #[command(subcommand)]
    Dead(dead::DeadCommand),
    /// Bearer tokens for the scheduler's configuration: `token hash` prints
    /// a token's `sha256:` digest (stdin, or `--generate` a new token).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(clap::Args)]
struct SubmitArgs {
    /// The agent's prompt.
    #[arg(conflicts_with_all = ["exec", "code", "file"])]
    prompt: Option<String>,
    /// Run this shell command in a sandbox.
    #[arg(long, conflicts_with_all = ["code", "file"])]
    exec: Option<String>,
    /// Run this code file in a sandbox (with --language).
    #[arg(long, requires = "language", conflicts_with = "file")]
    code: Option<PathBuf>,
    #[arg(long, value_enum)]
    language: Option<LanguageArg>,
    /// A JSON-lines file of task specs, submitted in batches.
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = PriorityArg::Normal)]
    priority: PriorityArg,
    /// Wall-clock limit in seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Agent model profile.
    #[arg(long)]
    model: Option<String>,
    /// An agent tool to offer (repeat for several; default: all of them).
    /// `finish` is always offered.
    #[arg(long = "tool", value_name = "NAME")]
    tools: Vec<String>,
    /// Labels, as key=value.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Makes resubmitting this exact call safe.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Tasks per batch request with -f.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Wait for the task to finish and print its result.
    #[arg(long)]
    wait: bool,
    /// Do not start before this time (RFC 3339, e.g. 2026-12-24T08:00:00Z):
    /// the task is `scheduled` until then. With -f, for specs without a
    /// `not_before` of their own.
    #[arg(long, value_name = "TIME", value_parser = parse_at, conflicts_with = "in_")]
    at: Option<chrono::DateTime<chrono::Utc>>,
    /// Do not start before this long from now (90s, 5m, 2h, 1d).
    #[arg(long = "in", id = "in_", value_name = "DURATION", value_parser = parse_in)]
    in_: Option<chrono::TimeDelta>,
}

fn parse_at(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|time| time.with_timezone(&chrono::Utc))
        .map_err(|_| {
            format!("{text:?} is not an RFC 3339 time; give one with an offset, e.g. 2026-12-24T08:00:00Z, or use --in 2h")
        })
}

fn parse_in(text: &str) -> Result<chrono::TimeDelta, String> {
    shoal_scheduler::cost::parse_duration(text)
}

impl SubmitArgs {
    /// The `not_before` that `--at` or `--in` asks for.
    fn not_before(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.at
            .or_else(|| self.in_.map(|delay| chrono::Utc::now() + delay))
    }
}

#[derive(clap::Args)]
struct CostArgs {
    /// Start of the range: a duration before now (24h, 7d, 90m, 2w) or an
    /// RFC 3339 time. Default: the oldest entry kept.
    #[arg(long)]
    since: Option<String>,
    /// End of the range (exclusive), in the same forms. Default: now.
    #[arg(long)]
    until: Option<String>,
    /// Only this tenant (a token sees its own tenant only).
    #[arg(long)]
    tenant: Option<String>,
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// Only this task: its total is the sum of its LLM calls.
    #[arg(long)]
    task: Option<TaskId>,
    /// Group by these keys, comma-separated: tenant, model, day (UTC), task.
    /// Default: tenant,model,day; with --task: task.
    #[arg(long)]
    by: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum PriorityArg {
    High,
    Normal,
    Low,
}

#[derive(Clone, Copy, ValueEnum)]
enum LanguageArg {
    Python,
    Bash,
    Sh,
    Node,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli).await {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.server, cli.token.clone());
    match cli.command {
        Command::Submit(args) => submit(&client, cli.output, *args).await,
        Command::Watch { id, give_up_after } => {
            let give_up_after = Duration::from_secs(give_up_after);
            let record = watch(&client, cli.output, &id, give_up_after).await?;
            if cli.output == Output::Text {
                println!();
                print_record(Output::Text, &record)?;
            }
            if record.state != shoal_shared::TaskState::Succeeded {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Logs { id } => {
            let state =
                shoal_scheduler::watch::log(&client, &id, |event| print_event(cli.output, event))
                    .await?;
            if !state.is_terminal() {
                eprintln!("(task {id} is {state}: `shoal watch {id}` follows it)");
            }
            Ok(())
        }
        Command::Ls(args) => ls::ls(&client, cli.output, args).await,
        Command::Status { id } => {
            let record = client.get(&id).await?;
            print_record(cli.output, &record)
        }
        Command::Cancel { id, wait } => {
            let mut record = client.cancel(&id).await?;
            if wait {
                record = wait_for(&client, &id).await?;
            }
            print_record(cli.output, &record)
        }
        Command::Cost(args) => {
            let by = args
                .by
                .or_else(|| args.task.is_some().then(|| "task".to_owned()));
            let query = CostQuery {
                since: args.since,
                until: args.until,
                tenant: args.tenant,
                model: args.model,
                task: args.task.map(|id| id.to_string()),
                by,
            };
            let summary = client.cost(&query).await?;
            match cli.output {
                Output::Json => print_json(&summary),
                Output::Text => {
                    print!("{}", shoal_scheduler::cost::render_table(&summary));
                    Ok(())
                }
            }
        }
        Command::Workers => fleet::workers(&client, cli.output).await,
        Command::Top(args) => fleet::top(&client, cli.output, args).await,
        Command::Dead(command) => dead::dead(&client, cli.output, command).await,
        Command::Token(command) => token::token(cli.output, command),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "shoal", &mut std::io::stdout());
            Ok(())
        }
    }
}

async fn submit(client: &Client, output: Output, args: SubmitArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.file {
        return submit_file(client, output, path, args.batch_size, args.not_before()).await;
    }
    let spec = spec_of(&args)?;
    let record = client
        .submit(&spec, args.idempotency_key.as_deref())
        .await?;
    if !args.wait {
        return match output {
            Output::Json => print_json(&record),
            Output::Text => {
                println!("{}", record.id);
                Ok(())
            }
        };
    }
    let record = wait_for(client, &record.id).await?;
    print_record(output, &record)?;
    if record.state != shoal_shared::TaskState::Succeeded {
        std::process::exit(2);
    }
    Ok(())
}

/// The task a single `shoal submit` describes.
fn spec_of(args: &SubmitArgs) -> anyhow::Result<TaskSpec> {
    let kind = if let Some(command) = &args.exec {
        let mut exec = ExecSpec::command(command.clone());
        if let Some(timeout) = args.timeout {
            exec.timeout_s = timeout;
        }
        TaskKind::Exec(exec)
    } else if let Some(path) = &args.code {
        let code =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let language = match args.language {
            Some(LanguageArg::Python) | None => Language::Python,
            Some(LanguageArg::Bash) => Language::Bash,
            Some(LanguageArg::Sh) => Language::Sh,
            Some(LanguageArg::Node) => Language::Node,
        };
        let mut exec = ExecSpec::command(String::new());
        exec.command = None;
        exec.language = Some(language);
        exec.code = Some(code);
        if let Some(timeout) = args.timeout {
            exec.timeout_s = timeout;
        }
        TaskKind::Exec(exec)
    } else if let Some(prompt) = &args.prompt {
        let mut agent: AgentSpec = serde_json::from_value(serde_json::json!({ "prompt": prompt }))?;
        if let Some(model) = &args.model {
            agent.model = model.clone();
        }
        if let Some(timeout) = args.timeout {
            agent.limits.timeout_s = timeout;
        }
        agent.tools = args.tools.clone();
        TaskKind::Agent(agent)
    } else {
        bail!("give a prompt, --exec, --code or -f (see `shoal submit --help`)");
    };
    let mut spec = TaskSpec::new(kind);
    spec.priority = match args.priority {
        PriorityArg::High => Priority::High,
        PriorityArg::Normal => Priority::Normal,
        PriorityArg::Low => Priority::Low,
    };
    spec.labels = args.labels.iter().cloned().collect();
    spec.not_before = args.not_before();
    Ok(spec)
}

async fn submit_file(
    client: &Client,
    output: Output,
    path: &PathBuf,
    batch_size: usize,
    not_before: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut specs = Vec::new();
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let spec: TaskSpec = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a task spec", path.display(), number + 1))?;
        let mut spec = spec;
        spec.not_before = spec.not_before.or(not_before);
        specs.push(spec);
    }
    let bar = ProgressBar::new(specs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} submitted ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut records = Vec::with_capacity(specs.len());
    for chunk in specs.chunks(batch_size.max(1)) {
        let submitted = client.submit_batch(chunk).await?;
        bar.inc(submitted.len() as u64);
        records.extend(submitted);
    }
    bar.finish();
    match output {
        Output::Json => print_json(&records),
        Output::Text => {
            let mut stdout = std::io::stdout().lock();
            for record in &records {
                writeln!(stdout, "{}", record.id)?;
            }
            Ok(())
        }
    }
}

/// Prints events as they come (text: readable lines; json: one event per
/// line) and returns the final record.
async fn watch(
    client: &Client,
    output: Output,
    id: &TaskId,
    give_up_after: Duration,
) -> anyhow::Result<TaskRecord> {
    // Names an unknown task or an unreachable scheduler before following.
    client.get(id).await?;
    shoal_scheduler::watch::follow(
        client,
        id,
        give_up_after,
        |streamed| print_event(output, &streamed.event),
        |notice| eprintln!("shoal watch: {notice}"),
    )
    .await?;
    Ok(client.get(id).await?)
}

/// One event: a readable line (none for some), or one line of JSON.
fn print_event(output: Output, event: &serde_json::Value) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match output {
        Output::Json => writeln!(stdout, "{event}")?,
        Output::Text => {
            if let Some(line) = shoal_scheduler::watch::render(event) {
                writeln!(stdout, "{line}")?;
            }
        }
    }
    stdout.flush()?;
    Ok(())
}

async fn wait_for(client: &Client, id: &TaskId) -> anyhow::Result<TaskRecord> {
    let mut delay = Duration::from_millis(50);
    loop {
        let record = client.get(id).await?;
        if record.state.is_terminal() {
            return Ok(record);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_record(output: Output, record: &TaskRecord) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(record);
    }
    println!("task      {}", record.id);
    println!("state     {}", record.state);
    println!(
        "kind      {}  priority {}  tenant {}",
        record.kind,
        record.priority.as_str(),
        record.tenant
    );
    println!("attempts  {}/{}", record.attempts, record.max_attempts);
    if let Some(worker) = &record.worker {
        println!("worker    {worker}");
    }
    println!("created   {}", record.created_at);
    if let Some(due) = record.not_before {
        if record.state == shoal_shared::TaskState::Scheduled {
            let wait = (due - chrono::Utc::now()).num_seconds().max(0);
            println!(
                "due       {due}  (in {wait} s; `shoal cancel {}` drops it)",
                record.id
            );
        } else {
            println!("due       {due}");
        }
    }
    if let Some(finished) = record.finished_at {
        println!("finished  {finished}");
    } else if let Some(asked) = record.cancel_requested_at {
        println!("cancel    requested at {asked}; the worker is stopping it");
    }
    if let Some(error) = &record.last_error {
        println!("error     {error}");
    }
    if let Some(TaskResult::Agent(result)) = &record.result {
        println!(
            "outcome   {}  ({} LLM calls, {} tokens in, {} out, ${:.4})",
            result.outcome,
            result.steps,
            result.usage.prompt_tokens
                + result.usage.cache_read_tokens
                + result.usage.cache_write_tokens,
            result.usage.completion_tokens,
            result.cost_micros as f64 / 1e6
        );
        if !result.workspace_files.is_empty() {
            println!("files     {}", result.workspace_files.join("  "));
        }
        if let Some(message) = &result.message {
            println!("--- answer\n{message}");
        }
    }
    if let Some(TaskResult::Exec(result)) = &record.result {
        println!(
            "exit      {}  ({} ms)",
            result
                .exit_code
                .map_or("killed".to_owned(), |c| c.to_string()),
            result.duration_ms
        );
        if result.memory_exceeded {
            println!("memory    a process was killed: the sandbox reached its memory limit");
        }
        if !result.stdout.is_empty() {
            println!(
                "--- stdout{}",
                if result.stdout_truncated {
                    " (truncated)"
                } else {
                    ""
                }
            );
            print!("{}", result.stdout);
        }
        if !result.stderr.is_empty() {
            println!(
                "--- stderr{}",
                if result.stderr_truncated {
                    " (truncated)"
                } else {
                    ""
                }
            );
            print!("{}", result.stderr);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit_args(argv: &[&str]) -> SubmitArgs {
        let cli = Cli::try_parse_from(argv).expect("parses");
        match cli.command {
            Command::Submit(args) => *args,
            _ => panic!("not a submit"),
        }
    }

    #[test]
    fn an_agent_task_offers_the_tools_named() {
        let args = submit_args(&[
            "shoal",
            "submit",
            "--tool",
            "terminal",
            "--tool",
            "file_editor",
            "--timeout",
            "60",
            "fix it",
        ]);
        let spec = spec_of(&args).unwrap();
        let TaskKind::Agent(agent) = spec.kind else {
            panic!("not an agent task")
        };
        assert_eq!(agent.prompt, "fix it");
        assert_eq!(agent.tools, ["terminal", "file_editor"]);
        assert_eq!(agent.limits.timeout_s, 60);
        // Without --tool: the default set.
        let spec = spec_of(&submit_args(&["shoal", "submit", "fix it"])).unwrap();
        let TaskKind::Agent(agent) = spec.kind else {
            panic!("not an agent task")
        };
        assert!(agent.tools.is_empty());
    }

    #[test]
    fn cancel_takes_a_task_id() {
        let id = TaskId::new();
        let cli = Cli::try_parse_from(["shoal", "cancel", &id.to_string(), "--wait"]).unwrap();
        assert!(matches!(cli.command, Command::Cancel { id: got, wait: true } if got == id));
        assert!(Cli::try_parse_from(["shoal", "cancel", "nope"]).is_err());
    }

    #[test]
    fn cost_takes_filters_and_table_is_text() {
        let cli = Cli::try_parse_from([
            "shoal",
            "cost",
            "--since",
            "7d",
            "--by",
            "tenant,day",
            "--output",
            "table",
        ])
        .unwrap();
        assert!(cli.output == Output::Text);
        let Command::Cost(args) = cli.command else {
            panic!("not a cost")
        };
        assert_eq!(args.since.as_deref(), Some("7d"));
        assert_eq!(args.by.as_deref(), Some("tenant,day"));
        assert!(Cli::try_parse_from(["shoal", "cost", "--task", "nope"]).is_err());
    }

    #[test]
    fn submit_at_or_in_sets_not_before() {
        let args = submit_args(&[
            "shoal",
            "submit",
            "--exec",
            "true",
            "--at",
            "2030-01-02T03:04:05Z",
        ]);
        let spec = spec_of(&args).unwrap();
        assert_eq!(
            spec.not_before.map(|t| t.to_rfc3339()),
            Some("2030-01-02T03:04:05+00:00".to_owned())
        );
        let before = chrono::Utc::now();
        let spec = spec_of(&submit_args(&[
            "shoal", "submit", "--exec", "true", "--in", "90s",
        ]))
        .unwrap();
        let due = spec.not_before.unwrap();
        assert!(due >= before + chrono::TimeDelta::seconds(90), "{due}");
        assert!(
            due <= chrono::Utc::now() + chrono::TimeDelta::seconds(90),
            "{due}"
        );
        // Mutually exclusive, and bad values are refused with a hint.
        assert!(Cli::try_parse_from([
            "shoal",
            "submit",
            "--exec",
            "true",
            "--at",
            "2030-01-02T03:04:05Z",
            "--in",
            "5m"
        ])
        .is_err());
        let err = Cli::try_parse_from(["shoal", "submit", "--exec", "true", "--in", "5 minutes"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("90s, 5m, 2h"), "{err}");
        let err = Cli::try_parse_from(["shoal", "submit", "--exec", "true", "--at", "tomorrow"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("RFC 3339"), "{err}");
        assert_eq!(
            spec_of(&submit_args(&["shoal", "submit", "--exec", "true"]))
                .unwrap()
                .not_before,
            None
        );
    }

    #[test]
    fn nothing_to_submit_is_an_error() {
        let err = spec_of(&submit_args(&["shoal", "submit"])).unwrap_err();
        assert!(err.to_string().contains("give a prompt"), "{err}");
    }
}
