//! `[telemetry]`: log format and filter.

use serde::Deserialize;

#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub log_filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTelemetry {
    log_format: LogFormat,
    log_filter: String,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info".into(),
        }
    }
}

impl RawTelemetry {
    pub(super) fn validate(self) -> TelemetrySettings {
        TelemetrySettings {
            log_format: self.log_format,
            log_filter: self.log_filter,
        }
    }
}
