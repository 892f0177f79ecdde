//! Scenario tests of the stream watch, time as an argument, the invariants checked
//! after every step.

use super::*;
use crate::protocol::random::SplitMix64;

const SECOND: Duration = Duration::from_secs(1);
/// 2026-12-07T00:00:00Z in ms: the wall clock the simulated devices keep.
const WALL_START_MS: i64 = 1_796_601_600_000;

fn key(device: &str) -> StreamKey {
    StreamKey { device: device.into(), topic: "telemetry".into() }
}

/// A simulated fleet of streams, each sending one record about every `period` with
/// `jitter` (a fraction of the period either way), and a clock that moves in ticks.
struct Fleet {
    watch: Watch,
    base: Instant,
    now: Duration,
    random: SplitMix64,
    devices: Vec<Device>,
    events: Vec<AlertEvent>,
}

struct Device {
    key: StreamKey,
    period: Duration,
    jitter: f64,
    next_send: Duration,
    sequence: u64,
    /// Added to the record timestamps (a drifting clock).
    clock_offset_ms: i64,
    sending: bool,
}

impl Fleet {
    fn new(config: WatchConfig, devices: usize, period: Duration, jitter: f64) -> Fleet {
        let mut random = SplitMix64::new(7);
        let devices = (0..devices)
            .map(|index| Device {
                key: key(&format!("dev-{index}")),
                period,
                jitter,
                next_send: period.mul_f64(random.unit()),
                sequence: 0,
                clock_offset_ms: 0,
                sending: true,
            })
            .collect();
        Fleet {
            watch: Watch::new(config),
            base: Instant::now(),
            now: Duration::ZERO,
            random,
            devices,
            events: Vec::new(),
        }
    }

    /// Runs the fleet for `length`, ticking the watch every second.
    fn run(&mut self, length: Duration) {
        let end = self.now + length;
        let step = Duration::from_millis(100);
        while self.now < end {
            self.now += step;
            let now = self.base + self.now;
            for device in &mut self.devices {
                if !device.sending || device.next_send > self.now {
                    continue;
                }
                let arrival_ms = WALL_START_MS + self.now.as_millis() as i64;
                self.watch.handle_records(
                    now,
                    &device.key,
                    device.sequence,
                    1,
                    arrival_ms + device.clock_offset_ms,
                    arrival_ms,
                );
                device.sequence += 1;
                let spread = 1.0 + device.jitter * (2.0 * self.random.unit() - 1.0);
                device.next_send = self.now + device.period.mul_f64(spread);
            }
            if self.now.as_millis().is_multiple_of(1000) {
                self.watch.handle_tick(now);
            }
            self.watch.check_invariants();
            while let Some(event) = self.watch.poll_event() {
                self.events.push(event);
            }
        }
    }

    fn device(&mut self, index: usize) -> &mut Device {
        &mut self.devices[index]
    }

    /// The events of `kind` for device `index`, as (seconds since start, open).
    fn events_of(&self, index: usize, kind: AlertKind) -> Vec<(f64, bool)> {
        let key = &self.devices[index].key;
        self.events
            .iter()
            .filter(|event| &event.stream == key && event.kind == kind)
            .map(|event| ((event.at - self.base).as_secs_f64(), event.open))
            .collect()
    }
}

#[test]
fn a_steady_fleet_with_thirty_percent_jitter_raises_no_alert_over_a_day() {
    let mut fleet = Fleet::new(WatchConfig::default(), 20, SECOND, 0.3);
    fleet.run(Duration::from_secs(24 * 3600));
    assert!(fleet.events.is_empty(), "alerts on a steady fleet: {:?}", &fleet.events[..fleet.events.len().min(5)]);
    assert_eq!(fleet.watch.streams(), 20);
}

#[test]
fn a_silenced_device_is_reported_within_the_bound_and_cleared_when_it_speaks_again() {
    let config = WatchConfig::default();
    let mut fleet = Fleet::new(config, 3, SECOND, 0.3);
    fleet.run(Duration::from_secs(120));
    fleet.device(1).sending = false;
    let silenced_at = fleet.now.as_secs_f64();
    fleet.run(Duration::from_secs(60));
    let events = fleet.events_of(1, AlertKind::Silence);
    assert_eq!(events.len(), 1, "{events:?}");
    // Learned interval about 1 s x 5, floored at silence_min (10 s); one tick late at most.
    let bound = config.silence_min.as_secs_f64() + 2.0;
    assert!(events[0].1 && events[0].0 - silenced_at <= bound, "{events:?} after {silenced_at}");
    fleet.device(1).sending = true;
    fleet.device(1).next_send = fleet.now;
    fleet.run(Duration::from_secs(5));
    assert_eq!(fleet.events_of(1, AlertKind::Silence).last().map(|event| event.1), Some(false));
    assert!(fleet.events_of(0, AlertKind::Silence).is_empty() && fleet.events_of(2, AlertKind::Silence).is_empty());
    assert!(fleet.watch.open_alerts().is_empty());
}

#[test]
fn a_device_that_was_never_learned_is_silent_only_after_silence_max() {
    let config = WatchConfig { silence_max: Duration::from_secs(30), ..WatchConfig::default() };
    let mut fleet = Fleet::new(config, 1, SECOND, 0.0);
    fleet.run(Duration::from_secs(3)); // fewer than learn_records intervals
    fleet.device(0).sending = false;
    let stopped = fleet.now.as_secs_f64();
    fleet.run(Duration::from_secs(25));
    assert!(fleet.events.is_empty());
    fleet.run(Duration::from_secs(10));
    let events = fleet.events_of(0, AlertKind::Silence);
    assert_eq!(events.len(), 1);
    // silence_max (30 s) after the last record (at most 1 s before `stopped`), one tick late at most.
    assert!(events[0].0 - stopped >= 29.0 && events[0].0 - stopped <= 32.0, "{events:?}");
}

#[test]
fn a_restarted_device_opens_a_restart_alert_at_once_and_it_closes_after_the_hold() {
    let config =
        WatchConfig { restart_hold: Duration::from_secs(120), restart_tolerance: 32, ..WatchConfig::default() };
    let mut fleet = Fleet::new(config, 2, SECOND, 0.3);
    fleet.run(Duration::from_secs(60));
    // A resend of a frame refused earlier (within what a device may have in flight) is
    // no restart.
    let now = fleet.base + fleet.now;
    let late = fleet.devices[1].sequence - 30;
    fleet.watch.handle_records(now, &key("dev-1"), late, 1, WALL_START_MS, WALL_START_MS);
    fleet.device(0).sequence = 0; // the device lost its counter
    let restarted = fleet.now.as_secs_f64();
    fleet.run(Duration::from_secs(5));
    let events = fleet.events_of(0, AlertKind::Restart);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].1 && events[0].0 - restarted <= 1.5);
    let open = fleet.watch.open_alerts();
    assert_eq!(open.len(), 1);
    assert!(open[0].evidence.contains("sequence 0 after"), "{}", open[0].evidence);
    fleet.run(Duration::from_secs(130));
    assert_eq!(fleet.events_of(0, AlertKind::Restart).last().map(|event| event.1), Some(false));
    assert!(fleet.events_of(1, AlertKind::Restart).is_empty());
}

#[test]
fn a_rate_jump_and_a_collapse_each_open_within_three_windows_and_close_when_the_rate_returns() {
    let config = WatchConfig { rate_window: Duration::from_secs(10), ..WatchConfig::default() };
    let mut fleet = Fleet::new(config, 2, SECOND, 0.2);
    fleet.run(Duration::from_secs(100));
    fleet.device(0).period = Duration::from_millis(100); // 10x
    let jumped = fleet.now.as_secs_f64();
    fleet.run(Duration::from_secs(40));
    let events = fleet.events_of(0, AlertKind::RateChange);
    assert!(!events.is_empty() && events[0].1, "{events:?}");
    assert!(events[0].0 - jumped <= 3.0 * 10.0 + 1.0, "{events:?} after {jumped}");
    fleet.device(0).period = SECOND;
    fleet.run(Duration::from_secs(40));
    assert_eq!(fleet.events_of(0, AlertKind::RateChange).last().map(|event| event.1), Some(false));
    // A collapse to a fifth (still sending, so not silence).
    fleet.device(0).period = Duration::from_secs(5);
    let collapsed = fleet.now.as_secs_f64();
    fleet.run(Duration::from_secs(40));
    let events: Vec<_> =
        fleet.events_of(0, AlertKind::RateChange).into_iter().filter(|event| event.0 > collapsed).collect();
    assert!(!events.is_empty() && events[0].1, "{events:?}");
    assert!(fleet.events_of(1, AlertKind::RateChange).is_empty());
}

#[test]
fn a_skewed_clock_opens_after_three_frames_and_closes_after_three_good_ones() {
    let config = WatchConfig::default();
    let mut fleet = Fleet::new(config, 2, SECOND, 0.0);
    fleet.run(Duration::from_secs(20));
    fleet.device(0).clock_offset_ms = -5 * 60 * 1000; // five minutes behind
    let skewed = fleet.now.as_secs_f64();
    fleet.run(Duration::from_secs(5));
    let events = fleet.events_of(0, AlertKind::ClockSkew);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].1 && events[0].0 - skewed <= 3.5);
    // Inside skew_max but above half of it: the alert stays open (hysteresis).
    fleet.device(0).clock_offset_ms = 45_000;
    fleet.run(Duration::from_secs(10));
    assert_eq!(fleet.events_of(0, AlertKind::ClockSkew).len(), 1);
    fleet.device(0).clock_offset_ms = 0;
    fleet.run(Duration::from_secs(5));
    assert_eq!(fleet.events_of(0, AlertKind::ClockSkew).last().map(|event| event.1), Some(false));
    assert!(fleet.events_of(1, AlertKind::ClockSkew).is_empty());
}

#[test]
fn a_refusal_storm_opens_over_the_limit_and_closes_after_a_quiet_minute() {
    let config = WatchConfig { refusals_per_minute_max: 10, ..WatchConfig::default() };
    let mut watch = Watch::new(config);
    let base = Instant::now();
    let stream = key("dev-7");
    for index in 0..10 {
        watch.handle_refusal(base + Duration::from_millis(index * 100), &stream, None);
        watch.check_invariants();
    }
    assert!(watch.poll_event().is_none(), "ten refusals are within the limit");
    watch.handle_refusal(base + SECOND + SECOND, &stream, None);
    let event = watch.poll_event().expect("the eleventh opens the storm");
    assert!(event.open && event.kind == AlertKind::RefusalStorm);
    assert!(event.evidence.contains("11 refused frames"), "{}", event.evidence);
    // Still refused after the window: stays open while over half the limit.
    for index in 0..8 {
        watch.handle_refusal(base + Duration::from_secs(61 + index), &stream, None);
    }
    watch.handle_tick(base + Duration::from_secs(122));
    assert!(watch.poll_event().is_none(), "8 of a limit of 10 is over half: still a storm");
    watch.handle_tick(base + Duration::from_secs(183));
    let event = watch.poll_event().expect("a quiet minute closes it");
    assert!(!event.open && event.kind == AlertKind::RefusalStorm);
    watch.check_invariants();
}

#[test]
fn past_streams_max_the_longest_silent_stream_is_forgotten_and_its_alerts_closed() {
    let config = WatchConfig { streams_max: 3, restart_tolerance: 0, ..WatchConfig::default() };
    let mut watch = Watch::new(config);
    let base = Instant::now();
    let at = |seconds: u64| base + Duration::from_secs(seconds);
    watch.handle_records(at(0), &key("a"), 5, 1, WALL_START_MS, WALL_START_MS);
    watch.handle_records(at(1), &key("b"), 0, 1, WALL_START_MS, WALL_START_MS);
    watch.handle_records(at(2), &key("c"), 0, 1, WALL_START_MS, WALL_START_MS);
    watch.handle_records(at(3), &key("a"), 0, 1, WALL_START_MS, WALL_START_MS); // a restart: alert open
    watch.check_invariants();
    assert_eq!(watch.open_alerts().len(), 1);
    // b is now the longest silent; d takes its place.
    watch.handle_records(at(4), &key("d"), 0, 1, WALL_START_MS, WALL_START_MS);
    watch.check_invariants();
    assert_eq!(watch.streams(), 3);
    assert_eq!(watch.counters().streams_evicted, 1);
    // a (with its open alert) is next: its alert closes as it is forgotten.
    watch.handle_records(at(5), &key("e"), 0, 1, WALL_START_MS, WALL_START_MS);
    watch.handle_records(at(6), &key("f"), 0, 1, WALL_START_MS, WALL_START_MS);
    watch.check_invariants();
    assert!(watch.open_alerts().is_empty());
    let events: Vec<AlertEvent> = std::iter::from_fn(|| watch.poll_event()).collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(!events[1].open && events[1].evidence.contains("no longer watched"));
}

#[test]
fn a_device_refused_for_a_sequence_from_below_is_a_restart_too() {
    let config = WatchConfig { restart_tolerance: 32, ..WatchConfig::default() };
    let mut watch = Watch::new(config);
    let base = Instant::now();
    let stream = key("dev-3");
    for second in 0..10u64 {
        watch.handle_records(
            base + Duration::from_secs(second),
            &stream,
            1_000 + second,
            4,
            WALL_START_MS,
            WALL_START_MS,
        );
    }
    // Within the tolerance: a resend, refused or not, is no restart.
    watch.handle_refusal(base + Duration::from_secs(10), &stream, Some(1_000));
    assert!(watch.poll_event().is_none());
    // The device lost its counter: its frames from below are refused (SequenceReused).
    watch.handle_refusal(base + Duration::from_secs(11), &stream, Some(3));
    let event = watch.poll_event().expect("a restart");
    assert!(event.open && event.kind == AlertKind::Restart, "{event:?}");
    assert!(event.evidence.contains("sequence 3 after 1009"), "{}", event.evidence);
    // Its next frames count on from the new start: no second restart.
    watch.handle_refusal(base + Duration::from_secs(12), &stream, Some(4));
    watch.handle_records(base + Duration::from_secs(13), &stream, 5, 1, WALL_START_MS, WALL_START_MS);
    assert!(watch.poll_event().is_none());
    watch.check_invariants();
}

#[test]
fn a_stream_known_only_from_refused_frames_never_falls_silent() {
    let config = WatchConfig { silence_max: Duration::from_secs(30), ..WatchConfig::default() };
    let mut watch = Watch::new(config);
    let base = Instant::now();
    watch.handle_refusal(base, &key("dev-9"), None);
    for second in 1..120u64 {
        watch.handle_tick(base + Duration::from_secs(second));
    }
    let events: Vec<AlertEvent> = std::iter::from_fn(|| watch.poll_event()).collect();
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(watch.streams(), 1);
}

#[test]
fn a_stream_costs_what_the_docs_say() {
    // The state, plus the map's and the index's share (hash slot, B-tree entry, id map
    // entry), the key's Strings counted twice (map and id map) but not their bytes.
    let key_bytes = std::mem::size_of::<StreamKey>();
    let cost = std::mem::size_of::<Stream>() + 2 * key_bytes + std::mem::size_of::<(Instant, u64)>() + 16;
    assert!(cost <= STREAM_BYTES_APPROX, "a stream costs {cost} bytes, STREAM_BYTES_APPROX says {STREAM_BYTES_APPROX}");
    assert!(cost * 2 > STREAM_BYTES_APPROX, "STREAM_BYTES_APPROX is far above the {cost} bytes a stream costs");
}
