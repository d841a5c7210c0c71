//! Request and response checks against an [`Operation`]: method and path (by
//! finding the operation), parameters (path, query, header, form) coerced to
//! their schema types, bearer auth, content types and JSON bodies.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::http::HeaderMap;
use serde_json::Value;

use super::spec::{In, Operation, Spec};

/// A request that passed the checks, in the form the handlers use.
#[derive(Debug, Default)]
pub struct Incoming {
    pub path: HashMap<String, String>,
    pub query: HashMap<String, Vec<String>>,
    pub json: Value,
    /// Multipart parts by name.
    pub form: HashMap<String, Vec<u8>>,
}

impl Incoming {
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
}

/// A query or path value as the JSON its schema describes.
fn coerce(raw: &str, schema: &Value) -> Value {
    match schema["type"].as_str() {
        Some("number" | "integer") => match raw.parse::<f64>() {
            Ok(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => Value::from(n as i64),
            Ok(n) => {
                serde_json::Number::from_f64(n).map_or(Value::String(raw.into()), Value::Number)
            }
            Err(_) => Value::String(raw.into()),
        },
        Some("boolean") => match raw {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(raw.into()),
        },
        _ => Value::String(raw.into()),
    }
}

/// Checks the `Authorization: Bearer <key>` header; the problems found, and
/// whether the key is the right one.
pub fn check_bearer(headers: &HeaderMap, key: &str) -> (Vec<String>, bool) {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return (
            vec!["no Authorization header (bearer auth is required)".into()],
            false,
        );
    };
    let Ok(value) = value.to_str() else {
        return (vec!["Authorization header is not text".into()], false);
    };
    let mut parts = value.splitn(2, ' ');
    let scheme = parts.next().unwrap_or_default();
    let token = parts.next().unwrap_or_default();
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return (vec!["Authorization is not `Bearer <token>`".into()], false);
    }
    (Vec::new(), token == key)
}

/// Checks a request to `op`; the problems found and the parsed request.
pub async fn check_request(
    spec: &Spec,
    op: &Operation,
    path: HashMap<String, String>,
    raw_query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> (Vec<String>, Incoming) {
    let mut problems = Vec::new();
    let mut incoming = Incoming {
        path,
        ..Incoming::default()
    };
    if let Some(raw) = raw_query.filter(|q| !q.is_empty()) {
        match reqwest::Url::parse(&format!("http://x/?{raw}")) {
            Ok(url) => {
                for (key, value) in url.query_pairs() {
                    incoming
                        .query
                        .entry(key.into_owned())
                        .or_default()
                        .push(value.into_owned());
                }
            }
            Err(error) => problems.push(format!("query does not parse: {error}")),
        }
    }
    for name in incoming.query.keys() {
        if !op
            .params
            .iter()
            .any(|p| p.location == In::Query && &p.name == name)
        {
            problems.push(format!("query parameter {name:?} is not in the spec"));
        }
    }
    for param in &op.params {
        let values: Vec<String> = match param.location {
            In::Path => incoming
                .path
                .get(&param.name)
                .cloned()
                .into_iter()
                .collect(),
            In::Query => incoming.query.get(&param.name).cloned().unwrap_or_default(),
            In::Header => headers
                .get_all(param.name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_owned))
                .collect(),
            In::FormData => continue,
        };
        if values.is_empty() {
            if param.required {
                problems.push(format!(
                    "required {:?} parameter {:?} is missing",
                    param.location, param.name
                ));
            }
            continue;
        }
        let value = if param.schema["type"] == "array" {
            let raw: Vec<String> = if param.explode {
                values
            } else {
                values
                    .iter()
                    .flat_map(|v| v.split(',').map(str::to_owned))
                    .collect()
            };
            Value::Array(
                raw.iter()
                    .map(|v| coerce(v, &param.schema["items"]))
                    .collect(),
            )
        } else {
            if values.len() > 1 {
                problems.push(format!(
                    "parameter {:?} given {} times",
                    param.name,
                    values.len()
                ));
            }
            coerce(&values[0], &param.schema)
        };
        for problem in spec.check(&param.schema, &value) {
            problems.push(format!("parameter {:?}: {problem}", param.name));
        }
    }
    let media = media_type(headers);
    match &op.body {
        None if !body.is_empty() => {
            problems.push("a body was sent but the operation takes none".into())
        }
        None => {}
        Some(spec_body) if body.is_empty() && spec_body.required => {
            problems.push("the required body is missing".into());
        }
        Some(_) if body.is_empty() => {}
        Some(spec_body) => {
            let media = media.unwrap_or_default();
            if !spec_body
                .media_types
                .iter()
                .any(|m| m.eq_ignore_ascii_case(&media))
            {
                problems.push(format!(
                    "content type {media:?} is not one of {:?}",
                    spec_body.media_types
                ));
            } else if media == "application/json" {
                match serde_json::from_slice::<Value>(body) {
                    Ok(json) => {
                        if let Some(schema) = &spec_body.schema {
                            for problem in spec.check(schema, &json) {
                                problems.push(format!("body: {problem}"));
                            }
                        }
                        incoming.json = json;
                    }
                    Err(error) => problems.push(format!("body is not JSON: {error}")),
                }
            } else if media == "multipart/form-data" {
                match parse_multipart(headers, body.clone()).await {
                    Ok(form) => incoming.form = form,
                    Err(error) => problems.push(format!("multipart body does not parse: {error}")),
                }
                for param in op.params.iter().filter(|p| p.location == In::FormData) {
                    if param.required && !incoming.form.contains_key(&param.name) {
                        problems.push(format!("required form field {:?} is missing", param.name));
                    }
                }
                for name in incoming.form.keys() {
                    if !op
                        .params
                        .iter()
                        .any(|p| p.location == In::FormData && &p.name == name)
                    {
                        problems.push(format!("form field {name:?} is not in the spec"));
                    }
                }
            }
        }
    }
    (problems, incoming)
}

async fn parse_multipart(
    headers: &HeaderMap,
    body: Bytes,
) -> Result<HashMap<String, Vec<u8>>, String> {
    use axum::extract::FromRequest;
    let mut request = axum::http::Request::new(axum::body::Body::from(body));
    *request.headers_mut() = headers.clone();
    let mut multipart = axum::extract::Multipart::from_request(request, &())
        .await
        .map_err(|e| e.to_string())?;
    let mut form = HashMap::new();
    while let Some(field) = multipart.next_field().await.map_err(|e| e.to_string())? {
        let name = field.name().unwrap_or_default().to_owned();
        let bytes = field.bytes().await.map_err(|e| e.to_string())?;
        form.insert(name, bytes.to_vec());
    }
    Ok(form)
}

/// Checks a response of `op`; the problems found.
pub fn check_response(
    spec: &Spec,
    op: &Operation,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) -> Vec<String> {
    let code = status.to_string();
    let Some(response) = op
        .responses
        .get(&code)
        .or_else(|| op.responses.get("default"))
    else {
        if (200..400).contains(&status) {
            return vec![format!(
                "status {status} is not a documented response (documented: {:?})",
                op.responses.keys().collect::<Vec<_>>()
            )];
        }
        // Error statuses are not described by these specs.
        return Vec::new();
    };
    if response.media_types.is_empty() {
        return if body.is_empty() {
            Vec::new()
        } else {
            vec![format!(
                "status {status} is documented without a body, but one was sent"
            )]
        };
    }
    let media = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if !response
        .media_types
        .iter()
        .any(|m| m.eq_ignore_ascii_case(&media))
    {
        return vec![format!(
            "response content type {media:?} is not one of {:?}",
            response.media_types
        )];
    }
    let Some(schema) = &response.schema else {
        return Vec::new();
    };
    if media != "application/json" {
        return Vec::new();
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(json) => spec
            .check(schema, &json)
            .into_iter()
            .map(|p| format!("response body: {p}"))
            .collect(),
        Err(error) => vec![format!("response body is not JSON: {error}")],
    }
}
