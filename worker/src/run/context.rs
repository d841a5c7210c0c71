//! What one run gives the adapter of its task kind: the task, its sandbox,
//! the stop signal and the worker's stores and settings. Each adapter takes
//! this and answers with a [`RunEnd`](super::RunEnd); none of them knows the
//! runner or the broker.

use shoal_shared::event::{Event, EventEnvelope};
use shoal_shared::settings::Settings;
use shoal_shared::store::Store;
use shoal_shared::TaskMessage;
use tracing::warn;

use super::end::StopReason;
use super::stop::RunStop;
use crate::metrics::TaskMetrics;
use crate::sandbox::Sandbox;

/// One run's shared parts, borrowed for the length of the run.
pub struct RunContext<'a> {
    pub message: &'a TaskMessage,
    pub sandbox: &'a dyn Sandbox,
    pub stop: &'a RunStop,
    pub store: &'a Store,
    pub settings: &'a Settings,
    pub metrics: &'a TaskMetrics,
    /// `worker:<id>`, the source of this worker's events.
    pub source: &'a str,
}

impl RunContext<'_> {
    /// Appends an informational event; a failure is logged, not fatal,
    /// because the state transitions (the facts that matter) are written
    /// separately.
    pub async fn emit(&self, event: Event) {
        emit(
            self.store,
            self.metrics,
            EventEnvelope::now(self.message.id, self.source.to_owned(), event),
        )
        .await;
    }

    /// Why the run was stopped; an adapter asks once its work says it was
    /// interrupted, and the token is cancelled by then.
    pub fn stop_reason(&self) -> StopReason {
        self.stop.reason().unwrap_or(StopReason::Draining)
    }
}

/// Appends `event`, logging (not failing) when Redis refuses it.
pub async fn emit(store: &Store, metrics: &TaskMetrics, event: EventEnvelope) {
    match store.append(&event).await {
        Ok(()) => {
            metrics.flow.events_published.inc();
        }
        Err(error) => {
            metrics
                .flow
                .events_dropped(crate::agent::sink::DropReason::Redis, 1);
            warn!(%error, event = event.event.type_name(), "event not recorded");
        }
    }
}
