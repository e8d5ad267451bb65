//! Linux process attestation for loopback TCP peers: the socket's inode from the kernel's socket
//! diagnostics (`NETLINK_SOCK_DIAG`, or `/proc/net/tcp{,6}` where that is unavailable), its
//! owning process from `/proc/*/fd`, and the process's uid, gid, executable and cgroup from
//! `/proc/PID`.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use coffer_core::identity::ProcessFacts;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AttestError {
    #[error("only loopback callers are served (peer {0})")]
    NotLoopback(SocketAddr),
    #[error("no socket for the connection from {0} was found in /proc/net")]
    NoSocket(SocketAddr),
    #[error("no process owns the socket of the connection from {0} (it may have exited)")]
    NoProcess(SocketAddr),
    #[error("cannot read process facts: {0}")]
    Proc(String),
}

/// Finds the process on the other end of the connection `peer` → `local`.
pub fn peer_process(peer: SocketAddr, local: SocketAddr) -> Result<ProcessFacts, AttestError> {
    if !peer.ip().is_loopback() {
        return Err(AttestError::NotLoopback(peer));
    }
    let inode = diag::socket_inode(peer, local)
        .or_else(|| socket_inode(peer, local))
        .ok_or(AttestError::NoSocket(peer))?;
    let pid = owner_of_socket(inode).ok_or(AttestError::NoProcess(peer))?;
    process_facts(pid)
}

/// `/proc/net/tcp` writes addresses as hex: IPv4 as one little-endian u32, IPv6 as four
/// little-endian u32 words, the port as big-endian hex.
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = text.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let ip = match ip_hex.len() {
        8 => IpAddr::from(u32::from_str_radix(ip_hex, 16).ok()?.swap_bytes().to_be_bytes()),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            IpAddr::from(bytes)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |s: SocketAddr| match s.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(s, |v4| SocketAddr::new(IpAddr::V4(v4), s.port())),
        IpAddr::V4(_) => s,
    };
    canon(a) == canon(b)
}

/// The inode of the client's socket: the row whose local address is the peer and whose remote
/// address is our listening side.
fn socket_inode(peer: SocketAddr, local: SocketAddr) -> Option<u64> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            let (Some(l), Some(r)) = (parse_proc_addr(cols[1]), parse_proc_addr(cols[2])) else { continue };
            if same(l, peer) && same(r, local) {
                if let Ok(inode) = cols[9].parse::<u64>() {
                    if inode != 0 {
                        return Some(inode);
                    }
                }
            }
        }
    }
    None
}

/// The socket lookup `ss` uses: one `SOCK_DIAG_BY_FAMILY` request naming the exact 4-tuple,
/// which the kernel answers from its connection hash table.
///
/// Why: reading `/proc/net/tcp` prints every TCP socket on the host; with a few thousand (a busy
/// host, or a benchmark's connections in `TIME_WAIT`) it was about half of the ≈ 5 ms of CPU a
/// managed-identity token cost.
mod diag {
    use std::io;
    use std::net::{IpAddr, SocketAddr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const HEADER: usize = 16;
    /// `struct inet_diag_sockid`: ports, two 16-byte addresses, interface, cookie.
    const SOCKID: usize = 48;
    /// `struct inet_diag_msg`: family, state, timer, retrans, the sockid, then expires, rqueue,
    /// wqueue, uid and inode (u32 each).
    const INODE_AT: usize = HEADER + 4 + SOCKID + 16;

    /// The address as `inet_diag_sockid` holds it: 16 bytes, IPv4 in the first four.
    fn addr_bytes(ip: IpAddr) -> [u8; 16] {
        let mut out = [0u8; 16];
        match ip {
            IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => out = v6.octets(),
        }
        out
    }

    fn request(family: u8, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut body = vec![family, libc::IPPROTO_TCP as u8, 0, 0];
        body.extend_from_slice(&u32::MAX.to_ne_bytes()); // every TCP state
        body.extend_from_slice(&src.port().to_be_bytes());
        body.extend_from_slice(&dst.port().to_be_bytes());
        body.extend_from_slice(&addr_bytes(src.ip()));
        body.extend_from_slice(&addr_bytes(dst.ip()));
        body.extend_from_slice(&0u32.to_ne_bytes()); // any interface
        body.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE: match by address
        let mut msg = Vec::with_capacity(HEADER + body.len());
        msg.extend_from_slice(&((HEADER + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
        msg.extend_from_slice(&0u32.to_ne_bytes()); // to the kernel
        msg.extend_from_slice(&body);
        msg
    }

    /// The inode of the socket whose own address is `src` and whose peer is `dst`, if the kernel
    /// knows one with that family.
    fn lookup(family: u8, src: SocketAddr, dst: SocketAddr) -> io::Result<Option<u64>> {
        // SAFETY: plain system calls on a descriptor this function owns (closed by OwnedFd),
        // with buffers that outlive the calls and whose lengths are passed.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let msg = request(family, src, dst);
        if unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let reply = &buf[..n as usize];
        let u16_at = |i: usize| reply.get(i..i + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        let u32_at = |i: usize| reply.get(i..i + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        match u16_at(4) {
            // Not found (ENOENT) or refused: no answer from this family.
            Some(NLMSG_ERROR) | None => Ok(None),
            Some(SOCK_DIAG_BY_FAMILY) => {
                // The kernel matched on the 4-tuple; check the answer is the socket asked for.
                let id = HEADER + 4;
                let ports_match = reply.get(id..id + 4)
                    == Some(&[src.port().to_be_bytes(), dst.port().to_be_bytes()].concat()[..]);
                let inode = u32_at(INODE_AT).filter(|i| *i != 0);
                Ok(inode.filter(|_| ports_match && reply.get(HEADER) == Some(&family)).map(u64::from))
            }
            Some(_) => Ok(None),
        }
    }

    /// The inode of the client's socket (own address `peer`, connected to `local`), or `None`
    /// if the kernel does not answer (then the caller reads `/proc/net`).
    pub(super) fn socket_inode(peer: SocketAddr, local: SocketAddr) -> Option<u64> {
        let v4 = |s: SocketAddr| match s.ip() {
            IpAddr::V4(v4) => Some(SocketAddr::new(IpAddr::V4(v4), s.port())),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(|v4| SocketAddr::new(IpAddr::V4(v4), s.port())),
        };
        let v6 = |s: SocketAddr| match s.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), s.port()),
            IpAddr::V6(_) => s,
        };
        // A client may have connected over IPv4 to a dual-stack listener, or the other way.
        if let (Some(p), Some(l)) = (v4(peer), v4(local)) {
            if let Ok(Some(inode)) = lookup(libc::AF_INET as u8, p, l) {
                return Some(inode);
            }
        }
        lookup(libc::AF_INET6 as u8, v6(peer), v6(local)).ok().flatten()
    }

    #[cfg(test)]
    mod tests {
        use std::net::{TcpListener, TcpStream};
        use std::os::unix::fs::MetadataExt;

        /// The kernel's answer is the client socket's own inode, and an unknown 4-tuple has none.
        #[test]
        fn finds_the_inode_of_a_connected_socket() {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let local = listener.local_addr().unwrap();
            let client = TcpStream::connect(local).unwrap();
            let (_server_side, peer) = listener.accept().unwrap();
            let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&client));
            let inode = std::fs::metadata(fd_path).unwrap().ino();
            assert_eq!(super::socket_inode(peer, local), Some(inode));
            assert_eq!(super::super::socket_inode(peer, local), Some(inode), "/proc/net agrees");
            let elsewhere = std::net::SocketAddr::new(peer.ip(), peer.port().wrapping_add(1));
            assert_eq!(super::socket_inode(elsewhere, local), None);
        }
    }
}

/// Processes that owned recent peers: most callers are long-lived services that connect again
/// and again, so their fd tables are searched before the whole of `/proc`.
static RECENT_OWNERS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
const RECENT_OWNERS_MAX: usize = 32;

fn holds_socket(pid: u32, target: &str) -> bool {
    let Ok(fds) = fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd")) else { return false };
    fds.flatten().any(|fd| fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target))
}

fn owner_of_socket(inode: u64) -> Option<u32> {
    let target = format!("socket:[{inode}]");
    let own_pid = std::process::id();
    let recent: Vec<u32> = RECENT_OWNERS.lock().map(|r| r.clone()).unwrap_or_default();
    let found =
        recent.into_iter().find(|pid| *pid != own_pid && holds_socket(*pid, &target)).or_else(|| {
            fs::read_dir("/proc")
                .ok()?
                .flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
                // The agent's own process never holds the client end.
                .filter(|pid| *pid != own_pid)
                .find(|pid| holds_socket(*pid, &target))
        })?;
    if let Ok(mut recent) = RECENT_OWNERS.lock() {
        recent.retain(|p| *p != found);
        recent.insert(0, found);
        recent.truncate(RECENT_OWNERS_MAX);
    }
    Some(found)
}

/// Reads uid/gid (effective), the executable and the cgroup of `pid`.
pub fn process_facts(pid: u32) -> Result<ProcessFacts, AttestError> {
    let base = Path::new("/proc").join(pid.to_string());
    let status = fs::read_to_string(base.join("status")).map_err(|e| AttestError::Proc(e.to_string()))?;
    let id_field = |name: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    let uid = id_field("Uid:").ok_or_else(|| AttestError::Proc("no Uid line".into()))?;
    let gid = id_field("Gid:").ok_or_else(|| AttestError::Proc("no Gid line".into()))?;
    let exe = fs::read_link(base.join("exe"))
        .map_err(|e| AttestError::Proc(format!("exe of pid {pid}: {e}")))?
        .to_string_lossy()
        .trim_end_matches(" (deleted)")
        .to_owned();
    let cgroup = fs::read_to_string(base.join("cgroup")).ok().and_then(|text| cgroup_path(&text));
    let unit = cgroup.as_deref().and_then(systemd_unit);
    Ok(ProcessFacts { pid, uid, gid, exe, cgroup, unit })
}

/// The cgroup v2 path (`0::/…`), else the v1 systemd hierarchy's.
fn cgroup_path(text: &str) -> Option<String> {
    let v2 = text.lines().find_map(|l| l.strip_prefix("0::"));
    let v1 = text.lines().find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p));
    v2.filter(|p| *p != "/").or(v1).map(str::to_owned)
}

/// The last `*.service` or `*.scope` component of a cgroup path.
fn systemd_unit(cgroup: &str) -> Option<String> {
    cgroup.rsplit('/').find(|c| c.ends_with(".service") || c.ends_with(".scope")).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_proc_net_addresses() {
        assert_eq!(parse_proc_addr("0100007F:1F90"), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:1F90"),
            Some("[::1]:8080".parse().unwrap())
        );
        assert_eq!(parse_proc_addr("zz:1"), None);
    }

    #[test]
    fn units_from_cgroups() {
        assert_eq!(systemd_unit("/system.slice/app.service"), Some("app.service".into()));
        assert_eq!(systemd_unit("/user.slice/user-0.slice/session-1.scope"), Some("session-1.scope".into()));
        assert_eq!(systemd_unit("/docker/abc"), None);
        assert_eq!(cgroup_path("0::/system.slice/x.service\n"), Some("/system.slice/x.service".into()));
        assert_eq!(cgroup_path("9:name=systemd:/a\n0::/\n"), Some("/a".into()));
    }

    /// A real loopback connection from a child process is attributed to that process.
    #[test]
    fn attests_a_real_peer_process() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import socket,time; s=socket.create_connection(('127.0.0.1',{})); time.sleep(5)",
                    local.port()
                ),
            ])
            .spawn()
            .unwrap();
        let (_conn, peer) = listener.accept().unwrap();
        let facts = peer_process(peer, local).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(facts.pid, child.id());
        assert!(facts.exe.contains("python"), "{}", facts.exe);
        // SAFETY-free check of our own uid via /proc/self.
        let own = process_facts(std::process::id()).unwrap();
        assert_eq!(facts.uid, own.uid);
    }
}
