//! Bearer tokens map to tenants. With no tokens configured the API is open and
//! every task belongs to the tenant `default` unless the spec names one.
//!
//! Tokens come from `scheduler.tokens` (a `token = "tenant"` table) and from
//! `scheduler.tokens_file`, a file of `<token> <tenant>` lines (blank lines
//! and lines starting with `#` are skipped). Use the file for tokens with
//! capitals: the `SHOAL__SCHEDULER__TOKENS__<token>` environment form
//! lower-cases the token, since it is a key.

use std::collections::BTreeMap;
use std::path::Path;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use shoal_shared::settings::SchedulerSettings;
use subtle::ConstantTimeEq;

use super::{AppState, Problem};

/// Longest token accepted from configuration.
const MAX_TOKEN_BYTES: usize = 4096;

/// Why the configured tokens cannot be used. Messages never include a token.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("scheduler.tokens_file: cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("scheduler.tokens_file: {path} line {line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: &'static str,
    },
    #[error("{origin}: a token must be 1-{MAX_TOKEN_BYTES} visible ASCII characters")]
    BadToken { origin: String },
    #[error("{origin}: bad tenant name {tenant:?}")]
    BadTenant { origin: String, tenant: String },
    #[error("{origin}: a token is given twice, for tenants {first:?} and {second:?}")]
    Duplicate {
        origin: String,
        first: String,
        second: String,
    },
}

/// The configured tokens, looked up in constant time.
#[derive(Debug, Default)]
pub struct Tokens {
    /// Token bytes and tenant. A list, not a map: a map lookup compares
    /// tokens byte by byte and stops at the first difference.
    entries: Vec<(Vec<u8>, String)>,
}

impl Tokens {
    /// The `scheduler.tokens` table plus the lines of `scheduler.tokens_file`.
    pub fn from_settings(settings: &SchedulerSettings) -> Result<Self, TokensError> {
        let mut tokens = Self::default();
        for (token, tenant) in &settings.tokens {
            tokens.add(token, tenant, "scheduler.tokens")?;
        }
        if let Some(path) = &settings.tokens_file {
            tokens.read_file(path)?;
        }
        Ok(tokens)
    }

    fn read_file(&mut self, path: &Path) -> Result<(), TokensError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: shown.clone(),
            source,
        })?;
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(token), Some(tenant), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(TokensError::Line {
                    path: shown,
                    line: line_no,
                    message: "expected `<token> <tenant>`",
                });
            };
            self.add(
                token,
                tenant,
                &format!("scheduler.tokens_file: {shown} line {line_no}"),
            )?;
        }
        Ok(())
    }

    fn add(&mut self, token: &str, tenant: &str, origin: &str) -> Result<(), TokensError> {
        let visible = |b: u8| (0x21..=0x7e).contains(&b);
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES || !token.bytes().all(visible) {
            return Err(TokensError::BadToken {
                origin: origin.to_owned(),
            });
        }
        if !is_tenant(tenant) {
            return Err(TokensError::BadTenant {
                origin: origin.to_owned(),
                tenant: tenant.to_owned(),
            });
        }
        match self.tenant_of(token) {
            Some(first) if first == tenant => Ok(()),
            Some(first) => Err(TokensError::Duplicate {
                origin: origin.to_owned(),
                first: first.to_owned(),
                second: tenant.to_owned(),
            }),
            None => {
                self.entries
                    .push((token.as_bytes().to_vec(), tenant.to_owned()));
                Ok(())
            }
        }
    }

    /// No tokens: authentication is off.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tenant of `presented`. Every configured token is compared, each
    /// in time that does not depend on where the bytes differ.
    pub fn tenant_of(&self, presented: &str) -> Option<&str> {
        let mut found = None;
        for (token, tenant) in &self.entries {
            if bool::from(presented.as_bytes().ct_eq(token)) {
                found = Some(tenant.as_str());
            }
        }
        found
    }

    /// Tenants by token count, for the startup log (never the tokens).
    pub fn tenants(&self) -> BTreeMap<&str, usize> {
        let mut tenants = BTreeMap::new();
        for (_, tenant) in &self.entries {
            *tenants.entry(tenant.as_str()).or_default() += 1;
        }
        tenants
    }
}

/// A tenant is a [`shoal_shared::Name`]: one rule for every name.
fn is_tenant(name: &str) -> bool {
    shoal_shared::Name::is_valid(name)
}

/// The token of an `Authorization` value: the scheme `Bearer` in any case
/// (RFC 7235), one or more spaces, the token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches(' ');
    (!token.is_empty()).then_some(token)
}

/// The caller's tenant, resolved from the `Authorization` header.
pub struct Tenant {
    /// `None` when authentication is disabled.
    pub name: Option<String>,
}

impl Tenant {
    /// The tenant a task is recorded under: the token's, else the spec's, else `default`.
    pub fn resolve(&self, requested: Option<&str>) -> Result<String, Problem> {
        match (&self.name, requested) {
            (Some(own), Some(requested)) if own != requested => Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "Forbidden",
                format!("this token may not submit for tenant {requested:?}"),
            )),
            (Some(own), _) => Ok(own.clone()),
            (None, Some(requested)) => Ok(requested.to_owned()),
            (None, None) => Ok("default".to_owned()),
        }
    }
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        if state.tokens.is_empty() {
            return Ok(Self { name: None });
        }
        let unauthorized = |detail: &str| {
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                detail.to_owned(),
            )
        };
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(|| unauthorized("missing `Authorization: Bearer <token>` header"))?;
        let tenant = state
            .tokens
            .tenant_of(token)
            .ok_or_else(|| unauthorized("unknown token"))?;
        Ok(Self {
            name: Some(tenant.to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  AbC "), Some("AbC"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn a_tokens_file_keeps_case_and_never_echoes_a_token() {
        let dir = std::env::temp_dir().join(format!("shoal-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(
            &path,
            "# ops\n\nS3cret-Token acme\n  other-token   beta  \n",
        )
        .unwrap();
        let mut tokens = Tokens::default();
        tokens.read_file(&path).unwrap();
        assert_eq!(tokens.tenant_of("S3cret-Token"), Some("acme"));
        assert_eq!(tokens.tenant_of("s3cret-token"), None);
        assert_eq!(tokens.tenant_of("other-token"), Some("beta"));

        std::fs::write(&path, "Hidden-Value acme extra\n").unwrap();
        let error = Tokens::default().read_file(&path).unwrap_err().to_string();
        assert!(error.contains("line 1"), "{error}");
        assert!(!error.contains("Hidden-Value"), "{error}");

        std::fs::write(&path, "Hidden-Value acme\nHidden-Value beta\n").unwrap();
        let error = Tokens::default().read_file(&path).unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
        assert!(!error.contains("Hidden-Value"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
