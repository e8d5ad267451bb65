//! The audit log's disk against the real binary (issue 16): a size bound on the rotated files
//! that keeps `coffer audit verify` passing, a loud and rate-limited alarm when the audit
//! filesystem runs low (a threshold above the free space, and a real tmpfs filling up: needs
//! root, as the suite does), and `/readyz` and `/metrics` reporting the headroom.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, TestServer, BIN};
use serde_json::Value;

fn http(server: &TestServer) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(server.data_dir.join("ca.pem")).unwrap()).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca)
        .resolve("localhost", addr)
        .resolve("dev.localhost", addr)
        .resolve("login.localhost", addr)
        .build()
        .unwrap()
}

/// The rotated audit files (`audit-<first>-<last>.jsonl`), oldest first, with their sizes.
fn rotated(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let len = e.metadata().ok()?.len();
            (name.starts_with("audit-") && name.ends_with(".jsonl")).then_some((name, len))
        })
        .collect();
    out.sort();
    out
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_bound_prunes_old_rotated_files_and_the_log_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let server = TestServer::start(&data, port, &["--audit-max-file-mib", "1", "--audit-max-total-mib", "2"]);
    let audit_dir = data.join("audit");
    let http = http(&server);
    let token = server.env("COFFER_TOKEN");
    // Authenticated reads (a 404 each), audited one record each; a long User-Agent (records cut
    // it at 1 KiB) makes each record ≈2.5 KB, so ≈5 MiB of audit takes ≈2,000 requests.
    let agent = "x".repeat(1024);
    let url = format!("https://dev.localhost:{port}/secrets/nothing-here?api-version=7.5");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, token, agent, url) = (http.clone(), token.clone(), agent.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..260 {
                let r = http.get(&url).bearer_auth(&token).header("user-agent", &agent).send().await.unwrap();
                assert_eq!(r.status(), 404);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Rotation (at 1 MiB) and the bound are applied after a commit; a few more requests make
    // sure the last rotation's pruning is done before the files are counted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let files = rotated(&audit_dir);
        let total: u64 = files.iter().map(|(_, len)| len).sum();
        let first_pruned =
            files.first().is_some_and(|(name, _)| !name.starts_with("audit-00000000000000000001-"));
        if total <= 2 * MIB && first_pruned {
            break;
        }
        assert!(Instant::now() < deadline, "rotated files hold {total} bytes (bound 2 MiB): {files:?}");
        let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status(), 404);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Rotated files are a little over 1 MiB (rotation follows the commit that crossed it), so
    // the 2 MiB bound keeps the newest one.
    assert!(!rotated(&audit_dir).is_empty(), "the newest rotated file was pruned too");
    let log = server.log_text();
    assert!(log.contains("size bound pruned rotated files"), "{log}");

    // What is left verifies: the pruning is signed (prunedThrough), not a deletion.
    let out = Command::new(BIN).args(["audit", "verify", "--data-dir"]).arg(&data).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("verified: OK"), "{stdout}{stderr}");
    assert!(stderr.contains("note: records through seq") && stderr.contains("were pruned"), "{stderr}");

    // The metrics say the same.
    let r = http.get(format!("https://localhost:{port}/metrics")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let metric = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
            .parse()
            .unwrap()
    };
    assert!(metric("coffer_audit_pruned_files_total") >= 1, "{text}");
    assert_eq!(metric("coffer_audit_max_total_bytes"), 2 * MIB, "{text}");
    assert!(metric("coffer_audit_rotated_bytes") <= 2 * MIB + MIB, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_audit_disk_headroom_is_alarmed_and_readyz_answers_503() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    // More free space than any test machine has: the headroom is "low" from the start.
    let server = TestServer::start(&data, port, &["--audit-min-free-mib", "1000000000"]);
    let http = http(&server);
    let audit_records =
        || rotated(&data.join("audit")).len() as u64 + count_lines(&data.join("audit/audit.jsonl"));
    let before = audit_records();

    // The alarm is in the log, loud, without waiting for the disk to fill.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.log_text().contains("audit disk headroom is low") {
        assert!(Instant::now() < deadline, "no alarm in the log:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..20 {
        let r = http.get(format!("https://localhost:{port}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], "unavailable", "{body}");
        assert_eq!(body["checks"]["auditDisk"]["ok"], false, "{body}");
        assert_eq!(body["checks"]["store"]["ok"], true, "{body}");
        assert_eq!(body["checks"]["auditWriter"]["ok"], true, "{body}");
        let disk = &body["checks"]["auditDisk"];
        assert!(disk["freeBytes"].as_u64().unwrap() > 0, "{body}");
        assert_eq!(disk["minFreeBytes"].as_u64(), Some(1_000_000_000 * MIB), "{body}");
        assert!(disk["message"].as_str().unwrap().contains("audit_min_free_mib"), "{body}");
    }
    // Liveness is not readiness: /healthz still answers 200.
    let r = http.get(format!("https://localhost:{port}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Rate-limited (once a minute), not once per check or per request.
    let alarms = server.log_text().matches("audit disk headroom is low").count();
    assert!(alarms <= 2, "{alarms} alarms:\n{}", server.log_text());
    // Health checks are not audited.
    assert_eq!(audit_records(), before);
}

fn count_lines(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path).map(|t| t.lines().count() as u64).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_200_with_the_headroom_and_metrics_need_audit_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let server = TestServer::start(&data, port, &["--audit-min-free-mib", "1"]);
    let http = http(&server);
    let r = http.get(format!("https://localhost:{port}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ready", "{body}");
    for check in ["store", "auditWriter", "auditDisk"] {
        assert_eq!(body["checks"][check]["ok"], true, "{body}");
    }
    let disk = &body["checks"]["auditDisk"];
    assert!(disk["freeBytes"].as_u64().unwrap() > MIB, "{body}");
    assert!(disk["dirBytes"].as_u64().unwrap() > 0, "{body}");
    assert_eq!(disk["minFreeBytes"].as_u64(), Some(MIB), "{body}");
    assert_eq!(disk["maxTotalBytes"], Value::Null, "{body}");
    assert!(!server.log_text().contains("audit disk headroom is low"));

    // Metrics tell an attacker how close their flood is to the disk: audit readers only.
    let url = format!("https://localhost:{port}/metrics");
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(&url).bearer_auth(server.env("COFFER_TOKEN")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.unwrap();
    for name in [
        "coffer_audit_free_bytes",
        "coffer_audit_dir_bytes",
        "coffer_audit_min_free_bytes",
        "coffer_audit_records_total",
        "coffer_throttled_requests_total",
        "coffer_ready",
    ] {
        assert!(text.lines().any(|l| l.starts_with(&format!("{name} "))), "no {name} in:\n{text}");
        assert!(text.contains(&format!("# TYPE {name} ")), "no TYPE for {name} in:\n{text}");
    }
    assert!(text.contains("coffer_ready 1"), "{text}");

    // A signed-in user without an audit-reader role is refused.
    let admin = server.env("COFFER_TOKEN");
    let r = http
        .post(format!("https://localhost:{port}/admin/principals"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"name": "no-roles", "type": "user", "password": "pw-7Hq2-metrics"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = http
        .post(format!("https://login.localhost:{port}/adfs/oauth2/token"))
        .form(&[
            ("grant_type", "password"),
            ("client_id", "coffer-cli"),
            ("username", "no-roles"),
            ("password", "pw-7Hq2-metrics"),
            ("scope", &format!("https://localhost:{port}/.default")),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let user_token = r.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned();
    let r = http.get(&url).bearer_auth(&user_token).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["innererror"]["code"], "ForbiddenByRbac", "{body}");
}

/// A tmpfs mounted for the test, unmounted (lazily) on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "mounting a tmpfs needs root: run the suite as root (CI does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "cannot mount a tmpfs");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// Writes `bytes` (or until the filesystem is full, if `None`) into a new file at `path`.
fn fill(path: &std::path::Path, bytes: Option<u64>) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    while bytes.is_none_or(|b| written < b) && f.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    if bytes.is_none() {
        while f.write_all(&[0]).is_ok() {}
    }
    let _ = f.sync_all();
}

async fn readyz(http: &reqwest::Client, port: u16) -> (u16, Value) {
    let r = http.get(format!("https://localhost:{port}/readyz")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Polls `/readyz` (answered from a 1 s cache) until `accept` holds.
async fn readyz_until(http: &reqwest::Client, port: u16, accept: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = readyz(http, port).await;
        if accept(status, &body) {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A real filesystem filling up: the alarm and `/readyz` turn before any request is refused,
/// then the full disk refuses requests (fail closed) and `/readyz` names the audit writer, and
/// both recover once space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_audit_disk_alarms_before_requests_fail_and_readyz_follows_it() {
    let fs = Tmpfs::mount("24m");
    let audit = fs.0.path().join("audit");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let audit_arg = audit.to_str().unwrap();
    let server = TestServer::start(
        &data,
        port,
        &["--audit-dir", audit_arg, "--audit-min-free-mib", "8", "--audit-journal-mib", "1"],
    );
    let http = http(&server);
    let token = server.env("COFFER_TOKEN");
    let url = format!("https://dev.localhost:{port}/secrets/nothing-here?api-version=7.5");
    let get = || async { http.get(&url).bearer_auth(&token).send().await.unwrap() };
    let (status, body) = readyz(&http, port).await;
    assert_eq!(status, 200, "{body}");

    // Leave 4 MiB free: below the 8 MiB bound, far from full.
    let free = coffer_audit::disk_usage(&audit).unwrap().free_bytes;
    fill(&fs.0.path().join("filler-1"), Some(free - 4 * MIB));
    let body = readyz_until(&http, port, |s, b| s == 503 && b["checks"]["auditDisk"]["ok"] == false).await;
    assert_eq!(body["checks"]["auditWriter"]["ok"], true, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log_text().contains("audit disk headroom is low") {
        assert!(Instant::now() < deadline, "no alarm in the log:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get().await.status(), 404, "requests are still served (and audited) while the alarm sounds");

    // Full: requests are refused, and /readyz says the audit writer is failing too.
    fill(&fs.0.path().join("filler-2"), None);
    let mut refused = false;
    for _ in 0..2000 {
        let r = get().await;
        if r.status() == 503 {
            assert!(r.text().await.unwrap().contains("AuditUnavailable"));
            refused = true;
            break;
        }
        assert_eq!(r.status(), 404);
    }
    assert!(refused, "the audit disk never filled up");
    let body = readyz_until(&http, port, |s, b| s == 503 && b["checks"]["auditWriter"]["ok"] == false).await;
    assert!(body["checks"]["auditWriter"]["message"].as_str().unwrap().contains("commit failed"), "{body}");

    // Space freed: served again, ready again.
    std::fs::remove_file(fs.0.path().join("filler-1")).unwrap();
    std::fs::remove_file(fs.0.path().join("filler-2")).unwrap();
    assert_eq!(get().await.status(), 404);
    readyz_until(&http, port, |s, _| s == 200).await;
    drop(server);
}
