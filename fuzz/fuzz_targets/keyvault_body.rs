//! The JSON bodies of set, update and restore, parsed as the handlers parse them. A refusal is
//! a 400 whose message gives a position only: a value must never come back in an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for outcome in coffer_server::fuzzing::parse_bodies(data) {
        if let Err(e) = outcome {
            assert_eq!(e.status.as_u16(), 400);
            let detail = e.message.strip_prefix("The request body is not valid: malformed JSON at line ");
            let detail = detail.unwrap_or_else(|| panic!("unexpected message {:?}", e.message));
            let (line, column) = detail.split_once(" column ").expect("line and column");
            assert!(line.bytes().all(|b| b.is_ascii_digit()) && column.bytes().all(|b| b.is_ascii_digit()));
        }
    }
});
