//! Cold launch: clone the namespace init straight into new PID and IPC namespaces, so the
//! supervisor is its parent exactly as it is after a restore, and CRIU can later restore the
//! tree with its own PIDs whatever else the host runs.

use super::ns_init::{self, READY_FD};
use super::LaunchError;
use nix::sched::CloneFlags;
use nix::unistd::Pid;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub init_binary: PathBuf,
    /// The init's own working directory, private to the service: CRIU's parasite creates a
    /// `proc.crtools` directory in the dumped root's cwd, so two services must never share one.
    pub init_dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub working_dir: PathBuf,
    pub command: Vec<String>,
    pub environment: Vec<(String, String)>,
}

const STACK_SIZE: usize = 256 * 1024;

/// Starts the service; returns the host PID of its namespace init once the service command has
/// been executed (or the reason it could not be).
pub fn cold_launch(spec: &LaunchSpec, stdout: BorrowedFd<'_>) -> Result<Pid, LaunchError> {
    let nul = |what| LaunchError::Nul { what };
    let path = CString::new(spec.init_binary.as_os_str().as_encoded_bytes()).map_err(|_| nul("the init path"))?;
    let init_dir =
        CString::new(spec.init_dir.as_os_str().as_encoded_bytes()).map_err(|_| nul("the init's directory"))?;
    let mut argv = vec![path.clone(), CString::new(ns_init::ARGV_MARKER).expect("no NUL")];
    for a in encode_args(spec) {
        argv.push(CString::new(a).map_err(|_| nul("the command"))?);
    }
    // The init runs with a fixed minimal environment; the service's goes through a memfd.
    let envp: Vec<CString> = ns_init::INIT_ENV.iter().map(|e| CString::new(*e).expect("no NUL")).collect();
    let env_fd = environment_memfd(&spec.environment)?;
    let argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|s| s.as_ptr()).chain([std::ptr::null()]).collect();
    let envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|s| s.as_ptr()).chain([std::ptr::null()]).collect();

    let devnull = std::fs::File::open("/dev/null").map_err(LaunchError::DevNull)?;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(LaunchError::Pipe)?;
    let fds = [devnull.as_raw_fd(), stdout.as_raw_fd(), stdout.as_raw_fd(), ready_w.as_raw_fd(), env_fd.as_raw_fd()];

    let mut stack = vec![0u8; STACK_SIZE];
    let child = Box::new(|| -> isize {
        // Only async-signal-safe calls between clone and exec: the parent may have other threads.
        // SAFETY: plain syscalls on fds and pointers that stay valid in the (copied) child.
        unsafe {
            // Each source first moved above the targets: one that already sits on a target
            // number (a supervisor whose low fds were freed, as after a failed lazy restore)
            // would otherwise be overwritten before it is copied (the service then got
            // ready_w where its environment should be, and started with none).
            let mut high = [0i32; 5];
            for (i, fd) in fds.iter().enumerate() {
                high[i] = libc::fcntl(*fd, libc::F_DUPFD, 16);
                if high[i] < 0 {
                    libc::_exit(126);
                }
            }
            for (target, fd) in high.iter().enumerate() {
                if libc::dup2(*fd, target as i32) < 0 {
                    libc::_exit(126);
                }
            }
            // Anything else the supervisor inherited (a shell's stray fd) would end up in every
            // checkpoint, and CRIU refuses files it cannot resolve.
            libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32);
            // The supervisor's 077 is for root's files; the service gets the usual 022 (systemd's
            // default), the same whoever started it.
            libc::umask(0o022);
            if libc::chdir(init_dir.as_ptr()) < 0 {
                let msg = b"error failed to enter the service's state directory\n";
                libc::write(READY_FD, msg.as_ptr().cast(), msg.len());
                libc::_exit(126);
            }
            libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
            let msg = b"error failed to execute the namespace init\n";
            libc::write(READY_FD, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    });
    // SAFETY: the callback only makes async-signal-safe calls (see above).
    let pid = unsafe {
        nix::sched::clone(child, &mut stack, CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC, Some(libc::SIGCHLD))
    }
    .map_err(LaunchError::Clone)?;
    drop(ready_w);
    let report = read_report(ready_r);
    match report.strip_prefix("ok") {
        Some(_) => Ok(pid),
        None => {
            let reason = report.strip_prefix("error ").unwrap_or(&report).trim().to_string();
            let reason =
                if reason.is_empty() { "the namespace init exited before starting it".to_string() } else { reason };
            reap_quietly(pid);
            Err(LaunchError::ExecService { program: spec.command.first().cloned().unwrap_or_default(), reason })
        }
    }
}

/// `KEY=VALUE\0` for each variable, in a sealed-off anonymous file the init reads once.
fn environment_memfd(env: &[(String, String)]) -> Result<OwnedFd, LaunchError> {
    use std::io::{Seek, Write};
    let name = c"stasis-service-env";
    // SAFETY: memfd_create with a valid C string; the fd is owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(LaunchError::Environment(std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor nothing else owns.
    let mut f = std::fs::File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    for (k, v) in env {
        if k.contains('\0') || v.contains('\0') {
            return Err(LaunchError::Nul { what: "the environment" });
        }
        f.write_all(format!("{k}={v}\0").as_bytes()).map_err(LaunchError::Environment)?;
    }
    f.rewind().map_err(LaunchError::Environment)?;
    Ok(OwnedFd::from(f))
}

fn read_report(fd: OwnedFd) -> String {
    let mut s = String::new();
    let _ = std::fs::File::from(fd).read_to_string(&mut s);
    s
}

/// The init exits on its own once its command failed; collect it so no zombie stays.
fn reap_quietly(pid: Pid) {
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(pid, None);
}

/// The arguments after the marker, as `cold_launch` passes them.
fn encode_args(spec: &LaunchSpec) -> Vec<Vec<u8>> {
    let groups = spec.groups.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut v: Vec<Vec<u8>> = vec![
        spec.uid.to_string().into_bytes(),
        spec.gid.to_string().into_bytes(),
        groups.into_bytes(),
        spec.working_dir.as_os_str().as_bytes().to_vec(),
    ];
    v.extend(spec.command.iter().map(|a| a.clone().into_bytes()));
    v
}
