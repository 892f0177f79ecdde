#![no_main]
//! Fuzz target: `weir::fuzzing::record_batch` (see src/fuzzing.rs for what it checks).
libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::record_batch(data));
