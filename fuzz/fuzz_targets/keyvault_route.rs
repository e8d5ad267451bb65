//! The Key Vault route table (`METHOD path`) and the secret-name check behind it: whatever the
//! path, a routed request names a valid secret (or none), and its version is one path segment.
#![no_main]

use coffer_server::fuzzing::routed_secret;
use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (method, path) = match data.iter().position(|&b| b == b' ') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"GET"[..], data),
    };
    let (Ok(method), Ok(path)) = (Method::from_bytes(method), std::str::from_utf8(path)) else { return };
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
});
