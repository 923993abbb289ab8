//! Reading the service's process tree from /proc.

use crate::proc_maps as maps;
use crate::store::safe_open::{open_mapped, UnsafeFile};
use crate::store::tree_files::{ShmHandle, TreeFd};

/// The inode of the pipe that is fd 1 of `pid`, if fd 1 is a pipe.
pub fn stdout_pipe_inode(pid: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/1")).ok()?;
    let s = link.to_str()?;
    s.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok()
}

/// The service's main process: the child of the namespace init with the lowest PID inside the
/// namespace (the command the init started, or the oldest survivor once a daemon forked away).
pub fn main_pid(init_pid: i32) -> Option<i32> {
    children_of(init_pid)
        .into_iter()
        .filter_map(|pid| procfs::process::Process::new(pid).ok())
        .map(|p| {
            let inner = p.status().ok().and_then(|s| s.nspid).and_then(|v| v.last().copied()).unwrap_or(p.pid);
            (inner, p.pid)
        })
        .min()
        .map(|(_, host)| host)
}

/// The host PIDs of `root` and every process below it.
/// Resident memory of one process (`VmRSS`), 0 if it is gone.
pub fn resident_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

pub fn descendants(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(children_of(parent));
        i += 1;
    }
    out
}

/// The mappings of `pid`, parsed by columns (see `maps`); none if it is gone.
fn mappings(pid: i32) -> Vec<maps::Mapping> {
    std::fs::read(format!("/proc/{pid}/maps")).map(|text| maps::parse(&text)).unwrap_or_default()
}

/// Every file the tree under `root` maps executable (its programs, the init, shared libraries),
/// with the process that maps it, sorted by path and without duplicates. Deleted files are left
/// out: CRIU carries their contents itself.
pub fn executable_mappings(root: i32) -> Vec<(i32, maps::Mapping)> {
    let mut out: Vec<(i32, maps::Mapping)> = Vec::new();
    for pid in descendants(root) {
        for m in mappings(pid) {
            if m.executable() && m.inode != 0 && m.path.is_some() && !m.deleted {
                out.push((pid, m));
            }
        }
    }
    out.sort_by(|a, b| a.1.path.cmp(&b.1.path));
    out.dedup_by(|a, b| a.1.path == b.1.path);
    out
}

/// Files under /dev/shm that the tree under `root` maps or holds open (POSIX shared memory),
/// sorted and without duplicates; deleted ones are left out (CRIU keeps those itself).
pub fn shm_handles(root: i32) -> Vec<ShmHandle> {
    let mut out: Vec<ShmHandle> = Vec::new();
    let wanted = |p: &std::path::Path| p.starts_with("/dev/shm/");
    for pid in descendants(root) {
        for m in mappings(pid) {
            match &m.path {
                Some(path) if wanted(path) && !m.deleted && m.inode != 0 => out.push(ShmHandle {
                    path: path.clone(),
                    handle: format!("/proc/{pid}/map_files/{}", m.map_files_entry()).into(),
                    expect: Some((m.dev(), m.inode)),
                }),
                _ => {}
            }
        }
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.filter_map(Result::ok) {
                let Ok(target) = std::fs::read_link(fd.path()) else { continue };
                if wanted(&target) && !target.as_os_str().as_encoded_bytes().ends_with(b" (deleted)") {
                    out.push(ShmHandle { path: target, handle: fd.path(), expect: None });
                }
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup_by(|a, b| a.path == b.path);
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

/// Host PIDs of the direct children of `parent`: from the kernel's per-thread children lists,
/// which costs one read per thread instead of a scan of every process on the host.
pub fn children_of(parent: i32) -> Vec<i32> {
    let listed: Option<Vec<i32>> = std::fs::read_dir(format!("/proc/{parent}/task")).ok().map(|tasks| {
        tasks
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<i32>>())
            .collect()
    });
    match listed {
        Some(v) if std::path::Path::new(&format!("/proc/{parent}/task/{parent}/children")).exists() => v,
        // A kernel without CONFIG_PROC_CHILDREN: scan.
        _ => procfs::process::all_processes()
            .map(|all| {
                all.filter_map(Result::ok).filter(|p| p.stat().is_ok_and(|s| s.ppid == parent)).map(|p| p.pid).collect()
            })
            .unwrap_or_default(),
    }
}

/// Sends `signal` to `pid` only if it is still a child of `parent`, through a pidfd so a pid
/// reused in between is never hit.
pub fn kill_if_child_of(pid: i32, parent: i32, signal: i32) {
    let Some(fd) = pidfd(pid) else { return };
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

/// A pidfd for `pid` (readable once it exits), or None on a kernel without pidfd_open.
pub fn pidfd(pid: i32) -> Option<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open has no memory arguments; the fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    // SAFETY: a new descriptor nothing else owns.
    (fd >= 0).then(|| unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Waits for our child `pid` to exit (without reaping it) for at most `limit`, on a pidfd: no
/// polling.
/// SIGKILLs the process `pidfd` refers to (one the caller has verified is the one it means) and
/// waits up to `limit` for it to be gone.
pub fn kill_pidfd_and_wait(pidfd: &std::os::fd::OwnedFd, limit: std::time::Duration) {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal with no siginfo, on a descriptor we own.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = limit.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one pollfd we own; a pidfd is readable once its process has exited.
    unsafe { libc::poll(&mut p, 1, ms) };
}

pub fn exits_within(pid: i32, limit: std::time::Duration) -> bool {
    // No pidfd (very old kernel): wait without a deadline rather than kill a healthy dump.
    let Some(fd) = pidfd(pid) else { return true };
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&fd), events: libc::POLLIN, revents: 0 };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return true;
        }
        if n == 0 {
            return false;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return true;
        }
    }
}

/// A file of a particular process's /proc directory (`/proc/1234/stat`) that some process of the
/// tree under `root` has open: it names a host PID that a restore cannot give back.
pub fn open_pid_proc_file(root: i32) -> Option<(i32, std::path::PathBuf)> {
    descendants(root).into_iter().find_map(|pid| {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        fds.filter_map(Result::ok).filter_map(|fd| std::fs::read_link(fd.path()).ok()).find_map(|target| {
            let mut parts = target.strip_prefix("/proc").ok()?.components();
            let first = parts.next()?.as_os_str().to_str()?;
            first.bytes().all(|b| b.is_ascii_digit()).then(|| (pid, target.clone()))
        })
    })
}

/// The identity of every executable the tree under `root` maps, for a manifest. Each file is
/// read through its mapping (`safe_open::open_mapped`), never by its path, so nothing planted
/// at a look-alike path is opened. A mapping that vanished, is not a regular file, or is no
/// longer the file maps named (the tree runs on) is left out: CRIU keeps deleted files'
/// contents in the images and checks the others itself. A file too large or too slow to read
/// before `deadline` fails the whole list, naming it.
pub fn executable_identities(
    root: i32,
    cache: &mut crate::store::identity::HashCache,
    deadline: Option<std::time::Instant>,
) -> Result<Vec<crate::store::FileIdentity>, UnsafeFile> {
    let mut out = Vec::new();
    for (pid, m) in executable_mappings(root) {
        let opened = open_mapped(pid, &m).and_then(|(file, meta)| {
            let label = m.path.clone().unwrap_or_default();
            cache.identify_open(&label, &file, &meta, deadline)
        });
        match opened {
            Ok(id) => out.push(id),
            Err(e @ (UnsafeFile::TooLarge { .. } | UnsafeFile::Deadline { .. } | UnsafeFile::Read { .. })) => {
                return Err(e)
            }
            Err(e) => tracing::warn!("left out of the executables' identities: {e}"),
        }
    }
    Ok(out)
}

/// Every descriptor of every process of the tree under `root`.
pub fn tree_fds(root: i32) -> Vec<TreeFd> {
    let mut out = Vec::new();
    for pid in descendants(root) {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for e in entries.filter_map(Result::ok) {
            let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(target) = std::fs::read_link(e.path()) else { continue };
            let Some(flags) = fd_flags(pid, fd) else { continue };
            out.push(TreeFd { pid, fd, target, flags });
        }
    }
    out
}

/// The `flags:` line of `/proc/PID/fdinfo/FD` (octal).
fn fd_flags(pid: i32, fd: u32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let v = text.lines().find_map(|l| l.strip_prefix("flags:"))?;
    i32::from_str_radix(v.trim(), 8).ok()
}
