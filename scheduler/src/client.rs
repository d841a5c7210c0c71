//! A small HTTP client for the scheduler API, used by the `shoal` CLI.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use shoal_shared::task::{TaskId, TaskRecord, TaskRef, TaskSpec};

use crate::cost::CostSummary;

/// A call to the scheduler failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the scheduler at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{status}: {detail}")]
    Api { status: u16, detail: String },
}

/// A page of events (JSON objects with an `id` and a `type`).
#[derive(Debug, Deserialize)]
pub struct EventsPage {
    pub events: Vec<serde_json::Value>,
    pub state: shoal_shared::TaskState,
    /// The task is finished and this was the last page.
    pub done: bool,
}

/// The parameters of `GET /v1/cost` (see [`crate::cost`]).
#[derive(Debug, Clone, Default)]
pub struct CostQuery {
    pub since: Option<String>,
    pub until: Option<String>,
    pub tenant: Option<String>,
    pub model: Option<String>,
    pub task: Option<String>,
    pub by: Option<String>,
}

/// A query-string value: unreserved characters as they are, the rest as `%XX`.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[derive(Deserialize)]
struct ProblemBody {
    detail: Option<String>,
    title: Option<String>,
}

/// Talks to one scheduler.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// Submits one task; `idempotency_key` makes retries of this call safe.
    pub async fn submit(
        &self,
        spec: &TaskSpec,
        idempotency_key: Option<&str>,
    ) -> Result<TaskRecord, ClientError> {
        let mut request = self.http.post(self.url("/v1/tasks")).json(spec);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        self.send(request).await
    }

    /// Submits many tasks in one all-or-nothing batch.
    pub async fn submit_batch(&self, specs: &[TaskSpec]) -> Result<Vec<TaskRef>, ClientError> {
        #[derive(Deserialize)]
        struct Batch {
            tasks: Vec<TaskRef>,
        }
        let request = self
            .http
            .post(self.url("/v1/tasks/batch"))
            .json(&serde_json::json!({ "tasks": specs }));
        let batch: Batch = self.send(request).await?;
        Ok(batch.tasks)
    }

    pub async fn get(&self, id: &TaskId) -> Result<TaskRecord, ClientError> {
        self.send(self.http.get(self.url(&format!("/v1/tasks/{id}"))))
            .await
    }

    /// Cancels a task: its record afterwards (`cancelled`, or still running
    /// with `cancel_requested_at` set until its worker stops it).
    pub async fn cancel(&self, id: &TaskId) -> Result<TaskRecord, ClientError> {
        self.send(self.http.post(self.url(&format!("/v1/tasks/{id}/cancel"))))
            .await
    }

    /// A page of the task's events after stream id `after`.
    pub async fn events(
        &self,
        id: &TaskId,
        after: Option<&str>,
    ) -> Result<EventsPage, ClientError> {
        let mut url = format!("/v1/tasks/{id}/events");
        if let Some(after) = after {
            url.push_str(&format!("?after={after}"));
        }
        self.send(self.http.get(self.url(&url))).await
    }

    /// A cost summary (`GET /v1/cost`); unset fields are left to the
    /// scheduler's defaults.
    pub async fn cost(&self, query: &CostQuery) -> Result<CostSummary, ClientError> {
        let params = [
            ("since", &query.since),
            ("until", &query.until),
            ("tenant", &query.tenant),
            ("model", &query.model),
            ("task", &query.task),
            ("by", &query.by),
        ];
        let mut url = "/v1/cost".to_owned();
        let mut separator = '?';
        for (name, value) in params {
            if let Some(value) = value {
                url.push(separator);
                url.push_str(name);
                url.push('=');
                url.push_str(&percent_encode(value));
                separator = '&';
            }
        }
        self.send(self.http.get(self.url(&url))).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        mut request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let transport = |source| ClientError::Transport {
            url: self.base.clone(),
            source,
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(transport)?;
        if !status.is_success() {
            let detail = serde_json::from_slice::<ProblemBody>(&bytes)
                .ok()
                .and_then(|p| p.detail.or(p.title))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(500).collect());
            return Err(ClientError::Api {
                status: status.as_u16(),
                detail,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Api {
            status: status.as_u16(),
            detail: format!("unexpected response: {e}"),
        })
    }
}
