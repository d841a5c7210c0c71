//! `[limits]`: the largest task spec the API accepts.

use serde::Deserialize;

use super::{invalid, SettingsError};
use crate::task::SpecLimits;

/// Room kept in a message, next to the largest single spec field, for the
/// rest of the task (id, tenant, labels, other fields).
pub const MESSAGE_ENVELOPE_BYTES: usize = 64 << 10;

/// The largest `limits.max_delay_s` taken: ten years.
const MAX_DELAY_S: u64 = 10 * 366 * 86_400;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    max_timeout_s: u64,
    max_attempts: u32,
    max_command_bytes: usize,
    max_file_bytes: usize,
    max_prompt_bytes: usize,
    /// How far ahead a task's `not_before` may be (ADR 0028).
    max_delay_s: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        let limits = SpecLimits::default();
        Self {
            max_timeout_s: limits.max_timeout_s,
            max_attempts: limits.max_attempts,
            max_command_bytes: limits.max_command_bytes,
            max_file_bytes: limits.max_file_bytes,
            max_prompt_bytes: limits.max_prompt_bytes,
            max_delay_s: limits.max_delay_s,
        }
    }
}

impl RawLimits {
    /// `max_message_bytes` is the validated `broker.max_message_bytes`.
    pub(super) fn validate(self, max_message_bytes: usize) -> Result<SpecLimits, SettingsError> {
        // A spec field the API accepts must fit in a message with its envelope,
        // or every task using it would be refused (docs/adr/0016).
        for (key, value) in [
            ("limits.max_command_bytes", self.max_command_bytes),
            ("limits.max_file_bytes", self.max_file_bytes),
            ("limits.max_prompt_bytes", self.max_prompt_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be positive"));
            }
            if value.saturating_add(MESSAGE_ENVELOPE_BYTES) > max_message_bytes {
                return Err(invalid(
                    key,
                    format!(
                        "{value} bytes plus {MESSAGE_ENVELOPE_BYTES} for the rest of the task \
                         exceed broker.max_message_bytes ({max_message_bytes}): such a task \
                         could never be queued"
                    ),
                ));
            }
        }
        if self.max_timeout_s == 0 {
            return Err(invalid("limits.max_timeout_s", "must be positive"));
        }
        if self.max_delay_s == 0 {
            return Err(invalid("limits.max_delay_s", "must be positive"));
        }
        // Far past any real schedule, and small enough that `now + delay`
        // never overflows a time.
        if self.max_delay_s > MAX_DELAY_S {
            return Err(invalid(
                "limits.max_delay_s",
                format!("at most {MAX_DELAY_S} (10 years)"),
            ));
        }
        if self.max_attempts == 0 {
            return Err(invalid("limits.max_attempts", "must be positive"));
        }
        Ok(SpecLimits {
            max_timeout_s: self.max_timeout_s,
            max_attempts: self.max_attempts,
            max_command_bytes: self.max_command_bytes,
            max_file_bytes: self.max_file_bytes,
            max_prompt_bytes: self.max_prompt_bytes,
            max_delay_s: self.max_delay_s,
            ..SpecLimits::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::Settings;

    #[test]
    fn max_delay_defaults_to_30_days_and_is_refused_when_zero_or_absurd() {
        let settings = Settings::from_toml("").expect("defaults load");
        assert_eq!(settings.limits.max_delay_s, 30 * 86_400);
        let settings = Settings::from_toml("limits.max_delay_s = 3600").expect("loads");
        assert_eq!(settings.limits.max_delay_s, 3600);
        for bad in ["limits.max_delay_s = 0", "limits.max_delay_s = 400000000"] {
            let error = Settings::from_toml(bad).expect_err(bad).to_string();
            assert!(error.contains("limits.max_delay_s"), "{error}");
        }
    }
}
