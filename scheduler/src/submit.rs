//! The submit path: validate, claim idempotency keys, publish with confirms,
//! then record. A task is reported `queued` only after the broker confirmed it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use shoal_shared::broker::{
    Broker, OutgoingMessage, PublishError, Publisher, Topology, HEADER_TASK_ID, HEADER_TRACEPARENT,
};
use shoal_shared::store::{Claim, Store, StoreError};
use shoal_shared::task::{SpecError, SpecLimits, TaskId, TaskRecord, TaskSpec};
use shoal_shared::{telemetry, TaskMessage};
use tracing::warn;

use crate::metrics::SchedulerMetrics;

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("task {index}: {error}")]
    Invalid { index: usize, error: SpecError },
    #[error(
        "task {index} is {size} bytes as a queue message; this fleet queues at most \
         {limit} bytes per task (broker.max_message_bytes): split the task, or fetch \
         large inputs from a repository"
    )]
    TooLarge {
        index: usize,
        size: usize,
        limit: usize,
    },
    /// No longer returned: a key whose task has no record yet is answered
    /// with that task, republished (ADR 0039). Kept while the API maps it.
    #[error("idempotency key {key:?} is in use by a submission still in progress")]
    InProgress { key: String },
    #[error(
        "idempotency key {key:?} was already used for task {existing} with a different \
         request body; use a new key for a different task"
    )]
    Conflict {
        index: usize,
        key: String,
        existing: TaskId,
    },
    #[error("the broker did not confirm the task: {0}")]
    Publish(#[from] PublishError),
    #[error("the task store is unavailable: {0}")]
    Store(#[from] StoreError),
}

/// One submitted task: its record and whether this call created it (`false`
/// for an idempotent replay).
#[derive(Debug, Clone)]
pub struct Submitted {
    pub record: TaskRecord,
    pub created: bool,
}

/// Turns specs into queued tasks.
pub struct Submitter {
    store: Store,
    broker: Broker,
    publisher: Publisher,
    topology: Topology,
    limits: SpecLimits,
    /// The largest message a task may be (`broker.max_message_bytes`): a
    /// larger one is refused here, never accepted and then dead-lettered.
    max_message_bytes: usize,
    /// Sandbox templates the fleet offers; a spec naming another is refused.
    templates: Vec<String>,
    /// Publisher-confirm latency goes here when set.
    metrics: Option<Arc<SchedulerMetrics>>,
}

impl Submitter {
    pub fn new(
        store: Store,
        broker: Broker,
        publisher: Publisher,
        topology: Topology,
        limits: SpecLimits,
        max_message_bytes: usize,
        templates: Vec<String>,
    ) -> Self {
        Self {
            store,
            broker,
            publisher,
            topology,
            limits,
            max_message_bytes,
            templates,
            metrics: None,
        }
    }

    /// Records the broker's publisher-confirm latency in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<SchedulerMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Whether the broker connection is up (for readiness).
    pub async fn broker_ready(&self) -> bool {
        self.broker.is_connected().await || self.broker.connect_once().await.is_ok()
    }

    pub async fn close(&self) {
        self.broker.close().await;
    }

    /// The broker connection and the queues' names, for reading queue depths
    /// (`GET /v1/fleet`).
    pub fn broker(&self) -> (&Broker, &Topology) {
        (&self.broker, &self.topology)
    }

    /// Validates every spec (nothing is queued if one is invalid), then queues
    /// all of them with one round of publisher confirms and one Redis pipeline;
    /// a task whose `not_before` is later is `scheduled` instead (ADR 0028).
    /// Traced as `submit`, with one `publish` child span per queued task whose
    /// W3C `traceparent` the message carries to the worker (ADR 0025).
    #[tracing::instrument(name = "submit", skip_all, fields(tenant = %tenant, tasks = specs.len()))]
    pub async fn submit(
        &self,
        specs: Vec<TaskSpec>,
        tenant: &str,
    ) -> Result<Vec<Submitted>, SubmitError> {
        for (index, spec) in specs.iter().enumerate() {
            spec.validate(&self.limits)
                .map_err(|error| SubmitError::Invalid { index, error })?;
            if !self.templates.contains(&spec.sandbox) {
                return Err(SubmitError::Invalid {
                    index,
                    error: SpecError {
                        field: "sandbox".into(),
                        message: format!(
                            "unknown sandbox template {:?}; this fleet offers {}",
                            spec.sandbox,
                            self.templates.join(", ")
                        ),
                    },
                });
            }
        }

        // Every message as it will be published: one too large for the
        // broker limit refuses the whole submission before anything is claimed.
        let mut prepared = Vec::with_capacity(specs.len());
        for (index, spec) in specs.into_iter().enumerate() {
            let message = TaskMessage::new(TaskId::new(), tenant.to_owned(), spec);
            let body = message.to_bytes();
            if body.len() > self.max_message_bytes {
                return Err(SubmitError::TooLarge {
                    index,
                    size: body.len(),
                    limit: self.max_message_bytes,
                });
            }
            prepared.push((message, body));
        }

        // Claim idempotency keys first; replays return the existing task. A
        // key is released only while nothing under its id can have reached
        // the broker or the due set; after that it names its task for good
        // (ADR 0039), so a retry answers the same id and never mints a second.
        let mut slots: Vec<Result<(TaskMessage, Vec<u8>), TaskRecord>> =
            Vec::with_capacity(prepared.len());
        let mut claimed: Vec<(TaskId, String)> = Vec::new();
        let mut keys_seen: Vec<(String, usize)> = Vec::new();
        for (index, (mut message, mut body)) in prepared.into_iter().enumerate() {
            if let Some(key) = message.spec.idempotency_key.clone() {
                if let Some(&(_, earlier)) = keys_seen.iter().find(|(seen, _)| *seen == key) {
                    self.release_all(tenant, &claimed).await;
                    return Err(SubmitError::Invalid {
                        index,
                        error: SpecError {
                            field: "idempotency_key".into(),
                            message: format!(
                                "{key:?} is also the key of task {earlier} of this batch; \
                                 one key names one task: give each task its own key"
                            ),
                        },
                    });
                }
                keys_seen.push((key.clone(), index));
                let fingerprint = fingerprint(&message.spec);
                match self
                    .store
                    .claim_idempotency(tenant, &key, &message.id, &fingerprint)
                    .await
                {
                    Ok(Claim::Claimed) => claimed.push((message.id, key)),
                    Ok(Claim::Conflict(existing)) => {
                        self.release_all(tenant, &claimed).await;
                        return Err(SubmitError::Conflict {
                            index,
                            key,
                            existing,
                        });
                    }
                    Ok(Claim::Existing(existing)) => match self.store.get(&existing).await {
                        Ok(Some(record)) => {
                            slots.push(Err(record));
                            continue;
                        }
                        Ok(None) => {
                            // The key names a task with no record yet: an
                            // earlier submission whose publish failed (maybe
                            // half-way, maybe only its confirm was lost), one
                            // whose record write failed, or one still in
                            // flight. The same body under the same id is
                            // (re)published: a copy that did reach the
                            // broker is a duplicate delivery the worker
                            // settles, and the answer names the id the key
                            // holds — never a second task.
                            message.id = existing;
                            body = message.to_bytes();
                        }
                        Err(error) => {
                            self.release_all(tenant, &claimed).await;
                            return Err(error.into());
                        }
                    },
                    Err(error) => {
                        self.release_all(tenant, &claimed).await;
                        return Err(error.into());
                    }
                }
            }
            slots.push(Ok((message, body)));
        }

        // A task due later waits in Redis (ADR 0028); the rest are published
        // now. Scheduled first: if publishing then fails, they are taken back.
        let now = Utc::now();
        let mut later: Vec<(&TaskMessage, Vec<u8>)> = Vec::new();
        let mut due: Vec<(&TaskMessage, Vec<u8>)> = Vec::new();
        for (message, body) in slots.iter_mut().filter_map(|slot| slot.as_mut().ok()) {
            let body = std::mem::take(body);
            if is_due(message.spec.not_before, now) {
                due.push((message, body));
            } else {
                later.push((message, body));
            }
        }
        let scheduled: Vec<TaskRecord> = later
            .iter()
            .map(|(message, _)| {
                TaskRecord::scheduled(message.id, &message.spec, tenant, message.submitted_at)
            })
            .collect();
        if !scheduled.is_empty() {
            let waiting: Vec<(&TaskRecord, &[u8])> = scheduled
                .iter()
                .zip(&later)
                .map(|(record, (_, body))| (record, body.as_slice()))
                .collect();
            if let Err(error) = self.store.schedule_many(&waiting).await {
                // One MULTI: none of them was scheduled, nothing published.
                self.release_all(tenant, &claimed).await;
                return Err(error.into());
            }
        }
        let queued: Vec<TaskRecord> = due
            .iter()
            .map(|(message, _)| {
                TaskRecord::queued(message.id, &message.spec, tenant, message.submitted_at)
            })
            .collect();
        if let Err(error) = self.publish(due).await {
            // Some of the batch may be in the broker all the same: a publish
            // that failed half-way had others confirmed, and a confirm lost
            // with the connection may follow a message the broker kept. Those
            // tasks will run, so their keys stay claimed: a retry under the
            // same keys answers these ids (ADR 0039). Only a scheduled task
            // taken back frees its key.
            let mut released: Vec<(TaskId, String)> = Vec::new();
            for record in &scheduled {
                match self.store.unschedule(&record.id).await {
                    Ok(_) => {
                        released.extend(claimed.iter().filter(|(id, _)| *id == record.id).cloned())
                    }
                    Err(store_error) => warn!(%store_error, task_id = %record.id,
                        "a scheduled task of a failed submission was not taken back; it will run, \
                         and a retry under its idempotency key answers it"),
                }
            }
            self.release_all(tenant, &released).await;
            return Err(error.into());
        }

        // Confirmed (or scheduled): now record. If Redis fails here the
        // tasks are still queued (or due) and the worker creates the records
        // from the messages.
        let created: Vec<TaskRecord> = if scheduled.is_empty() {
            queued
        } else {
            // Back in submission order, which the answer follows.
            let mut by_id: std::collections::HashMap<TaskId, TaskRecord> = queued
                .into_iter()
                .chain(scheduled)
                .map(|record| (record.id, record))
                .collect();
            slots
                .iter()
                .filter_map(|slot| slot.as_ref().ok())
                .filter_map(|(message, _)| by_id.remove(&message.id))
                .collect()
        };
        if let Err(error) = self.store.create_many(&created).await {
            warn!(%error, tasks = created.len(), "confirmed tasks not recorded; workers will record them");
        }
        let mut fresh = created.into_iter();
        Ok(slots
            .into_iter()
            .map(|slot| match slot {
                Ok(_) => Submitted {
                    record: fresh.next().expect("one record per published task"),
                    created: true,
                },
                Err(record) => Submitted {
                    record,
                    created: false,
                },
            })
            .collect())
    }

    /// Publishes task messages with publisher confirms (the one publish
    /// path: submissions and the promotion of scheduled tasks), then puts
    /// one wake ring in `{ns}.wake` for the batch (docs/adr/0031). Traced
    /// with one `publish` span per message whose W3C `traceparent` the
    /// message carries to the worker (ADR 0025).
    pub async fn publish(
        &self,
        messages: Vec<(&TaskMessage, Vec<u8>)>,
    ) -> Result<(), PublishError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut outgoing: Vec<OutgoingMessage> = Vec::with_capacity(messages.len());
        // One span per task, open until the broker confirmed it; its context
        // is the parent of the worker's run (only built when traces are on).
        let mut publish_spans: Vec<tracing::Span> = Vec::new();
        for (message, body) in messages {
            // So a worker that cannot read the body still knows the task.
            let mut headers = vec![(HEADER_TASK_ID.into(), message.id.to_string())];
            if telemetry::traces_enabled() {
                let span = tracing::info_span!(
                    "publish",
                    task_id = %message.id,
                    otel.kind = "producer",
                    trace_id = tracing::field::Empty,
                );
                telemetry::record_trace_id(&span);
                if let Some(traceparent) = telemetry::traceparent_of(&span) {
                    headers.push((HEADER_TRACEPARENT.into(), traceparent));
                }
                publish_spans.push(span);
            }
            outgoing.push(OutgoingMessage {
                exchange: self.topology.work_exchange(),
                // The tenant's own lane, or the shared one (ADR 0041).
                routing_key: self
                    .topology
                    .routing_key(message.spec.priority, &message.tenant),
                body,
                message_id: Some(message.id.to_string()),
                headers,
            });
        }
        let started = Instant::now();
        let published = self.publisher.publish_all(&outgoing).await;
        if let Some(metrics) = &self.metrics {
            metrics.confirmed(published.is_ok(), started.elapsed());
        }
        published?;
        drop(publish_spans);
        self.publisher.ring(&self.topology.wake_queue()).await;
        Ok(())
    }

    async fn release_all(&self, tenant: &str, keys: &[(TaskId, String)]) {
        for (_, key) in keys {
            if let Err(error) = self.store.release_idempotency(tenant, key).await {
                warn!(%error, key, "idempotency key not released; it expires on its own");
            }
        }
    }
}

/// Within this much of now, a `not_before` is now: the task is published at
/// once rather than scheduled (ADR 0028).
pub const DUE_TOLERANCE: Duration = Duration::from_secs(1);

/// Whether a task with this `not_before` runs at once (no time, a time in
/// the past, or within [`DUE_TOLERANCE`] of `now`).
pub fn is_due(not_before: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    let tolerance = chrono::TimeDelta::from_std(DUE_TOLERANCE).unwrap_or_default();
    not_before.is_none_or(|at| at <= now + tolerance)
}

/// A hash of the canonical body (the parsed spec, defaults filled in and
/// fields in one order), kept with an idempotency key: a replay is the same
/// request however its JSON was formatted, and a different one is refused.
fn fingerprint(spec: &TaskSpec) -> String {
    let canonical = serde_json::to_vec(spec).unwrap_or_default();
    sha1_smol::Sha1::from(canonical).digest().to_string()
}
