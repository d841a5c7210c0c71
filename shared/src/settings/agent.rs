//! `[agent]`: the default model profile and the agent loop's thresholds.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, SettingsError};
use crate::model::ModelProfile;
use crate::name::Name;

/// The smallest `agent.condense_chars`: below it the condenser would run on
/// nearly every turn.
pub const MIN_CONDENSE_CHARS: usize = 1000;

#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The profile a task's `model = "default"` means.
    pub default_model: Name,
    /// A terminal command with no new output for this long returns (still running).
    pub no_output_timeout: Duration,
    /// History size (characters) above which the condenser summarises.
    pub condense_chars: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAgent {
    default_model: String,
    no_output_timeout_s: u64,
    condense_chars: usize,
}

impl Default for RawAgent {
    fn default() -> Self {
        Self {
            default_model: "local".into(),
            no_output_timeout_s: 30,
            condense_chars: 120_000,
        }
    }
}

impl RawAgent {
    pub(super) fn validate(
        self,
        models: &BTreeMap<Name, ModelProfile>,
    ) -> Result<AgentSettings, SettingsError> {
        let Some(default_model) = models
            .get_key_value(self.default_model.as_str())
            .map(|(name, _)| name.clone())
        else {
            return Err(invalid(
                "agent.default_model",
                format!("no model profile {:?}", self.default_model),
            ));
        };
        if self.no_output_timeout_s == 0 {
            return Err(invalid("agent.no_output_timeout_s", "must be positive"));
        }
        if self.condense_chars < MIN_CONDENSE_CHARS {
            return Err(invalid(
                "agent.condense_chars",
                format!("must be at least {MIN_CONDENSE_CHARS}"),
            ));
        }
        Ok(AgentSettings {
            default_model,
            no_output_timeout: Duration::from_secs(self.no_output_timeout_s),
            condense_chars: self.condense_chars,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;

    #[test]
    fn a_zero_no_output_timeout_is_refused_not_read_as_one_second() {
        let err = Settings::from_toml("agent.no_output_timeout_s = 0\n").unwrap_err();
        assert!(
            err.to_string().contains("agent.no_output_timeout_s"),
            "{err}"
        );
        let ok = Settings::from_toml("agent.no_output_timeout_s = 1\n").unwrap();
        assert_eq!(ok.agent.no_output_timeout.as_secs(), 1);
    }

    #[test]
    fn a_tiny_condense_threshold_is_refused_not_raised_to_1000() {
        let err = Settings::from_toml("agent.condense_chars = 999\n").unwrap_err();
        assert!(err.to_string().contains("agent.condense_chars"), "{err}");
        let ok = Settings::from_toml("agent.condense_chars = 1000\n").unwrap();
        assert_eq!(ok.agent.condense_chars, 1000);
    }
}
