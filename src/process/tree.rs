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

/// The host PIDs of `root` and every process below it.
pub fn descendants(root: i32) -> Vec<i32> {
    let Ok(all) = procfs::process::all_processes() else { return vec![root] };
    let parents: Vec<(i32, i32)> =
        all.filter_map(Result::ok).filter_map(|p| Some((p.pid, p.stat().ok()?.ppid))).collect();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(pid, _)| *pid));
        i += 1;
    }
    out
}

/// Every file the tree under `root` maps executable (its programs, the init, shared libraries),
/// sorted and without duplicates. Deleted files are left out: CRIU carries their contents itself.
pub fn executable_mappings(root: i32) -> Vec<std::path::PathBuf> {
    let mut out: Vec<std::path::PathBuf> = Vec::new();
    for pid in descendants(root) {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { continue };
        for line in maps.lines() {
            // address perms offset dev inode path
            let mut f = line.split_whitespace();
            let perms = f.nth(1).unwrap_or("");
            let inode = f.nth(2).unwrap_or("0");
            let path: String = f.collect::<Vec<_>>().join(" ");
            if perms.contains('x') && inode != "0" && path.starts_with('/') && !path.ends_with(" (deleted)") {
                out.push(path.into());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Executables of running processes that live in `dir`.
pub fn executables_in_use_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| std::fs::read_link(e.path().join("exe")).ok())
        .filter(|p| p.parent() == Some(dir))
        .collect()
}

/// Whether `pid` (a child of ours) is still alive rather than gone or a zombie.
pub fn alive(pid: i32) -> bool {
    procfs::process::Process::new(pid).and_then(|p| p.stat()).is_ok_and(|s| s.state != 'Z' && s.state != 'X')
}

/// Host PIDs of the direct children of `parent`.
pub fn children_of(parent: i32) -> Vec<i32> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.filter_map(Result::ok).filter(|p| p.stat().is_ok_and(|s| s.ppid == parent)).map(|p| p.pid).collect()
}

/// Sends `signal` to `pid` only if it is still a child of `parent`, through a pidfd so a pid
/// reused in between is never hit.
pub fn kill_if_child_of(pid: i32, parent: i32, signal: i32) {
    // SAFETY: pidfd_open has no memory arguments; the fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return;
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let still_child = procfs::process::Process::new(pid).and_then(|p| p.stat()).is_ok_and(|s| s.ppid == parent);
    if still_child {
        // SAFETY: signals the process the pidfd refers to, which was verified above.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}
