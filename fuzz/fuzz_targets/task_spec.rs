//! A submit body, as the scheduler's API parses it (`POST /v1/tasks` and
//! `POST /v1/tasks/batch`), then validated; and the same bytes as a queued
//! message, as the worker decodes it. Errors are fine; a panic is a bug. A
//! spec the scheduler accepts must reach the worker unchanged: queued as a
//! `TaskMessage` and decoded, it is the same spec and still valid.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use shoal_shared::task::{SpecLimits, TaskId, TaskSpec};
use shoal_shared::TaskMessage;

/// The batch body's shape (`scheduler/src/api/tasks.rs`, `BatchRequest`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    tasks: Vec<TaskSpec>,
}

fn check(spec: &TaskSpec, limits: &SpecLimits) {
    if spec.validate(limits).is_err() {
        return;
    }
    let queued = TaskMessage::new(TaskId::new(), "fuzz".into(), spec.clone()).to_bytes();
    let received = TaskMessage::decode(&queued, usize::MAX, limits)
        .expect("the worker takes a spec the scheduler accepted");
    assert_eq!(
        &received.spec, spec,
        "a spec changed on its way to the worker"
    );
}

fuzz_target!(|data: &[u8]| {
    let limits = SpecLimits::default();
    if let Ok(spec) = serde_json::from_slice::<TaskSpec>(data) {
        check(&spec, &limits);
    }
    if let Ok(batch) = serde_json::from_slice::<BatchRequest>(data) {
        for spec in &batch.tasks {
            check(spec, &limits);
        }
    }
    let _ = TaskMessage::decode(data, 1 << 20, &limits);
});
