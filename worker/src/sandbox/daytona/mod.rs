//! The Daytona provider: sandboxes in Daytona's cloud, created and destroyed
//! through its REST API and driven through each sandbox's toolbox.
//!
//! - Sandboxes get a fixed name (`shoal-<owner>-<uuid>`) and the labels
//!   `shoal.owner` and `shoal.template`. A create that times out or is
//!   answered 409 or 5xx may have happened anyway: the name is looked up
//!   before another attempt, so no duplicate is made.
//! - After a create (and a start) the state is polled every 100 ms, growing
//!   ×1.1 up to 1 s, until `started` or a deadline; a sandbox that misses the
//!   deadline is destroyed and the create fails with kind `Create`.
//! - Auto-stop, auto-archive and auto-delete intervals are always set, from
//!   the template. No environment is set on the sandbox (Daytona's warm pool
//!   only serves creates without one): variables go with each command.
//! - `list_owned` filters on the owner label; `destroy` is idempotent and
//!   refuses sandboxes of another owner.
//!
//! Specs: `api/openapi.yaml` (main API) and `toolbox/swagger.json` (toolbox)
//! in Daytona's repository; see `tests/src/daytona_fake` for the fake server
//! that checks every request and response against them.

mod api;
mod client;
mod config;
mod sandbox;
mod script;
mod shell;
mod toolbox;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::Retryable;
use reqwest::{Method, Url};

pub use config::{ApiKey, DaytonaConfig, PollSettings, RetrySettings};
pub use script::daemon_split;

use api::{
    classify, CreateSandbox, ListSandboxesResponse, SandboxDto, StateClass, WorkDirResponse,
    OWNER_LABEL, TEMPLATE_LABEL,
};
use client::{check_toolbox, parse_base, url_with, Call, Http, HttpError};
use sandbox::DaytonaSandbox;

use super::{
    OwnedSandbox, ProviderKind, Sandbox, SandboxError, SandboxErrorKind, SandboxProvider, Template,
};

/// What every sandbox of a provider shares.
pub(crate) struct Shared {
    pub(crate) http: Http,
    pub(crate) config: DaytonaConfig,
    api: Url,
}

/// Creates and destroys sandboxes in Daytona.
pub struct DaytonaProvider {
    shared: Arc<Shared>,
    /// Template environments by name, for sandboxes found again by `reattach`.
    envs: Mutex<HashMap<String, BTreeMap<String, String>>>,
}

/// Whether a failed create may have created the sandbox anyway.
fn maybe_created(error: &HttpError) -> bool {
    match error {
        HttpError::Transport { connect, .. } => !connect,
        HttpError::Status { status, .. } => {
            matches!(status.as_u16(), 409 | 500 | 502 | 503 | 504)
        }
        HttpError::Decode(_) => true,
    }
}

fn create_retryable(error: &HttpError) -> bool {
    match error {
        HttpError::Transport { .. } => true,
        HttpError::Status { status, .. } => {
            matches!(status.as_u16(), 409 | 429 | 500 | 502 | 503 | 504)
        }
        HttpError::Decode(_) => false,
    }
}

/// `owner` as a name part: lowercase letters, digits and `-`, at most 24.
fn slug(owner: &str) -> String {
    let slug: String = owner
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(24)
        .collect();
    let slug = slug.trim_matches('-');
    if slug.is_empty() {
        "fleet".to_owned()
    } else {
        slug.to_owned()
    }
}

impl DaytonaProvider {
    pub fn new(config: DaytonaConfig) -> Result<Self, SandboxError> {
        let api = parse_base(&config.api_url, "Daytona API URL")?;
        let http = Http::new(
            config.api_key.clone(),
            config.retry.clone(),
            config.request_timeout,
        )?;
        Ok(Self {
            shared: Arc::new(Shared { http, config, api }),
            envs: Mutex::new(HashMap::new()),
        })
    }

    /// Makes `templates`' environments known, for sandboxes reattached after
    /// a restart (a sandbox only carries its template's name, as a label).
    pub fn with_templates<'a>(self, templates: impl IntoIterator<Item = &'a Template>) -> Self {
        for template in templates {
            self.remember(template);
        }
        self
    }

    fn remember(&self, template: &Template) {
        if let Ok(mut envs) = self.envs.lock() {
            envs.insert(template.name.to_string(), template.env.clone());
        }
    }

    fn env_of(&self, template: Option<&str>) -> BTreeMap<String, String> {
        let envs = self.envs.lock().ok();
        template
            .and_then(|name| envs.as_ref()?.get(name).cloned())
            .unwrap_or_default()
    }

    fn owner(&self) -> &str {
        &self.shared.config.owner
    }

    fn api_url(&self, segments: &[&str]) -> Result<Url, SandboxError> {
        url_with(&self.shared.api, segments)
    }

    /// `GET /sandbox/{idOrName}` (`getSandbox`); `None` on 404.
    async fn get(&self, id_or_name: &str) -> Result<Option<SandboxDto>, HttpError> {
        let url = self
            .api_url(&["sandbox", id_or_name])
            .map_err(|e| HttpError::Decode(e.message))?;
        match self.shared.http.json(&Call::new(Method::GET, url)).await {
            Ok(dto) => Ok(Some(dto)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// `POST /sandbox` (`createSandbox`), resolving "maybe created" answers
    /// by looking the name up before trying again.
    async fn create_once(&self, body: &CreateSandbox) -> Result<SandboxDto, HttpError> {
        let url = self
            .api_url(&["sandbox"])
            .map_err(|e| HttpError::Decode(e.message))?;
        let call = Call::new(Method::POST, url).json(body).once();
        let attempt = || async {
            let error = match self.shared.http.json::<SandboxDto>(&call).await {
                Ok(dto) => return Ok(dto),
                Err(error) => error,
            };
            if !maybe_created(&error) {
                return Err(error);
            }
            match self.get(&body.name).await? {
                Some(dto) if dto.label(OWNER_LABEL) == Some(self.owner()) => {
                    tracing::info!(
                        sandbox = %dto.id,
                        status = error.status(),
                        "create failed but the sandbox exists: using it"
                    );
                    Ok(dto)
                }
                _ => Err(error),
            }
        };
        let retry = &self.shared.config.retry;
        let backoff = retry.backoff();
        attempt
            .retry(backoff.builder())
            .when(create_retryable)
            .adjust(|error: &HttpError, delay| {
                backoff.next_wait(delay, error.retry_after(), retry.max_retry_after)
            })
            .await
    }

    /// `POST /sandbox/{id}/start` (`startSandbox`).
    async fn start(&self, id: &str) -> Result<(), SandboxError> {
        let call = Call::new(Method::POST, self.api_url(&["sandbox", id, "start"])?);
        self.shared
            .http
            .send(&call)
            .await
            .map(drop)
            .map_err(|e| e.into_sandbox(&format!("starting sandbox {id}")))
    }

    /// Polls sandbox `id` until it is `started`, starting it when it rests
    /// (stopped, archived, paused). Failures carry `kind`.
    async fn wait_started(
        &self,
        id: &str,
        deadline: Duration,
        kind: SandboxErrorKind,
    ) -> Result<SandboxDto, SandboxError> {
        let poll = &self.shared.config.poll;
        let started = Instant::now();
        let mut interval = poll.initial;
        let mut start_sent = false;
        loop {
            let dto = self
                .get(id)
                .await
                .map_err(|e| e.into_sandbox(&format!("sandbox {id}")))?
                .ok_or_else(|| {
                    SandboxError::new(SandboxErrorKind::NotFound, format!("sandbox {id} is gone"))
                })?;
            let state = dto.state().to_owned();
            match classify(&state) {
                StateClass::Ready => return Ok(dto),
                StateClass::Failed => {
                    return Err(SandboxError::new(
                        kind,
                        format!(
                            "sandbox {id} is in state {state}: {}",
                            dto.error_reason.as_deref().unwrap_or("no reason given")
                        ),
                    ))
                }
                StateClass::Gone => {
                    return Err(SandboxError::new(
                        SandboxErrorKind::NotFound,
                        format!("sandbox {id} is {state}"),
                    ))
                }
                StateClass::Resting if !start_sent => {
                    self.start(id).await?;
                    start_sent = true;
                }
                StateClass::Resting | StateClass::Moving => {}
            }
            let elapsed = started.elapsed();
            if elapsed >= deadline {
                return Err(SandboxError::new(
                    kind,
                    format!("sandbox {id} still {state} after {deadline:?}"),
                ));
            }
            tokio::time::sleep(interval.min(deadline - elapsed)).await;
            interval = poll.next(interval);
        }
    }

    /// Builds the handle of a started sandbox: its toolbox and working dir.
    async fn attach(
        &self,
        dto: &SandboxDto,
        env: BTreeMap<String, String>,
    ) -> Result<DaytonaSandbox, SandboxError> {
        let proxy = dto.toolbox_proxy_url.as_deref().ok_or_else(|| {
            SandboxError::new(
                SandboxErrorKind::Broken,
                format!("sandbox {} has no toolbox URL", dto.id),
            )
        })?;
        let proxy = parse_base(proxy, "toolbox URL")?;
        check_toolbox(&self.shared.api, &proxy, &self.shared.config.toolbox_hosts)?;
        let toolbox = url_with(&proxy, &[&dto.id])?;
        let mut sandbox = DaytonaSandbox {
            id: dto.id.clone(),
            shared: self.shared.clone(),
            toolbox,
            workdir: String::new(),
            env,
        };
        let reply: WorkDirResponse = self
            .shared
            .http
            .json(&Call::new(Method::GET, sandbox.url(&["work-dir"])?))
            .await
            .map_err(|e| e.into_sandbox("toolbox work-dir"))?;
        sandbox.workdir = reply.dir;
        Ok(sandbox)
    }

    /// Destroys `id` after a failed create, logging (not returning) errors.
    async fn discard(&self, id: &str) {
        if let Err(error) = self.destroy(id).await {
            tracing::warn!(sandbox = %id, %error, "destroying a failed sandbox failed");
        }
    }
}

#[async_trait]
impl SandboxProvider for DaytonaProvider {
    fn name(&self) -> &'static str {
        "daytona"
    }

    fn outlives_worker(&self) -> bool {
        true
    }

    async fn create(&self, template: &Template) -> Result<Box<dyn Sandbox>, SandboxError> {
        if template.provider != ProviderKind::Daytona {
            return Err(SandboxError::new(
                SandboxErrorKind::Rejected,
                format!("template {} is not a Daytona template", template.name),
            ));
        }
        self.remember(template);
        let settings = &template.daytona;
        let body = CreateSandbox {
            name: format!(
                "shoal-{}-{}",
                slug(self.owner()),
                uuid::Uuid::now_v7().simple()
            ),
            snapshot: settings.snapshot.clone(),
            labels: BTreeMap::from([
                (OWNER_LABEL.to_owned(), self.owner().to_owned()),
                (TEMPLATE_LABEL.to_owned(), template.name.to_string()),
            ]),
            target: self.shared.config.target.clone(),
            cpu: settings.cpu,
            memory: settings.memory_gib,
            disk: settings.disk_gib,
            network_block_all: !template.network,
            auto_stop_interval: settings.auto_stop_minutes,
            auto_archive_interval: settings.auto_archive_minutes,
            auto_delete_interval: settings.auto_delete_minutes,
        };
        let dto = self.create_once(&body).await.map_err(|e| {
            let mut error = e.into_sandbox(&format!("creating sandbox {}", body.name));
            if error.kind != SandboxErrorKind::Rejected {
                error.kind = SandboxErrorKind::Create;
            }
            error
        })?;
        tracing::info!(sandbox = %dto.id, name = %body.name, state = dto.state(), "Daytona sandbox created");
        let deadline = self.shared.config.poll.create_deadline;
        let ready = match self
            .wait_started(&dto.id, deadline, SandboxErrorKind::Create)
            .await
        {
            Ok(ready) => ready,
            Err(mut error) => {
                self.discard(&dto.id).await;
                error.kind = SandboxErrorKind::Create;
                return Err(error);
            }
        };
        match self.attach(&ready, template.env.clone()).await {
            Ok(sandbox) => Ok(Box::new(sandbox)),
            Err(mut error) => {
                self.discard(&dto.id).await;
                error.kind = SandboxErrorKind::Create;
                Err(error)
            }
        }
    }

    async fn reattach(&self, id: &str) -> Result<Box<dyn Sandbox>, SandboxError> {
        let dto = self
            .get(id)
            .await
            .map_err(|e| e.into_sandbox(&format!("sandbox {id}")))?
            .filter(|dto| dto.label(OWNER_LABEL) == Some(self.owner()))
            .ok_or_else(|| {
                SandboxError::new(
                    SandboxErrorKind::NotFound,
                    format!("no sandbox {id} of owner {}", self.owner()),
                )
            })?;
        let deadline = self.shared.config.poll.transition_deadline;
        let ready = self
            .wait_started(&dto.id, deadline, SandboxErrorKind::Broken)
            .await?;
        let env = self.env_of(ready.label(TEMPLATE_LABEL));
        Ok(Box::new(self.attach(&ready, env).await?))
    }

    async fn destroy(&self, id: &str) -> Result<(), SandboxError> {
        let context = format!("destroying sandbox {id}");
        let Some(dto) = self.get(id).await.map_err(|e| e.into_sandbox(&context))? else {
            return Ok(());
        };
        if dto.label(OWNER_LABEL) != Some(self.owner()) {
            return Err(SandboxError::new(
                SandboxErrorKind::NotFound,
                format!("sandbox {id} is not owned by {}", self.owner()),
            ));
        }
        if classify(dto.state()) == StateClass::Gone
            || dto.desired_state.as_deref() == Some("destroyed")
        {
            // Already on its way out.
            return Ok(());
        }
        // 409 (a state change in progress) is retried by the client.
        let call = Call::new(Method::DELETE, self.api_url(&["sandbox", &dto.id])?);
        match self.shared.http.send(&call).await {
            Ok(_) => {
                tracing::info!(sandbox = %id, "Daytona sandbox destroyed");
                Ok(())
            }
            Err(error) if error.is_not_found() => Ok(()),
            Err(error) => Err(error.into_sandbox(&context)),
        }
    }

    async fn list_owned(&self) -> Result<Vec<OwnedSandbox>, SandboxError> {
        let labels = serde_json::json!({ OWNER_LABEL: self.owner() }).to_string();
        let mut owned = Vec::new();
        let mut cursor: Option<String> = None;
        for _page in 0..1000 {
            let mut url = self.api_url(&["sandbox"])?;
            {
                let mut query = url.query_pairs_mut();
                query
                    .append_pair("labels", &labels)
                    .append_pair("limit", "200");
                if let Some(cursor) = &cursor {
                    query.append_pair("cursor", cursor);
                }
            }
            let page: ListSandboxesResponse = self
                .shared
                .http
                .json(&Call::new(Method::GET, url))
                .await
                .map_err(|e| e.into_sandbox("listing sandboxes"))?;
            owned.extend(
                page.items
                    .iter()
                    .filter(|dto| dto.label(OWNER_LABEL) == Some(self.owner()))
                    .filter(|dto| classify(dto.state()) != StateClass::Gone)
                    .map(|dto| OwnedSandbox {
                        id: dto.id.clone(),
                        template: dto.label(TEMPLATE_LABEL).unwrap_or_default().to_owned(),
                        owner: self.owner().to_owned(),
                    }),
            );
            match page.next_cursor.filter(|c| !c.is_empty()) {
                Some(next) if !page.items.is_empty() => cursor = Some(next),
                _ => return Ok(owned),
            }
        }
        Err(SandboxError::new(
            SandboxErrorKind::Unavailable,
            "listing sandboxes did not end after 1000 pages",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe() {
        assert_eq!(slug("Worker_7@host"), "worker-7-host");
        assert_eq!(slug("--"), "fleet");
        assert!(slug(&"x".repeat(100)).len() <= 24);
    }

    #[test]
    fn ambiguous_create_failures_are_looked_up() {
        let status = |code: u16| HttpError::Status {
            status: reqwest::StatusCode::from_u16(code).unwrap(),
            body: String::new(),
            retry_after: None,
        };
        assert!(maybe_created(&status(502)));
        assert!(maybe_created(&status(409)));
        assert!(!maybe_created(&status(429)));
        assert!(!maybe_created(&status(400)));
        assert!(!maybe_created(&HttpError::Transport {
            connect: true,
            timeout: false,
            message: String::new()
        }));
        assert!(maybe_created(&HttpError::Transport {
            connect: false,
            timeout: true,
            message: String::new()
        }));
    }
}
