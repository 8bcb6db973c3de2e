//! One device account cannot hurt anyone else's data (docs/brokers-and-security.md): through the
//! project's brokers and an account made by `scripts/add-device`, an attacker forges
//! another device's readings and status, sends ids past their bounds, floods the
//! repairer, answers `gone` for others; a bridge account asks for replays; a device
//! name breaks the ACL file; a copy of `.env.example` runs a reachable broker. Each
//! does nothing to the others.

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bson::{doc, Document};
use futures_util::TryStreamExt;
use rumqttc::QoS;
use tests::stored::{assert_exactly_once, count, stored_seqs, wait_for_readings};
use tests::{repo_root, run_readings, spawn_brokers, spawn_mongo, wait_for, TestClient};

/// The boot of `device`'s first stored reading, once there is one.
async fn boot_of(db: &mongodb::Database, device: &str) -> String {
    wait_for(
        &format!("a reading of {device}"),
        || async {
            db.collection::<Document>("readings")
                .find_one(doc! { "device": device, "boot": { "$exists": true } })
                .await
                .ok()
                .flatten()
        },
        Option::is_some,
    )
    .await
    .and_then(|document| document.get_str("boot").ok().map(String::from))
    .expect("a boot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_account_cannot_forge_another_devices_readings_or_status() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let persister = brokers.persister_ready(&mongo, &[]).await;
    // The honest sensor streams 300 JSON readings at QoS 1 for about 6 s.
    let honest_args = [
        "--format",
        "json",
        "--qos",
        "1",
        "--interval",
        "0.02",
        "--no-retain",
        "--count",
        "300",
        "--device",
        "temp-0001",
    ];
    let mut honest = brokers.start_edge("temperature-sensor", &honest_args);
    let boot = boot_of(&db, "temp-0001").await;

    // The attacker's account, made as docs/real-devices.md says, claims temp-0001's boot and
    // every seq, on its own topics (the only ones its ACL lets it write).
    let password = brokers.local.add_device("evil", "default");
    let mut evil = brokers.local.log_in("evil", &password).await;
    for seq in 1..=300 {
        let forged = format!(
            r#"{{"device":"temp-0001","boot":"{boot}","seq":{seq},"value":99.99,"unit":"°C"}}"#
        );
        evil.publish(
            "/sensor/evil/temperature",
            QoS::AtLeastOnce,
            false,
            forged.as_bytes(),
        )
        .await;
    }
    evil.publish(
        "/device/evil/status",
        QoS::AtLeastOnce,
        false,
        br#"{"device":"temp-0001","status":"offline"}"#,
    )
    .await;
    honest.expect_success().await;

    // Every genuine reading stored once, with its own value; none forged under it.
    wait_for_readings(&db, doc! { "device": "temp-0001" }, 300).await;
    assert_exactly_once(&stored_seqs(&db, "temp-0001").await, 300);
    assert_eq!(
        count(&db, doc! { "device": "temp-0001", "value": 99.99 }).await,
        0
    );
    // The forged ones are kept, flagged with both names.
    let flagged = doc! {
        "identity": "mismatch", "topic_device": "evil", "claimed_device": "temp-0001",
        "topic": "/sensor/evil/temperature",
    };
    wait_for_readings(&db, flagged, 300).await;
    // The forged status changed nothing of temp-0001's; it is flagged too.
    wait_for_readings(
        &db,
        doc! { "identity": "mismatch", "topic": "/device/evil/status" },
        1,
    )
    .await;
    let statuses = db
        .collection::<Document>("status")
        .count_documents(doc! { "device": "temp-0001" })
        .await
        .expect("count");
    assert_eq!(statuses, 0);
    persister
        .wait_for_log("the payload names a device its topic does not vouch for")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_id_past_its_bound_is_flagged_and_never_becomes_a_topic() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let persister = brokers
        .persister_ready(&mongo, &["--repair-after", "1"])
        .await;
    let mut requests = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    requests.subscribe("/replay/#").await;

    // Two readings of a 65 530-character device with a hole between them, on the
    // seed's topic (which names no device), as the sensor service's account.
    let long = "d".repeat(65_530);
    let mut sensor = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    for seq in [1, 5] {
        let payload = format!(r#"{{"device":"{long}","boot":"b","seq":{seq},"value":1.5}}"#);
        sensor
            .publish(
                "/sensor/temperature",
                QoS::AtLeastOnce,
                false,
                payload.as_bytes(),
            )
            .await;
    }
    // Then an honest device with a hole of its own.
    for seq in [1, 2, 5] {
        let payload = format!(r#"{{"device":"short","boot":"b","seq":{seq},"value":2.5}}"#);
        sensor
            .publish(
                "/sensor/temperature",
                QoS::AtLeastOnce,
                false,
                payload.as_bytes(),
            )
            .await;
    }
    wait_for_readings(&db, doc! { "device": "short" }, 3).await;
    wait_for_readings(
        &db,
        doc! { "unparsed": true, "topic": "/sensor/temperature" },
        2,
    )
    .await;
    // The honest hole is asked for: the persister is connected and repairing, and it
    // never published a request for the long device.
    let request = requests.next_message().await;
    assert_eq!(request.topic, "/replay/short/request");
    let rest = requests.messages_so_far().await;
    assert!(rest.iter().all(|message| message.topic.len() < 200));
    assert!(persister.stderr().contains("subscribed"));
    assert!(
        !persister.stderr().contains("unsolicited"),
        "{}",
        persister.stderr()
    );
    // And still storing.
    sensor
        .publish("/sensor/temperature", QoS::AtLeastOnce, false, b"21.5")
        .await;
    wait_for_readings(
        &db,
        doc! { "topic": "/sensor/temperature", "value": 21.5 },
        1,
    )
    .await;
}

/// The persister's peak memory (VmHWM), in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// The stated bound on the persister's memory under a hostile account's flood
/// (docs/brokers-and-security.md), for a debug build.
const MEMORY_BOUND_KIB: u64 = 128 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_account_cannot_starve_another_devices_repair() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let repair_after = 3;
    let persister = brokers
        .persister_ready(&mongo, &["--repair-after", &repair_after.to_string()])
        .await;
    let pid = persister.pid().expect("the persister runs");
    let hostile_password = brokers.local.add_device("hostile", "default");
    let honest_password = brokers.local.add_device("honest", "default");
    let mut honest = brokers.local.log_in("honest", &honest_password).await;
    honest.subscribe("/replay/honest/request").await;

    // For 60 s: random boots by the thousand, a boot with a hole every other seq,
    // and seqs past the bound, about 400 readings a second (what the embedded
    // database stores beside the other tests; faster, the honest reading would wait
    // behind the flood in the broker's queue, not in the repairer).
    let flood = tokio::spawn({
        let port = brokers.local.port;
        async move {
            let mut hostile = TestClient::try_connect_as(port, "hostile", &hostile_password)
                .await
                .expect("hostile logs in");
            let started = tokio::time::Instant::now();
            let mut sent = 0u64;
            let mut ticks = tokio::time::interval(Duration::from_millis(50));
            while started.elapsed() < Duration::from_secs(60) {
                ticks.tick().await;
                for _ in 0..20 {
                    sent += 1;
                    let payload = match sent % 4 {
                        0 => format!(r#"{{"boot":"r{sent}","seq":9,"value":1}}"#),
                        1 => format!(r#"{{"boot":"holes","seq":{},"value":1}}"#, sent * 2),
                        2 => format!(r#"{{"boot":"r{sent}","seq":{},"value":1}}"#, u64::MAX),
                        _ => format!(r#"{{"boot":"big","seq":{},"value":1}}"#, 1u64 << 63),
                    };
                    hostile
                        .publish(
                            "/sensor/hostile/temperature",
                            QoS::AtMostOnce,
                            false,
                            payload.as_bytes(),
                        )
                        .await;
                }
            }
            sent
        }
    });
    // 20 s into the flood, an honest device with a real hole (3 and 4 missing).
    tokio::time::sleep(Duration::from_secs(20)).await;
    for seq in [1, 2, 5, 6] {
        let payload = format!(r#"{{"boot":"h1","seq":{seq},"value":20.5}}"#);
        honest
            .publish(
                "/sensor/honest/temperature",
                QoS::AtLeastOnce,
                false,
                payload.as_bytes(),
            )
            .await;
    }
    let published = tokio::time::Instant::now();
    wait_for_readings(&db, doc! { "device": "honest" }, 4).await;
    let request = tokio::time::timeout(
        Duration::from_secs(repair_after + 10),
        honest.next_message(),
    )
    .await
    .expect("the honest hole asked for within --repair-after plus a few seconds");
    assert_eq!(request.topic, "/replay/honest/request");
    let asked = String::from_utf8_lossy(&request.payload).to_string();
    assert!(asked.contains(r#""ranges":[[3,4]]"#), "{asked}");
    eprintln!(
        "the honest hole was asked for {:?} after it was published",
        published.elapsed()
    );
    let sent = flood.await.expect("the flood");
    assert!(sent > 20_000, "{sent}");

    // Bounded memory, and the queries still answer.
    let peak = peak_kib(pid);
    eprintln!("persister peak memory: {} MiB", peak / 1024);
    assert!(peak < MEMORY_BOUND_KIB, "peak {peak} KiB");
    for query in [
        ["gaps", "--device", "honest"],
        ["devices", "--format", "csv"],
    ] {
        let output = run_readings(mongo.uri(), mongo.database_name(), &query);
        assert!(
            output.status.code().is_some_and(|code| code <= 1),
            "readings {query:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The seqs past the bound were flagged, never stored as numbers.
    let wrapped = db
        .collection::<Document>("readings")
        .count_documents(doc! { "seq": { "$lt": 1 } })
        .await
        .expect("count");
    assert_eq!(wrapped, 0);
    assert!(count(&db, doc! { "device": "hostile", "boot": "big" }).await == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_gone_changes_nothing_and_the_bridge_cannot_ask() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let service = brokers.persister_ready(&mongo, &[]).await;
    let password = brokers.local.add_device("victim", "default");
    let mut victim = brokers.local.log_in("victim", &password).await;
    victim.subscribe("/replay/victim/request").await;
    for seq in [1, 2, 3] {
        let payload = format!(r#"{{"boot":"G1","seq":{seq},"value":20.5}}"#);
        victim
            .publish(
                "/sensor/victim/temperature",
                QoS::AtLeastOnce,
                false,
                payload.as_bytes(),
            )
            .await;
    }
    wait_for_readings(&db, doc! { "device": "victim" }, 3).await;

    // A sensor service account answers for the victim, ranges nobody asked for.
    let mut sensor = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    for gone in [
        &br#"{"boot":"G1","ranges":[[6,9]]}"#[..],
        br#"{"boot":"G1","ranges":[[452,9007199254740992]]}"#,
        br#"{"boot":"G1","ranges":[[452,18446744073709551615]]}"#,
    ] {
        sensor
            .publish("/replay/victim/gone", QoS::AtLeastOnce, false, gone)
            .await;
    }
    // The bridge's account asks the victim on the cloud; then the persister's does.
    // Had the bridge's been delivered, it would come first.
    let mut bridge = TestClient::connect(brokers.cloud.port, "bridge").await;
    bridge
        .publish(
            "/replay/victim/request",
            QoS::AtLeastOnce,
            false,
            br#"{"boot":"G1","ranges":[[1,3]]}"#,
        )
        .await;
    let mut persister = TestClient::connect(brokers.cloud.port, "mongo-persister").await;
    persister
        .publish(
            "/replay/victim/request",
            QoS::AtLeastOnce,
            false,
            br#"{"boot":"G1","ranges":[[2,2]]}"#,
        )
        .await;
    let first = victim.next_message().await;
    assert_eq!(&first.payload[..], br#"{"boot":"G1","ranges":[[2,2]]}"#);

    // The persister read the answers, believed none (the last is not even one), and
    // recorded nothing lost.
    service.wait_for_logs("not believed", 2).await;
    service
        .wait_for_log("answer to a replay request ignored")
        .await;
    let lost: Vec<Document> = db
        .collection::<Document>("repairs")
        .find(doc! { "device": "victim" })
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("documents");
    assert!(lost.is_empty(), "{lost:?}");
    let output = run_readings(mongo.uri(), mongo.database_name(), &["gaps"]);
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("lost"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// `scripts/add-device NAME --preset PRESET` on the broker folder `conf_dir`.
fn add_device(conf_dir: &Path, name: &str, preset: &str) -> std::process::Output {
    Command::new(repo_root().join("scripts/add-device"))
        .args([name, "--preset", preset, "--conf-dir"])
        .arg(conf_dir)
        .output()
        .expect("add-device runs")
}

/// Every file under `dir`, with its contents.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                folders.push(path);
            } else if !path.to_string_lossy().ends_with(".db") {
                let contents = std::fs::read(&path).unwrap_or_default();
                files.push((path.display().to_string(), contents));
            }
        }
    }
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_device_refuses_a_name_that_would_break_or_widen_the_acl() {
    let brokers = spawn_brokers().await;
    let conf_dir = brokers.local.conf_dir().to_path_buf();
    let data_dir = brokers.dir().join("local/data");
    let before = (snapshot(&conf_dir), snapshot(&data_dir));
    for name in [
        "x:secret\ntemperature-sensor",
        "a\nb",
        "zigbee2mqtt",
        "Tele",
        "homeassistant",
        "bridge",
        "mongo-persister",
        "edge-relay",
        "-a",
        &"a".repeat(65),
    ] {
        // esphome: the preset whose account owns NAME/#.
        let output = add_device(&conf_dir, name, "esphome");
        assert_eq!(output.status.code(), Some(2), "{name:?}");
        assert!(
            !String::from_utf8_lossy(&output.stderr).is_empty(),
            "{name:?}"
        );
    }
    // Names whose own topics would cover a service's, where the payload names the
    // device (/sensor/temperature/# matches /sensor/temperature), under every preset.
    for name in ["temperature", "pressure", "status", "Temperature"] {
        for preset in PRESETS {
            let output = add_device(&conf_dir, name, preset);
            assert_eq!(output.status.code(), Some(2), "{name} as {preset}");
            let said = String::from_utf8_lossy(&output.stderr);
            assert_eq!(said.lines().count(), 1, "{said}");
        }
    }
    // Layouts that would widen an account, reach another preset's or the pipeline's
    // topics, or break its ACL line.
    for preset in [
        "esphome:topic_prefix=zigbee2mqtt/{device}",
        "esphome:topic_prefix=home/someone-else",
        "tasmota:fulltopic=home/#/%prefix%/%topic%/",
        "tasmota:fulltopic=%prefix%/%topic%/ x",
        "zigbee2mqtt:base_topic=a\nuser bridge",
        "default:base_topic=x",
        "zigbee2mqtt:base_topic=spBv1.0",
        "zigbee2mqtt:base_topic=spBv1.0/STATE",
        "homeassistant:base_topic=tele",
        "homeassistant:base_topic=cmnd/node_1",
        "homeassistant:base_topic=shellies",
        "zigbee2mqtt:base_topic=homeassistant",
        "tasmota:fulltopic=zigbee2mqtt/%prefix%/%topic%/",
        "tasmota:fulltopic=spBv1.0/%prefix%/%topic%/",
        "shelly:topic_prefix=tele/{device}",
    ] {
        let output = add_device(&conf_dir, "node_1", preset);
        assert_eq!(output.status.code(), Some(2), "{preset:?}");
    }
    assert!(
        (snapshot(&conf_dir), snapshot(&data_dir)) == before,
        "a refused name or layout changed a file"
    );

    // Every ACL still holds: an account publishing outside its rights is dropped.
    let mut watcher = TestClient::connect(brokers.local.port, "mqtt-subscriber").await;
    watcher.subscribe("/sensor/#").await;
    let mut sensor = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    sensor
        .publish("/sensor/pressure", QoS::AtLeastOnce, false, b"1013.25")
        .await;
    sensor
        .publish("/sensor/temperature", QoS::AtLeastOnce, false, b"21.50")
        .await;
    let first = watcher.next_message().await;
    assert_eq!(first.topic, "/sensor/temperature");
}

/// Every preset of `scripts/add-device`.
const PRESETS: [&str; 7] = [
    "default",
    "tasmota",
    "zigbee2mqtt",
    "esphome",
    "shelly",
    "homeassistant",
    "sparkplug",
];

/// One account of each preset, as `scripts/add-device` makes it: `(name, preset, the
/// topics of [`PROBES`] it may publish)`.
const ACCOUNTS: [(&str, &str, &[&str]); 7] = [
    (
        "dev-a",
        "default",
        &["/sensor/dev-a/temperature", "/device/dev-a/status"],
    ),
    (
        "plug-a",
        "tasmota",
        &["tele/plug-a/SENSOR", "stat/plug-a/POWER"],
    ),
    ("zb-a", "zigbee2mqtt:base_topic=zb-a", &["zb-a/lamp"]),
    (
        "node-a",
        "esphome",
        &[
            "node-a/sensor/t/state",
            "homeassistant/sensor/node-a/t/config",
        ],
    ),
    (
        "shelly-a",
        "shelly",
        &["shellies/shelly-a/relay/0", "shelly-a/status/switch:0"],
    ),
    // Home Assistant's space holds the discovery of ESPHome nodes, by design.
    (
        "hass-a",
        "homeassistant",
        &[
            "homeassistant/sensor.kitchen/state",
            "homeassistant/sensor/node-a/t/config",
            "homeassistant/status",
        ],
    ),
    (
        "edge-a",
        "sparkplug",
        &["spBv1.0/g1/NBIRTH/edge-a", "spBv1.0/g1/DDATA/edge-a/d1"],
    ),
];

/// What every account tries to publish: each account's own topics, the services' topics
/// whose payload names the device, the commands, requests and STATE others read.
const PROBES: [&str; 25] = [
    "/sensor/temperature",
    "/sensor/pressure",
    "/device/status",
    "/sensor/dev-b/temperature",
    "/replay/dev-a/request",
    "/sensor/dev-a/temperature",
    "/device/dev-a/status",
    "tele/plug-a/SENSOR",
    "stat/plug-a/POWER",
    "cmnd/plug-a/POWER",
    "cmnd/tasmotas/POWER",
    "zb-a/lamp",
    "zigbee2mqtt/lamp",
    "node-a/sensor/t/state",
    "homeassistant/sensor/node-a/t/config",
    "homeassistant/status",
    "shellies/shelly-a/relay/0",
    "shelly-a/status/switch:0",
    "shellies/command",
    "homeassistant/sensor.kitchen/state",
    "spBv1.0/g1/NBIRTH/edge-a",
    "spBv1.0/g1/DDATA/edge-a/d1",
    "spBv1.0/g1/NCMD/edge-a",
    "spBv1.0/STATE/mongo-persister",
    "spBv1.0/g1/NBIRTH/edge-b",
];

/// The listing of what each kind of device account reaches on the project's edge
/// broker: one account of every preset publishes to every topic of [`PROBES`], and the
/// catch-all subscriber sees exactly each account's own topics. None of them reaches a
/// topic whose payload names the device (`/sensor/temperature`, `/sensor/pressure`,
/// `/device/status`): only the services write there. And an account whose topics
/// would overlap another's is refused, with nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_device_account_reaches_its_own_topics_only() {
    let brokers = spawn_brokers().await;
    let mut watcher = TestClient::connect(brokers.local.port, "mqtt-subscriber").await;
    watcher.subscribe("#").await;
    let mut devices = Vec::new();
    for (name, preset, _) in ACCOUNTS {
        let password = brokers.local.add_device(name, preset);
        devices.push(brokers.local.log_in(name, &password).await);
    }
    for (device, (name, _, own)) in devices.iter_mut().zip(ACCOUNTS) {
        for topic in PROBES {
            device
                .publish(topic, QoS::AtLeastOnce, false, name.as_bytes())
                .await;
        }
        // In order after the probes: once it arrives, so have they.
        device
            .publish(own[0], QoS::AtLeastOnce, false, b"done")
            .await;
    }
    let mut reached: std::collections::BTreeMap<&str, Vec<String>> = ACCOUNTS
        .iter()
        .map(|(name, ..)| (*name, Vec::new()))
        .collect();
    let mut done = 0;
    while done < ACCOUNTS.len() {
        let message = watcher.next_message().await;
        if message.payload.as_ref() == b"done" {
            done += 1;
        } else if let Some(topics) = std::str::from_utf8(&message.payload)
            .ok()
            .and_then(|name| reached.get_mut(name))
        {
            topics.push(message.topic);
        }
    }
    for (name, _, own) in ACCOUNTS {
        let mut own = own.to_vec();
        own.sort_unstable();
        let mut reached = reached[name].clone();
        reached.sort_unstable();
        assert_eq!(reached, own, "what {name} reaches");
    }

    // A second account into one's space: the same Zigbee2MQTT base topic, an ESPHome
    // prefix under another's, a Home Assistant base topic that is a node's prefix.
    let conf_dir = brokers.local.conf_dir().to_path_buf();
    let data_dir = brokers.dir().join("local/data");
    let before = (snapshot(&conf_dir), snapshot(&data_dir));
    for (name, preset) in [
        ("zb-b", "zigbee2mqtt:base_topic=zb-a"),
        ("zb-c", "zigbee2mqtt:base_topic=zb-a/room"),
        ("node-b", "esphome:topic_prefix=zb-a/{device}"),
        ("hass-b", "homeassistant:base_topic=node-a"),
        ("hass-c", "homeassistant"),
        ("shelly-a", "esphome"),
    ] {
        let output = add_device(&conf_dir, name, preset);
        assert_eq!(output.status.code(), Some(2), "{name} as {preset}");
    }
    assert!(
        (snapshot(&conf_dir), snapshot(&data_dir)) == before,
        "a refused account changed a file"
    );
}

#[test]
fn a_new_env_has_no_published_password_and_setup_refuses_one_on_a_reachable_listener() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    // Mosquitto's user must reach the files setup.sh makes (it checks).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let env = dir.path().join("env");
    let status = Command::new(repo_root().join("scripts/new-env"))
        .arg(&env)
        .status()
        .expect("new-env runs");
    assert!(status.success());
    let text = std::fs::read_to_string(&env).expect("the new env file");
    let settings = text.lines().filter(|line| !line.starts_with('#'));
    assert!(
        settings.clone().all(|line| !line.contains("change-me")),
        "{text}"
    );
    let passwords: Vec<&str> = settings
        .filter_map(|line| line.split_once("_PASSWORD="))
        .map(|(_, value)| value)
        .collect();
    assert!(passwords.len() >= 8, "{passwords:?}");
    let unique: std::collections::BTreeSet<_> = passwords.iter().collect();
    assert_eq!(unique.len(), passwords.len(), "every password its own");
    assert!(passwords.iter().all(|password| password.len() >= 32));
    // A second run keeps the file.
    let again = Command::new(repo_root().join("scripts/new-env"))
        .arg(&env)
        .output()
        .expect("new-env runs");
    assert_eq!(again.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&env).expect("kept"), text);

    // The example's passwords: refused on every interface, accepted on loopback.
    let example = |address: Option<&str>| {
        let mut setup = Command::new(repo_root().join("mosquitto/setup.sh"));
        setup.arg("cloud").arg(dir.path().join("cloud"));
        for user in ["BRIDGE", "MQTT_SUBSCRIBER", "MONGO_PERSISTER"] {
            setup.env(format!("{user}_PASSWORD"), "change-me-example");
        }
        setup.env("MQTT_CERTS_DIR", dir.path().join("certs"));
        match address {
            Some(address) => setup.env("MQTT_LISTEN_ADDRESS", address),
            None => setup.env_remove("MQTT_LISTEN_ADDRESS"),
        };
        setup.env_remove("DASHBOARD_PASSWORD");
        setup.output().expect("setup.sh runs")
    };
    let refused = example(None);
    assert_eq!(refused.status.code(), Some(2));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("BRIDGE_PASSWORD"), "{why}");
    assert!(!dir.path().join("cloud/passwd").exists());
    assert_eq!(example(Some("0.0.0.0")).status.code(), Some(2));
    let loopback = example(Some("127.0.0.1"));
    assert!(
        loopback.status.success(),
        "{}",
        String::from_utf8_lossy(&loopback.stderr)
    );
    // The CA's private key is not among the files the brokers read.
    assert!(!dir.path().join("certs/ca.key").exists());
    assert!(dir.path().join("certs-ca-private/ca.key").exists());
}

/// Per-site cloud accounts (`EDGE_SITES`): each site gets `edge-relay-SITE` and its
/// `-replay` account with the relay's rights; an entry that would break or widen the
/// broker's files is refused before any is written.
#[test]
fn setup_gives_each_edge_site_its_accounts_and_refuses_a_bad_entry() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let setup = |sites: &str, out: &str| {
        let mut setup = Command::new(repo_root().join("mosquitto/setup.sh"));
        setup.arg("cloud").arg(dir.path().join(out));
        for user in ["BRIDGE", "MQTT_SUBSCRIBER", "MONGO_PERSISTER"] {
            setup.env(format!("{user}_PASSWORD"), "a-test-secret");
        }
        setup
            .env("MQTT_CERTS_DIR", dir.path().join("certs"))
            .env("MQTT_LISTEN_ADDRESS", "127.0.0.1")
            .env("EDGE_SITES", sites)
            .env_remove("EDGE_RELAY_PASSWORD")
            .env_remove("DASHBOARD_PASSWORD");
        setup.output().expect("setup.sh runs")
    };
    let made = setup("plant-1:first-secret plant_2:second-secret", "cloud");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let users: Vec<String> = std::fs::read_to_string(dir.path().join("cloud/passwd"))
        .expect("passwd")
        .lines()
        .filter_map(|line| Some(line.split_once(':')?.0.to_string()))
        .collect();
    for user in [
        "edge-relay-plant-1",
        "edge-relay-plant-1-replay",
        "edge-relay-plant_2",
        "edge-relay-plant_2-replay",
    ] {
        assert!(users.iter().any(|u| u == user), "no {user} in {users:?}");
    }
    // No shared edge-relay account without EDGE_RELAY_PASSWORD.
    assert!(!users.iter().any(|u| u == "edge-relay"), "{users:?}");
    let acl = std::fs::read_to_string(dir.path().join("cloud/acl")).expect("acl");
    let block = |user: &str| {
        let start = acl
            .find(&format!("user {user}\n"))
            .expect("the user's block");
        acl[start..]
            .split("\n\n")
            .next()
            .expect("a block")
            .to_string()
    };
    assert!(block("edge-relay-plant-1").contains("topic deny /replay/+/request"));
    assert!(block("edge-relay-plant-1-replay").contains("topic read /replay/+/request"));

    for (n, bad) in [
        "plant-1",
        "plant-1:",
        "replay:secret",
        "a-replay:secret",
        ".hidden:secret",
        "a/b:secret",
        "a#:secret",
        "twice:one twice:two",
        "a:secret\nuser evil",
        "colon:pass:word",
        "plant-1:ok s3cret-without-colon",
        "star:a* what?:b",
    ]
    .into_iter()
    .enumerate()
    {
        let out = format!("bad-{n}");
        let refused = setup(bad, &out);
        assert_eq!(refused.status.code(), Some(2), "{bad:?} was not refused");
        let why = String::from_utf8_lossy(&refused.stderr);
        assert!(why.contains("EDGE_SITES"), "{bad:?}: {why}");
        assert!(!why.contains("s3cret"), "a password in the message: {why}");
        assert!(!dir.path().join(&out).join("passwd").exists(), "{bad:?}");
    }
}
