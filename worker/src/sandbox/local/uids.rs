//! One host uid per local sandbox, claimed host-wide with marker files so two
//! workers on one host never hand out the same uid. A dedicated uid makes
//! RLIMIT_NPROC a per-sandbox limit and lets destroy kill every process the
//! sandbox ever started, however it detached.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use super::super::{SandboxError, SandboxErrorKind};

pub struct UidAllocator {
    dir: PathBuf,
    base: u32,
    count: u32,
    next: AtomicU32,
    /// Written into each claim: the claiming process's identity ("pid start").
    claimant: String,
}

impl UidAllocator {
    pub fn new(dir: PathBuf, base: u32, count: u32, claimant: String) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            base,
            count,
            next: AtomicU32::new(std::process::id() % count.max(1)),
            claimant,
        })
    }

    /// Claims a free uid for this process.
    pub fn claim(&self) -> Result<u32, SandboxError> {
        for _ in 0..self.count {
            let offset = self.next.fetch_add(1, Ordering::Relaxed) % self.count;
            let uid = self.base + offset;
            // Write the claim aside, then link it into place: the link is the
            // atomic claim, and a reader never sees a claim without its claimant.
            let staged = self
                .dir
                .join(format!(".claim-{}-{uid}", std::process::id()));
            std::fs::write(&staged, self.claimant.as_bytes())?;
            let claimed = std::fs::hard_link(&staged, self.marker(uid));
            let _ = std::fs::remove_file(&staged);
            match claimed {
                Ok(()) => return Ok(uid),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(SandboxError::new(
            SandboxErrorKind::Create,
            format!("all {} sandbox uids are in use", self.count),
        ))
    }

    pub fn release(&self, uid: u32) {
        if self.in_range(uid) {
            let _ = std::fs::remove_file(self.marker(uid));
        }
    }

    /// Whether `uid` is one of ours to hand out, and so to kill: a uid read
    /// from disk (a claim, a sandbox's metadata) is trusted only then.
    pub fn in_range(&self, uid: u32) -> bool {
        uid.checked_sub(self.base)
            .is_some_and(|offset| offset < self.count)
    }

    /// Every claimed uid in our range with the identity of the process that
    /// claimed it. Anything else in the directory (other names, symlinks,
    /// uids outside `base .. base + count`) is ignored, never acted on.
    pub fn claimed(&self) -> Vec<(u32, String)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                // Staged claims (".claim-*") are not claims yet.
                let uid: u32 = entry.file_name().to_str()?.parse().ok()?;
                // `file_type` does not follow symlinks.
                if !self.in_range(uid) || !entry.file_type().ok()?.is_file() {
                    return None;
                }
                let owner = std::fs::read_to_string(entry.path()).ok()?;
                Some((uid, owner))
            })
            .collect()
    }

    fn marker(&self, uid: u32) -> PathBuf {
        self.dir.join(uid.to_string())
    }
}
