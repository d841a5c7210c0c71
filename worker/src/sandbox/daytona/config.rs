//! Settings of the Daytona provider.

use std::time::Duration;

use shoal_shared::settings::DaytonaSettings;

/// The API key, sent as `Authorization: Bearer <key>` and never printed.
pub use crate::http_response::ApiKey;

/// How HTTP calls are retried (429, 409, 502, 503, 504 and transport failures).
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// Retries after the first attempt.
    pub max_retries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// The longest wait a `Retry-After` or rate-limit reset header may impose;
    /// longer ones are cut to this.
    pub max_retry_after: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_retries: 6,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// How sandbox state is polled: every `initial`, growing by `factor` up to `max`.
#[derive(Debug, Clone, PartialEq)]
pub struct PollSettings {
    pub initial: Duration,
    pub factor: f64,
    pub max: Duration,
    /// How long a sandbox may take to reach `started` after a create.
    pub create_deadline: Duration,
    /// How long a start (or a stop in progress) may take.
    pub transition_deadline: Duration,
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            factor: 1.1,
            max: Duration::from_secs(1),
            create_deadline: Duration::from_secs(180),
            transition_deadline: Duration::from_secs(180),
        }
    }
}

impl PollSettings {
    /// The interval after `current`.
    pub(crate) fn next(&self, current: Duration) -> Duration {
        current.mul_f64(self.factor).min(self.max)
    }
}

/// Everything the Daytona provider needs.
#[derive(Debug, Clone)]
pub struct DaytonaConfig {
    /// The main API, for example `https://app.daytona.io/api`.
    pub api_url: String,
    pub api_key: ApiKey,
    /// Value of the `shoal.owner` label: which fleet owns a sandbox. The reaper
    /// only ever sees and destroys sandboxes with this label.
    pub owner: String,
    /// Region (`target`) to create sandboxes in; Daytona's default when `None`.
    pub target: Option<String>,
    /// Timeout of one ordinary HTTP request (exec requests get the command's
    /// timeout on top).
    pub request_timeout: Duration,
    /// Commands with a longer timeout run as toolbox session commands (polled)
    /// instead of one synchronous `process/execute` request, which proxies cut.
    pub sync_exec_limit: Duration,
    /// Bytes of stdout and of stderr kept per command.
    pub max_output_bytes: usize,
    pub retry: RetrySettings,
    pub poll: PollSettings,
    /// Hosts besides the API's own (and its subdomains) that a sandbox's
    /// `toolboxProxyUrl` may name. The API key is sent to the toolbox, so a
    /// toolbox URL on any other host is refused.
    pub toolbox_hosts: Vec<String>,
}

impl DaytonaConfig {
    pub fn new(api_url: impl Into<String>, api_key: ApiKey, owner: impl Into<String>) -> Self {
        Self {
            api_url: api_url.into(),
            api_key,
            owner: owner.into(),
            target: None,
            request_timeout: Duration::from_secs(30),
            sync_exec_limit: Duration::from_secs(50),
            max_output_bytes: 1 << 20,
            retry: RetrySettings::default(),
            poll: PollSettings::default(),
            toolbox_hosts: Vec::new(),
        }
    }

    /// From the `[daytona]` settings, with the API key read from the
    /// variable they name (`DAYTONA_API_KEY` by default); `None` when that
    /// variable is unset or empty.
    pub fn from_settings(settings: &DaytonaSettings, owner: impl Into<String>) -> Option<Self> {
        let key = settings.api_key()?;
        let mut config = Self::new(settings.api_url.clone(), ApiKey::new(key), owner);
        config.target = settings.target.clone();
        config.toolbox_hosts = settings.toolbox_hosts.clone();
        Some(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_never_printed() {
        let config = DaytonaConfig::new("http://x", ApiKey::new("sk-secret-123"), "fleet");
        let printed = format!("{config:?}");
        assert!(!printed.contains("sk-secret-123"), "{printed}");
        assert!(printed.contains("[redacted]"));
    }

    #[test]
    fn the_daytona_section_configures_the_provider_and_names_the_key_variable() {
        let mut settings = DaytonaSettings {
            api_url: "http://127.0.0.1:3000/api".into(),
            api_key_env: "SHOAL_TEST_DAYTONA_KEY_FROM_SETTINGS".into(),
            target: Some("eu".into()),
            toolbox_hosts: vec!["proxy.example".into()],
        };
        // The variable is unique to this test (nextest runs each in its own process).
        assert!(DaytonaConfig::from_settings(&settings, "fleet").is_none());
        std::env::set_var(&settings.api_key_env, "sk-from-env");
        let config = DaytonaConfig::from_settings(&settings, "fleet").expect("key set");
        assert_eq!(config.api_url, "http://127.0.0.1:3000/api");
        assert_eq!(config.api_key.expose(), "sk-from-env");
        assert_eq!(config.owner, "fleet");
        assert_eq!(config.target.as_deref(), Some("eu"));
        assert_eq!(config.toolbox_hosts, ["proxy.example"]);
        settings.api_key_env = "SHOAL_TEST_DAYTONA_KEY_UNSET".into();
        assert!(DaytonaConfig::from_settings(&settings, "fleet").is_none());
    }

    #[test]
    fn polling_grows_by_ten_percent_up_to_a_second() {
        let poll = PollSettings::default();
        let mut interval = poll.initial;
        let mut seen = vec![interval];
        for _ in 0..40 {
            interval = poll.next(interval);
            seen.push(interval);
        }
        assert_eq!(seen[0], Duration::from_millis(100));
        assert!((seen[1].as_secs_f64() - 0.11).abs() < 1e-6);
        assert_eq!(*seen.last().unwrap(), Duration::from_secs(1));
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }
}
