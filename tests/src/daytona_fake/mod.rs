//! A fake Daytona: the main API (`/api/...`) and every sandbox's toolbox
//! (`/toolbox/{sandboxId}/...`) on one loopback port, with an in-memory
//! sandbox state machine and fault injection.
//!
//! Every request and every response is checked against Daytona's official
//! specs (`api/openapi.yaml`, `toolbox/swagger.json`), loaded at run time from
//! [`spec::specs_dir`]. A request that breaks the spec is answered 400; every
//! problem, request or response, is recorded, and tests end with
//! [`FakeDaytona::assert_no_violations`].
//!
//! Commands run for real (`process/execute` splits its command the way the
//! daemon does and runs it without a shell; sessions are real `sh`
//! processes), in a directory per sandbox that is also what the files API
//! serves. It fakes Daytona's cloud, not Shoal.

mod sandboxes;
pub mod spec;
mod toolbox;
mod validate;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

pub use sandboxes::SandboxView;
use spec::Spec;

/// A recorded spec violation.
#[derive(Debug, Clone)]
pub struct Violation {
    pub api: &'static str,
    pub operation: String,
    /// `request` or `response`.
    pub direction: &'static str,
    pub message: String,
}

/// A request the fake answered.
#[derive(Debug, Clone)]
pub struct Logged {
    pub operation: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub at: Instant,
}

/// Faults to inject, by operation id.
#[derive(Debug, Default)]
struct Faults {
    /// `(remaining, Retry-After seconds)`: answer 429.
    rate_limited: HashMap<String, (u32, u64)>,
    /// Until when a 429 told the client to stay away, by operation: a call
    /// before then is a violation (the client did not honour Retry-After)
    /// and is throttled again, as the real API would.
    throttled_until: HashMap<String, Instant>,
    /// Answer 409 (a state change in progress).
    conflicts: HashMap<String, u32>,
    /// `(remaining, delay)`: do the work, then wait before answering.
    slow: HashMap<String, (u32, Duration)>,
    /// Creates that create, then answer 502 with an empty body.
    create_502: u32,
    /// New sandboxes stay `creating`.
    stuck_creating: bool,
    /// The `toolboxProxyUrl` sandboxes report (default: this fake's own).
    toolbox_proxy_url: Option<String>,
}

/// What a handler answers.
pub(crate) struct Reply {
    pub status: u16,
    pub content_type: Option<&'static str>,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            content_type: Some("application/json"),
            body: serde_json::to_vec(value).unwrap_or_default(),
            headers: Vec::new(),
        }
    }

    pub fn empty(status: u16) -> Self {
        Self {
            status,
            content_type: None,
            body: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// An error in the shape Daytona's services use.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let reason = StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        Self::json(
            status,
            &json!({ "statusCode": status, "message": message.into(), "error": reason }),
        )
    }
}

pub(crate) struct FakeState {
    main: Spec,
    toolbox: Spec,
    key: String,
    base_url: String,
    root: PathBuf,
    pub(crate) sandboxes: Mutex<sandboxes::Sandboxes>,
    violations: Mutex<Vec<Violation>>,
    log: Mutex<Vec<Logged>>,
    faults: Mutex<Faults>,
    pub(crate) create_delay: Mutex<Duration>,
    pub(crate) clones: Mutex<Vec<Value>>,
}

impl FakeState {
    pub(crate) fn toolbox_proxy_url(&self) -> String {
        lock(&self.faults)
            .toolbox_proxy_url
            .clone()
            .unwrap_or_else(|| format!("{}/toolbox", self.base_url))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fake server; stops (and removes its sandboxes' directories and
/// processes) when dropped.
pub struct FakeDaytona {
    /// Base URL of the main API (`http://127.0.0.1:<port>/api`).
    pub api_url: String,
    pub api_key: String,
    state: Arc<FakeState>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeDaytona {
    /// Starts the fake on `127.0.0.1:0`. Panics when the specs are missing.
    pub async fn start() -> FakeDaytona {
        let (main, toolbox) = Spec::load_both(&spec::specs_dir());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Daytona");
        let address = listener.local_addr().expect("local address");
        let base_url = format!("http://{address}");
        let root = std::env::temp_dir().join(format!(
            "shoal-daytona-fake-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&root).expect("fake root");
        let api_key = format!("dtn_fake_{}", uuid::Uuid::now_v7().simple());
        let state = Arc::new(FakeState {
            main,
            toolbox,
            key: api_key.clone(),
            base_url: base_url.clone(),
            root,
            sandboxes: Mutex::new(sandboxes::Sandboxes::default()),
            violations: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            faults: Mutex::new(Faults::default()),
            create_delay: Mutex::new(Duration::from_millis(150)),
            clones: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeDaytona {
            api_url: format!("{base_url}/api"),
            api_key,
            state,
            server,
        }
    }

    /// The next `times` calls of `operation` are answered 429 with
    /// `Retry-After: retry_after_secs`.
    pub fn rate_limit(&self, operation: &str, times: u32, retry_after_secs: u64) {
        lock(&self.state.faults)
            .rate_limited
            .insert(operation.into(), (times, retry_after_secs));
    }

    /// Sandboxes report `url` as their `toolboxProxyUrl` (a hostile API
    /// pointing the worker, and its API key, elsewhere).
    pub fn set_toolbox_proxy_url(&self, url: &str) {
        lock(&self.state.faults).toolbox_proxy_url = Some(url.to_owned());
    }

    /// The next `times` calls of `operation` are answered 409.
    pub fn conflict(&self, operation: &str, times: u32) {
        lock(&self.state.faults)
            .conflicts
            .insert(operation.into(), times);
    }

    /// The next `times` calls of `operation` do their work, then answer
    /// after `delay` (a client that gives up first does not see the answer).
    pub fn slow(&self, operation: &str, times: u32, delay: Duration) {
        lock(&self.state.faults)
            .slow
            .insert(operation.into(), (times, delay));
    }

    /// The next `times` creates create the sandbox, then answer 502 with an
    /// empty body.
    pub fn create_then_502(&self, times: u32) {
        lock(&self.state.faults).create_502 = times;
    }

    /// New sandboxes stay in `creating` (when `stuck`).
    pub fn stick_in_creating(&self, stuck: bool) {
        lock(&self.state.faults).stuck_creating = stuck;
    }

    /// How long new sandboxes take to start.
    pub fn set_create_delay(&self, delay: Duration) {
        *lock(&self.state.create_delay) = delay;
    }

    /// Stops a started sandbox (as Daytona's auto-stop would).
    pub fn stop_sandbox(&self, id: &str) {
        lock(&self.state.sandboxes).stop(id);
    }

    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.state.violations).clone()
    }

    /// Panics, listing them, when any request or response broke the spec.
    pub fn assert_no_violations(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "the fake Daytona recorded {} spec violation(s):\n{}",
            violations.len(),
            violations
                .iter()
                .map(|v| format!("  {} {} {}: {}", v.api, v.operation, v.direction, v.message))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    pub fn requests(&self) -> Vec<Logged> {
        lock(&self.state.log).clone()
    }

    /// Requests to `operation`, in order.
    pub fn calls(&self, operation: &str) -> Vec<Logged> {
        self.requests()
            .into_iter()
            .filter(|r| r.operation == operation)
            .collect()
    }

    /// Every sandbox ever created, destroyed ones included.
    pub fn sandboxes(&self) -> Vec<SandboxView> {
        lock(&self.state.sandboxes).views()
    }

    /// Bodies of the `CloneRepository` requests received.
    pub fn clones(&self) -> Vec<Value> {
        lock(&self.state.clones).clone()
    }

    /// The host directory behind a sandbox's workspace.
    pub fn workspace_of(&self, id: &str) -> Option<PathBuf> {
        lock(&self.state.sandboxes).workspace(id)
    }
}

impl Drop for FakeDaytona {
    fn drop(&mut self) {
        self.server.abort();
        lock(&self.state.sandboxes).kill_all();
        let _ = std::fs::remove_dir_all(&self.state.root);
    }
}

impl FakeState {
    fn violation(
        &self,
        api: &'static str,
        operation: &str,
        direction: &'static str,
        message: String,
    ) {
        eprintln!("fake Daytona: spec violation: {api} {operation} {direction}: {message}");
        lock(&self.violations).push(Violation {
            api,
            operation: operation.to_owned(),
            direction,
            message,
        });
    }

    /// An injected fault for `operation`, if one is due.
    fn fault(&self, operation: &str) -> Option<Reply> {
        let mut faults = lock(&self.faults);
        if let Some(until) = faults.throttled_until.get(operation).copied() {
            if Instant::now() < until {
                drop(faults);
                self.violation(
                    "daytona-api",
                    operation,
                    "request",
                    "called again before the Retry-After of its 429 had passed".into(),
                );
                let mut reply = Reply::error(429, "ThrottlerException: Too Many Requests");
                reply.headers.push(("retry-after", "1".into()));
                return Some(reply);
            }
        }
        if let Some((left, retry_after)) = faults.rate_limited.get_mut(operation) {
            if *left > 0 {
                *left -= 1;
                let retry_after = *retry_after;
                faults.throttled_until.insert(
                    operation.to_owned(),
                    Instant::now() + Duration::from_secs(retry_after),
                );
                let mut reply = Reply::error(429, "ThrottlerException: Too Many Requests");
                reply.headers.push(("retry-after", retry_after.to_string()));
                reply
                    .headers
                    .push(("x-ratelimit-reset", retry_after.to_string()));
                return Some(reply);
            }
        }
        if let Some(left) = faults.conflicts.get_mut(operation) {
            if *left > 0 {
                *left -= 1;
                return Some(Reply::error(409, "Sandbox state change in progress"));
            }
        }
        None
    }

    pub(crate) fn take_create_502(&self) -> bool {
        let mut faults = lock(&self.faults);
        if faults.create_502 > 0 {
            faults.create_502 -= 1;
            true
        } else {
            false
        }
    }

    pub(crate) fn stuck_creating(&self) -> bool {
        lock(&self.faults).stuck_creating
    }
}

async fn handle(State(state): State<Arc<FakeState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let method = parts.method.as_str().to_owned();
    let full_path = parts.uri.path().to_owned();
    let body = match to_bytes(body, 256 << 20).await {
        Ok(body) => body,
        Err(error) => return respond(Reply::error(400, format!("unreadable body: {error}"))),
    };
    // Which API, and the path within it.
    let (spec, path, sandbox) = if let Some(rest) = full_path.strip_prefix("/api/") {
        (&state.main, format!("/{rest}"), None)
    } else if let Some(rest) = full_path.strip_prefix("/toolbox/") {
        let (id, rest) = rest.split_once('/').unwrap_or((rest, ""));
        (&state.toolbox, format!("/{rest}"), Some(id.to_owned()))
    } else {
        state.violation(
            "fake",
            &full_path,
            "request",
            format!("{method} {full_path} is outside both APIs"),
        );
        return respond(Reply::error(404, "no such API"));
    };
    let Some((op, path_params)) = spec.find(&method, &path) else {
        state.violation(
            spec.name,
            &path,
            "request",
            format!("{method} {path} is not in the spec"),
        );
        return respond(Reply::error(
            404,
            format!("{method} {path} is not an operation"),
        ));
    };
    let (auth_problems, key_ok) = validate::check_bearer(&parts.headers, &state.key);
    let (mut problems, incoming) = validate::check_request(
        spec,
        op,
        path_params,
        parts.uri.query(),
        &parts.headers,
        &body,
    )
    .await;
    problems.extend(auth_problems);
    let reply = if !problems.is_empty() {
        for problem in &problems {
            state.violation(spec.name, &op.id, "request", problem.clone());
        }
        Reply::error(
            400,
            format!("request does not match the spec: {}", problems.join("; ")),
        )
    } else if !key_ok {
        Reply::error(401, "Unauthorized")
    } else if let Some(fault) = state.fault(&op.id) {
        fault
    } else {
        match &sandbox {
            None => sandboxes::dispatch(&state, &op.id, &incoming),
            Some(id) => toolbox::dispatch(&state, id, &op.id, incoming).await,
        }
    };
    for problem in validate::check_response(spec, op, reply.status, reply.content_type, &reply.body)
    {
        state.violation(spec.name, &op.id, "response", problem);
    }
    lock(&state.log).push(Logged {
        operation: op.id.clone(),
        method,
        path: full_path,
        status: reply.status,
        at: Instant::now(),
    });
    let delay = {
        let mut faults = lock(&state.faults);
        match faults.slow.get_mut(&op.id) {
            Some((left, delay)) if *left > 0 => {
                *left -= 1;
                Some(*delay)
            }
            _ => None,
        }
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    respond(reply)
}

fn respond(reply: Reply) -> Response {
    let mut response = Response::new(Body::from(reply.body));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(content_type) = reply.content_type {
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
    }
    for (name, value) in reply.headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}
