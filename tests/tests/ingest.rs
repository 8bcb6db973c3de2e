//! Real devices end to end: the firmware documentation's messages
//! (`tests/fixtures/ingest/`), published on the edge broker by device accounts made
//! with `scripts/add-device`, carried by the bridge, and stored by `mongo-persister`
//! with every preset as the ingest contract says; a bad mapping file; and device
//! accounts that can publish their own topics only, and not log in once removed,
//! without the broker being restarted.

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use std::collections::BTreeMap;

use bson::{doc, Document};
use iot_store::ingest::fixtures::{laid_out, messages, Expect, Message, ALL_PRESETS, LAYOUTS};
use rumqttc::QoS;
use serde_json::Value;
use tests::stored::count;
use tests::{binary, repo_root, spawn_brokers, spawn_mongo, wait_for, TestClient};

/// The account a message is published by: the first topic level that names one, the
/// way each preset's ACL gives a device its topics.
fn account_of<'a>(topic: &str, accounts: &'a [(String, String)]) -> &'a (String, String) {
    topic
        .split('/')
        .find_map(|level| accounts.iter().find(|(name, _)| name == level))
        .unwrap_or_else(|| panic!("no device account publishes {topic}"))
}

/// One stored reading as the fixtures describe it.
type Reading = (
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<i64>,
);

fn reading_of(document: &Document) -> Reading {
    let text = |field: &str| document.get_str(field).ok().map(String::from);
    let ts = document.get_datetime("ts").expect("ts").timestamp_millis();
    let received = document
        .get_datetime("received_at")
        .expect("received_at")
        .timestamp_millis();
    (
        text("topic").unwrap_or_default(),
        text("device"),
        text("measurement").unwrap_or_default(),
        format!("{:.4}", document.get_f64("value").expect("a double value")),
        text("unit"),
        // Device time, or None when it is the time the persister received it.
        (ts != received).then_some(ts),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_devices_messages_are_stored_as_the_contract_says() {
    store_the_fixtures_through_the_brokers(false).await;
}

/// The Tasmota FullTopic `emoncms/ch2i/factory/%topic%/%prefix%/`, a two-level ESPHome
/// prefix, changed Zigbee2MQTT and statestream base topics, a Shelly Gen2 prefix: the
/// accounts made with the layout, the persister given it, every message stored as with
/// the firmware's default layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_laid_out_by_their_owners_are_stored_as_with_the_default_layout() {
    store_the_fixtures_through_the_brokers(true).await;
}

/// The account a fixture message's device logs in with: the topic level its preset's
/// ACL binds to the account (with `laid`, in the layouts of [`LAYOUTS`]).
fn account_name(message: &Message, laid: bool) -> String {
    let level = |n: usize| {
        message
            .topic
            .split('/')
            .nth(n)
            .unwrap_or_default()
            .to_string()
    };
    match (message.preset, laid) {
        ("tasmota", false) => level(1),
        ("tasmota", true) => level(3),
        ("shelly", false) if level(0) == "shellies" => level(1),
        (_, false) => level(0),
        (_, true) => level(1),
    }
}

/// Publishes every fixture message (laid out by its owner's layout with `laid`) as its
/// device, through both brokers, and checks what the persister stored.
async fn store_the_fixtures_through_the_brokers(laid: bool) {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let fixtures: Vec<Message> = match laid {
        false => messages(),
        true => messages().iter().map(laid_out).collect(),
    };
    let spec_of = |preset: &str| {
        LAYOUTS
            .iter()
            .find(|(name, _)| laid && *name == preset)
            .map_or(preset.to_string(), |(_, spec)| spec.to_string())
    };

    // One account per device the fixtures publish as, each with its preset.
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for message in &fixtures {
        names.insert(account_name(message, laid), spec_of(message.preset));
    }
    let accounts: Vec<(String, String)> = names
        .iter()
        .map(|(name, preset)| (name.clone(), brokers.local.add_device(name, preset)))
        .collect();
    let ingest: Vec<String> = ALL_PRESETS.iter().map(|preset| spec_of(preset)).collect();

    let ready = brokers.dir().join("persister.ready");
    let ready_arg = ready.to_string_lossy().into_owned();
    let mut persister = brokers.start_persister(
        &mongo,
        &[
            "--ingest",
            &ingest.join(","),
            "--device-timezone",
            "Europe/Berlin",
            "--ready-file",
            &ready_arg,
        ],
    );
    persister
        .wait_for_log("ready: every subscription stands")
        .await;

    // Publish every message as its device, at QoS 1, in order per device.
    let mut clients: BTreeMap<String, TestClient> = BTreeMap::new();
    for (name, password) in &accounts {
        let client = brokers.local.log_in(name, password).await;
        clients.insert(name.clone(), client);
    }
    let mut want_readings: Vec<Reading> = Vec::new();
    let mut want_status: Vec<(String, String)> = Vec::new();
    let mut want_flagged: BTreeMap<String, u64> = BTreeMap::new();
    let mut nothing = 0;
    for message in &fixtures {
        let topic = message.topic.as_str();
        let (name, _) = account_of(topic, &accounts);
        let client = clients.get_mut(name).expect("a client");
        client
            .publish(topic, QoS::AtLeastOnce, false, &message.payload)
            .await;
        match &message.expect {
            Expect::Nothing => nothing += 1,
            Expect::Flagged => *want_flagged.entry(topic.to_string()).or_default() += 1,
            Expect::Status { device, online } => want_status.push((
                device.clone(),
                if *online { "online" } else { "offline" }.to_string(),
            )),
            Expect::Readings {
                device,
                ts,
                readings,
            } => {
                for (measurement, (value, unit)) in readings {
                    want_readings.push((
                        topic.to_string(),
                        device.clone(),
                        measurement.clone(),
                        format!("{value:.4}"),
                        unit.clone(),
                        ts.map(|ts| ts.timestamp_millis()),
                    ));
                }
            }
        }
    }

    // Everything arrives: each reading, each flagged payload, each status change.
    let flagged: u64 = want_flagged.values().sum();
    let expected = want_readings.len() as u64 + flagged;
    wait_for(
        "every reading and flagged payload stored",
        || count(&db, doc! {}),
        |stored| *stored >= expected,
    )
    .await;
    let status = db.collection::<Document>("status");
    wait_for(
        "every status change stored",
        || async { status.count_documents(doc! {}).await.expect("count") },
        |stored| *stored >= want_status.len() as u64,
    )
    .await;

    let readings = db.collection::<Document>("readings");
    let stored: Vec<Document> = futures_util::TryStreamExt::try_collect(
        readings
            .find(doc! { "unparsed": { "$ne": true } })
            .await
            .expect("find"),
    )
    .await
    .expect("documents");
    let mut got: Vec<Reading> = stored.iter().map(reading_of).collect();
    got.sort();
    want_readings.sort();
    assert_eq!(got, want_readings);
    for (topic, times) in &want_flagged {
        assert_eq!(
            count(&db, doc! { "topic": topic, "unparsed": true }).await,
            *times,
            "flagged on {topic}"
        );
    }
    assert_eq!(count(&db, doc! {}).await, expected, "nothing else stored");

    let statuses: Vec<Document> =
        futures_util::TryStreamExt::try_collect(status.find(doc! {}).await.expect("find"))
            .await
            .expect("documents");
    let mut got_status: Vec<(String, String)> = statuses
        .iter()
        .map(|document| {
            (
                document.get_str("device").expect("device").to_string(),
                document.get_str("status").expect("status").to_string(),
            )
        })
        .collect();
    got_status.sort();
    want_status.sort();
    assert_eq!(got_status, want_status);

    // `readings devices` names them, with their measurements and status.
    let output = tests::run_readings(
        mongo.uri(),
        mongo.database_name(),
        &["devices", "--format", "json"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let devices: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let living_room = devices
        .as_array()
        .expect("rows")
        .iter()
        .find(|row| row["device"] == "living_room")
        .expect("living_room listed");
    assert_eq!(living_room["status"], "online");
    assert_eq!(
        living_room["measurements"],
        "battery humidity linkquality temperature"
    );
    // And range by device and measurement.
    let output = tests::run_readings(
        mongo.uri(),
        mongo.database_name(),
        &[
            "range",
            "--device",
            "tasmota_ABC",
            "--measurement",
            "BME280.Pressure",
            "--since",
            "2026-11-24T00:00:00Z",
            "--format",
            "json",
        ],
    );
    let rows: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    assert_eq!(rows[0]["unit"], "hPa");

    // Messages with nothing to store were counted, and the persister kept running.
    assert!(
        persister.is_running(),
        "the persister stopped:\n{}",
        persister.stderr()
    );
    persister.stop_cleanly().await;
    assert!(
        persister.stderr().contains(&format!("ignored={nothing} ")),
        "{nothing} messages with nothing to store:\n{}",
        persister.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_mapping_file_is_one_error_naming_the_file_and_the_rule() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let file = dir.path().join("mine.toml");
    std::fs::write(
        &file,
        "[[rule]]\ntopic = \"tele/{device}/SENSOR\"\n\n[[rule]]\ntopic = \"stat/{device}/{measurement}\"\npayload = \"xml\"\n",
    )
    .expect("write");
    // The persister refuses `ingest` at start: exit 2, one line; its stderr.
    let refused = |ingest: &[&std::ffi::OsStr]| {
        let mut command = std::process::Command::new(binary("mongo-persister"));
        for source in ingest {
            command.arg("--ingest").arg(source);
        }
        let output = command
            .env_clear()
            .current_dir(dir.path())
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(2), "{ingest:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        stderr
    };
    let stderr = refused(&["tasmota".as_ref(), file.as_os_str()]);
    assert!(
        stderr.contains(&format!("{}: rule 2 (line 6)", file.display())),
        "{stderr}"
    );
    assert!(stderr.contains("xml"), "{stderr}");

    // A layout parameter that makes no sense: the same, at start.
    for (ingest, says) in [
        ("tasmota:fulltopic=home/%topic%/", "%prefix%"),
        ("zigbee2mqtt:topic_prefix=home", "base_topic=VALUE"),
    ] {
        let stderr = refused(&[ingest.as_ref()]);
        assert!(stderr.contains(says), "{ingest}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_account_publishes_its_own_topics_only_and_is_gone_once_removed() {
    let brokers = spawn_brokers().await;
    let edge_pid = brokers.local.pid();
    let bridge_connections = brokers.local.log().matches("Connecting bridge").count();
    let password = brokers.local.add_device("plug_1", "tasmota");
    let mut cloud = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    cloud.subscribe("tele/#").await;

    let mut plug = brokers.local.log_in("plug_1", &password).await;
    // Another device's topic is refused, its own arrives on the cloud broker: the
    // refused one, published first on the same connection, would have come first.
    plug.publish("tele/plug_2/SENSOR", QoS::AtLeastOnce, false, b"{\"x\":1}")
        .await;
    plug.publish("tele/plug_1/SENSOR", QoS::AtLeastOnce, false, b"{\"x\":2}")
        .await;
    let first = cloud.next_message().await;
    assert_eq!(first.topic, "tele/plug_1/SENSOR");
    assert!(
        TestClient::try_connect_as(brokers.local.port, "plug_1", "wrong")
            .await
            .is_err()
    );

    brokers.local.remove_device("plug_1");
    let refused = wait_for(
        "the removed account to be refused",
        || TestClient::try_connect_as(brokers.local.port, "plug_1", &password),
        Result::is_err,
    )
    .await;
    assert!(refused.is_err());
    // Neither change restarted the broker or reconnected the bridge.
    assert_eq!(brokers.local.pid(), edge_pid);
    assert_eq!(
        brokers.local.log().matches("Connecting bridge").count(),
        bridge_connections
    );
    // A second account for an existing name is refused.
    brokers.local.add_device("plug_9", "tasmota");
    let again = std::process::Command::new(repo_root().join("scripts/add-device"))
        .args(["plug_9", "--preset", "tasmota", "--conf-dir"])
        .arg(brokers.dir().join("local"))
        .output()
        .expect("runs");
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_device_states_replayed_to_a_new_session_are_not_stored_twice() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    // ESPHome retains its states; a Zigbee2MQTT state is retained when set so.
    let node = brokers.local.add_device("esp-1", "esphome");
    let zigbee = brokers.local.add_device("zigbee2mqtt", "zigbee2mqtt");
    let mut node = brokers.local.log_in("esp-1", &node).await;
    let mut zigbee = brokers.local.log_in("zigbee2mqtt", &zigbee).await;
    node.publish(
        "esp-1/sensor/outdoor/state",
        QoS::AtLeastOnce,
        true,
        b"12.3",
    )
    .await;
    zigbee
        .publish(
            "zigbee2mqtt/room",
            QoS::AtLeastOnce,
            true,
            br#"{"temperature":21.5,"humidity":40}"#,
        )
        .await;
    TestClient::retained(brokers.cloud.port, "zigbee2mqtt/room").await;

    let args = |id: &'static str| {
        [
            "--ingest",
            "esphome,zigbee2mqtt",
            "--client-id",
            id,
            "--stats-interval",
            "0.1",
        ]
    };
    let mut first = brokers.start_persister(&mongo, &args("first"));
    wait_for(
        "three measurements stored",
        || count(&db, doc! {}),
        |n| *n == 3,
    )
    .await;
    first.stop_cleanly().await;

    // A new session gets both replayed: each measurement is recognised as stored.
    let mut second = brokers.start_persister(&mongo, &args("second"));
    second.wait_for_log("skipped=3").await;
    assert_eq!(count(&db, doc! {}).await, 3);
    second.stop_cleanly().await;
}
