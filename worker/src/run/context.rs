//! What one run gives the adapter of its task kind: the task, its sandbox,
//! the stop signal and the worker's stores and settings. Each adapter takes
//! this and answers with a [`RunEnd`](super::RunEnd); none of them knows the
//! runner or the broker.

use shoal_shared::event::{Event, EventEnvelope};
use shoal_shared::settings::Settings;
use shoal_shared::store::Store;
use shoal_shared::TaskMessage;

use super::end::StopReason;
use super::stop::RunStop;
use crate::metrics::TaskMetrics;
use crate::outbox::Outbox;
use crate::sandbox::Sandbox;

/// One run's shared parts, borrowed for the length of the run.
pub struct RunContext<'a> {
    pub message: &'a TaskMessage,
    pub sandbox: &'a dyn Sandbox,
    pub stop: &'a RunStop,
    pub store: &'a Store,
    /// Where the run's events wait for Redis (ADR 0032).
    pub outbox: &'a Outbox,
    pub settings: &'a Settings,
    pub metrics: &'a TaskMetrics,
    /// `worker:<id>`, the source of this worker's events.
    pub source: &'a str,
}

impl RunContext<'_> {
    /// Queues an informational event in the worker's outbox: it reaches
    /// the task's stream in order, once, whenever Redis takes it (ADR 0032).
    pub async fn emit(&self, event: Event) {
        self.outbox
            .push(EventEnvelope::now(
                self.message.id,
                self.source.to_owned(),
                event,
            ))
            .await;
    }

    /// Why the run was stopped; an adapter asks once its work says it was
    /// interrupted, and the token is cancelled by then.
    pub fn stop_reason(&self) -> StopReason {
        self.stop.reason().unwrap_or(StopReason::Draining)
    }
}
