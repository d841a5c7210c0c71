//! The OpenAPI 3.1 document, served unauthenticated at `GET /openapi.json`
//! (docs/adr/0030-openapi.md). It is derived with `utoipa` from the handlers'
//! `#[utoipa::path]` annotations and the API types' `ToSchema` derives.
//!
//! # Adding a route
//!
//! 1. Annotate the handler with `#[utoipa::path(...)]`: method, `path` exactly
//!    as in the router (`/v1/tasks/{id}`), `tag`, `params(...)` for path,
//!    query and header parameters, `request_body`, every status it can
//!    answer — errors as `body = Problem, content_type = PROBLEM` (see
//!    `tasks::submit`) — and `security(("bearer" = []))` unless the route is
//!    unauthenticated like `/healthz`.
//! 2. Derive `utoipa::ToSchema` on its request and response types.
//! 3. Name the handler in `paths(...)` below (and any schema utoipa cannot
//!    reach by itself in `components(schemas(...))`).
//!
//! `every_route_in_the_router_is_documented` (below) fails when a
//! `.route(...)` in `mod.rs` has a path or method the document lacks, and
//! `tests/tests/openapi.rs` checks the served document against the OpenAPI
//! 3.1 meta-schema and real responses against it; `tests/fuzz-api.sh`
//! (schemathesis, in `make test`) fuzzes every operation.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{cost, dead, events, health, list, problem, tasks, workers};

/// The media type of every error body (RFC 9457).
pub const PROBLEM: &str = "application/problem+json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Shoal scheduler API",
        description = "Submit, follow, cancel and account for Shoal tasks. Errors are \
                       RFC 9457 problem details (`application/problem+json`). With \
                       tokens configured every `/v1` route needs `Authorization: Bearer \
                       <token>` and sees its own tenant only; without, the API is open."
    ),
    paths(
        tasks::submit,
        tasks::submit_batch,
        list::list,
        tasks::get,
        tasks::cancel,
        events::events,
        cost::summary,
        dead::list,
        dead::get,
        dead::replay,
        dead::purge,
        dead::replay_bulk,
        dead::purge_bulk,
        workers::list,
        workers::fleet,
        health::healthz,
        health::readyz,
        health::metrics,
        document,
    ),
    components(schemas(problem::Problem, events::StoredEvent, events::GoingAway)),
    modifiers(&BearerAuth),
    tags(
        (name = "tasks", description = "Submit, read and cancel tasks"),
        (name = "events", description = "A task's event log: JSON pages or a live Server-Sent Events stream"),
        (name = "cost", description = "LLM cost summaries"),
        (name = "dead", description = "Dead letters: list, read, replay as a new task, purge"),
        (name = "fleet", description = "Live workers (from their heartbeats) and the fleet summary"),
        (name = "operations", description = "Probes, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// The `bearer` security scheme the `/v1` routes name.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from `scheduler.tokens` or `scheduler.tokens_file`; \
                         not needed when none is configured",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as served, rendered once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    serde_json::to_string_pretty(&document_value()).expect("the OpenAPI document serializes")
});

/// The document as served: utoipa's, with the variants of internally
/// tagged enums over `deny_unknown_fields` structs sealed (see [`seal`]).
pub fn document_value() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
    let schemas = doc["components"]["schemas"].clone();
    seal(&mut doc, &schemas);
    link_submissions(&mut doc);
    doc
}

/// OpenAPI links from a submission's answer to the operations on that task
/// (utoipa's `path` macro has no `links`): a client generator, and
/// schemathesis's stateful phase, follow them with the new task's `id`.
fn link_submissions(doc: &mut Value) {
    let on_task = |operation: &str| {
        serde_json::json!({
            "operationId": operation,
            "parameters": {"id": "$response.body#/id"},
        })
    };
    let links = serde_json::json!({
        "GetTask": on_task("get_task"),
        "TaskEvents": on_task("task_events"),
        "CancelTask": on_task("cancel_task"),
    });
    for status in ["200", "201"] {
        if let Some(response) = doc
            .pointer_mut(&format!("/paths/~1v1~1tasks/post/responses/{status}"))
            .and_then(Value::as_object_mut)
        {
            response.insert("links".into(), links.clone());
        }
    }
}

/// utoipa writes a variant of `#[serde(tag = "type")] enum TaskKind {
/// Exec(ExecSpec) }` as `allOf: [ExecSpec, {type}]`; with `ExecSpec`'s
/// `additionalProperties: false` (from `deny_unknown_fields`) no instance
/// can match both, as `additionalProperties` does not see a sibling's
/// properties. Such an `allOf` becomes the one object serde accepts: the
/// struct's properties plus the tag, nothing else.
fn seal(node: &mut Value, schemas: &Value) {
    match node {
        Value::Object(map) => {
            if let Some(sealed) = map.get("allOf").and_then(|all| sealed(all, schemas)) {
                map.remove("allOf");
                for (key, value) in sealed {
                    map.entry(key).or_insert(value);
                }
            }
            for value in map.values_mut() {
                seal(value, schemas);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| seal(item, schemas)),
        _ => {}
    }
}

fn sealed(all_of: &Value, schemas: &Value) -> Option<Map<String, Value>> {
    let [first, tag] = all_of.as_array()?.as_slice() else {
        return None;
    };
    let name = first
        .get("$ref")?
        .as_str()?
        .strip_prefix("#/components/schemas/")?;
    let target = schemas.get(name)?.as_object()?;
    if target.get("additionalProperties") != Some(&Value::Bool(false)) {
        return None;
    }
    let tag_properties = tag.get("properties")?.as_object()?;
    let mut merged = target.clone();
    merged.remove("description");
    let properties = merged
        .entry("properties")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()?;
    for (key, value) in tag_properties {
        properties.insert(key.clone(), value.clone());
    }
    let required = merged
        .entry("required")
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()?;
    for key in tag
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if !required.contains(key) {
            required.push(key.clone());
        }
    }
    Some(merged)
}

/// `GET /openapi.json`: this API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object),
    )
)]
pub async fn document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::document_value;

    const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

    /// `(path, method)` of every `.route(...)` in `mod.rs`'s source: the
    /// path literal and each method router (`get(`, `.post(`, ...) inside
    /// the call's parentheses.
    fn routes_in(source: &str) -> BTreeSet<(String, String)> {
        let mut routes = BTreeSet::new();
        let mut rest = source;
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            let mut depth = 1usize;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map(|(i, _)| i)
                .expect("a .route( call closes");
            let call = &rest[..end];
            let path = call
                .split('"')
                .nth(1)
                .expect("a .route( call starts with a path literal");
            let after_path = &call[call.find(path).unwrap() + path.len() + 1..];
            let bytes = after_path.as_bytes();
            for method in METHODS {
                let mut from = 0;
                while let Some(found) = after_path[from..].find(&format!("{method}(")) {
                    let start = from + found;
                    let boundary = start == 0
                        || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
                    if boundary {
                        routes.insert((path.to_owned(), method.to_owned()));
                    }
                    from = start + method.len();
                }
            }
        }
        routes
    }

    fn documented() -> BTreeSet<(String, String)> {
        let doc = document_value();
        let mut routes = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in METHODS {
                if item.get(method).is_some() {
                    routes.insert((path.clone(), method.to_owned()));
                }
            }
        }
        routes
    }

    #[test]
    fn the_route_scanner_reads_layers_and_chained_methods() {
        let source = r#"
            Router::new()
                .route(
                    "/v1/tasks",
                    post(tasks::submit)
                        .layer(submit_layer(Endpoint::Single))
                        .get(list::list),
                )
                .route("/v1/tasks/{id}", get(tasks::get).delete(tasks::delete))
                .route("/x", axum::routing::put(x::post_it))
        "#;
        let found: Vec<_> = routes_in(source).into_iter().collect();
        let expected: Vec<_> = [
            ("/v1/tasks", "get"),
            ("/v1/tasks", "post"),
            ("/v1/tasks/{id}", "delete"),
            ("/v1/tasks/{id}", "get"),
            ("/x", "put"),
        ]
        .into_iter()
        .map(|(p, m)| (p.to_owned(), m.to_owned()))
        .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn every_route_in_the_router_is_documented() {
        let routed = routes_in(include_str!("mod.rs"));
        assert!(
            routed.len() >= 10,
            "the scanner found too few routes: {routed:?}"
        );
        let documented = documented();
        let missing: Vec<_> = routed.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "routes missing from the OpenAPI document (annotate the handler with \
             #[utoipa::path] and list it in api/openapi.rs): {missing:?}"
        );
        let stale: Vec<_> = documented.difference(&routed).collect();
        assert!(
            stale.is_empty(),
            "documented operations the router does not serve: {stale:?}"
        );
    }

    #[test]
    fn the_document_is_openapi_3_1_with_bearer_auth() {
        let doc = document_value();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        // A task kind is one sealed object per variant, tag included.
        let exec = &doc["components"]["schemas"]["TaskKind"]["oneOf"][1];
        assert_eq!(exec["additionalProperties"], false, "{exec}");
        assert_eq!(exec["properties"]["type"]["enum"][0], "exec", "{exec}");
        assert!(exec["properties"]["command"].is_object(), "{exec}");
        assert!(exec.get("allOf").is_none(), "{exec}");
        // Every link names an operation the document has.
        let ids: BTreeSet<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .filter_map(|op| op["operationId"].as_str())
            .collect();
        let links = doc["paths"]["/v1/tasks"]["post"]["responses"]["201"]["links"]
            .as_object()
            .unwrap();
        assert_eq!(links.len(), 3);
        for link in links.values() {
            let target = link["operationId"].as_str().unwrap();
            assert!(
                ids.contains(target),
                "a link to {target}, which is not an operation"
            );
        }
    }
}
