//! Bearer tokens map to tenants. With no tokens configured the API is open and
//! every task belongs to the tenant `default` unless the spec names one.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};

use super::{AppState, Problem};

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
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("missing `Authorization: Bearer <token>` header"))?;
        let tenant = state
            .tokens
            .get(token.trim())
            .ok_or_else(|| unauthorized("unknown token"))?;
        Ok(Self {
            name: Some(tenant.clone()),
        })
    }
}
