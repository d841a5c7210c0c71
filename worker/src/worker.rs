use crate::metrics::{KubeMetrics, TaskMetrics};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shoal_shared::broker::{connect_and_declare, Broker, Topology};
use shoal_shared::settings::Settings;
use shoal_shared::store::Store;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::consumer::Slot;
use crate::fair::Fair;
use crate::health::{Dependencies, HealthServer, Phase};
use crate::heartbeat::Heartbeat;
use crate::kube::{run_updater, CostSink, PodPatcher, PodTarget, TargetError, Timing};
use crate::pool::{Pool, PoolMetrics};
use crate::run::TaskRunner;
use crate::sandbox::daytona::{DaytonaConfig, DaytonaProvider};
use crate::sandbox::{LocalProvider, ProviderKind, SandboxProvider};
use crate::wake::Wake;
use prometheus_client::registry::Registry;

/// A running worker's parts, built by [`Worker::connect`].
pub struct Worker {
    settings: Settings,
    broker: Broker,
    topology: Topology,
    runner: Arc<TaskRunner>,
    pool: Pool,
    registry: Arc<Registry>,
    /// Starting -> Running -> Draining, for `/readyz` and the cost updater.
    phase: watch::Sender<Phase>,
    /// `/metrics`, `/healthz`, `/readyz`; serves until the worker is dropped.
    http: Option<HealthServer>,
    /// The number of running tasks.
    busy: watch::Receiver<usize>,
    kube_metrics: KubeMetrics,
    /// Where the pod-deletion cost goes, when it is kept (docs/adr/0022).
    deletion_cost: Option<(Arc<dyn CostSink>, Timing)>,
}

/// How often the pool's reaper looks for leaked sandboxes.
const REAP_EVERY: Duration = Duration::from_secs(60);

/// Connects, then runs until `shutdown` is cancelled and the drain is over.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    Worker::connect(settings).await?.run(shutdown).await
}

impl Worker {
    /// Connects to Redis and RabbitMQ (waiting up to a minute for each) and
    /// declares the topology.
    ///
    /// `/healthz` answers (and `/readyz` says `starting`) from the start, so
    /// a liveness probe does not kill a worker that waits for its services.
    pub async fn connect(settings: Settings) -> anyhow::Result<Self> {
        let mut registry = Registry::default();
        let pool_metrics = PoolMetrics::new(&mut registry);
        let task_metrics =
            TaskMetrics::with_tenants(&mut registry, &settings.worker.metric_tenants);
        let kube_metrics = KubeMetrics::new(&mut registry);
        let registry = Arc::new(registry);
        let phase = watch::Sender::new(Phase::Starting);
        let http = match settings.worker.metrics_listen {
            Some(addr) => HealthServer::start(addr, registry.clone(), phase.subscribe()).await,
            None => None,
        };
        let store = Store::connect(&settings.redis, &settings.namespace)
            .await
            .context("connecting to redis")?;
        let (broker, topology) = connect_and_declare(
            &settings,
            &format!("shoal-worker {}", settings.worker.id),
            Duration::from_secs(60),
        )
        .await
        .context("connecting to rabbitmq and declaring the topology")?;
        // A provider is built only when a template uses it: a Daytona-only
        // worker needs no sandbox directory, uid range or launcher.
        let wants_local = settings
            .sandbox
            .templates
            .values()
            .any(|t| t.provider == ProviderKind::Local);
        let local: Option<Arc<dyn SandboxProvider>> = if wants_local {
            Some(Arc::new(
                LocalProvider::new(settings.sandbox.clone(), &settings.worker.id)
                    .await
                    .context("preparing the sandbox directory")?,
            ))
        } else {
            None
        };
        let mut providers: Vec<Arc<dyn SandboxProvider>> = local.iter().cloned().collect();
        let wants_daytona = settings
            .sandbox
            .templates
            .values()
            .any(|t| t.provider == ProviderKind::Daytona);
        let daytona: Option<Arc<dyn SandboxProvider>> = if wants_daytona {
            // One owner label per fleet (namespace): any worker may reap what a
            // dead one leaked, and never another fleet's sandboxes.
            let owner = format!("shoal-{}", settings.namespace);
            let config = DaytonaConfig::from_settings(&settings.daytona, owner).with_context(|| {
                format!(
                    "a sandbox template uses daytona: set {} (and [daytona] api_url or DAYTONA_API_URL)",
                    settings.daytona.api_key_env
                )
            })?;
            let provider = DaytonaProvider::new(config)
                .context("configuring the Daytona provider")?
                .with_templates(settings.sandbox.templates.values());
            let provider: Arc<dyn SandboxProvider> = Arc::new(provider);
            providers.push(provider.clone());
            Some(provider)
        } else {
            None
        };
        let templates = settings
            .sandbox
            .templates
            .values()
            .filter_map(|t| {
                let provider = match t.provider {
                    ProviderKind::Daytona => daytona.clone(),
                    ProviderKind::Local => local.clone(),
                };
                // Built above for every kind a template names.
                provider.map(|provider| (t.clone(), provider))
            })
            .collect();
        if let Some(http) = &http {
            http.connected(Dependencies {
                store: store.clone(),
                broker: broker.clone(),
            });
        }
        let busy = task_metrics.busy();
        task_metrics.flow.set_slots(settings.worker.slots);
        let deletion_cost = if settings.worker.pod_deletion_cost {
            pod_patcher_from_env(&kube_metrics).map(|sink| (sink, Timing::default()))
        } else {
            None
        };
        let pool = Pool::start_with(providers, templates, pool_metrics, REAP_EVERY).await;
        let runner = Arc::new(TaskRunner::new(
            store,
            pool.clone(),
            settings.clone(),
            task_metrics,
        ));
        Ok(Self {
            settings,
            broker,
            topology,
            runner,
            pool,
            registry,
            phase,
            http,
            busy,
            kube_metrics,
            deletion_cost,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served (the real port
    /// when `worker.metrics_listen` has port 0); `None` when off or unbound.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(HealthServer::addr)
    }

    /// Keeps the deletion cost of `target`'s pod at `timing`'s pace, whatever
    /// `worker.pod_deletion_cost` and the environment say: for tests and
    /// embedders outside a pod.
    pub fn with_pod_deletion_cost(
        mut self,
        target: PodTarget,
        timing: Timing,
    ) -> anyhow::Result<Self> {
        let patcher = PodPatcher::new(target, self.kube_metrics.clone())
            .context("configuring the pod-deletion-cost updater")?;
        self.deletion_cost = Some((Arc::new(patcher), timing));
        Ok(self)
    }

    /// The worker's Prometheus metrics (pool and tasks), as `/metrics` serves
    /// them: for tests and embedders that keep the worker in-process.
    pub fn metrics(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Runs the slots until `shutdown`, then drains: no new tasks; running ones
    /// get `drain_timeout` to finish, after which they are stopped and requeued.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let slots = self.settings.worker.slots;
        info!(worker = %self.settings.worker.id, slots, namespace = %self.settings.namespace, "worker started");
        let abort = CancellationToken::new();
        let updater_stop = CancellationToken::new();
        let updater = self.deletion_cost.clone().map(|(sink, timing)| {
            tokio::spawn(run_updater(
                sink,
                self.busy.clone(),
                self.phase.subscribe(),
                timing,
                updater_stop.clone(),
            ))
        });
        // The fleet view (`shoal workers`): beats until the drain is over,
        // then deletes itself.
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(
            Heartbeat::new(
                self.runner.store.clone(),
                self.settings.worker.id.to_string(),
                slots,
                self.settings.worker.heartbeat_interval,
                self.runner.activity.clone(),
                self.runner.metrics.clone(),
                self.pool.clone(),
                self.settings
                    .sandbox
                    .templates
                    .keys()
                    .map(|name| name.to_string())
                    .collect(),
                self.phase.subscribe(),
            )
            .run(heartbeat_stop.clone()),
        );
        // Idle slots wait for a ring, a busier slot, or the sweep
        // (docs/adr/0031).
        let wake = Wake::new(self.broker.clone(), &self.topology);
        let tracker = TaskTracker::new();
        // Tenants' lanes in weighted fair turns (docs/adr/0041).
        let fair = Fair::for_topology(&self.topology);
        for index in 0..slots {
            let slot = Slot {
                index,
                broker: self.broker.clone(),
                topology: self.topology.clone(),
                runner: self.runner.clone(),
                wake: wake.clone(),
                fair: fair.clone(),
            };
            tracker.spawn(slot.run(shutdown.clone(), abort.clone()));
        }
        tracker.spawn(wake.clone().listen(shutdown.clone()));
        tracker.spawn(wake.sweep(self.settings.worker.idle_sweep, shutdown.clone()));
        tracker.close();
        self.phase.send_replace(Phase::Running);

        shutdown.cancelled().await;
        // Not ready from here on; the cost updater sends the load at once.
        self.phase.send_replace(Phase::Draining);
        let grace = self.settings.worker.drain_timeout;
        info!(
            grace_s = grace.as_secs(),
            "draining: no new tasks, waiting for running ones"
        );
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!("drain deadline passed; stopping and requeueing running tasks");
            abort.cancel();
            // Bounded too: a slot stuck on a broker that never answers must
            // not keep the process from exiting (its message is redelivered
            // when the connection goes).
            if tokio::time::timeout(ABORT_WAIT, tracker.wait())
                .await
                .is_err()
            {
                error!(
                    wait_s = ABORT_WAIT.as_secs(),
                    "slots still busy after the abort; stopping without them"
                );
            }
        }
        updater_stop.cancel();
        if let Some(updater) = updater {
            let _ = updater.await;
        }
        self.pool.drain(POOL_DRAIN).await;
        heartbeat_stop.cancel();
        if tokio::time::timeout(HEARTBEAT_DELETE, heartbeat)
            .await
            .is_err()
        {
            warn!("the worker heartbeat was not deleted in time; it expires by itself");
        }
        // `/healthz` answers to the end of the drain, so a liveness probe
        // never kills a draining worker.
        drop(self.http);
        self.broker.close().await;
        info!("worker stopped");
        Ok(())
    }
}

/// How long the heartbeat gets to be deleted at the end of a drain.
const HEARTBEAT_DELETE: Duration = Duration::from_secs(15);
/// The longest the worker waits for its slots after the drain deadline's abort.
const ABORT_WAIT: Duration = Duration::from_secs(15);

/// How long sandboxes get to be destroyed after the tasks are settled.
/// Part of the grace a pod needs beyond `worker.drain_timeout_s`
/// (docs/adr/0022).
pub const POOL_DRAIN: Duration = Duration::from_secs(30);

/// The deletion-cost patcher the environment describes, when the worker runs
/// in a pod; `None` (with the reason logged) otherwise. Never fatal: the
/// annotation only orders scale-in.
fn pod_patcher_from_env(metrics: &KubeMetrics) -> Option<Arc<dyn CostSink>> {
    let target = match PodTarget::from_env() {
        Ok(target) => target,
        Err(TargetError::NotInPod) => {
            tracing::debug!("not in a pod: the pod-deletion-cost updater is off");
            return None;
        }
        Err(error) => {
            warn!(%error, "the pod-deletion-cost updater is off");
            return None;
        }
    };
    match PodPatcher::new(target.clone(), metrics.clone()) {
        Ok(patcher) => {
            info!(pod = %target.pod, namespace = %target.namespace, api = %target.api_url,
                "keeping the pod-deletion-cost annotation in step with the load");
            Some(Arc::new(patcher))
        }
        Err(error) => {
            warn!(%error, "the pod-deletion-cost updater is off");
            None
        }
    }
}
