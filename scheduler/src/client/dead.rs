//! `/v1/dead` from the client side: dead letters, replay and purge.

use serde::{Deserialize, Serialize};
use shoal_shared::store::dead_letters::{DeadLetter, DeadPage};
use shoal_shared::task::{TaskId, TaskRecord};

use super::{percent_encode, Client, ClientError};

/// Which dead letters to list; unset fields match everything.
#[derive(Debug, Default, Clone)]
pub struct DeadQuery {
    pub reason: Option<String>,
    pub tenant: Option<String>,
    pub limit: Option<usize>,
    /// A previous page's `next_cursor`.
    pub cursor: Option<String>,
}

/// A dead letter replayed as a new task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replayed {
    pub dead_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<TaskId>,
    pub task: TaskRecord,
}

/// A dead letter a bulk replay left alone, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub dead_id: String,
    pub detail: String,
}

/// What a bulk replay did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BulkReplayed {
    pub replayed: Vec<Replayed>,
    pub skipped: Vec<Skipped>,
}

/// What a bulk purge did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BulkPurged {
    pub purged: Vec<String>,
}

#[derive(Serialize)]
struct Bulk<'a> {
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
}

impl Client {
    /// One page of dead letters, newest first.
    pub async fn dead_list(&self, query: &DeadQuery) -> Result<DeadPage, ClientError> {
        let mut params = form_urlencoded::Serializer::new(String::new());
        if let Some(reason) = &query.reason {
            params.append_pair("reason", reason);
        }
        if let Some(tenant) = &query.tenant {
            params.append_pair("tenant", tenant);
        }
        if let Some(limit) = query.limit {
            params.append_pair("limit", &limit.to_string());
        }
        if let Some(cursor) = &query.cursor {
            params.append_pair("cursor", cursor);
        }
        let params = params.finish();
        let path = if params.is_empty() {
            "/v1/dead".to_owned()
        } else {
            format!("/v1/dead?{params}")
        };
        self.send(self.http.get(self.url(&path))).await
    }

    /// One dead letter, by its id or its task's id.
    pub async fn dead_get(&self, id: &str) -> Result<DeadLetter, ClientError> {
        let url = self.url(&format!("/v1/dead/{}", percent_encode(id)));
        self.send(self.http.get(url)).await
    }

    /// Replays a dead letter as a new task (labelled `replay_of`).
    pub async fn dead_replay(&self, id: &str) -> Result<Replayed, ClientError> {
        let url = self.url(&format!("/v1/dead/{}/replay", percent_encode(id)));
        self.send(self.http.post(url)).await
    }

    /// Removes a dead letter without running it.
    pub async fn dead_purge(&self, id: &str) -> Result<(), ClientError> {
        let url = self.url(&format!("/v1/dead/{}", percent_encode(id)));
        self.response(self.http.delete(url)).await?;
        Ok(())
    }

    /// Replays up to `limit` dead letters with `reason` (newest first).
    pub async fn dead_replay_all(
        &self,
        reason: &str,
        tenant: Option<&str>,
        limit: Option<usize>,
    ) -> Result<BulkReplayed, ClientError> {
        let body = Bulk {
            reason,
            tenant,
            limit,
        };
        self.send(self.http.post(self.url("/v1/dead/replay")).json(&body))
            .await
    }

    /// Purges up to `limit` dead letters with `reason` (newest first).
    pub async fn dead_purge_all(
        &self,
        reason: &str,
        tenant: Option<&str>,
        limit: Option<usize>,
    ) -> Result<BulkPurged, ClientError> {
        let body = Bulk {
            reason,
            tenant,
            limit,
        };
        self.send(self.http.post(self.url("/v1/dead/purge")).json(&body))
            .await
    }
}
