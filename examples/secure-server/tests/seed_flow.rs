//! The seed's flow end to end: a workload with no secret in its environment reads its API key
//! through its managed identity, and follows a rotation without a restart.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn coffer_bin() -> PathBuf {
    // target/<profile>/deps/seed_flow-… → target/<profile>/coffer
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("coffer")
}

fn read_env(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}

fn wait_for_line(child: &mut Child, needle: &str) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(&needle) {
                let _ = tx.send(line);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("process did not get ready")
}

struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn managed_identity_read_and_rotation_without_restart() {
    let coffer = coffer_bin();
    assert!(
        coffer.exists(),
        "build the coffer binary first (cargo build -p coffer-cli): {}",
        coffer.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = Command::new(&coffer)
        .args([
            "server",
            "--dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--agent-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_line(&mut server, "ready");
    let _server = Killer(server);
    let admin = read_env(&data.join("admin.env"));
    let cli = |args: &[&str]| {
        let out = Command::new(&coffer).args(args).envs(admin.clone()).output().unwrap();
        assert!(out.status.success(), "coffer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    cli(&["secret", "set", "demo-api-key", "--value", "key-version-one"]);
    // Bind the server's identity to this uid and its executable; least privilege: Secrets User
    // on that one secret.
    let server_exe = PathBuf::from(env!("CARGO_BIN_EXE_secure-server"));
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:").map(|r| r.split_whitespace().nth(1).unwrap().to_owned()))
        .unwrap();
    cli(&["identity", "create", "secure-server"]);
    cli(&[
        "identity",
        "bind",
        "secure-server",
        "--uid",
        &uid,
        "--exe",
        server_exe.canonicalize().unwrap().to_str().unwrap(),
    ]);
    cli(&[
        "role",
        "assign",
        "--principal",
        "secure-server",
        "--role",
        "Key Vault Secrets User",
        "--scope",
        "/vaults/dev/secrets/demo-api-key",
    ]);

    // The workload's whole environment: dev.env (vault URL, identity endpoint, CA) and PATH.
    let workload_env = read_env(&data.join("dev.env"));
    let mut app = Command::new(&server_exe)
        .args(["--listen", "127.0.0.1:0"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(workload_env.clone())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = app.id();
    let line = wait_for_line(&mut app, "ready");
    let _app = Killer(app);
    let url = line.split("http://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let url = format!("http://{url}/");

    // Nothing secret in its environment or arguments.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    for blob in [&environ, &cmdline] {
        assert!(!blob.windows(15).any(|w| w == b"key-version-one"));
        let text = String::from_utf8_lossy(blob);
        assert!(!text.contains("AZURE_CLIENT_SECRET") && !text.contains("COFFER_TOKEN"), "{text}");
    }

    let http = reqwest::Client::new();
    let call = |key: &'static str| {
        let http = http.clone();
        let url = url.clone();
        async move { http.get(&url).bearer_auth(key).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(call("key-version-one").await, 200);
    assert_eq!(call("wrong").await, 401);
    assert_eq!(http.get(&url).send().await.unwrap().status().as_u16(), 401);

    // Rotate: the running server must accept the new key within 2 seconds, no restart.
    cli(&["secret", "set", "demo-api-key", "--value", "key-version-two"]);
    let rotated = Instant::now();
    loop {
        if call("key-version-two").await == 200 {
            break;
        }
        assert!(rotated.elapsed() < Duration::from_secs(2), "the rotated key was not picked up within 2 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(call("key-version-one").await, 401, "the old key stops working");
}
