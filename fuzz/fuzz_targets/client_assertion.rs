//! A client assertion's header and issuer, read before its signature is checked. Whatever the
//! token, reading it does not panic, and only an asymmetric algorithm gets through.
//!
//! Input: `0` then a token as text; or any other first byte, then header JSON, `0xff`, claims
//! JSON: encoded as a JWT here, so the fuzzer reaches the JSON readers behind the base64.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use coffer_server::fuzzing::peek_assertion;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let assertion = if mode == 0 {
        let Ok(text) = std::str::from_utf8(rest) else { return };
        text.to_owned()
    } else {
        let (header, claims) = match rest.iter().position(|&b| b == 0xff) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &b"{}"[..]),
        };
        format!("{}.{}.c2ln", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims))
    };
    if let Ok((header, _issuer)) = peek_assertion(&assertion) {
        let alg = format!("{:?}", header.alg);
        assert!(["RS256", "RS384", "RS512", "PS256", "ES256", "ES384"].contains(&alg.as_str()), "{alg}");
    }
});
