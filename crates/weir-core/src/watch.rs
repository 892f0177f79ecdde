//! Stream watch: per (device, topic) stream, constant state that notices when a stream
//! goes wrong — silent, restarted, its rate jumped or collapsed, its clock skewed, its
//! frames refused in a storm — and opens and closes alerts with hysteresis.
//!
//! Sans-IO like the rest of the core: the shell reports what happened
//! (`handle_records`, `handle_refusal`) and lets time pass (`handle_tick`), with `now`
//! (monotonic) and the arrival's wall-clock time as arguments; alert events come out
//! through `poll_event`. Nothing here reads a clock.
//!
//! Each rule, its thresholds and its hysteresis (docs/WATCH.md says the same for the
//! operator):
//! - **silence**: no record for `silence_factor` x the learned mean interval, clamped to
//!   `silence_min ..= silence_max` (`silence_max` alone until `learn_records` intervals
//!   were seen). Closes on the stream's next record.
//! - **rate change**: the records of a `rate_window` above `rate_factor` x the learned
//!   rate per window, or below it divided by `rate_factor`, in `RATE_WINDOWS_TO_OPEN`
//!   windows in a row; closes after as many windows back within the band. The baseline
//!   does not learn while the alert is open, and a silent stream's windows are not
//!   judged (its silence alert says it).
//! - **restart**: a sequence more than `restart_tolerance` below the last one stored (the
//!   device started counting again; a resend of a frame refused earlier, Backpressure
//!   say, may come after later ones were stored, by at most what a device may have in
//!   flight: `quic.connections_per_device_max` x `quic.frames_in_flight_per_connection_max`).
//!   Closes after `restart_hold` without another restart; evidence counts restarts.
//! - **clock skew**: a record's timestamp off its arrival by more than `skew_max`, in
//!   `SKEW_RECORDS_TO_OPEN` frames in a row; closes after as many within half of it.
//! - **refusal storm**: more than `refusals_per_minute_max` refused frames in a minute;
//!   closes after a whole minute with at most half that many.
//!
//! Limits: at most `streams_max` streams are tracked; past it the stream silent the
//! longest is forgotten (its open alerts closed, so nothing stays open unseen). A
//! stream costs `STREAM_BYTES_APPROX` bytes plus its key; pending events are bounded by
//! `EVENTS_PENDING_MAX` (the oldest are dropped and counted).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Windows of an abnormal rate before the alert opens (and normal ones before it closes).
pub const RATE_WINDOWS_TO_OPEN: u32 = 2;
/// Consecutive skewed frames before a clock-skew alert opens (and in-bound ones before
/// it closes).
pub const SKEW_RECORDS_TO_OPEN: u32 = 3;
/// Windows of the learned rate before the rate rule judges a stream.
pub const RATE_LEARN_WINDOWS: u32 = 3;
/// Weight of the newest sample in the learned mean and variance.
const EWMA_ALPHA: f64 = 0.1;
/// Alert events waiting for `poll_event` at most.
pub const EVENTS_PENDING_MAX: usize = 65_536;
/// Roughly what one tracked stream costs in memory, its key aside (the state below,
/// the map entry, the last-seen index entry).
pub const STREAM_BYTES_APPROX: usize = 512;
/// The refusal-storm rule counts refusals per minute.
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

/// The watch's thresholds (`[watch]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WatchConfig {
    pub streams_max: usize,
    pub silence_factor: f64,
    pub silence_min: Duration,
    pub silence_max: Duration,
    /// Intervals seen before the learned interval is trusted.
    pub learn_records: u32,
    pub rate_factor: f64,
    pub rate_window: Duration,
    pub skew_max: Duration,
    pub restart_hold: Duration,
    /// How far below the last stored sequence a frame may be without being a restart.
    pub restart_tolerance: u64,
    pub refusals_per_minute_max: u32,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            streams_max: 100_000,
            silence_factor: 5.0,
            silence_min: Duration::from_secs(10),
            silence_max: Duration::from_secs(300),
            learn_records: 10,
            rate_factor: 4.0,
            rate_window: Duration::from_secs(60),
            skew_max: Duration::from_secs(60),
            restart_hold: Duration::from_secs(600),
            restart_tolerance: 256,
            refusals_per_minute_max: 60,
        }
    }
}

/// What went wrong with a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AlertKind {
    Silence,
    RateChange,
    Restart,
    ClockSkew,
    RefusalStorm,
}

impl AlertKind {
    pub const ALL: [AlertKind; 5] =
        [AlertKind::Silence, AlertKind::RateChange, AlertKind::Restart, AlertKind::ClockSkew, AlertKind::RefusalStorm];

    /// snake_case, as in metrics labels and JSON.
    pub fn name(self) -> &'static str {
        match self {
            AlertKind::Silence => "silence",
            AlertKind::RateChange => "rate_change",
            AlertKind::Restart => "restart",
            AlertKind::ClockSkew => "clock_skew",
            AlertKind::RefusalStorm => "refusal_storm",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A stream: the device and the topic it writes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    pub device: String,
    pub topic: String,
}

/// An alert opened or closed, with what showed it.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEvent {
    pub stream: StreamKey,
    pub kind: AlertKind,
    pub open: bool,
    pub at: Instant,
    /// Human-readable evidence: the figures the rule compared.
    pub evidence: String,
}

/// An alert that is open now.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAlert {
    pub stream: StreamKey,
    pub kind: AlertKind,
    pub since: Instant,
    pub evidence: String,
}

/// Mean and variance learned with exponential weights.
#[derive(Debug, Clone, Copy, Default)]
struct Learned {
    mean: f64,
    variance: f64,
    samples: u32,
}

impl Learned {
    fn add(&mut self, sample: f64) {
        if self.samples == 0 {
            self.mean = sample;
            self.variance = 0.0;
        } else {
            let difference = sample - self.mean;
            self.mean += EWMA_ALPHA * difference;
            self.variance = (1.0 - EWMA_ALPHA) * (self.variance + EWMA_ALPHA * difference * difference);
        }
        self.samples = self.samples.saturating_add(1);
    }
}

#[derive(Debug)]
struct Stream {
    id: u64,
    last_seen: Instant,
    last_sequence: Option<u64>,
    /// A record was stored (a stream seen only through refusals is never silent).
    records_seen: bool,
    interval_s: Learned,
    rate: Learned,
    window_start: Instant,
    window_records: u64,
    rate_strikes: u32,
    skew_strikes: u32,
    last_restart: Option<Instant>,
    restarts: u64,
    refusal_window_start: Instant,
    refusals_in_window: u32,
    /// `AlertKind::bit`s of the open alerts.
    open: u8,
    since: [Option<Instant>; 5],
    evidence: [String; 5],
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchCounters {
    pub opened: [u64; 5],
    pub closed: [u64; 5],
    pub streams_evicted: u64,
    pub events_dropped: u64,
}

/// The watch over every stream of one appliance (or one core).
#[derive(Debug)]
pub struct Watch {
    config: WatchConfig,
    streams: HashMap<StreamKey, Stream>,
    /// (last seen, stream id) of every stream: the oldest-silent first.
    by_last_seen: BTreeSet<(Instant, u64)>,
    keys_by_id: HashMap<u64, StreamKey>,
    next_id: u64,
    events: VecDeque<AlertEvent>,
    counters: WatchCounters,
}

impl Watch {
    pub fn new(config: WatchConfig) -> Watch {
        assert!(config.streams_max > 0, "the watch tracks at least one stream");
        assert!(config.silence_factor > 1.0 && config.rate_factor > 1.0);
        assert!(config.silence_min <= config.silence_max);
        assert!(!config.rate_window.is_zero());
        Watch {
            config,
            streams: HashMap::new(),
            by_last_seen: BTreeSet::new(),
            keys_by_id: HashMap::new(),
            next_id: 0,
            events: VecDeque::new(),
            counters: WatchCounters::default(),
        }
    }

    /// A frame of `records` records from `device` to `topic` was stored: the frame's
    /// sequence (one per frame, as devices number them), the latest record timestamp in
    /// it (ms since the epoch) and the wall time it arrived (ms since the epoch).
    pub fn handle_records(
        &mut self,
        now: Instant,
        stream: &StreamKey,
        sequence: u64,
        records: u64,
        max_timestamp_ms: i64,
        arrival_ms: i64,
    ) {
        let config = self.config;
        let state = self.stream(now, stream);
        // Silence ends with a record.
        let mut changes: Vec<Change> = Vec::new();
        if state.open & AlertKind::Silence.bit() != 0 {
            let silent_s = now.saturating_duration_since(state.last_seen).as_secs_f64();
            changes.push((AlertKind::Silence, false, format!("a record after {silent_s:.1} s")));
        }
        // The interval between frames, learned.
        if state.last_sequence.is_some() {
            let interval = now.saturating_duration_since(state.last_seen).as_secs_f64();
            state.interval_s.add(interval);
        }
        // Restart: the device counts from below again. A late resend leaves the last
        // sequence where it was; a restart starts it anew.
        let restarted = judge_restart(&config, state, now, sequence, &mut changes);
        if restarted || state.last_sequence.is_none_or(|last| sequence > last) {
            state.last_sequence = Some(sequence);
        }
        state.records_seen = true;
        // Clock skew, with a band: open beyond skew_max, close within half of it.
        let skew_ms = max_timestamp_ms.saturating_sub(arrival_ms);
        let skew = Duration::from_millis(skew_ms.unsigned_abs());
        let skew_open = state.open & AlertKind::ClockSkew.bit() != 0;
        let judged_bad = if skew_open { skew > config.skew_max / 2 } else { skew > config.skew_max };
        if judged_bad != skew_open {
            state.skew_strikes += 1;
            if state.skew_strikes >= SKEW_RECORDS_TO_OPEN {
                state.skew_strikes = 0;
                changes.push((AlertKind::ClockSkew, !skew_open, format!("record time {skew_ms:+} ms off arrival")));
            }
        } else {
            state.skew_strikes = 0;
        }
        // The records count in the rate window holding `now`.
        roll_windows(&config, state, now, &mut changes);
        state.window_records += records;
        let previous_seen = std::mem::replace(&mut state.last_seen, now);
        let id = state.id;
        self.by_last_seen.remove(&(previous_seen, id));
        self.by_last_seen.insert((now, id));
        for (kind, open, evidence) in changes {
            self.change(now, stream, kind, open, evidence);
        }
    }

    /// A frame of `stream` was refused (any error answer), with its sequence when it
    /// was read: a device that lost its counter is refused (`SequenceReused`,
    /// `SequenceTooOld`) as often as stored, and its sequence shows the restart either way.
    pub fn handle_refusal(&mut self, now: Instant, stream: &StreamKey, sequence: Option<u64>) {
        let config = self.config;
        let limit = config.refusals_per_minute_max;
        let state = self.stream(now, stream);
        let mut changes: Vec<Change> = Vec::new();
        if let Some(sequence) = sequence {
            if judge_restart(&config, state, now, sequence, &mut changes) {
                state.last_sequence = Some(sequence);
            }
        }
        for (kind, open, evidence) in changes {
            self.change(now, stream, kind, open, evidence);
        }
        let state = self.streams.get_mut(stream).expect("tracked above");
        if now.saturating_duration_since(state.refusal_window_start) >= REFUSAL_WINDOW {
            state.refusal_window_start = now;
            state.refusals_in_window = 0;
        }
        state.refusals_in_window = state.refusals_in_window.saturating_add(1);
        let count = state.refusals_in_window;
        // A refusal is not a sign of life: the stream's last-seen time stays.
        let open = state.open & AlertKind::RefusalStorm.bit() != 0;
        if count > limit && !open {
            let evidence = format!("{count} refused frames within a minute (limit {limit})");
            self.change(now, stream, AlertKind::RefusalStorm, true, evidence);
        }
    }

    /// Time passed: judges silence, closes rate windows, refusal minutes and restart
    /// holds. Call at least every second.
    pub fn handle_tick(&mut self, now: Instant) {
        let config = &self.config;
        let mut pending: Vec<(StreamKey, Change)> = Vec::new();
        for (key, state) in self.streams.iter_mut() {
            let mut changes: Vec<Change> = Vec::new();
            roll_windows(config, state, now, &mut changes);
            let threshold = silence_threshold(config, &state.interval_s);
            let silent = now.saturating_duration_since(state.last_seen);
            // A stream known only from refused frames never spoke: it cannot fall silent.
            if state.records_seen && silent > threshold && state.open & AlertKind::Silence.bit() == 0 {
                changes.push((
                    AlertKind::Silence,
                    true,
                    format!(
                        "no record for {:.1} s (threshold {:.1} s, learned interval {:.2} s)",
                        silent.as_secs_f64(),
                        threshold.as_secs_f64(),
                        state.interval_s.mean
                    ),
                ));
            }
            if state.open & AlertKind::Restart.bit() != 0
                && state.last_restart.is_some_and(|at| now.saturating_duration_since(at) >= config.restart_hold)
            {
                changes.push((
                    AlertKind::Restart,
                    false,
                    format!("no restart for {} s", config.restart_hold.as_secs()),
                ));
            }
            if state.open & AlertKind::RefusalStorm.bit() != 0
                && now.saturating_duration_since(state.refusal_window_start) >= REFUSAL_WINDOW
            {
                if state.refusals_in_window <= config.refusals_per_minute_max / 2 {
                    changes.push((
                        AlertKind::RefusalStorm,
                        false,
                        format!("{} refused frames in the last minute", state.refusals_in_window),
                    ));
                }
                state.refusal_window_start = now;
                state.refusals_in_window = 0;
            }
            pending.extend(changes.into_iter().map(|change| (key.clone(), change)));
        }
        for (key, (kind, open, evidence)) in pending {
            self.change(now, &key, kind, open, evidence);
        }
    }

    /// The next alert event, oldest first.
    pub fn poll_event(&mut self) -> Option<AlertEvent> {
        self.events.pop_front()
    }

    /// Every open alert, by stream and kind.
    pub fn open_alerts(&self) -> Vec<OpenAlert> {
        let mut alerts = Vec::new();
        for (key, state) in &self.streams {
            for kind in AlertKind::ALL {
                if state.open & kind.bit() != 0 {
                    alerts.push(OpenAlert {
                        stream: key.clone(),
                        kind,
                        since: state.since[kind as usize].expect("an open alert has a start"),
                        evidence: state.evidence[kind as usize].clone(),
                    });
                }
            }
        }
        alerts.sort_by(|a, b| (&a.stream, a.kind).cmp(&(&b.stream, b.kind)));
        alerts
    }

    pub fn counters(&self) -> &WatchCounters {
        &self.counters
    }

    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// The invariants, asserted by the tests after every step.
    pub fn check_invariants(&self) {
        assert!(self.streams.len() <= self.config.streams_max);
        assert_eq!(self.streams.len(), self.by_last_seen.len());
        assert_eq!(self.streams.len(), self.keys_by_id.len());
        assert!(self.events.len() <= EVENTS_PENDING_MAX);
        for (key, state) in &self.streams {
            assert!(self.by_last_seen.contains(&(state.last_seen, state.id)));
            assert_eq!(self.keys_by_id.get(&state.id), Some(key));
            for kind in AlertKind::ALL {
                assert_eq!(state.open & kind.bit() != 0, state.since[kind as usize].is_some());
            }
        }
    }

    /// The stream's state, tracked from now on if it is new (the oldest-silent stream
    /// forgotten when the watch is full).
    fn stream(&mut self, now: Instant, key: &StreamKey) -> &mut Stream {
        if !self.streams.contains_key(key) {
            if self.streams.len() >= self.config.streams_max {
                self.evict_oldest(now);
            }
            let id = self.next_id;
            self.next_id += 1;
            self.streams.insert(
                key.clone(),
                Stream {
                    id,
                    last_seen: now,
                    last_sequence: None,
                    records_seen: false,
                    interval_s: Learned::default(),
                    rate: Learned::default(),
                    window_start: now,
                    window_records: 0,
                    rate_strikes: 0,
                    skew_strikes: 0,
                    last_restart: None,
                    restarts: 0,
                    refusal_window_start: now,
                    refusals_in_window: 0,
                    open: 0,
                    since: [None; 5],
                    evidence: Default::default(),
                },
            );
            self.by_last_seen.insert((now, id));
            self.keys_by_id.insert(id, key.clone());
        }
        self.streams.get_mut(key).expect("just inserted")
    }

    fn evict_oldest(&mut self, now: Instant) {
        let Some(&(seen, id)) = self.by_last_seen.iter().next() else { return };
        let key = self.keys_by_id[&id].clone();
        for kind in AlertKind::ALL {
            if self.streams[&key].open & kind.bit() != 0 {
                self.change(now, &key, kind, false, "stream no longer watched (watch.streams_max)".into());
            }
        }
        self.by_last_seen.remove(&(seen, id));
        self.keys_by_id.remove(&id);
        self.streams.remove(&key);
        self.counters.streams_evicted += 1;
    }

    fn change(&mut self, now: Instant, key: &StreamKey, kind: AlertKind, open: bool, evidence: String) {
        let Some(state) = self.streams.get_mut(key) else { return };
        let was_open = state.open & kind.bit() != 0;
        if was_open == open {
            return;
        }
        if open {
            state.open |= kind.bit();
            state.since[kind as usize] = Some(now);
            state.evidence[kind as usize] = evidence.clone();
            self.counters.opened[kind as usize] += 1;
        } else {
            state.open &= !kind.bit();
            state.since[kind as usize] = None;
            state.evidence[kind as usize].clear();
            self.counters.closed[kind as usize] += 1;
        }
        if self.events.len() >= EVENTS_PENDING_MAX {
            self.events.pop_front();
            self.counters.events_dropped += 1;
        }
        self.events.push_back(AlertEvent { stream: key.clone(), kind, open, at: now, evidence });
    }
}

/// An alert to open (`true`) or close, with its evidence.
type Change = (AlertKind, bool, String);

/// Closes the stream's rate windows that ended by `now` and judges each.
fn roll_windows(config: &WatchConfig, state: &mut Stream, now: Instant, changes: &mut Vec<Change>) {
    let window = config.rate_window;
    let factor = config.rate_factor;
    let mut open = state.open & AlertKind::RateChange.bit() != 0;
    // A silent stream is the silence rule's: its empty windows are no rate change.
    let silent = state.open & AlertKind::Silence.bit() != 0;
    while now.saturating_duration_since(state.window_start) >= window {
        let records = state.window_records as f64;
        state.window_start += window;
        state.window_records = 0;
        if state.rate.samples < RATE_LEARN_WINDOWS {
            state.rate.add(records);
        } else if silent {
            state.rate_strikes = 0;
        } else {
            let baseline = state.rate.mean.max(1.0);
            let abnormal = records > baseline * factor || records < baseline / factor;
            if abnormal != open {
                state.rate_strikes += 1;
                if state.rate_strikes >= RATE_WINDOWS_TO_OPEN {
                    state.rate_strikes = 0;
                    open = !open;
                    changes.push((
                        AlertKind::RateChange,
                        open,
                        format!("{records} records in {} s against a learned {baseline:.1}", window.as_secs()),
                    ));
                }
            } else {
                state.rate_strikes = 0;
            }
            if !abnormal && !open {
                state.rate.add(records);
            }
        }
        // A stream silent for many windows is the silence rule's: skip its empty
        // windows at once so a long gap costs no loop.
        let behind = now.saturating_duration_since(state.window_start).as_nanos() / window.as_nanos();
        if records == 0.0 && behind > 1 {
            state.window_start += window * (behind - 1) as u32;
        }
    }
}

/// Whether frame `sequence` shows the device counting from below again (more than
/// `restart_tolerance` under the last sequence): counts it and opens (or refreshes) the
/// restart alert.
fn judge_restart(
    config: &WatchConfig,
    state: &mut Stream,
    now: Instant,
    sequence: u64,
    changes: &mut Vec<Change>,
) -> bool {
    let Some(last) = state.last_sequence else { return false };
    if sequence.saturating_add(config.restart_tolerance) >= last {
        return false;
    }
    state.restarts += 1;
    state.last_restart = Some(now);
    let evidence = format!("sequence {sequence} after {last} ({} restarts)", state.restarts);
    if state.open & AlertKind::Restart.bit() == 0 {
        changes.push((AlertKind::Restart, true, evidence));
    } else {
        state.evidence[AlertKind::Restart as usize] = evidence;
    }
    true
}

/// How long a stream may be silent before the silence alert opens.
fn silence_threshold(config: &WatchConfig, interval: &Learned) -> Duration {
    if interval.samples < config.learn_records {
        return config.silence_max;
    }
    let learned = Duration::from_secs_f64((interval.mean * config.silence_factor).clamp(0.0, 1e9));
    learned.clamp(config.silence_min, config.silence_max)
}

#[cfg(test)]
#[path = "watch_tests.rs"]
mod tests;
