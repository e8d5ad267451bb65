//! `coffer agent`: join with a one-time token, run the managed-identity endpoint, attest the
//! calling process, and issue tokens only for identities bound to this agent.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{cli, free_port, TestServer, BIN};
use serde_json::Value;

fn own_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_agent_attests_callers_and_brokers_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let ca = server.data_dir.join("ca.pem");
    let (ok, out, err) = cli(&server, &["agent", "create", "host1", "-o", "json"]);
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let join_token = created["joinToken"].as_str().unwrap().to_owned();

    let credential = dir.path().join("node.json");
    let join = |file: &std::path::Path| {
        Command::new(BIN)
            .args(["agent", "join", "--server", &server.env("COFFER_URL"), "--join-token", &join_token])
            .arg("--credential-file")
            .arg(file)
            .arg("--ca-file")
            .arg(&ca)
            .env_remove("COFFER_TOKEN")
            .output()
            .unwrap()
    };
    let first = join(&credential);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&credential).unwrap().permissions().mode() & 0o777, 0o600);
    let again = join(&dir.path().join("node2.json"));
    assert!(!again.status.success(), "a join token works once");
    assert!(String::from_utf8_lossy(&again.stderr).contains("invalid, expired or already used"));

    let mut agent = Command::new(BIN)
        .args(["agent", "run", "--listen", "127.0.0.1:0", "--identity-header", "marker"])
        .arg("--credential-file")
        .arg(&credential)
        .arg("--ca-file")
        .arg(&ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(agent.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("ready"), "{line}");
    let endpoint =
        line.split("IDENTITY_ENDPOINT=").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();

    // Without --identity-header, each start makes up its own (App Service's is per instance too).
    let random_header = || {
        let mut agent = Command::new(BIN)
            .args(["agent", "run", "--listen", "127.0.0.1:0"])
            .arg("--credential-file")
            .arg(&credential)
            .arg("--ca-file")
            .arg(&ca)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(agent.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let _ = agent.kill();
        let _ = agent.wait();
        line.split("IDENTITY_HEADER=").nth(1).unwrap().trim().to_owned()
    };
    let (one, two) = (random_header(), random_header());
    assert!(one.len() == 64 && one.bytes().all(|b| b.is_ascii_hexdigit()), "{one:?}");
    assert_ne!(one, two);

    // This test process is the workload: bind an identity to its uid and executable.
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let uid = own_uid().to_string();
    assert!(cli(&server, &["identity", "create", "app"]).0);
    assert!(cli(&server, &["identity", "create", "other-host-app"]).0);
    let (ok, _, err) = cli(
        &server,
        &["identity", "bind", "app", "--agent", "host1", "--uid", &uid, "--exe", exe.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    // Bound on another agent: host1 must not hand it out.
    assert!(cli(&server, &["identity", "bind", "other-host-app", "--agent", "dev-agent", "--uid", &uid]).0);
    assert!(
        cli(
            &server,
            &[
                "role",
                "assign",
                "--principal",
                "app",
                "--role",
                "Key Vault Secrets User",
                "--scope",
                "/vaults/dev"
            ]
        )
        .0
    );
    assert!(cli(&server, &["secret", "set", "db", "--value", "from-vault"]).0);

    let http = reqwest::Client::new();
    let resource = server.env("COFFER_URL");
    let ask = |header: Option<&str>, client_id: Option<String>| {
        let mut url = format!("{endpoint}?api-version=2019-08-01&resource={resource}");
        if let Some(id) = client_id {
            url.push_str(&format!("&client_id={id}"));
        }
        let mut req = http.get(url);
        if let Some(h) = header {
            req = req.header("X-IDENTITY-HEADER", h);
        }
        req.send()
    };
    let r = ask(None, None).await.unwrap();
    assert_eq!(r.status(), 400, "the anti-SSRF header is required");
    let r = ask(Some("marker"), None).await.unwrap();
    assert_eq!(r.status(), 200);
    let token: Value = r.json().await.unwrap();
    assert!(token["expires_on"].is_string(), "App Service sends expires_on as a string: {token}");
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["resource"].as_str(), Some(resource.as_str()));

    // The token reads the secret through the vault API.
    let client = coffer_client::CofferClient::new(coffer_client::ClientConfig {
        server_url: resource.clone(),
        token: zeroize::Zeroizing::new(token["access_token"].as_str().unwrap().to_owned()),
        ca_pem: Some(std::fs::read(&ca).unwrap()),
    })
    .unwrap();
    let secret = client.get_secret("dev", "db", None).await.unwrap();
    assert_eq!(secret.value.unwrap().expose(), "from-vault");
    assert_eq!(
        client.set_secret("dev", "db", "x", &Default::default()).await.unwrap_err().status(),
        Some(403)
    );

    // Asking for an identity bound on another agent is refused with a clear 403.
    let (_, out, _) = cli(&server, &["identity", "show", "other-host-app", "-o", "json"]);
    let other: Value = serde_json::from_str(&out).unwrap();
    let r = ask(Some("marker"), Some(other["clientId"].as_str().unwrap().to_owned())).await.unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert!(body["error_description"].as_str().unwrap().contains("not bound to this process"), "{body}");

    // Unbinding takes the identity away from this process.
    let (_, out, _) = cli(&server, &["identity", "bindings", "-o", "json"]);
    let bindings: Value = serde_json::from_str(&out).unwrap();
    let app_oid = serde_json::from_str::<Value>(&cli(&server, &["identity", "show", "app", "-o", "json"]).1)
        .unwrap()["objectId"]
        .clone();
    let id = bindings["value"].as_array().unwrap().iter().find(|b| b["identity_id"] == app_oid).unwrap()
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(cli(&server, &["identity", "unbind", &id]).0);
    let r = ask(Some("marker"), None).await.unwrap();
    assert_eq!(r.status(), 403);
    let _ = agent.kill();
    let _ = agent.wait();
}
