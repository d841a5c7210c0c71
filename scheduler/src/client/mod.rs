//! A small HTTP client for the scheduler API, used by the `shoal` CLI.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::stream::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use shoal_shared::task::{TaskId, TaskRecord, TaskRef, TaskSpec};

use crate::cost::CostSummary;

mod dead;
mod list;
mod workers;

pub use dead::{BulkPurged, BulkReplayed, DeadQuery, Replayed, Skipped};
pub use list::ListQuery;

/// A call to the scheduler failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cause is part of the message (not a `source`), so that what to
    /// do comes last when the CLI prints the error.
    #[error(
        "cannot reach the scheduler at {url}: {cause} (is it running there? \
         name another with --server or SHOAL_SERVER)",
        cause = transport_cause(error)
    )]
    Transport { url: String, error: reqwest::Error },
    #[error("{}", api_message(*status, detail))]
    Api { status: u16, detail: String },
}

/// What went wrong under a transport error: its causes (reqwest's own
/// message only says which request failed, naming the URL again).
pub(crate) fn transport_cause(error: &reqwest::Error) -> String {
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    if causes.is_empty() {
        error.to_string()
    } else {
        causes.join(": ")
    }
}

/// An API error as the scheduler worded it, with what to do about the usual ones.
fn api_message(status: u16, detail: &str) -> String {
    match status {
        404 if detail.starts_with("no task ") => {
            format!("{detail} (check the id, or the token's tenant)")
        }
        401 => format!("{status}: {detail} (give a token with --token or SHOAL_TOKEN)"),
        403 => format!("{status}: {detail} (the token may not do this)"),
        _ => format!("{status}: {detail}"),
    }
}

/// One event of a task's live stream: its stream id and the event (a JSON
/// object with an `id` and a `type`).
#[derive(Debug, Clone)]
pub struct StreamedEvent {
    pub id: String,
    pub event: serde_json::Value,
}

/// The live stream broke: the connection dropped, or it carried something
/// that was not an event.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the event stream broke: {0}")]
    Transport(String),
    #[error("the event stream carried a malformed event: {0}")]
    Malformed(String),
    /// The scheduler ended the stream because it is shutting down (its
    /// `going_away` event): reconnect, with `Last-Event-ID`.
    #[error("the scheduler is going away: {0}")]
    GoingAway(String),
}

/// The SSE event a scheduler ends a stream with when it shuts down (ADR 0026).
const GOING_AWAY: &str = "going_away";

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
pub(crate) fn percent_encode(value: &str) -> String {
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
    pub(crate) http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            // A scheduler that does not answer the connect is as good as down.
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            http,
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

    /// Opens the task's live event stream (Server-Sent Events), resuming after
    /// stream id `last_event_id` when given. The stream ends when the
    /// scheduler closes it: after the task's final event, or when it goes away.
    pub async fn event_stream(
        &self,
        id: &TaskId,
        last_event_id: Option<&str>,
    ) -> Result<impl Stream<Item = Result<StreamedEvent, StreamError>> + use<>, ClientError> {
        let mut request = self
            .http
            .get(self.url(&format!("/v1/tasks/{id}/events")))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(last) = last_event_id {
            request = request.header("Last-Event-ID", last);
        }
        let response = self.response(request).await?;
        Ok(response.bytes_stream().eventsource().map(|item| {
            let event = item.map_err(|e| match e {
                eventsource_stream::EventStreamError::Transport(e) => {
                    StreamError::Transport(transport_cause(&e))
                }
                other => StreamError::Malformed(other.to_string()),
            })?;
            if event.event == GOING_AWAY {
                let value = serde_json::from_str::<serde_json::Value>(&event.data).ok();
                let message = value
                    .as_ref()
                    .and_then(|v| v.get("message"))
                    .and_then(serde_json::Value::as_str);
                return Err(StreamError::GoingAway(
                    message.unwrap_or("it is shutting down").to_owned(),
                ));
            }
            let value: serde_json::Value = serde_json::from_str(&event.data)
                .map_err(|e| StreamError::Malformed(format!("{e}: {:?}", event.data)))?;
            let id = if event.id.is_empty() {
                value
                    .get("id")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            } else {
                event.id
            };
            if id.is_empty() {
                return Err(StreamError::Malformed(format!(
                    "an event without an id: {:?}",
                    event.data
                )));
            }
            Ok(StreamedEvent { id, event: value })
        }))
    }

    /// The base URL this client talks to.
    pub fn base(&self) -> &str {
        &self.base
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

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn transport(&self, source: reqwest::Error) -> ClientError {
        ClientError::Transport {
            url: self.base.clone(),
            error: source,
        }
    }

    /// Sends `request` with the token; a response that is not a success
    /// becomes [`ClientError::Api`] with the problem's detail.
    pub(crate) async fn response(
        &self,
        mut request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
        let detail = serde_json::from_slice::<ProblemBody>(&bytes)
            .ok()
            .and_then(|p| p.detail.or(p.title))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(500).collect());
        Err(ClientError::Api {
            status: status.as_u16(),
            detail,
        })
    }

    pub(crate) async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = self.response(request).await?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Api {
            status: status.as_u16(),
            detail: format!("unexpected response: {e}"),
        })
    }
}
