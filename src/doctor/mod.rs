//! `weir doctor`: tells an operator why weir cannot run on this host before it runs, one
//! line per check (ok, warn, fail or skip), what it saw, and for warn and fail the exact
//! fix. `weir serve` runs the engine's checks first and refuses to start on a `fail`
//! (exit code `HOST_NOT_READY`) instead of failing deep inside the runtime.
//!
//! The shape is the project's: `sys` gathers raw facts from the host (thin, the only
//! I/O), `verdict` judges them (pure, unit-tested with hosts this machine is not), and
//! this module runs the two in order and renders the result as text or one JSON
//! document. Checks of a part the config switches off (QUIC, upstream) are reported
//! as `skip` with the reason; they are never faked.

pub mod certs;
pub mod sys;
pub mod upstream;
pub mod verdict;

use std::fmt;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Config, ConfigError, CoreSelection, Host, ValidConfig};
use crate::shell::ceiling::{self, CeilingFile};
use crate::shell::quic_ceiling;
use crate::shell::runtime::exit_code;
use verdict::{DiskCeiling, SpaceFacts};

/// How long `--measure` writes to the data directory's filesystem.
pub const MEASURE_DURATION: Duration = Duration::from_secs(3);
/// The most write timings `--measure` keeps (about 20 s of 4 KiB writes at 50 us).
const MEASURE_SAMPLES_MAX: usize = 1 << 18;

/// A check's verdict. The order is severity: a report's worst status decides its exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Skip,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Skip => "skip",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What the check saw (for `skip`, why it did not run).
    pub saw: String,
    /// The exact fix, for `warn` and `fail`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl fmt::Display for Check {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:<4}  {}: {}", self.status.as_str(), self.name, self.saw)?;
        if let Some(fix) = &self.fix {
            write!(formatter, " -- fix: {fix}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub ok: usize,
    pub warn: usize,
    pub fail: usize,
    pub skip: usize,
}

/// Everything `weir doctor` prints; `--json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub weir_version: &'static str,
    pub config: String,
    pub checks: Vec<Check>,
    pub summary: Summary,
    pub exit_code: i32,
}

impl Report {
    fn new(config: String, checks: Vec<Check>, config_invalid: bool) -> Report {
        let mut summary = Summary::default();
        for check in &checks {
            match check.status {
                Status::Ok => summary.ok += 1,
                Status::Warn => summary.warn += 1,
                Status::Fail => summary.fail += 1,
                Status::Skip => summary.skip += 1,
            }
        }
        let exit_code = if config_invalid {
            exit_code::BAD_CONFIG
        } else if summary.fail > 0 {
            exit_code::PROBLEMS_FOUND
        } else {
            exit_code::CLEAN
        };
        Report { weir_version: env!("CARGO_PKG_VERSION"), config, checks, summary, exit_code }
    }

    pub fn render_text(&self) -> String {
        let mut text = format!("weir doctor {}: config {}\n", self.weir_version, self.config);
        for check in &self.checks {
            text.push_str(&check.to_string());
            text.push('\n');
        }
        let Summary { ok, warn, fail, skip } = self.summary;
        let verdict = match self.exit_code {
            exit_code::CLEAN => "ready to serve",
            exit_code::BAD_CONFIG => "bad config: fix the fields named above",
            _ => "NOT ready: fix the fail lines first",
        };
        text.push_str(&format!("summary: {ok} ok, {warn} warn, {fail} fail, {skip} skip: {verdict}\n"));
        text
    }
}

/// `weir doctor [--config PATH] [--json] [--measure]`: prints the report, returns the
/// exit code (0 nothing fails, 1 something fails, 2 bad config).
pub fn command(config_path: Option<&Path>, json: bool, measure: bool) -> i32 {
    let report = diagnose(config_path, measure);
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("a report serializes"));
    } else {
        print!("{}", report.render_text());
    }
    report.exit_code
}

/// Runs every check against the config at `config_path` (or the embedded default).
pub fn diagnose(config_path: Option<&Path>, measure: bool) -> Report {
    let (loaded, origin) = match config_path {
        Some(path) => (Config::load(path), path.display().to_string()),
        None => (Ok(Config::embedded()), "(embedded default)".to_owned()),
    };
    let config = match loaded {
        Ok(config) => config,
        Err(error) => return Report::new(origin, vec![config_failure(&error)], true),
    };
    let selection = config.engine.cores.clone();
    let valid = match config.validate(&Host::probe(), &origin) {
        Ok(valid) => valid,
        Err(error) => {
            let mut checks = vec![config_failure(&error)];
            if let CoreSelection::List(_) = selection {
                checks.push(verdict::cores(&core_facts(selection)));
            }
            return Report::new(origin, checks, true);
        }
    };
    let mut checks = vec![config_summary(&valid)];
    checks.extend(engine_checks(&valid));
    checks.extend(network_checks(&valid));
    checks.extend(port_checks(&valid));
    checks.extend(certificate_checks(&valid));
    let io_uring_ok = checks.iter().any(|check| check.name == "io_uring" && check.status == Status::Ok);
    let memlock_ok = checks.iter().any(|check| check.name == "memlock" && check.status != Status::Fail);
    checks.extend(upstream::checks(&valid, io_uring_ok && memlock_ok));
    if measure {
        let data_dir_ok =
            checks.iter().filter(|check| check.name.starts_with("data_dir")).all(|check| check.status != Status::Fail);
        let shown = valid.config.data_dir.display().to_string();
        let measured = if io_uring_ok && data_dir_ok {
            measure_disk(&valid)
        } else {
            Err("io_uring or the data directory failed its check".to_owned())
        };
        checks.push(verdict::disk_ceiling(&shown, &measured, valid.config.log.flush_delay_us_max.0));
        checks.push(measure_network(&valid, io_uring_ok));
    }
    Report::new(origin, checks, false)
}

/// Why `weir serve` will not start: the engine's failing checks.
#[derive(Debug, thiserror::Error)]
#[error("{}", render_not_ready(.failures))]
pub struct NotReady {
    pub failures: Vec<Check>,
}

fn render_not_ready(failures: &[Check]) -> String {
    let mut text = format!(
        "host not ready: {} check{} failed before any core started (`weir doctor` shows the full report):",
        failures.len(),
        if failures.len() == 1 { "" } else { "s" }
    );
    for failure in failures {
        text.push_str(&format!("\n  {failure}"));
    }
    text
}

/// The `fail`-level checks `weir serve` runs before any core starts: io_uring, the data
/// directory, locked memory, cores and (with QUIC on) the certificates. The upstream
/// checks are not among them: a cluster out of reach is an operating condition weir
/// rides out (it keeps accepting and ships later), not a reason to refuse to start.
///
/// One fail is logged instead of refused: a private key readable by others
/// (`certificates.key_mode`). Refusing would take down a box whose keys an older weir or
/// an older fix (`chmod 0640`) left open, and `RestartPreventExitStatus=6` keeps it down;
/// the exposure is no worse for serving, so serve says so loudly and runs.
pub fn preflight(valid: &ValidConfig) -> Result<(), NotReady> {
    let mut checks = engine_checks(valid);
    checks.extend(certificate_checks(valid));
    let (logged, refused): (Vec<Check>, Vec<Check>) = checks
        .into_iter()
        .filter(|check| check.status == Status::Fail)
        .partition(|check| check.name == certs::KEY_MODE);
    for check in logged {
        tracing::error!(saw = %check.saw, fix = %check.fix.unwrap_or_default(), "{}: serving anyway", check.name);
    }
    let failures = refused;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(NotReady { failures })
    }
}

fn config_failure(error: &ConfigError) -> Check {
    Check {
        name: "config",
        status: Status::Fail,
        saw: error.to_string().replace(":\n  ", ": ").replace("\n  ", "; "),
        fix: Some("correct each field named; `weir check-config --config PATH` re-checks the file".to_owned()),
    }
}

fn config_summary(valid: &ValidConfig) -> Check {
    let partitions: u32 = valid.config.topics.iter().map(|topic| topic.partitions).sum();
    Check {
        name: "config",
        status: Status::Ok,
        saw: format!(
            "valid: {} cores {:?}, {} topics, {partitions} partitions, data in {}",
            valid.cores.len(),
            valid.cores,
            valid.config.topics.len(),
            valid.config.data_dir.display()
        ),
        fix: None,
    }
}

fn core_facts(selection: CoreSelection) -> verdict::CoreFacts {
    verdict::CoreFacts {
        selection,
        present: sys::cpus("present"),
        online: sys::cpus("online"),
        affinity: sys::process_status().affinity,
    }
}

fn io_uring_facts() -> verdict::IoUringFacts {
    let status = sys::process_status();
    verdict::IoUringFacts {
        setup: sys::io_uring_setup(),
        io_uring_disabled: sys::sysctl_integer("kernel/io_uring_disabled"),
        io_uring_group: sys::sysctl_integer("kernel/io_uring_group"),
        group_ids: status.group_ids.clone(),
        cap_sys_admin: status.cap_sys_admin(),
        seccomp_mode: status.seccomp_mode,
        kernel_release: sys::kernel_release(),
    }
}

/// The checks of what the engine needs today: io_uring, the data directory, locked
/// memory, cores.
fn engine_checks(valid: &ValidConfig) -> Vec<Check> {
    let mut checks = vec![verdict::io_uring(&io_uring_facts())];
    checks.extend(data_dir_checks(valid));
    let status = sys::process_status();
    let memlock = match sys::memlock_limits() {
        Ok((soft_bytes, hard_bytes)) => verdict::memlock(&verdict::MemlockFacts {
            soft_bytes,
            hard_bytes,
            cap_ipc_lock: status.cap_ipc_lock(),
            cores: valid.cores.len() as u64,
            io_memory_bytes: valid.config.engine.io_memory_bytes.0,
        }),
        Err(error) => Check {
            name: "memlock",
            status: Status::Warn,
            saw: format!("getrlimit(RLIMIT_MEMLOCK): {error}"),
            fix: Some("check the process's limits (/proc/self/limits)".to_owned()),
        },
    };
    checks.push(memlock);
    checks.push(verdict::cores(&core_facts(valid.config.engine.cores.clone())));
    checks
}

fn data_dir_checks(valid: &ValidConfig) -> Vec<Check> {
    let path = valid.config.data_dir.as_path();
    let shown = path.display().to_string();
    let (presence, created) = sys::prepare_directory(path);
    let mut checks = vec![verdict::data_dir_presence(&shown, &presence)];
    if !matches!(presence, verdict::DirPresence::Exists | verdict::DirPresence::Creatable) {
        for name in [
            "data_dir.writable",
            "data_dir.filesystem",
            "data_dir.direct_io",
            "data_dir.direct_io_alignment",
            "data_dir.free_space",
        ] {
            checks.push(verdict::skip(name, "the data directory is not usable (see data_dir)"));
        }
        return checks;
    }
    checks.push(verdict::data_dir_owner(&shown, crate::shell::dir_lock::holder(path)));
    let writable = sys::write_scratch(path);
    let can_write = writable.is_ok();
    checks.push(verdict::data_dir_writable(&shown, &writable, sys::mounted_read_only(path)));
    checks.push(verdict::data_dir_filesystem(&shown, sys::filesystem_magic(path).map_err(|error| error.to_string())));
    if can_write {
        checks.push(verdict::direct_io(&shown, &sys::direct_io_round_trip(path)));
    } else {
        checks.push(verdict::skip("data_dir.direct_io", "the data directory is not writable (see data_dir.writable)"));
    }
    if can_write {
        checks.push(verdict::direct_io_alignment(
            &shown,
            &sys::direct_io_alignment(path).map_err(|error| error.to_string()),
        ));
    } else {
        checks.push(verdict::skip("data_dir.direct_io_alignment", "the data directory is not writable"));
    }
    let log = &valid.config.log;
    let space = sys::available_bytes(path).map_err(|error| error.to_string()).map(|available_bytes| SpaceFacts {
        available_bytes,
        used_bytes: sys::used_bytes(path),
        partitions: valid.config.topics.iter().map(|topic| topic.partitions as u64).sum(),
        partition_bytes_max: log.partition_bytes_max.0,
        preallocate_bytes: log.preallocate_bytes.0,
        segment_bytes_max: log.segment_bytes_max.0,
    });
    checks.push(verdict::free_space(&shown, space));
    sys::remove_created(&created);
    checks
}

/// The `[quic]` PKI: skipped when QUIC is off.
fn certificate_checks(valid: &ValidConfig) -> Vec<Check> {
    let quic = &valid.config.quic;
    if !quic.enabled {
        return certs::NAMES
            .iter()
            .map(|name| verdict::skip(name, "quic.enabled = false: no device listener"))
            .collect();
    }
    let now_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| i64::try_from(since.as_secs()).unwrap_or(i64::MAX));
    certs::judge(&certs::read_facts(&quic.certs_dir, quic.generate_dev_certs, now_unix_s))
}

fn network_checks(valid: &ValidConfig) -> Vec<Check> {
    let as_bytes = |value: Option<i64>| value.and_then(|value| u64::try_from(value).ok());
    let quic = &valid.config.quic;
    let (receive_wanted_bytes, send_wanted_bytes) =
        (quic.socket_receive_buffer_bytes.0, quic.socket_send_buffer_bytes.0);
    vec![
        verdict::udp_buffers(&verdict::UdpBufferFacts {
            receive_wanted_bytes,
            send_wanted_bytes,
            rmem_max: as_bytes(sys::sysctl_integer("net/core/rmem_max")),
            wmem_max: as_bytes(sys::sysctl_integer("net/core/wmem_max")),
            granted: sys::udp_buffers_granted(receive_wanted_bytes, send_wanted_bytes)
                .map_err(|error| error.to_string()),
        }),
        verdict::udp_offload(&sys::udp_offload().map_err(|error| error.to_string())),
        verdict::reuseport_cbpf(
            &sys::reuseport_cbpf(valid.cores.len().clamp(2, 1024)).map_err(|error| error.to_string()),
        ),
    ]
}

/// Whether the QUIC (UDP) and admin (TCP) addresses are free, or who holds them: a weir
/// already serving this config (warn), another weir or another program (fail). Not part
/// of `serve`'s preflight: serve finds out by binding.
fn port_checks(valid: &ValidConfig) -> Vec<Check> {
    use verdict::PortProtocol;
    let config = &valid.config;
    let data_dir_holder = crate::shell::dir_lock::holder(&config.data_dir);
    let probe = |name, field, protocol, address: &str| {
        // validate() checked that both addresses parse.
        let facts = match address.parse() {
            Ok(address) => sys::listen_port(protocol, address),
            Err(error) => verdict::PortFacts::Unknown { error: format!("{address:?}: {error}") },
        };
        verdict::listen_port(name, field, protocol, address, &facts, data_dir_holder)
    };
    let quic = if config.quic.enabled {
        probe("ports.quic", "quic.listen", PortProtocol::Udp, &config.quic.listen)
    } else {
        verdict::skip("ports.quic", "QUIC is disabled (quic.enabled = false)")
    };
    vec![quic, probe("ports.admin", "admin.listen", PortProtocol::Tcp, &config.admin.listen)]
}

/// The loopback QUIC ceiling: `shell::quic_ceiling`, the discard server `weir-bench
/// ingest` measures weir against, on the config's cores and QUIC settings, driven by
/// quinn-proto clients for [`MEASURE_DURATION`].
fn measure_network(valid: &ValidConfig, io_uring_ok: bool) -> Check {
    const NAME: &str = "measure.network";
    let load = quic_ceiling::LoopbackLoad {
        connections: 16,
        record_bytes: 256,
        records_per_frame: 256,
        frames_in_flight: 4,
        duration: MEASURE_DURATION,
    };
    let quic = &valid.config.quic;
    let config = format!(
        "quic.connections_max {}, quic.frames_in_flight_per_connection_max {}, quic.stream_window_bytes {}, \
         quic.connection_window_bytes {}",
        quic.connections_max,
        quic.frames_in_flight_per_connection_max,
        quic.stream_window_bytes.0,
        quic.connection_window_bytes.0
    );
    let measured = if io_uring_ok {
        quic_ceiling::measure_loopback(valid, load).map_err(|error| error.to_string())
    } else {
        Err("io_uring failed its check".to_owned())
    };
    match measured {
        Ok(ceiling) => Check {
            name: NAME,
            status: Status::Ok,
            saw: format!(
                "loopback QUIC ceiling (weir's TLS and quinn-proto driver on {} core(s), frames answered unchecked, \
                 nothing stored): {:.0} records/s of {} B ({:.1} MB/s) over {} connections, {} records per frame, {} \
                 frames in flight each; round trip p50 {} us, p99 {} us; {config}",
                valid.cores.len(),
                ceiling.records_per_s,
                ceiling.record_bytes,
                ceiling.mb_per_s,
                ceiling.connections,
                ceiling.records_per_frame,
                load.frames_in_flight,
                ceiling.round_trip_us_p50,
                ceiling.round_trip_us_p99
            ),
            fix: None,
        },
        Err(error) => Check {
            name: NAME,
            status: Status::Warn,
            saw: format!("could not measure the loopback QUIC ceiling: {error}"),
            fix: Some("fix the failing io_uring and UDP checks above first".to_owned()),
        },
    }
}

/// The raw disk ceiling on the data directory's filesystem: `shell::ceiling`, the same
/// code weir-bench measures against, writing `log.flush_bytes_max` at a time (weir's
/// largest group commit) for [`MEASURE_DURATION`].
fn measure_disk(valid: &ValidConfig) -> Result<DiskCeiling, String> {
    let directory = valid.config.data_dir.clone();
    let (_, created) = sys::prepare_directory(&directory);
    let write_bytes = valid.config.log.flush_bytes_max.0 as usize;
    let preallocate_bytes = valid.config.log.preallocate_bytes.0;
    let io_memory_bytes = valid.config.engine.io_memory_bytes.0 as usize;
    let task_directory = directory.clone();
    let spawned = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("weir-doctor-measure")
        .io_memory(io_memory_bytes)
        .spawn(move || async move {
            let path = task_directory.join(format!(".weir-doctor-ceiling-{}", std::process::id()));
            let file = Rc::new(CeilingFile::create(&path).await.map_err(|error| error.to_string())?);
            let mut fsync_ns = Vec::new();
            let mut write_and_fsync_ns = Vec::new();
            let started = Instant::now();
            let totals = ceiling::write_and_sync_until(
                file.clone(),
                write_bytes,
                preallocate_bytes,
                started + MEASURE_DURATION,
                |sample| {
                    if fsync_ns.len() < MEASURE_SAMPLES_MAX {
                        fsync_ns.push(sample.fsync_ns);
                        write_and_fsync_ns.push(sample.write_and_fsync_ns);
                    }
                },
            )
            .await;
            let elapsed = started.elapsed();
            let removed = match Rc::try_unwrap(file) {
                Ok(file) => file.remove().await.map_err(|error| error.to_string()),
                Err(_) => Err("the ceiling file is still shared".to_owned()),
            };
            let totals = totals.map_err(|error| error.to_string())?;
            removed?;
            fsync_ns.sort_unstable();
            write_and_fsync_ns.sort_unstable();
            Ok::<_, String>(DiskCeiling {
                write_bytes: write_bytes as u64,
                writes: totals.writes,
                megabytes_per_s: totals.bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6,
                fsync_us_p50: verdict::percentile(&fsync_ns, 50) / 1000,
                fsync_us_p99: verdict::percentile(&fsync_ns, 99) / 1000,
                write_and_fsync_us_p50: verdict::percentile(&write_and_fsync_ns, 50) / 1000,
            })
        });
    let outcome = match spawned {
        Ok(handle) => {
            handle.join().map_err(|error| format!("measuring executor failed: {error}")).and_then(|result| result)
        }
        Err(error) => Err(format!("cannot start a glommio executor: {error}")),
    };
    sys::remove_created(&created);
    outcome
}
