//! Sparkplug B end to end: an edge node written by others (pysparkplug, driven by
//! `tests/sparkplug/edge_node.py`) on the edge broker under an account made with the
//! `sparkplug` preset, carried by the bridge, stored by `mongo-persister --ingest
//! sparkplug` as its births define; the host's STATE and Rebirth command carried back
//! to the node; and messages the host cannot read, stored flagged while the rest goes
//! on.

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bson::{doc, Document};
use futures_util::TryStreamExt;
use iot_store::sparkplug::proto::{metric::Value, Metric, Payload};
use prost::Message as _;
use rumqttc::QoS;
use serde_json::Value as Json;
use tests::sparkplug::{by_alias, encode, tag};
use tests::stored::{count, status_history};
use tests::{
    free_port, prometheus, repo_root, spawn_brokers, spawn_mongo, wait_for, Service, TestClient,
};
use tokio::process::Command;

const HOST_ID: &str = "plant-host";

/// The test node's Python, installed by scripts/test.
fn python() -> PathBuf {
    let python = repo_root().join(".venv-sparkplug/bin/python");
    assert!(
        python.is_file(),
        "no {}: run scripts/test (it installs tests/sparkplug/requirements.txt there)",
        python.display()
    );
    python
}

fn edge_node(phase: &str, port: u16, password: &str) -> Service {
    let mut command = Command::new(python());
    command
        .arg(repo_root().join("tests/sparkplug/edge_node.py"))
        .arg(phase)
        .args(["--port", &port.to_string(), "--user", "press-1"])
        .args([
            "--password",
            password,
            "--group",
            "plant",
            "--host-id",
            HOST_ID,
        ]);
    Service::spawn(&format!("edge node ({phase})"), command)
}

/// The values stored for `device` and `measurement`, oldest first.
async fn values(db: &mongodb::Database, device: &str, measurement: &str) -> Vec<f64> {
    let documents: Vec<Document> = db
        .collection::<Document>(iot_store::READINGS)
        .find(doc! { "device": device, "measurement": measurement })
        .sort(doc! { "ts": 1 })
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("readings");
    documents
        .iter()
        .map(|document| document.get_f64("value").expect("value"))
        .collect()
}

async fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = prometheus::get(port, "/metrics").await;
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_node_written_by_others_is_stored_as_its_births_define() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let password = brokers.local.add_device("press-1", "sparkplug");
    let metrics_port = free_port();
    let metrics_address = format!("127.0.0.1:{metrics_port}");
    let mut persister = brokers
        .persister_ready(
            &mongo,
            &[
                "--ingest",
                "sparkplug",
                "--sparkplug-host-id",
                HOST_ID,
                "--sparkplug-reorder-timeout",
                "1",
                "--metrics-address",
                &metrics_address,
            ],
        )
        .await;

    // First session: births, data by alias, history, a lost seq number answered with
    // a Rebirth, the births again, one more value.
    let mut node = edge_node("first", brokers.local.port, &password);
    node.wait_for_stdout("done").await;
    let temperature = || values(&db, "plant/press-1", "Temperature");
    wait_for("the value after the rebirth", temperature, |values| {
        values.last() == Some(&24.5)
    })
    .await;
    // The birth's value, the historical one first by its own time, the rest in order;
    // the birth sent again holds the values at the same times: not stored twice.
    assert_eq!(temperature().await, [18.0, 21.5, 22.5, 23.5, 24.5]);
    assert_eq!(values(&db, "plant/press-1", "Count").await, [-3.0]);
    assert_eq!(values(&db, "plant/press-1", "Running").await, [1.0]);
    // The device's data may be written in a later batch than the node's.
    wait_for(
        "the gauge's two pressures",
        || values(&db, "plant/press-1/gauge", "Pressure"),
        |values| values.as_slice() == [1.5, 1013.25],
    )
    .await;
    for (measurement, why) in [
        ("Label", "a string"),
        ("bdSeq", "the session number"),
        ("Node Control/Rebirth", "a command"),
    ] {
        assert!(
            values(&db, "plant/press-1", measurement).await.is_empty(),
            "{measurement} is {why}, not a reading"
        );
    }
    let historical = db
        .collection::<Document>(iot_store::READINGS)
        .find_one(doc! { "measurement": "Temperature", "value": 18.0 })
        .await
        .expect("find")
        .expect("the historical value");
    let age = historical
        .get_datetime("received_at")
        .expect("received_at")
        .timestamp_millis()
        - historical
            .get_datetime("ts")
            .expect("ts")
            .timestamp_millis();
    assert!(
        (3_500_000..3_700_000).contains(&age),
        "stored at its own time, an hour ago: {age} ms"
    );
    assert_eq!(
        node.stdout_lines()
            .iter()
            .filter(|line| *line == "rebirth requested")
            .count(),
        1,
        "one Rebirth for one gap"
    );
    assert_eq!(
        metric(metrics_port, "iot_persister_sparkplug_rebirths_total").await,
        1.0
    );

    // The node dies (its last will, bdSeq 0): it and its device are offline.
    node.kill().await;
    wait_for(
        "the node's death",
        || status_history(&db, "plant/press-1"),
        |changes| changes == &["online", "offline"],
    )
    .await;
    wait_for(
        "the device's death with its node",
        || status_history(&db, "plant/press-1/gauge"),
        |changes| changes == &["online", "offline"],
    )
    .await;

    // Second session, bdSeq 1; the first session's death arrives late and changes
    // nothing: the value after it is stored and the node stays online.
    let mut node = edge_node("second", brokers.local.port, &password);
    node.wait_for_stdout("done").await;
    wait_for("the value after the late death", temperature, |values| {
        values.last() == Some(&25.5)
    })
    .await;
    // Births and deaths are written after the readings of the same batch.
    for device in ["plant/press-1", "plant/press-1/gauge"] {
        wait_for(
            "the second session's births",
            || status_history(&db, device),
            |changes| changes == &["online", "offline", "online"],
        )
        .await;
    }
    assert_eq!(
        metric(metrics_port, "iot_persister_sparkplug_late_deaths_total").await,
        1.0
    );
    let status = tests::run_readings(
        mongo.uri(),
        mongo.database_name(),
        &["status", "--format", "json"],
    );
    let status: Vec<Json> = serde_json::from_slice(&status.stdout).expect("a JSON array");
    let node_status = status
        .iter()
        .find(|row| row["device"] == "plant/press-1")
        .unwrap_or_else(|| panic!("readings status lists the node: {status:?}"));
    assert_eq!(node_status["status"], "online");

    // The host's STATE: online, retained, on both brokers; offline once it stops.
    let state = |publish: rumqttc::Publish| -> Json {
        serde_json::from_slice(&publish.payload).expect("STATE is JSON")
    };
    let topic = format!("spBv1.0/STATE/{HOST_ID}");
    assert_eq!(
        state(TestClient::retained(brokers.cloud.port, &topic).await)["online"],
        true
    );
    assert_eq!(
        state(TestClient::retained(brokers.local.port, &topic).await)["online"],
        true
    );
    persister.stop_cleanly().await;
    assert_eq!(
        state(TestClient::retained(brokers.cloud.port, &topic).await)["online"],
        false
    );
    node.kill().await;
}

/// Publishes as the edge node does its messages: QoS 0, not retained.
async fn send(node: &mut TestClient, topic: &str, payload: &[u8]) {
    node.publish(topic, QoS::AtMostOnce, false, payload).await;
}

/// A birth of the most metrics one message may hold, 10 000: bdSeq `bd_seq` and the
/// tags `Tag/00000` to `Tag/09998`, each its number as alias and value.
fn largest_birth(bd_seq: u64) -> Vec<u8> {
    let mut metrics: Vec<Metric> = (0..9_999_u32)
        .map(|n| tag(Some(format!("Tag/{n:05}")), u64::from(n), f64::from(n)))
        .collect();
    metrics.push(tests::sparkplug::bd_seq(bd_seq));
    encode(Some(0), metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_host_cannot_read_is_flagged_and_the_rest_is_stored() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let password = brokers.local.add_device("line-7", "sparkplug");
    let _persister = brokers
        .persister_ready(&mongo, &["--ingest", "sparkplug"])
        .await;
    let mut device = TestClient::try_connect_as(brokers.local.port, "line-7", &password)
        .await
        .expect("the node's account logs in");
    device.subscribe("spBv1.0/cell/NCMD/line-7").await;
    let topic = |kind: &str| format!("spBv1.0/cell/{kind}/line-7");
    let flagged = |error: &str| doc! { "unparsed": true, "error": { "$regex": error } };

    // Not protobuf at all.
    send(&mut device, &topic("NBIRTH"), b"\x0a\xff\xff\xff").await;
    // Data before any birth: flagged, and the node is asked for its birth.
    send(&mut device, &topic("NDATA"), &by_alias(5, 1, 1.0)).await;
    let command = device.next_message().await;
    let command = Payload::decode(command.payload.as_ref()).expect("a Sparkplug payload");
    assert_eq!(
        command.metrics[0].name.as_deref(),
        Some("Node Control/Rebirth")
    );
    assert_eq!(command.metrics[0].value, Some(Value::BooleanValue(true)));

    // A birth of 10 000 metrics (bdSeq and 9 999 tags), the most one message may
    // hold: every one stored and known by its alias.
    send(&mut device, &topic("NBIRTH"), &largest_birth(3)).await;
    send(&mut device, &topic("NDATA"), &by_alias(1, 42_424, 1.0)).await;
    send(&mut device, &topic("NDATA"), &by_alias(2, 9_998, 0.5)).await;
    let last = doc! { "device": "cell/line-7", "measurement": "Tag/09998", "value": 0.5 };
    wait_for(
        "the value after the unknown alias",
        || count(&db, last.clone()),
        |stored| *stored == 1,
    )
    .await;
    assert_eq!(
        count(
            &db,
            doc! { "device": "cell/line-7", "measurement": { "$regex": "^Tag/" } }
        )
        .await,
        10_000
    );
    assert_eq!(count(&db, flagged("not a Sparkplug B payload")).await, 1);
    assert_eq!(count(&db, flagged("without a birth")).await, 1);
    assert_eq!(
        count(&db, flagged("alias 42424 is not in the birth")).await,
        1
    );
    let status = db
        .collection::<Document>(iot_store::STATUS)
        .find_one(doc! { "device": "cell/line-7" })
        .await
        .expect("find")
        .expect("the birth is a status change");
    assert_eq!(status.get_str("status"), Ok("online"));
    assert_eq!(tests::stored::integer(&status, "bd_seq"), 3);

    // The account speaks for its own node only: the broker drops what it publishes
    // as another, and its own next value is stored.
    let forged = encode(Some(1), vec![tag(Some("x".into()), 1, 1.0)]);
    device
        .publish(
            "spBv1.0/cell/NDATA/line-8",
            QoS::AtLeastOnce,
            false,
            &forged,
        )
        .await;
    let next = by_alias(3, 1, 2.0);
    device
        .publish(&topic("NDATA"), QoS::AtLeastOnce, false, &next)
        .await;
    let next = doc! { "device": "cell/line-7", "measurement": "Tag/00001", "value": 2.0 };
    wait_for(
        "line-7's next value",
        || count(&db, next.clone()),
        |stored| *stored == 1,
    )
    .await;
    assert_eq!(
        count(&db, doc! { "topic": "spBv1.0/cell/NDATA/line-8" }).await,
        0
    );
}

/// The most resident memory of `service` until `stop`, sampled every 100 ms.
fn peak_rss(service: &Service, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    let pid = service.pid().expect("the service runs");
    tokio::spawn(async move {
        let (mut first, mut peak) = (0, 0);
        let mut ticks = tokio::time::interval(std::time::Duration::from_millis(100));
        while !stop.load(Ordering::Acquire) {
            ticks.tick().await;
            let rss = tests::rss_bytes(pid).unwrap_or(0);
            if first == 0 {
                first = rss;
            }
            peak = peak.max(rss);
        }
        (first, peak)
    })
}

/// One Sparkplug account floods: a birth of 10 000 metrics, then data carrying all 10 000
/// by alias, 160 kB each, five a second for 30 s (the persister once grew past 6 GiB
/// and stored 8 of an honest sensor's 261 readings meanwhile). The node's budget takes
/// the birth whole and refuses most of the data, counted; the persister stays under
/// 128 MiB; an honest JSON QoS 1 sensor beside it has every reading stored once, each
/// received within 5 s of its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_account_flooding_metrics_costs_the_others_nothing_and_memory_stays_bounded() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let password = brokers.local.add_device("flood-1", "sparkplug");
    let metrics_port = free_port();
    let address = format!("127.0.0.1:{metrics_port}");
    let persister = brokers
        .persister_ready(
            &mongo,
            &[
                "--ingest",
                "sparkplug",
                "--ingest",
                "default",
                "--metrics-address",
                &address,
            ],
        )
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = peak_rss(&persister, Arc::clone(&stop));
    let honest_args = [
        "--format",
        "json",
        "--qos",
        "1",
        "--interval",
        "0.05",
        "--no-retain",
        "--count",
        "500",
        "--device",
        "honest-1",
    ];
    let mut honest = brokers.start_edge("temperature-sensor", &honest_args);

    let mut node = TestClient::try_connect_as(brokers.local.port, "flood-1", &password)
        .await
        .expect("the node's account logs in");
    let topic = |kind: &str| format!("spBv1.0/line/{kind}/flood-1");
    send(&mut node, &topic("NBIRTH"), &largest_birth(1)).await;
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(200));
    for seq in 1..=150_u64 {
        ticks.tick().await;
        let data = (0..9_999_u32)
            .map(|n| tag(None, u64::from(n), f64::from(n) + seq as f64))
            .collect();
        send(&mut node, &topic("NDATA"), &encode(Some(seq % 256), data)).await;
    }
    honest.expect_success().await;
    tests::wait_for_within(
        std::time::Duration::from_secs(60),
        "every honest reading stored",
        || count(&db, doc! { "device": "honest-1" }),
        |stored| *stored >= 500,
    )
    .await;
    stop.store(true, Ordering::Release);
    let (idle, peak) = peak.await.expect("sampled");

    tests::stored::assert_exactly_once(&tests::stored::stored_seqs(&db, "honest-1").await, 500);
    let honest: Vec<Document> = db
        .collection::<Document>(iot_store::READINGS)
        .find(doc! { "device": "honest-1" })
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("readings");
    let slowest = honest
        .iter()
        .map(|document| {
            let ts = document.get_datetime("ts").expect("ts").timestamp_millis();
            let received = document.get_datetime("received_at").expect("received_at");
            received.timestamp_millis() - ts
        })
        .max()
        .expect("readings");
    assert!(slowest <= 5_000, "an honest reading waited {slowest} ms");
    let refused = metric(metrics_port, "iot_persister_over_budget_total").await;
    let stored = count(&db, doc! { "device": "line/flood-1" }).await;
    assert!(refused > 0.0, "nothing of the flood was refused");
    // The birth, and no more than the budget's rate (1 000 a second beyond one a
    // message) over the flood's 30 s after it.
    assert!(
        stored <= 10_000 + 31 * 1_000 + 150,
        "{stored} of the flood stored"
    );
    assert!(
        peak < 128 << 20,
        "the persister peaked at {} MiB",
        peak >> 20
    );
    eprintln!(
        "flood: {stored} stored, {refused} refused; honest: slowest {slowest} ms; persister {} MiB at the start, peak {} MiB",
        idle >> 20,
        peak >> 20
    );
}
