//! End-to-end tests of the MQTT half: real edge and cloud Mosquitto brokers from
//! `mosquitto/`, bridged, and the real sensor, status and subscriber binaries.

use std::process::Command;

use iot_core::payload::{decode, Decoded};
use rumqttc::{Publish, QoS};
use tests::{
    binary, make_certificates, spawn_brokers, spawn_service, start_brokers, Brokers, TestClient,
};

fn text(message: &Publish) -> String {
    String::from_utf8(message.payload.to_vec()).expect("UTF-8 payload")
}

/// A plain payload as the seed sent it: a number with exactly two decimals.
fn plain_value(message: &Publish) -> f64 {
    let payload = text(message);
    let (_, decimals) = payload
        .split_once('.')
        .unwrap_or_else(|| panic!("{payload:?} has no decimals"));
    assert_eq!(decimals.len(), 2, "{payload:?} should have two decimals");
    match decode(payload.as_bytes()) {
        Ok(Decoded::Number(value)) => value,
        other => panic!("{payload:?} is not a plain reading: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensor_readings_cross_the_bridge_on_the_seed_topics_retained() {
    let brokers = spawn_brokers().await;
    let mut cloud = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    cloud.subscribe("/sensor/#").await;

    let args = ["--count", "3", "--interval", "0.05"];
    let mut temperature = brokers.start_edge("temperature-sensor", &args);
    let mut pressure = brokers.start_edge("pressure-sensor", &args);
    temperature.expect_success().await;
    pressure.expect_success().await;

    let (mut temperatures, mut pressures) = (Vec::new(), Vec::new());
    while temperatures.len() < 3 || pressures.len() < 3 {
        let message = cloud.next_message().await;
        match message.topic.as_str() {
            "/sensor/temperature" => temperatures.push(plain_value(&message)),
            "/sensor/pressure" => pressures.push(plain_value(&message)),
            other => panic!("unexpected topic {other}"),
        }
    }
    assert_eq!((temperatures.len(), pressures.len()), (3, 3));
    assert!(
        temperatures.iter().all(|t| (20.0..=30.0).contains(t)),
        "{temperatures:?}"
    );
    assert!(
        pressures.iter().all(|p| (990.0..=1020.0).contains(p)),
        "{pressures:?}"
    );

    // The last reading of each is retained on the cloud broker for new subscribers.
    let retained = TestClient::retained(brokers.cloud.port, "/sensor/temperature").await;
    assert_eq!(plain_value(&retained), temperatures[2]);
    let retained = TestClient::retained(brokers.cloud.port, "/sensor/pressure").await;
    assert_eq!(plain_value(&retained), pressures[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_readings_count_seq_from_one_within_one_boot() {
    let brokers = spawn_brokers().await;
    let mut cloud = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    cloud.subscribe("/sensor/pressure").await;
    let args = [
        "--count",
        "4",
        "--interval",
        "0",
        "--format",
        "json",
        "--qos",
        "1",
        "--device",
        "pres-0042",
    ];
    let mut sensor = brokers.start_edge("pressure-sensor", &args);
    sensor.expect_success().await;

    let mut readings = Vec::new();
    for _ in 0..4 {
        match decode(&cloud.next_message().await.payload) {
            Ok(Decoded::Json(reading)) => readings.push(reading),
            other => panic!("not a JSON reading: {other:?}"),
        }
    }
    assert_eq!(
        readings
            .iter()
            .map(|r| r.seq.unwrap_or_default())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(readings
        .iter()
        .all(|r| r.device.as_deref() == Some("pres-0042")
            && r.unit.as_deref() == Some("hPa")
            && r.boot.is_some()
            && r.boot == readings[0].boot));
    assert!(readings.iter().all(|r| (990.0..=1020.0).contains(&r.value)));
}

/// Payloads that must come out as they went in, a non-UTF-8 one among them.
const PAYLOADS: [&[u8]; 5] = [
    b"23.41",
    br#"{"a":"b"}"#,
    b"two\nlines",
    &[0xff, 0xfe, b'x'],
    b"last",
];

/// Starts `mqtt-subscriber --count 5` with `args`, publishes [`PAYLOADS`] once it has
/// subscribed, and returns what it printed after it exited successfully.
async fn print_published(brokers: &Brokers, args: &[&str]) -> Vec<String> {
    let args = [args, &["--count", "5"]].concat();
    let mut subscriber = brokers.start_edge("mqtt-subscriber", &args);
    subscriber.wait_for_log("subscribed").await;
    let mut publisher = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    for payload in PAYLOADS {
        publisher
            .publish("/sensor/temperature", QoS::AtLeastOnce, false, payload)
            .await;
    }
    subscriber.expect_success().await;
    subscriber.stdout_lines()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_prints_exactly_the_published_messages_in_order_as_json() {
    let brokers = spawn_brokers().await;
    let lines = print_published(
        &brokers,
        &["--format", "json", "--client-id", "json-printer"],
    )
    .await;
    assert_eq!(lines.len(), PAYLOADS.len(), "{lines:?}");
    for (line, expected) in lines.iter().zip(PAYLOADS) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(value["topic"], "/sensor/temperature");
        assert_eq!(value["qos"], 1);
        assert_eq!(value["retain"], false);
        match std::str::from_utf8(expected) {
            Ok(text) => assert_eq!(value["payload"], text, "{line}"),
            Err(_) => assert_eq!(value["payload_base64"], "//54", "{line}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_prints_exactly_the_published_messages_in_order_as_text() {
    let brokers = spawn_brokers().await;
    let lines = print_published(&brokers, &["--client-id", "text-printer"]).await;
    let expected = [
        r#"23.41"#,
        r#"{"a":"b"}"#,
        r"two\nlines",
        r"\xff\xfex",
        "last",
    ];
    assert_eq!(lines.len(), expected.len(), "{lines:?}");
    for (line, payload) in lines.iter().zip(expected) {
        let (time, rest) = line.split_once(' ').expect("time first");
        assert!(time.ends_with('Z') && time.contains('T'), "{line}");
        assert_eq!(rest, format!("/sensor/temperature {payload}"));
    }
}

async fn next_status(cloud: &mut TestClient) -> String {
    text(&cloud.next_message().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_status_leaves_offline_on_the_cloud_when_killed_or_stopped() {
    let brokers = spawn_brokers().await;
    let mut cloud = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    cloud.subscribe("/device/status").await;

    // Killed: the broker publishes the will.
    let mut device = brokers.start_edge("device-status", &[]);
    assert_eq!(next_status(&mut cloud).await, "online");
    device.kill().await;
    assert_eq!(next_status(&mut cloud).await, "offline");
    assert_eq!(
        text(&TestClient::retained(brokers.cloud.port, "/device/status").await),
        "offline"
    );

    // Stopped with SIGTERM: the device says it itself (a will would not fire).
    let mut device = brokers.start_edge("device-status", &[]);
    assert_eq!(next_status(&mut cloud).await, "online");
    assert_eq!(
        text(&TestClient::retained(brokers.cloud.port, "/device/status").await),
        "online"
    );
    device.stop_cleanly().await;
    assert_eq!(next_status(&mut cloud).await, "offline");
    assert_eq!(
        text(&TestClient::retained(brokers.cloud.port, "/device/status").await),
        "offline"
    );
}

/// A session that comes back to more queued messages than MQTT has packet ids is
/// drained to the end, every message once and in order: the acknowledgements keep up
/// (they used to fall behind until the subscriber stalled for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_drains_a_queue_longer_than_the_packet_ids() {
    const QUEUED: u64 = 100_000;
    let queued = QUEUED.to_string();
    let brokers = spawn_brokers().await;
    let session = [
        "--client-id",
        "back-from-holiday",
        "--topic",
        "/sensor/pressure",
        "--format",
        "json",
    ];
    // On the cloud broker, whose larger in-flight window let the acknowledgements fall
    // furthest behind.
    let on_cloud = |args: &[&str]| {
        spawn_service(
            "mqtt-subscriber",
            brokers.dir(),
            brokers.cloud.port,
            Some("mqtt-subscriber"),
            args,
        )
    };
    let mut subscriber = on_cloud(&session);
    subscriber.wait_for_log("subscribed").await;
    subscriber.stop_cleanly().await;

    let sensor_flags = [
        "--count",
        &queued,
        "--interval",
        "0",
        "--qos",
        "1",
        "--no-retain",
        "--format",
        "json",
    ];
    let mut sensor = spawn_service(
        "pressure-sensor",
        brokers.dir(),
        brokers.cloud.port,
        Some("bridge"),
        &sensor_flags,
    );
    sensor.expect_success().await;
    assert!(
        sensor.stderr().contains(&format!("{QUEUED} acknowledged")),
        "{}",
        sensor.stderr()
    );

    let mut drain = on_cloud(&[&session[..], &["--count", &queued]].concat());
    drain.expect_success().await;
    let seqs: Vec<u64> = drain
        .stdout_lines()
        .iter()
        .map(|line| {
            let message: serde_json::Value = serde_json::from_str(line).expect("json line");
            let payload = message["payload"].as_str().expect("text payload");
            let reading: serde_json::Value = serde_json::from_str(payload).expect("json reading");
            reading["seq"].as_u64().expect("seq")
        })
        .collect();
    assert_eq!(seqs.len() as u64, QUEUED);
    assert!(
        seqs.iter().copied().eq(1..=QUEUED),
        "not every seq once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_session_keeps_what_was_published_while_it_was_stopped() {
    let brokers = spawn_brokers().await;
    let port = brokers.local.port;
    let session = [
        "--client-id",
        "night-shift",
        "--topic",
        "/sensor/#",
        "--format",
        "json",
    ];

    let mut subscriber = brokers.start_edge("mqtt-subscriber", &session);
    subscriber.wait_for_log("subscribed").await;
    subscriber.stop_cleanly().await;

    let mut publisher = TestClient::connect(port, "temperature-sensor").await;
    for n in 1..=5 {
        publisher
            .publish(
                "/sensor/temperature",
                QoS::AtLeastOnce,
                false,
                n.to_string().as_bytes(),
            )
            .await;
    }

    // Back with the same client id: it gets what it missed. --count 2 leaves the rest
    // unacknowledged, so the next run gets exactly those.
    let payloads = |subscriber: &tests::Service| -> Vec<String> {
        subscriber
            .stdout_lines()
            .iter()
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(line).expect("json")["payload"]
                    .as_str()
                    .expect("text")
                    .to_string()
            })
            .collect()
    };
    let mut first = brokers.start_edge(
        "mqtt-subscriber",
        &[&session[..], &["--count", "2"]].concat(),
    );
    first.expect_success().await;
    assert_eq!(payloads(&first), ["1", "2"]);
    let mut second = brokers.start_edge(
        "mqtt-subscriber",
        &[&session[..], &["--count", "3"]].concat(),
    );
    second.expect_success().await;
    assert_eq!(payloads(&second), ["3", "4", "5"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_refuse_wrong_passwords_anonymous_clients_and_foreign_topics() {
    let brokers = spawn_brokers().await;
    let port = brokers.local.port;

    // A wrong password: a clear message and a non-zero exit, no endless retries.
    let mut sensor = brokers.start_edge("temperature-sensor", &["--password", "wrong"]);
    let status = sensor.wait_exit().await;
    assert!(!status.success());
    let log = sensor.stderr();
    assert!(
        log.contains("refused the connection") && log.contains("LOCAL_PASSWORD"),
        "{log}"
    );

    // Anonymous clients: refused by both brokers.
    for broker in [&brokers.local, &brokers.cloud] {
        let anonymous = TestClient::try_connect(broker.port, None, "anonymous", true).await;
        assert!(
            anonymous.is_err(),
            "the {} broker accepted an anonymous client",
            broker.name
        );
    }

    // Topic rights: the temperature sensor may not publish pressure, and the subscriber
    // may not publish at all. Each forbidden publish is followed by an allowed one: the
    // observer must see only the allowed one.
    let mut observer = TestClient::connect(port, "mqtt-subscriber").await;
    observer.subscribe("/sensor/#").await;
    let forbidden = [
        "--topic",
        "/sensor/pressure",
        "--count",
        "1",
        "--qos",
        "1",
        "--no-retain",
    ];
    let mut intruder = brokers.start_edge("temperature-sensor", &forbidden);
    intruder.expect_success().await;
    let mut reader = TestClient::connect(port, "mqtt-subscriber").await;
    reader
        .publish("/sensor/temperature", QoS::AtLeastOnce, false, b"forged")
        .await;
    let allowed = [
        "--count",
        "1",
        "--qos",
        "1",
        "--no-retain",
        "--format",
        "json",
    ];
    let mut sensor = brokers.start_edge("temperature-sensor", &allowed);
    sensor.expect_success().await;
    let message = observer.next_message().await;
    assert_eq!(message.topic, "/sensor/temperature");
    assert!(observer.messages_so_far().await.is_empty());
    assert!(
        matches!(decode(&message.payload), Ok(Decoded::Json(_))),
        "got {:?}",
        message.payload
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_user_reads_nothing_even_subscribed_to_everything() {
    let brokers = spawn_brokers().await;
    let port = brokers.local.port;
    // Mosquitto grants the subscription and filters every message by the ACL.
    let mut snoop = TestClient::connect(port, "temperature-sensor").await;
    snoop.subscribe("#").await;
    let mut reader = TestClient::connect(port, "mqtt-subscriber").await;
    reader.subscribe("#").await;

    let mut pressure = TestClient::connect(port, "pressure-sensor").await;
    pressure
        .publish("/sensor/pressure", QoS::AtLeastOnce, false, b"1001.00")
        .await;
    assert_eq!(reader.next_message().await.payload.as_ref(), b"1001.00");
    let seen = snoop.messages_so_far().await;
    assert!(seen.is_empty(), "the sensor user read {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_reconnects_when_its_broker_comes_back() {
    let mut brokers = spawn_brokers().await;
    let port = brokers.local.port;
    let args = [
        "--interval",
        "0.1",
        "--format",
        "json",
        "--qos",
        "1",
        "--no-retain",
    ];
    let mut sensor = brokers.start_edge("temperature-sensor", &args);
    let seq = |message: Publish| match decode(&message.payload) {
        Ok(Decoded::Json(reading)) => reading.seq.expect("seq"),
        other => panic!("not a JSON reading: {other:?}"),
    };

    let mut before = TestClient::connect(port, "mqtt-subscriber").await;
    before.subscribe("/sensor/temperature").await;
    let last_before = seq(before.next_message().await);

    brokers.local.kill().await;
    sensor.wait_for_log("connection lost").await;
    assert!(
        brokers.local.start().await,
        "the broker did not come back:\n{}",
        brokers.local.log()
    );

    // New readings flow again. (What the crashed broker had not confirmed may come
    // first, sent again: at least once.)
    let mut after = TestClient::connect(port, "mqtt-subscriber").await;
    after.subscribe("/sensor/temperature").await;
    while seq(after.next_message().await) <= last_before {}
    sensor.wait_for_log("reconnected").await;
    assert!(sensor.is_running(), "{}", sensor.stderr());
    sensor.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscriber_subscribes_again_when_the_broker_lost_its_session() {
    let mut brokers = spawn_brokers().await;
    let args = ["--topic", "/sensor/temperature", "--count", "1"];
    let mut subscriber = brokers.start_edge("mqtt-subscriber", &args);
    subscriber.wait_for_log("subscribed").await;

    // Killed within its autosave interval, the broker comes back without the session.
    brokers.local.kill().await;
    assert!(brokers.local.start().await, "{}", brokers.local.log());
    subscriber.wait_for_logs("subscribed", 2).await;

    let mut publisher = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    publisher
        .publish("/sensor/temperature", QoS::AtLeastOnce, false, b"21.50")
        .await;
    subscriber.expect_success().await;
    let lines = subscriber.stdout_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].ends_with(" /sensor/temperature 21.50"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_runs_over_tls_and_refuses_a_certificate_from_another_ca() {
    // The usual pair: the bridge reaches the cloud broker on its TLS listener.
    let brokers = spawn_brokers().await;
    let tls_port = brokers.cloud.tls_port.expect("TLS port");
    brokers
        .cloud
        .wait_for_log(&format!("on port {tls_port}"))
        .await;
    brokers.cloud.wait_for_log("New bridge connected").await;

    // An edge broker that trusts another CA refuses the cloud's certificate.
    let other_ca = tempfile::tempdir().expect("tempdir");
    make_certificates(other_ca.path());
    let env = [("MQTT_CERTS_DIR", other_ca.path().display().to_string())];
    let brokers = start_brokers(&env).await;
    brokers
        .local
        .wait_for_log("certificate verify failed")
        .await;
    let mut watcher = TestClient::connect(brokers.local.port, "mqtt-subscriber").await;
    watcher.subscribe("$SYS/broker/connection/+/state").await;
    assert_eq!(watcher.next_message().await.payload.as_ref(), b"0");
    assert!(
        !brokers.cloud.log().contains("New bridge connected"),
        "{}",
        brokers.cloud.log()
    );
}

/// A binary run with a bad setting, and what its error line must name.
struct BadSetting {
    binary: &'static str,
    args: &'static [&'static str],
    env: Option<(&'static str, &'static str)>,
    names: [&'static str; 2],
}

#[test]
fn bad_settings_are_one_line_naming_the_setting_with_exit_code_2() {
    let cases = [
        BadSetting {
            binary: "temperature-sensor",
            args: &["--qos", "3"],
            env: None,
            names: ["--qos", "TEMPERATURE_QOS"],
        },
        BadSetting {
            binary: "pressure-sensor",
            args: &["--interval", "soon"],
            env: None,
            names: ["--interval", "PRESSURE_INTERVAL"],
        },
        BadSetting {
            binary: "mqtt-subscriber",
            args: &[],
            env: Some(("LOCAL_PORT", "abc")),
            names: ["--port", "LOCAL_PORT"],
        },
        BadSetting {
            binary: "device-status",
            args: &["--password", "secret"],
            env: None,
            names: ["--username", "LOCAL_USERNAME"],
        },
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for case in cases {
        let mut command = Command::new(binary(case.binary));
        command
            .args(case.args)
            .env_remove("LOCAL_USERNAME")
            .current_dir(dir.path());
        if let Some((key, value)) = case.env {
            command.env(key, value);
        }
        let output = command.output().expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let what = format!("{} {:?}: {stderr:?}", case.binary, case.args);
        assert_eq!(output.status.code(), Some(2), "{what}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{what}");
        for name in case.names {
            assert!(stderr.contains(name), "{what} does not name {name}");
        }
    }
}

/// `mosquitto_passwd` splits a line at ':' and trims blanks around the password, so
/// such a password would be stored changed and every login with it would fail:
/// `mosquitto/setup.sh` refuses it, naming the variable, and writes no password file.
#[test]
fn broker_set_up_refuses_a_password_the_password_file_would_change() {
    for bad in ["a:b", "secret ", " secret"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = Command::new(tests::repo_root().join("mosquitto/setup.sh"))
            .args(["cloud", &dir.path().join("cloud").to_string_lossy()])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("BRIDGE_PASSWORD", bad)
            .env("MQTT_SUBSCRIBER_PASSWORD", "fine")
            .env("MONGO_PERSISTER_PASSWORD", "fine")
            .output()
            .expect("setup.sh runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(stderr.contains("BRIDGE_PASSWORD"), "{bad:?}: {stderr}");
        assert!(
            !dir.path().join("cloud/passwd").exists(),
            "{bad:?}: a password file was written"
        );
    }
}
