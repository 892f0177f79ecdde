//! What `weir serve` does with each signal, and the thread that does it. No signal ends
//! weir without a log line: every one whose default action would end the process is
//! caught here and either stops weir cleanly, reloads, or is ignored — each logged.
//!
//! - SIGINT, SIGTERM, SIGQUIT: a clean stop (flush, sync, exit 0), logged with the
//!   signal's name; a second one while stopping is logged and changes nothing.
//! - SIGHUP: reload (`crate::reload` decides what applies live; this module reads the
//!   files, builds the TLS config, publishes it to the cores through
//!   `shell::live::LiveCell`, sets the log filter and logs the plan). A config or a
//!   certificate that does not load is logged with every problem, and the running
//!   settings are kept: a reload never stops weir.
//! - SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGSTKFLT, SIGXCPU,
//!   SIGXFSZ and the real-time signals: logged and ignored (a write past RLIMIT_FSIZE then
//!   fails with EFBIG, which the log reports as an I/O error, instead of killing weir).
//! - SIGPIPE: ignored by the Rust runtime before `main` (a write to a closed socket
//!   fails with EPIPE, handled where it happens); not logged, as it would be per write.
//! - Not catchable or not survivable: SIGKILL and SIGSTOP, and the faults (SIGSEGV,
//!   SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP). They end weir with the
//!   kernel's default; systemd logs the signal and `Restart=always` restarts it, and
//!   recovery keeps every acknowledged record.
//!
//! The signal handler itself only writes a byte to a socket pair (signal-hook's
//! iterator); everything else runs on the `weir-signals` thread, never in a handler and
//! never on a core.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use signal_hook::consts::signal::*;
use signal_hook::iterator::Signals;

use crate::config::{Config, ConfigError, Host};
use crate::reload;
use crate::shell::live::{LiveCell, QuicLive};
use crate::shell::runtime::ListenerSlot;
use crate::shell::shutdown;
use crate::shell::tls::{self, TlsError};

/// What weir does on a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// Stop cleanly, as on SIGTERM.
    Stop,
    /// Reload what can change at run time.
    Reload,
    /// Log it and go on.
    Ignore,
}

const STOP: [i32; 3] = [SIGINT, SIGTERM, SIGQUIT];
const IGNORED: [i32; 10] =
    [SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, libc::SIGPWR, libc::SIGSTKFLT, SIGXCPU, SIGXFSZ];

/// The action for `signal`, or None for a signal weir leaves to its default.
pub fn action(signal: i32) -> Option<SignalAction> {
    if signal == SIGHUP {
        Some(SignalAction::Reload)
    } else if STOP.contains(&signal) {
        Some(SignalAction::Stop)
    } else if IGNORED.contains(&signal) || realtime_signals().contains(&signal) {
        Some(SignalAction::Ignore)
    } else {
        None
    }
}

/// The real-time signals an application may use (the C library keeps the first few).
fn realtime_signals() -> std::ops::RangeInclusive<i32> {
    libc::SIGRTMIN()..=libc::SIGRTMAX()
}

/// Every signal weir catches.
pub fn handled() -> Vec<i32> {
    let mut signals = vec![SIGHUP];
    signals.extend(STOP);
    signals.extend(IGNORED);
    signals.extend(realtime_signals());
    signals
}

/// A signal's name (`SIGHUP`, `SIGRTMIN+3`).
pub fn name(signal: i32) -> String {
    if let Some(name) = signal_hook::low_level::signal_name(signal) {
        return name.to_owned();
    }
    if realtime_signals().contains(&signal) {
        return format!("SIGRTMIN+{}", signal - libc::SIGRTMIN());
    }
    format!("signal {signal}")
}

/// Sets the log filter (a tracing `EnvFilter` directive); made by `main`, which owns
/// the subscriber.
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send>;

/// What a SIGHUP reloads, and from where.
pub struct Reloader {
    /// The config file (`--config`); None for the embedded default.
    path: Option<PathBuf>,
    /// What runs: the config weir started with plus every live change since.
    running: Config,
    listener: Arc<ListenerSlot>,
    set_log_filter: Option<SetLogFilter>,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        running: Config,
        listener: Arc<ListenerSlot>,
        set_log_filter: Option<SetLogFilter>,
    ) -> Reloader {
        Reloader { path, running, listener, set_log_filter }
    }

    fn origin(&self) -> String {
        self.path.as_ref().map_or_else(|| "(embedded default)".to_owned(), |path| path.display().to_string())
    }

    /// Reads and validates the config again and applies what can change live; logs what
    /// it did, what needs a restart, or why nothing was applied.
    pub fn reload(&mut self) {
        if let Err(error) = self.try_reload() {
            tracing::error!(
                config = %self.origin(),
                problems = %error,
                "SIGHUP: reload refused, weir goes on with the running config and certificates"
            );
        }
    }

    /// All or nothing: every fallible step comes before the first change.
    fn try_reload(&mut self) -> Result<(), ReloadError> {
        let Loaded { candidate, listener: loaded } = self.load()?;
        let certificates_changed = loaded
            .as_ref()
            .map(|(cell, live)| cell.load().1.certificates.changed(&live.certificates))
            .unwrap_or_default();
        let plan = reload::plan(&self.running, &candidate, &certificates_changed);
        let environment = std::env::var("WEIR_LOG").ok();
        if let Some(set_log_filter) = &self.set_log_filter {
            set_log_filter(&reload::log_filter(environment.as_deref(), &candidate)).map_err(ReloadError::LogFilter)?;
        }
        let listener_up = loaded.is_some();
        let generation = loaded.map(|(cell, live)| cell.publish(live));
        self.running = reload::merged(&self.running, &candidate);
        report(&self.origin(), &plan, generation, environment.as_deref());
        if !listener_up && candidate.quic.enabled {
            tracing::warn!("SIGHUP: the QUIC listener is not up yet; its certificates and lists were not reloaded");
        }
        Ok(())
    }

    /// The new config, validated, and (with the listener up) its listener settings,
    /// built from the new certificates with the transport read at start.
    fn load(&self) -> Result<Loaded<'_>, ReloadError> {
        let origin = self.origin();
        let candidate = match &self.path {
            Some(path) => Config::load(path),
            None => Ok(Config::embedded()),
        }
        .and_then(|config| config.validate(&Host::probe(), &origin))
        .map_err(ReloadError::Config)?
        .config;
        let loaded = match self.listener.get() {
            Some(cell) if candidate.quic.enabled => {
                let limits = tls::TransportLimits::from_config(&self.running.quic);
                let live = QuicLive::from_config(&candidate.quic, &limits).map_err(|source| {
                    ReloadError::Certificates { directory: candidate.quic.certs_dir.clone(), source }
                })?;
                Some((cell, live))
            }
            _ => None,
        };
        Ok(Loaded { candidate, listener: loaded })
    }
}

/// A reload that loaded: the new config and, with the listener up, its new settings
/// and the cell to publish them in.
struct Loaded<'a> {
    candidate: Config,
    listener: Option<(&'a Arc<LiveCell>, QuicLive)>,
}

/// Why a reload was refused (nothing of it was applied).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    #[error("{}", one_line(.0))]
    Config(ConfigError),
    #[error("quic.certs_dir {}: {source}", directory.display())]
    Certificates { directory: PathBuf, source: TlsError },
    #[error("log_level: {0}")]
    LogFilter(String),
}

/// Logs what a reload applied and what needs a restart.
fn report(origin: &str, plan: &reload::ReloadPlan, generation: Option<u64>, environment: Option<&str>) {
    let applied = if plan.applied.is_empty() { "nothing changed".to_owned() } else { plan.applied.join("; ") };
    tracing::info!(config = %origin, listener_generation = ?generation, applied = %applied, "SIGHUP: reloaded");
    if let Some(level) = environment.filter(|_| plan.applied.iter().any(|change| change.starts_with("log_level"))) {
        tracing::warn!(weir_log = %level, "SIGHUP: log_level changed, but WEIR_LOG is set in the environment and wins");
    }
    if !plan.restart_needed.is_empty() {
        tracing::warn!(
            fields = %plan.restart_needed.join(", "),
            "SIGHUP: these fields changed but are read only at start; they apply after a restart"
        );
    }
}

/// A config error on one line (a journal line per problem list, not per problem).
fn one_line(error: &ConfigError) -> String {
    error.to_string().replace(":\n  ", ": ").replace("\n  ", "; ")
}

/// Starts the `weir-signals` thread: from now on every signal in [`handled`] is caught.
/// It runs until the process exits.
pub fn start(shutdown: Arc<AtomicBool>, mut reloader: Reloader) -> std::io::Result<()> {
    let mut signals = Signals::new(handled())?;
    std::thread::Builder::new().name("weir-signals".to_owned()).spawn(move || {
        for signal in signals.forever() {
            let name = name(signal);
            match action(signal) {
                Some(SignalAction::Stop) if shutdown::is_signalled(&shutdown) => {
                    tracing::warn!(signal = %name, "{name}: already stopping");
                }
                Some(SignalAction::Stop) => {
                    tracing::warn!(signal = %name, "{name}: stopping cleanly (flush, sync, exit 0)");
                    shutdown::signal(&shutdown);
                }
                Some(SignalAction::Reload) => {
                    tracing::info!(signal = %name, "{name}: reloading config and certificates");
                    reloader.reload();
                }
                Some(SignalAction::Ignore) | None => {
                    tracing::warn!(signal = %name, "{name}: ignored (weir gives it no meaning)");
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signal_whose_default_ends_the_process_is_caught_unless_it_cannot_be() {
        // Default action terminate or core dump (signal(7)), minus what cannot be caught
        // or survived (SIGKILL, SIGSTOP, and faults) and SIGPIPE (ignored by Rust's runtime).
        let not_caught = [SIGKILL, SIGSTOP, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP, SIGPIPE];
        for signal in 1..=libc::SIGRTMAX() {
            let ends_by_default =
                !matches!(signal, SIGCHLD | SIGCONT | SIGSTOP | SIGTSTP | SIGTTIN | SIGTTOU | SIGURG | SIGWINCH)
                    && signal_hook::low_level::signal_name(signal).is_some()
                    || realtime_signals().contains(&signal);
            if ends_by_default && !not_caught.contains(&signal) {
                assert!(action(signal).is_some(), "{} is not handled", name(signal));
                assert!(handled().contains(&signal), "{} is not registered", name(signal));
            }
        }
        for signal in not_caught {
            assert_eq!(action(signal), None, "{}", name(signal));
        }
    }

    #[test]
    fn hup_reloads_int_term_quit_stop_and_the_rest_is_ignored() {
        assert_eq!(action(SIGHUP), Some(SignalAction::Reload));
        for signal in [SIGINT, SIGTERM, SIGQUIT] {
            assert_eq!(action(signal), Some(SignalAction::Stop), "{}", name(signal));
        }
        for signal in [SIGUSR1, SIGUSR2, SIGXFSZ, libc::SIGRTMIN() + 3] {
            assert_eq!(action(signal), Some(SignalAction::Ignore), "{}", name(signal));
        }
        assert_eq!(name(SIGHUP), "SIGHUP");
        assert_eq!(name(libc::SIGRTMIN() + 3), "SIGRTMIN+3");
    }
}
