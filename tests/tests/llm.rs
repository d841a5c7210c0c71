//! The LLM clients (OpenAI-compatible, Anthropic, emulated tool calls)
//! against the LLM simulator, which speaks both real wire formats, injects
//! faults and checks every request for what the real APIs require. No
//! network beyond loopback.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shoal_shared::cost::Usage;
use shoal_shared::model::{FunctionCalling, LlmProvider, ModelProfile};
use shoal_tests::llm_sim::{Format, LlmSim, Matcher, Reply, Rule, Script, SimUsage, Turn};
use shoal_worker::agent::llm::retry::{observing_attempts, AttemptObserver, AttemptReport};
use shoal_worker::agent::llm::{
    client_for, client_with_policy, ChatMessage, LlmClient, LlmError, LlmErrorKind, LlmRequest,
    LlmResponse, RetryPolicy, Role, ToolCall, ToolSpec,
};
use tokio_util::sync::CancellationToken;

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
        max_retries: 3,
        prompt_caching: true,
        prices: None,
        rate_limit: None,
    }
}

/// Short backoff so retries take milliseconds.
fn policy(max_retries: u32, attempt_timeout: Duration) -> RetryPolicy {
    RetryPolicy {
        max_retries,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(100),
        max_retry_after: Duration::from_secs(5),
        ..RetryPolicy::new(max_retries, attempt_timeout)
    }
}

fn client(p: &ModelProfile) -> std::sync::Arc<dyn LlmClient> {
    client_with_policy(p, policy(p.max_retries, p.timeout)).expect("client")
}

fn tools() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "execute_bash".into(),
            description: "Run a shell command in the sandbox.".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The command."},
                    "timeout": {"type": "integer", "description": "Seconds."}
                },
                "required": ["command"]
            }),
        },
        ToolSpec {
            name: "finish".into(),
            description: "Say the task is done.".into(),
            parameters: json!({"type": "object", "properties": {}}),
        },
    ]
}

fn request(messages: Vec<ChatMessage>) -> LlmRequest {
    LlmRequest {
        messages,
        tools: tools(),
        max_tokens: None,
        temperature: None,
        response_format: None,
    }
}

fn simple() -> LlmRequest {
    request(vec![
        ChatMessage::system("You are a careful coding agent."),
        ChatMessage::user("List the files."),
    ])
}

fn call(id: &str, command: &str) -> ToolCall {
    ToolCall {
        id: id.into(),
        name: "execute_bash".into(),
        arguments: json!({ "command": command }).to_string(),
    }
}

/// A conversation with two parallel tool calls answered, then a user turn.
fn history() -> LlmRequest {
    request(vec![
        ChatMessage::system("You are a careful coding agent."),
        ChatMessage::user("What is in the repo?"),
        ChatMessage::assistant_with_calls(
            "Let me look.",
            vec![call("call_a", "ls"), call("call_b", "cat README.md")],
        ),
        ChatMessage::tool_result("call_a", "README.md\nsrc"),
        ChatMessage::tool_result("call_b", "# Demo"),
        ChatMessage::user("Now summarise."),
    ])
}

async fn complete(c: &dyn LlmClient, r: &LlmRequest) -> Result<LlmResponse, LlmError> {
    c.complete(r, &CancellationToken::new()).await
}

fn args(call: &ToolCall) -> Value {
    serde_json::from_str(&call.arguments).expect("arguments are JSON")
}

#[tokio::test]
async fn openai_native_tool_call_and_history() {
    let script = Script::turns([
        Turn::Reply(Reply::text("Listing.").with_call("execute_bash", json!({"command": "ls"}))),
        Turn::text("It is a demo."),
    ]);
    let (base, sim) = LlmSim::builder()
        .api_key("sk-sim")
        .start(script)
        .await
        .unwrap();
    let p = profile(LlmProvider::OpenAi, &base, FunctionCalling::Native);
    let c = shoal_worker::agent::llm::OpenAiClient::new(&p, Some("sk-sim".into()))
        .unwrap()
        .with_retry_policy(policy(3, p.timeout));
    let first = complete(&c, &simple()).await.unwrap();
    assert_eq!(first.message.role, Role::Assistant);
    assert_eq!(first.message.content, "Listing.");
    assert_eq!(first.message.tool_calls.len(), 1);
    assert_eq!(first.message.tool_calls[0].name, "execute_bash");
    assert_eq!(args(&first.message.tool_calls[0]), json!({"command": "ls"}));
    assert_eq!(first.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(first.attempts, 1);
    assert_eq!(first.model, "gpt-4o-mini");

    let second = complete(&c, &history()).await.unwrap();
    assert_eq!(second.message.content, "It is a demo.");
    assert!(second.message.tool_calls.is_empty());
    assert_eq!(second.finish_reason.as_deref(), Some("stop"));

    let seen = sim.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|r| r.format == Format::OpenAi));
    assert_eq!(seen[0].header("authorization"), Some("Bearer sk-sim"));
    let body = &seen[0].body;
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["max_tokens"], 1024);
    assert_eq!(body["tools"][0]["type"], "function");
    assert_eq!(body["tools"][0]["function"]["name"], "execute_bash");
    assert_eq!(body["messages"][0]["role"], "system");
    let replay = &seen[1];
    assert_eq!(replay.messages.len(), 5);
    assert_eq!(replay.messages[1].tool_calls.len(), 2);
    assert_eq!(replay.messages[2].role, "tool");
    assert_eq!(
        replay.messages[3].tool_results[0],
        ("call_b".into(), "# Demo".into())
    );
    assert!(replay.body["messages"][2]["tool_calls"][0]["function"]["arguments"].is_string());
    sim.assert_no_violations();
}

#[tokio::test]
async fn anthropic_native_tool_use_merging_and_cache_control() {
    let script = Script::turns([
        Turn::tool_call("execute_bash", json!({"command": "ls", "timeout": 5})),
        Turn::text("Summary."),
    ]);
    let (base, sim) = LlmSim::builder()
        .api_key("sk-ant")
        .start(script)
        .await
        .unwrap();
    let p = profile(LlmProvider::Anthropic, &base, FunctionCalling::Native);
    let c = shoal_worker::agent::llm::AnthropicClient::new(&p, Some("sk-ant".into()))
        .unwrap()
        .with_retry_policy(policy(3, p.timeout));
    let first = complete(&c, &simple()).await.unwrap();
    let calls = &first.message.tool_calls;
    assert_eq!(calls.len(), 1);
    assert!(calls[0].id.starts_with("toolu_"));
    assert_eq!(args(&calls[0]), json!({"command": "ls", "timeout": 5}));
    assert_eq!(first.finish_reason.as_deref(), Some("tool_use"));
    assert_eq!(first.message.content, "");

    let second = complete(&c, &history()).await.unwrap();
    assert_eq!(second.message.content, "Summary.");
    assert_eq!(second.finish_reason.as_deref(), Some("end_turn"));

    let seen = sim.requests();
    assert_eq!(seen[0].header("x-api-key"), Some("sk-ant"));
    assert_eq!(seen[0].header("anthropic-version"), Some("2023-06-01"));
    assert!(seen[0].header("authorization").is_none());
    let body = &seen[1].body;
    assert_eq!(body["max_tokens"], 1024);
    assert_eq!(body["system"][0]["text"], "You are a careful coding agent.");
    assert_eq!(
        body["system"][0]["cache_control"],
        json!({"type": "ephemeral"})
    );
    assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
    let messages = body["messages"].as_array().unwrap();
    // user, assistant (text + 2 tool_use), user (2 tool_result + text)
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[1]["content"][1]["type"], "tool_use");
    assert_eq!(
        messages[1]["content"][2]["input"],
        json!({"command": "cat README.md"})
    );
    let last = messages[2]["content"].as_array().unwrap();
    assert_eq!(last.len(), 3);
    assert_eq!(last[0]["type"], "tool_result");
    assert_eq!(last[0]["tool_use_id"], "call_a");
    assert_eq!(last[1]["tool_use_id"], "call_b");
    assert_eq!(last[2]["text"], "Now summarise.");
    assert_eq!(last[2]["cache_control"], json!({"type": "ephemeral"}));
    assert!(last[0].get("cache_control").is_none());
    assert!(messages[0]["content"][0].get("cache_control").is_none());
    sim.assert_no_violations();
}

#[tokio::test]
async fn anthropic_without_prompt_caching_sends_no_cache_control() {
    let (base, sim) = LlmSim::start(Script::echo()).await;
    let mut p = profile(
        LlmProvider::Anthropic,
        &sim.root_url(),
        FunctionCalling::Native,
    );
    p.prompt_caching = false;
    let reply = complete(&*client(&p), &history()).await.unwrap();
    assert_eq!(reply.message.content, "echo: Now summarise.");
    let body = &sim.requests()[0].body;
    assert!(!body.to_string().contains("cache_control"));
    assert_eq!(body["system"], "You are a careful coding agent.");
    assert!(base.ends_with("/v1"));
    sim.assert_no_violations();
}

#[tokio::test]
async fn usage_and_cache_accounting_in_both_formats() {
    let usage = SimUsage {
        input: 200,
        output: 50,
        cache_read: 800,
        cache_write: 0,
        reasoning: 20,
    };
    let (base, sim) = LlmSim::start(Script::turns([Turn::Reply(
        Reply::text("ok").with_usage(usage),
    )]))
    .await;
    let p = profile(LlmProvider::OpenAi, &base, FunctionCalling::Native);
    let got = complete(&*client(&p), &simple()).await.unwrap().usage;
    // The wire said prompt_tokens 1000 of which 800 cached.
    assert_eq!(
        got,
        Usage {
            prompt_tokens: 200,
            completion_tokens: 50,
            cache_read_tokens: 800,
            cache_write_tokens: 0,
            reasoning_tokens: 20
        }
    );
    sim.assert_no_violations();

    let usage = SimUsage {
        input: 100,
        output: 40,
        cache_read: 5000,
        cache_write: 300,
        reasoning: 0,
    };
    let (base, sim) = LlmSim::start(Script::turns([Turn::Reply(
        Reply::text("ok").with_usage(usage),
    )]))
    .await;
    let p = profile(LlmProvider::Anthropic, &base, FunctionCalling::Native);
    let got = complete(&*client(&p), &simple()).await.unwrap().usage;
    assert_eq!(
        got,
        Usage {
            prompt_tokens: 100,
            completion_tokens: 40,
            cache_read_tokens: 5000,
            cache_write_tokens: 300,
            reasoning_tokens: 0
        }
    );
    // Billed once: 100*3 + 40*15 + 5000*0.3 + 300*3.75 micro-dollars.
    let cost = p.effective_prices().cost(&got);
    assert_eq!(cost.0, 300 + 600 + 1500 + 1125);
    sim.assert_no_violations();
}

#[tokio::test]
async fn emulated_tool_calls_over_openai() {
    let reply = "I'll list the files.\n<function=execute_bash>\n<parameter=command>ls -la</parameter>\n<parameter=timeout>30</parameter>\n</function>";
    let (base, sim) =
        LlmSim::start(Script::turns([Turn::text(reply), Turn::text("All done.")])).await;
    let p = profile(LlmProvider::OpenAi, &base, FunctionCalling::Emulated);
    let c = client(&p);
    let first = complete(&*c, &simple()).await.unwrap();
    assert_eq!(first.message.content, "I'll list the files.");
    assert_eq!(first.message.tool_calls.len(), 1);
    assert_eq!(first.message.tool_calls[0].name, "execute_bash");
    assert!(!first.message.tool_calls[0].id.is_empty());
    assert_eq!(
        args(&first.message.tool_calls[0]),
        json!({"command": "ls -la", "timeout": 30})
    );
    assert_eq!(first.finish_reason.as_deref(), Some("tool_calls"));
    let second = complete(&*c, &history()).await.unwrap();
    assert_eq!(second.message.content, "All done.");
    assert!(second.message.tool_calls.is_empty());

    let seen = sim.requests();
    for r in &seen {
        assert!(
            r.body.get("tools").is_none(),
            "emulated mode sends no tools"
        );
        assert!(r.system.contains("BEGIN FUNCTION #1: execute_bash"));
        assert!(r.system.contains("<function=example_function_name>"));
        assert!(r.system.starts_with("You are a careful coding agent."));
        assert!(r
            .messages
            .iter()
            .all(|m| m.tool_calls.is_empty() && m.role != "tool"));
    }
    let replay = &seen[1].messages;
    // user, assistant (text + calls as text), user (results + question)
    assert_eq!(replay.len(), 3);
    assert!(replay[1]
        .text
        .contains("<function=execute_bash>\n<parameter=command>cat README.md</parameter>"));
    assert!(replay[2]
        .text
        .starts_with("EXECUTION RESULT of [execute_bash]:\nREADME.md\nsrc"));
    assert!(replay[2].text.ends_with("Now summarise."));
    sim.assert_no_violations();
}

#[tokio::test]
async fn emulated_bare_json_calls_like_small_models_emit() {
    let fenced =
        "Sure.\n```json\n{\"name\": \"execute_bash\", \"arguments\": {\"command\": \"pwd\"}}\n```";
    let bare = "{\"name\": \"finish\", \"arguments\": {}}";
    let (base, sim) = LlmSim::start(Script::turns([Turn::text(fenced), Turn::text(bare)])).await;
    let p = profile(LlmProvider::Anthropic, &base, FunctionCalling::Emulated);
    let c = client(&p);
    let first = complete(&*c, &simple()).await.unwrap();
    assert_eq!(first.message.content, "Sure.");
    assert_eq!(
        args(&first.message.tool_calls[0]),
        json!({"command": "pwd"})
    );
    let second = complete(&*c, &history()).await.unwrap();
    assert_eq!(second.message.tool_calls[0].name, "finish");
    assert_eq!(second.message.content, "");
    // Over Anthropic the rewritten history must still alternate.
    let replay = &sim.requests()[1];
    assert_eq!(replay.messages.len(), 3);
    assert!(replay.body.get("tools").is_none());
    assert!(replay.system.contains("BEGIN FUNCTION #2: finish"));
    sim.assert_no_violations();
}

#[tokio::test]
async fn constrained_tool_calls_send_a_schema_and_parse_one_call() {
    let reply = r#"{"thought": "List first.", "name": "execute_bash", "arguments": {"command": "ls -la", "timeout": 30}}"#;
    // A server that ignored the schema and wrote a fenced call: still taken.
    let unconstrained = "```json\n{\"name\": \"finish\", \"arguments\": {}}\n```";
    let (base, sim) = LlmSim::builder()
        .lenient()
        .start(Script::turns([
            Turn::text(reply),
            Turn::text(unconstrained),
        ]))
        .await
        .unwrap();
    let p = profile(LlmProvider::OpenAi, &base, FunctionCalling::Constrained);
    let c = client(&p);
    let first = complete(&*c, &simple()).await.unwrap();
    assert_eq!(first.message.content, "List first.");
    assert_eq!(first.message.tool_calls.len(), 1);
    assert_eq!(
        args(&first.message.tool_calls[0]),
        json!({"command": "ls -la", "timeout": 30})
    );
    assert_eq!(first.finish_reason.as_deref(), Some("tool_calls"));
    let second = complete(&*c, &history()).await.unwrap();
    assert_eq!(second.message.tool_calls[0].name, "finish");

    let seen = sim.requests();
    for r in &seen {
        assert!(r.body.get("tools").is_none(), "tools travel in the prompt");
        assert!(r
            .system
            .contains(r#"{"name":"execute_bash","description":"Run a shell command"#));
        let format = &r.body["response_format"];
        assert_eq!(format["type"], "json_schema");
        let variants = format["json_schema"]["schema"]["anyOf"].as_array().unwrap();
        assert_eq!(variants.len(), 2);
        assert_eq!(variants[0]["properties"]["name"]["const"], "execute_bash");
    }
    // Earlier calls come back in the reply format.
    assert!(seen[1].messages[1]
        .text
        .contains(r#""name":"execute_bash","arguments":{"command":"cat README.md"}"#));
    // The first reply matched the schema; the second could not have come
    // from a constraining server, and the simulator says so.
    let violations = sim.violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].contains("request #1"), "{violations:?}");
    assert!(
        violations[0].contains("response_format schema"),
        "{violations:?}"
    );
}

#[tokio::test]
async fn constrained_reply_cut_off_by_the_token_limit_is_no_call() {
    let cut = Reply {
        text: r#"{"thought": "Write it.", "name": "execute_bash", "arguments": {"command": "echo"#
            .into(),
        finish_reason: Some("length".into()),
        ..Reply::default()
    };
    let (base, sim) = LlmSim::builder()
        .lenient()
        .start(Script::turns([Turn::Reply(cut)]))
        .await
        .unwrap();
    let p = profile(LlmProvider::OpenAi, &base, FunctionCalling::Constrained);
    let reply = complete(&*client(&p), &simple()).await.unwrap();
    assert!(reply.message.tool_calls.is_empty());
    assert_eq!(reply.finish_reason.as_deref(), Some("length"));
    assert_eq!(sim.request_count(), 1);
}

async fn retried(format: LlmProvider, faults: Vec<Turn>) -> (LlmResponse, LlmSim) {
    let (reply, sim, _) = retried_with_reports(format, faults).await;
    (reply, sim)
}

/// Like [`retried`], also returning what the client reported of every
/// attempt and retry: the waits it chose, asserted exactly, where wall time
/// would only give a lower bound that a loaded machine makes meaningless.
async fn retried_with_reports(
    format: LlmProvider,
    faults: Vec<Turn>,
) -> (LlmResponse, LlmSim, Vec<AttemptReport>) {
    let n = faults.len();
    let mut turns = faults;
    turns.push(Turn::text("recovered"));
    let (base, sim) = LlmSim::start(Script::turns(turns)).await;
    let p = profile(format, &base, FunctionCalling::Native);
    let (reply, reports) = complete_observed(&*client(&p), &simple()).await;
    let reply = reply.unwrap();
    assert_eq!(reply.message.content, "recovered");
    assert_eq!(reply.attempts as usize, n + 1);
    assert_eq!(sim.request_count(), n + 1);
    sim.assert_no_violations();
    (reply, sim, reports)
}

/// Runs one completion, recording every [`AttemptReport`] the client made.
async fn complete_observed(
    client: &dyn LlmClient,
    request: &LlmRequest,
) -> (Result<LlmResponse, LlmError>, Vec<AttemptReport>) {
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = reports.clone();
    let observer: AttemptObserver = std::sync::Arc::new(move |report| {
        sink.lock().unwrap().push(report);
    });
    let reply = observing_attempts(observer, complete(client, request)).await;
    let reports = reports.lock().unwrap().clone();
    (reply, reports)
}

/// The waits the client chose before each retry.
fn retry_delays(reports: &[AttemptReport]) -> Vec<Duration> {
    reports
        .iter()
        .filter_map(|report| match report {
            AttemptReport::Retry { delay, .. } => Some(*delay),
            AttemptReport::Attempt { .. } => None,
        })
        .collect()
}

fn gap(sim: &LlmSim, from: usize) -> Duration {
    let r = sim.requests();
    r[from + 1].received_at - r[from].received_at
}

#[tokio::test]
async fn rate_limit_retry_after_seconds_is_honoured() {
    for format in [LlmProvider::OpenAi, LlmProvider::Anthropic] {
        let (_, sim, reports) = retried_with_reports(format, vec![Turn::rate_limit_secs(1)]).await;
        // The client waited exactly what the server asked (no jitter added)…
        assert_eq!(retry_delays(&reports), [Duration::from_secs(1)]);
        // …and not much longer (a generous upper bound for a loaded machine).
        let waited = gap(&sim, 0);
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    }
}

#[tokio::test]
async fn rate_limit_retry_after_date_and_ms_are_honoured() {
    let (_, _, reports) = retried_with_reports(
        LlmProvider::OpenAi,
        vec![Turn::rate_limit_until(Duration::from_secs(2))],
    )
    .await;
    // An HTTP date has whole seconds: the wait is in (0s, 2s] depending on
    // where in its second the date was stamped and read.
    let delays = retry_delays(&reports);
    assert_eq!(delays.len(), 1);
    assert!(
        delays[0] > Duration::ZERO && delays[0] <= Duration::from_secs(2),
        "{delays:?}"
    );
    let ms = Turn::RateLimit {
        retry_after: Some("30".into()),
        retry_after_ms: Some(400),
    };
    let (_, _, reports) = retried_with_reports(LlmProvider::Anthropic, vec![ms]).await;
    // retry-after-ms is preferred over Retry-After.
    assert_eq!(retry_delays(&reports), [Duration::from_millis(400)]);
}

#[tokio::test]
async fn server_errors_and_overload_are_retried() {
    retried(
        LlmProvider::OpenAi,
        vec![Turn::ServerError, Turn::Overloaded],
    )
    .await;
    let (_, sim) = retried(
        LlmProvider::Anthropic,
        vec![Turn::Overloaded, Turn::ServerError],
    )
    .await;
    let answered: Vec<String> = sim.requests().into_iter().map(|r| r.answered).collect();
    assert_eq!(answered, ["overloaded", "server_error", "reply"]);
}

#[tokio::test]
async fn truncated_json_is_retried() {
    retried(
        LlmProvider::OpenAi,
        vec![Turn::TruncatedJson { reply: None }],
    )
    .await;
    retried(
        LlmProvider::Anthropic,
        vec![Turn::TruncatedJson { reply: None }],
    )
    .await;
}

#[tokio::test]
async fn a_slow_answer_hits_the_attempt_timeout_then_succeeds() {
    for format in [LlmProvider::OpenAi, LlmProvider::Anthropic] {
        let script = Script::turns([
            Turn::slow(Duration::from_secs(3), Reply::text("too late")),
            Turn::text("in time"),
        ]);
        let (base, sim) = LlmSim::start(script).await;
        let mut p = profile(format, &base, FunctionCalling::Native);
        p.timeout = Duration::from_millis(400);
        let started = Instant::now();
        let (reply, reports) = complete_observed(&*client(&p), &simple()).await;
        let reply = reply.unwrap();
        assert_eq!(reply.message.content, "in time");
        assert_eq!(reply.attempts, 2);
        // The first attempt ended as a timeout, long before the 3 s the slow
        // turn takes (generous bounds: the machine may be loaded).
        let first = reports
            .iter()
            .find_map(|report| match report {
                AttemptReport::Attempt { class, took } => Some((*class, *took)),
                AttemptReport::Retry { .. } => None,
            })
            .expect("an attempt was reported");
        assert_eq!(first.0, Some(LlmErrorKind::Timeout), "{reports:?}");
        assert!(first.1 < Duration::from_millis(2500), "{reports:?}");
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
        sim.assert_no_violations();
    }
}

#[tokio::test]
async fn malformed_tool_arguments_reach_the_loop_unretried() {
    for format in [LlmProvider::OpenAi, LlmProvider::Anthropic] {
        let raw = "{\"command\": \"ls";
        let script = Script::turns([Turn::Reply(
            Reply::default().with_raw_call("execute_bash", raw),
        )]);
        let (base, sim) = LlmSim::start(script).await;
        let p = profile(format, &base, FunctionCalling::Native);
        let reply = complete(&*client(&p), &simple()).await.unwrap();
        assert_eq!(reply.attempts, 1);
        assert_eq!(reply.message.tool_calls[0].arguments, raw);
        assert!(serde_json::from_str::<Value>(&reply.message.tool_calls[0].arguments).is_err());
        sim.assert_no_violations();
    }
}

async fn failed(format: LlmProvider, turn: Turn) -> (LlmError, LlmSim) {
    let (base, sim) = LlmSim::start(Script::turns([turn, Turn::text("must not be reached")])).await;
    let p = profile(format, &base, FunctionCalling::Native);
    let error = complete(&*client(&p), &simple()).await.unwrap_err();
    (error, sim)
}

#[tokio::test]
async fn context_window_overflow_is_classified_and_not_retried() {
    let cases = [
        (LlmProvider::OpenAi, Turn::context_window_exceeded()),
        (
            LlmProvider::OpenAi,
            Turn::ContextWindowExceeded { llama_cpp: true },
        ),
        (LlmProvider::Anthropic, Turn::context_window_exceeded()),
    ];
    for (format, turn) in cases {
        let (error, sim) = failed(format, turn).await;
        assert_eq!(error.kind, LlmErrorKind::ContextWindowExceeded, "{error}");
        assert_eq!(error.status, Some(400));
        assert_eq!(sim.request_count(), 1);
        sim.assert_no_violations();
    }
}

#[tokio::test]
async fn a_bad_key_is_auth_and_not_retried() {
    for format in [LlmProvider::OpenAi, LlmProvider::Anthropic] {
        let (base, sim) = LlmSim::builder()
            .api_key("right-key")
            .start(Script::echo())
            .await
            .unwrap();
        let p = profile(format, &base, FunctionCalling::Native);
        let wrong = "wrong-key-123456";
        let c: Box<dyn LlmClient> = match format {
            LlmProvider::OpenAi => Box::new(
                shoal_worker::agent::llm::OpenAiClient::new(&p, Some(wrong.into()))
                    .unwrap()
                    .with_retry_policy(policy(3, p.timeout)),
            ),
            LlmProvider::Anthropic => Box::new(
                shoal_worker::agent::llm::AnthropicClient::new(&p, Some(wrong.into()))
                    .unwrap()
                    .with_retry_policy(policy(3, p.timeout)),
            ),
        };
        let error = complete(&*c, &simple()).await.unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::Auth);
        assert_eq!(error.status, Some(401));
        assert!(!error.message.contains(wrong));
        assert_eq!(sim.request_count(), 1);
        sim.assert_no_violations();
    }
    let (error, _) = failed(LlmProvider::Anthropic, Turn::status(403)).await;
    assert_eq!(error.kind, LlmErrorKind::Auth);
}

#[tokio::test]
async fn retries_stop_after_max_retries() {
    let (base, sim) = LlmSim::start(Script::turns(vec![Turn::ServerError; 6])).await;
    let mut p = profile(LlmProvider::OpenAi, &base, FunctionCalling::Native);
    p.max_retries = 2;
    let error = complete(&*client(&p), &simple()).await.unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::Server);
    assert_eq!(error.status, Some(500));
    assert_eq!(sim.request_count(), 3);
    let (error, sim) = failed(LlmProvider::OpenAi, Turn::status(404)).await;
    assert_eq!(error.kind, LlmErrorKind::BadRequest);
    assert_eq!(sim.request_count(), 1);
}

#[tokio::test]
async fn cancel_aborts_a_slow_call_and_a_retry_wait_promptly() {
    let cases = [
        Turn::slow(Duration::from_secs(10), Reply::text("never")),
        Turn::rate_limit_secs(4),
    ];
    for turn in cases {
        let (base, sim) = LlmSim::start(Script::turns([turn, Turn::text("never")])).await;
        let p = profile(LlmProvider::Anthropic, &base, FunctionCalling::Native);
        let c = client(&p);
        let cancel = CancellationToken::new();
        let canceller = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            canceller.cancel();
        });
        let started = Instant::now();
        let error = c.complete(&simple(), &cancel).await.unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::Cancelled);
        // Well before the 10 s answer or the 4 s Retry-After would end
        // (generous: the machine may be loaded).
        assert!(
            started.elapsed() < Duration::from_millis(3500),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(sim.request_count(), 1);
    }
    // Already cancelled: nothing is sent.
    let (base, sim) = LlmSim::start(Script::echo()).await;
    let c = client(&profile(
        LlmProvider::OpenAi,
        &base,
        FunctionCalling::Native,
    ));
    let cancel = CancellationToken::new();
    cancel.cancel();
    let error = c.complete(&simple(), &cancel).await.unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::Cancelled);
    assert_eq!(sim.request_count(), 0);
}

#[tokio::test]
async fn client_for_reads_the_key_from_the_environment() {
    let var = "SHOAL_TEST_LLM_SIM_KEY";
    let (base, sim) = LlmSim::builder()
        .api_key("env-key")
        .start(Script::echo())
        .await
        .unwrap();
    let mut p = profile(LlmProvider::OpenAi, &base, FunctionCalling::Native);
    p.api_key_env = Some(var.into());
    let error = client_for(&p).err().expect("no key, no client");
    assert_eq!(error.kind, LlmErrorKind::Auth);
    assert!(error.message.contains(var));
    // nextest runs each test in its own process, so this touches no other test.
    std::env::set_var(var, "env-key");
    let c = client_for(&p).unwrap();
    assert_eq!(c.model(), "gpt-4o-mini");
    let reply = complete(&*c, &simple()).await.unwrap();
    assert_eq!(reply.message.content, "echo: List the files.");
    sim.assert_no_violations();
}

#[tokio::test]
async fn fixed_latency_is_applied() {
    // Proven by the client's own attempt timer, not by measuring wall time:
    // with a 5 s latency a 300 ms attempt times out; the same client gets
    // its answer once the latency is gone.
    let (base, sim) = LlmSim::builder()
        .latency(Duration::from_secs(5))
        .start(Script::echo())
        .await
        .unwrap();
    let mut p = profile(LlmProvider::OpenAi, &base, FunctionCalling::Native);
    p.max_retries = 0;
    p.timeout = Duration::from_millis(300);
    let c = client(&p);
    let error = complete(&*c, &simple()).await.unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::Timeout, "{error}");
    sim.set_latency(Duration::ZERO);
    let mut p = p.clone();
    p.timeout = Duration::from_secs(30);
    let reply = complete(&*client(&p), &simple()).await.unwrap();
    assert_eq!(reply.message.content, "echo: List the files.");
    sim.assert_no_violations();
}

/// A tiny agent loop driven by rules: the simulator answers from the
/// conversation, as other engineers' loop tests will use it.
#[tokio::test]
async fn rules_and_functions_drive_an_agent_loop() {
    for format in [LlmProvider::OpenAi, LlmProvider::Anthropic] {
        let script = Script::rules([
            Rule::new(
                Matcher::NoToolResults,
                Turn::tool_call("execute_bash", json!({"command": "echo hello"})),
            ),
            Rule::new(
                Matcher::LastToolResultContains("hello".into()),
                Turn::tool_call("finish", json!({})),
            ),
        ])
        .with_fallback(Turn::text("I am lost."));
        let (base, sim) = LlmSim::start(script).await;
        let c = client(&profile(format, &base, FunctionCalling::Native));
        let mut conversation = simple();
        let mut finished = false;
        for _ in 0..5 {
            let reply = complete(&*c, &conversation).await.unwrap();
            let calls = reply.message.tool_calls.clone();
            conversation.messages.push(reply.message);
            let Some(call) = calls.first() else { break };
            if call.name == "finish" {
                finished = true;
                break;
            }
            let output = if args(call)["command"] == "echo hello" {
                "hello\n"
            } else {
                "?"
            };
            conversation
                .messages
                .push(ChatMessage::tool_result(&call.id, output));
        }
        assert!(finished);
        assert_eq!(sim.request_count(), 2);
        sim.assert_no_violations();
    }
    // A function of the request.
    let script = Script::from_fn(|r| Some(Turn::text(format!("{} messages", r.messages.len()))));
    let (base, sim) = LlmSim::start(script).await;
    let c = client(&profile(
        LlmProvider::Anthropic,
        &base,
        FunctionCalling::Native,
    ));
    assert_eq!(
        complete(&*c, &history()).await.unwrap().message.content,
        "3 messages"
    );
    sim.assert_no_violations();
}

/// The validator catches what the real APIs refuse (so "no violations"
/// means something), and refuses the request as they would.
#[tokio::test]
async fn the_simulator_records_invalid_requests() {
    let (base, sim) = LlmSim::start(Script::echo()).await;
    let http = reqwest::Client::new();
    let bad_anthropic = json!({
        "model": "claude",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]},
            {"role": "assistant", "content": [{"type": "text", "text": " "}]}
        ]
    });
    let response = http
        .post(format!("{base}/messages"))
        .json(&bad_anthropic)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let bad_openai = json!({
        "model": "gpt",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
            ]},
            {"role": "user", "content": "and?"}
        ]
    });
    let response = http
        .post(format!("{base}/chat/completions"))
        .json(&bad_openai)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let violations = sim.violations().join("\n");
    for expected in [
        "anthropic-version",
        "`max_tokens` is required",
        "roles must alternate",
        "answers no tool_use",
        "non-whitespace text",
        "arguments must be a string",
        "were not answered",
    ] {
        assert!(
            violations.contains(expected),
            "missing {expected:?} in:\n{violations}"
        );
    }
    assert!(sim.requests().iter().all(|r| r.answered == "invalid"));
}

#[tokio::test]
async fn the_binary_serves_a_json_script() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let script = json!({
        "latency_ms": 5,
        "turns": [
            {"kind": "server_error"},
            {"kind": "reply", "text": "hi", "usage": {"input": 7, "output": 3, "cache_read": 2}}
        ],
        "rules": [{"when": {"last_user_contains": "ping"}, "then": {"kind": "reply", "text": "pong"}}]
    });
    let path = std::env::temp_dir().join(format!("shoal-llm-sim-{}.json", std::process::id()));
    std::fs::write(&path, script.to_string()).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shoal-llm-sim"))
        .arg("--script")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut base = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(rest) = line.trim().strip_prefix("OpenAI-compatible base_url: ") {
            base = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    let base = base.expect("the binary prints its base URL");
    let c = client(&profile(
        LlmProvider::OpenAi,
        &base,
        FunctionCalling::Native,
    ));
    let reply = complete(&*c, &simple()).await.unwrap();
    assert_eq!(reply.message.content, "hi");
    assert_eq!(reply.attempts, 2);
    assert_eq!(reply.usage.prompt_tokens, 7);
    assert_eq!(reply.usage.cache_read_tokens, 2);
    let ping = request(vec![ChatMessage::user("ping")]);
    assert_eq!(complete(&*c, &ping).await.unwrap().message.content, "pong");
    child.kill().await.unwrap();
    let _ = std::fs::remove_file(&path);
}
