//! `GET /v1/tasks/{id}/events`: the task's event log. As Server-Sent Events
//! (`Accept: text/event-stream`) it follows the log live and resumes after
//! `Last-Event-ID`; otherwise it answers JSON pages (`?after=<id>`).
//!
//! When the scheduler shuts down, every open stream ends at once with a
//! `going_away` event (no `id`, so the client's Last-Event-ID stays the last
//! task event it got) and a stream asked for while it drains is refused 503
//! `shutting-down`: the client reconnects, to another replica, with
//! `Last-Event-ID` (ADR 0026).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use futures::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shoal_shared::event::{Event, EventEnvelope};
use shoal_shared::store::Store;
use shoal_shared::task::{TaskId, TaskState};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::auth::Tenant;
use super::openapi::PROBLEM;
use super::{AppState, Problem};
use crate::metrics::{OpenStream, ReasonLabels};

/// Most events in one JSON page or SSE poll.
const PAGE: usize = 500;
/// How often a live stream looks for new events.
const POLL: Duration = Duration::from_millis(150);
/// What a client refused for too many open streams is told to wait, in seconds.
const STREAMS_FULL_RETRY_S: u32 = 5;
/// What a client refused by a draining scheduler is told to wait, in seconds
/// (another replica, or this one's replacement, takes the reconnection).
const DRAINING_RETRY_S: u32 = 1;
/// The SSE event that ends a stream because the scheduler is shutting down.
pub const GOING_AWAY: &str = "going_away";

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// A page of the event log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventsPage {
    #[schema(value_type = Vec<StoredEvent<'static>>)]
    events: Vec<Value>,
    /// The task's state when the page was read.
    state: TaskState,
    /// No further events will come.
    done: bool,
}

fn unavailable(error: shoal_shared::store::StoreError) -> Problem {
    Problem::store_unavailable(&error)
}

/// Whether Redis takes `id` as an exclusive start: `<ms>` or `<ms>-<seq>`,
/// each a 64-bit number, and not the largest id (nothing comes after it).
/// Anything else would reach Redis and come back as a server error.
fn valid_stream_id(id: &str) -> bool {
    fn number(part: &str) -> Option<u64> {
        // `parse` alone would take a leading `+`.
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())
            .flatten()
    }
    let (ms, seq) = match id.split_once('-') {
        Some((ms, seq)) => (number(ms), number(seq)),
        None => (number(id), Some(0)),
    };
    matches!((ms, seq), (Some(ms), Some(seq)) if (ms, seq) != (u64::MAX, u64::MAX))
}

/// An event as the API returns it: the envelope and its position in the log
/// (`id`: pass it as `after` or `Last-Event-ID` to resume after it). On the
/// SSE stream it is the `data` of an event whose `event` is its `type` and
/// whose `id` is this `id`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StoredEvent<'a> {
    /// The event's id in the log, `<ms>-<seq>`.
    id: &'a str,
    #[serde(flatten)]
    envelope: &'a EventEnvelope,
}

/// The `data` of the SSE event `going_away` that ends every open stream when
/// the scheduler shuts down (it has no SSE `id`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct GoingAway {
    /// Always `going_away`.
    #[serde(rename = "type")]
    kind: String,
    message: String,
    /// The id of the last event sent, to resume after (`Last-Event-ID`).
    last_event_id: Option<String>,
}

fn with_id(stream_id: &str, envelope: &EventEnvelope) -> Value {
    serde_json::to_value(StoredEvent {
        id: stream_id,
        envelope,
    })
    .unwrap_or(Value::Null)
}

/// An event that ends the log: the task reached a terminal state.
fn is_final(envelope: &EventEnvelope) -> bool {
    matches!(&envelope.event, Event::StateChanged { to, .. } if to.is_terminal())
}

/// `GET /v1/tasks/{id}/events`: JSON pages, or a live SSE stream.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/events",
    tag = "events",
    operation_id = "task_events",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, format = Uuid, description = "The task id (a UUID)"),
        ("after" = Option<String>, Query,
         description = "Return events after this event id (`<ms>-<seq>`); `Last-Event-ID` wins over it"),
        ("limit" = Option<u32>, Query, minimum = 0,
         description = "Most events in one JSON page, 1-500 (default and cap 500; 0 counts as 1)"),
        ("Last-Event-ID" = Option<String>, Header,
         description = "Resume after this event id (SSE reconnection)"),
        ("Accept" = Option<String>, Header,
         description = "`text/event-stream` follows the log live as Server-Sent Events; anything else answers a JSON page"),
    ),
    responses(
        (status = 200,
         description = "With `Accept: text/event-stream`: Server-Sent Events, each with `id` (the event id), \
                        `event` (its `type`) and `data` (a `StoredEvent` as JSON), ending after the task's final \
                        event; on scheduler shutdown it ends with an `event: going_away` whose `data` is a \
                        `GoingAway` (no `id`: reconnect with Last-Event-ID). Otherwise a JSON page.",
         content(
             (EventsPage = "application/json"),
             (String = "text/event-stream"),
         )),
        (status = 400, description = "`id` is not a UUID, or `after`/`Last-Event-ID` is not an event id, or a bad query", body = Problem, content_type = PROBLEM),
        (status = 401, description = "Missing or unknown token (tokens configured)", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such task (or another tenant's)", body = Problem, content_type = PROBLEM),
        (status = 503, description = "Redis is unavailable; or, for a stream, too many streams are open \
                                      (`too-many-streams`) or the scheduler is shutting down (`shutting-down`)",
         body = Problem, content_type = PROBLEM,
         headers(("Retry-After" = Option<u32>, description = "Seconds to wait (stream refusals)"))),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    draining: Option<Extension<crate::Draining>>,
    tenant: Tenant,
    Path(id): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Query(query) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    let id: TaskId = id
        .parse()
        .map_err(|e: shoal_shared::task::ParseTaskIdError| Problem::bad_request(e.to_string()))?;
    let record = state
        .store
        .get(&id)
        .await
        .map_err(unavailable)?
        .filter(|r| tenant.sees(&r.tenant))
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "task-not-found",
                "Task not found",
                format!("no task {id}"),
            )
        })?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(query.after);
    if let Some(after) = &resume {
        if !valid_stream_id(after) {
            return Err(Problem::bad_request(format!(
                "{after:?} is not an event id (`<ms>-<seq>`, two 64-bit numbers, as \
                 the `id` of an event this API returned)"
            ))
            .with_field("after"));
        }
    }
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_sse {
        // Absent only when the router is served without `crate::run`.
        let shutdown = draining.map_or_else(CancellationToken::new, |Extension(d)| d.0);
        if shutdown.is_cancelled() {
            state
                .metrics
                .streams_refused
                .get_or_create(&ReasonLabels {
                    reason: "shutting_down",
                })
                .inc();
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting-down",
                "Scheduler shutting down",
                "this scheduler is shutting down and opens no new event streams; \
                 reconnect (to another replica) with Last-Event-ID",
            )
            .with_retry_after(DRAINING_RETRY_S));
        }
        // Held by the stream, so released when the client goes away.
        let permit = state.streams.clone().try_acquire_owned().map_err(|_| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too-many-streams",
                "Too many event streams",
                "every event stream this scheduler serves at once is open \
                 (scheduler.max_streams); try again later or read the events as JSON pages",
            )
            .with_retry_after(STREAMS_FULL_RETRY_S)
        });
        let permit = match permit {
            Ok(permit) => permit,
            Err(problem) => {
                state
                    .metrics
                    .streams_refused
                    .get_or_create(&ReasonLabels {
                        reason: "too_many_streams",
                    })
                    .inc();
                return Err(problem);
            }
        };
        let open = state.metrics.stream_opened();
        return Ok(Sse::new(live(
            state.store.clone(),
            id,
            resume,
            shutdown,
            (permit, open),
        ))
        .keep_alive(KeepAlive::default())
        .into_response());
    }
    let limit = query.limit.unwrap_or(PAGE).clamp(1, PAGE);
    let page = state
        .store
        .events_after(&id, resume.as_deref(), limit)
        .await
        .map_err(unavailable)?;
    let done = record.state.is_terminal() && page.len() < limit;
    Ok(Json(EventsPage {
        events: page.iter().map(|(sid, e)| with_id(sid, e)).collect(),
        state: record.state,
        done,
    })
    .into_response())
}

/// The event that ends a stream because the scheduler shuts down: no `id`
/// (an SSE client's Last-Event-ID stays at `after`, the last task event sent),
/// a reconnection delay, and JSON saying where to resume.
fn going_away(after: Option<&str>) -> SseEvent {
    let data = GoingAway {
        kind: GOING_AWAY.to_owned(),
        message: "this scheduler is shutting down; reconnect (to another replica) \
                  with Last-Event-ID to resume"
            .to_owned(),
        last_event_id: after.map(str::to_owned),
    };
    SseEvent::default()
        .event(GOING_AWAY)
        .retry(Duration::from_secs(u64::from(DRAINING_RETRY_S)))
        .data(serde_json::to_string(&data).unwrap_or_default())
}

/// Where a live stream is: what was sent, what is fetched but not yet sent.
struct Cursor {
    store: Store,
    id: TaskId,
    after: Option<String>,
    pending: std::collections::VecDeque<(String, EventEnvelope)>,
    /// The task's final event is queued (or sent): end after it.
    finished: bool,
    /// Cancelled when the scheduler shuts down.
    shutdown: CancellationToken,
    /// The `going_away` event was sent: end now.
    gone: bool,
    _permit: (OwnedSemaphorePermit, OpenStream),
}

impl Cursor {
    /// One look at the log: `false` when nothing more will ever come.
    async fn fetch(&mut self) -> bool {
        match self
            .store
            .events_after(&self.id, self.after.as_deref(), PAGE)
            .await
        {
            Ok(page) if !page.is_empty() => self.pending.extend(page),
            Ok(_) => match self.store.get(&self.id).await {
                // Nothing new and the task is over: its final event was
                // delivered before (a resume past it), or has expired.
                // The state and its event are written in one step, so a
                // second look after seeing the state cannot miss it.
                Ok(Some(record)) if record.state.is_terminal() => {
                    match self
                        .store
                        .events_after(&self.id, self.after.as_deref(), PAGE)
                        .await
                    {
                        Ok(page) if !page.is_empty() => self.pending.extend(page),
                        Ok(_) => return false,
                        Err(_) => tokio::time::sleep(POLL * 4).await,
                    }
                }
                // The record is gone (retention or deletion): nothing more will come.
                Ok(None) => return false,
                Ok(Some(_)) => tokio::time::sleep(POLL).await,
                Err(_) => tokio::time::sleep(POLL * 4).await,
            },
            Err(_) => tokio::time::sleep(POLL * 4).await,
        }
        true
    }
}

/// Polls the stream and yields events until the task's final event, or,
/// when resumed past it, until the task is terminal and nothing is left; or,
/// when `shutdown` is cancelled, at once with a [`going_away`] event.
fn live(
    store: Store,
    id: TaskId,
    after: Option<String>,
    shutdown: CancellationToken,
    permit: (OwnedSemaphorePermit, OpenStream),
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let cursor = Cursor {
        store,
        id,
        after,
        pending: Default::default(),
        finished: false,
        shutdown,
        gone: false,
        _permit: permit,
    };
    stream::unfold(cursor, |mut cursor| async move {
        loop {
            if cursor.gone {
                return None;
            }
            // Before anything fetched and not yet sent: the client resumes
            // after the last event it got, from whichever replica it reaches.
            if cursor.shutdown.is_cancelled() {
                cursor.gone = true;
                let event = going_away(cursor.after.as_deref());
                return Some((Ok(event), cursor));
            }
            if let Some((sid, envelope)) = cursor.pending.pop_front() {
                cursor.after = Some(sid.clone());
                if is_final(&envelope) {
                    cursor.finished = true;
                }
                let data = serde_json::to_string(&with_id(&sid, &envelope)).unwrap_or_default();
                let event = SseEvent::default()
                    .id(sid)
                    .event(envelope.event.type_name())
                    .data(data);
                return Some((Ok(event), cursor));
            }
            if cursor.finished {
                return None;
            }
            let shutdown = cursor.shutdown.clone();
            tokio::select! {
                // Checked at the top of the loop.
                () = shutdown.cancelled() => {}
                more = cursor.fetch() => if !more {
                    return None;
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::valid_stream_id;

    #[test]
    fn cursors_redis_would_refuse_are_not_event_ids() {
        for good in ["0", "0-1", "1718000000000-3", "18446744073709551615-0"] {
            assert!(valid_stream_id(good), "{good}");
        }
        for bad in [
            "",
            "garbage",
            "+1",
            "1-",
            "-1",
            "1-2-3",
            "99999999999999999999",
            "1-99999999999999999999",
            "18446744073709551615-18446744073709551615",
        ] {
            assert!(!valid_stream_id(bad), "{bad}");
        }
    }
}
