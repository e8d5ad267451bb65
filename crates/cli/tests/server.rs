//! Server behaviour that the SDK suites cannot see: raw protocol details, start-up refusals,
//! root-key rotation, and the CLI's own contract.

mod common;

use std::process::Command;

use common::{cli, free_port, read_env_file, TestServer, BIN};

fn raw_client(server: &TestServer) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(server.data_dir.join("ca.pem")).unwrap()).unwrap();
    let vault_host = "dev.localhost";
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca)
        .resolve(vault_host, format!("127.0.0.1:{}", server.port).parse().unwrap())
        .resolve("localhost", format!("127.0.0.1:{}", server.port).parse().unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn protocol_details_the_sdks_rely_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let http = raw_client(&server);
    let base = format!("https://dev.localhost:{}", server.port);
    let token = server.env("COFFER_TOKEN");

    // The SDKs' first request is bodiless and unauthenticated: 401 + challenge, never a 400.
    let r = http
        .put(format!("{base}/secrets/first?api-version=7.5"))
        .header("content-type", "application/json")
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("x-ms-request-id"));
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    let tenant = challenge
        .split("login.localhost:")
        .nth(1)
        .unwrap()
        .split('/')
        .nth(1)
        .unwrap()
        .trim_end_matches("\", resource=\"https:")
        .to_owned();
    assert_eq!(
        challenge,
        format!("Bearer authorization=\"https://login.localhost:{0}/{tenant}\", resource=\"https://localhost:{0}\"", server.port)
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "Unauthorized");

    // JS percent-encodes the query key; it must still count.
    let r = http
        .put(format!("{base}/secrets/first?api%2Dversion=2025-07-01"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"value": "v1", "attributes": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let set: serde_json::Value = r.json().await.unwrap();
    let id = set["id"].as_str().unwrap();
    assert!(id.starts_with(&format!("{base}/secrets/first/")), "{id}");
    assert_eq!(id.rsplit('/').next().unwrap().len(), 32);
    assert_eq!(set["value"], "v1");
    assert_eq!(set["attributes"]["recoveryLevel"], "Recoverable+Purgeable");
    assert_eq!(set["attributes"]["recoverableDays"], 90);

    // A missing api-version is a 400 in Key Vault's error shape.
    let r = http.get(format!("{base}/secrets/first/")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"]["code"], "BadParameter");

    // Tampered, foreign and garbage tokens are all 401 with the challenge.
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [tampered.as_str(), "not-a-jwt", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."] {
        let r =
            http.get(format!("{base}/secrets/first/?api-version=7.5")).bearer_auth(bad).send().await.unwrap();
        assert_eq!(r.status(), 401, "token {bad:.20}");
        assert!(r.headers().contains_key("www-authenticate"));
    }

    // Malformed JSON is a 400 that does not echo the body.
    let r = http
        .put(format!("{base}/secrets/x?api-version=7.5"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"value\": \"SECRET-IN-BAD-JSON\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(!r.text().await.unwrap().contains("SECRET-IN-BAD-JSON"));

    // Unknown vault (authenticated) and unknown host.
    let r = http
        .get(format!("https://localhost:{}/admin/vaults/nope", server.port))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().contains_key("x-ms-request-id"));
    let r = http.get(format!("https://localhost:{}/healthz", server.port)).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Paging: maxresults beyond 25 is refused, nextLink carries the same host and port.
    for i in 0..3 {
        http.put(format!("{base}/secrets/page-{i}?api-version=7.5"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"value": "v"}))
            .send()
            .await
            .unwrap();
    }
    let r = http
        .get(format!("{base}/secrets?api-version=7.5&maxresults=26"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let page: serde_json::Value = http
        .get(format!("{base}/secrets?api-version=7.5&maxresults=2"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["value"].as_array().unwrap().len(), 2);
    assert!(page["value"][0].get("value").is_none(), "listings never carry values");
    let next = page["nextLink"].as_str().unwrap();
    assert!(next.starts_with(&format!("{base}/secrets?")), "{next}");
    let page2: serde_json::Value =
        http.get(next).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(page2["value"].as_array().unwrap().len(), 2);
    assert!(page2["nextLink"].is_null());
}

#[test]
fn production_mode_refuses_to_start_without_tls_or_root_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coffer.toml");
    std::fs::write(&config, format!("data_dir = \"{}\"\n", dir.path().join("data").display())).unwrap();
    let out = Command::new(BIN).args(["server", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to start") && err.contains("tls_cert_file"), "{err}");

    std::fs::write(
        &config,
        format!(
            "data_dir = \"{0}/data\"\ntls_cert_file = \"{0}/missing-cert.pem\"\ntls_key_file = \"{0}/missing-key.pem\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN).args(["server", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS certificate") && err.contains("not readable"), "{err}");

    // TLS present, root key source missing (no terminal to prompt on).
    std::fs::write(dir.path().join("missing-cert.pem"), "x").unwrap();
    std::fs::write(dir.path().join("missing-key.pem"), "x").unwrap();
    let out = Command::new(BIN).args(["server", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("root-key source"), "{err}");
    assert!(!dir.path().join("data").exists(), "nothing is created before the checks pass");
}

#[tokio::test]
async fn root_key_rotation_rewraps_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let server = TestServer::start(&data, port, &[]);
    let (ok, _, err) = cli(&server, &["secret", "set", "rotated", "--value", "before-rotation"]);
    assert!(ok, "{err}");
    server.kill9();

    let new_key = dir.path().join("new-root.key");
    let out = Command::new(BIN)
        .args(["admin", "rewrap-root-key", "--data-dir"])
        .arg(&data)
        .arg("--new-root-key-file")
        .arg(&new_key)
        .arg("--generate")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The old key no longer opens the directory…
    let log = TestServer::try_start(&data, port, &[]).err().expect("old root key must be refused");
    assert!(log.contains("root key does not match"), "{log}");
    // …the new one does, and the secret is intact.
    let server = TestServer::start(&data, port, &["--root-key-file", new_key.to_str().unwrap()]);
    let (ok, out, err) = cli(&server, &["secret", "show", "rotated", "--reveal", "-o", "json"]);
    assert!(ok, "{err}");
    assert!(out.contains("before-rotation"));
}

#[test]
fn dev_mode_writes_env_files_with_private_modes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let server = TestServer::start(&data, port, &[]);
    let mode = |p: &str| std::fs::metadata(data.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("admin.env"), 0o600);
    assert_eq!(mode("root.key"), 0o600);
    assert_eq!(mode("tls/ca-key.pem"), 0o600);
    assert_eq!(mode("tls/server-key.pem"), 0o600);
    assert_eq!(mode("coffer.db"), 0o600);
    assert_eq!(mode("coffer.db-wal"), 0o600);
    let dev = read_env_file(&data.join("dev.env"));
    let get = |k: &str| dev.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(get("AZURE_KEYVAULT_URL"), format!("https://dev.localhost:{port}"));
    for k in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"] {
        assert!(get(k).ends_with("/ca.pem"));
    }
    assert!(!std::fs::read_to_string(data.join("dev.env")).unwrap().contains("COFFER_TOKEN"));
    let admin = server.admin_env();
    assert!(admin.iter().any(|(k, v)| k == "COFFER_URL" && v == &format!("https://localhost:{port}")));
    drop(server);
    // A second start reuses everything: same CA, same tenant, secrets kept.
    let ca_before = std::fs::read(data.join("ca.pem")).unwrap();
    let server = TestServer::start(&data, port, &[]);
    assert_eq!(std::fs::read(data.join("ca.pem")).unwrap(), ca_before);
    let (ok, out, _) = cli(&server, &["vault", "list"]);
    assert!(ok && out.contains("dev"));
}

#[test]
fn cli_hides_values_unless_revealed_and_prints_the_seed_table() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let (ok, out, err) = cli(&server, &["secret", "set", "demo-api-key", "--value", "camp1_demo_hidden"]);
    assert!(ok, "{err}");
    assert!(!out.contains("camp1_demo_hidden"), "set must not print the value");
    cli(&server, &["secret", "set", "external-service-secret", "--value", "x"]);
    let (_, out, _) = cli(&server, &["secret", "show", "demo-api-key"]);
    assert!(!out.contains("camp1_demo_hidden"));
    let (_, out, _) = cli(&server, &["secret", "show", "demo-api-key", "--reveal"]);
    assert!(out.contains("camp1_demo_hidden"));
    let (_, out, _) = cli(&server, &["secret", "list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("Name") && lines[0].contains("Enabled"), "{out}");
    assert!(lines.iter().any(|l| l.starts_with("demo-api-key") && l.contains("True")));
    assert!(lines.iter().any(|l| l.starts_with("external-service-secret") && l.contains("True")));
    let (_, out, _) = cli(&server, &["secret", "list", "-o", "json"]);
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(parsed.as_array().unwrap().len(), 2);
    // Values from stdin.
    let mut child = Command::new(BIN)
        .args(["secret", "set", "from-stdin"])
        .envs(server.admin_env())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"stdin-value\n").unwrap();
    assert!(child.wait().unwrap().success());
    let (_, out, _) = cli(&server, &["secret", "show", "from-stdin", "--reveal", "-o", "json"]);
    assert!(out.contains("\"stdin-value\""), "{out}");
    // Errors are clear and non-zero.
    let (ok, _, err) = cli(&server, &["secret", "show", "missing"]);
    assert!(!ok && err.contains("SecretNotFound"), "{err}");
}
