//! The audit file reader behind `coffer audit verify`: line splitting, record and checkpoint
//! parsing (its fast path must agree with the general one), the canonical JSON that hashes are
//! computed over (it must round-trip), and a whole verify of the bytes as a log file.
#![no_main]

use std::sync::OnceLock;

use coffer_audit::fuzzing::{canonical, classify_both_ways, parse_lines};
use libfuzzer_sys::fuzz_target;

/// A directory for the file verify reads, and a public key to verify with.
fn fixture() -> &'static (tempfile::TempDir, String) {
    static FIXTURE: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let key = coffer_audit::generate_signing_key().expect("a signing key");
        let pem = coffer_audit::public_key_pem_from_pkcs8(&key).expect("its public key");
        (dir, pem)
    })
}

fn has_float(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.is_f64(),
        serde_json::Value::Array(items) => items.iter().any(has_float),
        serde_json::Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let (lines, torn) = parse_lines(data);
    let mut next = 0;
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line.line, i as u64 + 1);
        assert_eq!(line.start, next);
        assert!(line.start <= line.end && line.end < data.len() && data[line.end] == b'\n');
        assert!(!data[line.start..line.end].contains(&b'\n'));
        let (fast, general) = classify_both_ways(&data[line.start..line.end]);
        assert_eq!(fast, general, "the fast path and the general path disagree");
        next = line.end + 1;
    }
    assert_eq!(torn, (next < data.len()).then_some((next, data.len())));

    // Floats excepted: serde_json reads them to within one ULP, not exactly, so they need not
    // print back the same; hashes cover stored bytes, never a re-serialization (files.rs test
    // `a_record_hash_covers_its_bytes_not_a_reserialization`).
    let value = serde_json::from_slice::<serde_json::Value>(data).ok().filter(|v| !has_float(v));
    if let Some(value) = value {
        let once = canonical(&value);
        let reread: serde_json::Value = serde_json::from_slice(&once).expect("canonical JSON parses");
        assert_eq!(canonical(&reread), once, "canonical JSON is a fixed point");
    }

    let (dir, pem) = fixture();
    let path = dir.path().join("audit-fuzz.jsonl");
    std::fs::write(&path, data).expect("write the file to verify");
    let report = coffer_audit::verify(&path, pem);
    assert_eq!(report.ok, report.problems.is_empty());
    assert!(report.records + report.checkpoints <= lines.len() as u64);
});
