//! Config errors: every problem names the file, the line when known, the key path and a fix.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    /// 1-based line of the key, when it could be found.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `criu.config` or `command[0]`; empty for the document itself.
    pub key: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to find service {name}: {path} does not exist (create it, or pass --config-dir / set STASIS_CONFIG_DIR)")]
    NotFound { name: String, path: PathBuf },
    #[error("failed to list service files in {dir}: {source}")]
    ListDir { dir: PathBuf, source: std::io::Error },
    #[error("{}", render_invalid(path, problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
    #[error("failed to use {path}: service file names must be NAME.yaml with NAME made of a-z, 0-9, '-', '_' or '.', starting with a letter or digit, at most 63 characters, without `..`")]
    BadFileName { path: PathBuf },
    /// A file stasis would act on as root that is not root's alone, or not a plain file.
    #[error(transparent)]
    Untrusted(#[from] super::trust::TrustError),
    #[error("failed to use {name:?} as a service name: names are 1 to 63 of a-z, 0-9, '-', '_' and '.', starting with a letter or digit, without `..` or `/` (to check a file elsewhere, use `stasis validate PATH`)")]
    BadName { name: String },
}

impl ConfigError {
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Invalid { problems, .. } => problems.clone(),
            other => vec![Problem { line: None, key: String::new(), message: other.to_string() }],
        }
    }
}

fn render_invalid(path: &std::path::Path, problems: &[Problem]) -> String {
    let mut out = format!("invalid service file {}:", path.display());
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&p.to_string());
    }
    out
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.key.is_empty()) {
            (Some(l), false) => write!(f, "line {l}, key `{}`: {}", self.key, self.message),
            (Some(l), true) => write!(f, "line {l}: {}", self.message),
            (None, false) => write!(f, "key `{}`: {}", self.key, self.message),
            (None, true) => write!(f, "{}", self.message),
        }
    }
}
