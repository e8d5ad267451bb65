//! Process attestation against a local attacker (issue 15): a setuid program sharing the caller's
//! socket, a user + mount namespace that fakes the executable's path, and requests the
//! managed-identity endpoint must refuse (forwarded, foreign `Host`, wrong method or path).
//! The tests run as root, as the others do, and become `nobody` with `setpriv`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{cli, free_port, read_env_file, TestServer};
use serde_json::Value;

const NOBODY: &str = "65534";
/// The base system's interpreter: the test runner's `python3` may live under /root, which
/// `nobody` cannot reach.
const PYTHON: &str = "/usr/bin/python3";

/// The dev server's in-process agent, as `dev.env` describes it to a workload.
struct DevAgent {
    /// `127.0.0.1:PORT`
    addr: String,
    header: String,
    resource: String,
}

fn dev_agent(server: &TestServer) -> DevAgent {
    let env = read_env_file(&server.data_dir.join("dev.env"));
    let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap();
    let endpoint = get("IDENTITY_ENDPOINT");
    let addr = endpoint.trim_start_matches("http://").trim_end_matches("/msi/token").to_owned();
    DevAgent { addr, header: get("IDENTITY_HEADER"), resource: server.env("COFFER_URL") }
}

fn run_cli(server: &TestServer, args: &[&str]) -> String {
    let (ok, out, err) = cli(server, args);
    assert!(ok, "coffer {args:?} failed: {err}");
    out
}

fn client_id(server: &TestServer, name: &str) -> String {
    let shown: Value =
        serde_json::from_str(&run_cli(server, &["identity", "show", name, "-o", "json"])).unwrap();
    shown["clientId"].as_str().unwrap().to_owned()
}

fn as_nobody() -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([&format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups"]);
    cmd
}

/// The endpoint's answer without the token itself (test output must not carry tokens either).
fn summary(body: &Value) -> String {
    let mut shown = body.clone();
    if let Some(obj) = shown.as_object_mut() {
        obj.remove("access_token");
    }
    shown.to_string()
}

/// Connects to the agent, lets the socket survive `exec`, forks; in mode `su` the parent then
/// becomes `/usr/bin/su root` waiting at its password prompt (real uid nobody, effective uid 0)
/// while the child, once it has seen the prompt, sends the token request over the shared socket.
/// In mode `plain` the parent stays the same unprivileged interpreter. Prints the status code on
/// the first line and the JSON body on the second.
const HAND_OFF: &str = r#"
import json, os, socket, sys
port, header, resource, client_id, mode = sys.argv[1:6]
sock = socket.create_connection(("127.0.0.1", int(port)))
sock.set_inheritable(True)
stdin_r, stdin_w = os.pipe()   # su's stdin: never written; EOF when the child exits
prompt_r, prompt_w = os.pipe() # su's output: its prompt says it is waiting
child = os.fork()
if child == 0:
    os.close(stdin_r)
    os.close(prompt_w)
    if mode == "su":
        seen = b""
        while b":" not in seen:
            chunk = os.read(prompt_r, 64)
            if not chunk:
                sys.exit("su exited before prompting")
            seen += chunk
    query = "api-version=2019-08-01&resource=" + resource
    if client_id != "-":
        query += "&client_id=" + client_id
    sock.sendall((f"GET /msi/token?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  f"X-IDENTITY-HEADER: {header}\r\nConnection: close\r\n\r\n").encode())
    reply = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    print(head.split(b" ")[1].decode())
    print(body.decode())
    sys.stdout.flush()
    os._exit(0)
os.close(prompt_r)
os.close(stdin_w)
if mode == "su":
    os.dup2(stdin_r, 0)
    os.dup2(prompt_w, 1)
    os.dup2(prompt_w, 2)
    os.execv("/usr/bin/su", ["su", "root", "-c", "true"])
os.waitpid(child, 0)
"#;

/// Runs [`HAND_OFF`] as `nobody`; returns (status, body).
fn hand_off(agent: &DevAgent, client_id: Option<&str>, mode: &str) -> (u16, Value) {
    let port = agent.addr.rsplit(':').next().unwrap();
    let out = as_nobody()
        .args([PYTHON, "-c", HAND_OFF, port, &agent.header, &agent.resource, client_id.unwrap_or("-"), mode])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let status = lines.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        panic!("the hand-off script gave no status: {stdout} {}", String::from_utf8_lossy(&out.stderr))
    });
    (status, serde_json::from_str(lines.next().unwrap_or("null")).unwrap_or(Value::Null))
}

/// Item 1: `nobody` hands its connection to a setuid-root program waiting at a prompt. The agent
/// must not attest uid 0 (nor nobody, while a differently privileged process holds the socket).
#[test]
fn setuid_program_sharing_the_socket_borrows_no_identity() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let agent = dev_agent(&server);
    run_cli(&server, &["identity", "create", "root-app"]);
    run_cli(&server, &["identity", "bind", "root-app", "--uid", "0"]);
    run_cli(&server, &["identity", "create", "nobody-app"]);
    run_cli(&server, &["identity", "bind", "nobody-app", "--uid", NOBODY]);
    let nobody_app = client_id(&server, "nobody-app");

    let (status, body) = hand_off(&agent, None, "su");
    assert_eq!(status, 403, "a setuid program holding the socket lent its uid: {}", summary(&body));
    let (status, body) = hand_off(&agent, Some(&nobody_app), "su");
    assert_eq!(status, 403, "holders that differ must be refused: {}", summary(&body));
    assert!(
        body["error_description"].as_str().unwrap_or_default().contains("differ"),
        "the refusal says why: {}",
        summary(&body)
    );

    // Control: the same hand-off between two unprivileged processes is attested as nobody.
    let (status, body) = hand_off(&agent, None, "plain");
    assert_eq!(status, 200, "{}", summary(&body));
    assert_eq!(body["client_id"].as_str(), Some(nobody_app.as_str()));
    let log = server.log_text();
    assert!(log.contains("pids"), "the refusal is logged with the holders' pids:\n{log}");
}

/// Holds whatever descriptor it is sent over the Unix socket `argv[1]`, like any privileged
/// service that accepts descriptors from its clients (D-Bus can carry them, for one).
const RECEIVER: &str = r#"
import os, socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
server.listen(1)
print("ready", flush=True)
conn, _ = server.accept()
_, fds, _, _ = socket.recv_fds(conn, 1, 4)
conn.send(b"k")
conn.recv(1)
"#;

/// As `nobody`: a thread keeps a private copy of the descriptor table (`unshare(CLONE_FILES)`),
/// the main thread hands the connection to the receiver and closes its own copy, then the thread
/// sends the request. The only holder `/proc/PID/fd` shows is then the receiver.
const PASS_AND_HIDE: &str = r#"
import ctypes, json, os, socket, sys, threading
port, header, resource, path = sys.argv[1:5]
libc = ctypes.CDLL(None, use_errno=True)
sock = socket.create_connection(("127.0.0.1", int(port)))
unshared, handed = threading.Event(), threading.Event()
out = {}
def hidden():
    out["unshare"] = libc.unshare(0x400)  # CLONE_FILES: this thread's own descriptor table
    unshared.set()
    handed.wait()
    sock.sendall((f"GET /msi/token?api-version=2019-08-01&resource={resource} HTTP/1.1\r\n"
                  f"Host: 127.0.0.1:{port}\r\nX-IDENTITY-HEADER: {header}\r\nConnection: close\r\n\r\n").encode())
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    out["reply"] = reply
thread = threading.Thread(target=hidden)
thread.start()
unshared.wait()
assert out["unshare"] == 0, "unshare(CLONE_FILES) failed"
peer = socket.socket(socket.AF_UNIX)
peer.connect(path)
socket.send_fds(peer, [b"x"], [sock.fileno()])
peer.recv(1)
os.close(sock.fileno())
handed.set()
thread.join()
head, _, body = out["reply"].partition(b"\r\n\r\n")
print(head.split(b" ")[1].decode())
print(body.decode())
"#;

/// Item 1, by descriptor passing: a socket that `nobody` made, held only by a root process, is
/// not attested as root.
#[test]
fn socket_handed_to_a_privileged_process_is_not_attested_as_it() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let agent = dev_agent(&server);
    run_cli(&server, &["identity", "create", "root-app"]);
    run_cli(&server, &["identity", "bind", "root-app", "--uid", "0"]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("receiver.sock");
    let path = path.to_str().unwrap();
    let mut receiver = Command::new(PYTHON)
        .args(["-c", RECEIVER, path])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(receiver.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let port = agent.addr.rsplit(':').next().unwrap();
    let out = as_nobody()
        .args([PYTHON, "-c", PASS_AND_HIDE, port, &agent.header, &agent.resource, path])
        .output()
        .unwrap();
    let _ = receiver.kill();
    let _ = receiver.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let status: u16 = lines.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        panic!("the script gave no status: {stdout} {}", String::from_utf8_lossy(&out.stderr))
    });
    let body: Value = serde_json::from_str(lines.next().unwrap_or("null")).unwrap_or(Value::Null);
    assert_eq!(status, 403, "a socket nobody made was attested as its root holder: {}", summary(&body));
    assert!(
        body["error_description"].as_str().unwrap_or_default().contains("created by uid 65534"),
        "{}",
        summary(&body)
    );
}

/// Asks the agent from inside `unshare -Urm` as `nobody`, after bind-mounting curl over
/// `bound`; returns (status, body).
fn from_namespace(agent: &DevAgent, bound: &std::path::Path, client_id: &str) -> (u16, Value) {
    let bound = bound.display();
    let url = format!(
        "http://{}/msi/token?api-version=2019-08-01&resource={}&client_id={client_id}",
        agent.addr, agent.resource
    );
    let script = format!(
        "mount --bind /usr/bin/curl {bound} && exec {bound} -s -w '\\n%{{http_code}}' \
         -H 'X-IDENTITY-HEADER: {}' '{url}'",
        agent.header
    );
    let out = as_nobody().args(["unshare", "-Urm", "sh", "-c", &script]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, status) = stdout.rsplit_once('\n').unwrap_or_else(|| {
        panic!("no answer from the namespace: {stdout} {}", String::from_utf8_lossy(&out.stderr))
    });
    (status.trim().parse().unwrap(), serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Item 2: a user + mount namespace bind-mounts curl over the bound path of a root-only tool;
/// `/proc/PID/exe` then shows the bound path, but the running file is curl.
#[test]
fn executable_faked_by_a_bind_mount_in_a_namespace_is_not_attested() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let agent = dev_agent(&server);
    // A root-owned 0700 tool in a directory nobody can reach (for the bind mount's target).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bound = bin.join("vault-tool");
    std::fs::copy("/usr/bin/true", &bound).unwrap();
    std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(0o700)).unwrap();
    let bound_str = bound.to_str().unwrap();

    run_cli(&server, &["identity", "create", "tool"]);
    run_cli(&server, &["identity", "bind", "tool", "--exe", bound_str]);
    let (status, body) = from_namespace(&agent, &bound, &client_id(&server, "tool"));
    assert_eq!(status, 403, "a bind-mounted curl passed for {bound_str}: {}", summary(&body));

    // A uid binding does not let a namespaced process through unless it says so.
    run_cli(&server, &["identity", "create", "plain-uid"]);
    run_cli(&server, &["identity", "bind", "plain-uid", "--uid", NOBODY]);
    let (status, body) = from_namespace(&agent, &bound, &client_id(&server, "plain-uid"));
    assert_eq!(status, 403, "{}", summary(&body));
    let why = body["error_description"].as_str().unwrap_or_default();
    assert!(why.contains("--allow-namespaced") && why.contains("no --exe binding"), "{why}");

    run_cli(&server, &["identity", "create", "ns-uid"]);
    run_cli(&server, &["identity", "bind", "ns-uid", "--uid", NOBODY, "--allow-namespaced"]);
    let (status, body) = from_namespace(&agent, &bound, &client_id(&server, "ns-uid"));
    assert_eq!(status, 200, "--allow-namespaced admits a namespaced process: {}", summary(&body));
    let listed = run_cli(&server, &["identity", "bindings", "-o", "json"]);
    assert!(listed.contains("\"allow_namespaced\": true"), "the flag is listed: {listed}");

    // Even when namespaces are allowed, the executable is what runs, not what its path says.
    run_cli(&server, &["identity", "create", "ns-tool"]);
    run_cli(&server, &["identity", "bind", "ns-tool", "--exe", bound_str, "--allow-namespaced"]);
    let (status, body) = from_namespace(&agent, &bound, &client_id(&server, "ns-tool"));
    assert_eq!(status, 403, "{}", summary(&body));
}

/// Sends `request` as raw HTTP/1.1 to `addr`; returns (status, JSON body or null).
fn raw_http(addr: &str, request: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Item 5: only a plain loopback `GET` on the protocol's own path gets a token.
#[test]
fn imds_and_app_service_refuse_forwarded_foreign_and_off_path_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let agent = dev_agent(&server);
    // This test process (root) is the workload.
    run_cli(&server, &["identity", "create", "app"]);
    run_cli(&server, &["identity", "bind", "app", "--uid", "0"]);
    let (addr, resource, header) = (&agent.addr, &agent.resource, &agent.header);
    let imds_path = format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}");
    let app_path = format!("/msi/token?api-version=2019-08-01&resource={resource}");
    let ask = |method: &str, path: &str, host: &str, extra: &str| {
        raw_http(
            addr,
            &format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"),
        )
    };
    let metadata = "Metadata: true\r\n";
    let identity = format!("X-IDENTITY-HEADER: {header}\r\n");
    let trailing_slash = imds_path.replacen("token?", "token/?", 1);

    // What the SDKs send works.
    for (path, extra) in [(&imds_path, metadata), (&trailing_slash, metadata), (&app_path, identity.as_str())]
    {
        let (status, body) = ask("GET", path, addr, extra);
        assert_eq!(status, 200, "GET {path}: {}", summary(&body));
    }
    let port = addr.rsplit(':').next().unwrap();
    let (status, body) = ask("GET", &imds_path, &format!("localhost:{port}"), metadata);
    assert_eq!(status, 200, "localhost is loopback: {}", summary(&body));

    let refused = [
        ("GET", &imds_path, addr.as_str(), format!("{metadata}X-Forwarded-For: 203.0.113.7\r\n"), 400),
        ("GET", &imds_path, addr.as_str(), format!("{metadata}Forwarded: for=203.0.113.7\r\n"), 400),
        ("GET", &imds_path, "evil.example", metadata.to_owned(), 400),
        ("GET", &imds_path, "evil.example:80", metadata.to_owned(), 400),
        ("POST", &imds_path, addr.as_str(), format!("{metadata}Content-Length: 0\r\n"), 405),
        ("GET", &app_path, addr.as_str(), format!("{identity}X-Forwarded-For: 203.0.113.7\r\n"), 400),
        ("GET", &app_path, "evil.example", identity.clone(), 400),
        ("POST", &app_path, addr.as_str(), format!("{identity}Content-Length: 0\r\n"), 405),
    ];
    for (method, path, host, extra, expected) in refused {
        let (status, body) = ask(method, path, host, &extra);
        assert_eq!(status, expected, "{method} {path} Host {host} {extra:?}: {}", summary(&body));
        assert!(body["error_description"].is_string(), "a JSON error: {body}");
    }
    // The App Service protocol answers on its own path only.
    let elsewhere = format!("/anything/else?api-version=2019-08-01&resource={resource}");
    let (status, body) = ask("GET", &elsewhere, addr, &identity);
    assert_eq!(status, 404, "{}", summary(&body));
}

/// Item 5: `IDENTITY_HEADER` is random per data directory (not a public constant), kept across
/// restarts so a workload's `dev.env` stays valid, and checked.
#[test]
fn dev_identity_header_is_random_per_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = TestServer::start(&data, free_port(), &[]);
    let header = dev_agent(&first).header;
    assert_ne!(header, "coffer-dev-agent", "the old public constant");
    assert!(header.len() >= 32, "{header:?} is too short to be unguessable");
    let kept = std::fs::metadata(data.join("identity-header")).unwrap();
    assert_eq!(kept.permissions().mode() & 0o777, 0o600);
    let other = TestServer::start(&dir.path().join("other"), free_port(), &[]);
    assert_ne!(dev_agent(&other).header, header, "each data directory has its own");
    drop(other);
    drop(first);
    let again = TestServer::start(&data, free_port(), &[]);
    let agent = dev_agent(&again);
    assert_eq!(agent.header, header, "kept across restarts");
    let path = format!("/msi/token?api-version=2019-08-01&resource={}", agent.resource);
    let (status, _) = raw_http(
        &agent.addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {}\r\nX-IDENTITY-HEADER: coffer-dev-agent\r\nConnection: close\r\n\r\n", agent.addr),
    );
    assert_eq!(status, 400, "the old constant is refused");
}
