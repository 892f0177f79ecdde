//! The end-of-run summary: a few lines for people, then one JSON object for scripts
//! (always the last stdout line).
//!
//! JSON fields: `acked` (records acknowledged), `errors` (failed sends + devices that
//! could not connect + sends abandoned at the end of the drain), `records_per_s` and
//! `mb_per_s` (acked records and their value bytes, 10^6 bytes per MB, over the time
//! from the start of writing to the last resolved send), `p50_us`, `p99_us`, `p999_us`,
//! `max_us` (ack latency per record: from the send call to its ack), and the run's
//! shape: devices, connected, connect_failures, endpoints, generated, failed_sends,
//! failed_records, abandoned_sends, seconds, elapsed_s, rate, record_bytes, topics;
//! `sends_acked` and `send_rtt_p50_us`/`_p99_us`/`_p999_us` (one send's round trip,
//! counted once per send), and in the closed loop (`--closed-loop-frames`) the same as
//! `frames_acked`, `frame_rtt_p50_us`/`_p99_us`/`_p999_us` with `closed_loop_frames`
//! and `records_per_frame`; `ack_gap_p50_us`/`_p99_us`/`max_us` (over devices, each
//! device's longest time between two of its acks: how long it could not write when the
//! server restarted) and `last_ack_min_s` (the earliest of the devices' last acks from
//! the start of writing; null when some device got no ack).

use serde_json::json;

use crate::fleet::Outcome;
use crate::Plan;

pub struct Summary {
    json: serde_json::Value,
    lines: Vec<String>,
}

impl Summary {
    pub fn of(plan: &Plan, outcome: &Outcome) -> Summary {
        let elapsed_s = outcome.elapsed.as_secs_f64().max(1e-9);
        let records_per_s = outcome.acked as f64 / elapsed_s;
        let mb_per_s = outcome.acked as f64 * plan.record_bytes as f64 / elapsed_s / 1e6;
        let latency = &outcome.latency_us;
        let (p50_us, p99_us, p999_us, max_us) = if latency.is_empty() {
            (0, 0, 0, 0)
        } else {
            (
                latency.value_at_quantile(0.50),
                latency.value_at_quantile(0.99),
                latency.value_at_quantile(0.999),
                latency.max(),
            )
        };
        let errors = outcome.failed_sends + outcome.connect_failures + outcome.abandoned_sends;
        let rtt = &outcome.send_rtt_us;
        let rtt_at = |quantile: f64| if rtt.is_empty() { 0 } else { rtt.value_at_quantile(quantile) };
        let gap = &outcome.ack_gap_us;
        let gap_at = |quantile: f64| if gap.is_empty() { 0 } else { gap.value_at_quantile(quantile) };
        let mut json = json!({
            "acked": outcome.acked,
            "errors": errors,
            "records_per_s": (records_per_s * 10.0).round() / 10.0,
            "mb_per_s": (mb_per_s * 1000.0).round() / 1000.0,
            "p50_us": p50_us,
            "p99_us": p99_us,
            "p999_us": p999_us,
            "max_us": max_us,
            "devices": outcome.devices,
            "connected": outcome.connected,
            "connect_failures": outcome.connect_failures,
            "endpoints": outcome.endpoints,
            "generated": outcome.generated,
            "failed_sends": outcome.failed_sends,
            "failed_records": outcome.failed_records,
            "abandoned_sends": outcome.abandoned_sends,
            "seconds": plan.seconds,
            "elapsed_s": (elapsed_s * 1000.0).round() / 1000.0,
            "rate": plan.rate,
            "record_bytes": plan.record_bytes,
            "topics": plan.topics,
            "rebinds": outcome.rebinds,
            "sends_acked": outcome.sends_acked,
            "send_rtt_p50_us": rtt_at(0.5),
            "send_rtt_p99_us": rtt_at(0.99),
            "send_rtt_p999_us": rtt_at(0.999),
            "ack_gap_p50_us": gap_at(0.5),
            "ack_gap_p99_us": gap_at(0.99),
            "ack_gap_max_us": outcome.ack_gap_us.max(),
            "last_ack_min_s": outcome.last_ack_min.map(|at| (at.as_secs_f64() * 1000.0).round() / 1000.0),
        });
        if let Some(closed_loop) = plan.closed_loop {
            // A closed-loop send is one frame.
            let fields = json.as_object_mut().expect("an object");
            fields.insert("closed_loop_frames".into(), closed_loop.frames_in_flight.into());
            fields.insert("records_per_frame".into(), closed_loop.records_per_frame.into());
            fields.insert("frames_acked".into(), outcome.sends_acked.into());
            fields.insert("frame_rtt_p50_us".into(), rtt_at(0.5).into());
            fields.insert("frame_rtt_p99_us".into(), rtt_at(0.99).into());
            fields.insert("frame_rtt_p999_us".into(), rtt_at(0.999).into());
        }
        let mut lines = vec![
            format!(
                "weir-sim: {} devices ({} connected, {} failed to connect) on {} endpoints and {} threads; \
                 {} s at {} records/s each, {}-byte values, topics {}",
                outcome.devices,
                outcome.connected,
                outcome.connect_failures,
                outcome.endpoints,
                plan.threads,
                plan.seconds,
                plan.rate,
                plan.record_bytes,
                plan.topics.join(",")
            ),
            format!(
                "records    {} generated, {} acked, {} failed in {} sends, {} sends abandoned",
                outcome.generated, outcome.acked, outcome.failed_records, outcome.failed_sends, outcome.abandoned_sends
            ),
            format!("throughput {records_per_s:.0} records/s, {mb_per_s:.3} MB/s over {elapsed_s:.3} s"),
            format!("ack latency p50 {p50_us} us, p99 {p99_us} us, p999 {p999_us} us, max {max_us} us"),
            format!(
                "ack gaps   per device, longest: p50 {} us, p99 {} us, max {} us",
                gap_at(0.5),
                gap_at(0.99),
                gap.max()
            ),
        ];
        if let Some(closed_loop) = plan.closed_loop {
            lines.push(format!(
                "closed loop {} frame(s) of {} records in flight per device: {} frames, round trip p50 {} us, \
                 p99 {} us, p999 {} us",
                closed_loop.frames_in_flight,
                closed_loop.records_per_frame,
                outcome.sends_acked,
                rtt_at(0.5),
                rtt_at(0.99),
                rtt_at(0.999)
            ));
        }
        for error in &outcome.first_errors {
            lines.push(format!("error      {error}"));
        }
        Summary { json, lines }
    }

    pub fn human_lines(&self) -> &[String] {
        &self.lines
    }

    pub fn json(&self) -> String {
        self.json.to_string()
    }
}
