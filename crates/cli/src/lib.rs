//! The parts of the `coffer` binary that are pure functions of untrusted input, as a library so
//! the fuzz targets in `fuzz/` call exactly the code the binary runs. Everything else of the
//! binary lives in its own modules (`main.rs`).

pub mod migrate_parse;
