//! The admin endpoint: `/metrics` (Prometheus text format), `/health`, `/status`
//! (JSON, what `weir status` shows) and `/alerts` (JSON, the stream watch's open alerts,
//! what `weir alerts` shows), on its own
//! thread so a busy core never delays a scrape. It only reads atomics the cores update.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::shell::metrics::Metrics;
use crate::shell::shutdown;

/// How long the admin thread waits for a request before re-checking for shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[error("cannot serve the admin endpoint on {address}: {reason}")]
pub struct AdminError {
    pub address: String,
    pub reason: String,
}

/// What /health reports: healthy when every core is serving, no partition is poisoned
/// or quarantined, no partition's upstream shipping has stopped and none has been
/// failing for longer than `upstream.degraded_after_ms`.
pub fn health(metrics: &Metrics, cores_expected: usize) -> (u16, String) {
    let running = metrics.cores_running.get();
    let poisoned = metrics.partitions_poisoned.get();
    let stopped = metrics.status.stopped_shippers();
    let now_s = crate::shell::status_cells::unix_seconds(std::time::SystemTime::now());
    let failing = metrics.status.failing_shippers(now_s);
    let quarantined = crate::shell::quarantine::names();
    if running as usize != cores_expected {
        (503, format!("starting or stopping: {running} of {cores_expected} cores serving\n"))
    } else if poisoned > 0 {
        (503, format!("degraded: {poisoned} partition(s) poisoned by disk errors\n"))
    } else if !quarantined.is_empty() {
        (
            503,
            format!(
                "degraded: {} partition(s) quarantined (weir serve --quarantine; see docs/OPERATIONS.md): {}\n",
                quarantined.len(),
                quarantined.join(", ")
            ),
        )
    } else if !stopped.is_empty() {
        let mut text = format!("degraded: upstream shipping stopped for {} partition(s)\n", stopped.len());
        for line in stopped {
            text.push_str(&line);
            text.push('\n');
        }
        (503, text)
    } else if !failing.is_empty() {
        let mut text = format!(
            "degraded: upstream shipping failing for longer than upstream.degraded_after_ms for {} partition(s) (it keeps retrying)\n",
            failing.len()
        );
        for line in failing {
            text.push_str(&line);
            text.push('\n');
        }
        (503, text)
    } else {
        (200, format!("ok: {running} cores serving\n"))
    }
}

/// Binds `address` and serves until `shutdown` is set. Returns the bound address.
pub fn start(
    address: &str,
    metrics: Arc<Metrics>,
    cores_expected: usize,
    shutdown: Arc<AtomicBool>,
) -> Result<(std::net::SocketAddr, std::thread::JoinHandle<()>), AdminError> {
    let server = tiny_http::Server::http(address)
        .map_err(|error| AdminError { address: address.to_owned(), reason: error.to_string() })?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| AdminError { address: address.to_owned(), reason: "not an IP listener".into() })?;
    let handle = std::thread::Builder::new()
        .name("weir-admin".into())
        .spawn(move || {
            while !shutdown::is_signalled(&shutdown) {
                let request = match server.recv_timeout(POLL_INTERVAL) {
                    Ok(Some(request)) => request,
                    Ok(None) => continue,
                    Err(error) => {
                        tracing::warn!(%error, "admin endpoint receive failed");
                        continue;
                    }
                };
                let path = request.url().split('?').next().unwrap_or("").to_owned();
                let (status, body, content_type) = match (request.method(), path.as_str()) {
                    (tiny_http::Method::Get, "/metrics") => {
                        (200, metrics.render(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
                    }
                    (tiny_http::Method::Get, "/health") => {
                        let (status, body) = health(&metrics, cores_expected);
                        (status, body, "text/plain; charset=utf-8")
                    }
                    (tiny_http::Method::Get, "/status") => {
                        let body = serde_json::to_string(&metrics.status.snapshot())
                            .unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"));
                        (200, body, "application/json")
                    }
                    (tiny_http::Method::Get, "/alerts") => {
                        (200, crate::shell::watch::alerts_json(&metrics.watch), "application/json")
                    }
                    _ => (
                        404,
                        "not found: try /metrics, /health, /status or /alerts\n".to_owned(),
                        "text/plain; charset=utf-8",
                    ),
                };
                let header = tiny_http::Header::from_bytes("Content-Type", content_type).expect("static header");
                let response = tiny_http::Response::from_string(body).with_status_code(status).with_header(header);
                if let Err(error) = request.respond(response) {
                    tracing::debug!(%error, "admin client went away");
                }
            }
        })
        .map_err(|error| AdminError { address: address.to_owned(), reason: error.to_string() })?;
    Ok((bound, handle))
}
