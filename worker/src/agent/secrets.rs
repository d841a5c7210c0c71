//! Secrets: resolved by name from the worker's environment (`SHOAL_SECRET_<NAME>`,
//! never arbitrary worker variables), handed to the sandbox only when a task
//! names them, and masked in every observation and event, together with the
//! LLM API keys the worker holds.

/// Replaces known secret values with `<secret:NAME>`.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    /// (value, name), longest values first so overlapping secrets mask fully.
    values: Vec<(String, String)>,
}

/// The worker environment prefix secrets are read from.
pub const SECRET_PREFIX: &str = "SHOAL_SECRET_";

impl Masker {
    pub fn new(mut values: Vec<(String, String)>) -> Self {
        // Very short values would mask ordinary words; they are not masked.
        values.retain(|(value, _)| value.len() >= 4);
        values.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
        Self { values }
    }

    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (value, name) in &self.values {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), &format!("<secret:{name}>"));
            }
        }
        out
    }
}

/// Resolves the task's secret names: `(name, value)` for each one the worker
/// has; the names it lacks are returned as errors.
pub fn resolve(names: &[String]) -> (Vec<(String, String)>, Vec<String>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for name in names {
        match std::env::var(format!("{SECRET_PREFIX}{name}")) {
            Ok(value) if !value.is_empty() => found.push((name.clone(), value)),
            _ => missing.push(name.clone()),
        }
    }
    (found, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_occurrence_longest_first() {
        let masker = Masker::new(vec![
            ("sk-abc".into(), "SHORT".into()),
            ("sk-abc-123456".into(), "LONG".into()),
            ("xy".into(), "TINY".into()),
        ]);
        assert_eq!(
            masker.mask("key sk-abc-123456 and sk-abc, xy"),
            "key <secret:LONG> and <secret:SHORT>, xy"
        );
    }
}
