//! End-to-end tests of the storage half: sensors on the edge broker, the bridge, the
//! cloud broker, the real `mongo-persister` and `readings` binaries, and a real
//! MongoDB-wire-protocol server.

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use std::collections::BTreeSet;
use std::time::Duration;

use bson::{doc, Document};
use iot_core::payload::format_time;
use rumqttc::QoS;
use tests::stored::{
    assert_exactly_once, count, integer, start_sensor, stored_seqs, wait_for_readings,
};
use tests::{
    free_port, readings_with_code, spawn_brokers, spawn_mongo, spawn_stoppable_mongo, wait_for,
    wait_for_within, TestClient,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensor_readings_are_stored_exactly_once_across_a_sensor_restart() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let mut persister = brokers.persister_ready(&mongo, &[]).await;

    // Two runs of one device: the second starts again at seq 1 under a new boot.
    for _ in 0..2 {
        let mut sensor = start_sensor(&brokers, "t-1", "200");
        sensor.expect_success().await;
    }
    wait_for_readings(&db, doc! { "device": "t-1" }, 400).await;
    let seqs = stored_seqs(&db, "t-1").await;
    let boots: BTreeSet<&String> = seqs.iter().map(|(boot, _)| boot).collect();
    assert_eq!(boots.len(), 2);
    for boot in boots {
        let of_boot: Vec<_> = seqs.iter().filter(|(b, _)| b == boot).cloned().collect();
        assert_exactly_once(&of_boot, 200);
    }
    let reading = db
        .collection::<Document>("readings")
        .find_one(doc! { "device": "t-1", "seq": 1_i64 })
        .await
        .expect("find")
        .expect("stored");
    assert_eq!(reading.get_str("topic"), Ok("/sensor/temperature"));
    assert_eq!(reading.get_str("unit"), Ok("°C"));
    assert!(reading
        .get_f64("value")
        .is_ok_and(|v| (20.0..=30.0).contains(&v)));
    assert!(reading.get_datetime("ts").is_ok() && reading.get_datetime("received_at").is_ok());
    persister.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persister_killed_mid_stream_loses_nothing_and_stores_nothing_twice() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let mut persister = brokers.persister_ready(&mongo, &[]).await;
    let mut sensor = start_sensor(&brokers, "t-2", "3000");

    wait_for(
        "some readings stored",
        || count(&db, doc! {}),
        |n| *n >= 300,
    )
    .await;
    persister.kill().await;
    // Back under the same client id: the broker kept the session and its subscriptions.
    let mut persister = brokers.start_persister(&mongo, &[]);
    persister.wait_for_log("connected").await;

    sensor.expect_success().await;
    wait_for_readings(&db, doc! { "device": "t-2" }, 3000).await;
    assert_exactly_once(&stored_seqs(&db, "t-2").await, 3000);
    persister.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_nothing_and_the_persister_keeps_running() {
    let brokers = spawn_brokers().await;
    let Some(mut mongo) = spawn_stoppable_mongo().await else {
        return;
    };
    let db = mongo.database().await;
    let mut persister = brokers.persister_ready(&mongo, &[]).await;
    let args = [
        "--format",
        "json",
        "--qos",
        "1",
        "--interval",
        "0.005",
        "--no-retain",
        "--count",
        "1500",
        "--device",
        "t-3",
    ];
    let mut sensor = brokers.start_edge("temperature-sensor", &args);

    wait_for(
        "some readings stored",
        || count(&db, doc! {}),
        |n| *n >= 100,
    )
    .await;
    mongo.stop().await;
    // Held while the database is away: retried, never acknowledged, never dropped.
    persister.wait_for_logs("cannot write to MongoDB", 3).await;
    assert!(
        mongo.start().await,
        "MongoDB did not come back: {}",
        mongo.log()
    );

    sensor.expect_success().await;
    wait_for_readings(&db, doc! { "device": "t-3" }, 1500).await;
    assert_exactly_once(&stored_seqs(&db, "t-3").await, 1500);
    assert!(persister.is_running(), "{}", persister.stderr());
    persister.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_payload_is_stored_once_as_a_reading_or_flagged_raw() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let mut persister = brokers
        .persister_ready(&mongo, &["--stats-interval", "0.1"])
        .await;

    let mut sensor = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    let json = br#"{"device":"t-4","boot":"b1","seq":1,"ts":"2026-11-24T10:00:00.000Z","value":21.5,"unit":"C"}"#;
    // The JSON reading comes twice, as a redelivery would: it is stored once.
    let payloads: [&[u8]; 5] = [b"23.41", json, br#"{"value": "#, &[0xff, 0xfe, 0x00], json];
    for payload in payloads {
        sensor
            .publish("/sensor/temperature", QoS::AtLeastOnce, false, payload)
            .await;
    }
    persister
        .wait_for_log("in=5 written=4 duplicates=1 unparsed=2")
        .await;
    assert_eq!(count(&db, doc! {}).await, 4);

    assert_eq!(count(&db, doc! { "value": 23.41 }).await, 1);
    let stored = db
        .collection::<Document>("readings")
        .find_one(doc! { "device": "t-4" })
        .await
        .expect("find")
        .expect("the JSON reading");
    assert_eq!(integer(&stored, "seq"), 1);
    assert_eq!(
        stored
            .get_datetime("ts")
            .map(|t| t.try_to_rfc3339_string().unwrap_or_default()),
        Ok("2026-11-24T10:00:00Z".to_string())
    );
    assert_eq!(
        count(&db, doc! { "unparsed": true, "raw": "{\"value\": " }).await,
        1
    );
    assert_eq!(
        count(&db, doc! { "unparsed": true, "raw_base64": "//4A" }).await,
        1
    );
    assert!(persister.is_running(), "{}", persister.stderr());
    persister.stop_cleanly().await;
    assert!(
        persister.stderr().contains("unparsed=2"),
        "{}",
        persister.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_reading_is_stored_once_however_often_it_is_replayed() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    // Retained before any persister ever ran: the first one stores it.
    let mut sensor = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    sensor
        .publish("/sensor/temperature", QoS::AtLeastOnce, true, b"24.00")
        .await;
    TestClient::retained(brokers.cloud.port, "/sensor/temperature").await;

    let mut first = brokers
        .persister_ready(&mongo, &["--client-id", "first"])
        .await;
    wait_for_readings(&db, doc! { "value": 24.0 }, 1).await;
    first.stop_cleanly().await;

    // A new session gets the retained reading replayed: it is not stored again.
    let mut second = brokers
        .persister_ready(
            &mongo,
            &["--client-id", "second", "--stats-interval", "0.1"],
        )
        .await;
    second.wait_for_log("skipped=1").await;
    assert_eq!(count(&db, doc! {}).await, 1);
    second.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_password_never_reaches_the_log() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let port = mongo.uri().rsplit(':').next().expect("port").to_string();
    let uri = format!("mongodb://app:s3cret-pw@127.0.0.1:{port}/?authSource=admin");
    let env = [
        ("MONGODB_URI", uri),
        ("MONGODB_DATABASE", mongo.database_name().to_string()),
        ("MONGODB_TIMEOUT", "1".to_string()),
    ];
    let mut persister = tests::spawn_service_with_env(
        "mongo-persister",
        brokers.dir(),
        brokers.cloud.port,
        Some("mongo-persister"),
        &[],
        &env,
    );
    // Whether the server takes the credentials or not, the address is logged redacted.
    persister.wait_for_log("mongodb://app:***@127.0.0.1").await;
    persister.stop_cleanly().await;
    assert!(
        !persister.stderr().contains("s3cret-pw"),
        "{}",
        persister.stderr()
    );
}

/// The number after `in=` in the last statistics line of a persister's log.
fn messages_in(log: &str) -> u64 {
    log.lines()
        .rev()
        .find_map(|line| line.split("in=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no statistics line in:\n{log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_stream_and_store_each_reading_once() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let mut a = brokers
        .persister_ready(&mongo, &["--share", "store", "--client-id", "replica-a"])
        .await;
    let mut b = brokers
        .persister_ready(&mongo, &["--share", "store", "--client-id", "replica-b"])
        .await;

    let mut sensor = start_sensor(&brokers, "t-5", "1000");
    sensor.expect_success().await;
    wait_for_readings(&db, doc! { "device": "t-5" }, 1000).await;
    assert_exactly_once(&stored_seqs(&db, "t-5").await, 1000);

    a.stop_cleanly().await;
    b.stop_cleanly().await;
    let (from_a, from_b) = (messages_in(&a.stderr()), messages_in(&b.stderr()));
    assert!(
        from_a > 0 && from_b > 0,
        "one replica got everything: {from_a} / {from_b}"
    );
    assert_eq!(from_a + from_b, 1000, "each reading goes to one replica");
}

/// Runs `readings` with `args` against database `database` at `uri`; returns
/// (success, stdout, stderr).
fn readings(uri: &str, database: &str, args: &[&str]) -> (bool, String, String) {
    let (code, out, err) = readings_with_code(uri, database, args);
    (code == Some(0), out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_answers_latest_range_stats_and_status_in_every_format() {
    let mongo = spawn_mongo().await;
    let db = mongo.database().await;
    // Readings in two whole minutes, starting two minutes ago.
    let now = chrono::Utc::now().timestamp();
    let minute_start =
        chrono::DateTime::from_timestamp(now - now % 60 - 120, 0).expect("valid time");
    let at = |seconds: i64| {
        bson::DateTime::from_chrono(minute_start + chrono::Duration::seconds(seconds))
    };
    let readings_of = |topic: &str, values: &[(i64, f64)]| -> Vec<Document> {
        values
            .iter()
            .map(|(second, value)| doc! { "topic": topic, "value": value, "ts": at(*second), "received_at": at(*second), "unit": "hPa" })
            .collect()
    };
    let collection = db.collection::<Document>("readings");
    collection
        .insert_many(readings_of(
            "/sensor/pressure",
            &[(0, 1000.0), (10, 1002.0), (70, 1010.0)],
        ))
        .await
        .expect("insert");
    collection
        .insert_many(readings_of("/sensor/temperature", &[(5, 21.0)]))
        .await
        .expect("insert");
    db.collection::<Document>("status")
        .insert_many([
            doc! { "topic": "/device/status", "device": "dev-1", "status": "online", "ts": at(0), "received_at": at(0) },
            doc! { "topic": "/device/status", "device": "dev-1", "status": "offline", "ts": at(30), "received_at": at(30) },
        ])
        .await
        .expect("insert");
    let (uri, name) = (mongo.uri(), mongo.database_name());

    let (ok, out, err) = readings(uri, name, &["latest"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("topic") && lines[0].contains("value"),
        "{out}"
    );
    assert!(
        lines[1].contains("/sensor/pressure") && lines[1].contains("1010"),
        "{out}"
    );
    assert!(
        lines[2].contains("/sensor/temperature") && lines[2].contains("21"),
        "{out}"
    );

    let (ok, out, err) = readings(
        uri,
        name,
        &[
            "range",
            "--topic",
            "/sensor/pressure",
            "--since",
            "1h",
            "--format",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    let values: Vec<f64> = rows
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["value"].as_f64().expect("value"))
        .collect();
    assert_eq!(values, [1000.0, 1002.0, 1010.0]);

    let (ok, out, err) = readings(
        uri,
        name,
        &[
            "stats",
            "--topic",
            "/sensor/pressure",
            "--since",
            "1h",
            "--every",
            "1m",
            "--format",
            "csv",
        ],
    );
    assert!(ok, "{err}");
    let first_bucket = format_time(minute_start);
    let second_bucket = format_time(minute_start + chrono::Duration::minutes(1));
    assert_eq!(
        out,
        format!("bucket,count,min,avg,max\n{first_bucket},2,1000.0,1001.0,1002.0\n{second_bucket},1,1010.0,1010.0,1010.0\n")
    );

    let (ok, out, err) = readings(uri, name, &["status", "--format", "csv"]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        format!(
            "device,status,since\ndev-1,offline,{}\n",
            format_time(minute_start + chrono::Duration::seconds(30))
        )
    );

    let (ok, out, _) = readings(uri, name, &["range", "--topic", "/sensor/none"]);
    assert!(ok);
    assert!(out.starts_with("no readings on /sensor/none"), "{out}");
}

#[test]
fn readings_says_when_the_database_is_unreachable() {
    let started = std::time::Instant::now();
    let uri = format!("mongodb://127.0.0.1:{}", free_port());
    let (ok, out, err) = readings(&uri, "iot", &["latest", "--mongodb-timeout", "1"]);
    assert!(!ok, "{out}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("no MongoDB server answered"), "{err}");
    assert!(
        started.elapsed() < tests::WAIT,
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_gaps_finds_missing_and_duplicate_seqs_per_boot() {
    let mongo = spawn_mongo().await;
    let (uri, name) = (mongo.uri(), mongo.database_name());
    let collection = mongo.database().await.collection::<Document>("readings");
    let now = bson::DateTime::now();
    let reading = |device: &str, boot: &str, seq: i64| {
        doc! { "topic": "/sensor/pressure", "value": 1000.0, "ts": now, "received_at": now,
        "device": device, "boot": boot, "seq": seq }
    };
    // Two boots of one device (the second starts again at 1), nothing missing.
    let clean: Vec<Document> = (1..=5)
        .map(|seq| reading("pres-0001", "boot-a", seq))
        .chain((1..=3).map(|seq| reading("pres-0001", "boot-b", seq)))
        .collect();
    collection.insert_many(clean).await.expect("insert");
    let (code, out, err) = readings_with_code(uri, name, &["gaps"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        out.lines().count(),
        3,
        "a header and one line per boot:\n{out}"
    );

    // Another device with seq 3 and 4 missing and 6 stored twice.
    collection
        .insert_many([1, 2, 5, 6, 6, 7].map(|seq| reading("temp-0001", "boot-c", seq)))
        .await
        .expect("insert");
    let (code, out, err) = readings_with_code(uri, name, &["gaps", "--format", "json"]);
    assert_eq!(code, Some(1), "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    let temp = rows
        .as_array()
        .expect("array")
        .iter()
        .find(|row| row["device"] == "temp-0001")
        .expect("a row for temp-0001");
    assert_eq!(temp["missing"], 2);
    assert_eq!(temp["duplicates"], 1);
    assert_eq!(temp["missing seq"], "3-4");

    // --device narrows it to the clean one.
    let (code, out, err) = readings_with_code(uri, name, &["gaps", "--device", "pres-0001"]);
    assert_eq!(code, Some(0), "{out}{err}");

    // --settle: a hole whose later readings were all received within it may still be
    // on its way (another replica's batch), so it is not reported yet; the same hole
    // below a reading received before it is.
    let received =
        |seconds_ago: i64| bson::DateTime::from_millis(now.timestamp_millis() - seconds_ago * 1000);
    let in_flight = [(1, 1200), (2, 1200), (4, 0)].map(|(seq, ago)| {
        let mut document = reading("hum-0001", "boot-d", seq);
        document.insert("received_at", received(ago));
        document
    });
    collection.insert_many(in_flight).await.expect("insert");
    let settled = ["gaps", "--device", "hum-0001", "--settle", "10m"];
    let (code, out, err) = readings_with_code(uri, name, &settled);
    assert_eq!(code, Some(0), "3 may still come:\n{out}{err}");
    let (code, out, err) = readings_with_code(uri, name, &["gaps", "--device", "hum-0001"]);
    assert_eq!(code, Some(1), "without --settle 3 is missing:\n{out}{err}");
    let mut late = reading("hum-0001", "boot-d", 5);
    late.insert("received_at", received(900));
    collection.insert_one(late).await.expect("insert");
    let (code, out, err) = readings_with_code(uri, name, &settled);
    assert_eq!(
        code,
        Some(1),
        "5 came long ago, so 3 is missing:\n{out}{err}"
    );

    // A database that does not answer is exit code 2, not a verdict.
    let down = format!("mongodb://127.0.0.1:{}", free_port());
    let (code, _, err) = readings_with_code(&down, "iot", &["gaps", "--mongodb-timeout", "1"]);
    assert_eq!(code, Some(2), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_persister_subscribes_before_the_database_is_up_and_loses_nothing() {
    let brokers = spawn_brokers().await;
    let Some(mut mongo) = spawn_stoppable_mongo().await else {
        return;
    };
    mongo.stop().await;
    // A new session on a new cloud broker, its database down: it subscribes at once and
    // says so with its ready file.
    let ready = brokers.dir().join("persister.ready");
    let ready_arg = ready.to_string_lossy().into_owned();
    let mut persister = brokers
        .persister_ready(&mongo, &["--ready-file", &ready_arg])
        .await;
    wait_for(
        "the ready file",
        || std::future::ready(ready.exists()),
        |exists| *exists,
    )
    .await;
    start_sensor(&brokers, "t-early", "300")
        .expect_success()
        .await;
    persister.wait_for_log("MongoDB at").await;

    assert!(mongo.start().await, "{}", mongo.log());
    let db = mongo.database().await;
    wait_for_readings(&db, doc! { "device": "t-early" }, 300).await;
    assert_exactly_once(&stored_seqs(&db, "t-early").await, 300);
    persister.stop_cleanly().await;
    assert!(!ready.exists(), "the ready file outlived the persister");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_is_a_ttl_index_that_follows_the_setting() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let kept = |collection: &'static str| {
        let db = db.clone();
        async move {
            iot_store::retention(&db, collection)
                .await
                .expect("the indexes")
                .map(|(_, keep)| keep.as_secs())
        }
    };
    // What `readings info` says each collection keeps.
    let info = || {
        let (ok, out, err) = readings(
            mongo.uri(),
            mongo.database_name(),
            &["info", "--format", "json"],
        );
        assert!(ok, "{err}");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("JSON rows");
        rows.iter()
            .map(|row| {
                format!(
                    "{} {}",
                    row["collection"].as_str().unwrap_or("?"),
                    row["kept"].as_str().unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
    };

    // A reading stored 40 days ago and one stored now.
    let now = chrono::Utc::now();
    let stored_at = |days: i64| bson::DateTime::from_chrono(now - chrono::Duration::days(days));
    db.collection::<Document>("readings")
        .insert_many([
            doc! { "topic": "/sensor/old", "value": 1.0, "ts": stored_at(40), "received_at": stored_at(40) },
            doc! { "topic": "/sensor/new", "value": 2.0, "ts": stored_at(0), "received_at": stored_at(0) },
        ])
        .await
        .expect("insert");

    let mut persister = brokers
        .persister_ready(
            &mongo,
            &["--retention", "30d", "--status-retention", "365d"],
        )
        .await;
    persister.wait_for_log("retention: status: kept 365d").await;
    persister
        .wait_for_log("retention: readings: kept 30d")
        .await;
    assert_eq!(kept("readings").await, Some(30 * 86_400));
    assert_eq!(kept("status").await, Some(365 * 86_400));
    assert_eq!(info(), ["readings 30d", "status 365d"]);
    // MongoDB's TTL monitor runs once a minute.
    wait_for_within(
        Duration::from_secs(90),
        "the reading older than the retention to be removed",
        || count(&db, doc! { "topic": "/sensor/old" }),
        |n| *n == 0,
    )
    .await;
    assert_eq!(count(&db, doc! { "topic": "/sensor/new" }).await, 1);
    persister.stop_cleanly().await;

    // A changed setting changes the index; an unchanged one leaves it alone.
    let mut persister = brokers
        .persister_ready(
            &mongo,
            &["--retention", "12h", "--status-retention", "365d"],
        )
        .await;
    persister
        .wait_for_log("retention: readings: kept 12h")
        .await;
    assert_eq!(kept("readings").await, Some(12 * 3_600));
    assert_eq!(kept("status").await, Some(365 * 86_400));
    assert!(
        !persister.stderr().contains("retention: status"),
        "{}",
        persister.stderr()
    );
    persister.stop_cleanly().await;

    // Without the settings, nothing is removed any more.
    let mut persister = brokers.persister_ready(&mongo, &[]).await;
    persister
        .wait_for_log("retention: status: kept without limit")
        .await;
    persister
        .wait_for_log("retention: readings: kept without limit")
        .await;
    assert_eq!(kept("readings").await, None);
    assert_eq!(kept("status").await, None);
    assert_eq!(info(), ["readings without limit", "status without limit"]);
    persister.stop_cleanly().await;
}
