//! Token usage and its cost, in integer micro-dollars so sums never drift.

use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};

/// Tokens one LLM call used, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    /// Input tokens billed at the full rate (cache reads and writes excluded).
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    /// Reasoning tokens (already counted in `completion_tokens` by providers
    /// that report them; kept for visibility, not billed twice).
    pub reasoning_tokens: u64,
}

impl Add for Usage {
    type Output = Usage;

    fn add(self, other: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens + other.prompt_tokens,
            completion_tokens: self.completion_tokens + other.completion_tokens,
            cache_read_tokens: self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens: self.cache_write_tokens + other.cache_write_tokens,
            reasoning_tokens: self.reasoning_tokens + other.reasoning_tokens,
        }
    }
}

impl AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        *self = *self + other;
    }
}

/// An amount of money in millionths of a US dollar.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MicroDollars(pub u64);

impl MicroDollars {
    /// From a dollar amount given by a user (rounded to the nearest micro-dollar).
    pub fn from_usd(usd: f64) -> Self {
        Self((usd.max(0.0) * 1_000_000.0).round() as u64)
    }

    /// For display only; never sum floats.
    pub fn as_usd(self) -> f64 {
        self.0 as f64 / 1_000_000.0
    }
}

impl Add for MicroDollars {
    type Output = MicroDollars;

    fn add(self, other: MicroDollars) -> MicroDollars {
        MicroDollars(self.0.saturating_add(other.0))
    }
}

impl AddAssign for MicroDollars {
    fn add_assign(&mut self, other: MicroDollars) {
        *self = *self + other;
    }
}

/// Prices of one model, in micro-dollars per million tokens (which is the
/// same number as dollars per million tokens times 10^6 / 10^6: e.g. $3 per
/// million input tokens is `input: 3_000_000`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prices {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

impl Prices {
    /// The cost of `usage`, rounded up to the next micro-dollar so a bill is
    /// never under the provider's.
    pub fn cost(&self, usage: &Usage) -> MicroDollars {
        let weighted = u128::from(usage.prompt_tokens) * u128::from(self.input)
            + u128::from(usage.completion_tokens) * u128::from(self.output)
            + u128::from(usage.cache_read_tokens) * u128::from(self.cache_read)
            + u128::from(usage.cache_write_tokens) * u128::from(self.cache_write);
        let micro = weighted.div_ceil(1_000_000);
        MicroDollars(u64::try_from(micro).unwrap_or(u64::MAX))
    }

    /// Default prices (USD per million tokens) for common models, matched by
    /// model-name prefix; `None` for unknown models (cost then counts as 0
    /// and the worker warns once).
    pub fn default_for(model: &str) -> Option<Prices> {
        const M: u64 = 1_000_000;
        let p = |input: f64, output: f64, cache_read: f64, cache_write: f64| Prices {
            input: (input * M as f64) as u64,
            output: (output * M as f64) as u64,
            cache_read: (cache_read * M as f64) as u64,
            cache_write: (cache_write * M as f64) as u64,
        };
        let model = model.rsplit('/').next().unwrap_or(model);
        let table: [(&str, Prices); 9] = [
            ("gpt-4o-mini", p(0.15, 0.60, 0.075, 0.0)),
            ("gpt-4o", p(2.50, 10.0, 1.25, 0.0)),
            ("gpt-4.1-mini", p(0.40, 1.60, 0.10, 0.0)),
            ("gpt-4.1", p(2.0, 8.0, 0.50, 0.0)),
            ("o4-mini", p(1.10, 4.40, 0.275, 0.0)),
            ("claude-3-5-haiku", p(0.80, 4.0, 0.08, 1.0)),
            ("claude-haiku-4", p(1.0, 5.0, 0.10, 1.25)),
            ("claude-sonnet-4", p(3.0, 15.0, 0.30, 3.75)),
            ("claude-opus-4", p(15.0, 75.0, 1.50, 18.75)),
        ];
        table
            .iter()
            .find(|(prefix, _)| model.starts_with(prefix))
            .map(|(_, prices)| *prices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_exact_integer_arithmetic_rounded_up() {
        let prices = Prices {
            input: 3_000_000,
            output: 15_000_000,
            cache_read: 300_000,
            cache_write: 3_750_000,
        };
        let usage = Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
            cache_read_tokens: 2000,
            cache_write_tokens: 100,
            reasoning_tokens: 0,
        };
        // 1000*3 + 500*15 + 2000*0.3 + 100*3.75 = 3000 + 7500 + 600 + 375 micro-dollars
        assert_eq!(prices.cost(&usage), MicroDollars(11_475));
        // One token of a cheap model still costs a (rounded-up) micro-dollar.
        let tiny = Usage {
            prompt_tokens: 1,
            ..Usage::default()
        };
        assert_eq!(prices.cost(&tiny), MicroDollars(3));
        let cheap = Prices {
            input: 150_000,
            ..Prices::default()
        };
        assert_eq!(cheap.cost(&tiny), MicroDollars(1));
    }

    #[test]
    fn sums_do_not_drift() {
        let mut total = MicroDollars::default();
        for _ in 0..1_000_000 {
            total += MicroDollars(1);
        }
        assert_eq!(total, MicroDollars(1_000_000));
        assert_eq!(MicroDollars::from_usd(1.5), MicroDollars(1_500_000));
        assert!(Prices::default_for("anthropic/claude-sonnet-4-5").is_some());
        assert!(Prices::default_for("my-local-model").is_none());
    }
}
