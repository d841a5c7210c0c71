//! The tenant budget check of the conversation loop, over the Redis spend
//! counters (ADR 0038).

use shoal_shared::settings::TenantLimits;
use shoal_shared::store::Store;
use tracing::warn;

use super::conversation::SpendGuard;

/// Reads the tenant's day and month counters on every check (no cache: a
/// cached read would let a task run more than one call past the budget).
pub struct RedisSpendGuard {
    store: Store,
    limits: TenantLimits,
}

impl RedisSpendGuard {
    /// A guard for `limits`, or `None` when they set no budget.
    pub fn new(store: Store, limits: &TenantLimits) -> Option<Self> {
        (limits.daily_budget.is_some() || limits.monthly_budget.is_some()).then(|| Self {
            store,
            limits: limits.clone(),
        })
    }
}

#[async_trait::async_trait]
impl SpendGuard for RedisSpendGuard {
    async fn exceeded(&self, tenant: &str) -> Option<String> {
        match self.store.budget_exceeded(tenant, &self.limits).await {
            Ok(line) => line.map(|line| line.describe(tenant)),
            Err(error) => {
                // Fails open: a Redis outage does not stop the fleet's work.
                warn!(%error, tenant, "reading the tenant's spend failed; the budget is not checked this step");
                None
            }
        }
    }
}
