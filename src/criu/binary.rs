//! Locating the `criu` binary and checking its version: once per process, and once per binary
//! through a small cache in the state directory.

use super::CriuError;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const MIN_VERSION: &str = "4.2";
/// root's usual sbin dirs, in case the caller's PATH lacks them (sudo without secure_path, cron).
const EXTRA_DIRS: &str = "/usr/local/sbin:/usr/sbin:/sbin";

#[derive(Debug, Clone)]
pub struct Criu {
    pub path: PathBuf,
    pub version: String,
}

static FOUND: OnceLock<Result<Criu, String>> = OnceLock::new();

impl Criu {
    /// The CRIU to use: `$STASIS_CRIU`, else `criu` in PATH; version-checked the first time.
    /// The version `criu --version` printed is remembered in `cache` for as long as the binary is the same file (device, inode, size, mtime, ctime): running
    /// criu costs milliseconds on every start, reading the cache microseconds.
    pub fn get_cached(cache: &Path) -> Result<Criu, CriuError> {
        let found = FOUND.get_or_init(|| Criu::locate_cached(cache).map_err(|e| e.to_string()));
        match found {
            Ok(c) => Ok(c.clone()),
            Err(_) => Criu::locate_cached(cache),
        }
    }

    fn locate_cached(cache: &Path) -> Result<Criu, CriuError> {
        let path = Criu::find()?;
        let key = file_key(&path);
        let remembered = std::fs::read(cache).ok().and_then(|b| serde_json::from_slice::<CachedVersion>(&b).ok());
        if let (Some(key), Some(c)) = (&key, remembered) {
            if c.path == path && &c.key == key && at_least(&c.version, MIN_VERSION) {
                return Ok(Criu { path, version: c.version });
            }
        }
        let criu = Criu::check(path)?;
        if let Some(key) = key {
            let entry = CachedVersion { path: criu.path.clone(), key, version: criu.version.clone() };
            if let Some(dir) = cache.parent() {
                let _ = crate::store::durable::create_dir_with_mode(dir, 0o700);
            }
            let _ = crate::store::durable::write_atomic_with(
                cache,
                &serde_json::to_vec(&entry).unwrap_or_default(),
                crate::store::durable::Durability::None,
            );
        }
        Ok(criu)
    }

    fn find() -> Result<PathBuf, CriuError> {
        Ok(match std::env::var_os("STASIS_CRIU") {
            Some(p) => PathBuf::from(p),
            None => {
                let path = std::env::var("PATH").unwrap_or_default();
                let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
                which::which_in("criu", Some(format!("{path}:{EXTRA_DIRS}")), cwd)
                    .map_err(|_| CriuError::Missing { min: MIN_VERSION })?
            }
        })
    }

    /// Runs `criu --version` and checks it is new enough.
    fn check(path: PathBuf) -> Result<Criu, CriuError> {
        let out = Command::new(&path)
            .arg("--version")
            .output()
            .map_err(|source| CriuError::Spawn { path: path.clone(), source })?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let version =
            parse_version(&text).ok_or_else(|| CriuError::Version { path: path.clone(), output: text.clone() })?;
        if !at_least(&version, MIN_VERSION) {
            return Err(CriuError::TooOld { path, found: version, min: MIN_VERSION });
        }
        Ok(Criu { path, version })
    }
}

/// What `criu --version` printed, and for which file.
#[derive(serde::Serialize, serde::Deserialize)]
struct CachedVersion {
    path: PathBuf,
    key: String,
    version: String,
}

/// Changes whenever the file at `path` is replaced or rewritten.
pub(super) fn file_key(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}:{}:{}:{}.{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// What `criu check --feature mem_dirty_track` said for one CRIU binary on one boot.
#[derive(serde::Serialize, serde::Deserialize)]
struct DirtyProbe {
    path: std::path::PathBuf,
    key: String,
    boot: String,
    tracks: bool,
}

impl Criu {
    /// Whether the kernel tracks written pages for this CRIU (soft-dirty), which incremental
    /// dumps need: asked once per CRIU binary and boot (remembered in `cache`), the asking
    /// bounded by `limit` (a criu that does not answer in time counts as no, and is not
    /// remembered).
    pub fn tracks_dirty_memory(&self, cache: &Path, limit: std::time::Duration) -> bool {
        let key = file_key(&self.path);
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string();
        let remembered = std::fs::read(cache).ok().and_then(|b| serde_json::from_slice::<DirtyProbe>(&b).ok());
        if let (Some(k), Some(p)) = (&key, &remembered) {
            if p.path == self.path && &p.key == k && p.boot == boot {
                return p.tracks;
            }
        }
        let Some(tracks) = self.check_dirty_tracking(limit) else { return false };
        if let Some(key) = key {
            if let Some(dir) = cache.parent() {
                let _ = crate::store::durable::create_dir_with_mode(dir, 0o700);
            }
            let entry = DirtyProbe { path: self.path.clone(), key, boot, tracks };
            let _ = crate::store::durable::write_atomic_with(
                cache,
                &serde_json::to_vec(&entry).unwrap_or_default(),
                crate::store::durable::Durability::None,
            );
        }
        tracks
    }

    /// `criu check --feature mem_dirty_track`, ended at `limit`: None when it did not answer.
    fn check_dirty_tracking(&self, limit: std::time::Duration) -> Option<bool> {
        let mut child = Command::new(&self.path)
            .args(["check", "--feature", "mem_dirty_track"])
            .env_clear()
            .env("PATH", crate::config::DEFAULT_PATH)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        if !crate::process::tree::exits_within(child.id() as i32, limit) {
            tracing::warn!(
                "{} check --feature mem_dirty_track did not answer within {limit:?}; killed it",
                self.path.display()
            );
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        child.wait().ok().map(|s| s.success())
    }
}

fn parse_version(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("Version:")).map(|v| v.trim().to_string())
}

fn at_least(version: &str, min: &str) -> bool {
    let nums = |s: &str| s.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    nums(version) >= nums(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("Version: 4.2.1\n").as_deref(), Some("4.2.1"));
        assert!(at_least("4.2.1", "4.2"));
        assert!(at_least("4.10", "4.2"));
        assert!(!at_least("3.17.1", "4.2"));
        assert!(!at_least("4.1.1", "4.2"));
    }
}
