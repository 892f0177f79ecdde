#![no_main]
//! Fuzz target: `weir::fuzzing::kafka_response` (see src/fuzzing.rs for what it checks).
libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::kafka_response(data));
