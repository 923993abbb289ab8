//! Who holds a TCP port on loopback: named when a kill port cannot be bound, so the operator
//! learns the pid and user instead of running `ss` themselves. The kernel lists the sockets
//! bound to the port (NETLINK_SOCK_DIAG, a dump of IPv4 and IPv6 TCP sockets in every state
//! but TIME_WAIT, which has no owner); the socket's inode is then found among the fds in /proc.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

/// A socket bound to the port, and what is known of its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The uid that created the socket.
    pub uid: u32,
    pub inode: u64,
    pub listening: bool,
    /// A process holding it, with its name (escaped: it is the process's own choice).
    pub process: Option<(i32, String)>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.uid)).ok().flatten();
        let user = user.map(|u| format!("user {} (uid {})", crate::text::escape_controls(&u.name), self.uid));
        let user = user.unwrap_or_else(|| format!("uid {}", self.uid));
        match &self.process {
            Some((pid, name)) => write!(f, "pid {pid} ({name}) of {user}"),
            None => write!(f, "a socket of {user} (inode {}; no process holds it any more)", self.inode),
        }
    }
}

/// The socket that keeps `127.0.0.1:port` from being bound, if the kernel shows one: a listener
/// first. None when nothing is found (or sock_diag is unavailable).
pub fn find(port: u16) -> Option<Holder> {
    let mut found: Vec<(bool, u32, u64)> = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        found.extend(dump(family as u8, port).unwrap_or_default());
    }
    found.sort_by_key(|(listening, _, inode)| (!listening, *inode == 0));
    let (listening, uid, inode) = *found.first()?;
    let process = (inode != 0).then(|| holding_process(inode)).flatten();
    Some(Holder { uid, inode, listening, process })
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDR: usize = 16;
/// struct inet_diag_msg up to idiag_inode: family, state, timer, retrans, sockid (sport at 4,
/// src at 8), ..., uid at 64, inode at 68.
const MSG_LEN: usize = 72;
const TCP_LISTEN: u8 = 10;
const TCP_TIME_WAIT: u32 = 6;
const TCP_NEW_SYN_RECV: u32 = 12;
/// Replies of a long dump are read this many at most: a host with that many sockets on the
/// one port is not a case worth more.
const MAX_REPLIES: usize = 64;

/// (listening, uid, inode) of each TCP socket of `family` bound to `port` on an address that
/// covers 127.0.0.1.
fn dump(family: u8, port: u16) -> std::io::Result<Vec<(bool, u32, u64)>> {
    let fd = super::peer::ask_sock_diag(&request(family))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    for _ in 0..MAX_REPLIES {
        // SAFETY: recv into a buffer we own, within its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if parse(&buf[..n as usize], port, &mut out) || n == 0 {
            break;
        }
    }
    Ok(out)
}

fn request(family: u8) -> Vec<u8> {
    const REQ_LEN: usize = 56;
    let states = u32::MAX & !(1 << TCP_TIME_WAIT) & !(1 << TCP_NEW_SYN_RECV);
    let mut r = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
    r.extend(((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    r.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r.extend(((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    r.extend(1u32.to_ne_bytes());
    r.extend(0u32.to_ne_bytes());
    r.extend([family, libc::IPPROTO_TCP as u8, 0, 0]);
    r.extend(states.to_ne_bytes());
    // A dump ignores the socket id; every socket of the family comes back, filtered in `parse`.
    r.extend([0u8; REQ_LEN - 8]);
    r
}

/// Adds the matching sockets of one reply to `out`; true once the dump is over.
fn parse(buf: &[u8], port: u16, out: &mut Vec<(bool, u32, u64)>) -> bool {
    let mut at = 0;
    while let Some(head) = buf.get(at..at + NLMSG_HDR) {
        let len = u32::from_ne_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes([head[4], head[5]]);
        if len < NLMSG_HDR {
            return true;
        }
        match kind {
            NLMSG_DONE | NLMSG_ERROR => return true,
            SOCK_DIAG_BY_FAMILY => {
                if let Some(msg) = buf.get(at + NLMSG_HDR..at + NLMSG_HDR + MSG_LEN) {
                    if let Some(found) = matching(msg, port) {
                        out.push(found);
                    }
                }
            }
            _ => {}
        }
        at += (len + 3) & !3;
    }
    false
}

fn matching(msg: &[u8], port: u16) -> Option<(bool, u32, u64)> {
    let u32_at = |i: usize| u32::from_ne_bytes(msg[i..i + 4].try_into().expect("4 bytes"));
    if u16::from_be_bytes([msg[4], msg[5]]) != port {
        return None;
    }
    let src = match msg[0] as i32 {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(msg[8], msg[9], msg[10], msg[11])),
        libc::AF_INET6 => {
            let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(&msg[8..24]).expect("16 bytes"));
            v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    let covers_loopback = match src {
        IpAddr::V4(a) => a.is_unspecified() || a == Ipv4Addr::LOCALHOST,
        IpAddr::V6(a) => a.is_unspecified(),
    };
    covers_loopback.then(|| (msg[1] == TCP_LISTEN, u32_at(64), u64::from(u32_at(68))))
}

/// A process with the socket among its fds, and its name. Read from /proc links only: nothing
/// the process controls is opened.
fn holding_process(inode: u64) -> Option<(i32, String)> {
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(e.path().join("fd")).ok()?;
        let holds = fds
            .filter_map(Result::ok)
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()));
        if !holds {
            return None;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        Some((pid, crate::text::escape_controls(comm.trim_end_matches('\n')).into_owned()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_process_listening() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = find(port).expect("the listener is found");
        assert!(h.listening);
        assert_eq!(h.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(h.process.as_ref().map(|p| p.0), Some(std::process::id() as i32));
        assert!(h.to_string().starts_with(&format!("pid {} (", std::process::id())), "{h}");
        drop(l);
        assert_eq!(find(port), None, "nothing holds it now");
    }

    #[test]
    fn an_other_address_does_not_count() {
        let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(find(port), None, "127.0.0.2 does not keep 127.0.0.1 from being bound");
    }
}
