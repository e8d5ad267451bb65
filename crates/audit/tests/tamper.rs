//! `verify` on an untouched log, and after each kind of tampering, in a rotated file and in
//! the active one: the first problem names the first bad record.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use coffer_audit::{generate_signing_key, verify, AuditLog, Problem, ProblemKind};
use common::*;
use serde_json::Value;

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pem: String,
}

/// 38 records, 5 per checkpoint, ~6 records per file (so several rotated files), and the last
/// records after the last checkpoint. The log is left open (leaked) so no final checkpoint is
/// written: the state after the last acknowledged record.
async fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let key = generate_signing_key().unwrap();
    let mut cfg = config(&dir, &key);
    cfg.max_file_bytes = 8000;
    cfg.checkpoint_every = 5;
    let log = AuditLog::open(cfg).unwrap();
    for i in 1..=38 {
        assert_eq!(log.record(event(i)).await.unwrap(), i);
    }
    // Let the writer finish the rotation that may follow the last batch.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pem = log.public_key_pem();
    assert!(log.stats().rotations >= 3, "{:?}", log.stats());
    std::mem::forget(log);
    for file in log_files(&dir) {
        let layout: Vec<String> = read_lines(&file)
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                if v["type"] == "checkpoint" {
                    format!("cp{}@{}", v["n"], v["seq"])
                } else {
                    v["seq"].to_string()
                }
            })
            .collect();
        eprintln!("{}: {}", name(&file), layout.join(" "));
    }
    Fixture { _tmp: tmp, dir, pem }
}

/// Applies `tamper` to a copy of the fixture and returns the first problem.
fn first_problem(f: &Fixture, tamper: impl FnOnce(&Path)) -> (Problem, String) {
    let copy = copy_dir(&f.dir);
    tamper(copy.path());
    let report = verify(copy.path(), &f.pem);
    let shown = show(&report);
    assert!(!report.ok, "tampering not detected:\n{shown}");
    // Paths in the report are inside the copy: compare by file name.
    (report.problems[0].clone(), shown)
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_str().unwrap().to_string()
}

fn assert_names(problem: &Problem, kind: ProblemKind, file: &Path, line: usize, seq: u64, shown: &str) {
    assert_eq!(problem.kind, kind, "{shown}");
    assert_eq!(name(&problem.file), name(file), "{shown}");
    assert_eq!(problem.line, Some(line as u64), "{shown}");
    assert_eq!(problem.seq, Some(seq), "{shown}");
}

/// A seq in the middle of a rotated file and one in the active file.
fn targets(f: &Fixture) -> Vec<u64> {
    let rotated = &log_files(&f.dir)[1];
    let first_seq = read_lines(rotated)
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v.get("type").is_none())
        .unwrap()["seq"]
        .as_u64()
        .unwrap();
    let active = f.dir.join("audit.jsonl");
    let active_recs: Vec<u64> = read_lines(&active)
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("type").is_none())
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert!(active_recs.len() >= 3, "active file too short for the tests: {active_recs:?}");
    vec![first_seq + 1, active_recs[0]]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untouched_log_verifies() {
    let f = fixture().await;
    let report = verify(&f.dir, &f.pem);
    assert!(report.ok, "{}", show(&report));
    assert_eq!(report.records, 38);
    assert_eq!((report.first_seq, report.last_seq, report.head_seq), (Some(1), Some(38), Some(38)));
    assert!(report.files.len() >= 4);
    // Every file on its own verifies too (its chain and checkpoints).
    for file in log_files(&f.dir) {
        let r = verify(&file, &f.pem);
        assert!(r.ok, "{}: {}", file.display(), show(&r));
    }
    // Another key does not.
    let other =
        AuditLog::open(config(&f.dir.with_file_name("other"), &generate_signing_key().unwrap())).unwrap();
    let r = verify(&f.dir, &other.public_key_pem());
    assert!(!r.ok);
    assert_eq!(r.problems[0].kind, ProblemKind::BadSignature, "{}", show(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_changed_byte_is_named() {
    let f = fixture().await;
    for seq in targets(&f) {
        let (file, idx) = locate(&f.dir, seq);
        let (p, shown) = first_problem(&f, |d| {
            let path = d.join(file.file_name().unwrap());
            let mut bytes = fs::read(&path).unwrap();
            let start: usize = read_lines(&path)[..idx].iter().map(|l| l.len() + 1).sum();
            let at = start + read_lines(&path)[idx].find("\"operationName\":\"Secret").unwrap() + 17;
            bytes[at] ^= 0x01; // "Secret" -> "Recret"
            fs::write(&path, bytes).unwrap();
        });
        assert_names(&p, ProblemKind::Modified, &file, idx + 1, seq, &shown);
        // A changed byte that breaks the JSON is named too.
        let (p, shown) = first_problem(&f, |d| {
            let path = d.join(file.file_name().unwrap());
            let mut lines = read_lines(&path);
            lines[idx] = lines[idx].replacen("\"category\":", "\"category\";", 1);
            write_lines(&path, &lines);
        });
        assert_names(&p, ProblemKind::Modified, &file, idx + 1, seq, &shown);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_record_is_named() {
    let f = fixture().await;
    for seq in targets(&f) {
        let (file, idx) = locate(&f.dir, seq);
        let (p, shown) = first_problem(&f, |d| {
            let path = d.join(file.file_name().unwrap());
            let mut lines = read_lines(&path);
            lines.remove(idx);
            write_lines(&path, &lines);
        });
        // Named at the place of the gap: the record after the deleted one.
        assert_names(&p, ProblemKind::Deleted, &file, idx + 1, seq + 1, &shown);
        assert!(p.message.contains(&format!("seq {seq} is missing")), "{shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_records_are_named() {
    let f = fixture().await;
    for seq in targets(&f) {
        let (file, idx) = locate(&f.dir, seq);
        let (p, shown) = first_problem(&f, |d| {
            let path = d.join(file.file_name().unwrap());
            let mut lines = read_lines(&path);
            assert!(!is_checkpoint(&lines[idx + 1]));
            lines.swap(idx, idx + 1);
            write_lines(&path, &lines);
        });
        assert_names(&p, ProblemKind::Reordered, &file, idx + 1, seq + 1, &shown);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_swapped_across_a_rotation_boundary_are_named() {
    let f = fixture().await;
    let files = log_files(&f.dir);
    let (a, b) = (&files[1], &files[2]);
    let (p, shown) = first_problem(&f, |d| {
        let (pa, pb) = (d.join(a.file_name().unwrap()), d.join(b.file_name().unwrap()));
        let (mut la, mut lb) = (read_lines(&pa), read_lines(&pb));
        // The last record of A (before its closing checkpoint) and the first of B (after its
        // opening checkpoint).
        let ia = la.len() - 2;
        std::mem::swap(&mut la[ia], &mut lb[1]);
        write_lines(&pa, &la);
        write_lines(&pb, &lb);
    });
    let last_of_a = serde_json::from_str::<Value>(&read_lines(a)[read_lines(a).len() - 2]).unwrap()["seq"]
        .as_u64()
        .unwrap();
    assert_names(&p, ProblemKind::Reordered, a, read_lines(a).len() - 1, last_of_a + 1, &shown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_record_is_named() {
    let f = fixture().await;
    for seq in targets(&f) {
        let (file, idx) = locate(&f.dir, seq);
        // A forged record that claims seq's place, links to the record before it and carries a
        // correct hash of its own content.
        let (p, shown) = first_problem(&f, |d| {
            let path = d.join(file.file_name().unwrap());
            let mut lines = read_lines(&path);
            let mut v: Value = serde_json::from_str(&lines[idx]).unwrap();
            v["operationName"] = "SecretPurge".into();
            v["identity"]["displayName"] = "someone-else".into();
            lines.insert(idx, forge(v));
            write_lines(&path, &lines);
        });
        assert_names(&p, ProblemKind::Inserted, &file, idx + 1, seq, &shown);
    }
}

/// The forger re-hashes every later record so the chain is consistent again: the signed
/// checkpoint (or, after the last one, the signed head) no longer matches. With the index, the
/// first forged record is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_and_rechained_record_is_detected_by_the_signatures() {
    let f = fixture().await;
    for seq in targets(&f) {
        let (file, idx) = locate(&f.dir, seq);
        let (p, shown) = first_problem(&f, |d| {
            let path = d.join(file.file_name().unwrap());
            let mut lines = read_lines(&path);
            let mut v: Value = serde_json::from_str(&lines[idx]).unwrap();
            v["operationName"] = "SecretPurge".into();
            lines.insert(idx, forge(v));
            let mut prev = hash_of(&lines[idx]);
            let mut next_seq = seq + 1;
            for line in lines.iter_mut().skip(idx + 1) {
                if is_checkpoint(line) {
                    continue;
                }
                let mut v: Value = serde_json::from_str(line).unwrap();
                v["seq"] = next_seq.into();
                v["prevHash"] = prev.clone().into();
                *line = forge(v);
                prev = hash_of(line);
                next_seq += 1;
            }
            write_lines(&path, &lines);
        });
        assert_names(&p, ProblemKind::Inserted, &file, idx + 1, seq, &shown);
        assert!(p.message.contains("re-hashed"), "{shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_tail_after_the_last_checkpoint_is_reported() {
    let f = fixture().await;
    let active = f.dir.join("audit.jsonl");
    let lines = read_lines(&active);
    assert!(!is_checkpoint(lines.last().unwrap()), "the fixture must end with records after a checkpoint");
    // Whole records cut.
    let (p, shown) = first_problem(&f, |d| {
        let path = d.join("audit.jsonl");
        let mut l = read_lines(&path);
        l.truncate(l.len() - 2);
        write_lines(&path, &l);
    });
    assert_eq!(p.kind, ProblemKind::Truncated, "{shown}");
    assert_eq!(p.seq, Some(36), "{shown}");
    assert!(p.message.contains("37..=38"), "{shown}");
    // Cut in the middle of a line.
    let (p, shown) = first_problem(&f, |d| {
        let path = d.join("audit.jsonl");
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    });
    assert_eq!(p.kind, ProblemKind::Truncated, "{shown}");
    assert_eq!(p.seq, Some(38), "{shown}");
    // Everything after the last checkpoint cut, checkpoint included.
    let (p, shown) = first_problem(&f, |d| {
        let path = d.join("audit.jsonl");
        let mut l = read_lines(&path);
        let last_cp = l.iter().rposition(|x| is_checkpoint(x)).unwrap();
        l.truncate(last_cp);
        write_lines(&path, &l);
    });
    assert_eq!(p.kind, ProblemKind::Truncated, "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_at_rotation_boundaries_is_reported() {
    let f = fixture().await;
    let files = log_files(&f.dir);
    // The tail of a rotated file cut (closing checkpoint and last record).
    let a = files[1].clone();
    let (p, shown) = first_problem(&f, |d| {
        let path = d.join(a.file_name().unwrap());
        let mut l = read_lines(&path);
        l.truncate(l.len() - 2);
        write_lines(&path, &l);
    });
    assert_eq!(p.kind, ProblemKind::Truncated, "{shown}");
    assert_eq!(name(&p.file), name(&a), "{shown}");
    // A whole rotated file deleted in the middle.
    let (p, shown) = first_problem(&f, |d| fs::remove_file(d.join(a.file_name().unwrap())).unwrap());
    assert_eq!(p.kind, ProblemKind::Deleted, "{shown}");
    assert_eq!(name(&p.file), name(&files[2]), "{shown}");
    assert_eq!(p.line, Some(1), "{shown}");
    // The oldest file deleted without a signed retention point.
    let (p, shown) = first_problem(&f, |d| fs::remove_file(d.join(files[0].file_name().unwrap())).unwrap());
    assert_eq!(p.kind, ProblemKind::Deleted, "{shown}");
    assert!(p.message.contains("retention"), "{shown}");
    // The active file deleted.
    let (p, shown) = first_problem(&f, |d| fs::remove_file(d.join("audit.jsonl")).unwrap());
    assert_eq!(p.kind, ProblemKind::Truncated, "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modified_checkpoint_fails_its_signature() {
    let f = fixture().await;
    let a = log_files(&f.dir)[1].clone();
    let (p, shown) = first_problem(&f, |d| {
        let path = d.join(a.file_name().unwrap());
        let mut l = read_lines(&path);
        let last = l.len() - 1;
        l[last] = l[last].replacen("\"time\":\"2", "\"time\":\"1", 1);
        write_lines(&path, &l);
    });
    assert_eq!(p.kind, ProblemKind::BadSignature, "{shown}");
    assert_eq!(name(&p.file), name(&a), "{shown}");
    // The head, rolled back to an older value by hand, fails too.
    let (p, shown) = first_problem(&f, |d| {
        let head = fs::read_to_string(d.join("head")).unwrap();
        let rolled_back = head.replacen("\"seq\":38", "\"seq\":30", 1);
        assert_ne!(head, rolled_back);
        fs::write(d.join("head"), rolled_back).unwrap();
    });
    assert_eq!(p.kind, ProblemKind::BadSignature, "{shown}");
    assert!(p.message.contains("head"), "{shown}");
}
