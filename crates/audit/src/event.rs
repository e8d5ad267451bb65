//! From an [`AuditEvent`] to the JSON object of a record (without the chain fields, which the
//! writer adds), and from a stored record back to its index columns.

use serde_json::Value;

use crate::canon::{parse_rfc3339_us, rfc3339, write_rfc3339};
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

/// `hmac-sha256:` and 64 lowercase hex digits.
pub(crate) fn is_credential_hmac(s: &str) -> bool {
    s.strip_prefix("hmac-sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// A record's canonical JSON body without its chain fields, built on the caller's task so the
/// writer thread only splices in `prevHash` and `seq` and hashes. Canonical means keys sorted
/// bytewise at every level and no whitespace (see `canon`); the keys are fixed, so they are
/// written in sorted order directly instead of going through a map.
pub(crate) struct Encoded {
    bytes: Vec<u8>,
    /// Where `"prevHash":…,` goes (between `operationName` and `properties`).
    prev_at: usize,
    /// Where `"seq":…,` goes (between `resultType` and `statusCode`).
    seq_at: usize,
}

impl Encoded {
    /// Appends the canonical body with `prevHash` and `seq` to `out`.
    pub(crate) fn write_body(&self, seq: u64, prev_hash: &str, out: &mut Vec<u8>) {
        let b = &self.bytes;
        out.extend_from_slice(&b[..self.prev_at]);
        out.extend_from_slice(b"\"prevHash\":\"");
        out.extend_from_slice(prev_hash.as_bytes());
        out.extend_from_slice(b"\",");
        out.extend_from_slice(&b[self.prev_at..self.seq_at]);
        out.extend_from_slice(b"\"seq\":");
        out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        out.push(b',');
        out.extend_from_slice(&b[self.seq_at..]);
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// `"key":` (keys are ASCII identifiers: nothing to escape), after a comma unless first.
fn key(out: &mut Vec<u8>, k: &str, first: bool) {
    if !first {
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(k.as_bytes());
    out.extend_from_slice(b"\":");
}

/// A JSON string, cut to [`MAX_FIELD_BYTES`] like every text field.
fn text(out: &mut Vec<u8>, s: &str) {
    if s.len() <= MAX_FIELD_BYTES {
        serde_json::to_writer(&mut *out, s).expect("serializing a string into memory");
    } else {
        serde_json::to_writer(&mut *out, &cap(s)).expect("serializing a string into memory");
    }
}

/// `s` lowercased, without the per-character work when it has no uppercase letter (ids,
/// names as the SDKs spell them).
fn lowercase(s: &str) -> String {
    if s.is_ascii() && !s.bytes().any(|b| b.is_ascii_uppercase()) {
        s.to_owned()
    } else {
        s.to_lowercase()
    }
}

fn opt_text(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => text(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn num(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A random (v4) UUID for the record's `id`, from a thread-local generator seeded from the OS:
/// a record id must be unique, not secret, and a getrandom call per request showed in profiles.
fn record_id() -> uuid::Uuid {
    use rand::Rng;
    uuid::Builder::from_random_bytes(rand::thread_rng().gen()).into_uuid()
}

/// Checks an event and encodes its record body (see [`Encoded`]) and index columns.
pub(crate) fn encode(e: &AuditEvent) -> Result<(Encoded, Cols), AuditError> {
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
    let time = time::OffsetDateTime::from(e.time);
    if !(0..=9999).contains(&time.year()) {
        return Err(AuditError::InvalidEvent("the time is outside years 0..=9999".into()));
    }
    // Microseconds, rounded down as the written time is.
    let time_us = i64::try_from(time.unix_timestamp_nanos().div_euclid(1000)).expect("years 0..=9999 fit");
    // A record body is 700-1,000 bytes (more with long names): one allocation.
    let o = &mut Vec::with_capacity(1024);
    o.push(b'{');
    key(o, "callerIpAddress", true);
    match e.client_ip {
        // IPv4, nearly every caller: written directly rather than through `fmt`.
        Some(std::net::IpAddr::V4(ip)) => {
            o.push(b'"');
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    o.push(b'.');
                }
                num(o, octet);
            }
            o.push(b'"');
        }
        Some(ip) => {
            use std::io::Write;
            write!(o, "\"{ip}\"").expect("writing into memory");
        }
        None => o.extend_from_slice(b"null"),
    }
    key(o, "category", false);
    o.extend_from_slice(b"\"AuditEvent\"");
    key(o, "durationMs", false);
    if e.duration_ms.is_finite() && e.duration_ms >= 0.0 {
        // Microsecond resolution is plenty and keeps lines short.
        let ms = (e.duration_ms * 1000.0).round() / 1000.0;
        serde_json::to_writer(&mut *o, &ms).expect("serializing a number into memory");
    } else {
        o.extend_from_slice(b"null");
    }
    key(o, "id", false);
    o.push(b'"');
    o.extend_from_slice(record_id().hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).as_bytes());
    o.push(b'"');
    key(o, "identity", false);
    match &e.principal {
        None => o.extend_from_slice(b"null"),
        Some(p) => {
            o.extend_from_slice(b"{\"agent\":");
            opt_text(o, p.agent.as_deref());
            key(o, "displayName", false);
            text(o, &p.display_name);
            key(o, "principalId", false);
            text(o, &p.id);
            key(o, "principalType", false);
            text(o, &p.kind);
            key(o, "process", false);
            match &p.process {
                None => o.extend_from_slice(b"null"),
                Some(f) => {
                    o.extend_from_slice(b"{\"cgroup\":");
                    opt_text(o, f.cgroup.as_deref());
                    key(o, "exe", false);
                    text(o, &f.exe);
                    key(o, "gid", false);
                    num(o, f.gid);
                    key(o, "pid", false);
                    num(o, f.pid);
                    key(o, "uid", false);
                    num(o, f.uid);
                    o.push(b'}');
                }
            }
            o.push(b'}');
        }
    }
    key(o, "operationName", false);
    text(o, &e.operation);
    o.push(b',');
    let prev_at = o.len();
    o.extend_from_slice(b"\"properties\":{\"credentialHmac\":");
    opt_text(o, e.credential_hmac.as_deref());
    key(o, "denialReason", false);
    opt_text(o, e.denial_reason.as_deref());
    key(o, "grant", false);
    opt_text(o, e.grant.as_deref());
    key(o, "requestId", false);
    text(o, &e.request_id);
    key(o, "secret", false);
    opt_text(o, e.resource.secret.as_deref());
    key(o, "userAgent", false);
    opt_text(o, e.user_agent.as_deref());
    key(o, "vault", false);
    opt_text(o, e.resource.vault.as_deref());
    key(o, "version", false);
    opt_text(o, e.resource.version.as_deref());
    o.push(b'}');
    key(o, "resultSignature", false);
    match status_text(e.status) {
        Some(t) => {
            o.push(b'"');
            o.extend_from_slice(t.as_bytes());
            o.push(b'"');
        }
        None => {
            o.push(b'"');
            num(o, e.status);
            o.push(b'"');
        }
    }
    key(o, "resultType", false);
    o.push(b'"');
    o.extend_from_slice(e.result.result_type().as_bytes());
    o.extend_from_slice(b"\",");
    let seq_at = o.len();
    o.extend_from_slice(b"\"statusCode\":");
    num(o, e.status);
    key(o, "time", false);
    o.push(b'"');
    write_rfc3339(o, time);
    o.extend_from_slice(b"\"}");

    let lower = |s: &str| if s.len() <= MAX_FIELD_BYTES { lowercase(s) } else { lowercase(&cap(s)) };
    let cols = Cols {
        time_us,
        principal_id: e.principal.as_ref().map(|p| lower(&p.id)),
        principal_name: e.principal.as_ref().map(|p| lower(&p.display_name)),
        vault: e.resource.vault.as_deref().map(lower),
        secret: e.resource.secret.as_deref().map(lower),
        operation: lower(&e.operation),
        result: e.result.result_type().to_ascii_lowercase(),
    };
    Ok((Encoded { bytes: std::mem::take(o), prev_at, seq_at }, cols))
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

/// `resultSignature`: the HTTP reason phrase (`None` for unusual codes: the code is written).
pub(crate) fn status_text(status: u16) -> Option<&'static str> {
    Some(match status {
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
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canon::canonical;
    use crate::{AuditPrincipal, AuditResource, AuditResult, ProcessFacts};
    use serde_json::{json, Map};
    use std::time::{Duration, UNIX_EPOCH};

    fn opt(s: &Option<String>) -> Value {
        s.as_deref().map_or(Value::Null, |s| Value::String(cap(s)))
    }

    /// The record object as a JSON map: the specification the direct encoder must match
    /// byte for byte once canonicalized (with the chain fields added).
    fn reference_body(e: &AuditEvent, id: &str) -> Map<String, Value> {
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
                        "pid": f.pid, "uid": f.uid, "gid": f.gid,
                        "exe": cap(&f.exe), "cgroup": opt(&f.cgroup),
                    }),
                },
            }),
        };
        let duration = if e.duration_ms.is_finite() && e.duration_ms >= 0.0 {
            json!((e.duration_ms * 1000.0).round() / 1000.0)
        } else {
            Value::Null
        };
        let body = json!({
            "category": "AuditEvent",
            "id": id,
            "time": rfc3339(e.time),
            "operationName": cap(&e.operation),
            "resultType": e.result.result_type(),
            "resultSignature": status_text(e.status).map_or_else(|| e.status.to_string(), str::to_string),
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
        match body {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

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

    /// Encodes `e`, splices the chain fields, and checks the bytes equal the canonical form of
    /// the reference map and the columns equal those `cols` extracts from it.
    fn check(e: &AuditEvent) -> Value {
        let (enc, c) = encode(e).unwrap();
        let mut body = Vec::new();
        enc.write_body(42, GENESIS, &mut body);
        let parsed: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
        let id = parsed["id"].as_str().unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok_and(|u| u.get_version_num() == 4), "{id}");
        let mut reference = reference_body(e, id);
        reference.insert("seq".into(), json!(42));
        reference.insert("prevHash".into(), json!(GENESIS));
        let reference = Value::Object(reference);
        assert_eq!(String::from_utf8(body).unwrap(), String::from_utf8(canonical(&reference)).unwrap());
        assert_eq!(Some(c), cols(&reference));
        parsed
    }

    const GENESIS: &str = crate::canon::GENESIS_HASH;

    #[test]
    fn body_fields_and_columns() {
        let body = check(&event());
        assert_eq!(body["time"], "2024-05-01T12:00:00.123456Z");
        assert_eq!(body["resultType"], "Denied");
        assert_eq!(body["resultSignature"], "Forbidden");
        assert_eq!(body["statusCode"], 403);
        assert_eq!(body["durationMs"], 1.235);
        assert_eq!(body["identity"]["process"]["uid"], 2);
        assert_eq!(body["properties"]["userAgent"].as_str().unwrap().len(), MAX_FIELD_BYTES);
        let (_, c) = encode(&event()).unwrap();
        assert_eq!(c.time_us, 1_714_564_800_123_456);
        assert_eq!(c.principal_id.as_deref(), Some("abc"));
        assert_eq!(c.secret.as_deref(), Some("db"));
        assert_eq!(c.operation, "secretget");
        assert_eq!(c.result, "denied");
    }

    #[test]
    fn the_direct_encoding_is_the_canonical_form_of_every_shape() {
        let mut e = event();
        check(&e);
        e.principal = None;
        e.client_ip = Some("::1".parse().unwrap());
        e.duration_ms = f64::NAN;
        e.status = 599;
        e.result = AuditResult::Failed;
        check(&e);
        let mut e = event();
        let p = e.principal.as_mut().unwrap();
        p.agent = Some("agent-\"1\"\n".into());
        p.display_name = "Zoë \u{1F512} <admin>\\".into();
        p.id = "é".repeat(700);
        p.process = Some(ProcessFacts {
            pid: u32::MAX,
            uid: 0,
            gid: 7,
            exe: "/usr/bin/a\tb".into(),
            cgroup: Some("/system.slice/x.service".into()),
        });
        e.client_ip = None;
        e.duration_ms = 2.0;
        e.status = 200;
        e.result = AuditResult::Allowed;
        e.grant = Some("Key Vault Secrets User at /vaults/v1 (assignment 9)".into());
        e.denial_reason = None;
        e.resource.version = Some("0123abcd".into());
        e.user_agent = None;
        e.credential_hmac = Some(format!("hmac-sha256:{}", "ab".repeat(32)));
        e.request_id = "\u{0}\u{1f}".into();
        check(&e);
        // Written as they are: DEL, a lowercase name; an IPv4 address with 1-3 digit octets.
        e.request_id = "del\u{7f}".into();
        e.resource.secret = Some("already-lowercase".into());
        e.client_ip = Some("10.200.3.255".parse().unwrap());
        check(&e);
    }

    #[test]
    fn raw_credentials_are_refused() {
        let mut e = event();
        e.credential_hmac = Some("my-client-secret".into());
        assert!(matches!(encode(&e), Err(AuditError::InvalidEvent(_))));
        e.credential_hmac = Some(format!("hmac-sha256:{}", "ab".repeat(32)));
        assert!(encode(&e).is_ok());
    }
}
