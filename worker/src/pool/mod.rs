//! The warm pool: per template, sandboxes created ahead of demand so a lease is
//! an in-memory hand-over, not a create.
//!
//! Per template: at least `min_idle` idle (replenished in the background), at
//! most `max_total` idle + leased + being created + being destroyed, at most
//! `create_concurrency` creates at once. A lease takes an idle sandbox after a
//! health check (a failing one is discarded and replaced), creates one when the
//! pool has room, or waits for room up to `lease_timeout`. A returned sandbox
//! is destroyed, unless the template says `reuse`, in which case it goes back
//! idle for the next task of the same tenant; when the pool is full, another
//! tenant's lease evicts the oldest such sandbox instead of waiting, so one
//! tenant's kept sandboxes never hold the pool against the others. A reaper destroys sandboxes the
//! provider lists as ours but the pool does not know (leaks after a crash).

mod metrics;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use shoal_shared::template::Template;
use shoal_shared::Name;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use metrics::PoolMetrics;
use metrics::{LeaseLabels, TemplateLabels};

use crate::sandbox::{Sandbox, SandboxError, SandboxErrorKind, SandboxProvider};

/// Why no sandbox could be leased.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("unknown sandbox template {0:?}")]
    UnknownTemplate(String),
    #[error("no sandbox of template {template} became available within {waited:?}")]
    Timeout { template: String, waited: Duration },
    #[error("the pool is shutting down")]
    Closed,
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// A leased sandbox. Give it back with [`Pool::release`].
pub struct PoolLease {
    sandbox: Box<dyn Sandbox>,
    template: String,
    tenant: String,
    /// Served from the idle set (no create on the lease path).
    pub warm: bool,
    /// How long the lease took.
    pub waited: Duration,
}

impl PoolLease {
    pub fn sandbox(&self) -> &dyn Sandbox {
        &*self.sandbox
    }

    pub fn template(&self) -> &str {
        &self.template
    }
}

struct Idle {
    sandbox: Box<dyn Sandbox>,
    /// The tenant that used it last (`None`: never used).
    used_by: Option<String>,
}

#[derive(Default)]
struct State {
    idle: VecDeque<Idle>,
    leased: HashSet<String>,
    creating: usize,
    destroying: usize,
    /// Unknown ids seen by the previous reaper pass.
    suspects: HashSet<String>,
}

impl State {
    fn total(&self) -> usize {
        self.idle.len() + self.leased.len() + self.creating + self.destroying
    }
}

struct TemplatePool {
    template: Arc<Template>,
    provider: Arc<dyn SandboxProvider>,
    labels: TemplateLabels,
    state: Mutex<State>,
    /// Wakes lease waiters: an idle sandbox appeared or room was freed.
    available: Notify,
    /// Wakes the replenisher.
    replenish: Notify,
    create_permits: Semaphore,
}

struct Inner {
    /// Every provider in use, once each (for the reaper).
    providers: Vec<Arc<dyn SandboxProvider>>,
    templates: HashMap<Name, Arc<TemplatePool>>,
    metrics: PoolMetrics,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Cheap to clone; all clones share one pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// What the pool takes from a slot: one of its four answers.
enum Take {
    Warm(Idle),
    Create,
    /// The pool is full but holds another tenant's idle reusable sandbox:
    /// its slot becomes this lease's create, so the total never grows.
    Replace(Idle),
    Full,
}

impl Pool {
    /// Reaps what a previous incarnation leaked (before anything is created,
    /// so nothing in creation can be mistaken for a leak), then starts a
    /// replenisher per template and the periodic reaper.
    pub async fn start(
        provider: Arc<dyn SandboxProvider>,
        templates: impl IntoIterator<Item = Template>,
        metrics: PoolMetrics,
        reap_every: Duration,
    ) -> Self {
        let templates: Vec<(Template, Arc<dyn SandboxProvider>)> = templates
            .into_iter()
            .map(|t| (t, provider.clone()))
            .collect();
        Self::start_with(vec![provider], templates, metrics, reap_every).await
    }

    /// Like [`Pool::start`], with a provider per template (local and Daytona
    /// templates in one pool).
    pub async fn start_with(
        providers: Vec<Arc<dyn SandboxProvider>>,
        templates: Vec<(Template, Arc<dyn SandboxProvider>)>,
        metrics: PoolMetrics,
        reap_every: Duration,
    ) -> Self {
        let templates = templates
            .into_iter()
            .map(|(template, provider)| {
                let permits = template.pool.create_concurrency.max(1);
                let labels = TemplateLabels {
                    template: template.name.to_string(),
                };
                let pool = TemplatePool {
                    template: Arc::new(template),
                    provider,
                    labels,
                    state: Mutex::new(State::default()),
                    available: Notify::new(),
                    replenish: Notify::new(),
                    create_permits: Semaphore::new(permits),
                };
                (pool.template.name.clone(), Arc::new(pool))
            })
            .collect();
        let pool = Self {
            inner: Arc::new(Inner {
                providers,
                templates,
                metrics,
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        };
        pool.reap(true).await;
        for template in pool.inner.templates.values() {
            pool.inner
                .tracker
                .spawn(pool.clone().replenish_loop(template.clone()));
        }
        pool.inner.tracker.spawn(pool.clone().reap_loop(reap_every));
        pool
    }

    fn template(&self, name: &str) -> Result<&Arc<TemplatePool>, PoolError> {
        self.inner
            .templates
            .get(name)
            .ok_or_else(|| PoolError::UnknownTemplate(name.to_owned()))
    }

    /// Idle and leased counts of a template (for tests and status).
    pub fn counts(&self, template: &str) -> Option<(usize, usize, usize)> {
        let pool = self.inner.templates.get(template)?;
        let state = lock(&pool.state);
        Some((state.idle.len(), state.leased.len(), state.total()))
    }

    /// Leases a sandbox of `template` for `tenant`.
    pub async fn lease(&self, template: &str, tenant: &str) -> Result<PoolLease, PoolError> {
        let pool = self.template(template)?.clone();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + pool.template.pool.lease_timeout;
        loop {
            if self.inner.shutdown.is_cancelled() {
                return Err(PoolError::Closed);
            }
            // Register for a wake-up before looking, so none is missed.
            let notified = pool.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let take = {
                let mut state = lock(&pool.state);
                let reusable = pool.template.reuse;
                let position = state.idle.iter().position(|idle| {
                    !reusable || idle.used_by.as_deref().is_none_or(|t| t == tenant)
                });
                if let Some(idle) = position.and_then(|i| state.idle.remove(i)) {
                    state.leased.insert(idle.sandbox.id().to_owned());
                    Take::Warm(idle)
                } else if state.total() < pool.template.pool.max_total {
                    state.creating += 1;
                    Take::Create
                } else if let Some(idle) = reusable.then(|| state.idle.pop_front()).flatten() {
                    // Only other tenants' sandboxes are left idle (a fresh or
                    // own one was taken above): kept for them, they must not
                    // hold the pool against this tenant. The oldest goes.
                    state.creating += 1;
                    Take::Replace(idle)
                } else {
                    Take::Full
                }
            };
            match take {
                Take::Warm(idle) => {
                    pool.replenish.notify_one();
                    match idle.sandbox.health().await {
                        Ok(()) => {
                            self.gauges(&pool);
                            return Ok(self.leased(&pool, idle.sandbox, tenant, true, started));
                        }
                        Err(error) => {
                            warn!(template = %pool.template.name, %error, "idle sandbox failed its health check; replacing it");
                            self.inner
                                .metrics
                                .health_failures
                                .get_or_create(&pool.labels)
                                .inc();
                            let id = idle.sandbox.id().to_owned();
                            {
                                let mut state = lock(&pool.state);
                                state.leased.remove(&id);
                                state.destroying += 1;
                            }
                            self.destroy_later(&pool, idle.sandbox);
                        }
                    }
                }
                take @ (Take::Create | Take::Replace(_)) => {
                    if let Take::Replace(idle) = take {
                        self.evict(&pool, idle, tenant).await;
                    }
                    let created = self.create(&pool).await;
                    let mut state = lock(&pool.state);
                    state.creating -= 1;
                    match created {
                        Ok(sandbox) => {
                            state.leased.insert(sandbox.id().to_owned());
                            drop(state);
                            self.gauges(&pool);
                            return Ok(self.leased(&pool, sandbox, tenant, false, started));
                        }
                        Err(error) => {
                            drop(state);
                            pool.available.notify_one();
                            self.count_lease(&pool, "error", started);
                            return Err(error.into());
                        }
                    }
                }
                Take::Full => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = self.inner.shutdown.cancelled() => return Err(PoolError::Closed),
                        _ = tokio::time::sleep_until(deadline) => {
                            self.count_lease(&pool, "timeout", started);
                            return Err(PoolError::Timeout {
                                template: pool.template.name.to_string(),
                                waited: started.elapsed(),
                            });
                        }
                    }
                }
            }
        }
    }

    /// The provider name of `template` (`local`, `daytona`).
    pub fn provider_of(&self, template: &str) -> Option<&'static str> {
        self.inner
            .templates
            .get(template)
            .map(|pool| pool.provider.name())
    }

    /// Whether `template`'s sandboxes outlive their worker (reattachable).
    pub fn outlives_worker(&self, template: &str) -> bool {
        self.inner
            .templates
            .get(template)
            .is_some_and(|pool| pool.provider.outlives_worker())
    }

    /// Leases the existing sandbox `id` of `template` again (a redelivered
    /// task's, after its worker died; ADR 0033): reattached through the
    /// provider, health-checked, then held like any lease and given back
    /// with [`Pool::release`].
    pub async fn adopt(
        &self,
        template: &str,
        tenant: &str,
        id: &str,
    ) -> Result<PoolLease, PoolError> {
        let pool = self.template(template)?.clone();
        if self.inner.shutdown.is_cancelled() {
            return Err(PoolError::Closed);
        }
        let started = Instant::now();
        let sandbox = pool.provider.reattach(id).await?;
        sandbox.health().await?;
        lock(&pool.state).leased.insert(sandbox.id().to_owned());
        self.gauges(&pool);
        info!(template = %pool.template.name, sandbox = %id, "sandbox reattached");
        Ok(PoolLease {
            sandbox,
            template: pool.template.name.to_string(),
            tenant: tenant.to_owned(),
            warm: false,
            waited: started.elapsed(),
        })
    }

    /// Destroys another tenant's idle sandbox whose slot a lease took over.
    async fn evict(&self, pool: &TemplatePool, idle: Idle, tenant: &str) {
        self.gauges(pool);
        let id = idle.sandbox.id().to_owned();
        let kept_for = idle.used_by.unwrap_or_default();
        drop(idle.sandbox);
        info!(template = %pool.template.name, sandbox = %id, %kept_for, %tenant, "evicting another tenant's idle sandbox to make room");
        self.inner.metrics.evicted.get_or_create(&pool.labels).inc();
        if let Err(error) = pool.provider.destroy(&id).await {
            warn!(sandbox = %id, %error, "destroying an evicted sandbox failed; the reaper will retry");
        }
    }

    fn leased(
        &self,
        pool: &TemplatePool,
        sandbox: Box<dyn Sandbox>,
        tenant: &str,
        warm: bool,
        started: Instant,
    ) -> PoolLease {
        let waited = self.count_lease(pool, if warm { "hit" } else { "miss" }, started);
        PoolLease {
            sandbox,
            template: pool.template.name.to_string(),
            tenant: tenant.to_owned(),
            warm,
            waited,
        }
    }

    fn count_lease(&self, pool: &TemplatePool, result: &str, started: Instant) -> Duration {
        let waited = started.elapsed();
        let labels = LeaseLabels {
            template: pool.template.name.to_string(),
            result: result.to_owned(),
        };
        self.inner.metrics.leases.get_or_create(&labels).inc();
        self.inner
            .metrics
            .lease_seconds
            .get_or_create(&labels)
            .observe(waited.as_secs_f64());
        waited
    }

    /// Gives a sandbox back: kept idle for the same tenant when the template
    /// says `reuse` and it is healthy, destroyed otherwise.
    pub async fn release(&self, lease: PoolLease) {
        let Ok(pool) = self.template(&lease.template).cloned() else {
            return;
        };
        let id = lease.sandbox.id().to_owned();
        let keep = pool.template.reuse
            && !self.inner.shutdown.is_cancelled()
            && lease.sandbox.health().await.is_ok();
        {
            let mut state = lock(&pool.state);
            state.leased.remove(&id);
            if keep {
                state.idle.push_back(Idle {
                    sandbox: lease.sandbox,
                    used_by: Some(lease.tenant),
                });
                drop(state);
                pool.available.notify_one();
                self.gauges(&pool);
                return;
            }
            state.destroying += 1;
        }
        self.gauges(&pool);
        self.destroy_later(&pool, lease.sandbox);
    }

    async fn create(&self, pool: &TemplatePool) -> Result<Box<dyn Sandbox>, SandboxError> {
        let _permit = pool.create_permits.acquire().await;
        let started = Instant::now();
        // A provider that panics must not leave `creating` counted forever
        // (the template would look full): the panic becomes an error, not
        // retried (a bug, not the infrastructure).
        let created = std::panic::AssertUnwindSafe(pool.provider.create(&pool.template))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                Err(SandboxError::new(
                    SandboxErrorKind::Rejected,
                    format!(
                        "worker bug: the sandbox provider panicked: {}",
                        crate::panic::message(&*panic)
                    ),
                ))
            });
        match created {
            Ok(sandbox) => {
                let took = started.elapsed();
                self.inner
                    .metrics
                    .create_seconds
                    .get_or_create(&pool.labels)
                    .observe(took.as_secs_f64());
                debug!(template = %pool.template.name, sandbox = sandbox.id(), ?took, "sandbox created");
                Ok(sandbox)
            }
            Err(error) => {
                warn!(template = %pool.template.name, %error, "sandbox creation failed");
                self.inner
                    .metrics
                    .create_failures
                    .get_or_create(&pool.labels)
                    .inc();
                Err(error)
            }
        }
    }

    fn destroy_later(&self, pool: &Arc<TemplatePool>, sandbox: Box<dyn Sandbox>) {
        let pool = pool.clone();
        self.inner.tracker.spawn(async move {
            let id = sandbox.id().to_owned();
            drop(sandbox);
            if let Err(error) = pool.provider.destroy(&id).await {
                warn!(sandbox = %id, %error, "destroying a sandbox failed; the reaper will retry");
            }
            lock(&pool.state).destroying -= 1;
            pool.available.notify_one();
            pool.replenish.notify_one();
        });
    }

    fn gauges(&self, pool: &TemplatePool) {
        let (idle, leased) = {
            let state = lock(&pool.state);
            (state.idle.len(), state.leased.len())
        };
        self.inner
            .metrics
            .idle
            .get_or_create(&pool.labels)
            .set(idle as i64);
        self.inner
            .metrics
            .in_use
            .get_or_create(&pool.labels)
            .set(leased as i64);
    }

    /// Keeps `min_idle` sandboxes ready.
    async fn replenish_loop(self, pool: Arc<TemplatePool>) {
        let mut failures = 0u32;
        loop {
            let wanted = {
                let mut state = lock(&pool.state);
                let sizing = &pool.template.pool;
                let have = state.idle.len() + state.creating;
                let room = sizing.max_total.saturating_sub(state.total());
                let wanted = sizing.min_idle.saturating_sub(have).min(room);
                state.creating += wanted;
                wanted
            };
            let mut creates = Vec::with_capacity(wanted);
            for _ in 0..wanted {
                creates.push(self.create(&pool));
            }
            let results = futures::future::join_all(creates).await;
            let mut created_any = false;
            for result in results {
                let mut state = lock(&pool.state);
                state.creating -= 1;
                match result {
                    Ok(sandbox) if !self.inner.shutdown.is_cancelled() => {
                        state.idle.push_back(Idle {
                            sandbox,
                            used_by: None,
                        });
                        created_any = true;
                        drop(state);
                        pool.available.notify_one();
                    }
                    Ok(sandbox) => {
                        state.destroying += 1;
                        drop(state);
                        self.destroy_later(&pool, sandbox);
                    }
                    Err(_) => failures += 1,
                }
            }
            if created_any {
                failures = 0;
            }
            self.gauges(&pool);
            // After failures, back off (capped) before trying again.
            let pause = if failures > 0 {
                Duration::from_millis(200 * 2u64.pow(failures.min(6)))
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = pool.replenish.notified(), if failures == 0 => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Destroys owned sandboxes the pool does not know. An unknown id is
    /// reaped when two passes in a row see it, so a sandbox still being
    /// created (listed by the provider, not yet handed to the pool) survives.
    pub async fn reap(&self, immediately: bool) -> usize {
        let mut known: HashSet<String> = HashSet::new();
        for pool in self.inner.templates.values() {
            let state = lock(&pool.state);
            known.extend(state.leased.iter().cloned());
            known.extend(state.idle.iter().map(|i| i.sandbox.id().to_owned()));
        }
        let mut reaped = 0;
        let mut seen_unknown = HashSet::new();
        for provider in &self.inner.providers {
            let owned = match provider.list_owned().await {
                Ok(owned) => owned,
                Err(error) => {
                    warn!(provider = provider.name(), %error, "reaper cannot list sandboxes");
                    continue;
                }
            };
            for sandbox in owned {
                if known.contains(&sandbox.id) {
                    continue;
                }
                let pool = self.inner.templates.get(sandbox.template.as_str());
                let suspect_before =
                    pool.is_some_and(|p| lock(&p.state).suspects.contains(&sandbox.id));
                // A sandbox that outlives its worker may be a crashed
                // worker's, waiting for its task's redelivery to reattach
                // (ADR 0033): it gets the second pass even at startup.
                let immediately = immediately && !provider.outlives_worker();
                if !(immediately || suspect_before) {
                    seen_unknown.insert((sandbox.template.clone(), sandbox.id.clone()));
                    continue;
                }
                match provider.destroy(&sandbox.id).await {
                    Ok(()) => {
                        reaped += 1;
                        info!(sandbox = %sandbox.id, template = %sandbox.template, "reaped a leaked sandbox");
                        let labels = TemplateLabels {
                            template: sandbox.template.clone(),
                        };
                        self.inner.metrics.reaped.get_or_create(&labels).inc();
                    }
                    Err(error) => warn!(sandbox = %sandbox.id, %error, "reaping failed"),
                }
            }
        }
        for pool in self.inner.templates.values() {
            let mut state = lock(&pool.state);
            state.suspects = seen_unknown
                .iter()
                .filter(|(template, _)| pool.template.name == template.as_str())
                .map(|(_, id)| id.clone())
                .collect();
        }
        reaped
    }

    async fn reap_loop(self, every: Duration) {
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            self.reap(false).await;
        }
    }

    /// Stops replenishing, destroys idle sandboxes and waits (up to `grace`)
    /// for every destroy to finish. Leased sandboxes must be released first.
    pub async fn drain(&self, grace: Duration) {
        self.inner.shutdown.cancel();
        for pool in self.inner.templates.values() {
            let idle: Vec<Idle> = {
                let mut state = lock(&pool.state);
                let idle: Vec<Idle> = state.idle.drain(..).collect();
                state.destroying += idle.len();
                idle
            };
            for entry in idle {
                self.destroy_later(pool, entry.sandbox);
            }
            self.gauges(pool);
        }
        self.inner.tracker.close();
        if tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_err()
        {
            warn!("pool drain deadline passed with destroys still running");
        }
    }
}

/// The pool's locks guard plain bookkeeping with no await inside; a panic
/// while holding one cannot leave it half-updated in a way worth refusing.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
