//! `[models.NAME]`: model profiles, added to (or replacing) the built-in
//! `local`, `openai` and `anthropic`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, SettingsError};
use crate::cost::Prices;
use crate::model::{FunctionCalling, LlmProvider, ModelProfile};
use crate::name::Name;
use crate::store::RateSpec;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    provider: LlmProvider,
    base_url: String,
    model: String,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default = "d::native")]
    function_calling: FunctionCalling,
    #[serde(default = "d::max_tokens")]
    max_tokens: u32,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default = "d::timeout_s")]
    timeout_s: u64,
    #[serde(default = "d::max_retries")]
    max_retries: u32,
    #[serde(default = "d::yes")]
    prompt_caching: bool,
    /// USD per million tokens.
    #[serde(default)]
    price_input: Option<f64>,
    #[serde(default)]
    price_output: Option<f64>,
    #[serde(default)]
    price_cache_read: Option<f64>,
    #[serde(default)]
    price_cache_write: Option<f64>,
    /// Fleet-wide limits shared by every worker (ADR 0037).
    #[serde(default)]
    rate_limit: Option<RawRateLimit>,
}

/// `rate_limit = { requests_per_minute = N, tokens_per_minute = M }`; either
/// may be left out (that dimension is then unlimited), not both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    tokens_per_minute: Option<u32>,
}

mod d {
    pub fn native() -> super::FunctionCalling {
        super::FunctionCalling::Native
    }
    pub fn max_tokens() -> u32 {
        4096
    }
    pub fn timeout_s() -> u64 {
        120
    }
    pub fn max_retries() -> u32 {
        5
    }
    pub fn yes() -> bool {
        true
    }
}

/// The built-in profiles with the configured ones laid over them.
pub(super) fn validate(
    raw: BTreeMap<String, RawModel>,
) -> Result<BTreeMap<Name, ModelProfile>, SettingsError> {
    let mut models: BTreeMap<Name, ModelProfile> = ModelProfile::builtin()
        .into_iter()
        .map(|m| (m.name.clone(), m))
        .collect();
    for (name, raw_model) in raw {
        let profile = raw_model.into_profile(name)?;
        models.insert(profile.name.clone(), profile);
    }
    Ok(models)
}

impl RawModel {
    fn into_profile(self, name: String) -> Result<ModelProfile, SettingsError> {
        let name = match Name::parse(name) {
            Ok(name) if name != "default" => name,
            Ok(name) => {
                return Err(invalid(
                    "models",
                    format!("bad model profile name {name:?}"),
                ))
            }
            Err(e) => return Err(invalid("models", format!("bad model profile name: {e}"))),
        };
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return Err(invalid(
                "models",
                format!("models.{name}.base_url must be an http(s) URL"),
            ));
        }
        if self.function_calling == FunctionCalling::Constrained
            && self.provider != LlmProvider::OpenAi
        {
            return Err(invalid(
                "models",
                format!(
                    "models.{name}.function_calling = \"constrained\" needs an OpenAI-compatible \
                     server with response_format json_schema (provider = \"openai\")"
                ),
            ));
        }
        // A request that may take 0 s always times out: refused, not read
        // as one second.
        if self.timeout_s == 0 {
            return Err(invalid(
                format!("models.{name}.timeout_s"),
                "must be positive",
            ));
        }
        let mut prices = Vec::with_capacity(4);
        for (field, usd) in [
            ("price_input", self.price_input),
            ("price_output", self.price_output),
            ("price_cache_read", self.price_cache_read),
            ("price_cache_write", self.price_cache_write),
        ] {
            prices
                .push(per_mtok(usd).map_err(|why| invalid(format!("models.{name}.{field}"), why))?);
        }
        let rate_limit = match self.rate_limit {
            None => None,
            Some(RawRateLimit {
                requests_per_minute,
                tokens_per_minute,
            }) => {
                if requests_per_minute.is_none() && tokens_per_minute.is_none() {
                    return Err(invalid(
                        format!("models.{name}.rate_limit"),
                        "give requests_per_minute, tokens_per_minute or both (leave rate_limit \
                         out for no limit)",
                    ));
                }
                for (field, value) in [
                    ("requests_per_minute", requests_per_minute),
                    ("tokens_per_minute", tokens_per_minute),
                ] {
                    if value == Some(0) {
                        return Err(invalid(
                            format!("models.{name}.rate_limit.{field}"),
                            "must be positive (leave it out for no limit)",
                        ));
                    }
                }
                Some(RateSpec {
                    requests_per_minute: requests_per_minute.unwrap_or(0),
                    tokens_per_minute: tokens_per_minute.unwrap_or(0),
                })
            }
        };
        let any_price = prices.iter().any(Option::is_some);
        let price = |index: usize| prices[index].unwrap_or(0);
        Ok(ModelProfile {
            provider: self.provider,
            base_url: self.base_url.trim_end_matches('/').to_owned(),
            model: self.model,
            api_key_env: self.api_key_env,
            function_calling: self.function_calling,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            timeout: Duration::from_secs(self.timeout_s),
            max_retries: self.max_retries,
            prompt_caching: self.prompt_caching,
            prices: any_price.then(|| Prices {
                input: price(0),
                output: price(1),
                cache_read: price(2),
                cache_write: price(3),
            }),
            rate_limit,
            name,
        })
    }
}

/// USD per million tokens -> micro-USD per million tokens. A negative or
/// non-finite price is refused rather than read as free.
fn per_mtok(usd: Option<f64>) -> Result<Option<u64>, &'static str> {
    match usd {
        None => Ok(None),
        Some(usd) if !usd.is_finite() || usd < 0.0 => {
            Err("must be a finite, non-negative number of USD per million tokens")
        }
        Some(usd) => Ok(Some((usd * 1_000_000.0).round() as u64)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use crate::model::FunctionCalling;

    const VLLM: &str = "[models.vllm]\nprovider = \"openai\"\nbase_url = \"http://gpu:8000/v1/\"\nmodel = \"qwen\"\n";

    #[test]
    fn model_profiles_extend_the_builtins() {
        let settings = Settings::from_toml(
            "agent.default_model = \"vllm\"\n[models.vllm]\nprovider = \"openai\"\nbase_url = \"http://gpu:8000/v1/\"\nmodel = \"qwen\"\nfunction_calling = \"emulated\"\nprice_input = 0.5\n",
        )
        .unwrap();
        let vllm = &settings.models["vllm"];
        assert_eq!(vllm.base_url, "http://gpu:8000/v1");
        assert_eq!(vllm.function_calling, FunctionCalling::Emulated);
        assert_eq!(vllm.effective_prices().input, 500_000);
        assert!(settings.models.contains_key("openai"));
        let err = Settings::from_toml("agent.default_model = \"nope\"\n").unwrap_err();
        assert!(err.to_string().contains("agent.default_model"), "{err}");
        let err = Settings::from_toml(
            "[models.x]\nprovider = \"cohere\"\nbase_url = \"http://x\"\nmodel = \"m\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("cohere"), "{err}");
        let err = Settings::from_toml(
            "[models.x]\nprovider = \"anthropic\"\nbase_url = \"http://x\"\nmodel = \"m\"\nfunction_calling = \"constrained\"\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("models.x.function_calling"),
            "{err}"
        );
        assert_eq!(
            settings.models["local"].function_calling,
            FunctionCalling::Constrained
        );
    }

    #[test]
    fn a_zero_model_timeout_is_refused_not_read_as_one_second() {
        let err = Settings::from_toml(&format!("{VLLM}timeout_s = 0\n")).unwrap_err();
        assert!(err.to_string().contains("models.vllm.timeout_s"), "{err}");
        let ok = Settings::from_toml(&format!("{VLLM}timeout_s = 1\n")).unwrap();
        assert_eq!(ok.models["vllm"].timeout.as_secs(), 1);
    }

    #[test]
    fn rate_limits_are_read_and_bad_ones_refused() {
        let plain = Settings::from_toml(VLLM).unwrap();
        assert_eq!(plain.models["vllm"].rate_limit, None);
        let limited = Settings::from_toml(&format!(
            "{VLLM}rate_limit = {{ requests_per_minute = 60, tokens_per_minute = 90000 }}\n"
        ))
        .unwrap();
        let spec = limited.models["vllm"].rate_limit.unwrap();
        assert_eq!(spec.requests_per_minute, 60);
        assert_eq!(spec.tokens_per_minute, 90000);
        assert_eq!(spec.request_capacity(), 10);
        for bad in [
            "rate_limit = {}",
            "rate_limit = { requests_per_minute = 0 }",
            "rate_limit = { requests_per_minute = -1 }",
            "rate_limit = { rpm = 5 }",
        ] {
            let err = Settings::from_toml(&format!("{VLLM}{bad}\n")).unwrap_err();
            assert!(
                err.to_string().contains("rate_limit") || err.to_string().contains("rpm"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_negative_price_is_refused_not_read_as_free() {
        for field in [
            "price_input",
            "price_output",
            "price_cache_read",
            "price_cache_write",
        ] {
            let err = Settings::from_toml(&format!("{VLLM}{field} = -0.5\n")).unwrap_err();
            assert!(
                err.to_string().contains(&format!("models.vllm.{field}")),
                "{err}"
            );
        }
        let err = Settings::from_toml(&format!("{VLLM}price_input = nan\n")).unwrap_err();
        assert!(err.to_string().contains("models.vllm.price_input"), "{err}");
        let free = Settings::from_toml(&format!("{VLLM}price_input = 0.0\n")).unwrap();
        assert_eq!(free.models["vllm"].effective_prices().input, 0);
    }
}
