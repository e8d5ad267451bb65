//! Readiness (`GET /readyz`), the audit disk alarm and the Prometheus metrics (`GET /metrics`).
//!
//! Why an alarm before the disk is full: the audit log fails closed, so a full audit filesystem
//! refuses every request (503). Operators must hear about it while there is still room to act,
//! and a load balancer must be able to tell (`/readyz`) — `/healthz` only says the process runs.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use coffer_audit::DiskUsage;
use serde_json::{json, Value};

use crate::api::AppState;

/// The alarm is logged at most this often while the headroom stays low.
const ALARM_EVERY: Duration = Duration::from_secs(60);
/// How often the background task looks at the audit filesystem.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// `/readyz` is unauthenticated: its answer (a `statvfs`, a directory listing and a store read)
/// is reused for this long, so a flood of it costs no more than one check a second.
const READINESS_TTL: Duration = Duration::from_secs(1);
/// A store that does not answer a one-row read in this time is not ready.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

const MIB: u64 = 1024 * 1024;

/// The audit disk's bounds, and what the checks last saw.
pub struct Health {
    /// Below this much free space on the audit filesystem: alarm, and not ready.
    pub min_free_bytes: u64,
    /// The size bound on rotated audit files, if any (reported, enforced by the audit writer).
    pub max_total_bytes: Option<u64>,
    last_alarm: Mutex<Option<Instant>>,
    cached: tokio::sync::Mutex<Option<(Instant, Readiness)>>,
}

/// The outcome of the readiness checks.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub ready: bool,
    /// The `/readyz` body: `status` and one entry per check.
    pub body: Value,
    pub usage: Option<DiskUsage>,
}

impl Health {
    pub fn new(min_free_bytes: u64, max_total_bytes: Option<u64>) -> Self {
        Self { min_free_bytes, max_total_bytes, last_alarm: Mutex::new(None), cached: Default::default() }
    }

    /// Whether the alarm is due now (at most once per [`ALARM_EVERY`]); marks it sent.
    fn alarm_due(&self, now: Instant) -> bool {
        let mut last = self.last_alarm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| now.duration_since(t) < ALARM_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Why the audit disk is not ready, or `None` when the headroom is enough.
    fn disk_problem(&self, usage: &DiskUsage) -> Option<String> {
        (usage.free_bytes < self.min_free_bytes).then(|| {
            format!(
                "The audit filesystem has {} MiB free, below audit_min_free_mib ({} MiB). Free space or move \
                 the audit directory (audit_dir), or bound it (audit_max_total_mib, audit_retention_days), \
                 before the disk fills: the audit log fails closed and then refuses every request.",
                usage.free_bytes / MIB,
                self.min_free_bytes / MIB
            )
        })
    }
}

/// The audit directory's usage, off the async threads.
async fn audit_usage(state: &AppState) -> Option<std::io::Result<DiskUsage>> {
    let audit = state.audit.clone()?;
    let usage = tokio::task::spawn_blocking(move || audit.disk_usage()).await;
    Some(usage.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))))
}

/// Runs the readiness checks, or returns those of the last second.
pub async fn readiness(state: &AppState) -> Readiness {
    let health = &state.health;
    let mut cached = health.cached.lock().await;
    if let Some((at, r)) = cached.as_ref() {
        if at.elapsed() < READINESS_TTL {
            return r.clone();
        }
    }
    let store = match tokio::time::timeout(STORE_TIMEOUT, state.store.meta("readyz")).await {
        Ok(Ok(_)) => json!({ "ok": true }),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the store cannot be read");
            json!({ "ok": false, "message": "The store cannot be read; see the server log." })
        }
        Err(_) => json!({ "ok": false, "message": "The store did not answer in time; see the server log." }),
    };
    let writer = match state.audit.as_ref().map(coffer_audit::AuditLog::health) {
        None => json!({ "ok": true, "message": "Auditing is switched off." }),
        Some(Ok(())) => json!({ "ok": true }),
        Some(Err(why)) => json!({ "ok": false, "message": format!("{why}.") }),
    };
    let mut usage = None;
    let disk = match audit_usage(state).await {
        None => json!({ "ok": true, "message": "Auditing is switched off." }),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the audit directory's disk usage cannot be read");
            json!({ "ok": false, "message": "The audit directory's disk usage cannot be read; see the server log." })
        }
        Some(Ok(u)) => {
            usage = Some(u);
            let mut check = json!({
                "ok": true,
                "freeBytes": u.free_bytes,
                "filesystemBytes": u.filesystem_bytes,
                "dirBytes": u.dir_bytes,
                "rotatedBytes": u.rotated_bytes,
                "minFreeBytes": health.min_free_bytes,
                "maxTotalBytes": health.max_total_bytes,
            });
            if let Some(problem) = health.disk_problem(&u) {
                check["ok"] = json!(false);
                check["message"] = json!(problem);
            }
            check
        }
    };
    let ready = [&store, &writer, &disk].iter().all(|c| c["ok"] == json!(true));
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "checks": { "store": store, "auditWriter": writer, "auditDisk": disk },
    });
    let r = Readiness { ready, body, usage };
    *cached = Some((Instant::now(), r.clone()));
    r
}

/// Looks at the audit filesystem every few seconds and warns, at most once a minute, while its
/// free space is below the bound.
pub fn spawn_disk_alarm(state: std::sync::Arc<AppState>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    if state.audit.is_none() {
        return;
    }
    tokio::spawn(async move {
        loop {
            match audit_usage(&state).await {
                Some(Ok(usage)) => {
                    if let Some(problem) = state.health.disk_problem(&usage) {
                        if state.health.alarm_due(Instant::now()) {
                            tracing::warn!(
                                free_bytes = usage.free_bytes,
                                min_free_bytes = state.health.min_free_bytes,
                                audit_dir_bytes = usage.dir_bytes,
                                "ALARM: audit disk headroom is low. {problem}"
                            );
                        }
                    }
                }
                Some(Err(e)) => {
                    if state.health.alarm_due(Instant::now()) {
                        tracing::warn!(error = %e, "ALARM: the audit directory's free space cannot be read");
                    }
                }
                None => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
    });
}

/// The Prometheus text exposition (format 0.0.4) of the readiness checks, the audit log's
/// counters and disk, and the throttle's refusals.
pub async fn metrics_text(state: &AppState) -> String {
    let r = readiness(state).await;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    metric("coffer_ready", "gauge", "1 when /readyz answers 200.", u64::from(r.ready));
    metric(
        "coffer_throttled_requests_total",
        "counter",
        "Requests refused with 429 because their address spent its allowance of failures.",
        state.failures.refused_total(),
    );
    if let Some(audit) = &state.audit {
        let stats = audit.stats();
        metric("coffer_audit_records_total", "counter", "Audit records made durable.", stats.records);
        metric(
            "coffer_audit_failed_batches_total",
            "counter",
            "Audit group commits that failed (their requests were refused).",
            stats.failed_batches,
        );
        metric(
            "coffer_audit_pruned_files_total",
            "counter",
            "Rotated audit files deleted by retention or the size bound.",
            stats.pruned_files,
        );
        metric(
            "coffer_audit_min_free_bytes",
            "gauge",
            "Free space on the audit filesystem below which the server alarms and is not ready.",
            state.health.min_free_bytes,
        );
        if let Some(max) = state.health.max_total_bytes {
            metric("coffer_audit_max_total_bytes", "gauge", "The size bound on rotated audit files.", max);
        }
        if let Some(u) = r.usage {
            metric(
                "coffer_audit_free_bytes",
                "gauge",
                "Bytes available on the audit directory's filesystem.",
                u.free_bytes,
            );
            metric(
                "coffer_audit_filesystem_bytes",
                "gauge",
                "Size of the audit directory's filesystem.",
                u.filesystem_bytes,
            );
            metric(
                "coffer_audit_dir_bytes",
                "gauge",
                "Bytes of every file in the audit directory.",
                u.dir_bytes,
            );
            metric(
                "coffer_audit_rotated_bytes",
                "gauge",
                "Bytes of the rotated audit files.",
                u.rotated_bytes,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alarm_is_rate_limited_to_once_a_minute() {
        let h = Health::new(256 * MIB, None);
        let t0 = Instant::now();
        assert!(h.alarm_due(t0));
        assert!(!h.alarm_due(t0 + Duration::from_secs(5)));
        assert!(!h.alarm_due(t0 + Duration::from_secs(59)));
        assert!(h.alarm_due(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn the_disk_problem_names_the_setting_to_change() {
        let h = Health::new(256 * MIB, None);
        let low = DiskUsage { free_bytes: 10 * MIB, ..DiskUsage::default() };
        let problem = h.disk_problem(&low).unwrap();
        assert!(
            problem.contains("10 MiB free") && problem.contains("audit_min_free_mib (256 MiB)"),
            "{problem}"
        );
        let enough = DiskUsage { free_bytes: 256 * MIB, ..DiskUsage::default() };
        assert_eq!(h.disk_problem(&enough), None);
    }
}
