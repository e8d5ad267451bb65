//! `coffer migrate`'s docker-compose reader. Whatever the YAML: every key found is a valid
//! variable name, and every region a cleaned copy would replace lies inside the text, on
//! character boundaries (the cleaner slices the text there).
#![no_main]

use coffer_cli::migrate_parse::{parse_compose, valid_key, Edit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok((items, _notes)) = parse_compose(text) else { return };
    for item in &items {
        if let Some(key) = &item.key {
            assert!(valid_key(key), "key {key:?}");
        }
        if let Edit::Yaml { start, end, .. } = item.edit {
            assert!(start <= end && end <= text.len(), "region {start}..{end} of {}", text.len());
            assert!(text.is_char_boundary(start) && text.is_char_boundary(end), "region {start}..{end}");
        }
    }
});
