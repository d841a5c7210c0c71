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

    /// The fleet-wide firehose: one small entry per event.
    pub fn firehose(&self) -> String {
        format!("{}:events", self.namespace)
    }

    /// One entry per LLM call, for billing consumers.
    pub fn costs(&self) -> String {
        format!("{}:costs", self.namespace)
    }

    /// Idempotency key -> task id, per tenant.
    pub fn idempotency(&self, tenant: &str, key: &str) -> String {
        format!("{}:idem:{tenant}:{key}", self.namespace)
    }

    /// Every task id, newest last by id (UUIDv7 ids sort by creation time);
    /// all scores 0, so it is read by lex range.
    pub fn index(&self) -> String {
        format!("{}:tasks", self.namespace)
    }

    /// The same, for one tenant.
    pub fn tenant_index(&self, tenant: &str) -> String {
        format!("{}:tenant:{tenant}:tasks", self.namespace)
    }

    /// The dead-letter log: why each dead message died.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.namespace)
    }

    /// A pattern matching every key of the namespace (for teardown).
    pub fn pattern(&self) -> String {
        format!("{}:*", self.namespace)
    }
}
