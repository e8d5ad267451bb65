//! Canonical serialization, the sealed-line format and time formatting.
//!
//! A *sealed line* is the canonical JSON body of an object (keys sorted bytewise, no
//! whitespace) with one last member appended: `,"hash":"<hex>"}` for records (the SHA-256 of the
//! body) or `,"signature":"<base64>"}` for checkpoints and the head (the Ed25519 signature of the
//! body). Verification never re-serializes: it strips that suffix from the stored bytes, closes
//! the object again and hashes or verifies exactly those bytes, so it does not depend on how any
//! JSON library formats numbers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The `prevHash` of the first record ever written.
pub(crate) const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Writes `v` as canonical JSON: object keys sorted bytewise, no insignificant whitespace.
pub(crate) fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k.as_str()).expect("serializing a string into memory");
                out.push(b':');
                write_canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(v: &Value, out: &mut Vec<u8>) {
    // Serializing a scalar `Value` into a Vec cannot fail.
    serde_json::to_writer(&mut *out, v).expect("serializing a JSON scalar into memory");
}

/// The canonical body of `v` (which must be an object).
pub(crate) fn canonical(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    write_canonical(v, &mut out);
    out
}

/// Appends `"field":"value"` as the last member of the canonical object `body`.
/// `value` must not need JSON escaping (hex or base64).
pub(crate) fn seal(mut body: Vec<u8>, field: &str, value: &str) -> Vec<u8> {
    debug_assert_eq!(body.last(), Some(&b'}'));
    body.pop();
    if body.len() > 1 {
        body.push(b',');
    }
    body.push(b'"');
    body.extend_from_slice(field.as_bytes());
    body.extend_from_slice(b"\":\"");
    body.extend_from_slice(value.as_bytes());
    body.extend_from_slice(b"\"}");
    body
}

/// Splits a sealed line into the body that was hashed or signed and the sealing value.
/// Returns `None` unless the line ends with `,"field":"<value>"}` where value has only
/// characters of `allowed`.
pub(crate) fn unseal<'a>(line: &'a [u8], field: &str, allowed: fn(u8) -> bool) -> Option<(Vec<u8>, &'a str)> {
    let tail = line.strip_suffix(b"\"}")?;
    let marker = format!(",\"{field}\":\"");
    let pos = tail.windows(marker.len()).rposition(|w| w == marker.as_bytes())?;
    let value = &tail[pos + marker.len()..];
    if value.is_empty() || !value.iter().all(|&b| allowed(b)) {
        return None;
    }
    let mut body = line[..pos].to_vec();
    body.push(b'}');
    Some((body, std::str::from_utf8(value).ok()?))
}

pub(crate) fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

pub(crate) fn is_base64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'='
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// RFC 3339, UTC, microseconds: `2024-05-01T12:00:00.123456Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let mut out = Vec::with_capacity(27);
    write_rfc3339(&mut out, time::OffsetDateTime::from(t));
    String::from_utf8(out).expect("digits and ASCII separators")
}

/// Appends `t` as [`rfc3339`] writes it (years 0 to 9999: callers check), without formatting
/// machinery: it runs once per audit record.
pub(crate) fn write_rfc3339(out: &mut Vec<u8>, t: time::OffsetDateTime) {
    fn digits(out: &mut Vec<u8>, n: u32, width: u32) {
        for i in (0..width).rev() {
            out.push(b'0' + (n / 10u32.pow(i) % 10) as u8);
        }
    }
    digits(out, t.year().clamp(0, 9999) as u32, 4);
    out.push(b'-');
    digits(out, u8::from(t.month()).into(), 2);
    out.push(b'-');
    digits(out, t.day().into(), 2);
    out.push(b'T');
    digits(out, t.hour().into(), 2);
    out.push(b':');
    digits(out, t.minute().into(), 2);
    out.push(b':');
    digits(out, t.second().into(), 2);
    out.push(b'.');
    digits(out, t.microsecond(), 6);
    out.push(b'Z');
}

/// Parses the format written by [`rfc3339`] (and any RFC 3339 UTC time with `Z` and 0–9
/// fractional digits) into microseconds since the Unix epoch.
pub(crate) fn parse_rfc3339_us(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> { std::str::from_utf8(&b[r]).ok()?.parse().ok() };
    let year = i32::try_from(num(0..4)?).ok()?;
    let month = time::Month::try_from(u8::try_from(num(5..7)?).ok()?).ok()?;
    let day = u8::try_from(num(8..10)?).ok()?;
    let (hour, minute, second) = (
        u8::try_from(num(11..13)?).ok()?,
        u8::try_from(num(14..16)?).ok()?,
        u8::try_from(num(17..19)?).ok()?,
    );
    let rest = &s[19..];
    let rest = rest.strip_suffix('Z')?;
    let micros = if rest.is_empty() {
        0
    } else {
        let frac = rest.strip_prefix('.')?;
        if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let padded = format!("{frac:0<9}");
        padded.parse::<u32>().ok()? / 1000
    };
    let date = time::Date::from_calendar_date(year, month, day).ok()?;
    let t = time::Time::from_hms_micro(hour, minute, second, micros).ok()?;
    let nanos = time::PrimitiveDateTime::new(date, t).assume_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1000).ok()
}

/// Microseconds since the Unix epoch (negative before it).
pub(crate) fn unix_us(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

pub(crate) fn from_unix_us(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc3339_round_trips_through_the_parser() {
        for us in [0i64, 1, 999_999, 1_714_564_800_123_456, -1, -1_500_000, 253_402_300_799_999_999] {
            let t = from_unix_us(us);
            let text = rfc3339(t);
            assert_eq!(text.len(), 27, "{text}");
            assert_eq!(parse_rfc3339_us(&text), Some(us), "{text}");
        }
        assert_eq!(rfc3339(from_unix_us(1_714_564_800_123_456)), "2024-05-01T12:00:00.123456Z");
    }

    #[test]
    fn canonical_sorts_keys_recursively() {
        let v = json!({"b": 1, "a": {"z": null, "y": [3, {"d": 1.5, "c": "x\"y"}]}});
        assert_eq!(
            String::from_utf8(canonical(&v)).unwrap(),
            r#"{"a":{"y":[3,{"c":"x\"y","d":1.5}],"z":null},"b":1}"#
        );
    }

    #[test]
    fn seal_and_unseal_round_trip() {
        let body = canonical(&json!({"a": 1}));
        let h = sha256_hex(&body);
        let line = seal(body.clone(), "hash", &h);
        assert_eq!(String::from_utf8(line.clone()).unwrap(), format!(r#"{{"a":1,"hash":"{h}"}}"#));
        let (b, v) = unseal(&line, "hash", is_lower_hex).unwrap();
        assert_eq!(b, body);
        assert_eq!(v, h);
        assert!(unseal(b"{\"a\":1}", "hash", is_lower_hex).is_none());
        assert!(unseal(b"{\"a\":1,\"hash\":\"XYZ\"}", "hash", is_lower_hex).is_none());
    }

    #[test]
    fn time_round_trip() {
        let t = UNIX_EPOCH + Duration::from_micros(1_714_564_800_123_456);
        let s = rfc3339(t);
        assert_eq!(s, "2024-05-01T12:00:00.123456Z");
        assert_eq!(parse_rfc3339_us(&s), Some(1_714_564_800_123_456));
        assert_eq!(parse_rfc3339_us("2024-05-01T12:00:00Z"), Some(1_714_564_800_000_000));
        assert_eq!(parse_rfc3339_us("2024-05-01 12:00:00Z"), None);
        assert_eq!(from_unix_us(unix_us(t)), t);
    }
}
