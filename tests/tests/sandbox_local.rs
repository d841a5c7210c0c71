//! The local bubblewrap provider against real bubblewrap: the Sandbox
//! contract, the persistent shell, and containment of hostile commands.

use std::time::{Duration, Instant};

use shoal_tests::local_fixture::LocalFixture;
use shoal_worker::sandbox::{
    ExecRequest, LocalProvider, Sandbox, SandboxErrorKind, SandboxProvider,
};
use tokio_util::sync::CancellationToken;

/// A provider with its own root and its own uid range, so tests run in
/// parallel without seeing each other's sandboxes or processes.
struct Fixture(LocalFixture);

impl Fixture {
    async fn new(owner: &str) -> Self {
        Self::with(owner, "", "").await
    }

    /// A fixture with extra `[sandbox]` keys and extra keys for its template.
    async fn with(owner: &str, sandbox_extra: &str, template_extra: &str) -> Self {
        Self(
            LocalFixture::with_keys(
                "local",
                owner,
                400_000,
                sandbox_extra,
                &format!("workspace_mb = 64\ntmp_mb = 16\nlimit_processes = 64\n{template_extra}"),
            )
            .await,
        )
    }

    async fn sandbox(&self) -> Box<dyn Sandbox> {
        self.0.sandbox().await
    }

    fn uid_range(&self) -> std::ops::Range<u32> {
        let sandbox = &self.0.settings.sandbox;
        sandbox.uid_base..sandbox.uid_base + sandbox.uid_count
    }

    /// Processes whose real uid is in this fixture's range.
    fn live_processes(&self) -> Vec<String> {
        let range = self.uid_range();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
                continue;
            };
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|u| u.parse::<u32>().ok());
            let zombie = status
                .lines()
                .find_map(|l| l.strip_prefix("State:"))
                .is_some_and(|s| s.trim().starts_with('Z'));
            if uid.is_some_and(|u| range.contains(&u)) && !zombie {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        found
    }

    /// Destroys `sandbox` and checks nothing of it is left.
    async fn destroy(&self, sandbox: Box<dyn Sandbox>) {
        let id = sandbox.id().to_owned();
        drop(sandbox);
        self.0.provider.destroy(&id).await.expect("destroy");
        let dir = self.0.provider.owner_dir().join(&id);
        assert!(!dir.exists(), "workspace {} left behind", dir.display());
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        assert!(!mounts.contains(&id), "mount of {id} left behind");
        assert_no_cgroup(&id);
    }

    async fn finish(self) {
        let processes = self.live_processes();
        assert!(
            processes.is_empty(),
            "sandbox processes left behind: {processes:?}"
        );
        let owned = self.0.provider.list_owned().await.expect("list");
        assert!(owned.is_empty(), "sandboxes left behind: {owned:?}");
        let _ = std::fs::remove_dir_all(self.0.root());
    }
}

/// Where a sandbox's cgroup would be, under either layout.
fn cgroup_dirs(id: &str) -> Vec<std::path::PathBuf> {
    ["shoal", "memory/shoal", "pids/shoal"]
        .iter()
        .map(|base| std::path::Path::new("/sys/fs/cgroup").join(base).join(id))
        .collect()
}

fn assert_no_cgroup(id: &str) {
    for dir in cgroup_dirs(id) {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
}

async fn sh(
    sandbox: &dyn Sandbox,
    command: &str,
    timeout_s: u64,
) -> shoal_worker::sandbox::ExecOutput {
    sandbox
        .exec(
            &ExecRequest::new(command, Duration::from_secs(timeout_s)),
            &CancellationToken::new(),
        )
        .await
        .expect("exec")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_separates_streams_and_reports_the_exit_code() {
    let fixture = Fixture::new("exec").await;
    let sandbox = fixture.sandbox().await;
    let output = sh(&*sandbox, "echo out; echo err >&2; exit 7", 10).await;
    assert_eq!(output.exit_code, Some(7));
    assert_eq!(output.stdout.text(), "out\n");
    assert_eq!(output.stderr.text(), "err\n");
    let mut request = ExecRequest::new("pwd; echo $GREETING", Duration::from_secs(10));
    sandbox
        .write_file("sub/dir/keep", b"")
        .await
        .expect("mkdir");
    request.cwd = Some("sub/dir".into());
    request.env.insert("GREETING".into(), "hello".into());
    let output = sandbox
        .exec(&request, &CancellationToken::new())
        .await
        .expect("exec");
    assert_eq!(output.stdout.text(), "/workspace/sub/dir\nhello\n");
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_round_trip_and_list() {
    let fixture = Fixture::new("files").await;
    let sandbox = fixture.sandbox().await;
    sandbox
        .write_file("a/b/c.txt", b"hello")
        .await
        .expect("write");
    sandbox.write_file("top.txt", b"x").await.expect("write");
    assert_eq!(
        sandbox.read_file("a/b/c.txt").await.expect("read"),
        b"hello"
    );
    // Written by the host, usable by the sandbox's uid.
    let output = sh(
        &*sandbox,
        "cat a/b/c.txt && echo more >> a/b/c.txt && cat a/b/c.txt",
        10,
    )
    .await;
    assert_eq!(output.stdout.text(), "hellohellomore\n");
    let listing = sandbox.list_files("").await.expect("list");
    let names: Vec<(String, bool)> = listing.iter().map(|e| (e.name.clone(), e.is_dir)).collect();
    assert_eq!(
        names,
        [("a".to_owned(), true), ("top.txt".to_owned(), false)]
    );
    let missing = sandbox.read_file("nope.txt").await.unwrap_err();
    assert_eq!(missing.kind, SandboxErrorKind::NoSuchFile);
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_checks_out_a_branch() {
    let fixture = Fixture::new("git").await;
    let sandbox = fixture.sandbox().await;
    let setup = "git init -q -b main src && cd src && echo v1 > f && git add f && \
                 git -c user.email=t@t -c user.name=t commit -qm one && git branch -q feature && \
                 echo v2 > f && git -c user.email=t@t -c user.name=t commit -qam two";
    let output = sh(&*sandbox, setup, 30).await;
    assert_eq!(output.exit_code, Some(0), "{}", output.stderr.text());
    sandbox
        .git_clone("/workspace/src", Some("feature"), "dest")
        .await
        .expect("clone");
    assert_eq!(sandbox.read_file("dest/f").await.expect("read"), b"v1\n");
    let error = sandbox
        .git_clone("/workspace/missing", None, "other")
        .await
        .unwrap_err();
    assert!(error.message.contains("git clone failed"), "{error}");
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_keeps_cwd_and_exports_and_obeys_c_c() {
    let fixture = Fixture::new("shell").await;
    let sandbox = fixture.sandbox().await;
    let shell = sandbox.shell().await.expect("shell");
    let cancel = CancellationToken::new();
    let (long, quiet) = (Duration::from_secs(30), Duration::from_secs(10));
    let out = shell
        .run(
            "mkdir -p deep/er && cd deep/er && export FOO=bar",
            long,
            quiet,
            &cancel,
        )
        .await
        .expect("run");
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    let out = shell
        .run("pwd\necho $FOO\nfalse", long, quiet, &cancel)
        .await
        .expect("run");
    assert_eq!(out.output, "/workspace/deep/er\nbar\n");
    assert_eq!(out.exit_code, Some(1));
    assert_eq!(out.cwd.as_deref(), Some("/workspace/deep/er"));

    // A command that goes quiet comes back as still running; C-c stops it.
    let out = shell
        .run(
            "echo begin; sleep 100; echo never",
            long,
            Duration::from_secs(1),
            &cancel,
        )
        .await
        .expect("run");
    assert!(out.still_running, "{out:?}");
    assert_eq!(out.output, "begin\n");
    let busy = shell
        .run("echo hi", long, quiet, &cancel)
        .await
        .unwrap_err();
    assert_eq!(busy.kind, SandboxErrorKind::Rejected);
    let out = shell
        .send_input("\u{3}", Duration::from_secs(5))
        .await
        .expect("C-c");
    assert_eq!(out.exit_code, Some(130), "{out:?}");
    assert!(!out.output.contains("never"));

    // A hard timeout interrupts, and the shell stays usable.
    let started = Instant::now();
    let out = shell
        .run(
            "sleep 100",
            Duration::from_secs(1),
            Duration::from_secs(30),
            &cancel,
        )
        .await
        .expect("run");
    assert!(out.timed_out, "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(6));
    let out = shell
        .run("echo $FOO", long, quiet, &cancel)
        .await
        .expect("run");
    assert_eq!(out.output, "bar\n");
    drop(shell);
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outside_the_workspace_is_writable() {
    let fixture = Fixture::new("ro").await;
    let sandbox = fixture.sandbox().await;
    let marker = format!("shoal-escape-{}", uuid::Uuid::now_v7().simple());
    let script = format!(
        "for p in /usr/{m} /{m} /etc/{m} /bin/{m} /proc/{m}; do touch $p 2>/dev/null && echo wrote $p; done; \
         touch /workspace/ok /tmp/ok && echo inside-ok",
        m = marker
    );
    let output = sh(&*sandbox, &script, 10).await;
    assert_eq!(
        output.stdout.text(),
        "inside-ok\n",
        "stderr: {}",
        output.stderr.text()
    );
    for host in ["/usr", "/", "/etc", "/bin"] {
        assert!(!std::path::Path::new(host).join(&marker).exists());
    }
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_api_refuses_traversal_and_planted_symlinks() {
    let fixture = Fixture::new("traversal").await;
    let sandbox = fixture.sandbox().await;
    for path in [
        "../escape",
        "a/../../escape",
        "/etc/passwd",
        "../../../../etc/passwd",
    ] {
        let error = sandbox.write_file(path, b"x").await.unwrap_err();
        assert_eq!(error.kind, SandboxErrorKind::Path, "{path}: {error}");
        let error = sandbox.read_file(path).await.unwrap_err();
        assert_eq!(error.kind, SandboxErrorKind::Path, "{path}: {error}");
    }
    let output = sh(
        &*sandbox,
        "ln -s /etc/passwd passwd && ln -s / root && ln -s .. up",
        10,
    )
    .await;
    assert_eq!(output.exit_code, Some(0));
    // The links resolve inside the sandbox's own root, not the host's, and
    // the host side refuses to follow them out of the workspace.
    for path in ["passwd", "root/etc/hostname", "up/fs/workspace/passwd"] {
        let error = sandbox.read_file(path).await.unwrap_err();
        assert_eq!(error.kind, SandboxErrorKind::Path, "{path}: {error}");
    }
    let planted = format!("root/tmp/shoal-pwned-{}", uuid::Uuid::now_v7().simple());
    let error = sandbox.write_file(&planted, b"x").await.unwrap_err();
    assert_eq!(error.kind, SandboxErrorKind::Path);
    assert!(!std::path::Path::new("/").join(&planted[5..]).exists());
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_environment_and_processes_are_invisible() {
    let fixture = Fixture::new("env").await;
    let canary = format!("canary-{}", uuid::Uuid::now_v7().simple());
    // The worker's own environment holds secrets such as API keys.
    std::env::set_var("SHOAL_TEST_SECRET_CANARY", &canary);
    let sandbox = fixture.sandbox().await;
    let output = sh(
        &*sandbox,
        "env; cat /proc/1/environ; cat /proc/self/environ; for f in /proc/[0-9]*/environ; do cat $f; done 2>/dev/null; \
         echo; ls /proc | grep -c '^[0-9]'",
        10,
    )
    .await;
    let text = output.stdout.text();
    assert!(
        !text.contains(&canary),
        "the worker's environment leaked: {text}"
    );
    assert!(!text.contains("SHOAL__"), "worker settings leaked: {text}");
    let visible: u32 = text
        .lines()
        .last()
        .unwrap_or("99")
        .trim()
        .parse()
        .unwrap_or(99);
    assert!(
        visible < 10,
        "the sandbox sees {visible} processes: not its own pid namespace"
    );
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_reaches_a_host_listener() {
    let fixture = Fixture::new("net").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let sandbox = fixture.sandbox().await;
    let output = sh(
        &*sandbox,
        &format!(
            "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3); print('connected')\""
        ),
        20,
    )
    .await;
    assert_ne!(output.exit_code, Some(0));
    assert!(!output.stdout.text().contains("connected"));
    let accepted = tokio::time::timeout(Duration::from_millis(500), listener.accept()).await;
    assert!(accepted.is_err(), "the host listener accepted a connection");
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_launcher_is_a_clear_startup_error() {
    let settings = shoal_shared::settings::Settings::from_toml(
        "sandbox.launcher = \"/nonexistent/shoal-sandbox-exec\"\n\
         sandbox.root = \"/tmp/shoal-test-sandboxes/no-launcher\"\n",
    )
    .expect("settings");
    let error = match LocalProvider::new(settings.sandbox, "no-launcher").await {
        Ok(_) => panic!("a provider without its launcher started"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("shoal-sandbox-exec not found"), "{error}");
    assert!(error.contains("/nonexistent/shoal-sandbox-exec"), "{error}");
    let _ = std::fs::remove_dir_all("/tmp/shoal-test-sandboxes/no-launcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_capped_for_the_sandbox_as_a_whole() {
    // `required`: on a host without cgroups this fails instead of passing
    // on rlimits alone.
    let fixture = Fixture::with(
        "memory",
        "sandbox.cgroups = \"required\"\n",
        "limit_memory_mb = 96\n",
    )
    .await;
    let sandbox = fixture.sandbox().await;
    let id = sandbox.id().to_owned();
    assert!(
        cgroup_dirs(&id).iter().any(|dir| dir.exists()),
        "sandbox {id} has no cgroup"
    );
    // One process of 48 MiB fits...
    let hog = "python3 -c 'import time; b = b\"x\" * (48 << 20); time.sleep(2); print(len(b))'";
    let one = sh(&*sandbox, hog, 60).await;
    assert_eq!(one.exit_code, Some(0), "{one:?}");
    assert_eq!(one.stdout.text(), format!("{}\n", 48 << 20));
    assert!(!one.memory_exceeded, "{one:?}");
    // ...three at once do not, though each is far below its 4 GiB rlimit:
    // the kernel kills within the sandbox, and only there.
    let three = sh(
        &*sandbox,
        &format!(
            "pids=''; for i in 1 2 3; do {hog} >/dev/null & pids=\"$pids $!\"; done; \
             k=0; for p in $pids; do wait $p || k=$((k+1)); done; echo killed=$k"
        ),
        60,
    )
    .await;
    let killed: u32 = three
        .stdout
        .text()
        .trim()
        .strip_prefix("killed=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{three:?}"));
    assert!(
        killed >= 1,
        "three 48 MiB processes all fit in 96 MiB: {three:?}"
    );
    assert!(three.memory_exceeded, "{three:?}");
    // The persistent shell (the agent's terminal) says so too.
    let shell = sandbox.shell().await.expect("shell");
    let cancel = CancellationToken::new();
    let minute = Duration::from_secs(60);
    let quiet = shell
        .run("echo small", minute, minute, &cancel)
        .await
        .expect("run");
    assert!(!quiet.memory_exceeded, "{quiet:?}");
    let big = shell
        .run(
            "python3 -c 'b = b\"x\" * (200 << 20)'",
            minute,
            minute,
            &cancel,
        )
        .await
        .expect("run");
    assert_eq!(big.exit_code, Some(137), "{big:?}");
    assert!(big.memory_exceeded, "{big:?}");
    drop(shell);
    // The sandbox itself carries on.
    let after = sh(&*sandbox, "echo alive", 10).await;
    assert_eq!(after.stdout.text(), "alive\n");
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_contained_and_other_sandboxes_keep_working() {
    let fixture = Fixture::new("forkbomb").await;
    let bomb = fixture.sandbox().await;
    let neighbour = fixture.sandbox().await;
    let request = ExecRequest::new(
        "bomb() { bomb | bomb & }; bomb; sleep 10",
        Duration::from_secs(4),
    );
    let cancel = CancellationToken::new();
    let bombing = bomb.exec(&request, &cancel);
    let neighbourly = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        sh(&*neighbour, "echo alive", 10).await
    };
    let (bombed, alive) = tokio::join!(bombing, neighbourly);
    let bombed = bombed.expect("exec");
    assert!(bombed.timed_out || bombed.exit_code.is_some());
    assert_eq!(alive.exit_code, Some(0));
    assert_eq!(alive.stdout.text(), "alive\n");
    fixture.destroy(bomb).await;
    fixture.destroy(neighbour).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_the_disk_stops_at_the_workspace_cap() {
    let fixture = Fixture::new("disk").await;
    let sandbox = fixture.sandbox().await;
    let output = sh(
        &*sandbox,
        "dd if=/dev/zero of=big bs=1M count=500; df -m /workspace | tail -1",
        60,
    )
    .await;
    assert_ne!(output.exit_code, None);
    assert!(
        output.stderr.text().contains("No space left"),
        "{}",
        output.stderr.text()
    );
    let size = std::fs::metadata(
        fixture
            .0
            .provider
            .owner_dir()
            .join(sandbox.id())
            .join("fs/workspace/big"),
    )
    .expect("big file")
    .len();
    assert!(size <= 80 << 20, "wrote {size} bytes past an 80 MiB cap");
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_of_output_is_capped_and_counted() {
    let fixture = Fixture::new("flood").await;
    let sandbox = fixture.sandbox().await;
    let output = sh(&*sandbox, "head -c 1000000000 /dev/zero", 120).await;
    assert_eq!(output.exit_code, Some(0));
    assert_eq!(output.stdout.bytes.len(), 1 << 20);
    assert_eq!(output.stdout.total, 1_000_000_000);
    assert!(output.stdout.truncated());
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_ignoring_sigterm_is_killed_at_its_timeout() {
    let fixture = Fixture::new("sigterm").await;
    let sandbox = fixture.sandbox().await;
    let started = Instant::now();
    let output = sh(
        &*sandbox,
        "trap '' TERM INT; (trap '' TERM; sleep 1000) & sleep 1000",
        1,
    )
    .await;
    assert!(output.timed_out);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // No process of the command survives (the kernel tears the pid
    // namespace down right after bubblewrap's death; allow it a moment).
    let deadline = Instant::now() + Duration::from_secs(3);
    while !fixture.live_processes().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fixture.live_processes().is_empty(),
        "{:?}",
        fixture.live_processes()
    );
    fixture.destroy(sandbox).await;
    fixture.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_provider_reaps_what_a_crashed_one_left() {
    let first = Fixture::new("crash").await;
    let sandbox = first.sandbox().await;
    let shell = sandbox.shell().await.expect("shell");
    let out = shell
        .run(
            "(setsid sleep 1000 &) ; sleep 1000 &",
            Duration::from_secs(10),
            Duration::from_secs(2),
            &CancellationToken::new(),
        )
        .await
        .expect("run");
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    assert!(!first.live_processes().is_empty());
    let dir = first.0.provider.owner_dir().join(sandbox.id());
    let id = sandbox.id().to_owned();
    // The crash: nothing is destroyed, handles are simply lost.
    std::mem::forget(shell);
    std::mem::forget(sandbox);
    let Fixture(LocalFixture {
        provider,
        settings,
        template,
    }) = first;
    drop(provider);

    // A new process with the same owner name starts and cleans up.
    let second = Fixture(LocalFixture {
        provider: LocalProvider::new(settings.sandbox.clone(), "crash")
            .await
            .expect("provider"),
        settings,
        template,
    });
    assert!(
        !dir.exists(),
        "workspace {} survived the reaper",
        dir.display()
    );
    assert_no_cgroup(&id);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !second.live_processes().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.finish().await;
}
