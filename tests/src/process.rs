//! Shoal's real binaries as child processes of a test: a configuration file on
//! the test's namespace, the process itself (killed when the test ends), and
//! SIGTERM followed by a bounded wait for its exit.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::{binary_path, die_with_test};
use crate::wait::wait_until;
use crate::TestEnv;

/// The `OTEL_*` variables that would send a child's spans elsewhere or change
/// what it samples; removed unless the test sets them again.
const OTEL_VARS: [&str; 6] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
];

/// A TCP port that was free a moment ago, for a child to listen on.
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    probe.local_addr().expect("addr").port()
}

/// Writes `<sandbox root>/<file_name>`: `env`'s namespace and services, its
/// sandbox root, a worker metrics listener on a free port, then `extra`
/// (root-level dotted keys).
pub fn write_config(env: &TestEnv, file_name: &str, extra: &str) -> PathBuf {
    let config = format!(
        "namespace = \"{namespace}\"\n\
         broker.url = \"{broker}\"\n\
         redis.url = \"{redis}\"\n\
         sandbox.root = \"{root}\"\n\
         worker.metrics_listen = \"127.0.0.1:0\"\n{extra}\n",
        namespace = env.settings.namespace,
        broker = env.settings.broker.url,
        redis = env.settings.redis.url,
        root = env.settings.sandbox.root.display(),
    );
    std::fs::create_dir_all(&env.settings.sandbox.root).expect("the sandbox root");
    let path = env.settings.sandbox.root.join(file_name);
    std::fs::write(&path, config).expect("write the config");
    path
}

/// A workspace binary about to be started with `--config <file>`,
/// `RUST_LOG=info`, no `OTEL_*` variables, stdout discarded and stderr on the
/// test's stderr.
pub struct Launch {
    name: String,
    command: tokio::process::Command,
}

impl Launch {
    pub fn new(binary: &str, config: &Path) -> Self {
        let mut command = tokio::process::Command::new(binary_path(binary));
        die_with_test(&mut command)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for var in OTEL_VARS {
            command.env_remove(var);
        }
        Self {
            name: binary.to_owned(),
            command,
        }
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// Sends stderr to a new file at `log` instead.
    pub fn stderr_to(mut self, log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("create the log file");
        self.command.stderr(Stdio::from(file));
        self
    }

    /// Discards stderr too.
    pub fn quiet(mut self) -> Self {
        self.command.stderr(Stdio::null());
        self
    }

    pub fn spawn(mut self) -> ChildProcess {
        let child = self
            .command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name));
        ChildProcess {
            name: self.name,
            child,
        }
    }
}

/// A running Shoal binary; killed (SIGKILL) when dropped.
pub struct ChildProcess {
    name: String,
    child: tokio::process::Child,
}

impl ChildProcess {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends SIGTERM: the binary's graceful shutdown.
    pub fn sigterm(&self) {
        let pid = self
            .child
            .id()
            .unwrap_or_else(|| panic!("{} has already exited", self.name));
        let pid = Pid::from_raw(i32::try_from(pid).expect("a pid fits in i32"));
        kill(pid, Signal::SIGTERM).unwrap_or_else(|e| panic!("SIGTERM to {}: {e}", self.name));
    }

    /// Waits at most `timeout` for the process to exit; `None` if it is
    /// still running then.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()?;
        Some(status.unwrap_or_else(|e| panic!("wait for {}: {e}", self.name)))
    }

    /// Whether the process is still running, without waiting.
    pub fn is_running(&mut self) -> bool {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("try_wait for {}: {e}", self.name))
            .is_none()
    }
}

/// Polls `<url>/readyz` until it answers a success status (at most 120 s).
pub async fn wait_ready(url: &str) {
    let client = reqwest::Client::new();
    let readyz = format!("{url}/readyz");
    wait_until(
        &format!("{readyz} to answer ready"),
        Duration::from_secs(120),
        || {
            let request = client.get(&readyz).send();
            async move { request.await.ok().filter(|r| r.status().is_success()) }
        },
    )
    .await;
}

/// Runs `shoal --server <server> <args>` to its end (at most 120 s), with no
/// `SHOAL_SERVER`/`SHOAL_TOKEN` from the environment and no terminal on
/// stdin.
pub async fn run_shoal(server: &str, args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(binary_path("shoal"));
    command
        .arg("--server")
        .arg(server)
        .args(args)
        .env_remove("SHOAL_SERVER")
        .env_remove("SHOAL_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    die_with_test(&mut command);
    tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("shoal {args:?} did not finish within 120 s"))
        .expect("run shoal")
}
