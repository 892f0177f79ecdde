#![no_main]
//! Fuzz target: `weir::fuzzing::device_stream` (see src/fuzzing.rs for what it checks).
libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::device_stream(data));
