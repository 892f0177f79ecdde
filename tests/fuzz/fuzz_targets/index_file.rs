#![no_main]
//! Fuzz target: `weir::fuzzing::index_file` (see src/fuzzing.rs for what it checks).
libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::index_file(data));
