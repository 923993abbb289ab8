//! Locating the `criu` binary and checking its version, once per process.

use super::CriuError;
use std::path::PathBuf;
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
    pub fn get() -> Result<Criu, CriuError> {
        let found = FOUND.get_or_init(|| Criu::locate().map_err(|e| e.to_string()));
        match found {
            Ok(c) => Ok(c.clone()),
            Err(_) => Criu::locate(),
        }
    }

    fn locate() -> Result<Criu, CriuError> {
        let path = match std::env::var_os("STASIS_CRIU") {
            Some(p) => PathBuf::from(p),
            None => {
                let path = std::env::var("PATH").unwrap_or_default();
                let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
                which::which_in("criu", Some(format!("{path}:{EXTRA_DIRS}")), cwd)
                    .map_err(|_| CriuError::Missing { min: MIN_VERSION })?
            }
        };
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
