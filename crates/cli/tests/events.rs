//! Secret events to webhooks and rotation policies, against the real binary: a webhook
//! receiver in the test gets signed CloudEvents (also after it was down and after a server
//! restart), near-expiry/expired notices fire, and rotation (manual and scheduled) makes
//! exactly the versions it should.
//!
//! Short windows: `--near-expiry` on a subscription and second-scale rotation intervals keep
//! every test well under ten seconds of waiting.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{cli, free_port, TestServer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The test's receivers listen on loopback, which the server refuses to reach unless told.
const RECEIVER_ALLOWED: &[&str] = &["--outbound-allow", "127.0.0.1"];

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
struct Delivery {
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A minimal HTTP/1.1 webhook receiver on 127.0.0.1 that answers 200 and records requests.
/// `stop` closes the listener and every open connection (the receiver is "down").
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Delivery>>>,
    tasks: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let mut r = Receiver { port: 0, got: Arc::default(), tasks: None };
        r.listen(TcpListener::bind("127.0.0.1:0").await.unwrap());
        r
    }

    /// A receiver that is not up yet, on a port it will use.
    fn down() -> Receiver {
        Receiver { port: free_port(), got: Arc::default(), tasks: None }
    }

    async fn up(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.listen(listener);
    }

    fn listen(&mut self, listener: TcpListener) {
        self.port = listener.local_addr().unwrap().port();
        let got = self.got.clone();
        self.tasks = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                connections.spawn(serve(stream, got.clone()));
            }
        }));
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn deliveries(&self, path: &str) -> Vec<Delivery> {
        self.got.lock().unwrap().iter().filter(|d| d.path == path).cloned().collect()
    }

    /// Waits (up to `limit`) until `path` has seen at least `n` requests.
    async fn wait_for(&self, path: &str, n: usize, limit: Duration) -> Vec<Delivery> {
        let start = Instant::now();
        loop {
            let got = self.deliveries(path);
            if got.len() >= n || start.elapsed() > limit {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(t) = self.tasks.take() {
            t.abort();
        }
    }
}

async fn serve(mut stream: TcpStream, got: Arc<Mutex<Vec<Delivery>>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let path = lines.next().unwrap_or_default().split(' ').nth(1).unwrap_or_default().to_owned();
        let headers: BTreeMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        got.lock().unwrap().push(Delivery { path, headers, body });
        if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.is_err() {
            return;
        }
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn json_cli(server: &TestServer, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (ok, out, err) = cli(server, &all);
    assert!(ok, "coffer {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("coffer {args:?}: {e}: {out}"))
}

/// `coffer event subscribe …`; returns (id, signing secret).
fn subscribe(server: &TestServer, args: &[&str]) -> (String, String) {
    let mut all = vec!["event", "subscribe", "--vault", "dev"];
    all.extend(args);
    let out = json_cli(server, &all);
    (out["id"].as_str().unwrap().to_owned(), out["signingSecret"].as_str().unwrap().to_owned())
}

fn set(server: &TestServer, name: &str, value: &str, extra: &[&str]) -> String {
    let mut args = vec!["secret", "set", name, "--value", value];
    args.extend(extra);
    json_cli(server, &args)["id"].as_str().unwrap().to_owned()
}

fn versions(server: &TestServer, name: &str) -> Vec<Value> {
    json_cli(server, &["secret", "list-versions", name]).as_array().unwrap().clone()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the documented signature: HMAC-SHA256(secret, "<X-Coffer-Timestamp>.<body>").
fn assert_signed(d: &Delivery, secret: &str) {
    let ts = d.headers.get("x-coffer-timestamp").expect("timestamp header");
    let sent: i64 = ts.parse().unwrap();
    assert!((sent - now()).abs() < 120, "fresh timestamp");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(&d.body);
    let expected = format!("sha256={}", hex(ring::hmac::sign(&key, &signed).as_ref()));
    assert_eq!(d.headers.get("x-coffer-signature"), Some(&expected), "signature");
    // And it is a real MAC: the wrong key does not verify.
    let wrong = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"cfwh_wrong");
    assert_ne!(
        Some(&format!("sha256={}", hex(ring::hmac::sign(&wrong, &signed).as_ref()))),
        d.headers.get("x-coffer-signature")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_signed_cloud_events_filtered_by_type_and_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), RECEIVER_ALLOWED);
    let receiver = Receiver::start().await;
    let (all_id, all_secret) = subscribe(&server, &["--url", &receiver.url("/all")]);
    let (_, db_secret) = subscribe(
        &server,
        &[
            "--url",
            &receiver.url("/db"),
            "--type",
            "Microsoft.KeyVault.SecretNewVersionCreated",
            "--secret",
            "DB-Password",
        ],
    );
    let (_, _) = subscribe(&server, &["--url", &receiver.url("/expired"), "--type", "SecretExpired"]);
    assert!(all_secret.starts_with("cfwh_") && all_secret != db_secret);

    let db_id = set(&server, "db-password", "hunter2-value-0xDEADBEEF", &[]);
    let other_id = set(
        &server,
        "other",
        "another-value-0xFEEDFACE",
        &["--expires", &(now() + 86_400 * 365).to_string()],
    );

    let all = receiver.wait_for("/all", 2, Duration::from_secs(8)).await;
    let db = receiver.wait_for("/db", 1, Duration::from_secs(3)).await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(db.len(), 1, "only the named secret: {db:?}");
    assert!(receiver.deliveries("/expired").is_empty(), "type filter");

    let vault_url = server.env("COFFER_URL").replace("https://", "https://dev.");
    for (d, id, name) in [(&all[0], &db_id, "db-password"), (&all[1], &other_id, "other")] {
        assert_signed(d, &all_secret);
        assert_eq!(d.headers["content-type"], "application/cloudevents+json; charset=utf-8");
        assert_eq!(d.headers["x-coffer-subscription"], all_id);
        let e = d.json();
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["type"], "Microsoft.KeyVault.SecretNewVersionCreated");
        assert_eq!(e["source"], vault_url.as_str());
        assert_eq!(e["subject"], name);
        assert_eq!(e["datacontenttype"], "application/json");
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(e["id"].as_str().unwrap().len(), 36);
        let data = &e["data"];
        assert_eq!(data["Id"], id.as_str());
        assert_eq!(data["VaultName"], "dev");
        assert_eq!(data["ObjectType"], "Secret");
        assert_eq!(data["ObjectName"], name);
        assert_eq!(data["Version"], id.rsplit('/').next().unwrap());
        assert!(data["NBF"].is_null());
        assert_eq!(data.as_object().unwrap().len(), 7);
    }
    assert!(all[1].json()["data"]["EXP"].as_i64().unwrap() > now());
    assert_signed(&db[0], &db_secret);
    assert_eq!(db[0].json()["id"], all[0].json()["id"], "one event, one id, whoever receives it");

    // Events never carry values.
    for d in receiver.got.lock().unwrap().iter() {
        let body = String::from_utf8_lossy(&d.body);
        assert!(!body.contains("hunter2") && !body.contains("0xFEEDFACE"), "{body}");
    }

    // Listing shows the delivery state; delete removes a subscription.
    let list = json_cli(&server, &["event", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 3);
    let mine = list.as_array().unwrap().iter().find(|s| s["id"] == all_id.as_str()).unwrap();
    assert_eq!((mine["pending"].as_i64(), mine["delivered"].as_i64()), (Some(0), Some(2)));
    assert!(mine.get("signingSecret").is_none(), "the signing secret is shown once");
    let (ok, out, _) = cli(&server, &["event", "list"]);
    assert!(ok && out.contains(&all_id) && !out.contains(&all_secret));
    assert!(cli(&server, &["event", "delete", &all_id]).0);
    assert_eq!(json_cli(&server, &["event", "list", "--vault", "dev"]).as_array().unwrap().len(), 2);
    let (ok, _, err) = cli(&server, &["event", "delete", &all_id]);
    assert!(!ok && err.contains("No event subscription"), "{err}");
    let (ok, _, err) = cli(&server, &["event", "subscribe", "--vault", "dev", "--url", "ftp://x/y"]);
    assert!(!ok && err.contains("http"), "{err}");
    let (ok, _, err) = cli(
        &server,
        &["event", "subscribe", "--vault", "dev", "--url", &receiver.url("/x"), "--type", "KeyExpired"],
    );
    assert!(!ok && err.contains("Unknown event type"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_out_a_down_receiver_and_a_server_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let server = TestServer::start(&data, port, RECEIVER_ALLOWED);
    let mut receiver = Receiver::down();
    let (_, secret) =
        subscribe(&server, &["--url", &receiver.url("/hook"), "--type", "SecretNewVersionCreated"]);

    let mut expected = BTreeSet::new();
    expected.insert(set(&server, "alpha", "a1", &[]));
    expected.insert(set(&server, "alpha", "a2", &[]));
    expected.insert(set(&server, "beta", "b1", &[]));

    // The receiver is down: the events wait in the outbox while attempts fail.
    let start = Instant::now();
    let state = loop {
        let list = json_cli(&server, &["event", "list"]);
        let s = list[0].clone();
        if s["failedAttempts"].as_i64().unwrap_or(0) >= 1 || start.elapsed() > Duration::from_secs(5) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(state["failedAttempts"].as_i64().unwrap() >= 1, "{state}");
    assert_eq!(state["pending"], 3);
    assert!(state["lastError"].as_str().unwrap().contains("SecretNewVersionCreated"), "{state}");

    // Crash with events pending; the retry state and the outbox survive.
    server.kill9();
    let server = TestServer::start(&data, port, RECEIVER_ALLOWED);
    let state = json_cli(&server, &["event", "list"])[0].clone();
    assert_eq!(state["pending"], 3, "{state}");
    expected.insert(set(&server, "gamma", "g1", &[]));

    receiver.up().await;
    let got = receiver.wait_for("/hook", 4, Duration::from_secs(12)).await;
    let ids: BTreeSet<String> =
        got.iter().map(|d| d.json()["data"]["Id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, expected, "every event arrives (duplicates allowed)");
    for d in &got {
        assert_signed(d, &secret);
    }
    // Duplicates, if any, carry the same event id.
    let mut by_id: BTreeMap<String, String> = BTreeMap::new();
    for d in &got {
        let e = d.json();
        let data_id = e["data"]["Id"].as_str().unwrap().to_owned();
        let id = e["id"].as_str().unwrap().to_owned();
        assert_eq!(by_id.entry(data_id).or_insert_with(|| id.clone()), &id);
    }
    // Delivered in order per subscription: alpha's versions before beta's, gamma last.
    let order: Vec<String> = got.iter().map(|d| d.json()["subject"].as_str().unwrap().to_owned()).collect();
    let first_seen: Vec<&String> = order.iter().fold(Vec::new(), |mut acc, s| {
        if !acc.contains(&s) {
            acc.push(s);
        }
        acc
    });
    assert_eq!(first_seen, ["alpha", "beta", "gamma"]);
    let start = Instant::now();
    loop {
        let s = json_cli(&server, &["event", "list"])[0].clone();
        if s["pending"] == 0 {
            assert_eq!(s["failedAttempts"], 0);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_expiry_and_expired_fire_once_per_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), RECEIVER_ALLOWED);
    let receiver = Receiver::start().await;
    // A one-hour near-expiry window for this subscription (the default is 30 days).
    let (_, secret) = subscribe(
        &server,
        &[
            "--url",
            &receiver.url("/exp"),
            "--type",
            "SecretNearExpiry",
            "--type",
            "SecretExpired",
            "--near-expiry",
            "1h",
        ],
    );
    let soon = now() + 600;
    let past = now() - 60;
    let soon_id = set(&server, "soon", "s", &["--expires", &soon.to_string()]);
    let past_id = set(&server, "past", "p", &["--expires", &past.to_string()]);
    set(&server, "later", "l", &["--expires", &(now() + 7_200).to_string()]);
    set(&server, "never", "n", &[]);

    let got = receiver.wait_for("/exp", 2, Duration::from_secs(6)).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let by_subject: BTreeMap<String, Value> =
        got.iter().map(|d| (d.json()["subject"].as_str().unwrap().to_owned(), d.json())).collect();
    let near = &by_subject["soon"];
    assert_eq!(near["type"], "Microsoft.KeyVault.SecretNearExpiry");
    assert_eq!(near["data"]["EXP"], soon);
    assert_eq!(near["data"]["Id"], soon_id.as_str());
    let expired = &by_subject["past"];
    assert_eq!(expired["type"], "Microsoft.KeyVault.SecretExpired");
    assert_eq!(expired["data"]["EXP"], past);
    assert_eq!(expired["data"]["Id"], past_id.as_str());
    for d in &got {
        assert_signed(d, &secret);
    }
    // Later scans do not repeat them.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(receiver.deliveries("/exp").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_rotation_makes_a_generated_version_of_the_requested_shape() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), RECEIVER_ALLOWED);
    set(&server, "api-key", "initial-value", &["--content-type", "text/plain", "--tag", "team=payments"]);

    let policy = json_cli(
        &server,
        &["rotation", "set", "api-key", "--generator", "bytes:24:hex", "--expires-after", "90d"],
    );
    assert_eq!(policy["generator"], "bytes:24:hex");
    assert!(policy["nextDue"].is_null(), "no schedule: rotation on demand only");
    let (ok, out, err) = cli(&server, &["secret", "rotate", "api-key"]);
    assert!(ok, "{err}");
    assert!(out.contains("bytes:24:hex"), "{out}");
    let shown = json_cli(&server, &["secret", "show", "api-key", "--reveal"]);
    let value = shown["value"].as_str().unwrap();
    assert!(value.len() == 48 && value.bytes().all(|b| b.is_ascii_hexdigit()), "{value}");
    assert!(!out.contains(value), "rotate never prints the value");
    let exp = shown["attributes"]["exp"].as_i64().unwrap();
    assert!((exp - (now() + 90 * 86_400)).abs() < 30, "exp from --expires-after");
    assert_eq!(shown["contentType"], "text/plain", "content type carried over");
    assert_eq!(shown["tags"]["team"], "payments", "tags carried over");

    json_cli(&server, &["rotation", "set", "api-key", "--generator", "password:20:upper,digit"]);
    let rotated = json_cli(&server, &["secret", "rotate", "api-key"]);
    assert!(rotated.get("value").is_none());
    let shown = json_cli(&server, &["secret", "show", "api-key", "--reveal"]);
    assert_eq!(shown["id"], rotated["id"]);
    let value = shown["value"].as_str().unwrap();
    assert_eq!(value.len(), 20);
    assert!(value.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()), "{value}");
    assert!(value.bytes().any(|b| b.is_ascii_digit()) && value.bytes().any(|b| b.is_ascii_uppercase()));
    assert!(shown["attributes"]["exp"].is_null());

    json_cli(&server, &["rotation", "set", "api-key", "--generator", "uuid"]);
    json_cli(&server, &["secret", "rotate", "api-key"]);
    let uuid =
        json_cli(&server, &["secret", "show", "api-key", "--reveal"])["value"].as_str().unwrap().to_owned();
    assert!(uuid.len() == 36 && uuid.chars().nth(14) == Some('4'), "{uuid}");

    // Without a policy: 32 letters and digits.
    assert!(cli(&server, &["rotation", "remove", "api-key"]).0);
    let (ok, _, err) = cli(&server, &["rotation", "show", "api-key"]);
    assert!(!ok && err.contains("no rotation policy"), "{err}");
    json_cli(&server, &["secret", "rotate", "api-key"]);
    let value =
        json_cli(&server, &["secret", "show", "api-key", "--reveal"])["value"].as_str().unwrap().to_owned();
    assert!(value.len() == 32 && value.bytes().all(|b| b.is_ascii_alphanumeric()), "{value}");
    assert_eq!(versions(&server, "api-key").len(), 5);

    // Notify-only: an outside system rotates it.
    let policy = json_cli(&server, &["rotation", "set", "api-key", "--notify-only", "--before-expiry", "7d"]);
    assert_eq!(policy["notifyOnly"], true);
    let (ok, _, err) = cli(&server, &["secret", "rotate", "api-key"]);
    assert!(!ok && err.contains("notify-only"), "{err}");
    let (ok, out, _) = cli(&server, &["rotation", "show", "api-key"]);
    assert!(ok && out.contains("notify only") && out.contains("7d"), "{out}");

    let (ok, _, err) = cli(&server, &["secret", "rotate", "missing"]);
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, _, err) = cli(&server, &["rotation", "set", "api-key", "--generator", "password:8:emoji"]);
    assert!(!ok && err.contains("character class"), "{err}");
    let (ok, _, err) = cli(&server, &["rotation", "set", "missing", "--every", "1d"]);
    assert!(!ok && err.contains("not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rotation_runs_once_per_due_time_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let server = TestServer::start(&data, port, RECEIVER_ALLOWED);
    // Due one second before an expiry three seconds away; the new version lives an hour.
    set(&server, "db-pass", "old", &["--expires", &(now() + 3).to_string()]);
    let policy = json_cli(
        &server,
        &[
            "rotation",
            "set",
            "db-pass",
            "--before-expiry",
            "1s",
            "--expires-after",
            "1h",
            "--generator",
            "uuid",
        ],
    );
    assert!(policy["nextDue"].as_i64().unwrap() <= now() + 2);
    // And one on a two-second interval.
    set(&server, "token", "t0", &[]);
    json_cli(&server, &["rotation", "set", "token", "--every", "2s", "--generator", "password:16:lower"]);

    let start = Instant::now();
    while versions(&server, "db-pass").len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(6), "the due rotation did not happen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rotated = json_cli(&server, &["secret", "show", "db-pass", "--reveal"]);
    assert!(uuid_like(rotated["value"].as_str().unwrap()));
    assert!((rotated["attributes"]["exp"].as_i64().unwrap() - (now() + 3_600)).abs() < 30);
    let next_due = json_cli(&server, &["rotation", "show", "db-pass"])["nextDue"].as_i64().unwrap();
    assert!(next_due > now() + 3_000, "the due time was advanced with the rotation");

    server.kill9();
    let server = TestServer::start(&data, port, RECEIVER_ALLOWED);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(versions(&server, "db-pass").len(), 2, "the served due time does not run again");

    // The interval policy kept rotating, never twice for one due time.
    let token = versions(&server, "token");
    assert!(token.len() >= 2, "{token:?}");
    let created: Vec<i64> = token.iter().map(|v| v["attributes"]["created"].as_i64().unwrap()).collect();
    for pair in created.windows(2) {
        assert!(pair[1] - pair[0] >= 2, "rotations at least the interval apart: {created:?}");
    }
    let value =
        json_cli(&server, &["secret", "show", "token", "--reveal"])["value"].as_str().unwrap().to_owned();
    assert!(value.len() == 16 && value.bytes().all(|b| b.is_ascii_lowercase()), "{value}");
}

fn uuid_like(v: &str) -> bool {
    v.len() == 36 && v.split('-').map(str::len).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_internal_addresses_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let receiver = Receiver::start().await;
    // No allow-list: loopback, private, link-local (the cloud metadata endpoint) and their
    // IPv6 spellings are not webhook receivers.
    let server = TestServer::start(&data, port, &[]);
    let p = receiver.port;
    for url in [
        receiver.url("/hook"),
        format!("http://localhost:{p}/hook"),
        format!("http://[::1]:{p}/hook"),
        format!("http://[::ffff:127.0.0.1]:{p}/hook"),
        "http://169.254.169.254/latest/meta-data".to_owned(),
        "http://10.0.0.1/hook".to_owned(),
        "http://192.168.1.1/hook".to_owned(),
        "http://100.64.0.1/hook".to_owned(),
        "http://[fd00::1]/hook".to_owned(),
    ] {
        let (ok, _, err) = cli(&server, &["event", "subscribe", "--vault", "dev", "--url", &url]);
        assert!(!ok, "a webhook to {url} was accepted");
        assert!(err.contains("outbound_allow"), "{url}: {err}");
    }
    assert_eq!(json_cli(&server, &["event", "list"]).as_array().unwrap().len(), 0);
    drop(server);

    // Allowed, subscribed and delivered...
    let server = TestServer::start(&data, port, RECEIVER_ALLOWED);
    let _ = subscribe(&server, &["--url", &receiver.url("/hook"), "--type", "SecretNewVersionCreated"]);
    set(&server, "first", "1", &[]);
    assert_eq!(receiver.wait_for("/hook", 1, Duration::from_secs(10)).await.len(), 1);
    drop(server);
    // ...until the allow-list no longer names the receiver: checked again at every delivery.
    let server = TestServer::start(&data, port, &[]);
    set(&server, "second", "2", &[]);
    let start = Instant::now();
    let state = loop {
        let s = json_cli(&server, &["event", "list"])[0].clone();
        if s["failedAttempts"].as_i64().unwrap_or(0) >= 1 || start.elapsed() > Duration::from_secs(10) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(state["lastError"].as_str().unwrap_or_default().contains("outbound_allow"), "{state}");
    assert_eq!(state["pending"], 1, "{state}");
    assert_eq!(receiver.deliveries("/hook").len(), 1, "nothing more reached the receiver");
}
