use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use redis::AsyncCommands;
use shoal_shared::broker::{Broker, Topology};
use shoal_shared::settings::Settings;
use shoal_shared::store::Store;
use shoal_shared::task::{TaskId, TaskRecord, TaskState};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::wait::wait_until;

/// The environment variables `make test` exports from `.local/env`.
const BROKER_ENV: &str = "SHOAL__BROKER__URL";
const REDIS_ENV: &str = "SHOAL__REDIS__URL";

fn service_url(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: the tests need the real RabbitMQ and Redis. \
             Run them with `make test` (or `make up` and `set -a; . .local/env; set +a`)."
        )
    })
}

/// One test's private slice of the real services, plus the Shoal processes it
/// started. Call [`TestEnv::teardown`] at the end of every test.
pub struct TestEnv {
    pub settings: Settings,
    pub store: Store,
    pub broker: Broker,
    pub topology: Topology,
    sandbox_root: PathBuf,
    tasks: Vec<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    /// In-process workers' metrics registries, by worker id.
    metrics: Vec<(
        String,
        std::sync::Arc<prometheus_client::registry::Registry>,
    )>,
    config_toml: String,
}

impl TestEnv {
    /// A fresh namespace on the shared services. `extra_toml` is appended to the
    /// generated configuration as root-level dotted keys (for example
    /// `"worker.drain_timeout_s = 1"`).
    pub async fn new(test: &str, extra_toml: &str) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let namespace = format!("t-{}-{}", &test[..test.len().min(20)], &id[id.len() - 10..])
            .to_lowercase()
            .replace(|c: char| !(c.is_ascii_alphanumeric() || c == '-'), "-");
        let sandbox_root = std::env::temp_dir()
            .join("shoal-test-sandboxes")
            .join(&namespace);
        // Writable by us alone (the provider refuses anything else);
        // traversable, as bubblewrap runs as the sandbox's uid.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o711)
            .create(&sandbox_root)
            .expect("create the sandbox root");
        let config_toml = format!(
            "namespace = \"{namespace}\"\n\
             broker.url = \"{broker}\"\n\
             redis.url = \"{redis}\"\n\
             sandbox.root = \"{root}\"\n\
             worker.idle_sweep_ms = 50\n\
             worker.metrics_listen = \"127.0.0.1:0\"\n",
            broker = service_url(BROKER_ENV),
            redis = service_url(REDIS_ENV),
            root = sandbox_root.display(),
        );
        let settings = Settings::from_toml(&merge_toml(&config_toml, extra_toml))
            .expect("test settings are valid");
        let store = Store::connect(&settings.redis, &settings.namespace)
            .await
            .expect("redis is reachable");
        let broker = Broker::new(&settings.broker.url, &format!("shoal-test {namespace}"));
        let topology = Topology::from_settings(&settings);
        let channel = broker
            .channel_with_retry(Duration::from_secs(30))
            .await
            .expect("rabbitmq is reachable");
        topology.declare(&channel).await.expect("declare topology");
        Self {
            settings,
            store,
            broker,
            topology,
            sandbox_root,
            tasks: Vec::new(),
            metrics: Vec::new(),
            config_toml: merge_toml(&config_toml, extra_toml),
        }
    }

    /// Starts a scheduler in this process on a free port; returns its base URL.
    pub async fn start_scheduler(&mut self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a port");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let token = CancellationToken::new();
        let settings = self.settings.clone();
        let handle = tokio::spawn(shoal_scheduler::run(settings, listener, token.clone()));
        self.tasks.push((token, handle));
        let client = reqwest::Client::new();
        wait_until("the scheduler to be ready", Duration::from_secs(30), || {
            let request = client.get(format!("{url}/readyz")).send();
            async move { request.await.ok().filter(|r| r.status().is_success()) }
        })
        .await;
        url
    }

    /// Starts a worker in this process with `slots` slots and id `id`.
    pub async fn start_worker(&mut self, id: &str, slots: usize) -> CancellationToken {
        let mut settings = self.settings.clone();
        settings.worker.id = shoal_shared::Name::parse(id).expect("a test worker id is a name");
        settings.worker.slots = slots;
        let token = CancellationToken::new();
        let worker = shoal_worker::Worker::connect(settings)
            .await
            .expect("worker connects");
        self.metrics.push((id.to_owned(), worker.metrics()));
        let handle = tokio::spawn(worker.run(token.clone()));
        self.tasks.push((token.clone(), handle));
        token
    }

    /// What the in-process worker `id` would serve on `/metrics`.
    pub fn worker_metrics(&self, id: &str) -> String {
        let (_, registry) = self
            .metrics
            .iter()
            .find(|(worker, _)| worker == id)
            .unwrap_or_else(|| panic!("no in-process worker {id}"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    }

    /// Waits until the in-process worker `id`'s metric `name{labels}` equals
    /// `expected` (counters move just after the terminal state is stored),
    /// then returns the whole metrics text.
    pub async fn wait_worker_metric(
        &self,
        id: &str,
        name: &str,
        labels: &[(&str, &str)],
        expected: f64,
    ) -> String {
        wait_until(
            &format!("{name} {labels:?} = {expected} on worker {id}"),
            Duration::from_secs(10),
            || async {
                let text = self.worker_metrics(id);
                (metric_value(&text, name, labels) == Some(expected)).then_some(text)
            },
        )
        .await
    }

    /// Starts the real `shoal-worker` binary as a child process.
    pub fn spawn_worker_process(
        &self,
        id: &str,
        slots: usize,
        drain_timeout_s: u64,
    ) -> WorkerProcess {
        let binary = binary_path("shoal-worker");
        let config = self.sandbox_root.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            merge_toml(
                &self.config_toml,
                &format!(
                    "worker.id = \"{id}\"\nworker.slots = {slots}\nworker.drain_timeout_s = {drain_timeout_s}\n"
                ),
            ),
        )
        .expect("write worker config");
        let mut command = tokio::process::Command::new(&binary);
        let child = die_with_test(&mut command)
            .arg("--config")
            .arg(&config)
            .env_remove(BROKER_ENV)
            .env_remove(REDIS_ENV)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        WorkerProcess { child }
    }

    /// The task's record, which must exist.
    pub async fn record(&self, id: &TaskId) -> TaskRecord {
        self.store
            .get(id)
            .await
            .expect("redis get")
            .unwrap_or_else(|| panic!("task {id} has no record"))
    }

    /// Waits until the task is in a terminal state and returns its record.
    pub async fn wait_terminal(&self, id: &TaskId, timeout: Duration) -> TaskRecord {
        let store = self.store.clone();
        wait_until(&format!("task {id} to finish"), timeout, || {
            let store = store.clone();
            let id = *id;
            async move {
                store
                    .get(&id)
                    .await
                    .ok()
                    .flatten()
                    .filter(|r| r.state.is_terminal())
            }
        })
        .await
    }

    /// Waits until the task is in `state`.
    pub async fn wait_state(&self, id: &TaskId, state: TaskState, timeout: Duration) -> TaskRecord {
        let store = self.store.clone();
        wait_until(&format!("task {id} to be {state}"), timeout, || {
            let store = store.clone();
            let id = *id;
            async move {
                store
                    .get(&id)
                    .await
                    .ok()
                    .flatten()
                    .filter(|r| r.state == state)
            }
        })
        .await
    }

    /// Publishes raw bytes straight to a work queue, bypassing the scheduler.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        let channel = self.broker.channel().await.expect("channel");
        channel
            .confirm_select(Default::default())
            .await
            .expect("confirm mode");
        channel
            .basic_publish(
                self.topology.work_exchange().as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        let _ = channel.close(200, "done".into()).await;
    }

    /// Messages ready in `queue` (unacked ones are not counted).
    pub async fn ready_count(&self, queue: &str) -> u32 {
        let channel = self.broker.channel().await.expect("channel");
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = channel.close(200, "done".into()).await;
        declared.message_count()
    }

    /// Empties the work queues, for tests that queue tasks with no worker to
    /// run them (teardown checks the queues are empty). Returns how many
    /// messages were dropped.
    pub async fn purge_work_queues(&self) -> u32 {
        let channel = self.broker.channel().await.expect("channel");
        let mut purged = 0;
        for queue in shoal_shared::Priority::ALL
            .into_iter()
            .flat_map(|p| self.topology.work_queues(p))
        {
            purged += channel
                .queue_purge(
                    queue.as_str().into(),
                    lapin::options::QueuePurgeOptions::default(),
                )
                .await
                .expect("purge");
        }
        let _ = channel.close(200, "done".into()).await;
        purged
    }

    /// Stops every Shoal process this env started and checks nothing was left
    /// behind, then deletes the namespace's queues and keys.
    pub async fn teardown(mut self) {
        for (token, _) in &self.tasks {
            token.cancel();
        }
        for (_, handle) in self.tasks.drain(..) {
            let result = tokio::time::timeout(Duration::from_secs(90), handle)
                .await
                .expect("a shoal process did not stop within 90 s")
                .expect("a shoal process panicked");
            result.expect("a shoal process failed");
        }
        // With every consumer gone, an unacked message would be back in its queue.
        for queue in shoal_shared::Priority::ALL
            .into_iter()
            .flat_map(|p| self.topology.work_queues(p))
        {
            assert_eq!(
                self.ready_count(&queue).await,
                0,
                "messages left in {queue}"
            );
        }
        let mut conn = self.store.connection();
        let leases: Vec<String> = conn
            .keys(format!("{}:task:*:lease", self.settings.namespace))
            .await
            .expect("redis keys");
        assert!(leases.is_empty(), "leases left behind: {leases:?}");
        let processes = sandbox_processes(&self.sandbox_root);
        assert!(
            processes.is_empty(),
            "sandbox processes left behind: {processes:?}"
        );
        let leftovers = workspaces(&self.sandbox_root);
        assert!(
            leftovers.is_empty(),
            "workspaces left behind: {leftovers:?}"
        );

        let channel = self.broker.channel().await.expect("channel");
        for queue in self.topology.all_queues() {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in self.topology.all_exchanges() {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
        let keys: Vec<String> = conn.keys(self.store.keys().pattern()).await.expect("keys");
        if !keys.is_empty() {
            let _: () = conn.del(keys).await.expect("del");
        }
        self.broker.close().await;
        let _ = std::fs::remove_dir_all(&self.sandbox_root);
    }
}

/// A `shoal-worker` child process.
pub struct WorkerProcess {
    child: tokio::process::Child,
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("worker is running")
    }

    /// Sends SIGTERM (via `kill`, to stay free of unsafe code).
    pub async fn terminate(&self) {
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// SIGKILL: the crash case.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill -9 the worker");
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait(mut self, timeout: Duration) -> Option<i32> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("worker did not exit in time")
            .expect("wait for worker")
            .code()
    }
}

/// Joins configuration fragments written as root-level dotted keys
/// (`worker.slots = 2`), which TOML lets us simply concatenate; a key of
/// `extra` replaces the same key's line of `base` (TOML refuses a key set
/// twice), e.g. a test's own `worker.idle_sweep_ms`.
fn merge_toml(base: &str, extra: &str) -> String {
    let key = |line: &str| line.split('=').next().map(|k| k.trim().to_owned());
    let overridden: Vec<String> = extra
        .lines()
        .filter(|line| line.contains('='))
        .filter_map(key)
        .collect();
    let base: String = base
        .lines()
        .filter(|line| !line.contains('=') || !key(line).is_some_and(|k| overridden.contains(&k)))
        .map(|line| format!("{line}\n"))
        .collect();
    format!("{base}\n{extra}\n")
}

/// The value of the sample `name{labels…}` in Prometheus text, where every
/// `label="value"` pair given appears among the sample's labels.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (label_part, value) = match rest.strip_prefix('{') {
            Some(rest) => rest.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(k, v)| {
                label_part
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            })
            .then(|| value.trim().parse().ok())?
    })
}

/// Makes `command`'s child die (SIGKILL) when the test that started it dies,
/// even when the test is killed (a timeout) and `kill_on_drop` never runs: a
/// fleet binary must not outlive its test and keep consuming from the
/// broker. Spawn from the test's runtime threads: the signal follows the
/// thread that forked.
pub fn die_with_test(command: &mut tokio::process::Command) -> &mut tokio::process::Command {
    // SAFETY: `set_pdeathsig` is one prctl(2) call, async-signal-safe, as
    // required between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        })
    }
}

/// Path of a workspace binary next to the test executable's `deps/` folder.
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let binary = dir.join(name);
    assert!(
        binary.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; `make test` does)",
        binary.display()
    );
    binary
}

/// Processes whose command line mentions `root` (sandboxes of this test).
fn sandbox_processes(root: &Path) -> Vec<String> {
    let needle = root.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie = std::fs::read_to_string(path.join("stat"))
            .map(|stat| {
                stat.split(") ")
                    .nth(1)
                    .is_some_and(|rest| rest.starts_with('Z'))
            })
            .unwrap_or(false);
        if cmdline.contains(&needle) && !zombie && !cmdline.contains(".toml") {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// Workspace directories still present under `root`.
fn workspaces(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(owners) = std::fs::read_dir(root) else {
        return found;
    };
    for owner in owners.flatten().filter(|e| e.path().is_dir()) {
        if let Ok(sandboxes) = std::fs::read_dir(owner.path()) {
            found.extend(sandboxes.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    found
}
