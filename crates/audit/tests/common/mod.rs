//! Helpers shared by the audit integration tests: real files, real SQLite, no mocks.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use coffer_audit::{
    AuditConfig, AuditEvent, AuditLog, AuditPrincipal, AuditQuery, AuditResource, AuditResult, VerifyReport,
};
use serde_json::Value;
use zeroize::Zeroizing;

pub fn config(dir: &Path, signing_key: &Zeroizing<Vec<u8>>) -> AuditConfig {
    let mut c = AuditConfig::new(dir, Zeroizing::new([7u8; 32]), signing_key.clone());
    c.checkpoint_interval = Duration::from_secs(3600);
    // Small enough that tests wrap it many times (and that it fits the tiny tmpfs).
    c.journal_bytes = 64 * 1024;
    c
}

pub fn event(i: u64) -> AuditEvent {
    event_at(i, SystemTime::now())
}

pub fn event_at(i: u64, time: SystemTime) -> AuditEvent {
    let denied = matches!(i % 5, 0);
    AuditEvent {
        time,
        request_id: format!("req-{i}"),
        operation: ["SecretGet", "SecretSet", "SecretList"][(i % 3) as usize].into(),
        result: if denied { AuditResult::Denied } else { AuditResult::Allowed },
        status: if denied { 403 } else { 200 },
        duration_ms: 1.25,
        client_ip: Some("127.0.0.1".parse().unwrap()),
        user_agent: Some("azsdk-python-keyvault-secrets/4.12.0".into()),
        principal: Some(AuditPrincipal {
            id: format!("00000000-0000-0000-0000-00000000000{}", i % 3),
            display_name: format!("app-{}", i % 3),
            kind: "ServicePrincipal".into(),
            agent: None,
            process: None,
        }),
        resource: AuditResource {
            vault: Some("vault1".into()),
            secret: Some(format!("secret-{}", i % 4)),
            version: None,
        },
        grant: (!denied).then(|| "Key Vault Secrets User".into()),
        denial_reason: denied.then(|| "no role assignment grants secrets/getSecret".into()),
        credential_hmac: None,
    }
}

/// Every page of a query.
pub async fn query_all(log: &AuditLog, mut q: AuditQuery) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let page = log.query(q.clone()).await.unwrap();
        out.extend(page.records);
        match page.next {
            Some(next) => q.after = Some(next),
            None => return out,
        }
    }
}

pub fn seqs(records: &[Value]) -> Vec<u64> {
    records.iter().map(|r| r["seq"].as_u64().unwrap()).collect()
}

/// The log's files in chain order (rotated, then active).
pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with("audit-") && n.ends_with(".jsonl")
        })
        .collect();
    rotated.sort();
    let active = dir.join("audit.jsonl");
    if active.exists() {
        rotated.push(active);
    }
    rotated
}

pub fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path).unwrap().lines().map(str::to_string).collect()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(path, text).unwrap();
}

pub fn is_checkpoint(line: &str) -> bool {
    serde_json::from_str::<Value>(line).map(|v| v["type"] == "checkpoint").unwrap_or(false)
}

/// File and 0-based line index of the record with `seq`.
pub fn locate(dir: &Path, seq: u64) -> (PathBuf, usize) {
    for file in log_files(dir) {
        for (i, line) in read_lines(&file).iter().enumerate() {
            let v: Value = serde_json::from_str(line).unwrap();
            if v.get("type").is_none() && v["seq"] == seq {
                return (file, i);
            }
        }
    }
    panic!("seq {seq} not found");
}

/// Re-seals a record line after editing its JSON, as a forger who knows the format would:
/// SHA-256 over the body without `hash`, hash appended last.
pub fn forge(mut v: Value) -> String {
    v.as_object_mut().unwrap().remove("hash");
    let body = serde_json::to_vec(&v).unwrap(); // serde_json maps are sorted: canonical
    let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, &body).as_ref());
    let mut line = String::from_utf8(body).unwrap();
    line.pop();
    format!("{line},\"hash\":\"{hash}\"}}")
}

pub fn hash_of(line: &str) -> String {
    serde_json::from_str::<Value>(line).unwrap()["hash"].as_str().unwrap().to_string()
}

/// Copies the regular files of `src` (not the lock) into a new temporary directory.
pub fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dst = tempfile::tempdir().unwrap();
    for e in fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && p.file_name().unwrap() != "lock" {
            fs::copy(&p, dst.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    dst
}

pub fn show(report: &VerifyReport) -> String {
    let mut s = format!("ok={} records={} checkpoints={}\n", report.ok, report.records, report.checkpoints);
    for p in &report.problems {
        s.push_str(&format!("  {p}\n"));
    }
    for n in &report.notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    s
}
