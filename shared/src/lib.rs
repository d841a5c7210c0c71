//! Shoal's shared vocabulary: the task model, events, settings, and the adapters
//! (RabbitMQ topology and publisher, Redis task store) that scheduler and worker
//! both use. This crate starts no runtime of its own.
#![forbid(unsafe_code)]

pub mod broker;
pub mod cost;
pub mod event;
pub mod message;
pub mod model;
pub mod name;
pub mod retry;
pub mod settings;
pub mod signal;
pub mod store;
pub mod task;
pub mod telemetry;
pub mod template;

pub use event::{Event, EventEnvelope};
pub use message::TaskMessage;
pub use name::Name;
pub use settings::Settings;
pub use task::{Priority, TaskId, TaskKind, TaskRecord, TaskSpec, TaskState};
