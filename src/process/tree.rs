//! Reading the service's process tree from /proc.

/// The inode of the pipe that is fd 1 of `pid`, if fd 1 is a pipe.
pub fn stdout_pipe_inode(pid: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/1")).ok()?;
    let s = link.to_str()?;
    s.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok()
}

/// The service's main process: the child of the namespace init with the lowest PID inside the
/// namespace (the command the init started, or the oldest survivor once a daemon forked away).
pub fn main_pid(init_pid: i32) -> Option<i32> {
    let all = procfs::process::all_processes().ok()?;
    all.filter_map(Result::ok)
        .filter(|p| p.stat().is_ok_and(|s| s.ppid == init_pid))
        .map(|p| {
            let inner = p.status().ok().and_then(|s| s.nspid).and_then(|v| v.last().copied()).unwrap_or(p.pid);
            (inner, p.pid)
        })
        .min()
        .map(|(_, host)| host)
}
