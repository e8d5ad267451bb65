//! The audit log end to end: group commit, durability across restart and kill -9, fail
//! closed on a full disk, queries, retention, and no credential in any file.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use coffer_audit::{
    generate_signing_key, verify, AuditError, AuditLog, AuditQuery, AuditResult, ProblemKind,
};
use common::*;
use serde_json::Value;
use zeroize::Zeroizing;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_records_are_group_committed_durable_and_contiguous() {
    let tmp = tempfile::tempdir().unwrap();
    let key = generate_signing_key().unwrap();
    let log = AuditLog::open(config(tmp.path(), &key)).unwrap();
    let n = 600u64;
    let tasks: Vec<_> = (1..=n)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.record(event(i)).await.unwrap() })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    got.sort();
    assert_eq!(got, (1..=n).collect::<Vec<_>>(), "seqs are unique and contiguous");
    let stats = log.stats();
    eprintln!("{stats:?}");
    assert_eq!(stats.records, n);
    assert!(stats.batches < n / 4, "group commit must share fsyncs: {stats:?}");
    assert_eq!(stats.failed_batches, 0);

    // Durable in the index …
    let all = query_all(&log, AuditQuery { limit: 97, ..Default::default() }).await;
    assert_eq!(seqs(&all).into_iter().collect::<BTreeSet<_>>(), (1..=n).collect());
    // … and in the file, chained and attested.
    let records = read_lines(&tmp.path().join("audit.jsonl")).iter().filter(|l| !is_checkpoint(l)).count();
    assert_eq!(records as u64, n);
    let report = verify(tmp.path(), &log.public_key_pem());
    assert!(report.ok, "{}", show(&report));
    assert_eq!((report.records, report.head_seq), (n, Some(n)));
    // Checkpoints every 1000 records (default) or on demand.
    log.flush_checkpoint().await.unwrap();
    let lines = read_lines(&tmp.path().join("audit.jsonl"));
    assert!(is_checkpoint(lines.last().unwrap()));
    let cp: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!((cp["seq"].as_u64(), cp["keyId"].as_str()), (Some(n), Some(log.key_id())));
}

/// `verify` on a directory that a busy writer appends to and rotates meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_of_a_live_rotating_log_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &generate_signing_key().unwrap());
    cfg.max_file_bytes = 16 * 1024;
    cfg.checkpoint_every = 20;
    let log = AuditLog::open(cfg).unwrap();
    let pem = log.public_key_pem();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (log, stop) = (log.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    log.record(event(t * 1_000_000 + i)).await.unwrap();
                    i += 1;
                }
            })
        })
        .collect();
    let dir = tmp.path().to_path_buf();
    let reports = tokio::task::spawn_blocking(move || {
        (0..15)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(30));
                verify(&dir, &pem)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(log.stats().rotations >= 2, "{:?}", log.stats());
    for report in reports {
        assert!(report.ok, "{}", show(&report));
        // Every batch in the journal was appended to the file first: nothing is missing.
        assert!(!report.notes.iter().any(|n| n.contains("commit journal")), "{}", show(&report));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_json_has_azure_audit_event_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let log = AuditLog::open(config(tmp.path(), &generate_signing_key().unwrap())).unwrap();
    let mut e = event(5);
    e.credential_hmac = Some(log.hmac(b"token"));
    e.principal.as_mut().unwrap().process = Some(coffer_audit::ProcessFacts {
        pid: 42,
        uid: 1000,
        gid: 1000,
        exe: "/usr/bin/app".into(),
        cgroup: Some("/system.slice/app.service".into()),
    });
    e.principal.as_mut().unwrap().agent = Some("agent-1".into());
    log.record(e).await.unwrap();
    let line = read_lines(&tmp.path().join("audit.jsonl"))[1].clone();
    let v: Value = serde_json::from_str(&line).unwrap();
    for field in [
        "time",
        "id",
        "seq",
        "operationName",
        "resultType",
        "resultSignature",
        "statusCode",
        "durationMs",
        "callerIpAddress",
        "identity",
        "properties",
        "prevHash",
        "hash",
    ] {
        assert!(v.get(field).is_some(), "{field} missing in {line}");
    }
    assert_eq!(v["operationName"], "SecretList");
    assert_eq!(v["resultType"], "Denied");
    assert_eq!(v["resultSignature"], "Forbidden");
    assert_eq!(v["statusCode"], 403);
    assert_eq!(v["callerIpAddress"], "127.0.0.1");
    assert_eq!(v["identity"]["principalType"], "ServicePrincipal");
    assert_eq!(v["identity"]["agent"], "agent-1");
    assert_eq!(v["identity"]["process"]["exe"], "/usr/bin/app");
    assert_eq!(v["properties"]["requestId"], "req-5");
    assert_eq!(v["properties"]["secret"], "secret-1");
    assert!(v["properties"]["denialReason"].as_str().unwrap().contains("no role"));
    assert!(v["properties"]["credentialHmac"].as_str().unwrap().starts_with("hmac-sha256:"));
    let time = v["time"].as_str().unwrap();
    assert!(time.ends_with('Z') && time.len() == "2024-01-01T00:00:00.000000Z".len(), "{time}");
    assert_eq!(v["prevHash"].as_str().unwrap().len(), 64);
    // The hash is the last member, over the bytes before it.
    let body = format!("{}}}", &line[..line.rfind(",\"hash\":").unwrap()]);
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()).as_ref());
    assert_eq!(v["hash"], digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_continues_the_chain_and_keeps_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    let key = generate_signing_key().unwrap();
    let mut cfg = config(tmp.path(), &key);
    cfg.max_file_bytes = 6000;
    {
        let log = AuditLog::open(cfg.clone()).unwrap();
        for i in 1..=15 {
            log.record(event(i)).await.unwrap();
        }
        // Graceful: dropping the last handle writes a final checkpoint and releases the lock.
    }
    let log = AuditLog::open(cfg.clone()).unwrap();
    assert!(matches!(AuditLog::open(cfg.clone()), Err(AuditError::Locked(_))), "one writer per directory");
    for i in 16..=30 {
        assert_eq!(log.record(event(i)).await.unwrap(), i);
    }
    let all = query_all(&log, AuditQuery::default()).await;
    assert_eq!(seqs(&all).into_iter().collect::<BTreeSet<_>>(), (1..=30).collect());
    let report = verify(tmp.path(), &log.public_key_pem());
    assert!(report.ok, "{}", show(&report));
    assert_eq!(report.records, 30);
    assert!(log.stats().rotations > 0 || report.files.len() > 1);
    log.shutdown().await.unwrap();
    assert!(matches!(log.record(event(31)).await, Err(AuditError::Closed)));
}

/// Each of the writer's crash windows, recreated on disk: the index commit lost (records in the
/// file after the signed head: adopted), a torn last line (cut), a rotation interrupted
/// between its renames, and the active file lost after a rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_recovers_from_every_crash_window() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = generate_signing_key().unwrap();
    let cfg = config(dir, &key);
    let pem;
    {
        let log = AuditLog::open(cfg.clone()).unwrap();
        pem = log.public_key_pem();
        for i in 1..=5 {
            log.record(event(i)).await.unwrap();
        }
    }
    // The head as it was after seq 5.
    let saved = tempfile::tempdir().unwrap();
    fs::copy(dir.join("head"), saved.path().join("head")).unwrap();
    {
        let log = AuditLog::open(cfg.clone()).unwrap();
        for i in 6..=9 {
            log.record(event(i)).await.unwrap();
        }
    }
    // Crash window 1: file fsync'd, head rewrite lost (an OS crash: the head is not fsync'd),
    // and the index with it.
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(dir.join(format!("index.sqlite{suffix}")));
    }
    fs::copy(saved.path().join("head"), dir.join("head")).unwrap();
    let report = verify(dir, &pem);
    assert_eq!(report.problems[0].kind, ProblemKind::Unattested, "{}", show(&report));
    // Crash window 2: a torn last line on top.
    let mut f = fs::OpenOptions::new().append(true).open(dir.join("audit.jsonl")).unwrap();
    f.write_all(b"{\"category\":\"AuditEvent\",\"durationMs\":1.2").unwrap();
    drop(f);
    {
        let log = AuditLog::open(cfg.clone()).unwrap();
        let all = query_all(&log, AuditQuery::default()).await;
        assert_eq!(seqs(&all), (1..=9).collect::<Vec<_>>(), "rows 6..=9 re-indexed from the file");
        assert_eq!(log.record(event(10)).await.unwrap(), 10);
    }
    let report = verify(dir, &pem);
    assert!(report.ok, "{}", show(&report));
    assert!(report.notes.iter().any(|n| n.contains("adopted") && n.contains("[6,9]")), "{}", show(&report));
    assert!(report.notes.iter().any(|n| n.contains("torn tail")), "{}", show(&report));

    // Crash window 3: a rotation interrupted after `audit.jsonl` became a rotated file and
    // before the new file was renamed into place.
    let mut small = cfg.clone();
    small.max_file_bytes = 1;
    {
        let log = AuditLog::open(small).unwrap();
        log.record(event(11)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(log.stats().rotations, 1);
    }
    assert_eq!(
        read_lines(&dir.join("audit.jsonl")).len(),
        1,
        "a fresh file holds only its opening checkpoint"
    );
    fs::rename(dir.join("audit.jsonl"), dir.join("audit.jsonl.tmp")).unwrap();
    {
        let log = AuditLog::open(cfg.clone()).unwrap();
        assert_eq!(log.record(event(12)).await.unwrap(), 12);
    }
    let report = verify(dir, &pem);
    assert!(report.ok, "{}", show(&report));

    // Crash window 4: a file with only its opening checkpoint lost.
    let mut small = cfg.clone();
    small.max_file_bytes = 1;
    {
        let log = AuditLog::open(small).unwrap();
        log.record(event(13)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fs::remove_file(dir.join("audit.jsonl")).unwrap();
    {
        let log = AuditLog::open(cfg.clone()).unwrap();
        assert_eq!(log.record(event(14)).await.unwrap(), 14);
    }
    let report = verify(dir, &pem);
    assert!(report.ok, "{}", show(&report));
    assert_eq!(report.last_seq, Some(14));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_is_refused_unless_the_recovery_flag_is_set() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = generate_signing_key().unwrap();
    let cfg = config(dir, &key);
    let pem;
    {
        let log = AuditLog::open(cfg.clone()).unwrap();
        pem = log.public_key_pem();
        for i in 1..=8 {
            log.record(event(i)).await.unwrap();
        }
    }
    // An acknowledged record (covered by the signed head) altered.
    let path = dir.join("audit.jsonl");
    let mut lines = read_lines(&path);
    lines[4] = lines[4].replacen("SecretGet", "SecretSet", 1).replacen("SecretList", "SecretSet", 1);
    lines[4] = lines[4].replacen("req-", "rex-", 1);
    write_lines(&path, &lines);
    let err = AuditLog::open(cfg.clone()).unwrap_err();
    assert!(matches!(&err, AuditError::Damaged(m) if m.contains("recovery")), "{err}");

    // Acknowledged records cut off the tail.
    let copy = copy_dir(dir);
    let copy_path = copy.path().join("audit.jsonl");
    let mut l = read_lines(&copy_path);
    write_lines(&copy_path, &{
        l.truncate(3);
        l
    });
    let err = AuditLog::open(config(copy.path(), &key)).unwrap_err();
    assert!(matches!(&err, AuditError::Damaged(m) if m.contains("truncated")), "{err}");

    // The index alone deleted: it is rebuilt from the files.
    let copy3 = copy_dir(dir);
    fs::remove_file(copy3.path().join("index.sqlite")).unwrap();
    let err = AuditLog::open(config(copy3.path(), &key)).unwrap_err();
    assert!(
        matches!(&err, AuditError::Damaged(m) if m.contains("recovery")),
        "still the altered record: {err}"
    );

    // The signed head (and the index) deleted.
    let copy2 = copy_dir(dir);
    fs::remove_file(copy2.path().join("head")).unwrap();
    fs::remove_file(copy2.path().join("index.sqlite")).unwrap();
    let err = AuditLog::open(config(copy2.path(), &key)).unwrap_err();
    assert!(matches!(&err, AuditError::Damaged(m) if m.contains("no signed head")), "{err}");
    // … which the recovery flag rebuilds from the files.
    {
        let mut c = config(copy2.path(), &key);
        c.recover = true;
        let log = AuditLog::open(c).unwrap();
        // Every record whose hash verifies (the altered seq 4 is not indexed).
        assert_eq!(seqs(&query_all(&log, AuditQuery::default()).await), [1, 2, 3, 5, 6, 7, 8]);
        assert_eq!(log.record(event(9)).await.unwrap(), 9);
    }
    let report = verify(copy2.path(), &pem);
    assert_eq!(report.problems[0].kind, ProblemKind::Modified, "the altered record is still reported");
    assert!(report.notes.iter().any(|n| n.contains("recovered")), "{}", show(&report));

    // With the flag: the damaged file is kept, a new one continues after it.
    let mut recover = cfg.clone();
    recover.recover = true;
    {
        let log = AuditLog::open(recover).unwrap();
        assert_eq!(log.record(event(9)).await.unwrap(), 9);
    }
    let report = verify(dir, &pem);
    assert!(!report.ok, "the damage stays visible");
    assert_eq!(report.problems[0].kind, ProblemKind::Modified, "{}", show(&report));
    assert_eq!(report.problems[0].seq, Some(4), "{}", show(&report));
    assert!(report.problems.iter().all(|p| p.file != dir.join("audit.jsonl")), "{}", show(&report));
    assert!(report.notes.iter().any(|n| n.contains("recovered")), "{}", show(&report));
    let fresh = verify(&dir.join("audit.jsonl"), &pem);
    assert!(fresh.ok, "{}", show(&fresh));
}

/// Runs as a child process of `acknowledged_records_survive_kill_9` (no-op otherwise): records
/// from several tasks and prints every acknowledged seq.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("COFFER_AUDIT_CRASH_DIR") else { return };
    let key = Zeroizing::new(hex::decode(std::env::var("COFFER_AUDIT_CRASH_KEY").unwrap()).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let mut cfg = config(Path::new(&dir), &key);
        cfg.max_file_bytes = 64 * 1024;
        cfg.checkpoint_every = 50;
        let log = AuditLog::open(cfg).unwrap();
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let seq = log.record(event(t * 1_000_000 + i)).await.unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {seq}").unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let key = generate_signing_key().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("COFFER_AUDIT_CRASH_DIR", tmp.path())
        .env("COFFER_AUDIT_CRASH_KEY", hex::encode(&key[..]))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < 1500 && Instant::now() < deadline {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(seq) = line.strip_prefix("ACK ") {
                    acked.insert(seq.parse::<u64>().unwrap());
                }
            }
            _ => break,
        }
    }
    child.kill().unwrap(); // SIGKILL, mid-flight
    child.wait().unwrap();
    // Acknowledgements already in the pipe were given before the kill.
    for line in lines.map_while(Result::ok) {
        if let Some(seq) = line.strip_prefix("ACK ") {
            acked.insert(seq.parse::<u64>().unwrap());
        }
    }
    assert!(acked.len() >= 1500, "the child acknowledged only {} records", acked.len());

    // What an OS crash could leave: the bytes of audit.jsonl after its first line (fsync'd
    // when the file was created) that only the journal made durable, lost (cut off, or
    // blocks never written: zeros). Opening replays them from the journal.
    // And a changed record is not what a crash does: the journal does not paper over it.
    for (how, without_journal) in [("cut", false), ("zeroed", false), ("cut", true), ("changed", false)] {
        let copy = tempfile::tempdir().unwrap();
        for entry in fs::read_dir(tmp.path()).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
        let active = copy.path().join("audit.jsonl");
        let bytes = fs::read(&active).unwrap();
        let first_line = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
        // From the line of the newest acknowledged record (or the last 3000 bytes, if it is
        // not in this file).
        let newest = format!("\"seq\":{},", acked.last().unwrap());
        let newest_line = bytes
            .windows(newest.len())
            .position(|w| w == newest.as_bytes())
            .map(|at| bytes[..at].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1));
        let lost = newest_line.unwrap_or(bytes.len().saturating_sub(3000)).max(first_line);
        let mut damaged = bytes[..lost].to_vec();
        if how == "zeroed" {
            damaged.resize(bytes.len(), 0);
        }
        if how == "changed" {
            damaged = bytes.clone();
            let at = lost + newest.len() + 20;
            damaged[at] = if damaged[at] == b'7' { b'8' } else { b'7' };
        }
        fs::write(&active, &damaged).unwrap();
        if how == "changed" {
            if newest_line.is_some_and(|at| at >= first_line) {
                let err = AuditLog::open(config(copy.path(), &key)).unwrap_err();
                assert!(matches!(err, AuditError::Damaged(_)), "{err}");
            }
            continue;
        }
        if without_journal {
            fs::remove_file(copy.path().join("journal")).unwrap();
            if newest_line.is_some_and(|at| at >= first_line) {
                let err = AuditLog::open(config(copy.path(), &key)).unwrap_err();
                assert!(matches!(err, AuditError::Damaged(_)), "{err}");
            }
            continue;
        }
        // Before the log is reopened, verify reports the file as it is, and says that the
        // journal holds the lost records.
        if newest_line.is_some_and(|at| at >= first_line) {
            let report = verify(copy.path(), &verify_key(copy.path(), &key));
            assert!(!report.ok, "{how} tail, before reopening: {}", show(&report));
            assert!(report.notes.iter().any(|n| n.contains("commit journal")), "{}", show(&report));
        }
        let log = AuditLog::open(config(copy.path(), &key)).unwrap();
        let present: BTreeSet<u64> =
            seqs(&query_all(&log, AuditQuery { limit: 1000, ..Default::default() }).await)
                .into_iter()
                .collect();
        let missing: Vec<_> = acked.difference(&present).collect();
        assert!(missing.is_empty(), "{how} tail: acknowledged but lost: {missing:?}");
        let report = verify(copy.path(), &log.public_key_pem());
        assert!(report.ok, "{how} tail: {}", show(&report));
    }

    let log = AuditLog::open(config(tmp.path(), &key)).unwrap();
    let present: BTreeSet<u64> =
        seqs(&query_all(&log, AuditQuery { limit: 1000, ..Default::default() }).await).into_iter().collect();
    let missing: Vec<_> = acked.difference(&present).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    let max = *present.iter().max().unwrap();
    assert_eq!(present, (1..=max).collect(), "contiguous");
    assert_eq!(log.record(event(0)).await.unwrap(), max + 1, "the chain continues");
    let report = verify(tmp.path(), &log.public_key_pem());
    assert!(report.ok, "{}", show(&report));
    eprintln!("acked {} of {} durable records; {}", acked.len(), max, show(&report));
}

/// A tmpfs mounted for the test, unmounted (lazily) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here");
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem of `dir` with a file; returns its path.
fn fill(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&[0]).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_closed_and_recovers_when_space_frees_up() {
    let Some(fs_) = Tmpfs::mount("1m") else { return };
    let dir = fs_.path().join("audit");
    let key = generate_signing_key().unwrap();
    let log = AuditLog::open(config(&dir, &key)).unwrap();
    let mut acked = Vec::new();
    for i in 1..=3 {
        acked.push(log.record(event(i)).await.unwrap());
    }
    let filler = fill(fs_.path());
    // Some bytes may still fit in the last page of a file; soon nothing does.
    let mut failures = 0;
    for i in 4..=100 {
        match log.record(event(i)).await {
            Ok(seq) => acked.push(seq),
            Err(e) => {
                assert!(matches!(e, AuditError::Unavailable(_)), "{e}");
                failures += 1;
                if failures == 3 {
                    break;
                }
            }
        }
    }
    assert_eq!(failures, 3, "writes kept succeeding on a full disk");
    let stats = log.stats();
    assert!(stats.failed_batches >= 3, "{stats:?}");
    // Concurrent callers all fail; none is acknowledged.
    let handles: Vec<_> = (200..220)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.record(event(i)).await })
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.unwrap());
    }
    assert!(results.iter().all(|r| r.is_err()), "acknowledged on a full disk: {results:?}");
    // Readiness reports it (the server's /readyz answers 503).
    assert!(log.health().unwrap_err().contains("last audit commit failed"));
    let usage = log.disk_usage().unwrap();
    assert!(usage.free_bytes < 64 * 1024, "{usage:?}");

    fs::remove_file(filler).unwrap();
    let next = log.record(event(300)).await.unwrap();
    assert_eq!(log.health(), Ok(()));
    assert_eq!(next, acked.last().unwrap() + 1, "failed records consume no seq");
    acked.push(next);
    let all = query_all(&log, AuditQuery::default()).await;
    assert_eq!(seqs(&all), acked, "exactly the acknowledged records, nothing else");
    let report = verify(&dir, &log.public_key_pem());
    assert!(report.ok, "{}", show(&report));
    drop(log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_use_every_filter_and_page_with_a_cursor() {
    let tmp = tempfile::tempdir().unwrap();
    let log = AuditLog::open(config(tmp.path(), &generate_signing_key().unwrap())).unwrap();
    let base = SystemTime::now() - Duration::from_secs(3600);
    let events: Vec<_> = (1..=60u64).map(|i| event_at(i, base + Duration::from_secs(i * 10))).collect();
    for e in &events {
        log.record(e.clone()).await.unwrap();
    }
    let expect = |f: &dyn Fn(u64) -> bool| -> Vec<u64> { (1..=60).filter(|i| f(*i)).collect() };
    let q = AuditQuery::default;
    let cases: Vec<(&str, AuditQuery, Vec<u64>)> = vec![
        ("all", q(), expect(&|_| true)),
        (
            "principal id",
            AuditQuery { principal: Some("00000000-0000-0000-0000-000000000001".into()), ..q() },
            expect(&|i| i % 3 == 1),
        ),
        ("principal name", AuditQuery { principal: Some("APP-2".into()), ..q() }, expect(&|i| i % 3 == 2)),
        ("secret", AuditQuery { secret: Some("Secret-3".into()), ..q() }, expect(&|i| i % 4 == 3)),
        ("vault", AuditQuery { vault: Some("vault1".into()), ..q() }, expect(&|_| true)),
        ("operation", AuditQuery { operation: Some("secretget".into()), ..q() }, expect(&|i| i % 3 == 0)),
        ("denied", AuditQuery { result: Some(AuditResult::Denied), ..q() }, expect(&|i| i % 5 == 0)),
        ("allowed", AuditQuery { result: Some(AuditResult::Allowed), ..q() }, expect(&|i| i % 5 != 0)),
        (
            "time range",
            AuditQuery {
                since: Some(base + Duration::from_secs(100)),
                until: Some(base + Duration::from_secs(300)),
                ..q()
            },
            expect(&|i| (10..30).contains(&i)),
        ),
        (
            "combined",
            AuditQuery {
                secret: Some("secret-1".into()),
                result: Some(AuditResult::Allowed),
                since: Some(base + Duration::from_secs(50)),
                ..q()
            },
            expect(&|i| i % 4 == 1 && i % 5 != 0 && i >= 5),
        ),
    ];
    for (name, query, want) in cases {
        for limit in [1, 4, 100] {
            let got = seqs(&query_all(&log, AuditQuery { limit, ..query.clone() }).await);
            assert_eq!(got, want, "{name} (limit {limit})");
        }
    }
    let page = log.query(AuditQuery { limit: 10, ..q() }).await.unwrap();
    assert_eq!((page.records.len(), page.next), (10, Some(10)));
    let page = log.query(AuditQuery { limit: 10, after: Some(55), ..q() }).await.unwrap();
    assert_eq!((seqs(&page.records), page.next), ((56..=60).collect(), None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_reaches_any_file_only_its_hmac() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let key = generate_signing_key().unwrap();
    let secret = "client-secret-VALUE-4711-do-not-log";
    let hmac;
    {
        let log = AuditLog::open(config(&dir, &key)).unwrap();
        hmac = log.hmac(secret.as_bytes());
        assert!(hmac.starts_with("hmac-sha256:") && hmac.len() == 12 + 64);
        assert_eq!(hmac, log.hmac(secret.as_bytes()), "stable, so requests are traceable");
        assert_ne!(hmac, log.hmac(b"another credential"));
        for i in 1..=20 {
            let mut e = event(i);
            e.credential_hmac = Some(hmac.clone());
            log.record(e).await.unwrap();
        }
        // A raw credential in the hmac field is refused, not written.
        let mut e = event(21);
        e.credential_hmac = Some(secret.into());
        assert!(matches!(log.record(e).await, Err(AuditError::InvalidEvent(_))));
        let found = query_all(&log, AuditQuery::default()).await;
        assert_eq!(found.len(), 20);
    }
    let mut hmac_seen = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = fs::read(&path).unwrap();
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(!contains(secret.as_bytes()), "credential found in {}", path.display());
        assert!(!contains(&secret.as_bytes()[..16]), "part of the credential found in {}", path.display());
        if contains(hmac.as_bytes()) {
            hmac_seen += 1;
        }
    }
    // The index holds columns and file offsets, not lines: the hmac is in the JSONL file only.
    assert!(hmac_seen >= 1, "the hmac is in the JSONL file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_old_files_and_the_rest_still_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = generate_signing_key().unwrap();
    let mut cfg = config(dir, &key);
    cfg.max_file_bytes = 4000;
    let old = SystemTime::now() - Duration::from_secs(10 * 86400);
    {
        let log = AuditLog::open(cfg.clone()).unwrap();
        for i in 1..=20 {
            log.record(event_at(i, old)).await.unwrap();
        }
        for i in 21..=40 {
            log.record(event(i)).await.unwrap();
        }
    }
    let files_before = log_files(dir).len();
    cfg.retention = Some(Duration::from_secs(86400));
    let log = AuditLog::open(cfg.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.stats().pruned_files == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pruned = log.stats().pruned_files;
    assert!(pruned > 0, "nothing pruned");
    assert_eq!(log_files(dir).len() as u64, files_before as u64 - pruned);
    let kept = seqs(&query_all(&log, AuditQuery::default()).await);
    assert!(kept.first().unwrap() > &1 && kept.last() == Some(&40), "{kept:?}");
    assert!(
        query_all(&log, AuditQuery { until: Some(old + Duration::from_secs(1)), ..Default::default() })
            .await
            .len()
            < 20
    );
    let report = verify(dir, &log.public_key_pem());
    assert!(report.ok, "{}", show(&report));
    assert!(report.notes.iter().any(|n| n.contains("pruned")), "{}", show(&report));
    drop(log);
    // Deleting one more file than retention did is reported.
    let copy = copy_dir(dir);
    fs::remove_file(copy.path().join(log_files(copy.path())[0].file_name().unwrap())).unwrap();
    let report = verify(copy.path(), &verify_key(dir, &key));
    assert_eq!(report.problems[0].kind, ProblemKind::Deleted, "{}", show(&report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_bound_prunes_the_oldest_rotated_files_and_the_rest_still_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = generate_signing_key().unwrap();
    let mut cfg = config(dir, &key);
    cfg.max_file_bytes = 4000;
    cfg.max_total_bytes = Some(12_000);
    let rotated_bytes = |dir: &Path| -> u64 {
        log_files(dir)
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| n != "audit.jsonl"))
            .map(|p| fs::metadata(p).unwrap().len())
            .sum()
    };
    let log = AuditLog::open(cfg.clone()).unwrap();
    for i in 1..=300 {
        log.record(event(i)).await.unwrap();
    }
    log.flush_checkpoint().await.unwrap();
    assert!(log.health().is_ok());
    // The newest records stay, the oldest are gone, and what is left verifies, pruning noted.
    let kept = seqs(&query_all(&log, AuditQuery::default()).await);
    assert!(kept.first().unwrap() > &1 && kept.last() == Some(&300), "{:?}", kept.first());
    let report = verify(dir, &log.public_key_pem());
    assert!(report.ok, "{}", show(&report));
    assert!(report.notes.iter().any(|n| n.contains("pruned")), "{}", show(&report));
    let stats = log.stats();
    // Closed, the writer is not between a rotation and the pruning that follows it.
    drop(log);
    assert!(stats.rotations > 6, "{stats:?}");
    assert!(stats.pruned_files > 0, "nothing pruned: {stats:?}");
    assert!(rotated_bytes(dir) <= 12_000, "rotated files hold {} bytes", rotated_bytes(dir));
    let usage = coffer_audit::disk_usage(dir).unwrap();
    assert_eq!(usage.rotated_bytes, rotated_bytes(dir));
    assert!(usage.dir_bytes > usage.rotated_bytes && usage.free_bytes > 0 && usage.filesystem_bytes > 0);
    // Reopened without the bound, nothing more goes.
    cfg.max_total_bytes = None;
    let files = log_files(dir).len();
    let log = AuditLog::open(cfg).unwrap();
    log.record(event(301)).await.unwrap();
    log.flush_checkpoint().await.unwrap();
    assert_eq!(log.stats().pruned_files, 0);
    assert!(log_files(dir).len() >= files);
}

fn verify_key(_dir: &Path, key: &Zeroizing<Vec<u8>>) -> String {
    coffer_audit::public_key_pem_from_pkcs8(key).unwrap()
}

/// A log written before the head file existed keeps its signed head in the index: open moves it
/// to the head file (and out of the index, so a deleted head file cannot fall back to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_kept_in_the_index_by_an_older_version_moves_to_the_head_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = generate_signing_key().unwrap();
    let pem;
    {
        let log = AuditLog::open(config(dir, &key)).unwrap();
        pem = log.public_key_pem();
        for i in 1..=5 {
            log.record(event(i)).await.unwrap();
        }
    }
    // As an older version left it: the head in the index's meta table, no head file.
    let head = fs::read_to_string(dir.join("head")).unwrap().lines().next().unwrap().to_string();
    fs::remove_file(dir.join("head")).unwrap();
    let conn = rusqlite::Connection::open(dir.join("index.sqlite")).unwrap();
    conn.execute("INSERT INTO meta (key, value) VALUES ('head', ?1)", [&head]).unwrap();
    // And its index schema (3): one row per record, names interned; no blocks.
    conn.execute_batch(
        "DROP TABLE blocks; DROP TABLE block_records; DROP TABLE postings;
         CREATE TABLE names (id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE);
         CREATE TABLE records (seq INTEGER PRIMARY KEY, time_us INTEGER NOT NULL);
         INSERT INTO records VALUES (1, 0), (2, 0);
         PRAGMA user_version = 3;",
    )
    .unwrap();
    drop(conn);
    let report = verify(dir, &pem);
    assert!(report.ok, "{}", show(&report));
    {
        let log = AuditLog::open(config(dir, &key)).unwrap();
        assert_eq!(log.record(event(6)).await.unwrap(), 6);
        // The old rows are gone and every record is found again (rebuilt from the files).
        assert_eq!(seqs(&query_all(&log, AuditQuery::default()).await), [1, 2, 3, 4, 5, 6]);
        let secret = AuditQuery { secret: Some(event(4).resource.secret.unwrap()), ..Default::default() };
        assert!(seqs(&query_all(&log, secret).await).contains(&4));
    }
    let conn = rusqlite::Connection::open(dir.join("index.sqlite")).unwrap();
    let old: i64 = conn
        .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name IN ('records', 'names')", [], |r| r.get(0))
        .unwrap();
    assert_eq!(old, 0, "the old tables are dropped");
    drop(conn);
    assert!(fs::read_to_string(dir.join("head")).unwrap().contains("\"type\":\"head\""));
    let conn = rusqlite::Connection::open(dir.join("index.sqlite")).unwrap();
    let left: i64 = conn.query_row("SELECT COUNT(*) FROM meta WHERE key = 'head'", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 0, "the head left the index");
    let report = verify(dir, &pem);
    assert!(report.ok, "{}", show(&report));
}

/// After a downgrade, an index written by a newer version (unknown layout) is dropped and every
/// record is found again, rebuilt from the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_from_a_newer_version_is_rebuilt_from_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = generate_signing_key().unwrap();
    {
        let log = AuditLog::open(config(dir, &key)).unwrap();
        for i in 1..=5 {
            log.record(event(i)).await.unwrap();
        }
    }
    let conn = rusqlite::Connection::open(dir.join("index.sqlite")).unwrap();
    conn.execute_batch(
        "DROP TABLE postings; CREATE TABLE postings (future BLOB); DELETE FROM blocks WHERE first_seq > 2;
         PRAGMA user_version = 42;",
    )
    .unwrap();
    drop(conn);
    let log = AuditLog::open(config(dir, &key)).unwrap();
    assert_eq!(log.record(event(6)).await.unwrap(), 6);
    assert_eq!(seqs(&query_all(&log, AuditQuery::default()).await), [1, 2, 3, 4, 5, 6]);
    let secret = AuditQuery { secret: Some(event(4).resource.secret.unwrap()), ..Default::default() };
    assert_eq!(seqs(&query_all(&log, secret).await), [4]);
}

/// With the journal turned off, commits fsync the log itself and a journal left by an earlier
/// run is removed (after its entries were replayed), so no later open can replay it stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_the_journal_off_removes_it_and_keeps_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    let key = generate_signing_key().unwrap();
    let log = AuditLog::open(config(tmp.path(), &key)).unwrap();
    for i in 1..=20 {
        log.record(event(i)).await.unwrap();
    }
    drop(log);
    assert!(tmp.path().join("journal").exists());

    let mut cfg = config(tmp.path(), &key);
    cfg.journal_bytes = 0;
    let log = AuditLog::open(cfg).unwrap();
    assert!(!tmp.path().join("journal").exists(), "an unused journal stays behind");
    for i in 21..=40 {
        log.record(event(i)).await.unwrap();
    }
    drop(log);

    let log = AuditLog::open(config(tmp.path(), &key)).unwrap();
    let all = query_all(&log, AuditQuery::default()).await;
    assert_eq!(seqs(&all), (1..=40).collect::<Vec<u64>>());
    let report = verify(tmp.path(), &log.public_key_pem());
    assert!(report.ok, "{}", show(&report));
}
