//! The token endpoint's form decoding: any body decodes, and what it decodes to encodes back to
//! a body that decodes the same.
#![no_main]

use coffer_server::fuzzing::parse_form;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let form = parse_form(data);
    let mut again = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &form {
        again.append_pair(k, v);
    }
    let reparsed = parse_form(again.finish().as_bytes());
    let plain = |f: &[(String, zeroize::Zeroizing<String>)]| -> Vec<(String, String)> {
        f.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()
    };
    assert_eq!(plain(&form), plain(&reparsed));
});
