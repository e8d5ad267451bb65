//! The backup reader behind restore. Any text: refused or read, never a panic. Any payload
//! sealed under the backup key: if it reads, backing it up again reads back the same.
#![no_main]

use std::sync::OnceLock;

use coffer_core::crypto::Key;
use coffer_server::fuzzing::backup_fuzzing::{open, seal_raw};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static Key {
    static KEY: OnceLock<Key> = OnceLock::new();
    KEY.get_or_init(Key::generate)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = open(key(), text);
    }
    if let Ok((name, json, again)) = open(key(), &seal_raw(key(), data)) {
        let (name2, json2, _) = open(key(), &again).expect("a backup written by the server reads back");
        assert_eq!((name.as_str(), &json), (name2.as_str(), &json2));
    }
});
