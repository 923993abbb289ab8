use crate::exit_codes;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("failed to find CRIU: no `criu` in PATH or STASIS_CRIU; run `scripts/setup` (as root) to build and install CRIU {min}+")]
    Missing { min: &'static str },
    #[error("failed to use CRIU at {path}: version {found} is too old, stasis needs {min} or newer; run `scripts/setup` to install it")]
    TooOld { path: PathBuf, found: String, min: &'static str },
    #[error("failed to run {path}: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("failed to read CRIU's version from `{path} --version` (printed: {output:?})")]
    Version { path: PathBuf, output: String },
    #[error("failed to {action} with CRIU ({status}); log: {log}{}", render_lines(errors))]
    Failed { action: &'static str, status: String, log: PathBuf, errors: Vec<String> },
}

fn render_lines(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n");
    for l in lines {
        out.push_str("    ");
        out.push_str(l);
        out.push('\n');
    }
    out.pop();
    out
}

impl CriuError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CriuError::Failed { .. } => exit_codes::CHECKPOINT_FAILED,
            _ => exit_codes::ENVIRONMENT,
        }
    }

    /// A one-line form for the kill port's ERROR line and status files.
    pub fn one_line(&self) -> String {
        match self {
            CriuError::Failed { action, status, log, errors } => {
                // The first error is the cause; the later ones are CRIU unwinding.
                let first = errors.iter().find(|l| l.contains("Error")).or(errors.last()).cloned().unwrap_or_default();
                let first = first.split_once("): ").map(|(_, m)| m).unwrap_or(&first);
                format!("failed to {action} with CRIU ({status}): {} (log: {})", first.trim(), log.display())
            }
            other => other.to_string(),
        }
    }
}
