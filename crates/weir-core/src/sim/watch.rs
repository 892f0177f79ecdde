//! Seeded fleet simulation of the stream watch (`core::watch`): devices with their own
//! periods (0.5 to 10 s) and ±30 % jitter write through a virtual clock; some go wrong
//! at a random moment — silenced, restarted (sequences from below), rate-changed (8x),
//! clock-skewed (minutes ahead) — and each must be alerted within the bound
//! docs/WATCH.md states, with exactly its own kind, while every healthy device raises
//! nothing. A steady fleet runs a simulated day without a single alert.
//!
//! The watch is driven as `weir serve` drives it: one `handle_records` per frame, one
//! `handle_tick` per second (`shell::watch::TICK_INTERVAL`); the shell's flush delay
//! (`shell::watch::FLUSH_INTERVAL`, 100 ms) is added to every arrival.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::SimRandom;
use crate::watch::{AlertEvent, AlertKind, StreamKey, Watch, WatchConfig, RATE_WINDOWS_TO_OPEN, SKEW_RECORDS_TO_OPEN};

/// 2026-12-07T00:00:00Z in ms: the wall clock of the simulated devices.
const WALL_START_MS: i64 = 1_796_601_600_000;
/// The shell's tick and the delay its flush adds (shell::watch).
const TICK: Duration = Duration::from_secs(1);
const FLUSH_DELAY: Duration = Duration::from_millis(100);
/// The jitter of every device's period, either way.
const JITTER: f64 = 0.3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Silenced,
    Restarted,
    RateUp,
    Skewed,
}

impl Fault {
    const ALL: [Fault; 4] = [Fault::Silenced, Fault::Restarted, Fault::RateUp, Fault::Skewed];

    fn kind(self) -> AlertKind {
        match self {
            Fault::Silenced => AlertKind::Silence,
            Fault::Restarted => AlertKind::Restart,
            Fault::RateUp => AlertKind::RateChange,
            Fault::Skewed => AlertKind::ClockSkew,
        }
    }
}

/// How much faster a rate-changed device writes.
const RATE_UP_FACTOR: u32 = 8;
/// How far ahead a skewed device's clock runs.
const SKEW_AHEAD: Duration = Duration::from_secs(300);

struct SimDevice {
    key: StreamKey,
    period: Duration,
    sequence: u64,
    sending: bool,
    clock_ahead_ms: i64,
    fault: Option<(Fault, Duration)>,
    /// The last record before the fault (for the silence bound).
    last_sent: Duration,
}

/// The longest a fault may take to be alerted, from when it happened (docs/WATCH.md).
pub(crate) fn detection_bound(config: &WatchConfig, fault: Fault, period: Duration) -> Duration {
    // The learned mean interval is at most the period plus its jitter.
    let interval_max = period.mul_f64(1.0 + JITTER);
    let late = TICK + FLUSH_DELAY;
    match fault {
        Fault::Silenced => {
            interval_max.mul_f64(config.silence_factor).clamp(config.silence_min, config.silence_max) + late
        }
        Fault::Restarted => interval_max + late,
        Fault::RateUp => config.rate_window * (RATE_WINDOWS_TO_OPEN + 1) + late,
        Fault::Skewed => interval_max * SKEW_RECORDS_TO_OPEN + late,
    }
}

/// What a run saw: per device, its events; and the faults it injected.
pub(crate) struct WatchRun {
    pub(crate) events: Vec<AlertEvent>,
    pub(crate) base: Instant,
}

/// Runs `devices` devices for `length`, the faults of `plan` (device index, fault, when)
/// injected; returns every event.
fn run(
    config: WatchConfig,
    seed: u64,
    devices: usize,
    length: Duration,
    plan: &[(usize, Fault, Duration)],
) -> (WatchRun, Vec<SimDevice>) {
    let mut random = SimRandom::new(seed);
    let mut watch = Watch::new(config);
    let base = Instant::now();
    let mut fleet: Vec<SimDevice> = (0..devices)
        .map(|index| SimDevice {
            key: StreamKey { device: format!("dev-{index}"), topic: "telemetry".into() },
            period: Duration::from_millis(random.range(500, 10_000)),
            sequence: 1_000_000 + random.range(0, 1_000_000),
            sending: true,
            clock_ahead_ms: 0,
            fault: None,
            last_sent: Duration::ZERO,
        })
        .collect();
    for &(index, fault, at) in plan {
        fleet[index].fault = Some((fault, at));
    }
    // (when, device) of every next send, earliest first.
    let mut sends: BinaryHeap<Reverse<(Duration, usize)>> = fleet
        .iter()
        .enumerate()
        .map(|(index, device)| Reverse((device.period.mul_f64(random.range(0, 1000) as f64 / 1000.0), index)))
        .collect();
    let mut events = Vec::new();
    let mut next_tick = TICK;
    while next_tick <= length {
        let Reverse((at, index)) = *sends.peek().expect("every device has a next send");
        if at >= next_tick {
            watch.handle_tick(base + next_tick);
            watch.check_invariants();
            events.extend(std::iter::from_fn(|| watch.poll_event()));
            next_tick += TICK;
            continue;
        }
        sends.pop();
        let device = &mut fleet[index];
        let mut period = device.period;
        if let Some((fault, fault_at)) = device.fault {
            if at >= fault_at {
                match fault {
                    Fault::Silenced => device.sending = false,
                    Fault::Restarted if device.sequence > 1_000 => device.sequence = random.range(0, 100),
                    Fault::Restarted => {}
                    Fault::RateUp => period /= RATE_UP_FACTOR,
                    Fault::Skewed => device.clock_ahead_ms = SKEW_AHEAD.as_millis() as i64,
                }
            }
        }
        if device.sending {
            let arrival = at + FLUSH_DELAY;
            let arrival_ms = WALL_START_MS + at.as_millis() as i64;
            watch.handle_records(
                base + arrival,
                &device.key,
                device.sequence,
                1,
                arrival_ms + device.clock_ahead_ms,
                arrival_ms,
            );
            device.sequence += 1;
            device.last_sent = at;
            let spread = 1.0 + JITTER * (2.0 * random.range(0, 1000) as f64 / 1000.0 - 1.0);
            sends.push(Reverse((at + period.mul_f64(spread), index)));
        } else {
            sends.push(Reverse((length + TICK, index))); // never again
        }
    }
    (WatchRun { events, base }, fleet)
}

/// One seed: 40 devices, 4 of each fault at a random moment after they were learned;
/// checks every fault was alerted within its bound with its own kind, and nothing else.
pub(crate) fn simulate_faults(seed: u64) -> usize {
    let config = WatchConfig::default();
    let mut random = SimRandom::new(seed ^ 0xfa17);
    let devices = 40;
    // Learned: learn_records intervals and RATE_LEARN_WINDOWS windows, with margin.
    let learned = config.rate_window * (crate::watch::RATE_LEARN_WINDOWS + 2);
    let mut plan = Vec::new();
    for (slot, fault) in Fault::ALL.iter().cycle().take(16).enumerate() {
        let at = learned + Duration::from_secs(random.range(0, 120));
        plan.push((slot * 2, *fault, at)); // every other device stays healthy
    }
    let length = learned + Duration::from_secs(120) + config.rate_window * 4 + Duration::from_secs(60);
    let (run, fleet) = run(config, seed, devices, length, &plan);
    let mut checked = 0;
    for (index, device) in fleet.iter().enumerate() {
        let mine: Vec<&AlertEvent> = run.events.iter().filter(|event| event.stream == device.key).collect();
        let Some((fault, fault_at)) = device.fault else {
            assert!(mine.is_empty(), "seed {seed}: healthy dev-{index} (period {:?}) alerted: {mine:?}", device.period);
            continue;
        };
        let opened = mine.iter().find(|event| event.open).unwrap_or_else(|| {
            panic!("seed {seed}: dev-{index} {fault:?} at {fault_at:?} (period {:?}) never alerted", device.period)
        });
        assert!(
            mine.iter().all(|event| event.kind == fault.kind()),
            "seed {seed}: dev-{index} {fault:?} alerted other kinds: {mine:?}"
        );
        // From the fault (for silence: the last record before it) to the alert.
        let from = if fault == Fault::Silenced { device.last_sent + FLUSH_DELAY } else { fault_at };
        let took = (opened.at - run.base).saturating_sub(from);
        let bound = detection_bound(&config, fault, device.period);
        assert!(
            took <= bound,
            "seed {seed}: dev-{index} {fault:?} (period {:?}) alerted after {took:?}, bound {bound:?}",
            device.period
        );
        checked += 1;
    }
    checked
}

/// A steady fleet of `devices` for a simulated day: returns every event (none expected).
pub(crate) fn simulate_steady_day(seed: u64, devices: usize) -> Vec<AlertEvent> {
    run(WatchConfig::default(), seed, devices, Duration::from_secs(24 * 3600), &[]).0.events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds(default_count: u64) -> Vec<u64> {
        let first = super::super::env_number("WEIR_SIM_FIRST_SEED").unwrap_or(1);
        match (super::super::env_number("WEIR_SIM_SEED"), super::super::env_number("WEIR_SIM_SEEDS")) {
            (Some(seed), _) => vec![seed],
            (None, Some(count)) => (first..first + count).collect(),
            (None, None) => (first..first + default_count).collect(),
        }
    }

    #[test]
    fn simulation_watch_silenced_restarted_rate_changed_and_skewed_devices_are_alerted_within_the_bound() {
        let seeds = seeds(if cfg!(debug_assertions) { 5 } else { 50 });
        let mut checked = 0;
        for seed in &seeds {
            checked += simulate_faults(*seed);
        }
        assert_eq!(checked, seeds.len() * 16);
    }

    #[test]
    fn simulation_watch_a_steady_fleet_with_thirty_percent_jitter_raises_no_alert_over_a_day() {
        let seeds = seeds(if cfg!(debug_assertions) { 1 } else { 3 });
        for seed in seeds {
            let events = simulate_steady_day(seed, 200);
            assert!(events.is_empty(), "seed {seed}: {} alerts, the first {:?}", events.len(), events.first());
        }
    }
}
