//! Shoal's worker: pulls tasks from RabbitMQ in priority order, runs each in a
//! sandbox, records every transition and event in Redis, and acknowledges a
//! message only after the task's terminal state is persisted.
#![forbid(unsafe_code)]

pub mod agent;
pub mod consumer;
pub mod fair;
pub mod health;
pub mod heartbeat;
pub mod http_response;
pub mod kube;
pub mod metrics;
pub mod outbox;
mod panic;
pub mod pool;
pub mod run;
pub mod sandbox;
pub mod wake;
mod worker;

pub use worker::{run, Worker, POOL_DRAIN};
