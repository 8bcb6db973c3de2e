//! Self-healing end to end: readings lost on the way (the persister's session lost, as
//! a cloud broker that lost its state loses it) are asked of the device again and
//! stored once, and so are a boot's first readings that were never stored;
//! what a device no longer has is recorded as lost, without endless requests; a request
//! the device cannot read is ignored; junk readings are no hole, and the relay answers
//! a range once, within a budget per device.

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use std::time::Duration;

use bson::{doc, Document};
use rumqttc::QoS;
use tests::stored::{count, integer, stored_seqs};
use tests::{
    run_readings, spawn_brokers, spawn_mongo, wait_for, wait_for_within, Brokers, Service,
    TestClient,
};

/// How long a repair may take: the gap must last --repair-after (2 s here), then a
/// request, the device's answer and the writes.
const REPAIRED_WITHIN: Duration = Duration::from_secs(60);

/// A sensor streaming JSON readings at QoS 1, `rate` a second, until stopped.
fn stream(brokers: &Brokers, device: &str, rate: &str, extra: &[&str]) -> Service {
    let mut args = vec![
        "--format",
        "json",
        "--qos",
        "1",
        "--no-retain",
        "--rate",
        rate,
        "--device",
        device,
    ];
    args.extend_from_slice(extra);
    brokers.start_edge("temperature-sensor", &args)
}

/// Stops the sensor and returns how many readings it sent (its summary line).
async fn stop_stream(mut sensor: Service) -> i64 {
    sensor.stop_cleanly().await;
    let log = sensor.stderr();
    let line = log
        .lines()
        .find(|line| line.contains("summary: "))
        .unwrap_or_else(|| panic!("no summary:\n{log}"));
    line.split("summary: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|sent| sent.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"))
}

/// Kills the persister and ends its session (`client_id`), then watches 200 readings
/// cross the cloud broker with no session to keep them for it.
async fn lose_session(brokers: &Brokers, mut persister: Service, client_id: &str) {
    persister.kill().await;
    TestClient::try_connect(brokers.cloud.port, Some("mongo-persister"), client_id, true)
        .await
        .expect("the session is cleared");
    let mut watcher = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    watcher.subscribe("/sensor/#").await;
    for _ in 0..200 {
        watcher.next_message().await;
    }
}

/// Waits until at least `at_least` readings of `device` are stored.
async fn wait_stored(db: &mongodb::Database, device: &str, at_least: u64) {
    wait_for(
        &format!("{at_least} readings of {device} stored"),
        || count(db, doc! { "device": device }),
        |n| *n >= at_least,
    )
    .await;
}

fn gaps_clean(mongo: &tests::MongoServer, device: &str) -> bool {
    let output = run_readings(
        mongo.uri(),
        mongo.database_name(),
        &["gaps", "--device", device],
    );
    output.status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_the_cloud_dropped_are_asked_for_again_and_stored_once() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let args = ["--repair-after", "2", "--client-id", "cloud-persister"];
    let persister = brokers.persister_ready(&mongo, &args).await;
    let sensor = stream(&brokers, "rep-1", "200", &[]);
    wait_stored(&db, "rep-1", 200).await;

    // The persister's session is lost, as when a cloud broker comes back without its
    // state.
    lose_session(&brokers, persister, "cloud-persister").await;
    let mut persister = brokers.start_persister(&mongo, &args);

    // The hole is asked for and filled while the stream goes on.
    persister
        .wait_for_log("asking the device for missing readings")
        .await;
    wait_for_within(
        REPAIRED_WITHIN,
        "readings gaps clean",
        || async { gaps_clean(&mongo, "rep-1") },
        |clean| *clean,
    )
    .await;
    // Every asked range is stored, once (readings gaps counts duplicates too), inside
    // what is stored.
    let repairs: Vec<Document> = futures_util::TryStreamExt::try_collect(
        db.collection::<Document>("repairs")
            .find(doc! { "device": "rep-1", "outcome": "asked" })
            .await
            .expect("find"),
    )
    .await
    .expect("repairs");
    assert!(!repairs.is_empty(), "no replay request recorded");
    let seqs: std::collections::BTreeSet<i64> = stored_seqs(&db, "rep-1")
        .await
        .into_iter()
        .map(|(_, seq)| seq)
        .collect();
    for repair in &repairs {
        let (from, to) = (integer(repair, "from"), integer(repair, "to"));
        assert!(
            (from..=to).all(|seq| seqs.contains(&seq)),
            "{from}-{to} not stored"
        );
        assert!(
            seqs.last().is_some_and(|last| *last > to),
            "the hole is not inside what is stored"
        );
    }
    stop_stream(sensor).await;
    persister.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_device_no_longer_has_is_lost_for_good_and_not_asked_for_forever() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let args = ["--repair-after", "1", "--client-id", "lossy"];
    let persister = brokers.persister_ready(&mongo, &args).await;
    // A device that keeps only its last 20 readings.
    let sensor = stream(&brokers, "rep-2", "100", &["--replay-buffer", "20"]);
    wait_stored(&db, "rep-2", 100).await;

    // The persister's session is lost while far more readings cross than the device
    // keeps.
    lose_session(&brokers, persister, "lossy").await;
    let mut requests = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    requests.subscribe("/replay/#").await;
    let mut persister = brokers.start_persister(&mongo, &args);

    let repairs = db.collection::<Document>("repairs");
    wait_for_within(
        REPAIRED_WITHIN,
        "the lost range recorded",
        || async {
            repairs
                .count_documents(doc! { "device": "rep-2", "outcome": "lost" })
                .await
                .expect("count")
        },
        |lost| *lost >= 1,
    )
    .await;
    persister.wait_for_log("readings lost for good").await;
    // The device answered the range gone once; no more requests for it after that.
    let asked_before = repairs
        .count_documents(doc! { "outcome": "asked" })
        .await
        .expect("count");
    let _ = stop_stream(sensor).await;
    let messages = requests.messages_so_far().await;
    let request_count = messages
        .iter()
        .filter(|message| message.topic.ends_with("/request"))
        .count();
    assert!((1..=3).contains(&request_count), "{request_count} requests");
    assert!(asked_before <= 3, "{asked_before} requests recorded");
    assert!(
        !gaps_clean(&mongo, "rep-2"),
        "the lost readings are missing"
    );
    // readings gaps says they are lost, not waiting for a repair.
    let output = run_readings(
        mongo.uri(),
        mongo.database_name(),
        &["gaps", "--device", "rep-2", "--format", "json"],
    );
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let repair = rows[0]["repair"].as_str().unwrap_or_default();
    assert!(repair.starts_with("lost "), "{rows}");
    persister.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_device_cannot_read_is_ignored_with_a_warning() {
    let brokers = spawn_brokers().await;
    let sensor = stream(&brokers, "rep-3", "20", &[]);
    sensor.wait_for_log("listening for replay requests").await;
    // Requests reach the edge through the bridge: publish one on the cloud as the
    // persister would, but broken.
    let mut cloud = TestClient::connect(brokers.cloud.port, "mongo-persister").await;
    let mut watcher = TestClient::connect(brokers.local.port, "mqtt-subscriber").await;
    watcher.subscribe("/replay/rep-3/request").await;
    cloud
        .publish(
            "/replay/rep-3/request",
            QoS::AtLeastOnce,
            false,
            b"{\"ranges\":",
        )
        .await;
    watcher.next_message().await;
    sensor.wait_for_log("replay request ignored").await;
    let sent = stop_stream(sensor).await;
    assert!(sent > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_gaps_repair_asks_for_old_gaps_by_hand() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    // A persister that repairs nothing by itself.
    let args = ["--no-repair", "--client-id", "by-hand"];
    let persister = brokers.persister_ready(&mongo, &args).await;
    let sensor = stream(&brokers, "rep-6", "100", &[]);
    wait_stored(&db, "rep-6", 100).await;
    lose_session(&brokers, persister, "by-hand").await;
    let mut persister = brokers.start_persister(&mongo, &args);
    let before = count(&db, doc! { "device": "rep-6" }).await;
    wait_for(
        "readings after the gap stored",
        || count(&db, doc! { "device": "rep-6" }),
        |n| *n >= before + 50,
    )
    .await;
    assert!(!gaps_clean(&mongo, "rep-6"), "a gap to repair");

    // By hand, as the persister's broker user (the only one that may ask).
    let output = std::process::Command::new(tests::binary("readings"))
        .args(["gaps", "--device", "rep-6", "--repair"])
        .env_clear()
        .env("MONGODB_URI", mongo.uri())
        .env("MONGODB_DATABASE", mongo.database_name())
        .env("CLOUD_BROKER", "127.0.0.1")
        .env("CLOUD_PORT", brokers.cloud.port.to_string())
        .env("CLOUD_USERNAME", "mongo-persister")
        .env("CLOUD_PASSWORD", tests::password("mongo-persister"))
        .output()
        .expect("readings runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "the gap is reported: {stderr}"
    );
    assert!(stderr.contains("readings: asked rep-6 (boot "), "{stderr}");
    // Recorded where `readings gaps` and the persister's replicas look.
    let asked = db
        .collection::<Document>("repairs")
        .count_documents(
            doc! { "device": "rep-6", "outcome": "asked", "by": { "$regex": "^readings-repair-" } },
        )
        .await
        .expect("repairs can be counted");
    assert_eq!(asked, 1, "the hand request is recorded in repairs");
    wait_for_within(
        REPAIRED_WITHIN,
        "readings gaps clean",
        || async { gaps_clean(&mongo, "rep-6") },
        |clean| *clean,
    )
    .await;
    stop_stream(sensor).await;
    persister.stop_cleanly().await;
}

/// Waits until the readings lost in an outage are back: once more than `beyond` of
/// `device`'s readings are stored (the restarted persister stores new ones), every
/// `seq` up to the highest stored then must be stored. (`readings gaps` on a live
/// stream may see the last fraction of a second still in flight.)
async fn wait_repaired(mongo: &tests::MongoServer, device: &str, beyond: u64) {
    let db = mongo.database().await;
    wait_for(
        &format!("more than {beyond} readings of {device}"),
        || count(&db, doc! { "device": device }),
        |n| *n > beyond,
    )
    .await;
    let through = stored_seqs(&db, device)
        .await
        .into_iter()
        .map(|(_, seq)| seq)
        .max()
        .unwrap_or(0);
    wait_for_within(
        REPAIRED_WITHIN,
        &format!("seq 1 to {through} of {device} stored"),
        || count(&db, doc! { "device": device, "seq": { "$lte": through } }),
        |n| *n == through as u64,
    )
    .await;
}

/// Stops the sensor and asserts that every reading it sent is stored exactly once.
async fn assert_all_stored_once(
    mongo: &tests::MongoServer,
    sensor: Service,
    persister: &Service,
    device: &str,
) {
    let db = mongo.database().await;
    let sent = stop_stream(sensor).await;
    let deadline = tokio::time::Instant::now() + REPAIRED_WITHIN;
    while count(&db, doc! { "device": device }).await < sent as u64
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seqs = stored_seqs(&db, device).await;
    let stored: std::collections::BTreeSet<i64> = seqs.iter().map(|(_, seq)| *seq).collect();
    let missing: Vec<i64> = (1..=sent).filter(|seq| !stored.contains(seq)).collect();
    assert!(
        missing.is_empty(),
        "{sent} sent, missing {missing:?}\npersister:\n{}",
        persister.stderr()
    );
    tests::stored::assert_exactly_once(&seqs, sent);
    assert!(
        gaps_clean(mongo, device),
        "readings gaps finds {device} incomplete"
    );
}

/// The measured case of docs/reliability.md: the cloud machine loses
/// power mid-stream (broker and persister SIGKILLed, the broker never saved), the
/// broker comes back empty, the persister 5 s later. Everything the bridge delivered in
/// between had no session to go to; it is asked of the device again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_machine_that_loses_power_loses_no_reading() {
    let (mut brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let args = ["--repair-after", "2", "--client-id", "power-cut"];
    let mut persister = brokers.persister_ready(&mongo, &args).await;
    let sensor = stream(&brokers, "cut-1", "400", &[]);
    wait_stored(&db, "cut-1", 1000).await;

    persister.kill().await;
    brokers.cloud.kill_losing_state().await;
    assert!(brokers.cloud.start().await, "{}", brokers.cloud.log());
    tokio::time::sleep(Duration::from_secs(5)).await; // the persister's own restart
    let before = count(&db, doc! { "device": "cut-1" }).await;
    let mut persister = brokers.start_persister(&mongo, &args);

    wait_repaired(&mongo, "cut-1", before + 2000).await;
    assert_all_stored_once(&mongo, sensor, &persister, "cut-1").await;
    persister.stop_cleanly().await;
}

/// The edge machine loses power while readings wait on it for the bridge (the cloud is
/// unreachable): the edge broker comes back without them, yet they are in the device's
/// buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_broker_killed_with_readings_queued_for_the_bridge_loses_none() {
    let (mut brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let args = ["--repair-after", "2", "--client-id", "edge-cut"];
    let mut persister = brokers.persister_ready(&mongo, &args).await;
    let sensor = stream(&brokers, "cut-2", "400", &[]);
    wait_stored(&db, "cut-2", 400).await;

    brokers.cloud.stop().await;
    // Readings queue on the edge for the bridge.
    let mut watcher = TestClient::connect(brokers.local.port, "mqtt-subscriber").await;
    watcher.subscribe("/sensor/#").await;
    for _ in 0..800 {
        watcher.next_message().await;
    }
    drop(watcher);
    brokers.local.kill_losing_state().await;
    assert!(brokers.local.start().await, "{}", brokers.local.log());
    assert!(brokers.cloud.start().await, "{}", brokers.cloud.log());
    let before = count(&db, doc! { "device": "cut-2" }).await;

    wait_repaired(&mongo, "cut-2", before + 1200).await;
    assert_all_stored_once(&mongo, sensor, &persister, "cut-2").await;
    persister.stop_cleanly().await;
}

/// Two replicas sharing the stream (each sees every other reading of a device, so
/// each sees holes the other fills) come back after the cloud machine lost power: the
/// readings lost in between are asked for, each range by one replica only, and stored
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_replicas_repair_a_cloud_power_cut_without_asking_twice() {
    let (mut brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let replica = |id: &'static str| {
        [
            "--share",
            "persisters",
            "--client-id",
            id,
            "--repair-after",
            "2",
        ]
    };
    let mut a = brokers.persister_ready(&mongo, &replica("replica-a")).await;
    let mut b = brokers.persister_ready(&mongo, &replica("replica-b")).await;
    let sensor = stream(&brokers, "cut-3", "400", &[]);
    wait_stored(&db, "cut-3", 1000).await;

    a.kill().await;
    b.kill().await;
    brokers.cloud.kill_losing_state().await;
    assert!(brokers.cloud.start().await, "{}", brokers.cloud.log());
    let mut requests = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    requests.subscribe("/replay/+/request").await;
    tokio::time::sleep(Duration::from_secs(3)).await; // the replicas' own restart
    let before = count(&db, doc! { "device": "cut-3" }).await;
    let a = brokers.start_persister(&mongo, &replica("replica-a"));
    let b = brokers.start_persister(&mongo, &replica("replica-b"));

    wait_repaired(&mongo, "cut-3", before + 1200).await;
    assert_all_stored_once(&mongo, sensor, &a, "cut-3").await;
    let asked = db
        .collection::<Document>("repairs")
        .count_documents(doc! { "device": "cut-3", "outcome": "asked" })
        .await
        .expect("count");
    let messages = requests.messages_so_far().await;
    assert!(asked >= 1, "nothing was asked for");
    assert_eq!(
        messages.len() as u64,
        asked,
        "requests sent against requests recorded"
    );
    // No reading was asked for twice within --repair-after (2 s): a replica leaves
    // out what the other asked for while its answer may still be on its way.
    let records: Vec<Document> = futures_util::TryStreamExt::try_collect(
        db.collection::<Document>("repairs")
            .find(doc! { "device": "cut-3", "outcome": "asked" })
            .await
            .expect("find"),
    )
    .await
    .expect("repairs");
    let mut asks: Vec<(i64, i64, i64)> = Vec::new(); // (at, from, to)
    for record in &records {
        let at = record.get_datetime("at").expect("at").timestamp_millis();
        for range in record.get_array("ranges").expect("ranges") {
            let range = range.as_array().expect("a range");
            let bound = |i: usize| match &range[i] {
                bson::Bson::Int64(n) => *n,
                bson::Bson::Int32(n) => i64::from(*n),
                other => panic!("not a seq: {other}"),
            };
            asks.push((at, bound(0), bound(1)));
        }
    }
    for (i, &(at, from, to)) in asks.iter().enumerate() {
        for &(other_at, other_from, other_to) in &asks[i + 1..] {
            assert!(
                (at - other_at).abs() >= 2000 || to < other_from || other_to < from,
                "{from}-{to} and {other_from}-{other_to} asked within 2 s"
            );
        }
    }
    for mut replica in [a, b] {
        replica.stop_cleanly().await;
    }
}

/// A sensor process that crashed is restarted with the same --replay-dir: a gap left in
/// its earlier boot is filled from the files that boot wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_boots_gap_is_filled_from_disk_after_the_sensor_restarts() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let replay_dir = brokers.dir().join("replay");
    let replay_dir = replay_dir.to_str().expect("a UTF-8 path");
    let sensor_args = ["--replay-dir", replay_dir];
    // Long enough that the sensor is gone before the persister asks.
    let args = ["--repair-after", "8", "--client-id", "disk"];
    let persister = brokers.persister_ready(&mongo, &args).await;
    let mut first = stream(&brokers, "rep-7", "200", &sensor_args);
    wait_stored(&db, "rep-7", 100).await;
    let first_boot = stored_seqs(&db, "rep-7").await[0].0.clone();

    // A hole in the first boot, seen by the persister as readings after it arrive.
    lose_session(&brokers, persister, "disk").await;
    let mut persister = brokers.start_persister(&mongo, &args);
    let before = count(&db, doc! { "device": "rep-7" }).await;
    wait_for(
        "readings after the hole stored",
        || count(&db, doc! { "device": "rep-7" }),
        |n| *n >= before + 50,
    )
    .await;
    // The sensor process crashes, and comes back as a new boot with the same folder.
    first.kill().await;
    let second = stream(&brokers, "rep-7", "200", &sensor_args);
    second.wait_for_log("replay buffer on disk: ").await;

    // The first boot's hole is asked for and answered from disk by the second process.
    let through = stored_seqs(&db, "rep-7")
        .await
        .into_iter()
        .filter(|(boot, _)| *boot == first_boot)
        .map(|(_, seq)| seq)
        .max()
        .expect("first boot stored");
    wait_for_within(
        REPAIRED_WITHIN,
        &format!("seq 1 to {through} of boot {first_boot} stored"),
        || {
            count(
                &db,
                doc! { "device": "rep-7", "boot": &first_boot, "seq": { "$lte": through } },
            )
        },
        |n| *n == through as u64,
    )
    .await;
    second
        .wait_for_log(&format!("asked_boot=\"{first_boot}\""))
        .await;
    assert!(
        !first.stderr().contains("replaying readings"),
        "the first process answered before it crashed:\n{}",
        first.stderr()
    );
    stop_stream(second).await;
    persister.stop_cleanly().await;
}

/// A boot's first readings reached the cloud while nothing carried them to the
/// database (at a real site: they reached the edge broker before the forwarder
/// subscribed): the first reading the persister stores is not seq 1, and seq 1 up to it
/// is asked of the device like any other lasting hole, and stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boots_first_readings_never_stored_are_asked_for_from_seq_1() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    // The sensor starts before any persister: its first 100 readings cross the cloud
    // broker with no session to keep them.
    let mut watcher = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    watcher.subscribe("/sensor/#").await;
    let sensor = stream(&brokers, "rep-8", "100", &[]);
    for _ in 0..100 {
        watcher.next_message().await;
    }
    drop(watcher);
    let args = ["--repair-after", "2", "--client-id", "late"];
    let mut persister = brokers.persister_ready(&mongo, &args).await;
    wait_stored(&db, "rep-8", 1).await;
    let first = stored_seqs(&db, "rep-8").await[0].1;
    assert!(
        first > 100,
        "seq {first} stored: the first 100 were carried"
    );

    // 1 up to the first stored is asked for, and stored.
    wait_for_within(
        REPAIRED_WITHIN,
        "seq 1 of rep-8 stored",
        || count(&db, doc! { "device": "rep-8", "seq": 1 }),
        |n| *n == 1,
    )
    .await;
    wait_repaired(&mongo, "rep-8", first as u64 + 100).await;
    let from_one = db
        .collection::<Document>("repairs")
        .count_documents(doc! { "device": "rep-8", "outcome": "asked", "from": 1 })
        .await
        .expect("count");
    assert!(from_one >= 1, "no request from seq 1 recorded");
    // readings gaps sees the boot whole from seq 1.
    let output = run_readings(
        mongo.uri(),
        mongo.database_name(),
        &["gaps", "--device", "rep-8", "--format", "json"],
    );
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(rows[0]["first"], 1, "{rows}");
    assert_eq!(rows[0]["missing"], 0, "{rows}");
    assert_all_stored_once(&mongo, sensor, &persister, "rep-8").await;
    persister.stop_cleanly().await;
}

/// The protocol's rights: a device account reads its own requests only, and only the
/// persister's user may ask on the cloud broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_persister_asks_and_a_device_hears_only_its_own_requests() {
    let brokers = spawn_brokers().await;
    let password = brokers.local.add_device("esp-a", "default");
    let mut device = brokers.local.log_in("esp-a", &password).await;
    device.subscribe("/replay/esp-a/request").await;
    // Mosquitto may grant the subscription and deliver nothing, or refuse it.
    let _ = device.try_subscribe("/replay/esp-b/request").await;

    // Each request below, had it been delivered, would arrive before the one after it.
    let mut intruder = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    intruder
        .publish(
            "/replay/esp-a/request",
            QoS::AtLeastOnce,
            false,
            br#"{"boot":"x","ranges":[[1,1]]}"#,
        )
        .await;
    let mut persister = TestClient::connect(brokers.cloud.port, "mongo-persister").await;
    persister
        .publish(
            "/replay/esp-b/request",
            QoS::AtLeastOnce,
            false,
            br#"{"boot":"b","ranges":[[1,1]]}"#,
        )
        .await;
    persister
        .publish(
            "/replay/esp-a/request",
            QoS::AtLeastOnce,
            false,
            br#"{"boot":"a","ranges":[[1,1]]}"#,
        )
        .await;
    let first = device.next_message().await;
    assert_eq!(first.topic, "/replay/esp-a/request");
    assert_eq!(&first.payload[..], br#"{"boot":"a","ranges":[[1,1]]}"#);
}

/// A fleet in one process (`--devices 3`, a topic each): every simulated device keeps
/// its own buffer and answers on its own request topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_device_of_a_fleet_fills_its_own_holes() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let devices = ["fleet-0001", "fleet-0002", "fleet-0003"];
    let args = ["--repair-after", "2", "--client-id", "fleet"];
    let persister = brokers.persister_ready(&mongo, &args).await;
    let fleet = stream(
        &brokers,
        "fleet-0001",
        "300",
        &["--devices", "3", "--topic", "/sensor/{device}/temperature"],
    );
    wait_for(
        "readings of every device stored",
        || count(&db, doc! { "device": "fleet-0003" }),
        |n| *n >= 50,
    )
    .await;
    lose_session(&brokers, persister, "fleet").await;
    let mut persister = brokers.start_persister(&mongo, &args);

    for device in devices {
        let before = count(&db, doc! { "device": device }).await;
        wait_repaired(&mongo, device, before + 200).await;
    }
    let sent = stop_stream(fleet).await;
    tests::stored::wait_for_readings(
        &db,
        doc! { "device": { "$in": devices.to_vec() } },
        sent as u64,
    )
    .await;
    for device in devices {
        let asked = db
            .collection::<Document>("repairs")
            .count_documents(doc! { "device": device, "outcome": "asked" })
            .await
            .expect("count");
        assert!(asked >= 1, "{device} was never asked: the hole was not its");
        assert!(gaps_clean(&mongo, device), "{device} incomplete");
    }
    persister.stop_cleanly().await;
}

/// One value of a service's metrics on `port`.
async fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = tests::prometheus::get(port, "/metrics").await;
    tests::prometheus::sample(&body, name).unwrap_or(0.0)
}

/// One account's junk: 40 readings of 1 MB with a valid boot and seq and a `value` that
/// is no number, then a good one. Once, the persister asked for the 40 again and again
/// (flagged, they stayed a hole) and the relay answered each time with all of them from
/// its log. Now a flagged reading of a vouched device keeps its key: received, no hole,
/// nothing asked, nothing sent again, each stored flagged once. A request repeated
/// within a minute is answered from the log once. An honest sensor beside it: every
/// reading stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_readings_are_no_hole_to_ask_for_and_a_range_is_answered_once() {
    let (brokers, mongo) = (tests::spawn_relay_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let metrics_port = tests::free_port();
    let address = format!("127.0.0.1:{metrics_port}");
    let log_dir = brokers.dir().join("relay-log");
    // The junk device's 40 MB at once within its share of the relay's log.
    let _relay = brokers
        .relay_ready(
            &log_dir,
            &["--metrics-address", &address, "--account-share", "128M"],
        )
        .await;
    let persister_port = tests::free_port();
    let persister_address = format!("127.0.0.1:{persister_port}");
    let _persister = brokers
        .persister_ready(
            &mongo,
            &[
                "--repair-after",
                "2",
                "--metrics-address",
                &persister_address,
            ],
        )
        .await;
    let mut honest = tests::stored::start_sensor(&brokers, "honest-5", "2000");
    // Messages of 1 MB: past a device account's default limit (256K).
    let password = brokers
        .local
        .add_device_with("junk-1", "default", &["--max-message", "2M"]);
    let mut device = brokers.local.log_in("junk-1", &password).await;
    let topic = "/sensor/junk-1/temperature";
    let pad = "x".repeat(1 << 20);
    for seq in 1..=40 {
        let junk = format!(r#"{{"boot":"b1","seq":{seq},"value":"junk","pad":"{pad}"}}"#);
        device
            .publish(topic, QoS::AtLeastOnce, false, junk.as_bytes())
            .await;
    }
    device
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            br#"{"boot":"b1","seq":41,"value":21.5}"#,
        )
        .await;
    let flagged = doc! { "device": "junk-1", "unparsed": true };
    wait_for_within(
        REPAIRED_WITHIN,
        "the 40 junk readings stored flagged and the good one",
        || async {
            (
                count(&db, flagged.clone()).await,
                count(&db, doc! { "device": "junk-1", "seq": 41, "value": 21.5 }).await,
            )
        },
        |stored| *stored == (40, 1),
    )
    .await;
    // Nothing to wait for can show that nothing is asked: three --repair-after windows
    // pass, and the repairer would have asked within the first.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(count(&db, flagged.clone()).await, 40, "stored once each");
    let asked = db
        .collection::<Document>("repairs")
        .count_documents(doc! { "_id.device": "junk-1" })
        .await
        .expect("count");
    assert_eq!(asked, 0, "junk-1 was asked for readings it had sent");
    assert_eq!(metric(metrics_port, "iot_relay_replayed_total").await, 0.0);

    // The same range asked twice, as a persister whose answer is on its way would: the
    // log answers once. Then all 40 of 1 MB: the device's budget of 32 MiB a minute
    // sends 32, the rest waits.
    let mut persister = TestClient::connect(brokers.cloud.port, "mongo-persister").await;
    for ranges in ["[[41,41]]", "[[41,41]]", "[[1,40]]"] {
        let request = format!(r#"{{"boot":"b1","ranges":{ranges}}}"#);
        persister
            .publish(
                "/replay/junk-1/request",
                QoS::AtLeastOnce,
                false,
                request.as_bytes(),
            )
            .await;
    }
    wait_for(
        "the rest of the third answer left for later",
        || metric(metrics_port, "iot_relay_replays_over_budget_total"),
        |over| *over >= 8.0,
    )
    .await;
    assert_eq!(
        metric(metrics_port, "iot_relay_replay_requests_held_total").await,
        1.0
    );
    assert_eq!(metric(metrics_port, "iot_relay_replayed_total").await, 33.0);
    // The 33 answers are what is stored already: refused as duplicates, flagged ones too.
    wait_for(
        "the answers refused as duplicates",
        || metric(persister_port, "iot_persister_duplicates_total"),
        |duplicates| *duplicates >= 33.0,
    )
    .await;
    assert_eq!(
        count(&db, flagged).await,
        40,
        "a replay is not stored again"
    );
    assert_eq!(count(&db, doc! { "device": "junk-1", "seq": 41 }).await, 1);

    honest.expect_success().await;
    wait_for_within(
        REPAIRED_WITHIN,
        "every honest reading",
        || count(&db, doc! { "device": "honest-5" }),
        |stored| *stored >= 2000,
    )
    .await;
    tests::stored::assert_exactly_once(&stored_seqs(&db, "honest-5").await, 2000);
}
