#![no_main]
//! Fuzz target: `weir::fuzzing::recovery_scan` (see src/fuzzing.rs for what it checks).
libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::recovery_scan(data));
