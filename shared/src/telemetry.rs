//! Process-wide tracing setup for the binaries.

use tracing_subscriber::{fmt, EnvFilter};

use crate::settings::{LogFormat, TelemetrySettings};

/// Installs the global subscriber: `RUST_LOG` if set, else the configured filter;
/// text or JSON lines on stderr. Calling it twice is harmless.
pub fn init(settings: &TelemetrySettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match settings.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
