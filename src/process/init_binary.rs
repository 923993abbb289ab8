//! The namespace init is this binary, but run from a content-addressed copy under the state
//! dir (`bin/stasis-init-<sha256>`). Every checkpoint maps that file; because a copy is never
//! changed or replaced, rebuilding or upgrading stasis cannot make an existing checkpoint
//! unrestorable.

use super::LaunchError;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Returns the path of the init copy matching the running binary, creating it if needed.
pub fn install(bin_dir: &Path) -> Result<PathBuf, LaunchError> {
    let exe =
        std::env::current_exe().map_err(|source| LaunchError::InstallInit { path: "/proc/self/exe".into(), source })?;
    let bytes = fs::read(&exe).map_err(|source| LaunchError::InstallInit { path: exe.clone(), source })?;
    let digest = Sha256::digest(&bytes);
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    let target = bin_dir.join(format!("stasis-init-{hex}"));
    if target.is_file() {
        return Ok(target);
    }
    let err = |source| LaunchError::InstallInit { path: target.clone(), source };
    fs::create_dir_all(bin_dir).map_err(err)?;
    fs::set_permissions(bin_dir, fs::Permissions::from_mode(0o755)).map_err(err)?;
    let tmp = bin_dir.join(format!(".stasis-init-{hex}.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o755).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &target)?;
        fs::File::open(bin_dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err(e)
    })?;
    Ok(target)
}
