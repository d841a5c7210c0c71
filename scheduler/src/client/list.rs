//! `GET /v1/tasks` from the client side.

use shoal_shared::store::TaskPage;
use shoal_shared::task::{TaskId, TaskState};

use super::{Client, ClientError};

/// What to list; unset fields match everything.
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    pub states: Vec<TaskState>,
    pub tenant: Option<String>,
    pub kind: Option<String>,
    /// `(key, value)` pairs, all of which must match.
    pub labels: Vec<(String, String)>,
    pub limit: Option<usize>,
    /// A previous page's `next_cursor`.
    pub cursor: Option<TaskId>,
}

impl Client {
    /// One page of tasks, newest first (records without results).
    pub async fn list(&self, query: &ListQuery) -> Result<TaskPage, ClientError> {
        let mut params = form_urlencoded::Serializer::new(String::new());
        if !query.states.is_empty() {
            let names: Vec<&str> = query.states.iter().map(|s| s.as_str()).collect();
            params.append_pair("state", &names.join(","));
        }
        if let Some(tenant) = &query.tenant {
            params.append_pair("tenant", tenant);
        }
        if let Some(kind) = &query.kind {
            params.append_pair("kind", kind);
        }
        for (key, value) in &query.labels {
            params.append_pair("label", &format!("{key}={value}"));
        }
        if let Some(limit) = query.limit {
            params.append_pair("limit", &limit.to_string());
        }
        if let Some(cursor) = &query.cursor {
            params.append_pair("cursor", &cursor.to_string());
        }
        let params = params.finish();
        let path = if params.is_empty() {
            "/v1/tasks".to_owned()
        } else {
            format!("/v1/tasks?{params}")
        };
        self.send(self.http.get(self.url(&path))).await
    }
}
