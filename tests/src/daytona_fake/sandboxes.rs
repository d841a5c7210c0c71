//! The main API's sandbox state machine: create (`creating` → `started`),
//! start, stop, delete (`destroying` → `destroyed`), get by id or name, list
//! by labels with cursor pages.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::toolbox::Session;
use super::validate::Incoming;
use super::{lock, FakeState, Reply};

/// How long `starting`, `stopping` and `destroying` last.
const TRANSITION: Duration = Duration::from_millis(100);

/// A sandbox as tests see it.
#[derive(Debug, Clone)]
pub struct SandboxView {
    pub id: String,
    pub name: String,
    pub state: String,
    pub desired_state: String,
    pub labels: BTreeMap<String, String>,
    /// The create request's body.
    pub create_body: Value,
}

pub(crate) struct FakeSandbox {
    pub id: String,
    name: String,
    labels: BTreeMap<String, String>,
    state: String,
    desired: String,
    /// When the current transition ends.
    until: Instant,
    stuck: bool,
    created_at: String,
    body: Value,
    /// `<root>/<id>`: `workspace/` (the work dir) and `daemon/` (session logs).
    pub dir: PathBuf,
    pub sessions: HashMap<String, Session>,
}

impl FakeSandbox {
    pub fn workspace(&self) -> PathBuf {
        self.dir.join("workspace")
    }

    pub fn is_started(&mut self) -> bool {
        self.advance();
        self.state == "started"
    }

    fn advance(&mut self) {
        if Instant::now() < self.until {
            return;
        }
        let next = match self.state.as_str() {
            "creating" if !self.stuck => "started",
            "starting" => "started",
            "stopping" => "stopped",
            "destroying" => "destroyed",
            _ => return,
        };
        self.state = next.to_owned();
    }

    fn is_gone(&self) -> bool {
        self.state == "destroyed"
    }

    fn to_json(&self, toolbox_url: &str, list_item: bool) -> Value {
        let body = &self.body;
        let mut value = json!({
            "id": self.id,
            "organizationId": "fake-organization",
            "name": self.name,
            "snapshot": body["snapshot"].as_str().unwrap_or("daytonaio/sandbox:fake"),
            "user": "daytona",
            "labels": self.labels,
            "public": false,
            "target": body["target"].as_str().unwrap_or("us"),
            "cpu": body["cpu"].as_i64().unwrap_or(1),
            "gpu": 0,
            "memory": body["memory"].as_i64().unwrap_or(1),
            "disk": body["disk"].as_i64().unwrap_or(3),
            "state": self.state,
            "desiredState": self.desired,
            "autoStopInterval": body["autoStopInterval"].as_i64().unwrap_or(15),
            "autoArchiveInterval": body["autoArchiveInterval"].as_i64().unwrap_or(10080),
            "autoDeleteInterval": body["autoDeleteInterval"].as_i64().unwrap_or(-1),
            "createdAt": self.created_at,
            "updatedAt": self.created_at,
            "sandboxClass": "container",
            "toolboxProxyUrl": toolbox_url,
        });
        if !list_item {
            value["env"] = json!({});
            value["networkBlockAll"] = json!(body["networkBlockAll"].as_bool().unwrap_or(false));
        }
        value
    }
}

#[derive(Default)]
pub(crate) struct Sandboxes {
    all: Vec<FakeSandbox>,
}

impl Sandboxes {
    /// A live sandbox by id or name.
    pub fn find(&mut self, id_or_name: &str) -> Option<&mut FakeSandbox> {
        self.all.iter_mut().for_each(FakeSandbox::advance);
        self.all
            .iter_mut()
            .find(|s| !s.is_gone() && (s.id == id_or_name || s.name == id_or_name))
    }

    pub fn views(&mut self) -> Vec<SandboxView> {
        self.all
            .iter_mut()
            .map(|s| {
                s.advance();
                SandboxView {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    state: s.state.clone(),
                    desired_state: s.desired.clone(),
                    labels: s.labels.clone(),
                    create_body: s.body.clone(),
                }
            })
            .collect()
    }

    pub fn workspace(&self, id: &str) -> Option<PathBuf> {
        self.all
            .iter()
            .find(|s| s.id == id)
            .map(FakeSandbox::workspace)
    }

    pub fn stop(&mut self, id: &str) {
        if let Some(sandbox) = self.find(id) {
            sandbox.state = "stopped".into();
            sandbox.desired = "stopped".into();
            sandbox.sessions.clear();
        }
    }

    pub fn kill_all(&mut self) {
        for sandbox in &mut self.all {
            sandbox.sessions.clear();
        }
    }
}

pub(crate) fn dispatch(state: &FakeState, operation: &str, request: &Incoming) -> Reply {
    let toolbox = state.toolbox_proxy_url();
    let base = toolbox.as_str();
    let id = request
        .path
        .get("sandboxIdOrName")
        .cloned()
        .unwrap_or_default();
    let mut sandboxes = lock(&state.sandboxes);
    match operation {
        "createSandbox" => {
            let body = &request.json;
            let name = body["name"].as_str().map(str::to_owned);
            if let Some(name) = &name {
                if sandboxes.find(name).is_some() {
                    return Reply::error(409, format!("Sandbox with name {name} already exists"));
                }
            }
            let id = uuid::Uuid::now_v7().to_string();
            let dir = state.root.join(&id);
            if let Err(error) = std::fs::create_dir_all(dir.join("workspace"))
                .and_then(|()| std::fs::create_dir_all(dir.join("daemon")))
            {
                return Reply::error(500, format!("fake storage: {error}"));
            }
            let labels = body["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let sandbox = FakeSandbox {
                id: id.clone(),
                name: name.unwrap_or_else(|| id.clone()),
                labels,
                state: "creating".into(),
                desired: "started".into(),
                until: Instant::now() + *lock(&state.create_delay),
                stuck: state.stuck_creating(),
                created_at: chrono::Utc::now().to_rfc3339(),
                body: body.clone(),
                dir,
                sessions: HashMap::new(),
            };
            let reply = Reply::json(200, &sandbox.to_json(base, false));
            sandboxes.all.push(sandbox);
            if state.take_create_502() {
                // Created, but the gateway lost the answer.
                return Reply::empty(502);
            }
            reply
        }
        "getSandbox" => match sandboxes.find(&id) {
            Some(sandbox) => Reply::json(200, &sandbox.to_json(base, false)),
            None => Reply::error(404, format!("Sandbox with ID or name {id} not found")),
        },
        "deleteSandbox" => match sandboxes.find(&id) {
            Some(sandbox) => {
                sandbox.state = "destroying".into();
                sandbox.desired = "destroyed".into();
                sandbox.stuck = false;
                sandbox.until = Instant::now() + TRANSITION;
                sandbox.sessions.clear();
                Reply::json(200, &sandbox.to_json(base, false))
            }
            None => Reply::error(404, format!("Sandbox with ID or name {id} not found")),
        },
        "startSandbox" => match sandboxes.find(&id) {
            Some(sandbox) => match sandbox.state.as_str() {
                "stopped" | "archived" | "paused" => {
                    sandbox.state = "starting".into();
                    sandbox.desired = "started".into();
                    sandbox.until = Instant::now() + TRANSITION;
                    Reply::json(200, &sandbox.to_json(base, false))
                }
                "started" | "starting" => Reply::json(200, &sandbox.to_json(base, false)),
                other => Reply::error(409, format!("Sandbox is {other}, cannot start")),
            },
            None => Reply::error(404, format!("Sandbox with ID or name {id} not found")),
        },
        "stopSandbox" => match sandboxes.find(&id) {
            Some(sandbox) if sandbox.state == "started" => {
                sandbox.state = "stopping".into();
                sandbox.desired = "stopped".into();
                sandbox.until = Instant::now() + TRANSITION;
                sandbox.sessions.clear();
                Reply::json(200, &sandbox.to_json(base, false))
            }
            Some(sandbox) => {
                Reply::error(409, format!("Sandbox is {}, cannot stop", sandbox.state))
            }
            None => Reply::error(404, format!("Sandbox with ID or name {id} not found")),
        },
        "listSandboxes" => list(&mut sandboxes, request, base),
        other => Reply::error(501, format!("the fake does not implement {other}")),
    }
}

fn list(sandboxes: &mut Sandboxes, request: &Incoming, base: &str) -> Reply {
    let wanted: BTreeMap<String, String> = match request.query("labels") {
        Some(raw) => match serde_json::from_str::<BTreeMap<String, String>>(raw) {
            Ok(labels) => labels,
            Err(error) => {
                return Reply::error(
                    400,
                    format!("labels is not a JSON object of strings: {error}"),
                )
            }
        },
        None => BTreeMap::new(),
    };
    let include_deleted = request.query("includeErroredDeleted") == Some("true");
    let limit = request
        .query("limit")
        .and_then(|l| l.parse::<f64>().ok())
        .map_or(100, |l| l as usize)
        .max(1);
    let start = request
        .query("cursor")
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(0);
    sandboxes.all.iter_mut().for_each(FakeSandbox::advance);
    let matching: Vec<Value> = sandboxes
        .all
        .iter()
        .filter(|s| include_deleted || (s.desired != "destroyed" && !s.is_gone()))
        .filter(|s| wanted.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| s.to_json(base, true))
        .collect();
    let page: Vec<Value> = matching.iter().skip(start).take(limit).cloned().collect();
    let next = (start + page.len() < matching.len()).then(|| (start + page.len()).to_string());
    Reply::json(200, &json!({ "items": page, "nextCursor": next }))
}
