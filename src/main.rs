//! weir's entry point: parse arguments, set up logging, run one command, exit with its
//! code. Everything else lives in the library.

use clap::Parser;

/// Huge requests are reserved, not committed, so a broker response declaring an absurd
/// array cannot abort the appliance (see the type's documentation).
#[global_allocator]
static ALLOCATOR: weir::shell::sys::ReserveLargeAllocator = weir::shell::sys::ReserveLargeAllocator;

fn main() {
    let cli = weir::cli::Cli::parse();
    let set_log_filter = match cli.log_format {
        weir::cli::LogFormat::Text => {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                // A log line that cannot be written (stderr closed: a restarted journald, a
                // reader gone) is dropped; the default reports it with eprintln!, which panics.
                .log_internal_errors(false)
                .with_env_filter(start_filter())
                // `serve` sets the config's log_level at start and again on SIGHUP.
                .with_filter_reloading();
            let setter = filter_setter(subscriber.reload_handle());
            subscriber.init();
            setter
        }
        weir::cli::LogFormat::Json => {
            let subscriber = tracing_subscriber::fmt()
                .json()
                // The event's fields beside timestamp, level and target, not nested.
                .flatten_event(true)
                .with_writer(std::io::stderr)
                .log_internal_errors(false)
                .with_env_filter(start_filter())
                .with_filter_reloading();
            let setter = filter_setter(subscriber.reload_handle());
            subscriber.init();
            setter
        }
    };
    let code = weir::cli::run_with_log_filter(cli, Some(set_log_filter));
    std::process::exit(code);
}

/// WEIR_LOG when set, else `info` until `serve` applies the config's log_level.
fn start_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| "info".into())
}

fn filter_setter<S: 'static>(
    filter: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
) -> weir::shell::signals::SetLogFilter {
    Box::new(move |directive: &str| {
        let parsed = tracing_subscriber::EnvFilter::builder().parse(directive).map_err(|error| error.to_string())?;
        filter.reload(parsed).map_err(|error| error.to_string())
    })
}
