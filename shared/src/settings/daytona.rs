//! `[daytona]`: how workers reach the Daytona API, for templates with
//! `provider = "daytona"`. The API key is a secret and never part of the
//! configuration: it is read by the worker from the environment variable
//! named by `api_key_env` (default `DAYTONA_API_KEY`).
//!
//! The variables Daytona's own tools use keep working: where the file (and
//! `SHOAL__DAYTONA__*`) leave a key unset, `DAYTONA_API_URL`,
//! `DAYTONA_TARGET` and `DAYTONA_TOOLBOX_HOSTS` (comma-separated) fill it in.

use serde::Deserialize;

use super::{invalid, SettingsError};

/// Daytona's hosted API.
pub const DEFAULT_DAYTONA_API_URL: &str = "https://app.daytona.io/api";

/// Validated `[daytona]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaytonaSettings {
    /// The main API, for example `https://app.daytona.io/api`.
    pub api_url: String,
    /// The environment variable holding the API key.
    pub api_key_env: String,
    /// Region (`target`) to create sandboxes in; Daytona's default when `None`.
    pub target: Option<String>,
    /// Hosts besides the API's own (and its subdomains) that a sandbox's
    /// `toolboxProxyUrl` may name, lower-case. The API key is sent to the
    /// toolbox, so a toolbox URL on any other host is refused.
    pub toolbox_hosts: Vec<String>,
}

impl DaytonaSettings {
    /// The API key, from the variable named by `api_key_env`; `None` when it
    /// is unset or empty.
    pub fn api_key(&self) -> Option<String> {
        std::env::var(&self.api_key_env)
            .ok()
            .filter(|key| !key.is_empty())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDaytona {
    api_url: Option<String>,
    api_key_env: Option<String>,
    target: Option<String>,
    toolbox_hosts: Option<Vec<String>>,
}

impl RawDaytona {
    /// `env` looks up Daytona's documented variables (the process
    /// environment, or a fixed map in tests).
    pub(super) fn validate(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<DaytonaSettings, SettingsError> {
        let from_env = |var: &str| env(var).filter(|value| !value.trim().is_empty());
        let (api_url, url_key) = match (self.api_url, from_env("DAYTONA_API_URL")) {
            (Some(url), _) => (url, "daytona.api_url"),
            (None, Some(url)) => (url, "daytona.api_url (from DAYTONA_API_URL)"),
            (None, None) => (DEFAULT_DAYTONA_API_URL.to_owned(), "daytona.api_url"),
        };
        let api_url = api_url.trim().to_owned();
        if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
            return Err(invalid(url_key, "must be an http(s) URL"));
        }
        let api_key_env = self
            .api_key_env
            .unwrap_or_else(|| "DAYTONA_API_KEY".to_owned());
        if !is_env_name(&api_key_env) {
            return Err(invalid(
                "daytona.api_key_env",
                "must name an environment variable ([A-Za-z_][A-Za-z0-9_]*)",
            ));
        }
        let target = self
            .target
            .or_else(|| from_env("DAYTONA_TARGET"))
            .map(|target| target.trim().to_owned())
            .filter(|target| !target.is_empty());
        let toolbox_hosts = match self.toolbox_hosts {
            Some(hosts) => hosts,
            None => from_env("DAYTONA_TOOLBOX_HOSTS")
                .map(|hosts| hosts.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
        };
        let toolbox_hosts = toolbox_hosts
            .iter()
            .map(|host| host.trim().to_ascii_lowercase())
            .filter(|host| !host.is_empty())
            .collect::<Vec<_>>();
        if let Some(host) = toolbox_hosts.iter().find(|host| {
            host.contains(['/', '@', ' ']) || (host.contains(':') && !host.starts_with('['))
        }) {
            return Err(invalid(
                "daytona.toolbox_hosts",
                format!("{host:?} is not a host name (no scheme, port or path)"),
            ));
        }
        Ok(DaytonaSettings {
            api_url,
            api_key_env,
            target,
            toolbox_hosts,
        })
    }
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::Settings;
    use super::*;

    fn raw(toml: &str) -> RawDaytona {
        config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |var| map.get(var).cloned()
    }

    #[test]
    fn defaults_name_the_hosted_api_and_the_documented_key_variable() {
        let daytona = raw("").validate(env(&[])).unwrap();
        assert_eq!(daytona.api_url, DEFAULT_DAYTONA_API_URL);
        assert_eq!(daytona.api_key_env, "DAYTONA_API_KEY");
        assert_eq!(daytona.target, None);
        assert!(daytona.toolbox_hosts.is_empty());
    }

    #[test]
    fn the_documented_daytona_variables_still_configure_the_section() {
        let daytona = raw("")
            .validate(env(&[
                ("DAYTONA_API_URL", "http://127.0.0.1:3000/api"),
                ("DAYTONA_TARGET", "eu"),
                (
                    "DAYTONA_TOOLBOX_HOSTS",
                    " Proxy.Example.com , ,tb.example.org",
                ),
            ]))
            .unwrap();
        assert_eq!(daytona.api_url, "http://127.0.0.1:3000/api");
        assert_eq!(daytona.target.as_deref(), Some("eu"));
        assert_eq!(
            daytona.toolbox_hosts,
            ["proxy.example.com", "tb.example.org"]
        );
    }

    #[test]
    fn the_file_wins_over_the_daytona_variables() {
        let daytona = raw(
            "api_url = \"https://daytona.internal/api\"\ntarget = \"us\"\ntoolbox_hosts = [\"a.example\"]\napi_key_env = \"MY_KEY\"\n",
        )
        .validate(env(&[
            ("DAYTONA_API_URL", "http://elsewhere/api"),
            ("DAYTONA_TARGET", "eu"),
            ("DAYTONA_TOOLBOX_HOSTS", "b.example"),
        ]))
        .unwrap();
        assert_eq!(daytona.api_url, "https://daytona.internal/api");
        assert_eq!(daytona.target.as_deref(), Some("us"));
        assert_eq!(daytona.toolbox_hosts, ["a.example"]);
        assert_eq!(daytona.api_key_env, "MY_KEY");
    }

    #[test]
    fn bad_daytona_values_are_an_error_naming_the_key() {
        let err = raw("api_url = \"ftp://x\"\n")
            .validate(env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("daytona.api_url"), "{err}");
        let err = raw("")
            .validate(env(&[("DAYTONA_API_URL", "app.daytona.io")]))
            .unwrap_err();
        assert!(err.to_string().contains("DAYTONA_API_URL"), "{err}");
        let err = raw("api_key_env = \"MY KEY\"\n")
            .validate(env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("daytona.api_key_env"), "{err}");
        let err = raw("toolbox_hosts = [\"https://x.example\"]\n")
            .validate(env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("daytona.toolbox_hosts"), "{err}");
        let err = Settings::from_toml("[daytona]\napi_kee = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("api_kee"), "{err}");
    }
}
