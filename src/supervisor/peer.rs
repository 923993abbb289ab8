//! Who is on the other end of a kill-port connection. Both ends are on this host (loopback), so
//! the client's socket is this host's: the socket whose local address is the connection's peer
//! and whose remote address is the kill port carries the uid that created it and its inode.
//! The kernel is asked for that one socket (sock_diag); `/proc/net/tcp` is the fallback, read
//! only if sock_diag is unavailable: it walks the whole TCP hash table, ~4 ms here even empty.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub inode: u64,
    /// The TCP state of the client's socket (`TCP_ESTABLISHED` is 1).
    pub state: u8,
}

const TCP_ESTABLISHED: u8 = 1;

impl Peer {
    /// Whether this is a live socket that a process owns. A client that closed at once leaves a
    /// time-wait or orphaned entry that the kernel reports with uid 0 and inode 0: it must never
    /// pass for root.
    pub fn is_live(&self) -> bool {
        self.state == TCP_ESTABLISHED && self.inode != 0
    }
}

/// The owner of the client socket of a loopback connection from `peer` to `local`.
pub fn lookup(local: SocketAddr, peer: SocketAddr) -> Option<Peer> {
    let (SocketAddr::V4(local), SocketAddr::V4(peer)) = (local, peer) else { return None };
    match sock_diag(local, peer) {
        Ok(found) => found,
        Err(_) => {
            let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
            find(&table, local, peer)
        }
    }
}

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_HDR: usize = 16;
/// struct inet_diag_req_v2: family, protocol, ext, pad, states, then struct inet_diag_sockid.
const REQ_LEN: usize = 56;
/// struct inet_diag_msg up to idiag_inode (uid at 64, inode at 68).
const MSG_LEN: usize = 72;

/// A NETLINK_SOCK_DIAG socket that has sent `req` to the kernel; the replies are read from it.
pub(super) fn ask_sock_diag(req: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the buffer is valid for its length; the kernel is the destination (zeroed sockaddr_nl).
    let sent = unsafe {
        let mut to: libc::sockaddr_nl = std::mem::zeroed();
        to.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent != req.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// One exact lookup through NETLINK_SOCK_DIAG: the TCP socket whose local end is `peer` and
/// whose remote end is `local`. Ok(None): the kernel has no such socket (the client is gone).
fn sock_diag(local: SocketAddrV4, peer: SocketAddrV4) -> std::io::Result<Option<Peer>> {
    use std::os::fd::AsRawFd;
    let fd = ask_sock_diag(&request(local, peer))?;
    let mut buf = [0u8; 512];
    // SAFETY: recv into a buffer we own, within its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    parse_reply(&buf[..n as usize])
}

fn request(local: SocketAddrV4, peer: SocketAddrV4) -> Vec<u8> {
    let mut r = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
    r.extend(((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    r.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r.extend((libc::NLM_F_REQUEST as u16).to_ne_bytes());
    r.extend(1u32.to_ne_bytes()); // sequence
    r.extend(0u32.to_ne_bytes()); // port id: the kernel's
    r.extend([libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    r.extend(u32::MAX.to_ne_bytes()); // every state
                                      // inet_diag_sockid, as the socket sees itself: source = its local end (the client's).
    r.extend(peer.port().to_be_bytes());
    r.extend(local.port().to_be_bytes());
    r.extend(peer.ip().octets());
    r.extend([0u8; 12]);
    r.extend(local.ip().octets());
    r.extend([0u8; 12]);
    r.extend(0u32.to_ne_bytes()); // any interface
    r.extend([0xffu8; 8]); // INET_DIAG_NOCOOKIE
    r
}

fn parse_reply(buf: &[u8]) -> std::io::Result<Option<Peer>> {
    let u32_at = |at: usize| -> Option<u32> { Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?)) };
    let kind = buf.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    match kind {
        Some(SOCK_DIAG_BY_FAMILY) if buf.len() >= NLMSG_HDR + MSG_LEN => {
            let (uid, inode) = (u32_at(NLMSG_HDR + 64), u32_at(NLMSG_HDR + 68));
            let state = buf[NLMSG_HDR + 1];
            Ok(uid.zip(inode).map(|(uid, inode)| Peer { uid, inode: u64::from(inode), state }))
        }
        Some(t) if t == libc::NLMSG_ERROR as u16 => {
            let errno = u32_at(NLMSG_HDR).map_or(0, |e| -(e as i32));
            if errno == libc::ENOENT {
                Ok(None)
            } else {
                Err(std::io::Error::from_raw_os_error(errno))
            }
        }
        _ => Err(std::io::Error::other("unexpected sock_diag reply")),
    }
}

pub(super) fn find(table: &str, local: SocketAddrV4, peer: SocketAddrV4) -> Option<Peer> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 || parse_addr(f[1])? != peer || parse_addr(f[2])? != local {
            return None;
        }
        Some(Peer { uid: f[7].parse().ok()?, inode: f[9].parse().ok()?, state: u8::from_str_radix(f[3], 16).ok()? })
    })
}

/// `0100007F:1F90` (address as a native-endian u32 in hex, port in hex) -> 127.0.0.1:8080.
fn parse_addr(s: &str) -> Option<SocketAddrV4> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_ne_bytes()), port))
}

/// A process holding the socket `inode` (for the log of a refusal); a scan, so only on refusals.
pub fn pid_of_socket(inode: u64) -> Option<i32> {
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(e.path().join("fd")).ok()?;
        fds.filter_map(Result::ok)
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
            .then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_diag_and_proc_net_tcp_name_the_same_owner_of_a_real_connection() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (accepted, peer) = server.accept().unwrap();
        let (SocketAddr::V4(local), SocketAddr::V4(peer)) = (accepted.local_addr().unwrap(), peer) else { panic!() };
        let fast = sock_diag(local, peer).expect("sock_diag works here").expect("the client socket is found");
        let slow = find(&std::fs::read_to_string("/proc/net/tcp").unwrap(), local, peer).unwrap();
        assert_eq!(fast, slow);
        assert_eq!(fast.uid, nix::unistd::getuid().as_raw());
        assert!(fast.is_live());
        drop(client);
        // The closed client lingers as an orphan (no inode) until the server closes too.
        let after = sock_diag(local, peer).unwrap();
        assert!(after.is_none_or(|p| !p.is_live()), "a closed client is not live: {after:?}");
        let gone = SocketAddrV4::new(*peer.ip(), peer.port().wrapping_add(1));
        assert_eq!(sock_diag(local, gone).unwrap(), None, "no such socket");
    }

    #[test]
    fn finds_the_client_side_of_a_loopback_connection() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1CE8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0 100 0 0 10 0
   1: 0100007F:1CE8 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0 20 4 30 10 -1
   2: 0100007F:D431 0100007F:1CE8 01 00000000:00000000 00:00000000 00000000 65534        0 3333 1 0 20 4 30 10 -1
";
        let kill: SocketAddrV4 = "127.0.0.1:7400".parse().unwrap();
        let client: SocketAddrV4 = "127.0.0.1:54321".parse().unwrap();
        assert_eq!(find(table, kill, client), Some(Peer { uid: 65534, inode: 3333, state: 1 }));
        let closed = table.replace(
            " 01 00000000:00000000 00:00000000 00000000 65534        0 3333",
            " 06 00000000:00000000 00:00000000 00000000     0        0 0",
        );
        let entry = find(&closed, kill, client).unwrap();
        assert!(!entry.is_live(), "a time-wait entry (uid 0, inode 0) is no owner: {entry:?}");
    }

    #[test]
    fn looks_up_a_real_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let found = lookup(s.local_addr().unwrap(), peer).expect("the client socket is in /proc/net/tcp");
        assert_eq!(found.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(pid_of_socket(found.inode), Some(std::process::id() as i32));
        drop(c);
    }
}
