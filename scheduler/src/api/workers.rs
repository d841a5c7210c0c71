//! `GET /v1/workers` and `GET /v1/fleet`: the live workers from their
//! heartbeats, and the fleet summary `shoal top` shows (docs/adr/0029).
//!
//! Tenancy: workers, slots and queue depths are fleet data, not task data;
//! any valid token may read them (the same counts are on the unauthenticated
//! `/metrics`). Task ids are task data: with tokens configured, a worker's
//! running tasks are listed only when they are the caller's tenant's (the
//! others are counted in `running_hidden`), and the LLM cost rate is the
//! caller's tenant's only.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use shoal_shared::store::StoreError;
use shoal_shared::task::Priority;

use super::auth::Tenant;
use super::openapi::PROBLEM;
use super::{AppState, Problem};
use crate::fleet::{FleetSummary, QueueDepths, WorkerList, WorkerView};

/// How long the queue depths may take: `shoal top` must redraw even when
/// the broker hangs.
const QUEUES_TIMEOUT: Duration = Duration::from_secs(2);

/// The window of the LLM cost rate.
const COST_WINDOW: chrono::Duration = chrono::Duration::seconds(60);

/// The live workers, by id.
#[utoipa::path(
    get,
    path = "/v1/workers",
    tag = "fleet",
    operation_id = "list_workers",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The live workers (a heartbeat in the last three beats)", body = WorkerList),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<Json<WorkerList>, Problem> {
    Ok(Json(workers(&state, &tenant).await?))
}

async fn workers(state: &AppState, tenant: &Tenant) -> Result<WorkerList, Problem> {
    let infos = state.store.live_workers().await.map_err(store_problem)?;
    let now = Utc::now();
    Ok(WorkerList {
        as_of: now,
        workers: infos
            .into_iter()
            .map(|info| WorkerView::of(info, tenant.name.as_deref(), now))
            .collect(),
    })
}

/// The fleet at a glance: workers, slots, queue depths, finished tasks and
/// LLM spend over the last minute.
#[utoipa::path(
    get,
    path = "/v1/fleet",
    tag = "fleet",
    operation_id = "fleet_summary",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The summary; `queues` is null (and `unavailable` names the broker) when RabbitMQ did not answer", body = FleetSummary),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis is unavailable", body = Problem, content_type = PROBLEM),
    )
)]
pub async fn fleet(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<Json<FleetSummary>, Problem> {
    let list = workers(&state, &tenant).await?;
    let (queues, cost) = tokio::join!(queue_depths(&state), cost_last_minute(&state, &tenant));
    let mut summary = FleetSummary::of(&list.workers, list.as_of);
    match queues {
        Ok(queues) => summary.queues = Some(queues),
        Err(error) => {
            tracing::warn!(%error, "fleet summary without queue depths");
            summary.unavailable.push("broker".to_owned());
        }
    }
    match cost {
        Ok(micros) => summary.llm_cost_last_minute_micros = Some(micros),
        Err(error) => {
            tracing::warn!(%error, "fleet summary without the LLM cost rate");
            summary.unavailable.push("redis".to_owned());
        }
    }
    Ok(Json(summary))
}

/// Ready messages of every queue of the namespace, by passive declares on
/// one short-lived channel.
async fn queue_depths(state: &AppState) -> Result<QueueDepths, String> {
    let (broker, topology) = state.submitter.broker();
    let read = async {
        let channel = broker.channel().await.map_err(|e| e.to_string())?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let count = |queue: String| {
            let channel = &channel;
            async move {
                channel
                    .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                    .await
                    .map(|q| u64::from(q.message_count()))
                    .map_err(|e| format!("{queue}: {e}"))
            }
        };
        let mut depths = QueueDepths::default();
        let result = async {
            // A tier's depth is the sum of its lanes' (ADR 0041).
            for priority in Priority::ALL {
                let mut n = 0;
                for queue in topology.work_queues(priority) {
                    n += count(queue).await?;
                }
                depths.work.insert(priority.as_str().to_owned(), n);
            }
            for delay in topology.retry_tiers() {
                let n = count(topology.retry_queue(*delay)).await?;
                depths.retry.insert(format!("{}s", delay.as_secs()), n);
            }
            depths.dead = count(topology.dead_queue()).await?;
            Ok::<_, String>(())
        }
        .await;
        let _ = channel.close(200, "done".into()).await;
        result.map(|()| depths)
    };
    tokio::time::timeout(QUEUES_TIMEOUT, read)
        .await
        .map_err(|_| format!("no answer within {} s", QUEUES_TIMEOUT.as_secs()))?
}

/// What LLM calls cost over the last minute (the caller's tenant's only,
/// under tokens), from the cost stream.
async fn cost_last_minute(state: &AppState, tenant: &Tenant) -> Result<u64, StoreError> {
    let until = Utc::now();
    let since = until - COST_WINDOW;
    let ms = |t: chrono::DateTime<Utc>| u64::try_from(t.timestamp_millis()).unwrap_or(0);
    let mut micros = 0u64;
    state
        .store
        .visit_costs(ms(since), ms(until) + 1, |record| {
            if tenant
                .name
                .as_deref()
                .is_none_or(|own| record.entry.tenant == own)
            {
                micros = micros.saturating_add(record.entry.cost_micros);
            }
        })
        .await?;
    Ok(micros)
}

fn store_problem(error: StoreError) -> Problem {
    Problem::store_unavailable(&format!("cannot read the worker heartbeats: {error}"))
}
