//! Bearer tokens map to tenants (ADR 0036). With no tokens configured the
//! API is open and every task belongs to the tenant `default` unless the spec
//! names one.
//!
//! Tokens come from `scheduler.tokens` (a `token = "tenant"` table) and from
//! `scheduler.tokens_file`, a file of `<token> <tenant>` lines (blank lines
//! and lines starting with `#` are skipped). Use the file for tokens with
//! capitals: the `SHOAL__SCHEDULER__TOKENS__<token>` environment form
//! lower-cases the token, since it is a key.
//!
//! A token may be given as its SHA-256 digest, `sha256:<64 hex digits>`
//! (`shoal token hash` prints it), and should be: the configuration then
//! holds nothing a caller could present. The tenant `*` makes an admin token,
//! which sees and acts on every tenant's tasks.
//!
//! Only digests are kept: a presented token is hashed once and its digest
//! compared with every configured digest in constant time, with no early
//! exit and no map keyed by a secret.

use std::collections::BTreeMap;
use std::path::Path;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use sha2::{Digest, Sha256};
use shoal_shared::settings::{SchedulerSettings, ADMIN_TENANT};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::{AppState, Problem};

/// Longest token accepted from configuration.
const MAX_TOKEN_BYTES: usize = 4096;

/// The prefix of a configured digest.
pub const DIGEST_PREFIX: &str = "sha256:";

/// A token's SHA-256 digest.
pub type TokenDigest = [u8; 32];

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
    #[error(
        "{origin}: a digest must be `sha256:` and 64 hex digits (`shoal token hash` prints one)"
    )]
    BadDigest { origin: String },
    #[error("{origin}: bad tenant name {tenant:?} (or `*` for an admin token)")]
    BadTenant { origin: String, tenant: String },
    #[error("{origin}: a token is given twice, for tenants {first:?} and {second:?}")]
    Duplicate {
        origin: String,
        first: String,
        second: String,
    },
}

/// Who a token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// One tenant: sees and acts on its own tasks only.
    Tenant(String),
    /// Every tenant (tenant `*` in configuration).
    Admin,
}

impl Role {
    fn shown(&self) -> &str {
        match self {
            Self::Tenant(name) => name,
            Self::Admin => ADMIN_TENANT,
        }
    }
}

/// The configured tokens, by digest, looked up in constant time.
#[derive(Debug, Default)]
pub struct Tokens {
    /// Digest and role. A list, not a map: a map lookup compares keys byte
    /// by byte and stops at the first difference.
    entries: Vec<(TokenDigest, Role)>,
    /// Entries configured as plain tokens rather than digests.
    plaintext: usize,
}

/// The SHA-256 digest of a token.
pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// The configuration form of a digest: `sha256:` and 64 lower-case hex digits.
pub fn digest_line(digest: &TokenDigest) -> String {
    use std::fmt::Write;
    let mut line = String::from(DIGEST_PREFIX);
    for byte in digest {
        let _ = write!(line, "{byte:02x}");
    }
    line
}

/// A configured key: `Some(Ok(digest))` for `sha256:<hex>`, `Some(Err)` for a
/// malformed one, `None` for a plain token.
fn parse_digest(key: &str) -> Option<Result<TokenDigest, ()>> {
    let hex = key.strip_prefix(DIGEST_PREFIX)?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(Err(()));
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| ())
            .ok()?;
    }
    Some(Ok(digest))
}

impl Tokens {
    /// The `scheduler.tokens` table plus the lines of `scheduler.tokens_file`.
    /// Logs a warning when any token is configured in plain text.
    pub fn from_settings(settings: &SchedulerSettings) -> Result<Self, TokensError> {
        let mut tokens = Self::default();
        for (token, tenant) in &settings.tokens {
            tokens.add(token, tenant, "scheduler.tokens")?;
        }
        for token in &settings.admin_tokens {
            tokens.add(token, ADMIN_TENANT, "scheduler.tokens")?;
        }
        if let Some(path) = &settings.tokens_file {
            tokens.read_file(path)?;
        }
        if tokens.plaintext > 0 {
            tracing::warn!(
                plaintext = tokens.plaintext,
                "bearer tokens configured in plain text: configure their digests instead \
                 (`shoal token hash` prints the `sha256:...` form)"
            );
        }
        let admins = tokens.admin_count();
        if admins > 0 {
            tracing::info!(
                admin_tokens = admins,
                "admin tokens loaded: they see every tenant"
            );
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
                    message: "expected `<token> <tenant>` or `sha256:<hex> <tenant>`",
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
        let (digest, plain) = match parse_digest(token) {
            Some(Ok(digest)) => (digest, false),
            Some(Err(())) => {
                return Err(TokensError::BadDigest {
                    origin: origin.to_owned(),
                })
            }
            None => {
                let visible = |b: u8| (0x21..=0x7e).contains(&b);
                if token.is_empty() || token.len() > MAX_TOKEN_BYTES || !token.bytes().all(visible)
                {
                    return Err(TokensError::BadToken {
                        origin: origin.to_owned(),
                    });
                }
                (self::digest(token), true)
            }
        };
        let role = if tenant == ADMIN_TENANT {
            Role::Admin
        } else if is_tenant(tenant) {
            Role::Tenant(tenant.to_owned())
        } else {
            return Err(TokensError::BadTenant {
                origin: origin.to_owned(),
                tenant: tenant.to_owned(),
            });
        };
        match self.role_of_digest(&digest) {
            Some(first) if *first == role => Ok(()),
            Some(first) => Err(TokensError::Duplicate {
                origin: origin.to_owned(),
                first: first.shown().to_owned(),
                second: role.shown().to_owned(),
            }),
            None => {
                self.entries.push((digest, role));
                self.plaintext += usize::from(plain);
                Ok(())
            }
        }
    }

    /// No tokens: authentication is off.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The role of `presented`: hashed once, its digest compared with every
    /// configured digest, each in constant time, with no early exit.
    pub fn role_of(&self, presented: &str) -> Option<&Role> {
        self.role_of_digest(&digest(presented))
    }

    fn role_of_digest(&self, presented: &TokenDigest) -> Option<&Role> {
        // The index of the match is chosen without a branch on a secret; the
        // branch on `found` comes after every comparison.
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, (digest, _)) in self.entries.iter().enumerate() {
            let equal = presented.ct_eq(digest);
            index.conditional_assign(&(i as u64), equal);
            found |= equal;
        }
        bool::from(found).then(|| &self.entries[index as usize].1)
    }

    /// The tenant of a tenant token (`None` for an admin or unknown token).
    pub fn tenant_of(&self, presented: &str) -> Option<&str> {
        match self.role_of(presented)? {
            Role::Tenant(name) => Some(name),
            Role::Admin => None,
        }
    }

    /// How many admin tokens are configured.
    pub fn admin_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|(_, role)| *role == Role::Admin)
            .count()
    }

    /// Tenants by token count, for the startup log and the metrics' tenant
    /// labels (never the tokens; admin tokens are not a tenant).
    pub fn tenants(&self) -> BTreeMap<&str, usize> {
        let mut tenants = BTreeMap::new();
        for (_, role) in &self.entries {
            if let Role::Tenant(tenant) = role {
                *tenants.entry(tenant.as_str()).or_default() += 1;
            }
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
    /// The one tenant the caller may see; `None` when it may see every
    /// tenant (authentication disabled, or an admin token).
    pub name: Option<String>,
    /// An admin token (authentication on, every tenant visible).
    pub admin: bool,
}

/// The answer to a read naming a tenant the caller may not see: the same as
/// for a tenant that does not exist.
pub fn tenant_not_found(asked: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "tenant-not-found",
        "Tenant not found",
        format!("no tenant {asked:?} visible to this token"),
    )
}

impl Tenant {
    /// The tenant a task is recorded under: the token's, else the spec's,
    /// else `default`. An admin token must name the tenant.
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
            (None, None) if self.admin => Err(Problem::unprocessable(
                "an admin token submits for a named tenant: set the spec's `tenant`",
            )
            .with_field("tenant")),
            (None, None) => Ok("default".to_owned()),
        }
    }

    /// The tenant filter of a read: the caller's own tenant (naming another
    /// is a 404, as an unknown one is), or what was asked when the caller
    /// sees every tenant.
    pub fn scope(&self, asked: Option<String>) -> Result<Option<String>, Problem> {
        match (&self.name, asked) {
            (Some(own), Some(asked)) if *own != asked => Err(tenant_not_found(&asked)),
            (Some(own), _) => Ok(Some(own.clone())),
            (None, asked) => Ok(asked),
        }
    }

    /// Whether the caller may see a record of `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        self.name.as_deref().is_none_or(|own| own == tenant)
    }

    /// Who acts, for logs and cancel records: `tenant <name>`, `admin`, or
    /// `tenant default` when authentication is off.
    pub fn actor(&self) -> String {
        match (&self.name, self.admin) {
            (Some(own), _) => format!("tenant {own}"),
            (None, true) => "admin".to_owned(),
            (None, false) => "tenant default".to_owned(),
        }
    }
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        if state.tokens.is_empty() {
            return Ok(Self {
                name: None,
                admin: false,
            });
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
        match state.tokens.role_of(token) {
            Some(Role::Tenant(tenant)) => Ok(Self {
                name: Some(tenant.clone()),
                admin: false,
            }),
            Some(Role::Admin) => Ok(Self {
                name: None,
                admin: true,
            }),
            None => Err(unauthorized("unknown token")),
        }
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

    #[test]
    fn a_digest_stands_for_its_token() {
        let token = "S3cret-Token";
        let line = digest_line(&digest(token));
        assert!(
            line.starts_with("sha256:") && line.len() == 7 + 64,
            "{line}"
        );
        // The well-known digest of "abc".
        assert_eq!(
            digest_line(&digest("abc")),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut tokens = Tokens::default();
        tokens.add(&line, "acme", "test").unwrap();
        tokens
            .add(
                &line.to_uppercase().replace("SHA256:", "sha256:"),
                "acme",
                "test",
            )
            .unwrap();
        tokens.add("plain-token", "beta", "test").unwrap();
        assert_eq!(tokens.tenant_of(token), Some("acme"));
        assert_eq!(
            tokens.tenant_of(&line),
            None,
            "the digest itself is no token"
        );
        assert_eq!(tokens.tenant_of("plain-token"), Some("beta"));
        assert_eq!(tokens.tenant_of("s3cret-token"), None);
        assert_eq!(tokens.plaintext, 1);
        assert_eq!(tokens.tenants().get("acme"), Some(&1));
    }

    #[test]
    fn a_malformed_digest_or_tenant_is_refused_without_echo() {
        for bad in [
            "sha256:abc",
            "sha256:",
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            let error = Tokens::default().add(bad, "acme", "here").unwrap_err();
            assert!(
                matches!(error, TokensError::BadDigest { .. }),
                "{bad}: {error}"
            );
            assert!(
                bad.len() == 7 || !error.to_string().contains(bad),
                "{error}"
            );
        }
        let error = Tokens::default()
            .add("tok", "no such!", "here")
            .unwrap_err();
        assert!(matches!(error, TokensError::BadTenant { .. }), "{error}");
        // A digest and its plain token are the same token.
        let mut tokens = Tokens::default();
        tokens.add("tok", "acme", "here").unwrap();
        let error = tokens
            .add(&digest_line(&digest("tok")), "beta", "there")
            .unwrap_err();
        assert!(matches!(error, TokensError::Duplicate { .. }), "{error}");
    }

    #[test]
    fn the_admin_tenant_sees_every_tenant() {
        let dir = std::env::temp_dir().join(format!("shoal-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(
            &path,
            format!(
                "{} *\nuser-token acme\n",
                digest_line(&digest("Root-Token"))
            ),
        )
        .unwrap();
        let mut tokens = Tokens::default();
        tokens.read_file(&path).unwrap();
        assert_eq!(tokens.role_of("Root-Token"), Some(&Role::Admin));
        assert_eq!(tokens.tenant_of("Root-Token"), None);
        assert_eq!(
            tokens.role_of("user-token"),
            Some(&Role::Tenant("acme".into()))
        );
        assert_eq!(tokens.admin_count(), 1);
        assert_eq!(tokens.tenants().len(), 1, "the admin role is no tenant");
        std::fs::remove_dir_all(&dir).unwrap();

        let admin = Tenant {
            name: None,
            admin: true,
        };
        assert_eq!(
            admin.scope(Some("beta".into())).unwrap().as_deref(),
            Some("beta")
        );
        assert_eq!(admin.resolve(Some("beta")).unwrap(), "beta");
        assert_eq!(admin.resolve(None).unwrap_err().status, 422);
        assert_eq!(admin.actor(), "admin");
        let acme = Tenant {
            name: Some("acme".into()),
            admin: false,
        };
        assert_eq!(acme.scope(Some("beta".into())).unwrap_err().status, 404);
        assert_eq!(acme.scope(None).unwrap().as_deref(), Some("acme"));
        assert!(acme.sees("acme") && !acme.sees("beta") && admin.sees("beta"));
    }
}
