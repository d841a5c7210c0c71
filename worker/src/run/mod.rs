//! Running one task: the runner takes a task message through its record,
//! lease and sandbox, hands the sandboxed part to the adapter of its kind
//! (`exec`, `agent`) with a [`RunContext`], and answers the consumer with a
//! [`Disposition`]. How the run ended travels as one typed value: the
//! conversation's `Outcome` -> [`RunEnd`] (with a [`StopReason`] when it was
//! stopped) -> [`Disposition`]. See docs/adr/0017-worker-run-path.md.
//!
//! This layer sits above `agent`, `sandbox`, `pool` and `metrics` and below
//! `consumer`; none of those imports it back.

pub mod agent;
pub mod context;
pub mod end;
pub mod exec;
pub mod record;
pub mod runner;
pub mod stop;

pub use context::RunContext;
pub use end::{Cause, Disposition, RunEnd, RunError, StopReason};
pub use runner::{panic_error, TaskRunner};
pub use stop::RunStop;
