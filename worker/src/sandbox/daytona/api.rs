//! The parts of Daytona's two APIs this provider uses, as typed requests and
//! responses. Field names follow the specs (`api/openapi.yaml` for the main
//! API, `toolbox/swagger.json` for the in-sandbox toolbox). Responses are
//! parsed leniently: a field the provider does not need may be missing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Label holding the owning fleet.
pub const OWNER_LABEL: &str = "shoal.owner";
/// Label holding the template name.
pub const TEMPLATE_LABEL: &str = "shoal.template";

/// `CreateSandbox` (operation `createSandbox`). No `env`: variables go with
/// each command, so Daytona's warm pool can serve the create.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CreateSandbox {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<u32>,
    pub network_block_all: bool,
    pub auto_stop_interval: u32,
    pub auto_archive_interval: u32,
    pub auto_delete_interval: i32,
}

/// `Sandbox` and `SandboxListItem`, the fields this provider reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDto {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub desired_state: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub toolbox_proxy_url: Option<String>,
    #[serde(default)]
    pub error_reason: Option<String>,
}

impl SandboxDto {
    pub fn state(&self) -> &str {
        self.state.as_deref().unwrap_or("unknown")
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// `ListSandboxesResponse` (operation `listSandboxes`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListSandboxesResponse {
    pub items: Vec<SandboxDto>,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// What a sandbox state means for a caller waiting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateClass {
    /// `started`: usable.
    Ready,
    /// On its way somewhere (`creating`, `starting`, `stopping`, ...).
    Moving,
    /// At rest but not running: `stopped`, `archived`, `paused`. A start
    /// brings it back.
    Resting,
    /// `error`, `build_failed`: it will not get better by waiting.
    Failed,
    /// `destroyed` or `destroying`.
    Gone,
}

pub fn classify(state: &str) -> StateClass {
    match state {
        "started" => StateClass::Ready,
        "stopped" | "archived" | "paused" => StateClass::Resting,
        "error" | "build_failed" => StateClass::Failed,
        "destroyed" | "destroying" => StateClass::Gone,
        // creating, restoring, starting, stopping, pending_build,
        // building_snapshot, pulling_snapshot, archiving, resizing,
        // snapshotting, forking, pausing, resuming, unknown, and any state
        // newer than the spec.
        _ => StateClass::Moving,
    }
}

/// `ExecuteRequest` (toolbox operation `ExecuteCommand`). The daemon splits
/// `command` on spaces and quotes and runs it without a shell.
#[derive(Debug, Clone, Serialize)]
pub struct ExecuteRequest {
    pub command: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

/// `ExecuteResponse`: stdout and stderr combined in `result` (`exitCode`
/// is the wrapper's, not read: the command's is in the frame).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteResponse {
    pub result: String,
}

/// `CreateSessionRequest` (operation `CreateSession`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateSessionRequest {
    pub session_id: String,
}

/// `SessionExecuteRequest` (operation `SessionExecuteCommand`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionExecuteRequest {
    pub command: String,
    pub run_async: bool,
}

/// `SessionExecuteResponse`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionExecuteResponse {
    pub cmd_id: String,
}

/// `Command` (operation `GetSessionCommand`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandDto {
    #[serde(default)]
    pub exit_code: Option<i64>,
}

/// `SessionCommandLogsResponse` (operation `GetSessionCommandLogs`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SessionCommandLogs {
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
}

/// `SessionSendInputRequest` (operation `SendInput`).
#[derive(Debug, Clone, Serialize)]
pub struct SessionSendInputRequest {
    pub data: String,
}

/// `FileInfo` (operation `ListFiles`), the fields this provider reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileInfo {
    pub name: String,
    #[serde(default)]
    pub is_dir: bool,
    #[serde(default)]
    pub size: i64,
}

/// `GitCloneRequest` (operation `CloneRepository`).
#[derive(Debug, Clone, Serialize)]
pub struct GitCloneRequest {
    pub url: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_id: Option<String>,
}

/// `WorkDirResponse` (operation `GetWorkDir`).
#[derive(Debug, Clone, Deserialize)]
pub struct WorkDirResponse {
    pub dir: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_carries_intervals_and_labels_but_no_env() {
        let body = CreateSandbox {
            name: "shoal-f-1".into(),
            snapshot: None,
            labels: BTreeMap::from([(OWNER_LABEL.into(), "f".into())]),
            target: None,
            cpu: Some(2),
            memory: None,
            disk: None,
            network_block_all: true,
            auto_stop_interval: 15,
            auto_archive_interval: 60,
            auto_delete_interval: -1,
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["autoStopInterval"], 15);
        assert_eq!(json["autoArchiveInterval"], 60);
        assert_eq!(json["autoDeleteInterval"], -1);
        assert_eq!(json["labels"]["shoal.owner"], "f");
        assert_eq!(json["networkBlockAll"], true);
        assert!(json.get("env").is_none());
        assert!(json.get("memory").is_none());
    }

    #[test]
    fn states_are_classified() {
        assert_eq!(classify("started"), StateClass::Ready);
        assert_eq!(classify("creating"), StateClass::Moving);
        assert_eq!(classify("archived"), StateClass::Resting);
        assert_eq!(classify("build_failed"), StateClass::Failed);
        assert_eq!(classify("destroying"), StateClass::Gone);
        assert_eq!(classify("something-new"), StateClass::Moving);
    }
}
