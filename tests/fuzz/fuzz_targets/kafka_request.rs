#![no_main]
//! Fuzz target: `weir::fuzzing::kafka_request` (see src/fuzzing.rs for what it checks).

/// The allocator `weir` runs with, under which a request declaring a huge array fails
/// to decode instead of aborting (see `weir::shell::sys::ReserveLargeAllocator`).
#[global_allocator]
static ALLOCATOR: weir::shell::sys::ReserveLargeAllocator = weir::shell::sys::ReserveLargeAllocator;

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::kafka_request(data));
