use crate::task::TaskId;

/// Every Redis key of one namespace. Per-task keys share the `{id}` hash tag, so
/// a task's record, stream and lease live on one cluster slot.
#[derive(Debug, Clone)]
pub struct Keys {
    namespace: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
        }
    }

    /// The task record hash.
    pub fn task(&self, id: &TaskId) -> String {
        format!("{}:task:{{{id}}}", self.namespace)
    }

    /// The task's full event log (stream).
    pub fn task_events(&self, id: &TaskId) -> String {
        format!("{}:task:{{{id}}}:events", self.namespace)
    }

    /// The lease a worker holds while the task runs.
    pub fn lease(&self, id: &TaskId) -> String {
        format!("{}:task:{{{id}}}:lease", self.namespace)
    }

    /// A running agent task's checkpoint (JSON, ADR 0033).
    pub fn checkpoint(&self, id: &TaskId) -> String {
        format!("{}:task:{{{id}}}:checkpoint", self.namespace)
    }

    /// A scheduled task's message, waiting for its due time (ADR 0028).
    pub fn scheduled_message(&self, id: &TaskId) -> String {
        format!("{}:task:{{{id}}}:message", self.namespace)
    }

    /// Scheduled task ids, scored by due time in ms (ADR 0028).
    pub fn scheduled(&self) -> String {
        format!("{}:scheduled", self.namespace)
    }

    /// The fleet-wide firehose: one small entry per event.
    pub fn firehose(&self) -> String {
        format!("{}:events", self.namespace)
    }

    /// One entry per LLM call, for billing consumers.
    pub fn costs(&self) -> String {
        format!("{}:costs", self.namespace)
    }

    /// A tenant's LLM spend (micro-dollars) on one UTC day, `YYYYMMDD`
    /// (ADR 0038).
    pub fn spend_day(&self, tenant: &str, day: &str) -> String {
        format!("{}:spend:{tenant}:day:{day}", self.namespace)
    }

    /// A tenant's LLM spend (micro-dollars) in one UTC month, `YYYYMM`.
    pub fn spend_month(&self, tenant: &str, month: &str) -> String {
        format!("{}:spend:{tenant}:month:{month}", self.namespace)
    }

    /// Idempotency key -> task id, per tenant.
    pub fn idempotency(&self, tenant: &str, key: &str) -> String {
        format!("{}:idem:{tenant}:{key}", self.namespace)
    }

    /// The tenants that have task indexes.
    pub fn tenants(&self) -> String {
        format!("{}:tenants", self.namespace)
    }

    /// A tenant's task ids, all scores 0, read by lex range: UUIDv7 ids sort
    /// by creation time, so the newest is last.
    pub fn tenant_index(&self, tenant: &str) -> String {
        format!("{}:tenant:{tenant}:tasks", self.namespace)
    }

    /// The dead-letter log: why each dead message died.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.namespace)
    }

    /// A live worker's heartbeat (JSON, expiring).
    pub fn worker(&self, id: &str) -> String {
        format!("{}:worker:{id}", self.namespace)
    }

    /// Live workers' ids, scored by when their heartbeat expires (ms).
    pub fn workers(&self) -> String {
        format!("{}:workers", self.namespace)
    }

    /// A task's dead letter: the log entry's id and the message (hash).
    pub fn dead_letter(&self, id: &TaskId) -> String {
        format!("{}:dead:task:{id}", self.namespace)
    }

    /// The fleet-wide LLM rate bucket of a provider and model (hash,
    /// ADR 0037).
    pub fn rate_limit(&self, provider: &str, model: &str) -> String {
        format!("{}:ratelimit:{provider}:{model}", self.namespace)
    }

    /// The tenant's running task ids under its `max_running` cap, scored by
    /// when each slot expires (ms, ADR 0040). The `{tenant}` hash tag keeps
    /// a tenant's cap sets on one cluster slot, for the one script.
    pub fn tenant_running(&self, tenant: &str) -> String {
        format!("{}:caps:{{{tenant}}}:running", self.namespace)
    }

    /// The tenant's running agent task ids of one model profile, under its
    /// `max_running_per_model` cap (ADR 0040).
    pub fn tenant_model_running(&self, tenant: &str, model: &str) -> String {
        format!("{}:caps:{{{tenant}}}:model:{model}", self.namespace)
    }

    /// The tenant's tasks turned away by a cap and not run since, scored by
    /// when the mark lapses (ms, ADR 0040): one note per wait episode.
    pub fn tenant_waiting(&self, tenant: &str) -> String {
        format!("{}:caps:{{{tenant}}}:waiting", self.namespace)
    }

    /// A pattern matching every key of the namespace (for teardown).
    pub fn pattern(&self) -> String {
        format!("{}:*", self.namespace)
    }
}
