//! `[tenants.<name>]`: what one tenant may use of a shared fleet (issue 16):
//! how many of its tasks run at once (in all, and per model profile), what
//! it may spend per UTC day and month, and its weight in fair scheduling.
//! `[tenants."*"]` gives the defaults of every tenant not named. A tenant
//! with no table and no `*` table is unlimited, with weight 1.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{invalid, SettingsError};
use crate::cost::MicroDollars;
use crate::name::Name;

/// The table key giving every other tenant's defaults.
pub const DEFAULT_TENANT: &str = "*";

/// One tenant's limits; `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantLimits {
    /// Tasks of the tenant running at once, fleet-wide.
    pub max_running: Option<u32>,
    /// Tasks of the tenant running at once per model profile (agent tasks).
    pub max_running_per_model: BTreeMap<Name, u32>,
    /// Spend per UTC day.
    pub daily_budget: Option<MicroDollars>,
    /// Spend per UTC month.
    pub monthly_budget: Option<MicroDollars>,
    /// Share of the fleet under backlog, relative to other tenants' weights.
    pub weight: u32,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            max_running: None,
            max_running_per_model: BTreeMap::new(),
            daily_budget: None,
            monthly_budget: None,
            weight: 1,
        }
    }
}

/// The `[tenants]` tables, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantsSettings {
    /// `[tenants."*"]`, or unlimited.
    pub default: TenantLimits,
    pub named: BTreeMap<Name, TenantLimits>,
}

impl TenantsSettings {
    /// The limits of `tenant`: its own table, else the `*` table.
    pub fn limits(&self, tenant: &str) -> &TenantLimits {
        self.named
            .iter()
            .find(|(name, _)| name.as_str() == tenant)
            .map(|(_, limits)| limits)
            .unwrap_or(&self.default)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    max_running: Option<u32>,
    #[serde(default)]
    max_running_per_model: BTreeMap<String, u32>,
    daily_budget_usd: Option<f64>,
    monthly_budget_usd: Option<f64>,
    weight: Option<u32>,
}

pub(super) fn validate(raw: BTreeMap<String, RawTenant>) -> Result<TenantsSettings, SettingsError> {
    let mut settings = TenantsSettings::default();
    for (tenant, table) in raw {
        let key = format!("tenants.{tenant}");
        let limits = table.validate(&key)?;
        if tenant == DEFAULT_TENANT {
            settings.default = limits;
        } else {
            let name =
                Name::parse(&tenant).map_err(|e| invalid(&key, format!("bad tenant name: {e}")))?;
            settings.named.insert(name, limits);
        }
    }
    Ok(settings)
}

impl RawTenant {
    fn validate(self, key: &str) -> Result<TenantLimits, SettingsError> {
        if self.max_running == Some(0) {
            return Err(invalid(
                format!("{key}.max_running"),
                "must be at least 1 (a tenant that may run nothing cannot finish a task)",
            ));
        }
        let mut per_model = BTreeMap::new();
        for (model, cap) in self.max_running_per_model {
            let model_key = format!("{key}.max_running_per_model.{model}");
            let name = Name::parse(&model)
                .map_err(|e| invalid(&model_key, format!("bad model profile name: {e}")))?;
            if cap == 0 {
                return Err(invalid(&model_key, "must be at least 1"));
            }
            per_model.insert(name, cap);
        }
        let budget = |usd: Option<f64>, field: &str| -> Result<_, SettingsError> {
            match usd {
                None => Ok(None),
                Some(usd) if usd.is_finite() && usd >= 0.0 => Ok(Some(MicroDollars::from_usd(usd))),
                Some(_) => Err(invalid(
                    format!("{key}.{field}"),
                    "must be a finite, non-negative number of USD",
                )),
            }
        };
        let weight = self.weight.unwrap_or(1);
        if weight == 0 {
            return Err(invalid(format!("{key}.weight"), "must be at least 1"));
        }
        Ok(TenantLimits {
            max_running: self.max_running,
            max_running_per_model: per_model,
            daily_budget: budget(self.daily_budget_usd, "daily_budget_usd")?,
            monthly_budget: budget(self.monthly_budget_usd, "monthly_budget_usd")?,
            weight,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::settings::Settings;

    #[test]
    fn tenants_get_their_own_limits_or_the_star_defaults() {
        let settings = Settings::from_toml(
            "[tenants.\"*\"]\nmax_running = 8\n\
             [tenants.team-a]\nmax_running = 2\ndaily_budget_usd = 1.5\nweight = 3\n\
             [tenants.team-a.max_running_per_model]\nopenai = 1\n",
        )
        .expect("valid");
        let a = settings.tenants.limits("team-a");
        assert_eq!(a.max_running, Some(2));
        assert_eq!(a.daily_budget.map(|b| b.0), Some(1_500_000));
        assert_eq!(a.weight, 3);
        assert_eq!(
            a.max_running_per_model
                .iter()
                .map(|(m, c)| (m.as_str(), *c))
                .collect::<Vec<_>>(),
            vec![("openai", 1)]
        );
        let other = settings.tenants.limits("team-b");
        assert_eq!(other.max_running, Some(8));
        assert_eq!(other.weight, 1);
        let open = Settings::from_toml("").expect("valid");
        assert_eq!(open.tenants.limits("x").max_running, None);
    }

    #[test]
    fn bad_tenant_limits_are_refused_naming_the_key() {
        for (text, key) in [
            ("[tenants.a]\nmax_running = 0\n", "tenants.a.max_running"),
            ("[tenants.a]\nweight = 0\n", "tenants.a.weight"),
            (
                "[tenants.a]\ndaily_budget_usd = -1.0\n",
                "tenants.a.daily_budget_usd",
            ),
            (
                "[tenants.a.max_running_per_model]\nopenai = 0\n",
                "tenants.a.max_running_per_model.openai",
            ),
            ("[tenants.\"a b\"]\nweight = 1\n", "tenants.a b"),
            ("[tenants.a]\nmax_runing = 1\n", "max_runing"),
        ] {
            let err = Settings::from_toml(text).expect_err(text).to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
