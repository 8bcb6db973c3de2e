//! Operations: Prometheus metrics and health checks on one HTTP listener
//! (`--metrics-address`), for every long-running service.
//!
//! - `/metrics`: every metric recorded through the `metrics` facade, in Prometheus'
//!   text format (rendered by `metrics-exporter-prometheus`). Without a listener no
//!   recorder is installed and recording costs next to nothing.
//! - `/health/live`: 200 while the process runs.
//! - `/health/ready`: 200 when every check the service registered passes (its broker
//!   connection, and for the persister its subscriptions and the database), else 503
//!   with one line naming what is not ready and why.
//!
//! Names: the prefix `iot_`, base units, `_total` for counters, `_seconds` for times.
//! The readiness checks are metrics too (`iot_ready`, `iot_health_check{check}`), so
//! Prometheus can alert on them.

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Parses a listen address, `HOST:PORT` (`0.0.0.0:9464`, `localhost:9464`, `[::]:9464`).
pub fn parse_listen_address(value: &str) -> Result<String, String> {
    let (host, port) = value
        .rsplit_once(':')
        .ok_or("expected HOST:PORT, e.g. 0.0.0.0:9464")?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err("expected HOST:PORT with a port from 0 to 65535, e.g. 0.0.0.0:9464".into());
    }
    Ok(value.to_string())
}

/// The named checks `/health/ready` reports; all must pass.
#[derive(Debug, Default)]
pub struct Health {
    checks: Mutex<BTreeMap<&'static str, Result<(), String>>>,
}

static HEALTH: LazyLock<Health> = LazyLock::new(Health::default);

/// The process's health checks.
pub fn health() -> &'static Health {
    &HEALTH
}

impl Health {
    /// Sets check `name` (registering it): `Ok` passes, `Err` says why not. The gauges
    /// `iot_health_check{check}` and `iot_ready` follow, for alerts.
    pub fn set(&self, name: &'static str, state: Result<(), String>) {
        let passes = state.is_ok();
        if let Ok(mut checks) = self.checks.lock() {
            checks.insert(name, state);
        }
        metrics::gauge!("iot_health_check", "check" => name).set(f64::from(u8::from(passes)));
        metrics::gauge!("iot_ready").set(f64::from(u8::from(self.ready().is_ok())));
    }

    /// `Ok` when every check passes, else the failing ones on one line.
    pub fn ready(&self) -> Result<(), String> {
        let checks = self
            .checks
            .lock()
            .map_err(|_| "health checks unavailable".to_string())?;
        let failing: Vec<String> = checks
            .iter()
            .filter_map(|(name, state)| state.as_ref().err().map(|why| format!("{name}: {why}")))
            .collect();
        if checks.is_empty() {
            return Err("starting".into());
        }
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing.join("; "))
        }
    }
}

/// What a metric is, for its `# TYPE` and `# HELP` lines.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric a service records, described once when the listener starts.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub kind: Kind,
    pub name: &'static str,
    pub help: &'static str,
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            kind: Kind::Counter,
            name,
            help,
        }
    }

    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            kind: Kind::Gauge,
            name,
            help,
        }
    }

    pub const fn histogram(name: &'static str, help: &'static str) -> Self {
        Self {
            kind: Kind::Histogram,
            name,
            help,
        }
    }
}

/// The metrics of every service: its broker connection and its readiness.
const COMMON: &[Metric] = &[
    Metric::gauge(
        "iot_mqtt_connected",
        "1 while connected to the broker, else 0",
    ),
    Metric::counter(
        "iot_mqtt_reconnects_total",
        "Connections made again after one was lost",
    ),
    Metric::counter(
        "iot_mqtt_published_total",
        "Messages handed to the broker connection",
    ),
    Metric::counter(
        "iot_mqtt_publishes_refused_total",
        "Publishes refused before writing: a topic or packet MQTT or the broker cannot take",
    ),
    Metric::counter(
        "iot_mqtt_acknowledged_total",
        "QoS 1 and 2 publishes the broker acknowledged",
    ),
    Metric::gauge(
        "iot_mqtt_unacknowledged",
        "QoS 1 and 2 publishes waiting for the broker's acknowledgement",
    ),
    Metric::counter(
        "iot_mqtt_received_total",
        "Messages received from the broker",
    ),
    Metric::counter(
        "iot_mqtt_read_pauses_total",
        "Times reading from the broker stopped, the service being 1000 QoS 1/2 messages behind",
    ),
    Metric::gauge("iot_ready", "1 when /health/ready answers 200, else 0"),
    Metric::gauge(
        "iot_health_check",
        "1 when the readiness check `check` passes, else 0",
    ),
];

fn describe(metrics: &[Metric]) {
    for metric in COMMON.iter().chain(metrics) {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            Kind::Histogram => {
                metrics::describe_histogram!(metric.name, metrics::Unit::Seconds, metric.help)
            }
        }
    }
}

/// Bucket bounds of every `_seconds` histogram: 1 ms to 2 minutes.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Serves `/metrics`, `/health/live` and `/health/ready` on `address` until
/// `shutdown`, when an address is given; `metrics` are the service's own, described
/// beside the common ones. Binding happens before this returns, so a taken port is an
/// error at start.
pub async fn serve(
    address: Option<&str>,
    shutdown: CancellationToken,
    metrics: &[Metric],
) -> anyhow::Result<()> {
    let Some(address) = address else {
        return Ok(());
    };
    let handle = recorder()?;
    describe(metrics);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for metrics on {address} (--metrics-address)"))?;
    let bound = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(
        address = bound,
        "metrics on /metrics, health on /health/live and /health/ready"
    );
    let render = handle.clone();
    let router = Router::new()
        .route("/metrics", get(move || async move { render.render() }))
        .route("/health/live", get(|| async { "live\n" }))
        .route(
            "/health/ready",
            get(|| async {
                match health().ready() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                    Err(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                }
            }),
        );
    // Histograms keep their samples until upkeep folds them in.
    let upkeep = shutdown.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = upkeep.cancelled() => return,
                _ = ticks.tick() => handle.run_upkeep(),
            }
        }
    });
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!("the metrics listener stopped: {error}");
        }
    });
    Ok(())
}

fn recorder() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .context("cannot set the histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_need_a_host_and_a_port() {
        assert!(parse_listen_address("0.0.0.0:9464").is_ok());
        assert!(parse_listen_address("localhost:0").is_ok());
        assert!(parse_listen_address("[::]:9464").is_ok());
        assert!(parse_listen_address("9464").is_err());
        assert!(parse_listen_address(":9464").is_err());
        assert!(parse_listen_address("host:http").is_err());
    }

    #[test]
    fn ready_when_every_check_passes() {
        let health = Health::default();
        assert_eq!(health.ready(), Err("starting".into()));
        health.set("broker", Err("not connected yet".into()));
        health.set("database", Ok(()));
        assert_eq!(health.ready(), Err("broker: not connected yet".into()));
        health.set("broker", Ok(()));
        assert_eq!(health.ready(), Ok(()));
    }
}
