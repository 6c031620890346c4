//! Property-based fuzz targets on stable Rust, one module per input the
//! relay reads from the network: generated inputs (random bytes, and
//! well-formed inputs mutated), a property each must keep (no panic, and
//! what a parser accepts is what its rules allow), failures shrunk to a
//! minimal input by proptest.
//!
//! A short run is part of `cargo test`; `FUZZ_CASES` raises the number of
//! inputs per target for a long run. See docs/fuzzing.md, which also says
//! how to add a target.

mod support;

mod frame;
mod key_upload;
mod upgrade;
