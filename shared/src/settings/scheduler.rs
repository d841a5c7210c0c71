//! `[scheduler]`: the HTTP API's address, body and batch limits, and tokens.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{invalid, SettingsError};
use crate::name::Name;

#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_batch: usize,
    /// Bearer token -> tenant. Empty means no authentication (single tenant `default`).
    pub tokens: BTreeMap<String, Name>,
    /// A file of `<token> <tenant>` lines, read by the scheduler at start and
    /// added to `tokens` (environment keys are lower-cased; a file keeps case).
    pub tokens_file: Option<PathBuf>,
    /// Most Server-Sent Event streams open at once; more are answered 503.
    pub max_streams: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawScheduler {
    listen: String,
    max_body_bytes: usize,
    max_batch: usize,
    tokens: BTreeMap<String, String>,
    tokens_file: Option<PathBuf>,
    max_streams: usize,
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
        let tokens = self
            .tokens
            .into_iter()
            .map(|(token, tenant)| match Name::parse(tenant) {
                Ok(tenant) => Ok((token, tenant)),
                Err(e) => Err(invalid("scheduler.tokens", format!("bad tenant name: {e}"))),
            })
            .collect::<Result<_, _>>()?;
        Ok(SchedulerSettings {
            listen,
            max_body_bytes: self.max_body_bytes,
            max_batch: self.max_batch,
            tokens,
            tokens_file: self.tokens_file,
            max_streams: self.max_streams,
        })
    }
}
