//! A tenant's LLM spend per UTC day and month (ADR 0038): two counters
//! per tenant, `INCRBY`'d in the same `MULTI` that appends each cost entry
//! to `{ns}:costs`, read back to enforce `[tenants]` budgets.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use redis::AsyncCommands;
use serde::Serialize;

use super::{CostEntry, Keys, Store, StoreError};
use crate::cost::MicroDollars;
use crate::settings::TenantLimits;

/// A day counter outlives its day by one more (late readers, clock skew).
const DAY_TTL_S: u64 = 2 * 24 * 3600;
/// A month counter outlives its month by about one more.
const MONTH_TTL_S: u64 = 62 * 24 * 3600;

fn day_of(at: DateTime<Utc>) -> String {
    at.format("%Y%m%d").to_string()
}

fn month_of(at: DateTime<Utc>) -> String {
    at.format("%Y%m").to_string()
}

/// Adds `cost` to its tenant's counters of the entry's UTC day and month.
pub(super) fn count(pipe: &mut redis::Pipeline, keys: &Keys, cost: &CostEntry) {
    let day = keys.spend_day(&cost.tenant, &day_of(cost.ts));
    let month = keys.spend_month(&cost.tenant, &month_of(cost.ts));
    pipe.cmd("INCRBY").arg(&day).arg(cost.cost_micros).ignore();
    pipe.cmd("EXPIRE").arg(&day).arg(DAY_TTL_S).ignore();
    pipe.cmd("INCRBY")
        .arg(&month)
        .arg(cost.cost_micros)
        .ignore();
    pipe.cmd("EXPIRE").arg(&month).arg(MONTH_TTL_S).ignore();
}

/// What a tenant spent so far today and this month (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spend {
    pub day: MicroDollars,
    pub month: MicroDollars,
}

/// Which budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn name(self) -> &'static str {
        match self {
            Self::Day => "daily",
            Self::Month => "monthly",
        }
    }
}

/// One budget's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLine {
    pub period: Period,
    pub limit: MicroDollars,
    pub spent: MicroDollars,
    /// When the period ends and the counter starts again from zero.
    pub resets_at: DateTime<Utc>,
}

impl BudgetLine {
    /// What is left, clipped at zero.
    pub fn left(&self) -> MicroDollars {
        MicroDollars(self.limit.0.saturating_sub(self.spent.0))
    }

    pub fn exceeded(&self) -> bool {
        self.spent >= self.limit
    }

    /// One sentence for an error: which budget, its limit, the spend, the reset.
    pub fn describe(&self, tenant: &str) -> String {
        format!(
            "tenant {tenant:?} has spent ${:.6} of its {} budget of ${:.6}; it resets at {}",
            self.spent.as_usd(),
            self.period.name(),
            self.limit.as_usd(),
            crate::task::format_time(self.resets_at)
        )
    }
}

/// The start of the next UTC day after `now`.
pub fn next_day(now: DateTime<Utc>) -> DateTime<Utc> {
    let date = now.date_naive() + Duration::days(1);
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight"))
}

/// The start of the next UTC month after `now`.
pub fn next_month(now: DateTime<Utc>) -> DateTime<Utc> {
    let (year, month) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    let date = NaiveDate::from_ymd_opt(year, month, 1).expect("first of a month");
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight"))
}

/// The tenant's budgets (those set) against its spend.
pub fn lines(limits: &TenantLimits, spend: Spend, now: DateTime<Utc>) -> Vec<BudgetLine> {
    let mut lines = Vec::new();
    if let Some(limit) = limits.daily_budget {
        lines.push(BudgetLine {
            period: Period::Day,
            limit,
            spent: spend.day,
            resets_at: next_day(now),
        });
    }
    if let Some(limit) = limits.monthly_budget {
        lines.push(BudgetLine {
            period: Period::Month,
            limit,
            spent: spend.month,
            resets_at: next_month(now),
        });
    }
    lines
}

/// The first budget the tenant has spent, if any.
pub fn exceeded(limits: &TenantLimits, spend: Spend, now: DateTime<Utc>) -> Option<BudgetLine> {
    lines(limits, spend, now)
        .into_iter()
        .find(BudgetLine::exceeded)
}

impl Store {
    /// The tenant's spend on `now`'s UTC day and month.
    pub async fn tenant_spend(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
    ) -> Result<Spend, StoreError> {
        let mut conn = self.conn.clone();
        let (day, month): (Option<u64>, Option<u64>) = conn
            .mget(&[
                self.keys.spend_day(tenant, &day_of(now)),
                self.keys.spend_month(tenant, &month_of(now)),
            ])
            .await?;
        Ok(Spend {
            day: MicroDollars(day.unwrap_or(0)),
            month: MicroDollars(month.unwrap_or(0)),
        })
    }

    /// The budget of `limits` the tenant has spent now, if any; no read
    /// when it has no budget.
    pub async fn budget_exceeded(
        &self,
        tenant: &str,
        limits: &TenantLimits,
    ) -> Result<Option<BudgetLine>, StoreError> {
        if limits.daily_budget.is_none() && limits.monthly_budget.is_none() {
            return Ok(None);
        }
        let now = Utc::now();
        let spend = self.tenant_spend(tenant, now).await?;
        Ok(exceeded(limits, spend, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_at_the_next_utc_day_and_month() {
        let now = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 0).unwrap();
        assert_eq!(
            next_day(now),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            next_month(now),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        let mid = Utc.with_ymd_and_hms(2026, 2, 10, 5, 0, 0).unwrap();
        assert_eq!(
            next_month(mid),
            Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn exceeded_names_the_first_spent_budget() {
        let limits = TenantLimits {
            daily_budget: Some(MicroDollars(100)),
            monthly_budget: Some(MicroDollars(1000)),
            ..TenantLimits::default()
        };
        let now = Utc::now();
        let under = Spend {
            day: MicroDollars(99),
            month: MicroDollars(99),
        };
        assert_eq!(exceeded(&limits, under, now), None);
        let day = Spend {
            day: MicroDollars(100),
            month: MicroDollars(100),
        };
        assert_eq!(exceeded(&limits, day, now).unwrap().period, Period::Day);
        let month = Spend {
            day: MicroDollars(0),
            month: MicroDollars(1500),
        };
        let line = exceeded(&limits, month, now).unwrap();
        assert_eq!((line.period, line.left()), (Period::Month, MicroDollars(0)));
        assert!(exceeded(&TenantLimits::default(), month, now).is_none());
    }
}
