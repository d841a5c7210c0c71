//! A worker's task-level Prometheus metrics: what it ran, how each run ended
//! and took, and what the agents' LLM calls used and cost. Served on
//! `/metrics` next to the pool's (`shoal_pool_*`).
//!
//! Every label has a bounded set of values. The tenant label of the LLM cost
//! only ever carries a tenant of `worker.metric_tenants` or `default`; any
//! other tenant is counted as `other` (as the scheduler does with the
//! tenants of its tokens map).

use std::collections::BTreeSet;
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
pub struct CostLabels {
    pub model: String,
    /// A tenant of `worker.metric_tenants`, `default`, or `other`.
    pub tenant: String,
}

/// The tenant label of a tenant that is not configured.
pub const OTHER_TENANT: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub model: String,
    /// `ok`, or the error class (`auth`, `rate_limit`, `server`, ...).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateWaitLabels {
    /// The model profile.
    pub model: String,
    /// `requests`, `tokens` or `provider` (ADR 0037).
    pub reason: String,
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
    pub llm_cost_microdollars: Family<CostLabels, Counter>,
    pub llm_call_seconds: Family<AttemptLabels, Histogram>,
    /// Waits for the fleet-wide rate limit, one per wait episode (ADR 0037).
    pub llm_rate_limit_wait_seconds: Family<RateWaitLabels, Histogram>,
    pub llm_rate_limited: Family<RateWaitLabels, Counter>,
    /// Runs in progress, all kinds together, for whoever must react when the
    /// number changes (the pod-deletion-cost updater); moves with `running`.
    busy: watch::Sender<usize>,
    /// The tenants labelled as they are (`default` among them).
    tenants: std::sync::Arc<BTreeSet<String>>,
    /// The rest: queue, slots, settling, agent loop, events, LLM retries.
    pub flow: FlowMetrics,
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
    /// Metrics that label only `default` and `other` tenants.
    pub fn new(registry: &mut Registry) -> Self {
        Self::with_tenants(registry, std::iter::empty::<&str>())
    }

    /// `tenants`: the tenants the tenant label names as they are
    /// (`worker.metric_tenants`); `default` is always one of them.
    pub fn with_tenants<T: AsRef<str>>(
        registry: &mut Registry,
        tenants: impl IntoIterator<Item = T>,
    ) -> Self {
        let mut tenants: BTreeSet<String> =
            tenants.into_iter().map(|t| t.as_ref().to_owned()).collect();
        tenants.insert("default".to_owned());
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
            // 10 ms .. ~3 min.
            llm_rate_limit_wait_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 2.0, 15))
            }),
            llm_rate_limited: Family::default(),
            busy: watch::Sender::new(0),
            tenants: std::sync::Arc::new(tenants),
            flow: FlowMetrics::new(registry),
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
            "What LLM calls cost, in millionths of a dollar (from the configured prices), by model and tenant (a tenant of worker.metric_tenants, default, or other)",
            metrics.llm_cost_microdollars.clone(),
        );
        llm.register(
            "call_seconds",
            "Time of each LLM HTTP attempt, failed ones included, by outcome (ok or the error class)",
            metrics.llm_call_seconds.clone(),
        );
        llm.register(
            "rate_limit_wait_seconds",
            "Time LLM calls waited for the fleet-wide rate limit of their model, per wait episode, by reason (requests, tokens, provider)",
            metrics.llm_rate_limit_wait_seconds.clone(),
        );
        llm.register(
            "rate_limited",
            "LLM calls that had to wait for the fleet-wide rate limit, by model and reason",
            metrics.llm_rate_limited.clone(),
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

    /// The tenant as a label value: configured ones (and `default`) as they
    /// are, any other `other`.
    pub fn tenant_label(&self, tenant: &str) -> String {
        if self.tenants.contains(tenant) {
            tenant.to_owned()
        } else {
            OTHER_TENANT.to_owned()
        }
    }

    /// One LLM call, as it goes to the cost stream (which names the task's
    /// tenant).
    pub fn llm_call(&self, entry: &CostEntry) {
        let model = ModelLabels {
            model: entry.model.clone(),
        };
        self.llm_calls.get_or_create(&model).inc();
        self.llm_cost_microdollars
            .get_or_create(&CostLabels {
                model: entry.model.clone(),
                tenant: self.tenant_label(&entry.tenant),
            })
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
    /// Counts the fleet-wide rate limit's wait episodes (ADR 0037).
    pub fn rate_waits(&self) -> crate::agent::llm::ratelimit::WaitObserver {
        let counted = self.llm_rate_limited.clone();
        let waited = self.llm_rate_limit_wait_seconds.clone();
        std::sync::Arc::new(move |model: &str, reason: &str, took: Duration| {
            let labels = RateWaitLabels {
                model: model.to_owned(),
                reason: reason.to_owned(),
            };
            counted.get_or_create(&labels).inc();
            waited.get_or_create(&labels).observe(took.as_secs_f64());
        })
    }

    /// An observer for [`crate::agent::llm::retry::observing_attempts`]
    /// that times every attempt on `model`, by outcome.
    pub fn llm_attempts(&self, model: &str) -> crate::agent::llm::retry::AttemptObserver {
        let seconds = self.llm_call_seconds.clone();
        let model = model.to_owned();
        let retries = self.flow.llm_retries.clone();
        std::sync::Arc::new(move |report: crate::agent::llm::retry::AttemptReport| {
            let (class, took) = match report {
                crate::agent::llm::retry::AttemptReport::Attempt { class, took } => (class, took),
                // A failed attempt that will be tried again.
                crate::agent::llm::retry::AttemptReport::Retry { class, .. } => {
                    retries.inc(class);
                    return;
                }
            };
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

impl crate::agent::sink::SinkObserver for TaskMetrics {
    fn llm_call(&self, entry: &CostEntry) {
        TaskMetrics::llm_call(self, entry);
    }

    fn step(&self) {
        self.flow.agent_steps.inc();
    }

    fn tool_call(&self, tool: &str, outcome: crate::agent::sink::ToolOutcome) {
        self.flow.tool_call(tool, outcome);
    }

    fn events_published(&self, count: u64) {
        self.flow.events_published.inc_by(count);
    }

    fn events_dropped(&self, reason: DropReason, count: u64) {
        self.flow.events_dropped(reason, count);
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

pub use crate::agent::sink::DropReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PriorityLabels {
    /// `high`, `normal`, `low`.
    pub priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabels {
    pub tool: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: String,
}

/// Why a delivery went to a retry tier: a bounded set, one label value each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    /// Another worker holds the task's lease (a redelivery while it runs).
    LeasedElsewhere,
    /// The task's state refused the lease (not queued or retrying).
    StateRefused,
    /// Redis failed: the run's writes or recording its outcome.
    Store,
    /// No sandbox from the pool (full, timed out, closing).
    Pool,
    /// The sandbox failed in a way worth another attempt.
    Sandbox,
    /// Building the LLM client failed in a way worth another attempt.
    Llm,
    /// The task's record vanished mid-run.
    RecordVanished,
    /// The task could not move to running.
    CannotStart,
    /// The task's tenant was at a concurrency cap (ADR 0040); no attempt
    /// was used.
    TenantCap,
    /// Anything else.
    Other,
}

impl RetryReason {
    pub const ALL: [RetryReason; 10] = [
        Self::LeasedElsewhere,
        Self::StateRefused,
        Self::Store,
        Self::Pool,
        Self::Sandbox,
        Self::Llm,
        Self::RecordVanished,
        Self::CannotStart,
        Self::TenantCap,
        Self::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeasedElsewhere => "leased_elsewhere",
            Self::StateRefused => "state_refused",
            Self::Store => "store",
            Self::Pool => "pool",
            Self::Sandbox => "sandbox",
            Self::Llm => "llm",
            Self::RecordVanished => "record_vanished",
            Self::CannotStart => "cannot_start",
            Self::TenantCap => "tenant_cap",
            Self::Other => "other",
        }
    }
}

/// The dead-letter reasons a worker gives (`Disposition::Dead`'s `reason`);
/// any other is counted as `other`.
pub const DEAD_REASONS: [&str; 5] = [
    "attempts_exhausted",
    "too_large",
    "malformed",
    "unsupported_version",
    "invalid_spec",
];

/// The tools an agent has (`Tool::name`); a call naming none of them is
/// counted as `unknown`.
pub const TOOLS: [&str; 6] = [
    "terminal",
    "file_editor",
    "think",
    "finish",
    "task_tracker",
    "unknown",
];

/// The LLM error classes a client retries by itself (`LlmErrorKind::is_retryable`).
const RETRY_CLASSES: [crate::agent::llm::LlmErrorKind; 5] = [
    crate::agent::llm::LlmErrorKind::RateLimit,
    crate::agent::llm::LlmErrorKind::Server,
    crate::agent::llm::LlmErrorKind::Timeout,
    crate::agent::llm::LlmErrorKind::Connection,
    crate::agent::llm::LlmErrorKind::InvalidResponse,
];

/// The label value of an LLM error class (its serde name).
pub fn llm_class_name(kind: crate::agent::llm::LlmErrorKind) -> &'static str {
    use crate::agent::llm::LlmErrorKind::*;
    match kind {
        RateLimit => "rate_limit",
        ContextWindowExceeded => "context_window_exceeded",
        Auth => "auth",
        BadRequest => "bad_request",
        Server => "server",
        Timeout => "timeout",
        Connection => "connection",
        InvalidResponse => "invalid_response",
        Cancelled => "cancelled",
    }
}

/// LLM retries by class, every retryable class counted from startup.
#[derive(Clone)]
pub struct LlmRetries {
    family: Family<ClassLabels, Counter>,
    /// In `RETRY_CLASSES` order: no label built per retry.
    known: Vec<Counter>,
}

impl LlmRetries {
    pub fn inc(&self, class: crate::agent::llm::LlmErrorKind) {
        match RETRY_CLASSES.iter().position(|c| *c == class) {
            Some(index) => self.known[index].inc(),
            None => self
                .family
                .get_or_create(&ClassLabels {
                    class: llm_class_name(class).into(),
                })
                .inc(),
        };
    }
}

/// How tasks flow through a worker besides their runs: the queue wait, the
/// slots, how deliveries are settled, what the agent loop does, events,
/// LLM retries. Every series whose labels are known in advance exists (at 0)
/// from startup, so `rate()` sees the first increment; the hot paths
/// increment pre-built series (no label built, nothing allocated).
///
/// The queue wait is measured on the wall clock: from the message's
/// `submitted_at` (the scheduler's clock, when it published) or, for a copy
/// back from a retry tier, from its `x-shoal-ready-at` header (the
/// republishing worker's clock plus the delay), to this worker's clock when
/// a slot takes the delivery. Monotonic clocks do not cross hosts; with
/// NTP the skew is milliseconds, and a negative difference counts as 0. A
/// message requeued by a draining worker keeps its stamp, so its second
/// wait includes its first run.
#[derive(Clone)]
pub struct FlowMetrics {
    pub queue_wait_seconds: Family<PriorityLabels, Histogram>,
    /// Configured slots (`worker.slots`).
    pub slots: Gauge,
    /// Slots not holding a delivery; a stopped slot (draining) is not free.
    pub slots_free: Gauge,
    pub retries: Family<ReasonLabels, Counter>,
    pub dead_letters: Family<ReasonLabels, Counter>,
    pub tool_calls: Family<ToolLabels, Counter>,
    pub agent_steps: Counter,
    pub events_published: Counter,
    pub events_dropped: Family<ReasonLabels, Counter>,
    pub llm_retries: LlmRetries,
    /// Pre-built series, indexed like the enums and tables above.
    queue_wait_by_priority: Vec<Histogram>,
    retries_by_reason: Vec<Counter>,
    dead_by_reason: Vec<Counter>,
    /// `TOOLS.len() * ToolOutcome::ALL.len()`, tool-major.
    tool_table: Vec<Counter>,
    dropped_by_reason: Vec<Counter>,
}

impl FlowMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        use crate::agent::sink::ToolOutcome;
        use shoal_shared::task::Priority;
        // 5 ms .. ~2.2 h.
        let queue_wait_seconds: Family<PriorityLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 3.0, 14)));
        let queue_wait_by_priority = Priority::ALL
            .iter()
            .map(|p| {
                queue_wait_seconds
                    .get_or_create(&PriorityLabels {
                        priority: p.as_str().into(),
                    })
                    .clone()
            })
            .collect();
        let retries: Family<ReasonLabels, Counter> = Family::default();
        let retries_by_reason = RetryReason::ALL
            .iter()
            .map(|r| {
                retries
                    .get_or_create(&ReasonLabels {
                        reason: r.as_str().into(),
                    })
                    .clone()
            })
            .collect();
        let dead_letters: Family<ReasonLabels, Counter> = Family::default();
        let dead_by_reason = DEAD_REASONS
            .iter()
            .chain(["other"].iter())
            .map(|r| {
                dead_letters
                    .get_or_create(&ReasonLabels {
                        reason: (*r).into(),
                    })
                    .clone()
            })
            .collect();
        let tool_calls: Family<ToolLabels, Counter> = Family::default();
        let mut tool_table = Vec::with_capacity(TOOLS.len() * ToolOutcome::ALL.len());
        for tool in TOOLS {
            for outcome in ToolOutcome::ALL {
                tool_table.push(
                    tool_calls
                        .get_or_create(&ToolLabels {
                            tool: tool.into(),
                            outcome: outcome.as_str().into(),
                        })
                        .clone(),
                );
            }
        }
        let events_dropped: Family<ReasonLabels, Counter> = Family::default();
        let dropped_by_reason = DropReason::ALL
            .iter()
            .map(|r| {
                events_dropped
                    .get_or_create(&ReasonLabels {
                        reason: r.as_str().into(),
                    })
                    .clone()
            })
            .collect();
        let llm_family: Family<ClassLabels, Counter> = Family::default();
        let llm_retries = LlmRetries {
            known: RETRY_CLASSES
                .iter()
                .map(|c| {
                    llm_family
                        .get_or_create(&ClassLabels {
                            class: llm_class_name(*c).into(),
                        })
                        .clone()
                })
                .collect(),
            family: llm_family,
        };
        let metrics = Self {
            queue_wait_seconds,
            slots: Gauge::default(),
            slots_free: Gauge::default(),
            retries,
            dead_letters,
            tool_calls,
            agent_steps: Counter::default(),
            events_published: Counter::default(),
            events_dropped,
            llm_retries,
            queue_wait_by_priority,
            retries_by_reason,
            dead_by_reason,
            tool_table,
            dropped_by_reason,
        };
        let tasks = registry.sub_registry_with_prefix("shoal_tasks");
        tasks.register(
            "queue_wait_seconds",
            "Time a task's message waited in its work queue before a slot took it: from \
             submission (or from the end of its retry delay) to the slot, on the wall clock",
            metrics.queue_wait_seconds.clone(),
        );
        tasks.register(
            "retries",
            "Deliveries this worker sent to a retry tier, by reason",
            metrics.retries.clone(),
        );
        tasks.register(
            "dead_letters",
            "Deliveries this worker dead-lettered, by reason",
            metrics.dead_letters.clone(),
        );
        let worker = registry.sub_registry_with_prefix("shoal_worker");
        worker.register(
            "slots",
            "Task slots this worker is configured with",
            metrics.slots.clone(),
        );
        worker.register(
            "slots_free",
            "Task slots not holding a delivery (a stopped slot is not free)",
            metrics.slots_free.clone(),
        );
        let agent = registry.sub_registry_with_prefix("shoal_agent");
        agent.register(
            "tool_calls",
            "Tool calls of agent conversations, by tool and outcome",
            metrics.tool_calls.clone(),
        );
        agent.register(
            "steps",
            "Model replies the agent loop acted on (LLM calls of the loop, condensation excluded)",
            metrics.agent_steps.clone(),
        );
        let events = registry.sub_registry_with_prefix("shoal_events");
        events.register(
            "published",
            "Task events this worker wrote to Redis",
            metrics.events_published.clone(),
        );
        events.register(
            "dropped",
            "Task events this worker could not write, by reason",
            metrics.events_dropped.clone(),
        );
        let llm = registry.sub_registry_with_prefix("shoal_llm");
        llm.register(
            "retries",
            "Failed LLM attempts the client tried again, by error class",
            metrics.llm_retries.family.clone(),
        );
        metrics
    }

    /// A slot took a delivery of `priority` that became runnable at `since`
    /// (wall clock, another host's maybe): one queue-wait observation, 0
    /// when the clocks disagree the other way.
    pub fn queue_wait(
        &self,
        priority: shoal_shared::task::Priority,
        since: chrono::DateTime<chrono::Utc>,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let waited = (now - since).to_std().unwrap_or_default();
        let index = shoal_shared::task::Priority::ALL
            .iter()
            .position(|p| *p == priority)
            .unwrap_or(0);
        self.queue_wait_by_priority[index].observe(waited.as_secs_f64());
    }

    pub fn retry(&self, reason: RetryReason) {
        let index = RetryReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(RetryReason::ALL.len() - 1);
        self.retries_by_reason[index].inc();
    }

    pub fn dead_letter(&self, reason: &str) {
        let index = DEAD_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(DEAD_REASONS.len());
        self.dead_by_reason[index].inc();
    }

    pub fn tool_call(&self, tool: &str, outcome: crate::agent::sink::ToolOutcome) {
        use crate::agent::sink::ToolOutcome;
        let row = TOOLS
            .iter()
            .position(|t| *t == tool)
            .unwrap_or(TOOLS.len() - 1);
        let column = ToolOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.tool_table[row * ToolOutcome::ALL.len() + column].inc();
    }

    pub fn events_dropped(&self, reason: DropReason, count: u64) {
        let index = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.dropped_by_reason[index].inc_by(count);
    }

    /// The configured slots, all free: set once when the worker starts.
    pub fn set_slots(&self, slots: usize) {
        let slots = i64::try_from(slots).unwrap_or(i64::MAX);
        self.slots.set(slots);
        self.slots_free.set(slots);
    }

    /// A slot holds a delivery until the guard is dropped.
    pub fn slot_busy(&self) -> SlotBusy {
        self.slots_free.dec();
        SlotBusy {
            free: self.slots_free.clone(),
        }
    }
}

/// Gives the slot back to the free count when the delivery is settled.
pub struct SlotBusy {
    free: Gauge,
}

impl Drop for SlotBusy {
    fn drop(&mut self) {
        self.free.inc();
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;
    use shoal_shared::cost::Usage;
    use shoal_shared::store::CostEntry;
    use shoal_shared::task::TaskId;

    use super::TaskMetrics;

    fn call(tenant: &str, model: &str, cost_micros: u64) -> CostEntry {
        CostEntry {
            task_id: TaskId::new(),
            tenant: tenant.into(),
            model: model.into(),
            usage: Usage {
                prompt_tokens: 10,
                ..Usage::default()
            },
            cost_micros,
            latency_ms: 5,
            ts: chrono::Utc::now(),
        }
    }

    #[test]
    fn configured_tenants_and_default_are_labelled_as_they_are_others_are_other() {
        let mut registry = Registry::default();
        let metrics = TaskMetrics::with_tenants(&mut registry, ["acme", "team-b"]);
        assert_eq!(metrics.tenant_label("acme"), "acme");
        assert_eq!(metrics.tenant_label("team-b"), "team-b");
        assert_eq!(metrics.tenant_label("default"), "default");
        assert_eq!(metrics.tenant_label("mallory"), "other");
        assert_eq!(metrics.tenant_label("Acme"), "other");
        assert_eq!(metrics.tenant_label(""), "other");

        let mut registry = Registry::default();
        let none = TaskMetrics::new(&mut registry);
        assert_eq!(none.tenant_label("default"), "default");
        assert_eq!(none.tenant_label("acme"), "other");
    }

    #[test]
    fn the_cost_counter_is_labelled_by_model_and_bounded_tenant() {
        let mut registry = Registry::default();
        let metrics = TaskMetrics::with_tenants(&mut registry, ["acme"]);
        metrics.llm_call(&call("acme", "m1", 300));
        metrics.llm_call(&call("acme", "m1", 200));
        metrics.llm_call(&call("default", "m1", 7));
        // Two unconfigured tenants share one series.
        metrics.llm_call(&call("mallory", "m2", 11));
        metrics.llm_call(&call("eve", "m2", 4));
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("shoal_llm_cost_microdollars_total{"))
            .collect();
        assert_eq!(series.len(), 3, "{text}");
        for (model, tenant, value) in [
            ("m1", "acme", 500),
            ("m1", "default", 7),
            ("m2", "other", 15),
        ] {
            let line = format!(
                "shoal_llm_cost_microdollars_total{{model=\"{model}\",tenant=\"{tenant}\"}} {value}"
            );
            assert!(series.contains(&line.as_str()), "{line} not in {series:?}");
        }
        // The call count stays by model alone.
        assert!(
            text.contains("shoal_llm_calls_total{model=\"m2\"} 2"),
            "{text}"
        );
    }
}
