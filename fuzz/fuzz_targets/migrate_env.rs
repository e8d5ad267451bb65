//! `coffer migrate`'s `.env` and stdin readers. Whatever the text: every key found is a valid
//! variable name, and the lines a cleaned copy would rewrite exist in the text.
#![no_main]

use coffer_cli::migrate_parse::{parse_env, parse_stdin, valid_key, Edit, Item};
use libfuzzer_sys::fuzz_target;

fn check(items: &[Item], lines: usize) {
    for item in items {
        if let Some(key) = &item.key {
            assert!(valid_key(key), "key {key:?}");
        }
        if let Edit::EnvLines { first, last, key, .. } = &item.edit {
            assert!(first <= last && *last < lines.max(1), "lines {first}..={last} of {lines}");
            assert_eq!(Some(key), item.key.as_ref());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = text.split('\n').count();
    check(&parse_env(text), lines);
    let from_stdin = parse_stdin(text);
    check(&from_stdin, lines);
    assert!(from_stdin.iter().all(|item| matches!(item.edit, Edit::None)), "stdin has no file to clean");
});
