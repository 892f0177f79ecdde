//! The end-of-run summary: a few lines for people, then one JSON object for scripts
//! (always the last stdout line).
//!
//! JSON fields: `acked` (records acknowledged), `errors` (failed sends + devices that
//! could not connect + sends abandoned at the end of the drain), `records_per_s` and
//! `mb_per_s` (acked records and their value bytes, 10^6 bytes per MB, over the time
//! from the start of writing to the last resolved send), `p50_us`, `p99_us`, `p999_us`,
//! `max_us` (ack latency per record: from the send call to its ack), and the run's
//! shape: devices, connected, connect_failures, endpoints, generated, failed_sends,
//! failed_records, abandoned_sends, seconds, elapsed_s, rate, record_bytes, topics.

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
        let json = json!({
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
        });
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
        ];
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
