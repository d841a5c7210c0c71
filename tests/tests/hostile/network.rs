//! Items 1 and 8 of issue 17: a fetch made for a task, and a network-enabled
//! sandbox, reach neither the host's loopback services nor the host's own or
//! private addresses, unless the template names them (ADR 0014).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_shared::settings::Settings;
use shoal_shared::template::Template;
use shoal_worker::sandbox::{
    ExecRequest, LocalProvider, Sandbox, SandboxErrorKind, SandboxProvider,
};
use tokio_util::sync::CancellationToken;

/// A provider with a `default` template (no network), a `net` template
/// (network) and, when given, an `allowed` template that may reach `allow`.
struct Fixture {
    provider: LocalProvider,
    settings: Settings,
}

impl Fixture {
    async fn new(owner: &str, allow: Option<IpAddr>) -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let root = std::env::temp_dir()
            .join("shoal-test-sandboxes")
            .join(format!("net-{owner}-{}", &id[id.len() - 8..]));
        let slot = u32::from_str_radix(&id[id.len() - 4..], 16).unwrap_or(0) % 2000;
        let uid_base = 600_000 + slot * 16;
        let limits = "workspace_mb = 64\ntmp_mb = 16\nlimit_processes = 64\nmin_idle = 0\n";
        // Uid claims go to the host-wide default directory, where every
        // test process's providers see each other's claims.
        let mut toml = format!(
            "sandbox.root = \"{}\"\n\
             sandbox.uid_base = {uid_base}\nsandbox.uid_count = 16\n\
             [sandbox.templates.default]\n{limits}\
             [sandbox.templates.net]\nnetwork = true\n{limits}",
            root.display(),
        );
        if let Some(ip) = allow {
            toml.push_str(&format!(
                "[sandbox.templates.allowed]\nnetwork = true\nnetwork_allow = [\"{ip}\"]\n{limits}"
            ));
        }
        let settings = Settings::from_toml(&toml).expect("settings");
        let provider = LocalProvider::new(settings.sandbox.clone(), owner)
            .await
            .expect("provider");
        Self { provider, settings }
    }

    fn template(&self, name: &str) -> Template {
        self.settings.sandbox.templates[name].clone()
    }

    async fn sandbox(&self, template: &str) -> Box<dyn Sandbox> {
        self.provider
            .create(&self.template(template))
            .await
            .expect("create")
    }

    /// Destroys `sandbox` and checks its namespace and slirp4netns are gone.
    async fn destroy(&self, sandbox: Box<dyn Sandbox>) {
        let id = sandbox.id().to_owned();
        drop(sandbox);
        self.provider.destroy(&id).await.expect("destroy");
        assert_no_network_left(&id);
    }

    fn finish(self) {
        let _ = std::fs::remove_dir_all(&self.settings.sandbox.root);
    }
}

fn netns_path(id: &str) -> PathBuf {
    Path::new("/run/netns").join(format!("shoal-{id}"))
}

fn assert_no_network_left(id: &str) {
    assert!(
        !netns_path(id).exists(),
        "network namespace of {id} left behind"
    );
    let needle = netns_path(id).display().to_string();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'));
        assert!(
            zombie || !String::from_utf8_lossy(&cmdline).contains(&needle),
            "slirp4netns of {id} left running (pid {:?})",
            entry.file_name()
        );
    }
}

/// A listener that counts the connections it accepts.
struct Listener {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    async fn bind(addr: &str) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((_stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The host's first non-loopback IPv4 address, if it has one.
fn host_ipv4() -> Option<IpAddr> {
    let output = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next()?.parse::<IpAddr>().ok())
        .next()
}

async fn sh(sandbox: &dyn Sandbox, command: &str) -> shoal_worker::sandbox::ExecOutput {
    sandbox
        .exec(
            &ExecRequest::new(command, Duration::from_secs(30)),
            &CancellationToken::new(),
        )
        .await
        .expect("exec")
}

/// One TCP connection attempt from inside the sandbox; true if it connected.
async fn connects(sandbox: &dyn Sandbox, host: &str, port: u16) -> bool {
    let output = sh(
        sandbox,
        &format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port}' && echo connected"),
    )
    .await;
    output.stdout.text().contains("connected")
}

/// The attack that was reproduced: `repo.url` naming a host loopback port
/// reached the listener, because the clone ran with the network on even for
/// templates without network.
#[tokio::test]
async fn a_clone_of_a_host_loopback_url_never_reaches_the_host() {
    let fixture = Fixture::new("clone-loopback", None).await;
    let listener = Listener::bind("127.0.0.1:0").await;
    let port = listener.port();

    // No network in the template: no clone at all, whatever the URL.
    let offline = fixture.sandbox("default").await;
    let error = offline
        .git_clone(&format!("http://127.0.0.1:{port}/x.git"), None, "repo")
        .await
        .expect_err("a template without network cannot clone");
    assert_eq!(error.kind, SandboxErrorKind::Rejected);
    assert!(error.message.contains("no network"), "{}", error.message);
    fixture.destroy(offline).await;

    // With network: every spelling of a local target is refused up front.
    let online = fixture.sandbox("net").await;
    for url in [
        format!("http://127.0.0.1:{port}/x.git"),
        format!("http://2130706433:{port}/x.git"),
        format!("http://0x7f.0.0.1:{port}/x.git"),
        format!("http://[::ffff:127.0.0.1]:{port}/x.git"),
        format!("http://localhost:{port}/x.git"),
        format!("http://10.0.2.2:{port}/x.git"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "file:///etc/passwd".to_owned(),
        "--upload-pack=touch /tmp/pwned".to_owned(),
    ] {
        let error = online
            .git_clone(&url, None, "repo")
            .await
            .expect_err("refused");
        assert_eq!(error.kind, SandboxErrorKind::Rejected, "{url}");
    }
    fixture.destroy(online).await;
    assert_eq!(listener.accepted(), 0, "a clone reached the host listener");
    fixture.finish();
}

/// Network-enabled sandboxes shared the host's network namespace: code in
/// them reached Redis, RabbitMQ and the worker's metrics on loopback, and
/// anything bound to the host's addresses.
#[tokio::test]
async fn a_network_sandbox_reaches_no_host_service_but_what_its_template_allows() {
    let host_ip = host_ipv4();
    let fixture = Fixture::new("egress", host_ip).await;
    let everywhere = Listener::bind("0.0.0.0:0").await;
    let port = everywhere.port();

    let sandbox = fixture.sandbox("net").await;
    let interfaces = sh(sandbox.as_ref(), "cat /proc/net/dev")
        .await
        .stdout
        .text();
    assert!(
        interfaces.contains("tap0"),
        "not in its own namespace: {interfaces}"
    );
    for host in ["127.0.0.1", "10.0.2.2", "169.254.169.254"] {
        assert!(
            !connects(sandbox.as_ref(), host, port).await,
            "reached {host}:{port}"
        );
    }
    if let Some(ip) = host_ip {
        assert!(
            !connects(sandbox.as_ref(), &ip.to_string(), port).await,
            "reached the host's own address {ip}:{port}"
        );
    }
    fixture.destroy(sandbox).await;
    assert_eq!(everywhere.accepted(), 0, "a sandbox reached the host");

    // The control: the same connection works where the template allows it,
    // so the refusals above are the rules, not a broken network.
    match host_ip {
        Some(ip) => {
            let allowed = fixture.sandbox("allowed").await;
            assert!(
                connects(allowed.as_ref(), &ip.to_string(), port).await,
                "the allowed address {ip} was not reachable"
            );
            assert!(
                !connects(allowed.as_ref(), "127.0.0.1", port).await,
                "loopback reachable from the allowed template"
            );
            fixture.destroy(allowed).await;
            assert_eq!(everywhere.accepted(), 1);
        }
        None => eprintln!("no global IPv4 address on this host: the allow-list control is skipped"),
    }
    fixture.finish();
}

/// A git repository served over git's "dumb" HTTP protocol from a directory.
async fn serve_repo(dir: PathBuf) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::StatusCode;
    async fn file(
        State(dir): State<Arc<PathBuf>>,
        UrlPath(path): UrlPath<String>,
    ) -> Result<Vec<u8>, StatusCode> {
        if path.split('/').any(|part| part == "..") {
            return Err(StatusCode::BAD_REQUEST);
        }
        tokio::fs::read(dir.join(path))
            .await
            .map_err(|_| StatusCode::NOT_FOUND)
    }
    let app = axum::Router::new()
        .route("/{*path}", axum::routing::get(file))
        .with_state(Arc::new(dir));
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

fn git(dir: &Path, args: &[&str]) {
    let status = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .status()
        .expect("git");
    assert!(status.success(), "git {args:?}");
}

/// The clone still works where the template allows the target: through the
/// sandbox's own namespace, not the host's.
#[tokio::test]
async fn a_clone_reaches_an_allowed_private_host_and_nothing_else() {
    let Some(host_ip) = host_ipv4() else {
        eprintln!("no global IPv4 address on this host: nothing to allow");
        return;
    };
    let fixture = Fixture::new("clone-allowed", Some(host_ip)).await;
    let work = tempdir("clone-src");
    std::fs::write(work.join("README"), "hello from the served repository\n").unwrap();
    git(&work, &["init", "--quiet", "--initial-branch=main"]);
    git(&work, &["add", "README"]);
    git(&work, &["commit", "--quiet", "-m", "first"]);
    let served = tempdir("clone-served");
    git(
        &served,
        &[
            "clone",
            "--quiet",
            "--bare",
            work.to_str().unwrap(),
            "repo.git",
        ],
    );
    git(&served.join("repo.git"), &["update-server-info"]);
    let (addr, server) = serve_repo(served.clone()).await;

    let url = format!("http://{host_ip}:{}/repo.git", addr.port());
    let allowed = fixture.sandbox("allowed").await;
    allowed
        .git_clone(&url, Some("main"), "repo")
        .await
        .expect("clone from the allowed host");
    let readme = allowed.read_file("repo/README").await.expect("README");
    assert_eq!(readme, b"hello from the served repository\n");
    fixture.destroy(allowed).await;

    let other = fixture.sandbox("net").await;
    let error = other
        .git_clone(&url, Some("main"), "repo")
        .await
        .expect_err("not allowed for this template");
    assert_eq!(error.kind, SandboxErrorKind::Rejected);
    fixture.destroy(other).await;

    server.abort();
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&served);
    fixture.finish();
}

/// A worker that died with live sandboxes: the next one with the same name
/// removes their namespaces, and no slirp4netns outlives its worker's pipe.
#[tokio::test]
async fn a_dead_workers_sandbox_networks_are_reaped() {
    let fixture = Fixture::new("net-reap", None).await;
    let sandbox = fixture.sandbox("net").await;
    let id = sandbox.id().to_owned();
    assert!(
        netns_path(&id).exists(),
        "no namespace for a network sandbox"
    );
    drop(sandbox);
    let Fixture { provider, settings } = fixture;
    // The crash: the provider goes away without destroying anything.
    drop(provider);
    let provider = LocalProvider::new(settings.sandbox.clone(), "net-reap")
        .await
        .expect("restart");
    assert_no_network_left(&id);
    assert!(provider.list_owned().await.expect("list").is_empty());
    Fixture { provider, settings }.finish();
}

fn tempdir(name: &str) -> PathBuf {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let dir = std::env::temp_dir().join(format!("shoal-{name}-{}", &id[id.len() - 10..]));
    std::fs::create_dir_all(&dir).expect("tempdir");
    dir
}

/// The reproduced attack end to end: an agent task whose `repo.url` names a
/// host loopback port, run by a real worker. It fails at once with the
/// reason (no retry burns attempts), and nothing connects to the listener.
#[tokio::test]
async fn an_agent_task_cloning_a_loopback_url_fails_without_touching_the_host() {
    use shoal_scheduler::client::Client;
    use shoal_shared::task::{AgentSpec, TaskKind, TaskSpec, TaskState};
    use shoal_tests::llm_sim::{LlmSim, Script, Turn};
    use shoal_tests::TestEnv;

    let listener = Listener::bind("127.0.0.1:0").await;
    let (sim_url, sim) = LlmSim::start(Script::turns([Turn::tool_call(
        "finish",
        serde_json::json!({"message": "done"}),
    )]))
    .await;
    let mut env = TestEnv::new(
        "clone-loopback-task",
        &format!(
            "models.sim.provider = \"openai\"\nmodels.sim.base_url = \"{sim_url}\"\n\
             models.sim.model = \"sim-model\"\n"
        ),
    )
    .await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let mut agent: AgentSpec = serde_json::from_value(serde_json::json!({
        "prompt": "look at the repository",
        "repo": {"url": format!("http://127.0.0.1:{}/secrets.git", listener.port())},
    }))
    .expect("spec");
    agent.model = "sim".into();
    let mut spec = TaskSpec::new(TaskKind::Agent(agent));
    spec.max_attempts = 3;
    let record = client.submit(&spec, None).await.expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Failed);
    let error = done.last_error.unwrap_or_default();
    assert!(error.contains("no network"), "{error}");
    assert_eq!(done.attempts, 1, "a refused clone is not retried");
    assert_eq!(listener.accepted(), 0, "the clone reached the host");
    assert_eq!(
        sim.requests().len(),
        0,
        "the conversation ran without its repository"
    );
    env.teardown().await;
}
