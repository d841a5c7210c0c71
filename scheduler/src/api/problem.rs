//! Errors as RFC 9457 problem details (`application/problem+json`).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::metrics::RefusalReason;

/// An HTTP error with a machine-readable type and a human-readable detail
/// (RFC 9457 problem details, `application/problem+json`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `urn:shoal:problem:<name>`, e.g. `urn:shoal:problem:task-not-found`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the problem type.
    pub title: &'static str,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong, for a person.
    pub detail: String,
    /// For validation problems: the JSON path of the offending field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For batch validation problems: the index of the offending task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// Seconds the client should wait before trying again (`Retry-After`).
    #[serde(skip)]
    pub retry_after_s: Option<u32>,
    /// What failed, for the refusal metrics' `reason` label when it should
    /// be finer than the type (a 503: the broker or the store).
    #[serde(skip)]
    pub cause: Option<Cause>,
}

/// A dependency whose failure refused a request (one byte: `Problem` stays small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Broker,
    Store,
}

impl Cause {
    /// The metrics' `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Broker => "broker-unavailable",
            Self::Store => "store-unavailable",
        }
    }
}

impl Problem {
    pub fn new(
        status: StatusCode,
        kind: &str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind: format!("urn:shoal:problem:{kind}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            field: None,
            index: None,
            retry_after_s: None,
            cause: None,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed-request",
            "Malformed request",
            detail,
        )
    }

    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-task",
            "Invalid task",
            detail,
        )
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn with_index(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    pub fn with_cause(mut self, cause: Cause) -> Self {
        self.cause = Some(cause);
        self
    }

    pub fn with_retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    /// Redis (the task store) failed or did not answer within
    /// `redis.command_timeout_ms`: a 503 that says so and when to come back
    /// (ADR 0032). The scheduler reconnects by itself.
    pub fn store_unavailable(error: &dyn std::fmt::Display) -> Self {
        tracing::warn!(%error, "request refused: redis is unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis-unavailable",
            "Redis is unavailable",
            format!("the task store (Redis) is unavailable, try again later: {error}"),
        )
        .with_cause(Cause::Store)
        .with_retry_after(UNAVAILABLE_RETRY_S)
    }
}

/// What a client refused because a dependency is away is told to wait, in
/// seconds, unless the refusal names its own wait.
pub const UNAVAILABLE_RETRY_S: u32 = 5;

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let reason = match self.cause {
            Some(cause) => cause.reason().to_owned(),
            None => self
                .kind
                .rsplit(':')
                .next()
                .unwrap_or(&self.kind)
                .to_owned(),
        };
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response();
        response.extensions_mut().insert(RefusalReason(reason));
        // Every 503 says when to come back.
        let retry_after = self
            .retry_after_s
            .or((status == StatusCode::SERVICE_UNAVAILABLE).then_some(UNAVAILABLE_RETRY_S));
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}

pub async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no such route",
    )
}
