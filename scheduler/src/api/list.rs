//! `GET /v1/tasks`: find tasks by state, tenant, kind and labels, newest
//! first, a page at a time (ADR 0012).

use std::collections::BTreeMap;

use axum::extract::{RawQuery, State};

use axum::Json;
use shoal_shared::store::{TaskFilter, TaskPage};
use shoal_shared::task::{TaskId, TaskState};

use super::auth::Tenant;
use super::openapi::PROBLEM;
use super::tasks::parse_id;
use super::{AppState, Problem};

/// Tasks per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 50;
/// The most tasks one page returns.
pub const MAX_LIMIT: usize = 1000;

/// `GET /v1/tasks?state=&tenant=&kind=&label=k=v&limit=&cursor=`: a page of
/// task records (without results), newest first; `next_cursor` continues.
/// `state` takes a comma-separated list, `label` repeats (all must match).
/// Under tokens a caller lists its own tenant only; another tenant is 404.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    operation_id = "list_tasks",
    security(("bearer" = [])),
    params(
        ("state" = Option<String>, Query,
         description = "Only tasks in these states, comma-separated (`queued,running`); the parameter may repeat"),
        ("tenant" = Option<String>, Query,
         description = "Only this tenant's tasks; under tokens, the caller's own tenant (another is 404)"),
        ("kind" = Option<String>, Query, description = "Only `exec` or only `agent` tasks"),
        ("label" = Option<Vec<String>>, Query, explode = true,
         description = "`key=value`; repeat for several, all must match"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000,
         description = "Tasks per page (default 50, at most 1000)"),
        ("cursor" = Option<String>, Query,
         description = "A page's `next_cursor`: continue after it (only older tasks)"),
    ),
    responses(
        (status = 200, description = "A page of tasks, newest first, without results; `next_cursor` when more may match", body = TaskPage),
        (status = 400, description = "A bad or unknown parameter (`field` names it)", body = Problem, content_type = PROBLEM),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 404, description = "Another tenant than the token's", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    RawQuery(raw): RawQuery,
) -> Result<Json<TaskPage>, Problem> {
    let query = ListQuery::parse(raw.as_deref().unwrap_or(""))?;
    let scope = tenant.scope(query.tenant)?;
    let filter = TaskFilter {
        tenant: scope,
        states: query.states,
        kind: query.kind,
        labels: query.labels,
    };
    let page = state
        .store
        .list(&filter, query.cursor.as_ref(), query.limit)
        .await
        .map_err(|e| Problem::store_unavailable(&e))?;
    Ok(Json(page))
}

/// The listing's parameters, read by hand: `label` repeats, which a derived
/// query struct cannot collect.
#[derive(Debug, Default, PartialEq)]
struct ListQuery {
    states: Vec<TaskState>,
    tenant: Option<String>,
    kind: Option<String>,
    labels: BTreeMap<String, String>,
    limit: usize,
    cursor: Option<TaskId>,
}

impl ListQuery {
    fn parse(raw: &str) -> Result<Self, Problem> {
        let bad = |name: &str, detail: String| Problem::bad_request(detail).with_field(name);
        let mut query = Self {
            limit: DEFAULT_LIMIT,
            ..Self::default()
        };
        for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
            match &*name {
                "state" => {
                    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        let parsed = part.parse::<TaskState>().map_err(|_| {
                            let known: Vec<&str> =
                                TaskState::ALL.iter().map(|s| s.as_str()).collect();
                            bad(
                                "state",
                                format!("unknown state {part:?}: use one of {}", known.join(", ")),
                            )
                        })?;
                        if !query.states.contains(&parsed) {
                            query.states.push(parsed);
                        }
                    }
                }
                "tenant" => query.tenant = Some(value.into_owned()),
                "kind" => match &*value {
                    "exec" | "agent" => query.kind = Some(value.into_owned()),
                    other => {
                        return Err(bad(
                            "kind",
                            format!("unknown kind {other:?}: use exec or agent"),
                        ))
                    }
                },
                "label" => {
                    let Some((key, label)) = value.split_once('=') else {
                        return Err(bad(
                            "label",
                            format!("label {value:?} must be key=value"),
                        ));
                    };
                    query.labels.insert(key.to_owned(), label.to_owned());
                }
                "limit" => {
                    query.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            bad(
                                "limit",
                                format!("limit must be a number from 1 to {MAX_LIMIT}"),
                            )
                        })?;
                }
                "cursor" => {
                    query.cursor = Some(
                        parse_id(&value)
                            .map_err(|_| bad("cursor", format!("cursor {value:?} is not a task id: pass a page's next_cursor")))?,
                    );
                }
                other => {
                    return Err(bad(
                        other,
                        format!(
                            "unknown parameter {other:?}: use state, tenant, kind, label, limit or cursor"
                        ),
                    ))
                }
            }
        }
        Ok(query)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_is_read() {
        let id = TaskId::new();
        let query = ListQuery::parse(&format!(
            "state=queued,running&state=failed&tenant=acme&kind=agent&label=team%3Dsearch&label=run=7&limit=20&cursor={id}"
        ))
        .unwrap();
        assert_eq!(
            query.states,
            vec![TaskState::Queued, TaskState::Running, TaskState::Failed]
        );
        assert_eq!(query.tenant.as_deref(), Some("acme"));
        assert_eq!(query.kind.as_deref(), Some("agent"));
        assert_eq!(query.labels.get("team").map(String::as_str), Some("search"));
        assert_eq!(query.labels.get("run").map(String::as_str), Some("7"));
        assert_eq!(query.limit, 20);
        assert_eq!(query.cursor, Some(id));
        assert_eq!(ListQuery::parse("").unwrap().limit, DEFAULT_LIMIT);
    }

    #[test]
    fn bad_parameters_name_the_field() {
        for (raw, field) in [
            ("state=sleeping", "state"),
            ("kind=teleport", "kind"),
            ("label=nokey", "label"),
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("cursor=nope", "cursor"),
            ("before=x", "before"),
        ] {
            let problem = ListQuery::parse(raw).unwrap_err();
            assert_eq!(problem.field.as_deref(), Some(field), "{raw}");
            assert_eq!(
                problem.status,
                axum::http::StatusCode::BAD_REQUEST.as_u16(),
                "{raw}"
            );
        }
    }
}
