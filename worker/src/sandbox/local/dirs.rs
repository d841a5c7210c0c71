//! The provider's own directories, `sandbox.root` and `sandbox.uid_dir`.
//! The reaper deletes directories and kills uids named in files it finds
//! there, so no one but the worker's user may write them, or replace them
//! (a symlink, a parent another user can write). Checked once at startup;
//! a bad one stops the worker with an error naming the key.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use super::super::{SandboxError, SandboxErrorKind};

/// Sticky bit: in a directory others can write (like `/tmp`), only an
/// entry's owner may rename or delete it.
const STICKY: u32 = 0o1000;
const GROUP_OR_OTHER_WRITE: u32 = 0o022;

/// Creates `path` with `mode` (and missing parents with it) when missing,
/// then refuses it unless it is a real directory, not a symlink, owned by
/// the effective uid, writable by no one else, under parents only root or
/// the effective uid can change (or sticky ones).
pub fn check_private_dir(key: &str, path: &Path, mode: u32) -> Result<(), SandboxError> {
    let refuse = |why: String| {
        SandboxError::new(
            SandboxErrorKind::Create,
            format!("{key} = {}: {why}", path.display()),
        )
    };
    if !path.is_absolute() {
        return Err(refuse("must be an absolute path".into()));
    }
    if let Err(e) = std::fs::symlink_metadata(path) {
        if e.kind() != ErrorKind::NotFound {
            return Err(refuse(format!("cannot inspect it: {e}")));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
            .map_err(|e| refuse(format!("cannot create it: {e}")))?;
    }
    let euid = nix::unistd::geteuid().as_raw();
    let meta =
        std::fs::symlink_metadata(path).map_err(|e| refuse(format!("cannot inspect it: {e}")))?;
    if meta.file_type().is_symlink() {
        return Err(refuse(
            "is a symlink; set the key to the real directory".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(refuse("is not a directory".into()));
    }
    if meta.uid() != euid {
        return Err(refuse(format!(
            "is owned by uid {}, not by the worker's uid {euid}",
            meta.uid()
        )));
    }
    if meta.mode() & GROUP_OR_OTHER_WRITE != 0 {
        return Err(refuse(format!(
            "is writable by group or others (mode {:o}); chmod go-w it",
            meta.mode() & 0o7777
        )));
    }
    let parent = path
        .parent()
        .ok_or_else(|| refuse("must not be /".into()))?;
    let parent = parent
        .canonicalize()
        .map_err(|e| refuse(format!("cannot resolve its parent: {e}")))?;
    for dir in parent.ancestors() {
        let meta = std::fs::metadata(dir)
            .map_err(|e| refuse(format!("cannot inspect {}: {e}", dir.display())))?;
        let owner_ok = meta.uid() == 0 || meta.uid() == euid;
        let shared = meta.mode() & GROUP_OR_OTHER_WRITE != 0 && meta.mode() & STICKY == 0;
        if !owner_ok || shared {
            return Err(refuse(format!(
                "its parent {} can be changed by another user (owner uid {}, mode {:o})",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "shoal-dirs-{name}-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        dir
    }

    #[test]
    fn a_missing_dir_is_created_private() {
        let base = scratch("create");
        let dir = base.join("a/b");
        check_private_dir("sandbox.uid_dir", &dir, 0o700).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn writable_symlinked_or_relative_dirs_are_refused_naming_the_key() {
        let base = scratch("refuse");
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = check_private_dir("sandbox.root", &open, 0o711).unwrap_err();
        assert!(error.message.contains("sandbox.root"), "{error}");
        assert!(error.message.contains("writable"), "{error}");
        let link = base.join("link");
        std::os::unix::fs::symlink(base.join("elsewhere"), &link).unwrap();
        std::fs::create_dir(base.join("elsewhere")).unwrap();
        let error = check_private_dir("sandbox.root", &link, 0o711).unwrap_err();
        assert!(error.message.contains("symlink"), "{error}");
        let inner = open.join("inner");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&inner)
            .unwrap();
        let error = check_private_dir("sandbox.uid_dir", &inner, 0o700).unwrap_err();
        assert!(error.message.contains("parent"), "{error}");
        let error = check_private_dir("sandbox.root", Path::new("rel"), 0o711).unwrap_err();
        assert!(error.message.contains("absolute"), "{error}");
        std::fs::remove_dir_all(base).unwrap();
    }
}
