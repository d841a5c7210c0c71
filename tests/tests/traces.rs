//! OpenTelemetry traces across the queue (ADR 0025): the real `shoal-scheduler`
//! and `shoal-worker` binaries run as child processes with the standard
//! `OTEL_*` variables and export OTLP/HTTP protobuf to a receiver in this test,
//! which decodes the real wire format (`opentelemetry-proto`'s prost types).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use serde_json::json;
use shoal_scheduler::client::Client;
use shoal_shared::store::LeaseAttempt;
use shoal_shared::task::{AgentSpec, TaskId, TaskKind, TaskSpec, TaskState};
use shoal_tests::llm_sim::{LlmSim, Script, Turn};
use shoal_tests::process::{free_port, wait_ready, write_config, ChildProcess, Launch};
use shoal_tests::wait::wait_until;
use shoal_tests::TestEnv;

/// One received span, flattened.
#[derive(Debug, Clone)]
struct SpanRec {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

#[derive(Default)]
struct Received {
    requests: usize,
    spans: Vec<SpanRec>,
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf
/// `ExportTraceServiceRequest`.
struct Receiver {
    url: String,
    received: Arc<Mutex<Received>>,
}

fn text_of(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(n)) => n.to_string(),
        Some(Value::DoubleValue(n)) => n.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                text_of(kv.value.as_ref().and_then(|v| v.value.as_ref())),
            )
        })
        .collect()
}

async fn traces(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("a valid OTLP protobuf body");
    let mut received = received.lock().unwrap();
    received.requests += 1;
    for resource_spans in request.resource_spans {
        let resource = attributes(
            &resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default(),
        );
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.spans.push(SpanRec {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: span.trace_id.clone(),
                    span_id: span.span_id.clone(),
                    parent_span_id: span.parent_span_id.clone(),
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse: full success.
    Vec::new()
}

impl Receiver {
    /// A receiver on a free port.
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the OTLP receiver binds a free port");
        Self::serve(listener)
    }

    /// A receiver on the SDK's default port 4318, waiting (bounded) while
    /// another run on this machine holds it.
    async fn start_on_default_port() -> Self {
        let listener = wait_until(
            "port 4318 to be free for the OTLP receiver",
            Duration::from_secs(300),
            || async { tokio::net::TcpListener::bind("127.0.0.1:4318").await.ok() },
        )
        .await;
        Self::serve(listener)
    }

    fn serve(listener: tokio::net::TcpListener) -> Self {
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let received = Arc::new(Mutex::new(Received::default()));
        let app = axum::Router::new()
            .route("/v1/traces", post(traces))
            .with_state(received.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, received }
    }

    fn requests(&self) -> usize {
        self.received.lock().unwrap().requests
    }

    fn spans(&self) -> Vec<SpanRec> {
        self.received.lock().unwrap().spans.clone()
    }

    /// Waits until `check` finds what it wants among the spans received.
    async fn wait_for<T>(&self, what: &str, check: impl Fn(&[SpanRec]) -> Option<T>) -> T {
        wait_until(what, Duration::from_secs(120), || {
            let found = check(&self.spans());
            async move { found }
        })
        .await
    }
}

/// The scheduler and a worker as child processes of this test.
struct Fleet {
    url: String,
    children: Vec<ChildProcess>,
}

impl Fleet {
    /// Starts both binaries on `env`'s namespace; `endpoint` is the OTLP
    /// endpoint (`None`: no OTLP variable at all). `extra` is appended to the
    /// configuration.
    async fn start(env: &TestEnv, endpoint: Option<&str>, extra: &str) -> Self {
        Self::start_with(env, endpoint, extra, &[], false).await
    }

    /// [`Fleet::start`] with more environment variables for both binaries;
    /// `log_to_files` sends each binary's stderr to `<binary>.log` in the
    /// sandbox root (see [`Fleet::log`]) instead of the test's.
    async fn start_with(
        env: &TestEnv,
        endpoint: Option<&str>,
        extra: &str,
        vars: &[(&str, &str)],
        log_to_files: bool,
    ) -> Self {
        let port = free_port();
        let config = write_config(
            env,
            "traced.toml",
            &format!(
                "worker.idle_sweep_ms = 50\n\
                 worker.id = \"traced\"\n\
                 worker.slots = 1\n\
                 scheduler.listen = \"127.0.0.1:{port}\"\n{extra}"
            ),
        );
        let mut children = Vec::new();
        for binary in ["shoal-scheduler", "shoal-worker"] {
            let mut launch = Launch::new(binary, &config).env("OTEL_BSP_SCHEDULE_DELAY", "200");
            if log_to_files {
                launch = launch.stderr_to(&Self::log_path(env, binary));
            }
            if let Some(endpoint) = endpoint {
                launch = launch.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
            }
            for (key, value) in vars {
                launch = launch.env(key, value);
            }
            children.push(launch.spawn());
        }
        let url = format!("http://127.0.0.1:{port}");
        wait_ready(&url).await;
        Self { url, children }
    }

    fn log_path(env: &TestEnv, binary: &str) -> PathBuf {
        env.settings.sandbox.root.join(format!("{binary}.log"))
    }

    /// What `binary` wrote to its log file (started with `log_to_files`).
    fn log(env: &TestEnv, binary: &str) -> String {
        std::fs::read_to_string(Self::log_path(env, binary)).expect("the binary's log file")
    }

    /// SIGTERM to both, then waits for them to exit (the trace guard flushes).
    async fn stop(mut self) {
        for child in &self.children {
            child.sigterm();
        }
        for child in &mut self.children {
            let status = child
                .wait_exit(Duration::from_secs(90))
                .await
                .unwrap_or_else(|| panic!("{} did not exit within 90 s", child.name()));
            assert!(status.success(), "{} exited with {status}", child.name());
        }
    }
}

fn run_spans<'a>(spans: &'a [SpanRec], id: &TaskId) -> Vec<&'a SpanRec> {
    spans
        .iter()
        .filter(|s| s.name == "task.run" && s.attributes.get("task_id") == Some(&id.to_string()))
        .collect()
}

fn publish_span<'a>(spans: &'a [SpanRec], id: &TaskId) -> Option<&'a SpanRec> {
    spans
        .iter()
        .find(|s| s.name == "publish" && s.attributes.get("task_id") == Some(&id.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_task_is_one_trace_across_scheduler_and_worker() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new("traces-exec", "").await;
    let fleet = Fleet::start_with(
        &env,
        Some(&receiver.url),
        "telemetry.log_format = \"json\"",
        &[],
        true,
    )
    .await;
    let client = Client::new(&fleet.url, None);
    let record = client
        .submit(&TaskSpec::exec("echo traced"), None)
        .await
        .expect("submit");
    let done = env
        .wait_terminal(&record.id, Duration::from_secs(120))
        .await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);

    let id = record.id;
    let (publish, run) = receiver
        .wait_for("the publish and task.run spans", |spans| {
            let publish = publish_span(spans, &id)?.clone();
            let run = (*run_spans(spans, &id).first()?).clone();
            Some((publish, run))
        })
        .await;
    assert_eq!(publish.service, "shoal-scheduler");
    assert_eq!(run.service, "shoal-worker");
    assert_eq!(run.trace_id, publish.trace_id, "one trace across the queue");
    assert_eq!(
        run.parent_span_id, publish.span_id,
        "the worker's run is a child of the scheduler's publish span"
    );
    // The publish span is a child of the submit request's span.
    let spans = receiver
        .wait_for("the submit and sandbox.lease spans", |spans| {
            let has = |name: &str| {
                spans
                    .iter()
                    .any(|s| s.name == name && s.trace_id == publish.trace_id)
            };
            (has("submit") && has("sandbox.lease")).then(|| spans.to_vec())
        })
        .await;
    let submit = spans
        .iter()
        .find(|s| s.name == "submit" && s.trace_id == publish.trace_id)
        .expect("submit span");
    assert_eq!(publish.parent_span_id, submit.span_id);
    let lease = spans
        .iter()
        .find(|s| s.name == "sandbox.lease" && s.trace_id == publish.trace_id)
        .expect("lease span");
    assert_eq!(lease.parent_span_id, run.span_id);
    assert_eq!(lease.service, "shoal-worker");

    fleet.stop().await;
    // The worker's JSON log lines inside the run carry the task and trace ids.
    let trace_hex: String = publish
        .trace_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let log = Fleet::log(&env, "shoal-worker");
    let finished = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["fields"]["message"] == "task finished")
        .unwrap_or_else(|| panic!("no JSON `task finished` line in the worker's log:\n{log}"));
    assert_eq!(finished["span"]["task_id"], id.to_string(), "{finished}");
    assert_eq!(finished["span"]["trace_id"], trace_hex, "{finished}");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_task_keeps_its_trace_across_the_retry_tier() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new("traces-retry", "").await;
    let fleet = Fleet::start(&env, Some(&receiver.url), "broker.retry_tiers_s = [1]").await;
    let client = Client::new(&fleet.url, None);
    // Hold the lease before the task is submitted: the worker's first
    // attempt finds it leased elsewhere and sends the message to the retry tier.
    // The id is the scheduler's, so submit with the worker's slot busy first.
    let blocker = client
        .submit(&TaskSpec::exec("sleep 300"), None)
        .await
        .expect("submit the blocker");
    env.wait_state(&blocker.id, TaskState::Running, Duration::from_secs(120))
        .await;
    let record = client
        .submit(&TaskSpec::exec("echo retried"), None)
        .await
        .expect("submit");
    let LeaseAttempt::Acquired(lease) = env
        .store
        .acquire_lease(&record.id, "intruder", Duration::from_secs(120))
        .await
        .expect("lease")
    else {
        panic!("the lease is free");
    };
    client
        .cancel(&blocker.id)
        .await
        .expect("cancel the blocker");
    let id = record.id;
    // The first attempt's run span arrives once it settled to the retry tier.
    receiver
        .wait_for("the first attempt's task.run span", |spans| {
            (!run_spans(spans, &id).is_empty()).then_some(())
        })
        .await;
    env.store.release_lease(&lease).await.expect("release");
    let done = env.wait_terminal(&id, Duration::from_secs(120)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);

    let (publish, runs) = receiver
        .wait_for("both attempts' task.run spans", |spans| {
            let publish = publish_span(spans, &id)?.clone();
            let runs: Vec<SpanRec> = run_spans(spans, &id).into_iter().cloned().collect();
            (runs.len() >= 2).then_some((publish, runs))
        })
        .await;
    for run in &runs {
        assert_eq!(run.trace_id, publish.trace_id, "every attempt in one trace");
        assert_eq!(run.parent_span_id, publish.span_id);
    }
    assert_ne!(runs[0].span_id, runs[1].span_id);

    fleet.stop().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_task_has_llm_and_tool_spans_without_prompt_text() {
    const PROMPT: &str = "Say hello. SECRET-PROMPT-MARKER-4711";
    let receiver = Receiver::start().await;
    let (sim_url, _sim) = LlmSim::start(Script::turns([
        Turn::tool_call("terminal", json!({"command": "echo hello"})),
        Turn::tool_call("finish", json!({"message": "said hello"})),
    ]))
    .await;
    let models = format!(
        "models.sim.provider = \"openai\"\nmodels.sim.base_url = \"{sim_url}\"\nmodels.sim.model = \"sim-model\"\n\
         models.sim.price_input = 3.0\nmodels.sim.price_output = 15.0\n"
    );
    let env = TestEnv::new("traces-agent", &models).await;
    let fleet = Fleet::start(&env, Some(&receiver.url), &models).await;
    let client = Client::new(&fleet.url, None);
    let mut agent: AgentSpec =
        serde_json::from_value(json!({ "prompt": PROMPT })).expect("agent spec");
    agent.model = "sim".into();
    let record = client
        .submit(&TaskSpec::new(TaskKind::Agent(agent)), None)
        .await
        .expect("submit");
    let done = env
        .wait_terminal(&record.id, Duration::from_secs(120))
        .await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);

    let id = record.id;
    let spans = receiver
        .wait_for("two llm.call and two tool.call spans", |spans| {
            let run = (*run_spans(spans, &id).first()?).clone();
            let in_trace: Vec<SpanRec> = spans
                .iter()
                .filter(|s| s.trace_id == run.trace_id)
                .cloned()
                .collect();
            let count = |name: &str| in_trace.iter().filter(|s| s.name == name).count();
            (count("llm.call") >= 2 && count("tool.call") >= 2 && count("agent.step") >= 2)
                .then_some(in_trace)
        })
        .await;
    let steps: Vec<&SpanRec> = spans.iter().filter(|s| s.name == "agent.step").collect();
    for llm in spans.iter().filter(|s| s.name == "llm.call") {
        assert_eq!(llm.service, "shoal-worker");
        assert_eq!(
            llm.attributes.get("model").map(String::as_str),
            Some("sim-model"),
            "{llm:?}"
        );
        for key in ["prompt_tokens", "completion_tokens", "cost_micros"] {
            let value: u64 = llm
                .attributes
                .get(key)
                .unwrap_or_else(|| panic!("llm.call without {key}: {llm:?}"))
                .parse()
                .expect("a number");
            if key == "prompt_tokens" {
                assert!(value > 0, "{llm:?}");
            }
        }
        assert!(
            steps.iter().any(|step| step.span_id == llm.parent_span_id),
            "an llm.call is a child of an agent.step"
        );
    }
    let tools: Vec<&str> = spans
        .iter()
        .filter(|s| s.name == "tool.call")
        .map(|s| s.attributes.get("tool").map_or("", String::as_str))
        .collect();
    assert!(
        tools.contains(&"terminal") && tools.contains(&"finish"),
        "{tools:?}"
    );
    let terminal = spans
        .iter()
        .find(|s| {
            s.name == "tool.call"
                && s.attributes.get("tool").map(String::as_str) == Some("terminal")
        })
        .expect("terminal span");
    assert_eq!(
        terminal.attributes.get("outcome").map(String::as_str),
        Some("ok")
    );
    for span in &receiver.spans() {
        for value in span.attributes.values() {
            assert!(
                !value.contains("SECRET-PROMPT-MARKER"),
                "prompt text in span {span:?}"
            );
        }
    }

    fleet.stop().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported() {
    // The SDK's default endpoint: were the exporter built without an
    // endpoint configured, its spans would come here.
    let receiver = Receiver::start_on_default_port().await;
    let env = TestEnv::new("traces-off", "").await;
    let fleet = Fleet::start(&env, None, "").await;
    let client = Client::new(&fleet.url, None);
    let record = client
        .submit(&TaskSpec::exec("echo untraced"), None)
        .await
        .expect("submit");
    let done = env
        .wait_terminal(&record.id, Duration::from_secs(120))
        .await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    // Exit flushes whatever a tracer would have buffered.
    fleet.stop().await;
    assert_eq!(
        receiver.requests(),
        0,
        "spans were exported with no endpoint"
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_neither_slows_tasks_nor_blocks_exit() {
    // Accepts connections and never reads or answers: every export waits for
    // its timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let env = TestEnv::new("traces-stuck", "").await;
    let fleet = Fleet::start_with(
        &env,
        Some(&endpoint),
        "",
        &[("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")],
        false,
    )
    .await;
    let client = Client::new(&fleet.url, None);
    for n in 0..3 {
        let record = client
            .submit(&TaskSpec::exec(format!("echo stuck {n}")), None)
            .await
            .expect("submit");
        let done = env
            .wait_terminal(&record.id, Duration::from_secs(120))
            .await;
        assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    }
    // Exit flushes to the silent collector: bounded by the export timeout
    // and the guard's shutdown limit, far inside `stop`'s 90 s.
    fleet.stop().await;
    held.abort();
    env.teardown().await;
}
