//! Who is on the other end of a kill-port connection. Both ends are on this host (loopback), so
//! the client's socket is in `/proc/net/tcp`: the line whose local address is the connection's
//! peer and whose remote address is the kill port carries the uid that created it and its inode.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub inode: u64,
}

/// The owner of the client socket of a loopback connection from `peer` to `local`.
pub fn lookup(local: SocketAddr, peer: SocketAddr) -> Option<Peer> {
    let (SocketAddr::V4(local), SocketAddr::V4(peer)) = (local, peer) else { return None };
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    find(&table, local, peer)
}

pub(super) fn find(table: &str, local: SocketAddrV4, peer: SocketAddrV4) -> Option<Peer> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 || parse_addr(f[1])? != peer || parse_addr(f[2])? != local {
            return None;
        }
        Some(Peer { uid: f[7].parse().ok()?, inode: f[9].parse().ok()? })
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
    fn finds_the_client_side_of_a_loopback_connection() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1CE8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0 100 0 0 10 0
   1: 0100007F:1CE8 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0 20 4 30 10 -1
   2: 0100007F:D431 0100007F:1CE8 01 00000000:00000000 00:00000000 00000000 65534        0 3333 1 0 20 4 30 10 -1
";
        let kill: SocketAddrV4 = "127.0.0.1:7400".parse().unwrap();
        let client: SocketAddrV4 = "127.0.0.1:54321".parse().unwrap();
        assert_eq!(find(table, kill, client), Some(Peer { uid: 65534, inode: 3333 }));
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
