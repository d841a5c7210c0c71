//! `shoal-sandbox-exec`: the first program of every local sandbox process.
//!
//! The worker starts it as root; it joins the sandbox's cgroups (so nothing
//! it forks can escape them), sets the sandbox's rlimits, becomes the
//! sandbox's uid with no supplementary groups, and replaces itself with
//! bubblewrap. One exec does what `sh` + `setpriv` + `prlimit` did (ADR 0011).
//! Internal: the worker writes its command line,
//! `--uid=U --rlimits=AS,FSIZE,NOFILE,NPROC,CPU [--cgroup=PROCS_FILE]... [--netns=PATH] -- PROGRAM ARGS...`.
//! With `--netns` it first enters the sandbox's network namespace (ADR 0014),
//! so bubblewrap shares that namespace instead of making an empty one.
//! Any failure exits 125 with the reason on stderr, before the program runs.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use nix::sched::{setns, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

fn main() -> ExitCode {
    match run(std::env::args_os().skip(1)) {
        Ok(never) => match never {},
        Err(error) => {
            eprintln!("shoal-sandbox-exec: {error}");
            ExitCode::from(125)
        }
    }
}

fn run(mut args: impl Iterator<Item = OsString>) -> Result<Infallible, String> {
    let mut uid = None;
    let mut limits = None;
    let mut cgroups = Vec::new();
    let mut netns = None;
    loop {
        let arg = args.next().ok_or("missing `--` before the program")?;
        let arg = arg
            .into_string()
            .map_err(|arg| format!("not UTF-8: {arg:?}"))?;
        if arg == "--" {
            break;
        } else if let Some(value) = arg.strip_prefix("--uid=") {
            uid = Some(value.parse::<u32>().map_err(|e| format!("--uid: {e}"))?);
        } else if let Some(value) = arg.strip_prefix("--rlimits=") {
            let values = value
                .split(',')
                .map(str::parse::<u64>)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--rlimits: {e}"))?;
            let values: [u64; 5] = values
                .try_into()
                .map_err(|_| "--rlimits needs AS,FSIZE,NOFILE,NPROC,CPU".to_owned())?;
            limits = Some(values);
        } else if let Some(file) = arg.strip_prefix("--cgroup=") {
            cgroups.push(file.to_owned());
        } else if let Some(path) = arg.strip_prefix("--netns=") {
            netns = Some(path.to_owned());
        } else {
            return Err(format!("unknown argument {arg:?}"));
        }
    }
    let uid = uid.ok_or("--uid is required")?;
    let [address_space, file_size, open_files, processes, cpu] =
        limits.ok_or("--rlimits is required")?;
    let program = args.next().ok_or("no program after `--`")?;

    // Still root: join first, so every later process is born inside.
    let pid = std::process::id().to_string();
    for file in &cgroups {
        std::fs::write(file, &pid).map_err(|e| format!("joining cgroup {file}: {e}"))?;
    }
    if let Some(path) = &netns {
        let namespace =
            std::fs::File::open(path).map_err(|e| format!("opening netns {path}: {e}"))?;
        setns(&namespace, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering netns {path}: {e}"))?;
    }
    for (resource, value) in [
        (Resource::RLIMIT_AS, address_space),
        (Resource::RLIMIT_FSIZE, file_size),
        (Resource::RLIMIT_NOFILE, open_files),
        (Resource::RLIMIT_NPROC, processes),
        (Resource::RLIMIT_CPU, cpu),
        (Resource::RLIMIT_CORE, 0),
    ] {
        setrlimit(resource, value, value).map_err(|e| format!("{resource:?}: {e}"))?;
    }
    let (user, group) = (Uid::from_raw(uid), Gid::from_raw(uid));
    setgroups(&[]).map_err(|e| format!("clearing groups: {e}"))?;
    setresgid(group, group, group).map_err(|e| format!("becoming gid {uid}: {e}"))?;
    setresuid(user, user, user).map_err(|e| format!("becoming uid {uid}: {e}"))?;
    let error = std::process::Command::new(&program).args(args).exec();
    Err(format!("cannot run {}: {error}", program.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Only failures before the first rlimit is set can be tested in-process:
    // anything later would change (or replace) the test process itself.
    fn fails(args: &[&str]) -> String {
        match run(args.iter().map(OsString::from)) {
            Ok(never) => match never {},
            Err(error) => error,
        }
    }

    #[test]
    fn bad_command_lines_are_refused_before_anything_happens() {
        assert_eq!(fails(&[]), "missing `--` before the program");
        assert!(fails(&["--uid=root", "--"]).starts_with("--uid: "));
        assert_eq!(
            fails(&["--uid=1", "--rlimits=1,2,3", "--"]),
            "--rlimits needs AS,FSIZE,NOFILE,NPROC,CPU"
        );
        assert_eq!(fails(&["--rlimits=1,2,3,4,5", "--"]), "--uid is required");
        assert_eq!(fails(&["--uid=1", "--", "true"]), "--rlimits is required");
        assert_eq!(
            fails(&["--uid=1", "--rlimits=1,2,3,4,5", "--"]),
            "no program after `--`"
        );
        assert_eq!(fails(&["--nope"]), "unknown argument \"--nope\"");
    }

    #[test]
    fn a_cgroup_that_cannot_be_joined_stops_the_launch() {
        let error = fails(&[
            "--uid=1",
            "--rlimits=1,2,3,4,5",
            "--cgroup=/nonexistent/shoal/x/cgroup.procs",
            "--",
            "true",
        ]);
        assert!(
            error.starts_with("joining cgroup /nonexistent/shoal/x/cgroup.procs: "),
            "{error}"
        );
    }

    #[test]
    fn a_network_namespace_that_cannot_be_entered_stops_the_launch() {
        let error = fails(&[
            "--uid=1",
            "--rlimits=1,2,3,4,5",
            "--netns=/nonexistent/netns",
            "--",
            "true",
        ]);
        assert!(
            error.starts_with("opening netns /nonexistent/netns: "),
            "{error}"
        );
    }
}
