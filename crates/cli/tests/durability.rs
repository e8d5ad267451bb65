//! Crash safety and encryption at rest, against the real binary.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coffer_client::SecretProperties;
use common::{free_port, TestServer};

/// Writers hammer the server; it is killed with SIGKILL mid-stream. After a restart every
/// acknowledged version must be there with its value, and every stored version must decrypt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_write_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let server = TestServer::start(&data, port, &[]);
    let client = Arc::new(server.client());
    let acked: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut writers = Vec::new();
    for w in 0..8 {
        let (client, acked) = (client.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            // Bounded: at most 500 writes per writer, or until the server dies.
            for i in 0..500 {
                if Instant::now() > deadline {
                    break;
                }
                let name = format!("crash-{w}-{}", i % 5);
                let value = format!("value-{w}-{i}-{}", uuid_like(w, i));
                match client.set_secret("dev", &name, &value, &SecretProperties::default()).await {
                    Ok(s) => acked.lock().unwrap().push((name, s.version().unwrap().to_owned(), value)),
                    Err(_) => break,
                }
            }
        }));
    }
    // Let some writes land, then kill the server while writers are still going.
    let start = Instant::now();
    while acked.lock().unwrap().len() < 200 && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 50, "too few writes were acknowledged before the kill: {}", acked.len());

    let server = TestServer::start(&data, port, &[]);
    let client = server.client();
    for (name, version, value) in &acked {
        let got = client.get_secret("dev", name, Some(version)).await.unwrap_or_else(|e| {
            panic!("acknowledged version {name}/{version} is missing after kill -9: {e}")
        });
        assert_eq!(got.value.as_ref().map(|v| v.expose()), Some(value.as_str()));
    }
    // No half-written version: everything listed decrypts.
    for secret in client.list_secrets("dev").await.unwrap() {
        for v in client.list_versions("dev", secret.name()).await.unwrap() {
            client.get_secret("dev", secret.name(), v.version()).await.unwrap();
        }
    }
    eprintln!("{} acknowledged writes all present after kill -9", acked.len());
}

fn uuid_like(w: usize, i: usize) -> String {
    format!("{:08x}", (w * 7919 + i * 104729) as u32)
}

/// Known values written through every path must not appear in plaintext anywhere in the data
/// directory (database, WAL, shared memory, key files) or in the server's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_value_in_the_data_directory_or_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data, free_port(), &[]);
    let client = server.client();
    let markers: Vec<String> = (0..6).map(|i| format!("PLAINTEXT-MARKER-{i}-q7Zk2Lp9")).collect();
    client.set_secret("dev", "m0", &markers[0], &SecretProperties::default()).await.unwrap();
    client.set_secret("dev", "m0", &markers[1], &SecretProperties::default()).await.unwrap();
    let big = format!("{}{}", markers[2], "x".repeat(20_000));
    client.set_secret("dev", "m1", &big, &SecretProperties::default()).await.unwrap();
    client.set_secret("dev", "m2", &markers[3], &SecretProperties::default()).await.unwrap();
    let blob = client.backup_secret("dev", "m2").await.unwrap();
    client.delete_secret("dev", "m2").await.unwrap();
    client.purge_secret("dev", "m2").await.unwrap();
    client.restore_secret("dev", &blob).await.unwrap();
    client.set_secret("dev", "m3", &markers[4], &SecretProperties::default()).await.unwrap();
    client.delete_secret("dev", "m3").await.unwrap();
    // A failing request carrying a value (bad name) must not echo it either.
    let err =
        client.set_secret("dev", "bad_name", &markers[5], &SecretProperties::default()).await.unwrap_err();
    assert!(!err.to_string().contains(&markers[5]));
    assert!(!blob.contains("PLAINTEXT"), "the backup blob is encrypted");
    let log = server.log_text();
    server.kill9();

    let mut scanned = 0;
    for entry in walk(&data) {
        let bytes = std::fs::read(&entry).unwrap();
        scanned += 1;
        for m in &markers {
            assert!(
                !bytes.windows(m.len()).any(|w| w == m.as_bytes()),
                "{m} found in plaintext in {}",
                entry.display()
            );
        }
    }
    assert!(scanned >= 5, "expected the database, WAL and key files, scanned {scanned}");
    for m in &markers {
        assert!(!log.contains(m.as_str()), "{m} found in the server log");
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
