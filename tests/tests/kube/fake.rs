//! A fake Kubernetes API server for one thing: `PATCH` of a pod, the way the
//! real one answers it. It checks the Bearer token (401 `Unauthorized`
//! Status otherwise), the patch media type (415 like kube-apiserver for a
//! type it does not take), the pod (404 `NotFound` Status), applies a JSON
//! merge patch (RFC 7386) to the pod's metadata, validates the
//! pod-deletion-cost annotation as the API server does (an int32, else 422
//! `Invalid`), and answers with the whole Pod. It can be told to fail every
//! request with a status, as a broken or unauthorised server would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

pub const ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct Seen {
    pub status: u16,
    /// The token the request carried.
    pub token: Option<String>,
    /// The annotation the patch set, when it set it.
    pub cost: Option<String>,
}

#[derive(Default)]
struct Inner {
    token: String,
    /// (namespace, name) -> metadata.
    pods: BTreeMap<(String, String), Value>,
    resource_version: u64,
    fail_with: Option<u16>,
    seen: Vec<Seen>,
}

#[derive(Clone)]
pub struct FakeKube {
    inner: Arc<Mutex<Inner>>,
    pub url: String,
}

impl FakeKube {
    /// Serves on a free loopback port; accepts `token`; knows `pods`
    /// (namespace, name).
    pub async fn start(token: &str, pods: &[(&str, &str)]) -> Self {
        let mut inner = Inner {
            token: token.to_owned(),
            ..Inner::default()
        };
        for (namespace, name) in pods {
            inner.pods.insert(
                (namespace.to_string(), name.to_string()),
                json!({
                    "name": name,
                    "namespace": namespace,
                    "uid": uuid::Uuid::now_v7().to_string(),
                    "labels": { "app.kubernetes.io/component": "worker" },
                    "annotations": {},
                }),
            );
        }
        let inner = Arc::new(Mutex::new(inner));
        let app = axum::Router::new()
            .route(
                "/api/v1/namespaces/{namespace}/pods/{name}",
                axum::routing::patch(patch_pod),
            )
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Self {
            inner,
            url: format!("http://{addr}"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("fake state")
    }

    /// The token accepted from now on (the old one gets 401).
    pub fn rotate_token(&self, token: &str) {
        self.lock().token = token.to_owned();
    }

    /// Every request fails with `status` (a Status body), or none does.
    pub fn fail_with(&self, status: Option<u16>) {
        self.lock().fail_with = status;
    }

    /// The pod's deletion-cost annotation as stored.
    pub fn cost(&self, namespace: &str, name: &str) -> Option<String> {
        self.lock()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .and_then(|m| m["annotations"][ANNOTATION].as_str().map(str::to_owned))
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        Json(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        })),
    )
        .into_response()
}

async fn patch_pod(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let mut inner = inner.lock().expect("fake state");
    let (response, cost) = answer(
        &mut inner,
        &namespace,
        &name,
        &headers,
        token.as_deref(),
        &body,
    );
    let code = response.status().as_u16();
    inner.seen.push(Seen {
        status: code,
        token,
        cost,
    });
    response
}

fn answer(
    inner: &mut Inner,
    namespace: &str,
    name: &str,
    headers: &HeaderMap,
    token: Option<&str>,
    body: &[u8],
) -> (Response, Option<String>) {
    if token != Some(inner.token.as_str()) {
        return (
            status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Unauthorized".into(),
            ),
            None,
        );
    }
    if let Some(code) = inner.fail_with {
        let code = StatusCode::from_u16(code).expect("a status");
        let (reason, message) = match code.as_u16() {
            403 => (
                "Forbidden",
                format!(
                    "pods \"{name}\" is forbidden: User \"system:serviceaccount:{namespace}:shoal-worker\" \
                     cannot patch resource \"pods\" in API group \"\" in the namespace \"{namespace}\""
                ),
            ),
            _ => ("InternalError", "Internal error occurred: etcdserver: request timed out".into()),
        };
        return (status(code, reason, message), None);
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    if media_type != "application/merge-patch+json" {
        // kube-apiserver takes json-patch, strategic-merge-patch and
        // apply-patch too; this fake implements merge patch only, and
        // answers anything else as the server answers an unknown type.
        return (
            status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: \
                     application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml \
                     (got {content_type:?})"
                ),
            ),
            None,
        );
    }
    let Some(metadata) = inner
        .pods
        .get(&(namespace.to_owned(), name.to_owned()))
        .cloned()
    else {
        return (
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("pods \"{name}\" not found"),
            ),
            None,
        );
    };
    let patch: Value = match serde_json::from_slice(body) {
        Ok(patch) => patch,
        Err(error) => {
            return (
                status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("error decoding patch: {error}"),
                ),
                None,
            )
        }
    };
    let mut pod = json!({ "metadata": metadata });
    merge_patch(&mut pod, &patch);
    let cost = patch["metadata"]["annotations"][ANNOTATION]
        .as_str()
        .map(str::to_owned);
    if let Some(value) = pod["metadata"]["annotations"][ANNOTATION].as_str() {
        if value.parse::<i32>().is_err() {
            return (
                status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    format!(
                        "Pod \"{name}\" is invalid: metadata.annotations[{ANNOTATION}]: Invalid value: \"{value}\": must be a 32bit integer"
                    ),
                ),
                None,
            );
        }
    }
    inner.resource_version += 1;
    pod["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
    inner.pods.insert(
        (namespace.to_owned(), name.to_owned()),
        pod["metadata"].clone(),
    );
    let full = json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": pod["metadata"],
        "spec": { "containers": [{ "name": "worker", "image": "shoal:test" }] },
        "status": { "phase": "Running" },
    });
    ((StatusCode::OK, Json(full)).into_response(), cost)
}

/// RFC 7386: objects merge, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(object) = target else {
        unreachable!("made an object above")
    };
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}
