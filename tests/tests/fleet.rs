//! Device fleets end to end: one sensor process for several devices, each on its own
//! topic with its own seq, through the bridge; one `device-status` process keeping
//! several presences, each with its own last will and its own `offline` on a stop.

use std::collections::BTreeMap;

use iot_core::payload::{decode, Decoded};
use rumqttc::Publish;
use tests::{spawn_brokers, TestClient};

fn text(message: &Publish) -> String {
    String::from_utf8(message.payload.to_vec()).expect("UTF-8 payload")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_publishes_for_a_fleet_each_device_on_its_topic_in_turn() {
    let brokers = spawn_brokers().await;
    let mut cloud = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    cloud.subscribe("/sensor/#").await;

    let args = [
        "--devices",
        "3",
        "--topic",
        "/sensor/{device}/temperature",
        "--format",
        "json",
        "--qos",
        "1",
        "--count",
        "9",
        "--interval",
        "0.15",
        "--no-retain",
    ];
    let mut sensor = brokers.start_edge("temperature-sensor", &args);
    sensor.expect_success().await;
    let summary = sensor.stderr();
    assert!(
        summary.contains("summary: 9 readings sent") && summary.contains("9 acknowledged"),
        "{summary}"
    );

    let mut arrivals = Vec::new();
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut boots = Vec::new();
    for _ in 0..9 {
        let message = cloud.next_message().await;
        let Ok(Decoded::Json(reading)) = decode(&message.payload) else {
            panic!("not a JSON reading: {}", text(&message));
        };
        let device = reading.device.expect("device");
        assert_eq!(message.topic, format!("/sensor/{device}/temperature"));
        assert!((20.0..=30.0).contains(&reading.value), "{}", reading.value);
        seqs.entry(device.clone())
            .or_default()
            .push(reading.seq.expect("seq"));
        boots.push(reading.boot.expect("boot"));
        arrivals.push(device);
    }
    // Each device counts its own readings from 1, all within the process's one boot.
    let expected: BTreeMap<String, Vec<u64>> = ["temp-0001", "temp-0002", "temp-0003"]
        .into_iter()
        .map(|device| (device.to_string(), vec![1, 2, 3]))
        .collect();
    assert_eq!(seqs, expected);
    boots.dedup();
    assert_eq!(boots.len(), 1, "{boots:?}");
    // Spread, not bunched: the devices take turns.
    assert_eq!(
        arrivals,
        ["temp-0001", "temp-0002", "temp-0003"].repeat(3),
        "devices did not take turns"
    );
    assert!(cloud.messages_so_far().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_of_a_status_fleet_has_its_own_will() {
    let brokers = spawn_brokers().await;
    let mut cloud = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    cloud.subscribe("/device/#").await;

    let args = [
        "--devices",
        "3",
        "--topic",
        "/device/{device}/status",
        "--device",
        "gw-01",
    ];
    let topics = [
        "/device/gw-01/status",
        "/device/gw-02/status",
        "/device/gw-03/status",
    ];
    let statuses = |messages: Vec<Publish>| {
        let mut seen: Vec<(String, String)> = messages
            .iter()
            .map(|message| (message.topic.clone(), text(message)))
            .collect();
        seen.sort();
        seen
    };
    let all = |status: &str| {
        topics
            .iter()
            .map(|topic| (topic.to_string(), status.to_string()))
            .collect::<Vec<_>>()
    };

    let mut fleet = brokers.start_edge("device-status", &args);
    let mut online = Vec::new();
    for _ in 0..3 {
        online.push(cloud.next_message().await);
    }
    assert_eq!(statuses(online), all("online"));

    // Killed: each connection's will fires on its own topic.
    fleet.kill().await;
    let mut offline = Vec::new();
    for _ in 0..3 {
        offline.push(cloud.next_message().await);
    }
    assert_eq!(statuses(offline), all("offline"));
    for topic in topics {
        let retained = TestClient::retained(brokers.cloud.port, topic).await;
        assert_eq!(text(&retained), "offline", "{topic}");
    }

    // Stopped: every device says `offline` itself before its connection closes.
    let mut fleet = brokers.start_edge("device-status", &args);
    let mut online = Vec::new();
    for _ in 0..3 {
        online.push(cloud.next_message().await);
    }
    assert_eq!(statuses(online), all("online"));
    fleet.stop_cleanly().await;
    let mut offline = Vec::new();
    for _ in 0..3 {
        offline.push(cloud.next_message().await);
    }
    assert_eq!(statuses(offline), all("offline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_fleet_on_one_topic_is_refused_with_exit_code_2() {
    let brokers = spawn_brokers().await;
    let mut fleet = brokers.start_edge("device-status", &["--devices", "3"]);
    let status = fleet.wait_exit().await;
    assert_eq!(status.code(), Some(2), "{}", fleet.stderr());
    let stderr = fleet.stderr();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("{device}"), "{stderr}");
}
