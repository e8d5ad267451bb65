//! Linux process attestation for loopback TCP peers: the socket's inode from
//! `/proc/net/tcp{,6}`, its owning process from `/proc/*/fd`, and the process's uid, gid,
//! executable and cgroup from `/proc/PID`.

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
    let inode = socket_inode(peer, local).ok_or(AttestError::NoSocket(peer))?;
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
