//! The Key Vault route table (`METHOD path?query`), the secret-name check behind it and the query
//! checks (api-version, paging): whatever the request line, a routed request names a valid secret
//! (or none), its version is one path segment, and an accepted page size is within Key Vault's.
#![no_main]

use coffer_server::fuzzing::{checked_query, routed_secret};
use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (method, target) = match data.iter().position(|&b| b == b' ') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"GET"[..], data),
    };
    let (Ok(method), Ok(target)) = (Method::from_bytes(method), std::str::from_utf8(target)) else { return };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let Ok(Some((name, version))) = routed_secret(&method, path) {
        let name = name.as_str();
        // Key Vault's rule, restated: ^[0-9a-zA-Z-]{1,127}$.
        assert!((1..=127).contains(&name.len()), "name length {}", name.len());
        assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "name {name:?}");
        assert!(path.split('/').any(|segment| segment == name), "the name is a segment of the path");
        if let Some(version) = version {
            assert!(!version.contains('/'), "version {version:?}");
        }
    }
    match checked_query(query) {
        Ok((limit, _after)) => assert!((1..=25).contains(&limit), "page size {limit}"),
        Err(e) => assert_eq!(e.status.as_u16(), 400),
    }
});
