//! Test harness: runs Shoal's scheduler and workers against the **real**
//! RabbitMQ and Redis that `deploy/local/services.sh up` started (their URLs
//! come from `.local/env`, exported by `make test`). Each test gets its own
//! namespace, so tests run in parallel on one broker without seeing each other.
//!
//! On teardown the harness fails the test if anything is left behind: a live
//! lease, a message still in a work queue, a sandbox process, or a workspace.

pub mod broker_stats;
pub mod chaos;
pub mod daytona_fake;
pub mod harness;
pub mod llm_sim;
pub mod local_fixture;
pub mod process;
pub mod scripted_llm;
pub mod wait;

pub use harness::{TestEnv, WorkerProcess};
pub use wait::wait_until;
