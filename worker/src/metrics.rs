//! A worker's task-level Prometheus metrics: what it ran, how each run ended
//! and took, and what the agents' LLM calls used and cost. Served on
//! `/metrics` next to the pool's (`shoal_pool_*`).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use shoal_shared::store::CostEntry;
use shoal_shared::TaskState;
use tokio::sync::watch;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `exec` or `agent`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabels {
    pub kind: String,
    /// The terminal state this worker recorded.
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub model: String,
    /// `ok`, or the error class (`auth`, `rate_limit`, `server`, ...).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    /// `prompt`, `completion`, `cache_read`, `cache_write`, `reasoning`.
    pub kind: String,
}

/// Everything a worker counts about tasks.
#[derive(Clone)]
pub struct TaskMetrics {
    pub started: Family<KindLabels, Counter>,
    pub finished: Family<FinishLabels, Counter>,
    pub running: Family<KindLabels, Gauge>,
    pub run_seconds: Family<FinishLabels, Histogram>,
    pub llm_calls: Family<ModelLabels, Counter>,
    pub llm_tokens: Family<TokenLabels, Counter>,
    pub llm_cost_microdollars: Family<ModelLabels, Counter>,
    pub llm_call_seconds: Family<AttemptLabels, Histogram>,
    /// Runs in progress, all kinds together, for whoever must react when the
    /// number changes (the pod-deletion-cost updater); moves with `running`.
    busy: watch::Sender<usize>,
}

/// Decrements the running gauge (and the busy count) when the run is over,
/// however it ended.
pub struct Running {
    gauge: Gauge,
    busy: watch::Sender<usize>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.gauge.dec();
        self.busy.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl TaskMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            started: Family::default(),
            finished: Family::default(),
            running: Family::default(),
            // 10 ms .. ~3 h: a quick exec to a long agent run.
            run_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 3.0, 14))
            }),
            llm_calls: Family::default(),
            llm_tokens: Family::default(),
            llm_cost_microdollars: Family::default(),
            // 10 ms .. ~3 min.
            llm_call_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 2.0, 15))
            }),
            busy: watch::Sender::new(0),
        };
        let tasks = registry.sub_registry_with_prefix("shoal_tasks");
        tasks.register(
            "started",
            "Task runs started on this worker",
            metrics.started.clone(),
        );
        tasks.register(
            "finished",
            "Terminal states this worker recorded",
            metrics.finished.clone(),
        );
        tasks.register("running", "Task runs in progress", metrics.running.clone());
        tasks.register(
            "run_seconds",
            "Time from the start of a run to its recorded terminal state",
            metrics.run_seconds.clone(),
        );
        let llm = registry.sub_registry_with_prefix("shoal_llm");
        llm.register(
            "calls",
            "LLM calls of agent tasks",
            metrics.llm_calls.clone(),
        );
        llm.register(
            "tokens",
            "Tokens used by LLM calls, by kind",
            metrics.llm_tokens.clone(),
        );
        llm.register(
            "cost_microdollars",
            "What LLM calls cost, in millionths of a dollar (from the configured prices)",
            metrics.llm_cost_microdollars.clone(),
        );
        llm.register(
            "call_seconds",
            "Time of each LLM HTTP attempt, failed ones included, by outcome (ok or the error class)",
            metrics.llm_call_seconds.clone(),
        );
        metrics
    }

    /// A run of a `kind` task starts; the returned guard ends it.
    pub fn start(&self, kind: &str) -> Running {
        let labels = KindLabels { kind: kind.into() };
        self.started.get_or_create(&labels).inc();
        let gauge = self.running.get_or_create(&labels).clone();
        gauge.inc();
        self.busy.send_modify(|n| *n += 1);
        Running {
            gauge,
            busy: self.busy.clone(),
        }
    }

    /// The number of runs in progress, told on every change.
    pub fn busy(&self) -> watch::Receiver<usize> {
        self.busy.subscribe()
    }

    /// This worker recorded `state` for a `kind` task; `took` is the run's
    /// time when it ran.
    pub fn finished(&self, kind: &str, state: TaskState, took: Option<Duration>) {
        let labels = FinishLabels {
            kind: kind.into(),
            state: state.as_str().into(),
        };
        self.finished.get_or_create(&labels).inc();
        if let Some(took) = took {
            self.run_seconds
                .get_or_create(&labels)
                .observe(took.as_secs_f64());
        }
    }

    /// One LLM call, as it goes to the cost stream.
    pub fn llm_call(&self, entry: &CostEntry) {
        let model = ModelLabels {
            model: entry.model.clone(),
        };
        self.llm_calls.get_or_create(&model).inc();
        self.llm_cost_microdollars
            .get_or_create(&model)
            .inc_by(entry.cost_micros);
        let usage = entry.usage;
        for (kind, tokens) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
            ("cache_read", usage.cache_read_tokens),
            ("cache_write", usage.cache_write_tokens),
            ("reasoning", usage.reasoning_tokens),
        ] {
            if tokens > 0 {
                self.llm_tokens
                    .get_or_create(&TokenLabels {
                        model: entry.model.clone(),
                        kind: kind.into(),
                    })
                    .inc_by(tokens);
            }
        }
    }
}

impl TaskMetrics {
    /// An observer for [`crate::agent::llm::retry::observing_attempts`]
    /// that times every attempt on `model`, by outcome.
    pub fn llm_attempts(&self, model: &str) -> crate::agent::llm::retry::AttemptObserver {
        let seconds = self.llm_call_seconds.clone();
        let model = model.to_owned();
        std::sync::Arc::new(move |class, took: Duration| {
            let outcome = match class {
                None => "ok".to_owned(),
                Some(kind) => serde_json::to_value(kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "unknown".to_owned()),
            };
            seconds
                .get_or_create(&AttemptLabels {
                    model: model.clone(),
                    outcome,
                })
                .observe(took.as_secs_f64());
        })
    }
}

impl crate::agent::sink::CostObserver for TaskMetrics {
    fn llm_call(&self, entry: &CostEntry) {
        TaskMetrics::llm_call(self, entry);
    }
}

/// The name of a task's kind, as metrics label it.
pub fn kind_of(kind: &shoal_shared::TaskKind) -> &'static str {
    match kind {
        shoal_shared::TaskKind::Exec(_) => "exec",
        shoal_shared::TaskKind::Agent(_) => "agent",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PatchErrorLabels {
    /// `unreachable`, `token`, `unauthorized`, `forbidden`, `not_found`,
    /// `rejected` (another 4xx), `server` (5xx).
    pub class: String,
}

/// What the pod-deletion-cost updater did (docs/adr/0022).
#[derive(Clone)]
pub struct KubeMetrics {
    /// PATCHes the API server accepted.
    pub patches: Counter,
    /// Failed PATCH attempts, by class.
    pub patch_errors: Family<PatchErrorLabels, Counter>,
    /// The deletion cost the API server last accepted for this pod.
    pub deletion_cost: Gauge,
}

impl KubeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            patches: Counter::default(),
            patch_errors: Family::default(),
            deletion_cost: Gauge::default(),
        };
        let kube = registry.sub_registry_with_prefix("shoal_kube");
        kube.register(
            "patches",
            "Pod-deletion-cost PATCHes the Kubernetes API accepted",
            metrics.patches.clone(),
        );
        kube.register(
            "patch_errors",
            "Failed pod-deletion-cost PATCH attempts, by class",
            metrics.patch_errors.clone(),
        );
        kube.register(
            "pod_deletion_cost",
            "The pod-deletion-cost the Kubernetes API last accepted for this pod",
            metrics.deletion_cost.clone(),
        );
        metrics
    }

    pub fn patch_error(&self, class: &str) {
        self.patch_errors
            .get_or_create(&PatchErrorLabels {
                class: class.into(),
            })
            .inc();
    }
}
