//! Hostile input end to end: payloads of 0 bytes and 1 MiB, bytes that are not UTF-8,
//! JSON with NaN, huge numbers, deep nesting and wrong types, and a topic with unusual
//! but legal characters, published at QoS 1 on the edge. The persister stores each as
//! a reading or as a flagged raw record (cut at 64 KiB) and keeps running; the
//! subscriber prints each as a valid JSON line.

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use bson::{doc, Document};
use futures_util::TryStreamExt;
use rumqttc::QoS;
use tests::{spawn_brokers, spawn_mongo, wait_for, TestClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_are_stored_or_flagged_and_printed_as_valid_json() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let persister = brokers.persister_ready(&mongo, &[]).await;
    let odd_topic = "/sensor/wärme 1 (ü)/temperature";
    let deep = format!("{{\"value\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    let big = vec![b'x'; 1024 * 1024];
    let reading = br#"{"device":"h-1","boot":"b","seq":1,"value":21.5,"unit":"C"}"#;
    let messages: Vec<(&str, &[u8])> = vec![
        ("/sensor/temperature", b""),
        ("/sensor/temperature", &big),
        ("/sensor/temperature", &[0xff, 0x00, 0xfe, b'\n']),
        ("/sensor/temperature", br#"{"value": NaN}"#),
        ("/sensor/temperature", br#"{"value": 1e999}"#),
        ("/sensor/temperature", deep.as_bytes()),
        ("/sensor/temperature", br#"{"value": "21.5", "seq": -1}"#),
        (odd_topic, b"21.50"),
        ("/sensor/temperature", reading),
    ];
    let count = messages.len().to_string();
    let mut subscriber = brokers.start_edge(
        "mqtt-subscriber",
        &[
            "--topic",
            "/sensor/#",
            "--format",
            "json",
            "--count",
            &count,
        ],
    );
    subscriber.wait_for_log("subscribed").await;

    let mut sensor = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    for (topic, payload) in &messages {
        sensor
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await;
    }

    // The subscriber: one valid JSON line per message, payloads intact.
    subscriber.expect_success().await;
    let lines = subscriber.stdout_lines();
    assert_eq!(lines.len(), messages.len());
    for (line, (topic, payload)) in lines.iter().zip(&messages) {
        let printed: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {:.200}", line));
        assert_eq!(printed["topic"], *topic);
        let bytes = match printed["payload"].as_str() {
            Some(text) => text.as_bytes().to_vec(),
            None => base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                printed["payload_base64"]
                    .as_str()
                    .expect("payload or payload_base64"),
            )
            .expect("base64"),
        };
        assert_eq!(&bytes, payload);
    }

    // The persister: two readings, seven flagged records, the big one cut.
    let db = mongo.database().await;
    let readings = db.collection::<Document>("readings");
    let stored = wait_for(
        "every message stored",
        || async {
            readings
                .find(doc! {})
                .await
                .expect("find")
                .try_collect::<Vec<Document>>()
                .await
                .unwrap_or_default()
        },
        |documents| documents.len() == messages.len(),
    )
    .await;
    let flagged: Vec<&Document> = stored
        .iter()
        .filter(|d| d.get_bool("unparsed") == Ok(true))
        .collect();
    assert_eq!(flagged.len(), 7, "{stored:?}");
    let values: Vec<f64> = stored
        .iter()
        .filter_map(|d| d.get_f64("value").ok())
        .collect();
    assert_eq!(values, [21.5, 21.5]);
    assert!(stored.iter().any(|d| d.get_str("topic") == Ok(odd_topic)));
    let cut = flagged
        .iter()
        .find(|d| d.get_bool("raw_truncated") == Ok(true))
        .expect("the 1 MiB payload, cut");
    assert_eq!(cut.get_str("raw").expect("raw").len(), 64 * 1024);
    let size = cut
        .get_i64("raw_size")
        .or_else(|_| cut.get_i32("raw_size").map(i64::from));
    assert_eq!(size, Ok(1024 * 1024));
    persister.wait_for_log("written=9").await;
}
