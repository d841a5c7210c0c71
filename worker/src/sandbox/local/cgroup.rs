//! A cgroup per local sandbox: one memory cap and one process cap for all of
//! its processes together, which rlimits (per process, or per uid) cannot give.
//!
//! Both layouts are handled: the unified v2 hierarchy (`memory.max`,
//! `memory.swap.max`, `pids.max`) and the v1 `memory` and `pids` controllers
//! (`memory.limit_in_bytes`, `pids.max`). Every sandbox gets
//! `<hierarchy>/shoal/<sandbox id>`; every sandbox process enters it (by
//! `shoal-sandbox-exec`) before it drops to the sandbox's uid, so nothing it
//! forks escapes. The provider creates a sandbox's cgroup after writing its
//! directory and removes it before removing the directory, so a cgroup never
//! outlives the record the reaper works from.

use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_shared::template::Limits;

/// The folder under each hierarchy holding the sandboxes' cgroups.
const BASE: &str = "shoal";

/// Which cgroup layout this host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// One unified hierarchy; `dir` is `<root>/shoal`.
    V2 { dir: PathBuf },
    /// Separate controllers; `memory` and `pids` are `<controller>/shoal`.
    V1 { memory: PathBuf, pids: PathBuf },
}

/// The cgroup hierarchies this worker puts its sandboxes in.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
}

impl Cgroups {
    /// Finds the memory and pids controllers under `root` (normally
    /// `/sys/fs/cgroup`) and prepares `shoal/` in them. An error says why
    /// this host cannot give sandboxes a cgroup.
    pub fn detect(root: &Path) -> Result<Self, String> {
        let layout =
            if let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) {
                let has = |name: &str| controllers.split_whitespace().any(|c| c == name);
                if !has("memory") || !has("pids") {
                    return Err(format!(
                        "the cgroup v2 hierarchy at {} lacks the memory or pids controller \
                     (it offers: {})",
                        root.display(),
                        controllers.trim()
                    ));
                }
                let dir = root.join(BASE);
                std::fs::create_dir_all(&dir).map_err(|e| describe(&dir, &e))?;
                // Children may only use the controllers their parent enables.
                let control = dir.join("cgroup.subtree_control");
                std::fs::write(&control, "+memory +pids").map_err(|e| describe(&control, &e))?;
                Layout::V2 { dir }
            } else {
                let memory = root.join("memory");
                let pids = root.join("pids");
                for controller in [&memory, &pids] {
                    if !controller.join("cgroup.procs").is_file() {
                        return Err(format!(
                            "no cgroup v2 hierarchy and no v1 controller at {}",
                            controller.display()
                        ));
                    }
                }
                let (memory, pids) = (memory.join(BASE), pids.join(BASE));
                for dir in [&memory, &pids] {
                    std::fs::create_dir_all(dir).map_err(|e| describe(dir, &e))?;
                }
                Layout::V1 { memory, pids }
            };
        Ok(Self { layout })
    }

    /// `v1` or `v2`, for the startup log.
    pub fn version(&self) -> &'static str {
        match self.layout {
            Layout::V2 { .. } => "v2",
            Layout::V1 { .. } => "v1",
        }
    }

    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2 { dir } => vec![dir.join(id)],
            Layout::V1 { memory, pids } => vec![memory.join(id), pids.join(id)],
        }
    }

    /// Creates the sandbox's cgroup with its limits.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<(), String> {
        let write = |path: PathBuf, value: String| {
            std::fs::write(&path, value).map_err(|e| describe(&path, &e))
        };
        for dir in self.dirs(id) {
            std::fs::create_dir_all(&dir).map_err(|e| describe(&dir, &e))?;
        }
        let pids = limits.processes.to_string();
        match &self.layout {
            Layout::V2 { dir } => {
                let dir = dir.join(id);
                if limits.memory_bytes > 0 {
                    write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
                    // Swap would let a sandbox exceed its cap by paging out.
                    let swap = dir.join("memory.swap.max");
                    if swap.exists() {
                        write(swap, "0".into())?;
                    }
                }
                write(dir.join("pids.max"), pids)?;
            }
            Layout::V1 {
                memory,
                pids: pids_dir,
            } => {
                let dir = memory.join(id);
                if limits.memory_bytes > 0 {
                    write(
                        dir.join("memory.limit_in_bytes"),
                        limits.memory_bytes.to_string(),
                    )?;
                    // Only present when the kernel accounts swap.
                    let swap = dir.join("memory.memsw.limit_in_bytes");
                    if swap.exists() {
                        write(swap, limits.memory_bytes.to_string())?;
                    }
                }
                write(pids_dir.join(id).join("pids.max"), pids)?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a sandbox process writes its pid to (the
    /// launcher does, as root, before it becomes the sandbox's uid).
    pub fn procs_files(&self, id: &str) -> Vec<PathBuf> {
        self.dirs(id)
            .into_iter()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    /// How many processes the kernel has killed in the sandbox for reaching
    /// its memory cap (v1 `memory.oom_control`, v2 `memory.events`: the
    /// `oom_kill` line); 0 when unreadable.
    pub fn oom_kills(&self, id: &str) -> u64 {
        let file = match &self.layout {
            Layout::V2 { dir } => dir.join(id).join("memory.events"),
            Layout::V1 { memory, .. } => memory.join(id).join("memory.oom_control"),
        };
        std::fs::read_to_string(file)
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Removes the sandbox's cgroup once its processes are gone (killed just
    /// before; a dying process can hold it for a moment). Missing is fine.
    pub async fn remove(&self, id: &str) -> Result<(), String> {
        for dir in self.dirs(id) {
            let mut attempts = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if attempts < 100 => {
                        attempts += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(describe(&dir, &e)),
                }
            }
        }
        Ok(())
    }
}

/// Tells whether the kernel killed something in one sandbox for memory
/// while a command ran: read before, compare after.
#[derive(Debug, Clone)]
pub struct OomWatch {
    pub cgroups: Cgroups,
    pub id: String,
}

impl OomWatch {
    pub fn count(&self) -> u64 {
        self.cgroups.oom_kills(&self.id)
    }
}

fn describe(path: &Path, error: &std::io::Error) -> String {
    format!("{}: {error}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory standing in for cgroupfs, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            let dir = std::env::temp_dir()
                .join(format!("shoal-cgroup-{}", uuid::Uuid::now_v7().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn v1_and_v2_layouts_are_told_apart() {
        let root = Scratch::new();
        // Neither layout: a clear reason.
        let error = Cgroups::detect(root.path()).unwrap_err();
        assert!(error.contains("no cgroup v2 hierarchy"), "{error}");
        // v2 without the pids controller is refused with what it offers.
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory io\n").unwrap();
        let error = Cgroups::detect(root.path()).unwrap_err();
        assert!(error.contains("offers: cpu memory io"), "{error}");
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let cgroups = Cgroups::detect(root.path()).unwrap();
        assert_eq!(cgroups.version(), "v2");
        let control = root.path().join("shoal/cgroup.subtree_control");
        assert_eq!(std::fs::read_to_string(control).unwrap(), "+memory +pids");
        // A plain directory stands in for cgroupfs: the limits land in the
        // v2 files, with swap off where the file exists.
        let limits = Limits {
            memory_bytes: 64 << 20,
            processes: 32,
            ..Limits::default()
        };
        let sandbox = root.path().join("shoal/sb-1");
        std::fs::create_dir_all(&sandbox).unwrap();
        std::fs::write(sandbox.join("memory.swap.max"), "max").unwrap();
        cgroups.create("sb-1", &limits).unwrap();
        let read = |name: &str| std::fs::read_to_string(sandbox.join(name)).unwrap();
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "32");
        // No file yet: no kills.
        assert_eq!(cgroups.oom_kills("sb-1"), 0);
        std::fs::write(
            sandbox.join("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(cgroups.oom_kills("sb-1"), 2);
    }

    #[test]
    fn v1_sandboxes_join_both_controllers() {
        let root = Scratch::new();
        for controller in ["memory", "pids"] {
            std::fs::create_dir_all(root.path().join(controller)).unwrap();
            std::fs::write(root.path().join(controller).join("cgroup.procs"), "").unwrap();
        }
        let cgroups = Cgroups::detect(root.path()).unwrap();
        assert_eq!(cgroups.version(), "v1");
        assert_eq!(
            cgroups.procs_files("sb-2"),
            [
                root.path().join("memory/shoal/sb-2/cgroup.procs"),
                root.path().join("pids/shoal/sb-2/cgroup.procs"),
            ]
        );
    }
}
