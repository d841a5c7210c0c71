//! The pool's Prometheus metrics. Each is emitted next to its log line, in
//! the pool, so a metric and its story never disagree.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TemplateLabels {
    pub template: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    pub template: String,
    /// `hit` (warm), `miss` (created for this lease), `timeout`, `error`.
    pub result: String,
}

/// Everything the pool counts.
#[derive(Clone)]
pub struct PoolMetrics {
    pub lease_seconds: Family<LeaseLabels, Histogram>,
    pub leases: Family<LeaseLabels, Counter>,
    pub idle: Family<TemplateLabels, Gauge>,
    pub in_use: Family<TemplateLabels, Gauge>,
    pub create_seconds: Family<TemplateLabels, Histogram>,
    pub create_failures: Family<TemplateLabels, Counter>,
    pub health_failures: Family<TemplateLabels, Counter>,
    pub reaped: Family<TemplateLabels, Counter>,
    pub evicted: Family<TemplateLabels, Counter>,
}

fn histogram() -> Histogram {
    // 1 µs .. ~67 s: warm leases are microseconds, cold creates up to minutes.
    Histogram::new(exponential_buckets(1e-6, 4.0, 14))
}

impl PoolMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            lease_seconds: Family::new_with_constructor(histogram),
            leases: Family::default(),
            idle: Family::default(),
            in_use: Family::default(),
            create_seconds: Family::new_with_constructor(histogram),
            create_failures: Family::default(),
            health_failures: Family::default(),
            reaped: Family::default(),
            evicted: Family::default(),
        };
        let pool = registry.sub_registry_with_prefix("shoal_pool");
        pool.register(
            "lease_seconds",
            "Time to lease a sandbox (warm hand-over or cold create)",
            metrics.lease_seconds.clone(),
        );
        pool.register("leases", "Sandbox leases by result", metrics.leases.clone());
        pool.register("idle", "Idle warm sandboxes", metrics.idle.clone());
        pool.register("in_use", "Leased sandboxes", metrics.in_use.clone());
        pool.register(
            "create_seconds",
            "Time to create a sandbox until it has run a command",
            metrics.create_seconds.clone(),
        );
        pool.register(
            "create_failures",
            "Failed sandbox creations",
            metrics.create_failures.clone(),
        );
        pool.register(
            "health_failures",
            "Idle sandboxes discarded by the health check at lease time",
            metrics.health_failures.clone(),
        );
        pool.register(
            "reaped",
            "Owned but unleased sandboxes destroyed by the reaper",
            metrics.reaped.clone(),
        );
        pool.register(
            "evicted",
            "Idle reusable sandboxes kept for one tenant, destroyed to make room for another",
            metrics.evicted.clone(),
        );
        metrics
    }
}
