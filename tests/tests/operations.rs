//! Operations end to end: every service's `/metrics` is valid Prometheus text
//! (`promtool check metrics`) and its `/health/*` answer; a real Prometheus (Debian's
//! package) with the project's configuration (`monitoring/`) scrapes the persister and
//! the brokers' exporters, sees every reading written and the lag back to 0; the
//! persister's readiness follows the database.

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bson::doc;
use serde_json::Value;
use tests::dashboard::http;
use tests::prometheus::{get, query, sample};
use tests::stored::{count, start_sensor};
use tests::{
    free_port, password, repo_root, spawn_brokers, spawn_mongo, spawn_stoppable_mongo, wait_for,
    wait_for_within, Brokers, Service,
};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How long Prometheus may take: a scrape every 5 s, and its start.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(60);

/// `/health/ready`'s status and body.
async fn ready(port: u16) -> (u16, String) {
    get(port, "/health/ready").await
}

async fn metrics(port: u16) -> String {
    let (status, body) = http(port, "GET", "/metrics", &[], None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// `promtool check metrics` on `text`: exit 0 and nothing to say.
async fn promtool_accepts(service: &str, text: &str) {
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/test installs Debian's prometheus)");
    let mut stdin = check.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).await.expect("write");
    drop(stdin);
    let output = check.wait_with_output().await.expect("promtool");
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool check metrics on {service}: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_valid_metrics_and_health() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let ports: Vec<(&str, u16)> = [
        "mongo-persister",
        "temperature-sensor",
        "pressure-sensor",
        "device-status",
        "mqtt-subscriber",
    ]
    .into_iter()
    .map(|name| (name, free_port()))
    .collect();
    let address = |port: u16| format!("127.0.0.1:{port}");
    let mut services: Vec<Service> = Vec::new();
    for (name, port) in &ports {
        let metrics_address = address(*port);
        let mut args = vec!["--metrics-address", metrics_address.as_str()];
        if name.ends_with("-sensor") {
            args.extend(["--interval", "0.1", "--qos", "1"]);
        }
        services.push(match *name {
            "mongo-persister" => brokers.start_persister(&mongo, &args),
            name => brokers.start_edge(name, &args),
        });
    }

    for (name, port) in &ports {
        let (status, body) = wait_for(
            &format!("{name} ready"),
            || ready(*port),
            |(status, _)| *status == 200,
        )
        .await;
        assert_eq!((status, body.as_str()), (200, "ready\n"), "{name}");
        let (live, _) = http(*port, "GET", "/health/live", &[], None).await;
        assert_eq!(live, 200, "{name}");
    }
    // Each service's own figures, once readings flowed.
    let (persister_port, subscriber_port) = (ports[0].1, ports[4].1);
    wait_for(
        "readings written",
        || metrics(persister_port),
        |text| sample(text, "iot_persister_documents_written_total").is_some_and(|n| n > 0.0),
    )
    .await;
    wait_for(
        "messages printed",
        || metrics(subscriber_port),
        |text| sample(text, "iot_messages_printed_total").is_some_and(|n| n > 0.0),
    )
    .await;
    for (name, port) in &ports {
        let text = metrics(*port).await;
        promtool_accepts(name, &text).await;
        assert_eq!(
            sample(&text, "iot_mqtt_connected"),
            Some(1.0),
            "{name}:\n{text}"
        );
        assert_eq!(sample(&text, "iot_ready"), Some(1.0), "{name}:\n{text}");
        let own = match *name {
            "mongo-persister" => "iot_persister_messages_received_total",
            "mqtt-subscriber" => "iot_mqtt_received_total",
            "device-status" => "iot_mqtt_published_total",
            _ => "iot_readings_made_total",
        };
        assert!(
            sample(&text, own).is_some_and(|n| n > 0.0),
            "{name} has no {own}:\n{text}"
        );
    }
    for mut service in services {
        service.stop_cleanly().await;
    }
}

/// A Prometheus with `monitoring/prometheus.yml` and `rules.yml` as they are, its
/// targets files written for this test's services, on a free port.
fn start_prometheus(
    dir: &Path,
    pipeline: &[(&str, u16)],
    brokers: &[(&str, u16)],
) -> (Service, u16) {
    let config = dir.join("prometheus");
    std::fs::create_dir_all(config.join("targets")).expect("folder");
    for file in ["prometheus.yml", "rules.yml"] {
        std::fs::copy(repo_root().join("monitoring").join(file), config.join(file)).expect("copy");
    }
    let targets = |label: &str, list: &[(&str, u16)]| {
        let entries: Vec<Value> = list
            .iter()
            .map(|(name, port)| serde_json::json!({ "targets": [format!("127.0.0.1:{port}")], "labels": { label: name } }))
            .collect();
        serde_json::to_string(&entries).expect("JSON")
    };
    std::fs::write(
        config.join("targets/pipeline.json"),
        targets("service", pipeline),
    )
    .expect("write");
    std::fs::write(
        config.join("targets/brokers.json"),
        targets("broker", brokers),
    )
    .expect("write");
    let port = free_port();
    let mut command = Command::new("prometheus");
    command
        .arg(format!(
            "--config.file={}",
            config.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            config.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    (Service::spawn("prometheus", command), port)
}

/// The broker exporter for the broker on `broker_port`, run as compose and the native
/// stack run it (`monitoring/mosquitto-exporter.sh`).
fn start_exporter(name: &str, broker_port: u16) -> (Service, u16) {
    let port = free_port();
    let mut command = Command::new(repo_root().join("monitoring/mosquitto-exporter.sh"));
    command
        .args([
            format!("127.0.0.1:{broker_port}"),
            "127.0.0.1".into(),
            port.to_string(),
        ])
        .env("MQTT2PROM_MQTT_USER", "mqtt-subscriber")
        .env("MQTT2PROM_MQTT_PASSWORD", password("mqtt-subscriber"));
    (Service::spawn(&format!("{name} exporter"), command), port)
}

async fn prometheus_says(port: u16, expr: &str, expected: f64) {
    wait_for_within(
        PROMETHEUS_WAIT,
        &format!("Prometheus: {expr} = {expected}"),
        || query(port, expr),
        |value| *value == Some(expected),
    )
    .await;
}

fn edge_exporters(brokers: &Brokers) -> [(Service, u16); 2] {
    [
        start_exporter("mosquitto-local", brokers.local.port),
        start_exporter("mosquitto-cloud", brokers.cloud.port),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_every_reading_and_readiness_follows_the_database() {
    let brokers = spawn_brokers().await;
    let Some(mut mongo) = spawn_stoppable_mongo().await else {
        return;
    };
    let db = mongo.database().await;
    let metrics_port = free_port();
    let metrics_address = format!("127.0.0.1:{metrics_port}");
    let mut persister = brokers.start_persister(&mongo, &["--metrics-address", &metrics_address]);
    wait_for(
        "the persister ready",
        || ready(metrics_port),
        |(status, _)| *status == 200,
    )
    .await;
    let [(_local_exporter, local_port), (_cloud_exporter, cloud_port)] = edge_exporters(&brokers);
    let (_prometheus, prometheus_port) = start_prometheus(
        brokers.dir(),
        &[("mongo-persister", metrics_port)],
        &[
            ("mosquitto-local", local_port),
            ("mosquitto-cloud", cloud_port),
        ],
    );

    // 200 readings: Prometheus sees them all written and nothing waiting.
    let mut sensor = start_sensor(&brokers, "ops-1", "200");
    sensor.expect_success().await;
    prometheus_says(
        prometheus_port,
        "iot_persister_documents_written_total",
        200.0,
    )
    .await;
    prometheus_says(prometheus_port, "iot_persister_lag_seconds", 0.0).await;
    prometheus_says(
        prometheus_port,
        "iot_ready{service=\"mongo-persister\"}",
        1.0,
    )
    .await;
    // The brokers' figures, through the exporter: both of the bridge's connections
    // (readings out, replay requests in) are up, clients connected.
    prometheus_says(
        prometheus_port,
        "count(mosquitto_bridge_connected{broker=\"mosquitto-local\"} == 1)",
        2.0,
    )
    .await;
    // $SYS figures come every 10 s: the persister, the bridge and the exporter itself.
    wait_for_within(
        PROMETHEUS_WAIT,
        "Prometheus: clients on the cloud broker",
        || {
            query(
                prometheus_port,
                "mosquitto_clients_connected{broker=\"mosquitto-cloud\"}",
            )
        },
        |clients| clients.is_some_and(|n| n >= 2.0),
    )
    .await;

    // The database stops: not ready, readings held.
    mongo.stop().await;
    let mut sensor = start_sensor(&brokers, "ops-2", "50");
    sensor.expect_success().await;
    let (status, body) = wait_for(
        "the persister not ready",
        || ready(metrics_port),
        |(status, _)| *status == 503,
    )
    .await;
    assert!(body.starts_with("not ready: database: "), "{status} {body}");
    assert_eq!(body.lines().count(), 1, "one line: {body}");
    wait_for(
        "readings held",
        || metrics(metrics_port),
        |text| sample(text, "iot_persister_buffered").is_some_and(|n| n > 0.0),
    )
    .await;

    // Back: ready again, everything written.
    assert!(mongo.start().await, "the database restarts");
    wait_for(
        "the persister ready again",
        || ready(metrics_port),
        |(status, _)| *status == 200,
    )
    .await;
    wait_for(
        "all 250 stored",
        || count(&db, doc! {}),
        |stored| *stored == 250,
    )
    .await;
    prometheus_says(
        prometheus_port,
        "iot_persister_documents_written_total",
        250.0,
    )
    .await;
    persister.stop_cleanly().await;
}

#[test]
fn the_monitoring_configuration_is_valid() {
    let dir = tempfile::tempdir().expect("folder");
    std::fs::create_dir_all(dir.path().join("targets")).expect("folder");
    for file in [
        "prometheus.yml",
        "rules.yml",
        "targets/pipeline.json",
        "targets/brokers.json",
    ] {
        std::fs::copy(
            repo_root().join("monitoring").join(file),
            dir.path().join(file),
        )
        .expect("copy");
    }
    let output = std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(dir.path().join("prometheus.yml"))
        .output()
        .expect("promtool runs");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
