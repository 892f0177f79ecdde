//! weir's entry point: parse arguments, set up logging, run one command, exit with its
//! code. Everything else lives in the library.

use clap::Parser;

/// Huge requests are reserved, not committed, so a broker response declaring an absurd
/// array cannot abort the appliance (see the type's documentation).
#[global_allocator]
static ALLOCATOR: weir::shell::sys::ReserveLargeAllocator = weir::shell::sys::ReserveLargeAllocator;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (stderr closed: a restarted journald, a
        // reader gone) is dropped; the default reports it with eprintln!, which panics.
        .log_internal_errors(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let code = weir::cli::run(weir::cli::Cli::parse());
    std::process::exit(code);
}
