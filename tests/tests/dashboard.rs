//! The Node-RED dashboard (`nodered/`) in a real browser: Node-RED with the project's
//! settings and flows reads the cloud broker as its read-only user; readings published
//! on the edge cross the bridge and show on the gauges and in the table of a headless
//! Chromium (the charts draw on a canvas, whose lines the page's text does not hold); a
//! device killed without a word turns `offline` there through its last will. The
//! editor and its API answer only to the admin password.
//!
//! `DASHBOARD_SCREENSHOT=PATH` saves the page as a PNG at the end: the README's picture
//! (its Dashboard section says how).

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use rumqttc::QoS;
use tests::dashboard::{http, spawn_node_red, Browser};
use tests::{spawn_brokers, TestClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_readings_and_device_presence() {
    let brokers = spawn_brokers().await;
    let node_red = spawn_node_red(&brokers, None).await;

    // Two devices: the seed's single /device/status and one of a fleet.
    let mut gateway = brokers.start_edge("device-status", &[]);
    let mut fleet_device = brokers.start_edge(
        "device-status",
        &[
            "--topic",
            "/device/{device}/status",
            "--device",
            "gateway-02",
        ],
    );
    gateway.wait_for_log("status online").await;
    fleet_device.wait_for_log("status online").await;

    // Real sensors fill the charts and the table first...
    let mut temperature = brokers.start_edge(
        "temperature-sensor",
        &[
            "--format",
            "json",
            "--qos",
            "1",
            "--interval",
            "0.05",
            "--count",
            "40",
        ],
    );
    let mut pressure = brokers.start_edge(
        "pressure-sensor",
        &["--qos", "1", "--interval", "0.05", "--count", "40"],
    );
    temperature.expect_success().await;
    pressure.expect_success().await;
    // ...then readings with known values, one plain (the seed's format), one JSON.
    let mut sensor = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    sensor
        .publish("/sensor/temperature", QoS::AtLeastOnce, true, b"23.45")
        .await;
    let mut sensor = TestClient::connect(brokers.local.port, "pressure-sensor").await;
    let reading = r#"{"device":"press-0042","boot":"e2e","seq":7,"ts":"2026-11-26T08:15:00.000Z","value":1001.25,"unit":"hPa"}"#;
    sensor
        .publish(
            "/sensor/pressure",
            QoS::AtLeastOnce,
            true,
            reading.as_bytes(),
        )
        .await;

    let mut browser = Browser::launch();
    browser.open(&node_red.dashboard_url()).await;
    let gauge = browser
        .wait_for_text(".nrdb-ui-gauge:has-text('Temperature')", "23.45")
        .await;
    assert!(gauge.contains("°C"), "temperature gauge: {gauge}");
    let gauge = browser
        .wait_for_text(".nrdb-ui-gauge:has-text('Pressure')", "1001.25")
        .await;
    assert!(gauge.contains("hPa"), "pressure gauge: {gauge}");
    // The JSON reading's device and device time are in the table of last readings.
    let row = browser.wait_for_text("tr", "press-0042").await;
    assert!(
        row.contains("2026-11-26 08:15:00") && row.contains("1001.25"),
        "table row: {row}"
    );

    let online = "[data-status='online']";
    browser
        .wait_for_text(&format!("[data-device='/device/status']{online}"), "online")
        .await;
    browser
        .wait_for_text(&format!("[data-device='gateway-02']{online}"), "online")
        .await;

    // SIGKILL: no goodbye, so only the broker's last will can tell.
    gateway.kill().await;
    let shown = browser
        .wait_for_text(
            "[data-device='/device/status'][data-status='offline']",
            "offline",
        )
        .await;
    assert!(shown.contains("since"), "status indicator: {shown}");
    browser
        .wait_for_text(&format!("[data-device='gateway-02']{online}"), "online")
        .await;

    if let Some(path) = std::env::var_os("DASHBOARD_SCREENSHOT") {
        browser.screenshot(std::path::Path::new(&path)).await;
    }
    fleet_device.stop_cleanly().await;
    assert!(
        !node_red
            .service
            .stdout_lines()
            .iter()
            .any(|line| line.contains("[error]")),
        "Node-RED logged errors:\n{}",
        node_red.service.stdout_lines().join("\n")
    );
}

/// Asks Node-RED's admin API for the editor user `admin`'s token with `password`.
async fn ask_token(port: u16, password: &str) -> (u16, String) {
    let form = format!(
        "client_id=node-red-editor&grant_type=password&scope=*&username=admin&password={password}"
    );
    http(port, "POST", "/auth/token", &[], Some(&form)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_editor_and_its_api_answer_only_to_the_admin_password() {
    let brokers = spawn_brokers().await;

    // No admin password: no editor and no API that could deploy a flow.
    let node_red = spawn_node_red(&brokers, None).await;
    for path in ["/", "/flows", "/settings"] {
        let (status, _) = http(node_red.port, "GET", path, &[], None).await;
        assert_eq!(status, 404, "GET {path} without an admin password");
    }
    let (status, _) = http(node_red.port, "GET", "/dashboard/", &[], None).await;
    assert_eq!(status, 200, "the dashboard is served all the same");
    drop(node_red);

    let node_red = spawn_node_red(&brokers, Some("editor-test-secret")).await;
    let (status, _) = http(node_red.port, "GET", "/flows", &[], None).await;
    assert_eq!(status, 401, "the flows without logging in");
    let (status, _) = ask_token(node_red.port, "guess").await;
    assert_eq!(status, 403, "a wrong password");
    let (status, body) = ask_token(node_red.port, "editor-test-secret").await;
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).expect("a JSON token");
    let bearer = format!(
        "Authorization: Bearer {}",
        token["access_token"].as_str().expect("access_token")
    );
    let (status, flows) = http(node_red.port, "GET", "/flows", &[&bearer], None).await;
    assert_eq!(status, 200);
    assert!(flows.contains("cloud-broker"), "{flows}");
}
