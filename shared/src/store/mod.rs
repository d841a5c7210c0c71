//! Redis: task records, their event streams, the fleet firehose, leases with
//! fencing tokens, idempotency keys and the dead-letter log.
//!
//! Every state transition is one Lua script: it checks the current state (and
//! the caller's fencing token), writes the new state, appends the event to the
//! task's stream and the firehose, all atomically.

mod caps;
mod checkpoint;
mod costs;
pub mod dead_letters;
mod keys;
mod lease;
pub mod ratelimit;
mod scripts;
pub mod spend;
mod tasks;
mod workers;

pub use caps::{Cap, CapSlot, CapTake};
pub use checkpoint::MAX_CHECKPOINT_BYTES;
pub use costs::CostRecord;
pub use keys::Keys;
pub use lease::{Lease, LeaseAttempt};
pub use ratelimit::{RateFeedback, RateSpec, RateTake};
pub use tasks::{
    CancelOutcome, Claim, CostEntry, DeadEntry, Store, TaskFilter, TaskPage, Transition,
    TransitionOutcome,
};
pub use workers::{RunningTask, WorkerInfo, MAX_LISTED_WORKERS, MAX_RUNNING_LISTED};

/// A Redis operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}
