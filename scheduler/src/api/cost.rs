//! `GET /v1/cost?since=&until=&tenant=&model=&task=&by=`: the cost stream
//! summed by tenant, model, day or task (docs/adr/0024-cost-summary.md).
//!
//! A token sees its own tenant's costs only (ADR 0036): naming another
//! tenant is a 404, as naming one that does not exist is, and so is naming
//! a task that is not the caller's. An admin token sees every tenant's.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use shoal_shared::store::StoreError;
use shoal_shared::task::TaskId;

use super::auth::Tenant;
use super::openapi::PROBLEM;
use super::{AppState, Problem};
use crate::cost::{self, BudgetLeft, CostSummary, Filter, Summer, DEFAULT_BY};
use shoal_shared::store::spend;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CostQuery {
    /// Entries recorded at or after this: an RFC 3339 time or a duration
    /// before now (`90m`, `24h`, `7d`; units s, m, h, d, w). Default: the
    /// oldest entry kept.
    since: Option<String>,
    /// Entries recorded before this (same forms as `since`). Default: now.
    until: Option<String>,
    /// Only this tenant's costs (a token sees its own tenant's only; another is 404).
    tenant: Option<String>,
    /// Only this model profile's costs.
    model: Option<String>,
    /// Only this task's costs (a task id).
    task: Option<String>,
    /// Grouping keys, comma-separated, in order: `tenant`, `model`, `day`,
    /// `task`; empty for the total only. Default `tenant,model,day`.
    by: Option<String>,
}

fn bad(field: &str, detail: String) -> Problem {
    Problem::bad_request(format!("{field}: {detail}")).with_field(field)
}

/// `GET /v1/cost`: the cost stream summed by the `by` keys.
#[utoipa::path(
    get,
    path = "/v1/cost",
    tag = "cost",
    operation_id = "cost_summary",
    security(("bearer" = [])),
    params(CostQuery),
    responses(
        (status = 200, description = "The summary", body = CostSummary),
        (status = 400, description = "A bad parameter (`field` names it) or an unknown one", body = Problem, content_type = PROBLEM),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 404, description = "`tenant` names another tenant than the token's, or `task` a task that is not the token's tenant's (or none)", body = Problem, content_type = PROBLEM),
        (status = 500, description = "Stored data is damaged", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn summary(
    State(state): State<AppState>,
    tenant: Tenant,
    query: Result<Query<CostQuery>, QueryRejection>,
) -> Result<Json<CostSummary>, Problem> {
    let Query(query) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    let now = chrono::Utc::now();
    let time = |field: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|text| cost::parse_time(text, now).map_err(|e| bad(field, e)))
            .transpose()
    };
    let since = time("since", &query.since)?;
    let until = time("until", &query.until)?.unwrap_or(now);
    if since.is_some_and(|since| since > until) {
        return Err(bad("since", "is after until".to_owned()));
    }
    let by = cost::parse_by(query.by.as_deref().unwrap_or(DEFAULT_BY)).map_err(|e| bad("by", e))?;
    // Under a tenant token, `task=` must name a task of the caller's: its
    // record, or (the record expired) its own cost entries. Another tenant's
    // task and one that does not exist are the same 404.
    let mut unseen_task = None;
    if let Some(task) = &query.task {
        let id = task
            .parse::<TaskId>()
            .map_err(|e| bad("task", e.to_string()))?;
        if let Some(own) = &tenant.name {
            let record = state.store.get(&id).await.map_err(store_problem)?;
            if record.is_none_or(|r| r.tenant != *own) {
                unseen_task = Some(id);
            }
        }
    }
    let tenant_filter = tenant.scope(query.tenant)?;
    let filter = Filter {
        tenant: tenant_filter,
        model: query.model,
        task: query.task,
    };
    let since_ms = since.map_or(0, |t| u64::try_from(t.timestamp_millis()).unwrap_or(0));
    let until_ms = u64::try_from(until.timestamp_millis()).unwrap_or(0);
    let mut summer = Summer::new(by, filter);
    state
        .store
        .visit_costs(since_ms, until_ms, |record| summer.add(&record))
        .await
        .map_err(store_problem)?;
    let retained_since = state
        .store
        .costs_retained_since()
        .await
        .map_err(store_problem)?
        .and_then(|ms| i64::try_from(ms).ok())
        .and_then(chrono::DateTime::from_timestamp_millis);
    let mut summary = summer.finish(since, until, retained_since);
    // The budgets left, for one tenant: the token's, or the one named.
    if let Some(name) = &summary.tenant {
        let limits = state.tenants.limits(name);
        let spend = state
            .store
            .tenant_spend(name, now)
            .await
            .map_err(store_problem)?;
        summary.budgets = spend::lines(limits, spend, now)
            .iter()
            .map(BudgetLeft::of)
            .collect();
    }
    if let Some(id) = unseen_task.filter(|_| summary.total.calls == 0) {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "task-not-found",
            "Task not found",
            format!("no task {id}"),
        ));
    }
    Ok(Json(summary))
}

fn store_problem(error: StoreError) -> Problem {
    match error {
        StoreError::Corrupt(_) => {
            tracing::error!(%error, "cost summary refused: stored data is damaged");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "stored-data-damaged",
                "Stored data is damaged",
                error.to_string(),
            )
        }
        StoreError::Redis(_) => Problem::store_unavailable(&error),
    }
}
