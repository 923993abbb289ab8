//! Whether a file stasis reads as root may be believed. What a service file, a CRIU config file
//! or the host config says is done as root, so each must be root's and writable by nobody else,
//! and so must the directory it is found in (as sshd's StrictModes). A file is opened without
//! following a symlink and checked through the descriptor it is then read from, so what is
//! checked is what is read. Directories above the config directories are not checked: they
//! are the host's layout.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Service and config files are a few lines; a bigger one is not one.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("failed to open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("failed to read {path}: it is a symbolic link, and stasis reads only a file whose own owner and mode it checked (a link's target can sit in a directory someone else controls); put the file itself there (`cp --remove-destination \"$(readlink -f {path})\" {path}`)")]
    Symlink { path: PathBuf },
    #[error("failed to read {path}: it is a {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("failed to use {path}: it is not a directory")]
    NotDirectory { path: PathBuf },
    #[error("failed to trust {path}: it is owned by uid {uid}, not root, and whoever owns it could make stasis run anything as root; `chown root:root {path}`")]
    NotRootOwned { path: PathBuf, uid: u32 },
    #[error("failed to trust {path}: it is writable by {who} (mode {mode:04o}), who could make stasis run anything as root; `chmod go-w {path}`")]
    Writable { path: PathBuf, who: &'static str, mode: u32 },
    #[error("failed to read {path}: it is {size} bytes, more than any config file ({MAX_CONFIG_BYTES} at most)")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("failed to read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

impl TrustError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, TrustError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A file's text, and what makes it untrustworthy (empty when it is root's and only root's).
pub struct FileText {
    pub text: String,
    pub untrusted: Vec<TrustError>,
}

/// Owner and mode problems of an object stasis would act on.
fn owner_and_mode(path: &Path, meta: &std::fs::Metadata) -> Vec<TrustError> {
    let mut problems = Vec::new();
    if meta.uid() != 0 {
        problems.push(TrustError::NotRootOwned { path: path.to_path_buf(), uid: meta.uid() });
    }
    let mode = meta.mode() & 0o7777;
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => Some("its group and everyone"),
        (true, false) => Some("its group"),
        (false, true) => Some("everyone"),
        (false, false) => None,
    };
    if let Some(who) = who {
        problems.push(TrustError::Writable { path: path.to_path_buf(), who, mode });
    }
    problems
}

/// Reads the file at `path` itself (a symlink, a FIFO or a device is refused before anything
/// is read from it), with what makes it untrustworthy. The caller decides whether those
/// problems stop it here or are reported alongside others.
pub fn read_file(path: &Path) -> Result<FileText, TrustError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        // O_NONBLOCK: opening a FIFO someone planted must not hang root.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => TrustError::Symlink { path: path.to_path_buf() },
            _ => TrustError::Open { path: path.to_path_buf(), source },
        })?;
    let meta = file.metadata().map_err(|source| TrustError::Read { path: path.to_path_buf(), source })?;
    if !meta.file_type().is_file() {
        return Err(TrustError::NotRegular { path: path.to_path_buf(), kind: kind_of(&meta) });
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(TrustError::TooLarge { path: path.to_path_buf(), size: meta.len() });
    }
    let mut bytes = Vec::new();
    (&file)
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| TrustError::Read { path: path.to_path_buf(), source })?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(TrustError::TooLarge { path: path.to_path_buf(), size: bytes.len() as u64 });
    }
    let text = String::from_utf8(bytes).map_err(|e| TrustError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
    })?;
    Ok(FileText { text, untrusted: owner_and_mode(path, &meta) })
}

/// A file that must be root's when it exists (the encryption key): its problems, none when
/// it is missing (whoever reads it says so then).
pub fn check_file_if_present(path: &Path) -> Vec<TrustError> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Vec::new(),
        Ok(m) if m.file_type().is_symlink() => vec![TrustError::Symlink { path: path.to_path_buf() }],
        Ok(m) if !m.file_type().is_file() => {
            vec![TrustError::NotRegular { path: path.to_path_buf(), kind: kind_of(&m) }]
        }
        Ok(m) => owner_and_mode(path, &m),
    }
}

/// A directory's owner and mode; the directory a configured path names is followed (it is
/// the host's choice), and then judged through its descriptor.
pub fn check_dir(path: &Path) -> Vec<TrustError> {
    let dir = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(path);
    let meta = match dir.and_then(|d| d.metadata()) {
        Ok(m) => m,
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return vec![TrustError::NotDirectory { path: path.to_path_buf() }]
        }
        Err(source) => return vec![TrustError::Open { path: path.to_path_buf(), source }],
    };
    owner_and_mode(path, &meta)
}

/// The directories from `top` down to the one holding `file`, when `file` is under `top`
/// (a service file in the config dir, or one `stasis add` stages in a directory inside it).
/// A file elsewhere (`stasis validate ./draft.yaml`) has none: it is only ever validated.
pub fn dirs_down_to(top: &Path, file: &Path) -> Vec<PathBuf> {
    let (Ok(top), Some(Ok(parent))) = (
        top.canonicalize(),
        file.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".").canonicalize() } else { p.canonicalize() }),
    ) else {
        return Vec::new();
    };
    let Ok(below) = parent.strip_prefix(&top) else { return Vec::new() };
    let mut dirs = vec![top.clone()];
    let mut at = top;
    for part in below.components() {
        at = at.join(part);
        dirs.push(at.clone());
    }
    dirs
}

fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() || t.is_block_device() {
        "device"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_are_judged_by_what_is_read() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s.yaml");
        std::fs::write(&f, "user: x\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let r = read_file(&f).unwrap();
        assert_eq!(r.text, "user: x\n");
        // Run as root (the test suite is), the file is root's.
        assert!(r.untrusted.is_empty(), "{:?}", r.untrusted);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = read_file(&f).unwrap().untrusted;
        assert!(matches!(&e[..], [TrustError::Writable { mode: 0o666, .. }]), "{e:?}");
        assert!(e[0].to_string().contains(&format!("chmod go-w {}", f.display())));

        let link = d.path().join("l.yaml");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(matches!(read_file(&link), Err(TrustError::Symlink { .. })));
        let fifo = d.path().join("p.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(read_file(&fifo), Err(TrustError::NotRegular { kind: "FIFO", .. })));
        assert!(read_file(&d.path().join("none.yaml")).err().is_some_and(|e| e.is_not_found()));
    }

    #[test]
    fn directories_down_to_a_file() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("conf");
        std::fs::create_dir_all(top.join("stage")).unwrap();
        let top_c = top.canonicalize().unwrap();
        assert_eq!(dirs_down_to(&top, &top.join("a.yaml")), [top_c.clone()]);
        assert_eq!(dirs_down_to(&top, &top.join("stage/a.yaml")), [top_c.clone(), top_c.join("stage")]);
        assert!(dirs_down_to(&top, &d.path().join("a.yaml")).is_empty());
        std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(matches!(&check_dir(&top)[..], [TrustError::Writable { who: "its group", .. }]));
    }
}
