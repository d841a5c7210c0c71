//! Which owner folders belong to a live provider: each provider holds an
//! exclusive `flock` on `<root>/.locks/<owner>` for its whole life. The kernel
//! drops the lock when the process dies (SIGKILL included), so a held lock
//! means a live owner and a free one a dead owner, with no window between a
//! process starting and it saying so (the identity file in the owner folder
//! had one: it was written only after the start-up reap).
//!
//! The lock files live beside the owner folders, not in them: reaping a dead
//! owner removes its folder, and the lock must outlive that. A reaper removes
//! a dead owner's lock file while holding it; whoever opened that file before
//! the removal and locks it afterwards finds the path gone or naming another
//! file, and opens again (see [`OwnerLock::try_acquire`]).

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::super::{SandboxError, SandboxErrorKind};

/// The folder of lock files in `sandbox.root`; its leading dot keeps it out
/// of the reaper's walk over owner folders.
pub const LOCKS_DIR: &str = ".locks";
/// How often a start waiting for its own lock tries again.
const RETRY: Duration = Duration::from_millis(50);

/// An exclusive lock on one owner name, held until dropped (or the process dies).
#[derive(Debug)]
pub struct OwnerLock {
    path: PathBuf,
    _file: Flock<File>,
}

impl OwnerLock {
    /// The lock file of `owner` under `root`.
    pub fn path(root: &Path, owner: &str) -> PathBuf {
        root.join(LOCKS_DIR).join(owner)
    }

    /// Takes the lock of `owner`, waiting up to `wait` while another process
    /// (a previous worker with the same id that is still exiting, or a
    /// reaper cleaning up after it) holds it.
    pub async fn acquire(root: &Path, owner: &str, wait: Duration) -> Result<Self, SandboxError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Self::try_acquire(root, owner) {
                Ok(Some(lock)) => return Ok(lock),
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(RETRY).await
                }
                Ok(None) => {
                    return Err(SandboxError::new(
                        SandboxErrorKind::Create,
                        format!(
                        "sandbox owner {owner:?} is still held by another process after {wait:?} \
                             (lock {}): another worker with id {owner:?} runs on this host (or \
                             another worker is reaping what a dead one left); stop it or give \
                             this worker another worker.id",
                        Self::path(root, owner).display()
                    ),
                    ))
                }
                Err(e) => {
                    return Err(SandboxError::new(
                        SandboxErrorKind::Create,
                        format!(
                            "sandbox owner lock {}: {e}",
                            Self::path(root, owner).display()
                        ),
                    ))
                }
            }
        }
    }

    /// Takes the lock of `owner` if no one holds it: `None` while another
    /// provider (in this or another process) holds it.
    pub fn try_acquire(root: &Path, owner: &str) -> std::io::Result<Option<Self>> {
        let dir = root.join(LOCKS_DIR);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        if !std::fs::symlink_metadata(&dir)?.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        let path = dir.join(owner);
        // A reaper may remove the file between our open and our lock: then
        // the lock we got is on a file no one else will open; open again.
        for _ in 0..100 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                // Never follow a planted link; never block on a planted FIFO.
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
                .open(&path)?;
            let opened = file.metadata()?;
            if !opened.is_file() {
                return Err(std::io::Error::other(format!(
                    "{} is not a regular file",
                    path.display()
                )));
            }
            let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => locked,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, errno)) => return Err(errno.into()),
            };
            let same = std::fs::symlink_metadata(&path)
                .is_ok_and(|now| now.dev() == opened.dev() && now.ino() == opened.ino());
            if same {
                return Ok(Some(Self {
                    path,
                    _file: locked,
                }));
            }
        }
        Err(std::io::Error::other(format!(
            "{} keeps being replaced",
            path.display()
        )))
    }

    /// Releases the lock and removes its file: for a dead owner whose folder
    /// was reaped (a live one keeps its file for its whole life).
    pub fn remove(self) {
        // Removed while still held: whoever waits on this file sees it gone
        // once it gets the lock and opens the path anew.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!(
            "shoal-owner-lock-{name}-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&root).expect("root");
        root
    }

    #[test]
    fn a_held_lock_is_not_acquired_again_until_dropped() {
        let root = root("held");
        let first = OwnerLock::try_acquire(&root, "w1")
            .expect("lock")
            .expect("free");
        // flock locks belong to the open file: a second open in this very
        // process conflicts, as a second provider in it must.
        assert!(OwnerLock::try_acquire(&root, "w1").expect("lock").is_none());
        assert!(OwnerLock::try_acquire(&root, "w2").expect("lock").is_some());
        drop(first);
        assert!(OwnerLock::try_acquire(&root, "w1").expect("lock").is_some());
        std::fs::remove_dir_all(&root).expect("clean up");
    }

    #[test]
    fn a_removed_lock_file_is_not_a_lock() {
        let root = root("removed");
        let reaper = OwnerLock::try_acquire(&root, "w1")
            .expect("lock")
            .expect("free");
        // A restarting owner opened the old file before the reaper removed it.
        let stale = File::open(OwnerLock::path(&root, "w1")).expect("open");
        reaper.remove();
        let stale = Flock::lock(stale, FlockArg::LockExclusiveNonblock).expect("free inode");
        // The path is what counts: a new lock on it is independent of the stale one.
        let fresh = OwnerLock::try_acquire(&root, "w1")
            .expect("lock")
            .expect("free");
        assert!(OwnerLock::try_acquire(&root, "w1").expect("lock").is_none());
        drop((stale, fresh));
        std::fs::remove_dir_all(&root).expect("clean up");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_own_lock_fails_the_start_after_the_wait() {
        let root = root("wait");
        let _held = OwnerLock::try_acquire(&root, "w1")
            .expect("lock")
            .expect("free");
        let error = OwnerLock::acquire(&root, "w1", Duration::from_secs(30))
            .await
            .expect_err("the lock is held");
        let text = error.to_string();
        assert!(
            text.contains("another worker with id \"w1\"") && text.contains("30s"),
            "{text}"
        );
        std::fs::remove_dir_all(&root).expect("clean up");
    }
}
