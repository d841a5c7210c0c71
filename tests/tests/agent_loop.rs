//! The conversation loop against a real bubblewrap sandbox, driven by a
//! scripted LLM: the event sequence, every termination condition, the stuck
//! patterns, malformed tool calls, condensation and secret masking.

use std::time::Duration;

use serde_json::json;
use shoal_shared::cost::{MicroDollars, Prices};
use shoal_shared::event::Event;
use shoal_shared::task::{AgentResult, TaskId};
use shoal_tests::local_fixture::OneSandbox;
use shoal_tests::scripted_llm::{call, raw_call, text, ScriptedLlm, Turn};
use shoal_worker::agent::llm::{LlmError, LlmErrorKind};
use shoal_worker::agent::secrets::Masker;
use shoal_worker::agent::sink::MemorySink;
use shoal_worker::agent::tools::Toolbox;
use shoal_worker::agent::{AgentConfig, Billing, Conversation};
use tokio_util::sync::CancellationToken;

/// $3 per million prompt tokens, $15 per million completion tokens: each
/// scripted call (1000 + 100 tokens) costs 3000 + 1500 = 4500 micro-dollars.
const PER_CALL: u64 = 4500;

/// One sandbox of a fixture of this suite's own.
struct Bench(OneSandbox);

impl Bench {
    async fn new(name: &str) -> Self {
        Self(OneSandbox::new("agent", name, 300000).await)
    }

    async fn finish(self) {
        self.0.finish().await;
    }
}

fn config() -> AgentConfig {
    AgentConfig {
        max_iterations: 50,
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

async fn converse(
    bench: &Bench,
    llm: &ScriptedLlm,
    sink: &MemorySink,
    config: AgentConfig,
    masker: Masker,
    env: Vec<(String, String)>,
    cancel: CancellationToken,
) -> AgentResult {
    Conversation {
        llm,
        sandbox: &*bench.0.sandbox,
        sink,
        toolbox: Toolbox::new(&[]).expect("tools"),
        masker,
        env,
        config,
        billing: Billing {
            task_id: TaskId::new(),
            tenant: "acme".into(),
        },
        cancel,
        tenant_budget: None,
    }
    .run("Write hello.py that prints hello, run it, and report the output.")
    .await
}

fn kinds(sink: &MemorySink) -> Vec<String> {
    sink.events
        .lock()
        .expect("events")
        .iter()
        .map(|e| e.type_name().to_owned())
        .filter(|k| k != "llm_call")
        .collect()
}

/// Every action has exactly one observation or agent error.
fn assert_actions_answered(sink: &MemorySink) {
    let events = sink.events.lock().expect("events");
    for event in events.iter() {
        if let Event::Action { action_id, .. } = event {
            let answers = events
                .iter()
                .filter(|e| match e {
                    Event::Observation { action_id: a, .. } => a == action_id,
                    Event::AgentError {
                        action_id: Some(a), ..
                    } => a == action_id,
                    _ => false,
                })
                .count();
            assert_eq!(answers, 1, "action {action_id} has {answers} answers");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_step_task_runs_in_the_sandbox_and_costs_add_up() {
    let bench = Bench::new("steps").await;
    let llm = ScriptedLlm::new(vec![
        Turn::Reply(call(
            "c1",
            "file_editor",
            json!({"command": "create", "path": "/workspace/hello.py", "file_text": "print('hello')\n"}),
        )),
        Turn::Reply(call(
            "c2",
            "terminal",
            json!({"command": "python3 hello.py"}),
        )),
        Turn::Reply(call(
            "c3",
            "finish",
            json!({"message": "The output is: hello"}),
        )),
    ]);
    let sink = MemorySink::default();
    let result = converse(
        &bench,
        &llm,
        &sink,
        config(),
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "finished");
    assert_eq!(result.message.as_deref(), Some("The output is: hello"));
    assert_eq!(result.steps, 3);
    assert_eq!(
        kinds(&sink),
        [
            "system_prompt",
            "message",
            "action",
            "observation",
            "action",
            "observation",
            "action",
            "observation",
            "conversation_finished"
        ]
    );
    let events = sink.events.lock().expect("events").clone();
    let run = events
        .iter()
        .find_map(|e| match e {
            Event::Observation {
                tool,
                content,
                exit_code,
                ..
            } if tool == "terminal" => Some((content.clone(), *exit_code)),
            _ => None,
        })
        .expect("terminal observation");
    assert!(run.0.starts_with("hello\n"), "{}", run.0);
    assert_eq!(run.1, Some(0));
    assert_eq!(
        bench.0.sandbox.read_file("hello.py").await.expect("file"),
        b"print('hello')\n"
    );
    // Totals equal the sum of the cost stream, in integer micro-dollars.
    let costs = sink.costs.lock().expect("costs").clone();
    assert_eq!(costs.len(), 3);
    let sum: u64 = costs.iter().map(|c| c.cost_micros).sum();
    assert_eq!(sum, result.cost_micros);
    assert_eq!(result.cost_micros, 3 * PER_CALL);
    assert_eq!(result.usage.prompt_tokens, 3000);
    assert!(costs.iter().all(|c| c.tenant == "acme"));
    // The model saw the tool results.
    let requests = llm.seen();
    let last = requests.last().expect("request");
    assert!(last.messages.iter().any(|m| m.content.contains("hello")));
    assert_actions_answered(&sink);
    bench.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_ends_on_a_plain_answer_max_iterations_and_the_budget() {
    let bench = Bench::new("limits").await;

    let llm = ScriptedLlm::new(vec![Turn::Reply(text("The answer is 42."))]);
    let sink = MemorySink::default();
    let result = converse(
        &bench,
        &llm,
        &sink,
        config(),
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "answered");
    assert_eq!(result.message.as_deref(), Some("The answer is 42."));

    // Different commands each time: never stuck, stopped by the iteration cap.
    let turns = (0..20)
        .map(|i| {
            Turn::Reply(call(
                &format!("c{i}"),
                "terminal",
                json!({"command": format!("echo {i}")}),
            ))
        })
        .collect();
    let llm = ScriptedLlm::new(turns);
    let sink = MemorySink::default();
    let mut limited = config();
    limited.max_iterations = 4;
    let result = converse(
        &bench,
        &llm,
        &sink,
        limited,
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "max_iterations");
    assert_eq!(result.steps, 4);
    assert_eq!(llm.request_count(), 4);

    // Budget of 2.5 calls: the third call crosses it and is the last one made.
    let turns = (0..20)
        .map(|i| {
            Turn::Reply(call(
                &format!("b{i}"),
                "think",
                json!({"thought": format!("step {i}")}),
            ))
        })
        .collect();
    let llm = ScriptedLlm::new(turns);
    let sink = MemorySink::default();
    let mut budget = config();
    budget.max_cost = Some(MicroDollars(PER_CALL * 5 / 2));
    let result = converse(
        &bench,
        &llm,
        &sink,
        budget,
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "budget_exceeded");
    assert_eq!(llm.request_count(), 3, "overshoot is at most one call");
    assert!(result.cost_micros <= PER_CALL * 5 / 2 + PER_CALL);
    assert_actions_answered(&sink);
    bench.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_cancel_interrupt_a_running_tool_and_answer_its_action() {
    let bench = Bench::new("interrupt").await;
    let mut short = config();
    short.timeout = Duration::from_secs(2);
    short.no_output_timeout = Duration::from_secs(30);
    let llm = ScriptedLlm::new(vec![Turn::Reply(call(
        "t1",
        "terminal",
        json!({"command": "sleep 60"}),
    ))]);
    let sink = MemorySink::default();
    let started = std::time::Instant::now();
    let result = converse(
        &bench,
        &llm,
        &sink,
        short,
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "timed_out");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_actions_answered(&sink);

    let llm = ScriptedLlm::new(vec![Turn::Reply(call(
        "k1",
        "terminal",
        json!({"command": "sleep 60"}),
    ))]);
    let sink = MemorySink::default();
    let cancel = CancellationToken::new();
    // Cancelled once the command is running (its action recorded), not
    // after a guessed sleep.
    let action_started = async {
        shoal_tests::wait_until(
            "the sleep action is recorded",
            Duration::from_secs(30),
            || {
                std::future::ready(
                    sink.events
                        .lock()
                        .expect("events")
                        .iter()
                        .any(|e| matches!(e, Event::Action { .. }))
                        .then_some(()),
                )
            },
        )
        .await;
        cancel.cancel();
    };
    let (result, ()) = tokio::join!(
        converse(
            &bench,
            &llm,
            &sink,
            config(),
            Masker::default(),
            vec![],
            cancel.clone(),
        ),
        action_started
    );
    assert_eq!(result.outcome, "cancelled");
    assert_actions_answered(&sink);

    // Cancel while the LLM call is in flight.
    let llm = ScriptedLlm::new(vec![Turn::Slow(Duration::from_secs(60), text("late"))]);
    let sink = MemorySink::default();
    let cancel = CancellationToken::new();
    let call_started = async {
        shoal_tests::wait_until("the LLM call is in flight", Duration::from_secs(30), || {
            std::future::ready((llm.request_count() >= 1).then_some(()))
        })
        .await;
        cancel.cancel();
    };
    let (result, ()) = tokio::join!(
        converse(
            &bench,
            &llm,
            &sink,
            config(),
            Masker::default(),
            vec![],
            cancel.clone(),
        ),
        call_started
    );
    assert_eq!(result.outcome, "cancelled");
    bench.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stuck_patterns_stop_the_conversation() {
    let bench = Bench::new("stuck").await;

    // Same action, same result, 4 times.
    let llm = ScriptedLlm::repeating(
        vec![],
        call("s", "terminal", json!({"command": "echo same"})),
    );
    let sink = MemorySink::default();
    let result = converse(
        &bench,
        &llm,
        &sink,
        config(),
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "stuck");
    assert_eq!(result.steps, 4);

    // Same error: a nudge at 3, stuck at 4.
    let llm = ScriptedLlm::repeating(
        vec![],
        call(
            "e",
            "file_editor",
            json!({"command": "view", "path": "/workspace/missing.txt"}),
        ),
    );
    let sink = MemorySink::default();
    let result = converse(
        &bench,
        &llm,
        &sink,
        config(),
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "stuck");
    let nudges = sink
        .events
        .lock()
        .expect("events")
        .iter()
        .filter(|e| matches!(e, Event::Message { role, content } if role == "user" && content.contains("3 times")))
        .count();
    assert_eq!(nudges, 1);
    assert_eq!(result.steps, 4);

    // Monologue: with nudging on, 3 plain replies in a row.
    let llm = ScriptedLlm::repeating(vec![], text("I am thinking about it."));
    let sink = MemorySink::default();
    let mut nudging = config();
    nudging.nudge_plain_text = true;
    let result = converse(
        &bench,
        &llm,
        &sink,
        nudging,
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "stuck");
    assert_eq!(result.steps, 3);

    // A/B alternation over 6 steps.
    let turns = (0..10)
        .map(|i| {
            let command = if i % 2 == 0 { "echo a" } else { "echo b" };
            Turn::Reply(call(
                &format!("ab{i}"),
                "terminal",
                json!({"command": command}),
            ))
        })
        .collect();
    let llm = ScriptedLlm::new(turns);
    let sink = MemorySink::default();
    let result = converse(
        &bench,
        &llm,
        &sink,
        config(),
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "stuck");
    assert_eq!(result.steps, 6);
    bench.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tool_calls_go_back_to_the_model_which_corrects_them() {
    let bench = Bench::new("malformed").await;
    let llm = ScriptedLlm::new(vec![
        Turn::Reply(call("m1", "browser", json!({"url": "x"}))),
        Turn::Reply(raw_call("m2", "terminal", "{\"command\": \"echo hi\"")),
        Turn::Reply(call("m3", "terminal", json!({"cmd": "echo hi"}))),
        Turn::Reply(call(
            "m4",
            "file_editor",
            json!({"command": "fly", "path": "/workspace"}),
        )),
        Turn::Reply(call("m5", "execute_bash", json!({"command": "echo fixed"}))),
        Turn::Reply(call("m6", "finish", json!({"message": "done"}))),
    ]);
    let sink = MemorySink::default();
    let result = converse(
        &bench,
        &llm,
        &sink,
        config(),
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "finished");
    let events = sink.events.lock().expect("events").clone();
    let errors: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::AgentError { error, .. } => Some(error.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors[0].contains("does not exist"));
    assert!(errors[1].contains("not valid JSON"));
    assert!(errors[2].contains("missing required argument `command`"));
    assert!(errors[3].contains("unknown command"));
    // The model saw each error as the tool's answer.
    let requests = llm.seen();
    let seen = &requests[4].messages;
    assert_eq!(
        seen.iter()
            .filter(|m| m.content.starts_with("ERROR:"))
            .count(),
        4
    );
    assert!(events.iter().any(|e| matches!(e, Event::Observation { tool, content, .. } if tool == "terminal" && content.starts_with("fixed"))));
    assert_actions_answered(&sink);
    bench.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_and_a_context_window_error_are_condensed() {
    let bench = Bench::new("condense").await;
    let mut turns: Vec<Turn> = (0..8)
        .map(|i| Turn::Reply(call(&format!("l{i}"), "terminal", json!({"command": format!("head -c 3000 /dev/zero | tr '\\\\0' {}", (b'a' + i as u8) as char)}))))
        .collect();
    // The window overflows once; the loop condenses (one summarising call) and retries.
    turns.push(Turn::Fail(LlmError::new(
        LlmErrorKind::ContextWindowExceeded,
        "prompt is too long",
    )));
    turns.push(Turn::Reply(text(
        "summary: printed eight blocks of letters",
    )));
    turns.push(Turn::Reply(call(
        "done",
        "finish",
        json!({"message": "ok"}),
    )));
    let llm = ScriptedLlm::new(turns);
    let sink = MemorySink::default();
    let result = converse(
        &bench,
        &llm,
        &sink,
        config(),
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "finished");
    let events = sink.events.lock().expect("events").clone();
    let condensation = events
        .iter()
        .find_map(|e| match e {
            Event::Condensation {
                summary,
                forgotten_messages,
            } => Some((summary.clone(), *forgotten_messages)),
            _ => None,
        })
        .expect("a condensation");
    assert!(condensation.0.contains("eight blocks"));
    assert!(condensation.1 > 0);
    // The request after condensing is smaller and keeps prompt and task.
    let requests = llm.seen();
    let last = requests.last().expect("request");
    assert!(last.messages[1]
        .content
        .contains("Summary of earlier steps"));
    assert!(last.messages.len() < requests[8].messages.len());
    // Every tool result in the condensed history follows its call.
    for (i, message) in last.messages.iter().enumerate() {
        if let Some(id) = &message.tool_call_id {
            assert!(
                last.messages[..i]
                    .iter()
                    .any(|m| m.tool_calls.iter().any(|c| &c.id == id)),
                "orphaned result {id}"
            );
        }
    }
    bench.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_the_sandbox_but_never_an_event_or_the_cost_stream() {
    let bench = Bench::new("secret").await;
    let secret = format!("tok-{}", uuid::Uuid::now_v7().simple());
    let llm = ScriptedLlm::new(vec![
        Turn::Reply(call(
            "s1",
            "terminal",
            json!({"command": "echo token=$DEPLOY_TOKEN; test \"$DEPLOY_TOKEN\" = \"$DEPLOY_TOKEN\" && echo set"}),
        )),
        Turn::Reply(call(
            "s2",
            "finish",
            json!({"message": format!("I used {secret}")}),
        )),
    ]);
    let sink = MemorySink::default();
    let masker = Masker::new(vec![(secret.clone(), "DEPLOY_TOKEN".into())]);
    let env = vec![("DEPLOY_TOKEN".to_owned(), secret.clone())];
    let result = converse(
        &bench,
        &llm,
        &sink,
        config(),
        masker,
        env,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "finished");
    let events = sink.events.lock().expect("events").clone();
    let observed = events
        .iter()
        .find_map(|e| match e {
            Event::Observation { tool, content, .. } if tool == "terminal" => Some(content.clone()),
            _ => None,
        })
        .expect("observation");
    assert!(
        observed.contains("token=<secret:DEPLOY_TOKEN>"),
        "{observed}"
    );
    assert!(observed.contains("set"));
    let everything = serde_json::to_string(
        &events
            .iter()
            .map(|e| serde_json::to_value(e).expect("json"))
            .collect::<Vec<_>>(),
    )
    .expect("json");
    assert!(
        !everything.contains(&secret),
        "the secret leaked into events"
    );
    assert!(!format!("{:?}", sink.costs.lock().expect("costs")).contains(&secret));
    assert!(!result.message.unwrap_or_default().contains(&secret));
    // The model never saw it either.
    let requests = format!("{:?}", llm.seen());
    assert!(!requests.contains(&secret));
    bench.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_past_the_size_threshold_is_condensed_without_an_error() {
    let bench = Bench::new("threshold").await;
    let mut turns: Vec<Turn> = (0..10)
        .map(|i| Turn::Reply(call(&format!("h{i}"), "terminal", json!({"command": format!("head -c 2000 /dev/zero | tr '\\\\0' {}", (b'a' + i as u8) as char)}))))
        .collect();
    turns.push(Turn::Reply(text("summary of ten commands")));
    turns.push(Turn::Reply(call("end", "finish", json!({"message": "ok"}))));
    let llm = ScriptedLlm::new(turns);
    let sink = MemorySink::default();
    let mut small = config();
    // Ten observations of ~2,100 characters each cross it after the tenth command.
    small.condense_chars = 21_500;
    let result = converse(
        &bench,
        &llm,
        &sink,
        small,
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "finished");
    let condensations = sink
        .events
        .lock()
        .expect("events")
        .iter()
        .filter(|e| matches!(e, Event::Condensation { .. }))
        .count();
    assert_eq!(condensations, 1);
    // The summarising call is paid for like any other.
    assert_eq!(sink.costs.lock().expect("costs").len(), 12);
    let last = llm.seen().last().cloned().expect("request");
    assert!(shoal_worker::agent::condenser::size(&last.messages) < 21_500);
    bench.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_without_a_message_takes_the_text_beside_the_call() {
    let bench = Bench::new("finishtext").await;
    let mut reply = call("f1", "finish", json!({}));
    reply.message.content = "The output is 0 1 1 2 3".into();
    let llm = ScriptedLlm::new(vec![Turn::Reply(reply)]);
    let sink = MemorySink::default();
    let result = converse(
        &bench,
        &llm,
        &sink,
        config(),
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "finished");
    assert_eq!(result.message.as_deref(), Some("The output is 0 1 1 2 3"));
    // Without any text the call is still an error the model must fix.
    let llm = ScriptedLlm::new(vec![
        Turn::Reply(call("f2", "finish", json!({}))),
        Turn::Reply(call("f3", "finish", json!({"message": "fixed"}))),
    ]);
    let sink = MemorySink::default();
    let result = converse(
        &bench,
        &llm,
        &sink,
        config(),
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.message.as_deref(), Some("fixed"));
    bench.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_of_several_broken_calls_repeated_is_stuck() {
    // Seen with a 1.5B local model: the same three malformed calls per reply.
    let bench = Bench::new("cycle").await;
    let mut reply = call("x1", "file_editor", json!({}));
    for (id, tool) in [("x2", "terminal"), ("x3", "finish")] {
        reply
            .message
            .tool_calls
            .push(shoal_worker::agent::llm::ToolCall {
                id: id.into(),
                name: tool.into(),
                arguments: "{}".into(),
            });
    }
    let llm = ScriptedLlm::repeating(vec![], reply);
    let sink = MemorySink::default();
    let result = converse(
        &bench,
        &llm,
        &sink,
        config(),
        Masker::default(),
        vec![],
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.outcome, "stuck");
    assert_eq!(
        result.steps, 4,
        "nudged at 3 identical failing replies, stopped at 4"
    );
    bench.finish().await;
}
