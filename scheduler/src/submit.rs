//! The submit path: validate, claim idempotency keys, publish with confirms,
//! then record. A task is reported `queued` only after the broker confirmed it.

use shoal_shared::broker::{Broker, OutgoingMessage, PublishError, Publisher, Topology};
use shoal_shared::store::{Claim, Store, StoreError};
use shoal_shared::task::{SpecError, SpecLimits, TaskId, TaskRecord, TaskSpec};
use shoal_shared::TaskMessage;
use tracing::warn;

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("task {index}: {error}")]
    Invalid { index: usize, error: SpecError },
    #[error("idempotency key {key:?} is in use by a submission still in progress")]
    InProgress { key: String },
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
    /// Sandbox templates the fleet offers; a spec naming another is refused.
    templates: Vec<String>,
}

impl Submitter {
    pub fn new(
        store: Store,
        broker: Broker,
        publisher: Publisher,
        topology: Topology,
        limits: SpecLimits,
        templates: Vec<String>,
    ) -> Self {
        Self {
            store,
            broker,
            publisher,
            topology,
            limits,
            templates,
        }
    }

    /// Whether the broker connection is up (for readiness).
    pub async fn broker_ready(&self) -> bool {
        self.broker.is_connected().await || self.broker.connect_once().await.is_ok()
    }

    pub async fn close(&self) {
        self.broker.close().await;
    }

    /// Validates every spec (nothing is queued if one is invalid), then queues
    /// all of them with one round of publisher confirms and one Redis pipeline.
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

        // Claim idempotency keys first; replays return the existing task.
        let mut slots: Vec<Result<(TaskId, TaskSpec), TaskRecord>> =
            Vec::with_capacity(specs.len());
        let mut claimed: Vec<String> = Vec::new();
        for spec in specs {
            let id = TaskId::new();
            if let Some(key) = spec.idempotency_key.clone() {
                match self.store.claim_idempotency(tenant, &key, &id).await {
                    Ok(Claim::Claimed) => claimed.push(key),
                    Ok(Claim::Existing(existing)) => match self.store.get(&existing).await {
                        Ok(Some(record)) => {
                            slots.push(Err(record));
                            continue;
                        }
                        Ok(None) => {
                            self.release_keys(tenant, &claimed).await;
                            return Err(SubmitError::InProgress { key });
                        }
                        Err(error) => {
                            self.release_keys(tenant, &claimed).await;
                            return Err(error.into());
                        }
                    },
                    Err(error) => {
                        self.release_keys(tenant, &claimed).await;
                        return Err(error.into());
                    }
                }
            }
            slots.push(Ok((id, spec)));
        }

        let messages: Vec<TaskMessage> = slots
            .iter()
            .filter_map(|slot| slot.as_ref().ok())
            .map(|(id, spec)| TaskMessage::new(*id, tenant.to_owned(), spec.clone()))
            .collect();
        let outgoing: Vec<OutgoingMessage> = messages
            .iter()
            .map(|message| OutgoingMessage {
                exchange: self.topology.work_exchange(),
                routing_key: message.spec.priority.as_str().to_owned(),
                body: message.to_bytes(),
                message_id: Some(message.id.to_string()),
                headers: Vec::new(),
            })
            .collect();
        if !outgoing.is_empty() {
            if let Err(error) = self.publisher.publish_all(&outgoing).await {
                self.release_keys(tenant, &claimed).await;
                return Err(error.into());
            }
            self.publisher
                .ring(&self.topology.doorbell_exchange())
                .await;
        }

        // Confirmed: now record. If Redis fails here the tasks are still queued
        // and the worker creates the records from the messages.
        let created: Vec<TaskRecord> = messages
            .iter()
            .map(|message| {
                TaskRecord::queued(message.id, &message.spec, tenant, message.submitted_at)
            })
            .collect();
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

    async fn release_keys(&self, tenant: &str, keys: &[String]) {
        for key in keys {
            if let Err(error) = self.store.release_idempotency(tenant, key).await {
                warn!(%error, key, "idempotency key not released; it expires on its own");
            }
        }
    }
}
