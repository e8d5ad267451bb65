//! Linux process attestation for loopback TCP peers: the socket's inode from the kernel's socket
//! diagnostics (`NETLINK_SOCK_DIAG`, or `/proc/net/tcp{,6}` where that is unavailable), every
//! process holding it from `/proc/*/fd`, and each holder's ids, executable, namespaces and cgroup
//! from its `/proc/PID`, read through one directory handle per process.
//!
//! What this proves: every process that holds the client's socket agrees on those facts and runs
//! as the uid that created the socket; whether its real, effective, saved and filesystem ids are
//! equal; and (when `exe_verified`) that it runs the file the agent finds at its executable's
//! path. What it cannot prove: that the process is not
//! relaying for another one. Anything running as a bound uid can pass its token on, as on
//! Azure, where IMDS answers whoever can reach it.

use std::fs;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;

use rustix::fs::{openat, readlinkat, statat, AtFlags, Dir, Mode, OFlags, CWD};

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
    #[error(
        "processes that differ in uid, gid, executable, namespaces or cgroup share the connection's \
         socket (pids {}); connect from a process of its own", pids_list(.0)
    )]
    HoldersDiffer(Vec<u32>),
    #[error(
        "the connection's socket was created by uid {socket_uid} but is held by uid {holder_uid} \
         (pid {pid}): a socket handed to another process is not attested; connect from the process \
         that asks"
    )]
    NotTheCreator { socket_uid: u32, holder_uid: u32, pid: u32 },
}

fn pids_list(pids: &[u32]) -> String {
    pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// Finds the process on the other end of the connection `peer` → `local`.
pub fn peer_process(peer: SocketAddr, local: SocketAddr) -> Result<ProcessFacts, AttestError> {
    if !peer.ip().is_loopback() {
        return Err(AttestError::NotLoopback(peer));
    }
    let socket = diag::client_socket(peer, local)
        .or_else(|| client_socket(peer, local))
        .ok_or(AttestError::NoSocket(peer))?;
    attest_holders(socket, peer)
}

/// The client's end of the connection, as the kernel's socket tables show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClientSocket {
    inode: u64,
    /// Who created the socket (its inode's owner: the creating process's filesystem uid). Fixed
    /// for the socket's life, whoever holds it later.
    uid: u32,
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

/// The client's socket: the row whose local address is the peer and whose remote address is our
/// listening side.
fn client_socket(peer: SocketAddr, local: SocketAddr) -> Option<ClientSocket> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            let (Some(l), Some(r)) = (parse_proc_addr(cols[1]), parse_proc_addr(cols[2])) else { continue };
            if same(l, peer) && same(r, local) {
                if let (Ok(uid), Ok(inode)) = (cols[7].parse::<u32>(), cols[9].parse::<u64>()) {
                    if inode != 0 {
                        return Some(ClientSocket { inode, uid });
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

    use super::ClientSocket;

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const HEADER: usize = 16;
    /// `struct inet_diag_sockid`: ports, two 16-byte addresses, interface, cookie.
    const SOCKID: usize = 48;
    /// `struct inet_diag_msg`: family, state, timer, retrans, the sockid, then expires, rqueue,
    /// wqueue, uid and inode (u32 each).
    const UID_AT: usize = HEADER + 4 + SOCKID + 12;
    const INODE_AT: usize = UID_AT + 4;

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

    /// The socket whose own address is `src` and whose peer is `dst`, if the kernel knows one
    /// with that family.
    fn lookup(family: u8, src: SocketAddr, dst: SocketAddr) -> io::Result<Option<ClientSocket>> {
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
                let socket =
                    inode.zip(u32_at(UID_AT)).map(|(inode, uid)| ClientSocket { inode: inode.into(), uid });
                Ok(socket.filter(|_| ports_match && reply.get(HEADER) == Some(&family)))
            }
            Some(_) => Ok(None),
        }
    }

    /// The client's socket (own address `peer`, connected to `local`), or `None` if the kernel
    /// does not answer (then the caller reads `/proc/net`).
    pub(super) fn client_socket(peer: SocketAddr, local: SocketAddr) -> Option<ClientSocket> {
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
            if let Ok(Some(socket)) = lookup(libc::AF_INET as u8, p, l) {
                return Some(socket);
            }
        }
        lookup(libc::AF_INET6 as u8, v6(peer), v6(local)).ok().flatten()
    }

    #[cfg(test)]
    mod tests {
        use super::ClientSocket;
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
            let own_uid = std::fs::metadata("/proc/self").unwrap().uid();
            let expected = Some(ClientSocket { inode, uid: own_uid });
            assert_eq!(super::client_socket(peer, local), expected);
            assert_eq!(super::super::client_socket(peer, local), expected, "/proc/net agrees");
            let elsewhere = std::net::SocketAddr::new(peer.ip(), peer.port().wrapping_add(1));
            assert_eq!(super::client_socket(elsewhere, local), None);
        }
    }
}

/// An open `/proc/PID` directory. Every read goes through this one handle, which stays tied to
/// the process it was opened for: once that process has exited, reads through it fail instead
/// of reaching another process that reused the pid.
struct ProcDir {
    pid: u32,
    dir: OwnedFd,
}

impl ProcDir {
    fn open(pid: u32) -> io::Result<Self> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let dir = openat(CWD, format!("/proc/{pid}"), flags, Mode::empty())?;
        Ok(Self { pid, dir })
    }

    fn read(&self, name: &str) -> io::Result<String> {
        let file = openat(&self.dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        let mut text = String::new();
        fs::File::from(file).read_to_string(&mut text)?;
        Ok(text)
    }

    /// True when one of the process's descriptors is the socket (`target` = `socket:[INODE]`).
    fn holds(&self, target: &[u8]) -> bool {
        let Ok(fds) =
            openat(&self.dir, "fd", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        else {
            return false;
        };
        let Ok(entries) = Dir::read_from(&fds) else { return false };
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            name.to_bytes() != b"." && name.to_bytes() != b".." && {
                readlinkat(&fds, name, Vec::new()).is_ok_and(|link| link.as_bytes() == target)
            }
        })
    }

    /// (device, inode) of what `name` (a magic link such as `exe` or `ns/user`) points to.
    fn identity_of(&self, name: &str) -> io::Result<(u64, u64)> {
        let stat = statat(&self.dir, name, AtFlags::empty())?;
        Ok((stat.st_dev, stat.st_ino))
    }
}

/// Every process holding the socket `inode`: all of them, since a process that shares the
/// socket (inherited across `fork` and `exec`, or passed over a Unix socket) can send on it.
/// The agent's own process never holds the client end.
///
/// Not seen: a thread that unshared its descriptor table (`unshare(CLONE_FILES)`) shows its
/// descriptors only under `/proc/PID/task/TID/fd`.
fn holders_of_socket(inode: u64) -> Vec<ProcDir> {
    let target = format!("socket:[{inode}]");
    let own_pid = std::process::id();
    let Ok(proc) = fs::read_dir("/proc") else { return Vec::new() };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|name| name.parse::<u32>().ok()))
        .filter(|pid| *pid != own_pid)
        // A process that exits meanwhile is no holder.
        .filter_map(|pid| ProcDir::open(pid).ok())
        .filter(|proc| proc.holds(target.as_bytes()))
        .collect()
}

/// Attests the processes holding `socket`: they must agree on every fact, still hold the socket
/// once their facts have been read (a holder that let go of it and then ran something else is
/// not attested as that something else), and run as the uid that created it.
///
/// Why the creator: a descriptor can be passed (`SCM_RIGHTS`) to a process that accepts them
/// from others, and the sender can keep a copy `/proc/PID/fd` does not list (a thread with a
/// descriptor table of its own); the socket's owner is the one fact it cannot hand on.
fn attest_holders(socket: ClientSocket, peer: SocketAddr) -> Result<ProcessFacts, AttestError> {
    let inode = socket.inode;
    let target = format!("socket:[{inode}]");
    let own = AgentView::read().map_err(|e| AttestError::Proc(format!("the agent's own namespaces: {e}")))?;
    let mut holders = holders_of_socket(inode);
    holders.sort_by_key(|h| h.pid);
    let mut facts = Vec::with_capacity(holders.len());
    for holder in &holders {
        let read = read_facts(holder, &own);
        if !holder.holds(target.as_bytes()) {
            continue;
        }
        facts.push(read?);
    }
    let Some(first) = facts.first() else { return Err(AttestError::NoProcess(peer)) };
    if facts.iter().any(|f| !first.same_attested_facts(f)) {
        return Err(AttestError::HoldersDiffer(facts.iter().map(|f| f.pid).collect()));
    }
    if first.uid != socket.uid {
        return Err(AttestError::NotTheCreator {
            socket_uid: socket.uid,
            holder_uid: first.uid,
            pid: first.pid,
        });
    }
    Ok(first.clone())
}

/// The agent's own user and mount namespaces, which a caller's are compared with.
struct AgentView {
    user_ns: (u64, u64),
    mnt_ns: (u64, u64),
}

impl AgentView {
    fn read() -> io::Result<Self> {
        let ns = |name: &str| {
            statat(CWD, format!("/proc/self/ns/{name}"), AtFlags::empty()).map(|s| (s.st_dev, s.st_ino))
        };
        Ok(Self { user_ns: ns("user")?, mnt_ns: ns("mnt")? })
    }
}

/// Reads uid/gid (all four of each), the executable, the namespaces and the cgroup of `pid`.
pub fn process_facts(pid: u32) -> Result<ProcessFacts, AttestError> {
    let proc = ProcDir::open(pid).map_err(|e| AttestError::Proc(format!("pid {pid}: {e}")))?;
    let own = AgentView::read().map_err(|e| AttestError::Proc(format!("the agent's own namespaces: {e}")))?;
    read_facts(&proc, &own)
}

fn read_facts(proc: &ProcDir, own: &AgentView) -> Result<ProcessFacts, AttestError> {
    let pid = proc.pid;
    let failed = |what: &str, e: io::Error| AttestError::Proc(format!("{what} of pid {pid}: {e}"));
    let status = proc.read("status").map_err(|e| failed("status", e))?;
    let (uid, uids_equal) = ids(&status, "Uid:").ok_or_else(|| AttestError::Proc("no Uid line".into()))?;
    let (gid, gids_equal) = ids(&status, "Gid:").ok_or_else(|| AttestError::Proc("no Gid line".into()))?;
    let link = readlinkat(&proc.dir, "exe", Vec::new()).map_err(|e| failed("exe", e.into()))?;
    let link = link.to_string_lossy();
    let deleted = link.ends_with(" (deleted)");
    let exe = link.trim_end_matches(" (deleted)").to_owned();
    let running = proc.identity_of("exe").map_err(|e| failed("exe", e))?;
    // The path is what the process's own mount namespace shows; it is the executable only if
    // the agent finds that very file under it.
    let exe_verified = !deleted
        && exe.starts_with('/')
        && fs::metadata(&exe).is_ok_and(|on_disk| (on_disk.dev(), on_disk.ino()) == running);
    let same_namespaces = proc.identity_of("ns/user").is_ok_and(|ns| ns == own.user_ns)
        && proc.identity_of("ns/mnt").is_ok_and(|ns| ns == own.mnt_ns);
    let cgroup = proc.read("cgroup").ok().and_then(|text| cgroup_path(&text));
    let unit = cgroup.as_deref().and_then(systemd_unit);
    Ok(ProcessFacts {
        pid,
        uid,
        gid,
        ids_consistent: uids_equal && gids_equal,
        exe,
        exe_verified,
        same_namespaces,
        cgroup,
        unit,
    })
}

/// The real id from a `Uid:`/`Gid:` line of `/proc/PID/status` (real, effective, saved,
/// filesystem), and whether all four are equal.
fn ids(status: &str, field: &str) -> Option<(u32, bool)> {
    let line = status.lines().find_map(|l| l.strip_prefix(field))?;
    let values: Vec<u32> = line.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
    let [real, effective, saved, filesystem] = values.as_slice() else { return None };
    Some((*real, [effective, saved, filesystem].iter().all(|id| *id == real)))
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

    #[test]
    fn ids_are_consistent_only_when_all_four_agree() {
        let status = "Name:\tsu\nUid:\t65534\t0\t0\t0\nGid:\t65534\t65534\t65534\t65534\n";
        assert_eq!(
            ids(status, "Uid:"),
            Some((65534, false)),
            "su at its prompt: real nobody, effective root"
        );
        assert_eq!(ids(status, "Gid:"), Some((65534, true)));
        assert_eq!(ids("Uid:\t1\t1\t1\n", "Uid:"), None, "four values or nothing");
        assert_eq!(ids("Uid:\t1\t1\tx\t1\n", "Uid:"), None);
    }

    /// Runs `script` with python3 (which connects to `port`) and waits for it to print `ready`.
    fn python(script: &str, port: u16) -> std::process::Child {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        child
    }

    const CONNECT: &str = "import socket,sys,time\n\
        s=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n\
        print('ready',flush=True)\ntime.sleep(30)\n";

    /// A real loopback connection from a child process is attributed to that process.
    #[test]
    fn attests_a_real_peer_process() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let mut child = python(CONNECT, local.port());
        let (_conn, peer) = listener.accept().unwrap();
        let facts = peer_process(peer, local);
        let _ = child.kill();
        let _ = child.wait();
        let facts = facts.unwrap();
        assert_eq!(facts.pid, child.id());
        assert!(facts.exe.contains("python"), "{}", facts.exe);
        assert!(facts.ids_consistent && facts.exe_verified && facts.same_namespaces, "{facts:?}");
        let own = process_facts(std::process::id()).unwrap();
        assert_eq!(facts.uid, own.uid);
    }

    /// The socket inherited by a child that became another program: two holders that differ, so
    /// neither is attested, and the error names both.
    #[test]
    fn holders_that_differ_are_refused() {
        let script = "import os,socket,sys\n\
            s=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n\
            s.set_inheritable(True)\n\
            r,w=os.pipe()\n\
            pid=os.fork()\n\
            if pid==0:\n    os.close(r)\n    os.execv('/bin/sleep',['sleep','30'])\n\
            os.close(w)\n\
            os.read(r,1)\n\
            print('ready',flush=True)\n\
            os.waitpid(pid,0)\n";
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let mut child = python(script, local.port());
        let (_conn, peer) = listener.accept().unwrap();
        let result = peer_process(peer, local);
        let sleeper = std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()));
        if let Some(pid) = sleeper.ok().and_then(|c| c.split_whitespace().next().map(str::to_owned)) {
            let _ = std::process::Command::new("kill").arg(pid).status();
        }
        let _ = child.kill();
        let _ = child.wait();
        match result {
            Err(AttestError::HoldersDiffer(pids)) => {
                assert_eq!(pids.len(), 2, "{pids:?}");
                assert!(pids.contains(&child.id()));
            }
            other => panic!("expected HoldersDiffer, got {other:?}"),
        }
    }

    /// A running executable that was deleted (or replaced) is no longer verified: the file at its
    /// path is not the one running.
    #[test]
    fn a_deleted_executable_is_unverified() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("sleeper");
        std::fs::copy("/bin/sleep", &copy).unwrap();
        // ETXTBSY while a concurrent test's fork still holds the copy's write descriptor.
        let spawn = || std::process::Command::new(&copy).arg("30").spawn();
        let mut child = std::iter::repeat_with(spawn)
            .take(1000)
            .find(|r| r.as_ref().map_or_else(|e| e.raw_os_error() != Some(libc::ETXTBSY), |_| true))
            .unwrap()
            .unwrap();
        let before = process_facts(child.id());
        std::fs::remove_file(&copy).unwrap();
        std::fs::copy("/bin/sleep", &copy).unwrap();
        let after = process_facts(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let (before, after) = (before.unwrap(), after.unwrap());
        assert!(before.exe_verified, "{before:?}");
        assert_eq!(after.exe, copy.to_str().unwrap());
        assert!(!after.exe_verified, "a new file at the path is not the running one: {after:?}");
    }
}
