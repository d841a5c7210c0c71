//! Issue 18 items 2-4: the conversation loop against the LLM simulator
//! speaking the real wire formats (and a real bubblewrap sandbox): a context
//! window overflow, a reply cut off at the token limit, Anthropic extended
//! thinking.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use shoal_scheduler::client::Client;
use shoal_shared::cost::Prices;
use shoal_shared::event::Event;
use shoal_shared::model::{FunctionCalling, LlmProvider, ModelProfile};
use shoal_shared::task::{AgentResult, AgentSpec, TaskId, TaskKind, TaskSpec, TaskState};
use shoal_tests::llm_sim::{LlmSim, Reply, Script, SimRequest, SimUsage, Turn};
use shoal_tests::local_fixture::OneSandbox;
use shoal_tests::TestEnv;
use shoal_worker::agent::llm::{client_with_policy, LlmClient, RetryPolicy};
use shoal_worker::agent::secrets::Masker;
use shoal_worker::agent::sink::MemorySink;
use shoal_worker::agent::tools::Toolbox;
use shoal_worker::agent::{AgentConfig, Billing, Conversation};
use tokio_util::sync::CancellationToken;

const OPENAI: LlmProvider = LlmProvider::OpenAi;
const ANTHROPIC: LlmProvider = LlmProvider::Anthropic;

/// One sandbox of a fixture of this suite's own.
struct Bench(OneSandbox);

impl Bench {
    async fn new(name: &str) -> Self {
        Self(OneSandbox::new("edges", name, 350000).await)
    }

    async fn finish(self) {
        self.0.finish().await;
    }
}

fn profile(provider: LlmProvider, base_url: &str, calling: FunctionCalling) -> ModelProfile {
    ModelProfile {
        name: shoal_shared::Name::from_static("sim"),
        provider,
        base_url: base_url.into(),
        model: match provider {
            LlmProvider::OpenAi => "gpt-4o-mini".into(),
            LlmProvider::Anthropic => "claude-sonnet-4-5".into(),
        },
        api_key_env: None,
        function_calling: calling,
        max_tokens: 1024,
        temperature: Some(0.0),
        timeout: Duration::from_secs(5),
        max_retries: 2,
        prompt_caching: true,
        prices: None,
        rate_limit: None,
    }
}

fn client(provider: LlmProvider, base_url: &str, calling: FunctionCalling) -> Arc<dyn LlmClient> {
    let p = profile(provider, base_url, calling);
    let policy = RetryPolicy {
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        ..RetryPolicy::new(p.max_retries, p.timeout)
    };
    client_with_policy(&p, policy).expect("client")
}

/// $3 per million input tokens, $15 per million output tokens.
fn config() -> AgentConfig {
    AgentConfig {
        max_iterations: 30,
        max_cost: None,
        timeout: Duration::from_secs(60),
        no_output_timeout: Duration::from_secs(5),
        condense_chars: 1_000_000,
        nudge_plain_text: false,
        prices: Prices {
            input: 3_000_000,
            output: 15_000_000,
            cache_read: 0,
            cache_write: 0,
        },
        max_tokens: None,
        temperature: None,
    }
}

/// Runs one conversation against the simulator; returns its result and events.
async fn converse(
    bench: &Bench,
    provider: LlmProvider,
    calling: FunctionCalling,
    sim_url: &str,
) -> (AgentResult, Vec<Event>) {
    let llm = client(provider, sim_url, calling);
    let sink = MemorySink::default();
    let result = Conversation {
        llm: &*llm,
        sandbox: &*bench.0.sandbox,
        sink: &sink,
        toolbox: Toolbox::new(&[]).expect("tools"),
        masker: Masker::default(),
        env: Vec::new(),
        config: config(),
        billing: Billing {
            task_id: TaskId::new(),
            tenant: "acme".into(),
        },
        cancel: CancellationToken::new(),
        tenant_budget: None,
    }
    .run("Print the answer with the terminal, then finish with it.")
    .await;
    let events = sink.events.lock().expect("events").clone();
    (result, events)
}

/// No request is the previous one sent again.
fn assert_no_identical_resend(sim: &LlmSim) {
    let requests = sim.requests();
    for pair in requests.windows(2) {
        assert_ne!(
            pair[0].body, pair[1].body,
            "request #{} was sent again unchanged",
            pair[0].index
        );
    }
}

fn answered(request: &SimRequest) -> &str {
    &request.answered
}

/// Everything a request says to the model (for finding a note in it).
fn all_text(request: &SimRequest) -> String {
    request
        .messages
        .iter()
        .map(|m| {
            let results: Vec<&str> = m.tool_results.iter().map(|(_, c)| c.as_str()).collect();
            format!("{}\n{}", m.text, results.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---- item 2: context window exceeded ---------------------------------------

/// Today the loop "condensed" a history with nothing to condense, sent the
/// identical request again and took the next reply as the final answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflow_with_nothing_to_condense_ends_context_exceeded_without_a_resend() {
    let bench = Bench::new("ctx-none").await;
    for provider in [OPENAI, ANTHROPIC] {
        let (url, sim) = LlmSim::start(Script::turns([
            Turn::context_window_exceeded(),
            Turn::text("The answer is 42."),
        ]))
        .await;
        let (result, events) = converse(&bench, provider, FunctionCalling::Native, &url).await;
        assert_eq!(
            result.outcome, "context_exceeded",
            "{provider:?}: {result:?}"
        );
        assert!(
            result
                .message
                .as_deref()
                .is_some_and(|m| m.contains("context window")),
            "{provider:?}: the message says why: {:?}",
            result.message
        );
        assert_eq!(
            sim.request_count(),
            1,
            "{provider:?}: nothing was sent again"
        );
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::ConversationError { .. })));
        sim.assert_no_violations();
    }
    bench.finish().await;
}

/// The summariser's request (the condenser's system prompt).
fn is_summary(request: &SimRequest) -> bool {
    request.system.contains("You summarise")
}

/// Answers summaries with `summary`, and the agent's n-th request with `main(n)`.
fn agent_script(
    summary: &'static str,
    main: impl Fn(usize) -> Turn + Send + Sync + 'static,
) -> Script {
    let calls = std::sync::atomic::AtomicUsize::new(0);
    Script::from_fn(move |request| {
        if is_summary(request) {
            return Some(Turn::text(summary));
        }
        Some(main(
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        ))
    })
}

/// A model with a small window: the history outgrows it, the loop condenses
/// and goes on with a smaller request; when the tail alone (one huge tool
/// result) no longer fits, it ends `context_exceeded`, never re-sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflow_is_condensed_and_retried_or_ends_context_exceeded() {
    let bench = Bench::new("ctx-condense").await;
    for provider in [OPENAI, ANTHROPIC] {
        // Eight steps of 1500 characters each outgrow a 2000-token window.
        let script = agent_script("Summary: printed blocks of letters.", |n| {
            if n < 8 {
                Turn::tool_call(
                    "terminal",
                    json!({"command": format!("head -c 1500 /dev/zero | tr '\\0' {}", (b'a' + n as u8) as char)}),
                )
            } else {
                Turn::tool_call("finish", json!({"message": "done"}))
            }
        })
        .with_context_window(2_000);
        let (url, sim) = LlmSim::start(script).await;
        let (result, events) = converse(&bench, provider, FunctionCalling::Native, &url).await;
        assert_eq!(result.outcome, "finished", "{provider:?}: {result:?}");
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Condensation { .. })));
        let requests = sim.requests();
        let overflow = requests
            .iter()
            .position(|r| answered(r) == "context_window_exceeded")
            .expect("an overflow");
        assert!(is_summary(&requests[overflow + 1]));
        let retry = &requests[overflow + 2];
        assert!(!is_summary(retry));
        assert!(retry.estimated_tokens() < requests[overflow].estimated_tokens());
        assert!(all_text(retry).contains("Summary of earlier steps"));
        assert_no_identical_resend(&sim);
        sim.assert_no_violations();

        // One tool result bigger than the window: condensing cannot help.
        let script = agent_script("Summary: echoed words.", |n| match n {
            0..4 => Turn::tool_call("terminal", json!({"command": format!("echo word{n}")})),
            4 => Turn::tool_call(
                "terminal",
                json!({"command": "head -c 20000 /dev/zero | tr '\\0' x"}),
            ),
            _ => Turn::text("The answer is 42."),
        })
        .with_context_window(2_000);
        let (url, sim) = LlmSim::start(script).await;
        let (result, _) = converse(&bench, provider, FunctionCalling::Native, &url).await;
        assert_eq!(
            result.outcome, "context_exceeded",
            "{provider:?}: {result:?}"
        );
        assert_no_identical_resend(&sim);
        // Only the five calls were served: the text answer never was.
        let served = sim
            .requests()
            .iter()
            .filter(|r| !is_summary(r) && answered(r) == "reply")
            .count();
        assert_eq!(served, 5, "{provider:?}");
        assert!(sim.requests().iter().filter(|r| is_summary(r)).count() >= 2);
        sim.assert_no_violations();
    }
    bench.finish().await;
}

// ---- item 3: replies cut off at the token limit ----------------------------

/// Today a text reply that stopped at `max_tokens` was the final answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_off_at_max_tokens_is_not_a_final_answer() {
    let bench = Bench::new("cut-text").await;
    for provider in [OPENAI, ANTHROPIC] {
        let (url, sim) = LlmSim::start(Script::turns([
            Turn::Reply(Reply::text("The answer is 4").cut_off()),
            Turn::tool_call("finish", json!({"message": "The answer is 42."})),
        ]))
        .await;
        let (result, _) = converse(&bench, provider, FunctionCalling::Native, &url).await;
        assert_eq!(result.outcome, "finished", "{provider:?}: {result:?}");
        assert_eq!(result.message.as_deref(), Some("The answer is 42."));
        let second = &sim.requests()[1];
        assert!(
            second
                .last_user_text()
                .contains("cut off at the token limit"),
            "{provider:?}: the model is told: {:?}",
            second.last_user_text()
        );
        sim.assert_no_violations();

        // Cut off again after the note: the conversation ends, clearly.
        let (url, sim) = LlmSim::start(Script::turns([
            Turn::Reply(Reply::text("The answer is 4").cut_off()),
            Turn::Reply(Reply::text("The answer").cut_off()),
            Turn::text("never asked"),
        ]))
        .await;
        let (result, _) = converse(&bench, provider, FunctionCalling::Native, &url).await;
        assert_eq!(result.outcome, "truncated", "{provider:?}: {result:?}");
        assert!(result
            .message
            .as_deref()
            .is_some_and(|m| m.contains("max_tokens")));
        assert_eq!(sim.request_count(), 2);
        sim.assert_no_violations();
    }
    bench.finish().await;
}

/// A call cut off mid-arguments is an error the model sees (naming the
/// token limit), and a `finish` in a cut-off reply does not end the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_cut_off_mid_arguments_is_an_error_the_model_sees() {
    let bench = Bench::new("cut-call").await;
    for provider in [OPENAI, ANTHROPIC] {
        let cut_call = Reply::default()
            .with_raw_call("terminal", r#"{"command": "echo hel"#)
            .cut_off();
        // Anthropic sends what it has of a cut-off `tool_use` as `{}`.
        let cut_finish = Reply::text("All done: the answer is")
            .with_call("finish", json!({}))
            .cut_off();
        for cut in [cut_call, cut_finish] {
            let (url, sim) = LlmSim::start(Script::turns([
                Turn::Reply(cut),
                Turn::tool_call("finish", json!({"message": "hello"})),
            ]))
            .await;
            let (result, events) = converse(&bench, provider, FunctionCalling::Native, &url).await;
            assert_eq!(result.outcome, "finished", "{provider:?}: {result:?}");
            assert_eq!(result.message.as_deref(), Some("hello"));
            let errors: Vec<&String> = events
                .iter()
                .filter_map(|e| match e {
                    Event::AgentError { error, .. } => Some(error),
                    _ => None,
                })
                .collect();
            assert_eq!(errors.len(), 1, "{provider:?}: {errors:?}");
            assert!(errors[0].contains("token limit"), "{errors:?}");
            let second = &sim.requests()[1];
            assert!(second
                .last_tool_result()
                .is_some_and(|r| r.contains("token limit")));
            assert_eq!(sim.request_count(), 2);
            sim.assert_no_violations();
        }
    }
    bench.finish().await;
}

/// Emulated and constrained calls: a complete call before the cut runs, the
/// model is told the rest was lost, and a cut-off reply with no complete
/// call is no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_replies_in_the_emulated_and_constrained_modes() {
    let bench = Bench::new("cut-emulated").await;
    let (url, sim) = LlmSim::start(Script::turns([
        Turn::Reply(
            Reply::text(
                "<function=terminal>\n<parameter=command>echo hi</parameter>\n</function>\n\
                 <function=finish>\n<parameter=message>The out",
            )
            .cut_off(),
        ),
        Turn::text("<function=finish>\n<parameter=message>hi</parameter>\n</function>"),
    ]))
    .await;
    let (result, events) = converse(&bench, OPENAI, FunctionCalling::Emulated, &url).await;
    assert_eq!(result.outcome, "finished", "{result:?}");
    assert_eq!(result.message.as_deref(), Some("hi"));
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Observation { content, .. } if content.contains("hi")
    )));
    assert!(all_text(&sim.requests()[1]).contains("cut off at the token limit"));
    sim.assert_no_violations();

    let (url, sim) = LlmSim::start(Script::turns([
        Turn::Reply(
            Reply::text(
                r#"{"thought": "Run it.", "name": "terminal", "arguments": {"command": "ec"#,
            )
            .cut_off(),
        ),
        Turn::text(r#"{"thought": "Done.", "name": "finish", "arguments": {"message": "42"}}"#),
    ]))
    .await;
    let (result, _) = converse(&bench, OPENAI, FunctionCalling::Constrained, &url).await;
    assert_eq!(result.outcome, "finished", "{result:?}");
    assert_eq!(result.message.as_deref(), Some("42"));
    assert!(all_text(&sim.requests()[1]).contains("cut off at the token limit"));
    sim.assert_no_violations();
    bench.finish().await;
}

/// Through the whole fleet: a `truncated` end is a failed task whose
/// `last_error` says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_conversation_fails_the_task_with_a_clear_error() {
    let (sim_url, _sim) = LlmSim::start(Script::turns([
        Turn::Reply(Reply::text("The answer is 4").cut_off()),
        Turn::Reply(Reply::text("The answer").cut_off()),
    ]))
    .await;
    let toml = format!(
        "models.sim.provider = \"openai\"\nmodels.sim.base_url = \"{sim_url}\"\nmodels.sim.model = \"sim-model\"\n\
         models.sim.price_input = 3.0\nmodels.sim.price_output = 15.0\nmodels.sim.max_retries = 1\n"
    );
    let mut env = TestEnv::new("edges-truncated", &toml).await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let mut spec: AgentSpec = serde_json::from_value(json!({"prompt": "say 42"})).expect("spec");
    spec.model = "sim".into();
    let record = Client::new(&url, None)
        .submit(&TaskSpec::new(TaskKind::Agent(spec)), None)
        .await
        .expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(90)).await;
    assert_eq!(done.state, TaskState::Failed);
    let error = done.last_error.unwrap_or_default();
    assert!(
        error.starts_with("truncated: ") && error.contains("max_tokens"),
        "{error}"
    );
    env.teardown().await;
}

// ---- item 4: Anthropic extended thinking -----------------------------------

/// The simulator is held to the real contract: a request that drops or
/// alters the thinking blocks of the turn it continues gets the API's 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_refuses_thinking_blocks_dropped_or_altered() {
    let (url, sim) = LlmSim::start(Script::echo()).await;
    sim.push_turn(Turn::Reply(
        Reply::default()
            .with_thinking("I should list the files.")
            .with_call("terminal", json!({"command": "ls"})),
    ));
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(format!("{url}/messages"))
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    let first = json!({"model": "m", "max_tokens": 100,
        "messages": [{"role": "user", "content": "list"}]});
    let reply: Value = post(first).await.expect("send").json().await.expect("json");
    let blocks = reply["content"].as_array().expect("content").clone();
    assert_eq!(blocks[0]["type"], "thinking");
    assert!(blocks[0]["signature"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    let id = blocks[1]["id"].clone();
    let next = |assistant: Vec<Value>| {
        json!({"model": "m", "max_tokens": 100, "messages": [
            {"role": "user", "content": "list"},
            {"role": "assistant", "content": assistant},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "a.txt"}]},
        ]})
    };
    let dropped = post(next(vec![blocks[1].clone()])).await.expect("send");
    assert_eq!(dropped.status(), 400);
    let mut altered = blocks.clone();
    altered[0]["thinking"] = json!("I should delete the files.");
    assert_eq!(post(next(altered)).await.expect("send").status(), 400);
    assert_eq!(post(next(blocks)).await.expect("send").status(), 200);
    let refused: Vec<String> = sim.requests().iter().map(|r| r.answered.clone()).collect();
    assert_eq!(refused, ["reply", "invalid", "invalid", "reply"]);
}

/// Today the client dropped `thinking` and `redacted_thinking` blocks and
/// the API refused the tool result that followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_thinking_blocks_go_back_unchanged_and_are_priced_as_output() {
    let bench = Bench::new("thinking").await;
    let usage = SimUsage {
        input: 1000,
        output: 700,
        ..SimUsage::default()
    };
    let (url, sim) = LlmSim::start(Script::turns([
        Turn::Reply(
            Reply::text("Let me print it.")
                .with_thinking("The user wants 42 printed; use echo.")
                .with_redacted_thinking()
                .with_call("terminal", json!({"command": "echo 42"}))
                .with_usage(usage),
        ),
        Turn::Reply(
            Reply::default()
                .with_thinking("It printed 42.")
                .with_call("finish", json!({"message": "42"}))
                .with_usage(usage),
        ),
    ]))
    .await;
    let (result, _) = converse(&bench, ANTHROPIC, FunctionCalling::Native, &url).await;
    sim.assert_no_violations();
    assert_eq!(result.outcome, "finished", "{result:?}");
    // The blocks went back first in the assistant turn, exactly as sent.
    let requests = sim.requests();
    let assistant = requests[1]
        .messages
        .iter()
        .find(|m| m.role == "assistant")
        .expect("assistant turn");
    assert_eq!(assistant.thinking.len(), 2);
    assert_eq!(
        requests[1].body["messages"][1]["content"][0]["type"],
        "thinking"
    );
    assert_eq!(
        requests[1].body["messages"][1]["content"][1]["type"],
        "redacted_thinking"
    );
    // Thinking is in `output_tokens`: priced once, as output.
    assert_eq!(result.usage.completion_tokens, 1400);
    assert_eq!(result.cost_micros, 2 * (1000 * 3 + 700 * 15));
    bench.finish().await;
}
