//! The rules a [`TaskSpec`] must obey before it is queued: operator limits
//! ([`SpecLimits`]), the kernel's own ([`kernel_limits`]), the name rule and
//! the workspace path rule. Each refusal names the field, as a JSON path.

use super::spec::{AgentSpec, ExecSpec, RepoSpec, SpecLimits, TaskKind, TaskSpec};

/// Bounds set by the kernel rather than by operators: a spec past them would
/// fail in the worker (`E2BIG`, `ENAMETOOLONG`) as if the infrastructure had
/// broken, and be retried, instead of being refused at submit.
pub mod kernel_limits {
    /// Longest value of one `env` variable. Each reaches `execve` as its own
    /// string, which Linux caps at 128 KiB (`MAX_ARG_STRLEN`).
    pub const MAX_ENV_VALUE_BYTES: usize = 64 * 1024;
    /// Longest `env` in all (`KEY=value\0` each), well under `ARG_MAX`
    /// (2 MiB with the default stack) so the template's environment, the
    /// secrets and the command still fit.
    pub const MAX_ENV_BYTES: usize = 256 * 1024;
    /// Longest name of an `env` variable or secret.
    pub const MAX_ENV_NAME_BYTES: usize = 128;
    /// Longest path component (`NAME_MAX`).
    pub const MAX_PATH_COMPONENT_BYTES: usize = 255;
    /// Longest workspace path; the workspace's own path must fit in front
    /// of it within `PATH_MAX` (4096).
    pub const MAX_PATH_BYTES: usize = 1024;
    /// Longest `repo.url`.
    pub const MAX_URL_BYTES: usize = 4096;
    /// Longest `repo.ref` (git stores a ref under its name: `NAME_MAX`).
    pub const MAX_GIT_REF_BYTES: usize = 255;
}

/// A spec broke a rule; `field` names where, as a JSON path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

use kernel_limits::*;

impl TaskSpec {
    /// Checks every rule a spec must obey before it may be queued.
    pub fn validate(&self, limits: &SpecLimits) -> Result<(), SpecError> {
        self.validate_at(limits, chrono::Utc::now())
    }

    /// [`validate`](Self::validate) as of `now` (the bound on `not_before`
    /// depends on it).
    pub fn validate_at(
        &self,
        limits: &SpecLimits,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), SpecError> {
        match &self.kind {
            TaskKind::Exec(exec) => validate_exec(exec, limits)?,
            TaskKind::Agent(agent) => validate_agent(agent, limits)?,
        }
        if let Some(not_before) = self.not_before {
            // A time in the past is simply due: the task runs at once.
            let latest = chrono::TimeDelta::try_seconds(
                i64::try_from(limits.max_delay_s).unwrap_or(i64::MAX),
            )
            .and_then(|delay| now.checked_add_signed(delay));
            if latest.is_none_or(|latest| not_before > latest) {
                return Err(invalid(
                    "not_before",
                    format!(
                        "at most {} ahead (limits.max_delay_s = {}); submit closer to the time",
                        human_delay(limits.max_delay_s),
                        limits.max_delay_s
                    ),
                ));
            }
        }
        if self.max_attempts == 0 || self.max_attempts > limits.max_attempts {
            return Err(invalid(
                "max_attempts",
                format!("must be between 1 and {}", limits.max_attempts),
            ));
        }
        if self.labels.len() > limits.max_labels {
            return Err(invalid(
                "labels",
                format!("at most {} labels", limits.max_labels),
            ));
        }
        for (key, value) in &self.labels {
            if key.is_empty() || key.len() > 128 || value.len() > 1024 {
                return Err(invalid(
                    keyed("labels", key),
                    "keys are 1-128 bytes, values at most 1024",
                ));
            }
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() || key.len() > 256 {
                return Err(invalid("idempotency_key", "must be 1-256 bytes"));
            }
        }
        if !is_name(&self.sandbox) {
            return Err(invalid(
                "sandbox",
                "must be a template name ([A-Za-z0-9_.-], 1-64 bytes)",
            ));
        }
        let mut env_bytes = 0usize;
        for (key, value) in &self.env {
            if !is_env_name(key) {
                return Err(invalid(
                    keyed("env", key),
                    format!(
                        "not a valid environment variable name \
                         ([A-Za-z_][A-Za-z0-9_]*, at most {MAX_ENV_NAME_BYTES} bytes)"
                    ),
                ));
            }
            if value.contains('\0') {
                return Err(invalid(keyed("env", key), "value contains a NUL byte"));
            }
            if value.len() > MAX_ENV_VALUE_BYTES {
                return Err(invalid(
                    keyed("env", key),
                    format!(
                        "value is {} bytes; at most {MAX_ENV_VALUE_BYTES} are accepted",
                        value.len()
                    ),
                ));
            }
            // `KEY=value` and its NUL, as execve counts it.
            env_bytes += key.len() + value.len() + 2;
            if env_bytes > MAX_ENV_BYTES {
                return Err(invalid(
                    "env",
                    format!("more than {MAX_ENV_BYTES} bytes of variables in all"),
                ));
            }
        }
        for (index, name) in self.secrets.iter().enumerate() {
            if !is_env_name(name) {
                return Err(invalid(
                    format!("secrets[{index}]"),
                    "a secret is named like an environment variable",
                ));
            }
        }
        if let Some(tenant) = &self.tenant {
            if !is_name(tenant) {
                return Err(invalid("tenant", "must match [A-Za-z0-9_.-], 1-64 bytes"));
            }
        }
        Ok(())
    }
}

/// `2592000` -> `30 days`, else seconds.
fn human_delay(seconds: u64) -> String {
    if seconds.is_multiple_of(86_400) {
        format!("{} days", seconds / 86_400)
    } else if seconds.is_multiple_of(3600) {
        format!("{} hours", seconds / 3600)
    } else {
        format!("{seconds} seconds")
    }
}

fn validate_exec(exec: &ExecSpec, limits: &SpecLimits) -> Result<(), SpecError> {
    match (&exec.command, &exec.language, &exec.code) {
        (Some(command), None, None) => {
            if command.trim().is_empty() {
                return Err(invalid("kind.command", "must not be empty"));
            }
            if command.len() > limits.max_command_bytes {
                return Err(invalid(
                    "kind.command",
                    format!("longer than {} bytes", limits.max_command_bytes),
                ));
            }
            if command.contains('\0') {
                return Err(invalid("kind.command", "contains a NUL byte"));
            }
        }
        (None, Some(_), Some(code)) => {
            if code.len() > limits.max_file_bytes {
                return Err(invalid(
                    "kind.code",
                    format!("longer than {} bytes", limits.max_file_bytes),
                ));
            }
        }
        (None, None, None) => {
            return Err(invalid(
                "kind",
                "an exec task needs `command`, or `language` and `code`",
            ))
        }
        (None, Some(_), None) => return Err(invalid("kind.code", "`language` needs `code`")),
        (None, None, Some(_)) => return Err(invalid("kind.language", "`code` needs `language`")),
        (Some(_), _, _) => {
            return Err(invalid(
                "kind.command",
                "give either `command` or `language` and `code`, not both",
            ))
        }
    }
    validate_timeout("kind.timeout_s", exec.timeout_s, limits)?;
    if exec.files.len() > limits.max_files {
        return Err(invalid(
            "kind.files",
            format!("at most {} files", limits.max_files),
        ));
    }
    for (index, file) in exec.files.iter().enumerate() {
        let field = format!("kind.files[{index}]");
        validate_relative_path(&file.path)
            .map_err(|error| invalid(format!("{field}.path"), error.to_string()))?;
        if file.content.len() > limits.max_file_bytes {
            return Err(invalid(
                field,
                format!("content longer than {} bytes", limits.max_file_bytes),
            ));
        }
    }
    Ok(())
}

fn validate_agent(agent: &AgentSpec, limits: &SpecLimits) -> Result<(), SpecError> {
    if agent.prompt.trim().is_empty() {
        return Err(invalid("kind.prompt", "must not be empty"));
    }
    if agent.prompt.len() > limits.max_prompt_bytes {
        return Err(invalid(
            "kind.prompt",
            format!("longer than {} bytes", limits.max_prompt_bytes),
        ));
    }
    if !is_name(&agent.model) {
        return Err(invalid("kind.model", "must be a model profile name"));
    }
    if agent.limits.max_iterations == 0 {
        return Err(invalid("kind.limits.max_iterations", "must be at least 1"));
    }
    if let Some(cost) = agent.limits.max_cost_usd {
        if !cost.is_finite() || cost <= 0.0 {
            return Err(invalid(
                "kind.limits.max_cost_usd",
                "must be a positive number",
            ));
        }
    }
    validate_timeout("kind.limits.timeout_s", agent.limits.timeout_s, limits)?;
    if let Some(repo) = &agent.repo {
        validate_repo(repo)?;
    }
    Ok(())
}

fn validate_repo(repo: &RepoSpec) -> Result<(), SpecError> {
    if repo.url.trim().is_empty() {
        return Err(invalid("kind.repo.url", "must not be empty"));
    }
    if repo.url.len() > MAX_URL_BYTES {
        return Err(invalid(
            "kind.repo.url",
            format!("longer than {MAX_URL_BYTES} bytes"),
        ));
    }
    if repo.url.chars().any(char::is_control) {
        return Err(invalid("kind.repo.url", "contains a control character"));
    }
    if let Some(git_ref) = &repo.git_ref {
        if git_ref.is_empty() || git_ref.len() > MAX_GIT_REF_BYTES {
            return Err(invalid(
                "kind.repo.ref",
                format!("must be 1-{MAX_GIT_REF_BYTES} bytes"),
            ));
        }
        if git_ref.starts_with('-') || git_ref.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(invalid(
                "kind.repo.ref",
                "must not start with `-` or contain spaces or control characters",
            ));
        }
    }
    Ok(())
}

fn validate_timeout(field: &str, timeout_s: u64, limits: &SpecLimits) -> Result<(), SpecError> {
    if timeout_s == 0 || timeout_s > limits.max_timeout_s {
        return Err(invalid(
            field,
            format!("must be between 1 and {} seconds", limits.max_timeout_s),
        ));
    }
    Ok(())
}

/// Why a workspace path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WorkspacePathError {
    #[error("path must be 1-{MAX_PATH_BYTES} bytes")]
    Length,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path must be relative to the workspace")]
    Absolute,
    #[error("path must not contain `..`")]
    ParentDir,
    #[error("path names the workspace itself, not a file in it")]
    WorkspaceItself,
    #[error("a path component is longer than {MAX_PATH_COMPONENT_BYTES} bytes")]
    ComponentTooLong,
}

/// The components of a path inside the workspace, by the rule the worker's
/// file API applies (`.` and empty components are skipped; absolute paths,
/// `..` and NUL are refused), plus the kernel's length limits, so a path the
/// scheduler accepts is one the worker can write. A path with no component
/// left (`""`, `"."`, `"./"`) names the workspace itself and is refused.
pub fn workspace_path_components(path: &str) -> Result<Vec<&str>, WorkspacePathError> {
    if path.is_empty() || path.len() > MAX_PATH_BYTES {
        return Err(WorkspacePathError::Length);
    }
    if path.contains('\0') {
        return Err(WorkspacePathError::Nul);
    }
    if path.starts_with('/') {
        return Err(WorkspacePathError::Absolute);
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(WorkspacePathError::ParentDir),
            part if part.len() > MAX_PATH_COMPONENT_BYTES => {
                return Err(WorkspacePathError::ComponentTooLong)
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(WorkspacePathError::WorkspaceItself);
    }
    Ok(parts)
}

/// A file path inside the workspace (see [`workspace_path_components`]).
pub(crate) fn validate_relative_path(path: &str) -> Result<(), WorkspacePathError> {
    workspace_path_components(path).map(drop)
}

/// `prefix.key` for a field named by a map key, cut short: the key came from
/// the request and may be huge.
fn keyed(prefix: &str, key: &str) -> String {
    const SHOWN: usize = 64;
    match key.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{prefix}.{}…", &key[..cut]),
        None => format!("{prefix}.{key}"),
    }
}

/// The one rule for names ([`crate::name::Name`]).
fn is_name(name: &str) -> bool {
    crate::name::Name::is_valid(name)
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.len() <= MAX_ENV_NAME_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{FileSpec, Priority};

    fn parse(json: &str) -> Result<TaskSpec, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn minimal_exec_spec_takes_defaults() {
        let spec = parse(r#"{"kind":{"type":"exec","command":"echo hi"}}"#).unwrap();
        assert_eq!(spec.priority, Priority::Normal);
        assert_eq!(spec.max_attempts, 3);
        assert_eq!(spec.kind.timeout_s(), 60);
        spec.validate(&SpecLimits::default()).unwrap();
    }

    #[test]
    fn agent_spec_parses_with_limits() {
        let spec = parse(
            r#"{"kind":{"type":"agent","prompt":"fix it","limits":{"max_cost_usd":1.5}},"priority":"high"}"#,
        )
        .unwrap();
        let TaskKind::Agent(agent) = &spec.kind else {
            panic!("expected an agent task")
        };
        assert_eq!(agent.limits.max_iterations, 500);
        assert_eq!(agent.limits.max_cost_usd, Some(1.5));
        spec.validate(&SpecLimits::default()).unwrap();
    }

    #[test]
    fn unknown_kind_and_unknown_fields_are_refused() {
        let err = parse(r#"{"kind":{"type":"teleport"}}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `teleport`"),
            "{err}"
        );
        let err = parse(r#"{"kind":{"type":"exec","command":"x"},"prioriti":"high"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `prioriti`"),
            "{err}"
        );
        let err = parse(r#"{"kind":{"type":"exec","comand":"x"}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `comand`"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let limits = SpecLimits::default();
        let mut spec = TaskSpec::exec("   ");
        assert_eq!(spec.validate(&limits).unwrap_err().field, "kind.command");

        spec = TaskSpec::exec("true");
        if let TaskKind::Exec(exec) = &mut spec.kind {
            exec.timeout_s = 999_999;
        }
        assert_eq!(spec.validate(&limits).unwrap_err().field, "kind.timeout_s");

        spec = TaskSpec::exec("true");
        if let TaskKind::Exec(exec) = &mut spec.kind {
            exec.files.push(FileSpec {
                path: "../etc/passwd".into(),
                content: String::new(),
            });
        }
        assert_eq!(
            spec.validate(&limits).unwrap_err().field,
            "kind.files[0].path"
        );

        spec = TaskSpec::exec("true");
        spec.env.insert("1BAD".into(), "x".into());
        assert_eq!(spec.validate(&limits).unwrap_err().field, "env.1BAD");

        spec = TaskSpec::exec("true");
        spec.max_attempts = 0;
        assert_eq!(spec.validate(&limits).unwrap_err().field, "max_attempts");

        // Delayed tasks: up to limits.max_delay_s ahead; the past is due.
        let now = chrono::Utc::now();
        let max_delay = chrono::TimeDelta::seconds(limits.max_delay_s as i64);
        spec = TaskSpec::exec("true");
        spec.not_before = Some(now + max_delay);
        assert_eq!(spec.validate_at(&limits, now), Ok(()));
        spec.not_before = Some(now - chrono::TimeDelta::days(400));
        assert_eq!(spec.validate_at(&limits, now), Ok(()));
        spec.not_before = Some(now + max_delay + chrono::TimeDelta::seconds(1));
        let error = spec.validate_at(&limits, now).unwrap_err();
        assert_eq!(error.field, "not_before");
        assert!(error.message.contains("30 days"), "{error}");
    }

    #[test]
    fn a_bad_not_before_names_the_field_and_the_form() {
        let parse = |value: serde_json::Value| {
            serde_json::from_value::<TaskSpec>(serde_json::json!({
                "kind": {"type": "exec", "command": "true"}, "not_before": value
            }))
        };
        for bad in [
            serde_json::json!("tomorrow"),
            serde_json::json!("2026-12-03T12:00:00"),
            serde_json::json!(1_800_000_000),
        ] {
            let error = parse(bad.clone()).unwrap_err().to_string();
            assert!(
                error.contains("not_before") && error.contains("RFC 3339"),
                "{bad}: {error}"
            );
        }
        let spec = parse(serde_json::json!("2026-12-03T13:00:00+01:00")).unwrap();
        assert_eq!(
            spec.not_before.map(|t| t.to_rfc3339()),
            Some("2026-12-03T12:00:00+00:00".to_owned())
        );
        assert_eq!(parse(serde_json::Value::Null).unwrap().not_before, None);
        // Round trip: what is serialized reads back.
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(serde_json::from_value::<TaskSpec>(json).unwrap(), spec);
    }

    fn with_file(path: &str) -> TaskSpec {
        let mut spec = TaskSpec::exec("true");
        if let TaskKind::Exec(exec) = &mut spec.kind {
            exec.files.push(FileSpec {
                path: path.into(),
                content: String::new(),
            });
        }
        spec
    }

    #[test]
    fn a_path_naming_the_workspace_itself_is_refused_like_the_worker_does() {
        let limits = SpecLimits::default();
        for path in ["", ".", "./", "./.", "//", "a/../b", "/etc/passwd", "a\0b"] {
            let error = with_file(path).validate(&limits).unwrap_err();
            assert_eq!(error.field, "kind.files[0].path", "{path:?}");
        }
        for path in ["a", "./a", "a/./b/", "dir//file.txt", ".hidden"] {
            with_file(path).validate(&limits).unwrap();
        }
        assert_eq!(workspace_path_components("./a//b/.").unwrap(), ["a", "b"]);
    }

    #[test]
    fn a_path_component_longer_than_name_max_is_refused() {
        let limits = SpecLimits::default();
        let long = "x".repeat(MAX_PATH_COMPONENT_BYTES + 1);
        let error = with_file(&format!("dir/{long}"))
            .validate(&limits)
            .unwrap_err();
        assert!(error.message.contains("255"), "{error}");
        with_file(&"x".repeat(MAX_PATH_COMPONENT_BYTES))
            .validate(&limits)
            .unwrap();
        let deep = ["d"; 600].join("/");
        assert!(with_file(&deep).validate(&limits).is_err());
    }

    #[test]
    fn env_values_past_the_kernel_argument_limits_are_refused() {
        let limits = SpecLimits::default();
        let mut spec = TaskSpec::exec("true");
        spec.env
            .insert("BIG".into(), "v".repeat(MAX_ENV_VALUE_BYTES + 1));
        assert_eq!(spec.validate(&limits).unwrap_err().field, "env.BIG");

        spec = TaskSpec::exec("true");
        for index in 0..5 {
            spec.env
                .insert(format!("V{index}"), "v".repeat(MAX_ENV_VALUE_BYTES - 8));
        }
        assert_eq!(spec.validate(&limits).unwrap_err().field, "env");

        spec = TaskSpec::exec("true");
        spec.env.insert("A=B".into(), "x".into());
        assert_eq!(spec.validate(&limits).unwrap_err().field, "env.A=B");

        // A huge bad key is not echoed back whole.
        spec = TaskSpec::exec("true");
        spec.env.insert("=".repeat(100_000), "x".into());
        assert!(spec.validate(&limits).unwrap_err().field.len() < 100);
    }

    #[test]
    fn a_git_ref_that_looks_like_an_option_is_refused() {
        let limits = SpecLimits::default();
        let mut spec = parse(
            r#"{"kind":{"type":"agent","prompt":"p","repo":{"url":"https://x/r.git","ref":"--upload-pack=evil"}}}"#,
        )
        .unwrap();
        assert_eq!(spec.validate(&limits).unwrap_err().field, "kind.repo.ref");
        if let TaskKind::Agent(agent) = &mut spec.kind {
            agent.repo = Some(RepoSpec {
                url: format!("https://x/{}", "r".repeat(MAX_URL_BYTES)),
                git_ref: None,
            });
        }
        assert_eq!(spec.validate(&limits).unwrap_err().field, "kind.repo.url");
    }

    #[test]
    fn exec_needs_exactly_one_form() {
        let limits = SpecLimits::default();
        let both = parse(
            r#"{"kind":{"type":"exec","command":"x","language":"python","code":"print(1)"}}"#,
        )
        .unwrap();
        assert!(both.validate(&limits).is_err());
        let code =
            parse(r#"{"kind":{"type":"exec","language":"python","code":"print(1)"}}"#).unwrap();
        code.validate(&limits).unwrap();
        let neither = parse(r#"{"kind":{"type":"exec"}}"#).unwrap();
        assert_eq!(neither.validate(&limits).unwrap_err().field, "kind");
    }
}
