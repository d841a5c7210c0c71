//! The fleet chaos suite (ADR 0034): a real scheduler and several real
//! worker processes on one namespace, an LLM simulator with latency, a mix of
//! exec and agent tasks submitted at a steady pace, a random worker
//! `kill -9`ed (and restarted) every few seconds, RabbitMQ and Redis
//! restarted mid-run; then every task's record and event stream is checked
//! and the host swept for leftovers. `make chaos` runs the full size (the
//! `shoal-chaos` binary, which writes `docs/RELIABILITY.md`);
//! `tests/tests/chaos.rs` runs a small one inside `make test`.

pub mod check;
pub mod fleet;
pub mod report;
mod run;

use std::path::PathBuf;
use std::time::Duration;

pub use report::{Figures, Outcome};
pub use run::run;

/// What a run does: the fleet's size, the work, the faults.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Short name, part of the namespace (`chaos-<name>-<id>`).
    pub name: String,
    pub workers: usize,
    pub slots: usize,
    /// Exec tasks: each sleeps one of [`Plan::exec_sleeps_ms`] and prints.
    pub exec_tasks: usize,
    /// The sleeps exec tasks pick from (a task's "kind" for latency
    /// figures is its sleep).
    pub exec_sleeps_ms: Vec<u64>,
    /// Agent tasks: a three-step conversation with the simulator (two
    /// terminal commands, then `finish`).
    pub agent_tasks: usize,
    /// The simulator's latency per answer.
    pub llm_latency: Duration,
    /// Submissions per second (in batches about every 250 ms).
    pub submit_rate: f64,
    /// A random worker is SIGKILLed, and started again, this often.
    pub kill_every: Duration,
    /// RabbitMQ restarts, spread over the submission window.
    pub rabbitmq_restarts: usize,
    /// Redis restarts (AOF on), spread over the submission window.
    pub redis_restarts: usize,
    /// Restart the services while tasks are still being submitted (spread
    /// over the submission window); otherwise right after the last
    /// submission, while tasks still run.
    pub restart_while_submitting: bool,
    /// Known failures: per-task problems starting with one of these are
    /// reported (as `Outcome::known`) but do not fail the run. A prefix
    /// naming a kind (`exec: ...`, `agent: ...`) applies to tasks of that
    /// kind only. Empty for `make chaos`, which checks everything.
    pub known_failures: Vec<String>,
    /// `deploy/local/services.sh`, for the restarts; required when a
    /// restart is planned.
    pub services_script: Option<PathBuf>,
    /// Upper bound for every task to reach a terminal state, from the
    /// first submission.
    pub deadline: Duration,
    /// Seeds the choice of tasks, sleeps and which worker is killed.
    pub seed: u64,
    /// Print progress lines on stderr.
    pub verbose: bool,
}

impl Plan {
    /// `make chaos`: 3 workers x 8 slots, 1,000 tasks (850 exec, 150
    /// agent), a kill every 5 s, one RabbitMQ and one Redis restart.
    pub fn full() -> Self {
        Self {
            name: "full".into(),
            workers: 3,
            slots: 8,
            exec_tasks: 850,
            exec_sleeps_ms: vec![100, 500, 1000, 2000, 3000],
            agent_tasks: 150,
            llm_latency: Duration::from_millis(300),
            submit_rate: 3.0,
            kill_every: Duration::from_secs(5),
            rabbitmq_restarts: 1,
            redis_restarts: 1,
            restart_while_submitting: true,
            known_failures: Vec::new(),
            services_script: None,
            deadline: Duration::from_secs(900),
            seed: 1,
            verbose: true,
        }
    }

    /// The `make test` size: 2 workers x 4 slots, 120 tasks (96 exec, 24
    /// agent), a kill every 5 s, one RabbitMQ restart.
    pub fn small() -> Self {
        Self {
            name: "small".into(),
            workers: 2,
            slots: 4,
            exec_tasks: 96,
            exec_sleeps_ms: vec![100, 500, 1000],
            // A fifth of the work: with a kill every 5 s some are hit while
            // an LLM call or a command runs (agent crash-resume, ADR 0033).
            agent_tasks: 24,
            // As `make chaos`: a kill lands inside an LLM call more often.
            llm_latency: Duration::from_millis(300),
            submit_rate: 3.0,
            kill_every: Duration::from_secs(5),
            rabbitmq_restarts: 1,
            redis_restarts: 0,
            // Known failure (docs/RELIABILITY.md): a batch submitted while
            // the broker restarts can leave a task record behind that no
            // answer named. Checked by `make chaos`; here the restart comes
            // after the last submission, while tasks still run.
            restart_while_submitting: false,
            // Known failure (docs/RELIABILITY.md): a worker killed between
            // an exec's `exec_finished` and its terminal state (the sandbox
            // is destroyed in between) makes the redelivery run it again.
            // Any kill can land there, so the small run reports it and
            // `make chaos` fails on it. Exec tasks only: an agent task that
            // completes twice fails the small run too.
            known_failures: vec!["exec: ran to completion".into()],
            services_script: None,
            // Under nextest's 300 s limit, so a failure names what was late.
            deadline: Duration::from_secs(200),
            seed: 1,
            verbose: false,
        }
    }

    pub fn tasks(&self) -> usize {
        self.exec_tasks + self.agent_tasks
    }
}

/// A small deterministic generator (SplitMix64): a run is reproducible
/// from its seed as far as the choices are ours.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
