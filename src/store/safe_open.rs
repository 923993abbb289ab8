//! Opening, as root, files a service controls, so that what is read is exactly the object the
//! service uses and nothing a service can plant makes root block or read forever.
//!
//! - While the tree exists, a file is reached through its process: `/proc/PID/map_files/RANGE`
//!   for a mapping, `/proc/PID/fd/N` for an open file. The kernel hands over the very object
//!   (no path is walked), and its device and inode are checked against what maps says.
//! - A path recorded earlier (a manifest's) is opened with `openat2(RESOLVE_NO_SYMLINKS)`, or
//!   one `O_NOFOLLOW` component at a time on a kernel without it.
//!
//! Every open is `O_NONBLOCK|O_NOCTTY|O_CLOEXEC` (a FIFO cannot make it wait for a writer) and
//! is followed by `fstat`: only a regular file is read. Reads are bounded by `read_bounded`'s
//! deadline and size cap.

use std::fs::{File, Metadata};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

/// The largest executable (or library) whose content is hashed for a checkpoint's identity
/// check. Real binaries are far below it; a file above it is refused, naming it.
pub const MAX_EXECUTABLE_BYTES: u64 = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum UnsafeFile {
    #[error("failed to open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("failed to open {path}: it is, or lies under, a symbolic link")]
    Symlink { path: PathBuf },
    #[error("failed to read the status of {path}: {source}")]
    Stat { path: PathBuf, source: std::io::Error },
    #[error("failed to read {path}: it is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("failed to match {path} with the mapping: maps says device {dev_maps:#x} inode {ino_maps}, the file opened is device {dev_open:#x} inode {ino_open}")]
    NotTheMapped { path: PathBuf, dev_maps: u64, ino_maps: u64, dev_open: u64, ino_open: u64 },
    #[error("failed to read {path}: it is over {cap} bytes, the most read for it")]
    TooLarge { path: PathBuf, cap: u64 },
    #[error("failed to read {path} before the deadline; gave up on it")]
    Deadline { path: PathBuf },
    #[error("failed to read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

impl UnsafeFile {
    /// The file is simply not there (any more).
    pub fn not_found(&self) -> bool {
        matches!(self, UnsafeFile::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

const FLAGS: i32 = libc::O_NONBLOCK | libc::O_NOCTTY;

fn kind_of(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

fn regular(file: File, label: &Path) -> Result<(File, Metadata), UnsafeFile> {
    let meta = file.metadata().map_err(|source| UnsafeFile::Stat { path: label.to_path_buf(), source })?;
    if !meta.is_file() {
        return Err(UnsafeFile::NotRegular { path: label.to_path_buf(), kind: kind_of(&meta) });
    }
    Ok((file, meta))
}

/// Opens a handle of `/proc/PID/` (`map_files/RANGE`, `fd/N`) that the kernel resolves to the
/// process's own object; `label` (the path the process knows it by) names it in errors.
pub fn open_proc_handle(handle: &Path, label: &Path) -> Result<(File, Metadata), UnsafeFile> {
    let file = File::options()
        .read(true)
        .custom_flags(FLAGS)
        .open(handle)
        .map_err(|source| UnsafeFile::Open { path: label.to_path_buf(), source })?;
    regular(file, label)
}

/// Opens the file `pid` maps as `mapping` through `map_files`, checking it is that file.
pub fn open_mapped(pid: i32, mapping: &crate::proc_maps::Mapping) -> Result<(File, Metadata), UnsafeFile> {
    let label = mapping.path.clone().unwrap_or_else(|| PathBuf::from(mapping.map_files_entry()));
    let handle = PathBuf::from(format!("/proc/{pid}/map_files/{}", mapping.map_files_entry()));
    let (file, meta) = open_proc_handle(&handle, &label)?;
    if meta.dev() != mapping.dev() || meta.ino() != mapping.inode {
        return Err(UnsafeFile::NotTheMapped {
            path: label,
            dev_maps: mapping.dev(),
            ino_maps: mapping.inode,
            dev_open: meta.dev(),
            ino_open: meta.ino(),
        });
    }
    Ok((file, meta))
}

/// Opens the regular file at `path` (absolute) without following any symbolic link on the way.
pub fn open_no_symlinks(path: &Path) -> Result<(File, Metadata), UnsafeFile> {
    let file = match openat2_no_symlinks(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => open_each_component(path),
        other => other,
    };
    let file = file.map_err(|source| match source.raw_os_error() {
        Some(libc::ELOOP) => UnsafeFile::Symlink { path: path.to_path_buf() },
        _ => UnsafeFile::Open { path: path.to_path_buf(), source },
    })?;
    regular(file, path)
}

fn cstring(path: &Path) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

fn owned(fd: i64) -> std::io::Result<File> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

fn openat2_no_symlinks(path: &Path) -> std::io::Result<File> {
    let c = cstring(path)?;
    // SAFETY: open_how is plain data; zeroed is its documented empty value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | FLAGS) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a NUL-terminated path and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    owned(fd)
}

/// Without openat2 (Linux < 5.6): each directory, then the file, opened `O_NOFOLLOW` relative to
/// the one before.
fn open_each_component(path: &Path) -> std::io::Result<File> {
    if !path.is_absolute() {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let mut dir = File::open("/")?;
    let mut parts = path.components().filter(|c| !matches!(c, Component::RootDir)).peekable();
    while let Some(part) = parts.next() {
        let Component::Normal(name) = part else { return Err(std::io::ErrorKind::InvalidInput.into()) };
        let c = cstring(Path::new(name))?;
        let last = parts.peek().is_none();
        let flags = libc::O_NOFOLLOW
            | libc::O_CLOEXEC
            | if last { libc::O_RDONLY | FLAGS } else { libc::O_RDONLY | libc::O_DIRECTORY };
        // SAFETY: a NUL-terminated name relative to a directory fd we own.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
        dir = match owned(fd as i64) {
            // O_DIRECTORY answers ENOTDIR before O_NOFOLLOW's ELOOP: tell a link from a file.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) && is_symlink_at(&dir, &c) => {
                return Err(std::io::Error::from_raw_os_error(libc::ELOOP))
            }
            other => other?,
        };
    }
    Ok(dir)
}

fn is_symlink_at(dir: &File, name: &std::ffi::CStr) -> bool {
    // SAFETY: stat is plain data, filled by fstatat on a directory fd we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated name and one valid stat buffer.
    let r = unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    r == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFLNK
}

/// Reads `file` (a regular file, checked) front to back in pieces, handing each to `eat`, for
/// at most `cap` bytes and until `deadline`. `label` names it in errors.
pub fn read_bounded(
    mut file: &File,
    label: &Path,
    cap: u64,
    deadline: Option<Instant>,
    piece: usize,
    mut eat: impl FnMut(&[u8]),
) -> Result<u64, UnsafeFile> {
    use std::io::Read;
    let mut buf = vec![0u8; piece];
    let mut total: u64 = 0;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(UnsafeFile::Deadline { path: label.to_path_buf() });
        }
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(UnsafeFile::Read { path: label.to_path_buf(), source }),
            }
        }
        if filled == 0 {
            return Ok(total);
        }
        total += filled as u64;
        // A file that grows while it is read is held to the same cap.
        if total > cap {
            return Err(UnsafeFile::TooLarge { path: label.to_path_buf(), cap });
        }
        eat(&buf[..filled]);
    }
}

/// An absolute path of plain components without control characters: the only kind a path
/// read from a service's /proc files (or a manifest) may be before root opens anything by it.
pub fn plain_path(path: &Path) -> bool {
    let bytes = path.as_os_str().as_encoded_bytes();
    path.is_absolute()
        && bytes.len() < 4096
        && !bytes.iter().any(|&b| b < 0x20 || b == 0x7f)
        && path.components().skip(1).all(|c| matches!(c, Component::Normal(_)))
        && path.components().count() > 1
}

pub fn cstr(name: &std::ffi::OsStr) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(name.as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

/// Opens the directory `name` of `dir` without following a symbolic link.
pub fn open_in(dir: &File, name: &std::ffi::OsStr) -> std::io::Result<File> {
    let c = cstr(name)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated name relative to a directory fd we own.
    owned(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) }.into())
}

/// Opens the directory at `path` (absolute, plain), each component `O_NOFOLLOW`: a symbolic
/// link anywhere on the way fails (ELOOP or ENOTDIR).
pub fn open_dir(path: &Path) -> std::io::Result<File> {
    if !(path == Path::new("/") || plain_path(path)) {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let mut dir = File::open("/")?;
    for part in path.components().skip(1) {
        dir = open_in(&dir, part.as_os_str())?;
    }
    Ok(dir)
}

/// Creates the regular file `name` in `dir`: only a new one (`O_EXCL`), never through a link,
/// mode 0600 until its owner sets it.
pub fn create_in(dir: &File, name: &std::ffi::OsStr) -> std::io::Result<File> {
    let c = cstr(name)?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: as in open_in, with a mode for the new file.
    owned(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, 0o600 as libc::c_uint) }.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_symlinks_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // No writer: a blocking open would wait forever here.
        assert!(matches!(open_no_symlinks(&fifo), Err(UnsafeFile::NotRegular { kind: "a FIFO", .. })));
        let zero = d.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(matches!(open_no_symlinks(&zero), Err(UnsafeFile::Symlink { .. })));
        assert!(matches!(open_no_symlinks(Path::new("/dev/zero")), Err(UnsafeFile::NotRegular { .. })));
        // A symlinked directory on the way counts too.
        std::fs::create_dir(d.path().join("real")).unwrap();
        std::fs::write(d.path().join("real/f"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
        assert!(matches!(open_no_symlinks(&d.path().join("link/f")), Err(UnsafeFile::Symlink { .. })));
        assert!(
            matches!(open_each_component(&d.path().join("link/f")), Err(e) if e.raw_os_error() == Some(libc::ELOOP))
        );
        assert!(open_each_component(&zero).is_err());
        let (f, meta) = open_no_symlinks(&d.path().join("real/f")).unwrap();
        assert_eq!(meta.len(), 1);
        assert!(open_each_component(&d.path().join("real/f")).is_ok());
        assert!(open_no_symlinks(&d.path().join("nope")).unwrap_err().not_found());
        let mut got = Vec::new();
        assert_eq!(read_bounded(&f, Path::new("f"), 1, None, 4096, |b| got.extend_from_slice(b)).unwrap(), 1);
        assert_eq!(got, b"x");
    }

    #[test]
    fn reads_stop_at_the_cap_and_the_deadline() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let (f, _) = open_no_symlinks(&p).unwrap();
        assert!(matches!(read_bounded(&f, &p, 9_999, None, 4096, |_| {}), Err(UnsafeFile::TooLarge { .. })));
        let (f, _) = open_no_symlinks(&p).unwrap();
        let past = Some(Instant::now());
        assert!(matches!(read_bounded(&f, &p, u64::MAX, past, 4096, |_| {}), Err(UnsafeFile::Deadline { .. })));
    }

    #[test]
    fn a_mapping_is_opened_as_the_very_file_mapped() {
        let me = std::process::id() as i32;
        let maps = crate::proc_maps::parse(&std::fs::read("/proc/self/maps").unwrap());
        let exe = std::fs::canonicalize("/proc/self/exe").unwrap();
        let m = maps.iter().find(|m| m.executable() && m.path.as_deref() == Some(exe.as_path())).unwrap();
        let (_, meta) = open_mapped(me, m).unwrap();
        assert_eq!(meta.ino(), m.inode);
        let mut wrong = m.clone();
        wrong.inode += 1;
        assert!(matches!(open_mapped(me, &wrong), Err(UnsafeFile::NotTheMapped { .. })));
    }
}
