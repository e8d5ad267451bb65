//! The audit log through the real server: one record per request with the right facts, no
//! secret material in any sink, fail-closed on a full disk, survival of kill -9, and
//! `coffer audit verify` on an untouched and on a tampered log.

mod common;

use std::process::Command;

use common::{cli, free_port, TestServer, BIN};
use serde_json::Value;

fn records(dir: &std::path::Path) -> Vec<Value> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    for f in files {
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            if v.get("operationName").is_some() {
                out.push(v);
            }
        }
    }
    out.sort_by_key(|r| r["seq"].as_u64());
    out
}

fn grep_dir(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            hits.extend(grep_dir(&path, needle));
        } else if std::fs::read(&path).unwrap().windows(needle.len()).any(|w| w == needle.as_bytes()) {
            hits.push(path);
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_record_per_request_and_no_secret_material() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let server = TestServer::start(&data, port, &["--audit-stdout", "true"]);
    let token = server.env("COFFER_TOKEN");
    let admin_secret = server.env("AZURE_CLIENT_SECRET");
    let audit_dir = data.join("audit");
    let before = records(&audit_dir).len();

    // Every secrets operation once, through the CLI (allowed), each a single request.
    let value = "AUDIT-VALUE-q3Zr8";
    let steps: Vec<(Vec<&str>, &str)> = vec![
        (vec!["secret", "set", "audited", "--value", value], "SecretSet"),
        (vec!["secret", "show", "audited", "--reveal"], "SecretGet"),
        (vec!["secret", "update", "audited", "--content-type", "text/plain"], "SecretUpdate"),
        (vec!["secret", "delete", "audited"], "SecretDelete"),
        (vec!["secret", "show-deleted", "audited"], "SecretGetDeleted"),
        (vec!["secret", "recover", "audited"], "SecretRecover"),
    ];
    let mut admin_hmacs = std::collections::BTreeSet::new();
    for (args, op) in &steps {
        let (ok, _, err) = cli(&server, args);
        assert!(ok, "{args:?}: {err}");
        let all = records(&audit_dir);
        let last = all.last().unwrap();
        assert_eq!(last["operationName"], *op, "{args:?}");
        assert_eq!(last["resultType"], "Success");
        assert_eq!(last["properties"]["vault"], "dev");
        assert_eq!(last["properties"]["secret"], "audited");
        assert_eq!(last["identity"]["displayName"], "coffer-admin");
        assert!(last["properties"]["grant"].as_str().unwrap().starts_with("Coffer Administrator"));
        let hmac = last["properties"]["credentialHmac"].as_str().unwrap();
        assert!(hmac.starts_with("hmac-sha256:"));
        admin_hmacs.insert(hmac.to_owned());
    }
    // One token (verified once, then cached): one keyed hash on all its requests.
    assert_eq!(admin_hmacs.len(), 1, "{admin_hmacs:?}");
    assert_eq!(records(&audit_dir).len(), before + steps.len(), "exactly one record per request");

    // Admin API records name the assignment that allowed them too.
    for (args, op) in [(vec!["vault", "list"], "VaultList"), (vec!["role", "list"], "RoleAssignmentList")] {
        let (ok, _, err) = cli(&server, &args);
        assert!(ok, "{args:?}: {err}");
        let all = records(&audit_dir);
        let last = all.last().unwrap();
        assert_eq!(last["operationName"], op, "{args:?}");
        let grant = last["properties"]["grant"].as_str().unwrap_or_default();
        assert!(grant.starts_with("Coffer Administrator ("), "{args:?}: grant {grant:?}");
    }

    // Denied: no token (401) and a principal without a role (403), each recorded once.
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(data.join("ca.pem")).unwrap()).unwrap(),
        )
        .resolve("dev.localhost", format!("127.0.0.1:{port}").parse().unwrap())
        .build()
        .unwrap();
    let url = format!("https://dev.localhost:{port}/secrets/audited/?api-version=7.5");
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    let denied = records(&audit_dir).last().unwrap().clone();
    assert_eq!(denied["operationName"], "SecretGet");
    assert_eq!(denied["resultType"], "Denied");
    assert_eq!(denied["statusCode"], 401);
    assert!(denied["properties"]["denialReason"].as_str().unwrap().contains("missing a Bearer"));
    let (_, out, _) = cli(&server, &["sp", "create", "nobody", "-o", "json"]);
    let sp: Value = serde_json::from_str(&out).unwrap();
    let sp_secret = sp["clientSecret"].as_str().unwrap().to_owned();
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", sp["clientId"].as_str().unwrap()),
        ("client_secret", sp_secret.as_str()),
        ("scope", &format!("https://localhost:{port}/.default")),
    ];
    let http_login = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(data.join("ca.pem")).unwrap()).unwrap(),
        )
        .resolve("login.localhost", format!("127.0.0.1:{port}").parse().unwrap())
        .build()
        .unwrap();
    let issued: Value = http_login
        .post(format!("https://login.localhost:{port}/adfs/oauth2/v2.0/token"))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sp_token = issued["access_token"].as_str().unwrap().to_owned();
    let issue_record = records(&audit_dir).last().unwrap().clone();
    assert_eq!(issue_record["operationName"], "TokenIssue");
    assert_eq!(issue_record["identity"]["displayName"], "nobody");
    assert_eq!(http.get(&url).bearer_auth(&sp_token).send().await.unwrap().status(), 403);
    let forbidden = records(&audit_dir).last().unwrap().clone();
    assert_eq!(
        (forbidden["resultType"].as_str(), forbidden["statusCode"].as_u64()),
        (Some("Denied"), Some(403))
    );
    assert_eq!(forbidden["identity"]["displayName"], "nobody");
    assert!(forbidden["properties"]["denialReason"].as_str().unwrap().contains("getSecret"));
    // Another token, another hash; the same token again (now from the cache), the same hash.
    let sp_hmac = forbidden["properties"]["credentialHmac"].as_str().unwrap().to_owned();
    assert!(!admin_hmacs.contains(&sp_hmac));
    assert_eq!(http.get(&url).bearer_auth(&sp_token).send().await.unwrap().status(), 403);
    let again = records(&audit_dir).last().unwrap().clone();
    assert_eq!(again["properties"]["credentialHmac"].as_str(), Some(sp_hmac.as_str()));

    // No value, token, client secret or admin secret in any file under the data directory's
    // audit sinks, nor in the stdout sink (the server log captures stdout).
    let log = server.log_text();
    assert!(log.contains("\"operationName\""), "the stdout sink writes records");
    for needle in [value, token.as_str(), sp_secret.as_str(), admin_secret.as_str(), sp_token.as_str()] {
        assert!(grep_dir(&audit_dir, needle).is_empty(), "secret material in the audit directory");
        assert!(!log.contains(needle), "secret material in the server output");
    }

    // The CLI's query answers from the index.
    let (ok, out, _) =
        cli(&server, &["audit", "query", "--secret", "audited", "--result", "denied", "-o", "json"]);
    assert!(ok);
    let found: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(found.len(), 3, "the 401 and the two 403s on 'audited'");
    server.kill9();

    // Records survive kill -9, and the untouched log verifies.
    let verify = |extra: &[&str]| {
        Command::new(BIN).args(["audit", "verify", "--data-dir"]).arg(&data).args(extra).output().unwrap()
    };
    let ok = verify(&[]);
    assert!(
        ok.status.success(),
        "{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    let server = TestServer::start(&data, port, &[]);
    assert!(records(&audit_dir).iter().any(|r| r["operationName"] == "SecretRecover"));
    drop(server);

    // One byte changed in a record: verify fails and names it.
    let active = audit_dir.join("audit.jsonl");
    let text = std::fs::read_to_string(&active).unwrap();
    let tampered = text.replacen("\"SecretRecover\"", "\"SecretRecovex\"", 1);
    assert_ne!(text, tampered);
    std::fs::write(&active, tampered).unwrap();
    let bad = verify(&[]);
    assert!(!bad.status.success());
    let report = String::from_utf8_lossy(&bad.stdout);
    assert!(report.contains("PROBLEM") && report.contains("audit.jsonl"), "{report}");
}

/// `--audit-journal-mib`: 0 runs without the commit journal (and removes one left behind), N
/// preallocates N MiB; either way every acknowledged record is in the log and it verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_journal_size_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let journal = data.join("audit").join("journal");
    let port = free_port();
    let mut written = 0;
    for (mib, name) in [("1", "with-1mib"), ("0", "without"), ("2", "with-2mib")] {
        let server = TestServer::start(&data, port, &["--audit-journal-mib", mib]);
        let value = format!("journal-{name}");
        let (ok, _, err) = cli(&server, &["secret", "set", name, "--value", &value]);
        assert!(ok, "{mib} MiB: {err}");
        written += 1;
        match mib {
            "0" => assert!(!journal.exists(), "no journal with --audit-journal-mib 0"),
            n => assert_eq!(std::fs::metadata(&journal).unwrap().len(), n.parse::<u64>().unwrap() << 20),
        }
        drop(server);
    }
    let sets: Vec<_> =
        records(&data.join("audit")).into_iter().filter(|r| r["operationName"] == "SecretSet").collect();
    assert_eq!(sets.len(), written);
    let verify = Command::new(BIN).args(["audit", "verify", "--data-dir"]).arg(&data).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    match TestServer::try_start(&data, port, &["--audit-journal-mib", "4096"]) {
        Ok(_) => panic!("a 4 GiB journal was accepted"),
        Err(log) => assert!(log.contains("audit_journal_mib"), "{log}"),
    }
}

/// A full audit disk: requests fail with 503 and no value leaves the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_audit_disk_fails_closed() {
    if std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && !l.contains("\t0\t"))
    {
        eprintln!("needs root to mount a tmpfs; run the suite as root (CI does)");
        panic!("root required for the fail-closed test");
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let audit = dir.path().join("audit-tmpfs");
    std::fs::create_dir_all(&audit).unwrap();
    let port = free_port();
    // A private mount namespace with a 256 KiB tmpfs as the audit directory.
    let script = format!(
        "mount -t tmpfs -o size=256k tmpfs {audit} && exec {bin} server --dev --data-dir {data} --listen 127.0.0.1:{port} --agent-listen 127.0.0.1:0 --audit-dir {audit}",
        audit = audit.display(),
        bin = BIN,
        data = data.display()
    );
    let log = dir.path().join("server.log");
    let mut child = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("server.err")).unwrap())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("ready") {
        assert!(start.elapsed().as_secs() < 60, "server did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let env = common::read_env_file(&data.join("admin.env"));
    let get = |k: &str| env.iter().find(|(key, _)| key == k).unwrap().1.clone();
    let client = coffer_client::CofferClient::new(coffer_client::ClientConfig {
        server_url: get("COFFER_URL"),
        token: zeroize::Zeroizing::new(get("COFFER_TOKEN")),
        ca_pem: Some(std::fs::read(data.join("ca.pem")).unwrap()),
    })
    .unwrap();
    let value = "FULL-DISK-VALUE-7Hq";
    client.set_secret("dev", "kept", value, &Default::default()).await.unwrap();
    // Read until the audit disk is full (bounded): every answer is the value or a 503.
    let mut refused = 0;
    for _ in 0..5000 {
        match client.get_secret("dev", "kept", None).await {
            Ok(s) => assert_eq!(s.value.unwrap().expose(), value),
            Err(e) => {
                assert_eq!(e.status(), Some(503), "{e}");
                assert!(e.to_string().contains("AuditUnavailable"));
                assert!(!e.to_string().contains(value));
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(refused >= 3, "the audit disk never filled up");
    let err = std::fs::read_to_string(dir.path().join("server.err")).unwrap();
    assert!(err.contains("audit record not durable"), "the server says so in its log");
}
