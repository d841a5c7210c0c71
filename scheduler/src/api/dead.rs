//! `/v1/dead`: dead letters — list, read, replay as a new task, purge
//! (docs/adr/0027-dead-letters.md).
//!
//! A dead letter's id is its log entry id (`1733222222222-0`); wherever an id
//! is taken, the id of the task it names works too. With tokens configured a
//! token sees its own tenant's dead letters only: another tenant's is a 404,
//! and one whose tenant is unknown (a message that could not be read) is
//! visible only when the API is open or to an admin token (ADR 0036).
//! Naming another tenant in a listing or a bulk action is a 404, as naming
//! one that does not exist is.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use shoal_shared::store::dead_letters::{DeadFilter, DeadLetter, DeadPage};
use shoal_shared::store::StoreError;
use shoal_shared::task::{TaskId, TaskRecord};

use super::auth::Tenant;
use super::body::JsonBody;
use super::openapi::PROBLEM;
use super::problem::Cause;
use super::{AppState, Problem};
use crate::submit::SubmitError;

/// The label a replayed task carries: the id of the task it replays.
pub const REPLAY_OF: &str = "replay_of";
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;
const DEFAULT_BULK: usize = 100;
const MAX_BULK: usize = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadQuery {
    /// Only dead letters with this reason (`attempts_exhausted`, `malformed`, ...).
    reason: Option<String>,
    /// Only this tenant's (a token sees its own tenant's only; another is 404).
    tenant: Option<String>,
    /// At most this many (1..=500, default 50).
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// `POST /v1/dead/replay` and `POST /v1/dead/purge`: which dead letters.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    /// Every dead letter with this reason (required: a bulk action names what it acts on).
    reason: String,
    /// Only this tenant's (a token acts on its own tenant's only; another is 404).
    #[serde(default)]
    tenant: Option<String>,
    /// At most this many, newest first (1..=1000, default 100).
    #[serde(default)]
    limit: Option<usize>,
}

/// A replay: the dead letter, and the new task that runs its spec.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Replayed {
    /// The dead letter's id (it is gone from the list now).
    pub dead_id: String,
    /// The task that died, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<TaskId>,
    /// The new task (label `replay_of` names the old one).
    pub task: TaskRecord,
}

/// A dead letter a bulk action left alone, and why.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Skipped {
    pub dead_id: String,
    pub detail: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BulkReplayed {
    pub replayed: Vec<Replayed>,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BulkPurged {
    /// Ids of the dead letters removed.
    pub purged: Vec<String>,
}

/// `GET /v1/dead`: dead letters newest first.
#[utoipa::path(
    get,
    path = "/v1/dead",
    tag = "dead",
    operation_id = "list_dead",
    security(("bearer" = [])),
    params(DeadQuery),
    responses(
        (status = 200, description = "A page of dead letters, newest first", body = DeadPage),
        (status = 400, description = "A bad parameter (`field` names it)", body = Problem, content_type = PROBLEM),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 404, description = "`tenant` names another tenant than the token's (`tenant-not-found`, as for one that does not exist)", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    query: Result<Query<DeadQuery>, QueryRejection>,
) -> Result<Json<DeadPage>, Problem> {
    let Query(query) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(bad("limit", format!("must be 1..={MAX_LIMIT}")));
    }
    if let Some(cursor) = &query.cursor {
        if !shoal_shared::store::dead_letters::is_entry_id(cursor) {
            return Err(bad(
                "cursor",
                "is not a dead-letter id; pass the previous page's next_cursor".into(),
            ));
        }
    }
    let filter = filter_for(&tenant, Some(query.reason), query.tenant)?;
    let page = state
        .store
        .list_dead(&filter, limit, query.cursor.as_deref())
        .await
        .map_err(store_problem)?;
    Ok(Json(page))
}

/// `GET /v1/dead/{id}`: one dead letter, by its id or its task's id.
#[utoipa::path(
    get,
    path = "/v1/dead/{id}",
    tag = "dead",
    operation_id = "get_dead",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The dead letter's id, or the id of the task it names")),
    responses(
        (status = 200, description = "The dead letter", body = DeadLetter),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such dead letter (or another tenant's)", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<DeadLetter>, Problem> {
    Ok(Json(own_letter(&state, &tenant, &id).await?))
}

/// `POST /v1/dead/{id}/replay`: runs the dead letter's spec as a new task.
#[utoipa::path(
    post,
    path = "/v1/dead/{id}/replay",
    tag = "dead",
    operation_id = "replay_dead",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The dead letter's id, or the id of the task it names")),
    responses(
        (status = 201, description = "Queued as a new task (confirmed by the broker); the dead letter is gone", body = Replayed),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such dead letter (or another tenant's)", body = Problem, content_type = PROBLEM),
        (status = 422, description = "It has no readable spec (purge it), or its spec is refused now", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis or RabbitMQ is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn replay(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let letter = own_letter(&state, &tenant, &id).await?;
    let replayed = replay_one(&state, letter).await?;
    Ok((StatusCode::CREATED, Json(replayed)).into_response())
}

/// `DELETE /v1/dead/{id}`: removes a dead letter without running it.
#[utoipa::path(
    delete,
    path = "/v1/dead/{id}",
    tag = "dead",
    operation_id = "purge_dead",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The dead letter's id, or the id of the task it names")),
    responses(
        (status = 204, description = "Purged"),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such dead letter (or another tenant's)", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn purge(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let letter = own_letter(&state, &tenant, &id).await?;
    let removed = state
        .store
        .remove_dead(&letter, None)
        .await
        .map_err(store_problem)?;
    if !removed {
        return Err(not_found(&id));
    }
    tracing::info!(dead_id = %letter.id, task_id = ?letter.task_id, reason = %letter.reason, "dead letter purged");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/dead/replay`: replays every dead letter with a reason.
#[utoipa::path(
    post,
    path = "/v1/dead/replay",
    tag = "dead",
    operation_id = "replay_dead_bulk",
    security(("bearer" = [])),
    request_body = BulkRequest,
    responses(
        (status = 200, description = "What was replayed, and what was skipped and why", body = BulkReplayed),
        (status = 400, description = "Malformed body", body = Problem, content_type = PROBLEM),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 404, description = "`tenant` names another tenant than the token's (`tenant-not-found`, as for one that does not exist)", body = Problem, content_type = PROBLEM),
        (status = 422, description = "A bad field (`field` names it)", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis or RabbitMQ is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn replay_bulk(
    State(state): State<AppState>,
    tenant: Tenant,
    JsonBody(request): JsonBody<BulkRequest>,
) -> Result<Json<BulkReplayed>, Problem> {
    let letters = bulk_letters(&state, &tenant, request).await?;
    let mut out = BulkReplayed {
        replayed: Vec::new(),
        skipped: Vec::new(),
    };
    for letter in letters {
        let dead_id = letter.id.clone();
        match replay_one(&state, letter).await {
            Ok(replayed) => out.replayed.push(replayed),
            // Broker or store down: stop, and say what was done so far.
            Err(problem) if problem.status == 503 && out.replayed.is_empty() => {
                return Err(problem)
            }
            Err(problem) if problem.status == 503 => {
                out.skipped.push(Skipped {
                    dead_id,
                    detail: problem.detail,
                });
                break;
            }
            Err(problem) => out.skipped.push(Skipped {
                dead_id,
                detail: problem.detail,
            }),
        }
    }
    Ok(Json(out))
}

/// `POST /v1/dead/purge`: purges every dead letter with a reason.
#[utoipa::path(
    post,
    path = "/v1/dead/purge",
    tag = "dead",
    operation_id = "purge_dead_bulk",
    security(("bearer" = [])),
    request_body = BulkRequest,
    responses(
        (status = 200, description = "The ids purged", body = BulkPurged),
        (status = 400, description = "Malformed body", body = Problem, content_type = PROBLEM),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 404, description = "`tenant` names another tenant than the token's (`tenant-not-found`, as for one that does not exist)", body = Problem, content_type = PROBLEM),
        (status = 422, description = "A bad field (`field` names it)", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn purge_bulk(
    State(state): State<AppState>,
    tenant: Tenant,
    JsonBody(request): JsonBody<BulkRequest>,
) -> Result<Json<BulkPurged>, Problem> {
    let letters = bulk_letters(&state, &tenant, request).await?;
    let mut purged = Vec::new();
    for letter in letters {
        if state
            .store
            .remove_dead(&letter, None)
            .await
            .map_err(store_problem)?
        {
            purged.push(letter.id);
        }
    }
    tracing::info!(count = purged.len(), "dead letters purged");
    Ok(Json(BulkPurged { purged }))
}

async fn bulk_letters(
    state: &AppState,
    tenant: &Tenant,
    request: BulkRequest,
) -> Result<Vec<DeadLetter>, Problem> {
    if request.reason.trim().is_empty() {
        return Err(
            Problem::unprocessable("`reason` must name the dead letters to act on")
                .with_field("reason"),
        );
    }
    let limit = request.limit.unwrap_or(DEFAULT_BULK);
    if !(1..=MAX_BULK).contains(&limit) {
        return Err(
            Problem::unprocessable(format!("`limit` must be 1..={MAX_BULK}")).with_field("limit"),
        );
    }
    let filter = filter_for(tenant, Some(Some(request.reason)), request.tenant)?;
    let mut letters = Vec::new();
    let mut cursor: Option<String> = None;
    while letters.len() < limit {
        let page = state
            .store
            .list_dead(&filter, limit - letters.len(), cursor.as_deref())
            .await
            .map_err(store_problem)?;
        letters.extend(page.dead);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(letters)
}

/// Queues the dead letter's spec as a new task of its tenant, labelled
/// `replay_of`, through the submit path (broker-confirmed), then removes the
/// dead letter and notes `replayed_as` on the old record.
async fn replay_one(state: &AppState, letter: DeadLetter) -> Result<Replayed, Problem> {
    let Some(mut spec) = letter.spec.clone() else {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "dead-letter-not-replayable",
            "Dead letter not replayable",
            format!(
                "dead letter {} ({}) has no readable task spec, so there is nothing to run; \
                 purge it with DELETE /v1/dead/{}",
                letter.id, letter.reason, letter.id
            ),
        ));
    };
    let tenant = letter
        .tenant
        .clone()
        .or_else(|| spec.tenant.clone())
        .unwrap_or_else(|| "default".to_owned());
    spec.tenant = Some(tenant.clone());
    if let Some(old) = letter.task_id {
        spec.labels.insert(REPLAY_OF.to_owned(), old.to_string());
    }
    // One replay per dead letter, however often it is asked for.
    spec.idempotency_key = Some(format!("replay:{}", letter.id));
    let mut submitted = state
        .submitter
        .submit(vec![spec], &tenant)
        .await
        .map_err(|e| submit_problem(&letter, e))?;
    let record = submitted.remove(0).record;
    state
        .store
        .remove_dead(&letter, Some(&record.id))
        .await
        .map_err(store_problem)?;
    tracing::info!(dead_id = %letter.id, replay_of = ?letter.task_id, task_id = %record.id, "dead letter replayed");
    Ok(Replayed {
        dead_id: letter.id,
        replay_of: letter.task_id,
        task: record,
    })
}

/// The listing filter for the caller; a token naming another tenant is a
/// 404 (`tenant-not-found`), as one naming no tenant at all is (ADR 0036).
/// `reason`: `Some(None)` is no filter.
fn filter_for(
    tenant: &Tenant,
    reason: Option<Option<String>>,
    asked: Option<String>,
) -> Result<DeadFilter, Problem> {
    let tenant = tenant.scope(asked)?;
    Ok(DeadFilter {
        reason: reason.flatten(),
        tenant,
    })
}

/// The dead letter `id`, if the caller may see it.
async fn own_letter(state: &AppState, tenant: &Tenant, id: &str) -> Result<DeadLetter, Problem> {
    let letter = state
        .store
        .get_dead(id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| not_found(id))?;
    if tenant.name.is_some() && !letter.tenant.as_deref().is_some_and(|t| tenant.sees(t)) {
        return Err(not_found(id));
    }
    Ok(letter)
}

fn not_found(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "dead-letter-not-found",
        "Dead letter not found",
        format!("no dead letter {id:?} (an id from GET /v1/dead, or the id of a dead task)"),
    )
}

fn bad(field: &str, detail: String) -> Problem {
    Problem::bad_request(format!("{field}: {detail}")).with_field(field)
}

fn unavailable(detail: String) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Service unavailable",
        detail,
    )
}

fn store_problem(error: StoreError) -> Problem {
    Problem::store_unavailable(&error)
}

fn submit_problem(letter: &DeadLetter, error: SubmitError) -> Problem {
    match error {
        SubmitError::Publish(_) => {
            tracing::warn!(%error, "replay failed");
            unavailable(error.to_string()).with_cause(Cause::Broker)
        }
        SubmitError::Store(_) => store_problem_of(error),
        other => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "dead-letter-not-replayable",
            "Dead letter not replayable",
            format!(
                "dead letter {} cannot be replayed as it is: {other}; submit a corrected \
                 task and purge this one",
                letter.id
            ),
        ),
    }
}

fn store_problem_of(error: SubmitError) -> Problem {
    tracing::warn!(%error, "replay failed");
    unavailable(error.to_string()).with_cause(Cause::Store)
}
