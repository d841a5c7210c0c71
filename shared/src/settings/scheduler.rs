//! `[scheduler]`: the HTTP API's address, body and batch limits, tokens,
//! and how long a stopping scheduler drains.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, SettingsError};
use crate::name::Name;

#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_batch: usize,
    /// Bearer token (or `sha256:<64 hex>`, its digest) -> tenant. Empty
    /// (with no `admin_tokens` and no file) means no authentication (single
    /// tenant `default`).
    pub tokens: BTreeMap<String, Name>,
    /// The tokens of `scheduler.tokens` whose tenant is `*` (ADR 0036): admin
    /// tokens, which see and act on every tenant.
    pub admin_tokens: Vec<String>,
    /// A file of `<token> <tenant>` lines, read by the scheduler at start and
    /// added to `tokens` (environment keys are lower-cased; a file keeps case).
    pub tokens_file: Option<PathBuf>,
    /// Most Server-Sent Event streams open at once; more are answered 503.
    pub max_streams: usize,
    /// After SIGTERM: how long in-flight requests may take to finish (open
    /// event streams end at once) before the scheduler closes every
    /// connection and exits anyway (`scheduler.drain_timeout_s`, ADR 0026).
    pub drain_timeout: Duration,
}

/// The tenant of an admin token, in `scheduler.tokens` and the tokens file:
/// not a valid tenant name, so it never names a real tenant.
pub const ADMIN_TENANT: &str = "*";

/// Longest `scheduler.drain_timeout_s` taken: an hour.
const MAX_DRAIN_TIMEOUT_S: u64 = 3600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawScheduler {
    listen: String,
    max_body_bytes: usize,
    max_batch: usize,
    tokens: BTreeMap<String, String>,
    tokens_file: Option<PathBuf>,
    max_streams: usize,
    drain_timeout_s: u64,
}

impl Default for RawScheduler {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 8 << 20,
            max_batch: 1000,
            tokens: BTreeMap::new(),
            tokens_file: None,
            max_streams: 1024,
            // Below the chart's 30 s terminationGracePeriodSeconds less its
            // 5 s preStop sleep, so the kubelet's SIGKILL never cuts it short.
            drain_timeout_s: 20,
        }
    }
}

impl RawScheduler {
    pub(super) fn validate(self) -> Result<SchedulerSettings, SettingsError> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| invalid("scheduler.listen", "must be an address like 127.0.0.1:8080"))?;
        if self.max_batch == 0 {
            return Err(invalid("scheduler.max_batch", "must be at least 1"));
        }
        if self.max_streams == 0 {
            return Err(invalid("scheduler.max_streams", "must be at least 1"));
        }
        if !(1..=MAX_DRAIN_TIMEOUT_S).contains(&self.drain_timeout_s) {
            return Err(invalid(
                "scheduler.drain_timeout_s",
                format!("must be between 1 and {MAX_DRAIN_TIMEOUT_S} seconds"),
            ));
        }
        let mut tokens = BTreeMap::new();
        let mut admin_tokens = Vec::new();
        for (token, tenant) in self.tokens {
            if tenant == ADMIN_TENANT {
                admin_tokens.push(token);
                continue;
            }
            match Name::parse(tenant) {
                Ok(tenant) => tokens.insert(token, tenant),
                Err(e) => {
                    return Err(invalid(
                        "scheduler.tokens",
                        format!("bad tenant name: {e} (or `*` for an admin token)"),
                    ))
                }
            };
        }
        Ok(SchedulerSettings {
            listen,
            max_body_bytes: self.max_body_bytes,
            max_batch: self.max_batch,
            tokens,
            admin_tokens,
            tokens_file: self.tokens_file,
            max_streams: self.max_streams,
            drain_timeout: Duration::from_secs(self.drain_timeout_s),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::Settings;

    #[test]
    fn tenant_star_makes_an_admin_token() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let settings = Settings::from_toml(&format!(
            "[scheduler.tokens]\n\"{digest}\" = \"*\"\nplain = \"acme\"\n"
        ))
        .expect("valid");
        assert_eq!(settings.scheduler.admin_tokens, vec![digest.clone()]);
        assert_eq!(settings.scheduler.tokens.len(), 1);
        assert_eq!(settings.scheduler.tokens["plain"].as_str(), "acme");
        let err = Settings::from_toml("[scheduler.tokens]\nt = \"**\"\n").unwrap_err();
        assert!(err.to_string().contains("`*` for an admin token"), "{err}");
    }

    #[test]
    fn the_drain_timeout_defaults_to_20_s_and_is_bounded() {
        let default = Settings::from_toml("").expect("defaults");
        assert_eq!(default.scheduler.drain_timeout, Duration::from_secs(20));
        let set = Settings::from_toml("scheduler.drain_timeout_s = 3\n").expect("3 s");
        assert_eq!(set.scheduler.drain_timeout, Duration::from_secs(3));
        for bad in ["0", "3601", &i64::MAX.to_string()] {
            let err =
                Settings::from_toml(&format!("scheduler.drain_timeout_s = {bad}\n")).unwrap_err();
            assert!(
                err.to_string().contains("scheduler.drain_timeout_s"),
                "{bad}: {err}"
            );
        }
        let err = Settings::from_toml("scheduler.drain_timeout_s = -1\n").unwrap_err();
        assert!(err.to_string().contains("drain_timeout_s"), "{err}");
    }
}
