//! `deliver --metrics-addr`: the library's metrics (through the `metrics`
//! facade) rendered by `metrics-exporter-prometheus` and served as
//! Prometheus text at `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::error::{CliError, Result};

/// Serves `/metrics` on `addr` until the process ends; returns the address
/// bound (port 0 picks one).
pub(crate) fn serve(addr: SocketAddr) -> Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| CliError::msg(format!("cannot install the metrics recorder: {e}")))?;
    ctrlbus::telemetry::describe();
    let server = tiny_http::Server::http(addr)
        .map_err(|e| CliError::msg(format!("cannot serve metrics on {addr}: {e}")))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| CliError::msg(format!("cannot serve metrics on {addr}")))?;
    std::thread::Builder::new()
        .name("ctrlbus-metrics".into())
        .spawn(move || run(&server, &handle))
        .map_err(|e| CliError::msg(format!("cannot start the metrics server: {e}")))?;
    Ok(bound)
}

fn run(server: &tiny_http::Server, handle: &PrometheusHandle) {
    loop {
        // Histograms are drained into their buckets by the upkeep, on every
        // scrape and every few seconds between.
        match server.recv_timeout(Duration::from_secs(5)) {
            Ok(Some(req)) => {
                handle.run_upkeep();
                let response = if req.url() == "/metrics" {
                    tiny_http::Response::from_string(handle.render()).with_header(
                        tiny_http::Header::from_bytes(
                            "content-type",
                            "text/plain; version=0.0.4; charset=utf-8",
                        )
                        .expect("a valid header"),
                    )
                } else {
                    tiny_http::Response::from_string("not found: try /metrics\n")
                        .with_status_code(404)
                };
                let _ = req.respond(response);
            }
            Ok(None) => handle.run_upkeep(),
            Err(_) => return,
        }
    }
}
