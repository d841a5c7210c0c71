//! The handle on one Daytona sandbox's toolbox (`{toolboxProxyUrl}/{sandboxId}`):
//! its address, workspace and environment, and the toolbox session calls
//! that both the sandbox (`sandbox.rs`) and its persistent shell (`shell.rs`)
//! make. Kept apart so the shell does not import the sandbox that opens it.

use std::collections::BTreeMap;
use std::sync::Arc;

use reqwest::{Method, Url};

use super::api::{
    CommandDto, CreateSessionRequest, SessionCommandLogs, SessionExecuteRequest,
    SessionExecuteResponse,
};
use super::client::{url_with, Call, RETRY_STATUSES_NO_CONFLICT};
use super::Shared;
use crate::sandbox::SandboxError;

/// A Daytona sandbox.
#[derive(Clone)]
pub(crate) struct DaytonaSandbox {
    pub(crate) id: String,
    pub(crate) shared: Arc<Shared>,
    /// `{toolboxProxyUrl}/{sandboxId}`.
    pub(crate) toolbox: Url,
    /// The workspace: the daemon's working directory.
    pub(crate) workdir: String,
    /// The template's environment, given to every command.
    pub(crate) env: BTreeMap<String, String>,
}

impl DaytonaSandbox {
    pub(crate) fn url(&self, segments: &[&str]) -> Result<Url, SandboxError> {
        url_with(&self.toolbox, segments)
    }

    pub(crate) async fn create_session(&self, session: &str) -> Result<(), SandboxError> {
        let call = Call::new(Method::POST, self.url(&["process", "session"])?)
            .json(&CreateSessionRequest {
                session_id: session.to_owned(),
            })
            .retry_on(RETRY_STATUSES_NO_CONFLICT);
        match self.shared.http.send(&call).await {
            Ok(_) => Ok(()),
            // A replayed create whose first attempt got through.
            Err(error) if error.status() == Some(409) => Ok(()),
            Err(error) => Err(error.into_sandbox("creating a toolbox session")),
        }
    }

    pub(crate) async fn delete_session(&self, session: &str) {
        let Ok(url) = self.url(&["process", "session", session]) else {
            return;
        };
        if let Err(error) = self.shared.http.send(&Call::new(Method::DELETE, url)).await {
            if !error.is_not_found() {
                tracing::warn!(sandbox = %self.id, %error, "deleting a toolbox session failed");
            }
        }
    }

    /// Starts `command` asynchronously in `session`; its command id.
    pub(crate) async fn session_exec(
        &self,
        session: &str,
        command: &str,
    ) -> Result<String, SandboxError> {
        let call = Call::new(
            Method::POST,
            self.url(&["process", "session", session, "exec"])?,
        )
        .json(&SessionExecuteRequest {
            command: command.to_owned(),
            run_async: true,
        })
        .once();
        let reply: SessionExecuteResponse = self
            .shared
            .http
            .json(&call)
            .await
            .map_err(|e| e.into_sandbox("starting a session command"))?;
        Ok(reply.cmd_id)
    }

    /// The exit code of a session command, once it has one.
    pub(crate) async fn session_command_exit(
        &self,
        session: &str,
        cmd_id: &str,
    ) -> Result<Option<i64>, SandboxError> {
        let url = self.url(&["process", "session", session, "command", cmd_id])?;
        let command: CommandDto = self
            .shared
            .http
            .json(&Call::new(Method::GET, url))
            .await
            .map_err(|e| e.into_sandbox("session command status"))?;
        Ok(command.exit_code)
    }

    pub(crate) async fn session_logs(
        &self,
        session: &str,
        cmd_id: &str,
    ) -> Result<SessionCommandLogs, SandboxError> {
        let url = self.url(&["process", "session", session, "command", cmd_id, "logs"])?;
        self.shared
            .http
            .json(&Call::new(Method::GET, url).large_body())
            .await
            .map_err(|e| e.into_sandbox("session command logs"))
    }
}
