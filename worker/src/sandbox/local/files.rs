//! File operations confined to a workspace by the kernel: every path is
//! resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` relative to
//! the workspace directory, so `..`, absolute paths and symlinks planted by the
//! sandbox cannot lead outside, race or no race. Created files and directories
//! belong to the sandbox's uid. These calls block; run them off the runtime.
//!
//! Only regular files are read or written: a FIFO, socket or device planted
//! by the sandbox would block the calling thread (a FIFO without a writer) or
//! act on something that is not a file. The target is first opened with
//! `O_PATH`, which has no side effects on any file type, and checked; the
//! real open adds `O_NONBLOCK` and checks again that it got the same regular
//! file, so a swap between the two opens is refused too.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, ftruncate, Gid, Uid};

use super::super::{FileEntry, SandboxError, SandboxErrorKind};

/// The largest file `read` returns.
pub const MAX_READ_BYTES: u64 = 64 << 20;
/// The most entries `list` returns; a larger directory is refused.
pub const MAX_LIST_ENTRIES: usize = 10_000;

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

/// What kind of file `stat` describes, in words for an error message.
fn kind_name(stat: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFIFO => "FIFO (named pipe)",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFLNK => "symbolic link",
        _ => "special file",
    }
}

fn is_regular(stat: &FileStat) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

/// Refuses anything but a regular file, naming what it is instead.
fn regular(path: &str, stat: &FileStat) -> Result<(), SandboxError> {
    if stat.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits() {
        return Err(errno(path, Errno::EISDIR));
    }
    if is_regular(stat) {
        return Ok(());
    }
    Err(SandboxError::new(
        SandboxErrorKind::Rejected,
        format!(
            "{path} is a {}, not a regular file: only regular files can be read or written",
            kind_name(stat)
        ),
    ))
}

/// Opens an existing `name` under `dir` for `flags` only if it is a regular
/// file: checked through an `O_PATH` descriptor first (opening that has no
/// effect on a FIFO or device), then again on the real, non-blocking
/// descriptor, which must be the same file.
fn open_regular(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &str,
    path: &str,
    flags: OFlag,
) -> Result<OwnedFd, SandboxError> {
    let probe = openat2(dir, name, how(OFlag::O_PATH)).map_err(|e| errno(path, e))?;
    let before = fstat(probe.as_fd()).map_err(|e| errno(path, e))?;
    regular(path, &before)?;
    let fd = openat2(dir, name, how(flags | OFlag::O_NONBLOCK)).map_err(|e| errno(path, e))?;
    let after = fstat(fd.as_fd()).map_err(|e| errno(path, e))?;
    regular(path, &after)?;
    if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino) {
        return Err(refuse(path, "it was replaced while being opened"));
    }
    Ok(fd)
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
        let fd = open_regular(
            root.as_fd(),
            parts.join("/").as_str(),
            path,
            OFlag::O_RDONLY,
        )?;
        let mut file = File::from(fd);
        let size = file.metadata()?.len();
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
        // Create it if missing (O_EXCL: nothing else can be there then);
        // an existing file goes through the regular-file checks, and is
        // truncated only once it is known to be one.
        let fd = match openat2(
            dir.as_fd(),
            name.as_str(),
            how(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NONBLOCK),
        ) {
            Ok(fd) => fd,
            Err(Errno::EEXIST) => {
                let fd = open_regular(dir.as_fd(), name.as_str(), path, OFlag::O_WRONLY)?;
                ftruncate(&fd, 0).map_err(|e| errno(path, e))?;
                fd
            }
            Err(e) => return Err(errno(path, e)),
        };
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
            if entries.len() == MAX_LIST_ENTRIES {
                return Err(SandboxError::new(
                    SandboxErrorKind::Rejected,
                    format!(
                        "{path:?} has more than {MAX_LIST_ENTRIES} entries: list a \
                         subdirectory or use a shell command such as `ls | head`"
                    ),
                ));
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
