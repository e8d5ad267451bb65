//! From an [`AuditEvent`] to the JSON object of a record (without the chain fields, which the
//! writer adds), and from a stored record back to its index columns.

use serde_json::{json, Map, Value};

use crate::canon::{parse_rfc3339_us, rfc3339};
use crate::{AuditError, AuditEvent};

/// Longest string kept in a record field, in bytes.
pub(crate) const MAX_FIELD_BYTES: usize = 1024;

fn cap(s: &str) -> String {
    if s.len() <= MAX_FIELD_BYTES {
        return s.to_string();
    }
    let mut end = MAX_FIELD_BYTES - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn opt(s: &Option<String>) -> Value {
    s.as_deref().map_or(Value::Null, |s| Value::String(cap(s)))
}

/// `hmac-sha256:` and 64 lowercase hex digits.
pub(crate) fn is_credential_hmac(s: &str) -> bool {
    s.strip_prefix("hmac-sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// The record object (every field but `seq`, `prevHash` and `hash`) and its index columns.
pub(crate) fn to_body(e: &AuditEvent) -> Result<(Map<String, Value>, Cols), AuditError> {
    if let Some(h) = &e.credential_hmac {
        if !is_credential_hmac(h) {
            return Err(AuditError::InvalidEvent(
                "credential_hmac must be the output of AuditLog::hmac (hmac-sha256:<hex>), never a credential".into(),
            ));
        }
    }
    if e.operation.is_empty() {
        return Err(AuditError::InvalidEvent("operation is empty".into()));
    }
    let identity = match &e.principal {
        None => Value::Null,
        Some(p) => json!({
            "principalId": cap(&p.id),
            "displayName": cap(&p.display_name),
            "principalType": cap(&p.kind),
            "agent": opt(&p.agent),
            "process": match &p.process {
                None => Value::Null,
                Some(f) => json!({
                    "pid": f.pid,
                    "uid": f.uid,
                    "gid": f.gid,
                    "exe": cap(&f.exe),
                    "cgroup": opt(&f.cgroup),
                }),
            },
        }),
    };
    let duration = if e.duration_ms.is_finite() && e.duration_ms >= 0.0 {
        // Microsecond resolution is plenty and keeps lines short.
        json!((e.duration_ms * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    };
    let body = json!({
        "category": "AuditEvent",
        "id": uuid::Uuid::new_v4().to_string(),
        "time": rfc3339(e.time),
        "operationName": cap(&e.operation),
        "resultType": e.result.result_type(),
        "resultSignature": status_text(e.status),
        "statusCode": e.status,
        "durationMs": duration,
        "callerIpAddress": e.client_ip.map_or(Value::Null, |ip| Value::String(ip.to_string())),
        "identity": identity,
        "properties": {
            "requestId": cap(&e.request_id),
            "vault": opt(&e.resource.vault),
            "secret": opt(&e.resource.secret),
            "version": opt(&e.resource.version),
            "grant": opt(&e.grant),
            "denialReason": opt(&e.denial_reason),
            "userAgent": opt(&e.user_agent),
            "credentialHmac": opt(&e.credential_hmac),
        },
    });
    let cols =
        cols(&body).ok_or_else(|| AuditError::InvalidEvent("the time is outside years 0..=9999".into()))?;
    match body {
        Value::Object(map) => Ok((map, cols)),
        _ => unreachable!("json! object literal"),
    }
}

/// The indexed columns of a record. Text columns are lowercased; queries lowercase their
/// arguments the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cols {
    pub time_us: i64,
    pub principal_id: Option<String>,
    pub principal_name: Option<String>,
    pub vault: Option<String>,
    pub secret: Option<String>,
    pub operation: String,
    pub result: String,
}

/// Extracts the index columns from a stored record; `None` if it is not a record.
pub(crate) fn cols(v: &Value) -> Option<Cols> {
    let text = |v: &Value| v.as_str().map(str::to_lowercase);
    Some(Cols {
        time_us: parse_rfc3339_us(v.get("time")?.as_str()?)?,
        principal_id: v.pointer("/identity/principalId").and_then(text),
        principal_name: v.pointer("/identity/displayName").and_then(text),
        vault: v.pointer("/properties/vault").and_then(text),
        secret: v.pointer("/properties/secret").and_then(text),
        operation: text(v.get("operationName")?)?,
        result: text(v.get("resultType")?)?,
    })
}

pub(crate) fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// `resultSignature`: the HTTP reason phrase, or the code for unusual ones.
pub(crate) fn status_text(status: u16) -> String {
    let text = match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        other => return other.to_string(),
    };
    text.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuditPrincipal, AuditResource, AuditResult, ProcessFacts};
    use std::time::{Duration, UNIX_EPOCH};

    fn event() -> AuditEvent {
        AuditEvent {
            time: UNIX_EPOCH + Duration::from_micros(1_714_564_800_123_456),
            request_id: "req-1".into(),
            operation: "SecretGet".into(),
            result: AuditResult::Denied,
            status: 403,
            duration_ms: 1.23456789,
            client_ip: Some("127.0.0.1".parse().unwrap()),
            user_agent: Some("x".repeat(5000)),
            principal: Some(AuditPrincipal {
                id: "ABC".into(),
                display_name: "Alice".into(),
                kind: "User".into(),
                agent: None,
                process: Some(ProcessFacts { pid: 1, uid: 2, gid: 3, exe: "/bin/x".into(), cgroup: None }),
            }),
            resource: AuditResource { vault: Some("V1".into()), secret: Some("Db".into()), version: None },
            grant: None,
            denial_reason: Some("no role assignment".into()),
            credential_hmac: None,
        }
    }

    #[test]
    fn body_fields_and_columns() {
        let (body, c) = to_body(&event()).unwrap();
        let body = Value::Object(body);
        assert_eq!(body["time"], "2024-05-01T12:00:00.123456Z");
        assert_eq!(body["resultType"], "Denied");
        assert_eq!(body["resultSignature"], "Forbidden");
        assert_eq!(body["statusCode"], 403);
        assert_eq!(body["durationMs"], 1.235);
        assert_eq!(body["identity"]["process"]["uid"], 2);
        assert_eq!(body["properties"]["userAgent"].as_str().unwrap().len(), MAX_FIELD_BYTES);
        assert_eq!(c, cols(&body).unwrap());
        assert_eq!(c.time_us, 1_714_564_800_123_456);
        assert_eq!(c.principal_id.as_deref(), Some("abc"));
        assert_eq!(c.secret.as_deref(), Some("db"));
        assert_eq!(c.operation, "secretget");
        assert_eq!(c.result, "denied");
    }

    #[test]
    fn raw_credentials_are_refused() {
        let mut e = event();
        e.credential_hmac = Some("my-client-secret".into());
        assert!(matches!(to_body(&e), Err(AuditError::InvalidEvent(_))));
        e.credential_hmac = Some(format!("hmac-sha256:{}", "ab".repeat(32)));
        assert!(to_body(&e).is_ok());
    }
}
