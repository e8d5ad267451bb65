//! Sign-in abuse against the real binary (issue 16): memory under a flood of wrong passwords,
//! unknown and known names answering alike, and delays after repeated failures.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{cli, free_port, TestServer};
use serde_json::Value;

fn http(server: &TestServer) -> reqwest::Client {
    server.https(&[])
}

/// A password grant; the status, `Retry-After` and body.
async fn sign_in(http: &reqwest::Client, port: u16, user: &str, password: &str) -> (u16, Option<u64>, Value) {
    let url = format!("https://login.localhost:{port}/adfs/oauth2/token");
    let scope = format!("https://localhost:{port}/.default");
    let r = http
        .post(url)
        .form(&[
            ("grant_type", "password"),
            ("client_id", "coffer-cli"),
            ("username", user),
            ("password", password),
            ("scope", &scope),
        ])
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    (status, retry, r.json().await.unwrap_or(Value::Null))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Creates users through the admin API (faster than one CLI process each).
async fn create_users(http: &reqwest::Client, server: &TestServer, names: &[String], password: &str) {
    let url = format!("https://localhost:{}/admin/principals", server.port);
    let token = server.env("COFFER_TOKEN");
    for name in names {
        let r = http
            .post(&url)
            .bearer_auth(&token)
            .json(&serde_json::json!({"name": name, "type": "user", "password": password}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// 64 concurrent wrong passwords for 64 existing users: before the fix every one ran Argon2id
/// (19 MiB) on its own blocking thread (4.5 GiB measured); now the server stays small and an
/// authenticated client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_keeps_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let http = http(&server);
    let users = names("flood", 64);
    create_users(&http, &server, &users, "the-right-password").await;
    let before = rss_kib(server.child.id());
    let attempts: Vec<_> = users
        .iter()
        .map(|user| {
            let (http, port, user) = (http.clone(), server.port, user.clone());
            tokio::spawn(async move { sign_in(&http, port, &user, "wrong").await.0 })
        })
        .collect();
    // Meanwhile an administrator is served.
    let (ok, out, err) = cli(&server, &["vault", "list"]);
    assert!(ok, "the server answers others during the flood: {err}");
    assert!(out.contains("dev"), "{out}");
    let mut statuses = Vec::new();
    for a in attempts {
        statuses.push(a.await.unwrap());
    }
    let after = rss_kib(server.child.id());
    assert!(statuses.iter().all(|s| *s == 400 || *s == 429), "wrong passwords are refused: {statuses:?}");
    assert!(statuses.contains(&400), "some were checked: {statuses:?}");
    assert!(after < 256 * 1024, "RSS grew from {before} KiB to {after} KiB");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Unknown and known names take the same time to refuse (before: ≈ 3.5 ms against ≈ 20 ms,
/// so names could be enumerated). Known and unknown attempts alternate, so the machine's
/// noise falls on both alike; each name is tried once, below the failures that start delays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_known_names_answer_alike() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let http = http(&server);
    const TRIES: usize = 200;
    create_users(&http, &server, &names("known", TRIES), "the-right-password").await;
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..TRIES {
        let t = Instant::now();
        let (status, _, body) = sign_in(&http, server.port, &format!("known{i}"), "wrong").await;
        known.push(t.elapsed());
        assert_eq!(status, 400, "{body}");
        let t = Instant::now();
        let (status, _, unknown_body) = sign_in(&http, server.port, &format!("nobody{i}"), "wrong").await;
        unknown.push(t.elapsed());
        assert_eq!(status, 400);
        assert_eq!(body["error"], unknown_body["error"], "the same error");
        let description = |b: &Value| b["error_description"].as_str().unwrap().to_owned();
        assert_eq!(description(&body), description(&unknown_body), "the same words");
    }
    let (k, u) = (median(known), median(unknown));
    let ratio = k.as_secs_f64() / u.as_secs_f64();
    assert!((0.67..1.5).contains(&ratio), "median known {k:?} against unknown {u:?}");
}

/// After repeated failures a name is delayed: 429 with Retry-After, the right password is
/// refused until the delay passes, then accepted. Other names are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_delay_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let http = http(&server);
    create_users(&http, &server, &["victim".into()], "the-right-password").await;
    create_users(&http, &server, &["bystander".into()], "another-password").await;
    let mut last = None;
    for _ in 0..6 {
        last = Some(sign_in(&http, server.port, "victim", "guess").await);
    }
    let (status, _, body) = last.unwrap();
    assert_eq!(status, 400, "the sixth failure is still an ordinary refusal: {body}");
    let (status, retry, body) = sign_in(&http, server.port, "Victim", "the-right-password").await;
    assert_eq!(status, 429, "the right password is refused during the delay: {}", body["error"]);
    let retry = retry.expect("Retry-After");
    assert!((1..=300).contains(&retry), "{retry}");
    assert!(body["error_description"].as_str().unwrap().contains("Retry-After"), "{body}");
    let (status, _, _) = sign_in(&http, server.port, "bystander", "another-password").await;
    assert_eq!(status, 200, "other names are not delayed");
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let (status, _, body) = sign_in(&http, server.port, "victim", "the-right-password").await;
    assert_eq!(status, 200, "accepted once the delay has passed: {body}");
}

/// The audit's files, less the index's WAL and shared memory: scratch that SQLite's
/// auto-checkpoint keeps at about 4 MB however many records arrive.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().ends_with("-wal"))
        .filter(|e| !e.file_name().to_string_lossy().ends_with("-shm"))
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

fn audit_records(dir: &std::path::Path) -> Vec<Value> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().extension().is_some_and(|x| x == "jsonl") {
            for line in std::fs::read_to_string(entry.path()).unwrap().lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                if v.get("operationName").is_some() {
                    out.push(v);
                }
            }
        }
    }
    out
}

/// 50,000 unauthenticated requests: before, each was a durable audit record of ≈ 1.9 KB
/// (≈ 95 MB; 8 clients wrote 109 MB in 8 s). Now past its allowance the client gets 429, the
/// refusals are recorded as bursts with their counts, so every request is accounted for in
/// well under 5 MB, and an authenticated client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_flood_is_accounted_for_in_little_audit() {
    const REQUESTS: usize = 50_000;
    const CLIENTS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    // HTTP/1.1, one connection per flooding client (a flood's usual shape). Over HTTP/2, reqwest
    // puts all 50,000 requests on one connection and the server's h2 layer ends it with GOAWAY
    // ENHANCE_YOUR_CALM ("too_many_internal_resets") partway: a separate finding, in the notes.
    let http = server.https_builder(&[]).http1_only().build().unwrap();
    let audit_dir = server.data_dir.join("audit");
    let before = dir_bytes(&audit_dir);
    let url = format!("https://localhost:{}/admin/vaults", server.port);
    let flood: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let mut statuses = HashMap::new();
                for _ in 0..REQUESTS / CLIENTS {
                    let status = http.get(&url).send().await.unwrap().status().as_u16();
                    *statuses.entry(status).or_insert(0usize) += 1;
                }
                statuses
            })
        })
        .collect();
    // Meanwhile the administrator is served (from the same address: authenticated requests
    // never spend the allowance).
    let token = server.env("COFFER_TOKEN");
    for _ in 0..10 {
        let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status(), 200, "served during the flood");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut statuses = HashMap::new();
    for f in flood {
        for (status, n) in f.await.unwrap() {
            *statuses.entry(status).or_insert(0) += n;
        }
    }
    assert_eq!(statuses.values().sum::<usize>(), REQUESTS);
    assert!(statuses.get(&429).copied().unwrap_or(0) > REQUESTS / 2, "{statuses:?}");
    // The burst is recorded once the client has been quiet for two seconds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let grown = dir_bytes(&audit_dir) - before;
    eprintln!("flood of {REQUESTS}: {statuses:?}, audit grew by {grown} bytes");
    assert!(grown < 5 * 1024 * 1024, "the audit grew by {grown} bytes");
    let records = audit_records(&audit_dir);
    let individual = records.iter().filter(|r| r["statusCode"] == 401).count();
    let in_bursts: u64 = records
        .iter()
        .filter(|r| r["operationName"] == "ThrottledRequests")
        .map(|r| {
            let reason = r["properties"]["denialReason"].as_str().unwrap();
            reason.split_whitespace().next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(individual, statuses[&401], "each 401 has its record");
    assert_eq!(in_bursts as usize, statuses[&429], "each 429 is counted in a burst record");
}

/// One principal past its allowance gets Key Vault's 429 `Throttled` with `Retry-After`;
/// another principal is served meanwhile, and the first again once the time has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_past_its_allowance_gets_keyvault_429() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &dir.path().join("data"),
        free_port(),
        &["--principal-requests-per-sec", "1", "--principal-requests-burst", "3"],
    );
    let http = http(&server);
    let url = format!("https://localhost:{}/admin/vaults", server.port);
    let admin = server.env("COFFER_TOKEN");
    let mut statuses = Vec::new();
    let mut throttled = None;
    for _ in 0..6 {
        let r = http.get(&url).bearer_auth(&admin).send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            let body: Value = r.json().await.unwrap();
            throttled = Some((retry, body));
        }
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    let (retry, body) = throttled.unwrap();
    assert_eq!(body["error"]["code"], "Throttled", "{body}");
    assert!((1..=2).contains(&retry), "{retry}");
    // Another principal has its own allowance (the administrator, served again after the
    // wait, creates it).
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let (ok, out, err) = cli(&server, &["sp", "create", "other", "-o", "json"]);
    assert!(ok, "{err}");
    let sp: Value = serde_json::from_str(&out).unwrap();
    let (status, token) = server
        .client_credentials(
            &http,
            &[
                ("client_id", sp["clientId"].as_str().unwrap()),
                ("client_secret", sp["clientSecret"].as_str().unwrap()),
            ],
        )
        .await;
    assert_eq!(status, 200, "{}", token["error"]);
    let other = token["access_token"].as_str().unwrap();
    let mut admin_throttled = false;
    for _ in 0..6 {
        admin_throttled |= http.get(&url).bearer_auth(&admin).send().await.unwrap().status() == 429;
    }
    assert!(admin_throttled, "the administrator is throttled again");
    let r = http.get(&url).bearer_auth(other).send().await.unwrap();
    assert_ne!(r.status(), 429, "another principal is not throttled");
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let r = http.get(&url).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(r.status(), 200, "served again once Retry-After has passed");
}
