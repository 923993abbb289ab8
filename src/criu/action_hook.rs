//! CRIU's action script (`--action-script`), which is this binary run with no arguments.
//! On `post-dump` it finalizes the pending checkpoint while the service is still frozen: if
//! making it durable fails, the hook exits non-zero and CRIU resumes the service instead of
//! killing it, so a service is never gone without a durable checkpoint.

/// The pending checkpoint directory to finalize; only set for dumps that stop the service.
pub const PENDING_ENV: &str = "STASIS_PENDING_CHECKPOINT";

pub fn main() -> i32 {
    if std::env::var("CRTOOLS_SCRIPT_ACTION").as_deref() != Ok("post-dump") {
        return 0;
    }
    let Some(dir) = std::env::var_os(PENDING_ENV) else {
        return 0;
    };
    let Some(pending) = crate::store::PendingCheckpoint::from_dir(std::path::Path::new(&dir)) else {
        eprintln!("stasis: {} is not a pending checkpoint directory", std::path::Path::new(&dir).display());
        return 1;
    };
    match pending.finalize() {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("stasis: {e}");
            1
        }
    }
}

/// CRIU executes the action script by path with no arguments, so the binary recognises the
/// role from CRIU's environment.
pub fn invoked_as_hook(args: &[std::ffi::OsString]) -> bool {
    args.len() == 1 && std::env::var_os("CRTOOLS_SCRIPT_ACTION").is_some()
}

/// The `--action-script` value that runs this binary's hook.
pub fn script_for(exe: &std::path::Path) -> String {
    exe.display().to_string()
}
