//! The namespace init is the small `stasis-init` program (or, without it, this binary), run from
//! a content-addressed copy under the state dir (`bin/stasis-init-<blake3>`). Every checkpoint maps that file; because a good copy is never
//! changed or replaced, rebuilding or upgrading stasis cannot make an existing checkpoint
//! unrestorable.
//!
//! Before each use the copy is checked against its name (through the hash cache, so an intact
//! copy is not re-read); a damaged one is re-created from the init program. Concurrent installs
//! have one winner: each writes a private temporary file, closes it, and links it into place,
//! which fails if another got there first; nobody execs a file that is open for writing.

use super::LaunchError;
use crate::store::identity::HashCache;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub const PREFIX: &str = "stasis-init-";
/// Hex digits of the content hash in the file name.
const NAME_HEX: usize = 24;

/// What `install` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    Existing(PathBuf),
    Created(PathBuf),
    /// The copy was damaged (the text says how) and has been re-created from the init program.
    Repaired(PathBuf, String),
}

impl Installed {
    pub fn path(&self) -> &Path {
        match self {
            Installed::Existing(p) | Installed::Created(p) | Installed::Repaired(p, _) => p,
        }
    }
}

/// Where the init program comes from: the small `stasis-init` beside this binary (a build
/// tree) or in `PREFIX/lib/stasis/` (an install), else this binary itself (`stasis __ns-init`).
pub fn source() -> Result<PathBuf, LaunchError> {
    let exe =
        std::env::current_exe().map_err(|source| LaunchError::InstallInit { path: "/proc/self/exe".into(), source })?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let candidates = [dir.join("stasis-init"), dir.join("../lib/stasis/stasis-init")];
    Ok(candidates.into_iter().find(|p| p.is_file()).unwrap_or(exe))
}

/// Returns a verified copy of the init program, creating or repairing it as needed.
pub fn install(bin_dir: &Path, cache: &mut HashCache) -> Result<Installed, LaunchError> {
    let exe = source()?;
    let me = cache.identify(&exe).map_err(|source| LaunchError::InstallInit { path: exe.clone(), source })?;
    let target = bin_dir.join(format!("{PREFIX}{}", &me.hash[..NAME_HEX]));
    let err = |source| LaunchError::InstallInit { path: target.clone(), source };
    let damage = match cache.identify(&target) {
        Ok(copy) if copy.hash == me.hash => return Ok(Installed::Existing(target)),
        Ok(copy) => Some(format!(
            "{} was damaged ({} bytes, expected {}; its content does not match its name)",
            target.display(),
            copy.size,
            me.size
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("{} could not be read ({e})", target.display())),
    };
    fs::create_dir_all(bin_dir).map_err(err)?;
    fs::set_permissions(bin_dir, fs::Permissions::from_mode(0o755)).map_err(err)?;
    let tmp = bin_dir.join(format!(".{PREFIX}{}.{}", &me.hash[..NAME_HEX], std::process::id()));
    let write = || -> std::io::Result<()> {
        // Streamed through the hasher: the binary is never held in memory whole.
        let mut src = fs::File::open(&exe)?;
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o755).open(&tmp)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut src, &mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            f.write_all(&buf[..n])?;
        }
        if hasher.finalize().to_hex().as_str() != me.hash {
            return Err(std::io::Error::other("the init program changed while it was copied; try again"));
        }
        // Exactly 0755 whatever the umask (the supervisor's is 077, the CLI's the caller's): CRIU
        // checks a mapped file's mode at restore, and a copy made by `import` on another host must
        // match one made by a supervisor here.
        f.set_permissions(fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
        drop(f);
        match &damage {
            // A damaged copy maps into no running process (a running executable cannot be
            // written), so replacing it is safe.
            Some(_) => fs::rename(&tmp, &target)?,
            None => match fs::hard_link(&tmp, &target) {
                Ok(()) => fs::remove_file(&tmp)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => fs::remove_file(&tmp)?,
                Err(e) => return Err(e),
            },
        }
        fs::File::open(bin_dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err(e)
    })?;
    // Whoever won a race, the file in place must be right.
    let copy = cache.identify(&target).map_err(err)?;
    if copy.hash != me.hash {
        return Err(err(std::io::Error::other("the installed copy does not match the init program")));
    }
    Ok(match damage {
        Some(why) => Installed::Repaired(target, why),
        None => Installed::Created(target),
    })
}

/// Deletes init copies that nothing needs: not `keep`, not mapped by a running process, and not
/// installed within `min_age` (a start of another build may be about to exec it). Returns them.
pub fn collect_garbage(bin_dir: &Path, keep: &[PathBuf], min_age: Duration) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(bin_dir) else { return Vec::new() };
    let running = super::tree::executables_in_use_under(bin_dir);
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for e in rd.filter_map(Result::ok) {
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with(PREFIX) || keep.contains(&path) || running.contains(&path) {
            continue;
        }
        let young = e
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| now.duration_since(t).unwrap_or_default() < min_age)
            .unwrap_or(true);
        if !young && fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}
