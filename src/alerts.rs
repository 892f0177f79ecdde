//! `weir alerts`: the stream watch's open alerts, asked of the running server
//! (`GET /alerts` on `admin.listen`), as a table or as the JSON document itself. The
//! watch keeps no state on disk, so there is nothing to read when weir is not running;
//! its events stay in the log as records of `_weir.alerts` (`weir tail _weir.alerts`).

use crate::config::ValidConfig;
use crate::shell::runtime::exit_code;
use crate::shell::watch::AlertView;
use crate::status::{fetch_path, StatusError};

/// What `/alerts` answers.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct AlertsAnswer {
    pub enabled: bool,
    pub alerts: Vec<AlertView>,
}

/// Runs `weir alerts`; returns the exit code: 0 with no alert open, 1 with some,
/// `ADMIN_UNAVAILABLE` when no weir answers.
pub fn command(valid: &ValidConfig, admin: Option<&str>, json: bool) -> i32 {
    let address = admin.unwrap_or(&valid.config.admin.listen);
    let body = match fetch_path(address, "/alerts") {
        Ok(body) => body,
        Err(error @ StatusError::Unreachable { .. }) => {
            eprintln!("weir alerts: {error}: is weir running? (--config of the running server, or --admin HOST:PORT)");
            return exit_code::ADMIN_UNAVAILABLE;
        }
        Err(error) => {
            eprintln!("weir alerts: {error}");
            return exit_code::ADMIN_UNAVAILABLE;
        }
    };
    let answer: AlertsAnswer = match serde_json::from_slice(&body) {
        Ok(answer) => answer,
        Err(error) => {
            eprintln!("weir alerts: {address}: not an /alerts answer: {error}");
            return exit_code::ADMIN_UNAVAILABLE;
        }
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body));
    } else {
        print!("{}", render_table(&answer, crate::shell::status_cells::unix_seconds(std::time::SystemTime::now())));
    }
    if answer.alerts.is_empty() {
        exit_code::CLEAN
    } else {
        exit_code::PROBLEMS_FOUND
    }
}

/// The table: one alert per line, aligned, with how long it has been open at `now_s`.
pub fn render_table(answer: &AlertsAnswer, now_s: f64) -> String {
    if !answer.enabled {
        return "the stream watch is off ([watch] enabled = false)\n".to_owned();
    }
    if answer.alerts.is_empty() {
        return "no alert open\n".to_owned();
    }
    let header = ["DEVICE", "TOPIC", "KIND", "OPEN FOR", "EVIDENCE"].map(str::to_owned);
    let rows: Vec<[String; 5]> = answer
        .alerts
        .iter()
        .map(|alert| {
            let open_s = (now_s - alert.since_ms as f64 / 1000.0).max(0.0);
            [
                alert.device.clone(),
                alert.topic.clone(),
                alert.kind.clone(),
                format!("{open_s:.0} s"),
                alert.evidence.clone(),
            ]
        })
        .collect();
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter().zip(row) {
            text.push_str(&format!("{cell:<width$}  "));
        }
        text.push_str(&row[4]);
        text.push('\n');
    }
    text.push_str(&format!("{} alert(s) open\n", rows.len()));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_each_open_alert_aligned_with_how_long_it_has_been_open() {
        let alert = |device: &str, kind: &str, since_ms: i64| AlertView {
            device: device.into(),
            topic: "telemetry".into(),
            kind: kind.into(),
            since_ms,
            evidence: "no record for 12.0 s".into(),
        };
        let answer = AlertsAnswer {
            enabled: true,
            alerts: vec![alert("sim-1", "silence", 1_000_000), alert("sim-1000", "restart", 1_030_000)],
        };
        let text = render_table(&answer, 1_100.0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("DEVICE    TOPIC      KIND     OPEN FOR  EVIDENCE"), "{text}");
        assert!(lines[1].starts_with("sim-1     telemetry  silence  100 s"), "{text}");
        assert!(lines[2].starts_with("sim-1000  telemetry  restart  70 s"), "{text}");
        assert_eq!(lines[3], "2 alert(s) open");
        assert_eq!(render_table(&AlertsAnswer { enabled: true, alerts: vec![] }, 0.0), "no alert open\n");
        assert!(render_table(&AlertsAnswer { enabled: false, alerts: vec![] }, 0.0).contains("off"));
    }
}
