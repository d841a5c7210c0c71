//! `/v1/tasks`: submit one, submit a batch, read one, cancel one.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use shoal_shared::store::{CancelOutcome, StoreError};
use shoal_shared::task::{TaskId, TaskRecord, TaskRef, TaskSpec};

use super::auth::Tenant;
use super::body::JsonBody;
use super::openapi::PROBLEM;
use super::problem::Cause;
use super::{AppState, Problem};
use crate::metrics::Endpoint;
use crate::submit::{SubmitError, Submitted};

/// The header that makes a submission idempotent (overrides the spec's key).
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// `POST /v1/tasks`: 201 with the queued task; 200 with the existing one on an
/// idempotent replay.
#[utoipa::path(
    post,
    path = "/v1/tasks",
    tag = "tasks",
    operation_id = "submit_task",
    security(("bearer" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header,
         description = "Makes the submission idempotent per tenant (1-256 visible ASCII bytes); overrides the spec's `idempotency_key`"),
    ),
    request_body(content = TaskSpec, content_type = "application/json"),
    responses(
        (status = 201, description = "Queued", body = TaskRecord,
         headers(("Location" = String, description = "The task's URL"))),
        (status = 200, description = "An idempotent replay: the task first submitted with this key", body = TaskRecord,
         headers(("Location" = String, description = "The task's URL"))),
        (status = 400, description = "Malformed JSON or header", body = Problem, content_type = PROBLEM),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 402, description = "The tenant's daily or monthly spend budget is spent (`budget-exceeded`; `Retry-After` is when it resets)", body = Problem, content_type = PROBLEM),
        (status = 403, description = "The token may not submit for the tenant named", body = Problem, content_type = PROBLEM),
        (status = 409, description = "Idempotency key reused with a different body, or its first submission still in progress", body = Problem, content_type = PROBLEM),
        (status = 413, description = "Body or task too large", body = Problem, content_type = PROBLEM),
        (status = 415, description = "Not a JSON content type", body = Problem, content_type = PROBLEM),
        (status = 422, description = "Not a valid task; `field` names where", body = Problem, content_type = PROBLEM),
        (status = 500, description = "Stored data is damaged", body = Problem, content_type = PROBLEM),
        (status = 503, description = "The broker or Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn submit(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    JsonBody(mut spec): JsonBody<TaskSpec>,
) -> Result<Response, Problem> {
    if let Some(key) = headers.get(IDEMPOTENCY_KEY) {
        let key = key
            .to_str()
            .map_err(|_| Problem::bad_request("Idempotency-Key must be visible ASCII"))?;
        spec.idempotency_key = Some(key.to_owned());
    }
    let tenant = tenant.resolve(spec.tenant.as_deref())?;
    spec.tenant = Some(tenant.clone());
    require_store(&state).await?;
    within_budget(&state, &tenant).await?;
    let mut submitted = state
        .submitter
        .submit(vec![spec], &tenant)
        .await
        .map_err(problem_of)?;
    let Submitted { record, created } = submitted.remove(0);
    count(&state, Endpoint::Single, &record, created);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let location = format!("/v1/tasks/{}", record.id);
    Ok((status, [(header::LOCATION, location)], Json(record)).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    tasks: Vec<TaskSpec>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchResponse {
    tasks: Vec<TaskRef>,
}

/// `POST /v1/tasks/batch`: all or nothing, answered with `{id, state,
/// created}` per task in submission order (fetch a record for more). Every spec is validated before any
/// is queued; a 422 names the index and field of the first invalid one.
#[utoipa::path(
    post,
    path = "/v1/tasks/batch",
    tag = "tasks",
    operation_id = "submit_batch",
    security(("bearer" = [])),
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Every task queued (or replayed), in submission order", body = BatchResponse),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 402, description = "The tenant's daily or monthly spend budget is spent (`budget-exceeded`; `Retry-After` is when it resets)", body = Problem, content_type = PROBLEM),
        (status = 403, description = "The token may not submit for the tenant named", body = Problem, content_type = PROBLEM),
        (status = 409, description = "Idempotency key reused with a different body, or in progress; `index` names the task", body = Problem, content_type = PROBLEM),
        (status = 413, description = "Body, batch or one task too large", body = Problem, content_type = PROBLEM),
        (status = 415, description = "Not a JSON content type", body = Problem, content_type = PROBLEM),
        (status = 422, description = "A task is invalid (`index` and `field` name it), the batch is empty, or mixes tenants", body = Problem, content_type = PROBLEM),
        (status = 500, description = "Stored data is damaged", body = Problem, content_type = PROBLEM),
        (status = 503, description = "The broker or Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn submit_batch(
    State(state): State<AppState>,
    tenant: Tenant,
    JsonBody(request): JsonBody<BatchRequest>,
) -> Result<(StatusCode, Json<BatchResponse>), Problem> {
    if request.tasks.is_empty() {
        return Err(Problem::unprocessable("`tasks` must not be empty").with_field("tasks"));
    }
    if request.tasks.len() > state.max_batch {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch-too-large",
            "Batch too large",
            format!(
                "{} tasks in one batch; at most {} are accepted",
                request.tasks.len(),
                state.max_batch
            ),
        ));
    }
    // Resolve every tenant first: a batch belongs to one caller.
    let mut tenant_name = None;
    let mut specs = request.tasks;
    for (index, spec) in specs.iter_mut().enumerate() {
        let resolved = tenant
            .resolve(spec.tenant.as_deref())
            .map_err(|p| p.with_index(index))?;
        match &tenant_name {
            None => tenant_name = Some(resolved.clone()),
            Some(first) if *first != resolved => {
                return Err(
                    Problem::unprocessable("all tasks of a batch must have one tenant")
                        .with_index(index)
                        .with_field("tenant"),
                )
            }
            Some(_) => {}
        }
        spec.tenant = Some(resolved);
    }
    let tenant_name = tenant_name.unwrap_or_else(|| "default".to_owned());
    require_store(&state).await?;
    within_budget(&state, &tenant_name).await?;
    let submitted = state
        .submitter
        .submit(specs, &tenant_name)
        .await
        .map_err(problem_of)?;
    state.metrics.batch_size.observe(submitted.len() as f64);
    for s in &submitted {
        count(&state, Endpoint::Batch, &s.record, s.created);
    }
    Ok((
        StatusCode::CREATED,
        Json(BatchResponse {
            tasks: submitted
                .into_iter()
                .map(|s| TaskRef {
                    id: s.record.id,
                    state: s.record.state,
                    created: s.created,
                })
                .collect(),
        }),
    ))
}

/// `GET /v1/tasks/{id}`.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    operation_id = "get_task",
    security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, description = "The task id (a UUID)")),
    responses(
        (status = 200, description = "The task's record", body = TaskRecord),
        (status = 400, description = "`id` is not a UUID", body = Problem, content_type = PROBLEM),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such task (or another tenant's)", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<TaskRecord>, Problem> {
    let id = parse_id(&id)?;
    Ok(Json(own_record(&state, &tenant, &id).await?))
}

/// `POST /v1/tasks/{id}/cancel`: 200 with the record when the task had not
/// started (it is `cancelled` now); 202 when a worker holds it (it stops
/// within about a second; poll the task or follow its events); 409 when it
/// had already finished.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/cancel",
    tag = "tasks",
    operation_id = "cancel_task",
    security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, description = "The task id (a UUID)")),
    responses(
        (status = 200, description = "Cancelled before it started", body = TaskRecord),
        (status = 202, description = "A worker holds it and stops it within about a second", body = TaskRecord),
        (status = 400, description = "`id` is not a UUID", body = Problem, content_type = PROBLEM),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such task (or another tenant's)", body = Problem, content_type = PROBLEM),
        (status = 409, description = "The task already finished", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    own_record(&state, &tenant, &id).await?;
    let by = tenant.actor();
    let outcome = state
        .store
        .request_cancel(&id, "scheduler", &by)
        .await
        .map_err(|e| Problem::store_unavailable(&e))?;
    let status = match outcome {
        CancelOutcome::Cancelled => StatusCode::OK,
        CancelOutcome::Requested { .. } => StatusCode::ACCEPTED,
        CancelOutcome::Finished { state } => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "task-finished",
                "Task already finished",
                format!("task {id} already finished: {state}"),
            ))
        }
        CancelOutcome::Missing => return Err(not_found(&id)),
    };
    let record = own_record(&state, &tenant, &id).await?;
    Ok((status, Json(record)).into_response())
}

/// Counts one task of an accepted submission: queued, or replayed.
fn count(state: &AppState, endpoint: Endpoint, record: &TaskRecord, created: bool) {
    if created {
        let kind = match record.kind.as_str() {
            "agent" => "agent",
            "exec" => "exec",
            _ => "other",
        };
        state
            .metrics
            .submitted(endpoint, kind, record.priority.as_str(), &record.tenant);
    } else {
        state.metrics.replayed(endpoint, &record.tenant);
    }
}

pub(super) fn parse_id(id: &str) -> Result<TaskId, Problem> {
    id.parse()
        .map_err(|e: shoal_shared::task::ParseTaskIdError| Problem::bad_request(e.to_string()))
}

fn not_found(id: &TaskId) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "task-not-found",
        "Task not found",
        format!("no task {id}"),
    )
}

/// The task's record, if it is the tenant's: a tenant sees only its own tasks.
async fn own_record(state: &AppState, tenant: &Tenant, id: &TaskId) -> Result<TaskRecord, Problem> {
    let record = state
        .store
        .get(id)
        .await
        .map_err(|e| Problem::store_unavailable(&e))?
        .ok_or_else(|| not_found(id))?;
    if !tenant.sees(&record.tenant) {
        return Err(not_found(id));
    }
    Ok(record)
}

/// Refuses a submission while Redis does not answer (ADR 0032): a task
/// published now could not be recorded, and a client told `201` could not
/// read it back. One PING, bounded by `redis.command_timeout_ms`. Redis
/// failing after it is ADR 0003's case: the task is queued, the worker
/// records it.
/// Refuses a submission of a tenant whose daily or monthly spend budget is
/// spent (ADR 0038): every task, exec ones too.
async fn within_budget(state: &AppState, tenant: &str) -> Result<(), Problem> {
    let limits = state.tenants.limits(tenant);
    let line = state
        .store
        .budget_exceeded(tenant, limits)
        .await
        .map_err(|e| Problem::store_unavailable(&e))?;
    let Some(line) = line else {
        return Ok(());
    };
    tracing::info!(
        tenant,
        period = line.period.name(),
        limit_micros = line.limit.0,
        spent_micros = line.spent.0,
        "submission refused: the tenant's budget is spent"
    );
    let wait = (line.resets_at - chrono::Utc::now()).num_seconds().max(1);
    let mut problem = Problem::new(
        StatusCode::PAYMENT_REQUIRED,
        "budget-exceeded",
        "Budget exceeded",
        format!("{}; no new tasks until then", line.describe(tenant)),
    );
    problem.retry_after_s = Some(u32::try_from(wait).unwrap_or(u32::MAX));
    Err(problem)
}

async fn require_store(state: &AppState) -> Result<(), Problem> {
    state
        .store
        .ping()
        .await
        .map_err(|e| Problem::store_unavailable(&e))
}

pub(super) fn unavailable(detail: String) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Service unavailable",
        detail,
    )
}

fn problem_of(error: SubmitError) -> Problem {
    match error {
        SubmitError::Invalid { index, error } => Problem::unprocessable(error.to_string())
            .with_field(error.field)
            .with_index(index),
        SubmitError::TooLarge { index, .. } => Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "task-too-large",
            "Task too large",
            error.to_string(),
        )
        .with_index(index),
        SubmitError::Conflict { index, .. } => Problem::new(
            StatusCode::CONFLICT,
            "idempotency-key-reused",
            "Idempotency key reused with a different body",
            error.to_string(),
        )
        .with_index(index),
        SubmitError::InProgress { .. } => Problem::new(
            StatusCode::CONFLICT,
            "idempotency-in-progress",
            "Submission in progress",
            error.to_string(),
        ),
        SubmitError::Store(StoreError::Corrupt(_)) => {
            tracing::error!(%error, "submission refused: stored data is damaged");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "stored-data-damaged",
                "Stored data is damaged",
                error.to_string(),
            )
        }
        SubmitError::Publish(_) => {
            tracing::warn!(%error, "submission failed");
            unavailable(error.to_string()).with_cause(Cause::Broker)
        }
        SubmitError::Store(_) => Problem::store_unavailable(&error),
    }
}
