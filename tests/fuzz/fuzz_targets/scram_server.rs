#![no_main]
//! Fuzz target: `weir::fuzzing::scram_server` (see src/fuzzing.rs for what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::scram_server(data));
