//! File operations confined to a workspace by the kernel: every path is
//! resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` relative to
//! the workspace directory, so `..`, absolute paths and symlinks planted by the
//! sandbox cannot lead outside, race or no race. Created files and directories
//! belong to the sandbox's uid. These calls block; run them off the runtime.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchown, Gid, Uid};

use super::super::{FileEntry, SandboxError, SandboxErrorKind};

/// The largest file `read` returns.
pub const MAX_READ_BYTES: u64 = 64 << 20;

pub struct Confined {
    pub root: PathBuf,
    pub uid: u32,
}

fn refuse(path: &str, reason: &str) -> SandboxError {
    SandboxError::new(
        SandboxErrorKind::Path,
        format!(
            "path {:?} is not allowed: {reason}",
            path.chars().take(256).collect::<String>()
        ),
    )
}

fn errno(path: &str, error: Errno) -> SandboxError {
    match error {
        Errno::EXDEV => refuse(path, "it resolves outside the workspace"),
        Errno::ELOOP => refuse(path, "too many or forbidden symbolic links"),
        Errno::ENOENT => SandboxError::new(
            SandboxErrorKind::NoSuchFile,
            format!("no such file or directory: {path}"),
        ),
        Errno::ENOTDIR => SandboxError::new(
            SandboxErrorKind::NoSuchFile,
            format!("not a directory on the way to {path}"),
        ),
        Errno::EISDIR => {
            SandboxError::new(SandboxErrorKind::Rejected, format!("{path} is a directory"))
        }
        other => SandboxError::new(SandboxErrorKind::Io, format!("{path}: {other}")),
    }
}

fn how(flags: OFlag) -> OpenHow {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    // openat2 refuses a mode without O_CREAT.
    if flags.contains(OFlag::O_CREAT) {
        how.mode(Mode::from_bits_truncate(0o644))
    } else {
        how
    }
}

/// Relative path components, refusing absolute paths and NUL early with a
/// clear message (the kernel would refuse them too).
fn components(path: &str) -> Result<Vec<String>, SandboxError> {
    if path.contains('\0') {
        return Err(refuse(path, "contains NUL"));
    }
    if path.starts_with('/') {
        return Err(refuse(path, "must be relative to the workspace"));
    }
    let mut parts = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse(path, "`..` is not allowed")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(path, "must be relative to the workspace"))
            }
        }
    }
    Ok(parts)
}

impl Confined {
    fn root_fd(&self) -> Result<File, SandboxError> {
        File::open(&self.root).map_err(|e| {
            SandboxError::new(SandboxErrorKind::Broken, format!("workspace is gone: {e}"))
        })
    }

    fn owner(&self) -> (Option<Uid>, Option<Gid>) {
        (Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.uid)))
    }

    pub fn read(&self, path: &str) -> Result<Vec<u8>, SandboxError> {
        let parts = components(path)?;
        if parts.is_empty() {
            return Err(refuse(path, "names the workspace itself"));
        }
        let root = self.root_fd()?;
        let fd = openat2(root.as_fd(), parts.join("/").as_str(), how(OFlag::O_RDONLY))
            .map_err(|e| errno(path, e))?;
        let mut file = File::from(fd);
        let size = file.metadata()?.len();
        if file.metadata()?.is_dir() {
            return Err(errno(path, Errno::EISDIR));
        }
        if size > MAX_READ_BYTES {
            return Err(SandboxError::new(
                SandboxErrorKind::Rejected,
                format!("{path} is {size} bytes, more than {MAX_READ_BYTES}"),
            ));
        }
        let mut content = Vec::with_capacity(size as usize);
        Read::by_ref(&mut file)
            .take(MAX_READ_BYTES)
            .read_to_end(&mut content)?;
        Ok(content)
    }

    pub fn write(&self, path: &str, content: &[u8]) -> Result<(), SandboxError> {
        let parts = components(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(refuse(path, "names the workspace itself"));
        };
        let root = self.root_fd()?;
        let (uid, gid) = self.owner();
        // Walk down, creating missing directories, each step confined.
        let mut dir: OwnedFd = root.as_fd().try_clone_to_owned()?;
        for part in parents {
            match mkdirat(dir.as_fd(), part.as_str(), Mode::from_bits_truncate(0o755)) {
                Ok(()) => {
                    let created = openat2(
                        dir.as_fd(),
                        part.as_str(),
                        how(OFlag::O_DIRECTORY | OFlag::O_RDONLY),
                    )
                    .map_err(|e| errno(path, e))?;
                    fchown(created.as_fd(), uid, gid).map_err(|e| errno(path, e))?;
                    dir = created;
                }
                Err(Errno::EEXIST) => {
                    dir = openat2(
                        dir.as_fd(),
                        part.as_str(),
                        how(OFlag::O_DIRECTORY | OFlag::O_RDONLY),
                    )
                    .map_err(|e| errno(path, e))?;
                }
                Err(e) => return Err(errno(path, e)),
            }
        }
        let fd = openat2(
            dir.as_fd(),
            name.as_str(),
            how(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC),
        )
        .map_err(|e| errno(path, e))?;
        fchown(fd.as_fd(), uid, gid).map_err(|e| errno(path, e))?;
        let mut file = File::from(fd);
        file.write_all(content)?;
        Ok(())
    }

    pub fn list(&self, path: &str) -> Result<Vec<FileEntry>, SandboxError> {
        let parts = components(path)?;
        let root = self.root_fd()?;
        let target = if parts.is_empty() {
            ".".to_owned()
        } else {
            parts.join("/")
        };
        let fd = openat2(
            root.as_fd(),
            target.as_str(),
            how(OFlag::O_DIRECTORY | OFlag::O_RDONLY),
        )
        .map_err(|e| errno(path, e))?;
        let listing = fd.try_clone()?;
        let mut dir = nix::dir::Dir::from_fd(listing).map_err(|e| errno(path, e))?;
        let mut entries = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| errno(path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let Ok(stat) = fstatat(
                fd.as_fd(),
                name.as_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) else {
                continue;
            };
            let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
            entries.push(FileEntry {
                name,
                is_dir: kind == SFlag::S_IFDIR,
                size: stat.st_size as u64,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }
}
