//! The command line that puts a process inside a local sandbox:
//! `shoal-sandbox-exec --uid --rlimits [--cgroup]... -- bwrap <namespaces,
//! mounts, env> -- <program>`, started as root; the launcher joins the
//! sandbox's cgroups, sets the rlimits and becomes the sandbox's uid before
//! bubblewrap runs.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use shoal_shared::template::Template;

/// Everything that describes one sandbox's view of the world.
pub struct Jail<'a> {
    /// `shoal-sandbox-exec`.
    pub launcher: &'a Path,
    pub bwrap: &'a Path,
    /// The sandbox's own host uid (and gid).
    pub uid: u32,
    /// `cgroup.procs` files of the sandbox's cgroups; empty without cgroups.
    pub cgroups: Vec<PathBuf>,
    pub template: &'a Template,
    /// Host directory holding `workspace/` and `tmp/` (a size-capped tmpfs).
    pub fs_dir: PathBuf,
    pub network: bool,
    /// The sandbox's own network namespace and resolver file, for a network
    /// that reaches only what its egress rules allow (ADR 0014); `None`
    /// shares the host's network when `network` is set.
    pub netns: Option<(PathBuf, PathBuf)>,
    /// A new session detaches from any terminal (TIOCSTI protection); the
    /// persistent shell needs its pty as controlling terminal, so it keeps one.
    pub new_session: bool,
}

const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

impl Jail<'_> {
    /// The program and arguments; run them as root (the launcher drops to
    /// the sandbox's uid) with a cleared environment containing only `PATH`.
    pub fn argv(
        &self,
        cwd: &str,
        env: &BTreeMap<String, String>,
        program: &[&str],
    ) -> (PathBuf, Vec<OsString>) {
        let limits = &self.template.limits;
        let mut args: Vec<OsString> = vec![
            format!("--uid={}", self.uid).into(),
            format!(
                "--rlimits={},{},{},{},{}",
                limits.address_space_bytes,
                limits.file_bytes,
                limits.open_files,
                limits.processes,
                limits.cpu_seconds
            )
            .into(),
        ];
        for procs in &self.cgroups {
            let mut arg = OsString::from("--cgroup=");
            arg.push(procs);
            args.push(arg);
        }
        let netns = self.netns.as_ref().filter(|_| self.network);
        if let Some((namespace, _)) = netns {
            let mut arg = OsString::from("--netns=");
            arg.push(namespace);
            args.push(arg);
        }
        args.extend([
            "--".into(),
            self.bwrap.into(),
            "--unshare-all".into(),
            "--die-with-parent".into(),
        ]);
        if self.new_session {
            args.push("--new-session".into());
        }
        if self.network {
            args.push("--share-net".into());
        }
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        match &self.template.image_root {
            Some(root) => {
                args_push_path(&mut push, "--ro-bind", root, "/");
            }
            None => {
                push(&["--ro-bind", "/usr", "/usr"]);
                for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64"] {
                    let path = Path::new(top);
                    match path.read_link() {
                        Ok(target) => {
                            if let Some(target) = target.to_str() {
                                push(&["--symlink", target, top]);
                            }
                        }
                        Err(_) if path.is_dir() => push(&["--ro-bind", top, top]),
                        Err(_) => {}
                    }
                }
                for etc in [
                    "/etc/alternatives",
                    "/etc/ld.so.cache",
                    "/etc/ld.so.conf",
                    "/etc/ld.so.conf.d",
                    "/etc/localtime",
                    "/etc/ssl",
                    "/etc/ca-certificates",
                    "/etc/gitconfig",
                ] {
                    push(&["--ro-bind-try", etc, etc]);
                }
                if self.network {
                    for etc in ["/etc/hosts", "/etc/nsswitch.conf"] {
                        push(&["--ro-bind-try", etc, etc]);
                    }
                    match netns {
                        Some((_, resolv)) => {
                            args_push_path(&mut push, "--ro-bind", resolv, "/etc/resolv.conf")
                        }
                        None => push(&["--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"]),
                    }
                }
            }
        }
        let tmp_size = self.template.limits.tmp_bytes.to_string();
        push(&["--proc", "/proc", "--dev", "/dev"]);
        push(&["--size", &tmp_size, "--tmpfs", "/dev/shm"]);
        args_push_path(
            &mut push,
            "--bind",
            &self.fs_dir.join("workspace"),
            "/workspace",
        );
        args_push_path(&mut push, "--bind", &self.fs_dir.join("tmp"), "/tmp");
        // Nothing but the workspace, /tmp and /dev/shm is writable.
        push(&["--remount-ro", "/"]);
        let cwd = if cwd.is_empty() {
            "/workspace".to_owned()
        } else {
            format!("/workspace/{cwd}")
        };
        push(&["--hostname", "sandbox", "--chdir", &cwd, "--clearenv"]);
        push(&["--setenv", "PATH", PATH]);
        push(&["--setenv", "HOME", "/workspace"]);
        push(&["--setenv", "LANG", "C.UTF-8"]);
        push(&["--setenv", "TMPDIR", "/tmp"]);
        for (key, value) in self.template.env.iter().chain(env.iter()) {
            push(&["--setenv", key, value]);
        }
        push(&["--"]);
        push(program);
        (self.launcher.to_owned(), args)
    }
}

fn args_push_path(push: &mut impl FnMut(&[&str]), flag: &str, host: &Path, inside: &str) {
    // Paths here are ours (configured or created by the provider) and UTF-8.
    let host = host.to_string_lossy();
    push(&[flag, &host, inside]);
}

/// The environment the launcher itself starts with.
pub fn host_env() -> [(&'static str, &'static str); 1] {
    [("PATH", PATH)]
}
