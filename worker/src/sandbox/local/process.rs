//! Host process helpers: find and kill every process of a uid, and tell
//! whether a worker that owned sandboxes is still alive.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Real uid and state of a process, from `/proc/<pid>/status`.
fn uid_and_state(pid: &str) -> Option<(u32, char)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut uid = None;
    let mut state = None;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("Uid:") {
            uid = rest.split_whitespace().next()?.parse().ok();
        } else if let Some(rest) = line.strip_prefix("State:") {
            state = rest.trim().chars().next();
        }
    }
    Some((uid?, state?))
}

/// Live (non-zombie) processes whose real uid is `uid`.
pub fn processes_of(uid: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let pid = name.to_str()?;
            let number: i32 = pid.parse().ok()?;
            let (owner, state) = uid_and_state(pid)?;
            (owner == uid && state != 'Z').then_some(number)
        })
        .collect()
}

/// SIGKILLs every process of `uid` until none is left (a fork bomb may spawn
/// while we sweep; its process limit makes the sweep converge). Returns how
/// many were still alive at the end (0 on success).
pub async fn kill_all_of(uid: u32) -> usize {
    for pass in 0..100 {
        let pids = processes_of(uid);
        if pids.is_empty() {
            return 0;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(if pass < 10 { 5 } else { 50 })).await;
    }
    processes_of(uid).len()
}

/// `pid` and its start time, identifying a process across pid reuse.
pub fn identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let start = rest.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

/// Whether the process recorded as `identity` ("pid start") still runs.
pub fn is_alive(identity_text: &str) -> bool {
    let Some(pid) = identity_text
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return false;
    };
    identity(pid).is_some_and(|current| current == identity_text.trim())
}
