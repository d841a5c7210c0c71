//! Owner folders of the local provider under one `sandbox.root`, against
//! real bubblewrap: a starting provider reaps dead owners (their lock is
//! free) and never a live one, however the starts interleave (RELIABILITY.md,
//! known failure 4: a worker restarted under its id was taken for dead while
//! it reaped its own folder, and a second worker starting then removed the
//! sandboxes it was creating).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_shared::settings::Settings;
use shoal_worker::sandbox::{ExecRequest, LocalProvider, Sandbox, SandboxProvider};
use tokio_util::sync::CancellationToken;

/// A sandbox root and uid range of one test's own.
struct Area {
    toml: String,
    settings: Settings,
}

impl Area {
    fn new(name: &str) -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let root = std::env::temp_dir()
            .join("shoal-test-sandboxes")
            .join(format!("owners-{name}-{}", &id[id.len() - 8..]));
        let slot = u32::from_str_radix(&id[id.len() - 4..], 16).unwrap_or(0) % 2000;
        let uid_base = 2_200_000 + slot * 64;
        let toml = format!(
            "sandbox.root = \"{}\"\nsandbox.uid_base = {uid_base}\nsandbox.uid_count = 64\n\
             [sandbox.templates.default]\nmin_idle = 0\nworkspace_mb = 16\ntmp_mb = 8\nlimit_processes = 64\n",
            root.display()
        );
        let settings = Settings::from_toml(&toml).expect("settings");
        Self { toml, settings }
    }

    fn root(&self) -> &Path {
        &self.settings.sandbox.root
    }

    async fn provider(&self, owner: &str) -> LocalProvider {
        LocalProvider::new(self.settings.sandbox.clone(), owner)
            .await
            .unwrap_or_else(|e| panic!("provider {owner}: {e}"))
    }

    async fn sandbox(&self, provider: &LocalProvider) -> Box<dyn Sandbox> {
        provider
            .create(&self.settings.sandbox.templates["default"])
            .await
            .expect("create")
    }

    /// Live processes whose real uid is in this area's range.
    fn live_processes(&self) -> Vec<u32> {
        let sandbox = &self.settings.sandbox;
        let range = sandbox.uid_base..sandbox.uid_base + sandbox.uid_count;
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
                continue;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
            };
            let uid = field("Uid:")
                .and_then(|l| l.split_whitespace().next()?.parse::<u32>().ok())
                .filter(|u| range.contains(u));
            let zombie = field("State:").is_some_and(|s| s.starts_with('Z'));
            if let (Some(uid), false) = (uid, zombie) {
                found.push(uid);
            }
        }
        found
    }

    /// Uid claims in the host-wide claim folder for this area's range.
    fn uid_claims(&self) -> Vec<u32> {
        let sandbox = &self.settings.sandbox;
        (sandbox.uid_base..sandbox.uid_base + sandbox.uid_count)
            .filter(|uid| sandbox.uid_dir.join(uid.to_string()).exists())
            .collect()
    }
}

async fn runs_commands(sandbox: &dyn Sandbox) -> bool {
    sandbox
        .exec(
            &ExecRequest::new("echo alive", Duration::from_secs(30)),
            &CancellationToken::new(),
        )
        .await
        .is_ok_and(|out| out.exit_code == Some(0) && out.stdout.text().trim() == "alive")
}

/// Where a sandbox's cgroup would be, under either layout.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    ["shoal", "memory/shoal", "pids/shoal"]
        .iter()
        .map(|base| Path::new("/sys/fs/cgroup").join(base).join(id))
        .collect()
}

/// The chaos suite's case, many times: a worker restarted under its id
/// (its folder still holds sandboxes and an identity file naming its dead
/// predecessor) starts and creates a sandbox, while another worker starts
/// and reaps dead owners. The restarted worker's sandbox must survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_provider_never_reaps_a_live_owners_sandboxes() {
    let area = Area::new("race");
    let mut survivors: Vec<(Arc<LocalProvider>, Box<dyn Sandbox>)> = Vec::new();
    for round in 0..20 {
        let owner = format!("live-{round}");
        // The predecessor: sandboxes left behind by a crash, and its
        // identity file naming a process that is gone (in this test the
        // process lives on, so the file is rewritten to say otherwise).
        let predecessor = area.provider(&owner).await;
        for _ in 0..2 {
            std::mem::forget(area.sandbox(&predecessor).await);
        }
        let owner_dir = predecessor.owner_dir().to_owned();
        drop(predecessor);
        std::fs::write(owner_dir.join("owner"), "999999999 1").expect("dead identity");

        let settings = area.settings.sandbox.clone();
        let template = area.settings.sandbox.templates["default"].clone();
        let restarted = tokio::spawn(async move {
            let provider = Arc::new(
                LocalProvider::new(settings, &owner)
                    .await
                    .expect("restarted provider"),
            );
            let sandbox = provider.create(&template).await;
            (provider, sandbox)
        });
        let settings = area.settings.sandbox.clone();
        let other = tokio::spawn(async move {
            LocalProvider::new(settings, &format!("other-{round}"))
                .await
                .expect("other provider")
        });
        let (restarted, other) = (restarted.await.expect("join"), other.await.expect("join"));
        let (provider, sandbox) = restarted;
        let sandbox = sandbox.unwrap_or_else(|e| {
            panic!("round {round}: the restarted provider could not create a sandbox: {e}")
        });
        assert!(
            runs_commands(&*sandbox).await,
            "round {round}: the live provider's sandbox {} no longer runs commands",
            sandbox.id()
        );
        drop(other);
        survivors.push((provider, sandbox));
    }
    // Every later start left the live ones alone.
    for (round, (provider, sandbox)) in survivors.iter().enumerate() {
        assert!(
            provider.owner_dir().join(sandbox.id()).exists(),
            "round {round}: sandbox folder {} removed by a later start",
            sandbox.id()
        );
        assert!(
            runs_commands(&**sandbox).await,
            "round {round}: sandbox {} no longer runs commands after later starts",
            sandbox.id()
        );
    }
    for (provider, sandbox) in survivors {
        let id = sandbox.id().to_owned();
        drop(sandbox);
        provider.destroy(&id).await.expect("destroy");
    }
    let _ = std::fs::remove_dir_all(area.root());
}

/// The child half of the next test: run only when its parent sets the
/// variable; starts a provider, leaves a sandbox with a detached process
/// running, says so and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_provider_that_gets_killed() {
    let Ok(toml) = std::env::var("SHOAL_OWNERS_CHILD_SETTINGS") else {
        return;
    };
    let settings = Settings::from_toml(&toml).expect("settings");
    let provider = LocalProvider::new(settings.sandbox.clone(), "doomed")
        .await
        .expect("provider");
    let sandbox = provider
        .create(&settings.sandbox.templates["default"])
        .await
        .expect("create");
    // A persistent shell keeps its processes (an exec's die with it).
    let shell = sandbox.shell().await.expect("shell");
    let out = shell
        .run(
            "(setsid sleep 1000 &) ; sleep 1000 &",
            Duration::from_secs(30),
            Duration::from_secs(2),
            &CancellationToken::new(),
        )
        .await
        .expect("run");
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    println!("SANDBOX-READY {}", sandbox.id());
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// A child process that does not outlive a failed test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A worker SIGKILLed with a sandbox is reaped by the next start of another
/// owner: its processes, folder, cgroup, uid claim and lock file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_is_reaped_by_the_next_start() {
    let area = Area::new("killed");
    let mut child = KillOnDrop(
        std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "child_provider_that_gets_killed", "--nocapture"])
            .env("SHOAL_OWNERS_CHILD_SETTINGS", &area.toml)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("child"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let id = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix("SANDBOX-READY ").map(str::to_owned))
    })
    .await
    .expect("join")
    .expect("the child made no sandbox (it exited first)");
    let doomed_dir = area.root().join("doomed");
    assert!(doomed_dir.join(&id).exists());
    assert!(!area.live_processes().is_empty(), "no sandbox process runs");
    assert!(!area.uid_claims().is_empty(), "no uid claimed");
    // While the child lives, a start leaves it alone.
    let bystander = area.provider("bystander").await;
    assert!(doomed_dir.join(&id).exists(), "a live owner was reaped");
    drop(bystander);

    child.0.kill().expect("SIGKILL");
    child.0.wait().expect("wait");
    let next = area.provider("next").await;
    assert!(
        !doomed_dir.exists(),
        "the dead owner's folder {} survived the reaper",
        doomed_dir.display()
    );
    for dir in cgroup_dirs(&id) {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    assert!(
        !area.root().join(".locks/doomed").exists(),
        "the dead owner's lock file was left"
    );
    // The kill sweep is synchronous; a generous bound for /proc to settle.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !area.live_processes().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        area.live_processes().is_empty(),
        "sandbox processes left: {:?}",
        area.live_processes()
    );
    assert!(
        area.uid_claims().is_empty(),
        "uid claims left: {:?}",
        area.uid_claims()
    );
    drop(next);
    let _ = std::fs::remove_dir_all(area.root());
}

/// A second provider with the same owner name while the first lives waits
/// for it, then fails clearly; the first's sandbox is untouched. Once the
/// first is gone, a waiting start goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_provider_with_a_live_owners_name_waits_then_fails() {
    let area = Area::new("same");
    let first = area.provider("same").await;
    let sandbox = area.sandbox(&first).await;
    let error = match LocalProvider::with_owner_wait(
        area.settings.sandbox.clone(),
        "same",
        Duration::from_millis(300),
    )
    .await
    {
        Ok(_) => panic!("a second provider took a live owner's name"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("another worker with id \"same\"") && error.contains("worker.id"),
        "{error}"
    );
    assert!(
        runs_commands(&*sandbox).await,
        "the live owner's sandbox was harmed by the refused start"
    );

    // A restart that waits while the old process exits.
    let settings = area.settings.sandbox.clone();
    let waiting = tokio::spawn(async move {
        LocalProvider::with_owner_wait(settings, "same", Duration::from_secs(60)).await
    });
    let id = sandbox.id().to_owned();
    std::mem::forget(sandbox);
    drop(first);
    let second = waiting
        .await
        .expect("join")
        .expect("the start goes through once the owner is free");
    assert!(
        !second.owner_dir().join(&id).exists(),
        "the predecessor's sandbox was not reaped by the restart"
    );
    drop(second);
    let _ = std::fs::remove_dir_all(area.root());
}

/// An owner name that cannot be a folder is refused with a clear error.
#[tokio::test]
async fn an_owner_name_that_is_not_a_folder_name_is_refused() {
    let area = Area::new("names");
    for bad in ["", ".locks", "a/b"] {
        let error = match LocalProvider::new(area.settings.sandbox.clone(), bad).await {
            Ok(_) => panic!("owner {bad:?} accepted"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains("worker id"), "{error}");
    }
    let _ = std::fs::remove_dir_all(area.root());
}
