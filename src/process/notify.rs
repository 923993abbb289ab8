//! The socket a cold-launched `ready: notify` service sends `READY=1` to, as under systemd.

/// The socket a cold-launched `ready: notify` service reports to. Abstract (no file for the
/// service user to reach through root's directories) and named at random per launch; anyone
/// may send to it, so a message counts only if the kernel says it came from the service's tree.
pub struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    /// `$NOTIFY_SOCKET` for the service: `@` and the abstract name.
    pub address: String,
}

impl NotifySocket {
    pub fn bind(service: &str) -> std::io::Result<NotifySocket> {
        use std::os::linux::net::SocketAddrExt;
        let mut random = [0u8; 8];
        // SAFETY: fills the buffer it is given.
        if unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) } != random.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("stasis/{service}/notify/{hex}");
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::PassCred, &true)?;
        Ok(NotifySocket { socket, address: format!("@{name}") })
    }

    /// The socket, to wait on.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.socket)
    }

    /// One datagram, with the host PID of its sender; None when there is none to read.
    pub fn receive(&self) -> Option<(Option<i32>, String)> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixCredentials};
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(UnixCredentials);
        let msg = recvmsg::<()>(self.socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_DONTWAIT).ok()?;
        let pid = msg.cmsgs().ok()?.find_map(|c| match c {
            ControlMessageOwned::ScmCredentials(cr) => Some(cr.pid()),
            _ => None,
        });
        let n = msg.bytes;
        Some((pid, String::from_utf8_lossy(&buf[..n]).into_owned()))
    }
}
